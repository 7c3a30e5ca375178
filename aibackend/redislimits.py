"""
A fleet's limits in Redis (issue 19 item 3): the same limits as L{aibackend.ratelimit}'s
L{Limiter <aibackend.ratelimit.Limiter>} (requests and tokens per minute as GCRA buckets,
requests in flight), kept in the shared store's Redis so that N daemons together let
through at most one request over a limit under a burst.

Each admission is one Lua script (L{ADMIT}), atomic in Redis: every limit that applies
(the key's and the model's) is looked at, then all are taken, or none, at Redis's own
time (C{TIME}: one clock for every machine of the fleet). Under C{PREFIX}limit:KIND:NAME,
a hash: C{r} and C{t}, the GCRA times of its requests and its tokens (expiring once idle
for two minutes: bounded); under C{PREFIX}lease:KIND:NAME, a sorted set: a request in
flight is a lease, an id of the daemon's own scored by when it expires. A daemon renews
its leases every L{LEASE_SECONDS} / 3 (one script for all of them); a daemon that dies
(C{kill -9}) renews nothing, and its leases expire within L{LEASE_SECONDS}: an admission
drops the expired ones before counting. The end of a request (L{RELEASE}) drops its lease
and settles its tokens (what it used, less what it reserved).

The calls run in the store's bounded pool of threads (never on the reactor): so
L{RedisLimiter.acquire} answers a Deferred (L{aibackend.policy.IAsyncLimiter}). A client
that goes away while its admission is in Redis has that Deferred cancelled: it fails at
once, and whatever Redis took for it (a lease, a reservation) is given back as soon as
Redis answers, not left until the lease expires. A fallback chain's attempts are admitted
here too (L{RedisLimiter.acquire_attempt}, L{aibackend.policy.IChainLimiter}): the key's
limits with the first, each model's with its own, so a model with fallbacks is held to
the fleet's limits as any.

Redis down (the store says so, or the call fails): the daemon's own L{Limiter
<aibackend.ratelimit.Limiter>} keeps the limits for this process alone (logged once each
time Redis goes), until Redis answers again; what it admitted meanwhile is settled there.
"""

from __future__ import annotations

import itertools
import secrets

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from aibackend.policy import IAsyncLimiter, IChainLimiter
from aibackend.ratelimit import MINUTE, Limiter, LimitReached, refusal

LEASE_SECONDS = 30.0  # a request in flight of a daemon that died is freed within this
IDLE_MS = 120_000  # a scope's buckets are forgotten after this long idle (full again by then)

# KEYS: per scope, its state hash and its lease set. ARGV: reserve (tokens; -1: no token count), the lease
# id, the lease seconds, then per scope: rpm, tpm, max_concurrent (0: none).
# {1, now} admitted; {0, the scope's number, the limit, now, then per scope: requests' time, tokens' time}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local reserve = tonumber(ARGV[1])
local id, lease = ARGV[2], tonumber(ARGV[3])
local n = #KEYS / 2
local reached = now + 60 + 1e-9
local states, new = {}, {}
for i = 1, n do
  local s = redis.call('HMGET', KEYS[2 * i - 1], 'r', 't')
  states[i] = {tonumber(s[1]) or 0, tonumber(s[2]) or 0}
