"""
Streamed answers at the front door (issue 14): negotiation, the SSE and NDJSON bytes, errors
before and after the first byte, a client that leaves, flow control. Through StubFrontDoor
(a real Site and Request, no socket) over a FakeStreamingModel the test drives; one test on
a real socket shows the chunks arriving one by one.
"""

import json
from dataclasses import replace

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from aibackend import errors
from aibackend.relay import NDJSON, SSE, SSE_KEEPALIVE, Framing
from aibackend.interfaces import IStreaming, ModelAnswer
from aibackend.testing import (
    DoorStream, FakeModel, FakeStreamingModel, StubFrontDoor, assert_error, has_fired, result_of,
)


@pytest.fixture
def model(clock):
    return FakeStreamingModel("m", clock)


@pytest.fixture
def door(clock, model):
    return StubFrontDoor(clock, [model, FakeModel("plain", clock)])


def requests_logged(model):
    return [(e["status"], e.get("error")) for e in model.model_log.query() if e["event"] == "request"]


def test_the_fake_streaming_model_provides_istreaming(model):
    assert verifyObject(IStreaming, model)


def test_sse_sends_each_chunk_then_the_final_event(door, model):
    opened = DoorStream(door, "POST", "/post/predict?id=m", data=b'{"prompt": "hi"}',
                        headers={"Accept": "text/event-stream"})
    (stream,) = model.streams
    assert stream.body == b'{"prompt": "hi"}'
    assert opened.response is None  # nothing written yet: no status either
    stream.chunk("Hello")
    assert opened.body == b'data: "Hello"\n\n'
    assert opened.response.code == 200
    assert opened.header("content-type") == "text/event-stream"
    assert opened.header("cache-control") == "no-cache"
    assert opened.header("x-accel-buffering") == "no"
    assert opened.header("x-request-id")
    assert opened.header("content-length") is None
    stream.chunk(b'{"t":\n 1}')
    stream.end()
    assert opened.body == b'data: "Hello"\n\ndata: {"t":  1}\n\nevent: done\ndata: {"output": null}\n\n'
    assert has_fired(opened.ended)
    assert requests_logged(model) == [(200, None)]
    assert model.in_flight == 0


def test_stream_true_in_the_query_asks_for_sse_and_the_end_carries_the_output(door, model):
    opened = DoorStream(door, "POST", "/post/predict?id=m&stream=true", data=b"{}")
    model.streams[0].end({"text": "Hi"})
    assert opened.body == b'event: done\ndata: {"output": {"text": "Hi"}}\n\n'
    assert opened.header("content-type") == "text/event-stream"


def test_ndjson(door, model):
    opened = DoorStream(door, "POST", "/post/predict?id=m&stream=1", data=b"{}",
                        headers={"Accept": "application/x-ndjson"})
    stream = model.streams[0]
    stream.chunk("a")
    stream.chunk([1, 2])
    stream.end("ab")
    assert opened.body == b'{"chunk": "a"}\n{"chunk": [1, 2]}\n{"done": true, "output": "ab"}\n'
    assert opened.header("content-type") == "application/x-ndjson"


def test_get_predict_streams_and_stream_is_not_an_input(door, model):
    opened = DoorStream(door, "GET", "/get/predict?id=m&stream=true&prompt=hi")
    assert json.loads(model.streams[0].body) == {"prompt": "hi"}
    model.streams[0].end()
    assert opened.body == b'event: done\ndata: {"output": null}\n\n'


def test_stream_false_is_a_plain_request(door, model):
    response = door.call("GET", "/get/predict?id=m&stream=false&x=1")
    assert response.status == 200
    assert response.json() == {"ok": True}
    assert [json.loads(r.body) for r in model.received] == [{"x": "1"}]
    assert model.streams == []


@pytest.mark.parametrize("method, url", [("POST", "/post/predict?id=m&stream=yes"),
                                         ("GET", "/get/predict?id=m&stream=maybe")])
