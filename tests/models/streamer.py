"""
A streaming model written by hand in the C{jsonl} protocol (no aibackend.worker), for
tests/test_streaming_daemon.py. One thread, many streams at once: stdin is read with
select() between the chunks that are due, so a cancel is seen as soon as it comes.

    python streamer.py

What a request asks (C{{"op": ...}}):

  - C{ticks}: C{n} chunks C{{"tag": tag, "i": k, "at": time.time(), "pid": pid}}, C{pause}
    seconds apart (the first after C{first} seconds, 0 by default), then the end C{end} says (numbers may be given as
    strings, as a GET's query parameters are):
      - C{"done"} (the default): C{{"id", "done": true}}
      - C{"output"}: C{{"id", "output": {"tag", "chunks": n}}}
      - C{"error"}: C{{"id", "error": {"message": message, "status": status}}}
      - C{"crash"}: a line on stderr, and the process exits with status 3
      - C{"never"}: chunks forever
    With C{pad}, each chunk also has C{"pad"}: that many C{x}. With C{mark} (a file
    name), a cancel of the request appends C{{"id", "at"}} (when it was read) to that
    file, one JSON line per cancel.
  - C{pid}: answers C{{"pid": its pid}} at once.
"""

import json
import os
import select
import sys
import time

OUT = 1
streams = {}  # wire id -> dict(request, next chunk's number, when it is due)


def send(message) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(OUT, data):]


def start(wire_id, request) -> None:
    op = request.get("op") if isinstance(request, dict) else None
    if op == "pid":
        send({"id": wire_id, "output": {"pid": os.getpid()}})
        return
    if op != "ticks":
        send({"id": wire_id, "error": {"message": f"unknown op {op!r}", "status": 400}})
        return
    streams[wire_id] = {"request": request, "i": 0, "due": time.monotonic() + float(request.get("first", 0))}


def step(wire_id, stream) -> None:
    request = stream["request"]
    i = stream["i"]
    end = request.get("end", "done")
    if end == "never" or i < int(request.get("n", 3)):
        chunk = {"tag": request.get("tag"), "i": i, "at": time.time(), "pid": os.getpid()}
        if request.get("pad"):
            chunk["pad"] = "x" * int(request["pad"])
        send({"id": wire_id, "chunk": chunk})
        stream["i"] = i + 1
        stream["due"] = time.monotonic() + float(request.get("pause", 0))
        return
    del streams[wire_id]
    if end == "output":
        send({"id": wire_id, "output": {"tag": request.get("tag"), "chunks": i}})
    elif end == "error":
        send({"id": wire_id, "error": {"message": request.get("message", "failed mid-stream"),
                                       "status": int(request.get("status", 500))}})
    elif end == "crash":
        sys.stderr.write("crashing mid-stream on purpose\n")
        sys.stderr.flush()
        os._exit(3)
    else:
        send({"id": wire_id, "done": True})


def cancel(wire_id) -> None:
    at = time.time()
    stream = streams.pop(wire_id, None)
    if stream is None:
        return
    mark = stream["request"].get("mark")
    if mark:
        with open(mark, "a") as f:
            f.write(json.dumps({"id": wire_id, "at": at}) + "\n")


def handle(line: bytes) -> None:
    message = json.loads(line)
    if message.get("op") == "cancel":
        cancel(message["id"])
    elif message.get("op") == "predict":
        start(message["id"], message.get("input"))


def main() -> None:
    send({"ready": True})
    buffered = b""
    while True:
        now = time.monotonic()
        for wire_id, stream in list(streams.items()):
            if stream["due"] <= now:
                step(wire_id, stream)
        wait = min((stream["due"] for stream in streams.values()), default=None)
        timeout = None if wait is None else max(0.0, wait - time.monotonic())
        readable, _, _ = select.select([0], [], [], timeout)
        if not readable:
            continue
        data = os.read(0, 65536)
        if not data:
            return  # stdin closed: the daemon stops us
        buffered += data
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            if line.strip():
                handle(line)


if __name__ == "__main__":
    main()
