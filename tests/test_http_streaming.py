"""
HTTP models stream (issue 14, item 1): an upstream that answers Server-Sent Events or JSON
lines is relayed chunk by chunk as its bytes arrive (aibackend.streambody, HttpModel.stream).

In layers: the readers fed bytes split at every boundary (LF, CRLF, CR); HttpModel.stream
over MemoryEndpoints (a twisted.web upstream in memory that writes when the test says) on a
Clock; then the real daemon in front of a real upstream on a loopback socket
(aibackend.testing.StreamingModelServer): chunks reach the client before the upstream has
finished, a client that leaves closes the upstream's connection, an error event mid-stream,
a slow reader that blocks the upstream's writes with the daemon's memory bounded, and a
plain request's gathered answer.
"""

import json

import pytest
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from zope.interface.verify import verifyObject

from aibackend.client import IDLE_SECONDS
from aibackend.config import HttpModelSpec
from aibackend.errors import BadGateway, GatewayTimeout, ModelUnavailable
from aibackend.httpmodel import STREAM_ACCEPT, HttpModel, UpstreamError
from aibackend.interfaces import IStreaming, ModelAnswer, RequestContext
from aibackend.errors import ModelError
from aibackend.streambody import DRAIN_SECONDS, BadStream, EventStream, JsonLines, UpstreamFlow, gather
from aibackend.testing import (
    Daemon, HeldModelServer, RecordingChunks, StreamingModelServer, Streamed, failure_of, has_fired,
    memory_kb, result_of, sse_events, toml_models, wait_until, write,
)

URL = "http://model.test:9001/stream"


# --- the readers -------------------------------------------------------------------------


def read(reader_class, data: bytes, splits=(), limit=1 << 20):
    """Feed C{data} cut at C{splits}; (the chunks' texts, their values, ended, output)."""
    texts, values = [], []
    reader = reader_class(lambda value, text: (values.append(value), texts.append(text)), limit, "m")
    start = 0
    for at in list(splits) + [len(data)]:
        reader.feed(data[start:at])
        start = at
    if not reader.ended:
        reader.finish()
    return texts, values, reader.ended, reader.output


SSE = (
    b": a comment, a keepalive\n"
    b"retry: 3000\n"
    b"id: 7\n"
    b"data: {\"token\": \"he\"}\n"
    b"\n"
    b"data:\"llo\"\n"   # no space after the colon
    b"\n"
    b"data: {\"multi\":\n"
    b"data: [1, 2]}\n"
    b"\n"
    b"event: delta\n"
    b"data: 3\n"
    b"\n"
    b"\n"   # an empty event: nothing
    b"data: [DONE]\n"
    b"\n"
    b"data: 4\n"
    b"\n"
)
SSE_TEXTS = [b'{"token": "he"}', b'"llo"', b'{"multi":\n[1, 2]}', b"3"]


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_server_sent_events_are_read_into_chunks_split_anywhere(line_end):
    data = SSE.replace(b"\n", line_end)
    expected = (SSE_TEXTS, [{"token": "he"}, "llo", {"multi": [1, 2]}, 3], True, None)
    assert read(EventStream, data) == expected
    for at in range(1, len(data)):
        assert read(EventStream, data, [at]) == expected, at
    assert read(EventStream, data, range(1, len(data))) == expected  # a byte at a time


def outcome(reader_class, data: bytes, splits=(), limit=1 << 20):
    """L{read}, or the error it raised (its type and words)."""
    try:
        return read(reader_class, data, splits, limit)
    except Exception as e:
        return type(e), str(e)


