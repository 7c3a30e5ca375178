"""
Dynamic batching: requests to one model gathered into batches, each sent in one call
(L{aibackend.interfaces.IBatching}), without losing any request's rights.

A L{Batcher} stands in front of a batching model's C{send}. Requests wait in the batch
being formed; it leaves (L{REASONS}):

  - C{full}: at once, when it holds C{max_batch_size} requests;
  - C{preferred}: when it reaches one of C{preferred_sizes} and nothing else is waiting:
    at the end of the reactor's turn (requests read in the same turn join it first; if
    they take it past the size, the largest preferred size leaves and the rest wait on);
  - C{delay}: when its first request has waited C{max_delay_ms} (C{0}: at the end of the
    turn it came in, with whatever came in that turn);
  - C{deadline}: a request never waits for company more than half its C{timeout}, which
    also counts the time it waited (a C{max_delay_ms} past half the timeout is cut there).

Each request keeps its rights. It is shed (503) when the requests waiting in the batcher
and in the model's queue are at C{max_queue} (L{IBatching.admit}); a client that leaves is
taken out of the forming batch (its Deferred's canceller), or, once its batch has left,
its request alone is abandoned at the model; its deadline keeps running from its arrival
(L{aibackend.interfaces.BatchItem.deadline}). A forming batch has one DelayedCall at most,
moved (not made again) as the batch changes, and cancelled when it leaves or empties.

Streamed requests are never batched: they go to the model's C{stream} as before.

What the batching models share is here too: L{BatchingModel} (the batcher in front of a
model, its idleness and status), L{OneCall} (requests answered by one call of the model:
an HTTP model's batch, each request with its own deadline and cancellation), and the
Open Inference Protocol's batch dimension: requests with a L{TensorBatch}
(L{aibackend.interfaces.RowsContext}) wait in a batcher of their key, whose batches
become one call of all their rows (L{RowBatches}).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from functools import partial

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from aibackend.errors import ApiError, BadGateway, GatewayTimeout
from aibackend.interfaces import BatchItem, ModelAnswer, RequestContext, RowsContext
from aibackend.jsonread import NotClientJSON, model_json
from aibackend.tensors import TensorError, concat_rows, split_rows

FULL = "full"
PREFERRED = "preferred"
DELAY = "delay"
DEADLINE = "deadline"
# Why a batch left the batcher (the metric's C{reason} label).
REASONS = (FULL, PREFERRED, DELAY, DEADLINE)

# Batch sizes, and seconds waited to be batched: the bounds of their histograms.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# How many of the latest batches the recent mean size is taken over.
RECENT_BATCHES = 100


class BatchStats:
    """
    A batching model's figures: the sizes of the batches sent to it, how long requests
    waited to be batched, why each batch left, and the mean size of the latest batches.

    Batches that wait for a free process are sent together when one frees (up to
    C{max_batch_size}), so the sizes are those of the batches as sent.
    """

    __slots__ = ("sizes", "size_sum", "waits", "wait_sum", "reasons", "recent", "recent_sum")

    def __init__(self):
        self.sizes = [0] * (len(SIZE_BUCKETS) + 1)  # counts per bucket, +Inf last
        self.size_sum = 0
        self.waits = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.reasons = dict.fromkeys(REASONS, 0)
        self.recent: deque = deque(maxlen=RECENT_BATCHES)
        self.recent_sum = 0

    @property
    def batches(self) -> int:
        """How many batches were sent."""
        return sum(self.sizes)

    def left(self, reason: str, waited) -> None:
        """A batch left the batcher for C{reason}; C{waited}: each of its requests' seconds of waiting."""
        self.reasons[reason] += 1
        waits = self.waits
        for seconds in waited:
            waits[bisect_left(WAIT_BUCKETS, seconds)] += 1
            self.wait_sum += seconds

    def sent(self, size: int) -> None:
        """A batch of C{size} requests was sent to the model."""
        self.sizes[bisect_left(SIZE_BUCKETS, size)] += 1
        self.size_sum += size
        recent = self.recent
        if len(recent) == recent.maxlen:
            self.recent_sum -= recent[0]
        recent.append(size)
        self.recent_sum += size

    def recent_mean(self) -> float | None:
        """The mean size of the latest L{RECENT_BATCHES} batches (None before the first)."""
        return round(self.recent_sum / len(self.recent), 3) if self.recent else None

    def describe(self) -> dict:
        return {"batches": self.batches, "recent_mean_batch_size": self.recent_mean(),
                "left": dict(self.reasons)}


class Waiting:
    """A request waiting in a forming batch (then, once it left, its Deferred at the model)."""

    __slots__ = ("batcher", "body", "context", "arrived", "deferred", "sent")

    def __init__(self, batcher, body: bytes, context, arrived: float):
        self.batcher = batcher
        self.body = body
        self.context = context
        self.arrived = arrived
        self.deferred = None
        self.sent = None  # the model's Deferred for it, once its batch left

    def cancel(self, deferred) -> None:
        """Its Deferred's canceller: the client went away."""
        self.batcher._cancelled(self)


