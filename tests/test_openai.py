"""
The OpenAI-compatible API (C{/v1}, L{aibackend.openai_api}), in memory: L{StubFrontDoor}
over L{FakeModel}s and L{FakeStreamingModel}s whose recorded bodies show what a model was
sent. The real daemon with the real C{openai} client is tests/test_openai_daemon.py.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, maybeDeferred

from aibackend import errors
from aibackend.auth import Guard
from aibackend.jsonread import JSONProblem, read_json
from aibackend.openai_api import estimate_tokens, read_strict
from aibackend.testing import (
    DoorStream,
    FakeModel,
    FakeStreamingModel,
    StubFrontDoor,
    assert_openai_error,
    has_fired,
    openai_events,
    result_of,
)

KEY = "client-key-0123456789"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
def model(clock):
    return FakeStreamingModel("m", clock)


@pytest.fixture
def plain(clock):
    return FakeModel("plain", clock)


@pytest.fixture
def door(clock, model, plain):
    return StubFrontDoor(clock, [model, plain])


def post(door, path, body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return door.call("POST", path, data=data, **kwargs)


def open_stream(door, path, body, **kwargs) -> DoorStream:
    return DoorStream(door, "POST", path, data=json.dumps(body).encode(), **kwargs)


def requests_logged(model):
    return [(e["operation"], e["status"], e.get("error")) for e in model.model_log.query()
            if e["event"] == "request"]


# --- models ---------------------------------------------------------------------------------


def test_the_models_list_is_the_registrys_in_openais_shape(door):
    response = door.call("GET", "/v1/models")

    assert response.status == 200
    assert response.header("X-Request-Id")
    body = response.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [
        ("m", "model", "aibackend"), ("plain", "model", "aibackend")]
    assert all(isinstance(m["created"], int) for m in body["data"])


def test_one_model_and_an_unknown_one(door):
    assert door.call("GET", "/v1/models/m").json()["id"] == "m"
    assert_openai_error(door.call("GET", "/v1/models/nobody"), 404, "model_not_found", param="model",
                        message="'nobody' does not exist")


def test_unknown_routes_and_methods_are_openai_errors(door):
    assert_openai_error(door.call("GET", "/v1/nothing"), 404, "not_found")
    assert_openai_error(door.call("GET", "/v1"), 404, "not_found")
    assert_openai_error(door.call("GET", "/v1//models"), 404, "not_found")
    response = door.call("GET", "/v1/chat/completions")
    assert_openai_error(response, 405, "method_not_allowed")
    assert response.header("Allow") == "POST"


def test_a_client_key_is_needed_when_the_daemon_has_keys(clock, model):
    door = StubFrontDoor(clock, [model], guard=Guard(None, ["tcp:8080"], [KEY]))

    error = assert_openai_error(door.call("GET", "/v1/models"), 401, "unauthorized")
    assert error["type"] == "authentication_error"
    assert_openai_error(post(door, "/v1/chat/completions", CHAT, headers={"Authorization": "Bearer wrong-key-0123456"}),
                        401, "unauthorized")
    assert door.call("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status == 200
    assert model.received == [] and model.streams == []


# --- chat completions, no stream ------------------------------------------------------------


def test_a_chat_model_gets_the_request_without_the_front_doors_keys(door, plain):
    plain.answers(200, "Hi!")
    request = {**CHAT, "model": "plain", "max_tokens": 5, "temperature": 0.5, "stop": ["\n"], "n": 1, "seed": 3,
               "user": "u"}

    response = post(door, "/v1/chat/completions", request)

    assert response.status == 200, response.body
    (received,) = plain.received
    assert json.loads(received.body) == {key: value for key, value in request.items() if key != "model"}
    assert received.context.operation == "chat.completions"
    body = response.json()
    request_id = response.header("X-Request-Id")
    assert body["id"] == f"chatcmpl-{request_id}" and body["object"] == "chat.completion"
    assert body["model"] == "plain" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "logprobs": None,
                                "finish_reason": "stop"}]
    # Estimated: "hello there" (11 characters) and "Hi!" (3).
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert requests_logged(plain) == [("chat.completions", 200, None)]


def test_stream_false_and_no_stream_options_are_not_sent(door, plain):
    plain.answers(200, "ok")
    post(door, "/v1/chat/completions", {**CHAT, "model": "plain", "stream": False})
    assert json.loads(plain.received[0].body) == {"messages": CHAT["messages"]}


def test_an_answer_object_gives_its_finish_reason_and_usage(door, plain):
    plain.answers(200, {"content": "Hi", "finish_reason": "length", "usage": {"prompt_tokens": 7,
                                                                              "completion_tokens": 2}})
    body = post(door, "/v1/chat/completions", {**CHAT, "model": "plain"}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "Hi"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def test_gathered_chunks_are_joined(door, plain):
    plain.answers(200, [{"content": "Hel"}, "lo", {"finish_reason": "length"}])
    body = post(door, "/v1/chat/completions", {**CHAT, "model": "plain"}).json()
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "length"


def test_completions_answer_text_completion_objects(door, plain):
    plain.answers(200, "and more")
    response = post(door, "/v1/completions", {"model": "plain", "prompt": "once", "max_tokens": 3})

    assert json.loads(plain.received[0].body) == {"prompt": "once", "max_tokens": 3}
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "and more", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["prompt_tokens"] == estimate_tokens("once")


@pytest.mark.parametrize("body, param, message", [
    (b"", None, "empty"),
    (b"[1]", None, "must be a JSON object"),
    (b"{", None, "JSON"),
    ({"messages": CHAT["messages"]}, "model", "model must be given"),
    ({"model": "m"}, "messages", "messages must be"),
    ({"model": "m", "messages": []}, "messages", "messages must be"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]", "with a role"),
    ({**CHAT, "stream": "yes"}, "stream", "stream must be true or false"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "only for a stream"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "true or false"),
])
def test_bad_chat_requests_are_400_with_the_param(door, model, body, param, message):
    response = post(door, "/v1/chat/completions", body)
    error = assert_openai_error(response, 400, "bad_request", param=param, message=message)
    assert error["type"] == "invalid_request_error"
    assert model.received == [] and model.streams == []


def test_an_unknown_model_is_404(door):
    assert_openai_error(post(door, "/v1/chat/completions", {**CHAT, "model": "nobody"}), 404, "model_not_found",
                        param="model")


def test_a_models_error_answer_keeps_its_status_and_words(door, plain):
    plain.answers(500, {"error": {"message": "it broke", "status": 500}})
    response = post(door, "/v1/chat/completions", {**CHAT, "model": "plain"})
    error = assert_openai_error(response, 500, "model_error", message="it broke")
    assert error["type"] == "server_error"


def test_a_model_that_is_busy_is_a_429_with_retry_after(door, plain):
    plain.fails(errors.ModelBusy("model 'plain' is busy: 3 requests are waiting (max_queue)", model="plain"))
    response = post(door, "/v1/chat/completions", {**CHAT, "model": "plain"})
    error = assert_openai_error(response, 429, "rate_limit_exceeded", message="is busy")
    assert error["type"] == "rate_limit_error"
    assert response.header("Retry-After") == "1"
    assert requests_logged(plain) == [("chat.completions", 503, "model 'plain' is busy: 3 requests are waiting "
                                                               "(max_queue)")]


def test_a_model_that_is_not_ready_is_a_503(door, plain):
    plain.fails(errors.ModelUnavailable("model 'plain' is restarting", model="plain"))
    assert_openai_error(post(door, "/v1/chat/completions", {**CHAT, "model": "plain"}), 503, "model_unavailable")


@pytest.mark.parametrize("answer", [{"embeddings": [[1.0]]}, [[1.0, 2.0]], 3])
def test_a_chat_on_a_model_that_does_not_answer_text_is_a_400(door, plain, answer):
    plain.answers(200, answer)
    response = post(door, "/v1/chat/completions", {**CHAT, "model": "plain"})
    assert_openai_error(response, 400, "bad_request", message="cannot serve /v1/chat/completions")


def test_an_answer_that_is_not_json_is_a_502(door, plain):
    plain.answers(200, b"not json")
    assert_openai_error(post(door, "/v1/chat/completions", {**CHAT, "model": "plain"}), 502, "bad_gateway")


# --- chat completions, streamed ----------------------------------------------------------------


def test_a_stream_is_chunks_with_the_role_first_then_the_finish_and_done(door, model):
    stream = open_stream(door, "/v1/chat/completions", {**CHAT, "stream": True, "temperature": 0})
    (s,) = model.streams
    assert json.loads(s.body) == {"messages": CHAT["messages"], "temperature": 0}
    assert s.context.operation == "chat.completions"

    s.chunk("Hel")
    first = openai_events(stream.body, done=False)
    assert stream.response.code == 200
    assert stream.header("Content-Type") == "text/event-stream; charset=utf-8"
    assert stream.header("X-Request-Id")
    assert len(first) == 1 and first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    s.chunk({"content": "lo"})
    s.chunk({"finish_reason": "length"})
    assert not has_fired(stream.ended)
    s.end()

    events = openai_events(stream.body)
    request_id = stream.header("X-Request-Id")
    assert {(e["id"], e["object"], e["model"]) for e in events} == {
        (f"chatcmpl-{request_id}", "chat.completion.chunk", "m")}
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": "Hel"}, {"content": "lo"}, {"content": ""}, {}]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, None, "length"]
    assert all("usage" not in e for e in events)
    assert has_fired(stream.ended)
    assert requests_logged(model) == [("chat.completions", 200, None)]


def test_include_usage_gives_every_chunk_a_null_usage_and_a_last_usage_chunk(door, model):
    stream = open_stream(door, "/v1/chat/completions",
                         {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    (s,) = model.streams
    assert json.loads(s.body) == {"messages": CHAT["messages"]}
    s.chunk("abcd")
    s.chunk("efgh")
    s.end({"content": "ignored", "finish_reason": "stop", "usage": {"completion_tokens": 2}})

    events = openai_events(stream.body)
    assert [e["usage"] for e in events[:-1]] == [None, None, None]
    assert events[-1]["choices"] == []
    # The model counted its completion; the prompt ("hello there") is estimated.
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "abcdefgh"


def test_usage_the_stream_does_not_give_is_estimated_from_its_text(door, model):
    stream = open_stream(door, "/v1/completions",
                         {"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    for piece in ("Hé", " there", {"content": " you"}, "\n!"):
        model.streams[0].chunk(piece)
    model.streams[0].end()

    events = openai_events(stream.body)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hé there you\n!"
    assert all(e["usage"] is None for e in events[:-1])
    # 14 characters: 4 tokens, estimated; the prompt's 1 character: 1.
    assert events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * 4 + ["stop"]


def test_a_stream_answered_in_one_output_is_one_chunk(door, model):
    stream = open_stream(door, "/v1/chat/completions", {**CHAT, "stream": True})
    model.streams[0].end("all at once")

    events = openai_events(stream.body)
    assert [e["choices"][0]["delta"] for e in events] == [{"role": "assistant", "content": "all at once"}, {}]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_quiet_stream_gets_sse_keepalive_comments_the_client_skips(door, model, clock):
    stream = open_stream(door, "/v1/chat/completions", {**CHAT, "stream": True})
    model.streams[0].chunk("a")
    clock.advance(model.spec.keepalive_seconds)
    model.streams[0].end()

    assert b"\n\n: keepalive\n\n" in stream.body
    assert [e["choices"][0]["delta"] for e in openai_events(stream.body)] == [
        {"role": "assistant", "content": "a"}, {}]


def test_a_completion_stream_is_text_completion_chunks(door, model):
    stream = open_stream(door, "/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    model.streams[0].chunk("a")
    model.streams[0].end()

    events = openai_events(stream.body)
    assert [(e["object"], e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events] == [
        ("text_completion", "a", None), ("text_completion", "", "stop")]


def test_an_error_before_the_first_byte_is_a_json_error(door, model):
    d = door.request("POST", "/v1/chat/completions", data=json.dumps({**CHAT, "stream": True}).encode())
    model.streams[0].fail(errors.GatewayTimeout("model 'm' sent no chunk", model="m"))
    door.flush()
    assert_openai_error(result_of(d), 504, "gateway_timeout", message="sent no chunk")


def test_an_error_after_the_first_byte_is_a_last_error_event(door, model):
    stream = open_stream(door, "/v1/chat/completions", {**CHAT, "stream": True})
    model.streams[0].chunk("a")
    model.streams[0].fail(errors.BadGateway("model 'm' crashed", model="m"))

    events = openai_events(stream.body, done=False)
    assert events[-1] == {"error": {"message": "model 'm' crashed", "type": "server_error", "param": None,
                                    "code": "bad_gateway"}}
    assert has_fired(stream.ended)
    assert requests_logged(model) == [("chat.completions", 502, "model 'm' crashed")]


def test_a_client_that_leaves_cancels_the_stream_and_is_logged_499(door, model):
    stream = open_stream(door, "/v1/chat/completions", {**CHAT, "stream": True})
    model.streams[0].chunk("a")
    assert stream.body
    door.drop_connections()

    assert model.streams[0].cancelled and model.streams[0].stopped
    assert requests_logged(model) == [("chat.completions", 499, "the client went away")]
    assert model.in_flight == 0
    stream.ended.addErrback(lambda _: None)


def test_a_model_that_cannot_stream_answers_a_stream_of_its_whole_answer(door, plain):
    plain.answers(200, {"content": "all of it", "finish_reason": "length"})
    response = post(door, "/v1/chat/completions", {**CHAT, "model": "plain", "stream": True,
                                                    "stream_options": {"include_usage": True}})

    assert response.status == 200
    assert response.header("Content-Type") == "text/event-stream; charset=utf-8"
    assert response.header("X-Request-Id")
    events = openai_events(response.body)
    assert [e["choices"][0] for e in events[:-1]] == [
        {"index": 0, "delta": {"role": "assistant", "content": "all of it"}, "logprobs": None, "finish_reason": None},
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert events[-1]["usage"]["completion_tokens"] == estimate_tokens("all of it")
    assert json.loads(plain.received[0].body) == {"messages": CHAT["messages"]}
    assert requests_logged(plain) == [("chat.completions", 200, None)]


def test_a_model_that_cannot_stream_and_fails_is_a_json_error(door, plain):
    plain.answers(503, {"error": {"message": "not now"}}, headers={b"retry-after": b"2"})
    response = post(door, "/v1/completions", {"model": "plain", "prompt": "x", "stream": True})
    assert_openai_error(response, 503, "model_error", message="not now")


# --- embeddings ----------------------------------------------------------------------------


def test_embeddings_get_a_list_of_inputs_and_answer_floats(door, plain):
    plain.answers(200, {"embeddings": [[0.5, 1.0]], "usage": {"prompt_tokens": 4}})
    response = post(door, "/v1/embeddings", {"model": "plain", "input": "one text", "dimensions": 2,
                                             "encoding_format": "float"})

    assert response.status == 200, response.body
    assert json.loads(plain.received[0].body) == {"input": ["one text"], "dimensions": 2}
    assert plain.received[0].context.operation == "embeddings"
    assert response.json() == {"object": "list", "model": "plain",
                               "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 1.0]}],
                               "usage": {"prompt_tokens": 4, "total_tokens": 4}}


def test_embeddings_in_base64_are_little_endian_float32(door, plain):
    plain.answers(200, [[0.5, -2.0], [1, 0]])
    body = post(door, "/v1/embeddings", {"model": "plain", "input": ["ab", "cdefgh"],
                                         "encoding_format": "base64"}).json()
    vectors = [struct.unpack("<2f", base64.b64decode(item["embedding"])) for item in body["data"]]
    assert vectors == [(0.5, -2.0), (1.0, 0.0)]
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == estimate_tokens("ab\ncdefgh")


@pytest.mark.parametrize("body, param", [
    ({"model": "plain"}, "input"),
    ({"model": "plain", "input": []}, "input"),
    ({"model": "plain", "input": [[1, 2]]}, "input"),
    ({"model": "plain", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": "plain", "input": "x", "stream": True}, "stream"),
])
def test_bad_embedding_requests_are_400(door, plain, body, param):
    assert_openai_error(post(door, "/v1/embeddings", body), 400, "bad_request", param=param)
    assert plain.received == []


@pytest.mark.parametrize("answer, status", [
    ("some text", 400), ({"content": "hi"}, 400), ([[1.0], [2.0]], 502), ([["a"]], 502),
])
def test_embeddings_from_a_model_that_is_not_an_embedder(door, plain, answer, status):
    plain.answers(200, answer)
    response = post(door, "/v1/embeddings", {"model": "plain", "input": "x"})
    assert response.status == status, response.body
    if status == 400:
        assert_openai_error(response, 400, "bad_request", message="cannot serve /v1/embeddings")


def test_a_large_body_is_read_in_a_thread(clock):
    calls = []

    def in_thread(function, *args):
        calls.append(function.__name__)
        return maybeDeferred(function, *args)

    model = FakeModel("big", clock).answers(200, {"embeddings": [[1.0]] * 2})
    door = StubFrontDoor(clock, [model], in_thread=in_thread)
    response = post(door, "/v1/embeddings", {"model": "big", "input": ["x" * 200_000, "y" * 200_000]})

    assert response.status == 200, response.body
    assert calls == ["prepare"]
    assert json.loads(model.received[0].body)["input"][1] == "y" * 200_000


def test_the_servers_refusals_on_v1_paths_are_in_openais_shape(clock, plain):
    door = StubFrontDoor(clock, [plain], max_body_bytes=100)
    response = post(door, "/v1/chat/completions", {**CHAT, "model": "plain", "user": "x" * 200})
    assert_openai_error(response, 413, "payload_too_large")
    problem = door.call("GET", "/v1/models/%FF")
    assert_openai_error(problem, 400, "bad_request", message="not UTF-8")


def test_the_hot_path_and_other_front_doors_are_unchanged(door, plain):
    assert door.call("POST", "/post/predict?id=plain", data=b"{}").json() == {"ok": True}
    assert door.call("GET", "/v1x").status == 404
    assert "error" in door.call("GET", "/v2/models/nobody").json()


# --- any request, any answer -----------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_keys = st.sampled_from(["messages", "prompt", "input", "stream", "stream_options", "encoding_format", "n",
                         "content", "role"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
       fields=st.dictionaries(_keys, _json_values, max_size=4), answer=_json_values)
def test_any_request_and_any_answer_is_answered_without_a_bug(clock, route, fields, answer):
    model = FakeModel("plain", clock).answers(200, answer)
    door = StubFrontDoor(clock, [model])

    response = post(door, route, {"model": "plain", **fields})

    assert response.status in (200, 400, 502), (response.status, response.body)
    if response.status != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


# --- the routes past Klein (issue 16): the same answers as Klein's routes --------------------------

# Klein routes a path by its segments once their %-escapes are decoded: /v1/%63hat/completions is
# Klein's route for chat completions, the same handler (OpenAIAPI.complete) reached through Klein.
KLEIN_PATHS = {"/v1/chat/completions": "/v1/%63hat/completions", "/v1/completions": "/v1/%63ompletions",
               "/v1/embeddings": "/v1/%65mbeddings"}


def without_ids(response):
    """A response as the client sees it, without what differs from one request to the next (its id)."""
    request_id = response.header("X-Request-Id")
    assert request_id
    text = response.body.decode("utf-8", "replace").replace(request_id, "ID")
    if text.startswith("data: "):
        body = openai_events(text.encode(), done=text.endswith("data: [DONE]\n\n"))
    else:
        body = json.loads(text) if text else None
    return (response.status, body, response.header("Content-Type"), response.header("Allow"),
            response.header("Retry-After"), response.header("WWW-Authenticate"))


@pytest.mark.parametrize("path, body, answer", [
    ("/v1/chat/completions", CHAT, "Hi!"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
     {"content": "all", "finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 3}}),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "Hi!"),
    ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 1e999}', "Hi!"),
    ("/v1/chat/completions", b'{"model": "m", "seed": 123456789012345678901234567890, "messages": [{"role": "user"}]}',
     "Hi!"),
    ("/v1/chat/completions", b"{", "Hi!"),
    ("/v1/chat/completions", {**CHAT, "model": "nobody"}, "Hi!"),
    ("/v1/chat/completions", CHAT, b"not json"),
    ("/v1/chat/completions", CHAT, {"embeddings": [[1.0]]}),
    ("/v1/completions", {"model": "m", "prompt": ["a", "b"], "max_tokens": 3}, {"content": "x"}),
    ("/v1/completions", {"model": "m", "prompt": 3}, "x"),
    ("/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "base64"}, [[0.5, 1]]),
    ("/v1/embeddings", {"model": "m", "input": ["x"], "stream": True}, [[0.5]]),
])
def test_the_fast_routes_answer_as_the_klein_routes_do(clock, path, body, answer):
    model = FakeModel("m", clock).answers(200, answer)
    door = StubFrontDoor(clock, [model])

    fast, routed = (post(door, route, body) for route in (path, KLEIN_PATHS[path]))

    assert without_ids(fast) == without_ids(routed)
    assert [json.loads(sent.body) for sent in model.received[::2]] == [
        json.loads(sent.body) for sent in model.received[1::2]]


@pytest.mark.parametrize("outcome", [
    lambda model: model.answers(429, {"error": {"message": "slow down"}}, {b"retry-after": b"3"}),
    lambda model: model.answers(503, b"not now"),
    lambda model: model.fails(errors.GatewayTimeout("too slow", model="m")),
    lambda model: model.fails(errors.ModelBusy("model 'm' is busy", model="m", retry_after=2)),
    lambda model: model.fails(CancelledError()),
    lambda model: model.fails(ZeroDivisionError("a bug")),
    lambda model: model.raises(ZeroDivisionError("a bug")),
], ids=["an error answer", "a text error", "a timeout", "busy", "cancelled", "a bug", "raises at once"])
def test_the_fast_route_and_the_klein_route_answer_and_log_each_outcome_alike(clock, outcome, logged_errors):
    model = outcome(FakeModel("m", clock))
    door = StubFrontDoor(clock, [model])

    fast = post(door, "/v1/chat/completions", CHAT)
    routed = post(door, KLEIN_PATHS["/v1/chat/completions"], CHAT)
    logged_errors.flush(ZeroDivisionError)

    assert without_ids(fast) == without_ids(routed)
    assert fast.status >= 400
    fast_entry, routed_entry = requests_logged(model)
    assert fast_entry == routed_entry and fast_entry[1] in (fast.status, 503)


@pytest.mark.parametrize("path", list(KLEIN_PATHS))
@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_another_method_on_a_fast_route_is_a_405_with_allow(door, path, method):
    response = door.call(method, path)

    assert response.status == 405
    assert response.header("Allow") == "POST"
    assert response.header("X-Request-Id")
    if method != "HEAD":
        assert_openai_error(response, 405, "method_not_allowed", message=f"{method} is not allowed here")


def test_a_host_that_is_not_utf8_on_a_fast_route_is_a_400(door, plain):
    response = post(door, "/v1/chat/completions", {**CHAT, "model": "plain"}, headers={b"Host": [b"\xff.example"]})

    assert_openai_error(response, 400, "bad_request", message="Host header is not UTF-8")
    assert plain.received == []


def test_a_fast_route_checks_the_client_key_first(clock, plain):
    plain.answers(200, [[1.0]])
    door = StubFrontDoor(clock, [plain], guard=Guard(None, ["tcp:8080"], [KEY]))

    refused = post(door, "/v1/embeddings", b"not even json")
    allowed = post(door, "/v1/embeddings", {"model": "plain", "input": "x"},
                   headers={"Authorization": f"Bearer {KEY}"})

    assert_openai_error(refused, 401, "unauthorized")
    assert refused.header("WWW-Authenticate") == 'Bearer realm="aibackend"'
    assert allowed.status == 200, allowed.body


@pytest.mark.parametrize("answer", [
    "a text \ud800 with a lone surrogate",
    {"content": "counted", "usage": {"prompt_tokens": 123456789012345678901234567890, "completion_tokens": 1}},
    {"finish_reason": "length"},
])
def test_a_stream_made_of_a_whole_answer_says_what_the_plain_answer_says(door, plain, answer):
    """One reading of the model's answer for both (Completions.read): its text, finish_reason and usage."""
    plain.answers(200, json.dumps(answer).encode())
    whole = post(door, "/v1/chat/completions", {**CHAT, "model": "plain"}).json()
    events = openai_events(post(door, "/v1/chat/completions", {**CHAT, "model": "plain", "stream": True,
                                                                "stream_options": {"include_usage": True}}).body)

    choice = whole["choices"][0]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == choice["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert events[-1]["usage"] == whole["usage"]


# --- reading JSON: orjson first, json's word where they differ -----------------------------------

SPECIAL_TEXTS = [
    b'{"seed": 123456789012345678901234567890}', b'{"a": 18446744073709551616}', b'{"a": -9223372036854775809}',
    b'{"phone": "12345678901234567890"}', b'{"a": 1e999}', b'{"a": -1e400}', b'{"a": 1e-400}', b'{"a": NaN}',
    b'{"a": Infinity}', b'{"a": "\\ud800"}', b'{"a": "x\x01"}', b"\xef\xbb\xbf{}", b"\xff\xfe", b'{"a": 1, "a": 2}',
    b"[" * 513 + b"]" * 513, b"[" * 512 + b"]" * 512, b"[" * 1100 + b"]" * 1100, b'{"a": -0, "b": -0.0, "c": 1E5}',
    b"", b"  ", b'{"a":1}\x0c', b'"\\u00e9\xc3\xa9"', b"01", b"1.", b"[1,]",
]


def _read(read, text):
    try:
        return "value", repr(read(text))
    except JSONProblem as e:
        return "refused", str(e)


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_read_strict_reads_what_json_reads_the_same(text):
    assert _read(lambda t: read_strict(t, "the body"), text) == _read(
        lambda t: read_json(t, "the body", finite=True), text)


@settings(max_examples=300, deadline=None)
@given(value=_json_values, spaces=st.booleans())
def test_read_strict_reads_any_json_as_json_does(value, spaces):
    text = json.dumps(value, separators=(", ", ": ") if spaces else (",", ":"), ensure_ascii=spaces).encode()
    assert _read(lambda t: read_strict(t, "the body"), text) == _read(
        lambda t: read_json(t, "the body", finite=True), text)


@pytest.mark.parametrize("document, message", [
    ({"error": {"message": "it broke", "type": "x"}}, "it broke"),
    ({"error": {"message": ""}}, ""),
    ({"error": "v2's words"}, "v2's words"),
    ({"error": {"message": 5}}, None),
    ({"error": 5}, None),
    ({"message": "no error key"}, None),
    (["error"], None),
    (None, None),
])
def test_error_message_is_the_words_of_an_error_document(document, message):
    assert errors.error_message(document) == message
