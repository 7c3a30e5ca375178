"""
Who calls, what they may call, how much, and what they used: the relay's policy.

The guard (L{aibackend.auth.Guard.check_client}) names the caller of a request, a
L{Caller} (a client key's name, the models it may call, its limits), on the request
(C{request.aibackend_caller}). The relay asks its L{Policy} to admit every request before
it is sent to a model (L{Policy.admit}: the key's models, then the limits of the key and
of the model, which may refuse it with a 429) and settles it once it has ended
(L{Policy.settle}: what the limits reserved is given back or charged, and the usage is
recorded). The parts behind it are interfaces: L{ILimiter} (the limits: in this process,
shared by C{--processes}, or a fleet's) and L{IUsageRecorder} (the usage, written off the
request path).

A daemon without keys, limits or usage has no policy (the relay's C{policy} is None), and
its hot path does nothing for one.
"""

from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Interface

from aibackend import errors


@dataclass(frozen=True, slots=True)
class Caller:
    """
    Who sent a request: a client key, by its name (never its secret).

    @ivar name: the key's name: a bounded label for metrics and usage.
    @ivar models: the model ids it may call, or None for every model.
    @ivar limits: its limits (what the L{ILimiter} reads), or None.
    """

    name: str
    models: frozenset | None = None
    limits: object = None


def may_call(caller: Caller | None, model_id: str) -> bool:
    """May C{caller} (None: no key) call model C{model_id}? (What a listing of models shows.)"""
    return caller is None or caller.models is None or model_id in caller.models


def check_model(caller: Caller | None, model_id: str) -> None:
    """
    The one check of a key's models, on every route that names a model.

    @raise errors.Forbidden: C{caller}'s key may not call model C{model_id}.
    """
    if caller is not None and caller.models is not None and model_id not in caller.models:
        raise errors.Forbidden(f"this key may not call model {model_id!r}", model=model_id)



class TokenCount:
    """
    The tokens of one request, for the models whose answers carry them (OpenAI-shaped
    answers and streams): made by the front door with what it expects (C{reserve}: the
    request's C{max_tokens} and its prompt's estimate), filled in by the front door's
    shape once the answer (or the stream's usage) says what was used.

    @ivar reserve: the tokens to reserve when the request starts.
    @ivar prompt: the prompt's tokens, once known (else None).
    @ivar completion: the completion's tokens, once known (else None).
    """

    __slots__ = ("reserve", "prompt", "completion")

    def __init__(self, reserve: int = 0):
        self.reserve = reserve
        self.prompt = None
        self.completion = None

    def used(self) -> int | None:
        """The tokens used in all, or None while no answer said."""
        if self.prompt is None and self.completion is None:
            return None
        return (self.prompt or 0) + (self.completion or 0)


class Call:
    """
    One admitted request's policy state, from L{Policy.admit} to L{Policy.settle}.

    @ivar caller: its L{Caller}, or None (no key: keys are not required).
    @ivar model_id: the model it was admitted to.
    @ivar tokens: its L{TokenCount}, or None (a model without token counts).
    @ivar admission: what the limiter holds for it (L{ILimiter.acquire}), or None.
    @ivar policy: the L{Policy} that admitted it, and so settles it (the daemon's policy
        may be made again meanwhile, or be none any more: a key deleted, a model replaced).
    """

    __slots__ = ("caller", "model_id", "tokens", "admission", "settled", "policy")

    def __init__(self, caller: Caller | None, model_id: str, tokens: TokenCount | None, admission, policy=None):
        self.caller = caller
        self.model_id = model_id
        self.tokens = tokens
        self.admission = admission
        self.settled = False
        self.policy = policy

    def settle(self, status: int, seconds: float) -> None:
        """
        The request has ended with C{status} after C{seconds}: settled by the policy that
        admitted it (once): its limits settled, its usage recorded.
        """
        if self.settled:
            return
        self.settled = True
        policy = self.policy
        if self.admission is not None:
            policy.limiter.release(self.admission, self.tokens)
        usage = policy.usage
        if usage is not None:
            usage.record(self.caller, self.model_id, status, seconds, self.tokens)


_new = object.__new__


class ILimiter(Interface):
    """The limits of keys and models: requests and tokens per minute, concurrent requests."""

    def acquire(caller, entry, tokens):
        """
        Admit a request of C{caller} (a L{Caller} or None) to the model of registry entry
        C{entry}, reserving C{tokens} (a L{TokenCount} or None).

        @return: what to give back to L{release} (or None when no limit applies).
        @raise errors.ApiError: a limit is reached (a 429 with C{Retry-After} and the
            C{x-ratelimit-*} headers).
        """

    def release(admission, tokens):
        """The request has ended: free its place, and settle its tokens with C{tokens.used()}."""


class IAsyncLimiter(ILimiter):
    """
    A limiter whose admission is not known at once (the fleet's, in Redis:
    L{aibackend.redislimits}): C{acquire} returns a Deferred of what L{ILimiter.acquire}
    returns (failing with its 429), and L{Policy.admit} then a Deferred of the L{Call}
    (and an L{IChainLimiter}'s C{acquire_attempt} a Deferred of its pair).
    """