class Batcher:
    """
    The batches of one model (L{IBatching}): C{send} as a model's, each request waiting
    in the forming batch until it leaves.

    @param model: the L{aibackend.interfaces.IBatching} model.
    @param spec: its L{aibackend.configbase.BatchingSpec}.
    @param clock: an L{twisted.internet.interfaces.IReactorTime}.
    @param timeout: the model's C{timeout} (seconds a request may take, its wait included).
    @ivar forming: the requests of the batch being formed (L{Waiting}), first come first.
    @ivar stats: its L{BatchStats}.
    """

    def __init__(self, model, spec, clock, timeout: float, *, stats=None, on_empty=None):
        self.model = model
        self.clock = clock
        self.timeout = timeout
        self.max_size = spec.max_batch_size
        self.preferred = frozenset(spec.preferred_sizes)
        self.preferred_sizes = tuple(sorted(spec.preferred_sizes, reverse=True))
        delay = spec.max_delay_ms / 1000
        # A request never waits for company more than half its time.
        if delay <= timeout / 2:
            self.wait_bound, self.bound_reason = delay, DELAY
        else:
            self.wait_bound, self.bound_reason = timeout / 2, DEADLINE
        self.forming: list[Waiting] = []
        self.timer = None
        self.timer_reason = None
        self.stats = BatchStats() if stats is None else stats
        self.empty_waiters: list[Deferred] = []
        self.on_empty = on_empty  # called with the batcher when no request waits in it any more

    @property
    def waiting(self) -> int:
        return len(self.forming)

    def send(self, body: bytes, context) -> Deferred:
        """A request: it waits in the forming batch (or is refused at once: L{IBatching.admit})."""
        forming = self.forming
        self.model.admit(len(forming))
        waiting = Waiting(self, body, context, self.clock.seconds())
        d = waiting.deferred = Deferred(waiting.cancel)
        forming.append(waiting)
        count = len(forming)
        if count >= self.max_size:
            self._leave(FULL, count)
        elif count in self.preferred:
            self._set_timer(0, PREFERRED)
        elif count == 1:
            self._set_timer(self.wait_bound, self.bound_reason)
        return d

    def when_empty(self) -> Deferred:
        """A Deferred that fires once no request waits to be batched (at once if none does)."""
        if not self.forming:
            return succeed(None)
        waiters = self.empty_waiters
        d: Deferred = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(d)
        return d

    def _emptied(self) -> None:
        """If no request waits now, those waiting for that hear of it."""
        if self.forming:
            return
        if self.on_empty is not None:
            self.on_empty(self)
        if self.empty_waiters:
            waiters, self.empty_waiters = self.empty_waiters, []
            for d in waiters:
                d.callback(None)

    def fail_waiting(self, error) -> None:
        """Fail every request waiting (the model is stopping)."""
        forming, self.forming = self.forming, []
        self._stop_timer()
        for waiting in forming:
            waiting.deferred.errback(error)
        self._emptied()

    # --- the timer --------------------------------------------------------------------

    def _set_timer(self, delay: float, reason: str) -> None:
        self.timer_reason = reason
        timer = self.timer
        if timer is not None and timer.active():
            if self.clock.seconds() + delay >= timer.getTime():
                timer.reset(delay)  # later: the reactor only notes it
                return
            # Sooner: a reactor moves a call sooner by searching all its calls (every
            # request in flight has its timeout's); a new one is a push, the old one dropped.
            timer.cancel()
        self.timer = self.clock.callLater(delay, self._fire)

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _reschedule(self) -> None:
        """The forming batch changed (some left, or a request was cancelled): when does it leave now?"""
        forming = self.forming
        if not forming:
            self._stop_timer()
        elif len(forming) in self.preferred:
            self._set_timer(0, PREFERRED)
        else:
            left = forming[0].arrived + self.wait_bound - self.clock.seconds()
            self._set_timer(max(left, 0), self.bound_reason)

    def _fire(self) -> None:
        self.timer = None
        reason = self.timer_reason
        count = len(self.forming)
        if reason == PREFERRED:
            size = next((size for size in self.preferred_sizes if size <= count), None)
            if size is None:  # requests left since: it waits on for its delay
                self._reschedule()
                return
            self._leave(PREFERRED, size)
        else:
            self._leave(reason, count)

    # --- leaving ----------------------------------------------------------------------

    def _leave(self, reason: str, size: int) -> None:
        forming = self.forming
        if size >= len(forming):
            batch, self.forming = forming, []
            self._stop_timer()
        else:
            batch, self.forming = forming[:size], forming[size:]
            self._reschedule()
        now = self.clock.seconds()
        self.stats.left(reason, [now - waiting.arrived for waiting in batch])
        timeout = self.timeout
        items = [BatchItem(waiting.body, waiting.context, waiting.arrived + timeout) for waiting in batch]
        try:
            answers = self.model.send_batch(items)
        except Exception:
            answers = [fail() for _ in batch]
        for waiting, answer in zip(batch, answers):
            waiting.sent = answer
            answer.chainDeferred(waiting.deferred)
        self._emptied()  # once the batch is the model's: it is in its queue or in flight

    def _cancelled(self, waiting: Waiting) -> None:
        if waiting.sent is not None:
            waiting.sent.cancel()  # the model abandons it; the chain fails this one too
            return
        forming = self.forming
        if waiting in forming:
            forming.remove(waiting)
            self._reschedule()
            self._emptied()


