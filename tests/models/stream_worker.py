"""
A streaming model written with aibackend.worker, for tests/test_streaming_daemon.py: its
predict is a generator (or, with C{"async": true}, an async generator).

Its input: C{{"words": [...], "pause": s, "forever": false, "mark": file, "chunks":
"text"|"stamped"}}. It yields each word (C{"text"}: the word as a string, with a space
before all but the first; C{"stamped"}: C{{"word", "at": time.time()}}), C{pause} seconds
apart, over and over with C{forever}. When the generator is closed before its end (the
daemon's cancel), C{{"at": time.time(), "how": "GeneratorExit"|"CancelledError"}} is
written to C{mark}; C{"boom_at": k} raises at word k (the plain generator).
"""

import asyncio
import json
import os
import time

from aibackend.worker import serve


def _closed(mark, how) -> None:
    if mark:
        with open(mark + ".tmp", "w") as f:
            f.write(json.dumps({"at": time.time(), "how": how}))
        os.rename(mark + ".tmp", mark)


def _value(data, n):
    words = data["words"]
    word = words[n % len(words)]
    if data.get("chunks") == "stamped":
        return {"word": word, "at": time.time()}
    return word if n == 0 else " " + word


def _more(data, n) -> bool:
    return data.get("forever") or n < len(data["words"])


def words(data):
    n = 0
    try:
        while _more(data, n):
            if n == data.get("boom_at"):
                raise RuntimeError("boom mid-stream")
            if n:
                time.sleep(data.get("pause", 0))
            yield _value(data, n)
            n += 1
    except GeneratorExit:
        _closed(data.get("mark"), "GeneratorExit")
        raise


async def awords(data):
    n = 0
    try:
        while _more(data, n):
            if n:
                await asyncio.sleep(data.get("pause", 0))
            yield _value(data, n)
            n += 1
    except (asyncio.CancelledError, GeneratorExit) as e:  # cancelled where it awaits, or closed between steps
        _closed(data.get("mark"), type(e).__name__)
        raise


def predict(data):
    return awords(data) if data.get("async") else words(data)


if __name__ == "__main__":
    serve(predict, concurrency=8)
