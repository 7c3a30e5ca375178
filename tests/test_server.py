"""
aibackend.server: the daemon's Site, and the request body limit (413).

In memory through L{StubFrontDoor} where that is enough, and over a real socket on 127.0.0.1
(a port the system picks) where the bytes on the wire matter: chunked bodies, the answer
going out before the body is read, Connection: close, a client that goes away.
"""

import json
import re

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from aibackend.ids import request_id_from_headers
from aibackend.testing import HEX32, FakeModel, StubFrontDoor, parse_response, parse_responses

LIMIT = 1024


# --- in memory ------------------------------------------------------------------------


@pytest.fixture
def model(clock):
    return FakeModel("m", clock)


@pytest.fixture
def door(clock, model):
    return StubFrontDoor(clock, [model], max_body_bytes=LIMIT)


def test_a_body_at_the_limit_is_accepted(door, model):
    body = b'{"t": "' + b"a" * (LIMIT - 9) + b'"}'
    assert len(body) == LIMIT

    response = door.call("POST", "/post/predict?id=m", data=body)

    assert response.status == 200
    assert model.received[0].body == body


def test_a_body_over_the_limit_is_413_in_the_error_shape(door, model):
    response = door.call(
        "POST", "/post/predict?id=m", data=b"[" + b"1," * LIMIT + b"1]", headers={"X-Request-Id": "big-1"}
    )

    assert response.status == 413
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Request-Id") == "big-1"
    assert response.json() == {
        "error": {
            "type": "payload_too_large",
            "message": f"the request body is {2 * LIMIT + 3} bytes; the limit is {LIMIT} bytes",
            "request_id": "big-1",
        }
    }
    assert model.received == []


def test_the_site_shows_no_tracebacks_and_parses_no_forms(door):
    assert door.site.displayTracebacks is False
    assert door.site._parsePOSTFormSubmission is False


# --- over a real socket ------------------------------------------------------------------


class Collect(Protocol):
    """Keeps every byte the server sends; C{done} fires with them when it closes."""

    def __init__(self):
        self.data = b""
        self.done = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


