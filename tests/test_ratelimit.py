"""
The limits of keys and models (L{aibackend.ratelimit}): the GCRA buckets of requests and
tokens per minute, concurrency, reservation and settlement, the 429 and its headers in
each front door's shape, the metrics, and the table every C{--processes} process shares
(two real processes over one file). All on a L{Clock}.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
from zope.interface.verify import verifyObject

from aibackend import errors
from aibackend.auth import Guard
from aibackend.interfaces import ModelAnswer
from aibackend.metrics import Metrics, ModelStats
from aibackend.policy import Caller, ILimiter, Policy, TokenCount
from aibackend.ratelimit import (
    DEFAULT_COMPLETION_TOKENS, LimitReached, LimitTable, Limiter, Limits, reset_text,
)
from aibackend.testing import FakeModel, FakeStreamingModel, StubFrontDoor, result_of, sse_data

JSON = {"Content-Type": "application/json"}


def entry(model_id="m", **limits):
    """A registry entry's part the limiter reads: the model's id, its spec's limits, its figures."""
    return SimpleNamespace(model_id=model_id, spec=SimpleNamespace(limits=Limits(**limits) if limits else None),
                           stats=ModelStats())


def counting(clock, table=None) -> Limiter:
    """A limiter that counts its refusals in metrics of its own."""
    return Limiter(clock, table, metrics=Metrics(None))


def refused(limiter, caller, model, tokens=None) -> LimitReached:
    with pytest.raises(LimitReached) as raised:
        limiter.acquire(caller, model, tokens)
    return raised.value


def test_the_limiter_is_an_ilimiter(clock):
    verifyObject(ILimiter, Limiter(clock))


def test_no_limits_holds_nothing(clock):
    limiter = Limiter(clock)
    assert limiter.acquire(None, entry(), None) is None
    assert limiter.acquire(Caller("team"), entry(), TokenCount(100)) is None


# --- requests per minute ------------------------------------------------------------


def test_a_burst_gets_exactly_the_limit_then_one_per_interval(clock):
    clock.advance(1_000_000)
    limiter = Limiter(clock)
    model = entry(rpm=50)
    admitted = 0
    for _ in range(200):
        try:
            limiter.acquire(None, model, None)
            admitted += 1
        except LimitReached:
            pass
    assert admitted == 50
    # One refills every 60/50 = 1.2 s, no sooner.
    clock.advance(1.1)
    refused(limiter, None, model)
    clock.advance(0.1)
    limiter.acquire(None, model, None)
    refused(limiter, None, model)


def test_no_edge_of_a_window_lets_twice_through(clock):
    """A fixed window would let 50 at its end and 50 more at the next one's start."""
    clock.advance(59.9)
    limiter = Limiter(clock)
    model = entry(rpm=50)
    for _ in range(50):
        limiter.acquire(None, model, None)
    clock.advance(0.2)  # a minute's edge
    refused(limiter, None, model)


def test_the_429_says_the_limit_remaining_reset_and_retry_after(clock):
    limiter = counting(clock)
    model = entry("chat", rpm=2)
    limiter.acquire(None, model, None)
    limiter.acquire(None, model, None)
    clock.advance(1)
    error = refused(limiter, None, model)
    assert error.status == 429 and error.type == "rate_limit_exceeded" and error.openai_type == "requests"
    assert error.scope == "model" and error.limit == "rpm" and error.model == "chat"
    assert error.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "59s",  # until the bucket is full again
        "Retry-After": "29",  # until one request is let in again: 30 s after the first
    }
    assert "requests per min (RPM): Limit 2" in error.message and "model 'chat'" in error.message
    assert model.stats.limited == {("model", "rpm"): 1}


def test_reset_is_written_as_openai_writes_it():
    assert reset_text(0) == "0s"
    assert reset_text(0.012) == "12ms"
    assert reset_text(1) == "1s"
    assert reset_text(8.64) == "8.64s"
    assert reset_text(360) == "6m0s"
    assert reset_text(90.5) == "1m30.5s"
    assert reset_text(3723) == "1h2m3s"


