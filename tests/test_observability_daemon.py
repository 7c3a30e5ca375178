"""
Observability of the real thing: the real C{twistd aibackend} on a free loopback port,
real model processes (C{tests/models/misbehave.py}), scraped and probed over sockets the
way Prometheus, a Kubernetes probe and a log shipper would.

Plain blocking tests (L{aibackend.testing.Daemon}, http.client); every wait polls with a deadline;
every process started is ended (SIGTERM, then SIGKILL) by its fixture.
"""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from aibackend.testing import Daemon, ModelServer, event_text, free_port, misbehaving, toml_models, wait_until

ALLOWED_LABELS = {"model", "operation", "status_class", "reason", "le"}
MAX_BODY = 1000
ADMIN_TOKEN = "adm1n-T0ken-observability-7c1e5a9b"
MODEL_KEY = "sk-model-key-observability-4d8f2e6a"

pytestmark = pytest.mark.timeout(30)


# --- the daemon -----------------------------------------------------------------------------


@pytest.fixture
def start_daemon(start_daemon):
    """Start daemons with the given config text, this module's body limit, stderr read apart."""

    def start(config_text: str, *extra: str, env=None) -> Daemon:
        return start_daemon(config_text=config_text, extra=("--max-body-bytes", str(MAX_BODY), *extra), env=env,
                            separate_stderr=True)

    return start


@pytest.fixture(scope="module")
def busy_daemon(tmp_path_factory):
    """
    A daemon with a one-worker model (C{slow}) and a model whose process the tests kill
    (C{victim}); no admin token, so admin operations are allowed from loopback.
    """
    directory = tmp_path_factory.mktemp("observed")
    config = directory / "aibackend.toml"
    config.write_text(toml_models(
        misbehaving("slow", workers=1, timeout=10),
        misbehaving("victim", workers=1, timeout=10, restart_backoff=0.1, min_uptime=0),
    ))
    env = dict(os.environ, XDG_STATE_HOME=str(directory / "state"))
    daemon = Daemon(str(config), "--max-body-bytes", str(MAX_BODY), cwd=str(directory), env=env,
                    separate_stderr=True)
    try:
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


# --- /metrics and health on the real daemon -----------------------------------------------


def test_metrics_is_prometheus_text_with_bounded_labels(busy_daemon):
    busy_daemon.predict("slow", {"op": "echo"}, headers={"X-Request-Id": "req-real-label-check"})
    busy_daemon.predict("no+such+model+with+spaces", {})

    content_type, text, samples = busy_daemon.scrape()

    assert content_type == CONTENT_TYPE_PLAIN_0_0_4
    assert "req-real-label-check" not in text
    for name, labels, _ in samples:
        assert set(labels) <= ALLOWED_LABELS, (name, labels)
    assert {labels["model"] for _, labels, _ in samples if "model" in labels} <= {"slow", "victim", "temp"}
    assert busy_daemon.metric("aibackend_models") >= 2


def test_live_and_ready_once_started(busy_daemon):
    status, headers, body = busy_daemon.request("GET", "/health/live")
    assert (status, headers["content-type"], json.loads(body)) == (200, "application/json", {"status": "live"})

    status, headers, body = busy_daemon.request("GET", "/health/ready")
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["status"] == "ready"
    assert answer["models"].get("ready", 0) >= 2


def test_in_flight_and_queued_gauges_of_a_one_worker_model(busy_daemon, tmp_path):
    labels = {"model": "slow", "operation": "predict"}
    ok_before = busy_daemon.metric("aibackend_requests_total", status_class="2xx", **labels) or 0
    count_before = busy_daemon.metric("aibackend_request_duration_seconds_count", **labels) or 0
    sum_before = busy_daemon.metric("aibackend_request_duration_seconds_sum", **labels) or 0
    fast_before = busy_daemon.metric("aibackend_request_duration_seconds_bucket", le="0.5", **labels) or 0
    mark = str(tmp_path / "first.pid")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(busy_daemon.predict, "slow", {"op": "sleep", "seconds": 1, "mark": mark})
        wait_until(lambda: os.path.exists(mark), 5, "the first request to reach the process")
        second = pool.submit(busy_daemon.predict, "slow", {"op": "sleep", "seconds": 1})

        wait_until(lambda: busy_daemon.metric("aibackend_model_queued", model="slow") == 1, 3,
                   "the second request to be queued")
        assert busy_daemon.metric("aibackend_model_in_flight", model="slow") == 1
        replies = [first.result(10), second.result(10)]

    assert [status for status, _, _ in replies] == [200, 200]
    assert busy_daemon.metric("aibackend_model_queued", model="slow") == 0
    assert busy_daemon.metric("aibackend_model_in_flight", model="slow") == 0
    assert busy_daemon.metric("aibackend_requests_total", status_class="2xx", **labels) == ok_before + 2
    assert busy_daemon.metric("aibackend_request_duration_seconds_count", **labels) == count_before + 2
    # One slept a second; the other waited in the queue (for most of that second), then slept one.
    took = busy_daemon.metric("aibackend_request_duration_seconds_sum", **labels) - sum_before
    assert 2.5 <= took < 8, took
    assert busy_daemon.metric("aibackend_request_duration_seconds_bucket", le="0.5", **labels) == fast_before