def test_another_stream_value_is_a_400(door, model, method, url):
    response = door.call(method, url, data=b"{}" if method == "POST" else None)
    assert_error(response, 400, "bad_request", message="stream must be true or false, got " +
                 repr(url.rsplit("=", 1)[1]))


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_model_that_cannot_stream_is_a_400(door, method):
    url = f"/{method.lower()}/predict?id=plain"
    response = door.call(method, url, headers={"Accept": "text/event-stream"})
    assert_error(response, 400, "bad_request", model="plain",
                 message="model 'plain' cannot stream: its type does not answer in chunks")


def test_an_unknown_model_is_a_404_before_the_first_byte(door):
    response = door.call("POST", "/post/predict?id=nope&stream=true", data=b"{}")
    assert_error(response, 404, "unknown_model", model="nope")


@pytest.mark.parametrize("error, status, kind", [
    (errors.ModelUnavailable("model 'm' is restarting", model="m"), 503, "model_unavailable"),
    (errors.GatewayTimeout("model 'm' did not answer in 1 s", model="m"), 504, "gateway_timeout"),
])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_an_error_before_the_first_byte_keeps_its_status(door, model, error, status, kind, method):
    d = door.request(method, f"/{method.lower()}/predict?id=m", data=b"{}" if method == "POST" else None,
                     headers={"Accept": "text/event-stream"})
    model.streams[0].fail(error)
    door.flush()
    response = result_of(d)
    assert_error(response, status, kind, model="m")
    assert response.header("content-type") == "application/json"
    assert requests_logged(model) == [(status, error.message)]


def test_an_error_after_the_first_byte_is_an_error_event(door, model):
    opened = DoorStream(door, "POST", "/post/predict?id=m", data=b"{}", headers={"Accept": "text/event-stream"})
    stream = model.streams[0]
    stream.chunk("a")
    stream.fail(errors.GatewayTimeout("model 'm' went quiet", model="m"))
    body = opened.body
    request_id = opened.header("x-request-id")
    document = {"error": {"type": "gateway_timeout", "message": "model 'm' went quiet", "model": "m",
                          "request_id": request_id}}
    assert body == b'data: "a"\n\nevent: error\ndata: ' + json.dumps(document).encode() + b"\n\n"
    assert opened.response.code == 200
    assert has_fired(opened.ended)
    assert requests_logged(model) == [(504, "model 'm' went quiet")]


def test_an_error_after_the_first_byte_in_ndjson(door, model):
    opened = DoorStream(door, "POST", "/post/predict?id=m", data=b"{}", headers={"Accept": "application/x-ndjson"})
    model.streams[0].chunk(1)
    model.streams[0].fail(errors.BadGateway("model 'm' answered nonsense", model="m"))
    first, last = opened.body.splitlines()
    assert first == b'{"chunk": 1}'
    assert json.loads(last)["error"]["type"] == errors.BadGateway.type


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_client_that_leaves_cancels_the_stream_and_is_logged_499(door, model, method):
    opened = DoorStream(door, method, f"/{method.lower()}/predict?id=m", data=b"{}" if method == "POST" else None,
                        headers={"Accept": "text/event-stream"})
    stream = model.streams[0]
    stream.chunk("a")
    assert opened.body == b'data: "a"\n\n'
    door.drop_connections()
    assert stream.cancelled
    assert stream.stopped  # the producer is stopped too (by the connection)
    assert requests_logged(model) == [(499, "the client went away")]
    assert model.in_flight == 0
    opened.ended.addErrback(lambda _: None)


def test_a_client_that_leaves_before_the_first_byte(door, model):
    d = door.request("POST", "/post/predict?id=m&stream=true", data=b"{}")
    door.drop_connections()
    assert model.streams[0].cancelled
    assert requests_logged(model) == [(499, "the client went away")]
    d.addErrback(lambda _: None)


def test_the_transport_pausing_pauses_the_model(door, model):
    opened = DoorStream(door, "POST", "/post/predict?id=m", data=b"{}", headers={"Accept": "text/event-stream"})
    stream = model.streams[0]
    stream.chunk("a")
    door.flush()
    (channel,) = door.site.channels
    channel.pauseProducing()
    assert stream.pauses == 1
    channel.resumeProducing()
    assert stream.resumes == 1
    stream.end()
    assert opened.body.endswith(b"event: done\ndata: {\"output\": null}\n\n")


