"""
An asynchronous admission (L{aibackend.policy.IAsyncLimiter}: a fleet's limits in Redis)
through the front doors, in memory on a Clock: the model is sent the request (or the
stream begins) only once the limiter admitted it; its 429 is answered in each front
door's shape, counted as a refusal, never as a request to the model; what it holds is
given back when the request ends; each attempt of a fallback chain waits for its own
admission (the key's limits taken once, with the first).
"""

from __future__ import annotations

import json
from dataclasses import replace

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from aibackend import errors
from aibackend.auth import Guard
from aibackend.policy import Caller, IAsyncLimiter, IChainLimiter, Policy
from aibackend.ratelimit import Limiter, Limits
from aibackend.testing import (FakeModel, FakeStreamingModel, StubFrontDoor, has_fired, name_caller, result_of,
                               with_fallbacks)

JSON = {"Content-Type": ["application/json"]}


@implementer(IAsyncLimiter, IChainLimiter)
class HeldLimiter:
    """A local Limiter whose every admission waits until the test lets it go (a Redis round trip)."""

    def __init__(self, clock, metrics):
        self.local = Limiter(clock, metrics=metrics)
        self.waiting: list[Deferred] = []
        self.attempts = []  # a chain's: (with the key's limits, model id)
        self.hold = True  # else: each admission answers at once (a Deferred already fired, or failed)

    def acquire(self, caller, entry, tokens):
        if not self.hold:
            return maybeDeferred(self.local.acquire, caller, entry, tokens)
        held = Deferred()
        self.waiting.append(held)
        return held.addCallback(lambda _: self.local.acquire(caller, entry, tokens))

    def acquire_attempt(self, caller, entry, tokens):
        self.attempts.append((caller is not None, entry.model_id))
        if not self.hold:
            return maybeDeferred(self.local.acquire_attempt, caller, entry, tokens)
        held = Deferred()
        self.waiting.append(held)
        return held.addCallback(lambda _: self.local.acquire_attempt(caller, entry, tokens))

    def release(self, admission, tokens):
        self.local.release(admission, tokens)

    def let_go(self) -> None:
        waiting, self.waiting = self.waiting, []
        for held in waiting:
            held.callback(None)


def fleet_door(clock, *models, **limits):
    for model in models:
        model.spec = replace(model.spec, limits=Limits(**limits))
    door = StubFrontDoor(clock, models, guard=Guard(None, ["unix:"]))
    core = door.front_door.core
    limiter = HeldLimiter(clock, core.metrics)
    core.policy = Policy(limiter=limiter)
    return door, limiter


def test_the_model_is_sent_the_request_once_admitted(clock):
    model = FakeModel()
    door, limiter = fleet_door(clock, model, rpm=1)
    answer = door.open("POST", "/post/predict?id=fake", data=b"{}")
    assert model.received == [] and not has_fired(answer)

    limiter.let_go()
    door.flush()
    assert result_of(answer).code == 200 and len(model.received) == 1


def test_an_asynchronous_refusal_is_a_429_in_each_shape_never_a_request_to_the_model(clock):
    model = FakeModel().answers(body={"content": "hi"})
    door, limiter = fleet_door(clock, model, rpm=1)
    limiter.hold = False
    assert door.call("POST", "/post/predict?id=fake", data=b"{}").status == 200

    plain = door.call("POST", "/post/predict?id=fake", data=b"{}")
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hello"}]}).encode()
    chat = door.call("POST", "/v1/chat/completions", data=body, headers=JSON)

    assert plain.status == 429 and plain.json()["error"]["type"] == "rate_limit_exceeded"
    assert plain.header("x-ratelimit-limit-requests") == "1" and plain.header("Retry-After") == "60"
    assert chat.status == 429 and chat.json()["error"]["code"] == "rate_limit_exceeded"
    assert len(model.received) == 1
    assert sum(door.registry.entry("fake").stats.requests.values()) == 1
    assert dict(door.front_door.metrics.daemon.refusals).get("rate_limited") == 2


