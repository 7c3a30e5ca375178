"""
The registry: model id -> model, and the models' lifetimes.

Models that are services (subprocess models supervise processes) are started and stopped
by the registry: when it starts, when they are added to a running registry, and when
they are removed, after their in-flight requests have had a chance to finish.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from twisted.application.service import IService, Service
from twisted.internet.defer import DeferredList, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from aibackend import config
from aibackend.errors import Conflict, UnknownModel
from aibackend.interfaces import IModel
from aibackend.metrics import ModelStats

MAX_DRAIN_SECONDS = 30.0


@dataclass
class ModelDeps:
    """What a model type may need to build a model."""

    reactor: Any
    pool: Any = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    # Set for models added at runtime: where their HTTP requests may go.
    destination_policy: Any = None


@dataclass(eq=False)
class Entry:
    """
    What the daemon knows of one registered model, in one place.

    @ivar model: the L{aibackend.interfaces.IModel}.
    @ivar spec: the spec it was built from, as the user wrote it (a worker process's
        stand-in for a model the primary runs has a spec of its own; this is the model's).
    @ivar origin: C{"config"} or C{"runtime"}.
    @ivar stats: its request counts and latencies (L{aibackend.metrics.ModelStats}).
    """

    model: Any
    spec: Any
    origin: str = "config"
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def model_id(self) -> str:
        return self.model.model_id


def model_class(model_type: config.ModelType):
    module_name, _, class_name = model_type.factory.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def default_build(spec, deps: ModelDeps):
    """Build the model a validated spec describes, with its type's class."""
    return model_class(config.find_type(spec.type)).from_spec(spec, deps)


class ModelRegistry(Service):
    """
    Every model the daemon serves, by id.

    @param deps: the L{ModelDeps} models of the configuration file are built with.
    @param runtime_deps: the ones models added at runtime are built with (defaults to C{deps}).
    """

    log = Logger()
    name = "models"

    def __init__(self, deps: ModelDeps, runtime_deps: ModelDeps | None = None, *,
                 drain_timeout: float = MAX_DRAIN_SECONDS, builder=None):
        self.deps = deps
        # (spec, runtime) -> model; a worker process builds some models differently.
        self.builder = builder
        self.drain_timeout = drain_timeout
        self.runtime_deps = runtime_deps or deps
        self._entries: dict[str, Entry] = {}
        # Callables given each new Entry (added, or put in another's place): the daemon's
        # policy is made once a model with limits comes (aibackend.daemon).
        self.added: list = []

    def build(self, spec, *, runtime: bool = False):
        """Build the model a validated spec describes."""
        if self.builder is not None:
            model = self.builder(spec, runtime)
        else:
            model = default_build(spec, self.runtime_deps if runtime else self.deps)
        verifyObject(IModel, model)
        return model

    # --- lifetimes ----------------------------------------------------------

    def startService(self):
        super().startService()
        for entry in self._entries.values():
            self._start(entry.model)

    def stopService(self):
        """Stop every model, each once its in-flight requests are done (bounded, see L{remove})."""
        super().stopService()
        stopping = [self.drain_and_stop(entry.model) for entry in self._entries.values()]
        return DeferredList(stopping) if stopping else succeed(None)

    def _start(self, model) -> None:
        if IService.providedBy(model) and not model.running:
            model.startService()

    def _stop(self, model):
        if IService.providedBy(model) and model.running:
            return maybeDeferred(model.stopService)
        return succeed(None)

    # --- the models ---------------------------------------------------------

    def add(self, model, *, origin: str = "config", spec=None) -> Entry:
        """
        Register a model (started at once if the registry runs).

        @param spec: the spec it was built from (by default, the model's own).
        @raise Conflict: a model with that id exists.
        """
        verifyObject(IModel, model)
        if model.model_id in self._entries:
            raise Conflict(f"a model with id {model.model_id!r} exists", model=model.model_id)
        entry = self._entries[model.model_id] = Entry(model, spec if spec is not None else model.spec, origin)
        for added in self.added:
            added(entry)
        model.model_log.append("info", "added", type=model.type_name, origin=origin)
        self.log.info("model {model} ({type}) added from {origin}", model=model.model_id, type=model.type_name,
                      origin=origin)
        if self.running:
            self._start(model)
        return entry

    def start_staged(self, model) -> None:
        """Start a model that is not registered yet (a replacement getting ready)."""
        self._start(model)

    def replace(self, model, *, origin: str = "runtime", spec=None):
        """
        Put C{model} in the place of the model with its id; the old one drains and stops.
        The model's figures (L{Entry.stats}) go on: it is the same model id to a client.

        @return: a Deferred that fires once the old model has stopped.
        """
        previous = self.entry(model.model_id)
        old = previous.model
        entry = self._entries[model.model_id] = Entry(model, spec if spec is not None else model.spec, origin,
                                                      previous.stats)
        for added in self.added:
            added(entry)
        model.model_log.append("info", "added", type=model.type_name, origin=origin, replaced=True)
        old.model_log.append("info", "replaced")
        self.log.info("model {model} replaced", model=model.model_id)
        if self.running:
            self._start(model)
        return self.drain_and_stop(old)

    def remove(self, model_id: str):
        """
        Unregister a model: no new request reaches it; those in flight may finish (up to
        the model's timeout, at most 30 s); then it stops.

        @return: a Deferred that fires once the model has stopped.
        @raise UnknownModel: no such model.
        """
        model = self.get(model_id)
        del self._entries[model_id]
        model.model_log.append("info", "removed")
        self.log.info("model {model} removed", model=model_id)
        return self.drain_and_stop(model)

    def drain_and_stop(self, model):
        """
        Stop C{model} once nothing is in flight or queued at it, or after its request
        timeout (at most C{drain_timeout}), whichever comes first.

        @return: a Deferred that fires once it has stopped.
        """
        limit = min(float(model.request_timeout or 0), self.drain_timeout)
        if limit <= 0 or not (model.in_flight or model.queued):
            return self._stop(model)
        clock = self.deps.reactor
        idle = model.whenIdle()
        idle.addTimeout(limit, clock)
        # On the reactor's next turn: the last answer is on its way to its client first.
        idle.addBoth(lambda _: deferLater(clock, 0, self._stop, model))
        return idle

    def entry(self, model_id: str) -> Entry:
        """
        @raise UnknownModel: no such model.
        """
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    def get(self, model_id: str):
        """
        The model with id C{model_id}.

        @raise UnknownModel: no such model.
        """
        return self.entry(model_id).model

    def __contains__(self, model_id) -> bool:
        return model_id in self._entries

    def entries(self) -> list[Entry]:
        """Every model's entry, in the order they were added."""
        return list(self._entries.values())

    def models(self) -> list:
        """Every model, in the order they were added."""
        return [entry.model for entry in self._entries.values()]
