#!/usr/bin/env python3
"""
The benchmark's `raw` subprocess model: answers each request line with the line itself.

aibackend's `raw` protocol writes the request's JSON on one line and takes one JSON line
back; `{"text": "hello"}` in is `{"text": "hello"}` out. Written for speed: it reads what
the pipe holds with os.read (no per-line Python I/O objects) and answers every complete
line in one os.write, so the daemon, not this program, is what the benchmark measures.
"""

import os
import sys


def main() -> None:
    pending = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return  # the daemon closed stdin: stop
        pending += chunk
        end = pending.rfind(b"\n")
        if end < 0:
            continue
        complete, pending = pending[: end + 1], pending[end + 1 :]
        view = memoryview(complete)
        while view:
            view = view[os.write(1, view) :]


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
