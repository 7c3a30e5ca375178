"""
aibackend.server: an answer's head made in one join (issue 16, "one core"), with the site's
Server and Date (the Date made once a second), a request's query parsed only when read,
and the relay's answer cancelled when its client leaves, without a notifyFinish Deferred.

On a Clock and a StringTransport: the site's real channel and request.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.server import version as twisted_version

from aibackend.server import LARGE, AibackendSite, answer_head, http_date
from aibackend.testing import FakeModel, StubFrontDoor, connect_channel, parse_responses


def post(body: bytes = b'{"a": 1}', request_id: str = "r-1", path: bytes = b"/post/predict?id=m") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n" % (path, request_id.encode(), len(body)) + body)


def head_lines(raw: bytes) -> list[bytes]:
    return raw.partition(b"\r\n\r\n")[0].split(b"\r\n")


def door_site(clock, model):
    door = StubFrontDoor(clock, [model])
    return AibackendSite(door.front_door.resource(), max_body_bytes=1 << 20, reactor=clock, header_timeout=10)


def close(protocol):
    protocol.connectionLost(Failure(ConnectionDone()))


def test_the_hot_paths_answer_has_one_server_and_date_and_its_own_headers(clock):
    model = FakeModel("m", clock).answers(201, b'{"from": "the model"}')
    protocol, transport = connect_channel(door_site(clock, model))

    protocol.dataReceived(post(request_id="one"))

    raw = transport.value()
    lines = head_lines(raw)
    assert lines[0] == b"HTTP/1.1 201 Created"
    assert lines[1] == b"Server: " + twisted_version  # first, as Twisted sets them
    assert lines[2].startswith(b"Date: ")
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert sorted(names) == [b"content-length", b"content-type", b"date", b"server", b"x-request-id"]
    [(status, headers, body)] = parse_responses(raw)
    assert (status, body) == (201, b'{"from": "the model"}')
    assert headers["content-length"] == str(len(body))
    assert headers["x-request-id"] == "one"
    assert headers["content-type"] == "application/json"
    close(protocol)


def test_every_answer_of_a_kept_connection_has_its_head(clock):
    """The Klein routes' answers too (Twisted's write, then the channel's writeHeaders)."""
    model = FakeModel("m", clock).answers()
    protocol, transport = connect_channel(door_site(clock, model))

    protocol.dataReceived(post(request_id="a") + b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                          + b"GET /no/such/route HTTP/1.1\r\nHost: x\r\n\r\n" + post(request_id="b"))

    answers = parse_responses(transport.value())
    assert [status for status, _, _ in answers] == [200, 200, 404, 200]
    for raw in transport.value().split(b"HTTP/1.1 ")[1:]:
        names = [line.split(b":", 1)[0] for line in head_lines(raw)[1:]]
        assert names.count(b"Server") == names.count(b"Date") == 1, names
    close(protocol)


def test_the_date_is_the_http_date_of_now():
    before = datetimeToString()
    date = http_date()
    after = datetimeToString()
    assert date in (before, after)
    assert http_date() in (date, datetimeToString())


def test_a_server_or_date_a_resource_set_is_not_doubled():
    headers = Headers({b"Date": [b"Tue, 01 Dec 2026 00:00:00 GMT"], b"Content-Type": [b"text/plain"],
                       b"Content-Length": [b"2"]})
    head = answer_head(b"HTTP/1.1", 200, b"OK", headers, True)
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK", b"Server: " + twisted_version, b"Date: Tue, 01 Dec 2026 00:00:00 GMT",
        b"Content-Type: text/plain", b"Content-Length: 2", b"", b"",
    ]
    headers.setRawHeaders(b"Server", [b"mine"])
    assert answer_head(b"HTTP/1.0", 404, b"Not Found", headers).split(b"\r\n")[:4] == [
        b"HTTP/1.0 404 Not Found", b"Date: Tue, 01 Dec 2026 00:00:00 GMT", b"Content-Type: text/plain",
        b"Content-Length: 2",
    ]


def test_a_head_without_a_type_or_a_length_is_left_to_twisted():
    assert answer_head(b"HTTP/1.1", 200, b"OK", Headers({b"Content-Type": [b"a/b"]}), True) is None
    assert answer_head(b"HTTP/1.1", 200, b"OK", Headers({b"Content-Length": [b"1"]}), True) is None


class Writes(Resource):
    """Answers as a test says: C{then(request)} writes the answer."""

    isLeaf = True

    def __init__(self, then):
        super().__init__()
        self.then = then
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return self.then(request)


