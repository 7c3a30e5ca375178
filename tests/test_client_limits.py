"""
Client-side limits of the real daemon: a header deadline (408), idle keep-alive
connections closed, a connection cap that keeps a normal client served while 1000 idle
connections are held, and SIGTERM letting an in-flight request finish.
"""

import json
import signal
import socket
import sys
import threading
import time

import pytest

from aibackend.testing import MISBEHAVE, toml_models, wait_until

SERVER = """
[server]
header_timeout = 0.5
idle_timeout = 1
max_connections = 200
drain_timeout = 10
"""


def connect(port) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_all(sock) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def closed_within(sock, seconds) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


CONFIG = SERVER + toml_models(
    {"id": "slow", "type": "subprocess", "command": [sys.executable, MISBEHAVE], "timeout": 10},
)


@pytest.fixture
def daemon(start_daemon):
    """A daemon of its own, for a test that stops it."""
    return start_daemon(config_text=CONFIG)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon of the same configuration for the tests that leave it as they found it."""
    from aibackend.testing import Daemon

    directory = tmp_path_factory.mktemp("limits")
    config = directory / "aibackend.toml"
    config.write_text(CONFIG)
    daemon = Daemon(str(config), cwd=str(directory), env={"XDG_STATE_HOME": str(directory / "state")})
    try:
        yield daemon
    finally:
        daemon.stop()


def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closes(shared):
    daemon = shared
    sock = connect(daemon.port)
    sock.sendall(b"GET /get/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
    started = time.monotonic()
    answer = read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "request_timeout"
    assert time.monotonic() - started < 5
    assert daemon.request("GET", "/health/live").status == 200  # the daemon serves on


def test_a_slow_request_is_not_cut_by_the_header_deadline_or_the_idle_timeout(shared):
    daemon = shared
    reply = daemon.predict("slow", {"op": "sleep", "seconds": 1.5})
    assert reply.status == 200, reply


def test_an_idle_keep_alive_connection_is_closed(shared):
    daemon = shared
    sock = connect(daemon.port)
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(5)
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert closed_within(sock, 5)  # idle_timeout = 1 s, header_timeout = 0.5 s
    sock.close()


def test_a_normal_client_is_served_while_1000_idle_connections_are_held(start_daemon):
    # Long deadlines, so the idle connections stay; the cap (200) makes room by closing
    # the oldest idle ones.
    daemon = start_daemon(config_text="""
[server]
header_timeout = 60
idle_timeout = 60
max_connections = 200
""" + toml_models({"id": "slow", "type": "subprocess", "command": [sys.executable, MISBEHAVE], "timeout": 10}))
    held = []
    try:
        for _ in range(1000):
            held.append(connect(daemon.port))
        time.sleep(0.2)
        reply = daemon.request("GET", "/health/live", timeout=10)
        assert reply.status == 200
        reply = daemon.predict("slow", {"op": "echo"})
        assert reply.status == 200
        metrics = daemon.request("GET", "/metrics").body.decode()
        open_now = [line for line in metrics.splitlines() if line.startswith("aibackend_open_connections ")]
        assert float(open_now[0].split()[1]) <= 200
    finally:
        for sock in held:
            sock.close()


def slow_request_with_the_model(daemon, seconds: float):
    """A request the model takes C{seconds} over, in a thread, once the model has it: the thread and its result."""
    result = {}

    def slow():
        result["reply"] = daemon.predict("slow", {"op": "sleep", "seconds": seconds}, timeout=15)

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(lambda: 'aibackend_model_in_flight{model="slow"} 1.0' in daemon.request("GET", "/metrics").body.decode(),
               10, "the request with the model")
    return thread, result


def test_sigterm_lets_the_request_in_flight_finish(daemon):
    thread, result = slow_request_with_the_model(daemon, 1.5)
    started = time.monotonic()
    daemon.terminate()
    thread.join(15)
    assert result["reply"].status == 200, result["reply"]
    assert time.monotonic() - started < 10 + 5 + 1


def test_a_second_sigterm_while_draining_changes_nothing(daemon):
    thread, result = slow_request_with_the_model(daemon, 2)
    daemon.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    daemon.send_signal(signal.SIGTERM)
    daemon.send_signal(signal.SIGINT)
    status = daemon.terminate()
    thread.join(15)

    assert result.get("reply") is not None and result["reply"].status == 200, daemon.output
    assert status in (0, -signal.SIGTERM), daemon.output
    assert "Traceback" not in daemon.output and "ReactorNotRunning" not in daemon.output
    assert "Received SIGTERM while stopping: the drain goes on" in daemon.output
    assert "Received SIGINT while stopping" in daemon.output
