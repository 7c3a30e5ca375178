"""
C{twistd aibackend --processes N}: N reactor processes sharing the listening sockets and
one registry (L{aibackend.processes}).

The real daemon on a free loopback port, real model processes (examples/raw_model.py, the
daemon-started examples/http_model_server.py), what a client sees over fresh HTTP
connections, and what /proc says about the processes: who is whose child, who holds the
listening socket, who is gone.

The primary listens alone and hands each new connection to the process holding the fewest
(L{aibackend.listeners.SharedListener}); a test that needs a given process takes a
connection pinned to it (L{aibackend.testing.Multi.connection_to}): connections are made
until /proc shows one that the wanted process holds, and the request is sent on that one. A test that
stops a process (SIGSTOP) continues it (SIGCONT) always, in a finally.

Plain blocking tests; every wait has a deadline; every process a test saw is ended after it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from aibackend.testing import (
    end_worker, fresh_connection_counts, listening_inodes, process_info, process_of, waiting_to_be_accepted, workers_on,
    MODEL_SERVER, PHOENIX, ROOT, TWISTD, TWISTD_MARK, Multi, alive, children, cmdline, config_text,
    descendants, free_port, parent_of, pids_stopped, reaped, run, socket_inodes, start_time, wait_until,
    with_mark, write,
)

pytestmark = pytest.mark.timeout(40)

RAW_MODEL = os.path.join(ROOT, "examples", "raw_model.py")

# Each model's processes are told apart by a tag on their command line (raw_model.py ignores it).
SHARED_TAG = "tag-shared-model"
OWN_TAG = "tag-per-process-model"

# A raw model that answers after argv[1] seconds.
SLOW = """
import json, os, sys, time
for line in sys.stdin:
    time.sleep(float(sys.argv[1]))
    print(json.dumps({"pid": os.getpid(), "slow": True}), flush=True)
"""


# --- the daemon -------------------------------------------------------------------------------------


class Tracker:
    """Every process a test saw, ended (SIGKILL) after it if it is still there."""

    def __init__(self):
        self.seen: dict[int, int | None] = {}

    def add(self, pids) -> None:
        for pid in pids:
            self.seen.setdefault(pid, start_time(pid))

    def kill_leftovers(self) -> list[int]:
        killed = []
        for pid, started in self.seen.items():
            if started is not None and alive(pid) and start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return killed


@pytest.fixture
def tracker():
    tracker = Tracker()
    yield tracker
    tracker.kill_leftovers()


def models_config(server_port: int, *more, **server) -> str:
    """An HTTP model whose server the daemon starts, a forwarded subprocess model, a per_process one."""
    return config_text(
        {"id": "echo", "type": "http", "url": f"http://127.0.0.1:{server_port}/echo", "timeout": 10,
         "command": [sys.executable, MODEL_SERVER, "--listen", f"tcp:{server_port}:interface=127.0.0.1"],
         "health_path": "/health"},
        {"id": "shared", "type": "subprocess", "protocol": "raw", "workers": 2, "timeout": 10,
         "command": [sys.executable, RAW_MODEL, SHARED_TAG]},
        {"id": "own", "type": "subprocess", "protocol": "raw", "workers": 1, "timeout": 10, "per_process": True,
         "command": [sys.executable, RAW_MODEL, OWN_TAG]},
        *more,
        **server,
    )


def start_multi(directory, *more, tracker=None, **server) -> Multi:
    """The daemon (models_config and C{more}) with two processes, once every process runs its models."""
    server_port = free_port()
    path = write(directory / "multi.toml", models_config(server_port, *more, **server))
    daemon = Multi(path, state=str(directory / "state"), processes=2, cwd=str(directory))
    try:
        daemon.server_port = server_port
        if tracker is not None:
            tracker.add([daemon.pid])
        (worker,) = daemon.wait_workers(1)
        daemon.wait_tagged(daemon.pid, SHARED_TAG, 2)
        daemon.wait_tagged(daemon.pid, OWN_TAG, 1)
        daemon.wait_tagged(worker, OWN_TAG, 1)
        wait_until(lambda: daemon.predict("echo", {"x": 1}).status == 200, 15, "the HTTP model server to answer")
        if tracker is not None:
            tracker.add(descendants(daemon.pid))
    except BaseException:
        daemon.stop()
        raise
    return daemon


# A model that fails at start (one crash is enough): the primary says it has failed.
# Its next try is a minute away (max_backoff): failed for as long as the tests look at it.
FAILED_MODEL = {"id": "dead", "type": "subprocess", "command": [sys.executable, "-c", "import sys; sys.exit(3)"],
                "restart_backoff": 0.05, "max_backoff": 60, "max_restarts": 1, "min_uptime": 10}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One daemon with two processes for the tests that leave it as they found it."""
    tracker = Tracker()
    daemon = start_multi(tmp_path_factory.mktemp("pair"), FAILED_MODEL, tracker=tracker,
                         allowed_commands=[sys.executable])
    try:
        yield daemon
    finally:
        for pid in [daemon.pid, *daemon.workers()]:
            os.kill(pid, signal.SIGCONT)
        daemon.stop()
        tracker.kill_leftovers()
    daemon.assert_no_bug_logged()


def fresh_statuses(daemon, model_id: str, count: int = 20) -> list[int]:
    """Predict C{count} times, each on a new connection."""
    return [daemon.predict(model_id, {"numbers": [1]}).status for _ in range(count)]


