"""
Issue 12, the server side: every refusal in the daemon's JSON error shape (Twisted's own
included), one Host header, strict chunked bodies, slow clients cut off (body deadline,
minimum rate, send timeout), a per-peer connection cap, eviction of the connections that
hold the most for the least progress, and a body held once.

On a Clock and a StringTransport (the site's real channel and request) for the rules and
their timers; against the real daemon for what a client on a socket sees.
"""

from __future__ import annotations

import json
import os
import platform
import select
import socket
import sys
import time

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from aibackend.interfaces import ModelAnswer
from aibackend.testing import HEX32, MISBEHAVE, FakeModel, StubFrontDoor, parse_response, toml_models

LIMIT = 1024


# --- on a clock ----------------------------------------------------------------------------


def make_site(clock, model=None, **limits):
    from aibackend.server import AibackendSite

    model = model or FakeModel("m", clock).answers()
    door = StubFrontDoor(clock, [model])
    limits.setdefault("header_timeout", 10)
    return AibackendSite(door.front_door.resource(), max_body_bytes=LIMIT, reactor=clock, **limits)


def connect(site, host="127.0.0.1", port=5000):
    protocol = site.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    protocol.makeConnection(transport)
    return protocol, transport


def close(*protocols):
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    for protocol in protocols:
        protocol.connectionLost(Failure(ConnectionDone()))


def assert_refusal(transport, status, kind, request_id=None, *, v2=False):
    """The transport got one answer in the error shape (/v2's with C{v2}), and is closing."""
    raw = transport.value()
    got, headers, body, after = parse_response(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    if v2:  # {"error": "..."}: the message alone
        assert isinstance(error, str) and error, body
        assert request_id is None or headers["x-request-id"] == request_id
        assert after == b""
        assert transport.disconnecting or transport.disconnected
        return {"message": error}
    assert error["type"] == kind
    assert error["message"]
    assert headers["x-request-id"] == error["request_id"]
    if request_id is not None:
        assert error["request_id"] == request_id
    else:
        assert HEX32.match(error["request_id"])
    assert after == b""
    assert transport.disconnecting or transport.disconnected
    return error


@pytest.fixture
def site(clock):
    return make_site(clock)


POST = b"POST /post/predict?id=m HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("raw", [
    b"GET\r\n\r\n",                                                     # no target, no version
    b"GET /health/live HTTP/1.1 extra\r\nHost: x\r\n\r\n",              # a bad request line
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",    # a header without ':'
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",      # a space in a header's name
    POST + b"Content-Length: 12x\r\n\r\n",                              # a Content-Length not a number
    POST + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",          # two lengths
    POST + b"Transfer-Encoding: gzip\r\n\r\n",                          # an encoding Twisted does not do
    POST + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",  # both
])
def test_twisteds_own_refusals_are_400_in_the_error_shape(site, clock, raw):
    protocol, transport = connect(site)
    protocol.dataReceived(raw)

    assert_refusal(transport, 400, "bad_request")
    close(protocol)


def test_a_refusal_carries_the_clients_request_id_once_its_header_is_in(site):
    protocol, transport = connect(site)
    protocol.dataReceived(b"GET /health/live HTTP/1.1\r\nX-Request-Id: mine-1\r\nHost: x\r\nbroken\r\n\r\n")

    assert_refusal(transport, 400, "bad_request", "mine-1")
    close(protocol)


def test_a_request_line_over_16_kib_is_414(site):
    protocol, transport = connect(site)
    protocol.dataReceived(b"GET /get/models?x=" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")

    assert_refusal(transport, 414, "uri_too_long")
    close(protocol)


def test_a_request_line_over_16_kib_is_414_before_its_end_arrives(site):
    protocol, transport = connect(site)
    protocol.dataReceived(b"GET /get/models?x=" + b"a" * 17000)

    assert_refusal(transport, 414, "uri_too_long")
    close(protocol)


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 17000 + b"\r\n",                                    # one header line too long
    b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 1000) for i in range(17)),       # the section too large
    b"".join(b"X-H%d: 1\r\n" % i for i in range(501)),                      # too many headers
])
def test_headers_too_large_are_431(site, headers):
    protocol, transport = connect(site)
    protocol.dataReceived(b"GET /health/live HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")

    assert_refusal(transport, 431, "headers_too_large")
    close(protocol)