def test_a_killed_model_process_counts_a_restart(busy_daemon):
    status, _, body = busy_daemon.predict("victim", {"op": "echo"})
    assert status == 200, body
    pid = json.loads(body)["pid"]
    before = busy_daemon.metric("aibackend_model_restarts_total", model="victim")
    assert before is not None
    assert busy_daemon.metric("aibackend_model_processes", model="victim") == 1

    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: busy_daemon.metric("aibackend_model_restarts_total", model="victim") == before + 1, 5,
               "the restart to be counted")

    def answered_by_a_new_process():
        status, _, body = busy_daemon.predict("victim", {"op": "echo"})
        return status == 200 and json.loads(body)["pid"] != pid

    wait_until(answered_by_a_new_process, 5, "a new process to answer")
    assert busy_daemon.metric("aibackend_model_processes", model="victim") == 1
    assert busy_daemon.metric("aibackend_model_ready", model="victim") == 1


def test_a_413_is_counted_as_body_too_large(busy_daemon):
    before = busy_daemon.metric("aibackend_refusals_total", reason="body_too_large")

    status, headers, _ = busy_daemon.request(
        "POST", "/post/predict?id=slow", b'"' + b"a" * (MAX_BODY * 2) + b'"', {"Content-Type": "application/json"}
    )

    assert (status, headers["connection"]) == (413, "close")
    assert busy_daemon.metric("aibackend_refusals_total", reason="body_too_large") == before + 1


def test_open_connections_counts_held_keep_alive_connections(busy_daemon):
    # Each scrape is a connection of its own: alone, the gauge says 1.
    wait_until(lambda: busy_daemon.metric("aibackend_open_connections") == 1, 5, "earlier connections to close")
    held = []
    try:
        for _ in range(3):
            connection = busy_daemon.connect()
            connection.request("GET", "/health/live")
            response = connection.getresponse()
            assert response.status == 200
            response.read()
            assert not response.will_close  # HTTP/1.1 keep-alive: the connection stays open
            held.append(connection)

        assert busy_daemon.metric("aibackend_open_connections") == 1 + 3
    finally:
        for connection in held:
            connection.close()
    wait_until(lambda: busy_daemon.metric("aibackend_open_connections") == 1, 5, "the held connections to close")


def test_a_removed_models_series_disappear(busy_daemon):
    table = {"id": "temp", "type": "http", "url": f"http://127.0.0.1:{free_port()}/predict",
             "timeout": 5, "connect_timeout": 2}
    status, _, body = busy_daemon.request("POST", "/post/addmodel", json.dumps(table).encode(),
                                          {"Content-Type": "application/json"})
    assert status == 201, body
    try:
        status, _, _ = busy_daemon.predict("temp", {})
        assert status == 502
        assert busy_daemon.metric("aibackend_requests_total", model="temp", operation="predict",
                                  status_class="5xx") == 1
        assert busy_daemon.metric("aibackend_model_in_flight", model="temp") == 0
    finally:
        status, _, body = busy_daemon.request("POST", "/post/removemodel?id=temp", b"")
    assert status == 200, body

    _, text, samples = busy_daemon.scrape()
    assert [(name, labels) for name, labels, _ in samples if labels.get("model") == "temp"] == []
    assert "temp" not in text
    assert busy_daemon.metric("aibackend_model_in_flight", model="slow") == 0  # the others' stay


# --- draining -----------------------------------------------------------------------------


def test_readiness_during_shutdown(start_daemon, tmp_path):
    """
    SIGTERM while a 2 s request is in flight: readiness says 503 on a connection opened
    before, the listening port closes (new connections are refused), and the request in
    flight is still answered.
    """
    daemon = start_daemon(toml_models(misbehaving("slow", workers=1, timeout=10)))
    probe = daemon.connect()
    probe.request("GET", "/health/ready")
    first = probe.getresponse()
    assert (first.status, json.loads(first.read())["status"]) == (200, "ready")
    mark = str(tmp_path / "slow.pid")
    kept: list = []  # what /health/ready said on the connection opened before
    new: list = []  # what a new connection got: a status, or "refused"

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(daemon.predict, "slow", {"op": "sleep", "seconds": 2, "mark": mark})
        wait_until(lambda: os.path.exists(mark), 5, "the slow request to reach the process")
        daemon.process.send_signal(signal.SIGTERM)

        def observed():
            try:
                new.append(daemon.request("GET", "/health/ready", timeout=2)[0])
            except ConnectionRefusedError:
                new.append("refused")
            except ConnectionResetError:  # accepted by the kernel, then the listening socket closed
                new.append("reset")
            if 503 not in kept:
                probe.request("GET", "/health/ready")
                response = probe.getresponse()
                body = json.loads(response.read())
                kept.append(response.status)
                if response.status == 503:
                    assert body["status"] == "not ready"
                    assert body["reason"]
            return 503 in kept and new[-1] == "refused"

        wait_until(observed, 1.5, f"readiness to flip (kept connection: {kept}, new connections: {new})")
        reply = slow.result(10)

    probe.close()
    # Once refused, always refused; before that, a connection the kernel had already
    # accepted may have been served, then only with 503, or reset as the port closed.
    refused_from = new.index("refused")
    assert set(new[refused_from:]) == {"refused"} and set(new[:refused_from]) <= {503, "reset"}, new
    print(f"after SIGTERM: kept connection {kept}, new connections {new}")
    assert set(kept) <= {200, 503} and kept[-1] == 503, kept
    assert reply[0] == 200, reply
    assert json.loads(reply[2])["slept"] == 2
    assert daemon.process.wait(10) in (0, -signal.SIGTERM)


