"""
The Open Inference Protocol's generate extension (C{/v2/models/{m}/generate} and
C{/generate_stream}), in memory: L{StubFrontDoor} over L{FakeModel}s and
L{FakeStreamingModel}s whose recorded bodies show what a model was sent. The real daemon's
side is in tests/test_v2_daemon.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from twisted.internet.defer import maybeDeferred

from aibackend import errors
from aibackend.auth import Guard
from aibackend.config import V2Spec, parse_config
from aibackend.generate import Answers, GenerateFraming, model_body
from aibackend.testing import (
    FakeModel,
    FakeStreamingModel,
    DoorStream,
    StubFrontDoor,
    assert_v2_error,
    has_fired,
    result_of,
    sse_data,
)

KEY = "client-key-0123456789"
HEAD = {"model_name": "m", "model_version": "1"}


def with_v2(fake: FakeModel, **keys) -> FakeModel:
    fake.spec = dataclasses.replace(fake.spec, v2=V2Spec(**keys))
    return fake


@pytest.fixture
def model(clock):
    """A model that streams (its plain requests are answered by FakeModel's send)."""
    return FakeStreamingModel("m", clock)


@pytest.fixture
def plain(clock):
    """A model that does not stream."""
    return FakeModel("plain", clock)


@pytest.fixture
def door(clock, model, plain):
    return StubFrontDoor(clock, [model, plain])


def post(door, url, body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return door.call("POST", url, data=data, **kwargs)


def generate(door, model, body, **kwargs):
    return post(door, f"/v2/models/{model}/generate", body, **kwargs)


def open_stream(door, model, body, **kwargs) -> DoorStream:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return DoorStream(door, "POST", f"/v2/models/{model}/generate_stream", data=data, **kwargs)


def requests_logged(model):
    return [(e["operation"], e["status"], e.get("error")) for e in model.model_log.query()
            if e["event"] == "request"]


# --- the request a model gets ------------------------------------------------------------


def test_the_request_object_is_the_models_body_with_its_parameters_merged_in(door, plain):
    plain.answers(200, "hi there")

    response = generate(door, "plain", {"text_input": "hi", "parameters": {"max_tokens": 3, "temperature": 0.5,
                                                                           "stream": False, "stop": "."}})

    assert response.status == 200, response.body
    (received,) = plain.received
    assert received.json() == {"text_input": "hi", "max_tokens": 3, "temperature": 0.5, "stream": False, "stop": "."}
    assert received.context.operation == "generate"
    assert received.context.path is None
    assert requests_logged(plain) == [("generate", 200, None)]


def test_other_inputs_go_as_they_are_and_text_input_may_be_left_out(door, plain):
    generate(door, "plain", {"prompt": "the daemon", "max_words": 4, "words": ["a", "b"], "weights": {"a": 1}})
    generate(door, "plain", {})

    assert [r.json() for r in plain.received] == [
        {"prompt": "the daemon", "max_words": 4, "words": ["a", "b"], "weights": {"a": 1}}, {},
    ]


def test_a_body_without_parameters_is_sent_as_its_json():
    assert json.loads(model_body({"text_input": "x", "n": 1})) == {"text_input": "x", "n": 1}
    assert json.loads(model_body({"text_input": "x", "parameters": {}})) == {"text_input": "x"}


@pytest.mark.parametrize("body, message", [
    (b"", "the request body is empty"),
    (b"[1, 2]", "the request body must be a JSON object, got list"),
    (b'"hello"', "the request body must be a JSON object, got str"),
    (b"{nope", "the request body is not valid JSON"),
    (b'{"x": NaN}', "NaN is not valid JSON"),
    ({"text_input": 5}, "text_input must be a string, got a number"),
    ({"text_input": ["a"]}, "text_input must be a string, got an array"),
    ({"text_input": "a", "parameters": [1]}, "parameters must be an object of name: string, number or boolean, "
                                             "got an array"),
    ({"text_input": "a", "parameters": None}, "parameters must be an object"),
    ({"text_input": "a", "parameters": {"stop": ["."]}}, "parameters.stop must be a string, number or boolean, "
                                                         "got an array"),
    ({"text_input": "a", "parameters": {"x": None}}, "parameters.x must be a string, number or boolean, got null"),
    ({"text_input": "a", "parameters": {"text_input": "b"}}, "'text_input' is given twice: as an input and in "
                                                            "parameters"),
])
def test_bodies_that_are_not_a_generate_request_are_400_before_the_model_is_asked(door, model, body, message):
    for route in ("generate", "generate_stream"):
        response = post(door, f"/v2/models/m/{route}", body)

        assert_v2_error(response, 400, message=message)
    assert model.received == [] and model.streams == []
    assert [(operation, status) for operation, status, _ in requests_logged(model)] == [
        ("generate", 400), ("generate_stream", 400),
    ]


def test_binary_tensor_data_is_refused_as_for_infer(door, plain):
    response = post(door, "/v2/models/plain/generate", {"text_input": "a"},
                    headers={"Inference-Header-Content-Length": "10"})

    assert_v2_error(response, 400, message="binary_data=False")


# --- the answer -------------------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    ("Hello", {"text_output": "Hello"}),
    ("", {"text_output": ""}),
    ({"text_output": "Hi", "tokens": 2, "finish_reason": "stop"}, {"text_output": "Hi", "tokens": 2,
                                                                     "finish_reason": "stop"}),
    ({"model_name": "other", "model_version": "9", "text_output": "x"}, {"text_output": "x"}),
    ({}, {}),
    (3, {"text_output": "3"}),
    ([1, "a"], {"text_output": '[1, "a"]'}),
    (None, {"text_output": "null"}),
    (True, {"text_output": "true"}),
])
def test_the_output_becomes_the_answer_object(door, plain, answer, expected):
    plain.answers(200, answer)

    response = generate(door, "plain", {"text_input": "hi"})

    assert response.status == 200, response.body
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Request-Id")
    document = response.json()
    assert document == {"model_name": "plain", "model_version": "1", **expected}
    assert list(document)[:2] == ["model_name", "model_version"]