def test_the_access_event_is_written_once(door, model):
    events = []

    def observe(event):
        if event.get("log_namespace") == "aibackend.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        opened = DoorStream(door, "POST", "/post/predict?id=m", data=b"{}", headers={"Accept": "text/event-stream"})
        model.streams[0].chunk("a")
        model.streams[0].end()
        opened.body
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [(e["status"], e["model"]) for e in events] == [(200, "m")]


def test_a_raw_subprocess_model_cannot_stream(clock, door):
    from aibackend.config import parse_config

    spec = parse_config({"models": [{"id": "r", "type": "subprocess", "protocol": "raw",
                                     "command": ["python3", "-c", "pass"]}]}, environ={}).models[0]
    door.registry.add(FakeModel("r", clock), spec=spec)
    response = door.call("POST", "/post/predict?id=r", data=b"{}", headers={"Accept": "application/x-ndjson"})
    assert_error(response, 400, "bad_request", model="r", message="model 'r' cannot stream (protocol raw)")


# --- deadlines, keepalives, the buffer bound (the model's stream settings) ------------------


def limited(clock, *, producer=True, **settings):
    """A door over a streaming model 'm' whose spec has these stream settings."""
    model = FakeStreamingModel("m", clock, producer=producer)
    model.spec = replace(model.spec, **settings)
    return StubFrontDoor(clock, [model, FakeModel("plain", clock)]), model


def sse(door, url="/post/predict?id=m"):
    return DoorStream(door, "POST", url, data=b"{}", headers={"Accept": "text/event-stream"})


def error_event(opened) -> dict:
    """The stream's last event, an error event: its document."""
    last = opened.body.split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: "), opened.body
    return json.loads(last[len(b"event: error\ndata: "):])


def stream_figures(door):
    """{end: count} of aibackend_streams_total for model m, and its chunk counter."""
    text = door.call("GET", "/metrics").body.decode()
    ends, chunks = {}, None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aibackend_streams_total" and sample.labels["model"] == "m":
                ends[sample.labels["end"]] = sample.value
            elif sample.name == "aibackend_stream_chunks_total" and sample.labels["model"] == "m":
                chunks = sample.value
    return {end: count for end, count in ends.items() if count}, chunks


def test_the_stream_settings_default_to_no_deadline_a_15_s_keepalive_and_a_1_mib_buffer(model):
    spec = model.spec
    assert (spec.first_chunk_timeout, spec.stream_idle_timeout, spec.keepalive_seconds,
            spec.max_stream_buffer_bytes) == (None, None, 15.0, 1 << 20)


def test_no_first_chunk_within_first_chunk_timeout_is_a_504_and_the_models_work_is_cancelled(clock):
    door, model = limited(clock, first_chunk_timeout=5, keepalive_seconds=0)
    d = door.request("POST", "/post/predict?id=m&stream=true", data=b"{}")
    (stream,) = model.streams
    clock.advance(4.9)
    assert not stream.cancelled and not has_fired(d)
    clock.advance(0.1)
    door.flush()
    assert stream.cancelled
    message = "model 'm' sent no chunk within 5 s (first_chunk_timeout)"
    assert_error(result_of(d), 504, "gateway_timeout", model="m", message=message)
    assert requests_logged(model) == [(504, message)]
    assert stream_figures(door) == ({"timeout": 1}, 0)
    assert clock.getDelayedCalls() == []


def test_a_first_chunk_timeout_after_a_keepalive_went_is_an_error_event(clock):
    door, model = limited(clock, first_chunk_timeout=5, keepalive_seconds=2)
    opened = sse(door)
    (stream,) = model.streams
    clock.advance(2)
    assert opened.body == b": keepalive\n\n"
    assert opened.response.code == 200  # the first keepalive sent the status and headers
    assert opened.header("content-type") == "text/event-stream"
    clock.advance(2)
    clock.advance(1)
    assert stream.cancelled
    assert opened.body.startswith(b": keepalive\n\n: keepalive\n\nevent: error\n")
    assert error_event(opened)["error"] == {
        "type": "gateway_timeout", "message": "model 'm' sent no chunk within 5 s (first_chunk_timeout)",
        "model": "m", "request_id": opened.header("x-request-id"),
    }
    assert has_fired(opened.ended)
    assert requests_logged(model) == [(504, "model 'm' sent no chunk within 5 s (first_chunk_timeout)")]
    assert clock.getDelayedCalls() == []


