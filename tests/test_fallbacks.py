"""
Fallback chains (issue 18, item 3): a model's `fallbacks`, tried in turn when it fails before
its client got a byte, under one deadline; the answer names the model that served it; the
access event and a metric record the chain; an admin's mock failure. Through StubFrontDoor
over fake models on a Clock (the real daemon: tests/test_fallbacks_daemon.py).
"""

import dataclasses
import json

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aibackend import errors
from aibackend.auth import Guard
from aibackend.config import Table, parse_model
from aibackend.configbase import OpenAISpec, TensorSpec, V2Spec
from aibackend.policy import ILimiter, Policy
from aibackend.interfaces import ModelAnswer
from aibackend.relay import falls_back
from aibackend.testing import (
    DoorStream, FakeModel, FakeStreamingModel, ManagedFrontDoor, StubFrontDoor, access_events_logged, assert_error,
    fallback_steps, has_fired, name_caller, result_of, with_fallbacks,
)

ADMIN_TOKEN = "an-admin-token-long-enough"


def requests_logged(model):
    return [(e["status"], e.get("error")) for e in model.model_log.query() if e["event"] == "request"]


def steps(door):
    return fallback_steps(door.front_door.metrics.render().decode())


@pytest.fixture
def access_events():
    with access_events_logged() as events:
        yield events


@pytest.fixture
def chain(clock):
    """Models a (fallbacks b, c; timeout 10 s), b and c, and a door over them."""
    a = with_fallbacks(FakeModel("a", clock), "b", "c", timeout=10)
    b, c = FakeModel("b", clock), FakeModel("c", clock)
    b.answers(body={"from": "b"})
    c.answers(body={"from": "c"})
    return StubFrontDoor(clock, [a, b, c]), a, b, c


def predict(door, model_id="a", body=b'{"x": 1}', **kwargs):
    return door.call("POST", f"/post/predict?id={model_id}", data=body, **kwargs)


# --- the config key -----------------------------------------------------------------------


def problems_of(table):
    problems = []
    spec = parse_model(Table(table, "models[0]", problems))
    return spec, problems


def test_fallbacks_are_read_and_shown():
    spec, problems = problems_of({"id": "a", "type": "http", "url": "http://127.0.0.1:9/", "fallbacks": ["b", "c"]})
    assert problems == []
    assert spec.fallbacks == ("b", "c")
    assert spec.public()["fallbacks"] == ["b", "c"]


def test_a_model_without_fallbacks_has_none_and_shows_none():
    spec, problems = problems_of({"id": "a", "type": "http", "url": "http://127.0.0.1:9/"})
    assert problems == [] and spec.fallbacks == ()
    assert "fallbacks" not in spec.public()


@pytest.mark.parametrize("fallbacks, problem", [
    (["a"], ("models[0].fallbacks[0]", "names the model itself ('a')")),
    (["b", "b"], ("models[0].fallbacks[1]", "names model 'b' twice")),
    (["b", "no way"], ("models[0].fallbacks[1]",
                       "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'")),
    ("b", ("models[0].fallbacks", "must be a list of strings")),
    ([1], ("models[0].fallbacks", "must be a list of strings")),
    ([f"m{i}" for i in range(9)], ("models[0].fallbacks", "may name at most 8 models, got 9")),
])
def test_bad_fallbacks_are_config_errors_naming_the_key(fallbacks, problem):
    _, problems = problems_of({"id": "a", "type": "http", "url": "http://127.0.0.1:9/", "fallbacks": fallbacks})
    assert problems == [problem]


def test_addmodel_takes_fallbacks_that_need_not_exist_yet(clock):
    door = ManagedFrontDoor(clock)
    response = door.add({"id": "a", "type": "http", "url": "http://127.0.0.1:9/", "fallbacks": ["later"]})
    assert response.status == 201, response.body
    assert door.status("a").json()["spec"]["fallbacks"] == ["later"]
    response = door.add({"id": "z", "type": "http", "url": "http://127.0.0.1:9/", "fallbacks": ["z"]})
    assert_error(response, 400, "bad_request", model="z")
    assert "fallbacks[0]: names the model itself ('z')" in response.json()["error"]["message"]


# --- what falls back ------------------------------------------------------------------------


@pytest.mark.parametrize("status, expected", [
    (429, True), (500, True), (502, True), (503, True), (504, True), (599, True),
    (400, False), (401, False), (403, False), (404, False), (408, False), (413, False), (422, False), (200, False),
])
def test_which_statuses_fall_back(status, expected):
    assert falls_back(status) is expected


