#!/usr/bin/env python3
"""
How much memory large request bodies cost the daemon, and whether it gives it back.

Starts `twistd aibackend` on a free loopback port with an echo model (the benchmark's
`raw` subprocess echo, or the example HTTP model server's /echo), sends CONCURRENCY
bodies of SIZE megabytes at once, several rounds, and prints the daemon's resident
memory (VmRSS) before, its peak (VmHWM), and after each round once every answer is in:

    .venv/bin/python bench/body_memory.py [--model raw|http] [--size 15] [--concurrency 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def wait_for(process, pattern: str, timeout: float = 20) -> re.Match:
    deadline = time.monotonic() + timeout
    for raw in process.stdout:
        found = re.search(pattern, raw.decode("utf-8", "replace"))
        if found:
            return found
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"no {pattern!r} in the output of {process.args}")


def drain(process) -> None:
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()


def post(port: int, body: bytes, results: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/post/predict?id=echo", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        results.append((response.status, len(answer)))
    except OSError as e:
        results.append((None, repr(e)))
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", choices=("raw", "http"), default="raw")
    parser.add_argument("--size", type=float, default=15, help="megabytes a body (default 15)")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    children = []
    with tempfile.TemporaryDirectory() as directory:
        if args.model == "http":
            server = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "http_model_server.py"),
                                       "--listen", "tcp:0:interface=127.0.0.1"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            children.append(server)
            model_port = int(wait_for(server, r"listening on http://127\.0\.0\.1:(\d+)").group(1))
            drain(server)
            model = f'type = "http"\nurl = "http://127.0.0.1:{model_port}/echo"\ntimeout = 120\n'
        else:
            command = json.dumps([sys.executable, os.path.join(ROOT, "bench", "echo_raw.py")])
            model = f'type = "subprocess"\ncommand = {command}\nworkers = 4\ntimeout = 120\nmax_queue = 1000\n'
        config = os.path.join(directory, "aibackend.toml")
        with open(config, "w") as f:
            f.write(f"[server]\nmax_body_bytes = {int(args.size * 1e6) + 1024}\naccess_log = false\n"
                    f"[[models]]\nid = \"echo\"\n{model}")
        daemon = subprocess.Popen([TWISTD, "--pidfile=", "-n", "aibackend", "--config", config,
                                   "--state", directory, "--listen", "tcp:0:interface=127.0.0.1"],
                                  cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        children.append(daemon)
        try:
            port = int(wait_for(daemon, r"aibackend listening on http://127\.0\.0\.1:(\d+)").group(1))
            drain(daemon)
            body = b'{"text": "' + b"a" * int(args.size * 1e6) + b'"}'
            post(port, b'{"warm": true}', [])
            time.sleep(1)
            print(f"{args.model} model, {args.concurrency} x {args.size:g} MB bodies")
            print(f"before: RSS {status_kb(daemon.pid, 'VmRSS') / 1024:.0f} MB")
            for round_ in range(1, args.rounds + 1):
                results: list = []
                threads = [threading.Thread(target=post, args=(port, body, results)) for _ in range(args.concurrency)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                time.sleep(2)  # let the daemon finish its bookkeeping
                statuses = sorted({status for status, _ in results}, key=str)
                print(f"round {round_}: statuses {statuses}, peak RSS {status_kb(daemon.pid, 'VmHWM') / 1024:.0f} MB, "
                      f"after: RSS {status_kb(daemon.pid, 'VmRSS') / 1024:.0f} MB")
        finally:
            for child in children:
                child.terminate()
                child.wait(15)


if __name__ == "__main__":
    main()
