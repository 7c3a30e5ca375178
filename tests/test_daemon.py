"""
The real thing: the real twistd, the real example model server, real sockets on
127.0.0.1 (ports the system picks), and what a user of the README would do with curl.

Plain blocking tests: L{aibackend.testing.Daemon} and the C{model_server} fixture (both in
child processes), http.client. Every wait polls with a deadline; every process is ended
(SIGTERM, then SIGKILL if it lingers) by its fixture.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from aibackend.testing import HEX32, LOOPBACK_ANY_PORT, ROOT, TWISTD, Daemon, Process, call, free_port, run

TAC = os.path.join(ROOT, "etc", "aibackend.tac")


def curl_d(port, path, data: bytes, headers=None):
    """What `curl -d DATA URL` sends: a POST with the form content type."""
    return call(port, "POST", path, data, {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})


def environment(**extra):
    env = dict(os.environ)
    env.update(extra)
    return env


def write_config(path, model_port: int, down_port: int | None = None) -> str:
    text = f"""
[server]
listen = ["tcp:1:interface=127.0.0.1"]   # replaced by --listen in every test

[[models]]
id = "sentiment"
type = "http"
url = "http://127.0.0.1:{model_port}/sentiment"
timeout = 10

[[models]]
id = "echo"
type = "HttpModel"
dest = "127.0.0.1:{model_port}/echo"
timeout = 10
headers = {{ X-Served-By = "aibackend" }}
"""
    if down_port is not None:
        text += f"""