@pytest.mark.parametrize("reads", [
    [b'data: 1\n\n', b'data: {"a": [2]}\n\ndata: "3"\n\n'],
    [b'data: 1\n\ndata: [DONE]\n\ndata: 2\n\n'],
    [b"event: delta\n", b"data: 1\n\n"],  # (an event's name read before: not the quick way)
    [b"data: 1\n", b"data: 2\n\n"],
    [b"data: 1\r", b"\ndata: 2\n\n"],
    [b"data: 1\n\n\n\n", b"data:2\n\n", b": hi\n\n", b"data:  3\n\n"],
    [b"data: 1\n\ndata: NaN\n\ndata: 3\n\n"],
    [b"data: \n\n"],
    [b"data: 1\n\ndata: " + b"9" * 40 + b"\n\n"],
    [b"data: " + b"9" * 34 + b"\n\n"],
], ids=range(10))
def test_reads_of_whole_events_are_read_the_quick_way_as_line_by_line(reads, monkeypatch):
    data = b"".join(reads)
    splits = [len(b"".join(reads[:n])) for n in range(1, len(reads))]
    quick = outcome(EventStream, data, splits, limit=35)
    monkeypatch.setattr(EventStream, "_whole_events", lambda self, data: False)
    assert quick == outcome(EventStream, data, splits, limit=35)


def test_a_cr_at_the_end_of_a_read_ends_its_line_at_once():
    texts = []
    reader = EventStream(lambda value, text: texts.append(text), 1000, "m")
    reader.feed(b"data: 1\r\n\r")
    assert texts == [b"1"]  # dispatched without waiting for the LF that may follow
    reader.feed(b"\ndata: 2\r\n\r\n")
    assert texts == [b"1", b"2"]


def test_aibackends_own_done_event_ends_the_stream_with_its_output():
    data = b'data: 1\n\nevent: done\ndata: {"output": {"text": "hello"}}\n\ndata: 2\n\n'
    assert read(EventStream, data) == ([b"1"], [1], True, b'{"text": "hello"}')
    assert read(EventStream, b'event: done\ndata: {"output": null}\n\n')[2:] == (True, None)
    assert read(EventStream, b"event: done\ndata:\n\n")[2:] == (True, None)


def test_a_body_that_ends_mid_event_does_not_dispatch_it():
    assert read(EventStream, b"data: 1\n\ndata: 2\n") == ([b"1"], [1], False, None)


@pytest.mark.parametrize("data, status, kind, message", [
    (b'{"error": {"type": "gateway_timeout", "message": "too slow", "model": "x", "request_id": "r"}}',
     504, "gateway_timeout", "too slow"),
    (b'{"error": {"type": "model_error", "message": "short and stout", "status": 418}}', 418, "model_error",
     "short and stout"),
    (b'{"error": {"type": "something_new", "message": "hm"}}', 502, "something_new", "hm"),
])
def test_an_error_event_in_aibackends_shape_is_that_error(data, status, kind, message):
    with pytest.raises(ModelError) as raised:
        read(EventStream, b"data: 1\n\nevent: error\ndata: " + data + b"\n\n")
    assert (raised.value.status, raised.value.type, raised.value.message, raised.value.model) == (
        status, kind, message, "m")


@pytest.mark.parametrize("data", [b"it broke", b'{"error": "it broke"}', b'{"oops": 1}'])
def test_any_other_error_event_is_a_bad_gateway_naming_the_model(data):
    with pytest.raises(BadGateway) as raised:
        read(EventStream, b"event: error\ndata: " + data + b"\n\n")
    assert raised.value.message.startswith("model 'm' sent an error")
    assert "it broke" in raised.value.message or "oops" in raised.value.message


@pytest.mark.parametrize("reader_class, data", [
    (EventStream, b"data: NaN\n\n"),
    (EventStream, b"data: {\"a\": Infinity}\n\n"),
    (EventStream, b"data: not json\n\n"),
    (JsonLines, b'{"chunk": NaN}\n'),
    (JsonLines, b"[1, 2\n"),
    (JsonLines, b"\xff\n"),
    (EventStream, b'event: done\ndata: {"result": 1}\n\n'),
])
def test_a_chunk_that_is_not_strict_json_fails_the_stream(reader_class, data):
    with pytest.raises(BadStream) as raised:
        read(reader_class, data)
    assert raised.value.why.startswith("answered") or "done event" in raised.value.why