# --- concurrency --------------------------------------------------------------------


def test_concurrency_is_held_until_release(clock):
    limiter = Limiter(clock)
    model = entry(max_concurrent=2)
    first = limiter.acquire(None, model, None)
    limiter.acquire(None, model, None)
    error = refused(limiter, None, model)
    assert error.limit == "max_concurrent" and error.headers == {"Retry-After": "1"}
    limiter.release(first, None)
    limiter.acquire(None, model, None)
    assert limiter.table.in_flight("model", "m") == 2


# --- tokens -------------------------------------------------------------------------


def test_tokens_are_reserved_then_settled_with_what_was_used(clock):
    limiter = Limiter(clock)
    model = entry(tpm=1000)
    first = TokenCount(600)
    held = limiter.acquire(None, model, first)
    error = refused(limiter, None, model, TokenCount(600))
    assert error.limit == "tpm" and error.openai_type == "tokens"
    assert error.headers["x-ratelimit-limit-tokens"] == "1000"
    assert error.headers["x-ratelimit-remaining-tokens"] == "400"
    assert "tokens per min (TPM): Limit 1000, Requested 600" in error.message
    first.prompt, first.completion = 40, 60  # the answer said 100 in all: 500 given back
    limiter.release(held, first)
    second = limiter.acquire(None, model, TokenCount(600))
    refused(limiter, None, model, TokenCount(400))  # 100 + 600 of 1000 reserved
    limiter.release(second, TokenCount(600))  # nothing said: all of it given back
    limiter.acquire(None, model, TokenCount(900))


def test_more_used_than_reserved_is_charged_and_a_debt_waits(clock):
    limiter = Limiter(clock)
    model = entry(tpm=600)  # 10 a second
    tokens = TokenCount(100)
    held = limiter.acquire(None, model, tokens)
    tokens.prompt, tokens.completion = 100, 1100  # 1200 used: 600 past the whole minute
    limiter.release(held, tokens)
    error = refused(limiter, None, model, TokenCount(1))
    assert error.headers["x-ratelimit-remaining-tokens"] == "0"
    assert error.headers["x-ratelimit-reset-tokens"] == "2m0s"
    clock.advance(60.1)
    limiter.acquire(None, model, TokenCount(1))


def test_a_reservation_is_at_most_the_whole_minute(clock):
    limiter = Limiter(clock)
    model = entry(tpm=100)
    limiter.acquire(None, model, TokenCount(10_000))  # a full bucket lets it in, and is empty
    refused(limiter, None, model, TokenCount(1))


def test_requests_without_a_token_count_are_not_held_to_tpm(clock):
    limiter = Limiter(clock)
    model = entry(tpm=10)
    limiter.acquire(None, model, TokenCount(10))
    assert limiter.acquire(None, model, None) is None  # a plain route, no tokens: nothing held, nothing refused


# --- keys and models: all or none ----------------------------------------------------


def test_a_key_and_a_model_are_limited_apart(clock):
    limiter = counting(clock)
    model = entry(rpm=3)
    alice = Caller("alice", limits=Limits(rpm=2))
    bob = Caller("bob", limits=Limits(rpm=5))
    limiter.acquire(alice, model, None)
    limiter.acquire(alice, model, None)
    error = refused(limiter, alice, model)
    assert error.scope == "key" and "key 'alice'" in error.message
    limiter.acquire(bob, model, None)
    error = refused(limiter, bob, model)
    assert error.scope == "model"
    assert model.stats.limited == {("key", "rpm"): 1, ("model", "rpm"): 1}


