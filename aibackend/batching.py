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
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque

from twisted.internet.defer import Deferred, fail, succeed

from aibackend.interfaces import BatchItem

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

    def __init__(self, model, spec, clock, timeout: float):
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
        self.stats = BatchStats()
        self.empty_waiters: list[Deferred] = []

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
        if self.empty_waiters and not self.forming:
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


class BatchingModel:
    """
    What every batching model shares (a mixin before the model's own class, which
    provides C{limit}, C{describe} and L{aibackend.interfaces.IBatching}'s C{admit} and
    C{send_batch}): the L{Batcher} in front of it, which takes its plain requests, its
    idleness (no request waits to be batched either), and its batching's part of C{status}.
    """

    def start_batching(self, spec, clock, timeout: float) -> None:
        """Put a L{Batcher} in front of the model: C{spec}, its C{[models.batching]}."""
        self.batching = spec
        self.batcher = Batcher(self, spec, clock, timeout)
        self.batch_stats = self.batcher.stats

    def send(self, body: bytes, context) -> Deferred:
        return self.batcher.send(body, context)

    def whenIdle(self) -> Deferred:
        """Idle: no request waits to be batched, and none is queued or in flight."""
        if not self.batcher.waiting:
            return self.limit.when_idle()
        return self.batcher.when_empty().addCallback(lambda _: self.whenIdle())

    def describe_batching(self) -> dict:
        """The C{batching} of the model's C{status}: its settings and figures."""
        return {**self.batching.public(), **self.batch_stats.describe(), "waiting": self.batcher.waiting}