@pytest.mark.parametrize("reader_class, data, why", [
    (EventStream, b"data: " + b"1" * 200, "sent a line longer than max_response_bytes (100 bytes)"),
    (EventStream, b"data: 1\n" * 60, "sent an event longer than max_response_bytes (100 bytes)"),
    (JsonLines, b"1" * 101, "sent a line longer than max_response_bytes (100 bytes)"),
    (JsonLines, b"[" + b"1," * 60 + b"1]\n", "sent a line longer than max_response_bytes (100 bytes)"),
])
def test_each_line_and_event_is_bounded_by_max_response_bytes(reader_class, data, why):
    with pytest.raises(BadStream) as raised:
        read(reader_class, data, range(1, len(data), 7), limit=100)
    assert raised.value.why == why


def test_the_stream_as_a_whole_is_not_bounded():
    data = b'data: "0123456789"\n\n' * 1000
    texts, _, _, _ = read(EventStream, data, range(0, len(data), 1000), limit=100)
    assert len(texts) == 1000


NDJSON = (
    b'{"chunk": "he"}\n'
    b'{"chunk":"llo"}\r\n'   # another spelling: read again
    b"\n"
    b'{"chunk": {"a": 1}, "extra": true}\n'   # not exactly the envelope: a chunk as it is
    b"[1, 2]\n"
    b'{"done": false, "output": 1}\n'
    b'{"done": true, "output": ["the", "end"]}\n'
    b'{"chunk": "after the end"}\n'
)


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_json_lines_and_aibackends_envelope_are_read_exactly(line_end):
    data = NDJSON.replace(b"\n", line_end)
    expected = (
        [b'"he"', b'"llo"', b'{"chunk": {"a": 1}, "extra": true}', b"[1, 2]", b'{"done": false, "output": 1}'],
        ["he", "llo", {"chunk": {"a": 1}, "extra": True}, [1, 2], {"done": False, "output": 1}],
        True,
        b'["the", "end"]',
    )
    assert read(JsonLines, data) == expected
    for at in range(1, len(data)):
        assert read(JsonLines, data, [at]) == expected, at


def test_a_last_json_line_without_its_line_end_is_read():
    assert read(JsonLines, b'{"chunk": 1}\n{"chunk": 2}') == ([b"1", b"2"], [1, 2], False, None)
    assert read(JsonLines, b'{"done": true, "output": null}\n')[2:] == (True, None)


def test_an_error_line_fails_the_stream():
    with pytest.raises(ModelError) as raised:
        read(JsonLines, b'{"chunk": 1}\n{"error": {"type": "bad_gateway", "message": "the model crashed"}}\n')
    assert (raised.value.status, raised.value.message) == (502, "the model crashed")


def test_big_integers_are_passed_on_as_the_upstream_wrote_them():
    big = b"123456789012345678901234567890"
    assert read(JsonLines, b'{"chunk":' + big + b"}\n")[0] == [big]
    assert read(EventStream, b"data: " + big + b"\n\n")[0] == [big]


@pytest.mark.parametrize("reader_class, data, answer", [
    (EventStream, b'data: "he"\n\ndata: "llo"\n\ndata: [DONE]\n\n', b'"hello"'),
    (EventStream, b'data: "he"\n\ndata: 1\n\n', b'["he",1]'),
    (EventStream, b"", b"[]"),
    (EventStream, b'data: "he"\n\nevent: done\ndata: {"output": {"text": "hello"}}\n\n', b'{"text": "hello"}'),
    (JsonLines, b'{"chunk": "he"}\n{"chunk": "llo"}\n', b'"hello"'),
    (JsonLines, b'{"chunk": {"t": 1}}\n{"chunk": {"t": 2}}\n{"done": true, "output": null}\n', b'[{"t": 1},{"t": 2}]'),
])
def test_a_whole_stream_is_gathered_as_a_jsonl_models_is(reader_class, data, answer):
    assert gather(reader_class, data, 1000, "m") == answer