def test_reserved_in_all_or_none(clock):
    """A request the model's limit refuses takes nothing of its key's."""
    limiter = Limiter(clock)
    busy = entry("busy", max_concurrent=1)
    other = entry("other")
    caller = Caller("alice", limits=Limits(rpm=2, tpm=1000, max_concurrent=5))
    limiter.acquire(caller, busy, TokenCount(500))
    for _ in range(5):
        refused(limiter, caller, busy, TokenCount(500))
    assert limiter.table.in_flight("key", "alice") == 1
    limiter.acquire(caller, other, TokenCount(500))  # the key's second request, its last 500 tokens
    refused(limiter, caller, other, TokenCount(1))


def test_the_headers_of_the_tightest_scope(clock):
    limiter = Limiter(clock)
    model = entry(rpm=100, tpm=10_000)
    caller = Caller("alice", limits=Limits(rpm=3, tpm=100))
    for _ in range(3):
        limiter.acquire(caller, model, TokenCount(10))
    error = refused(limiter, caller, model, TokenCount(10))
    assert error.scope == "key"
    assert error.headers["x-ratelimit-limit-requests"] == "3"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-limit-tokens"] == "100"
    assert error.headers["x-ratelimit-remaining-tokens"] == "70"


def test_policy_admits_and_settles_once(clock):
    limiter = Limiter(clock)
    policy = Policy(limiter=limiter)
    model = entry(max_concurrent=1)
    request = SimpleNamespace(aibackend_forwarded=False, aibackend_caller=Caller("alice", limits=Limits(max_concurrent=1)))
    call = policy.admit(request, model)
    with pytest.raises(LimitReached):
        policy.admit(request, model)
    policy.settle(call, 200, 0.1)
    policy.settle(call, 200, 0.1)  # once only
    assert limiter.table.in_flight("key", "alice") == 0
    policy.admit(request, model)


def test_a_request_a_worker_forwarded_is_not_limited_again(clock):
    """With --processes, the worker that took the request kept its limits; the primary does not again."""
    limiter = Limiter(clock)
    policy = Policy(limiter=limiter)
    model = entry(rpm=1)
    forwarded = SimpleNamespace(aibackend_forwarded=True, aibackend_caller=None)
    for _ in range(3):
        assert policy.admit(forwarded, model) is None  # nothing taken, nothing to settle
    policy.admit(SimpleNamespace(aibackend_forwarded=False, aibackend_caller=None), model)


def test_policy_counts_tokens_only_when_something_needs_them():
    request = SimpleNamespace(aibackend_forwarded=False, aibackend_caller=None)
    assert not Policy().counts_tokens(request, entry(tpm=5))
    assert not Policy(limiter=object()).counts_tokens(request, entry(rpm=5))
    assert Policy(limiter=object()).counts_tokens(request, entry(tpm=5))
    keyed = SimpleNamespace(aibackend_forwarded=False, aibackend_caller=Caller("alice", limits=Limits(tpm=5)))
    assert Policy(limiter=object()).counts_tokens(keyed, entry())
    assert Policy(usage=object()).counts_tokens(request, entry())


# --- the table ------------------------------------------------------------------------


def test_rows_are_bounded_and_idle_ones_are_taken_again(clock):
    limiter = Limiter(clock, LimitTable.local(rows=4))
    callers = [Caller(f"key-{n}", limits=Limits(rpm=1)) for n in range(6)]
    model = entry()
    for caller in callers[:4]:
        assert limiter.acquire(caller, model, None) is None  # requests per minute only: nothing held
    # Every row holds a bucket not full yet: a fifth key is not limited (counted, logged).
    assert limiter.acquire(callers[4], model, None) is None
    assert limiter.acquire(callers[4], model, None) is None
    assert limiter.unlimited == 2
    clock.advance(60)  # every bucket full again: their rows say nothing more, and are taken
    limiter.acquire(callers[5], model, None)
    refused(limiter, callers[5], model)