@pytest.mark.parametrize("request_line", [
    b"GET /health/live HTTP/1.1", b"GET /get/models HTTP/1.1", b"POST /post/predict?id=m HTTP/1.1",
    b"GET /v2/models/m/ready HTTP/1.1", b"GET /nowhere HTTP/1.1",
])
def test_two_host_headers_are_400_on_every_route(clock, request_line):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect(site)
    protocol.dataReceived(request_line + b"\r\nHost: evil.example\r\nHost: 127.0.0.1\r\n"
                          b"X-Request-Id: two-hosts\r\nContent-Length: 2\r\n\r\n{}")

    error = assert_refusal(transport, 400, "bad_request", "two-hosts", v2=b" /v2/" in request_line)
    assert "more than one Host" in error["message"]
    assert model.received == []
    close(protocol)


def test_an_http_1_1_request_without_host_is_400_an_http_1_0_one_is_served(site):
    protocol, transport = connect(site)
    protocol.dataReceived(b"GET /health/live HTTP/1.1\r\n\r\n")
    assert_refusal(transport, 400, "bad_request")
    close(protocol)

    protocol, transport = connect(site)
    protocol.dataReceived(b"GET /health/live HTTP/1.0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.0 200 ")
    close(protocol)


# --- chunked bodies ---------------------------------------------------------------------------


CHUNKED = POST + b"Transfer-Encoding: chunked\r\nX-Request-Id: chunky\r\n\r\n"


def test_a_bare_lf_in_a_chunked_body_is_400_at_once(site, clock):
    protocol, transport = connect(site)
    protocol.dataReceived(CHUNKED + b"2\n{}\n0\n\n")

    error = assert_refusal(transport, 400, "bad_request", "chunky")
    assert "bare LF" in error["message"]
    close(protocol)


def test_a_request_line_ending_in_a_bare_lf_is_400_at_once(site, clock):
    protocol, transport = connect(site)
    protocol.dataReceived(b"GET /health/live HTTP/1.1\nHost: x\n\n")  # held until a timeout before

    error = assert_refusal(transport, 400, "bad_request")
    assert "bare LF" in error["message"]
    close(protocol)


def test_a_request_line_whose_crlf_is_split_between_reads_is_served(site):
    protocol, transport = connect(site)
    for part in (b"GET /health/live HTTP/1.1\r", b"\nHost: x\r\n\r\n", b"\r\nGET /health/live HTTP/1.1\r\n",
                 b"Host: x\r\n\r\n"):
        protocol.dataReceived(part)

    assert transport.value().count(b"HTTP/1.1 200 OK") == 2, transport.value()
    assert not transport.disconnecting
    close(protocol)


@pytest.mark.parametrize("body", [b"zz\r\n", b"-2\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"0x2\r\n"])
def test_a_malformed_chunked_body_is_400(site, body):
    protocol, transport = connect(site)
    protocol.dataReceived(CHUNKED + body)

    assert_refusal(transport, 400, "bad_request", "chunky")
    close(protocol)


def test_a_chunk_over_the_limit_is_413_from_its_size_line(site):
    protocol, transport = connect(site)
    protocol.dataReceived(CHUNKED + b"%x\r\n" % (LIMIT + 1))  # no data yet: its size says enough

    error = assert_refusal(transport, 413, "payload_too_large", "chunky")
    assert f"the limit is {LIMIT} bytes" in error["message"]
    close(protocol)


def test_chunks_that_add_up_past_the_limit_are_413_from_the_size_line_that_does(site):
    protocol, transport = connect(site)
    protocol.dataReceived(CHUNKED + b"200\r\n" + b" " * 0x200 + b"\r\n")
    assert transport.value() == b""
    protocol.dataReceived(b"201\r\n")

    assert_refusal(transport, 413, "payload_too_large", "chunky")
    close(protocol)


def test_a_chunked_body_split_anywhere_is_taken_whole(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    body = b'{"a": [1, 2, 3], "b": "' + b"x" * 300 + b'"}'
    wire = CHUNKED + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:200], body[200:]))
    wire += b"0\r\nTrailer: yes\r\n\r\n"
    protocol, transport = connect(site)
    for i in range(len(wire)):
        protocol.dataReceived(wire[i:i + 1])

    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert [received.body for received in model.received] == [body]
    close(protocol)


