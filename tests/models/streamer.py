"""
A streaming model written by hand in the C{jsonl} protocol (no aibackend.worker), for
tests/test_streaming_daemon.py and tests/test_stream_limits_daemon.py. One thread, many
streams at once: each request is a generator of its steps, and stdin is read with
select() between the steps that are due, so a cancel is seen as soon as it comes (a
cancelled request writes nothing more). Every cancel is logged: C{cancel for <id>} (a
C{log} line).

    python streamer.py

What a request asks (C{{"op": ...}}; numbers may be given as strings, as a GET's query
parameters are):

  - C{ticks}: C{n} chunks C{{"tag": tag, "i": k, "at": time.time(), "pid": pid}}, C{pause}
    seconds apart (the first after C{first} seconds, 0 by default), then the end C{end} says:
      - C{"done"} (the default): C{{"id", "done": true}}
      - C{"output"}: C{{"id", "output": {"tag", "chunks": n}}}
      - C{"error"}: C{{"id", "error": {"message": message, "status": status}}}
      - C{"crash"}: a line on stderr, and the process exits with status 3
      - C{"never"}: chunks forever
    With C{pad}, each chunk also has C{"pad"}: that many C{x}.
  - C{wait}: waits C{seconds}, then the chunk C{"late"}, then done
  - C{gap}: the chunk C{"a"}, waits C{seconds}, then the chunk C{"b"}, then done
  - C{flood}: C{count} chunks of a C{size}-character string as fast as the pipe takes
    them, writing the bytes written so far to the file C{progress} after each; then done
  - C{hold}: logs C{holding <id>}, then after C{seconds} a plain answer C{"held"}
  - C{pid}: answers C{{"pid": its pid}} at once.

With C{mark} (a file name), a cancel of the request appends C{{"id", "at"}} (when it was
read) to that file, one JSON line per cancel.
"""

import json
import os
import select
import sys
import time

OUT = 1
streams = {}  # wire id -> dict(request, its steps, when the next is due)


def send(message) -> int:
    data = (json.dumps(message) + "\n").encode()
    size = len(data)
    while data:
        data = data[os.write(OUT, data):]
    return size


def ticks(wire_id, request):
    yield float(request.get("first", 0))
    end = request.get("end", "done")
    i = 0
    while end == "never" or i < int(request.get("n", 3)):
        chunk = {"tag": request.get("tag"), "i": i, "at": time.time(), "pid": os.getpid()}
        if request.get("pad"):
            chunk["pad"] = "x" * int(request["pad"])
        send({"id": wire_id, "chunk": chunk})
        i += 1
        yield float(request.get("pause", 0))
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


def wait(wire_id, request):
    yield float(request["seconds"])
    send({"id": wire_id, "chunk": "late"})
    send({"id": wire_id, "done": True})


def gap(wire_id, request):
    send({"id": wire_id, "chunk": "a"})
    yield float(request["seconds"])
    send({"id": wire_id, "chunk": "b"})
    send({"id": wire_id, "done": True})


def flood(wire_id, request):
    piece, written = "x" * int(request["size"]), 0
    for _ in range(int(request["count"])):
        written += send({"id": wire_id, "chunk": piece})
        with open(request["progress"], "w") as f:
            f.write(str(written))
        yield 0  # a cancel is read between two chunks
    send({"id": wire_id, "done": True})


def hold(wire_id, request):
    send({"log": f"holding {wire_id}"})
    yield float(request["seconds"])
    send({"id": wire_id, "output": "held"})


OPS = {"ticks": ticks, "wait": wait, "gap": gap, "flood": flood, "hold": hold}


def start(wire_id, request) -> None:
    op = request.get("op") if isinstance(request, dict) else None
    if op == "pid":
        send({"id": wire_id, "output": {"pid": os.getpid()}})
    elif op in OPS:
        streams[wire_id] = {"request": request, "steps": OPS[op](wire_id, request), "due": time.monotonic()}
    else:
        send({"id": wire_id, "error": {"message": f"unknown op {op!r}", "status": 400}})


def step(wire_id, stream) -> None:
    """The request's next step; when it is over, it is forgotten."""
    try:
        stream["due"] = time.monotonic() + next(stream["steps"])
    except StopIteration:
        streams.pop(wire_id, None)


def cancel(wire_id) -> None:
    at = time.time()
    send({"log": f"cancel for {wire_id}"})
    stream = streams.pop(wire_id, None)
    if stream is None:
        return
    stream["steps"].close()
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
        wait_for = min((stream["due"] for stream in streams.values()), default=None)
        timeout = None if wait_for is None else max(0.0, wait_for - time.monotonic())
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
