#!/usr/bin/env python3
"""
aibackend's benchmark: the daemon side by side with nginx and aiohttp, all on loopback.

    make bench                              # sets up wrk, nginx, aiohttp, then runs this
    BENCH_QUICK=1 make bench                # a short run to try the harness
    .venv/bin/python bench/run.py --help

Every case is started once on a free 127.0.0.1 port, warmed up for a second, then driven
by wrk (POST of a small JSON body, bench/post.lua) at concurrency 1 and 32, for a fixed
duration, in two passes; the table has the medians. A streaming section follows: Server-
Sent Events from a model that writes its clock into each chunk (bench/stream_source.py),
read by bench/stream_client.py at 1 and 100 concurrent streams, per-chunk latency and time
to first chunk against the source read directly, nginx and aiohttp; then 10,000 idle
streams held at once. Then a memory section: the idle daemon with 100 models, its growth
over a long run of requests, and 10,000 idle keep-alive connections held at once. Results
go to bench/results/ as JSON and Markdown.

Standard library only (run it with the venv's python, whose twistd it starts). Everything
it starts (nginx, the aiohttp proxy, the streaming source, twistd and the models twistd
starts) and its temp dir
are removed on the way out, Ctrl-C and failures included. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
POST_LUA = os.path.join(BENCH, "post.lua")
ECHO_RAW = os.path.join(BENCH, "echo_raw.py")
ECHO_JSONL = os.path.join(BENCH, "echo_jsonl.py")
AIOHTTP_PROXY = os.path.join(BENCH, "aiohttp_proxy.py")
NGINX_FREE = os.path.join(BENCH, "nginx-free.conf.in")
NGINX_PROXY = os.path.join(BENCH, "nginx-proxy.conf.in")
NGINX_STREAM_PROXY = os.path.join(BENCH, "nginx-stream-proxy.conf.in")
STREAM_SOURCE = os.path.join(BENCH, "stream_source.py")
STREAM_CLIENT = os.path.join(BENCH, "stream_client.py")
CHAT_LUA = os.path.join(BENCH, "chat.lua")
NGINX_OPENAI = os.path.join(BENCH, "nginx-openai.conf.in")
NGINX_OPENAI_STREAM = os.path.join(BENCH, "nginx-openai-stream.conf.in")
NGINX_OPENAI_ADAPTED = os.path.join(BENCH, "nginx-openai-adapted.conf.in")

# Processes of these programs are models the daemon starts, not the daemon: their memory
# is not counted in the daemon's RSS (nor is that of anything they start).
MODEL_MARKERS = ("echo_raw.py", "echo_jsonl.py", "stream_source.py", "_pgroup.py")

BODY = b'{"text": "hello"}'
CONCURRENCIES = (1, 32)
PASSES = 2
WARMUP_SECONDS = 1
DEFAULT_DURATION = 5
DEFAULT_SOAK = 1_000_000
QUICK_DURATION = 2
QUICK_SOAK = 50_000
IDLE_CONNECTIONS = 10_000
CONNECT_BATCH = 50  # below the daemon's listen backlog (Twisted's default is 50)
# The idle connections come from many loopback addresses (127.0.0.2, .3...), this many from
# each: below the daemon's max_connections_per_peer (1000), as from many clients. From one
# address the per-address cap would close the oldest ones to make room for the newest.
CONNECTIONS_PER_ADDRESS = 900
MODELS_FOR_IDLE = 100
RAW_WORKERS = 2
JSONL_INFLIGHT = 64
AIOHTTP_LIMIT = 64
# The streaming section (bench/stream_source.py writes the chunks, bench/stream_client.py reads them).
STREAM_CONCURRENCIES = (1, 100)
STREAM_CHUNKS = 50  # chunks a stream asks for: one second of them at the interval below
STREAM_INTERVAL = 0.02  # seconds between two chunks of a stream: 50 a second, a text generator's pace
STREAM_INFLIGHT = 1000  # max_inflight of the jsonl streaming model: every stream at once, none queued
STREAM_TARGET_P99_MS = 1.0  # issue 14: added per-chunk p99 at most 1 ms with 100 concurrent streams
HELD_STREAMS = 10_000
HELD_TARGET_MB = 200  # issue 14: 10,000 idle streams held in under 200 MB
# Seconds the held streams are held: past the daemon's first keepalive comment (every 15 s by
# default), so that a full run sees the daemon send them and the streams take them.
STREAM_HOLD = 20.0
QUICK_STREAM_HOLD = 2.0
OTHER_LOAD_FLAG = 25.0  # % of one core used by processes that are not the benchmark's: a disturbed run
QUIET_LOAD = 20.0  # what "quiet" means before a case starts
BALANCE_TARGET = 0.8  # issue 16: with --processes 2, each process's requests within 20 % of the other's


class BenchError(Exception):
    """A step of the benchmark could not be done; the message says which and why."""


class Skipped(Exception):
    """A case that cannot be run here (a missing feature): reported, not a failure."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- /proc ---------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, start time, user + system CPU ticks) for every process, from /proc/*/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name is in parentheses and may hold anything: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(name)] = (int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12]))
    return table


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int, table=None, *, skip=lambda pid: False) -> list[int]:
    """root and every process under it (by parent links), root first; skip(pid) prunes a branch."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in table or (pid != root and skip(pid)):
            continue
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def server_pids(root: int, table=None) -> list[int]:
    """The server's own processes: root and its descendants, less model programs and their children."""
    return descendants(root, table, skip=lambda pid: any(marker in cmdline(pid) for marker in MODEL_MARKERS))


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_snapshot(roots: list[int]) -> dict:
    """CPU ticks of each server's own processes (by pid and start time), the machine's, wrk's and ours."""
    table = proc_table()
    servers = {root: {(pid, table[pid][1]): table[pid][2] for pid in server_pids(root, table)} for root in roots}
    # Everything under the servers, the models they start included.
    trees = {(pid, table[pid][1]): table[pid][2] for root in roots for pid in descendants(root, table)}
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user + nice + system: time processes ran. Interrupt and softirq time (loopback networking is
    # mostly softirq work) is not charged to any process, so it is left out of both sides.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been waited for
    own = resource.getrusage(resource.RUSAGE_SELF)
    # steal: time the hypervisor gave this virtual machine's CPUs to someone else.
    steal = fields[7] if len(fields) > 7 else 0
    return {"servers": servers, "trees": trees, "busy": fields[0] + fields[1] + fields[2], "time": time.monotonic(),
            "wrk": children.ru_utime + children.ru_stime, "self": own.ru_utime + own.ru_stime, "steal": steal}


def cpu_used(before: dict, after: dict) -> dict:
    """Seconds of CPU between two snapshots: each server's (by root pid), the machine's, wrk's, ours."""
    servers = {}
    for root, processes in after["servers"].items():
        earlier = before["servers"].get(root, {})
        servers[root] = sum(ticks - earlier.get(key, 0) for key, ticks in processes.items()) / CLOCK_TICKS
    trees = sum(ticks - before["trees"].get(key, 0) for key, ticks in after["trees"].items()) / CLOCK_TICKS
    return {
        "servers": servers,
        "trees": trees,
        "machine": (after["busy"] - before["busy"]) / CLOCK_TICKS,
        "steal": (after["steal"] - before["steal"]) / CLOCK_TICKS,
        "wrk": after["wrk"] - before["wrk"],
        "self": after["self"] - before["self"],
        "wall": after["time"] - before["time"],
    }


def memory_mb(root: int, key: str) -> tuple[float, list[int]]:
    """Sum of VmRSS or VmHWM (MB) over the server's own processes, and their pids."""
    pids = server_pids(root)
    return sum(status_kb(pid, key) for pid in pids) / 1024.0, pids


# --- the processes it starts ------------------------------------------------------------


class Server:
    """One program the benchmark started, in a session of its own, stopped with its process tree."""

    def __init__(self, name: str, argv: list[str], tmp: str, env=None):
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.port = None
        self.notes: list[str] = []
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, cwd=ROOT,
            )
        self.known: dict[int, int] = {}  # pid -> start time of every process seen under it
        self.processes = None  # aibackend's --processes, if given
        self.remember()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def remember(self) -> None:
        table = proc_table()
        for pid in descendants(self.pid, table):
            self.known[pid] = table[pid][1]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 20000))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM its process group (it stops its own children), SIGKILL what is left after grace."""
        if self.alive():
            self.remember()
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {grace:g} s: SIGKILL")
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        else:
            self.proc.wait()
        # Whatever it started (model processes lead groups of their own) and left behind.
        deadline = time.monotonic() + 5
        while True:
            table = proc_table()
            left = [pid for pid, start in self.known.items() if pid in table and table[pid][1] == start]
            if not left:
                return
            if time.monotonic() > deadline:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(0.1)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="aibackend-bench-")
        self.servers: list[Server] = []
        self.python = sys.executable
        self.twistd = args.twistd
        self.nginx = args.nginx
        self.wrk = args.wrk
        self.free_port = None
        self.stream_source = None
        self.openai_up = None  # the fixed-answer OpenAI upstreams (nginx), during the OpenAI section
        self.openai_stream_up = None
        self.openai_adapted_up = None
        self.processes_flag = False

    # -- starting and stopping --

    def start(self, name, argv, env=None) -> Server:
        server = Server(name, argv, self.tmp, env=env)
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def cleanup(self) -> None:
        for server in reversed(list(self.servers)):
            try:
                self.stop(server)
            except Exception as e:  # keep stopping the others
                log(f"could not stop {server.name}: {e}")
        if self.args.keep_tmp:
            log(f"kept the temp dir {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def wait_ready(self, server: Server, path: str, timeout: float = 60.0, method="GET", body=None) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not server.alive():
                raise BenchError(
                    f"{server.name} exited with status {server.proc.returncode} before it was ready:\n"
                    + server.log_tail()
                )
            try:
                status, _ = request(server.port, method, path, body, timeout=2)
                if status == 200:
                    server.remember()
                    return
                last = f"status {status}"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise BenchError(f"{server.name} not ready after {timeout:g} s ({last}):\n{server.log_tail()}")

    def start_nginx(self, name: str, template: str, upstream_port=None) -> Server:
        port = free_port()
        with open(template) as f:
            text = f.read()
        user = "user root;" if os.geteuid() == 0 else "# (not root: no user directive)"
        for key, value in {"@USER@": user, "@TMP@": self.tmp, "@PORT@": str(port),
                           "@UPSTREAM_PORT@": str(upstream_port or 0)}.items():
            text = text.replace(key, value)
        conf = os.path.join(self.tmp, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(text)
        pid_file = os.path.join(self.tmp, f"{name}.pid")
        server = self.start(name, [
            self.nginx, "-p", self.tmp + "/", "-e", os.path.join(self.tmp, f"{name}-startup.log"),
            "-c", conf, "-g", f"daemon off; pid {pid_file};",
        ])
        server.port = port
        self.wait_ready(server, "/", timeout=15)
        return server

    def start_aiohttp(self, name: str = "aiohttp-proxy", upstream_port=None, limit: int = AIOHTTP_LIMIT,
                      check: bytes = BODY, stream: bool = False) -> Server:
        port = free_port()
        server = self.start(name, [
            self.python, AIOHTTP_PROXY, "--port", str(port),
            "--upstream", f"http://127.0.0.1:{upstream_port or self.free_port}", "--limit", str(limit),
            *(["--stream"] if stream else []),
        ])
        server.port = port
        self.wait_ready(server, "/", timeout=30, method="POST", body=check)
        return server

    def start_stream_source(self) -> Server:
        """The streaming source over HTTP (bench/stream_source.py --port), for the whole run."""
        port = free_port()
        server = self.start("stream-source", [self.python, STREAM_SOURCE, "--port", str(port)])
        server.port = port
        self.wait_ready(server, "/", timeout=30)
        return server

    def start_aibackend(self, name: str, models_toml: str, processes: int | None = None,
                        server_toml: str = "") -> Server:
        port = free_port()
        config = os.path.join(self.tmp, f"{name}.toml")
        with open(config, "w") as f:
            f.write(
                "# written by bench/run.py\n[server]\n"
                f"listen = [\"tcp:{port}:interface=127.0.0.1\"]\n"
                # Like the peers (nginx's access_log off, aiohttp without a logger), no
                # access events but in the case that measures them.
                f"access_log = {'true' if name.endswith('-log') else 'false'}\n"
                "drain_timeout = 1\n" + server_toml + "\n" + models_toml
            )
        state = os.path.join(self.tmp, f"{name}-state")
        argv = [self.twistd, "--pidfile=", "-n", "aibackend", "--config", config, "--state", state]
        if processes:
            argv += ["--processes", str(processes)]
        server = self.start(name, argv)
        server.port = port
        server.processes = processes
        try:
            self.wait_ready(server, "/health/ready", timeout=90)
        except BenchError:
            self.stop(server)
            raise
        return server

    # -- load --

    def run_wrk(self, port: int, path: str, connections: int, duration: int, script: str = POST_LUA) -> dict:
        threads = 1 if connections == 1 else min(2, connections)
        argv = [
            self.wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
            "--latency", "-s", script, f"http://127.0.0.1:{port}{path}",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, cwd=BENCH)
        if done.returncode != 0:
            raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        result = parse_wrk(done.stdout)
        result.update(connections=connections, threads=threads, duration_s=duration)
        return result


# --- helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 10.0, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def to_ms(number: str, unit: str) -> float:
    return float(number) * UNITS_MS[unit]


def parse_wrk(text: str) -> dict:
    """requests/s, latency percentiles in ms, request count and errors from wrk --latency's output."""
    result = {"raw": text}
    match = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if not match:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    result["rps"] = float(match.group(1))
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    result["requests"] = int(match.group(1)) if match else 0
    result["elapsed_s"] = to_ms(match.group(2), match.group(3)) / 1000 if match else 0.0
    for percent, number, unit in re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        result[f"p{percent}_ms"] = to_ms(number, unit)
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups()))) if match else {}
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors["non2xx"] = int(match.group(1)) if match else 0
    result["errors"] = {key: value for key, value in errors.items() if value}
    return result


