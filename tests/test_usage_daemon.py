"""
Usage in the real daemon: requests to real example models, then /get/usage (admin only)
shows them per model, and /metrics sums them; the usage is still there after a restart;
with --processes 2 one query sees what both processes served.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aibackend.testing import MISBEHAVE, ROOT, Daemon, Multi, config_text, wait_until, write

ADMIN = "an-admin-token-for-the-usage-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ADDER = {"id": "adder", "type": "subprocess", "protocol": "raw", "workers": 1, "timeout": 10,
         "command": [sys.executable, os.path.join(ROOT, "examples", "raw_model.py")]}
WORDSTATS = {"id": "wordstats", "type": "subprocess", "protocol": "jsonl", "workers": 1, "timeout": 10,
             "command": [sys.executable, os.path.join(ROOT, "examples", "worker_model.py")]}


def usage(daemon, query: str = "") -> dict:
    reply = daemon.request("GET", f"/get/usage{query}", headers=AUTH)
    assert reply.status == 200, reply
    return {row["model"]: row for row in reply.json()["usage"]}


def test_usage_per_model_kept_across_a_restart(tmp_path):
    path = write(tmp_path / "usage.toml", config_text(ADDER, WORDSTATS, usage=True))
    state = tmp_path / "state"
    daemon = Daemon(path, state=str(state), cwd=str(tmp_path), admin_token=ADMIN)
    try:
        for numbers in ([1, 2], [3], []):
            assert daemon.predict("adder", {"numbers": numbers}).status == 200
        assert daemon.predict("wordstats", {"text": "to be or not to be"}).status == 200
        assert daemon.predict("wordstats", {"words": 1}).status == 400  # the model's own error
        assert daemon.predict("nosuchmodel", {}).status == 404  # no model: not any model's usage

        # Admin only.
        assert daemon.request("GET", "/get/usage").status == 401
        found = usage(daemon)
        assert set(found) == {"adder", "wordstats"}
        adder, wordstats = found["adder"], found["wordstats"]
        assert (adder["key"], adder["requests"], adder["ok"], adder["client_errors"]) == ("-", 3, 3, 0)
        assert (wordstats["requests"], wordstats["ok"], wordstats["client_errors"]) == (2, 1, 1)
        assert 0 < adder["latency_ms_mean"] <= adder["latency_ms_max"] < 10_000
        assert usage(daemon, "?model=adder&group=minute")["adder"]["minute"].endswith(":00Z")
        assert usage(daemon, "?since=2000-01-01T00:00:00Z&until=2000-01-02T00:00:00Z") == {}
        bad = daemon.request("GET", "/get/usage?since=yesterday", headers=AUTH)
        assert bad.status == 400 and bad.json()["error"]["message"] == (
            "since must be seconds since the epoch or an ISO 8601 time, got 'yesterday'")

        samples = daemon.scrape()[2]
        assert ("aibackend_usage_requests_total", {"key": "-", "model": "adder", "outcome": "ok"}, 3.0) in samples
        assert ("aibackend_usage_requests_total",
                {"key": "-", "model": "wordstats", "outcome": "client_error"}, 1.0) in samples
        assert stat_mode(state / "usage.sqlite3") == 0o600
        assert daemon.terminate() in (0, -signal.SIGTERM)
        daemon.assert_no_bug_logged()
    finally:
        daemon.stop()

    again = Daemon(path, state=str(state), cwd=str(tmp_path), admin_token=ADMIN)
    try:
        found = usage(again)
        assert (found["adder"]["requests"], found["wordstats"]["requests"]) == (3, 2)
        # The metrics are this process's: they start again from nothing.
        assert not [sample for sample in again.scrape()[2] if sample[0] == "aibackend_usage_requests_total"]
    finally:
        again.stop()


def test_a_request_drained_on_stop_is_recorded(tmp_path):
    """SIGTERM while a request is in progress: it is answered during the drain, and its usage written."""
    slow = {"id": "slow", "type": "subprocess", "protocol": "raw", "workers": 1, "timeout": 10,
            "command": [sys.executable, MISBEHAVE]}
    path = write(tmp_path / "usage.toml", config_text(slow, usage=True))
    state, mark = tmp_path / "state", tmp_path / "mark"
    daemon = Daemon(path, state=str(state), cwd=str(tmp_path), admin_token=ADMIN)
    try:
        daemon.wait_state("slow", "ready")
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(daemon.predict, "slow", {"op": "sleep", "seconds": 1.5, "mark": str(mark)})
            wait_until(mark.exists, 10, "the model to take the request")
            daemon.send_signal(signal.SIGTERM)
            assert answer.result(timeout=15).status == 200
        assert daemon.wait(15) in (0, -signal.SIGTERM)
    finally:
        daemon.stop()
    again = Daemon(path, state=str(state), cwd=str(tmp_path), admin_token=ADMIN)
    try:
        assert usage(again)["slow"]["requests"] == 1
    finally:
        again.stop()


def stat_mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_without_keys_or_usage_true_no_usage_is_recorded(start_daemon):
    daemon = start_daemon(ADDER)
    assert daemon.predict("adder", {"numbers": [1]}).status == 200
    reply = daemon.request("GET", "/get/usage")
    assert reply.status == 404
    assert reply.json()["error"]["message"] == "this daemon records no usage: set usage = true in [server]"
    assert not [sample for sample in daemon.scrape()[2] if sample[0].startswith("aibackend_usage")]


@pytest.mark.parametrize("per_process", [True, False], ids=["per-process", "forwarded"])
def test_with_two_processes_one_query_sees_both(tmp_path, per_process):
    """
    Each process writes its own requests into the one database. A model forwarded to the
    primary (not per_process) is counted once: by the worker that took the request.
    """
    path = write(tmp_path / "usage.toml", config_text({**ADDER, "per_process": per_process}, usage=True))
    daemon = Multi(path, state=str(tmp_path / "state"), processes=2, cwd=str(tmp_path), admin_token=ADMIN)
    try:
        (worker,) = daemon.wait_workers(1)
        sent, ok = {}, 0
        for pid in (daemon.pid, worker):
            connection = daemon.connection_to(pid)
            served = 0
            while served < 3:  # each process serves 3 (after a 503 or two while its model starts)
                connection.request("POST", "/post/predict?id=adder", b'{"numbers": [1, 2]}',
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                sent[pid] = sent.get(pid, 0) + 1
                served += response.status == 200
                assert sent[pid] < 100, response.status
            ok += served
            connection.close()

        # The other process writes its own within a second of its requests.
        def both():
            found = usage(daemon).get("adder", {})
            return found.get("requests") == sum(sent.values()) and found.get("ok") == ok

        wait_until(both, 10, f"the usage of both processes ({sent} sent, {ok} answered)")
        # Each process's metrics count what it took (settled before it answered): a
        # forwarded request is not counted again by the primary that served it.
        for pid, count in sent.items():
            assert usage_metric(daemon, pid) == count, (pid, sent)
    finally:
        daemon.stop()


def usage_metric(daemon, pid: int) -> float:
    """The requests to adder that process C{pid}'s /metrics count."""
    connection = daemon.connection_to(pid)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    assert f'pid="{pid}"' in text  # aibackend_process_info: that process answered
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "aibackend_usage_requests_total" and sample.labels["model"] == "adder")