FAILURES = {
    "not ready": lambda m: m.fails(errors.ModelUnavailable("model 'a' is not ready", model="a")),
    "busy": lambda m: m.fails(errors.ModelBusy("model 'a' is busy", model="a")),
    "refused at once": lambda m: m.raises(errors.ModelUnavailable("model 'a' is starting", model="a")),
    "connection refused": lambda m: m.fails(errors.BadGateway("connection refused", model="a")),
    "timeout": lambda m: m.fails(errors.GatewayTimeout("model 'a' did not answer in 2 s", model="a")),
    "its 429": lambda m: m.answers(429, {"error": "slow down"}, {"Retry-After": "3"}),
    "its 500": lambda m: m.answers(500, {"error": "boom"}),
    "its 503": lambda m: m.answers(503, {"error": "loading"}),
}
REASONS = {"not ready": "unavailable", "busy": "unavailable", "refused at once": "unavailable",
           "connection refused": "bad_gateway", "timeout": "timeout", "its 429": "rate_limited",
           "its 500": "error", "its 503": "unavailable"}
STATUSES = {"not ready": 503, "busy": 503, "refused at once": 503, "connection refused": 502, "timeout": 504,
            "its 429": 429, "its 500": 500, "its 503": 503}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_each_failure_before_an_answer_goes_to_the_next_model(chain, kind, access_events):
    door, a, b, c = chain
    FAILURES[kind](a)
    response = predict(door)
    assert response.status == 200 and response.json() == {"from": "b"}
    assert response.header("x-aibackend-model") == "b"
    assert response.header("retry-after") is None  # a's answer is not the client's
    assert b.received[0].body == a.received[0].body == b'{"x": 1}'  # the same bytes
    assert b.received[0].context == a.received[0].context
    assert c.received == []
    status = STATUSES[kind]
    assert [s for s, _ in requests_logged(a)] == [status]  # each attempt in its own model's log
    assert requests_logged(b) == [(200, None)]
    assert steps(door) == {("a", "b", REASONS[kind]): 1.0}
    (event,) = access_events
    assert (event["model"], event["served_by"], event["chain"]) == ("a", "b", f"a:{status}>b:200")
    assert event["line"].endswith(f" served_by=b chain=a:{status}>b:200")
    assert a.in_flight == b.in_flight == 0
    assert door.registry.entry("a").stats.in_flight == door.registry.entry("b").stats.in_flight == 0


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_client_error_is_answered_and_not_sent_on(chain, status):
    door, a, b, c = chain
    a.answers(status, {"error": "your fault"})
    response = predict(door)
    assert response.status == status and response.json() == {"error": "your fault"}
    assert response.header("x-aibackend-model") == "a"
    assert b.received == [] and steps(door) == {}


def test_a_bad_request_error_is_not_sent_on(chain):
    door, a, b, c = chain
    a.fails(errors.BadRequest("no such input", model="a"))
    assert_error(predict(door), 400, "bad_request", model="a", message="no such input")
    assert b.received == []


def test_the_chain_goes_on_past_a_second_failure(chain, access_events):
    door, a, b, c = chain
    a.answers(503, {"error": "loading"})
    b.fails(errors.BadGateway("connection reset", model="b"))
    response = predict(door)
    assert response.json() == {"from": "c"} and response.header("x-aibackend-model") == "c"
    assert steps(door) == {("a", "b", "unavailable"): 1.0, ("b", "c", "bad_gateway"): 1.0}
    assert access_events[0]["chain"] == "a:503>b:502>c:200"


def test_when_every_model_fails_the_last_failure_is_answered(chain):
    door, a, b, c = chain
    a.answers(503, {"error": "loading"})
    b.fails(errors.BadGateway("connection reset", model="b"))
    c.answers(500, {"error": "c broke"})
    response = predict(door)
    assert response.status == 500 and response.json() == {"error": "c broke"}
    assert response.header("x-aibackend-model") == "c"


def test_the_last_error_is_answered_in_the_front_doors_shape(chain):
    door, a, b, c = chain
    for model in (a, b, c):
        model.fails(errors.ModelUnavailable(f"model {model.model_id!r} is not ready", model=model.model_id))
    assert_error(predict(door), 503, "model_unavailable", model="c", message="model 'c' is not ready")
    assert [len(m.received) for m in (a, b, c)] == [1, 1, 1]