def test_a_string_output_is_put_in_as_the_model_wrote_it(door, plain):
    plain.answers(200, b' "caf\\u00e9 \\"x\\"" ')

    response = generate(door, "plain", {})

    assert response.body == b'{"model_name": "plain", "model_version": "1", "text_output": "caf\\u00e9 \\"x\\""}'
    assert response.json()["text_output"] == 'café "x"'


def test_a_declared_version_is_the_answers(clock):
    model = with_v2(FakeModel("m", clock), version="7").answers(200, "ok")
    door = StubFrontDoor(clock, [model])

    assert generate(door, "m", {}).json() == {"model_name": "m", "model_version": "7", "text_output": "ok"}
    assert post(door, "/v2/models/m/versions/7/generate", {}).status == 200
    assert_v2_error(post(door, "/v2/models/m/versions/1/generate", {}), 404,
                    message="model 'm' has no version '1': it has one version, '7'")


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_the_one_version_answers_and_others_are_404(door, model, route):
    model.answers(200, "ok")

    other = post(door, f"/v2/models/m/versions/2/{route}", {})
    assert_v2_error(other, 404, message="model 'm' has no version '2': it has one version, '1'")
    if route == "generate":
        assert post(door, f"/v2/models/m/versions/1/{route}", {}).status == 200
    else:
        stream = DoorStream(door, "POST", f"/v2/models/m/versions/1/{route}", data=b"{}")
        model.streams[0].end()
        assert stream.body == b""
        assert stream.response.code == 200


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_an_unknown_model_is_a_404(door, route):
    assert_v2_error(post(door, f"/v2/models/nope/{route}", {}), 404, message="no model with id 'nope'")


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_get_is_405_with_allow(door, route):
    response = door.call("GET", f"/v2/models/m/{route}")

    assert_v2_error(response, 405)
    assert response.header("Allow") == "POST"


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_client_keys_guard_generate(clock, route):
    model = FakeStreamingModel("m", clock).answers(200, "ok")
    door = StubFrontDoor(clock, [model], guard=Guard(None, ["tcp:0:interface=127.0.0.1"], [KEY]))

    refused = post(door, f"/v2/models/m/{route}", {})
    unknown = post(door, f"/v2/models/nope/{route}", {})

    for response in (refused, unknown):  # a client without a key learns nothing of which models exist
        assert_v2_error(response, 401)
        assert response.header("WWW-Authenticate").startswith("Bearer")
    assert model.received == [] and model.streams == []
    headers = {"Authorization": f"Bearer {KEY}"}
    if route == "generate":
        assert post(door, f"/v2/models/m/{route}", {}, headers=headers).status == 200
    else:
        stream = open_stream(door, "m", {}, headers=headers)
        model.streams[0].chunk("ok")
        model.streams[0].end()
        assert sse_data(stream.body) == [{**HEAD, "text_output": "ok"}]