def test_a_first_chunk_in_time_ends_the_first_chunk_deadline(clock):
    door, model = limited(clock, first_chunk_timeout=5, keepalive_seconds=0)
    opened = sse(door)
    stream = model.streams[0]
    clock.advance(4)
    stream.chunk("a")
    assert clock.getDelayedCalls() == []  # no idle limit, no keepalive: nothing more to watch
    clock.advance(100)
    stream.chunk("b")
    stream.end()
    assert opened.body == b'data: "a"\n\ndata: "b"\n\nevent: done\ndata: {"output": null}\n\n'
    assert not stream.cancelled
    assert requests_logged(model) == [(200, None)]


def test_the_first_chunk_leaves_the_streams_timer_for_a_later_deadline_and_replaces_it_for_a_sooner(clock):
    # A cancelled DelayedCall stays in the reactor's heap until its time, and moving one
    # sooner searches that whole heap: the stream's one timer is left for its tick to set
    # again when the idle deadline is later, replaced when it is sooner.
    door, model = limited(clock, first_chunk_timeout=60, stream_idle_timeout=2, keepalive_seconds=0)
    opened = sse(door)
    stream = model.streams[0]
    (timer,) = clock.getDelayedCalls()
    assert timer.getTime() == 60
    clock.advance(1)
    stream.chunk("a")
    (replaced,) = clock.getDelayedCalls()
    assert replaced is not timer and replaced.getTime() == 3 and timer.cancelled  # sooner: the idle deadline
    clock.advance(2)
    assert stream.cancelled
    assert error_event(opened)["error"]["message"] == "model 'm' sent no chunk for 2 s (stream_idle_timeout)"
    assert clock.getDelayedCalls() == []

    door, model = limited(clock, first_chunk_timeout=2, stream_idle_timeout=10, keepalive_seconds=0)
    opened = sse(door)
    stream = model.streams[0]
    (timer,) = clock.getDelayedCalls()
    clock.advance(1)
    stream.chunk("a")
    assert clock.getDelayedCalls() == [timer] and timer.getTime() == 5  # later: left for its tick
    clock.advance(1)
    (timer,) = clock.getDelayedCalls()
    assert timer.getTime() == 14 and not stream.cancelled  # the tick set itself for the idle deadline
    clock.advance(8.9)
    assert not stream.cancelled
    clock.advance(0.1)
    assert stream.cancelled
    assert error_event(opened)["error"]["message"] == "model 'm' sent no chunk for 10 s (stream_idle_timeout)"
    assert clock.getDelayedCalls() == []


def test_a_gap_past_stream_idle_timeout_is_an_error_event_and_cancels_the_model(clock):
    door, model = limited(clock, stream_idle_timeout=2, keepalive_seconds=0)
    opened = sse(door)
    stream = model.streams[0]
    clock.advance(30)  # before the first chunk the idle limit does not count
    assert not stream.cancelled
    stream.chunk("a")
    for _ in range(5):
        clock.advance(1.5)
        before = [(call, call.getTime()) for call in clock.getDelayedCalls()]
        stream.chunk("b")
        # One DelayedCall for the stream, moved lazily: a chunk does not touch it.
        assert len(before) == 1
        assert [(call, call.getTime()) for call in clock.getDelayedCalls()] == before
    clock.advance(1.9)
    assert not stream.cancelled
    clock.advance(0.1)
    assert stream.cancelled
    message = "model 'm' sent no chunk for 2 s (stream_idle_timeout)"
    assert error_event(opened)["error"]["message"] == message
    assert error_event(opened)["error"]["type"] == "gateway_timeout"
    assert opened.body.count(b"data: \"b\"") == 5
    assert requests_logged(model) == [(504, message)]
    assert stream_figures(door) == ({"timeout": 1}, 6)
    assert clock.getDelayedCalls() == []