# --- slow bodies, slow readers -------------------------------------------------------------------


def live_calls(clock):
    return [call for call in clock.getDelayedCalls() if call.active()]


def test_a_body_that_comes_with_its_headers_sets_no_timer(site, clock):
    protocol, transport = connect(site)
    header_timer = live_calls(clock)
    protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")

    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert len(live_calls(clock)) == len(header_timer)
    close(protocol)


def test_a_body_trickled_under_the_minimum_rate_gets_408_after_the_grace_period(clock):
    site = make_site(clock, min_body_rate=240, body_timeout=60)
    protocol, transport = connect(site)
    protocol.dataReceived(POST + b"Content-Length: 1000\r\nX-Request-Id: trickle\r\n\r\n")
    for _ in range(5):  # 10 bytes a second: under 240 B/s, but within the 5 s grace
        protocol.dataReceived(b" " * 10)
        clock.advance(0.99)
    assert transport.value() == b""
    clock.advance(0.1)

    error = assert_refusal(transport, 408, "request_timeout", "trickle")
    assert "slower than 240 bytes/s" in error["message"]
    close(protocol)


def test_a_body_at_the_minimum_rate_is_not_cut_off(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model, min_body_rate=240, body_timeout=60)
    protocol, transport = connect(site)
    body = b"[" + b" " * 998 + b"]"
    protocol.dataReceived(POST + b"Content-Length: 1000\r\n\r\n")
    for offset in range(0, 1000, 250):  # 250 bytes a second
        protocol.dataReceived(body[offset:offset + 250])
        clock.advance(1)

    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert [received.body for received in model.received] == [body]
    close(protocol)
    assert live_calls(clock) == []


def test_a_body_that_keeps_the_rate_but_not_the_deadline_gets_408(clock):
    site = make_site(clock, min_body_rate=1, body_timeout=30)
    protocol, transport = connect(site)
    protocol.dataReceived(POST + b"Content-Length: 1000\r\n\r\n")
    for _ in range(29):
        protocol.dataReceived(b" " * 10)
        clock.advance(1)
    assert transport.value() == b""
    clock.advance(1)

    error = assert_refusal(transport, 408, "request_timeout")
    assert "did not arrive within 30 s" in error["message"]
    close(protocol)


def test_a_chunked_body_that_stops_gets_408(clock):
    site = make_site(clock, min_body_rate=240, body_timeout=60)
    protocol, transport = connect(site)
    protocol.dataReceived(CHUNKED + b"10\r\n")  # and then nothing

    clock.advance(5.1)

    assert_refusal(transport, 408, "request_timeout", "chunky")
    close(protocol)


def test_a_client_that_does_not_read_its_answer_is_closed_after_the_send_timeout(clock):
    model = FakeModel("m", clock).answers(200, b'{"big": "' + b"x" * 100 + b'"}')
    site = make_site(clock, model, send_timeout=20)
    protocol, transport = connect(site)
    protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")
    # The transport's buffer is full: it pauses its producer, the channel.
    protocol.pauseProducing()
    clock.advance(19)
    assert not transport.disconnecting
    clock.advance(1.1)

    assert transport.disconnected  # aborted: what it holds goes nowhere
    close(protocol)


def test_a_client_that_reads_again_in_time_is_kept(clock):
    site = make_site(clock, send_timeout=20)
    protocol, transport = connect(site)
    protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")
    protocol.pauseProducing()
    clock.advance(10)
    protocol.resumeProducing()
    clock.advance(15)

    assert not transport.disconnecting and not transport.disconnected
    close(protocol)


# --- how many connections ------------------------------------------------------------------------


