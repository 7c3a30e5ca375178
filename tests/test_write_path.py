"""
The daemon's writes (aibackend.directwrite) seen from outside: whatever the timing, every
answer arrives whole, in order, to the client that asked, and a closing connection sends
what it holds first. The real daemon and the example HTTP model server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aibackend.testing import Daemon


@pytest.fixture(scope="module")
def daemon(model_server, tmp_path_factory):
    directory = tmp_path_factory.mktemp("writes")
    config = directory / "aibackend.toml"
    config.write_text(f"""
[server]
access_log = false

[[models]]
id = "echo"
type = "http"
url = "http://127.0.0.1:{model_server}/echo"
timeout = 30
""")
    daemon = Daemon(str(config), "--max-body-bytes", str(64 * 1024 * 1024), cwd=str(directory))
    try:
        yield daemon.port
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def request_bytes(body: bytes, *, version: str = "1.1", request_id: str | None = None) -> bytes:
    head = f"POST /post/predict?id=echo HTTP/{version}\r\nHost: 127.0.0.1\r\n"
    head += "Content-Type: application/json\r\n"
    if request_id:
        head += f"X-Request-Id: {request_id}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_answer(reader) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 answer with a Content-Length, from a buffered reader."""
    status = reader.readline()
    assert status.startswith(b"HTTP/1."), status
    headers = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers["content-length"]))
    return int(status.split()[1]), headers, body


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def test_a_large_answer_reaches_a_slow_reader_whole(daemon):
    text = "x" * (6 * 1024 * 1024)
    sock = connect(daemon, receive_buffer=16 * 1024)
    with sock:
        sock.sendall(request_bytes(json.dumps({"text": text}).encode()))
        reader = sock.makefile("rb", buffering=4096)
        time.sleep(0.5)  # the daemon's send buffer fills: the rest waits in Twisted's
        chunks = []
        status = reader.readline()
        size = None
        while True:
            line = reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                size = int(line.split(b":")[1])
        assert size is not None, status
        while size:
            chunk = reader.read(min(size, 65536))
            chunks.append(chunk)
            size -= len(chunk)
            if len(chunks) % 16 == 0:
                time.sleep(0.01)

    assert status.startswith(b"HTTP/1.1 200")
    assert json.loads(b"".join(chunks))["echo"] == {"text": text}


def test_pipelined_requests_are_answered_in_order(daemon):
    bodies = [json.dumps({"n": n}).encode() for n in range(5)]
    with connect(daemon) as sock:
        sock.sendall(b"".join(request_bytes(body, request_id=f"pipelined-{n}") for n, body in enumerate(bodies)))
        reader = sock.makefile("rb")
        answers = [read_answer(reader) for _ in bodies]

    assert [status for status, _, _ in answers] == [200] * 5
    assert [json.loads(body)["echo"] for _, _, body in answers] == [{"n": n} for n in range(5)]
    assert [headers["x-request-id"] for _, headers, _ in answers] == [f"pipelined-{n}" for n in range(5)]


def test_an_http_1_0_answer_is_whole_and_then_the_connection_closes(daemon):
    with connect(daemon) as sock:
        sock.sendall(request_bytes(b'{"one": "zero"}', version="1.0"))
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body)["echo"] == {"one": "zero"}


def test_many_clients_at_once_each_get_their_own_answer(daemon):
    """A busy reactor holds writes until the end of its turn: none may go astray."""

    def client(number: int) -> list:
        wrong = []
        with connect(daemon) as sock:
            reader = sock.makefile("rb")
            for turn in range(15):
                payload = {"client": number, "turn": turn, "pad": "p" * (number * 97 % 3000)}
                sock.sendall(request_bytes(json.dumps(payload).encode(), request_id=f"c{number}-{turn}"))
                status, headers, body = read_answer(reader)
                if status != 200 or json.loads(body)["echo"] != payload or headers["x-request-id"] != f"c{number}-{turn}":
                    wrong.append((number, turn, status, body[:200]))
        return wrong

    start = threading.Barrier(40)

    def together(number):
        start.wait()
        return client(number)

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(together, range(40)))

    assert [wrong for wrong in results if wrong] == []