def test_gathering_is_bounded_by_max_response_bytes():
    with pytest.raises(BadStream) as raised:
        gather(JsonLines, b'{"chunk": "0123456789"}\n' * 20, 100, "m")
    assert raised.value.why == "answered more than max_response_bytes (100 bytes) in chunks"


class FakeTransport:
    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")


def test_the_flow_pauses_the_upstreams_transport_even_one_attached_later_and_stopping_cancels():
    from twisted.internet.defer import Deferred

    flow = UpstreamFlow()
    flow.pauseProducing()  # before the answer came
    transport = FakeTransport()
    flow.attach(transport)
    assert transport.calls == ["pause"]
    flow.pauseProducing()
    flow.resumeProducing()
    flow.resumeProducing()
    assert transport.calls == ["pause", "resume"]
    cancelled = []
    flow.stream = Deferred(lambda d: cancelled.append(True))
    flow.stopProducing()
    assert cancelled == [True]
    failure_of(flow.stream, CancelledError)


# --- HttpModel.stream over an upstream in memory -----------------------------------------


MADE: list = []


@pytest.fixture(autouse=True)
def _stop_models(clock):
    yield
    while MADE:
        model = MADE.pop()
        model.stopService()
        model.endpoints.flush()


def make_model(clock, endpoints, **fields):
    fields.setdefault("url", URL)
    spec = HttpModelSpec(id="m", type="http", **fields)
    model = HttpModel(spec, reactor=clock, endpoints=endpoints, environ={})
    model.endpoints = endpoints
    MADE.append(model)
    return model


def stream(model, body=b'{"prompt": "hi"}', request_id="rid-1"):
    chunks = RecordingChunks()
    d = model.stream(body, RequestContext(request_id=request_id), chunks)
    model.endpoints.flush()
    return d, chunks


def begin(held, index=0, content_type=b"text/event-stream", status=200, headers=None):
    request = held.requests[index]
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return request


def send_bytes(held, request, data: bytes):
    request.write(data)
    held.flush()


def test_an_http_model_streams(clock):
    model = make_model(clock, HeldModelServer())
    assert verifyObject(IStreaming, model)


def test_each_event_is_a_chunk_as_soon_as_its_bytes_arrive_and_done_ends_the_stream(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model, b'{"prompt":  "hi"}')
    [request] = held.requests
    assert request.requestHeaders.getRawHeaders(b"accept") == [STREAM_ACCEPT]
    assert request.requestHeaders.getRawHeaders(b"x-request-id") == [b"rid-1"]
    assert request.content.read() == b'{"prompt":  "hi"}'
    assert isinstance(chunks.producer, UpstreamFlow)
    assert model.in_flight == 1

    begin(held)
    send_bytes(held, request, b'data: "he"\n')
    assert chunks.texts == []
    send_bytes(held, request, b'\ndata: "l')
    assert chunks.texts == [b'"he"']
    send_bytes(held, request, b'lo"\n\n')
    assert chunks.texts == [b'"he"', b'"llo"']
    assert not has_fired(d)

    send_bytes(held, request, b"data: [DONE]\n\n")
    assert result_of(d) is None
    assert chunks.producer is None  # unregistered at the end
    request.finish()
    held.flush()
    assert model.in_flight == 0 and model.requests == 1 and model.failures == 0
    # The body's end came within DRAIN_SECONDS: its connection is kept (its idle timer
    # the only one), and the next stream goes on it.
    [idle] = clock.getDelayedCalls()
    assert idle.getTime() == clock.seconds() + IDLE_SECONDS
    d, chunks = stream(model, request_id="rid-2")
    assert len(held.connections) == 1 and len(held.requests) == 2
    request = begin(held, 1)
    send_bytes(held, request, b"data: 1\n\ndata: [DONE]\n\n")
    assert result_of(d) is None and chunks.texts == [b"1"]
    request.finish()
    held.flush()
    model.stopService()
    assert clock.getDelayedCalls() == []