def test_a_process_that_ended_gives_back_its_places(tmp_path, clock):
    primary = LimitTable.create(str(tmp_path), 3)
    worker = LimitTable.open(primary.path, 2)
    try:
        model = entry(max_concurrent=2)
        at_primary, at_worker = Limiter(clock, primary), Limiter(clock, worker)
        at_worker.acquire(None, model, None)
        held = at_worker.acquire(None, model, None)
        refused(at_primary, None, model)
        assert at_primary.forget_process(2) == 2  # the worker died holding two
        at_primary.acquire(None, model, None)
        at_worker.release(held, None)  # a late release of a forgotten place changes nothing
        assert primary.in_flight("model", "m") == 1
    finally:
        worker.close()
        primary.close(remove=True)
    assert not os.path.exists(primary.path)


def test_a_table_left_by_a_primary_that_is_gone_is_removed(tmp_path):
    stale = tmp_path / "limits-999999999.table"
    stale.write_bytes(b"")
    table = LimitTable.create(str(tmp_path), 2)
    table.close(remove=True)
    assert not stale.exists()


def test_a_file_that_is_not_a_table_is_refused(tmp_path):
    path = tmp_path / "limits-1.table"
    path.write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="not a limits table"):
        LimitTable.open(str(path), 1)


def _hammer(path, process, count, results):
    """In a process of its own: try C{count} requests against the shared table at one instant."""
    table = LimitTable.open(path, process)
    limiter = Limiter(SimpleNamespace(seconds=lambda: 1000.0), table)
    model = entry(rpm=50)
    admitted = 0
    for _ in range(count):
        try:
            limiter.acquire(None, model, None)
            admitted += 1
        except LimitReached:
            pass
    results.put(admitted)
    table.close()


def test_two_processes_share_one_table_exactly(tmp_path):
    table = LimitTable.create(str(tmp_path), 3)
    try:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [context.Process(target=_hammer, args=(table.path, number, 200, results)) for number in (1, 2)]
        for worker in workers:
            worker.start()
        admitted = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(30)
        assert sum(admitted) == 50
    finally:
        table.close(remove=True)


# --- through the front doors ---------------------------------------------------------


class NamingGuard(Guard):
    """A guard that names every request's caller (what the keys' guard does with a key)."""

    def __init__(self, caller):
        super().__init__(None, ["unix:"])
        self.caller = caller

    def check_client(self, request) -> None:
        request.aibackend_caller = self.caller


def limited_door(clock, model, *, caller=None, **limits):
    model.spec = replace(model.spec, limits=Limits(**limits))
    door = StubFrontDoor(clock, [model], guard=NamingGuard(caller) if caller is not None else None)
    core = door.front_door.core
    core.policy = Policy(limiter=Limiter(clock, metrics=core.metrics))
    return door


def model_requests(door, model_id="fake"):
    return sum(door.registry.entry(model_id).stats.requests.values())


def refusals(door):
    return dict(door.front_door.metrics.daemon.refusals)


def test_the_plain_route_answers_429_with_the_headers_in_its_shape(clock):
    model = FakeModel()
    door = limited_door(clock, model, rpm=1)
    assert door.call("POST", "/post/predict?id=fake", data=b"{}").status == 200
    response = door.call("POST", "/post/predict?id=fake", data=b"{}")
    assert response.status == 429
    assert response.header("Retry-After") == "60"
    assert response.header("x-ratelimit-limit-requests") == "1"
    assert response.header("x-ratelimit-remaining-requests") == "0"
    assert response.header("x-ratelimit-reset-requests") == "1m0s"
    error = response.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["model"] == "fake"
    # A refusal, never a request to the model (nor one sent to it).
    assert model_requests(door) == 1 and len(model.received) == 1
    assert refusals(door).get("rate_limited") == 1
    text = door.call("GET", "/metrics").body.decode()
    assert 'aibackend_limited_total{limit="rpm",model="fake",scope="model"} 1.0' in text
    assert 'aibackend_refusals_total{reason="rate_limited"} 1.0' in text


