"""
The relay below every front door, and the daemon's state they share.

A front door (L{aibackend.api}, L{aibackend.v2}) translates its protocol into a resolved
request (the model's registry entry, the body to send, a L{RequestContext}) and back; the
L{Relay} does what they all do with it, once: count it in flight, send it to the model,
log it in the model's log and the metrics, and map the outcome (the model's answer, an
L{errors.ApiError}, a request cancelled because its client went away or its model is
stopping, a bug) to what the client is told. (The guard is checked by each front door
at its entrance, with L{Core.guard}, before the request is resolved: a client without a
key learns nothing of which models exist.) L{Core} holds what every front door reads:
the registry, the guard, the metrics, the clock, the model manager, the way to the
primary process (C{--processes}), readiness, and the relay.
"""

from __future__ import annotations

import json

from twisted.internet import threads
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from aibackend import errors
from aibackend.auth import Guard
from aibackend.directwrite import flush
from aibackend.interfaces import IChunks, IStreaming
from aibackend.metrics import Metrics
from aibackend.policy import IChainLimiter
from aibackend.ratelimit import LimitReached
from aibackend.server import BoundedRequest
from aibackend.web import UNEXPECTED, client_gone, sized

CLIENT_CLOSED = errors.CLIENT_CLOSED  # a client that went away before its answer (nginx's 499)


class Core:
    """
    The daemon's state the front doors share, given to each of them.

    @param registry: the L{aibackend.registry.ModelRegistry}.
    @param clock: an L{IReactorTime}, for latencies.
    @param manager: the L{aibackend.admin.ModelManager}, or None (no runtime changes).
    @param guard: the L{aibackend.auth.Guard} (by default: a unix socket's, no keys).
    @param metrics: the L{aibackend.metrics.Metrics} (by default, the registry's own).
    @param in_thread: C{deferToThread}'s signature; tests run the function at once.

    @ivar accepting: ready for work: set once the daemon has started, cleared when it
        begins to stop.
    @ivar primary: with C{--processes}, in a worker process: the way to the primary
        process (an L{aibackend.processes.Forwarder}); otherwise None.
    @ivar relay: the L{Relay}.
    """

    def __init__(self, registry, clock, *, manager=None, guard=None, metrics=None, in_thread=None):
        self.registry = registry
        self.clock = clock
        self.manager = manager
        self.guard = guard if guard is not None else Guard(None, ["unix:"])
        self.metrics = metrics if metrics is not None else Metrics(registry)
        # How work too long for the reactor thread is done (rendering a long log, large
        # tensors in aibackend.v2): the reactor's thread pool, bounded.
        self.in_thread = in_thread if in_thread is not None else threads.deferToThread
        self.accepting = False
        self.primary = None
        self.relay = Relay(clock, self.metrics, registry=registry, guard=self.guard)

    @property
    def policy(self):
        """The relay's L{aibackend.policy.Policy}, or None (no keys, limits or usage)."""
        return self.relay.policy

    @policy.setter
    def policy(self, policy) -> None:
        self.relay.policy = policy

    def forward(self, request):
        """
        Have the primary process do an operation that changes the models (in a worker
        process). The primary answers once every worker, this one included, has
        followed the change (aibackend.processes.WorkerProcesses.sync).

        @return: a Deferred of the answer's body.
        """
        return self.primary.forward(request).addCallback(lambda body: sized(request, body))