# --- 1. the processes ---------------------------------------------------------------------------------


def test_the_primary_alone_listens_and_the_worker_is_handed_connections(pair):
    worker = pair.worker()
    assert parent_of(worker) == pair.pid
    assert TWISTD_MARK in " ".join(cmdline(worker))

    inodes = listening_inodes(pair.port)
    assert len(inodes) == 1
    holders = {pid for pid in {pair.pid} | descendants(pair.pid) if inodes & socket_inodes(pid)}
    assert holders == {pair.pid}
    assert "aibackend worker 1 is handed connections on http://127.0.0.1:" in pair.output


def test_subprocess_models_run_once_unless_per_process(pair):
    worker = pair.worker()

    # The shared model's two processes are the primary's children only; the per_process
    # model has its one process in each reactor process.
    assert len(pair.tagged(pair.pid, SHARED_TAG)) == 2
    assert with_mark(descendants(worker), SHARED_TAG) == set()
    assert len(pair.tagged(pair.pid, OWN_TAG)) == 1
    assert len(pair.tagged(worker, OWN_TAG)) == 1
    # The HTTP model's server is started once, by the primary.
    assert len(with_mark(children(pair.pid), MODEL_SERVER)) == 1
    assert with_mark(descendants(worker), MODEL_SERVER) == set()


# --- 2. both processes serve ------------------------------------------------------------------------------


def _ask(connection, method: str, path: str, body=None):
    connection.request(method, path, body=None if body is None else json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_the_worker_serves_its_connections_while_the_primary_is_stopped(pair):
    connection = pair.connection_to(pair.worker())  # (new connections wait for the primary, which accepts them)
    with pair.primary_stopped():
        try:
            replies = [_ask(connection, "POST", "/post/predict?id=echo", {"n": n}) for n in range(20)]
            own = [_ask(connection, "POST", "/post/predict?id=own", {"numbers": [n, 1]}) for n in range(5)]
            status = _ask(connection, "GET", "/get/status?id=shared")
        finally:
            connection.close()

    assert [(code, body["echo"]) for code, body in replies] == [(200, {"n": n}) for n in range(20)], replies
    assert own == [(200, {"sum": n + 1, "count": 2}) for n in range(5)]
    assert status[1]["served_by"] == "the primary process"


def test_fresh_connections_spread_over_both_processes(pair):
    wait_until(lambda: "worker 1 is handed connections" in pair.output, 15, "the worker to listen")
    counts = fresh_connection_counts(pair.port, 60)

    assert set(counts) == {"primary", "worker-1"}, counts
    # Each goes to the process with the fewest open, in turn when even. A connection's end
    # is seen a moment after its client closed it (by the worker, which then says so to the
    # primary), so the next one, opened at once, may find either process still holding it:
    # one connection after another is a race (a run had 46 and 14), not an even split.
    # Connections kept open (the next test, a benchmark's) are split within one.
    assert min(counts.values()) >= 10, counts


def test_connections_opened_at_once_spread_over_both_processes(pair):
    # A benchmark's clients connect all at once, then keep their connections: on one shared
    # socket, the process that woke first took the whole burst.
    wait_until(lambda: "worker 1 is handed connections" in pair.output, 15, "the worker to listen")
    connections = [socket.create_connection(("127.0.0.1", pair.port), timeout=10) for _ in range(32)]
    try:
        for connection in connections:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = []
        for connection in connections:
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
            answers.append(b"".join(chunks).decode())
    finally:
        for connection in connections:
            connection.close()

    assert all(answer.startswith("HTTP/1.1 200") for answer in answers), [a[:100] for a in answers]
    by_process = [process_of(answer) for answer in answers]
    # Each to the process with the fewest open: 16 each (with SO_REUSEPORT, the kernel's
    # hash gave 16 +- 2.8).
    assert abs(by_process.count("primary") - by_process.count("worker-1")) <= 1, by_process


def test_a_burst_is_split_within_one_over_three_processes(tmp_path, tracker):
    # Connections opened at once and kept (a benchmark's): each process answers its share of
    # them, counted through what each connection's /metrics says (aibackend_process_info).
    path = write(tmp_path / "plain.toml", config_text())
    daemon = Multi(path, state=str(tmp_path / "state"), processes=3, cwd=str(tmp_path))
    tracker.add([daemon.pid])
    try:
        tracker.add(daemon.wait_workers(2))
        wait_until(lambda: all(f"worker {n} is handed connections" in daemon.output for n in (1, 2)), 15,
                   "the workers to listen")
        connections = [http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10) for _ in range(31)]
        for connection in connections:
            connection.connect()
        by_process = []
        for _ in range(2):  # twice on each: a connection stays with its process
            for connection in connections:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                by_process.append(process_of(response.read().decode()))
        for connection in connections:
            connection.close()
    finally:
        daemon.stop()

    assert by_process[:31] == by_process[31:]
    counts = sorted(by_process[:31].count(name) for name in ("primary", "worker-1", "worker-2"))
    assert counts == [10, 10, 11], by_process


def test_each_process_says_who_it_is_in_its_metrics(pair):
    for pid, name in ((pair.pid, "primary"), (pair.worker(), "worker-1")):
        reply = pair.request_to(pid, "GET", "/metrics")
        assert reply.status == 200, reply
        assert process_info(reply) == {"process": name, "pid": str(pid)}