def first_line(error: str) -> str:
    """One line for a table: the error's first line, and the last line of the log it quotes."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if not lines:
        return "?"
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[-1][-300:]}"
    return lines[0].rstrip(":")


def add_errors(total: dict, more: dict) -> dict:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value
    return total


def show_errors(errors: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(errors.items()))


def toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string


def http_model(model_id: str, url: str) -> str:
    return (f"[[models]]\nid = {toml_string(model_id)}\ntype = \"http\"\nurl = {toml_string(url)}\n"
            "timeout = 30\n")


def subprocess_model(model_id: str, script: str, protocol: str, workers: int, max_inflight: int = 1,
                     per_process: bool = False, arguments: tuple = (), timeout: float = 30) -> str:
    command = ", ".join(toml_string(part) for part in ("python", script, *arguments))
    text = (f"[[models]]\nid = {toml_string(model_id)}\ntype = \"subprocess\"\n"
            f"command = [{command}]\nprotocol = \"{protocol}\"\n"
            f"workers = {workers}\ntimeout = {timeout:g}\nkill_timeout = 2\nmax_queue = 1000\n")
    if protocol == "jsonl":
        text += f"max_inflight = {max_inflight}\n"
    if per_process:
        text += "per_process = true\n"
    return text


def has_processes_flag(twistd: str) -> bool:
    try:
        done = subprocess.run([twistd, "aibackend", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--processes" in done.stdout + done.stderr


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (path for path in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(path, os.X_OK)), None
    )


def version_of(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((done.stdout + done.stderr).strip().splitlines() or ["?"])[0]


def git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# --- the cases -------------------------------------------------------------------------------


CASES = {
    "direct": "the free model itself: nginx answering a fixed JSON body (1 worker, keep-alive)",
    "nginx-proxy": "nginx reverse proxy (1 worker) in front of the free model: upstream keepalive 64, HTTP/1.1",
    "aiohttp-proxy": "minimal aiohttp proxy (bench/aiohttp_proxy.py): 1 process, default asyncio loop, "
                     f"one ClientSession, TCPConnector(limit={AIOHTTP_LIMIT})",
    "aibackend-http": "aibackend, HTTP model pointing at the free model (access_log = false, like the peers)",
    "aibackend-http-log": "as aibackend-http, with an access event per request in the daemon's log "
                          "(access_log = true, the default; the log goes to a file)",
    "aibackend-raw": f"aibackend, subprocess model, protocol raw, bench/echo_raw.py, workers = {RAW_WORKERS}",
    "aibackend-jsonl": "aibackend, subprocess model, protocol jsonl, bench/echo_jsonl.py, workers = 1, "
                       f"max_inflight = {JSONL_INFLIGHT}",
    "aibackend-http-policy": "as aibackend-http, with issue 18's policy on: a client key on every request "
                             "(api_keys), a limit on the model (rpm, too high to refuse) and usage = true",
    "aibackend-http-p2": "as aibackend-http, with twistd aibackend --processes 2",
    "aibackend-jsonl-p2": "as aibackend-jsonl, with --processes 2 and per_process = true",
}


def spread(values) -> list | None:
    """C{[min, max]} of a figure over the passes (None without a value)."""
    values = [value for value in values if value is not None]
    return [min(values), max(values)] if values else None


def process_requests(server: Server, timeout: float = 10.0) -> dict | None:
    """
    Each aibackend process's requests so far: /metrics on fresh connections until every one of
    the server's processes has answered one (each answers with its own figures, and says which it
    is: aibackend_process_info), {name: {"pid", "requests"}} with requests = the sum of its
    aibackend_requests_total. None from a daemon without aibackend_process_info, or when a
    process did not answer within C{timeout}.
    """
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(found) < server.processes and time.monotonic() < deadline:
        status, body = request(server.port, "GET", "/metrics")
        text = body.decode(errors="replace")
        info = re.search(r"^aibackend_process_info\{(.*)\} 1\.0$", text, re.M)
        if status != 200 or not info:
            return None
        labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
        total = sum(float(value) for value in re.findall(r"^aibackend_requests_total\{[^}]*\}\s+([0-9.eE+-]+)\s*$",
                                                          text, re.M))
        found[labels["process"]] = {"pid": int(labels["pid"]), "requests": total}
    return found if len(found) >= server.processes else None  # one that never answered: not counted at all


def per_process(server: Server, before: dict, after: dict, wall: float, counted_before, counted_after) -> dict:
    """
    The run's figures for each of a --processes server's processes: its requests (from its
    /metrics, when the daemon says which process answers) and its CPU (from /proc), by name
    (primary, worker-N; a process /metrics did not name is "worker pid N"); and the balance, the fewest
    requests over the most (CPU time when there are no request counts).
    """
    names = {server.pid: "primary"}
    for name, figures in (counted_after or {}).items():
        names[figures["pid"]] = name
    earlier = before["servers"].get(server.pid, {})
    processes: dict[str, dict] = {}
    for (pid, start), ticks in after["servers"].get(server.pid, {}).items():
        if "twistd" not in cmdline(pid) and pid != server.pid:
            continue
        name = names.get(pid, f"worker pid {pid}")
        seconds = (ticks - earlier.get((pid, start), 0)) / CLOCK_TICKS
        processes[name] = {"pid": pid, "cpu_pct": round(100 * seconds / wall, 1)}
    if counted_before is not None and counted_after is not None:
        for name, figures in counted_after.items():
            was = counted_before.get(name)
            # A process that has restarted since (another pid) counts from zero.
            start = was["requests"] if was and was["pid"] == figures["pid"] else 0.0
            processes.setdefault(name, {"pid": figures["pid"], "cpu_pct": None})["requests"] = \
                int(figures["requests"] - start)
    counts = [figures.get("requests") for figures in processes.values()]
    if len(counts) >= 2 and all(count is not None for count in counts):
        balance = min(counts) / max(counts) if max(counts) else None
        basis = "requests"
    else:
        cpu = [figures["cpu_pct"] or 0.0 for figures in processes.values()]
        balance = min(cpu) / max(cpu) if len(cpu) >= 2 and max(cpu) else None
        basis = "cpu"
    return {"processes": dict(sorted(processes.items())), "balance": round(balance, 3) if balance is not None
            else None, "balance_of": basis}


def wait_quiet(bench: Bench, seconds: float) -> dict:
    """
    Wait (up to seconds) until processes that are not the benchmark's use under QUIET_LOAD % of a
    core over one second: someone's test suite on a 2-core machine halves any number measured.
    """
    started = time.monotonic()
    other, said = 0.0, False
    while True:
        before = cpu_snapshot([bench.free_server.pid])
        time.sleep(1)
        used = cpu_used(before, cpu_snapshot([bench.free_server.pid]))
        other = max(0.0, 100 * (used["machine"] - used["trees"] - used["self"] + used["steal"]) / used["wall"])
        waited = time.monotonic() - started
        if other < QUIET_LOAD or waited >= seconds:
            if said or other >= QUIET_LOAD:
                log(f"  other load now {other:.0f}% of a core after {waited:.0f} s"
                    + ("" if other < QUIET_LOAD else ": going on anyway"))
            return {"waited_s": round(waited, 1), "other_load_pct": round(other, 1)}
        if not said:
            log(f"  other processes use {other:.0f}% of a core: waiting up to {seconds:g} s for quiet")
            said = True


def start_case(bench: Bench, name: str, processes_flag: bool) -> tuple[Server, str, list[str]]:
    """Start the server of a case: (server, the path wrk calls, notes)."""
    free_url = f"http://127.0.0.1:{bench.free_port}/"
    if name == "direct":
        return bench.free_server, "/", []
    if name == "nginx-proxy":
        return bench.start_nginx("nginx-proxy", NGINX_PROXY, bench.free_port), "/", []
    if name == "aiohttp-proxy":
        return bench.start_aiohttp(), "/", []
    if name in ("aibackend-http-p2", "aibackend-jsonl-p2") and not processes_flag:
        raise Skipped("not available: `twistd aibackend --help` does not list --processes")
    processes = 2 if name.endswith("-p2") else None
    if name == "aibackend-http-policy":
        model = http_model("free", free_url) + f"[models.limits]\nrpm = {POLICY_RPM}\n"
        server = bench.start_aibackend(name, model, None, f"api_keys = [{toml_string(POLICY_KEY)}]\nusage = true\n")
        return server, "/post/predict?id=free", [f"api_keys, [models.limits] rpm = {POLICY_RPM:,}, usage = true"]
    if name.startswith("aibackend-http"):
        server = bench.start_aibackend(name, http_model("free", free_url), processes)
        return server, "/post/predict?id=free", []
    if name == "aibackend-raw":
        server = bench.start_aibackend(name, subprocess_model("echo-raw", ECHO_RAW, "raw", RAW_WORKERS))
        return server, "/post/predict?id=echo-raw", []
    if name.startswith("aibackend-jsonl"):
        notes = []
        if processes:
            try:
                server = bench.start_aibackend(
                    name, subprocess_model("echo-jsonl", ECHO_JSONL, "jsonl", 1, JSONL_INFLIGHT, per_process=True),
                    processes)
            except BenchError as e:
                if "per_process" not in str(e):
                    raise
                log(f"{name}: the daemon refused per_process; again without it")
                notes.append("the daemon refused `per_process = true`; run without it")
                server = None
            if server is not None:
                notes.append("per_process = true")
                return server, "/post/predict?id=echo-jsonl", notes
        server = bench.start_aibackend(
            name, subprocess_model("echo-jsonl", ECHO_JSONL, "jsonl", 1, JSONL_INFLIGHT), processes)
        return server, "/post/predict?id=echo-jsonl", notes
    raise BenchError(f"unknown case {name!r}")


# The policy case's key (bench/post-key.lua sends it) and its model's limit: high enough that no
# request is refused, so that the case measures what admitting and settling cost.
POLICY_KEY = "bench-client-key-0123456789"
POLICY_RPM = 1_000_000_000
POLICY_LUA = os.path.join(BENCH, "post-key.lua")


def check_answer(server: Server, path: str, request_body: bytes = BODY, headers=None) -> None:
    status, body = request(server.port, "POST", path, request_body, headers=headers)
    if status != 200:
        raise BenchError(f"{server.name}: a check request got {status}: {body[:300]!r}\n{server.log_tail()}")
    try:
        json.loads(body)
    except ValueError:
        raise BenchError(f"{server.name}: a check request got a body that is not JSON: {body[:300]!r}") from None


def check_with_key(server: Server, path: str) -> None:
    """The policy case's check: the request with its key answered, and one without refused (401)."""
    check_answer(server, path, headers={"Authorization": f"Bearer {POLICY_KEY}"})
    status, _ = request(server.port, "POST", path, BODY)
    if status != 401:
        raise BenchError(f"{server.name}: a request without the client key got {status}, not 401")


def run_case(bench: Bench, name: str, processes_flag: bool, describe: dict = CASES, start=start_case,
             check=check_answer, script: str = POST_LUA, upstream: Server | None = None) -> dict:
    """
    A wrk case: start it, check it, warm it up, the passes at each concurrency. The OpenAI section
    runs its own cases through this too (its descriptions, start, check, wrk script and upstream).
    """
    args = bench.args
    upstream = upstream or bench.free_server
    case = {"name": name, "description": describe[name], "notes": [], "runs": [], "summary": {}}
    log(f"case {name}: {describe[name]}")
    try:
        server, path, notes = start(bench, name, processes_flag)
    except Skipped as e:
        case["skipped"] = str(e)
        log(f"case {name}: skipped ({e})")
        return case
    except BenchError as e:
        case["error"] = str(e)
        log(f"case {name}: FAILED to start: {e}")
        return case
    case["notes"] += notes
    case["path"] = path
    try:
        check(server, path)
        if args.quiet_wait > 0:
            case["quiet"] = wait_quiet(bench, args.quiet_wait)
        warm = bench.run_wrk(server.port, path, 32, WARMUP_SECONDS, script)
        case["warmup"] = {"requests": warm["requests"], "errors": warm["errors"]}
        for n in range(1, args.passes + 1):
            for connections in CONCURRENCIES:
                roots = [server.pid] if server is upstream else [server.pid, upstream.pid]
                counted = process_requests(server) if server.processes else None
                before = cpu_snapshot(roots)
                run = bench.run_wrk(server.port, path, connections, args.duration, script)
                after = cpu_snapshot(roots)
                used = cpu_used(before, after)
                mine, wall = used["servers"][server.pid], used["wall"]
                if server.processes:
                    run["per_process"] = per_process(server, before, after, wall, counted, process_requests(server))
                run["pass"] = n
                run["server_cpu_pct"] = round(100 * mine / wall, 1)
                run["cpu_us_per_request"] = round(1e6 * mine / run["requests"], 1) if run["requests"] else None
                run["machine_busy_pct"] = round(100 * used["machine"] / wall / (os.cpu_count() or 1), 1)
                # What neither the server, the free model, wrk nor this script used: someone else's
                # load, and the time the hypervisor gave to other machines (steal).
                other = used["machine"] - used["trees"] - used["wrk"] - used["self"] + used["steal"]
                run["other_cpu_pct"] = round(max(0.0, 100 * other / wall), 1)
                run["steal_pct"] = round(100 * used["steal"] / wall, 1)
                case["runs"].append(run)
                flag = f"  ERRORS: {show_errors(run['errors'])}" if run["errors"] else ""
                log(f"  pass {n} c{connections}: {run['rps']:.0f} req/s, p50 {run.get('p50_ms', 0):.3f} ms, "
                    f"p99 {run.get('p99_ms', 0):.3f} ms, server CPU {run['server_cpu_pct']:.0f}% "
                    f"({run['cpu_us_per_request'] or 0:.0f} us/req), other load {run['other_cpu_pct']:.0f}%{flag}"
                    + (f"; per process {show_processes(run['per_process'])}" if "per_process" in run else ""))
        server.remember()
        peak, pids = memory_mb(server.pid, "VmHWM")
        case["peak_rss_mb"] = round(peak, 1)
        case["pids"] = {pid: cmdline(pid)[:200] for pid in pids}
        if not server.alive():
            case["error"] = f"{server.name} exited during the case:\n{server.log_tail()}"
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        case["error"] = str(e)
        log(f"case {name}: FAILED: {e}")
    finally:
        if server is not upstream:
            bench.stop(server)
    for connections in CONCURRENCIES:
        runs = [run for run in case["runs"] if run["connections"] == connections]
        if not runs:
            continue
        case["summary"][str(connections)] = {
            "rps": statistics.median(run["rps"] for run in runs),
            "p50_ms": statistics.median(run.get("p50_ms", 0.0) for run in runs),
            "p99_ms": statistics.median(run.get("p99_ms", 0.0) for run in runs),
            "requests": sum(run["requests"] for run in runs),
            "server_cpu_pct": statistics.median(run["server_cpu_pct"] for run in runs),
            "cpu_us_per_request": statistics.median(run["cpu_us_per_request"] or 0 for run in runs),
            "other_cpu_pct_max": max(run["other_cpu_pct"] for run in runs),
            "errors": {},
            # min-max over the passes, beside each median
            "spread": {"rps": spread(run["rps"] for run in runs),
                       "p99_ms": spread(run.get("p99_ms") for run in runs),
                       "cpu_us_per_request": spread(run["cpu_us_per_request"] for run in runs)},
        }
        for run in runs:
            add_errors(case["summary"][str(connections)]["errors"], run["errors"])
        if any("per_process" in run for run in runs):
            case["summary"][str(connections)]["per_process"] = summarize_processes(
                [run["per_process"] for run in runs if "per_process" in run])
    for run in case["runs"]:
        if not run["errors"]:
            run.pop("raw", None)  # wrk's own text is kept only for runs with errors
    return case


def show_processes(figures: dict) -> str:
    """One run's per-process figures, for the log: C{primary 1,234 req 88% CPU, worker-1 ...; balance 0.98}."""
    parts = []
    for name, process in figures["processes"].items():
        requests = process.get("requests")
        parts.append(f"{name} {requests:,} req {process['cpu_pct'] or 0:.0f}% CPU" if requests is not None
                     else f"{name} {process['cpu_pct'] or 0:.0f}% CPU")
    balance = figures["balance"]
    return ", ".join(parts) + (f"; balance {balance:.2f} ({figures['balance_of']})" if balance is not None else "")


def summarize_processes(runs: list[dict]) -> dict:
    """
    The passes' per-process figures: requests summed, CPU % medians, the balance of the sums,
    each pass's (in order) and the worst pass's.
    """
    names = sorted({name for run in runs for name in run["processes"]})
    processes = {}
    for name in names:
        mine = [run["processes"][name] for run in runs if name in run["processes"]]
        requests = [process.get("requests") for process in mine]
        cpu = [process["cpu_pct"] for process in mine if process.get("cpu_pct") is not None]
        processes[name] = {
            "requests": sum(requests) if requests and all(r is not None for r in requests) else None,
            "cpu_pct": statistics.median(cpu) if cpu else None,
        }
    counts = [process["requests"] for process in processes.values()]
    basis = "requests" if len(counts) >= 2 and all(count is not None for count in counts) else "cpu"
    values = counts if basis == "requests" else [process["cpu_pct"] or 0.0 for process in processes.values()]
    balance = min(values) / max(values) if len(values) >= 2 and max(values) else None
    passes = [run["balance"] for run in runs if run["balance"] is not None]
    return {"processes": processes, "balance": round(balance, 3) if balance is not None else None,
            "balance_passes": passes, "balance_worst_pass": min(passes) if passes else None, "balance_of": basis}


# --- memory ----------------------------------------------------------------------------------


