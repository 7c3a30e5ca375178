"""
A jsonl model written with aibackend.worker that takes rows along a batch dimension, for
tests/test_v2_batching_daemon.py: its input C{x} is a list of rows of two numbers; it
answers C{y}, each row doubled with the number of rows of the call appended (so a test sees
which requests were concatenated into one call), after 50 ms (so that requests gather).
"""

import time

from aibackend.worker import log, serve


def predict(data):
    rows = data["x"]
    log(f"call of {len(rows)} rows")
    time.sleep(0.05)
    return {"y": [[2 * a, 2 * b, len(rows)] for a, b in rows]}


serve(predict)
