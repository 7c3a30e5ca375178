"""
aibackend.client: the lean HTTP/1.1 client of the hot path, over in-memory transports;
its streams too (a request given a head: aibackend.streambody's readers fed as the body
comes), whose real-socket tests are in test_client_streaming.py.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from aibackend.client import DRAIN_SECONDS, LeanClient, ResponseTooLarge
from aibackend.streambody import BadStream, reader_for
from aibackend.testing import failure_of, has_fired, result_of

URI = b"http://127.0.0.1:9001/predict?x=1"
REQUEST = b"POST /predict?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nContent-Length: 2\r\n\r\n{}"


class Transport(StringTransport):
    def __init__(self):
        super().__init__()
        self.connected = True
        self.aborted = False

    def loseConnection(self):
        super().loseConnection()
        self.connected = False

    def abortConnection(self):
        self.aborted = True
        self.connected = False


class Endpoint:
    def __init__(self, endpoints):
        self.endpoints = endpoints

    def connect(self, factory):
        if self.endpoints.refuse:
            from twisted.internet.defer import fail

            return fail(ConnectionRefusedError("refused"))
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.endpoints.made.append((protocol, transport))
        return succeed(protocol)


class Endpoints:
    """An IAgentEndpointFactory whose connections are StringTransports."""

    def __init__(self):
        self.made = []
        self.asked = []
        self.refuse = False

    def endpointForURI(self, uri):
        self.asked.append((uri.scheme, uri.host, uri.port))
        return Endpoint(self)


@pytest.fixture
def endpoints():
    return Endpoints()


@pytest.fixture
def client(clock, endpoints):
    client = LeanClient(clock, endpoints)
    yield client
    client.close()  # the idle connections' timers go with them


def answer(client, endpoints, data: bytes, *, limit=1000, index=-1):
    d = client.request(URI, REQUEST, limit)
    protocol, transport = endpoints.made[index]
    if data:
        protocol.dataReceived(data)
    return d, protocol, transport


def test_a_request_is_written_in_one_go_and_its_answer_read(client, endpoints):
    d, protocol, transport = answer(
        client, endpoints, b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nRetry-After: 3\r\n"
                           b"Content-Length: 12\r\n\r\n{\"ok\": true}")

    response, body = result_of(d)

    assert transport.value() == REQUEST
    assert (response.code, body) == (201, b'{"ok": true}')
    assert response.headers.getRawHeaders(b"Retry-After") == [b"3"]
    assert response.headers.getRawHeaders(b"x-missing", [b"none"]) == [b"none"]
    assert endpoints.asked == [(b"http", b"127.0.0.1", 9001)]


def test_a_kept_alive_connection_is_used_again(client, endpoints, clock):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    first, protocol, transport = answer(client, endpoints, ok)
    result_of(first)
    second = client.request(URI, REQUEST, 1000)
    protocol.dataReceived(ok)

    assert result_of(second)[1] == b"{}"
    assert len(endpoints.made) == 1
    assert transport.value() == REQUEST + REQUEST


def test_a_kept_alive_connections_answers_one_after_another_are_each_read_whole(client, endpoints):
    # One llhttp parser reads the plain answers of a kept-alive connection, one after
    # another: none leaks into the next, whatever its framing and however it is split.
    answers = [
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 200, b"{}"),
        (b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1]\r\n0\r\n\r\n", 503,
         b"[1]"),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ntrue",
         201, b"true"),
    ]
    first, protocol, transport = answer(client, endpoints, answers[0][0])
    assert result_of(first)[0].code == 200
    for raw, code, body in answers * 2:
        for split in (1, len(raw) // 2, len(raw) - 1):
            d = client.request(URI, REQUEST, 1000)
            protocol.dataReceived(raw[:split])
            assert not has_fired(d)
            protocol.dataReceived(raw[split:])
            answer_, got = result_of(d)
            assert (answer_.code, got) == (code, body), (raw, split)
            assert answer_.headers.getRawHeaders(b"link") is None
            assert (answer_.headers.getRawHeaders(b"retry-after") == [b"2"]) == (code == 503)
    assert len(endpoints.made) == 1 and transport.connected
    # A stream on it, then a plain answer again.
    stream = client.request(URI, REQUEST, 1000, lambda answer, transport: None)
    protocol.dataReceived(answers[1][0])
    assert result_of(stream)[1] == b"[1]"
    d = client.request(URI, REQUEST, 1000)
    protocol.dataReceived(answers[0][0])
    assert result_of(d)[1] == b"{}"
    assert len(endpoints.made) == 1 and transport.connected


def test_an_idle_connection_is_closed_after_a_while(client, endpoints, clock):
    d, protocol, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    result_of(d)

    clock.advance(119)
    assert transport.connected
    clock.advance(2)
    assert not transport.connected


def test_a_connection_the_server_closes_while_idle_is_not_used_again(client, endpoints):
    d, protocol, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    result_of(d)
    transport.connected = False
    protocol.connectionLost(Failure(ConnectionDone()))

    client.request(URI, REQUEST, 1000)

    assert len(endpoints.made) == 2


@pytest.mark.parametrize("close", [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
                                   b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"])
def test_a_connection_the_server_will_close_is_not_kept(client, endpoints, close):
    d, protocol, transport = answer(client, endpoints, close)

    assert result_of(d)[1] == b"{}"
    assert not transport.connected
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2


def test_a_chunked_answer_is_read_whole(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n")
    assert not has_fired(d)
    protocol.dataReceived(b"3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")

    assert result_of(d)[1] == b'{"a": 1}'


def test_an_answer_that_runs_until_the_connection_closes_is_read_whole(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"HTTP/1.0 200 OK\r\n\r\n{\"a\": ")
    protocol.dataReceived(b"1}")
    protocol.connectionLost(Failure(ConnectionDone()))

    assert result_of(d)[1] == b'{"a": 1}'


def test_an_answer_cut_short_is_a_failed_response(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\"")
    protocol.connectionLost(Failure(ConnectionLost()))

    failure_of(d, ResponseFailed)


def test_a_connection_closed_before_any_answer_is_a_response_never_received(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"")
    protocol.connectionLost(Failure(ConnectionDone()))

    failure_of(d, ResponseNeverReceived)


def test_an_answer_that_is_not_http_is_a_failed_response(client, endpoints):
    d, _, transport = answer(client, endpoints, b"SSH-2.0-OpenSSH\r\n\r\n")

    failure_of(d, ResponseFailed)
    assert transport.aborted


def test_an_answer_longer_than_the_limit_fails_without_being_kept(client, endpoints):
    d, _, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"x" * 20,
                             limit=10)

    failure_of(d, ResponseTooLarge)
    assert transport.aborted


def test_cancelling_aborts_the_connection(client, endpoints):
    d, protocol, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    d.cancel()
    protocol.dataReceived(b"{}")  # the rest of an answer nobody wants

    failure_of(d)
    assert transport.aborted
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2


def test_a_refused_connection_fails_the_request(client, endpoints):
    endpoints.refuse = True

    failure_of(client.request(URI, REQUEST, 1000), ConnectionRefusedError)


def test_close_closes_the_idle_connections(client, endpoints):
    d, _, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    result_of(d)

    client.close()

    assert not transport.connected


def test_a_connection_freed_after_close_is_closed_not_kept(client, endpoints, clock):
    d = client.request(URI, REQUEST, 1000)
    protocol, transport = endpoints.made[-1]
    client.close()  # the model stops while its answer is on its way

    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    assert result_of(d)[1] == b"{}"
    assert not transport.connected and clock.getDelayedCalls() == []
    client.request(URI, REQUEST, 1000)  # started again: a new connection, kept as before
    assert len(endpoints.made) == 2


# --- streams (a request given head) -------------------------------------------------------


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunks(*pieces: bytes) -> bytes:
    """The pieces in chunked transfer-encoding."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)