def test_a_plain_stream_past_a_limit_is_a_429(clock):
    model = FakeStreamingModel()
    door = limited_door(clock, model, max_concurrent=1)
    first = door.open("POST", "/post/predict?id=fake&stream=true", data=b"{}")
    response = door.call("POST", "/post/predict?id=fake&stream=true", data=b"{}")
    assert response.status == 429 and response.header("Retry-After") == "1"
    model.streams[0].end({"done": True})
    door.flush()
    assert result_of(first).code == 200
    assert door.call("POST", "/post/predict?id=fake", data=b"{}").status == 200  # its place was given back


def test_v2_answers_429_in_its_shape_with_the_headers(clock):
    model = FakeModel().answers(body={"model_name": "fake", "outputs": []})
    door = limited_door(clock, model, rpm=1)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode()
    door.call("POST", "/v2/models/fake/infer", data=body, headers=JSON)
    response = door.call("POST", "/v2/models/fake/infer", data=body, headers=JSON)
    assert response.status == 429
    assert set(response.json()) == {"error"} and "requests per min" in response.json()["error"]
    assert response.header("Retry-After") == "60" and response.header("x-ratelimit-limit-requests") == "1"
    assert model_requests(door) == 1


def chat(door, **more):
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}], **more}
    return door.call("POST", "/v1/chat/completions", data=json.dumps(body).encode(), headers=JSON)


def test_v1_answers_openai_rate_limit_errors_with_the_headers(clock):
    model = FakeModel().answers(body={"content": "hi"})
    door = limited_door(clock, model, rpm=1, tpm=1000)
    assert chat(door, max_tokens=10).status == 200
    response = chat(door)
    assert response.status == 429
    assert response.json() == {"error": {"message": response.json()["error"]["message"], "type": "requests",
                                         "param": None, "code": "rate_limit_exceeded"}}
    assert response.header("x-ratelimit-limit-requests") == "1"
    assert response.header("x-ratelimit-limit-tokens") == "1000"
    assert response.header("Retry-After") == "60"
    assert model_requests(door) == 1


def test_v1_reserves_max_tokens_and_settles_with_the_answers_usage(clock):
    model = FakeModel().answers(body={"content": "hi", "usage": {"prompt_tokens": 5, "completion_tokens": 5}})
    door = limited_door(clock, model, tpm=1000)
    assert chat(door, max_tokens=900).status == 200  # 900 + 3 reserved, 10 charged
    assert chat(door, max_tokens=900).status == 200
    response = chat(door, max_tokens=990)
    assert response.status == 429
    assert response.json()["error"]["type"] == "tokens"
    assert response.header("x-ratelimit-remaining-tokens") == "980"


def test_v1_without_max_tokens_reserves_the_default(clock):
    model = FakeModel().holds()
    door = limited_door(clock, model, tpm=DEFAULT_COMPLETION_TOKENS + 100)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello there"}]}
    held = door.request("POST", "/v1/chat/completions", data=json.dumps(body).encode(), headers=JSON)
    held.addErrback(lambda _: None)  # its client goes away below
    response = chat(door, max_tokens=98)  # held: its reservation stands (512 + 3), 100 left, this asks 101
    assert response.status == 429 and response.json()["error"]["type"] == "tokens"
    door.drop_connections()
    door.flush()


def test_v1_a_stream_cut_short_is_settled_with_what_it_wrote(clock):
    model = FakeStreamingModel()
    door = limited_door(clock, model, tpm=1000)
    body = {"model": "fake", "messages": [{"role": "user", "content": "x" * 40}], "stream": True, "max_tokens": 800}
    door.open("POST", "/v1/chat/completions", data=json.dumps(body).encode(), headers=JSON)
    stream = model.streams[0]
    stream.chunk("a" * 40)
    stream.chunk("b" * 40)  # 80 characters: 20 tokens, and the prompt's 10
    door.drop_connections()  # the client goes away
    door.flush()
    assert stream.cancelled
    # 30 used of the 810 reserved: 970 left. This one takes 3 (its prompt) + 960.
    model.answers(body={"content": "hi", "usage": {"prompt_tokens": 3, "completion_tokens": 960}})
    assert chat(door, max_tokens=960).status == 200
    response = chat(door, max_tokens=10)
    assert response.status == 429 and response.header("x-ratelimit-remaining-tokens") == "7"