class Relay:
    """
    Sends resolved requests to their models and says how each went.

    @param clock: an L{IReactorTime}, for latencies.
    @param metrics: the L{aibackend.metrics.Metrics}.
    @param registry: the L{aibackend.registry.ModelRegistry} where a model's C{fallbacks}
        are found (L{Chain}); None: none is (a relay of a test that needs none).
    @param guard: the L{aibackend.auth.Guard} that says whether a request may ask for a
        mock failure (L{MOCK_FAILURE}: admin rights); None: none may.

    @ivar policy: the L{aibackend.policy.Policy} that admits and settles every request
        (keys' models, limits, usage), or None: nothing to admit, nothing done for it.
    """

    log = Logger()

    def __init__(self, clock, metrics, *, registry=None, guard=None):
        self.clock = clock
        self.metrics = metrics
        self.policy = None
        self.registry = registry
        self.guard = guard

    def send(self, request, entry, body: bytes, context, started: float, shape=None, tokens=None, retarget=None,
             admitted=None):
        """
        Send C{body} to the model of registry entry C{entry} and answer the client with
        what it answers (or with what C{shape} makes of that L{ModelAnswer}); the outcome
        is logged and counted once.

        A model with C{fallbacks} is sent the request through a L{Chain}: while an attempt
        fails before an answer was given, the next model of its list is sent it.

        @param started: when the request came (the clock's seconds), for its latency.
        @param tokens: the request's L{aibackend.policy.TokenCount} (its shape fills it
            in), or None: a model whose answers carry no token counts.
        @param retarget: for a model with fallbacks: C{retarget(entry)} makes C{(body,
            context, shape)} for the fallback of registry entry C{entry}, or a Deferred of
            them (made in a thread: a large body), or raises (or fails with) an
            L{errors.ApiError}: that model cannot take this request, and is skipped; None:
            every model of the chain is sent the same body, context and shape.
        @return: a Deferred of the answer's body, or failing with an L{errors.ApiError}
            (or, when the client went away, with the L{CancelledError}).
        @param admitted: the L{aibackend.policy.Call} an asynchronous policy admitted (the
            request sent again once it was), or None.
        @raise errors.ApiError: the policy refused the request (a key that may not call
            the model, a limit reached) before it was sent; or a mock failure was asked
            for without admin rights.
        """
        if entry.spec.fallbacks and not self._forwarded(request):
            return Chain(self, request, entry, started, tokens, retarget).send(body, context, shape)
        call = admitted
        if call is None:
            policy = self.policy
            call = None if policy is None else policy.admit(request, entry, tokens)
            if call.__class__ is Deferred:  # a fleet's limiter (Redis): the model is sent it once admitted
                return call.addCallback(lambda call: self.send(request, entry, body, context, started, shape, tokens,
                                                               admitted=call))
        entry.stats.in_flight += 1
        # maybeDeferred(entry.model.send, body, context), with a model's Deferred taken as
        # it is without a call of its own (the hot path).
        try:
            d = entry.model.send(body, context)
        except BaseException:
            d = fail()
        else:
            if d.__class__ is not Deferred:
                d = maybeDeferred(_itself, d)  # (a Failure, a coroutine, a value, a Deferred's subclass)
        # The outcome is a _Sent's to tell: bound methods of one small object, not three
        # closures a request.
        sent = _Sent(self, request, entry, context, started, shape is None, call)
        if shape is None:
            d.addCallbacks(sent.answered, sent.failed)  # each settles the request first
        else:
            d.addBoth(sent.settled)
            d.addCallback(shape)
            d.addCallbacks(sent.answered, sent.failed)
        return d

    def stream(self, request, entry, body: bytes, context, started: float, framing: "Framing", shape,
               tokens=None, retarget=None, admitted=None):
        """
        The streaming twin of L{send}: have the model of C{entry} (an L{IStreaming})
        answer in chunks, each written to the client at once in C{framing}'s format, then
        the final event. An error before the first byte fails the Deferred (the front
        door answers it as a plain request's error, in C{shape}); after it, the error
        event (C{shape}'s document) ends the stream. The outcome is logged and counted
        once: 200 for a stream that ended, the error's status for one that failed (before
        or after its first byte), 499 when the client went away (the model's stream is
        cancelled: cancelling the Deferred returned cancels it).

        The model's spec bounds the stream (L{StreamWriter}): C{first_chunk_timeout} and
        C{stream_idle_timeout} (504, the model's work cancelled), C{keepalive_seconds}
        (SSE comments while nothing is written), C{max_stream_buffer_bytes} (what may wait
        for a slow reader; past it, L{SlowReader}, the model's work cancelled).

        A model with C{fallbacks} streams through a L{Chain}: while an attempt fails
        before the first byte was written, the next model of its list is asked.

        @param tokens: as L{send}'s.
        @param retarget: as L{send}'s, making C{(body, context, framing)}.
        @param admitted: as L{send}'s.
        @return: a Deferred firing with None once the request is finished, or failing
            with an L{errors.ApiError} (or the L{CancelledError} of a client gone).
        @raise errors.ApiError: the policy refused the request, as L{send}'s.
        """
        if entry.spec.fallbacks and not self._forwarded(request):
            return Chain(self, request, entry, started, tokens, retarget).stream(body, context, framing, shape)
        call = admitted
        if call is None:
            policy = self.policy
            call = None if policy is None else policy.admit(request, entry, tokens)
            if call.__class__ is Deferred:  # a fleet's limiter (Redis): the stream begins once admitted
                return call.addCallback(lambda call: self.stream(request, entry, body, context, started, framing,
                                                                 shape, tokens, admitted=call))
        stats = entry.stats
        stats.in_flight += 1
        stats.stream_began()
        writer = StreamWriter(request, framing, self.clock, spec=entry.spec, stats=stats, started=started)
        request.aibackend_stream = writer  # the access event's stream fields (aibackend.server)
        writer.begin()
        d = maybeDeferred(entry.model.stream, body, context, writer)
        if not d.called:
            writer.watch(d)
        # The outcome is the writer's to tell (StreamWriter.ended, .failed): two bound methods
        # on the stream's Deferred, no closures (a held stream holds them all).
        writer.relay, writer.entry, writer.context, writer.shape, writer.call = self, entry, context, shape, call
        d.addCallbacks(writer.ended, writer.failed)
        return d

    def chain_counts_tokens(self, request, entry) -> bool:
        """
        Does a fallback of C{entry}'s model need the request's
        L{aibackend.policy.TokenCount} (L{aibackend.policy.Policy.counts_tokens} of one of
        them: its own C{tpm}, say), when the model itself needs none? Each attempt's model
        reserves and settles its own tokens, whatever the first model counts. (Asked by a
        front door whose answers carry token usage, for a model with C{fallbacks} only.)
        """
        policy, registry = self.policy, self.registry
        if policy is None or registry is None:
            return False
        return any(model_id in registry and policy.counts_tokens(request, registry.entry(model_id))
                   for model_id in entry.spec.fallbacks)

    def _forwarded(self, request) -> bool:
        """
        Is C{request} one a worker process forwarded (C{--processes})? The worker runs the
        chain, each attempt forwarded on its own: the primary sends it to that model only.
        """
        guard = self.guard
        return guard is not None and guard.forwarded(request)

    def _stream_done(self, writer, entry, request_id, operation, started, status, error, how: str) -> None:
        writer.stream_end = how
        self.metrics.stream_ended(entry, how)
        seconds = self.done(entry, request_id, operation, started, status, error)
        call = writer.call
        if call is not None:
            call.settle(status, seconds)

    def done(self, entry, request_id: str, operation: str, started: float, status: int, error: str | None) -> float:
        """
        Log a request to the model of C{entry} (its log, the metrics): one sent, or one
        refused before it was (a body that is not JSON).

        @return: its latency, in seconds.
        """
        seconds = self.clock.seconds() - started
        self.metrics.observe(entry, operation, status, seconds)
        entry.model.model_log.record_request(request_id, operation, status, seconds * 1000.0, error)
        return seconds

    def _settle(self, call, entry, request_id: str, operation: str, started: float, status: int,
                error: str | None) -> None:
        """L{done}, then the policy's settlement of C{call} (if the policy admitted it)."""
        seconds = self.done(entry, request_id, operation, started, status, error)
        if call is not None:
            call.settle(status, seconds)

    def refused(self, failure, entry, request_id: str, operation: str, started: float):
        """
        An errback: log an L{errors.ApiError} that refused the request before it was sent
        (C{d.addErrback(relay.refused, entry, request_id, operation, started)}).
        """
        if failure.check(errors.ApiError):
            error = failure.value
            self.done(entry, request_id, operation, started, error.status, error.message)
        return failure

    def answer(self, request, d, shape) -> object:
        """
        The fast path's end (no Klein between the request and the relay): answer the
        request with what C{d} fires with, or its failure in C{shape} (an
        L{aibackend.web.ErrorShape}), and cancel C{d} if the client goes away.

        @return: C{NOT_DONE_YET}, for C{render}.
        """
        if isinstance(request, BoundedRequest):
            request.aibackend_answering = d  # cancelled when its connection is lost
        else:
            request.notifyFinish().addErrback(_cancel, d)
        # One callback pair (the answer, or the failure in the shape), not three steps.
        d.addCallbacks(_answered, _refused, callbackArgs=(request,), errbackArgs=(request, shape))
        return NOT_DONE_YET