def test_a_stream_begins_once_admitted_and_gives_its_place_back_when_it_ends(clock):
    model = FakeStreamingModel()
    door, limiter = fleet_door(clock, model, max_concurrent=1)
    first = door.open("POST", "/post/predict?id=fake&stream=true", data=b"{}")
    assert model.streams == []
    limiter.let_go()
    door.flush()
    assert len(model.streams) == 1

    second = door.open("POST", "/post/predict?id=fake&stream=true", data=b"{}")
    limiter.let_go()
    door.flush()
    assert result_of(second).code == 429

    model.streams[0].end({"done": True})
    door.flush()
    assert result_of(first).code == 200
    again = door.open("POST", "/post/predict?id=fake", data=b"{}")
    limiter.let_go()
    door.flush()
    assert result_of(again).code == 200  # its place was given back


def test_each_attempt_of_a_fallback_chain_waits_for_its_admission_the_key_taken_once(clock):
    head = with_fallbacks(FakeModel("head", clock), "backup", timeout=10).answers(status=503, body={"error": "down"})
    backup = FakeModel("backup", clock)
    door, limiter = fleet_door(clock, head, backup, rpm=10)
    guard = door.front_door.core.guard
    let_in = guard.check_client

    def named(request):  # as the guard names a request that carries key k (one place, two a minute)
        let_in(request)
        request.aibackend_caller = Caller("k", None, Limits(rpm=2, max_concurrent=1))

    guard.check_client = named

    answer = door.open("POST", "/post/predict?id=head", data=b"{}")
    door.flush()
    assert head.received == [] and len(limiter.waiting) == 1 and not has_fired(answer)
    limiter.let_go()
    door.flush()
    assert len(head.received) == 1 and backup.received == [] and len(limiter.waiting) == 1
    limiter.let_go()
    door.flush()
    assert result_of(answer).code == 200 and len(backup.received) == 1
    assert limiter.attempts == [(True, "head"), (False, "backup")]
    assert limiter.local.table.in_flight("key", "k") == 0  # the key's place, held for the chain, given back

    # The key's rpm counted the client's request once: a second one gets through too.
    limiter.hold = False
    assert result_of(door.open("POST", "/post/predict?id=head", data=b"{}")).code == 200


def test_a_client_that_leaves_while_a_fallback_is_admitted_starts_no_attempt_and_frees_its_key(clock):
    head = with_fallbacks(FakeModel("head", clock), "backup", timeout=10).answers(status=503, body={"error": "down"})
    backup = FakeModel("backup", clock)
    door, limiter = fleet_door(clock, head, backup, rpm=10)
    name_caller(door, Caller("k", None, Limits(max_concurrent=1)))
    answer = door.request("POST", "/post/predict?id=head", data=b"{}")
    limiter.let_go()
    door.flush()
    assert len(head.received) == 1 and len(limiter.waiting) == 1  # the fallback's admission, in "Redis"

    door.drop_connections()
    limiter.let_go()  # Redis answers after the client left
    door.flush()
    assert backup.received == []
    assert limiter.local.table.in_flight("key", "k") == 0
    assert limiter.local.table.in_flight("model", "backup") == 0
    assert clock.getDelayedCalls() == []
    answer.addErrback(lambda _: None)


def test_a_streaming_chain_waits_for_each_admission_before_its_stream_begins(clock):
    head = with_fallbacks(FakeStreamingModel("head", clock), "backup", timeout=10)
    backup = FakeStreamingModel("backup", clock)
    door, limiter = fleet_door(clock, head, backup, max_concurrent=1)
    opened = door.open("POST", "/post/predict?id=head&stream=true", data=b"{}")
    assert head.streams == []
    limiter.let_go()
    door.flush()
    head.streams[0].fail(errors.ModelUnavailable("restarting", model="head"))
    assert backup.streams == [] and len(limiter.waiting) == 1
    limiter.let_go()
    door.flush()
    backup.streams[0].chunk({"n": 1})
    backup.streams[0].end()
    door.flush()
    response = result_of(opened)
    assert response.code == 200 and response.headers.getRawHeaders("x-aibackend-model") == ["backup"]
    assert limiter.local.table.in_flight("model", "head") == limiter.local.table.in_flight("model", "backup") == 0