def test_a_missing_fallback_is_skipped_and_logged(clock, logged_errors):
    a = with_fallbacks(FakeModel("a", clock), "gone", "b").answers(503, {"error": "x"})
    b = FakeModel("b", clock).answers(body={"from": "b"})
    door = StubFrontDoor(clock, [a, b])
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        response = predict(door)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.json() == {"from": "b"}
    assert any("fallback gone of model a is skipped: there is no such model now" in str(e.get("log_format", ""))
               .format(**e) for e in events if "log_format" in e)
    assert steps(door) == {("a", "b", "unavailable"): 1.0}


def test_a_fallbacks_own_fallbacks_are_not_followed(clock):
    a = with_fallbacks(FakeModel("a", clock), "b").answers(503, {"error": "a"})
    b = with_fallbacks(FakeModel("b", clock), "c").answers(503, {"error": "b"})
    c = FakeModel("c", clock)
    door = StubFrontDoor(clock, [a, b, c])
    response = predict(door)
    assert response.status == 503 and response.json() == {"error": "b"}
    assert c.received == []


def test_a_model_without_fallbacks_answers_as_ever(clock, access_events):
    plain = FakeModel("plain", clock).answers(503, {"error": "x"})
    door = StubFrontDoor(clock, [plain])
    response = predict(door, "plain", headers={"X-Aibackend-Mock-Failure": "plain"})  # ignored: no chain
    assert response.status == 503 and response.header("x-aibackend-model") is None
    assert "chain" not in access_events[0] and "served_by" not in access_events[0]
    assert len(plain.received) == 1


def test_a_fallback_that_answers_at_once_leaves_no_timer(chain):
    door, a, b, c = chain
    a.fails(errors.ModelUnavailable("not ready", model="a"))
    assert predict(door).status == 200
    assert door.clock.getDelayedCalls() == []


# --- one deadline ------------------------------------------------------------------------------


def test_later_attempts_get_what_is_left_of_the_first_models_timeout(chain):
    door, a, b, c = chain
    a.holds()
    b.holds()
    d = door.request("POST", "/post/predict?id=a", data=b"{}")
    door.clock.advance(9)
    a.pending[0].errback(errors.ModelUnavailable("stopping", model="a"))
    door.flush()
    assert len(b.received) == 1 and not has_fired(d)
    door.clock.advance(0.999)
    assert not has_fired(d)
    door.clock.advance(0.001)
    door.flush()
    assert len(b.cancelled) == 1
    response = result_of(d)
    assert_error(response, 504, "gateway_timeout", model="b",
                 message="no answer within 10 s (the timeout of model 'a', shared by its fallbacks); "
                         "model 'b' was the last tried")
    assert response.header("x-aibackend-model") == "b"
    assert c.received == []  # no time left for c
    assert requests_logged(b) == [(504, "no answer within 10 s (the timeout of model 'a', shared by its fallbacks); "
                                        "model 'b' was the last tried")]
    assert door.clock.getDelayedCalls() == []


def test_no_attempt_starts_once_the_deadline_has_passed(chain):
    door, a, b, c = chain
    a.holds()
    d = door.request("POST", "/post/predict?id=a", data=b"{}")
    door.clock.advance(10)
    a.pending[0].errback(errors.GatewayTimeout("model 'a' did not answer in 10 s", model="a"))
    door.flush()
    assert_error(result_of(d), 504, "gateway_timeout", model="a")
    assert b.received == []


def test_an_answer_before_the_deadline_cancels_its_timer(chain):
    door, a, b, c = chain
    a.fails(errors.ModelUnavailable("not ready", model="a"))
    b.holds()
    d = door.request("POST", "/post/predict?id=a", data=b"{}")
    assert len(door.clock.getDelayedCalls()) == 1
    door.clock.advance(5)
    b.pending[0].callback(ModelAnswer(200, b'{"late": true}', {}))
    door.flush()
    assert result_of(d).json() == {"late": True}
    assert door.clock.getDelayedCalls() == []


# --- a client that leaves -------------------------------------------------------------------------


def test_a_client_that_leaves_cancels_the_attempt_and_no_other_starts(chain):
    door, a, b, c = chain
    a.fails(errors.ModelUnavailable("not ready", model="a"))
    b.holds()
    d = door.request("POST", "/post/predict?id=a", data=b"{}")
    door.drop_connections()
    assert len(b.cancelled) == 1
    assert c.received == []
    assert requests_logged(b) == [(499, "the client went away")]
    assert door.clock.getDelayedCalls() == []
    d.addErrback(lambda _: None)