class _Sent:
    """
    A request L{Relay.send} sent: its outcome, told once (the model's log, the metrics)
    and made the client's answer. C{settling}: L{answered} and L{failed} settle it (no
    shape runs between the model's answer and them), else L{settled} does, first.
    """

    __slots__ = ("relay", "request", "entry", "stats", "context", "started", "settling", "call")

    def __init__(self, relay, request, entry, context, started: float, settling: bool, call=None):
        self.relay = relay
        self.call = call  # the policy's aibackend.policy.Call, or None
        self.request = request
        self.entry = entry
        self.stats = entry.stats
        self.context = context
        self.started = started
        self.settling = settling

    def settled(self, result):
        self.stats.in_flight -= 1
        return result

    def answered(self, answer):
        if self.settling:
            self.stats.in_flight -= 1
        context = self.context
        self.relay._settle(self.call, self.entry, context.request_id, context.operation, self.started,
                           answer.status, None)
        request = self.request
        request.setResponseCode(answer.status)
        headers = answer.headers
        if headers:
            response_headers = request.responseHeaders
            for name, value in headers.items():
                response_headers.setRawHeaders(name, [value])
        return sized(request, answer.body)

    def failed(self, failure):
        if self.settling:
            self.stats.in_flight -= 1
        relay, entry, started, call = self.relay, self.entry, self.started, self.call
        request_id, operation = self.context.request_id, self.context.operation
        if failure.check(errors.ApiError):
            relay._settle(call, entry, request_id, operation, started, failure.value.status, failure.value.message)
        elif failure.check(CancelledError):
            if client_gone(self.request):
                relay._settle(call, entry, request_id, operation, started, CLIENT_CLOSED, "the client went away")
                return failure
            error = abandoned(entry.model_id)
            relay._settle(call, entry, request_id, operation, started, error.status, error.message)
            raise error
        else:
            relay._settle(call, entry, request_id, operation, started, 500, failure.getErrorMessage())
        return failure


# --- fallback chains ----------------------------------------------------------------------

# The header that names the model which answered a request to a model with fallbacks.
SERVED_BY = b"x-aibackend-model"
# The header with which an admin has the models it names fail (a 503, before they are
# called) in a chain: a chain tested without breaking a model (LiteLLM's
# mock_testing_fallbacks). Read for a model with fallbacks only.
MOCK_FAILURE = b"x-aibackend-mock-failure"
# Why a request went on to a fallback (the metric's C{reason} label), by the failed
# attempt's status; any other 5xx is an C{error}.
FALLBACK_REASONS = {429: "rate_limited", 502: "bad_gateway", 503: "unavailable", 504: "timeout"}
ALL_FALLBACK_REASONS = ("rate_limited", "bad_gateway", "unavailable", "timeout", "error", "mock_failure")


def falls_back(status: int) -> bool:
    """
    Does an attempt that failed with C{status} go on to the next model of its chain? A
    429 and every 5xx (the model's own answers with them too: not ready, unreachable,
    reset, too slow, broken); never another 4xx: the request itself is wrong, and every
    model would say so.
    """
    return status == 429 or 500 <= status < 600


class MockFailure(errors.ModelUnavailable):
    """The failure an admin asked for (L{MOCK_FAILURE}): the model was not called."""

    def __init__(self, model_id: str):
        super().__init__(f"model {model_id!r} failed on purpose: the request asked for it "
                         f"({MOCK_FAILURE.decode()})", model=model_id)


def mocked_failures(request, guard) -> frozenset:
    """
    The model ids a request's L{MOCK_FAILURE} header names (comma-separated; the header
    may come more than once), or an empty set.

    @raise errors.Unauthorized, errors.Forbidden: it names some, and the request may not
        do admin operations (C{guard}'s L{aibackend.auth.Guard.check_admin}).
    """
    values = request.requestHeaders.getRawHeaders(MOCK_FAILURE)
    if not values:
        return frozenset()
    if guard is None:
        raise errors.Forbidden(f"{MOCK_FAILURE.decode()} takes admin rights, and nothing here can grant them")
    guard.check_admin(request)
    return frozenset(name.strip() for value in values for name in value.decode("latin-1").split(",") if name.strip())