def test_new_connections_wait_for_a_stopped_primary(pair):
    # The price of one process placing every connection: while the primary is stopped (or
    # hung), the new connections wait in its socket's queue, served once it runs again.
    own = listening_inodes(pair.port)
    results = []

    def ask(n):
        results.append(pair.predict("echo", {"n": n}, timeout=30).status)

    askers = [threading.Thread(target=ask, args=(n,), daemon=True) for n in range(16)]
    with pair.primary_stopped():
        for asker in askers:
            asker.start()
        wait_until(lambda: waiting_to_be_accepted(own) > 0, 10, "a connection to wait in the primary's queue")
    for asker in askers:
        asker.join(20)

    assert results == [200] * 16, results


def test_both_processes_answer_fresh_connections(pair):
    seen = set()
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        reply = pair.status("shared")
        assert reply.status == 200, reply
        seen.add(reply.json().get("served_by", "itself"))
    assert seen == {"the primary process", "itself"}


def test_a_forwarded_model_answers_from_every_connection(pair):
    answers = [pair.predict("shared", {"numbers": [n, 1]}) for n in range(40)]

    assert [(reply.status, reply.json()) for reply in answers] == [(200, {"sum": n + 1, "count": 2})
                                                                    for n in range(40)]


def test_the_worker_forwards_a_subprocess_model_to_the_primary(pair):
    reply = pair.request_to(pair.worker(), "POST", "/post/predict?id=shared", {"numbers": [2, 3]},
                            {"X-Request-Id": "through-the-worker"})

    assert reply.status == 200, reply
    assert reply.json() == {"sum": 5, "count": 2}
    assert reply.headers["x-request-id"] == "through-the-worker"


def test_a_request_the_worker_took_waits_for_a_stopped_primary(pair):
    result = {}
    connection = pair.connection_to(pair.worker())

    def ask():
        result["reply"] = _ask(connection, "POST", "/post/predict?id=shared", {"numbers": [2, 3]})

    asking = threading.Thread(target=ask, daemon=True)
    try:
        with pair.primary_stopped():
            asking.start()
            time.sleep(0.5)
            assert "reply" not in result  # the worker took it and waits for the primary
        asking.join(15)
    finally:
        connection.close()

    assert result["reply"] == (200, {"sum": 5, "count": 2}), result


# --- 3. one registry ----------------------------------------------------------------------------------------


def test_an_http_model_added_and_removed_is_seen_by_every_process(pair):
    url = f"http://127.0.0.1:{pair.server_port}/echo"
    added = pair.request("POST", f"/post/addmodel?id=rt-http&type=http&url={url}&timeout=5")
    assert added.status == 201, added
    assert fresh_statuses(pair, "rt-http") == [200] * 20

    removed = pair.request("POST", "/post/removemodel?id=rt-http")
    assert removed.status == 200, removed
    assert fresh_statuses(pair, "rt-http") == [404] * 20


@pytest.mark.parametrize("through", ["worker", "primary"])
def test_a_change_made_through_either_process_is_followed_by_both(pair, through):
    pid = pair.worker() if through == "worker" else pair.pid
    model_id = f"via-{through}"
    url = f"http://127.0.0.1:{pair.server_port}/echo"

    added = pair.request_to(pid, "POST", f"/post/addmodel?id={model_id}&type=http&url={url}")
    assert added.status == 201, added
    assert fresh_statuses(pair, model_id) == [200] * 20

    removed = pair.request_to(pid, "POST", f"/post/removemodel?id={model_id}")
    assert removed.status == 200, removed
    assert fresh_statuses(pair, model_id) == [404] * 20


def test_the_primary_answers_a_change_only_once_the_worker_has_followed_it(pair):
    url = f"http://127.0.0.1:{pair.server_port}/echo"
    connection = pair.connection_to(pair.pid)
    result = {}

    def add():
        connection.request("POST", f"/post/addmodel?id=waited&type=http&url={url}")
        result["status"] = connection.getresponse().status

    asking = threading.Thread(target=add, daemon=True)
    try:
        with pids_stopped([pair.worker()]):
            asking.start()
            time.sleep(1)
            assert "status" not in result  # the primary waits for the stopped worker
        asking.join(10)
    finally:
        connection.close()

    assert result["status"] == 201, result
    assert fresh_statuses(pair, "waited") == [200] * 20
    assert pair.request("POST", "/post/removemodel?id=waited").status == 200
    assert fresh_statuses(pair, "waited") == [404] * 20
    assert "did not follow" not in pair.output


