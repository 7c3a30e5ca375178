"""
A model that misbehaves when asked to, for the integration tests.

    python misbehave.py [--jsonl] [--crash]

It speaks C{raw} (one request line in, one answer line out) or, with C{--jsonl}, the
C{jsonl} protocol (it says it is ready, then answers C{{"id", "output"}}). With
C{--crash} it writes a line on stderr and exits with status 3 as soon as it starts.

What a request asks (C{{"op": ...}}):

  - C{echo}: answers C{{"pid": its pid, "echo": the request}}
  - C{sleep}: writes its pid to the file C{mark} (if given), sleeps C{seconds}, answers
  - C{hang}: never answers
  - C{garbage}: prints C{lines} lines that are not JSON, then answers
  - C{big}: prints a line of C{bytes} bytes
  - C{spawn}: starts C{sleep 60} (which shares its stdout), waits C{hold} seconds, and
    answers C{{"pid": its pid, "child": the child's pid}}
  - C{stderr}: writes C{lines} lines of C{width} bytes on stderr, then one line of
    C{last} bytes, then answers
  - C{ignore_term}: ignores SIGTERM from now on, and keeps running once its stdin is
    closed; answers
  - C{exit}: writes C{stderr} (if given, as it is: no line end added) and exits with
    status C{code}
  - C{twice}: prints two JSON lines made from the request (C{print(a); print(b)})
  - C{flood}: prints C{lines} JSON lines made from the request
  - C{binary}: prints C{bytes} bytes of garbage (random from C{seed}, with short
    fragments that are JSON among them), and no answer
  - C{close_stdout}: closes its stdout and sleeps C{seconds}
  - C{setsid_spawn}: starts a Python child that calls C{setsid()} (it leaves the model's
    process group and session) and sleeps 60 s; answers C{{"pid", "child"}} once the
    child has left
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

out = sys.stdout.buffer
stubborn = False


def send(message):
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def handle(request):
    op = request.get("op", "echo") if isinstance(request, dict) else "echo"
    if op == "echo":
        return {"pid": os.getpid(), "echo": request}
    if op == "sleep":
        if request.get("mark"):
            with open(request["mark"] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(request["mark"] + ".tmp", request["mark"])
        time.sleep(request.get("seconds", 1))
        return {"pid": os.getpid(), "slept": request.get("seconds", 1)}
    if op == "hang":
        while True:
            time.sleep(3600)
    if op == "garbage":
        for n in range(request.get("lines", 3)):
            out.write(b"garbage line %d: not { json\n" % n)
        out.flush()
        return {"pid": os.getpid(), "after": "garbage"}
    if op == "big":
        remaining = request.get("bytes", 10_000_000)
        chunk = b"x" * (1 << 20)
        while remaining > 0:
            out.write(chunk[:remaining])
            remaining -= len(chunk)
        out.write(b"\n")
        out.flush()
        return None
    if op == "spawn":
        program = shutil.which("sleep") or "/bin/sleep"
        child = subprocess.Popen([program, "60"], stdin=subprocess.DEVNULL)
        time.sleep(request.get("hold", 0))
        return {"pid": os.getpid(), "child": child.pid}
    if op == "stderr":
        err = sys.stderr.buffer
        line = b"e" * request.get("width", 100) + b"\n"
        for _ in range(request.get("lines", 1000)):
            err.write(line)
        err.write(b"L" * request.get("last", 0) + b"\n")
        err.flush()
        return {"pid": os.getpid(), "wrote": request.get("lines", 1000)}
    if op == "ignore_term":
        global stubborn
        stubborn = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return {"pid": os.getpid(), "ignoring": "SIGTERM"}
    if op == "exit":
        if request.get("stderr"):
            sys.stderr.write(request["stderr"])
            sys.stderr.flush()
        sys.exit(request.get("code", 0))
    if op == "twice":
        print(json.dumps({"pid": os.getpid(), "echo": request, "line": 1}))
        print(json.dumps({"pid": os.getpid(), "echo": request, "line": 2}), flush=True)
        return None
    if op == "flood":
        for n in range(request.get("lines", 10_000)):
            print(json.dumps({"pid": os.getpid(), "echo": request, "line": n}))
        sys.stdout.flush()
        return None
    if op == "binary":
        rng = random.Random(request.get("seed", 0))
        chunks = []
        for _ in range(request.get("bytes", 4096) // 64):
            chunks.append(bytes(rng.randrange(256) for _ in range(64)))
            chunks.append(rng.choice([b"", b"\n7\n", b'\n"x"\n', b"\n[]\n", b"\nnull\n"]))
        out.write(b"".join(chunks) + b"\n")
        out.flush()
        return None
    if op == "close_stdout":
        sys.stdout.flush()
        os.close(1)
        time.sleep(request.get("seconds", 30))
        return None
    if op == "setsid_spawn":
        child = subprocess.Popen(
            [sys.executable, "-c", "import os, sys, time; os.setsid(); print(os.getsid(0), flush=True); time.sleep(60)"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        assert int(child.stdout.readline()) == child.pid  # it has left
        return {"pid": os.getpid(), "child": child.pid}
    return {"pid": os.getpid(), "unknown_op": op}


def main():
    jsonl = "--jsonl" in sys.argv
    if "--crash" in sys.argv:
        sys.stderr.write("crashing on purpose\n")
        sys.exit(3)
    if jsonl:
        send({"ready": True})
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        message = json.loads(line)
        if jsonl:
            if message.get("op") != "predict":
                continue
            answer = handle(message["input"])
            if answer is not None:
                send({"id": message["id"], "output": answer})
        else:
            answer = handle(message)
            if answer is not None:
                send(answer)
    while stubborn:
        time.sleep(3600)


if __name__ == "__main__":
    main()