def test_a_model_held_for_a_slow_client_is_not_idle(clock):
    door, model = limited(clock, stream_idle_timeout=2, keepalive_seconds=0)
    opened = sse(door)
    stream = model.streams[0]
    stream.chunk("a")
    door.flush()
    (channel,) = door.site.channels
    channel.pauseProducing()  # the model is paused: its silence is the client's doing
    clock.advance(10)
    assert not stream.cancelled
    channel.resumeProducing()
    clock.advance(1.9)  # its idle time counts from the resume
    assert not stream.cancelled
    clock.advance(0.1)
    assert stream.cancelled
    assert error_event(opened)["error"]["message"] == "model 'm' sent no chunk for 2 s (stream_idle_timeout)"


def test_an_sse_stream_gets_a_keepalive_comment_after_each_quiet_keepalive_seconds(clock):
    door, model = limited(clock)  # the default: 15 s
    opened = sse(door)
    stream = model.streams[0]
    clock.advance(14.9)
    assert opened.response is None  # nothing yet, not even the status
    clock.advance(0.1)
    assert opened.body == b": keepalive\n\n"
    assert opened.response.code == 200
    clock.advance(15)
    assert opened.body == b": keepalive\n\n" * 2
    clock.advance(1)
    stream.chunk("a")  # written at 31: the next keepalive is due at 46, not 45
    clock.advance(14)
    assert opened.body == b": keepalive\n\n" * 2 + b'data: "a"\n\n'
    clock.advance(1)
    assert opened.body == b": keepalive\n\n" * 2 + b'data: "a"\n\n: keepalive\n\n'
    stream.end()
    assert opened.body.endswith(b': keepalive\n\nevent: done\ndata: {"output": null}\n\n')
    assert clock.getDelayedCalls() == []
    assert requests_logged(model) == [(200, None)]


@pytest.mark.parametrize("settings, accept", [
    ({}, "application/x-ndjson"),
    ({"keepalive_seconds": 0}, "text/event-stream"),
])
def test_ndjson_and_keepalive_seconds_0_get_no_keepalive(clock, settings, accept):
    door, model = limited(clock, **settings)
    opened = DoorStream(door, "POST", "/post/predict?id=m", data=b"{}", headers={"Accept": accept})
    assert clock.getDelayedCalls() == []  # nothing to watch: no timer at all
    clock.advance(600)
    assert opened.response is None
    model.streams[0].chunk(1)
    model.streams[0].end()
    assert b"keepalive" not in opened.body


def test_the_keepalive_waits_while_the_clients_connection_is_full(clock):
    door, model = limited(clock, keepalive_seconds=1)
    opened = sse(door)
    model.streams[0].chunk("a")
    door.flush()
    (channel,) = door.site.channels
    channel.pauseProducing()
    clock.advance(5)
    assert opened.body == b'data: "a"\n\n'
    channel.resumeProducing()
    clock.advance(1)
    assert opened.body == b'data: "a"\n\n: keepalive\n\n'
    model.streams[0].end()


def paused_stream(clock, *, producer=True, limit=100):
    door, model = limited(clock, max_stream_buffer_bytes=limit, producer=producer)
    opened = sse(door)
    stream = model.streams[0]
    stream.chunk("a")
    door.flush()
    (channel,) = door.site.channels
    channel.pauseProducing()  # the transport's buffer is full: the client reads slower than the model
    return door, model, opened, stream, channel


@pytest.mark.parametrize("producer", [True, False])
def test_bytes_past_max_stream_buffer_bytes_while_the_client_is_slow_cut_the_stream(clock, producer):
    door, model, opened, stream, channel = paused_stream(clock, producer=producer)
    if producer:
        assert stream.pauses == 1  # the model was told to slow down
    for _ in range(8):
        stream.chunk("x" * 2)  # 'data: "xx"\n\n': 12 bytes each
    assert not stream.cancelled  # 96 bytes wait: within the bound
    stream.chunk("x" * 2)  # 108: past it
    assert stream.cancelled
    channel.resumeProducing()
    message = ("the client read too slowly: more than 100 bytes of the stream waited to be sent "
               "(max_stream_buffer_bytes)")
    assert error_event(opened)["error"] == {"type": "slow_client", "message": message, "model": "m",
                                           "request_id": opened.header("x-request-id")}
    assert opened.body.count(b'data: "xx"') == 8
    stream.chunk("late")  # a model that goes on: nothing more is written
    assert b"late" not in opened.body
    assert has_fired(opened.ended)
    assert requests_logged(model) == [(408, message)]
    assert stream_figures(door) == ({"error": 1}, 9)
    assert clock.getDelayedCalls() == []