def memory_idle_models(bench: Bench) -> dict:
    free_url = f"http://127.0.0.1:{bench.free_port}/"
    ids = [f"m{n:03d}" for n in range(MODELS_FOR_IDLE)]
    log(f"memory: aibackend with {MODELS_FOR_IDLE} HTTP models")
    server = bench.start_aibackend("mem-100-models", "\n".join(http_model(i, free_url) for i in ids))
    try:
        failures = 0
        for model_id in ids:
            status, _ = request(server.port, "POST", f"/post/predict?id={model_id}", BODY)
            failures += status != 200
        time.sleep(1)
        rss, pids = memory_mb(server.pid, "VmRSS")
        return {"models": len(ids), "requests": len(ids), "failed_requests": failures,
                "rss_mb": round(rss, 1), "processes": len(pids)}
    finally:
        bench.stop(server)


def memory_soak(bench: Bench, total_wanted: int) -> dict:
    free_url = f"http://127.0.0.1:{bench.free_port}/"
    log(f"memory: aibackend-http over {total_wanted:,} requests (wrk -c32)")
    server = bench.start_aibackend("mem-soak", http_model("free", free_url))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for _ in range(100):  # a few requests first: "before" is a daemon that has served
            conn.request("POST", "/post/predict?id=free", body=BODY, headers={"Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()
        time.sleep(1)
        before, _ = memory_mb(server.pid, "VmRSS")
        done, errors, runs, samples = 0, {}, 0, []
        started = time.monotonic()
        chunk = 10
        while done < total_wanted:
            result = bench.run_wrk(server.port, "/post/predict?id=free", 32, chunk)
            done += result["requests"]
            add_errors(errors, result["errors"])
            runs += 1
            rss, _ = memory_mb(server.pid, "VmRSS")
            samples.append([done, round(rss, 1)])
            rate = done / max(time.monotonic() - started, 0.001)
            left = total_wanted - done
            log(f"  soak: {done:,} requests, RSS {rss:.1f} MB, {rate:.0f} req/s"
                + (f", ERRORS: {show_errors(errors)}" if errors else ""))
            if result["requests"] == 0:
                raise BenchError("the soak's wrk run completed no request")
            chunk = max(1, min(60, int(left / max(result["rps"], 1)) + 1))
        elapsed = time.monotonic() - started
        time.sleep(1)
        after, _ = memory_mb(server.pid, "VmRSS")
        peak, _ = memory_mb(server.pid, "VmHWM")
        return {"requests": done, "wanted": total_wanted, "wrk_runs": runs, "elapsed_s": round(elapsed, 1),
                "rps": round(done / elapsed, 1), "errors": errors, "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1), "growth_mb": round(after - before, 1),
                "peak_rss_mb": round(peak, 1), "samples": samples}
    finally:
        bench.stop(server)


def read_answer(sock: socket.socket) -> int:
    """Read one whole HTTP answer (Content-Length framed); its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before an answer")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the middle of an answer")
        rest += chunk
    return status


def still_open(sockets: list[socket.socket]) -> int:
    poller = select.poll()
    for s in sockets:
        poller.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
    ready = {fd for fd, _ in poller.poll(0)}
    closed = 0
    for s in sockets:
        if s.fileno() not in ready:
            continue
        try:
            if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return len(sockets) - closed


def metric_value(text: str, name: str):
    match = re.search(rf"^{name}(?:{{[^}}]*}})?\s+([0-9.eE+-]+)\s*$", text, re.M)
    return float(match.group(1)) if match else None


def raise_open_files(count: int) -> tuple[int, str | None]:
    """Raise this process's RLIMIT_NOFILE for count sockets (and 512 more): (the count it allows, a note)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        return max(0, soft - 512), f"the open-files hard limit ({hard}) allows only {soft - 512} connections"
    return count, None


def client_address(index: int) -> str:
    """The loopback address the index-th of many held connections comes from (127.0.0.2, .3...)."""
    client = index // CONNECTIONS_PER_ADDRESS
    return f"127.0.{client // 250}.{client % 250 + 2}"


def memory_idle_connections(bench: Bench, count: int, hold: float) -> dict:
    count, note = raise_open_files(count)
    free_url = f"http://127.0.0.1:{bench.free_port}/"
    log(f"memory: {count:,} idle keep-alive connections to aibackend")
    server = bench.start_aibackend(
        "mem-connections", http_model("free", free_url),
        server_toml="max_connections = 20000\nidle_timeout = 300\n",
    )
    sockets: list[socket.socket] = []
    try:
        status, _ = request(server.port, "POST", "/post/predict?id=free", BODY)
        time.sleep(0.5)
        baseline, _ = memory_mb(server.pid, "VmRSS")
        probe = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        started = time.monotonic()
        failed, first_error = 0, None
        for start in range(0, count, CONNECT_BATCH):
            batch = []
            for index in range(start, min(start + CONNECT_BATCH, count)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(15)
                try:
                    s.bind((client_address(index), 0))
                    s.connect(("127.0.0.1", server.port))
                    s.sendall(probe)
                    batch.append(s)
                except OSError as e:
                    failed += 1
                    first_error = first_error or str(e)
                    s.close()
            for s in batch:
                try:
                    if read_answer(s) == 200:
                        sockets.append(s)
                        continue
                    failed += 1
                except (OSError, ValueError, IndexError) as e:
                    failed += 1
                    first_error = first_error or str(e)
                s.close()
        opened_s = time.monotonic() - started
        log(f"  {len(sockets):,} connections open in {opened_s:.1f} s ({failed} failed); holding {hold:g} s")
        time.sleep(hold)
        fresh_live, _ = request(server.port, "GET", "/health/live")
        fresh_predict, _ = request(server.port, "POST", "/post/predict?id=free", BODY)
        _, metrics = request(server.port, "GET", "/metrics")
        held_rss, _ = memory_mb(server.pid, "VmRSS")
        open_now = still_open(sockets)
        result = {
            "wanted": count, "opened": len(sockets), "failed": failed, "first_error": first_error,
            "open_seconds": round(opened_s, 1), "held_seconds": hold, "still_open": open_now,
            "daemon_open_connections": metric_value(metrics.decode(errors="replace"), "aibackend_open_connections"),
            "fresh_live_status": fresh_live, "fresh_predict_status": fresh_predict,
            "rss_before_mb": round(baseline, 1), "rss_held_mb": round(held_rss, 1),
            "kb_per_connection": round((held_rss - baseline) * 1024 / max(len(sockets), 1), 2),
        }
        if note:
            result["note"] = note
        return result
    finally:
        for s in sockets:
            s.close()
        bench.stop(server)


# --- streaming ------------------------------------------------------------------------------


STREAM_CASES = {
    "stream-direct": "the streaming source itself (bench/stream_source.py --port: asyncio, SSE over chunked "
                     "HTTP/1.1) read directly: the floor, no gateway",
    "stream-nginx": "nginx (1 worker) proxying the source: proxy_buffering off, HTTP/1.1 upstream keepalive "
                    "(bench/nginx-stream-proxy.conf.in)",
    "stream-aiohttp": "bench/aiohttp_proxy.py --stream relaying the source's answer piece by piece "
                      "(StreamResponse), TCPConnector(limit=256)",
    "stream-aibackend-jsonl": "aibackend, jsonl subprocess model bench/stream_source.py --jsonl (the same chunks on "
                              f"a pipe), workers = 1, max_inflight = {STREAM_INFLIGHT}",
    "stream-aibackend-jsonl-p2": "as stream-aibackend-jsonl, with twistd aibackend --processes 2 and "
                                 "per_process = true (each process its own model process)",
    "stream-aibackend-http": "aibackend, HTTP model pointing at the source (its SSE relayed chunk by chunk)",
    "stream-held": f"{HELD_STREAMS:,} idle streams held at once by aibackend (jsonl model: one chunk, then open "
                   "until the client leaves), then a fresh request; the daemon's RSS",
}
# The cases that the floor (stream-direct) is needed for.
STREAM_LATENCY_CASES = tuple(name for name in STREAM_CASES if name != "stream-held")
STREAM_PATH = "/post/predict?id=stream"
SSE_HEADERS = {"Accept": "text/event-stream", "Content-Type": "application/json"}


def stream_request(port: int, path: str, body: bytes, timeout: float = 10.0) -> tuple[int, str, bytes]:
    """One streamed request read to its end: (status, content type, the body, chunked encoding undone)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=SSE_HEADERS)
        answer = conn.getresponse()
        return answer.status, answer.getheader("Content-Type", ""), answer.read()
    finally:
        conn.close()


def sse_chunks(body: bytes) -> tuple[int, bool]:
    """(the chunks of the source in an SSE body, whether it has a `done` event), whatever their JSON's spacing."""
    chunks, done = 0, False
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = event.split(b"\n")
        if b"event: done" in lines:
            done = True
            continue
        data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
        if not data or any(line.startswith(b"event:") for line in lines):
            continue
        try:
            chunks += "t" in json.loads(data)
        except (ValueError, TypeError):
            pass
    return chunks, done


def check_stream(server: Server, path: str) -> None:
    """A streamed check request: 200, SSE, 3 chunks. A daemon that says "cannot stream" is Skipped."""
    status, content_type, body = stream_request(server.port, path, b'{"chunks": 3, "interval": 0}')
    if status == 400 and b"cannot stream" in body:
        raise Skipped("not available: the daemon answers 400 \"cannot stream\" for this model "
                      f"({body[:200].decode(errors='replace')})")
    if status != 200:
        raise BenchError(f"{server.name}: a streamed check request got {status}: {body[:300]!r}\n{server.log_tail()}")
    if not content_type.startswith("text/event-stream"):
        raise BenchError(f"{server.name}: a streamed check request got Content-Type {content_type!r}: {body[:300]!r}")
    chunks, _ = sse_chunks(body)
    if chunks != 3:
        raise BenchError(f"{server.name}: a streamed check request got {chunks} chunks of 3: {body[:500]!r}")


def start_stream_case(bench: Bench, name: str) -> tuple[Server, str, list[str]]:
    """Start the server of a streaming case: (server, the path the client calls, notes)."""
    source = bench.stream_source
    if name == "stream-direct":
        return source, "/", []
    if name == "stream-nginx":
        return bench.start_nginx("stream-nginx", NGINX_STREAM_PROXY, source.port), "/", []
    if name == "stream-aiohttp":
        # A limit above the streams at once: each holds an upstream connection for its whole length.
        return bench.start_aiohttp("stream-aiohttp", source.port, limit=256, check=b'{"chunks": 1}',
                                   stream=True), "/", []
    if name == "stream-aibackend-jsonl":
        server = bench.start_aibackend(name, subprocess_model(
            "stream", STREAM_SOURCE, "jsonl", 1, STREAM_INFLIGHT, arguments=("--jsonl",)))
        return server, STREAM_PATH, []
    if name == "stream-aibackend-jsonl-p2":
        if not bench.processes_flag:
            raise Skipped("not available: `twistd aibackend --help` does not list --processes")
        try:
            server = bench.start_aibackend(name, subprocess_model(
                "stream", STREAM_SOURCE, "jsonl", 1, STREAM_INFLIGHT, per_process=True, arguments=("--jsonl",)),
                processes=2)
        except BenchError as e:
            if "per_process" not in str(e):
                raise
            raise Skipped("not available: the daemon refuses `per_process = true`") from None
        return server, STREAM_PATH, ["per_process = true"]
    if name == "stream-aibackend-http":
        server = bench.start_aibackend(name, http_model("stream", f"http://127.0.0.1:{source.port}/"))
        return server, STREAM_PATH, []
    raise BenchError(f"unknown streaming case {name!r}")


def run_stream_client(bench: Bench, port: int, path: str, streams: int, duration: float,
                      chunks: int = STREAM_CHUNKS, interval: float = STREAM_INTERVAL, extra: tuple = ()) -> dict:
    argv = [bench.python, STREAM_CLIENT, "--port", str(port), "--path", path, "--streams", str(streams),
            "--duration", f"{duration:g}", "--chunks", str(chunks), "--interval", f"{interval:g}", *extra]
    limit = duration + chunks * interval + 90
    done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=BENCH)
    if done.returncode != 0:
        raise BenchError(f"the stream client failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise BenchError(f"cannot read the stream client's output: {done.stdout[:500]!r}") from None


def run_stream_case(bench: Bench, name: str) -> dict:
    args = bench.args
    case = {"name": name, "description": STREAM_CASES[name], "notes": [], "runs": [], "summary": {}}
    log(f"case {name}: {STREAM_CASES[name]}")
    server = None
    try:
        server, path, notes = start_stream_case(bench, name)
        case["path"] = path
        case["notes"] += notes
        check_stream(server, path)
    except Skipped as e:
        case["skipped"] = str(e)
        log(f"case {name}: skipped ({e})")
        if server is not None and server is not bench.stream_source:
            bench.stop(server)
        return case
    except (BenchError, OSError) as e:
        case["error"] = str(e)
        log(f"case {name}: FAILED to start: {e}")
        if server is not None and server is not bench.stream_source:
            bench.stop(server)
        return case
    try:
        if args.quiet_wait > 0:
            case["quiet"] = wait_quiet(bench, args.quiet_wait)
        warm = run_stream_client(bench, server.port, path, 32, WARMUP_SECONDS)
        case["warmup"] = {"chunks": warm["chunks"], "errors": warm["errors"]}
        roots = [server.pid] if server is bench.stream_source else [server.pid, bench.stream_source.pid]
        for n in range(1, args.passes + 1):
            for streams in STREAM_CONCURRENCIES:
                counted = process_requests(server) if server.processes else None
                before = cpu_snapshot(roots)
                run = run_stream_client(bench, server.port, path, streams, args.duration)
                after = cpu_snapshot(roots)
                used = cpu_used(before, after)
                mine, wall, chunks = used["servers"][server.pid], used["wall"], run["chunks"]
                if server.processes:
                    run["per_process"] = per_process(server, before, after, wall, counted, process_requests(server))
                run["pass"] = n
                run["server_cpu_pct"] = round(100 * mine / wall, 1)
                run["cpu_us_per_chunk"] = round(1e6 * mine / chunks, 1) if chunks else None
                # Everything else under the roots: the model process (jsonl), or the source.
                upstream = used["trees"] - mine
                run["upstream_cpu_us_per_chunk"] = round(1e6 * upstream / chunks, 1) if chunks else None
                run["client_cpu_pct"] = round(100 * used["wrk"] / wall, 1)
                other = used["machine"] - used["trees"] - used["wrk"] - used["self"] + used["steal"]
                run["other_cpu_pct"] = round(max(0.0, 100 * other / wall), 1)
                run["steal_pct"] = round(100 * used["steal"] / wall, 1)
                if streams == 1:
                    # One stream makes only a stream a second: the time to first chunk at 1 stream
                    # comes from a run of its own, of one-chunk streams one after the other.
                    first_run = run_stream_client(bench, server.port, path, 1, max(1.0, args.duration / 2),
                                                  chunks=1, interval=0)
                    run["first_chunk_run"] = {key: first_run[key] for key in (
                        "streams", "duration_s", "errors", "error_samples", "first_chunk", "model_first_chunk",
                        "request_to_model")}
                    add_errors(run["errors"], first_run["errors"])
                case["runs"].append(run)
                lat = run["chunk_latency"]
                first = run.get("first_chunk_run", run)["first_chunk"]
                flag = f"  ERRORS: {show_errors(run['errors'])}" if run["errors"] else ""
                log(f"  pass {n} {streams} streams: {run['chunks_per_s']:.0f} chunks/s, chunk p50 "
                    f"{lat.get('p50_ms', 0):.3f} ms p99 {lat.get('p99_ms', 0):.3f} ms, first chunk p50 "
                    f"{first.get('p50_ms', 0):.3f} ms, server CPU {run['server_cpu_pct']:.0f}% "
                    f"({run['cpu_us_per_chunk'] or 0:.0f} us/chunk), client CPU {run['client_cpu_pct']:.0f}%, "
                    f"other load {run['other_cpu_pct']:.0f}%{flag}"
                    + (f"; per process {show_processes(run['per_process'])}" if "per_process" in run else ""))
        server.remember()
        peak, _ = memory_mb(server.pid, "VmHWM")
        case["peak_rss_mb"] = round(peak, 1)
        if not server.alive():
            case["error"] = f"{server.name} exited during the case:\n{server.log_tail()}"
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        case["error"] = str(e)
        log(f"case {name}: FAILED: {e}")
    finally:
        if server is not bench.stream_source:
            bench.stop(server)
    for streams in STREAM_CONCURRENCIES:
        runs = [run for run in case["runs"] if run["streams_wanted"] == streams]
        if not runs:
            continue

        def median(key, part=None, first=False):
            values = [((run.get("first_chunk_run", run) if first else run)[part] if part else run).get(key)
                      for run in runs]
            values = [value for value in values if value is not None]
            return statistics.median(values) if values else None

        summary = case["summary"][str(streams)] = {
            "chunks_per_s": median("chunks_per_s"),
            "chunk_p50_ms": median("p50_ms", "chunk_latency"), "chunk_p99_ms": median("p99_ms", "chunk_latency"),
            "first_p50_ms": median("p50_ms", "first_chunk", True),
            "first_p99_ms": median("p99_ms", "first_chunk", True),
            "first_samples": sum(run.get("first_chunk_run", run)["first_chunk"].get("count", 0) for run in runs),
            "model_first_p50_ms": median("p50_ms", "model_first_chunk", True),
            "request_to_model_p50_ms": median("p50_ms", "request_to_model", True),
            "chunks": sum(run["chunks"] for run in runs), "streams": sum(run["streams"] for run in runs),
            "server_cpu_pct": median("server_cpu_pct"), "cpu_us_per_chunk": median("cpu_us_per_chunk"),
            "upstream_cpu_us_per_chunk": median("upstream_cpu_us_per_chunk"),
            "client_cpu_pct": median("client_cpu_pct"),
            "other_cpu_pct_max": max(run["other_cpu_pct"] for run in runs),
            "keepalives": sum(run["keepalives"] for run in runs), "errors": {},
            "spread": {"chunks_per_s": spread(run["chunks_per_s"] for run in runs),
                       "chunk_p99_ms": spread(run["chunk_latency"].get("p99_ms") for run in runs),
                       "cpu_us_per_chunk": spread(run["cpu_us_per_chunk"] for run in runs)},
        }
        for run in runs:
            add_errors(summary["errors"], run["errors"])
        if any("per_process" in run for run in runs):
            summary["per_process"] = summarize_processes([run["per_process"] for run in runs if "per_process" in run])
    return case


def read_first_event(sock: socket.socket) -> tuple[int, bytes]:
    """Read a streamed answer's head and its first SSE event: (status, what was read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before an answer")
        data += chunk
    status = int(data.split(b" ", 2)[1])
    if status != 200:
        return status, data
    body_at = data.find(b"\r\n\r\n") + 4
    while b"\n\n" not in data[body_at:]:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the first chunk")
        data += chunk
    return status, data


def model_metric(text: str, name: str, model: str):
    match = re.search(rf'^{name}{{[^}}]*model="{re.escape(model)}"[^}}]*}}\s+([0-9.eE+-]+)\s*$', text, re.M)
    return float(match.group(1)) if match else None


def daemon_counts(port: int) -> tuple[float | None, float | None]:
    """(aibackend_open_connections, aibackend_model_in_flight of the held model) from /metrics."""
    _, metrics = request(port, "GET", "/metrics")
    text = metrics.decode(errors="replace")
    return metric_value(text, "aibackend_open_connections"), model_metric(text, "aibackend_model_in_flight", "hold")


def held_streams(bench: Bench, count: int, hold: float) -> dict:
    """count idle streams held at once (a chunk each, then nothing), a fresh request, the daemon's RSS."""
    count, note = raise_open_files(count)
    free_url = f"http://127.0.0.1:{bench.free_port}/"
    log(f"stream-held: {count:,} idle streams held by aibackend")
    models = http_model("free", free_url) + "\n" + subprocess_model(
        "hold", STREAM_SOURCE, "jsonl", 1, count + 100, arguments=("--jsonl",), timeout=3600)
    server = bench.start_aibackend(
        "stream-held", models, server_toml=f"max_connections = {count + 1000}\nidle_timeout = 300\n"
                                           f"max_connections_per_peer = {2 * CONNECTIONS_PER_ADDRESS}\n")
    sockets: list[socket.socket] = []
    try:
        request(server.port, "POST", "/post/predict?id=free", BODY)
        stream_request(server.port, "/post/predict?id=hold", b'{"chunks": 2, "interval": 0}')
        time.sleep(0.5)
        baseline, _ = memory_mb(server.pid, "VmRSS")
        body = b'{"chunks": 1, "hold": true}'
        probe = (b"POST /post/predict?id=hold HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        started = time.monotonic()
        failed, first_error = 0, None
        progress = []  # [streams open, seconds] every tenth: a cost that grows with the streams held shows
        for start in range(0, count, CONNECT_BATCH):
            if start and start % max(CONNECT_BATCH, count // 10 // CONNECT_BATCH * CONNECT_BATCH) == 0:
                progress.append([len(sockets), round(time.monotonic() - started, 2)])
            batch = []
            for index in range(start, min(start + CONNECT_BATCH, count)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(15)
                try:
                    s.bind((client_address(index), 0))
                    s.connect(("127.0.0.1", server.port))
                    s.sendall(probe)
                    batch.append(s)
                except OSError as e:
                    failed += 1
                    first_error = first_error or str(e)
                    s.close()
            for s in batch:
                try:
                    status, data = read_first_event(s)
                    if status == 200 and b"data: " in data:
                        sockets.append(s)
                        continue
                    failed += 1
                    first_error = first_error or f"status {status}: {data[:300]!r}"
                except (OSError, ValueError, IndexError) as e:
                    failed += 1
                    first_error = first_error or str(e)
                s.close()
        opened_s = time.monotonic() - started
        log(f"  {len(sockets):,} streams open in {opened_s:.1f} s ({failed} failed); holding {hold:g} s")
        time.sleep(hold)
        fresh_started = time.monotonic()
        fresh_status, _, fresh_body = stream_request(server.port, "/post/predict?id=hold",
                                                     b'{"chunks": 3, "interval": 0}')
        fresh_ms = (time.monotonic() - fresh_started) * 1000
        fresh_ok = fresh_status == 200 and sse_chunks(fresh_body) == (3, True)
        fresh_predict, _ = request(server.port, "POST", "/post/predict?id=free", BODY)
        open_connections, in_flight = daemon_counts(server.port)
        held_rss, _ = memory_mb(server.pid, "VmRSS")
        open_now = still_open(sockets)
        # What came on the held streams meanwhile: keepalive comments only (no end, no error).
        ended, keepalives, extra = 0, 0, 0
        for s in sockets:
            s.setblocking(False)
            data = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except (BlockingIOError, OSError):
                pass
            extra += len(data)
            keepalives += data.count(b"\r\n:")
            ended += b"event: " in data or data.endswith(b"0\r\n\r\n")
        # Release them all, and see the daemon let go of them.
        released = time.monotonic()
        for s in sockets:
            s.close()
        held = len(sockets)
        sockets = []
        after_connections, after_in_flight = open_connections, in_flight
        while time.monotonic() - released < 30:
            after_connections, after_in_flight = daemon_counts(server.port)
            if (after_connections or 0) <= 1 and not after_in_flight:
                break
            time.sleep(0.2)
        release_s = time.monotonic() - released
        time.sleep(0.5)
        after_rss, _ = memory_mb(server.pid, "VmRSS")
        result = {
            "wanted": count, "opened": held, "failed": failed, "first_error": first_error,
            "open_seconds": round(opened_s, 1), "open_progress": progress, "held_seconds": hold,
            "still_open": open_now, "ended_while_held": ended, "keepalives_seen": keepalives, "bytes_while_held": extra,
            "daemon_open_connections": open_connections, "model_in_flight": in_flight,
            "fresh_stream_status": fresh_status, "fresh_stream_ok": fresh_ok, "fresh_stream_ms": round(fresh_ms, 1),
            "fresh_predict_status": fresh_predict,
            "rss_before_mb": round(baseline, 1), "rss_held_mb": round(held_rss, 1),
            "kb_per_stream": round((held_rss - baseline) * 1024 / max(held, 1), 2),
            "release_seconds": round(release_s, 1), "open_connections_after_release": after_connections,
            "model_in_flight_after_release": after_in_flight, "rss_after_release_mb": round(after_rss, 1),
        }
        if note:
            result["note"] = note
        log(f"  RSS {baseline:.1f} -> {held_rss:.1f} MB ({result['kb_per_stream']:.1f} KB a stream); fresh stream "
            f"{fresh_status} {'ok' if fresh_ok else 'NOT ok'} in {fresh_ms:.0f} ms, predict {fresh_predict}; "
            f"released in {release_s:.1f} s (open connections {after_connections}, in flight {after_in_flight})")
        return result
    finally:
        for s in sockets:
            s.close()
        bench.stop(server)


def summaries(cases: list[dict]):
    """C{summary(name, n)}: case C{name}'s figures at concurrency (or streams) C{n}, or None."""
    by_name = {case["name"]: case for case in cases}

    def summary(name, n):
        return by_name.get(name, {}).get("summary", {}).get(str(n))

    return summary


def not_run(case: dict, key: str) -> dict | None:
    """The row of a case that was skipped or failed before any figure (C{key}: its concurrency's name), else None."""
    if case.get("skipped") or (case.get("error") and not case["summary"]):
        return {"case": case["name"], key: None, "note": case.get("skipped") or "FAILED: " + first_line(case["error"])}
    return None


def stream_rows(cases: list[dict]) -> list[dict]:
    summary = summaries(cases)

    def minus(a, b):
        return round(a - b, 3) if a is not None and b is not None else None

    rows = []
    for case in cases:
        skipped = not_run(case, "streams")
        if skipped is not None:
            rows.append(skipped)
            continue
        for streams in STREAM_CONCURRENCIES:
            s = summary(case["name"], streams)
            if not s:
                continue
            floor = summary("stream-direct", streams) or {}
            rows.append({
                "case": case["name"], "streams": streams, "chunks_per_s": s["chunks_per_s"],
                "chunk_p50_ms": s["chunk_p50_ms"], "chunk_p99_ms": s["chunk_p99_ms"],
                "added_p50_ms": minus(s["chunk_p50_ms"], floor.get("chunk_p50_ms")),
                "added_p99_ms": minus(s["chunk_p99_ms"], floor.get("chunk_p99_ms")),
                "first_p50_ms": s["first_p50_ms"], "first_p99_ms": s["first_p99_ms"],
                "added_first_p50_ms": minus(s["first_p50_ms"], floor.get("first_p50_ms")),
                "server_cpu_pct": s["server_cpu_pct"], "cpu_us_per_chunk": s["cpu_us_per_chunk"],
                "client_cpu_pct": s["client_cpu_pct"], "other_cpu_pct_max": s["other_cpu_pct_max"],
                "peak_rss_mb": case.get("peak_rss_mb"), "errors": s["errors"],
                "note": "; ".join(case["notes"] + (["ERROR: " + first_line(case["error"])]
                                                   if case.get("error") else [])),
                **spreads_of(s, chunks_per_s="chunks_per_s", chunk_p99_ms="chunk_p99_ms",
                             cpu_us_per_chunk="cpu_us_per_chunk"),
                **({"per_process": s["per_process"]} if "per_process" in s else {}),
            })
    return rows


def stream_notes(section: dict) -> list[str]:
    """The notes of the streaming section: how it was measured, and the issue's targets."""
    if not section.get("rows") and not section.get("held_streams"):
        return []
    notes = []
    if section.get("rows"):
        notes.append(
            f"streaming: bench/stream_client.py (asyncio, one process) holds 1 or 100 keep-alive connections, each "
            f"asking for streams of {STREAM_CHUNKS} chunks {STREAM_INTERVAL * 1000:g} ms apart, one after the other, "
            "for the run's duration; the chunk latency is its arrival time (taken once per socket read, before "
            "parsing) minus the CLOCK_MONOTONIC time the model wrote into the chunk just before writing it. "
            "stream-direct reads the source itself (no gateway): its latency is the socket's and the client's, "
            "the floor the added columns are taken from. server CPU = the proxy's own processes (not the source, "
            "not the jsonl model); client CPU = the stream client's, in % of one core.")
        by_case = {(row["case"], row["streams"]): row for row in section["rows"]}
        floor = by_case.get(("stream-direct", 100)) or {}
        for name in ("stream-aibackend-jsonl", "stream-aibackend-jsonl-p2", "stream-aibackend-http"):
            row = by_case.get((name, 100))
            if row and row.get("added_p99_ms") is not None:
                loads = [row.get("other_cpu_pct_max") or 0.0, floor.get("other_cpu_pct_max") or 0.0]
                if max(loads) > OTHER_LOAD_FLAG:
                    # A difference of two runs of which one had the CPUs taken by others is noise.
                    verdict = (f"not judged: other load {loads[0]:.0f}% during it, {loads[1]:.0f}% during "
                               "stream-direct's (over 25%: ‡)")
                else:
                    verdict = "met" if row["added_p99_ms"] <= STREAM_TARGET_P99_MS else "NOT met"
                notes.append(f"target (issue 14): added per-chunk p99 at most {STREAM_TARGET_P99_MS:g} ms with 100 "
                             f"concurrent streams: {name} {row['added_p99_ms']:.3f} ms, {verdict}.")
    disturbed = [f"{row['case']} {row['streams']} streams ({row['other_cpu_pct_max']:.0f}%)"
                 for row in section.get("rows", [])
                 if row.get("other_cpu_pct_max") is not None and row["other_cpu_pct_max"] > OTHER_LOAD_FLAG]
    if disturbed:
        notes.append(f"‡ disturbed (streaming): other processes used over {OTHER_LOAD_FLAG:g}% of a core during "
                     f"{', '.join(disturbed)}.")
    held = section.get("held_streams") or {}
    if "rss_held_mb" in held:
        met = (held["opened"] >= HELD_STREAMS and held["rss_held_mb"] < HELD_TARGET_MB and held["fresh_stream_ok"]
               and held["fresh_predict_status"] == 200)
        notes.append(f"target (issue 14): {HELD_STREAMS:,} concurrent idle streams held in under {HELD_TARGET_MB} MB "
                     f"with a fresh request still answered: {held['opened']:,} held, daemon RSS "
                     f"{held['rss_held_mb']:.1f} MB, fresh stream {held['fresh_stream_status']}, fresh predict "
                     f"{held['fresh_predict_status']}: {'met' if met else 'NOT met'}.")
    return notes


def run_streaming(bench: Bench, names: list[str]) -> tuple[dict, bool]:
    """The streaming section: its cases, then the held streams. (results, whether something failed)"""
    args = bench.args
    section = {"chunks_per_stream": STREAM_CHUNKS, "interval_s": STREAM_INTERVAL,
               "concurrencies": list(STREAM_CONCURRENCIES), "cases": [], "rows": []}
    failed = False
    if any(name in STREAM_LATENCY_CASES for name in names):
        bench.stream_source = bench.start_stream_source()
        for name in names:
            if name in STREAM_LATENCY_CASES:
                case = run_stream_case(bench, name)
                section["cases"].append(case)
                failed |= bool(case.get("error"))
        bench.stop(bench.stream_source)
        bench.stream_source = None
        section["rows"] = stream_rows(section["cases"])
    if "stream-held" in names and args.held_streams > 0:
        hold = args.stream_hold if args.stream_hold is not None else (QUICK_STREAM_HOLD if args.quick else STREAM_HOLD)
        try:
            section["held_streams"] = held_streams(bench, args.held_streams, hold)
        except (BenchError, OSError, subprocess.TimeoutExpired) as e:
            log(f"stream-held: FAILED: {e}")
            section["held_streams"] = {"error": str(e)}
            failed = True
    return section, failed


# --- the OpenAI section -------------------------------------------------------------------------


OPENAI_CASES = {
    "openai-direct": "the fixed-answer OpenAI-shaped upstream itself: nginx (1 worker) answering a fixed "
                     "chat.completion JSON to any request (bench/nginx-openai.conf.in): the floor",
    "litellm-chat": "LiteLLM's proxy (`litellm --config`, 1 worker, master_key, LITELLM_LOCAL_MODEL_COST_MAP=True), "
                    "model `fixed` = openai/fixed at the fixed upstream: POST /v1/chat/completions, stream false",
    "aibackend-openai-chat": "aibackend's /v1/chat/completions, the fixed upstream as an HTTP model with "
                             "[models.openai] native = true: stream false",
    "aibackend-openai-chat-adapted": "aibackend's /v1/chat/completions, an adapted HTTP model: nginx answering the "
                                     "same fixed text as {\"content\", \"finish_reason\", \"usage\"} "
                                     "(bench/nginx-openai-adapted.conf.in), made a chat.completion by the daemon",
}
OPENAI_STREAM_CASES = {
    "openai-stream-direct": "the fixed SSE upstream itself: nginx (1 worker) sending 5 chat.completion.chunk events "
                            "and data: [DONE] as one body (bench/nginx-openai-stream.conf.in): the floor",
    "litellm-chat-stream": "LiteLLM's proxy as litellm-chat, model `fixed-stream` at the SSE upstream: stream true",
    "aibackend-openai-chat-stream": "aibackend's /v1/chat/completions, the SSE upstream as a native OpenAI HTTP "
                                    "model: stream true, its chunks passed through",
    "aibackend-openai-chat-adapted-stream": "as aibackend-openai-chat-adapted, stream true: the HTTP model streams "
                                            "SSE text deltas (strings, then finish_reason and usage), made "
                                            "chat.completion.chunk events by the daemon",
}
OPENAI_PATH = "/v1/chat/completions"
LITELLM_KEY = "sk-bench"  # LiteLLM's master_key (it will not start without one); the others ignore it
OPENAI_HEADERS = {"Authorization": f"Bearer {LITELLM_KEY}"}
CHAT_BODY = b'{"model": "fixed", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}'
CHAT_STREAM_BODY = (b'{"model": "fixed-stream", "messages": [{"role": "user", "content": "hello"}], '
                    b'"max_tokens": 16, "stream": true}')
OPENAI_STREAM_CONCURRENCIES = (1, 32)
OPENAI_TARGET_RATIO = 50.0  # issue 15: aibackend at least 50x LiteLLM's requests/s at concurrency 32
OPENAI_TARGET_ADDED_MS = 0.5  # issue 15: added p50 at c1, and added time to first chunk, at most 0.5 ms
LITELLM_CONFIG = """\
# written by bench/run.py: LiteLLM's proxy in front of the fixed-answer upstreams
model_list:
  - model_name: fixed
    litellm_params:
      model: openai/fixed
      api_base: http://127.0.0.1:{port}/v1
      api_key: none
  - model_name: fixed-stream
    litellm_params:
      model: openai/fixed
      api_base: http://127.0.0.1:{stream_port}/v1
      api_key: none
general_settings:
  master_key: {key}
"""


def litellm_path(bench: Bench) -> str | None:
    """LiteLLM's proxy command: --litellm, else the one beside this python (the bench extra)."""
    path = bench.args.litellm or os.path.join(os.path.dirname(sys.executable), "litellm")
    return path if os.access(path, os.X_OK) else None


def start_litellm(bench: Bench, name: str) -> Server:
    command = litellm_path(bench)
    if command is None:
        raise Skipped("not available: LiteLLM's proxy is not installed (no `litellm` beside this python: "
                      "`pip install 'litellm[proxy]'`, setup.py's bench extra, which make bench installs)")
    config = os.path.join(bench.tmp, f"{name}.yaml")
    with open(config, "w") as f:
        f.write(LITELLM_CONFIG.format(port=bench.openai_up.port, stream_port=bench.openai_stream_up.port,
                                      key=LITELLM_KEY))
    port = free_port()
    # Offline: the model cost map from the package, not fetched at start.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    server = bench.start(name, [command, "--config", config, "--host", "127.0.0.1", "--port", str(port),
                                "--num_workers", "1"], env=env)
    server.port = port
    try:
        bench.wait_ready(server, "/health/liveliness", timeout=180)
    except BenchError:
        bench.stop(server)
        raise
    return server


def native_openai_model(model_id: str, url: str) -> str:
    """An HTTP model whose server speaks OpenAI itself (issue 15's `[models.openai] native = true`)."""
    return http_model(model_id, url) + f"[models.openai]\nnative = true\nmodel = {toml_string(model_id)}\n"


def start_aibackend_openai(bench: Bench, name: str) -> tuple[Server, list[str]]:
    """
    aibackend with both fixed upstreams as native OpenAI models. A daemon that refuses the
    [models.openai] table has no native OpenAI models: the case is not available (without the
    table the fixed upstream would be an adapted model, whose answer a chat.completion is not).
    """
    models = (native_openai_model("fixed", f"http://127.0.0.1:{bench.openai_up.port}/v1")
              + native_openai_model("fixed-stream", f"http://127.0.0.1:{bench.openai_stream_up.port}/v1"))
    if "adapted" in name:
        up = bench.openai_adapted_up.port
        return bench.start_aibackend(name, http_model("fixed", f"http://127.0.0.1:{up}/chat")
                                     + http_model("fixed-stream", f"http://127.0.0.1:{up}/stream")), []
    try:
        return bench.start_aibackend(name, models), []
    except BenchError as e:
        if "openai" not in str(e):
            raise
        raise Skipped("not available: the daemon refuses `[models.openai] native = true` "
                      f"({first_line(str(e))})") from None


def openai_unavailable(status: int, body: bytes, notes: list[str]) -> None:
    """A 404 on /v1/chat/completions: the daemon has no OpenAI routes (yet): Skipped, not failed."""
    if status == 404:
        raise Skipped(f"not available: the daemon answers 404 on {OPENAI_PATH} "
                      f"({body[:200].decode(errors='replace')})" + "".join(f"; {note}" for note in notes))


def start_openai_case(bench: Bench, name: str, processes_flag: bool) -> tuple[Server, str, list[str]]:
    if name == "openai-direct":
        return bench.openai_up, OPENAI_PATH, []
    if name == "litellm-chat":
        return start_litellm(bench, name), OPENAI_PATH, []
    if name.startswith("aibackend-openai-chat"):
        server, notes = start_aibackend_openai(bench, name)
        try:
            status, body = request(server.port, "POST", OPENAI_PATH, CHAT_BODY, headers=OPENAI_HEADERS)
            openai_unavailable(status, body, notes)
        except OSError as e:
            bench.stop(server)
            raise BenchError(f"{name}: a chat request failed: {e}") from None
        except Skipped:
            bench.stop(server)
            raise
        return server, OPENAI_PATH, notes
    raise BenchError(f"unknown OpenAI case {name!r}")


def check_chat(server: Server, path: str) -> None:
    """A chat request must answer 200 with a chat.completion whose first choice has content."""
    status, body = request(server.port, "POST", path, CHAT_BODY, headers=OPENAI_HEADERS)
    if status != 200:
        raise BenchError(f"{server.name}: a chat request got {status}: {body[:300]!r}\n{server.log_tail()}")
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{server.name}: a chat request got no chat.completion: {body[:300]!r}") from None
    if not content:
        raise BenchError(f"{server.name}: a chat request got an empty answer: {body[:300]!r}")


def openai_stream_events(body: bytes) -> tuple[int, bool]:
    """(the chat.completion.chunk events of an SSE body, whether it ends with data: [DONE])."""
    chunks, done = 0, False
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if data == b"[DONE]":
            done = True
        elif data:
            try:
                chunks += json.loads(data).get("object") == "chat.completion.chunk"
            except (ValueError, AttributeError):
                pass
    return chunks, done


def start_openai_stream_case(bench: Bench, name: str) -> tuple[Server, list[str]]:
    if name == "openai-stream-direct":
        return bench.openai_stream_up, []
    if name == "litellm-chat-stream":
        return start_litellm(bench, name), []
    if name.startswith("aibackend-openai-chat"):
        return start_aibackend_openai(bench, name)
    raise BenchError(f"unknown OpenAI streaming case {name!r}")


def check_chat_stream(server: Server, notes: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", OPENAI_PATH, body=CHAT_STREAM_BODY,
                     headers={**SSE_HEADERS, **OPENAI_HEADERS})
        answer = conn.getresponse()
        status, content_type, body = answer.status, answer.getheader("Content-Type", ""), answer.read()
    finally:
        conn.close()
    openai_unavailable(status, body, notes)
    if status != 200:
        raise BenchError(f"{server.name}: a streamed chat request got {status}: {body[:300]!r}\n{server.log_tail()}")
    if not content_type.startswith("text/event-stream"):
        raise BenchError(f"{server.name}: a streamed chat request got Content-Type {content_type!r}: {body[:300]!r}")
    chunks, done = openai_stream_events(body)
    if not chunks or not done:
        raise BenchError(f"{server.name}: a streamed chat request got {chunks} chunks, "
                         f"{'with' if done else 'no'} [DONE]: {body[:500]!r}")


def run_openai_stream_case(bench: Bench, name: str) -> dict:
    """Streamed chat requests one after the other on 1 and 32 connections: streams/s, time to first chunk."""
    args = bench.args
    up = bench.openai_adapted_up if "adapted" in name else bench.openai_stream_up
    case = {"name": name, "description": OPENAI_STREAM_CASES[name], "notes": [], "runs": [], "summary": {}}
    log(f"case {name}: {OPENAI_STREAM_CASES[name]}")
    server = None
    try:
        server, notes = start_openai_stream_case(bench, name)
        case["notes"] += notes
        check_chat_stream(server, notes)
    except (Skipped, BenchError, OSError) as e:
        case["skipped" if isinstance(e, Skipped) else "error"] = str(e)
        log(f"case {name}: {'skipped' if isinstance(e, Skipped) else 'FAILED to start'} ({e})")
        if server is not None and server is not up:
            bench.stop(server)
        return case
    extra = ("--openai", "--body", CHAT_STREAM_BODY.decode(), "--authorization", OPENAI_HEADERS["Authorization"])
    try:
        if args.quiet_wait > 0:
            case["quiet"] = wait_quiet(bench, args.quiet_wait)
        warm = run_stream_client(bench, server.port, OPENAI_PATH, 32, WARMUP_SECONDS, 1, 0, extra)
        case["warmup"] = {"streams": warm["streams"], "errors": warm["errors"]}
        roots = [server.pid] if server is up else [server.pid, up.pid]
        for n in range(1, args.passes + 1):
            for streams in OPENAI_STREAM_CONCURRENCIES:
                before = cpu_snapshot(roots)
                run = run_stream_client(bench, server.port, OPENAI_PATH, streams, args.duration, 1, 0, extra)
                used = cpu_used(before, cpu_snapshot(roots))
                mine, wall, count = used["servers"][server.pid], used["wall"], run["streams"]
                run["pass"] = n
                run["streams_per_s"] = round(count / run["elapsed_s"], 1) if run["elapsed_s"] else 0.0
                run["server_cpu_pct"] = round(100 * mine / wall, 1)
                run["cpu_us_per_stream"] = round(1e6 * mine / count, 1) if count else None
                run["client_cpu_pct"] = round(100 * used["wrk"] / wall, 1)
                other = used["machine"] - used["trees"] - used["wrk"] - used["self"] + used["steal"]
                run["other_cpu_pct"] = round(max(0.0, 100 * other / wall), 1)
                case["runs"].append(run)
                first = run["first_chunk"]
                flag = f"  ERRORS: {show_errors(run['errors'])}" if run["errors"] else ""
                log(f"  pass {n} {streams} streams: {run['streams_per_s']:.0f} streams/s, first chunk p50 "
                    f"{first.get('p50_ms', 0):.3f} ms p99 {first.get('p99_ms', 0):.3f} ms, server CPU "
                    f"{run['server_cpu_pct']:.0f}% ({run['cpu_us_per_stream'] or 0:.0f} us/stream), "
                    f"other load {run['other_cpu_pct']:.0f}%{flag}")
        server.remember()
        peak, _ = memory_mb(server.pid, "VmHWM")
        case["peak_rss_mb"] = round(peak, 1)
        if not server.alive():
            case["error"] = f"{server.name} exited during the case:\n{server.log_tail()}"
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        case["error"] = str(e)
        log(f"case {name}: FAILED: {e}")
    finally:
        if server is not up:
            bench.stop(server)
    for streams in OPENAI_STREAM_CONCURRENCIES:
        runs = [run for run in case["runs"] if run["streams_wanted"] == streams]
        if not runs:
            continue
        summary = case["summary"][str(streams)] = {
            "streams_per_s": statistics.median(run["streams_per_s"] for run in runs),
            "first_p50_ms": statistics.median(run["first_chunk"].get("p50_ms", 0.0) for run in runs),
            "first_p99_ms": statistics.median(run["first_chunk"].get("p99_ms", 0.0) for run in runs),
            "streams": sum(run["streams"] for run in runs),
            "server_cpu_pct": statistics.median(run["server_cpu_pct"] for run in runs),
            "cpu_us_per_stream": statistics.median(run["cpu_us_per_stream"] or 0 for run in runs),
            "client_cpu_pct": statistics.median(run["client_cpu_pct"] for run in runs),
            "other_cpu_pct_max": max(run["other_cpu_pct"] for run in runs), "errors": {},
            "spread": {"streams_per_s": spread(run["streams_per_s"] for run in runs),
                       "first_p99_ms": spread(run["first_chunk"].get("p99_ms") for run in runs),
                       "cpu_us_per_stream": spread(run["cpu_us_per_stream"] for run in runs)},
        }
        for run in runs:
            add_errors(summary["errors"], run["errors"])
    return case


def openai_rows(cases: list[dict], floor: str, concurrencies: tuple, rate: str) -> list[dict]:
    """One row per case and concurrency: the figures, added (vs the floor at c1 / same streams), × LiteLLM."""
    summary = summaries(cases)
    peer = "litellm-chat-stream" if floor == "openai-stream-direct" else "litellm-chat"

    rows = []
    for case in cases:
        skipped = not_run(case, "concurrency")
        if skipped is not None:
            rows.append(skipped)
            continue
        for n in concurrencies:
            s = summary(case["name"], n)
            if not s:
                continue
            base, litellm = summary(floor, n), summary(peer, n)
            row = {"case": case["name"], "concurrency": n, rate: s[rate],
                   "vs_litellm": round(s[rate] / litellm[rate], 2) if litellm and litellm[rate] else None,
                   "peak_rss_mb": case.get("peak_rss_mb"), "server_cpu_pct": s["server_cpu_pct"],
                   "other_cpu_pct_max": s["other_cpu_pct_max"], "errors": s["errors"],
                   "note": "; ".join(case["notes"] + (["ERROR: " + first_line(case["error"])]
                                                      if case.get("error") else []))}
            if rate == "rps":
                row.update(p50_ms=round(s["p50_ms"], 3), p99_ms=round(s["p99_ms"], 3),
                           cpu_us=s["cpu_us_per_request"],
                           added_p50_ms=round(s["p50_ms"] - base["p50_ms"], 3) if n == 1 and base else None,
                           **spreads_of(s, rps="rps", p99_ms="p99_ms", cpu_us="cpu_us_per_request"))
            else:
                row.update(p50_ms=s["first_p50_ms"], p99_ms=s["first_p99_ms"], cpu_us=s["cpu_us_per_stream"],
                           added_p50_ms=round(s["first_p50_ms"] - base["first_p50_ms"], 3) if base else None,
                           **spreads_of(s, streams_per_s="streams_per_s", p99_ms="first_p99_ms",
                                        cpu_us="cpu_us_per_stream"))
            rows.append(row)
    return rows


def openai_notes(section: dict) -> list[str]:
    """The issue's targets, judged from the rows (not judged when a run had the CPUs taken by others)."""
    notes = []
    plain = {(row["case"], row["concurrency"]): row for row in section.get("rows", [])}
    streamed = {(row["case"], row["concurrency"]): row for row in section.get("stream_rows", [])}

    def disturbed(*rows):
        return any((row.get("other_cpu_pct_max") or 0) > OTHER_LOAD_FLAG for row in rows)

    def verdict(ok, *rows):
        return "not judged (other load over 25%: ‡)" if disturbed(*rows) else ("met" if ok else "NOT met")

    for name in ("aibackend-openai-chat", "aibackend-openai-chat-adapted"):
        ours, theirs = plain.get((name, 32)), plain.get(("litellm-chat", 32))
        if ours and theirs and ours.get("vs_litellm") is not None:
            notes.append(f"target (issue 15): aibackend >= {OPENAI_TARGET_RATIO:g}x LiteLLM's req/s at c32: {name} "
                         f"{ours['rps']:,.0f} vs {theirs['rps']:,.0f} req/s = {ours['vs_litellm']:.1f}x, "
                         f"{verdict(ours['vs_litellm'] >= OPENAI_TARGET_RATIO, ours, theirs)}.")
        else:
            notes.append(f"target (issue 15): aibackend >= {OPENAI_TARGET_RATIO:g}x LiteLLM's req/s at c32: {name} "
                         "not measured (it or litellm-chat was not available or failed; see its row).")
    for label, rows, key, floor in (
            ("added p50 at c1", plain, "aibackend-openai-chat", "openai-direct"),
            ("added p50 at c1", plain, "aibackend-openai-chat-adapted", "openai-direct"),
            ("streaming: time to first chunk added at 1 stream", streamed, "aibackend-openai-chat-stream",
             "openai-stream-direct"),
            ("streaming: time to first chunk added at 1 stream", streamed, "aibackend-openai-chat-adapted-stream",
             "openai-stream-direct")):
        row = rows.get((key, 1))
        if row and row.get("added_p50_ms") is not None:
            notes.append(f"target (issue 15): {label} at most {OPENAI_TARGET_ADDED_MS:g} ms: {key} "
                         f"{row['added_p50_ms']:.3f} ms, "
                         f"{verdict(row['added_p50_ms'] <= OPENAI_TARGET_ADDED_MS, row, rows.get((floor, 1)) or {})}.")
        else:
            notes.append(f"target (issue 15): {label} at most {OPENAI_TARGET_ADDED_MS:g} ms: not measured ({key} "
                         "not available or failed).")
    for key in ("litellm-chat", "litellm-chat-stream"):
        row = (plain if key == "litellm-chat" else streamed).get((key, 1))
        if row and row.get("added_p50_ms") is not None:
            what = "to the time to first chunk" if key.endswith("-stream") else "at p50"
            unit = "stream" if key.endswith("-stream") else "request"
            notes.append(f"{key}: {row[('streams_per_s' if unit == 'stream' else 'rps')]:,.0f} {unit}s/s and "
                         f"{row['added_p50_ms']:.2f} ms added {what} with one connection, "
                         f"{row['cpu_us'] or 0:,.0f} µs of CPU per {unit}, peak RSS {fmt(row['peak_rss_mb'], 0)} MB.")
    return notes


def run_openai(bench: Bench, names: list[str], stream_names: list[str]) -> tuple[dict, bool]:
    """The OpenAI section: the fixed upstreams, then the wrk cases and the streamed ones."""
    section = {"path": OPENAI_PATH, "body": CHAT_BODY.decode(), "stream_body": CHAT_STREAM_BODY.decode(),
               "cases": [], "rows": [], "stream_cases": [], "stream_rows": []}
    failed = False
    bench.openai_up = bench.start_nginx("openai-direct", NGINX_OPENAI)
    bench.openai_stream_up = bench.start_nginx("openai-stream-direct", NGINX_OPENAI_STREAM)
    bench.openai_adapted_up = bench.start_nginx("openai-adapted", NGINX_OPENAI_ADAPTED)
    try:
        for name in names:
            case = run_case(bench, name, False, OPENAI_CASES, start_openai_case, check_chat, CHAT_LUA,
                            bench.openai_adapted_up if "adapted" in name else bench.openai_up)
            section["cases"].append(case)
            failed |= bool(case.get("error"))
        for name in stream_names:
            case = run_openai_stream_case(bench, name)
            section["stream_cases"].append(case)
            failed |= bool(case.get("error"))
    finally:
        for up in (bench.openai_up, bench.openai_stream_up, bench.openai_adapted_up):
            bench.stop(up)
    section["rows"] = openai_rows(section["cases"], "openai-direct", CONCURRENCIES, "rps")
    section["stream_rows"] = openai_rows(section["stream_cases"], "openai-stream-direct",
                                         OPENAI_STREAM_CONCURRENCIES, "streams_per_s")
    section["notes"] = openai_notes(section)
    return section, failed


FLAME_CASES = ("aibackend-http", "aibackend-jsonl", "aibackend-openai-chat")
FLAME_RATE = 500  # py-spy's samples a second


def flame(bench: Bench, name: str, processes_flag: bool) -> str:
    """
    A flame graph of one case's daemon (C{--flame CASE}): the case started as a measured run
    starts it, a second of warm-up, then wrk at concurrency 32 for the run's duration while
    py-spy (the bench extra's) samples the daemon, written as an SVG under the results
    directory, named by the case and the start time.

    @return: the SVG's path.
    """
    args = bench.args
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise BenchError(f"no py-spy beside {sys.executable}: `make .venv/.bench-installed` (setup.py's bench extra)")
    if name.startswith("aibackend-openai"):
        bench.openai_up = bench.start_nginx("openai-direct", NGINX_OPENAI)
        bench.openai_stream_up = bench.start_nginx("openai-stream-direct", NGINX_OPENAI_STREAM)
        server, path, _ = start_openai_case(bench, name, processes_flag)
        check, script = check_chat, CHAT_LUA
    else:
        server, path, _ = start_case(bench, name, processes_flag)
        check, script = check_answer, POST_LUA
    check(server, path)
    bench.run_wrk(server.port, path, 32, WARMUP_SECONDS, script)
    os.makedirs(args.results_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = os.path.join(args.results_dir, f"flame-{name}-c32-{stamp}.svg")
    # py-spy starts sampling at once; wrk's run is inside its window (a second on each side).
    # --gil: only the thread holding the GIL, the reactor's at work (not the idle thread pool).
    spy = subprocess.Popen([py_spy, "record", "--pid", str(server.pid), "--duration", str(args.duration + 2),
                            "--rate", str(FLAME_RATE), "--gil", "--format", "flamegraph", "--output", out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)
        run = bench.run_wrk(server.port, path, 32, args.duration, script)
        said, _ = spy.communicate(timeout=args.duration + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not os.path.exists(out):
        raise BenchError(f"py-spy failed ({spy.returncode}): {said.strip()[-500:]}")
    log(f"flame {name}: {run['rps']:.0f} req/s at c32 while sampled; written {os.path.relpath(out, ROOT)}")
    return out


def openai_markdown(section: dict) -> list[str]:
    if not section.get("cases") and not section.get("stream_cases"):
        return []
    out = ["", f"## OpenAI (POST {OPENAI_PATH} in front of a fixed-answer upstream; LiteLLM's proxy the peer)", "",
           f"Body `{section['body']}` (wrk, bench/chat.lua); streamed: `{section['stream_body']}`, one stream after "
           "the other on each connection (bench/stream_client.py --openai). Added = minus the fixed upstream's "
           "own figure (`openai-direct` at c1; `openai-stream-direct` at the same streams).", ""]
    for key, title, rate, unit in (("rows", "conc", "req/s", "req"), ("stream_rows", "streams", "streams/s", "stream")):
        rows = section.get(key) or []
        if not rows:
            continue
        lat = "p50 ms | p99 ms | added p50 @c1 ms" if key == "rows" else \
            "first chunk p50 ms | first chunk p99 ms | added first p50 ms"
        out += [f"| case | {title} | {rate} | {lat} | × LiteLLM | peak RSS MB | errors | server CPU % "
                f"| CPU µs/{unit} | other load % |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for row in rows:
            if row["concurrency"] is None:
                out.append(f"| {row['case']} | — | — | — | — | — | — | — | {row['note']} | — | — | — |")
                continue
            errors = f"**⚠ {show_errors(row['errors'])}**" if row["errors"] else "0"
            other = row["other_cpu_pct_max"]
            disturbed = " ‡" if other is not None and other > OTHER_LOAD_FLAG else ""
            rate_key = "rps" if key == "rows" else "streams_per_s"
            out.append(
                f"| {'**⚠ ' + row['case'] + '**' if row['errors'] else row['case']} | {row['concurrency']} "
                f"| {fmt_spread(row[rate_key], row.get(rate_key + '_range'), 0)}{disturbed} | {fmt(row['p50_ms'], 3)} "
                f"| {fmt_spread(row['p99_ms'], row.get('p99_ms_range'), 3)} "
                f"| {fmt(row['added_p50_ms'], 3)} | {fmt(row['vs_litellm'], 1, '×')} | {fmt(row['peak_rss_mb'], 1)} "
                f"| {errors} | {fmt(row['server_cpu_pct'], 0)} "
                f"| {fmt_spread(row['cpu_us'], row.get('cpu_us_range'), 0)} "
                f"| {fmt(other, 0)}{disturbed} |")
        out.append("")
    out += [f"- {note}" for note in section.get("notes", [])]
    return out


# --- output ----------------------------------------------------------------------------------


# --- the batching section (issue 17) -------------------------------------------------------------

FIXED_COST_MODEL = os.path.join(BENCH, "fixed_cost_model.py")
BATCH_FIXED_MS = 2.0  # what each call of the model costs, whatever it holds
BATCH_PER_ITEM_MS = 0.05  # and what each item of it adds
BATCH_CONCURRENCIES = (1, 64)
BATCH_MAX_SIZE = 64
BATCH_DELAY_MS = 2
BATCH_CASES = {
    "batch-off": f"unbatched: bench/fixed_cost_model.py ({BATCH_FIXED_MS:g} ms a call + {BATCH_PER_ITEM_MS:g} ms an "
                 "item), jsonl, 1 process, max_inflight = 1",
    "batch-on": f"the same model with predict_batch and [models.batching] max_batch_size = {BATCH_MAX_SIZE}, "
                "max_delay_ms = 0",
    "batch-on-delay": f"as batch-on, with max_delay_ms = {BATCH_DELAY_MS}",
}
BATCH_TARGET_SPEEDUP = 5.0  # issue 17: at least 5x the unbatched requests/s at concurrency 64


def batching_model(name: str) -> str:
    """The [[models]] table of a batching case: the fixed-cost model, batched or not."""
    batched = name != "batch-off"
    text = subprocess_model("fixed-cost", FIXED_COST_MODEL, "jsonl", 1, 1, timeout=30, arguments=(
        "--fixed-ms", str(BATCH_FIXED_MS), "--per-item-ms", str(BATCH_PER_ITEM_MS), *(["--batch"] if batched else [])))
    if batched:
        delay = BATCH_DELAY_MS if name == "batch-on-delay" else 0
        text += f"[models.batching]\nmax_batch_size = {BATCH_MAX_SIZE}\nmax_delay_ms = {delay}\n"
    return text


def process_seconds(pid: int) -> float:
    """CPU seconds one process has used (the daemon's own: without --processes it is one process)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def batching_status(server: Server) -> dict:
    """The fixed-cost model's C{batching} in the daemon's status ({} unbatched)."""
    status, body = request(server.port, "GET", "/get/status?id=fixed-cost")
    return (json.loads(body).get("batching") or {}) if status == 200 else {}


def run_batching_case(bench: Bench, name: str) -> dict:
    """A batching case: the daemon and its model, checked, warmed up, then wrk at each concurrency, each pass."""
    args = bench.args
    case = {"name": name, "description": BATCH_CASES[name], "runs": [], "summary": {}}
    log(f"case {name}: {BATCH_CASES[name]}")
    path = "/post/predict?id=fixed-cost"
    try:
        server = bench.start_aibackend(name, batching_model(name))
    except BenchError as e:
        case["error"] = str(e)
        log(f"case {name}: FAILED to start: {e}")
        return case
    try:
        check_answer(server, path)
        if args.quiet_wait > 0:
            case["quiet"] = wait_quiet(bench, args.quiet_wait)
        bench.run_wrk(server.port, path, BATCH_CONCURRENCIES[-1], WARMUP_SECONDS)
        for n in range(1, args.passes + 1):
            for connections in BATCH_CONCURRENCIES:
                before, daemon_before = cpu_snapshot([server.pid]), process_seconds(server.pid)
                run = bench.run_wrk(server.port, path, connections, args.duration)
                daemon = process_seconds(server.pid) - daemon_before
                used = cpu_used(before, cpu_snapshot([server.pid]))
                other = used["machine"] - used["trees"] - used["wrk"] - used["self"] + used["steal"]
                run["pass"] = n
                run["cpu_us_per_request"] = round(1e6 * daemon / run["requests"], 1) if run["requests"] else None
                run["other_cpu_pct"] = round(max(0.0, 100 * other / used["wall"]), 1)
                run["mean_batch"] = batching_status(server).get("recent_mean_batch_size")
                case["runs"].append(run)
                log(f"  pass {n} c{connections}: {run['rps']:.0f} req/s, p50 {run.get('p50_ms', 0):.3f} ms, "
                    f"p99 {run.get('p99_ms', 0):.3f} ms, daemon {run['cpu_us_per_request'] or 0:.0f} us/req, "
                    f"other load {run['other_cpu_pct']:.0f}%"
                    + (f"  ERRORS: {show_errors(run['errors'])}" if run["errors"] else ""))
        case["batching"] = batching_status(server) or None
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        case["error"] = str(e)
        log(f"case {name}: FAILED: {e}")
    finally:
        bench.stop(server)
    for connections in BATCH_CONCURRENCIES:
        runs = [run for run in case["runs"] if run["connections"] == connections]
        if runs:
            errors: dict = {}
            for run in runs:
                add_errors(errors, run["errors"])
            case["summary"][str(connections)] = {
                "rps": statistics.median(run["rps"] for run in runs),
                "p50_ms": statistics.median(run.get("p50_ms", 0.0) for run in runs),
                "p99_ms": statistics.median(run.get("p99_ms", 0.0) for run in runs),
                "cpu_us_per_request": statistics.median(run["cpu_us_per_request"] or 0 for run in runs),
                "other_cpu_pct_max": max(run["other_cpu_pct"] for run in runs),
                "mean_batch": statistics.median(run["mean_batch"] for run in runs) if all(
                    run["mean_batch"] is not None for run in runs) else None,
                "errors": errors,
            }
    for run in case["runs"]:
        if not run["errors"]:
            run.pop("raw", None)
    return case


def run_batching(bench: Bench, names: list[str]) -> tuple[dict, bool]:
    """The batching section: each case, then its rows (against batch-off) and the issue's targets."""
    section = {"fixed_ms": BATCH_FIXED_MS, "per_item_ms": BATCH_PER_ITEM_MS, "max_batch_size": BATCH_MAX_SIZE,
               "delay_ms": BATCH_DELAY_MS, "cases": [], "rows": [], "notes": []}
    for name in names:
        section["cases"].append(run_batching_case(bench, name))
    failed = any(case.get("error") for case in section["cases"])
    summaries = {case["name"]: case["summary"] for case in section["cases"]}
    base = summaries.get("batch-off", {})
    for case in section["cases"]:
        for connections, figures in case["summary"].items():
            unbatched = base.get(connections)
            row = {"case": case["name"], "concurrency": int(connections), **figures,
                   "vs_unbatched": round(figures["rps"] / unbatched["rps"], 2) if unbatched and unbatched["rps"]
                   else None,
                   "added_p50_ms": round(figures["p50_ms"] - unbatched["p50_ms"], 3) if unbatched else None}
            section["rows"].append(row)
    rows = {(row["case"], row["concurrency"]): row for row in section["rows"]}
    top = BATCH_CONCURRENCIES[-1]
    for name in ("batch-on", "batch-on-delay"):
        loaded, lone = rows.get((name, top)), rows.get((name, 1))
        delay = BATCH_DELAY_MS if name == "batch-on-delay" else 0
        if loaded and loaded["vs_unbatched"] is not None:
            met = "met" if loaded["vs_unbatched"] >= BATCH_TARGET_SPEEDUP else "**missed**"
            section["notes"].append(f"{name} c{top}: {loaded['vs_unbatched']:.1f}x the unbatched requests/s "
                                    f"(target at least {BATCH_TARGET_SPEEDUP:g}x: {met}).")
        if lone and lone["added_p50_ms"] is not None:
            met = "met" if lone["added_p50_ms"] <= delay + 1 else "**missed**"
            section["notes"].append(f"{name} c1: {lone['added_p50_ms']:+.3f} ms p50 against unbatched "
                                    f"(target at most max_delay_ms + 1 = {delay + 1} ms: {met}).")
    return section, failed


def batch_cases(wanted: list[str]) -> list[str]:
    """The batching cases asked for (any of them brings batch-off, what they are measured against)."""
    names = [name for name in BATCH_CASES if name in wanted]
    return ["batch-off", *(name for name in names if name != "batch-off")] if names else []


def batching_markdown(section: dict) -> list[str]:
    if not section.get("rows"):
        return []
    out = ["", f"## Batching (a model of {section['fixed_ms']:g} ms a call + {section['per_item_ms']:g} ms an item, "
               f"jsonl, 1 process; max_batch_size {section['max_batch_size']})", "",
           "| case | conc | req/s | × unbatched | p50 ms | p99 ms | added p50 vs unbatched (ms) | mean batch "
           "| daemon CPU µs/req | errors | other load % |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row in section["rows"]:
        errors = f"**⚠ {show_errors(row['errors'])}**" if row["errors"] else "0"
        out.append(f"| {row['case']} | {row['concurrency']} | {fmt(row['rps'], 0)} | {fmt(row['vs_unbatched'], 1, '×')} "
                   f"| {fmt(row['p50_ms'], 3)} | {fmt(row['p99_ms'], 3)} | {fmt(row['added_p50_ms'], 3)} "
                   f"| {fmt(row['mean_batch'], 1)} | {fmt(row['cpu_us_per_request'], 0)} | {errors} "
                   f"| {fmt(row['other_cpu_pct_max'], 0)} |")
    out += [""] + [f"- {note}" for note in section["notes"]]
    out.append("- mean batch = the model's `recent_mean_batch_size` (`status`: its latest 100 batches) at the end "
               "of each run, the median over the passes; daemon CPU = the daemon's process alone (not the model's).")
    return out


def fmt(value, digits=2, suffix="") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def fmt_spread(value, bounds, digits=2) -> str:
    """A median with its spread over the passes beside it: C{4,606 (3,529–4,701)}; just the median for one pass."""
    if value is None or not bounds or bounds[0] is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} ({fmt(bounds[0], digits)}–{fmt(bounds[1], digits)})"


def spreads_of(summary: dict, **keys) -> dict:
    """A row's C{<name>_range} fields: the summary's spread of each key (None without one)."""
    found = summary.get("spread") or {}
    return {f"{name}_range": found.get(key) for name, key in keys.items()}


def rows_for(cases: list[dict]) -> list[dict]:
    summary = summaries(cases)

    rows = []
    for case in cases:
        skipped = not_run(case, "concurrency")
        if skipped is not None:
            rows.append(skipped)
            continue
        for connections in CONCURRENCIES:
            s = summary(case["name"], connections)
            if not s:
                continue
            direct = summary("direct", 1)
            nginx, aio = summary("nginx-proxy", connections), summary("aiohttp-proxy", connections)
            rows.append({
                "case": case["name"], "concurrency": connections, "rps": round(s["rps"], 1),
                "p50_ms": round(s["p50_ms"], 3), "p99_ms": round(s["p99_ms"], 3),
                "added_p50_ms": round(s["p50_ms"] - direct["p50_ms"], 3) if connections == 1 and direct else None,
                "peak_rss_mb": case.get("peak_rss_mb"),
                "vs_nginx_proxy": round(s["rps"] / nginx["rps"], 3) if nginx and nginx["rps"] else None,
                "vs_aiohttp_proxy": round(s["rps"] / aio["rps"], 3) if aio and aio["rps"] else None,
                "server_cpu_pct": s.get("server_cpu_pct"), "cpu_us_per_request": s.get("cpu_us_per_request"),
                "other_cpu_pct_max": s.get("other_cpu_pct_max"),
                "errors": s["errors"],
                "note": "; ".join(case["notes"] + (["ERROR: " + first_line(case["error"])]
                                                   if case.get("error") else [])),
                **spreads_of(s, rps="rps", p99_ms="p99_ms", cpu_us_per_request="cpu_us_per_request"),
                **({"per_process": s["per_process"]} if "per_process" in s else {}),
            })
    return rows


def processes_markdown(rows: list[dict]) -> list[str]:
    """The --processes cases' requests per process (each process's /metrics, read before and after each run)."""
    rows = [{**row, "concurrency": row.get("concurrency", row.get("streams"))}
            for row in rows if row.get("per_process")]
    if not rows:
        return []
    out = ["", "## Requests per process (`--processes` cases)", "",
           "Each process's requests over the runs (the difference of its own `aibackend_requests_total` before and "
           "after each run, read from its /metrics: `aibackend_process_info` says which process answered) and its "
           "CPU; balance = the fewest requests over the most (of the passes' sums; in brackets each pass's), "
           f"CPU time where the daemon does not count per process. The issue's target: at c32 each process within "
           f"20 % of the other in every pass (balance ≥ {BALANCE_TARGET:g}). At c1 there is one connection, which "
           "one process serves.", "",
           "| case | conc / streams | requests per process | balance (each pass) | CPU % per process (median) |",
           "| --- | ---: | --- | ---: | --- |"]
    for row in rows:
        figures = row["per_process"]
        processes = figures["processes"]
        requests = " · ".join(f"{name} {fmt(process['requests'], 0)}" for name, process in processes.items()) \
            if figures["balance_of"] == "requests" else "— (not counted per process)"
        cpu = " · ".join(f"{name} {fmt(process['cpu_pct'], 0)}" for name, process in processes.items())
        balance = figures["balance"]
        worst = figures.get("balance_worst_pass")
        flag = "" if row["concurrency"] == 1 or balance is None or min(balance, worst or balance) >= BALANCE_TARGET \
            else " **⚠**"
        passes = figures.get("balance_passes") or ([worst] if worst is not None else [])
        shown = f" ({', '.join(fmt(value, 2) for value in passes)})" if passes else ""
        out.append(f"| {row['case']} | {row['concurrency']} | {requests} | {fmt(balance, 2)}{shown}{flag} | {cpu} |")
    return out


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [
        f"# aibackend benchmark, {meta['started']}",
        "",
        (f"{meta['duration_s']} s per run, {meta['passes']} passes (medians, and in brackets the spread over the "
         f"passes: min–max), wrk -t1 -c1 and -t2 -c32, 1 s warm-up; POST {BODY.decode()}. " if results["rows"] else
         f"{meta['duration_s']} s per run, {meta['passes']} passes (medians; in brackets min–max over the passes), "
         "1 s warm-up. ")
        + f"Machine: {meta['cpus']} CPUs, {meta['kernel']}; "
        f"aibackend {meta['git_commit'][:12]}{' (with uncommitted changes)' if meta['git_dirty'] else ''}."
        + (" **Quick run.**" if meta["quick"] else ""),
    ]
    if results["rows"]:
        out += [
            "",
            "| case | conc | req/s | p50 ms | p99 ms | added p50 vs direct @c1 (ms) | peak RSS MB "
            "| × nginx-proxy | × aiohttp-proxy | errors | server CPU % | CPU µs/req | other load % |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
    for row in results["rows"]:
        if row["concurrency"] is None:
            out.append(f"| {row['case']} | — | — | — | — | — | — | — | — | {row['note']} | — | — | — |")
            continue
        errors = f"**⚠ {show_errors(row['errors'])}**" if row["errors"] else "0"
        name = f"**⚠ {row['case']}**" if row["errors"] else row["case"]
        other = row["other_cpu_pct_max"]
        disturbed = " ‡" if other is not None and other > OTHER_LOAD_FLAG else ""
        out.append(
            f"| {name} | {row['concurrency']} | {fmt_spread(row['rps'], row.get('rps_range'), 0)}{disturbed} "
            f"| {fmt(row['p50_ms'], 3)} "
            f"| {fmt_spread(row['p99_ms'], row.get('p99_ms_range'), 3)} | {fmt(row['added_p50_ms'], 3)} "
            f"| {fmt(row['peak_rss_mb'], 1)} "
            f"| {fmt(row['vs_nginx_proxy'], 2, '×')} | {fmt(row['vs_aiohttp_proxy'], 2, '×')} | {errors} "
            f"| {fmt(row['server_cpu_pct'], 0)} "
            f"| {fmt_spread(row['cpu_us_per_request'], row.get('cpu_us_per_request_range'), 0)} "
            f"| {fmt(other, 0)}{disturbed} |"
        )
    out += processes_markdown(results["rows"] + (results.get("streaming") or {}).get("rows", []))
    out += stream_markdown(results.get("streaming") or {})
    out += openai_markdown(results.get("openai") or {})
    out += batching_markdown(results.get("batching") or {})
    memory = results.get("memory") or {}
    if memory:
        out += ["", "## Memory (aibackend, one process, RSS = VmRSS of the daemon's own processes)", "",
                "| measurement | value |", "| --- | --- |"]
        idle = memory.get("idle_100_models")
        if isinstance(idle, dict) and "rss_mb" in idle:
            out.append(f"| idle, {idle['models']} HTTP models registered (after {idle['requests']} requests"
                       f"{', ⚠ ' + str(idle['failed_requests']) + ' failed' if idle['failed_requests'] else ''}) "
                       f"| {idle['rss_mb']:.1f} MB |")
        soak = memory.get("soak")
        if isinstance(soak, dict) and "rss_before_mb" in soak:
            flag = f" **⚠ errors: {show_errors(soak['errors'])}**" if soak["errors"] else ""
            out += [
                f"| aibackend-http, 1 model, after 100 requests | {soak['rss_before_mb']:.1f} MB |",
                f"| same daemon after {soak['requests']:,} more requests (wrk -c32, {soak['rps']:,.0f} req/s, "
                f"{soak['wrk_runs']} wrk runs){flag} | {soak['rss_after_mb']:.1f} MB "
                f"(growth {soak['growth_mb']:+.1f} MB; peak {soak['peak_rss_mb']:.1f} MB) |",
            ]
        conns = memory.get("idle_connections")
        if isinstance(conns, dict) and "rss_held_mb" in conns:
            fresh_ok = conns["fresh_live_status"] == 200 and conns["fresh_predict_status"] == 200
            out += [
                f"| {conns['opened']:,} idle keep-alive connections held ({conns['wanted']:,} wanted"
                f"{', ' + str(conns['failed']) + ' failed' if conns['failed'] else ''}), before → held "
                f"| {conns['rss_before_mb']:.1f} → {conns['rss_held_mb']:.1f} MB "
                f"({conns['kb_per_connection']:.1f} KB per connection) |",
                f"| connections still open after {conns['held_seconds']:g} s idle "
                f"(daemon's aibackend_open_connections) | {conns['still_open']:,} "
                f"({fmt(conns['daemon_open_connections'], 0)}) |",
                f"| a fresh request while they are held | "
                f"{'200' if fresh_ok else '**⚠ '}"
                f"{'' if fresh_ok else 'live ' + str(conns['fresh_live_status']) + ', predict ' + str(conns['fresh_predict_status']) + '**'} |",
            ]
        for key, value in memory.items():
            if isinstance(value, dict) and "error" in value:
                out.append(f"| {key} | **FAILED**: {first_line(value['error'])} |")
    out += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    out += ["", "Cases:", ""] + [f"- `{name}`: {text}" for name, text in CASES.items()]
    out += [f"- `{name}`: {text}" for name, text in STREAM_CASES.items()]
    out += [f"- `{name}`: {text}" for name, text in {**OPENAI_CASES, **OPENAI_STREAM_CASES}.items()]
    return "\n".join(out) + "\n"


def stream_markdown(section: dict) -> list[str]:
    if not section.get("rows") and not section.get("held_streams"):
        return []
    out = []
    if section.get("rows"):
        out += [
            "", f"## Streaming (SSE; each stream asks for {section['chunks_per_stream']} chunks, one every "
            f"{section['interval_s'] * 1000:g} ms, then the next stream on the same connection)", "",
            "Chunk latency = the client's arrival time minus the time the model wrote the chunk (it writes its "
            "CLOCK_MONOTONIC into each); added = minus `stream-direct`'s at the same number of streams. First "
            "chunk = from the request's send to its first chunk's arrival (the model writes it at once).", "",
            "| case | streams | chunks/s | chunk p50 ms | chunk p99 ms | added p50 ms | added p99 ms "
            "| first chunk p50 ms | first chunk p99 ms | added first p50 ms | server CPU % | CPU µs/chunk "
            "| client CPU % | errors | other load % |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for row in section["rows"]:
            if row["streams"] is None:
                out.append(f"| {row['case']} | — | — | — | — | — | — | — | — | — | — | — | — | {row['note']} | — |")
                continue
            errors = f"**⚠ {show_errors(row['errors'])}**" if row["errors"] else "0"
            name = f"**⚠ {row['case']}**" if row["errors"] else row["case"]
            other = row["other_cpu_pct_max"]
            disturbed = " ‡" if other is not None and other > OTHER_LOAD_FLAG else ""
            out.append(
                f"| {name} | {row['streams']} | {fmt_spread(row['chunks_per_s'], row.get('chunks_per_s_range'), 0)}"
                f"{disturbed} | {fmt(row['chunk_p50_ms'], 3)} "
                f"| {fmt_spread(row['chunk_p99_ms'], row.get('chunk_p99_ms_range'), 3)} "
                f"| {fmt(row['added_p50_ms'], 3)} "
                f"| {fmt(row['added_p99_ms'], 3)} | {fmt(row['first_p50_ms'], 3)} | {fmt(row['first_p99_ms'], 3)} "
                f"| {fmt(row['added_first_p50_ms'], 3)} | {fmt(row['server_cpu_pct'], 0)} "
                f"| {fmt_spread(row['cpu_us_per_chunk'], row.get('cpu_us_per_chunk_range'), 0)} "
                f"| {fmt(row['client_cpu_pct'], 0)} | {errors} "
                f"| {fmt(other, 0)}{disturbed} |"
            )
    held = section.get("held_streams")
    if held:
        out += ["", "## Held streams (aibackend, one process, RSS = VmRSS of the daemon's own processes)", "",
                "| measurement | value |", "| --- | --- |"]
        if "error" in held:
            out.append(f"| stream-held | **FAILED**: {first_line(held['error'])} |")
        else:
            if held["opened"] < HELD_STREAMS:
                target = f"the target is for {HELD_STREAMS:,}"
            else:
                target = f"target under {HELD_TARGET_MB} MB: " + (
                    "met" if held["rss_held_mb"] < HELD_TARGET_MB else "**not met**")
            fresh_ok = held["fresh_stream_ok"] and held["fresh_predict_status"] == 200
            # Released: no connection left but the /metrics request's own, nothing in flight.
            released = (held["open_connections_after_release"] or 0) <= 1 and not held["model_in_flight_after_release"]
            if fresh_ok:
                fresh = "200, 200"
            else:
                fresh = (f"**⚠ stream {held['fresh_stream_status']}"
                         f"{' ok' if held['fresh_stream_ok'] else ' incomplete'}, "
                         f"predict {held['fresh_predict_status']}**")
            out += [
                f"| {held['opened']:,} idle streams held ({held['wanted']:,} wanted"
                f"{', ⚠ ' + str(held['failed']) + ' failed' if held['failed'] else ''}), before → held "
                f"| {held['rss_before_mb']:.1f} → {held['rss_held_mb']:.1f} MB ({held['kb_per_stream']:.1f} KB per "
                f"stream; {target}) |",
                f"| streams still open after {held['held_seconds']:g} s (daemon's aibackend_open_connections, "
                f"the model's in flight) | {held['still_open']:,} ({fmt(held['daemon_open_connections'], 0)}, "
                f"{fmt(held['model_in_flight'], 0)}) |",
                f"| streams that ended or failed while held (keepalive comments seen) "
                f"| {'0' if not held['ended_while_held'] else '**⚠ ' + str(held['ended_while_held']) + '**'} "
                f"({held['keepalives_seen']}) |",
                f"| a fresh stream (3 chunks) and a fresh plain request while they are held "
                f"| {fresh} (the stream in {held['fresh_stream_ms']:.0f} ms) |",
                f"| released: the daemon's open connections and in flight after {held['release_seconds']:g} s, RSS "
                f"| {'' if released else '**⚠ '}{fmt(held['open_connections_after_release'], 0)}, "
                f"{fmt(held['model_in_flight_after_release'], 0)}{'' if released else '**'}; "
                f"{held['rss_after_release_mb']:.1f} MB |",
            ]
    return out


def write_results(results: dict, results_dir: str) -> tuple[str, str]:
    os.makedirs(results_dir, exist_ok=True)
    stamp = results["meta"]["stamp"]
    text = markdown(results)
    data = json.dumps(results, indent=2, sort_keys=False) + "\n"
    paths = []
    for base in (stamp, "latest"):
        for suffix, content in ((".json", data), (".md", text)):
            path = os.path.join(results_dir, base + suffix)
            with open(path + ".tmp", "w") as f:
                f.write(content)
            os.replace(path + ".tmp", path)
            paths.append(path)
    return paths[2], paths[3]


# --- main --------------------------------------------------------------------------------------


def parse_args(argv=None):
    env = os.environ
    quick_env = env.get("BENCH_QUICK", "").strip().lower() not in ("", "0", "no", "false")
    parser = argparse.ArgumentParser(description="aibackend's benchmark (see bench/README.md).")
    parser.add_argument("--quick", action="store_true", default=quick_env,
                        help=f"a short run: {QUICK_DURATION} s runs, a {QUICK_SOAK:,}-request soak (or BENCH_QUICK=1)")
    parser.add_argument("--duration", type=int, default=None,
                        help=f"seconds per wrk run and per streaming run (BENCH_DURATION; default {DEFAULT_DURATION}, "
                             f"{QUICK_DURATION} quick)")
    parser.add_argument("--passes", type=int, default=PASSES, help="passes over both concurrencies (default 2)")
    parser.add_argument("--soak-requests", type=int, default=None,
                        help=f"requests of the memory soak (BENCH_SOAK_REQUESTS; default {DEFAULT_SOAK:,}, "
                             f"{QUICK_SOAK:,} quick; 0 skips it)")
    parser.add_argument("--connections", type=int, default=IDLE_CONNECTIONS,
                        help=f"idle keep-alive connections to hold (default {IDLE_CONNECTIONS:,}; 0 skips it)")
    parser.add_argument("--hold", type=float, default=None,
                        help="seconds the idle connections are held before they are counted (default 5, 2 quick)")
    parser.add_argument("--cases", default=",".join([*CASES, *STREAM_CASES, *OPENAI_CASES, *OPENAI_STREAM_CASES,
                                                     *BATCH_CASES]),
                        help="comma-separated cases to run (default: all; `streaming` names every streaming case, "
                             "`openai` every OpenAI one; direct runs with any wrk case, stream-direct with any "
                             "streaming one but stream-held, openai-direct / openai-stream-direct with any OpenAI one)")
    parser.add_argument("--litellm", default=None,
                        help="LiteLLM's proxy command (default: the `litellm` beside this python, the bench extra)")
    parser.add_argument("--held-streams", type=int, default=HELD_STREAMS,
                        help=f"idle streams stream-held holds (default {HELD_STREAMS:,}; 0 skips it)")
    parser.add_argument("--stream-hold", type=float, default=None,
                        help=f"seconds stream-held holds them before it counts them (default {STREAM_HOLD:g}: past "
                             f"the daemon's first keepalive; {QUICK_STREAM_HOLD:g} quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="before each case, seconds to wait at most for other processes to leave the CPUs "
                             f"(under {QUIET_LOAD:g}%% of a core; default 30, 5 quick, 0 does not wait)")
    parser.add_argument("--results-dir", default=RESULTS, help="where to write the results (default bench/results)")
    parser.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"),
                        help="the twistd to start (default: the one beside this python)")
    parser.add_argument("--nginx", default=None, help="the nginx binary (default: found on PATH or /usr/sbin)")
    parser.add_argument("--wrk", default=None, help="the wrk binary (default: found on PATH)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for a look")
    parser.add_argument("--flame", metavar="CASE", choices=FLAME_CASES, default=None,
                        help=f"instead of the tables: a flame graph (py-spy) of CASE's daemon under wrk at "
                             f"concurrency 32, written to the results directory ({', '.join(FLAME_CASES)})")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = int(env.get("BENCH_DURATION") or (QUICK_DURATION if args.quick else DEFAULT_DURATION))
    if args.soak_requests is None:
        default = QUICK_SOAK if args.quick else DEFAULT_SOAK
        args.soak_requests = int(env.get("BENCH_SOAK_REQUESTS") or default)
        if args.quick and "BENCH_SOAK_REQUESTS" in env:
            args.soak_requests = min(args.soak_requests, QUICK_SOAK)
    if args.quiet_wait is None:
        args.quiet_wait = 5.0 if args.quick else 30.0
    if args.duration < 1 or args.passes < 1:
        parser.error("--duration and --passes must be at least 1")
    wanted = [name.strip() for name in args.cases.split(",") if name.strip()]
    if "streaming" in wanted:
        wanted += list(STREAM_CASES)
    if "openai" in wanted:
        wanted += [*OPENAI_CASES, *OPENAI_STREAM_CASES]
    if "batching" in wanted:
        wanted += list(BATCH_CASES)
    known = [*CASES, *STREAM_CASES, *OPENAI_CASES, *OPENAI_STREAM_CASES, *BATCH_CASES]
    unknown = [name for name in wanted if name not in known and name not in ("streaming", "openai", "batching")]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}, streaming, openai")
    args.cases = [name for name in CASES if name in wanted]
    if args.cases and "direct" not in args.cases:
        args.cases.insert(0, "direct")
    args.stream_cases = [name for name in STREAM_CASES if name in wanted]
    if any(name in STREAM_LATENCY_CASES for name in args.stream_cases) and "stream-direct" not in args.stream_cases:
        args.stream_cases.insert(0, "stream-direct")
    args.openai_cases = [name for name in OPENAI_CASES if name in wanted]
    if args.openai_cases and "openai-direct" not in args.openai_cases:
        args.openai_cases.insert(0, "openai-direct")
    args.openai_stream_cases = [name for name in OPENAI_STREAM_CASES if name in wanted]
    if args.openai_stream_cases and "openai-stream-direct" not in args.openai_stream_cases:
        args.openai_stream_cases.insert(0, "openai-stream-direct")
    args.batch_cases = batch_cases(wanted)
    if args.held_streams < 0:
        parser.error("--held-streams must be at least 0")
    return args


def check_tools(args) -> None:
    args.wrk = args.wrk or find_tool("wrk")
    args.nginx = args.nginx or find_tool("nginx")
    missing = [name for name, path in (("wrk", args.wrk), ("nginx", args.nginx)) if not path]
    if missing:
        sys.exit(
            f"bench: {' and '.join(missing)} not found. The benchmark needs both (wrk drives the load, nginx is "
            "the free model and the native proxy). On Debian: apt-get install wrk nginx-light "
            "(`make bench` does this when run as root or with sudo); or pass --wrk/--nginx PATH."
        )
    if not os.access(args.twistd, os.X_OK):
        sys.exit(f"bench: no twistd at {args.twistd}: run this with the project's venv python (make bench)")
    try:
        subprocess.run([sys.executable, "-c", "import aiohttp"], check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        sys.exit(f"bench: aiohttp is not installed in {sys.executable}'s environment: "
                 f"{sys.executable} -m pip install aiohttp (make bench does it)")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_tools(args)

    def stop_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # Interruptible even when started in the background of a script (where SIGINT starts out ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_signal)
    signal.signal(signal.SIGHUP, stop_signal)

    started = time.time()
    now = datetime.datetime.now().astimezone()
    results = {
        "meta": {
            "started": now.strftime("%Y-%m-%d %H:%M:%S %Z"), "stamp": now.strftime("%Y%m%d-%H%M%S"),
            "quick": args.quick, "duration_s": args.duration, "passes": args.passes,
            "warmup_s": WARMUP_SECONDS, "concurrencies": list(CONCURRENCIES), "body": BODY.decode(),
            "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "wrk": version_of([args.wrk, "-v"]), "nginx": version_of([args.nginx, "-v"]),
            "aiohttp": version_of([sys.executable, "-c", "import aiohttp; print(aiohttp.__version__)"]),
            "twisted": version_of([sys.executable, "-c", "import twisted; print(twisted.__version__)"]),
            "litellm": version_of([sys.executable, "-c", "import importlib.metadata as m\ntry: print(m.version('litellm'))\n"
                                   "except m.PackageNotFoundError: print('not installed')"]),
            "git_commit": git("rev-parse", "HEAD") or "?",
            "git_dirty": bool(git("status", "--porcelain", "--", "aibackend", "twisted", "setup.py")),
        },
        "cases": [], "rows": [], "streaming": {}, "openai": {}, "memory": {}, "notes": [],
    }
    processes_flag = has_processes_flag(args.twistd)
    results["meta"]["processes_flag"] = processes_flag
    bench = Bench(args)
    bench.processes_flag = processes_flag
    failed = False
    interrupted = False
    try:
        log(f"temp dir {bench.tmp}; {args.duration} s runs, " + (
            f"a flame graph of {args.flame}" if args.flame else f"{args.passes} passes; cases: " + ", ".join(
                args.cases + args.stream_cases + args.openai_cases + args.openai_stream_cases)))
        bench.free_server = bench.start_nginx("direct", NGINX_FREE)
        bench.free_port = bench.free_server.port
        if args.flame:
            try:
                flame(bench, args.flame, processes_flag)
            except (BenchError, Skipped, OSError, subprocess.TimeoutExpired) as e:
                log(f"flame {args.flame}: FAILED: {e}")
                return 1
            return 0
        for name in args.cases:
            if name == "aibackend-http-policy":  # its requests carry the client key
                case = run_case(bench, name, processes_flag, check=check_with_key, script=POLICY_LUA)
            else:
                case = run_case(bench, name, processes_flag)
            results["cases"].append(case)
            failed |= bool(case.get("error"))
        if args.stream_cases:
            results["streaming"], stream_failed = run_streaming(bench, args.stream_cases)
            failed |= stream_failed
        if args.openai_cases or args.openai_stream_cases:
            results["openai"], openai_failed = run_openai(bench, args.openai_cases, args.openai_stream_cases)
            failed |= openai_failed
        if args.batch_cases:
            results["batching"], batching_failed = run_batching(bench, args.batch_cases)
            failed |= batching_failed
        if not args.no_memory:
            steps = [("idle_100_models", lambda: memory_idle_models(bench))]
            if args.soak_requests > 0:
                steps.append(("soak", lambda: memory_soak(bench, args.soak_requests)))
            if args.connections > 0:
                hold = args.hold if args.hold is not None else (2.0 if args.quick else 5.0)
                steps.append(("idle_connections", lambda: memory_idle_connections(bench, args.connections, hold)))
            for key, step in steps:
                try:
                    results["memory"][key] = step()
                except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                    log(f"memory {key}: FAILED: {e}")
                    results["memory"][key] = {"error": str(e)}
                    failed = True
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    except BenchError as e:
        failed = True
        log(f"FAILED: {e}")
        results["notes"].append(f"the run stopped early: {e}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        bench.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        log("interrupted: no results written")
        return 130

    results["meta"]["elapsed_s"] = round(time.time() - started, 1)
    results["rows"] = rows_for(results["cases"])
    notes = results["notes"]
    notes.append(f"2-core machine: wrk, the free model (nginx, 1 worker) and the server under test share the "
                 f"CPUs; nginx-proxy runs 1 worker and the aiohttp proxy 1 process, like aibackend without "
                 f"--processes. Load average at start: {results['meta']['load_average_at_start']}.")
    notes.append("aiohttp-proxy runs on asyncio's default event loop (no uvloop), as aibackend runs on "
                 "Twisted's default epoll reactor.")
    notes.append(f"aibackend-raw uses workers = {RAW_WORKERS} (a raw process takes one request at a time); "
                 f"aibackend-jsonl uses one process with max_inflight = {JSONL_INFLIGHT}, so requests pipeline.")
    notes.append("peak RSS = sum of VmHWM of the server's own processes (nginx master + worker, the aiohttp "
                 "process, twistd and its worker processes), not the models aibackend starts.")
    if not processes_flag:
        notes.append("`--processes` is not available in this aibackend (`twistd aibackend --help` does not "
                     "list it): the -p2 cases were skipped.")
    disturbed = [f"{row['case']} c{row['concurrency']} ({row['other_cpu_pct_max']:.0f}%)" for row in results["rows"]
                 if row.get("other_cpu_pct_max") is not None and row["other_cpu_pct_max"] > OTHER_LOAD_FLAG]
    notes.append("server CPU % = CPU time of the server's own processes (models excluded) over the run, in % of "
                 "one core; CPU µs/req = that time per request (steadier than req/s on a shared machine); "
                 "other load % = the most CPU, in % of one core, taken during a run by processes that are none "
                 "of the benchmark's (not the server, its models, the free model, wrk or run.py), plus the time "
                 "the hypervisor gave this virtual machine's CPUs to others (steal).")
    if disturbed:
        notes.append(f"‡ disturbed: other processes used over {OTHER_LOAD_FLAG:g}% of a core during "
                     f"{', '.join(disturbed)}; those numbers understate what the server can do.")
    balances = [{**row, "concurrency": row.get("concurrency", row.get("streams"))}
                for row in results["rows"] + results["streaming"].get("rows", []) if row.get("per_process")]
    for row in [row for row in balances if row["concurrency"] != 1]:
        balance = row["per_process"]["balance"]
        worst = row["per_process"].get("balance_worst_pass")
        if balance is not None:
            met = min(balance, worst if worst is not None else balance) >= BALANCE_TARGET
            notes.append(f"{row['case']} c{row['concurrency']}: balance of the processes' "
                         f"{row['per_process']['balance_of']} {balance:.2f} (worst pass {fmt(worst, 2)}); the "
                         f"target, each within 20 % of the other in every pass (≥ {BALANCE_TARGET:g}), is "
                         f"{'met' if met else 'not met'}.")
    notes += stream_notes(results["streaming"])
    openai = results["openai"]
    for case in results["cases"] + results["streaming"].get("cases", []) + openai.get("cases", []) + openai.get(
            "stream_cases", []):
        if case["notes"]:
            notes.append(f"{case['name']}: {'; '.join(case['notes'])}.")
        if any(run["errors"] for run in case["runs"]):
            notes.append(f"⚠ {case['name']} had errors under load (see the errors column and the JSON's runs).")
        if case.get("error"):
            notes.append(f"⚠ {case['name']} failed: {first_line(case['error'])}")
    held = results["streaming"].get("held_streams") or {}
    if held.get("error"):
        notes.append(f"⚠ stream-held failed: {first_line(held['error'])}")
    notes.append(f"total run time {results['meta']['elapsed_s']:.0f} s.")
    json_path, md_path = write_results(results, args.results_dir)
    print(markdown(results))
    log(f"written {os.path.relpath(json_path, ROOT)} and {os.path.relpath(md_path, ROOT)} "
        f"(and a copy named {results['meta']['stamp']}); {results['meta']['elapsed_s']:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
