"""
Runtime model management: C{addmodel}, C{removemodel}, C{restart}, and what makes them
survive a restart.

A model added at runtime is validated by the same code as the configuration file
(L{aibackend.config.parse_model}), then held to stricter rules, because whoever calls
C{addmodel} is not the operator who wrote the file:

  - a program it starts (C{command}) must be one of C{allowed_commands} (none by default);
  - its URL must be allowed by C{allowed_destinations} (by default anything but
    link-local and cloud metadata addresses), checked now and on every connection;
  - it may not name the daemon's environment variables (C{${VAR}}), which hold the
    daemon's secrets.

A change is acknowledged only once the store has made it durable.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger

from aibackend import config
from aibackend.destinations import DestinationDenied, check_destination
from aibackend.errors import ApiError, BadRequest, Conflict, Forbidden, ModelUnavailable, UnknownModel
from aibackend.interfaces import FAILED, IRestartable
from aibackend.jsonread import JSONProblem, read_json

# Keys whose query-string values stay strings; the others are read as JSON when they
# parse (timeout=5, workers=2, command=["/usr/bin/x"]).
STRING_KEYS = frozenset({"id", "type", "url", "dest", "protocol", "cwd", "health_path"})


def table_from_query(params: dict) -> dict:
    """
    An C{addmodel} table from query parameters (C{?id=m&type=http&dest=127.0.0.1:8888}),
    the original README's quotes included (C{dest="127.0.0.1:8888"}).
    """
    table = {}
    for key, values in params.items():
        if key == "replace":
            continue
        value = values[-1] if len(values) == 1 else values
        if isinstance(value, str):
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            elif key not in STRING_KEYS:
                try:
                    value = read_json(value.encode("utf-8"), key)
                except JSONProblem:
                    pass  # not JSON (or too deep to read): the text itself
        table[key] = value
    return table


def _env_references(table: dict) -> list[str]:
    found = []
    for key in ("headers", "env"):
        values = table.get(key)
        if isinstance(values, dict):
            for name, value in values.items():
                if isinstance(value, str) and config.env_references(value):
                    found.append(f"{key}.{name}")
    return found


def _problems(problems) -> str:
    return "; ".join(f"{path}: {message}" if path else message for path, message in problems)


class ModelManager:
    """
    Adds, replaces, removes and restarts models, and keeps what changed.

    @param registry: the L{aibackend.registry.ModelRegistry}.
    @param store: an L{aibackend.store.IModelStore}.
    @param server: the configuration's L{aibackend.config.ServerSpec}.
    @param config_ids: the ids of the configuration file's models.
    """

    log = Logger()

    def __init__(self, registry, store, server, *, clock, destination_policy, config_ids=(), environ=None):
        self.registry = registry
        self.store = store
        self.server = server
        self.clock = clock
        self.destination_policy = destination_policy
        self.config_ids = frozenset(config_ids)
        self.environ = os.environ if environ is None else environ
        self._busy: set[str] = set()
        # The tables runtime models were added with (to keep one again after an unload).
        self.tables: dict[str, dict] = {}
        # Models unloaded through the Open Inference Protocol's repository extension, with
        # what brings them back: id -> (spec, origin, table or None).
        self.unloaded: dict[str, tuple] = {}
        # Called with the model id after each kept change, and after each restart (worker
        # processes follow them).
        self.changed = []
        self.restarted = []
        self._validations: dict = {}  # id(table) -> (table, spec, error): see _validated

    def _changed(self, model_id: str) -> Deferred:
        """Tell those who follow changes; fires once they have (a failure is logged, not raised)."""
        followed = []
        for callback in self.changed:
            d = maybeDeferred(callback, model_id)
            d.addErrback(lambda failure: self.log.failure("following the change to model {model}", failure,
                                                          model=model_id))
            followed.append(d)
        return DeferredList(followed) if followed else succeed(None)

    # --- validation -----------------------------------------------------------

    def validate(self, table: dict):
        """
        The spec of a runtime model, or the 400/403 that says why not (policy checks that
        need no network).
        """
        if not isinstance(table, dict):
            raise BadRequest("addmodel takes a JSON object, the keys of a [[models]] entry")
        references = _env_references(table)
        if references:
            raise Forbidden(
                f"{', '.join(references)}: ${{VAR}} environment references are allowed in the "
                "configuration file only (the daemon's environment holds its secrets)"
            )
        problems: list = []
        spec = config.parse_model(
            config.Table(table, "", problems),
            default_log_entries=self.server.log_entries,
            environ=self.environ,
        )
        if problems:
            raise BadRequest(f"the model is not valid: {_problems(problems)}", model=table.get("id")
                             if isinstance(table.get("id"), str) else None)
        process = spec.process
        if process is not None:
            allowed = self.server.allowed_commands
            if os.path.realpath(process.executable) not in allowed:
                why = (
                    "no program may be started at runtime (allowed_commands is empty)"
                    if not allowed
                    else f"{process.executable} is not in allowed_commands"
                )
                raise Forbidden(f"model {spec.id!r} may not be added: {why}", model=spec.id)
        return spec

    @inlineCallbacks
    def check_destination(self, spec):
        """Every URL the model connects to (each replica's, its batches') must be allowed."""
        for url in spec.destinations:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                yield check_destination(self.destination_policy, parts.hostname, port)
            except DestinationDenied as e:
                raise Forbidden(f"model {spec.id!r} may not be added: {e}", model=spec.id) from None
            except OSError as e:
                raise BadRequest(f"model {spec.id!r}: cannot resolve {parts.hostname}: {e}", model=spec.id) from None

    # --- operations -------------------------------------------------------------

    @inlineCallbacks
    def add(self, table: dict, *, replace: bool = False):
        """
        Validate, keep and register a model; a replacement takes over once it is ready.

        @return: a Deferred firing with the model's description.
        """
        spec = self.validate(table)
        model_id = spec.id
        if model_id in self._busy:
            raise Conflict(f"model {model_id!r} is being changed by another request", model=model_id)
        exists = model_id in self.registry
        if exists and not replace:
            raise Conflict(
                f"a model with id {model_id!r} exists; add replace=true to replace it", model=model_id
            )
        self._busy.add(model_id)
        try:
            yield self.check_destination(spec)
            model = self.registry.build(spec, runtime=True)
            if exists:
                self.registry.start_staged(model)
                try:
                    yield self._ready(model)
                    yield self.store.put(model_id, table)
                except Exception:
                    yield self.registry.drain_and_stop(model)
                    raise
                stopping = self.registry.replace(model, spec=spec)
                stopping.addErrback(lambda f: self.log.failure("stopping the replaced model {model}", f,
                                                               model=model_id))
            else:
                yield self.store.put(model_id, table)
                self.registry.add(model, origin="runtime", spec=spec)
            self.tables[model_id] = table
            self.unloaded.pop(model_id, None)
        finally:
            self._busy.discard(model_id)
        yield self._changed(model_id)
        self.log.info("model {model} {how} at runtime", model=model_id, how="replaced" if exists else "added")
        return ({"added": model_id, "replaced": exists, "model": describe(self.registry, model)})

    def _ready(self, model, what: str = "the replacement for model {model!r} did not become ready ({state}); "
               "the old one keeps serving") -> Deferred:
        """
        Fires once C{model} is ready; fails with 503 if it fails or does not get there in
        time (its startup timeout, and a second more).
        """
        ready = model.whenReady()
        if ready.called:
            return ready.addErrback(self._not_ready, model, what)
        ready.addTimeout(model.startup_timeout + 1.0, self.clock)
        return ready.addErrback(self._not_ready, model, what)

    def _not_ready(self, failure, model, what: str):
        raise ModelUnavailable(what.format(model=model.model_id, state=model.state), model=model.model_id)

    @inlineCallbacks
    def remove(self, model_id: str):
        """
        Unregister, keep the change, and stop the model once its in-flight requests are done.
        """
        if model_id in self._busy:
            raise Conflict(f"model {model_id!r} is being changed by another request", model=model_id)
        self.registry.get(model_id)
        self._busy.add(model_id)
        try:
            if model_id in self.config_ids:
                yield self.store.remove(model_id)
            else:
                yield self.store.forget(model_id)
            yield self.registry.remove(model_id)
        finally:
            self._busy.discard(model_id)
        self.tables.pop(model_id, None)
        yield self._changed(model_id)
        self.log.info("model {model} removed at runtime", model=model_id)
        return {"removed": model_id}

    # --- following a shared store -----------------------------------------------

    def follow(self, cfg, changes, full: bool = False) -> Deferred:
        """
        Another daemon changed the shared store (L{aibackend.redisstore}): make the
        registry what the configuration and the kept C{changes} say (a model being
        changed here is left to that operation, which follows them once it ends), and
        tell those who follow changes (the worker processes): after a full read
        (C{full}: a reconnect) always, since a worker may have started while the store
        could not be read.

        @return: a Deferred that fires once they have.
        """
        wanted = desired_specs(cfg, changes, self._validated(changes), self.log, self.tables)
        for model_id in [model_id for model_id in self.tables
                         if model_id not in wanted or wanted[model_id][1] != "runtime"]:
            del self.tables[model_id]
        changed = apply_specs(self.registry, wanted, skip=self._busy)
        if not changed and not full:
            return succeed(None)
        for model_id in changed:
            self.unloaded.pop(model_id, None)
        if changed:
            self.log.info("model(s) {models} changed by another daemon", models=", ".join(changed))
        return self._changed(", ".join(changed) or "(none: the store read again)")

    def _validated(self, changes):
        """L{validate}, once for each kept table (the same table object is not validated again)."""
        cache, self._validations = self._validations, {}

        def validate(table):
            kept = cache.get(id(table))
            if kept is None or kept[0] is not table:
                try:
                    kept = (table, self.validate(table), None)
                except Exception as e:
                    kept = (table, None, e)
            self._validations[id(table)] = kept
            if kept[2] is not None:
                raise kept[2]
            return kept[1]

        return validate

    # --- the Open Inference Protocol's model repository -------------------------

    @inlineCallbacks
    def unload(self, model_id: str):
        """
        Remove a model (as C{removemodel}: kept across restarts), remembering how to load
        it again while the daemon runs.
        """
        if model_id in self.unloaded and model_id not in self.registry:
            return {"unloaded": model_id, "model": None}
        model = self.registry.get(model_id)
        origin = self.registry.entry(model_id).origin
        table = self.tables.get(model_id)
        yield self.remove(model_id)
        self.unloaded[model_id] = (model.spec, origin, table)
        return {"unloaded": model_id, "model": None}

    @inlineCallbacks
    def load(self, model_id: str, table: dict | None = None):
        """
        Make a model ready: add (or replace) it from C{table}; bring back one that was
        unloaded; restart a loaded one whose processes failed. Answers once it is ready.
        """
        if table is not None:
            if table.setdefault("id", model_id) != model_id:
                raise BadRequest(f"the config's id {table['id']!r} is not the model's name {model_id!r}",
                                 model=model_id)
            yield self.add(table, replace=True)
        elif model_id in self.registry:
            if self.registry.get(model_id).state == FAILED:
                self.restart(model_id)
        elif model_id in self.unloaded:
            if model_id in self._busy:
                raise Conflict(f"model {model_id!r} is being changed by another request", model=model_id)
            spec, origin, kept = self.unloaded[model_id]
            self._busy.add(model_id)
            try:
                if origin == "runtime" and kept is not None:
                    yield self.store.put(model_id, kept)
                    self.tables[model_id] = kept
                else:
                    yield self.store.forget(model_id)
                model = self.registry.build(spec, runtime=origin == "runtime")
                self.registry.add(model, origin=origin, spec=spec)
                del self.unloaded[model_id]
            finally:
                self._busy.discard(model_id)
            yield self._changed(model_id)
            self.log.info("model {model} loaded again", model=model_id)
        else:
            raise UnknownModel(model_id)
        model = self.registry.get(model_id)
        yield self._ready(model, "model {model!r} was loaded but is not ready ({state})")
        return {"loaded": model_id, "model": describe(self.registry, model)}

    def restart(self, model_id: str) -> dict:
        model = self.registry.get(model_id)
        if not IRestartable.providedBy(model):
            raise BadRequest(f"model {model_id!r} has no processes to restart", model=model_id)
        model.restart()
        for callback in self.restarted:
            callback(model_id)
        return {"restarted": model_id, "model": describe(self.registry, model)}


def describe(registry, model) -> dict:
    described = dict(model.describe())
    described["origin"] = registry.entry(model.model_id).origin
    return described


def desired_specs(cfg, changes, validate, log, tables=None) -> dict:
    """
    The models there should be: the configuration's, then the kept runtime changes
    (L{aibackend.store.Change}s) over them. A kept model that is no longer valid is
    logged and left out.

    @param tables: where to note each runtime model's table (L{ModelManager.tables}).
    @return: C{{id: (spec, origin)}}, in order.
    """
    specs = {spec.id: (spec, "config") for spec in cfg.models}
    for change in changes:
        if change.action == "remove":
            specs.pop(change.model_id, None)
            continue
        try:
            spec = validate(change.table)
        except Exception as e:
            log.error("kept runtime model {model} is not loaded: {why}", model=change.model_id,
                      why=e.message if isinstance(e, ApiError) else str(e))
            continue
        specs[spec.id] = (spec, "runtime")
        if tables is not None:
            tables[spec.id] = change.table
    return specs


def apply_specs(registry, wanted: dict, skip=frozenset()) -> list:
    """
    Make the registry hold the models of C{wanted} (L{desired_specs}): add what is new,
    replace what changed, remove what went; the ids in C{skip} (being changed by an
    admin operation here) are left alone.

    @return: the ids changed.
    """
    changed = []
    for model in registry.models():
        if model.model_id not in wanted and model.model_id not in skip:
            registry.remove(model.model_id)
            changed.append(model.model_id)
    for model_id, (spec, origin) in wanted.items():
        if model_id in skip:
            continue
        if model_id in registry:
            if registry.entry(model_id).spec == spec:
                continue
            registry.replace(registry.build(spec, runtime=origin == "runtime"), origin=origin, spec=spec)
        else:
            registry.add(registry.build(spec, runtime=origin == "runtime"), origin=origin, spec=spec)
        changed.append(model_id)
    return changed


def load_models(registry, store, cfg, manager_validate, log, tables=None):
    """Build the registry at start (L{desired_specs})."""
    for spec, origin in desired_specs(cfg, store.load(), manager_validate, log, tables).values():
        registry.add(registry.build(spec, runtime=origin == "runtime"), origin=origin, spec=spec)