def test_a_model_error_answer_is_the_protocols_error_with_its_status(door, plain):
    plain.answers(400, {"error": {"message": "prompt too long", "status": 400}})
    refused = generate(door, "plain", {"text_input": "x"})
    plain.answers(429, {"error": "slow down"}, headers={b"retry-after": b"3"})
    limited = generate(door, "plain", {"text_input": "x"})

    assert assert_v2_error(refused, 400) == "prompt too long"
    assert assert_v2_error(limited, 429) == "slow down"
    assert limited.header("Retry-After") == "3"


@pytest.mark.parametrize("error", [
    errors.ModelUnavailable("model 'plain' is restarting", model="plain"),
    errors.GatewayTimeout("model 'plain' did not answer in 1 s", model="plain"),
    errors.BadGateway("model 'plain' crashed", model="plain"),
])
def test_a_model_failure_is_the_protocols_error_with_its_status(door, plain, error):
    plain.fails(error)

    response = generate(door, "plain", {})

    assert assert_v2_error(response, error.status) == error.message


@pytest.mark.parametrize("body", [b"not json", b'{"a": NaN}', b"1e999"])
def test_an_answer_that_is_not_strict_json_is_502(door, plain, body):
    plain.answers(200, body)

    response = generate(door, "plain", {})

    assert_v2_error(response, 502, message="the answer of model 'plain'")


def test_generate_on_a_model_that_streams_is_a_plain_request(door, model):
    model.answers(200, "gathered by the model")

    response = generate(door, "m", {"prompt": "p"})

    assert response.json() == {**HEAD, "text_output": "gathered by the model"}
    assert [r.json() for r in model.received] == [{"prompt": "p"}]
    assert model.streams == []


def test_a_client_that_goes_away_from_generate_cancels_it_and_it_is_logged_499(door, plain):
    plain.holds()
    d = door.request("POST", "/v2/models/plain/generate", data=b"{}", headers={"X-Request-Id": "gone"})

    door.drop_connections()

    assert [received.context.request_id for received in plain.cancelled] == ["gone"]
    assert requests_logged(plain) == [("generate", 499, "the client went away")]
    d.addErrback(lambda failure: None)


def test_a_large_answer_is_converted_in_a_thread(clock):
    calls = []

    def in_thread(function, *args):
        calls.append(function)
        return maybeDeferred(function, *args)

    text = "w" * 300_000
    model = FakeModel("big", clock).answers(200, text)
    door = StubFrontDoor(clock, [model], in_thread=in_thread)

    response = generate(door, "big", {"text_input": "x" * 300_000})

    assert response.json() == {"model_name": "big", "model_version": "1", "text_output": text}
    assert len(calls) == 2  # the request's checks, and the answer's conversion


# --- generate_stream -------------------------------------------------------------------


def test_each_chunk_is_an_event_of_the_answer_object_and_the_stream_just_ends(door, model):
    stream = open_stream(door, "m", {"text_input": "hi", "parameters": {"max_tokens": 2}})
    (s,) = model.streams
    assert json.loads(s.body) == {"text_input": "hi", "max_tokens": 2}
    assert s.context.operation == "generate_stream" and s.context.path is None
    assert stream.response is None  # nothing written yet: no status either

    s.chunk("Hel")
    assert stream.body == b'data: {"model_name": "m", "model_version": "1", "text_output": "Hel"}\n\n'
    assert stream.response.code == 200
    assert stream.header("Content-Type") == "text/event-stream; charset=utf-8"
    assert stream.header("Cache-Control") == "no-cache"
    assert stream.header("X-Accel-Buffering") == "no"
    assert stream.header("X-Request-Id")
    assert stream.header("Content-Length") is None
    s.chunk({"text_output": "lo", "model_name": "not this", "tokens": [5]})
    s.chunk(7)
    assert not has_fired(stream.ended)
    s.end()

    assert sse_data(stream.body) == [
        {**HEAD, "text_output": "Hel"}, {**HEAD, "text_output": "lo", "tokens": [5]}, {**HEAD, "text_output": "7"},
    ]
    assert has_fired(stream.ended)
    assert requests_logged(model) == [("generate_stream", 200, None)]
    assert model.in_flight == 0