def test_runtime_subprocess_models_run_once_unless_per_process(pair):
    worker = pair.worker()
    shared_tag, own_tag = "tag-runtime-shared", "tag-runtime-own"
    added = pair.request("POST", "/post/addmodel", {
        "id": "rt-shared", "type": "subprocess", "protocol": "raw", "workers": 2,
        "command": [sys.executable, RAW_MODEL, shared_tag]})
    assert added.status == 201, added
    added = pair.request("POST", "/post/addmodel", {
        "id": "rt-own", "type": "subprocess", "protocol": "raw", "workers": 1, "per_process": True,
        "command": [sys.executable, RAW_MODEL, own_tag]})
    assert added.status == 201, added

    assert fresh_statuses(pair, "rt-shared") == [200] * 20
    assert fresh_statuses(pair, "rt-own") == [200] * 20
    shared = pair.wait_tagged(pair.pid, shared_tag, 2)
    own = pair.wait_tagged(pair.pid, own_tag, 1) | pair.wait_tagged(worker, own_tag, 1)
    assert with_mark(descendants(worker), shared_tag) == set()

    for model_id in ("rt-shared", "rt-own"):
        removed = pair.request("POST", f"/post/removemodel?id={model_id}")
        assert removed.status == 200, removed
    assert fresh_statuses(pair, "rt-shared") == [404] * 20
    assert fresh_statuses(pair, "rt-own") == [404] * 20
    wait_until(lambda: not any(alive(pid) for pid in shared | own), 10, "the removed models' processes to end")


def test_a_refused_change_through_the_worker_is_the_primarys_answer(pair):
    worker = pair.worker()
    url = f"http://127.0.0.1:{pair.server_port}/echo"

    exists = pair.request_to(worker, "POST", f"/post/addmodel?id=echo&type=http&url={url}",
                             headers={"X-Request-Id": "dup-1"})
    shell = pair.request_to(worker, "POST", "/post/addmodel",
                            {"id": "sh", "type": "subprocess", "command": ["/bin/sh", "-c", "cat"]})

    assert exists.error(409, "conflict")["request_id"] == "dup-1"
    assert "not in allowed_commands" in shell.json()["error"]["message"]
    assert shell.status == 403
    assert fresh_statuses(pair, "sh", 5) == [404] * 5


def test_an_error_through_the_worker_has_one_request_id(pair):
    url = f"http://127.0.0.1:{pair.server_port}/echo"

    exists = pair.request_to(pair.worker(), "POST", f"/post/addmodel?id=echo&type=http&url={url}")

    exists.error(409, "conflict")  # asserts the body's request_id is the X-Request-Id


def test_v2_unload_and_load_through_the_worker(pair):
    worker = pair.worker()
    before = pair.tagged(pair.pid, SHARED_TAG)

    unloaded = pair.request_to(worker, "POST", "/v2/repository/models/shared/unload", {})
    assert unloaded.status == 200, unloaded
    assert fresh_statuses(pair, "shared") == [404] * 20
    index = pair.request_to(worker, "POST", "/v2/repository/index", {})
    assert {"name": "shared", "state": "UNAVAILABLE", "reason": "unloaded"}.items() <= \
        next(entry for entry in index.json() if entry["name"] == "shared").items()

    loaded = pair.request_to(worker, "POST", "/v2/repository/models/shared/load", {})
    assert loaded.status == 200, loaded
    assert fresh_statuses(pair, "shared") == [200] * 20
    after = pair.wait_tagged(pair.pid, SHARED_TAG, 2)
    assert not after & before
    assert with_mark(descendants(worker), SHARED_TAG) == set()


# --- a model the primary runs, as a worker shows it ----------------------------------------------------------


def test_the_primary_answers_503_with_retry_after_for_its_failed_model(pair):
    reply = pair.request_to(pair.pid, "POST", "/post/predict?id=dead", {})
    ready = pair.request_to(pair.pid, "GET", "/v2/models/dead/ready")

    reply.error(503, "model_unavailable")
    assert 1 <= int(reply.headers.get("retry-after")) <= 60  # until its next try
    assert ready.status == 503, ready


def test_the_worker_relays_retry_after_for_a_forwarded_failed_model(pair):
    reply = pair.request_to(pair.worker(), "POST", "/post/predict?id=dead", {})

    assert reply.status == 503, reply
    assert 1 <= int(reply.headers.get("retry-after")) <= 60  # until its next try


def test_the_worker_says_a_failed_forwarded_model_is_not_ready(pair):
    ready = pair.request_to(pair.worker(), "GET", "/v2/models/dead/ready")

    assert ready.status == 503, ready


def test_the_worker_shows_a_forwarded_models_own_spec(pair):
    status = pair.request_to(pair.worker(), "GET", "/get/status?id=shared")

    assert status.status == 200, status
    assert status.json()["spec"]["type"] == "subprocess", status.json()["spec"]


# --- 4-6. stopping, and processes that die ---------------------------------------------------------------------


def test_sigterm_ends_the_primary_the_worker_and_every_model_process(tmp_path, tracker):
    daemon = start_multi(tmp_path, tracker=tracker)
    everything = descendants(daemon.pid)
    worker = daemon.worker()
    assert len(everything) >= 6  # the worker, 2 shared, 2 own (one each), the HTTP model server

    daemon.process.popen.send_signal(signal.SIGTERM)
    status = daemon.process.wait_exit(15)

    assert status in (0, -signal.SIGTERM), daemon.output
    assert reaped(worker)
    wait_until(lambda: not any(alive(pid) for pid in everything), 10,
               f"every process to end (left: {[p for p in everything if alive(p)]})")
    daemon.assert_no_bug_logged()


