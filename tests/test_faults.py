"""
Fault tests (issue 5, section 6) against the real C{twistd aibackend} daemon, loopback only:
a stalled model, refusing and failing replicas, a flood past the limits, a model killed
mid-request, and SIGTERM under load. Each asserts the statuses, that nothing hangs (every
client call has a timeout), that no request is left without an answer, and that the
daemon then serves normally.

HTTP models are small L{aibackend.testing.ModelServer}s in a thread of this process; a "refusing"
replica is a loopback port that was bound, then closed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibackend.testing import MISBEHAVE, ModelServer, alive, free_port, toml_models

pytestmark = pytest.mark.timeout(15)

SERVER = """
[server]
drain_timeout = 10
"""


# --- loopback model servers ---------------------------------------------------------------


class FaultyModel(ModelServer):
    """A loopback HTTP model answering every POST with C{status}, after C{delay} seconds; counts hits."""

    def __init__(self, status=200, delay=0.0):
        self.status = status
        self.delay = delay
        super().__init__()

    def answer(self, path, headers, body):
        if self.delay:
            time.sleep(self.delay)
        if self.status == 200:
            return 200, {}, json.dumps({"ok": True, "port": self.port, "echo": body.decode()}).encode()
        return self.status, {}, json.dumps({"error": {"message": "model broken"}}).encode()


@pytest.fixture
def model_server():
    """Make L{FaultyModel}s (this module's own C{model_server}: not the example server of conftest)."""
    servers: list[FaultyModel] = []

    def make(**keys) -> FaultyModel:
        server = FaultyModel(**keys)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def refusing_url() -> str:
    """A loopback URL whose port was bound then closed: connecting to it is refused."""
    return f"http://127.0.0.1:{free_port()}/predict"


# --- helpers ------------------------------------------------------------------------------


def status(daemon, model: str) -> dict:
    reply = daemon.request("GET", f"/get/status?id={model}", timeout=5)
    assert reply.status == 200, reply
    return reply.json()


def wait_ready(daemon, model: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        described = status(daemon, model)
        if described["state"] == "ready":
            return described
        if time.monotonic() > deadline:
            raise AssertionError(f"{model} not ready within {timeout} s: {described}\n{daemon.log_text()}")
        time.sleep(0.05)


def timed_predict(daemon, model, payload, timeout=10):
    """(status or the exception, seconds taken, Retry-After) of one request."""
    started = time.monotonic()
    try:
        reply = daemon.predict(model, payload, timeout=timeout)
        return reply.status, time.monotonic() - started, reply.headers.get("Retry-After"), reply
    except Exception as e:  # recorded, asserted on by the caller
        return e, time.monotonic() - started, None, None


def metric(daemon, name: str, model: str) -> float:
    text = daemon.request("GET", "/metrics", timeout=5).body.decode()
    found = re.search(rf'^{re.escape(name)}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$', text, re.M)
    assert found, f"no {name} for {model} in /metrics"
    return float(found.group(1))


def http_model(model_id: str, **keys) -> dict:
    return {"id": model_id, "type": "http", **keys}


def subprocess_model(model_id: str, **keys) -> dict:
    return {"id": model_id, "type": "subprocess", "command": [sys.executable, MISBEHAVE], **keys}


def dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return not alive(pid)  # a zombie counts as dead


# --- 1. a stalled model -------------------------------------------------------------------


def stalled_daemon(start_daemon, model_server):
    stalled = model_server(delay=4)
    healthy = model_server()
    return start_daemon(config_text=SERVER + toml_models(
        http_model("stalled", url=stalled.url, timeout=1),
        http_model("ok", url=healthy.url, timeout=5),
    ))


def test_a_stalled_http_model_fails_within_its_timeout_and_the_daemon_serves_others(
        start_daemon, model_server):
    daemon = stalled_daemon(start_daemon, model_server)

    code, took, _, reply = timed_predict(daemon, "stalled", {"x": 1}, timeout=10)

    assert code == 504, reply
    assert 0.9 <= took < 2.5, took
    for n in range(3):
        code, took, _, reply = timed_predict(daemon, "ok", {"n": n}, timeout=5)
        assert code == 200, reply
        assert reply.json()["ok"] is True
        assert took < 1
    assert status(daemon, "ok")["failures"] == 0


def test_a_stalled_http_model_gets_504(start_daemon, model_server):
    daemon = stalled_daemon(start_daemon, model_server)

    code, took, _, reply = timed_predict(daemon, "stalled", {"x": 1}, timeout=10)

    assert code == 504, reply
    assert reply.json()["error"]["type"] == "gateway_timeout"
    assert 0.9 <= took < 2.5


# --- 2. replicas --------------------------------------------------------------------------


def test_a_refused_request_is_retried_on_a_healthy_replica(start_daemon, model_server):
    healthy = model_server()
    daemon = start_daemon(config_text=SERVER + toml_models(
        http_model("pair", urls=[refusing_url(), healthy.url], timeout=5, connect_timeout=2),
    ))

    results = [timed_predict(daemon, "pair", {"n": n}, timeout=5) for n in range(10)]

    assert [r[0] for r in results] == [200] * 10, results
    assert healthy.hits == 10
    assert all(r[1] < 2 for r in results), results


def test_a_replica_answering_500_is_ejected_after_five_failures(start_daemon, model_server):
    broken = model_server(status=500)
    healthy = model_server()
    daemon = start_daemon(config_text=SERVER + toml_models(
        http_model("pair", urls=[broken.url, healthy.url], eject_after=5, eject_seconds=60, timeout=5),
    ))

    # Ties go to the first replica, so sequential requests reach the broken one first;
    # its 500s are passed through (a 5xx may have reached the model: never sent twice).
    first = [timed_predict(daemon, "pair", {"n": n}, timeout=5) for n in range(5)]
    assert [r[0] for r in first] == [500] * 5, first
    assert broken.hits == 5

    described = status(daemon, "pair")
    by_url = {r["url"]: r for r in described["replicas"]}
    assert by_url[broken.url]["ejections"] >= 1, described
    assert by_url[broken.url]["ejected_for_s"] > 0, described
    assert by_url[healthy.url]["ejections"] == 0, described
    assert metric(daemon, "aibackend_model_ejections_total", "pair") >= 1

    later = [timed_predict(daemon, "pair", {"n": n}, timeout=5) for n in range(10)]
    assert [r[0] for r in later] == [200] * 10, later
    assert broken.hits == 5
    assert healthy.hits == 10


def test_every_replica_refusing_is_a_502(start_daemon):
    daemon = start_daemon(config_text=SERVER + toml_models(
        http_model("nobody", urls=[refusing_url(), refusing_url()], timeout=5, connect_timeout=2),
    ))

    code, took, _, reply = timed_predict(daemon, "nobody", {"x": 1}, timeout=5)

    assert code == 502, reply
    assert reply.json()["error"]["type"] == "bad_gateway"
    assert took < 2


# --- 3. a flood past the limits -----------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_flood_past_the_limits_is_shed_at_once(start_daemon, model_server):
    slow = model_server(delay=2)
    daemon = start_daemon(config_text=SERVER + toml_models(
        http_model("slow", url=slow.url, max_concurrency=2, max_queue=2, timeout=8),
    ))

    barrier = threading.Barrier(12)

    def one(n):
        barrier.wait(5)
        return timed_predict(daemon, "slow", {"n": n}, timeout=10)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))

    codes = sorted(r[0] for r in results)
    assert codes == [200] * 4 + [503] * 8, results
    for code, took, retry_after, reply in results:
        if code == 503:
            # At once: long before the model's first answer (2 s) would free a place. (The
            # bound is loose: the suite runs on several workers of a loaded machine.)
            assert took < 1.0, results
            assert retry_after is not None and int(retry_after) >= 1, reply
            assert reply.json()["error"]["type"] == "model_unavailable"
    assert slow.hits == 4

    code, took, _, reply = timed_predict(daemon, "slow", {"after": True}, timeout=5)
    assert code == 200, reply
    described = status(daemon, "slow")
    assert described["failures"] == 0, described
    assert described["shed"] == 8, described
    assert described["in_flight"] == 0 and described["queued"] == 0, described