def test_v1_a_stream_that_ended_is_settled_with_its_usage(clock):
    model = FakeStreamingModel()
    door = limited_door(clock, model, tpm=1000)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 900}
    done = door.request("POST", "/v1/chat/completions", data=json.dumps(body).encode(), headers=JSON)
    stream = model.streams[0]
    stream.chunk("hello")
    stream.end({"finish_reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 93}})
    door.flush()
    answered = result_of(done)
    assert answered.status == 200
    assert answered.body.endswith(b"data: [DONE]\n\n")
    refused_response = chat(door, max_tokens=902)  # 100 used: 900 left, this one asks 902 + 3
    assert refused_response.status == 429
    assert refused_response.header("x-ratelimit-remaining-tokens") == "900"


def test_key_limits_through_the_front_door(clock):
    model = FakeModel()
    caller = Caller("alice", limits=Limits(rpm=1))
    door = limited_door(clock, model, caller=caller, rpm=100)
    assert door.call("POST", "/post/predict?id=fake", data=b"{}").status == 200
    response = door.call("POST", "/post/predict?id=fake", data=b"{}")
    assert response.status == 429 and "key 'alice'" in response.json()["error"]["message"]
    assert door.registry.entry("fake").stats.limited == {("key", "rpm"): 1}


@pytest.mark.parametrize("outcome", ["answer", "model error", "failure", "bug", "client gone"])
def test_concurrency_is_given_back_on_every_outcome(clock, logged_errors, outcome):
    model = FakeModel().holds()
    door = limited_door(clock, model, max_concurrent=1)
    door.request("POST", "/post/predict?id=fake", data=b"{}").addErrback(lambda _: None)  # a client gone fails it
    d = model.pending[0]
    if outcome == "answer":
        d.callback(ModelAnswer(200, b"{}"))
    elif outcome == "model error":
        d.errback(errors.ModelError(500, "no", model="fake"))
    elif outcome == "failure":
        d.errback(errors.BadGateway("gone", model="fake"))
    elif outcome == "bug":
        d.errback(ZeroDivisionError())
    else:
        door.drop_connections()
    door.flush()
    if outcome == "bug":
        assert logged_errors.flush(ZeroDivisionError)
    limiter = door.front_door.core.policy.limiter
    assert limiter.table.in_flight("model", "fake") == 0
    model.answers()
    assert door.call("POST", "/post/predict?id=fake", data=b"{}").status == 200


# --- token counts of the OpenAI-compatible front door ------------------------------------


def test_the_reservation_of_a_request():
    from aibackend.openai_api import CHAT, EMBEDDINGS, reservation

    assert reservation({}, CHAT, 10) == 10 + DEFAULT_COMPLETION_TOKENS
    assert reservation({"max_tokens": 100}, CHAT, 10) == 110
    assert reservation({"max_completion_tokens": 50, "max_tokens": 100}, CHAT, 10) == 60
    assert reservation({"max_tokens": 100, "n": 3}, CHAT, 10) == 310
    assert reservation({"max_tokens": True}, CHAT, 10) == 10 + DEFAULT_COMPLETION_TOKENS  # not a count
    assert reservation({"max_tokens": 100}, EMBEDDINGS, 10) == 10


def test_embeddings_are_settled_with_their_prompt(clock):
    model = FakeModel().answers(body={"embeddings": [[0.5, 0.5]], "usage": {"prompt_tokens": 7}})
    door = limited_door(clock, model, tpm=100)
    body = json.dumps({"model": "fake", "input": "x" * 400}).encode()  # 100 tokens reserved, 7 used
    assert door.call("POST", "/v1/embeddings", data=body, headers=JSON).status == 200
    smaller = json.dumps({"model": "fake", "input": "x" * 360}).encode()  # 90 reserved
    assert door.call("POST", "/v1/embeddings", data=smaller, headers=JSON).status == 200  # 93 were left
    response = door.call("POST", "/v1/embeddings", data=smaller, headers=JSON)
    assert response.status == 429 and response.header("x-ratelimit-remaining-tokens") == "86"


def test_a_native_answer_is_settled_with_its_usage_else_an_estimate():
    from aibackend.openai_api import NativeTokens

    tokens = TokenCount(500)
    answer = ModelAnswer(200, json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})
                         .encode())
    assert NativeTokens(tokens, 30).shape(answer) is answer
    assert (tokens.prompt, tokens.completion) == (9, 4)
    tokens = TokenCount(500)
    NativeTokens(tokens, 30).shape(ModelAnswer(200, b'{"choices": []}'))
    assert (tokens.prompt, tokens.completion) == (30, 4)  # a quarter of its 15 bytes, rounded up
    tokens = TokenCount(500)
    NativeTokens(tokens, 30).shape(ModelAnswer(500, b'{"error": "no"}'))
    assert tokens.used() is None  # an error: the whole reservation is given back