def test_a_peer_at_its_cap_makes_room_by_closing_its_own_oldest_idle_connection(clock):
    site = make_site(clock, max_connections_per_peer=2)
    first = connect(site, "10.0.0.1", 1)
    second = connect(site, "10.0.0.1", 2)
    other = connect(site, "10.0.0.2", 1)

    third = connect(site, "10.0.0.1", 3)

    assert first[1].disconnecting  # its oldest idle one, not another address's
    assert third[1].value() == b"" and not third[1].disconnecting
    for protocol, transport in (second, other):
        assert transport.value() == b"" and not transport.disconnecting
    close(first[0], second[0], third[0], other[0])
    assert site.peers == {}


def test_a_peer_whose_connections_are_all_served_is_refused_and_others_are_not(clock):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model, max_connections_per_peer=2)
    first = connect(site, "10.0.0.1", 1)
    second = connect(site, "10.0.0.1", 2)
    for protocol, _ in (first, second):
        protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")  # with the model
    third = connect(site, "10.0.0.1", 3)
    other = connect(site, "10.0.0.2", 1)

    error = assert_refusal(third[1], 503, "model_unavailable")
    assert "maximum of 2 connections a client" in error["message"]
    assert parse_response(third[1].value())[1]["retry-after"] == "1"
    for protocol, transport in (first, second, other):
        assert transport.value() == b"" and not transport.disconnecting
    close(third[0])

    close(first[0])  # one of its connections ends: the peer may make another
    fourth = connect(site, "10.0.0.1", 4)
    assert fourth[1].value() == b"" and not fourth[1].disconnecting
    close(second[0], other[0], fourth[0])
    assert site.peers == {}


def test_at_the_connection_cap_the_slowest_body_makes_room(clock):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model, max_connections=3, min_body_rate=0)
    served, slow, faster = connect(site, port=1), connect(site, port=2), connect(site, port=3)
    served[0].dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")  # with the model
    slow[0].dataReceived(POST + b"Content-Length: 1000\r\n\r\n" + b" " * 10)
    faster[0].dataReceived(POST + b"Content-Length: 1000\r\n\r\n" + b" " * 500)
    clock.advance(1)

    newcomer = connect(site, port=4)

    assert newcomer[1].value() == b""
    assert_refusal(slow[1], 503, "model_unavailable")
    assert not faster[1].disconnecting and not served[1].disconnecting
    close(slow[0])

    # Headers still coming go before a body that comes faster.
    newcomer[0].dataReceived(b"GET /health/live HTTP/1.1\r\n")
    latest = connect(site, port=5)
    assert latest[1].value() == b""
    assert_refusal(newcomer[1], 503, "model_unavailable")
    assert not served[1].disconnecting and not faster[1].disconnecting
    close(newcomer[0], latest[0], faster[0], served[0])
    assert [received.context.request_id for received in model.cancelled] == [model.received[0].context.request_id]


def test_at_the_connection_cap_requests_being_served_are_never_evicted(clock):
    model = FakeModel("m", clock)
    model.holds()
    site = make_site(clock, model, max_connections=2)
    served = [connect(site, port=port) for port in (1, 2)]
    for protocol, _ in served:
        protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")

    newcomer = connect(site, port=3)

    error = assert_refusal(newcomer[1], 503, "model_unavailable")
    assert "maximum of 2 connections" in error["message"]
    assert all(not transport.disconnecting for _, transport in served)
    close(newcomer[0], *(protocol for protocol, _ in served))


def test_at_the_connection_cap_a_client_that_does_not_read_goes_first(clock):
    model = FakeModel("m", clock)
    model.holds()
    site = make_site(clock, model, max_connections=2)
    served, stalled = connect(site, port=1), connect(site, port=2)
    served[0].dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")
    stalled[0].dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")
    stalled[0].pauseProducing()

    newcomer = connect(site, port=3)

    assert newcomer[1].value() == b""
    assert stalled[1].disconnected
    assert not served[1].disconnecting
    close(stalled[0], newcomer[0], served[0])


