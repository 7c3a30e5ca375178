"""
aibackend.llchannel: requests read by llhttp in the server's channel (issue 16).

What Twisted's own reading did must still hold (tests/test_server.py and
tests/test_server_hardening.py say most of it); here what is new or was untested: a request
split anywhere, many pipelined in one read, what follows a refusal or a last request, the
transport paused while pipelined requests are held, the framing of a body whatever an
Upgrade header says, and llhttp's strictness answered in the error shapes.

On a Clock and a StringTransport: the site's real channel and request.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from aibackend.interfaces import ModelAnswer
from aibackend.testing import FakeModel, StubFrontDoor, connect_channel, parse_response, parse_responses

LIMIT = 1024
POST = b"POST /post/predict?id=m HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


def make_site(clock, model=None, **limits):
    from aibackend.server import AibackendSite

    door = StubFrontDoor(clock, [model or FakeModel("m", clock).answers()])
    limits.setdefault("header_timeout", 10)
    return AibackendSite(door.front_door.resource(), max_body_bytes=LIMIT, reactor=clock, **limits)


def close(protocol):
    protocol.connectionLost(Failure(ConnectionDone()))


def post(body: bytes, request_id: str, extra: bytes = b"") -> bytes:
    return POST + b"X-Request-Id: %s\r\nContent-Length: %d\r\n%s\r\n" % (request_id.encode(), len(body), extra) + body


def chunked(body: bytes, request_id: str) -> bytes:
    return (POST + b"X-Request-Id: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % request_id.encode()
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


def get(request_id: str, path: bytes = b"/health/live") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\nX-Request-Id: %s\r\n\r\n" % (path, request_id.encode())


def ids(raw: bytes) -> list:
    return [headers["x-request-id"] for _, headers, _ in parse_responses(raw)]


def assert_refused(transport, status, kind=None, *, v2=False) -> str:
    """One answer in the error shape, and the connection closing: its message."""
    got, headers, body, after = parse_response(transport.value())
    assert got == status, transport.value()[:300]
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert after == b""
    assert transport.disconnecting or transport.disconnected
    error = json.loads(body)["error"]
    if v2:
        assert isinstance(error, str), body
        return error
    assert error["type"] == kind, body
    assert error["request_id"] == headers["x-request-id"]
    return error["message"]


# --- split and pipelined -------------------------------------------------------------------------


def test_requests_split_at_every_byte_boundary_are_served_the_same(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    body = b'{"text": "split"}'
    wire = post(body, "one") + get("two") + chunked(body, "three")
    for cut in range(1, len(wire)):
        protocol, transport = connect_channel(site)
        protocol.dataReceived(wire[:cut])
        protocol.dataReceived(wire[cut:])

        assert ids(transport.value()) == ["one", "two", "three"], (cut, transport.value()[:400])
        assert not transport.disconnecting
        close(protocol)
    assert [received.body for received in model.received] == [body, body] * (len(wire) - 1)


def test_a_request_fed_a_byte_at_a_time_is_served(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    wire = post(b'{"a": 1}', "bytes") + get("after")
    for i in range(len(wire)):
        protocol.dataReceived(wire[i:i + 1])

    assert ids(transport.value()) == ["bytes", "after"]
    assert [received.body for received in model.received] == [b'{"a": 1}']
    close(protocol)


def test_many_pipelined_requests_in_one_read_are_answered_in_order(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    kinds = [post, chunked, lambda body, request_id: get(request_id)]
    wire = b"".join(kinds[n % 3](b'{"n": %d}' % n, f"p-{n}") for n in range(60))

    protocol.dataReceived(wire)

    answers = parse_responses(transport.value())
    assert [headers["x-request-id"] for _, headers, _ in answers] == [f"p-{n}" for n in range(60)]
    assert {status for status, _, _ in answers} == {200}
    assert [received.body for received in model.received] == [b'{"n": %d}' % n for n in range(60) if n % 3 != 2]
    assert not transport.disconnecting
    close(protocol)


def test_pipelined_requests_wait_for_the_answer_before_them(clock):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(post(b"{}", "first") + post(b"[]", "second") + get("third"))

    assert len(model.received) == 1  # the second is held, not read, while the first is answered
    assert transport.value() == b""
    model.pending[0].callback(ModelAnswer(status=200, body=b'{"n": 1}', headers={}))
    assert ids(transport.value()) == ["first"]
    assert [received.body for received in model.received] == [b"{}", b"[]"]
    model.pending[0].callback(ModelAnswer(status=200, body=b'{"n": 2}', headers={}))

    assert ids(transport.value()) == ["first", "second", "third"]
    close(protocol)


def test_pipelined_requests_past_16_kib_pause_the_transport_until_the_answer(clock):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(post(b"{}", "held"))
    assert transport.producerState == "producing"

    more = [get(f"g-{n}") for n in range(400)]  # about 20 KiB
    for request in more:
        protocol.dataReceived(request)
    assert transport.producerState == "paused"
    model.pending[0].callback(ModelAnswer(status=200, body=b"{}", headers={}))

    assert transport.producerState == "producing"
    assert ids(transport.value()) == ["held"] + [f"g-{n}" for n in range(400)]
    close(protocol)


def test_a_pipelined_request_after_a_413_is_not_read(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    big = b"[" + b"1," * LIMIT + b"1]"
    protocol.dataReceived(post(big, "too-big") + get("after"))
    protocol.dataReceived(get("later"))

    assert "the limit is 1024 bytes" in assert_refused(transport, 413, "payload_too_large")
    assert model.received == []
    close(protocol)


def test_a_pipelined_request_after_a_chunk_over_the_limit_is_not_read(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(POST + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (LIMIT + 1) + get("after"))

    assert_refused(transport, 413, "payload_too_large")
    assert model.received == []
    close(protocol)


def test_what_follows_a_connection_close_request_is_not_read(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(post(b"{}", "last", b"Connection: close\r\n") + post(b"[]", "never"))

    [(status, headers, _)] = parse_responses(transport.value())
    assert (status, headers["x-request-id"], headers["connection"]) == (200, "last", "close")
    assert transport.disconnecting
    assert [received.body for received in model.received] == [b"{}"]
    close(protocol)


def test_an_http_1_0_connection_is_not_kept_even_if_it_asks(clock):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"GET /health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + get("never"))

    [(status, _, _)] = parse_responses(transport.value())
    assert status == 200
    assert transport.value().startswith(b"HTTP/1.0 200 ")
    assert transport.disconnecting
    close(protocol)


def test_empty_lines_before_a_request_are_skipped_even_split_between_reads(clock):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    for part in (b"\r\n\r\n" + get("one"), b"\r", b"\n" + get("two")[:5], get("two")[5:] + b"\r\n"):
        protocol.dataReceived(part)

    assert ids(transport.value()) == ["one", "two"]
    assert not transport.disconnecting
    close(protocol)


def test_expect_continue_on_a_pipelined_request_comes_when_it_is_read(clock):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(post(b"{}", "first") + POST + b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b""
    model.pending[0].callback(ModelAnswer(status=200, body=b"{}", headers={}))

    raw = transport.value()
    status, _, _, after = parse_response(raw)
    assert status == 200 and after == b"HTTP/1.1 100 Continue\r\n\r\n"
    close(protocol)


# --- the head's limits, as it comes --------------------------------------------------------------


def test_a_request_line_over_16_kib_in_pieces_is_414_once_it_is_too_long(clock):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"GET /get/models?x=")
    for _ in range(16):
        protocol.dataReceived(b"a" * 1000)
    assert transport.value() == b""
    protocol.dataReceived(b"a" * 1000)

    assert_refused(transport, 414, "uri_too_long")
    close(protocol)


def test_a_header_that_never_ends_is_431_once_the_head_is_too_large(clock):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    for _ in range(16):
        protocol.dataReceived(b"a" * 1000)
    assert transport.value() == b""
    protocol.dataReceived(b"a" * 1000)  # past 16 KiB: it is not held any longer

    assert_refused(transport, 431, "headers_too_large")
    close(protocol)


def test_a_head_just_under_the_limit_is_served(clock):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    # Twisted's count: the lines without their CRLFs, 16384 bytes in all.
    line = b"GET /health/live HTTP/1.1"
    headers = [b"Host: x"] + [b"X-H%02d: %s" % (n, b"a" * 990) for n in range(16)]
    used = len(line) + sum(len(header) for header in headers)
    headers.append(b"X-Last: " + b"b" * (16384 - used - len(b"X-Last: ")))
    protocol.dataReceived(b"\r\n".join([line, *headers]) + b"\r\n\r\n")

    assert transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:200]
    close(protocol)


# --- smuggling and strictness --------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",        # a coding not done, before chunked
    POST + b"Transfer-Encoding: identity\r\n\r\n",                      # (Twisted took it as no body)
    POST + b"TRANSFER-ENCODING: gzip, chunked\r\n\r\n0\r\n\r\n",        # a header's name in any case
    POST + b"transfer-encoding: identity\r\n\r\n",
    POST + b"Content-Length: 2\r\ntransfer-ENCODING: chunked\r\n\r\n0\r\n\r\n",
    POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    POST + b"Transfer-Encoding: chunked\r\ncontent-length: 2\r\n\r\n0\r\n\r\n",
    POST + b"Content-Length: 2\r\ncontent-length: 3\r\n\r\n{}",
    POST + b"Content-Length: +2\r\n\r\n{}",
    POST + b"Content-Length: 2 2\r\n\r\n{}",
    POST + b"Content-Length: 99999999999999999999999\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n",   # obs-fold
    b"GET /health/live HTTP/1.1\r\nHost : x\r\n\r\n",                         # whitespace before the colon
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",           # NUL in a value
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: a\x1bb\r\n\r\n",           # a control character
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",             # a bare CR
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: a\n\r\n",                  # a bare LF ending a header
    b"GET /health/live HTTP/1.1\r\nHost: x\r\nX\x01A: 1\r\n\r\n",             # a control character in a name
    b"GET /health/live HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET /health/live HTTP/0.9\r\nHost: x\r\n\r\n",
    b"GET /health/live HTTP/1.2\r\nHost: x\r\n\r\n",
    b"GET /health/live HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\nGET /health/live HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_what_could_smuggle_a_request_is_400_in_the_error_shape(clock, raw):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(raw)

    assert_refused(transport, 400, "bad_request")
    assert model.received == []
    close(protocol)


def test_a_method_llhttp_does_not_know_is_400_in_the_routes_shape(clock):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"BREW /v2/models/m HTTP/1.1\r\nHost: x\r\n\r\n")

    assert "not valid HTTP/1.1" in assert_refused(transport, 400, v2=True)
    close(protocol)

    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"BREW /v2/models/m HTTP/1.1 extra\r\nHost: x\r\n\r\n")
    assert_refused(transport, 400, "bad_request")  # not a request line: the daemon's own shape
    close(protocol)


def test_an_upgrade_request_is_served_and_its_body_read_as_its_body(clock):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    inside = get("smuggled", b"/get/models")
    protocol.dataReceived(post(inside, "upgrade", b"Connection: Upgrade\r\nUpgrade: h2c\r\n") + get("next"))

    # The body (not JSON: a 400 from the route) is the request's, not a request of its own.
    answers = parse_responses(transport.value())
    assert [(status, headers["x-request-id"]) for status, headers, _ in answers] == [(400, "upgrade"), (200, "next")]
    assert "not valid JSON" in json.loads(answers[0][2])["error"]["message"]
    close(protocol)


def test_a_connect_request_is_answered_in_the_error_shape_and_the_connection_kept(clock):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n" + get("next"))

    answers = parse_responses(transport.value())
    assert answers[0][0] >= 400
    assert json.loads(answers[0][2])["error"]
    assert [headers["x-request-id"] for _, headers, _ in answers[1:]] == ["next"]
    close(protocol)


@pytest.mark.parametrize("name", [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING", b"tRaNsFeR-eNcOdInG"])
def test_a_chunked_body_is_read_as_chunked_whatever_the_case_of_its_header(clock, name):
    model = FakeModel("m", clock).answers()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(POST + name + b": chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n" + get("after"))

    assert [status for status, _, _ in parse_responses(transport.value())] == [200, 200]
    assert [received.body for received in model.received] == [b"{}"]
    close(protocol)


@pytest.mark.parametrize("name", [b"Expect", b"expect", b"EXPECT"])
def test_expect_continue_is_answered_whatever_the_case_of_its_header(clock, name):
    site = make_site(clock)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(POST + b"Content-Length: 2\r\n" + name + b": 100-continue\r\n\r\n")

    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.dataReceived(b"{}")
    assert parse_responses(transport.value()[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])[0][0] == 200
    close(protocol)


@pytest.mark.parametrize("name", [b"Cookie", b"cookie", b"COOKIE"])
def test_cookies_are_parsed_whatever_the_case_of_their_header(clock, name):
    model = FakeModel("m", clock).holds()
    site = make_site(clock, model)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(post(b"{}", "r1", name + b": a=1; b=2\r\n"))

    assert protocol.requests[0].received_cookies == {b"a": b"1", b"b": b"2"}
    close(protocol)
    assert model.cancelled  # (its held request, cancelled with the connection)