def test_a_final_output_is_one_more_event(door, model):
    stream = open_stream(door, "m", {})
    model.streams[0].chunk("a")
    model.streams[0].end({"text_output": "", "finish_reason": "length"})

    assert sse_data(stream.body) == [{**HEAD, "text_output": "a"},
                                     {**HEAD, "text_output": "", "finish_reason": "length"}]


def test_a_stream_of_one_output_and_no_chunk(door, model):
    stream = open_stream(door, "m", {})
    model.streams[0].end("all at once")

    assert sse_data(stream.body) == [{**HEAD, "text_output": "all at once"}]
    assert stream.response.code == 200


def test_a_stream_that_ends_with_nothing_is_an_empty_200(door, model):
    stream = open_stream(door, "m", {})
    model.streams[0].end()

    assert stream.body == b""
    assert stream.response.code == 200
    assert stream.header("Content-Type") == "text/event-stream; charset=utf-8"
    assert has_fired(stream.ended)


def test_a_chunk_that_is_not_json_is_its_text(door, model):
    stream = open_stream(door, "m", {})
    model.streams[0].chunk(b"plain words\nand more")
    model.streams[0].end()

    assert sse_data(stream.body) == [{**HEAD, "text_output": "plain words\nand more"}]


@pytest.mark.parametrize("error", [
    errors.ModelUnavailable("model 'm' is restarting", model="m"),
    errors.GatewayTimeout("model 'm' sent nothing in 5 s", model="m"),
    errors.BadRequest("max_words must be a whole number", model="m"),
])
def test_an_error_before_the_first_byte_is_a_json_error_with_its_status(door, model, error):
    d = door.request("POST", "/v2/models/m/generate_stream", data=b"{}")
    model.streams[0].fail(error)
    door.flush()

    response = result_of(d)

    assert assert_v2_error(response, error.status) == error.message
    assert requests_logged(model) == [("generate_stream", error.status, error.message)]


def test_an_error_after_the_first_byte_is_an_error_event_and_the_end(door, model):
    stream = open_stream(door, "m", {})
    model.streams[0].chunk("a")
    model.streams[0].fail(errors.GatewayTimeout("model 'm' went quiet", model="m"))

    assert stream.body == (b'data: {"model_name": "m", "model_version": "1", "text_output": "a"}\n\n'
                           b'data: {"error": "model \'m\' went quiet"}\n\n')
    assert stream.response.code == 200
    assert has_fired(stream.ended)
    assert requests_logged(model) == [("generate_stream", 504, "model 'm' went quiet")]


def test_a_bug_after_the_first_byte_is_an_error_event_too(door, model, logged_errors):
    stream = open_stream(door, "m", {})
    model.streams[0].chunk("a")
    model.streams[0].fail(ZeroDivisionError("oops"))

    events = sse_data(stream.body)
    assert events[0] == {**HEAD, "text_output": "a"}
    assert set(events[1]) == {"error"} and "oops" not in events[1]["error"]
    assert has_fired(stream.ended)
    assert requests_logged(model)[0][:2] == ("generate_stream", 500)
    assert len(logged_errors.flush(ZeroDivisionError)) == 1


def test_a_client_that_leaves_cancels_the_stream_and_is_logged_499(door, model):
    stream = open_stream(door, "m", {})
    model.streams[0].chunk("a")
    assert stream.body

    door.drop_connections()

    assert model.streams[0].cancelled and model.streams[0].stopped
    assert requests_logged(model) == [("generate_stream", 499, "the client went away")]
    assert model.in_flight == 0
    stream.ended.addErrback(lambda _: None)


def test_the_client_reading_slowly_pauses_the_model(door, model):
    stream = open_stream(door, "m", {})
    model.streams[0].chunk("a")
    stream.body
    (channel,) = door.site.channels

    channel.pauseProducing()
    channel.resumeProducing()

    assert (model.streams[0].pauses, model.streams[0].resumes) == (1, 1)
    model.streams[0].end()
    assert sse_data(stream.body) == [{**HEAD, "text_output": "a"}]