# --- streams --------------------------------------------------------------------------------------


@pytest.fixture
def streams(clock):
    a = with_fallbacks(FakeStreamingModel("a", clock), "b", "c", timeout=10)
    b, c = FakeStreamingModel("b", clock), FakeStreamingModel("c", clock)
    return StubFrontDoor(clock, [a, b, c]), a, b, c


def sse(door, model_id="a", **kwargs):
    return DoorStream(door, "POST", f"/post/predict?id={model_id}", data=b'{"p": 1}',
                      headers={"Accept": "text/event-stream", **kwargs})


def test_a_stream_that_fails_before_its_first_chunk_goes_to_the_next_model(streams, access_events):
    door, a, b, c = streams
    opened = sse(door)
    a.streams[0].fail(errors.ModelUnavailable("model 'a' restarted", model="a"))
    assert opened.response is None  # nothing was sent yet
    (stream,) = b.streams
    assert stream.body == b'{"p": 1}'
    stream.chunk("from b")
    stream.end()
    assert opened.body == b'data: "from b"\n\nevent: done\ndata: {"output": null}\n\n'
    assert opened.response.code == 200 and opened.header("x-aibackend-model") == "b"
    assert requests_logged(a) == [(503, "model 'a' restarted")]
    assert requests_logged(b) == [(200, None)]
    assert steps(door) == {("a", "b", "unavailable"): 1.0}
    (event,) = access_events
    assert (event["chain"], event["served_by"], event["chunks"], event["stream_end"]) == ("a:503>b:200", "b", 1,
                                                                                          "done")
    assert door.clock.getDelayedCalls() == []


def test_a_stream_that_fails_after_its_first_chunk_ends_with_an_error_event(streams):
    door, a, b, c = streams
    opened = sse(door)
    a.streams[0].chunk("from a")
    a.streams[0].fail(errors.ModelUnavailable("model 'a' restarted", model="a"))
    assert opened.body.startswith(b'data: "from a"\n\nevent: error\n')
    assert b.streams == [] and opened.header("x-aibackend-model") == "a"
    assert steps(door) == {}


def test_a_later_streams_first_chunk_deadline_is_what_is_left(streams):
    door, a, b, c = streams
    opened = sse(door)
    door.clock.advance(8)
    a.streams[0].fail(errors.BadGateway("reset", model="a"))
    door.clock.advance(2)  # b is given the 2 s left
    assert b.streams[0].cancelled
    door.flush()
    assert opened.response.code == 504
    assert c.streams == []
    assert door.clock.getDelayedCalls() == []


def test_a_stream_whose_model_cannot_stream_skips_it(clock):
    a = with_fallbacks(FakeStreamingModel("a", clock), "plain", "b")
    plain, b = FakeModel("plain", clock), FakeStreamingModel("b", clock)
    door = StubFrontDoor(clock, [a, plain, b])
    opened = sse(door)
    a.streams[0].fail(errors.ModelUnavailable("no", model="a"))
    b.streams[0].end({"ok": 1})
    assert opened.body == b'event: done\ndata: {"output": {"ok": 1}}\n\n'
    assert plain.received == []


def test_a_stream_whose_client_leaves_starts_no_other_attempt(streams):
    door, a, b, c = streams
    d = door.request("POST", "/post/predict?id=a&stream=true", data=b"{}")
    a.streams[0].fail(errors.ModelUnavailable("no", model="a"))
    door.drop_connections()
    assert b.streams[0].cancelled
    assert c.streams == []
    assert requests_logged(b) == [(499, "the client went away")]
    d.addErrback(lambda _: None)


# --- mock failures --------------------------------------------------------------------------------


@pytest.fixture
def guarded(clock):
    a = with_fallbacks(FakeModel("a", clock), "b")
    b = FakeModel("b", clock).answers(body={"from": "b"})
    door = StubFrontDoor(clock, [a, b], guard=Guard(ADMIN_TOKEN, ["tcp:8080"]))
    return door, a, b


