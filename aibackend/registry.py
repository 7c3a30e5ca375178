"""
The registry: model id -> model, and the models' lifetimes.

Models that are services (subprocess models supervise processes) become children of the
registry, so they start and stop with it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from twisted.application.service import IService, MultiService
from twisted.internet.defer import maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from aibackend import config
from aibackend.errors import Conflict, UnknownModel
from aibackend.interfaces import ISender


@dataclass
class ModelDeps:
    """What a model type may need to build a model: the reactor, the shared HTTP pool."""

    reactor: Any
    pool: Any = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)


def model_class(model_type: config.ModelType):
    module_name, _, class_name = model_type.factory.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


class ModelRegistry(MultiService):
    """
    Every model the daemon serves, by id.

    @param deps: the L{ModelDeps} models are built with.
    """

    log = Logger()
    name = "models"

    def __init__(self, deps: ModelDeps):
        super().__init__()
        self.deps = deps
        self._models: dict[str, Any] = {}

    def build(self, spec):
        """Build the model a validated spec describes."""
        cls = model_class(config.find_type(spec.type))
        model = cls.from_spec(spec, self.deps)
        verifyObject(ISender, model)
        return model

    def add(self, model) -> None:
        """
        Register a model (started at once if the registry runs).

        @raise Conflict: a model with that id exists.
        """
        if model.model_id in self._models:
            raise Conflict(f"a model with id {model.model_id!r} exists", model=model.model_id)
        self._models[model.model_id] = model
        if IService.providedBy(model):
            model.setServiceParent(self)
        model.model_log.append("info", "added", type=model.type_name)
        self.log.info("model {model} ({type}) added", model=model.model_id, type=model.type_name)

    def remove(self, model_id: str):
        """
        Unregister a model and stop it.

        @return: a Deferred that fires once the model has stopped.
        @raise UnknownModel: no such model.
        """
        model = self.get(model_id)
        del self._models[model_id]
        model.model_log.append("info", "removed")
        self.log.info("model {model} removed", model=model_id)
        if IService.providedBy(model):
            return maybeDeferred(model.disownServiceParent)
        return succeed(None)

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