def resource_site(clock, then):
    resource = Writes(then)
    return resource, AibackendSite(resource, max_body_bytes=1 << 20, reactor=clock, header_timeout=10)


def test_a_large_answer_and_one_without_a_length_are_whole(clock):
    big = b"x" * (LARGE + 10)

    def then(request):
        if request.path == b"/big":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(big))
            request.write(big)
            request.finish()
            return NOT_DONE_YET
        request.write(b"chunk")  # no length: chunked, as Twisted frames it
        request.finish()
        return NOT_DONE_YET

    _, site = resource_site(clock, then)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /small HTTP/1.1\r\nHost: x\r\n\r\n")

    raw = transport.value()
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert rest[:len(big)] == big
    assert b"Content-Length: %d" % len(big) in first.split(b"\r\n")
    second = rest[len(big):]
    lines = head_lines(second)
    assert b"Transfer-Encoding: chunked" in lines
    assert b"Content-Type: text/html" in lines  # Twisted's default type
    assert second.endswith(b"\r\n\r\n5\r\nchunk\r\n0\r\n\r\n")
    assert [line.split(b":")[0] for line in lines].count(b"Date") == 1
    close(protocol)


def test_a_head_request_gets_no_body(clock):
    def then(request):
        request.setHeader(b"content-type", b"application/json")
        return b'{"a": 1}'

    _, site = resource_site(clock, then)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n")

    raw = transport.value()
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 8" in first.split(b"\r\n")
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # no body after the HEAD's head
    assert rest.endswith(b'\r\n\r\n{"a": 1}')
    close(protocol)


@pytest.mark.parametrize("query", [b"", b"?", b"?a=1&b=2;c=%41&a=x+y&empty=", b"?id=m?type=httpmodel"])
def test_a_requests_args_are_twisteds(clock, query):
    def then(request):
        return b"{}"

    resource, site = resource_site(clock, then)
    protocol, transport = connect_channel(site)
    protocol.dataReceived(b"GET /p%s HTTP/1.1\r\nHost: x\r\n\r\n" % query)

    [request] = resource.requests
    assert request.path == b"/p"
    assert request.args == parse_qs(query[1:], 1)
    request.args = {b"set": [b"by hand"]}
    assert request.args == {b"set": [b"by hand"]}
    close(protocol)


def test_a_client_that_leaves_cancels_its_answer_once(clock):
    model = FakeModel("m", clock).holds()
    protocol, transport = connect_channel(door_site(clock, model))
    protocol.dataReceived(post(request_id="leaving"))
    assert len(model.pending) == 1

    close(protocol)

    assert [received.context.request_id for received in model.cancelled] == ["leaving"]
    assert transport.value() == b""


def test_an_answered_request_is_not_cancelled_when_its_connection_goes(clock):
    from aibackend.interfaces import ModelAnswer

    model = FakeModel("m", clock).holds()
    protocol, transport = connect_channel(door_site(clock, model))
    protocol.dataReceived(post(request_id="done"))
    model.pending[0].callback(ModelAnswer(200, b'{"late": true}'))

    close(protocol)

    assert model.cancelled == []
    [(status, headers, body)] = parse_responses(transport.value())
    assert (status, headers["x-request-id"], body) == (200, "done", b'{"late": true}')


def test_a_transport_is_resumed_after_a_request_only_if_it_was_paused(clock):
    from aibackend.interfaces import ModelAnswer

    model = FakeModel("m", clock).holds()
    protocol, transport = connect_channel(door_site(clock, model))
    resumed = []
    original = transport.resumeProducing
    transport.resumeProducing = lambda: (resumed.append(True), original())

    protocol.dataReceived(post(request_id="plain"))
    model.pending[0].callback(ModelAnswer(200, b"{}"))
    assert resumed == []  # never paused: not resumed at each request

    # Pipelined requests held past 16 KiB pause it: resumed once the request before is done.
    protocol.dataReceived(post(request_id="first"))
    protocol.dataReceived(post(b'{"pad": "%s"}' % (b"x" * 20000), "second"))
    assert transport.producerState == "paused"
    model.pending[0].callback(ModelAnswer(200, b"{}"))
    assert transport.producerState == "producing"
    assert len(resumed) == 1
    model.pending[0].callback(ModelAnswer(200, b"{}"))
    assert [headers["x-request-id"] for _, headers, _ in parse_responses(transport.value())] == [
        "plain", "first", "second"]
    assert len(resumed) == 1
    close(protocol)