def test_an_admin_can_make_a_model_of_a_chain_fail(guarded):
    door, a, b = guarded
    response = predict(door, headers={"X-Aibackend-Mock-Failure": "a", "Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.json() == {"from": "b"} and response.header("x-aibackend-model") == "b"
    assert a.received == []  # never called
    assert requests_logged(a) == [(503, "model 'a' failed on purpose: the request asked for it "
                                        "(x-aibackend-mock-failure)")]
    assert steps(door) == {("a", "b", "mock_failure"): 1.0}


def test_a_mock_failure_of_every_model_is_their_503(guarded):
    door, a, b = guarded
    response = predict(door, headers={"X-Aibackend-Mock-Failure": "a, b", "Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert_error(response, 503, "model_unavailable", model="b")
    assert a.received == b.received == []


def test_a_mock_failure_without_admin_rights_is_refused(guarded):
    door, a, b = guarded
    response = predict(door, headers={"X-Aibackend-Mock-Failure": "a"})
    assert_error(response, 401, "unauthorized")
    response = predict(door, headers={"X-Aibackend-Mock-Failure": "a", "Authorization": "Bearer wrong-token"})
    assert_error(response, 401, "unauthorized", message="the admin token is wrong")
    assert a.received == b.received == []


# --- every front door -------------------------------------------------------------------------------


def test_a_v2_fallbacks_request_and_answer_are_made_for_it(clock):
    a = with_fallbacks(FakeModel("a", clock), "b").answers(503, {"error": "loading"})
    a.spec = dataclasses.replace(a.spec, v2=V2Spec(inputs=(TensorSpec("x", "FP32", (-1,)),),
                                                   outputs=(TensorSpec("y", "FP32", (-1,)),)))
    b = FakeModel("b", clock).answers(body={"y": [2.0]})
    door = StubFrontDoor(clock, [a, b])
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    response = door.call("POST", "/v2/models/a/infer", data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
    assert response.status == 200, response.body
    assert response.header("x-aibackend-model") == "b"
    document = response.json()
    assert document["model_name"] == "b"  # shaped for the model that served
    assert b.received[0].json() == {"x": [1.0]}


CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def chat(door, model_id, **more):
    return door.call("POST", "/v1/chat/completions", data=json.dumps({"model": model_id, **CHAT, **more}).encode())


def native(model, name):
    model.spec = dataclasses.replace(model.spec, openai=OpenAISpec(native=True, model=name))
    return model


def test_a_v1_chat_goes_on_to_an_adapted_fallback_whose_answer_is_its_own(clock):
    a = with_fallbacks(FakeModel("a", clock), "native-one", "b").fails(errors.BadGateway("refused", model="a"))
    other = native(FakeModel("native-one", clock), "up")
    b = FakeModel("b", clock).answers(body={"content": "hi from b"})
    door = StubFrontDoor(clock, [a, other, b])
    response = chat(door, "a")
    assert response.status == 200, response.body
    assert response.header("x-aibackend-model") == "b"
    completion = response.json()
    assert completion["model"] == "b" and completion["choices"][0]["message"]["content"] == "hi from b"
    assert other.received == []  # a native model cannot take an adapted model's request: skipped
    assert b.received[0].body == a.received[0].body


def test_a_v1_chat_goes_on_to_a_native_fallback_with_its_own_name(clock):
    a = with_fallbacks(native(FakeModel("a", clock), "up-a"), "b").answers(429, {"error": {"message": "busy"}})
    b = native(FakeModel("b", clock), "up-b").answers(body={"id": "x", "object": "chat.completion", "choices": []})
    door = StubFrontDoor(clock, [a, b])
    response = chat(door, "a")
    assert response.status == 200 and response.header("x-aibackend-model") == "b"
    assert a.received[0].json()["model"] == "up-a" and b.received[0].json()["model"] == "up-b"
    assert b.received[0].context.path == a.received[0].context.path


def test_a_v1_stream_goes_on_before_its_first_chunk(clock):
    a = with_fallbacks(FakeStreamingModel("a", clock), "b")
    b = FakeStreamingModel("b", clock)
    door = StubFrontDoor(clock, [a, b])
    opened = DoorStream(door, "POST", "/v1/chat/completions",
                        data=json.dumps({"model": "a", "stream": True, **CHAT}).encode())
    a.streams[0].fail(errors.ModelUnavailable("restarting", model="a"))
    b.streams[0].chunk({"content": "hi"})
    b.streams[0].end({"finish_reason": "stop"})
    body = opened.body
    assert opened.header("x-aibackend-model") == "b"
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert {event["model"] for event in events} == {"b"}
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == "hi"


# --- the policy --------------------------------------------------------------------------------


@implementer(ILimiter)
class Limiter:
    """An ILimiter that refuses the models it is told, and keeps what it admitted and released."""

    def __init__(self, *refused):
        self.refused = refused
        self.acquired, self.released = [], []

    def acquire(self, caller, entry, tokens):
        if entry.model_id in self.refused:
            raise errors.ApiError(f"model {entry.model_id!r} is over its limit")
        self.acquired.append(entry.model_id)
        return entry.model_id

    def release(self, admission, tokens):
        self.released.append(admission)


def test_each_attempt_is_admitted_for_its_own_model_and_a_refused_one_skipped(chain):
    door, a, b, c = chain
    limiter = Limiter("b")
    assert verifyObject(ILimiter, limiter)
    door.front_door.core.policy = Policy(limiter=limiter)
    a.answers(503, {"error": "loading"})
    response = predict(door)
    assert response.json() == {"from": "c"}
    assert b.received == []
    assert limiter.acquired == ["a", "c"] and limiter.released == ["a", "c"]


def test_the_first_models_refusal_by_the_policy_is_answered(chain):
    door, a, b, c = chain
    door.front_door.core.policy = Policy(limiter=Limiter("a"))
    response = predict(door)
    assert response.status == 500 and a.received == b.received == []


def test_a_v2_generate_goes_on_and_names_the_model_that_served(clock):
    a = with_fallbacks(FakeModel("a", clock), "b").answers(502, {"error": "down"})
    b = FakeModel("b", clock).answers(200, "Hello")
    door = StubFrontDoor(clock, [a, b])
    response = door.call("POST", "/v2/models/a/generate", data=json.dumps({"text_input": "hi"}).encode(),
                         headers={"Content-Type": "application/json"})
    assert response.status == 200, response.body
    assert response.header("x-aibackend-model") == "b"
    assert response.json() == {"model_name": "b", "model_version": "1", "text_output": "Hello"}
    assert b.received[0].body == a.received[0].body


def test_a_v2_generate_stream_goes_on_before_its_first_chunk(clock):
    a = with_fallbacks(FakeStreamingModel("a", clock), "b")
    b = FakeStreamingModel("b", clock)
    door = StubFrontDoor(clock, [a, b])
    opened = DoorStream(door, "POST", "/v2/models/a/generate_stream", data=json.dumps({"text_input": "hi"}).encode(),
                        headers={"Content-Type": "application/json"})
    a.streams[0].fail(errors.GatewayTimeout("slow", model="a"))
    b.streams[0].chunk("Hel")
    b.streams[0].end()
    body = opened.body
    assert opened.header("x-aibackend-model") == "b"
    events = [json.loads(block[6:]) for block in body.decode().split("\n\n") if block.startswith("data: ")]
    assert events[0]["model_name"] == "b" and events[0]["text_output"] == "Hel"


def test_each_streaming_attempt_is_admitted_and_settled_for_its_own_model(streams):
    door, a, b, c = streams
    limiter = Limiter()
    door.front_door.core.policy = Policy(limiter=limiter)
    opened = sse(door)
    a.streams[0].fail(errors.ModelUnavailable("restarting", model="a"))
    assert limiter.acquired == ["a", "b"] and limiter.released == ["a"]
    b.streams[0].end()
    opened.body
    assert limiter.released == ["a", "b"]


# --- with the policy: the failed attempt's places are free for the next (review) ---------------


def _keyed_door(clock, caller):
    from aibackend.policy import Policy
    from aibackend.ratelimit import Limiter

    first = with_fallbacks(FakeModel("a", clock), "b", timeout=10)
    first.answers(503, {"error": "loading"})
    second = FakeModel("b", clock).answers(body={"from": "b"})
    door = StubFrontDoor(clock, [first, second])
    door.front_door.core.policy = Policy(limiter=Limiter(clock))
    name_caller(door, caller)
    return door


def test_a_key_with_one_place_reaches_the_fallback_and_gives_its_place_back(clock):
    from aibackend.policy import Caller
    from aibackend.ratelimit import Limits

    door = _keyed_door(clock, Caller("k", None, Limits(max_concurrent=1)))
    for _ in range(2):
        answer = door.call("POST", "/post/predict?id=a", data=b'{"x": 1}')
        assert answer.status == 200 and answer.header("x-aibackend-model") == "b", answer.body
    assert door.front_door.core.policy.limiter.table.in_flight("key", "k") == 0


# --- a chain under limits: the key's once, each model's per attempt (session 20) ---------------


def _limited_door(clock, caller=None, models=None, **model_limits):
    """Models a (fallbacks b, c; timeout 10 s), b and c, under the real Limiter; C{model_limits}: id -> Limits."""
    from aibackend.policy import Policy
    from aibackend.ratelimit import Limiter

    if models is None:
        models = (with_fallbacks(FakeModel("a", clock), "b", "c", timeout=10), FakeModel("b", clock),
                  FakeModel("c", clock))
    for model in models:
        if model.model_id in model_limits:
            model.spec = dataclasses.replace(model.spec, limits=model_limits[model.model_id])
    door = StubFrontDoor(clock, list(models))
    core = door.front_door.core
    core.policy = Policy(limiter=Limiter(clock, metrics=core.metrics))
    if caller is not None:
        guard = core.guard
        let_in = guard.check_client

        def named(request):  # as the guard names a request that carries this key
            let_in(request)
            request.aibackend_caller = caller

        guard.check_client = named
    return door, models


def limited(door) -> dict:
    """C{aibackend_limited_total}'s samples: C{(model, scope, limit) -> count}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.labels["model"], sample.labels["scope"], sample.labels["limit"]): sample.value
        for family in text_string_to_metric_families(door.front_door.metrics.render().decode())
        if family.name == "aibackend_limited" for sample in family.samples if sample.name == "aibackend_limited_total"
    }


def test_a_keys_rpm_counts_the_clients_request_once_however_many_attempts(clock):
    from aibackend.policy import Caller
    from aibackend.ratelimit import Limits

    door, (a, b, c) = _limited_door(clock, Caller("k", None, Limits(rpm=2)))
    a.answers(503, {"error": "loading"})
    b.answers(body={"from": "b"})
    for _ in range(2):  # two attempts each, one request each against the key's 2 a minute
        response = predict(door)
        assert response.status == 200 and response.header("x-aibackend-model") == "b", response.body
    third = predict(door)
    assert third.status == 429 and "key 'k'" in third.json()["error"]["message"]
    assert len(a.received) == len(b.received) == 2
    assert limited(door) == {("a", "key", "rpm"): 1}  # the client's refusal, once


def test_a_keys_place_and_tokens_are_held_for_the_whole_chain(clock):
    from aibackend.policy import Caller
    from aibackend.ratelimit import Limits

    door, (a, b, c) = _limited_door(clock, Caller("k", None, Limits(max_concurrent=1)))
    a.answers(503, {"error": "loading"})
    b.holds()
    first = door.open("POST", "/post/predict?id=a", data=b'{"x": 1}')
    table = door.front_door.core.policy.limiter.table
    assert len(b.received) == 1 and table.in_flight("key", "k") == 1  # one place, held while b answers
    assert predict(door).status == 429  # a second request of the key waits for it
    b.pending[0].callback(ModelAnswer(200, b'{"from": "b"}'))
    door.flush()
    assert result_of(first).code == 200 and table.in_flight("key", "k") == 0


def test_a_first_model_over_its_limit_goes_on_and_is_no_refusal(clock, access_events):
    from aibackend.ratelimit import Limits

    door, (a, b, c) = _limited_door(clock, a=Limits(rpm=1))
    a.answers(body={"from": "a"})
    b.answers(body={"from": "b"})
    assert predict(door).json() == {"from": "a"}
    response = predict(door)  # a's one a minute is taken: a 429 attempt, not sent, and b serves
    assert response.status == 200 and response.header("x-aibackend-model") == "b"
    assert len(a.received) == 1 and len(b.received) == 1
    assert steps(door) == {("a", "b", "rate_limited"): 1}
    assert limited(door) == {}  # the client was served: no refusal
    assert access_events[-1]["chain"] == "a:429>b:200" and access_events[-1]["served_by"] == "b"


def test_a_fallback_over_its_limit_is_a_step_and_the_next_serves(clock):
    from aibackend.ratelimit import Limits

    door, (a, b, c) = _limited_door(clock, b=Limits(max_concurrent=1))
    a.answers(503, {"error": "loading"})
    b.holds()
    c.answers(body={"from": "c"})
    first = door.open("POST", "/post/predict?id=a", data=b'{"x": 1}')
    assert len(b.received) == 1
    second = predict(door)  # b is full: skipped as a 429, c serves
    assert second.status == 200 and second.json() == {"from": "c"}
    assert steps(door) == {("a", "b", "unavailable"): 2, ("b", "c", "rate_limited"): 1}
    assert limited(door) == {}
    b.pending[0].callback(ModelAnswer(200, b'{"from": "b"}'))
    door.flush()
    assert result_of(first).code == 200


def test_when_every_model_is_over_its_limit_the_client_gets_the_last_429_counted_once(clock):
    from aibackend.ratelimit import Limits

    door, (a, b, c) = _limited_door(clock, a=Limits(rpm=1), b=Limits(rpm=1), c=Limits(rpm=1))
    for model in (a, b, c):
        model.answers(body={"from": model.model_id})
    assert [predict(door).json() for _ in range(3)] == [{"from": "a"}, {"from": "b"}, {"from": "c"}]
    refused = predict(door)
    assert refused.status == 429 and refused.header("retry-after") is not None
    assert "model 'c'" in refused.json()["error"]["message"] and refused.header("x-aibackend-model") == "c"
    assert limited(door) == {("c", "model", "rpm"): 1}
    assert [len(model.received) for model in (a, b, c)] == [1, 1, 1]


def test_a_first_models_refusal_by_its_key_is_raised_and_not_sent_on(clock):
    from aibackend.policy import Caller
    from aibackend.ratelimit import Limits

    door, (a, b, c) = _limited_door(clock, Caller("k", frozenset({"b", "c"}), Limits(rpm=5)))
    assert predict(door).status == 403
    assert a.received == b.received == c.received == []


def _v1_chain(clock, **model_limits):
    a = with_fallbacks(FakeModel("a", clock), "b", timeout=10).fails(errors.BadGateway("refused", model="a"))
    b = FakeModel("b", clock).answers(body={"content": "hi from b"})
    return _limited_door(clock, models=(a, b), **model_limits)


def test_a_fallbacks_own_tpm_counts_when_the_first_model_counts_no_tokens(clock):
    from aibackend.ratelimit import Limits

    door, (a, b) = _v1_chain(clock, b=Limits(tpm=1000))
    first = chat(door, "a", max_tokens=600)  # a has no limit; b reserves its 600 (and the prompt's)
    assert first.status == 200 and first.header("x-aibackend-model") == "b", first.body
    table = door.front_door.core.policy.limiter.table
    assert table.in_flight("model", "b") == 0  # settled
    second = chat(door, "a", max_tokens=600)  # what b's answer used is charged: 1000 a minute, not twice 600+
    assert second.status in (200, 429)
    third = chat(door, "a", max_tokens=990)
    assert third.status == 429 and "model 'b'" in third.json()["error"]["message"]
    assert "tokens per min" in third.json()["error"]["message"]


def test_a_native_fallbacks_request_from_a_large_body_is_made_in_a_thread(clock):
    from aibackend.web import THREAD_ABOVE_BYTES

    jobs = []

    def in_thread(function, *args):
        jobs.append(function.__name__)
        return maybeDeferred(function, *args)

    a = with_fallbacks(native(FakeModel("a", clock), "up-a"), "b").answers(503, {"error": {"message": "down"}})
    b = native(FakeModel("b", clock), "up-b").answers(body={"id": "x", "object": "chat.completion", "choices": []})
    door = StubFrontDoor(clock, [a, b], in_thread=in_thread)
    big = "x" * (THREAD_ABOVE_BYTES + 1)
    response = chat(door, "a", user=big)
    assert response.status == 200 and response.header("x-aibackend-model") == "b"
    assert b.received[0].json()["model"] == "up-b" and b.received[0].json()["user"] == big
    assert "_renamed" in jobs
    jobs.clear()
    assert chat(door, "a").status == 200 and jobs == []  # a small body's is made at once


def test_a_v2_fallbacks_request_from_a_large_body_is_made_in_a_thread(clock):
    from aibackend.web import THREAD_ABOVE_BYTES

    jobs = []

    def in_thread(function, *args):
        jobs.append(function.__name__)
        return maybeDeferred(function, *args)

    a = with_fallbacks(FakeModel("a", clock), "b").answers(503, {"error": "loading"})
    b = FakeModel("b", clock).answers(body={"y": [2.0]})
    door = StubFrontDoor(clock, [a, b], in_thread=in_thread)
    count = THREAD_ABOVE_BYTES // 4
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [count], "data": [1.0] * count}]})
    assert len(body) > THREAD_ABOVE_BYTES
    response = door.call("POST", "/v2/models/a/infer", data=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status == 200 and response.header("x-aibackend-model") == "b", response.body[:200]
    assert jobs.count("prepare_for") == 1  # the fallback's; the first model's is in prepare's thread
    assert len(b.received[0].json()["x"]) == count