def chunked(*pieces: bytes) -> bytes:
    """The pieces in chunked transfer-encoding, and its end."""
    return chunks(*pieces) + b"0\r\n\r\n"


class Reading:
    """A stream's head: a streambody reader for events or lines (their texts kept), else None."""

    def __init__(self, limit=1000):
        self.limit = limit
        self.texts = []
        self.heads = []

    def __call__(self, answer, transport):
        self.heads.append((answer.code, transport))
        content_types = answer.headers.getRawHeaders(b"content-type")
        reader = reader_for(content_types[0]) if content_types and answer.code < 300 else None
        if reader is None:
            return None
        return reader(lambda value, text: self.texts.append(text), self.limit, "m")


def begin_stream(client, endpoints, data=b"", *, limit=1000):
    reading = Reading(limit)
    d = client.request(URI, REQUEST, limit, reading)
    protocol, transport = endpoints.made[-1]
    if data:
        protocol.dataReceived(data)
    return d, protocol, transport, reading


def test_a_streams_events_are_read_as_each_arrives_split_at_every_byte_and_its_connection_kept(client, endpoints,
                                                                                                clock):
    body = chunked(b'data: "he"\n\nda', b'ta: "llo"\r\n\r', b"\ndata: [1,\n", b"data: 2]\n\n", b"data: [DONE]\n\n")
    raw = SSE_HEAD + body
    for split in range(1, len(raw)):
        d, protocol, transport, reading = begin_stream(client, endpoints, raw[:split])
        protocol.dataReceived(raw[split:])
        assert result_of(d)[1:] == (None, True)
        assert reading.texts == [b'"he"', b'"llo"', b"[1,\n2]"], split
    # A clean end with keep-alive: the one connection served every stream.
    assert len(endpoints.made) == 1
    assert len(clock.getDelayedCalls()) == 1  # its idle timer: no drain left behind


