"""
A model written with aibackend.worker that predicts in batches, for tests/test_worker.py
and tests/test_batching_daemon.py.

    python batch_cases.py [batch|single]

C{batch} (the default) has C{predict_batch}: each output is C{{"y": 2 * x, "batch": the
batch's size, "pid": ...}}; an input C{{"op": "bad"}} is answered with a BadInput in its
place (400), C{{"op": "boom"}} anywhere raises (the whole batch fails), C{{"op":
"short"}} returns one output too few, C{{"sleep": s}} sleeps that long first. C{single}
has only C{predict} (the same answer, batch size 1): the worker calls it per item.
"""

import os
import sys
import time

from aibackend.worker import BadInput, log, serve


def answer(data, size):
    if isinstance(data, dict) and data.get("op") == "bad":
        return BadInput("x must be a number")
    return {"y": 2 * data.get("x", 0), "batch": size, "pid": os.getpid()}


class Batched:
    def predict_batch(self, inputs):
        log(f"batch of {len(inputs)}")
        time.sleep(max((data.get("sleep", 0) for data in inputs if isinstance(data, dict)), default=0))
        ops = [data.get("op") for data in inputs if isinstance(data, dict)]
        if "boom" in ops:
            raise RuntimeError("the whole batch broke")
        outputs = [answer(data, len(inputs)) for data in inputs]
        return outputs[:-1] if "short" in ops else outputs


class Single:
    def predict(self, data):
        time.sleep(data.get("sleep", 0) if isinstance(data, dict) else 0)
        output = answer(data, 1)
        if isinstance(output, Exception):
            raise output
        return output


serve(Single() if sys.argv[1:] == ["single"] else Batched(), concurrency=2 if sys.argv[1:] == ["single"] else 1)