def test_a_configured_accept_header_is_sent_with_streams_too(clock):
    held = HeldModelServer()
    model = make_model(clock, held, headers={"accept": "application/x-ndjson"})

    d, _ = stream(model)
    assert held.requests[0].requestHeaders.getRawHeaders(b"accept") == [b"application/x-ndjson"]
    d.cancel()
    failure_of(d, CancelledError)


def test_json_lines_in_aibackends_envelope_end_with_the_output(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    request = begin(held, content_type=b"application/x-ndjson; charset=utf-8")
    send_bytes(held, request, b'{"chunk": 1}\n{"chunk": [2]}\n')
    assert chunks.texts == [b"1", b"[2]"]
    send_bytes(held, request, b'{"done": true, "output": {"n": 3}}\n')
    request.finish()
    held.flush()
    assert result_of(d) == b'{"n": 3}'


def test_a_clean_end_of_the_body_ends_the_stream_without_output(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    request = begin(held, content_type=b"application/jsonl")
    send_bytes(held, request, b'{"token": "a"}\n{"token": "b"}')
    assert chunks.values == [{"token": "a"}]
    request.finish()
    held.flush()
    assert result_of(d) is None
    assert chunks.values == [{"token": "a"}, {"token": "b"}]


def test_a_plain_json_answer_is_the_streams_output(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    held.answer(0, body=b'{"label":  "positive"}')
    assert result_of(d) == b'{"label":  "positive"}'
    assert chunks.texts == []


def test_a_streams_plain_answer_and_each_of_its_events_are_bounded_by_max_response_bytes(clock):
    held = HeldModelServer()
    model = make_model(clock, held, max_response_bytes=100)

    d, _ = stream(model)
    held.answer(0, body=b'{"text": "%s"}' % (b"x" * 100))
    assert failure_of(d, BadGateway).value.message == "model 'm' answered more than max_response_bytes (100 bytes)"

    d, chunks = stream(model, request_id="rid-2")
    assert len(held.connections) == 2  # the first was closed, not kept
    request = begin(held, 1)
    send_bytes(held, request, b'data: "%s"\n\n' % (b"x" * 50) * 3)  # the stream as a whole is not bounded
    send_bytes(held, request, b'data: "%s"\n\n' % (b"x" * 100))
    assert failure_of(d, BadGateway).value.message == (
        "model 'm' sent an event longer than max_response_bytes (100 bytes)")
    assert len(chunks.texts) == 3
    assert held.abandoned(1)


def test_a_models_own_error_status_is_answered_as_a_plain_requests_with_its_body(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    held.answer(0, status=503, body=b'{"error": {"message": "overloaded"}}', headers={b"retry-after": b"7"})

    error = failure_of(d, UpstreamError).value
    assert error.status == 503
    assert error.message == "overloaded"
    assert error.as_json("rid-1") == {"error": {"message": "overloaded"}}
    assert error.headers == {"Retry-After": "7"}
    assert model.failures == 1 and model.in_flight == 0


def test_a_redirect_is_a_bad_gateway_as_for_a_plain_request(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, _ = stream(model)
    held.answer(0, status=302, body=b"{}", headers={b"location": b"/elsewhere"})
    assert "answered a redirect (302)" in failure_of(d, BadGateway).value.message


def test_an_event_stream_with_an_error_status_is_read_as_a_plain_answer(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    request = begin(held, status=500)
    request.write(b"data: 1\n\n")
    request.finish()
    held.flush()
    error = failure_of(d, BadGateway).value
    assert "answered something that is not JSON (status 500, content-type text/event-stream)" in error.message
    assert chunks.texts == []


def test_an_error_event_mid_stream_fails_it_with_that_error(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    request = begin(held)
    send_bytes(held, request, b'data: 1\n\nevent: error\ndata: {"error": {"type": "model_error", '
                              b'"message": "the model broke", "status": 500}}\n\n')
    error = failure_of(d, ModelError).value
    assert (error.status, error.message) == (500, "the model broke")
    assert chunks.texts == [b"1"]
    assert model.failures == 1
    assert held.abandoned(0)  # the stream is over: its connection is closed
    assert clock.getDelayedCalls() == []


def test_a_chunk_that_is_not_strict_json_is_a_bad_gateway_and_closes_the_connection(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    request = begin(held)
    send_bytes(held, request, b"data: 1\n\ndata: NaN\n\n")
    error = failure_of(d, BadGateway).value
    assert error.message.startswith("model 'm' answered JSON with NaN or Infinity")
    assert chunks.texts == [b"1"]
    assert held.abandoned(0)


def test_a_connection_lost_mid_stream_is_a_bad_gateway(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    request = begin(held)
    send_bytes(held, request, b"data: 1\n\n")
    held.drop(0)
    error = failure_of(d, BadGateway).value
    assert "closed the connection before answering in full" in error.message
    assert chunks.texts == [b"1"]
    assert model.in_flight == 0


def test_cancelling_the_stream_closes_the_upstreams_connection(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, chunks = stream(model)
    request = begin(held)
    send_bytes(held, request, b"data: 1\n\n")
    chunks.producer.stopProducing()  # as the relay does when the client leaves

    failure_of(d, CancelledError)
    assert held.abandoned(0)
    assert model.in_flight == 0 and model.failures == 0
    assert clock.getDelayedCalls() == []


def test_cancelling_before_the_answer_closes_the_connection_too(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, _ = stream(model)
    d.cancel()
    failure_of(d, CancelledError)
    assert held.abandoned(0)


def test_the_models_timeout_bounds_the_whole_stream(clock):
    held = HeldModelServer()
    model = make_model(clock, held, timeout=30)

    d, chunks = stream(model)
    request = begin(held)
    for n in range(5):
        clock.advance(5)
        send_bytes(held, request, b"data: %d\n\n" % n)
    assert len(chunks.texts) == 5 and not has_fired(d)
    clock.advance(5)

    error = failure_of(d, GatewayTimeout).value
    assert "did not answer within 30 s" in error.message
    assert held.abandoned(0)
    assert clock.getDelayedCalls() == []


def test_an_upstream_that_keeps_its_body_open_after_the_end_is_closed(clock):
    held = HeldModelServer()
    model = make_model(clock, held)

    d, _ = stream(model)
    request = begin(held)
    send_bytes(held, request, b"data: [DONE]\n\ndata: 1\n\n")
    assert result_of(d) is None
    clock.advance(DRAIN_SECONDS)
    assert held.abandoned(0)
    assert clock.getDelayedCalls() == []


def test_a_stream_goes_to_another_replica_when_one_cannot_be_connected_to(clock):
    held = HeldModelServer()
    held.refused_ports[9001] = ierror.ConnectionRefusedError()
    model = make_model(clock, held, urls=(URL, "http://model.test:9002/stream"))

    d, chunks = stream(model)
    [request] = held.requests
    assert request.getHost().port == 9002
    send_bytes(held, begin(held), b"data: 1\n\n")
    assert chunks.texts == [b"1"]
    request.finish()
    held.flush()
    assert result_of(d) is None
    assert [replica.failures for replica in model.replicas] == [1, 0]


def test_a_stream_is_refused_when_the_limit_is_full(clock):
    held = HeldModelServer()
    model = make_model(clock, held, max_concurrency=1, max_queue=0)

    first, _ = stream(model)
    chunks = RecordingChunks()
    with pytest.raises(ModelUnavailable):
        model.stream(b"{}", RequestContext(request_id="r2"), chunks)
    assert chunks.producer is None
    first.cancel()
    failure_of(first, CancelledError)


@pytest.mark.parametrize("content_type, body, answer", [
    (b"text/event-stream", b'data: "he"\n\ndata: "llo"\n\ndata: [DONE]\n\n', b'"hello"'),
    (b"application/x-ndjson", b'{"chunk": 1}\n{"chunk": 2}\n', b"[1,2]"),
    (b"application/x-ndjson", b'{"chunk": 1}\n{"done": true, "output": {"all": 1}}\n', b'{"all": 1}'),
])
def test_a_plain_request_answered_in_events_or_lines_gets_them_gathered(clock, content_type, body, answer):
    held = HeldModelServer()
    model = make_model(clock, held)

    d = model.send(b"{}", RequestContext(request_id="p"))
    held.flush()
    request = begin(held, content_type=content_type)
    request.write(body)
    request.finish()
    held.flush()
    assert result_of(d) == ModelAnswer(status=200, body=answer)


def test_a_plain_requests_gathered_answer_is_bounded_and_its_error_event_is_its_error(clock):
    held = HeldModelServer()
    model = make_model(clock, held, max_response_bytes=100)

    d = model.send(b"{}", RequestContext(request_id="p"))
    held.flush()
    request = begin(held, content_type=b"application/x-ndjson")
    request.write(b'{"chunk": "0123456789"}\n' * 9)
    request.finish()
    held.flush()
    # (The body is bounded as a plain answer's is; gathering, by the same bound.)
    assert failure_of(d, BadGateway).value.message.startswith(
        "model 'm' answered more than max_response_bytes (100 bytes)")

    d = model.send(b"{}", RequestContext(request_id="q"))
    held.flush()
    request = begin(held, 1)
    request.write(b'event: error\ndata: {"error": {"type": "bad_request", "message": "no prompt"}}\n\n')
    request.finish()
    held.flush()
    error = failure_of(d, ModelError).value
    assert (error.status, error.type, error.message) == (400, "bad_request", "no prompt")
    assert model.failures == 2  # each counted as a failed request


# --- the real daemon in front of a real upstream ---------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    server = StreamingModelServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def daemon(upstream, tmp_path_factory):
    directory = tmp_path_factory.mktemp("http-streaming")
    config = write(directory / "aibackend.toml", toml_models(
        {"id": "up", "type": "http", "url": upstream.url, "timeout": 60},
    ))
    daemon = Daemon(config, state=str(directory / "state"), cwd=str(directory))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.timeout(30)
def test_chunks_reach_the_client_before_the_upstream_has_finished(daemon, upstream):
    client = Streamed(daemon.port, "POST", "/post/predict?id=up", {"tag": "early", "format": "sse", "crlf": True,
                                                                   "chunks": ["he", "llo", "!"], "gate": True})
    try:
        client.read_until(b'data: "he"\n\n')  # the upstream is held until this has come
        assert client.status == 200
        assert client.headers["content-type"] == "text/event-stream"
        assert client.headers["x-accel-buffering"] == "no"
        stream = upstream.stream("early")
        assert stream.accept == STREAM_ACCEPT.decode()
        assert len(stream.writes) == 1  # the upstream has not written its second chunk yet
        first_arrived = client.arrivals[0][0]
        stream.release.set()
        client.read_all()
    finally:
        client.close()
    assert sse_events(client.body) == [("message", '"he"'), ("message", '"llo"'), ("message", '"!"'),
                                   ("done", '{"output": null}')]
    assert first_arrived < stream.writes[1]


@pytest.mark.timeout(30)
def test_json_lines_from_the_upstream_reach_an_ndjson_client(daemon, upstream):
    client = Streamed(daemon.port, "POST", "/post/predict?id=up",
                      {"tag": "lines", "format": "ndjson", "chunks": [{"t": 1}, {"t": 2}], "end": "done",
                       "output": {"all": [1, 2]}},
                      framing="ndjson")
    try:
        body = client.read_all()
    finally:
        client.close()
    assert client.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in body.splitlines()] == [
        {"chunk": {"t": 1}}, {"chunk": {"t": 2}}, {"done": True, "output": {"all": [1, 2]}}]


@pytest.mark.timeout(30)
def test_a_client_that_leaves_closes_the_upstreams_connection(daemon, upstream):
    client = Streamed(daemon.port, "POST", "/post/predict?id=up",
                      {"tag": "leaves", "format": "sse", "chunks": [1], "forever": True, "pause": 0.02})
    try:
        client.read_until(b"data: 1\n\ndata: 1\n\n")
    finally:
        client.close()
    stream = upstream.stream("leaves")
    wait_until(stream.gone.is_set, 10, "the upstream to see the daemon close its connection")
    left = [entry for entry in daemon.logs("up") if entry.get("status") == 499]
    assert left and left[-1]["error"] == "the client went away"


@pytest.mark.timeout(30)
def test_an_upstream_error_event_mid_stream_is_the_clients_error_event(daemon, upstream):
    client = Streamed(daemon.port, "POST", "/post/predict?id=up",
                      {"tag": "breaks", "format": "sse", "chunks": ["a"],
                       "error": {"error": {"type": "model_error", "message": "the model broke", "status": 500}}},
                      headers={"X-Request-Id": "breaks-1"})
    try:
        body = client.read_all()
    finally:
        client.close()
    (first, data), (name, error) = sse_events(body)
    assert (first, data, name) == ("message", '"a"', "error")
    assert json.loads(error) == {"error": {"type": "model_error", "message": "the model broke", "model": "up",
                                           "request_id": "breaks-1"}}
    assert [entry["status"] for entry in daemon.logs("up") if entry.get("request_id") == "breaks-1"] == [500]


@pytest.mark.timeout(60)
def test_a_slow_reader_blocks_the_upstreams_writes_and_the_daemon_stays_small(daemon, upstream):
    before = memory_kb(daemon.pid)
    limit = 400 * 1024 * 1024  # what the upstream would write if nothing stopped it
    client = Streamed(daemon.port, "POST", "/post/predict?id=up",
                      {"tag": "slow", "format": "sse", "size": 64 * 1024, "forever": True, "limit": limit},
                      receive_buffer=4096)
    try:
        client.head()
        stream = upstream.stream("slow")
        seen = []

        def stalled():
            seen.append(stream.written)
            return len(seen) > 50 and seen[-1] == seen[-51]  # no write for 50 looks, a second

        wait_until(stalled, 30, "the upstream's writes to block")
        assert stream.written < 64 * 1024 * 1024 and not stream.ended.is_set()
        assert memory_kb(daemon.pid) - before < 48 * 1024  # kB: the daemon holds a read or two, not the stream

        # Reading on: the upstream goes on writing.
        at = stream.written
        client.sock.settimeout(5)
        read = 0
        while stream.written <= at:
            read += len(client.sock.recv(1 << 20))
        print(f"the upstream stalled after {at} bytes; {read} read before it wrote again; "
              f"the daemon grew by {memory_kb(daemon.pid) - before} kB")
    finally:
        client.close()
    wait_until(stream.ended.is_set, 10, "the upstream to see its client leave")


@pytest.mark.timeout(30)
def test_a_plain_request_to_a_streaming_upstream_gets_the_gathered_answer(daemon, upstream):
    reply = daemon.predict("up", {"tag": "plain", "format": "sse", "chunks": ["he", "llo"], "end": "openai"})
    assert reply.status == 200, reply
    assert reply.json() == "hello"
    assert upstream.stream("plain").accept == "application/json"

    reply = daemon.predict("up", {"tag": "plain-lines", "format": "ndjson", "chunks": [{"t": 1}, {"t": 2}]})
    assert reply.status == 200, reply
    assert reply.json() == [{"t": 1}, {"t": 2}]


@pytest.mark.timeout(30)
def test_a_plain_json_upstream_answers_a_stream_with_its_whole_answer_as_the_output(daemon, upstream):
    client = Streamed(daemon.port, "POST", "/post/predict?id=up", {"tag": "whole", "format": "json", "chunks": [1, 2]})
    try:
        body = client.read_all()
    finally:
        client.close()
    assert sse_events(body) == [("done", '{"output": [1, 2]}')]