def test_sigterm_lets_the_worker_finish_its_requests(tmp_path, tracker):
    slow = write(tmp_path / "slow.py", SLOW)
    daemon = start_multi(
        tmp_path,
        {"id": "slow-own", "type": "subprocess", "command": [sys.executable, slow, "1.5"], "per_process": True},
        {"id": "slow-shared", "type": "subprocess", "command": [sys.executable, slow, "1.5"]},
        tracker=tracker)
    worker = daemon.worker()
    results = {}

    def ask(model_id, connection):
        connection.request("POST", f"/post/predict?id={model_id}", body=b"{}")
        response = connection.getresponse()
        results[model_id] = (response.status, response.read())

    askers = [threading.Thread(target=ask, args=(model_id, daemon.connection_to(worker)), daemon=True)
              for model_id in ("slow-own", "slow-shared")]
    for asker in askers:
        asker.start()
    time.sleep(0.5)  # both in flight in the worker
    daemon.process.popen.send_signal(signal.SIGTERM)
    for asker in askers:
        asker.join(15)
    status = daemon.process.wait_exit(15)

    assert {model_id: code for model_id, (code, _) in results.items()} == {"slow-own": 200, "slow-shared": 200}, \
        (results, daemon.output[-3000:])
    assert status in (0, -signal.SIGTERM), daemon.output


def test_a_killed_worker_is_replaced_and_the_new_one_serves(tmp_path, tracker):
    daemon = start_multi(tmp_path, tracker=tracker)
    try:
        old = daemon.worker()
        old_models = daemon.tagged(old, OWN_TAG)
        assert listening_inodes(daemon.port) & socket_inodes(old) == set()
        # Killed once it is handed connections (it said it listens), so that the second
        # "handed connections" below is its replacement's.
        wait_until(lambda: daemon.output.count("aibackend worker 1 is handed connections") == 1, 10,
                   "the worker to be handed connections")

        os.kill(old, signal.SIGKILL)
        wait_until(lambda: old not in daemon.workers(), 8, "the primary to reap the killed worker")
        # Until another worker listens, the primary serves every connection: nothing waits.
        answered = [daemon.predict("echo", {"n": n}, timeout=5).status for n in range(10)]
        (new,) = daemon.wait_workers(1, timeout=8, exclude={old})
        tracker.add([new])
        assert not alive(old)
        daemon.wait_tagged(new, OWN_TAG, 1)
        tracker.add(descendants(new))
        wait_until(lambda: not any(alive(pid) for pid in old_models), 8, "the old worker's model processes to end")

        assert answered == [200] * 10, answered
        # The new worker is handed connections (it binds nothing) and serves them alone.
        wait_until(lambda: daemon.output.count("aibackend worker 1 is handed connections") == 2, 10,
                   "the new worker to be handed connections")
        assert listening_inodes(daemon.port) & socket_inodes(new) == set()
        connection = daemon.connection_to(new)
        with daemon.primary_stopped():
            try:
                replies = [_ask(connection, "POST", "/post/predict?id=echo", {"n": n}) for n in range(10)]
            finally:
                connection.close()
        assert [code for code, _ in replies] == [200] * 10, replies
        forwarded = daemon.request_to(new, "POST", "/post/predict?id=shared", {"numbers": [4]})
        assert (forwarded.status, forwarded.json()) == (200, {"sum": 4, "count": 1}), forwarded
    finally:
        daemon.terminate()


def test_a_killed_primary_takes_the_worker_and_the_models_with_it(tmp_path, tracker):
    daemon = start_multi(tmp_path, tracker=tracker)
    try:
        everything = descendants(daemon.pid)
        worker = daemon.worker()
        port = daemon.port

        os.kill(daemon.pid, signal.SIGKILL)
        wait_until(lambda: not alive(worker), 8, "the worker to end")
        wait_until(lambda: not any(alive(pid) for pid in everything), 8,
                   f"every process to end (left: {[p for p in everything if alive(p)]})")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        daemon.terminate()


def test_restart_brings_back_a_per_process_model_in_every_process(tmp_path, tracker):
    phoenix = PHOENIX
    flag = tmp_path / "phoenix.flag"
    daemon = start_multi(
        tmp_path,
        {"id": "phoenix", "type": "subprocess", "command": [sys.executable, phoenix, str(flag)], "per_process": True,
         "restart_backoff": 0.05, "max_backoff": 0.1, "max_restarts": 1, "min_uptime": 10},
        tracker=tracker)
    try:
        worker = daemon.worker()
        for pid in (daemon.pid, worker):
            wait_until(lambda: daemon.request_to(pid, "POST", "/post/predict?id=phoenix", {}).status == 503, 10,
                       "the model to fail")
        flag.write_text("")

        restarted = daemon.request("POST", "/post/restart?id=phoenix")
        assert restarted.status == 200, restarted

        for pid in (daemon.pid, worker):
            wait_until(lambda: daemon.request_to(pid, "POST", "/post/predict?id=phoenix", {}).status == 200, 4,
                       f"the model to answer in process {pid}")
    finally:
        daemon.terminate()


# --- 7. start-up ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, wanted", [
    (["--processes", "0"], "--processes must be from 1 to 256, got 0"),
    (["--processes", "x"], "--processes is a number or auto, got 'x'"),
    (["--processes", "2", "--listen", "unix:{tmp}/aibackend.sock"], "--processes shares TCP sockets only"),
])
def test_a_bad_processes_start_is_one_line_and_exit_1(tmp_path, arguments, wanted):
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    listen = [] if "--listen" in arguments else ["--listen", "tcp:0:interface=127.0.0.1"]
    done = run([TWISTD, "--pidfile=", "-n", "aibackend", "--state", str(tmp_path / "state"), *listen, *arguments],
               cwd=str(tmp_path))

    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("aibackend: ") and wanted in lines[0], lines
    assert "Traceback" not in done.stdout + done.stderr