end
local function refused(i, limit)
  local out = {0, i, limit, string.format('%.6f', now)}
  for j = 1, n do
    out[#out + 1] = string.format('%.6f', states[j][1])
    out[#out + 1] = string.format('%.6f', states[j][2])
  end
  return out
end
for i = 1, n do
  local base = 3 + (i - 1) * 3
  local rpm, tpm, most = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local r, tk = states[i][1], states[i][2]
  if rpm > 0 then
    r = math.max(r, now) + 60 / rpm
    if r > reached then return refused(i, 'rpm') end
  end
  if tpm > 0 and reserve >= 0 then
    tk = math.max(tk, now) + math.min(reserve, tpm) * 60 / tpm
    if tk > reached then return refused(i, 'tpm') end
  end
  if most > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', now)
    if redis.call('ZCARD', KEYS[2 * i]) >= most then return refused(i, 'max_concurrent') end
  end
  new[i] = {r, tk, most}
end
for i = 1, n do
  redis.call('HSET', KEYS[2 * i - 1], 'r', string.format('%.6f', new[i][1]), 't', string.format('%.6f', new[i][2]))
  redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[#ARGV])
  if new[i][3] > 0 then
    redis.call('ZADD', KEYS[2 * i], now + lease, id)
    redis.call('PEXPIRE', KEYS[2 * i], math.floor((lease + 60) * 1000))
  end
end
return {1, 0, '', string.format('%.6f', now)}
"""

# KEYS: per scope, its state hash and its lease set. ARGV: the lease id, then per scope the tokens to
# settle, in seconds of its bucket (what it used less what it reserved, times 60 / tpm; 0: nothing).
RELEASE = """
for i = 1, #KEYS / 2 do
  redis.call('ZREM', KEYS[2 * i], ARGV[1])
  local settle = tonumber(ARGV[i + 1])
  if settle ~= 0 and redis.call('EXISTS', KEYS[2 * i - 1]) == 1 then
    redis.call('HINCRBYFLOAT', KEYS[2 * i - 1], 't', settle)
  end
end
return 1
"""

# KEYS: lease sets; ARGV: the lease seconds, then the id of a lease in each set. Leases still held, renewed.
RENEW = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expires, ARGV[i + 1])
end
return #KEYS
"""


class _Scope:
    """A key or a model (what L{aibackend.ratelimit.refusal} names)."""

    __slots__ = ("kind", "name", "what")

    def __init__(self, kind: str, name: str):
        self.kind = kind
        self.name = name
        self.what = f"{kind} {name!r}"


class FleetAdmission:
    """One request's hold in Redis: its lease id, its scopes' keys, the tokens each charged (and at what rate)."""

    __slots__ = ("lease", "keys", "charged", "leased")

    def __init__(self, lease: str, keys: list, charged: list, leased: list):
        self.lease = lease
        self.keys = keys  # [state, leases] per scope
        self.charged = charged  # per scope: (tokens reserved, seconds a token), or None
        self.leased = leased  # the lease sets it holds a lease in


class LocalAdmission:
    """One request admitted by the process's own limiter while Redis was down."""

    __slots__ = ("admission",)

    def __init__(self, admission):
        self.admission = admission


@implementer(IAsyncLimiter, IChainLimiter)
class RedisLimiter:
    """
    The limits of keys and models in the shared store's Redis (see the module).

    @param store: the L{aibackend.redisstore.RedisStore} (its client, threads, prefix, state).
    @param clock: an C{IReactorTime} (the lease renewals' timer).
    @param local: the L{Limiter} used while Redis is down (by default, one of this process).
    @param lease_seconds: how long a lease outlives its daemon.
    """

    log = Logger()

    def __init__(self, store, clock, *, local: Limiter | None = None, metrics=None,
                 lease_seconds: float = LEASE_SECONDS):
        self.store = store
        self.clock = clock
        self.local = local if local is not None else Limiter(clock, metrics=metrics)
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self._admit = store.script(ADMIT)
        self._release = store.script(RELEASE)
        self._renew = store.script(RENEW)
        self._prefix = store.prefix
        self._daemon = secrets.token_hex(6)
        self._numbers = itertools.count()
        self._held: dict[FleetAdmission, None] = {}  # the admissions holding leases, while in flight
        self._renewing: LoopingCall | None = None
        self._local_since: float | None = None  # Redis went: the local limiter keeps the limits

    def _keys(self, kind: str, name: str) -> list:
        return [f"{self._prefix}limit:{kind}:{name}", f"{self._prefix}lease:{kind}:{name}"]

    def acquire(self, caller, entry, tokens):
        """
        Admit a request (as L{aibackend.ratelimit.Limiter.acquire}), in Redis.

        @return: a Deferred of the admission (None: no limit applies), failing with
            L{aibackend.ratelimit.LimitReached}. Cancelled (its client went away) while
            Redis admits it, it fails at once, and what Redis then holds for it is given
            back as soon as Redis answers (its lease is not left until it expires).
        """
        return self._acquire(caller, entry, tokens, self.metrics, False)

    def acquire_attempt(self, caller, entry, tokens):
        """
        A fallback chain's attempt (L{aibackend.policy.IChainLimiter}), in Redis as
        L{acquire}: a Deferred of C{(the key's part, the model's part)}; a refusal is not
        counted in the metrics.
        """
        return self._acquire(caller, entry, tokens, None, True)

    def _acquire(self, caller, entry, tokens, metrics, parts: bool):
        key_limits = caller.limits if caller is not None else None
        model_limits = entry.spec.limits
        if key_limits is None and model_limits is None:
            return succeed((None, None) if parts else None)
        if self.store.up is False:
            return maybeDeferred(self._locally, caller, entry, tokens, parts)
        applied = []
        if key_limits is not None:
            applied.append((_Scope("key", caller.name), key_limits))
        if model_limits is not None:
            applied.append((_Scope("model", entry.model_id), model_limits))
        reserve = tokens.reserve if tokens is not None else -1
        lease = f"{self._daemon}-{next(self._numbers)}"
        keys, args = [], [reserve, lease, self.lease_seconds]
        for scope, limits in applied:
            keys += self._keys(scope.kind, scope.name)
            args += [limits.rpm or 0, limits.tpm or 0, limits.max_concurrent or 0]
        args.append(IDLE_MS)
        d = self.store.call(self._admit, keys, args)
        d.addCallback(self._admitted, applied, keys, lease, entry, tokens, metrics, parts)
        d.addErrback(self._unreachable, caller, entry, tokens, parts)
        # What the caller is given: a Deferred of its own, which a client that leaves cancels
        # at once (a thread's Deferred cannot stop its call); Redis's answer comes later, to
        # _answered, which gives back what an admission cancelled meanwhile took.
        result = Deferred()
        d.addBoth(self._answered, result)
        return result

    def _answered(self, outcome, result) -> None:
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
            return
        # Cancelled while Redis admitted it: whatever it holds is given back now, its whole reservation with it.
        if isinstance(outcome, Failure):
            if not outcome.check(LimitReached, CancelledError):
                self.log.failure("a fleet admission whose client went away", outcome)
            return
        for admission in outcome if isinstance(outcome, tuple) else (outcome,):
            if admission is not None:
                self.release(admission, None)

    def _admitted(self, answer, applied, keys, lease, entry, tokens, metrics, parts: bool):
        admitted, which, limit, now = int(answer[0]), int(answer[1]), answer[2], float(answer[3])
        if self._local_since is not None:
            self._local_since = None
            self.log.info("aibackend: the fleet's limits are kept in Redis again")
        if not admitted:
            states = []
            for index, (scope, limits) in enumerate(applied):
                requests_at, tokens_at = float(answer[4 + 2 * index]), float(answer[5 + 2 * index])
                states.append((scope, limits, max(requests_at - now, 0.0), max(tokens_at - now, 0.0)))
            scope, limits = applied[which - 1]
            raise refusal(scope, limit, limits, states, entry, tokens.reserve if tokens is not None else 0, metrics)
        held = []  # per scope: (its kind, its keys, what it charged, its lease set or None), if it holds anything
        for index, (scope, limits) in enumerate(applied):
            charged = None
            if limits.tpm is not None and tokens is not None:
                charged = (min(tokens.reserve, limits.tpm), MINUTE / limits.tpm)
            leases = keys[2 * index + 1] if limits.max_concurrent is not None else None
            if charged is not None or leases is not None:
                held.append((scope.kind, keys[2 * index:2 * index + 2], charged, leases))
        if parts:
            return (self._hold(lease, [one for one in held if one[0] == "key"]),
                    self._hold(lease, [one for one in held if one[0] == "model"]))
        return self._hold(lease, held)

    def _hold(self, lease: str, held: list):
        """The L{FleetAdmission} of the scopes C{held} hold something in, or None (requests per minute only)."""
        if not held:
            return None
        admission = FleetAdmission(lease, [key for one in held for key in one[1]], [one[2] for one in held],
                                   [one[3] for one in held if one[3] is not None])
        if admission.leased:
            self._held[admission] = None
            self._renew_soon()
        return admission

    def _unreachable(self, failure, caller, entry, tokens, parts: bool):
        if failure.check(*self.store.unreachable):  # (a refusal, LimitReached, passes)
            return self._locally(caller, entry, tokens, parts)
        return failure

    def _locally(self, caller, entry, tokens, parts: bool):
        if self._local_since is None:
            self._local_since = self.clock.seconds()
            self.log.warn("aibackend: the shared store (Redis) cannot be reached: limits are kept by this process "
                          "alone until it answers (a fleet of N daemons may let up to N times a limit through)")
        if parts:
            return tuple(None if part is None else LocalAdmission(part)
                         for part in self.local.acquire_attempt(caller, entry, tokens))
        admission = self.local.acquire(caller, entry, tokens)
        return None if admission is None else LocalAdmission(admission)

    def release(self, admission, tokens):
        """The request has ended: its lease dropped, its tokens settled (in Redis, off the reactor thread)."""
        if isinstance(admission, LocalAdmission):
            self.local.release(admission.admission, tokens)
            return
        self._held.pop(admission, None)
        used = tokens.used() if tokens is not None else None
        used = 0 if used is None else used
        settle = [0 if charged is None else (used - charged[0]) * charged[1] for charged in admission.charged]
        d = self.store.call(self._release, admission.keys, [admission.lease, *settle])
        # Not reached: the lease expires by itself, the tokens stay charged as reserved (logged by the store).
        d.addErrback(lambda failure: None if failure.check(*self.store.unreachable) else
                     self.log.failure("releasing a fleet limit", failure))

    # --- leases ---------------------------------------------------------------------------

    def _renew_soon(self) -> None:
        if self._renewing is None:
            self._renewing = LoopingCall(self._renew_all)
            self._renewing.clock = self.clock
            self._renewing.start(self.lease_seconds / 3, now=False)

    def _renew_all(self):
        if not self._held:
            self._renewing.stop()
            self._renewing = None
            return None
        keys, ids = [], []
        for admission in self._held:
            for leases in admission.leased:
                keys.append(leases)
                ids.append(admission.lease)
        d = self.store.call(self._renew, keys, [self.lease_seconds, *ids])
        d.addErrback(lambda failure: None if failure.check(*self.store.unreachable) else
                     self.log.failure("renewing the fleet's leases", failure))
        return None

    def stop(self) -> None:
        """Stop renewing (on stop: the leases still held expire in Redis by themselves)."""
        if self._renewing is not None:
            self._renewing.stop()
            self._renewing = None


class LeaseService(service.Service):
    """Stops renewing the fleet limiter's leases when the daemon stops (those held then expire in Redis)."""

    name = "fleet-limits"

    def __init__(self, limiter: RedisLimiter):
        self.limiter = limiter

    def stopService(self):
        super().stopService()
        self.limiter.stop()