def test_a_client_that_catches_up_starts_the_count_again(clock):
    door, model, opened, stream, channel = paused_stream(clock)
    for _ in range(8):
        stream.chunk("x" * 2)
    channel.resumeProducing()
    assert stream.resumes == 1
    channel.pauseProducing()
    for _ in range(8):
        stream.chunk("x" * 2)
    channel.resumeProducing()
    stream.end()
    assert not stream.cancelled
    assert opened.body.count(b'data: "xx"') == 16
    assert opened.body.endswith(b"event: done\ndata: {\"output\": null}\n\n")


def test_a_producer_registered_while_the_connection_is_full_is_paused_at_once(clock):
    door, model = limited(clock, producer=False)
    opened = sse(door)
    stream = model.streams[0]
    door.flush()
    (channel,) = door.site.channels
    channel.pauseProducing()
    stream.chunks.registerProducer(stream, True)
    assert stream.pauses == 1
    channel.resumeProducing()
    assert stream.resumes == 1
    stream.chunks.unregisterProducer()
    stream.end()
    assert opened.body == b'event: done\ndata: {"output": null}\n\n'


def test_a_plain_request_is_not_bound_by_the_stream_settings(clock):
    door, model = limited(clock, first_chunk_timeout=1, stream_idle_timeout=1, keepalive_seconds=1)
    model.holds()
    d = door.request("POST", "/post/predict?id=m", data=b"{}")
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    model.pending[0].callback(ModelAnswer(status=200, body=b'{"ok": 1}'))
    door.flush()
    assert result_of(d).json() == {"ok": 1}


def end_by_done(door, model, clock, opened):
    model.streams[0].end()


def end_by_error(door, model, clock, opened):
    model.streams[0].fail(errors.BadGateway("model 'm' crashed", model="m"))


def end_by_bug(door, model, clock, opened):
    model.streams[0].fail(ZeroDivisionError("a bug"))


def end_by_client_gone(door, model, clock, opened):
    door.drop_connections()
    opened.ended.addErrback(lambda _: None)


def end_by_idle_timeout(door, model, clock, opened):
    clock.advance(3)


def end_by_cut(door, model, clock, opened):
    (channel,) = door.site.channels
    channel.pauseProducing()
    model.streams[0].chunk("y" * 200)


@pytest.mark.parametrize("end, how, status", [
    (end_by_done, "done", 200),
    (end_by_error, "error", 502),
    (end_by_bug, "error", 500),
    (end_by_client_gone, "cancelled", 499),
    (end_by_idle_timeout, "timeout", 504),
    (end_by_cut, "error", 408),
])
def test_every_ending_cancels_the_streams_timer_and_is_counted_by_how(clock, logged_errors, end, how, status):
    door, model = limited(clock, first_chunk_timeout=10, stream_idle_timeout=3, max_stream_buffer_bytes=100)
    opened = sse(door)
    model.streams[0].chunk("a")
    door.flush()
    assert len(clock.getDelayedCalls()) == 1  # one timer for its deadlines and keepalive
    end(door, model, clock, opened)
    door.flush()
    assert clock.getDelayedCalls() == []
    assert [s for s, _ in requests_logged(model)] == [status]
    assert stream_figures(door)[0] == {how: 1}
    assert model.in_flight == 0
    if end is end_by_bug:
        logged_errors.flush(ZeroDivisionError)


def test_the_stream_figures_in_metrics(clock):
    door, model = limited(clock, keepalive_seconds=0)
    opened = sse(door)
    clock.advance(0.3)
    model.streams[0].chunk("a")
    model.streams[0].chunk("b")
    model.streams[0].end()
    opened.body
    text = door.call("GET", "/metrics").body.decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    histogram = {(sample.name, sample.labels.get("le")): sample.value
                 for sample in families["aibackend_stream_first_chunk_seconds"].samples}
    assert histogram[("aibackend_stream_first_chunk_seconds_bucket", "0.25")] == 0
    assert histogram[("aibackend_stream_first_chunk_seconds_bucket", "0.5")] == 1
    assert histogram[("aibackend_stream_first_chunk_seconds_count", None)] == 1
    assert histogram[("aibackend_stream_first_chunk_seconds_sum", None)] == pytest.approx(0.3)
    assert stream_figures(door) == ({"done": 1}, 2)
    ends = {s.labels["end"]: s.value for s in families["aibackend_streams"].samples if s.labels["model"] == "m"}
    assert ends == {"done": 1, "error": 0, "cancelled": 0, "timeout": 0}
    # A model that never streamed has no stream series.
    assert not [s for f in families.values() for s in f.samples if s.labels.get("model") == "plain"
                and "stream" in s.name]