def test_processes_auto_starts_one_process_per_core(tmp_path, tracker):
    path = write(tmp_path / "auto.toml", config_text())
    daemon = Multi(path, state=str(tmp_path / "state"), processes="auto", cwd=str(tmp_path))
    tracker.add([daemon.pid])
    try:
        workers = daemon.wait_workers(max(1, os.cpu_count() or 1) - 1, timeout=15)
        tracker.add(workers)
        ready = daemon.request("GET", "/health/ready")
        assert ready.status == 200, ready
        assert ready.json()["status"] == "ready"
    finally:
        assert daemon.terminate() in (0, -signal.SIGTERM)


# --- 8. without twistd -----------------------------------------------------------------------------------------


def test_parse_processes():
    from aibackend.processes import parse_processes

    assert parse_processes("1") == 1
    assert parse_processes("4") == 4
    assert parse_processes("256") == 256
    assert parse_processes("auto") == max(1, os.cpu_count() or 1)
    for bad in ("0", "-2", "257", "x", "", "2.5"):
        with pytest.raises(ValueError):
            parse_processes(bad)


def test_shared_address_takes_tcp_only():
    from aibackend.listeners import shared_address

    # Parsing a description needs no reactor.
    family, host, port, backlog = shared_address("tcp:8080:interface=127.0.0.1")
    assert (family, host, port) == (socket.AF_INET, "127.0.0.1", 8080)
    assert backlog > 0
    assert shared_address("tcp:8081")[:3] == (socket.AF_INET, "0.0.0.0", 8081)
    assert shared_address("tcp6:8082:interface=\\:\\:1")[:3] == (socket.AF_INET6, "::1", 8082)
    assert shared_address("tcp6:8083")[:3] == (socket.AF_INET6, "::", 8083)
    with pytest.raises(ValueError, match="not tcp"):
        shared_address("unix:/tmp/aibackend.sock")


def _subprocess_model(**fields):
    return {"id": "m", "type": "subprocess", "command": ["/bin/cat"], **fields}


@pytest.mark.parametrize("value", [True, False])
def test_per_process_is_a_boolean(value):
    from aibackend.config import parse_config

    config = parse_config({"models": [_subprocess_model(per_process=value)]}, environ={})
    assert config.models[0].per_process is value
    assert config.models[0].public()["per_process"] is value
    assert parse_config({"models": [_subprocess_model()]}, environ={}).models[0].per_process is False


def test_per_process_that_is_not_a_boolean_is_named_by_key_path():
    from aibackend.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [_subprocess_model(per_process="yes")]}, environ={})
    assert [path for path, message in caught.value.problems] == ["models[0].per_process"]
    assert "must be true or false" in caught.value.problems[0][1]


# --- the primary's supervision of its workers, on a fake reactor -------------------------------


def test_a_worker_inherits_the_sockets_and_is_told_where_the_primary_is(clock):
    reactor, workers = workers_on(clock)

    [(protocol, args, env, child_fds)] = reactor.spawned
    settings = json.loads(env["AIBACKEND_WORKER"])
    assert child_fds == {0: "w", 1: 1, 2: 2, 3: 7, 4: "r"}
    assert settings == {"number": 1, "fds": [[3, int(socket.AF_INET)]], "ack": 4, "primary": 4321,
                        "token": "token"}
    assert args[-2:] == ["-c", "pass"]
    workers.notify("restart m")
    assert protocol.transport.written == [b"restart m\n"]
    workers.stopService()
    end_worker(protocol)


def test_a_change_is_answered_once_every_worker_followed_it(clock):
    reactor, workers = workers_on(clock, count=3)
    first, second = (spawned[0] for spawned in reactor.spawned)

    followed = workers.sync("m")
    assert first.transport.written == second.transport.written == [b"sync 1\n"]
    first.childDataReceived(4, b"synced 1\n")
    assert not followed.called
    second.childDataReceived(4, b"sync")  # lines may come in pieces
    assert not followed.called
    second.childDataReceived(4, b"ed 1\n")

    assert followed.called
    assert clock.getDelayedCalls() == []  # the timeout is cancelled
    workers.stopService()
    end_worker(first), end_worker(second)


def test_a_later_acknowledgement_covers_earlier_changes_and_other_lines_are_ignored(clock):
    reactor, workers = workers_on(clock)
    [(worker, *_)] = reactor.spawned

    one, two = workers.sync("a"), workers.sync("b")
    worker.childDataReceived(4, b"hello\nsynced x\n")
    worker.childDataReceived(1, b"synced 2\n")  # not the ack pipe
    assert not one.called and not two.called
    worker.childDataReceived(4, b"synced 2\n")

    assert one.called and two.called
    workers.stopService()
    end_worker(worker)


def test_a_worker_that_ends_is_not_waited_for(clock, logged_errors):
    reactor, workers = workers_on(clock)
    [(worker, *_)] = reactor.spawned
    followed = workers.sync("m")

    end_worker(worker)

    assert followed.called
    logged_errors.flush()
    workers.stopService()


