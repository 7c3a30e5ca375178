"""
A fleet's limits in Redis (L{aibackend.redislimits.RedisLimiter}), against a real
redis-server of the module's own on the real reactor: several limiters on one Redis (as
several daemons are) let through exactly a limit under a burst, requests in flight are
leases a dead daemon's expire from, tokens are settled, and with Redis paused each keeps
the limits alone (its own limiter, logged once).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs

from aibackend.policy import Caller, IAsyncLimiter, IChainLimiter, TokenCount
from aibackend.ratelimit import LimitReached, Limits
from aibackend.redislimits import RedisLimiter
from aibackend.redisstore import RedisStore

_prefixes = itertools.count()


@pytest_twisted.async_yield_fixture
async def fleet(redis_server):
    """C{fleet(n, **options)}: n limiters, each on a store of its own (a daemon's), on one Redis and prefix."""
    from twisted.internet import reactor

    stores, limiters = [], []
    prefix = f"limits{next(_prefixes)}:"

    def make(count: int, **options):
        made = []
        for _ in range(count):
            store = RedisStore(reactor, redis_server.url, prefix=prefix)
            stores.append(store)
            made.append(RedisLimiter(store, reactor, **options))
        limiters.extend(made)
        return made

    yield make
    for limiter in limiters:
        limiter.stop()
    for store in stores:
        await store.close()


def model(model_id: str = "m", limits: Limits | None = None):
    return SimpleNamespace(model_id=model_id, spec=SimpleNamespace(limits=limits), stats=None)


async def burst(limiters, count: int, caller, entry, tokens=None):
    """C{count} admissions at once, spread over the limiters: (admitted, refused)."""
    results = await DeferredList([limiters[index % len(limiters)].acquire(caller, entry, tokens)
                                  for index in range(count)], consumeErrors=True)
    admitted = [value for ok, value in results if ok]
    refused = [value for ok, value in results if not ok]
    assert all(failure.check(LimitReached) for failure in refused), refused[:1]
    return admitted, [failure.value for failure in refused]


def test_the_fleet_limiter_is_an_asynchronous_limiter(fleet):
    (limiter,) = fleet(1)
    assert IAsyncLimiter.providedBy(limiter)


@pytest_twisted.ensureDeferred
async def test_three_daemons_let_exactly_a_keys_rpm_through_under_a_burst(fleet):
    limiters = fleet(3)
    caller = Caller("team", limits=Limits(rpm=50))

    admitted, refused = await burst(limiters, 200, caller, model())

    assert len(admitted) == 50 and len(refused) == 150  # a burst of 200 against 50: 50, from idle
    refusal = refused[0]
    assert refusal.status == 429 and refusal.scope == "key" and refusal.limit == "rpm"
    assert refusal.headers["x-ratelimit-limit-requests"] == "50"
    assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refusal.headers["Retry-After"]) >= 1
    assert "Rate limit reached for key 'team' on requests per min (RPM): Limit 50" in refusal.message


@pytest_twisted.ensureDeferred
async def test_concurrency_slots_are_leases_held_until_released_across_daemons(fleet):
    limiters = fleet(2)
    entry = model(limits=Limits(max_concurrent=3))

    admitted, refused = await burst(limiters, 10, None, entry)
    assert len(admitted) == 3 and refused[0].limit == "max_concurrent" and refused[0].scope == "model"

    limiters[0].release(admitted[0], None)
    await deferLater(_reactor(), 0.1, lambda: None)  # the release goes to Redis off the reactor thread
    again, _ = await burst(limiters[1:], 2, None, entry)
    assert len(again) == 1  # the freed slot, taken once


@pytest_twisted.ensureDeferred
async def test_a_dead_daemons_leases_expire_within_the_lease_time(fleet):
    dead, alive = fleet(2, lease_seconds=0.6)
    entry = model(limits=Limits(max_concurrent=2))
    held, _ = await burst([dead], 2, None, entry)
    assert len(held) == 2
    dead.stop()  # kill -9: nothing renews its leases, nothing releases them

    _, refused = await burst([alive], 1, None, entry)
    assert refused
    await deferLater(_reactor(), 0.7, lambda: None)
    freed, _ = await burst([alive], 3, None, entry)
    assert len(freed) == 2


@pytest_twisted.ensureDeferred
async def test_a_live_daemons_leases_are_renewed_past_the_lease_time(fleet):
    (limiter,) = fleet(1, lease_seconds=0.6)
    entry = model(limits=Limits(max_concurrent=1))
    (held,), _ = await burst([limiter], 1, None, entry)

    await deferLater(_reactor(), 1.5, lambda: None)  # renewed every 0.2 s
    _, refused = await burst([limiter], 1, None, entry)
    assert refused and refused[0].limit == "max_concurrent"
    limiter.release(held, None)