@pytest.fixture
def access_events():
    events = []

    def observe(event):
        if event.get("log_namespace") == "aibackend.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_a_streams_access_event_has_its_chunks_first_chunk_and_end(clock, access_events):
    door, model = limited(clock)
    opened = sse(door)
    clock.advance(0.25)
    model.streams[0].chunk("a")
    model.streams[0].chunk("b")
    model.streams[0].end()
    opened.body
    door.call("POST", "/post/predict?id=plain", data=b"{}")
    stream_event, plain_event = access_events
    assert (stream_event["chunks"], stream_event["first_chunk_ms"], stream_event["stream_end"]) == (2, 250.0, "done")
    assert stream_event["line"].endswith(" chunks=2 first_chunk_ms=250.0 stream_end=done")
    assert stream_event["status"] == 200 and stream_event["model"] == "m"
    for field in ("chunks", "first_chunk_ms", "stream_end"):
        assert field not in plain_event
    assert "chunks=" not in plain_event["line"]


def test_a_stream_that_timed_out_before_its_first_byte_has_its_access_fields_too(clock, access_events):
    door, model = limited(clock, first_chunk_timeout=1, keepalive_seconds=0)
    d = door.request("POST", "/post/predict?id=m&stream=true", data=b"{}")
    clock.advance(1)
    door.flush()
    assert result_of(d).status == 504
    (event,) = access_events
    assert (event["status"], event["chunks"], event["first_chunk_ms"], event["stream_end"]) == (504, 0, None, "timeout")


# --- on a real socket -------------------------------------------------------------


class Reading(Protocol):
    """A raw client: what came, in pieces, and when the server closed."""

    def __init__(self):
        self.pieces = []
        self.closed = Deferred()

    def dataReceived(self, data):
        self.pieces.append(data)

    def connectionLost(self, reason):
        self.closed.callback(b"".join(self.pieces))

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


async def until(predicate, what: str, deadline: float = 5.0):
    from twisted.internet import reactor

    waited = 0.0
    while not predicate():
        if waited > deadline:
            pytest.fail(f"waited {deadline} s for {what}")
        await deferLater(reactor, 0.005, lambda: None)
        waited += 0.005


@pytest.fixture
def streaming_site():
    from twisted.internet import reactor

    from aibackend.registry import ModelDeps, ModelRegistry
    from aibackend.root import FrontDoor
    from aibackend.server import AibackendSite

    model = FakeStreamingModel("m", reactor)
    registry = ModelRegistry(ModelDeps(reactor=reactor, environ={}))
    registry.add(model)
    site = AibackendSite(FrontDoor(registry, reactor).resource(), max_body_bytes=1 << 20)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield port.getHost().port, model
    pytest_twisted.blockon(port.stopListening())


async def connect(port, request: bytes) -> Reading:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Reading())
    client.transport.write(request)
    return client


