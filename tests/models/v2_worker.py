"""
A jsonl model written with aibackend.worker, for tests/test_v2_daemon.py: what the Open
Inference Protocol's inputs look like to a model (one key per input tensor, nested lists
in its shape), read with L{aibackend.worker.tensor}.

Input: C{x} (FP32), C{n} (INT64), C{words} (BYTES), each optional. Answer: C{y} (2x),
C{total} (the sum of n), C{upper} (the words upper-cased). A negative C{total} is refused
(BadInput, 400).
"""

from aibackend.worker import BadInput, serve, tensor


def predict(data):
    answer = {}
    if "x" in data:
        answer["y"] = tensor(data, "x", "FP32") * 2
    if "n" in data:
        total = int(tensor(data, "n", "INT64").sum())
        if total < 0:
            raise BadInput(f"the total of n is negative ({total})")
        answer["total"] = total
    if "words" in data:
        answer["upper"] = [word.upper() for word in tensor(data, "words", "BYTES").ravel()]
    return answer


if __name__ == "__main__":
    serve(predict)