async def exchange(port: int, *writes: bytes, deadline: float = 5.0) -> bytes:
    """
    Connect to 127.0.0.1:C{port}, write C{writes}, and read until the server closes
    (failing if it does not within C{deadline} seconds).
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Collect())
    for data in writes:
        protocol.transport.write(data)
    done = protocol.done
    timer = reactor.callLater(deadline, protocol.transport.abortConnection)
    data = await done
    if not timer.active():
        pytest.fail(f"the server did not close the connection within {deadline} s; it sent {data[:300]!r}")
    timer.cancel()
    return data


@pytest.fixture
def listening():
    """
    The daemon's Site with a fake model "m", listening on 127.0.0.1 (a free port).

    @return: (port number, the model)
    """
    from twisted.internet import reactor

    from aibackend.root import FrontDoor
    from aibackend.registry import ModelDeps, ModelRegistry
    from aibackend.server import AibackendSite

    model = FakeModel("m", reactor)
    registry = ModelRegistry(ModelDeps(reactor=reactor, environ={}))
    registry.add(model)
    site = AibackendSite(FrontDoor(registry, reactor).resource(), max_body_bytes=LIMIT)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield port.getHost().port, model
    pytest_twisted.blockon(port.stopListening())


def post_head(length=None, *, chunked=False, extra=b""):
    head = b"POST /post/predict?id=m HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n"
    if length is not None:
        head += b"Content-Length: " + str(length).encode() + b"\r\n"
    return head + extra + b"Connection: close\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def assert_413(raw, request_id=None):
    status, headers, body, after = parse_response(raw)
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "payload_too_large"
    assert f"the limit is {LIMIT} bytes" in error["message"]
    assert headers["x-request-id"] == error["request_id"]
    if request_id is not None:
        assert error["request_id"] == request_id
    else:
        assert HEX32.match(error["request_id"])
    return error, after


@pytest_twisted.ensureDeferred
async def test_a_content_length_over_the_limit_is_refused_before_the_body(listening):
    port, model = listening

    # Only the head: the answer must not wait for a body it will never read.
    raw = await exchange(port, post_head(LIMIT + 1, extra=b"X-Request-Id: announced-too-big\r\n"))

    error, after = assert_413(raw, "announced-too-big")
    assert error["message"] == f"the request body is {LIMIT + 1} bytes; the limit is {LIMIT} bytes"
    assert after == b""
    assert model.received == []


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_over_the_limit_is_refused(listening):
    port, model = listening

    raw = await exchange(port, post_head(chunked=True), chunk(b"[" + b"1," * 400), chunk(b"1," * 400))

    error, _ = assert_413(raw)
    assert error["message"] == f"the request body is more; the limit is {LIMIT} bytes"
    assert model.received == []


@pytest_twisted.ensureDeferred
async def test_a_body_under_the_limit_is_accepted(listening):
    port, model = listening
    body = b'{"text": "' + b"a" * 500 + b'"}'

    raw = await exchange(port, post_head(len(body), extra=b"X-Request-Id: small-1\r\n") + body)

    status, headers, answer, _ = parse_response(raw)
    assert status == 200
    assert json.loads(answer) == {"ok": True}
    assert headers["x-request-id"] == "small-1"
    assert [received.body for received in model.received] == [body]


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_under_the_limit_is_accepted(listening):
    port, model = listening

    raw = await exchange(port, post_head(chunked=True) + chunk(b'{"a": ') + chunk(b"1}") + b"0\r\n\r\n")

    status, _, _, _ = parse_response(raw)
    assert status == 200
    assert [received.body for received in model.received] == [b'{"a": 1}']


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_in_one_write_and_one_in_bytes_are_answered_in_order(listening):
    port, model = listening
    head = b"POST /post/predict?id=m HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    bodies = [b'{"n": %d}' % n for n in range(30)]
    pipelined = b"".join(head + b"X-Request-Id: pipe-%d\r\nContent-Length: %d\r\n\r\n%s" % (n, len(body), body)
                         for n, body in enumerate(bodies))
    last = head + b"X-Request-Id: pipe-last\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunk(
        b'{"n": "last"}') + b"0\r\n\r\n"

    # The last request comes a byte a write (the client's writes may still be joined on the way).
    raw = await exchange(port, pipelined, *(last[i:i + 1] for i in range(len(last))))

    answers = parse_responses(raw)
    assert [headers["x-request-id"] for _, headers, _ in answers] == [f"pipe-{n}" for n in range(30)] + ["pipe-last"]
    assert {status for status, _, _ in answers} == {200}
    assert [received.body for received in model.received] == bodies + [b'{"n": "last"}']


@pytest_twisted.ensureDeferred
async def test_expect_continue_over_the_limit_gets_only_the_413(listening):
    port, _ = listening

    raw = await exchange(port, post_head(LIMIT * 10, extra=b"Expect: 100-continue\r\n"))

    _, after = assert_413(raw)
    assert after == b""


@pytest_twisted.ensureDeferred
async def test_expect_continue_under_the_limit_continues(listening):
    port, model = listening
    body = b'{"a": 1}'

    raw = await exchange(port, post_head(len(body), extra=b"Expect: 100-continue\r\n") + body)

    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    status, _, _, _ = parse_response(raw[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
    assert status == 200
    assert [received.body for received in model.received] == [body]


@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_away_cancels_the_models_request(listening, logged_errors):
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.task import deferLater

    port, model = listening
    model.holds()
    protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Collect())
    protocol.transport.write(post_head(2, extra=b"X-Request-Id: leaving\r\n") + b"{}")
    for _ in range(500):
        if model.pending:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert len(model.pending) == 1

    protocol.transport.loseConnection()
    await protocol.done
    for _ in range(500):
        if model.cancelled:
            break
        await deferLater(reactor, 0.01, lambda: None)

    assert [received.context.request_id for received in model.cancelled] == ["leaving"]
    [entry] = [entry for entry in model.model_log.query() if entry["event"] == "request"]
    assert (entry["request_id"], entry["status"]) == ("leaving", 499)
    assert logged_errors.events == []


def test_request_ids_from_headers():
    from twisted.web.http_headers import Headers

    assert request_id_from_headers(Headers({b"X-Request-Id": [b"abc-123"]})) == "abc-123"
    assert HEX32.match(request_id_from_headers(Headers({})))
    assert HEX32.match(request_id_from_headers(Headers({b"X-Request-Id": [b""]})))
    assert HEX32.match(request_id_from_headers(Headers({b"X-Request-Id": [b"a" * 201]})))
    assert request_id_from_headers(Headers({b"X-Request-Id": [b"a" * 200]})) == "a" * 200


# --- the header deadline, on a clock ---------------------------------------------------


def connect(site):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    protocol.makeConnection(transport)
    return protocol, transport


@pytest.fixture
def timed_site(clock):
    from aibackend.server import AibackendSite

    door = StubFrontDoor(clock, [FakeModel("m", clock).answers()])
    site = AibackendSite(door.front_door.resource(), max_body_bytes=LIMIT, reactor=clock, header_timeout=10)
    return site


GET = b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n"


def test_headers_that_do_not_come_in_time_get_408(timed_site, clock):
    protocol, transport = connect(timed_site)
    protocol.dataReceived(b"GET /health/live HTTP/1.1\r\nHost: loc")

    clock.advance(9.9)
    assert transport.value() == b""
    clock.advance(0.2)

    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout")
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_the_deadline_counts_from_each_requests_first_byte(timed_site, clock):
    protocol, transport = connect(timed_site)
    protocol.dataReceived(GET)
    assert transport.value().startswith(b"HTTP/1.1 200")
    transport.clear()

    clock.advance(9)  # idle between requests: no deadline runs
    protocol.dataReceived(b"GET /health/live HTTP/1.1\r\n")
    clock.advance(9)  # the timer set at the first request fires, and waits for what is left
    assert transport.value() == b""
    clock.advance(2)

    assert transport.value().startswith(b"HTTP/1.1 408")
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_many_requests_on_a_connection_keep_one_timer(timed_site, clock):
    protocol, transport = connect(timed_site)

    for _ in range(50):
        protocol.dataReceived(GET)
        clock.advance(0.1)
    live = [call for call in clock.getDelayedCalls() if call.active()]

    assert transport.value().count(b"HTTP/1.1 200") == 50
    assert len(live) <= 2  # the header timer, and the idle timeout's
    clock.advance(20)
    assert b"408" not in transport.value()
    protocol.connectionLost(None)


def test_a_request_is_made_as_twisteds_request_init_makes_it(clock):
    """BoundedRequest.__init__ sets in one call what Twisted's Request.__init__ does (what any Twisted release sets)."""
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web.server import Request

    from aibackend.server import AibackendSite, BoundedRequest

    site = AibackendSite(StubFrontDoor(clock).front_door.resource(), max_body_bytes=LIMIT, reactor=clock)
    channel, _ = connect(site)
    ours = BoundedRequest(channel)
    twisteds = BoundedRequest.__new__(BoundedRequest)
    Request.__init__(twisteds, channel)

    def state(request):
        names = [name for cls in BoundedRequest.__mro__ for name in getattr(cls, "__slots__", ()) if name != "__dict__"]
        slots = {name: getattr(request, name) for name in names if hasattr(request, name)}
        return slots, dict(vars(request))

    assert state(ours) == state(twisteds)
    assert ours.transport is channel.transport and ours.channel is channel
    channel.connectionLost(Failure(ConnectionDone()))  # (its timer cancelled)