@dataclass(frozen=True, slots=True)
class TensorBatch:
    """
    A request that is concatenated with others along its batch dimension (the Open
    Inference Protocol's, L{aibackend.v2}: L{RowsContext}C{.batch}): requests of one key
    only share a batch, and the model gets one body of all their rows
    (L{aibackend.tensors.concat_rows}), whose answer is split back (L{RowBatches}).

    @ivar key: what the requests of one batch share: their inputs' names, datatypes and
        dimensions past the first, and their parameters.
    @ivar rows: the request's size along the batch dimension.
    """

    key: tuple
    rows: int


class OneCall:
    """
    Requests answered by one call of the model (an HTTP model's batch, or requests
    concatenated along their batch dimension): each request's Deferred (L{deferreds}, in
    order), a timer at its deadline (when the call's own comes later), and the call
    (L{exchange}), whose outcome L{settle} shares out (C{split}: a 2xx L{ModelAnswer} to
    one answer per request, or an L{aibackend.errors.ApiError} for each).

    A request cancelled (its client left) or timed out fails alone; the call is abandoned
    only once every request of it is gone.

    @param model: the model (its C{model_id}, C{spec.timeout}, C{failures}).
    @param until: when the call itself times out (the clock's seconds): requests whose
        deadline comes before it get a timer of their own.
    """

    __slots__ = ("model", "deferreds", "live", "timers", "open", "exchange", "split")

    def __init__(self, model, items: list, clock, until: float, split):
        self.model = model
        self.split = split
        self.open = len(items)
        self.live = [True] * len(items)  # not cancelled, not timed out
        self.exchange = None
        self.deferreds = [Deferred(self._cancelled) for _ in items]
        now = clock.seconds()
        self.timers = [
            None if item.deadline >= until else clock.callLater(max(item.deadline - now, 0), self._timed_out, index)
            for index, item in enumerate(items)
        ]

    def _gone(self, index: int) -> None:
        self.live[index] = False
        timer = self.timers[index]
        if timer is not None:
            self.timers[index] = None
            if timer.active():
                timer.cancel()
        self.open -= 1
        if not self.open and self.exchange is not None:
            self.exchange.cancel()

    def _cancelled(self, deferred: Deferred) -> None:
        self._gone(self.deferreds.index(deferred))  # the Deferred fails with CancelledError

    def _timed_out(self, index: int) -> None:
        self.timers[index] = None
        model = self.model
        model.failures += 1
        d = self.deferreds[index]
        self._gone(index)
        d.errback(GatewayTimeout(f"model {model.model_id!r} did not answer within {model.spec.timeout:g} s "
                                 f"(the request waited to be batched, and for its batch's answer)",
                                 model=model.model_id))

    def settle(self, result) -> None:
        """The call's outcome (a L{ModelAnswer} or a failure): each request still waiting gets its share."""
        for timer in self.timers:
            if timer is not None and timer.active():
                timer.cancel()
        live = self.live
        waiting = [d for index, d in enumerate(self.deferreds) if live[index] and not d.called]
        self.open = 0
        if not waiting:
            return  # each was cancelled or timed out already (and the call abandoned)
        model = self.model
        if isinstance(result, Failure):
            model.failures += len(waiting) - 1  # the call's failure is counted once already
            for d in waiting:
                d.errback(result.value)
            return
        if result.status >= 300:  # the model's own error answers every request of the batch
            if result.status >= 400:
                model.failures += len(waiting) - 1
            for d in waiting:
                d.callback(result)
            return
        try:
            answers = self.split(result)
        except ApiError as e:
            model.failures += len(waiting)
            for d in waiting:
                d.errback(e)
            return
        for index, answer in enumerate(answers):
            d = self.deferreds[index]
            if live[index] and not d.called:
                d.callback(answer)


def _alone(answer: ModelAnswer) -> list:
    """A call for one request: its answer."""
    return [answer]