def test_a_native_stream_is_counted_as_it_goes_and_by_its_usage_event():
    from aibackend.openai_api import CountedPassThrough

    tokens = TokenCount(500)
    framing = CountedPassThrough(tokens, 12)
    written = framing.chunk(json.dumps({"choices": [{"delta": {"content": "x" * 40}}]}).encode())
    assert written.startswith(b"data: ")
    assert (tokens.prompt, tokens.completion) == (12, 10)  # a stream cut now is settled with these
    framing.chunk(json.dumps({"choices": [{"text": "y" * 8}]}).encode())
    assert tokens.completion == 12
    framing.chunk(json.dumps({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 11}}).encode())
    assert framing.end(None).endswith(b"data: [DONE]\n\n")
    assert (tokens.prompt, tokens.completion) == (20, 11)


def test_a_model_with_limits_added_at_runtime_gets_the_daemon_a_policy(clock):
    from aibackend.config import parse_config
    from aibackend.daemon import wire_policy
    from aibackend.keys import KeyManager, KeyRing
    from aibackend.store import MemoryStore

    plain, limited = FakeModel("plain"), FakeModel("limited")
    limited.spec = replace(limited.spec, limits=Limits(rpm=1))
    door = StubFrontDoor(clock, [plain])
    core = door.front_door.core
    limiter = Limiter(clock)
    keys = KeyManager(KeyRing((), None), MemoryStore(), clock=clock)
    wire_policy(core, parse_config({"server": {}}, environ={}).server, keys, door.registry, limiter=limiter)
    assert core.policy is None  # the hot path has none
    door.registry.add(limited)
    assert core.policy.limiter is limiter
    assert door.call("POST", "/post/predict?id=limited", data=b"{}").status == 200
    assert door.call("POST", "/post/predict?id=limited", data=b"{}").status == 429
    assert door.call("POST", "/post/predict?id=plain", data=b"{}").status == 200


def test_a_row_in_use_is_never_taken_by_another_name(clock):
    limiter = Limiter(clock, LimitTable.local(rows=1))
    alice = Caller("alice", limits=Limits(max_concurrent=1))
    bob = Caller("bob", limits=Limits(max_concurrent=1))
    held = limiter.acquire(alice, entry(), None)
    clock.advance(3600)
    assert limiter.acquire(bob, entry(), None) is None  # no row for bob: not limited (logged)
    refused(limiter, alice, entry())
    limiter.release(held, None)
    assert limiter.acquire(bob, entry(), None) is not None  # alice's row, idle now, is bob's