def test_at_the_connection_cap_a_client_that_did_not_read_a_finished_answer_is_aborted_not_closed(clock):
    site = make_site(clock, max_connections=1)  # FakeModel answers at once
    stalled = connect(site, port=2)
    stalled[0].pauseProducing()  # its answer stays in the send buffer: it does not read
    stalled[0].dataReceived(b"GET /get/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in stalled[1].value() and not stalled[0].requests  # answered, all written

    newcomer = connect(site, port=3)

    # Aborted (what it holds goes nowhere), not closed politely: a polite close would wait
    # for it to read, uncounted, until Twisted's own timeout.
    assert stalled[1].disconnected
    assert newcomer[1].value() == b"" and not newcomer[1].disconnecting
    close(stalled[0], newcomer[0])


def test_a_kept_alive_connection_gets_the_header_deadline_even_with_a_later_timer_set(clock):
    site = make_site(clock, header_timeout=10, send_timeout=60)
    protocol, transport = connect(site)
    protocol.pauseProducing()  # the send timeout (60 s) arms the connection's one timer
    protocol.dataReceived(b"GET /get/models HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(11)  # the first header deadline's timer has fired and gone by
    protocol.resumeProducing()
    protocol.pauseProducing()  # stalled again: its one timer is set 60 s ahead
    protocol.resumeProducing()
    protocol.dataReceived(b"GET /get/models HTTP/1.1\r\n")  # the next request's headers never end

    clock.advance(10)

    assert b"408 Request Timeout" in transport.value()
    close(protocol)


# --- against the real daemon ------------------------------------------------------------------


def recv_all(sock, timeout=10.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def raw_exchange(port, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return recv_all(sock)


def check_error_shape(raw: bytes, status: int, kind: str):
    got, headers, body, _ = parse_response(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == kind
    assert error["request_id"] == headers["x-request-id"]
    return error


ECHO_RAW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "echo_raw.py")
ECHO = {"id": "echo", "type": "subprocess", "command": [sys.executable, MISBEHAVE], "timeout": 10}


REFUSING_CONFIG = "[server]\nmax_body_bytes = 4096\n" + toml_models(ECHO)


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(config_text=REFUSING_CONFIG)


@pytest.fixture(scope="module")
def refusing_daemon(tmp_path_factory):
    """
    One daemon of L{daemon}'s configuration for every case of the refusals below, with a
    store of its own: each case checks that it still serves and that nothing was added.
    """
    from aibackend.testing import Daemon

    directory = tmp_path_factory.mktemp("refusals")
    config = directory / "aibackend.toml"
    config.write_text(REFUSING_CONFIG)
    daemon = Daemon(str(config), cwd=str(directory), env={"XDG_STATE_HOME": str(directory / "state")})
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.parametrize("raw, status, kind", [
    (b"GET /get/models?x=" + b"a" * 17000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "uri_too_long"),
    (b"GET /get/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431,
     "headers_too_large"),
    (b"GET /get/models HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon\r\n\r\n", 400, "bad_request"),
    (b"GET /get/models HTTP/1.1\r\nHost: evil.example\r\nHost: 127.0.0.1\r\n\r\n", 400, "bad_request"),
    (b"POST /post/addmodel?id=x&type=http&dest=127.0.0.1:9 HTTP/1.1\r\nHost: evil.example\r\n"
     b"Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 400, "bad_request"),
    (b"GET /get/models HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (b"POST /post/predict?id=echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\n{}\n0\n\n",
     400, "bad_request"),
    (b"POST /post/predict?id=echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n",
     413, "payload_too_large"),
    (b"GET /get/models HTTP/1.1\nHost: 127.0.0.1\n\n", 400, "bad_request"),
], ids=["long-request-line", "long-header", "bad-header", "two-hosts", "two-hosts-addmodel", "no-host",
        "bare-lf-chunks", "chunk-over-limit", "bare-lf-request"])
def test_the_daemons_refusals_are_in_its_error_shape_at_once(refusing_daemon, raw, status, kind):
    daemon = refusing_daemon
    check_error_shape(raw_exchange(daemon.port, raw), status, kind)
    assert daemon.predict("echo", {"after": 1}).status == 200
    assert daemon.request("GET", "/get/models").status == 200  # nothing was added
    assert [m["id"] for m in daemon.request("GET", "/get/models").json()["models"]] == ["echo"]


def test_slow_bodies_as_many_as_max_connections_lock_no_one_out(start_daemon):
    daemon = start_daemon(config_text="""
[server]
max_connections = 8
header_timeout = 60
idle_timeout = 60
body_timeout = 60
min_body_rate = 0
""" + toml_models(ECHO))
    slow = []
    try:
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            sock.sendall(b"POST /post/predict?id=echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
                         b"Expect: 100-continue\r\n\r\n")
            # The daemon has the headers once it says 100 Continue; then one byte of body.
            assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue"), "no 100 Continue"
            sock.sendall(b"{")
            slow.append(sock)

        reply = daemon.predict("echo", {"served": True})

        assert reply.status == 200, reply
        assert reply.json()["echo"] == {"served": True}
        readable, _, _ = select.select(slow, [], [], 5)
        assert len(readable) == 1  # one slow body made room, the others are still held
        check_error_shape(recv_all(readable[0], 5), 503, "model_unavailable")
    finally:
        for sock in slow:
            sock.close()


def test_a_trickled_body_is_cut_off(start_daemon):
    daemon = start_daemon(config_text="""
[server]
body_timeout = 1.5
min_body_rate = 240
header_timeout = 60
idle_timeout = 60
""" + toml_models(ECHO))
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(b"POST /post/predict?id=echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        answer = b""
        for _ in range(40):  # a byte every 0.1 s, for up to 4 s: the body timeout is 1.5 s
            try:
                sock.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.1)
            try:
                answer += sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if answer:
                break
        answer += recv_all(sock, 5)

    error = check_error_shape(answer, 408, "request_timeout")
    assert "1.5 s" in error["message"]
    assert daemon.predict("echo", {"after": 1}).status == 200
    assert refusals(daemon)["slow_client"] == 1


def refusals(daemon) -> dict:
    """aibackend_refusals_total by reason, from the daemon's /metrics."""
    text = daemon.request("GET", "/metrics").body.decode()
    found = {}
    for line in text.splitlines():
        if line.startswith('aibackend_refusals_total{reason="'):
            reason = line.split('"')[1]
            found[reason] = float(line.rsplit(" ", 1)[1])
    return found


def test_the_servers_own_refusals_are_counted_by_reason(daemon):
    raw_exchange(daemon.port, b"GET /get/models HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon\r\n\r\n")
    raw_exchange(daemon.port, b"GET /get/models HTTP/1.1\r\nHost: a\r\nHost: 127.0.0.1\r\n\r\n")
    raw_exchange(daemon.port, b"GET /get/models?x=" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n")
    raw_exchange(daemon.port, b"POST /post/predict?id=echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Content-Length: 5000\r\n\r\n")

    counted = refusals(daemon)
    assert counted["malformed_request"] == 3
    assert counted["body_too_large"] == 1
    assert counted["slow_client"] == counted["connection_limit"] == 0


# --- a body held once --------------------------------------------------------------------------


def test_a_large_body_reaches_the_model_as_the_bytes_it_was_received_into(clock):
    from aibackend.server import AibackendSite

    model = FakeModel("m", clock).holds()
    door = StubFrontDoor(clock, [model])
    site = AibackendSite(door.front_door.resource(), max_body_bytes=4 << 20, reactor=clock)
    body = b'{"text": "' + b"a" * (1 << 20) + b'"}'
    protocol, transport = connect(site)
    protocol.dataReceived(POST + b"Content-Length: %d\r\n\r\n" % len(body))
    for offset in range(0, len(body), 65536):
        protocol.dataReceived(body[offset:offset + 65536])

    [received] = model.received
    assert received.body == body
    assert received.body is protocol.requests[0].content.getvalue()  # not a copy of it
    close(protocol)
    assert len(model.cancelled) == 1


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_taken_by_large_bodies_is_given_back(start_daemon):
    import threading

    echo = {"id": "echo", "type": "subprocess", "command": [sys.executable, ECHO_RAW], "workers": 2, "timeout": 60}
    daemon = start_daemon(config_text="[server]\naccess_log = false\n" + toml_models(echo))
    assert daemon.predict("echo", {"warm": True}).status == 200
    body = b'{"text": "' + b"a" * 8_000_000 + b'"}'
    total_kb = 10 * len(body) // 1024
    before = rss_kb(daemon.pid)
    for _ in range(2):
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(daemon.request(
            "POST", "/post/predict?id=echo", body, {"Content-Type": "application/json"}, timeout=60)))
            for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [reply.status for reply in replies] == [200] * 10
    peak_kb = daemon.high_water_kb() - before
    deadline = time.monotonic() + 10
    while rss_kb(daemon.pid) - before > total_kb // 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # the daemon gives memory back a second after a large request
    grown_kb = rss_kb(daemon.pid) - before

    assert grown_kb < total_kb // 4, f"the daemon kept {grown_kb} kB after {total_kb} kB of bodies"
    # The body is held once (an answer the same size is on its way back): before, about
    # three copies of each were held at the peak.
    assert peak_kb < 2.2 * total_kb, f"the daemon's peak grew by {peak_kb} kB for {total_kb} kB of bodies"


def test_a_peer_at_its_cap_closes_its_own_idle_connection_and_another_address_is_served(start_daemon):
    daemon = start_daemon(config_text="[server]\nmax_connections_per_peer = 3\nheader_timeout = 60\n"
                                      "idle_timeout = 60\n" + toml_models(ECHO))
    held = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(3)]
    try:
        for sock in held:  # each one known to the daemon: it answers a request on it
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")

        # A fourth from the same address: its oldest idle connection makes room.
        assert raw_exchange(daemon.port, b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        assert held[0].recv(65536) == b""  # closed by the daemon
        # From another loopback address, the same daemon serves.
        other = socket.create_connection(("127.0.0.1", daemon.port), timeout=10, source_address=("127.0.0.2", 0))
        with other:
            other.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert recv_all(other).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()


def test_a_client_that_does_not_read_its_answer_is_disconnected(start_daemon):
    daemon = start_daemon(config_text="[server]\nsend_timeout = 1\nidle_timeout = 60\n" + toml_models(
        {"id": "echo", "type": "subprocess", "command": [sys.executable, ECHO_RAW], "timeout": 30}))
    body = b'{"text": "' + b"a" * 8_000_000 + b'"}'
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it reads nothing: the answer backs up
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", daemon.port))
        sock.sendall(b"POST /post/predict?id=echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        deadline = time.monotonic() + 15
        while not any("has not read its answer" in line for line in daemon.lines):
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.05)
        received = recv_all(sock, 5)
    finally:
        sock.close()

    assert received.startswith(b"HTTP/1.1 200 ")
    assert len(received) < len(body)  # cut off: the rest of the answer was dropped
    assert daemon.predict("echo", {"after": 1}).status == 200


def test_a_pipelined_body_that_stops_gets_408(clock):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model, min_body_rate=240, body_timeout=60)
    protocol, transport = connect(site)
    # The second request is read only once the first is answered, from what was buffered
    # (setLineMode hands it to dataReceived again, which arms the timer).
    protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}" + POST + b"Content-Length: 100\r\n\r\n{")
    model.pending[0].callback(ModelAnswer(status=200, body=b'{"ok": true}', headers={}))
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    transport.clear()

    clock.advance(5.1)

    assert_refusal(transport, 408, "request_timeout")
    close(protocol)


def test_after_a_large_request_the_site_trims_the_heap_once_a_second_later(clock, monkeypatch):
    from aibackend import server

    trims = []
    monkeypatch.setattr(server, "_malloc_trim", trims.append)
    model = FakeModel("m", clock).answers()
    site = server.AibackendSite(StubFrontDoor(clock, [model]).front_door.resource(), max_body_bytes=4 << 20,
                                reactor=clock)
    protocol, transport = connect(site)
    small = POST + b"Content-Length: 2\r\n\r\n{}"
    large = b'{"text": "' + b"a" * (2 << 20) + b'"}'
    protocol.dataReceived(small)
    assert len(live_calls(clock)) == 1  # the connection's one timer (its header and idle timeouts): no trim for a small one
    for _ in range(3):
        protocol.dataReceived(POST + b"Content-Length: %d\r\n\r\n" % len(large) + large)
    assert transport.value().count(b"HTTP/1.1 200 ") == 4

    clock.advance(1)

    assert trims == [0]
    close(protocol)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_release_freed_memory_applies_on_glibc(monkeypatch):
    from aibackend import server

    monkeypatch.setattr(server, "_malloc_trim", None)
    assert server.release_freed_memory() is True
    assert server._malloc_trim is not None


def test_the_client_limit_keys_are_read_and_checked():
    from aibackend.config import ConfigError, ServerSpec, parse_config

    assert (ServerSpec.body_timeout, ServerSpec.min_body_rate, ServerSpec.send_timeout,
            ServerSpec.max_connections_per_peer) == (60.0, 240.0, 60.0, 1000)
    server = parse_config({"server": {"body_timeout": 5, "min_body_rate": 0, "send_timeout": 2.5,
                                      "max_connections_per_peer": 0}}).server
    assert (server.body_timeout, server.min_body_rate, server.send_timeout, server.max_connections_per_peer) == (
        5.0, 0.0, 2.5, 0)
    with pytest.raises(ConfigError) as raised:
        parse_config({"server": {"body_timeout": -1, "min_body_rate": "fast", "max_connections_per_peer": 1.5}})
    assert [path for path, _ in raised.value.problems] == [
        "server.max_connections_per_peer", "server.body_timeout", "server.min_body_rate"]


def test_the_daemon_wires_the_client_limits_into_its_site(tmp_path):
    from twisted.internet.task import Clock

    from aibackend.config import parse_config
    from aibackend.store import SQLiteStore
    from aibackend.daemon import build

    config = parse_config({"server": {"body_timeout": 5, "min_body_rate": 100, "send_timeout": 7,
                                      "max_connections_per_peer": 9}})
    root = build(config, Clock(), listen=["tcp:0:interface=127.0.0.1"], max_body_bytes=1024,
                 environ={}, store=SQLiteStore(Clock(), str(tmp_path))).service
    site = root.getServiceNamed("listener-0").factory
    assert (site.body_timeout, site.min_body_rate, site.send_timeout, site.max_connections_per_peer) == (5, 100, 7, 9)


def test_an_http_1_0_request_without_host_on_a_unix_socket_is_served(clock):
    """Twisted names the host from the local address, which a unix socket has not (it was a 500)."""
    from twisted.internet.address import UNIXAddress

    site = make_site(clock)
    protocol = site.buildProtocol(UNIXAddress(None))
    transport = StringTransport(peerAddress=UNIXAddress(None), hostAddress=UNIXAddress(b"/run/aibackend.sock"))
    protocol.makeConnection(transport)

    protocol.dataReceived(b"GET /get/models HTTP/1.0\r\n\r\n")

    status, headers, body, _ = parse_response(transport.value())
    assert status == 200, transport.value()[:300]
    assert headers["content-type"] == "application/json"
    close(protocol)


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_by_the_connections_one_timer(clock):
    # Twisted's idle timeout (timeout=, the config's idle_timeout) is kept by the channel's
    # own timer: one DelayedCall a connection, none made or cancelled at each request.
    site = make_site(clock, timeout=30)
    protocol, transport = connect(site)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert len(clock.getDelayedCalls()) == 1  # the same one: nothing cancelled, nothing new
    clock.advance(29)  # the header deadline passed (nothing awaited); idle for 29 s of 30
    assert not transport.disconnecting
    protocol.dataReceived(b"GET /health/live HTTP/1.1\r\n")  # data: it is not idle, a request is coming
    clock.advance(2)
    protocol.dataReceived(b"Host: x\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 200 ") == 2
    clock.advance(29.9)
    assert not transport.disconnecting  # idle since the second answer: 29.9 s of 30
    clock.advance(0.2)

    assert transport.disconnecting
    close(protocol)
    assert clock.getDelayedCalls() == []


def test_a_request_in_progress_is_never_timed_out_as_idle(clock):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model, timeout=30)
    protocol, transport = connect(site)
    protocol.dataReceived(POST + b"Content-Length: 2\r\n\r\n{}")
    clock.advance(100)

    assert not transport.disconnecting
    assert transport.value() == b""
    assert [call for call in clock.getDelayedCalls() if call.func.__name__ == "_check"] == []
    close(protocol)
