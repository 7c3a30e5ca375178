#!/usr/bin/env python3
"""
The benchmark's `jsonl` subprocess model: answers each request with its own input.

The protocol (README "How models answer", aibackend/subprocess.py): print {"ready": true}
once; then each line {"id": ID, "op": "predict", "input": X} is answered with
{"id": ID, "output": X}, in any order, many in flight; {"id": ID, "op": "cancel"} lines
are ignored (an echo has nothing to stop).

Written for speed: the daemon writes exactly b'{"id": ' + ID + b', "op": "predict",
"input": ' + X + b'}', so the answer is spliced from the request's bytes without parsing
it (the marker cannot occur inside the JSON string ID, whose quotes are escaped); any
other shape goes through json. Every complete line in the pipe is answered in one write.
"""

import json
import os
import sys

HEAD = b'{"id": '
MARK = b', "op": "predict", "input": '
OUT = b', "output": '


def answer(line: bytes) -> bytes:
    if line.startswith(HEAD):
        at = line.find(MARK)
        if at > 0 and line.endswith(b"}"):
            return HEAD + line[len(HEAD) : at] + OUT + line[at + len(MARK) : -1] + b"}\n"
    try:
        message = json.loads(line)
    except ValueError:
        return b""
    if not isinstance(message, dict) or message.get("op") != "predict" or "id" not in message:
        return b""  # "cancel", or something this echo does not know: nothing to say
    return json.dumps({"id": message["id"], "output": message.get("input")}).encode() + b"\n"


def write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def main() -> None:
    write_all(b'{"ready": true}\n')
    pending = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        out = b"".join(answer(line.rstrip(b"\r")) for line in lines if line.strip())
        if out:
            write_all(out)


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