[[models]]
id = "down"
type = "http"
url = "http://127.0.0.1:{down_port}/predict"
timeout = 5
connect_timeout = 2
"""
    path.write_text(text)
    return str(path)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(model_server, tmp_path_factory):
    """A daemon serving sentiment, echo and a model whose server is down; its port."""
    directory = tmp_path_factory.mktemp("daemon")
    config = write_config(directory / "aibackend.toml", model_server, down_port=free_port())
    daemon = Daemon(config, "--max-body-bytes", "100000", cwd=str(directory))
    try:
        yield daemon.port
    finally:
        daemon.stop()
    # Whatever the tests did, the daemon logged no bug of its own.
    daemon.assert_no_bug_logged()


# --- the README, with curl -------------------------------------------------------------------


def test_post_predict_with_curl_d(daemon):
    status, headers, body = curl_d(daemon, "/post/predict?id=sentiment", b'{"text": "what a great day"}')

    assert status == 200, body
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["label"] == "positive"
    assert answer["positive"] == ["great"]


def test_get_predict_with_query_parameters(daemon):
    status, _, body = call(daemon, "GET", "/get/predict?id=sentiment&text=not%20good%20at%20all")

    assert status == 200, body
    assert json.loads(body)["label"] == "negative"


def test_get_predict_with_the_originals_question_marks(daemon):
    status, _, body = call(daemon, "GET", "/get/predict?id=echo?text=hi?lang=en")

    assert status == 200, body
    assert json.loads(body)["echo"] == {"text": "hi", "lang": "en"}


def test_the_request_id_reaches_the_model(daemon):
    status, headers, body = call(
        daemon, "POST", "/post/predict?id=echo", b'{"x": [1, 2]}',
        {"Content-Type": "application/json", "X-Request-Id": "readme-echo-1"},
    )

    assert status == 200, body
    assert headers["x-request-id"] == "readme-echo-1"
    assert json.loads(body) == {"echo": {"x": [1, 2]}, "request_id": "readme-echo-1"}


def test_a_made_request_id_reaches_the_model_too(daemon):
    status, headers, body = curl_d(daemon, "/post/predict?id=echo", b'{"y": 1}')

    assert status == 200, body
    assert HEX32.match(headers["x-request-id"])
    assert json.loads(body)["request_id"] == headers["x-request-id"]


def test_the_models_own_error_is_passed_through(daemon):
    status, _, body = curl_d(daemon, "/post/predict?id=sentiment", b'{"no_text": 1}')

    assert status == 400
    assert json.loads(body) == {"error": 'send {"text": "..."}'}


def test_getlogs_shows_the_request(daemon):
    curl_d(daemon, "/post/predict?id=echo", b"{}", {"X-Request-Id": "logged-1"})

    status, _, body = call(daemon, "GET", "/get/getlogs?id=echo&level=info")

    assert status == 200, body
    logs = json.loads(body)
    assert logs["model"] == "echo"
    [entry] = [e for e in logs["entries"] if e.get("request_id") == "logged-1"]
    assert (entry["event"], entry["operation"], entry["status"]) == ("request", "predict", 200)
    assert entry["latency_ms"] >= 0


def test_cleanlogs_counts_what_it_removed(daemon):
    call(daemon, "POST", "/post/cleanlogs?id=sentiment", b"")
    for text in ("good", "bad", "fine"):
        curl_d(daemon, "/post/predict?id=sentiment", json.dumps({"text": text}).encode())

    status, _, body = call(daemon, "POST", "/post/cleanlogs?id=sentiment", b"")

    assert status == 200, body
    assert json.loads(body) == {"model": "sentiment", "removed": 3}
    _, _, body = call(daemon, "GET", "/get/getlogs?id=sentiment")
    assert json.loads(body)["entries"] == []


def test_a_model_whose_server_is_down_is_502_and_the_others_still_serve(daemon):
    status, headers, body = curl_d(daemon, "/post/predict?id=down", b"{}", {"X-Request-Id": "down-1"})

    assert status == 502, body
    error = json.loads(body)["error"]
    assert error["type"] == "bad_gateway"
    assert error["model"] == "down"
    assert error["request_id"] == "down-1"
    assert "'down'" in error["message"] and "connection refused" in error["message"]

    status, _, body = curl_d(daemon, "/post/predict?id=sentiment", b'{"text": "love it"}')
    assert status == 200, body
    _, _, body = call(daemon, "GET", "/get/getlogs?id=down&level=error")
    [entry] = [e for e in json.loads(body)["entries"] if e.get("request_id") == "down-1"]
    assert entry["status"] == 502


def test_daemon_errors_are_json(daemon):
    for method, path, status in [
        ("GET", "/", 404),
        ("GET", "/nothing/here/at/all", 404),
        ("POST", "/post/predict?id=ghost", 404),
        ("POST", "/get/predict?id=echo", 405),
        ("POST", "/post/predict", 400),
    ]:
        got, headers, body = call(daemon, method, path, b"{}")
        assert got == status, (path, body)
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["request_id"] == headers["x-request-id"]


def test_a_body_over_max_body_bytes_is_413(daemon):
    status, headers, body = call(
        daemon, "POST", "/post/predict?id=echo", b'"' + b"a" * 100_000 + b'"', {"Content-Type": "application/json"}
    )

    assert status == 413
    assert headers["connection"] == "close"
    assert "the limit is 100000 bytes" in json.loads(body)["error"]["message"]


# --- starting and stopping -------------------------------------------------------------------


def test_sigterm_ends_the_daemon_with_status_0(model_server, tmp_path):
    config = write_config(tmp_path / "aibackend.toml", model_server)
    daemon = Daemon(config, cwd=str(tmp_path))
    process, port = daemon.process, daemon.port
    try:
        assert curl_d(port, "/post/predict?id=echo", b"{}")[0] == 200
        process.popen.send_signal(signal.SIGTERM)
        status = process.wait_exit(deadline=5)
    finally:
        process.terminate()

    # twistd shuts down cleanly, then ends itself with the signal it got (so that a
    # supervisor knows why it ended): -SIGTERM, which systemd counts as a clean exit.
    assert status in (0, -signal.SIGTERM), process.output
    assert process.lines[-1].endswith("Server Shut Down.")
    assert "Traceback" not in process.output


def test_a_bad_configuration_ends_with_one_line(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text('[[models]]\nid = "m"\ntype = "http"\nurl = "http://127.0.0.1:1/"\n\n'
                      '[[models]]\nid = "n"\ntype = "http"\nurl = "ftp://127.0.0.1/"\n')

    result = run([TWISTD, "--pidfile=", "-n", "aibackend", "--config", str(config), "--listen", LOOPBACK_ANY_PORT],
                 cwd=str(tmp_path))

    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output
    [line] = output.splitlines()
    assert str(config) in line
    assert "models[1].url" in line


def test_a_configuration_that_is_not_toml_ends_with_one_line(tmp_path):
    config = tmp_path / "notoml.toml"
    config.write_text("[[models]\nid = \n")

    result = run([TWISTD, "--pidfile=", "-n", "aibackend", "--config", str(config)], cwd=str(tmp_path))

    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output
    [line] = output.splitlines()
    assert str(config) in line and "not valid TOML" in line


def test_a_missing_configuration_ends_with_one_line(tmp_path):
    result = run([TWISTD, "--pidfile=", "-n", "aibackend", "--config", str(tmp_path / "nowhere.toml")],
                 cwd=str(tmp_path))

    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output
    [line] = output.splitlines()
    assert "nowhere.toml" in line and "cannot read" in line


def test_a_busy_port_ends_with_one_clear_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        result = run([TWISTD, "--pidfile=", "-n", "aibackend", "--listen", f"tcp:{port}:interface=127.0.0.1"],
                     cwd=str(tmp_path))

    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    complaints = [line for line in output.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(complaints) == 1, output
    assert "cannot listen on" in complaints[0]
    assert "Address already in use" in complaints[0]


def test_a_bad_listen_description_ends_with_one_line(tmp_path):
    result = run([TWISTD, "--pidfile=", "-n", "aibackend", "--listen", "tcp:notaport"], cwd=str(tmp_path))

    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output
    [line] = output.splitlines()
    assert "cannot listen on 'tcp:notaport'" in line


def test_help_lists_the_options(tmp_path):
    result = run([TWISTD, "aibackend", "--help"], cwd=str(tmp_path))

    assert result.returncode == 0, result.stderr
    for option in ("--config", "--listen", "--max-body-bytes"):
        assert option in result.stdout


def test_the_tac_file_starts_and_serves(model_server, tmp_path):
    config = write_config(tmp_path / "aibackend.toml", model_server)
    env = environment(AIBACKEND_CONFIG=config, AIBACKEND_LISTEN=LOOPBACK_ANY_PORT)
    process = Process([TWISTD, "--pidfile=", "-ny", TAC], env=env, cwd=str(tmp_path))
    try:
        port = int(process.wait_for(r"aibackend listening on http://127\.0\.0\.1:(\d+)").group(1))

        status, _, body = curl_d(port, "/post/predict?id=echo", b'{"via": "tac"}', {"X-Request-Id": "tac-1"})

        assert status == 200, body
        assert json.loads(body) == {"echo": {"via": "tac"}, "request_id": "tac-1"}
    finally:
        status = process.terminate()
    assert status in (0, -signal.SIGTERM), process.output
    assert "Traceback" not in process.output
