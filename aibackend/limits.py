"""
A model's concurrency limit: the requests it works on, the bounded queue of those that
wait for a place, load shedding past the queue's bound, and the wait for idleness.

Every model type with a limit uses L{ConcurrencyLimit} (L{aibackend.httpmodel.HttpModel}
and L{aibackend.subprocess.SubprocessModel}). What a place is stays the model's to say:
an HTTP model has C{max_concurrency} of them (L{ConcurrencyLimit.has_room}); a
subprocess model has the free slots of its ready processes, and hands its queue out to
them itself (L{ConcurrencyLimit.queue}).
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeadlineExceeded

from aibackend.errors import GatewayTimeout, ModelBusy


class ConcurrencyLimit:
    """
    The places of one model.

    @param model_id: the model's id (for its errors).
    @param max_queue: how many requests may wait for a place; past it a request is shed
        (a 503 at once, L{busy}).
    @param max_in_flight: how many requests the model works on at once (0: no bound of
        its own, as for a model whose processes are its places).
    @ivar in_flight: how many requests the model works on now.
    @ivar queue: those waiting for a place, first come first served.
    @ivar shed: how many requests were shed.
    @ivar idle_waiters: the Deferreds of L{when_idle} not fired yet (a list: the hot path
        tests it, at no more cost than that, before it looks whether the model is idle).
    """

    __slots__ = ("model_id", "max_queue", "max_in_flight", "in_flight", "queue", "shed", "idle_waiters")

    def __init__(self, model_id: str, *, max_queue: int, max_in_flight: int = 0):
        self.model_id = model_id
        self.max_queue = max_queue
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.queue: deque = deque()
        self.shed = 0
        self.idle_waiters: list[Deferred] = []

    @property
    def queued(self) -> int:
        return len(self.queue)

    def has_room(self) -> bool:
        """Whether a request may start now (fewer than C{max_in_flight} in flight)."""
        return not self.max_in_flight or self.in_flight < self.max_in_flight

    def full(self) -> bool:
        """Whether the queue is at its bound: a request that would wait is shed instead."""
        return len(self.queue) >= self.max_queue

    def busy(self, retry_after: int = 1) -> ModelBusy:
        """The 503 of a request shed (counted): answered at once, and not a failure of the model."""
        self.shed += 1
        if self.max_in_flight:
            message = (
                f"model {self.model_id!r} is busy: {self.in_flight} requests in flight (max_concurrency) "
                f"and {len(self.queue)} waiting (max_queue)"
            )
        else:
            message = f"model {self.model_id!r} is busy: {len(self.queue)} requests are waiting (max_queue)"
        return ModelBusy(message, model=self.model_id, retry_after=retry_after)

    def wait_for_place(self, timeout: float, clock) -> Deferred:
        """
        Queue for a place (see L{has_room}; the caller has checked L{full}).

        @return: a Deferred that fires with None once a place is free (L{finished} hands
            it over, so count it with L{started}), or fails with a 504 after C{timeout}
            seconds of waiting. Cancelling it leaves the queue.
        """
        queue = self.queue
        waiter: Deferred = Deferred(lambda d: queue.remove(d) if d in queue else None)
        queue.append(waiter)
        waiter.addTimeout(timeout, clock)
        waiter.addErrback(self._waited_too_long, timeout)
        return waiter

    def _waited_too_long(self, failure, timeout: float):
        failure.trap(DeadlineExceeded)
        raise self.place_timeout(timeout)

    def place_timeout(self, timeout: float) -> GatewayTimeout:
        """The 504 of a request whose time ran out while it waited for a place."""
        return GatewayTimeout(
            f"model {self.model_id!r} did not answer within {timeout:g} s "
            f"(the request waited for one of its max_concurrency places)",
            model=self.model_id,
        )

    def started(self) -> None:
        """A request is now in flight."""
        self.in_flight += 1

    def finished(self, result=None):
        """
        A request in flight is done: the places freed go to those waiting (L{wait_for_place}),
        and those waiting for idleness hear of it. (A Deferred's callback and errback alike:
        C{result} is given back.)
        """
        self.in_flight -= 1
        queue = self.queue
        while queue and (not self.max_in_flight or self.in_flight < self.max_in_flight):
            queue.popleft().callback(None)
        if self.idle_waiters and not self.in_flight and not queue:
            self._fire_idle()
        return result

    def check_idle(self) -> None:
        """For a model that takes requests off its queue itself: nothing in flight or queued now?"""
        if self.idle_waiters and not self.in_flight and not self.queue:
            self._fire_idle()

    def when_idle(self) -> Deferred:
        """A Deferred that fires once nothing is in flight or queued (at once if nothing is)."""
        if not self.in_flight and not self.queue:
            return succeed(None)
        waiting = self.idle_waiters
        d: Deferred = Deferred(lambda d: waiting.remove(d) if d in waiting else None)
        waiting.append(d)
        return d

    def _fire_idle(self) -> None:
        waiting, self.idle_waiters = self.idle_waiters, []
        for d in waiting:
            d.callback(None)