class RowBatches:
    """
    The model a keyed L{Batcher} sends to (L{BatchingModel}): its batches of requests with
    one L{TensorBatch} key become one call of the model with all their rows
    (L{aibackend.tensors.concat_rows}) past its own batcher (C{send_alone}), whose answer
    is split back by each request's rows (L{aibackend.tensors.split_rows}).
    """

    def __init__(self, model):
        self.model = model

    def admit(self, waiting: int) -> None:
        # The model counts what waits in every one of its batchers (this one's C{waiting} with them).
        self.model.admit(self.model.batcher.waiting)

    def send_batch(self, items: list) -> list:
        model = self.model
        model.batch_stats.sent(len(items))
        if len(items) == 1:
            # Alone: its body as it came, under its own deadline (the wait to be batched
            # counts), not a fresh timeout of the model's.
            body, context, split = items[0].body, items[0].context, _alone
        else:
            rows = [item.context.batch.rows for item in items]
            model.requests += len(items) - 1  # one call, counted once by the model: the requests it answers
            context = RequestContext(request_id=",".join([item.context.request_id for item in items]),
                                     operation=items[0].context.operation)
            body = concat_rows([item.body for item in items])
            split = partial(self._split, rows=rows)
        clock = model.batcher.clock
        call = OneCall(model, items, clock, clock.seconds() + float(model.spec.timeout), split)
        try:
            exchange = model.send_alone(body, context)
        except Exception:
            exchange = fail()
        call.exchange = exchange
        exchange.addBoth(call.settle)
        return call.deferreds

    def _split(self, answer: ModelAnswer, *, rows: list) -> list:
        model_id = self.model.model_id
        try:
            parts = split_rows(model_json(answer.body), rows)
        except (NotClientJSON, TensorError) as e:
            raise BadGateway(f"model {model_id!r} answered a batch of {len(rows)} requests ({sum(rows)} rows) "
                             f"badly: {e}", model=model_id) from None
        return [ModelAnswer(status=answer.status, body=json.dumps(part).encode()) for part in parts]


class BatchingModel:
    """
    What every batching model shares (a mixin before the model's own class, which
    provides C{limit}, C{describe} and L{aibackend.interfaces.IBatching}'s C{admit} and
    C{send_batch}): the L{Batcher} in front of it, which takes its plain requests; the
    keyed ones of requests concatenated along their batch dimension (L{TensorBatch},
    L{RowBatches}: one per key while requests of it wait); its idleness (no request waits
    to be batched either), and its batching's part of C{status}.
    """

    def start_batching(self, spec, clock, timeout: float) -> None:
        """Put a L{Batcher} in front of the model: C{spec}, its C{[models.batching]}."""
        self.batching = spec
        self.batcher = Batcher(self, spec, clock, timeout)
        self.batch_stats = self.batcher.stats
        self.keyed: dict = {}  # TensorBatch key -> its Batcher, while requests wait in it

    def send(self, body: bytes, context) -> Deferred:
        if type(context) is not RowsContext:
            return self.batcher.send(body, context)
        tensor = context.batch
        batcher = self.keyed.get(tensor.key)
        if batcher is None:
            batcher = Batcher(RowBatches(self), self.batching, self.batcher.clock, self.batcher.timeout,
                              stats=self.batch_stats, on_empty=self._key_emptied)
            self.keyed[tensor.key] = batcher
        try:
            return batcher.send(body, context)
        finally:
            if not batcher.waiting:
                self.keyed.pop(tensor.key, None)  # refused at once

    def _key_emptied(self, batcher: Batcher) -> None:
        for key, each in self.keyed.items():
            if each is batcher:
                del self.keyed[key]
                return

    def send_alone(self, body: bytes, context) -> Deferred:
        """Send one request to the model past its batchers (the model's own C{send})."""
        return super().send(body, context)

    def keyed_waiting(self) -> int:
        """The requests waiting to be concatenated with others (L{TensorBatch})."""
        return sum(batcher.waiting for batcher in self.keyed.values()) if self.keyed else 0

    def whenIdle(self) -> Deferred:
        """Idle: no request waits to be batched, and none is queued or in flight."""
        for batcher in (self.batcher, *self.keyed.values()):
            if batcher.waiting:
                return batcher.when_empty().addCallback(lambda _: self.whenIdle())
        return self.limit.when_idle()

    def fail_waiting(self, error) -> None:
        """Fail every request waiting to be batched (the model is stopping)."""
        self.batcher.fail_waiting(error)
        for batcher in list(self.keyed.values()):
            batcher.fail_waiting(error)

    def describe_batching(self) -> dict:
        """The C{batching} of the model's C{status}: its settings and figures."""
        return {**self.batching.public(), **self.batch_stats.describe(),
                "waiting": self.batcher.waiting + self.keyed_waiting()}
