"""
A model's state as an event source: what L{aibackend.interfaces.IModel}'s C{state},
C{watch} and C{whenReady} are made of, so that every model type (and a worker's stand-in
for a model the primary runs) tells the same thing the same way, and nobody polls. Also
L{Waiters} (Deferreds waiting for one thing, as a fake model's C{whenIdle}) and
L{AlwaysReady} (the C{IModel} part of a model that is ready once built and counts nothing).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from aibackend.errors import ModelUnavailable
from aibackend.interfaces import FAILED, READY, STATES, STOPPED

# States a wait for readiness gives up on.
GIVE_UP = (FAILED, STOPPED)


class ModelState:
    """
    The state of one model, with the callbacks that follow it.

    @param model: what watchers are called with (the model itself).
    @param initial: the first state.
    @param why: called for the message of a failed wait (the model's last failure).
    """

    log = Logger()

    def __init__(self, model, initial: str = READY, *, why: Callable[[], str | None] = lambda: None):
        if initial not in STATES:
            raise ValueError(f"unknown model state {initial!r}")
        self._model = model
        self._value = initial
        self._why = why
        self._watchers: list[Callable] = []
        self._ready: list[Deferred] = []

    @property
    def value(self) -> str:
        return self._value

    def set(self, state: str) -> None:
        """Move to C{state}; those waiting and watching hear of it (once per change)."""
        if state not in STATES:
            raise ValueError(f"unknown model state {state!r}")
        if state == self._value:
            return
        self._value = state
        if state == READY or state in GIVE_UP:
            waiting, self._ready = self._ready, []
            for d in waiting:
                if state == READY:
                    d.callback(None)
                else:
                    d.errback(self._unavailable())
        for callback in list(self._watchers):
            try:
                callback(self._model)
            except Exception:
                self.log.failure("a watcher of model {model}'s state failed", model=self._model.model_id)

    def _unavailable(self) -> ModelUnavailable:
        model_id = self._model.model_id
        why = self._why() if self._value == FAILED else None
        return ModelUnavailable(
            f"model {model_id!r} is {self._value}" + (f": {why}" if why else ""), model=model_id
        )

    def when_ready(self) -> Deferred:
        if self._value == READY:
            return succeed(None)
        if self._value in GIVE_UP:
            return fail(self._unavailable())
        d: Deferred = Deferred(lambda d: self._ready.remove(d) if d in self._ready else None)
        self._ready.append(d)
        return d

    def watch(self, callback: Callable) -> Callable[[], None]:
        self._watchers.append(callback)

        def stop() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)

        return stop


class Waiters:
    """
    Deferreds waiting for one thing (a model having nothing in flight): L{fire} fires
    each once. Empty, it is false.
    """

    __slots__ = ("_waiting",)

    def __init__(self):
        self._waiting: list[Deferred] = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def wait(self) -> Deferred:
        """A Deferred that fires with None at the next L{fire}; cancelling it stops the wait only."""
        d: Deferred = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        return d

    def fire(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class AlwaysReady:
    """
    The L{aibackend.interfaces.IModel} part of a model that is ready once built and
    keeps no count of its requests (a model type whose C{send} answers at once, or that
    leaves its load to someone else): state C{ready} for good, nothing in flight or
    queued, no failure, no timeouts. A model type may inherit it and override what it
    knows better.
    """

    state = READY
    in_flight = 0
    queued = 0
    last_failure = None
    request_timeout = 0.0
    startup_timeout = 0.0

    def whenReady(self) -> Deferred:
        return succeed(None)

    def whenIdle(self) -> Deferred:
        return succeed(None)

    def watch(self, callback: Callable) -> Callable[[], None]:
        return lambda: None  # its state never changes