def test_each_event_goes_on_in_the_read_its_last_byte_came_in(client, endpoints):
    body = b'data: 1\n\ndata: 2\n\ndata: [DONE]\n\n'
    d, protocol, _, reading = begin_stream(
        client, endpoints,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(body))
    seen = []
    for n, byte in enumerate(body):
        protocol.dataReceived(bytes([byte]))
        seen.append(len(reading.texts))
    assert [n for n in range(1, len(body)) if seen[n] != seen[n - 1]] == [8, 17]  # each event's last byte
    assert result_of(d)[1:] == (None, True)
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 1  # a content-length body read to its end: kept


def test_json_lines_end_with_the_bodys_end_and_a_last_line_without_its_line_end(client, endpoints):
    body = b'{"chunk": 1}\n{"done": true}'
    d, _, _, reading = begin_stream(
        client, endpoints,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    answer, output, streamed = result_of(d)
    assert (answer.code, output, streamed) == (200, None, True)
    assert reading.texts == [b"1", b'{"done": true}']


def test_a_streams_output_is_its_done_events(client, endpoints):
    d, *_ = begin_stream(client, endpoints, SSE_HEAD + chunked(b'event: done\ndata: {"output": {"n": 1}}\n\n'))
    assert result_of(d)[1] == b'{"n": 1}'


def test_an_answer_in_neither_is_read_whole_within_the_limit(client, endpoints):
    d, *_, reading = begin_stream(
        client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + chunked(b'{"a"', b": 1}"))
    answer, body = result_of(d)
    assert (answer.code, body, reading.texts) == (200, b'{"a": 1}', [])

    d, _, transport, _ = begin_stream(client, endpoints, b"HTTP/1.1 500 Oops\r\nContent-Type: text/event-stream\r\n"
                                                         b"Content-Length: 20\r\n\r\n" + b"x" * 20, limit=10)
    failure_of(d, ResponseTooLarge)
    assert transport.aborted


def test_the_transport_head_is_given_pauses_and_reads_again_before_the_connection_is_reused(client, endpoints):
    d, protocol, transport, reading = begin_stream(client, endpoints, SSE_HEAD)
    [(_, given)] = reading.heads
    assert given is transport
    given.pauseProducing()  # as a slow reader's flow does
    assert transport.producerState == "paused"
    protocol.dataReceived(chunked(b"data: 1\n\n"))
    assert result_of(d)[1:] == (None, True)
    assert transport.producerState == "producing"
    second = client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 1 and not has_fired(second)


def test_cancelling_a_stream_mid_body_aborts_its_connection_which_is_never_reused(client, endpoints, clock):
    d, protocol, transport, reading = begin_stream(client, endpoints, SSE_HEAD + chunks(b"data: 1\n\n"))
    assert reading.texts == [b"1"]
    d.cancel()
    failure_of(d, CancelledError)
    assert transport.aborted
    protocol.dataReceived(chunked(b"data: 2\n\n"))  # what was on its way: dropped
    protocol.connectionLost(Failure(ConnectionLost()))
    assert reading.texts == [b"1"]
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2
    assert clock.getDelayedCalls() == []


def test_a_cancel_set_off_by_a_chunk_stops_the_reading_of_the_rest(client, endpoints):
    reading = Reading()
    d = None

    def head(answer, transport):
        reader = reading(answer, transport)
        emit = reader.emit
        reader.emit = lambda value, text: (emit(value, text), d.cancel())
        return reader

    d = client.request(URI, REQUEST, 1000, head)
    protocol, transport = endpoints.made[-1]
    protocol.dataReceived(SSE_HEAD + chunked(b"data: 1\n\n", b"data: 2\n\n"))
    failure_of(d, CancelledError)
    assert reading.texts == [b"1"] and transport.aborted


def test_after_the_end_event_the_rest_of_the_body_is_dropped_and_the_connection_kept(client, endpoints, clock):
    d, protocol, transport, reading = begin_stream(client, endpoints, SSE_HEAD + chunks(b"data: [DONE]\n\ndata: more\n\n"))
    assert result_of(d)[1:] == (None, True)
    protocol.dataReceived(b"0\r\n\r\n")
    assert reading.texts == [] and not transport.aborted
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 1
    client.close()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("split", [False, True])
def test_what_follows_the_end_event_spoils_the_connection_not_the_stream(client, endpoints, clock, split):
    junk = b"zz\r\nnot chunked at all\r\n"
    body = SSE_HEAD + chunks(b"data: 1\n\ndata: [DONE]\n\n")
    d, protocol, transport, reading = begin_stream(client, endpoints, body if split else body + junk)
    result = result_of(d)
    if split:
        assert not transport.aborted  # drained, for a while
        protocol.dataReceived(junk)

    assert result[1:] == (None, True) and reading.texts == [b"1"]
    assert transport.aborted and clock.getDelayedCalls() == []
    protocol.connectionLost(Failure(ConnectionLost()))
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2


def test_a_body_that_goes_on_after_the_end_event_is_closed_after_a_while(client, endpoints, clock):
    d, protocol, transport, _ = begin_stream(client, endpoints, SSE_HEAD + chunked(b"data: [DONE]\n\n")[:-5])
    assert result_of(d)[1:] == (None, True)
    clock.advance(DRAIN_SECONDS)
    assert transport.aborted
    protocol.connectionLost(Failure(ConnectionLost()))
    assert clock.getDelayedCalls() == []
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2


def test_a_stream_cut_short_or_never_answered_fails_as_twisteds_client_does(client, endpoints):
    d, protocol, transport, reading = begin_stream(client, endpoints, SSE_HEAD + chunks(b"data: 1\n\n"))
    protocol.connectionLost(Failure(ConnectionLost()))
    failure_of(d, ResponseFailed)
    assert reading.texts == [b"1"]

    d, protocol, *_ = begin_stream(client, endpoints)
    protocol.connectionLost(Failure(ConnectionDone()))
    failure_of(d, ResponseNeverReceived)


def test_a_stream_whose_body_runs_until_the_connection_closes_ends_with_it(client, endpoints):
    d, protocol, transport, reading = begin_stream(
        client, endpoints, b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n{\"chunk\": 1}\n{\"x\"")
    protocol.dataReceived(b": 2}")
    assert not has_fired(d)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(d)[1:] == (None, True)
    assert reading.texts == [b"1", b'{"x": 2}']


def test_a_reader_that_raises_fails_the_stream_and_aborts_the_connection(client, endpoints):
    d, protocol, transport, reading = begin_stream(client, endpoints, SSE_HEAD + chunked(b"data: 1\n\ndata: NaN\n\n"))
    failure_of(d, BadStream)
    assert reading.texts == [b"1"] and transport.aborted


def test_an_event_longer_than_the_limit_fails_the_stream(client, endpoints):
    d, _, transport, _ = begin_stream(client, endpoints, SSE_HEAD + chunked(b"data: " + b"1" * 30), limit=20)
    failure_of(d, BadStream)
    assert transport.aborted


def test_a_stream_whose_http_breaks_fails_as_a_failed_response(client, endpoints):
    d, _, transport, reading = begin_stream(client, endpoints, SSE_HEAD + chunks(b"data: 1\n\n") + b"zz\r\n")
    failure_of(d, ResponseFailed)
    assert reading.texts == [b"1"] and transport.aborted


def test_a_head_that_raises_fails_the_stream(client, endpoints):
    def head(answer, transport):
        raise ValueError("no")

    d = client.request(URI, REQUEST, 1000, head)
    protocol, transport = endpoints.made[-1]
    protocol.dataReceived(SSE_HEAD + chunked(b"data: 1\n\n"))
    failure_of(d, ValueError)
    assert transport.aborted


def test_a_plain_request_after_a_stream_on_the_same_connection_is_read_as_plain(client, endpoints):
    d, protocol, *_ = begin_stream(client, endpoints, SSE_HEAD + chunked(b"data: 1\n\n"))
    result_of(d)
    plain = client.request(URI, REQUEST, 1000)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert result_of(plain)[1] == b"{}"
    assert len(endpoints.made) == 1


def test_a_second_answer_in_the_same_read_is_not_part_of_the_first_and_the_connection_is_not_kept(client, endpoints):
    d, protocol, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
                                    b"HTTP/1.1 500 Oops\r\nContent-Length: 5\r\nX-Evil: 1\r\n\r\nhello")

    answer_, body = result_of(d)
    assert (answer_.code, body, answer_.headers.getRawHeaders(b"x-evil")) == (200, b"{}", None)
    assert not transport.connected
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2


@pytest.mark.parametrize("interim", [b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
                                     b"HTTP/1.1 100 Continue\r\n\r\n"])
def test_an_interim_answer_is_passed_over(client, endpoints, interim):
    d = client.request(URI, REQUEST, 1000)
    protocol, transport = endpoints.made[-1]

    protocol.dataReceived(interim)
    assert not has_fired(d)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    answer_, body = result_of(d)
    assert (answer_.code, body, answer_.headers.getRawHeaders(b"link")) == (200, b"{}", None)
    assert not transport.aborted


def test_an_interim_answer_is_passed_over_by_a_stream(client, endpoints):
    from aibackend.streambody import reader_for

    seen = []

    def head(answer_, transport):
        seen.append(answer_.code)
        return reader_for(b"text/event-stream")(lambda value, text: None, 1000, "m")

    d = client.request(URI, REQUEST, 1000, head)
    protocol, transport = endpoints.made[-1]
    protocol.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 11\r\n\r\n"
                          b"data: 1\n\n\n\n")

    assert result_of(d)[0].code == 200 and seen == [200]