# --- 4. a model killed mid-request --------------------------------------------------------


def test_a_subprocess_killed_mid_request_gets_502_and_the_next_request_200(start_daemon):
    daemon = start_daemon(config_text=SERVER + toml_models(
        subprocess_model("victim", workers=1, timeout=10, restart_backoff=0.1),
    ))
    described = wait_ready(daemon, "victim")
    [process] = described["processes"]
    pid = process["pid"]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(timed_predict, daemon, "victim", {"op": "sleep", "seconds": 8}, 12)
        deadline = time.monotonic() + 5
        while status(daemon, "victim")["processes"][0]["in_flight"] != 1:
            assert time.monotonic() < deadline, "the request never reached the process"
            time.sleep(0.02)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code, _, _, reply = pending.result(12)
        answered_after = time.monotonic() - killed_at

    assert code == 502, reply
    assert reply.json()["error"]["type"] == "bad_gateway"
    assert answered_after < 1.5

    described = wait_ready(daemon, "victim", timeout=8)
    assert [p["pid"] for p in described["processes"]] != [pid]
    code, _, _, reply = timed_predict(daemon, "victim", {"op": "echo"}, timeout=5)
    assert code == 200, reply
    assert reply.json()["pid"] != pid


# --- 5. SIGTERM under load ----------------------------------------------------------------


@pytest.mark.timeout(25)
def test_sigterm_under_load_answers_every_request_and_leaves_no_process(start_daemon):
    kill_timeout = 2
    drain = 10
    daemon = start_daemon(config_text=SERVER + toml_models(
        subprocess_model("slow", workers=2, timeout=15, kill_timeout=kill_timeout),
    ))
    pids = [p["pid"] for p in wait_ready(daemon, "slow")["processes"]]
    assert len(pids) == 2

    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(timed_predict, daemon, "slow", {"op": "sleep", "seconds": 1}, 20)
                   for _ in range(8)]
        # Every request is in the daemon (two at the model, six queued) before the signal:
        # one still in the kernel's accept queue when the daemon closes its port is
        # reset, as with any server, and is not what this test is about.
        deadline = time.monotonic() + 5
        while (lambda s: s["in_flight"] + s["queued"])(status(daemon, "slow")) < 8:
            assert time.monotonic() < deadline, "the requests never all reached the daemon"
            time.sleep(0.02)
        signalled = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(drain + kill_timeout + 1)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not exit in time:\n{daemon.log_text()}")
        exited_after = time.monotonic() - signalled
        results = [f.result(5) for f in pending]

    seen = [r[0] if isinstance(r[0], int) else type(r[0]).__name__ for r in results]
    print("SIGTERM under load: statuses", seen, "exit after", round(exited_after, 2), "s")
    # Every request got a clean HTTP answer: no hang, no connection dropped without a status.
    assert all(isinstance(r[0], int) for r in results), (results, daemon.log_text())
    assert set(seen) <= {200, 502, 503}, seen
    assert seen.count(200) >= 2, seen  # at least those in flight were drained
    assert exited_after < drain + kill_timeout + 1
    for pid in pids:
        assert dead(pid), f"model process {pid} still alive"
