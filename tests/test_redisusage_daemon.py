"""
A fleet's usage in Redis, in real daemons: two daemons (one with C{--processes 2}) on one
real redis-server of the module's own (C{--store redis://...}, C{usage = true}), requests
to a real example model on each process; C{/get/usage} on any daemon, and on the worker,
shows them all. Redis stopped mid-test: the daemons serve, C{/get/usage} answers 503
C{store_unavailable}; once Redis is back, nothing acknowledged before is lost, and what
was served meanwhile is written too. Each process's C{/metrics} counts its own.
"""

from __future__ import annotations

import os
import sys

import pytest

from aibackend.testing import ROOT, config_text, start_fleet, stop_fleet, wait_until, write

ADDER = {"id": "adder", "type": "subprocess", "protocol": "raw", "workers": 1, "timeout": 10,
         "command": [sys.executable, os.path.join(ROOT, "examples", "raw_model.py")]}


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    config = write(tmp_path_factory.mktemp("config") / "usage.toml", config_text(ADDER, usage=True))
    daemons = start_fleet(redis_server.url, tmp_path_factory.mktemp, names="ab", multi="b", config=config)
    yield daemons
    stop_fleet(daemons)


def served(call) -> tuple[int, int]:
    """C{call()} until it answers 200 (503s while the model starts): (requests sent, 1)."""
    for sent in range(1, 200):
        reply = call()
        if reply.status == 200:
            return sent, 1
        assert reply.status == 503, reply
    raise AssertionError("the model never answered")


def totals(daemon, pid=None) -> dict:
    path = "/get/usage?model=adder"
    reply = daemon.request("GET", path) if pid is None else daemon.request_to(pid, "GET", path)
    assert reply.status == 200, reply
    return reply.json()["totals"]


def requests_to_every_process(a, b) -> tuple[int, int]:
    """Three requests answered by each of the three processes: (sent, answered)."""
    worker = b.wait_workers(1).pop()
    sent = ok = 0
    for call in [lambda: a.predict("adder", {"numbers": [1, 2]})] * 3 + \
            [lambda: b.request_to(b.pid, "POST", "/post/predict?id=adder", {"numbers": [3]})] * 3 + \
            [lambda: b.request_to(worker, "POST", "/post/predict?id=adder", {"numbers": [4]})] * 3:
        more, answered = served(call)
        sent, ok = sent + more, ok + answered
    return sent, ok


def test_get_usage_on_any_daemon_shows_what_every_process_of_the_fleet_served(fleet):
    a, b = fleet
    before = totals(a)["requests"]
    sent, ok = requests_to_every_process(a, b)

    # Each process writes its own rows within a second of its requests.
    wait_until(lambda: totals(a)["requests"] == before + sent, 10, f"the fleet's {sent} requests in a's usage")
    worker = b.wait_workers(1).pop()
    assert totals(b) == totals(a) == totals(b, worker)
    assert totals(a)["ok"] >= ok
    # /metrics stay each process's own: a's counts only what a served.
    assert a.metric("aibackend_usage_requests_total", key="-", model="adder", outcome="ok") < totals(a)["ok"]


def test_a_since_in_the_future_is_a_400(fleet):
    reply = fleet[0].request("GET", "/get/usage?since=2999-01-01T00:00:00Z")
    assert reply.status == 400
    assert reply.json()["error"]["message"].startswith(
        "since (2999-01-01T00:00:00Z) is in the future (the daemon's time is ")


def test_redis_stopped_the_daemons_serve_and_once_it_is_back_nothing_is_lost(fleet, redis_server):
    a, b = fleet
    requests_to_every_process(a, b)
    wait_until(lambda: totals(a) == totals(b), 10, "every process's rows written")
    acknowledged = totals(a)["requests"]  # written: in Redis's append-only file

    redis_server.stop()
    try:
        sent, _ = requests_to_every_process(a, b)  # served all the same; their rows wait in memory
        for daemon in (a, b):
            reply = daemon.request("GET", "/get/usage")
            assert reply.status == 503, reply
            error = reply.json()["error"]
            assert error["type"] == "store_unavailable" and "shared store (Redis)" in error["message"]
            assert reply.headers.get("retry-after") == "1"
    finally:
        redis_server.start()

    # Once Redis answers, the rows that waited are written: nothing acknowledged lost, nothing counted twice.
    wait_until(lambda: totals(a)["requests"] == acknowledged + sent, 15, "the rows that waited, written")
    assert totals(b)["requests"] == acknowledged + sent