@pytest.mark.parametrize("raw", [
    b"POST /post/predict?id=m HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /post/predict?id=ghost HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"HEAD /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /health/live HTTP/1.0\r\nHost: localhost\r\n\r\n",
], ids=["predict", "not found", "klein", "head", "http/1.0"])
def test_finish_answers_logs_and_lets_the_next_request_in_as_twisteds_does(clock, monkeypatch, raw):
    """BoundedRequest.finish's own path (an answer written whole) against Twisted's Request.finish."""
    from twisted.logger import globalLogPublisher
    from twisted.web.server import Request

    from aibackend.server import AibackendSite, BoundedRequest

    def serve():
        site = AibackendSite(StubFrontDoor(clock, [FakeModel("m", clock).answers()]).front_door.resource(),
                             max_body_bytes=LIMIT, reactor=clock, header_timeout=0, timeout=None)
        events = []

        def observer(event):
            if event.get("log_namespace") == "aibackend.access":
                events.append({key: event[key] for key in ("method", "path", "status", "bytes")})

        globalLogPublisher.addObserver(observer)
        try:
            channel, transport = connect(site)
            channel.dataReceived(raw + raw)  # the second one pipelined: let in once the first is done
        finally:
            globalLogPublisher.removeObserver(observer)
        # (each answer's Date, and each request's id)
        answers = re.sub(rb"[0-9a-f]{32}", b"ID", re.sub(rb"Date: [^\r]*", b"Date: -", transport.value()))
        return answers, events, channel.requests, transport.disconnecting

    ours = serve()
    monkeypatch.setattr(BoundedRequest, "finish", Request.finish)
    assert ours == serve()
    assert len(ours[1]) == (1 if b"HTTP/1.0" in raw else 2)