class Chain:
    """
    One request to a model with C{fallbacks}: sent to it and, while an attempt fails
    before its client was given a byte in a way another model may not (L{falls_back}),
    to the next model of the list that exists when it is its turn, may take the request
    (C{retarget}; a stream: a model that streams) and is admitted by the policy. Only the
    first model's list is followed (a fallback's own fallbacks are not: no loops, and
    a chain is what its model's spec says).

    All attempts share one deadline: the first model's C{timeout}, from when the
    request came. Each model bounds its own attempt with its own timeout too; the
    relay's one timer, set when a second attempt starts, cancels a plain attempt still
    running at the deadline (a 504); a stream's later attempt has its
    C{first_chunk_timeout} cut to what is left. A model's answer or failure that is not
    sent on is answered as it would be without fallbacks.

    The policy (L{aibackend.policy.Policy.admit_attempt}) counts the client's request
    once against its key's limits and each attempt against its own model's: the key's
    limits are taken with the first attempt admitted and held until the chain has ended
    (its place, its tokens settled with what the model that served used); each attempt's
    model is admitted, and settled when the attempt ends, by its own limits (its tokens
    reserved, whether or not the first model counts any). A model refused by its own
    limit is an attempt that failed with that 429 before it was sent: the chain goes on
    (a step with reason C{rate_limited}), and only a refusal the client is answered with
    is counted as one (C{aibackend_limited_total}). A refusal by the key's limits, or the
    first model's refusal by its key (403), is the client's: answered at once. With an
    asynchronous limiter (a fleet's, in Redis), each admission is waited for, as each
    fallback's request made in a thread by its C{retarget} (a large body) is.

    Each attempt is its model's: in flight, logged in its log and counted in its
    metrics, as any request. Each step is counted in the failed model's C{fallbacks}
    (the C{aibackend_fallbacks_total} metric) and logged. The answer's L{SERVED_BY}
    header names the model that gave it; the access event has the attempts (L{tried},
    C{"id:status"}) and the model that served (L{served}).

    @ivar result: the Deferred the front door is given: the answer's body (a stream:
        None once it has ended), or its failure. Cancelling it (the client went away)
        cancels the attempt (or the admission, or the request's making) under way, and
        no other starts.
    """

    log = Logger()

    __slots__ = (
        "relay", "request", "head", "started", "tokens", "retarget", "deadline", "waiting", "tried", "served",
        "current", "timer", "timed_out", "cancelled", "result", "mocked", "body", "context", "shaping", "shape",
        "streaming", "keyed", "key", "left",
    )

    def __init__(self, relay, request, entry, started: float, tokens, retarget):
        self.relay = relay
        self.request = request
        self.head = entry
        self.started = started
        self.tokens = tokens
        self.retarget = retarget
        self.deadline = started + entry.spec.timeout
        self.waiting = list(entry.spec.fallbacks)
        self.tried: list[str] = []
        self.served = None
        self.current = None  # the attempt's Deferred (or its admission's, or its request's making), while it runs
        self.timer = None
        self.timed_out = self.cancelled = self.streaming = False
        self.body = self.context = self.shaping = self.shape = None
        self.keyed = False  # the key's limits have admitted the request (with its first attempt admitted)
        self.key = None  # (the policy, what the key's limits hold) until the chain has ended
        self.left = None  # the attempt that failed and goes on: (its entry, status, failure, on_step, on_end)
        self.mocked = mocked_failures(request, relay.guard)
        self.result = Deferred(self._cancel)

    # --- plain answers ---------------------------------------------------------------

    def send(self, body: bytes, context, shape) -> Deferred:
        """Send the request to the first model (L{Relay.send}'s arguments): the answer's Deferred."""
        self.body, self.context, self.shaping = body, context, shape
        self._begin()
        return self.result

    def _send(self, entry, body: bytes, context, shape, call, started: float) -> None:
        self._serving(entry)
        entry.stats.in_flight += 1
        model_id = entry.model_id
        if model_id in self.mocked:
            d = fail(MockFailure(model_id))
        else:
            d = maybeDeferred(entry.model.send, body, context)
        sent = _Sent(self.relay, self.request, entry, context, started, shape is None, call)
        self.current = d
        d.addBoth(self._sent, sent, shape)

    def _sent(self, result, sent, shape) -> None:
        self.current = None
        entry = sent.entry
        if isinstance(result, Failure):
            result = self._failure(result, entry)
            status = result.value.status if result.check(errors.ApiError) else None
        else:
            status = result.status
        if status is not None and falls_back(status):
            call = sent.call
            if call is not None:
                # Its places (its model's max_concurrent, its tokens) are free before the next
                # attempt is admitted; the model's log and metrics are told once (below).
                call.settle(status, self.relay.clock.seconds() - sent.started)

            def on_step():  # the next attempt begins: this one is logged and counted as it ended
                sent.stats.in_flight -= 1
                context = sent.context
                error = result.value.message if isinstance(result, Failure) else None
                self.relay._settle(call, entry, context.request_id, context.operation, sent.started, status, error)

            self._fell(entry, status, result, on_step, lambda: self._answer(result, sent, shape, status))
            return None
        self._answer(result, sent, shape, status)
        return None

    def _answer(self, result, sent, shape, status) -> None:
        """The attempt of C{sent} is the request's answer (or its failure)."""
        self._end(sent.entry, status)
        d = fail(result) if isinstance(result, Failure) else succeed(result)
        if shape is None:
            d.addCallbacks(sent.answered, sent.failed)
        else:
            d.addBoth(sent.settled)
            d.addCallback(shape)
            d.addCallbacks(sent.answered, sent.failed)
        d.addBoth(self._give)

    def _failure(self, failure, entry):
        """A failed attempt's failure, a cancelled one's made what it means (a client gone: left as it is)."""
        if failure.check(CancelledError) and not self.cancelled and not client_gone(self.request):
            if self.timed_out:
                head = self.head
                return Failure(errors.GatewayTimeout(
                    f"no answer within {head.spec.timeout:g} s (the timeout of model {head.model_id!r}, shared by "
                    f"its fallbacks); model {entry.model_id!r} was the last tried", model=entry.model_id,
                ))
            return Failure(abandoned(entry.model_id))
        return failure

    # --- streams ----------------------------------------------------------------------

    def stream(self, body: bytes, context, framing, shape) -> Deferred:
        """Have the first model stream the request (L{Relay.stream}'s arguments): the stream's Deferred."""
        self.streaming = True
        self.body, self.context, self.shaping, self.shape = body, context, framing, shape
        self._begin()
        return self.result

    def _stream(self, entry, body: bytes, context, framing, call, started: float) -> None:
        relay, request = self.relay, self.request
        stats = entry.stats
        stats.in_flight += 1
        stats.stream_began()
        writer = StreamWriter(request, framing, relay.clock, spec=entry.spec, stats=stats, started=started)
        if entry is not self.head:
            left = self.deadline - started
            limit = writer.first_chunk_timeout
            writer.first_chunk_timeout = left if limit is None or left < limit else limit
        request.aibackend_stream = writer  # the access event's stream fields: the last attempt's
        self._serving(entry)
        writer.begin()
        model_id = entry.model_id
        if model_id in self.mocked:
            d = fail(MockFailure(model_id))
        else:
            d = maybeDeferred(entry.model.stream, body, context, writer)
        if not d.called:
            writer.watch(d)
        writer.relay, writer.entry, writer.context, writer.shape, writer.call = relay, entry, context, self.shape, call
        self.current = d
        d.addCallbacks(self._streamed, self._stream_failed, callbackArgs=(writer,), errbackArgs=(writer,))

    def _streamed(self, output, writer) -> None:
        self.current = None
        self._end(writer.entry, 200)
        self._tell(writer.ended, output)

    def _stream_failed(self, failure, writer) -> None:
        self.current = None
        entry = writer.entry
        if writer.started or self.cancelled or writer.gone():
            self._end(entry, failure.value.status if failure.check(errors.ApiError) else None)
            self._tell(writer.failed, failure)
            return None
        try:
            outcome = writer.failed(failure)  # logged and counted; before the first byte, the error raised
        except errors.ApiError as error:
            failed = Failure()
            status = error.status
            if falls_back(status):
                self._fell(entry, status, failed, _nothing, lambda: self._last(entry, status, failed))
                return None
            self._last(entry, status, failed)
            return None
        except BaseException:
            self._last(entry, None, Failure())
            return None
        self._last(entry, None, outcome)
        return None

    def _last(self, entry, status, outcome) -> None:
        """The attempt of C{entry} (its C{status}) ended the request with C{outcome}."""
        self._end(entry, status)
        self._give(outcome)

    def _tell(self, outcome, value) -> None:
        """The result is what C{outcome(value)} (one of the writer's) returns or raises."""
        try:
            told = outcome(value)
        except BaseException:
            told = Failure()
        self._give(told)

    # --- the chain's steps --------------------------------------------------------------

    def _begin(self) -> None:
        """
        The first model's attempt. Its refusal by the policy is raised, as for a model
        without fallbacks (a key that may not call it, the key's limit), unless it is its
        own limit's (it is skipped, as a fallback refused by its limit is).
        """
        head = self.head
        policy = self.relay.policy
        try:
            admitted = self._admit(policy, head)
        except LimitReached as error:
            if error.scope != "model":
                self._count(policy, head, Failure())
                raise
            admitted = Failure()
        self.request.aibackend_chain = self
        self._admitted(admitted, policy, head, self.body, self.context, self.shaping)

    def _admit(self, policy, entry):
        """
        The policy's admission of an attempt to C{entry}'s model (by the key's limits too
        if none has admitted the request yet): C{(key's hold, Call)} or a Deferred of it.
        """
        if policy is None:
            return None, None
        return policy.admit_attempt(self.request, entry, self.tokens, not self.keyed)

    def _try(self, entry, body: bytes, context, shaping) -> None:
        """Admit an attempt to C{entry}'s model (its request made), then start it once admitted."""
        policy = self.relay.policy
        try:
            admitted = self._admit(policy, entry)
        except BaseException:
            admitted = Failure()
        if admitted.__class__ is Deferred:
            self.current = admitted
            admitted.addBoth(self._admitted, policy, entry, body, context, shaping)
            return
        self._admitted(admitted, policy, entry, body, context, shaping)

    def _admitted(self, outcome, policy, entry, body: bytes, context, shaping) -> None:
        """The policy's answer to an attempt (a Deferred's result): the attempt starts, is skipped, or ends the chain."""
        if outcome.__class__ is Deferred:  # (the first model's, from _begin)
            self.current = outcome
            outcome.addBoth(self._admitted, policy, entry, body, context, shaping)
            return None
        self.current = None
        if isinstance(outcome, Failure):
            if self.cancelled or self.timed_out or outcome.check(CancelledError):
                self._no_more(outcome)
            elif outcome.check(LimitReached) and outcome.value.scope == "model":
                # Refused by its own limit: an attempt that failed with that 429 before it was sent.
                self._went_on(entry)
                self._serving(entry)
                self._fell(entry, outcome.value.status, outcome, _nothing,
                           lambda: self._refuse(policy, entry, outcome))
            elif outcome.check(LimitReached) or (self.left is None and outcome.check(errors.ApiError)):
                self._refuse(policy, entry, outcome)  # the key's limit, or the first model's refusal: the client's
            elif outcome.check(errors.ApiError):
                self._skip(entry, outcome.value.message)
                self._look()
            else:
                if self.left is not None:
                    self.log.failure("admitting fallback {fallback} of model {model}", outcome,
                                     fallback=entry.model_id, model=self.head.model_id)
                self._no_more(outcome)
            return None
        key, call = outcome
        if not self.keyed:
            self.keyed = True
            self.key = (policy, key) if key is not None else None
        if self._went_on(entry):
            if not self.streaming:  # (a stream's later attempt has its first_chunk_timeout cut instead)
                self._arm()
            started = self.relay.clock.seconds()
        else:
            started = self.started
        if self.streaming:
            self._stream(entry, body, context, shaping, call, started)
        else:
            self._send(entry, body, context, shaping, call, started)
        return None

    def _went_on(self, entry) -> bool:
        """
        The request goes on to C{entry}'s model (it is admitted, or refused by its own
        limit): the attempt that failed before it, if any, is told and counted as a step.
        """
        left = self.left
        if left is None:
            return False
        self.left = None
        failed, status, failure, on_step, _ = left
        on_step()
        self._step(failed, entry, status, failure)
        return True

    def _fell(self, entry, status: int, failure, on_step, on_end) -> None:
        """
        The attempt of C{entry} failed with C{status} (C{failure}: its failure, or its
        model's answer): the next model is looked for. C{on_step()} when its attempt
        begins, C{on_end()} (this one is the answer) when there is none.
        """
        self.left = (entry, status, failure, on_step, on_end)
        self._look()

    def _look(self) -> None:
        """
        The next model of the list that may take the request, its request made for it
        (C{retarget}, maybe in a thread), then admitted (L{_try}); or, with no time left,
        no model left, or the client gone, the failed attempt is the answer. A model that
        is not registered or cannot take the request is skipped, and the skip logged.
        """
        if self.cancelled or client_gone(self.request) or self.relay.clock.seconds() + _EPSILON >= self.deadline:
            self._no_more(None)
            return
        registry, waiting = self.relay.registry, self.waiting
        while waiting:
            model_id = waiting.pop(0)
            if registry is None or model_id not in registry:
                self._skip(model_id, "there is no such model now")
                continue
            entry = registry.entry(model_id)
            if self.streaming and not IStreaming.providedBy(entry.model):
                self._skip(entry, f"model {model_id!r} cannot stream")
                continue
            if self.retarget is None:
                self._try(entry, self.body, self.context, self.shaping)
                return
            try:
                made = self.retarget(entry)
            except errors.ApiError as error:
                self._skip(entry, error.message)
                continue
            if made.__class__ is Deferred:  # made in a thread (a large body)
                self.current = made
                made.addBoth(self._made, entry)
                return
            self._try(entry, *made)
            return
        self._no_more(None)

    def _made(self, made, entry) -> None:
        """A fallback's request, made in a thread (C{retarget}'s Deferred): admitted, or the model skipped."""
        self.current = None
        if isinstance(made, Failure):
            if self.cancelled or self.timed_out or made.check(CancelledError):
                self._no_more(None)
                return
            if made.check(errors.ApiError):
                self._skip(entry, made.value.message)
            else:
                self.log.failure("making the request of fallback {fallback} of model {model}", made,
                                 fallback=entry.model_id, model=self.head.model_id)
            self._look()
            return
        self._try(entry, *made)

    def _no_more(self, failure) -> None:
        """No other attempt: the failed one is the answer (none: C{failure}, a cancel's or a bug's, is)."""
        left = self.left
        if left is None:
            self._give(failure if failure is not None else Failure(CancelledError()))
            return
        self.left = None
        left[4]()

    def _refuse(self, policy, entry, failure) -> None:
        """The request is refused with C{failure} (the policy's, for C{entry}'s model): counted as a refusal."""
        self._count(policy, entry, failure)
        self._serving(entry)
        self._last(entry, failure.value.status, failure)

    def _count(self, policy, entry, failure) -> None:
        """A limit's refusal the client is answered with is counted (an L{IChainLimiter} counted none)."""
        if failure.check(LimitReached) and IChainLimiter.providedBy(policy.limiter):
            error = failure.value
            self.relay.metrics.limited(entry, error.scope, error.limit)

    def _skip(self, entry, why: str) -> None:
        model_id = entry if isinstance(entry, str) else entry.model_id
        self.log.warn("fallback {fallback} of model {model} is skipped: {why} (request {request_id})",
                      fallback=model_id, model=self.head.model_id, why=why, request_id=self.context.request_id)

    def _serving(self, entry) -> None:
        """The answer (its headers go with its first byte) names the model of this attempt."""
        self.request.responseHeaders.setRawHeaders(SERVED_BY, [entry.model_id.encode("ascii")])

    def _step(self, entry, following, status: int, failure) -> None:
        """The attempt of C{entry} failed with C{status}: the request goes on to C{following}'s model."""
        if isinstance(failure, Failure) and failure.check(MockFailure):
            reason = "mock_failure"
        else:
            reason = FALLBACK_REASONS.get(status, "error")
        self.tried.append(f"{entry.model_id}:{status}")
        entry.stats.fallbacks[(following.model_id, reason)] += 1
        self.log.info("model {model} failed ({status}, {reason}): request {request_id} goes to its fallback "
                      "{fallback}", model=entry.model_id, status=status, reason=reason, fallback=following.model_id,
                      request_id=self.context.request_id)

    def _end(self, entry, status) -> None:
        """The attempt of C{entry} is the request's answer (C{status}: its model's, None if it had none)."""
        self.served = entry.model_id
        self.tried.append(f"{entry.model_id}:{CLIENT_CLOSED if client_gone(self.request) else status}")
        self._disarm()

    def _give(self, result):
        """
        The chain's outcome, given to the front door (once: a late one, after a cancel, is
        dropped); what the key's limits held is given back, settled with the tokens of the
        model that served.
        """
        key = self.key
        if key is not None:
            self.key = None
            policy, held = key
            policy.release(held, self.tokens)
        if self.result.called:
            if isinstance(result, Failure) and not result.check(CancelledError, errors.ApiError):
                self.log.failure("a fallback chain's answer after it was cancelled", result)
            return None
        if isinstance(result, Failure):
            self.result.errback(result)
        else:
            self.result.callback(result)
        return None

    # --- the deadline, and a client that leaves --------------------------------------

    def _arm(self) -> None:
        """A later attempt begins: the relay bounds it by what is left of the deadline (one timer a chain)."""
        if self.timer is None:
            self.timer = self.relay.clock.callLater(max(self.deadline - self.relay.clock.seconds(), 0.0), self._expire)

    def _expire(self) -> None:
        self.timer = None
        self.timed_out = True
        current = self.current
        if current is not None:
            current.cancel()

    def _disarm(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            if timer.active():
                timer.cancel()

    def _cancel(self, _) -> None:
        """The front door cancelled the request (its client went away): the attempt under way is cancelled."""
        self.cancelled = True
        self._disarm()
        current = self.current
        if current is not None:
            current.cancel()


def _nothing() -> None:
    pass


def abandoned(model_id: str) -> errors.ModelUnavailable:
    """What a request cancelled while its client was still there is: its model is stopping or gone."""
    return errors.ModelUnavailable(
        f"model {model_id!r} abandoned the request (it is stopping or was removed)", model=model_id
    )


class SlowReader(errors.ApiError):
    """
    A stream's client read slower than its model wrote, and more than the model's
    C{max_stream_buffer_bytes} waited unsent: the stream was cut (its error event's type).
    """

    status = 408
    type = "slow_client"


# The SSE comment a stream gets while it waits (a line a client's EventSource ignores).
SSE_KEEPALIVE = b": keepalive\n\n"
# A deadline this close is reached (the clock's float arithmetic).
_EPSILON = 1e-9


class Framing:
    """
    How a streamed answer is written: its content type, and the bytes of a chunk, of the
    end and of an error (and of a keepalive, L{keepalive}). A chunk's JSON goes as the
    model gave it, its line breaks (JSON whitespace only: a string's are escaped) made
    spaces, so that it stays one line.
    """

    def __init__(self, name: str, content_type: bytes, chunk, end, error):
        self.name = name
        self.content_type = content_type
        self._chunk, self._end, self._error = chunk, end, error

    def chunk(self, data: bytes) -> bytes:
        if b"\n" in data or b"\r" in data:
            data = data.replace(b"\r", b" ").replace(b"\n", b" ")
        return self._chunk[0] + data + self._chunk[1]

    def end(self, output: bytes | None) -> bytes:
        if output is None:
            output = b"null"
        elif b"\n" in output or b"\r" in output:
            output = output.replace(b"\r", b" ").replace(b"\n", b" ")
        return self._end[0] + output + self._end[1]

    def error(self, document: dict) -> bytes:
        return self._error[0] + json.dumps(document).encode() + self._error[1]

    def keepalive(self) -> bytes | None:
        """
        What is written while a stream has written nothing for C{keepalive_seconds}, or
        None for nothing: an SSE comment for Server-Sent Events (any framing of type
        C{text/event-stream}); nothing in other formats, where every line is an event.
        """
        media = self.content_type.split(b";", 1)[0].strip().lower()  # without its charset
        return SSE_KEEPALIVE if media == b"text/event-stream" else None


SSE = Framing("sse", b"text/event-stream", (b"data: ", b"\n\n"),
              (b'event: done\ndata: {"output": ', b"}\n\n"), (b"event: error\ndata: ", b"\n\n"))
NDJSON = Framing("ndjson", b"application/x-ndjson", (b'{"chunk": ', b"}\n"),
                 (b'{"done": true, "output": ', b"}\n"), (b"", b"\n"))


@implementer(IChunks)
class StreamWriter:
    """
    The relay's end of one stream (L{IChunks}): writes each chunk to the request in the
    turn it is given (the status and headers with the first byte), passes the
    connection's flow control to the model's producer, keeps the stream's deadlines and
    keepalives, and finishes the request with the end or an error event.

    Its own producer (L{_ClientEnd}) is the request's for the whole stream, so that it
    knows when the client's connection is full whatever the model registers: bytes
    written while it is are counted, and past the spec's C{max_stream_buffer_bytes} the
    stream is cut (L{cut}: a L{SlowReader}). Its deadlines and keepalive share one
    DelayedCall, moved lazily: a chunk only notes its time, and the call, when it
    fires, looks at what came since and sets itself again (a stream costs one timer,
    however fast its chunks).

    @param clock: the relay's clock (without one, no deadline, no keepalive).
    @param spec: the model's spec (L{aibackend.configbase.ModelSpec}): its stream settings.
    @param stats: the model's L{aibackend.metrics.ModelStats} (chunks, time to the first).
    @param started: when the request came (the clock's seconds).

    @ivar started: whether the first byte has gone (the status is then 200).
    @ivar chunks: chunks written.
    @ivar cut: the L{errors.ApiError} the relay ended the stream with (a deadline, a
        slow reader), or None.
    @ivar stream_end: how the stream ended (L{aibackend.metrics.STREAM_ENDS}), once it has.
    """

    __slots__ = (
        "request", "framing", "clock", "stats", "began", "started", "producer", "chunks", "first_chunk_at",
        "last_chunk_at", "last_write_at", "cut", "stream_end", "paused", "waiting", "timer", "deferred",
        "client_end", "first_chunk_timeout", "idle_timeout", "keepalive_seconds", "max_buffer", "keepalive_bytes",
        "model_id", "relay", "entry", "context", "shape", "call",
    )

    def __init__(self, request, framing: Framing, clock=None, *, spec=None, stats=None, started: float = 0.0):
        self.request = request
        self.framing = framing
        self.started = False
        self.producer = None
        self.clock = clock
        self.stats = stats
        self.began = started
        self.chunks = 0
        self.first_chunk_at = None
        self.last_chunk_at = started  # the model's last sign: its last chunk
        self.last_write_at = started  # the client's: the last byte written
        self.cut = None
        self.stream_end = None
        self.paused = False  # the client's connection is full
        self.waiting = 0  # bytes written since it is
        self.timer = None
        self.deferred = None
        self.client_end = _ClientEnd(self)
        if spec is None or clock is None:
            self.first_chunk_timeout = self.idle_timeout = None
            self.keepalive_seconds = 0.0
            self.max_buffer = None if spec is None else spec.max_stream_buffer_bytes
        else:
            self.first_chunk_timeout = spec.first_chunk_timeout
            self.idle_timeout = spec.stream_idle_timeout
            self.keepalive_seconds = spec.keepalive_seconds
            self.max_buffer = spec.max_stream_buffer_bytes
        self.keepalive_bytes = framing.keepalive() if self.keepalive_seconds else None
        self.model_id = None if spec is None else spec.id
        # The stream's outcome (Relay.stream): told by ended or failed, once; and the
        # policy's aibackend.policy.Call, settled with it (None: no policy).
        self.relay = self.entry = self.context = self.shape = self.call = None

    @property
    def first_chunk_ms(self) -> float | None:
        """Milliseconds from the request to its first chunk (None: none came)."""
        if self.first_chunk_at is None:
            return None
        return round((self.first_chunk_at - self.began) * 1000, 3)

    def gone(self) -> bool:
        """Has the client gone away?"""
        return client_gone(self.request)

    def _open(self) -> bool:
        request = self.request
        if request.finished or self.gone():
            return False
        if not self.started:
            self.started = True
            request.setResponseCode(200)
            headers = request.responseHeaders
            headers.setRawHeaders(b"content-type", [self.framing.content_type])
            headers.setRawHeaders(b"cache-control", [b"no-cache"])
            headers.setRawHeaders(b"x-accel-buffering", [b"no"])
            headers.removeHeader(b"content-length")
        return True

    # --- IChunks ------------------------------------------------------------------

    def chunk(self, data: bytes) -> None:
        if self.cut is not None or not self._open():
            return
        framed = self.framing.chunk(data)
        if self.paused:
            self.waiting += len(framed)
            if self.max_buffer is not None and self.waiting > self.max_buffer:
                self._cut(SlowReader(
                    f"the client read too slowly: more than {self.max_buffer} bytes of the stream waited to be sent "
                    f"(max_stream_buffer_bytes)", model=self.model_id,
                ))
                return
        self.chunks += 1
        stats = self.stats
        if stats is not None:
            stats.stream_chunks += 1
        if self.first_chunk_at is None:
            clock = self.clock
            now = self.first_chunk_at = clock.seconds() if clock is not None else self.began
            self.last_chunk_at = self.last_write_at = now
            if stats is not None:
                stats.first_chunk(now - self.began)
            if self.deferred is not None:
                # From now on the idle deadline counts, not the first chunk's. A later one is
                # left to the timer's tick (a cancelled DelayedCall stays in the reactor's
                # heap until its time); a sooner one replaces it (moving a DelayedCall
                # sooner searches the reactor's whole heap: O(streams)).
                timer = self.timer
                when = self._next()
                if timer is None or when is None or when < timer.getTime():
                    if timer is not None:
                        self.timer = None
                        timer.cancel()
                    self._schedule(now)
            # The first chunk (the time to first token) goes at once, not with what the
            # rest of this read makes (an upstream's events often come several a read).
            request = self.request
            request.write(framed)
            channel = request.channel
            if channel is not None:
                flush(channel.transport)
            return
        elif self.timer is not None:
            self.last_chunk_at = self.last_write_at = self.clock.seconds()
        self.request.write(framed)

    def registerProducer(self, producer, streaming: bool) -> None:
        request = self.request
        if request.finished or self.gone():
            return
        self.producer = producer
        if self.paused:
            producer.pauseProducing()  # the connection is full already: it will not say so again

    def unregisterProducer(self) -> None:
        self.producer = None

    # --- the stream's ends ------------------------------------------------------------

    def begin(self) -> None:
        """Hear from the client's connection (its flow control) from now on."""
        request = self.request
        if request.producer is None and not request.finished and not self.gone():
            request.registerProducer(self.client_end, True)

    def end(self, output: bytes | None) -> None:
        self._last(self.framing.end(output))

    def fail(self, document: dict) -> None:
        self._last(self.framing.error(document))

    def drop(self) -> None:
        """
        Nothing more is written: the error is answered plainly, or the client is gone
        (then the model's producer, if still registered, is stopped: the connection does
        not stop a request's producer itself).
        """
        producer = self.producer
        if producer is not None and self.gone():
            self.producer = None
            producer.stopProducing()
        self._release()

    def _release(self) -> None:
        """The request's producer is no longer the stream's."""
        self.producer = None
        request = self.request
        if request.producer is self.client_end and request.channel is not None:
            request.unregisterProducer()

    def _last(self, data: bytes) -> None:
        if self._open():
            self._release()
            request = self.request
            request.write(data)
            request.finish()
        else:
            self._release()

    # --- the outcome (Relay.stream's callbacks) ---------------------------------------

    def _settled(self) -> None:
        self.entry.stats.in_flight -= 1
        self.stop_clock()

    def ended(self, output) -> None:
        """The model's stream ended with C{output}: logged, counted, and the end event written."""
        self._settled()
        context = self.context
        # The end event is made first: it may say the stream's usage, which the policy settles with.
        try:
            last = self.framing.end(output)
        except Exception:
            # (a framing's bug: the stream still ends, its outcome told and its Call settled)
            self.relay.log.failure("ending a stream of model {model}", model=self.entry.model_id)
            self.relay._stream_done(self, self.entry, context.request_id, context.operation, self.began, 500,
                                    UNEXPECTED, "error")
            self.fail(self.shape.document(errors.InternalError(UNEXPECTED), context.request_id))
            return
        self.relay._stream_done(self, self.entry, context.request_id, context.operation, self.began, 200, None,
                                "done")
        self._last(last)

    def failed(self, failure):
        """
        The model's stream failed (or was cut, or its client went away): logged and
        counted; before the first byte, the failure goes on to the front door (which
        answers it as a plain request's error); after it, the error event ends the stream.
        """
        self._settled()
        relay, entry, context = self.relay, self.entry, self.context
        request_id, operation, started = context.request_id, context.operation, self.began
        error = self.cut
        if error is not None:
            pass  # the relay ended it: a deadline, or a reader too slow
        elif failure.check(CancelledError):
            if self.gone():
                relay._stream_done(self, entry, request_id, operation, started, CLIENT_CLOSED,
                                   "the client went away", "cancelled")
                self.drop()
                return failure
            error = abandoned(entry.model_id)
        elif failure.check(errors.ApiError):
            error = failure.value
        else:
            relay._stream_done(self, entry, request_id, operation, started, 500, failure.getErrorMessage(), "error")
            if not self.started:
                self.drop()
                return failure  # the front door logs it and answers 500
            relay.log.failure("streaming an answer of model {model}", failure, model=entry.model_id)
            self.fail(self.shape.document(errors.InternalError(UNEXPECTED), request_id))
            return None
        how = "timeout" if error.status == errors.GatewayTimeout.status else "error"
        relay._stream_done(self, entry, request_id, operation, started, error.status, error.message, how)
        if not self.started:
            self.drop()
            raise error
        self.fail(self.shape.document(error, request_id))
        return None

    # --- deadlines and keepalives -----------------------------------------------------

    def watch(self, deferred) -> None:
        """Keep the deadlines and keepalives of the stream whose Deferred (the model's) is C{deferred}."""
        self.deferred = deferred
        if self.clock is not None:
            self._schedule(self.clock.seconds())

    def stop_clock(self) -> None:
        """The stream has ended: no deadline, no keepalive any more."""
        self.deferred = None
        timer = self.timer
        if timer is not None:
            self.timer = None
            if timer.active():
                timer.cancel()

    def _next(self) -> float | None:
        """When the timer must next look: the nearest deadline or keepalive, or None."""
        if self.first_chunk_at is None:
            when = None if self.first_chunk_timeout is None else self.began + self.first_chunk_timeout
        else:
            when = None if self.idle_timeout is None else self.last_chunk_at + self.idle_timeout
        if self.keepalive_bytes is not None:
            due = self.last_write_at + self.keepalive_seconds
            if when is None or due < when:
                when = due
        return when

    def _schedule(self, now: float) -> None:
        when = self._next()
        if when is not None and self.deferred is not None:
            self.timer = self.clock.callLater(max(when - now, 0.0), self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.deferred is None:
            return
        now = self.clock.seconds()
        reached = now + _EPSILON
        if self.first_chunk_at is None:
            if self.first_chunk_timeout is not None and reached >= self.began + self.first_chunk_timeout:
                self._cut(errors.GatewayTimeout(
                    f"model {self.model_id!r} sent no chunk within {self.first_chunk_timeout:g} s "
                    f"(first_chunk_timeout)", model=self.model_id,
                ))
                return
        elif self.paused:
            # The client is slow, not the model: a model held for its reader is not idle.
            self.last_chunk_at = now
        elif self.idle_timeout is not None and reached >= self.last_chunk_at + self.idle_timeout:
            self._cut(errors.GatewayTimeout(
                f"model {self.model_id!r} sent no chunk for {self.idle_timeout:g} s (stream_idle_timeout)",
                model=self.model_id,
            ))
            return
        if self.keepalive_bytes is not None and reached >= self.last_write_at + self.keepalive_seconds:
            self.last_write_at = now
            # A client whose connection is full has bytes to read already.
            if not self.paused and self._open():
                self.request.write(self.keepalive_bytes)
        self._schedule(now)

    def _cut(self, error: errors.ApiError) -> None:
        """End the stream from here: the model's work is cancelled, and the client told C{error}."""
        deferred = self.deferred
        if self.cut is not None or deferred is None:
            return
        self.cut = error
        deferred.cancel()


@implementer(IPushProducer)
class _ClientEnd:
    """
    A stream's producer as the connection sees it, for the whole stream: pausing and
    resuming are noted by the writer (its buffer bound) and passed on to the model's
    producer, if it has one. Stopping is the connection being lost: a TCP connection
    stops its producer before the request hears that it is gone, so the request is
    marked gone here first (the cancel that follows is then a client that left, 499,
    not a model that abandoned the request, 503), and the producer is unregistered while
    the request still has its channel.
    """

    __slots__ = ("writer",)

    def __init__(self, writer: StreamWriter):
        self.writer = writer

    def pauseProducing(self) -> None:
        writer = self.writer
        writer.paused = True
        if writer.producer is not None:
            writer.producer.pauseProducing()

    def resumeProducing(self) -> None:
        writer = self.writer
        writer.paused = False
        writer.waiting = 0
        if writer.timer is not None:
            writer.last_chunk_at = writer.clock.seconds()  # the model's idle time counts from now
        if writer.producer is not None:
            writer.producer.resumeProducing()

    def stopProducing(self) -> None:
        writer = self.writer
        writer.request.aibackend_gone = True
        producer = writer.producer
        writer._release()
        if producer is not None:
            producer.stopProducing()


def _cancel(_, d) -> None:
    d.cancel()


def _itself(result):
    return result


def _answered(body, request) -> None:
    try:
        _write(body, request)
    except Exception:
        Relay.log.failure("writing an answer")


def _refused(failure, request, shape) -> None:
    try:
        _write(shape.failure(request, failure), request)
    except Exception:
        Relay.log.failure("writing an answer")


def _write(body, request):
    if request.finished or client_gone(request):
        return
    if body:
        request.write(body)
    request.finish()
