"""
A model written with aibackend.worker, for tests/test_worker.py.

    python worker_cases.py [CONCURRENCY]

Its input says what to do: C{{"op": "sleep", "seconds": s, "tag": t}}, C{"bad"} (BadInput),
C{"teapot"} (a ModelError with status 418), C{"boom"} (a RuntimeError), C{"print"}
(prints, and writes on file descriptor 1 directly), C{"nan"}, C{"object"} (output that is
not JSON), C{"numpy"}, C{"loaded"}; C{"stream"} / C{"astream"} (a generator / an async
generator yielding C{{"word", "at"}} for each of C{words}, C{pause} seconds apart, then
returning C{returns} if given; C{"boom_at"}: raising at that word; C{"forever"}: never
ending, printing "finally ran for <id>" once closed); anything else is echoed.
"""

import asyncio

import os
import sys
import threading
import time

from aibackend.worker import BadInput, ModelError, current_request_id, serve


class Cases:
    loaded = False

    def __init__(self):
        self.stops = {}  # request id -> Event, for "interruptible"

    def cancel(self, request_id):
        stop = self.stops.get(request_id)
        if stop is not None:
            stop.set()

    def load(self):
        print("loading the model")
        time.sleep(0.1)
        self.loaded = True

    def predict(self, data):
        op = data.get("op") if isinstance(data, dict) else None
        if op == "sleep":
            time.sleep(data["seconds"])
            return {"slept": data["seconds"], "tag": data.get("tag")}
        if op == "bad":
            raise BadInput('send {"op": "..."}')
        if op == "teapot":
            raise ModelError("short and stout", status=418)
        if op == "boom":
            raise RuntimeError("boom")
        if op == "print":
            print(data["text"])
            print("a second line", end="")
            print(" ends here")
            os.write(1, b"written on fd 1\n")
            return {"printed": True}
        if op == "nan":
            return {"value": float("nan")}
        if op == "object":
            return {"value": object()}
        if op == "numpy":
            import numpy

            return {"array": numpy.arange(3), "scalar": numpy.float32(0.5), "pair": (1, 2)}
        if op == "interruptible":
            stop = self.stops.setdefault(current_request_id(), threading.Event())
            stopped = stop.wait(data["seconds"])
            return {"stopped": stopped, "id": current_request_id()}
        if op == "stream":
            return self.words(data, current_request_id())
        if op == "astream":
            return self.awords(data, current_request_id())
        if op == "loaded":
            return {"loaded": self.loaded}
        return {"echo": data}

    @staticmethod
    def words(data, request_id):
        try:
            n = 0
            while data.get("forever") or n < len(data["words"]):
                if n == data.get("boom_at"):
                    raise RuntimeError("boom mid-stream")
                if n:
                    time.sleep(data.get("pause", 0))
                word = data["words"][n % len(data["words"])]
                yield {"word": word, "at": time.time()}
                n += 1
            return data.get("returns")
        finally:
            print(f"finally ran for {request_id}")

    @staticmethod
    async def awords(data, request_id):
        try:
            n = 0
            while data.get("forever") or n < len(data["words"]):
                if n == data.get("boom_at"):
                    raise RuntimeError("boom mid-stream")
                if n:
                    await asyncio.sleep(data.get("pause", 0))
                yield {"word": data["words"][n % len(data["words"])], "at": time.time()}
                n += 1
        finally:
            print(f"finally ran for {request_id}")


if __name__ == "__main__":
    serve(Cases(), concurrency=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