def test_a_model_that_does_not_stream_is_a_400(door, plain):
    response = post(door, "/v2/models/plain/generate_stream", {"text_input": "x"})

    assert_v2_error(response, 400, message="model 'plain' cannot stream: its type does not answer in chunks")
    assert plain.received == []
    assert requests_logged(plain) == [("generate_stream", 400, "model 'plain' cannot stream: its type does not "
                                                              "answer in chunks")]


def test_a_raw_subprocess_model_cannot_stream(clock, door):
    spec = parse_config({"models": [{"id": "r", "type": "subprocess", "protocol": "raw",
                                     "command": ["python3", "-c", "pass"]}]}, environ={}).models[0]
    door.registry.add(FakeModel("r", clock), spec=spec)

    response = post(door, "/v2/models/r/generate_stream", {})

    assert_v2_error(response, 400, message="model 'r' cannot stream (protocol raw)")
    assert generate(door, "r", {}).status == 200  # generate is a plain request: any model takes it


def test_the_framing_alone():
    framing = GenerateFraming(Answers("g", "2"))

    assert framing.content_type == b"text/event-stream; charset=utf-8"
    assert framing.chunk(b'"w"') == b'data: {"model_name": "g", "model_version": "2", "text_output": "w"}\n\n'
    assert framing.end(None) == b""
    assert framing.end(b'{"a": 1}') == b'data: {"model_name": "g", "model_version": "2", "a": 1}\n\n'
    assert framing.error({"error": "no"}) == b'data: {"error": "no"}\n\n'
    assert GenerateFraming(None).chunk(b'{"x":\n1}') == b'data: {"x": 1}\n\n'


# --- a native v2 model: its server's own routes -----------------------------------------------


@pytest.fixture
def native(clock):
    return with_v2(FakeModel("tri", clock), native=True, model="llm")


@pytest.fixture
def native_streaming(clock):
    return with_v2(FakeStreamingModel("tris", clock), native=True, model="llm")


@pytest.fixture
def native_door(clock, native, native_streaming):
    return StubFrontDoor(clock, [native, native_streaming])


def test_native_generate_goes_to_the_servers_generate_as_it_came(native_door, native):
    upstream = {"model_name": "llm", "model_version": "3", "text_output": "out"}
    native.answers(200, upstream)
    body = b'{"text_input": "in", "parameters": {"max_tokens": 5, "bad_words": [""]}}'

    response = post(native_door, "/v2/models/tri/generate", body)

    assert response.status == 200, response.body
    assert response.json() == upstream  # passed through, as infer's answers are
    (received,) = native.received
    assert received.body == body
    assert received.context.path == ("v2", "models", "llm", "generate")
    assert received.context.method == b"POST"
    assert received.context.operation == "generate"


def test_native_generate_of_a_version_goes_to_that_version(native_door, native):
    native.answers(200, {"text_output": ""})

    post(native_door, "/v2/models/tri/versions/3/generate", {})

    assert native.received[0].context.path == ("v2", "models", "llm", "versions", "3", "generate")


def test_native_errors_become_the_protocols_error(native_door, native):
    native.answers(400, {"error": "text_input is missing"})

    response = post(native_door, "/v2/models/tri/generate", {})

    assert assert_v2_error(response, 400) == "text_input is missing"


def test_native_requests_must_be_objects(native_door, native):
    assert_v2_error(post(native_door, "/v2/models/tri/generate", b"[]"), 400, message="must be a JSON object")
    assert native.received == []


def test_native_generate_stream_goes_to_the_servers_and_its_events_pass_through(native_door, native_streaming):
    stream = DoorStream(native_door, "POST", "/v2/models/tris/versions/3/generate_stream",
                          data=b'{"text_input": "in"}')
    (s,) = native_streaming.streams
    assert s.body == b'{"text_input": "in"}'
    assert s.context.path == ("v2", "models", "llm", "versions", "3", "generate_stream")
    s.chunk({"model_name": "llm", "model_version": "3", "text_output": "a"})
    s.chunk({"error": "upstream broke"})
    s.end()

    assert sse_data(stream.body) == [{"model_name": "llm", "model_version": "3", "text_output": "a"},
                                     {"error": "upstream broke"}]


def test_native_generate_stream_through_a_model_type_that_does_not_stream_is_400(native_door, native):
    response = post(native_door, "/v2/models/tri/generate_stream", {})

    assert_v2_error(response, 400, message="model 'tri' cannot stream")
    assert native.received == []
