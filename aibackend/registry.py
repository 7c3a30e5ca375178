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
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from aibackend import config
from aibackend.errors import Conflict, UnknownModel
from aibackend.interfaces import ISender

DRAIN_POLL = 0.05
MAX_DRAIN_SECONDS = 30.0


@dataclass
class ModelDeps:
    """What a model type may need to build a model."""

    reactor: Any
    pool: Any = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    # Set for models added at runtime: where their HTTP requests may go.
    destination_policy: Any = None


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
        self._models: dict[str, Any] = {}
        self.origins: dict[str, str] = {}

    def build(self, spec, *, runtime: bool = False):
        """Build the model a validated spec describes."""
        if self.builder is not None:
            model = self.builder(spec, runtime)
        else:
            model = default_build(spec, self.runtime_deps if runtime else self.deps)
        verifyObject(ISender, model)
        return model

    # --- lifetimes ----------------------------------------------------------

    def startService(self):
        super().startService()
        for model in self._models.values():
            self._start(model)

    def stopService(self):
        """Stop every model, each once its in-flight requests are done (bounded, see L{remove})."""
        super().stopService()
        stopping = [self.drain_and_stop(model) for model in self._models.values()]
        return DeferredList(stopping) if stopping else succeed(None)

    def _start(self, model) -> None:
        if IService.providedBy(model) and not model.running:
            model.startService()

    def _stop(self, model):
        if IService.providedBy(model) and model.running:
            return maybeDeferred(model.stopService)
        return succeed(None)

    # --- the models ---------------------------------------------------------

    def add(self, model, *, origin: str = "config") -> None:
        """
        Register a model (started at once if the registry runs).

        @raise Conflict: a model with that id exists.
        """
        if model.model_id in self._models:
            raise Conflict(f"a model with id {model.model_id!r} exists", model=model.model_id)
        self._models[model.model_id] = model
        self.origins[model.model_id] = origin
        model.model_log.append("info", "added", type=model.type_name, origin=origin)
        self.log.info("model {model} ({type}) added from {origin}", model=model.model_id, type=model.type_name,
                      origin=origin)
        if self.running:
            self._start(model)

    def start_staged(self, model) -> None:
        """Start a model that is not registered yet (a replacement getting ready)."""
        self._start(model)

    def replace(self, model, *, origin: str = "runtime"):
        """
        Put C{model} in the place of the model with its id; the old one drains and stops.

        @return: a Deferred that fires once the old model has stopped.
        """
        old = self.get(model.model_id)
        self._models[model.model_id] = model
        self.origins[model.model_id] = origin
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
        del self._models[model_id]
        self.origins.pop(model_id, None)
        model.model_log.append("info", "removed")
        self.log.info("model {model} removed", model=model_id)
        return self.drain_and_stop(model)

    def drain_and_stop(self, model):
        clock = self.deps.reactor
        limit = min(float(getattr(model.spec, "timeout", 0) or 0), self.drain_timeout)
        deadline = clock.seconds() + limit
        done: Deferred = Deferred()

        def busy() -> bool:
            return bool(getattr(model, "in_flight", 0) or len(getattr(model, "queue", ())))

        def check():
            if busy() and clock.seconds() < deadline:
                clock.callLater(DRAIN_POLL, check)
            else:
                self._stop(model).chainDeferred(done)

        check()
        return done

    def get(self, model_id: str):
        """
        @raise UnknownModel: no such model.
        """
        try:
            return self._models[model_id]
        except KeyError:
            raise UnknownModel(model_id) from None

    def __contains__(self, model_id) -> bool:
        return model_id in self._models

    def models(self) -> list:
        """Every model, in the order they were added."""
        return list(self._models.values())