class IChainLimiter(ILimiter):
    """
    A limiter that admits a fallback chain's attempts (L{aibackend.relay.Chain}) as the
    client sees them: the key's limits once for the whole request (its C{rpm} counts the
    client's request once, its place and its tokens are held until the chain ends), each
    model's limits for each attempt that goes to it.
    """

    def acquire_attempt(caller, entry, tokens):
        """
        As L{ILimiter.acquire} (C{caller} None: the model's limits alone), with two
        differences: a refusal is not counted in the metrics (a model refused by its limit
        is skipped: the chain counts the refusal its client sees, if any), and what is held
        comes in two parts, each given back to L{ILimiter.release} on its own.

        @return: C{(the key's part, the model's part)}, each None when it holds nothing (an
            L{IAsyncLimiter}: a Deferred of that pair).
        @raise aibackend.ratelimit.LimitReached: a limit is reached (its C{scope} says whose).
        """


class IUsageRecorder(Interface):
    """Where the usage goes: recorded off the request path, bounded in memory."""

    def record(caller, model_id, status, seconds, tokens):
        """One request ended (C{tokens}: its L{TokenCount} or None). Never blocks, never raises."""


class Policy:
    """
    The relay's admission and settlement of each request.

    @param limiter: an L{ILimiter}, or None (no limits).
    @param usage: an L{IUsageRecorder}, or None (no usage kept).
    """

    def __init__(self, *, limiter=None, usage=None):
        self.limiter = limiter
        self.usage = usage
        self.asynchronous = IAsyncLimiter.providedBy(limiter)

    def admit(self, request, entry, tokens: TokenCount | None = None) -> Call | None:
        """
        Admit C{request} (its caller: C{request.aibackend_caller}) to the model of
        C{entry}.

        @return: its L{Call}, or None for a request a C{--processes} worker forwarded
            (C{request.aibackend_forwarded}, marked by the guard): the worker's policy
            admitted it and settles it (its usage counted once, its limits taken once).
            With an L{IAsyncLimiter}, a Deferred of the L{Call} (failing with the 429).

        @raise errors.Forbidden: the caller's key may not call this model.
        @raise errors.ApiError: a limit is reached (the limiter's 429).
        """
        if request.aibackend_forwarded:
            return None
        caller = request.aibackend_caller
        model_id = entry.model_id
        if caller is not None and caller.models is not None:
            check_model(caller, model_id)
        limiter = self.limiter
        admission = None if limiter is None else limiter.acquire(caller, entry, tokens)
        if self.asynchronous:
            return admission.addCallback(lambda admission: Call(caller, model_id, tokens, admission, self))
        # Call(caller, model_id, tokens, admission, self), without a call of its __init__ (every request's path).
        call = _new(Call)
        call.caller = caller
        call.model_id = model_id
        call.tokens = tokens
        call.admission = admission
        call.settled = False
        call.policy = self
        return call

    def admit_attempt(self, request, entry, tokens: TokenCount | None = None, key: bool = True):
        """
        Admit an attempt of a fallback chain (L{aibackend.relay.Chain}) to the model of
        C{entry}: by the key's limits too when C{key} (the chain's first admitted attempt),
        else by the model's alone. An L{ILimiter} that is no L{IChainLimiter} admits each
        attempt as a request (its key's limits included).

        @return: C{(what the key's limits hold, to give back to L{release} once the chain
            has ended; the attempt's L{Call})} (an L{IAsyncLimiter}: a Deferred of it).
        @raise errors.Forbidden: the caller's key may not call this model.
        @raise errors.ApiError: a limit is reached (the limiter's 429, not counted in the
            metrics by an L{IChainLimiter}).
        """
        caller = request.aibackend_caller
        model_id = entry.model_id
        check_model(caller, model_id)
        limiter = self.limiter
        if limiter is None:
            return None, Call(caller, model_id, tokens, None, self)
        if not IChainLimiter.providedBy(limiter):
            admission = limiter.acquire(caller, entry, tokens)
            if self.asynchronous:
                return admission.addCallback(lambda admission: (None, Call(caller, model_id, tokens, admission, self)))
            return None, Call(caller, model_id, tokens, admission, self)
        parts = limiter.acquire_attempt(caller if key else None, entry, tokens)
        if self.asynchronous:
            return parts.addCallback(lambda parts: (parts[0], Call(caller, model_id, tokens, parts[1], self)))
        return parts[0], Call(caller, model_id, tokens, parts[1], self)

    def release(self, held, tokens: TokenCount | None) -> None:
        """Give back what L{admit_attempt} said the key's limits hold (the chain has ended; None: nothing)."""
        if held is not None:
            self.limiter.release(held, tokens)

    def counts_tokens(self, request, entry) -> bool:
        """
        Does a request of C{request}'s caller to the model of C{entry} need a
        L{TokenCount} (a front door whose answers carry token usage makes one only then):
        usage is kept, or its key or its model has a C{tpm} limit?
        """
        if self.usage is not None:
            return True
        if self.limiter is None:
            return False
        model_limits = entry.spec.limits
        if model_limits is not None and model_limits.tpm is not None:
            return True
        caller = request.aibackend_caller
        return caller is not None and caller.limits is not None and caller.limits.tpm is not None

    def settle(self, call: Call, status: int, seconds: float) -> None:
        """C{call} has ended with C{status} after C{seconds}: settled (once) by this policy."""
        call.policy = self
        call.settle(status, seconds)