def test_a_worker_that_does_not_follow_in_time_is_logged_and_the_change_answered(clock):
    from twisted.logger import Logger

    reactor, workers = workers_on(clock)
    [(worker, *_)] = reactor.spawned
    captured_log = []
    workers.log = Logger(observer=captured_log.append)
    followed = workers.sync("slow-model")

    clock.advance(workers.SYNC_TIMEOUT - 0.1)
    assert not followed.called
    clock.advance(0.1)

    assert followed.called
    [warning] = [event for event in captured_log if "did not follow" in event.get("log_format", "")]
    assert warning["numbers"] == "1" and warning["model"] == "slow-model"
    worker.childDataReceived(4, b"synced 1\n")  # late: nothing left to fire
    workers.stopService()
    end_worker(worker)


def test_stopping_answers_changes_still_waited_for(clock):
    reactor, workers = workers_on(clock)
    [(worker, *_)] = reactor.spawned
    followed = workers.sync("m")

    workers.stopService()

    assert followed.called
    end_worker(worker)
    assert [call for call in clock.getDelayedCalls() if call.active()] == []


def test_with_no_worker_running_a_change_is_answered_at_once(clock, logged_errors):
    reactor, workers = workers_on(clock)
    end_worker(reactor.spawned[0][0])

    assert workers.sync("m").called
    logged_errors.flush()
    workers.stopService()


def test_the_control_channel_acknowledges_a_numbered_sync_once_followed():
    from twisted.internet.defer import Deferred
    from twisted.internet.testing import StringTransport

    from aibackend.processes import ControlChannel

    following = []
    channel = ControlChannel(lambda: following.append(Deferred()) or following[-1], reactor=None)
    channel.makeConnection(StringTransport())

    channel.dataReceived(b"sync 7\nsync\n")
    assert len(following) == 2 and channel.transport.value() == b""
    following[0].callback(None)
    following[1].callback(None)  # an unnumbered sync is not acknowledged

    assert channel.transport.value() == b"synced 7\n"


def test_a_change_the_worker_could_not_follow_is_not_acknowledged_and_is_read_again(clock, logged_errors):
    # Saying "synced" after a failed re-read told the primary that the worker followed (a
    # revoked key, say) when it did not: now it says nothing (the primary answers as for a
    # worker that did not follow in time) and reads again until a read succeeds.
    from twisted.internet.defer import fail, succeed
    from twisted.internet.testing import StringTransport

    from aibackend.processes import ControlChannel

    reads = [fail(OSError("store unreadable")), fail(OSError("still unreadable")), fail(OSError("and again")),
             succeed(None)]
    channel = ControlChannel(lambda: reads.pop(0), reactor=None, clock=clock)
    channel.makeConnection(StringTransport())

    channel.dataReceived(b"sync 3\n")
    assert channel.transport.value() == b""
    assert len(logged_errors.flush(OSError)) == 1
    assert [call.getTime() for call in clock.getDelayedCalls()] == [0.25]

    clock.advance(0.25)  # fails again: later
    assert channel.transport.value() == b""
    assert [call.getTime() for call in clock.getDelayedCalls()] == [0.75]
    channel.dataReceived(b"sync 4\n")  # fails too: the one retry stays
    assert [call.getTime() for call in clock.getDelayedCalls()] == [0.75]
    assert len(logged_errors.flush(OSError)) == 2

    clock.advance(0.5)  # read: it covers both changes
    assert channel.transport.value() == b"synced 4\n"
    assert clock.getDelayedCalls() == []


def test_a_read_that_covers_the_change_a_retry_waits_for_cancels_it_and_the_end_cancels_the_rest(clock,
                                                                                                  logged_errors):
    from twisted.internet.defer import fail, succeed
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from aibackend.processes import ControlChannel
    from aibackend.redisstore import StoreUnavailable

    reads = [fail(StoreUnavailable("the shared store is unreachable")), succeed(None),
             fail(OSError("unreadable"))]
    channel = ControlChannel(lambda: reads.pop(0), reactor=None, clock=clock)
    channel.makeConnection(StringTransport())

    channel.dataReceived(b"sync 1\n")  # the store says why: a warning, no traceback
    assert channel.transport.value() == b"" and len(clock.getDelayedCalls()) == 1
    channel.dataReceived(b"sync 2\n")
    assert channel.transport.value() == b"synced 2\n"
    assert clock.getDelayedCalls() == []

    channel.dataReceived(b"sync 3\n")
    assert len(clock.getDelayedCalls()) == 1
    channel.connectionLost(Failure(EOFError()))
    assert clock.getDelayedCalls() == []
    logged_errors.flush(OSError)


def test_a_worker_that_keeps_ending_is_started_again_later_and_later(clock, logged_errors):
    reactor, workers = workers_on(clock)
    delays = []
    for _ in range(7):
        end_worker(reactor.spawned[-1][0])
        delays.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        clock.advance(delays[-1])

    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert len(reactor.spawned) == 8
    logged_errors.flush()
    workers.stopService()
    end_worker(reactor.spawned[-1][0])


def test_a_worker_that_lived_a_while_is_started_again_after_a_second(clock, logged_errors):
    reactor, workers = workers_on(clock)
    end_worker(reactor.spawned[-1][0])
    clock.advance(1)
    end_worker(reactor.spawned[-1][0])
    clock.advance(2)
    clock.advance(60)  # this one runs a minute

    end_worker(reactor.spawned[-1][0])

    assert clock.getDelayedCalls()[0].getTime() - clock.seconds() == 1
    logged_errors.flush()
    workers.stopService()  # a restart still waiting is cancelled
    assert clock.getDelayedCalls() == []