@pytest_twisted.ensureDeferred
async def test_tokens_are_reserved_across_daemons_then_settled_with_what_was_used(fleet):
    limiters = fleet(2)
    caller = Caller("tok", limits=Limits(tpm=1000))

    admitted, refused = await burst(limiters, 6, caller, model(), TokenCount(300))
    assert len(admitted) == 3 and refused[0].limit == "tpm"  # 3 x 300 reserved of 1000

    for admission in admitted:
        used = TokenCount(300)
        used.prompt, used.completion = 10, 20  # 30 used: 270 of each reservation given back
        limiters[0].release(admission, used)
    await deferLater(_reactor(), 0.1, lambda: None)
    again, _ = await burst(limiters, 4, caller, model(), TokenCount(300))
    assert len(again) == 3  # 90 used, 910 left: 3 more of 300


@pytest_twisted.ensureDeferred
async def test_no_limit_is_nothing_to_ask_redis(fleet):
    (limiter,) = fleet(1)
    assert await limiter.acquire(Caller("free"), model(), None) is None


@pytest_twisted.ensureDeferred
async def test_redis_paused_each_daemon_keeps_the_limits_alone_logged_once(fleet, redis_server):
    (limiter,) = fleet(1)
    caller = Caller("alone", limits=Limits(rpm=2))
    limiter.store.follow(lambda changes, full: None)
    await deferLater(_reactor(), 0.2, lambda: None)

    redis_server.pause()
    try:
        with capturedLogs() as events:
            admitted, refused = await burst([limiter], 4, caller, model())  # the first waits for the timeout
            more, refused_more = await burst([limiter], 2, caller, model())
    finally:
        redis_server.resume()
    assert len(admitted) + len(more) == 2 and len(refused) + len(refused_more) == 4  # the local limiter's 2
    warnings = [e for e in events if e["log_level"] == LogLevel.warn and "limits are kept" in e["log_format"]]
    assert len(warnings) == 1


async def _until(check, seconds: float = 5.0, what: str = "") -> None:
    """Wait (on the real reactor) until C{check()} is true."""
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await deferLater(_reactor(), 0.02, lambda: None)
    raise AssertionError(f"not within {seconds} s: {what}")


@pytest_twisted.ensureDeferred
async def test_an_admission_cancelled_while_in_redis_gives_its_lease_and_tokens_back_once_redis_answers(
        fleet, redis_server):
    (limiter,) = fleet(1)  # leases of 30 s: a lease left behind would hold the one place that long
    caller = Caller("leaver", limits=Limits(max_concurrent=1, tpm=100))
    entry = model("leaving", Limits(max_concurrent=1))
    released = []
    release = limiter.release
    limiter.release = lambda admission, tokens: (released.append(admission), release(admission, tokens))

    d = limiter.acquire(caller, entry, TokenCount(100))
    d.cancel()  # the client went away while Redis admits it
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)  # at once, not once Redis answers

    await _until(lambda: released, what="Redis's answer, and what it took given back")
    leases = redis_server.client()
    prefix = limiter.store.prefix
    await _until(lambda: leases.zcard(f"{prefix}lease:key:leaver") == 0 == leases.zcard(f"{prefix}lease:model:leaving"),
                 what="the leases dropped in Redis")
    assert limiter._held == {}
    again = await limiter.acquire(caller, entry, TokenCount(100))  # its place and its 100 tokens are free
    assert again is not None
    limiter.release(again, None)


class Counted:
    """The metrics' refusals, as a limiter counts them."""

    def __init__(self):
        self.refusals = []

    def limited(self, entry, scope, limit):
        self.refusals.append((entry.model_id, scope, limit))


@pytest_twisted.ensureDeferred
async def test_a_chains_attempt_holds_the_keys_part_and_the_models_apart_its_refusal_not_counted(
        fleet, redis_server):
    metrics = Counted()
    (limiter,) = fleet(1, metrics=metrics)
    assert IChainLimiter.providedBy(limiter)
    caller = Caller("chained", limits=Limits(max_concurrent=2))
    entry = model("attempted", Limits(max_concurrent=1))
    leases, prefix = redis_server.client(), limiter.store.prefix

    key_part, model_part = await limiter.acquire_attempt(caller, entry, None)
    assert key_part is not None and model_part is not None
    assert leases.zcard(f"{prefix}lease:key:chained") == 1 == leases.zcard(f"{prefix}lease:model:attempted")

    with pytest.raises(LimitReached) as refused:  # the model's one place is taken: refused, not counted
        await limiter.acquire_attempt(None, entry, None)
    assert refused.value.scope == "model" and metrics.refusals == []

    limiter.release(model_part, None)  # the attempt ended; the key's part stays, for the chain
    await _until(lambda: leases.zcard(f"{prefix}lease:model:attempted") == 0, what="the model's lease dropped")
    assert leases.zcard(f"{prefix}lease:key:chained") == 1
    none, second = await limiter.acquire_attempt(None, entry, None)  # the next attempt: the model's limits alone
    assert none is None and second is not None

    with pytest.raises(LimitReached):  # a request's admission (not a chain's) counts its refusal
        await limiter.acquire(None, entry, None)
    assert metrics.refusals == [("attempted", "model", "max_concurrent")]
    limiter.release(second, None)
    limiter.release(key_part, None)
    await _until(lambda: leases.zcard(f"{prefix}lease:key:chained") == 0, what="the key's lease dropped")


def _reactor():
    from twisted.internet import reactor

    return reactor