# --- logs ---------------------------------------------------------------------------------


class Upstream(ModelServer):
    """An HTTP model that answers {"ok": true} and remembers the Authorization it was sent."""

    seen_authorization: list = []

    def answer(self, path, headers, body):
        Upstream.seen_authorization.append(headers.get("Authorization"))
        return super().answer(path, headers, body)


@pytest.fixture
def upstream():
    Upstream.seen_authorization = []
    server = Upstream()
    try:
        yield server.port
    finally:
        server.close()


def keyed_config(upstream_port: int) -> str:
    return toml_models({
        "id": "keyed",
        "type": "http",
        "url": f"http://127.0.0.1:{upstream_port}/predict",
        "timeout": 5,
        "headers": {"Authorization": "Bearer ${SOME_KEY}"},
    })


def secret_env() -> dict:
    return dict(os.environ, AIBACKEND_ADMIN_TOKEN=ADMIN_TOKEN, SOME_KEY=MODEL_KEY)


def test_json_log_format_writes_one_json_event_a_line_with_access_events(start_daemon, upstream):
    daemon = start_daemon(keyed_config(upstream), "--log-format", "json", env=secret_env())

    status, _, _ = daemon.predict("keyed", {"x": 1}, headers={"X-Request-Id": "json-access-1"})
    assert status == 200

    def access_event():
        for line in list(daemon.stdout):
            event = json.loads(line)
            if event.get("log_namespace") == "aibackend.access" and event.get("request_id") == "json-access-1":
                return event
        return None

    event = wait_until(access_event, 5, "the access event on stdout")
    assert {key: event[key] for key in ("model", "operation", "status", "bytes", "method", "path")} == {
        "model": "keyed", "operation": "predict", "status": 200, "bytes": len(b'{"ok": true}'),
        "method": "POST", "path": "/post/predict",
    }
    assert isinstance(event["latency_ms"], (int, float)) and event["latency_ms"] >= 0
    assert daemon.terminate() in (0, -signal.SIGTERM)
    assert daemon.stdout, "nothing on stdout"
    for line in daemon.stdout:
        assert isinstance(json.loads(line), dict), line
    assert daemon.stderr == []
    assert any("Server Shut Down." in event_text(line) for line in daemon.stdout)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_the_log(start_daemon, upstream, log_format):
    daemon = start_daemon(keyed_config(upstream), "--log-format", log_format, env=secret_env())
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    exchanges = [
        daemon.predict("keyed", {"x": 1}, headers=admin),
        daemon.request("POST", f"/post/predict?id=keyed&token={ADMIN_TOKEN}&key={MODEL_KEY}", b"{}"),
        daemon.request("GET", f"/get/predict?id=keyed&api_key={MODEL_KEY}", headers=admin),
        daemon.request("GET", f"/get/status?id=keyed&token={ADMIN_TOKEN}", headers=admin),
        daemon.request("POST", "/post/cleanlogs?id=keyed", b"", admin),
        daemon.request("POST", f"/post/cleanlogs?id=keyed&token={ADMIN_TOKEN}", b""),
        daemon.request("POST", f"/post/nothing?id={ADMIN_TOKEN}", b"", admin),
        daemon.request("GET", f"/metrics?token={ADMIN_TOKEN}", headers=admin),
        daemon.request(
            "POST", "/post/addmodel",
            json.dumps({"id": "runtime", "type": "http", "url": f"http://127.0.0.1:{upstream}/predict",
                        "headers": {"Authorization": f"Bearer {MODEL_KEY}"}}).encode(),
            {"Content-Type": "application/json", **admin},
        ),
        daemon.predict("runtime", {"y": 2}, headers=admin),
        daemon.request("POST", "/post/removemodel?id=runtime", b"", admin),
    ]
    assert [status for status, _, _ in exchanges] == [200, 200, 200, 200, 200, 401, 404, 200, 201, 200, 200]
    # The key was really used: the model was sent it.
    assert Upstream.seen_authorization.count(f"Bearer {MODEL_KEY}") == 4
    assert MODEL_KEY not in exchanges[3][2].decode()  # status shows the spec with its secrets masked

    assert daemon.terminate() in (0, -signal.SIGTERM)
    output = daemon.output
    assert "Server Shut Down." in output
    assert ADMIN_TOKEN not in output
    assert MODEL_KEY not in output