@pytest_twisted.ensureDeferred
async def test_on_a_socket_each_chunk_arrives_before_the_end(streaming_site):
    port, model = streaming_site
    client = await connect(port, b"POST /post/predict?id=m HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                                 b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    await until(lambda: model.streams, "the model's stream")
    stream = model.streams[0]
    stream.chunk("one")
    await until(lambda: b'data: "one"' in client.data, "the first chunk")
    head = client.data.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200")
    assert b"transfer-encoding: chunked" in head
    assert b"content-length" not in head
    assert b"event: done" not in client.data
    stream.chunk("two")
    await until(lambda: b'data: "two"' in client.data, "the second chunk")
    assert b"event: done" not in client.data
    stream.end()
    raw = await client.closed
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert body == (b'd\r\ndata: "one"\n\n\r\nd\r\ndata: "two"\n\n\r\n'
                    b'24\r\nevent: done\ndata: {"output": null}\n\n\r\n0\r\n\r\n')


@pytest_twisted.ensureDeferred
async def test_on_a_socket_an_http_1_0_stream_ends_at_the_close(streaming_site):
    port, model = streaming_site
    client = await connect(port, b"GET /get/predict?id=m&stream=true HTTP/1.0\r\nHost: x\r\n\r\n")
    await until(lambda: model.streams, "the model's stream")
    model.streams[0].chunk("one")
    await until(lambda: b'data: "one"' in client.data, "the first chunk")
    model.streams[0].end("x")
    raw = await client.closed
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head.lower()
    assert body == b'data: "one"\n\nevent: done\ndata: {"output": "x"}\n\n'


@pytest_twisted.ensureDeferred
async def test_on_a_socket_a_client_that_does_not_read_pauses_the_model(streaming_site):
    from twisted.internet import reactor

    port, model = streaming_site
    client = await connect(port, b"POST /post/predict?id=m&stream=true HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    await until(lambda: model.streams, "the model's stream")
    stream = model.streams[0]
    client.transport.pauseProducing()  # the client stops reading
    piece = "x" * 32000
    given = 0
    while not stream.pauses:
        assert given < 2000, "64 MB given and the model was never paused"
        stream.chunk(piece)
        given += 1
        await deferLater(reactor, 0, lambda: None)
    assert stream.resumes == 0
    client.transport.resumeProducing()
    await until(lambda: stream.resumes, "the model resumed once the client reads again")
    stream.end()
    raw = await client.closed
    assert raw.count(b'data: "' + piece.encode() + b'"\n\n') == given


@pytest_twisted.ensureDeferred
async def test_on_a_socket_a_client_that_closes_mid_stream_is_a_499_and_leaves_no_producer_behind(streaming_site):
    # A TCP connection stops its producer as it is lost, before the request hears of it:
    # the cancel that follows is the client's (499), not the model abandoning it (503).
    from twisted.logger import globalLogPublisher

    port, model = streaming_site
    failures = []

    def observe(event):
        if event.get("log_failure") is not None:
            failures.append(event["log_failure"].getErrorMessage())

    globalLogPublisher.addObserver(observe)
    try:
        client = await connect(port, b"POST /post/predict?id=m HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                                     b"Content-Length: 2\r\n\r\n{}")
        await until(lambda: model.streams, "the model's stream")
        stream = model.streams[0]
        stream.chunk("one")
        await until(lambda: b'data: "one"' in client.data, "the first chunk")
        client.transport.loseConnection()
        await client.closed
        await until(lambda: requests_logged(model), "the request to be logged")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert requests_logged(model) == [(499, "the client went away")]
    assert stream.stopped or stream.cancelled
    assert failures == []


def test_any_framing_of_the_event_stream_media_type_gets_keepalives_whatever_its_parameters():
    parts = ((b"data: ", b"\n\n"), (b"", b""), (b"data: ", b"\n\n"))
    assert SSE.keepalive() == SSE_KEEPALIVE == b": keepalive\n\n"
    assert Framing("with-charset", b"Text/Event-Stream; charset=utf-8", *parts).keepalive() == SSE_KEEPALIVE
    assert NDJSON.keepalive() is None
    assert Framing("other", b"application/json-seq", *parts).keepalive() is None


def test_a_stream_is_settled_by_the_policy_that_admitted_it_though_the_daemon_has_none_now(clock):
    """The last key deleted mid-stream (the daemon's policy made again: none): the stream still ends well."""
    from aibackend.policy import Policy
    from aibackend.testing import DoorStream

    model = FakeStreamingModel("s", clock)
    door = StubFrontDoor(clock, [model])
    door.front_door.core.policy = Policy()
    opened = DoorStream(door, "POST", "/post/predict?id=s&stream=true", data=b"{}")
    model.streams[0].chunk("hel")
    door.front_door.core.policy = None
    model.streams[0].end()
    body = opened.body  # (flushes)
    assert has_fired(opened.ended)
    assert b"error" not in body and body.endswith(b"}\n\n"), body
