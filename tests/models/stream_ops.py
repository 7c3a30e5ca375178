"""
A jsonl model that streams as a test asks, for tests/test_stream_limits_daemon.py.

    python stream_ops.py

It speaks the C{jsonl} protocol by hand (no aibackend.worker: each request is a thread
of its own, so that a request's cancel is heard while its stream is being written), and
logs C{cancel for <id>} (a C{log} line) when the daemon cancels a request.

What a request asks (C{{"op": ...}}), each stream ending with C{done} unless cancelled:

  - C{wait}: waits C{seconds} (stopped by a cancel), then one chunk
  - C{gap}: one chunk, waits C{seconds} (stopped by a cancel), then another
  - C{flood}: C{count} chunks of a C{size}-character string as fast as the pipe takes
    them, writing the bytes printed so far to the file C{progress} after each
  - C{hold}: a plain answer after C{seconds} (stopped by a cancel); logs C{holding <id>}
"""

import json
import sys
import threading

out = threading.Lock()
stops = {}  # wire id -> Event set by its cancel


def say(message) -> int:
    line = (json.dumps(message) + "\n").encode()
    with out:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
    return len(line)


def work(wire_id, data, stop) -> None:
    op = data.get("op")
    if op == "wait":
        if stop.wait(data["seconds"]):
            return
        say({"id": wire_id, "chunk": "late"})
    elif op == "gap":
        say({"id": wire_id, "chunk": "a"})
        if stop.wait(data["seconds"]):
            return
        say({"id": wire_id, "chunk": "b"})
    elif op == "flood":
        piece, written = "x" * data["size"], 0
        for _ in range(data["count"]):
            if stop.is_set():
                return
            written += say({"id": wire_id, "chunk": piece})
            with open(data["progress"], "w") as f:
                f.write(str(written))
    elif op == "hold":
        say({"log": f"holding {wire_id}"})
        stop.wait(data["seconds"])
        say({"id": wire_id, "output": "held"})
        return
    say({"id": wire_id, "done": True})


def main() -> None:
    say({"ready": True})
    for line in sys.stdin:
        message = json.loads(line)
        wire_id = message["id"]
        if message["op"] == "cancel":
            say({"log": f"cancel for {wire_id}"})
            stop = stops.get(wire_id)
            if stop is not None:
                stop.set()
            continue
        stop = stops[wire_id] = threading.Event()
        threading.Thread(target=work, args=(wire_id, message["input"], stop), daemon=True).start()


if __name__ == "__main__":
    main()