def test_stopping_terms_the_workers_then_kills_one_that_stays(clock):
    reactor, workers = workers_on(clock)
    [(protocol, *_)] = reactor.spawned

    d = workers.stopService()
    assert protocol.transport.signals == ["TERM"]
    clock.advance(40)
    assert protocol.transport.signals == ["TERM", "KILL"]
    assert not d.called
    end_worker(protocol)
    assert d.called


def test_a_worker_that_says_it_listens_is_handed_its_sockets_and_they_come_back_when_it_ends(clock, logged_errors):
    reactor, workers = workers_on(clock)
    [listener] = workers.listeners
    [(first, *_)] = reactor.spawned

    first.childDataReceived(4, b"listen")
    assert listener.handed == []
    first.childDataReceived(4, b"ing\n")
    assert listener.handed == [1]
    end_worker(first)
    assert listener.taken == [1]

    clock.advance(1)
    [_, (second, *_)] = reactor.spawned
    first.childDataReceived(4, b"listening\n")  # the old one's late line: not the worker running now
    assert listener.handed == [1]
    second.childDataReceived(4, b"listening\n")
    assert listener.handed == [1, 1]
    logged_errors.flush()
    workers.stopService()
    end_worker(second)


# --- SO_REUSEPORT: who may share the port -----------------------------------------------------------


@pytest.mark.parametrize("reuseport", [True, False], ids=["held-with-so-reuseport", "held-without"])
def test_a_port_another_process_listens_on_is_refused_in_one_line(tmp_path, reuseport):
    # A program of the same user that listens with SO_REUSEPORT would let the daemon's sockets
    # join its group (and take a share of its connections): the daemon refuses the port.
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    port = other.getsockname()[1]
    try:
        done = run([TWISTD, "--pidfile=", "-n", "aibackend", "--state", str(tmp_path / "state"), "--processes", "2",
                    "--listen", f"tcp:{port}:interface=127.0.0.1"], cwd=str(tmp_path))
    finally:
        other.close()

    assert done.returncode == 1, (done.stdout, done.stderr)
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    complaints = [line for line in output.splitlines() if f"tcp:{port}:" in line]
    assert len(complaints) == 1, output
    assert complaints[0].endswith(f"aibackend: cannot listen on 'tcp:{port}:interface=127.0.0.1': [Errno 98] "
                                  "Address already in use"), complaints


def test_sigterm_answers_the_connections_waiting_in_the_primarys_queue(tmp_path, tracker):
    # On stop the primary accepts (and serves) what waits in its socket's queue before it
    # closes it (closing a listening socket resets them): here connections wait in the
    # stopped primary's queue when it is told to stop.
    path = write(tmp_path / "plain.toml", config_text())
    daemon = Multi(path, state=str(tmp_path / "state"), processes=2, cwd=str(tmp_path))
    tracker.add([daemon.pid])
    try:
        worker = next(iter(daemon.wait_workers(1)))
        tracker.add([worker])
        own = listening_inodes(daemon.port) - socket_inodes(worker)
        wait_until(lambda: "worker 1 is handed connections" in daemon.output, 15, "the worker to listen")
        with daemon.primary_stopped():
            waiting = []
            while waiting_to_be_accepted(own) < 3 and len(waiting) < 200:
                sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=15)
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                waiting.append(sock)
            assert waiting_to_be_accepted(own) >= 3
            daemon.process.popen.send_signal(signal.SIGTERM)
        answers = []
        for sock in waiting:
            try:
                answers.append(sock.recv(100).split(b"\r\n")[0])
            except OSError as e:  # a reset
                answers.append(repr(e).encode())
            finally:
                sock.close()
        status = daemon.process.wait_exit(15)
    finally:
        daemon.terminate()

    assert all(answer.startswith(b"HTTP/1.1 ") for answer in answers), answers
    assert status in (0, -signal.SIGTERM), daemon.output


# --- TLS ---------------------------------------------------------------------------------------


def test_a_tls_address_is_shared_too_and_each_process_serves_it_in_tls(tmp_path, tracker):
    import shutil
    import ssl

    pytest.importorskip("OpenSSL")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                "-days", "1", "-subj", "/CN=localhost"], cwd=str(tmp_path))
    assert made.returncode == 0, made.stderr
    path = write(tmp_path / "tls.toml", config_text())
    daemon = Multi(path, state=str(tmp_path / "state"), processes=2, cwd=str(tmp_path),
                   listen=f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1")
    tracker.add([daemon.pid])
    try:
        tracker.add(daemon.wait_workers(1))
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        seen = {}
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            connection = http.client.HTTPSConnection("127.0.0.1", daemon.port, timeout=10, context=context)
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read().decode()
            finally:
                connection.close()
            assert response.status == 200, body[:300]
            seen[process_of(body)] = seen.get(process_of(body), 0) + 1
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as plain:
            plain.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            plain.settimeout(5)
            try:
                answer = plain.recv(100)
            except OSError:
                answer = b""
    finally:
        assert daemon.terminate() in (0, -signal.SIGTERM)

    assert set(seen) == {"primary", "worker-1"}, seen
    assert not answer.startswith(b"HTTP/1.1"), answer  # not served in the clear
