"""
The daemon assembled: the parts every process has, and the three ways a process serves them.

L{build} makes the root service and the L{Parts} (the registry, the manager, the front
door, its site..., for whoever needs one: tests, the benchmark). The root is a L{Root} of named children, started in
this order and stopped in the reverse one:

  - C{subreaper} (with C{subreaper=True}): before any model process starts;
  - C{pool}, C{runtime-pool}: the HTTP connection pools, closed on stop;
  - C{store}: where runtime changes are kept, closed after the registry;
  - C{models}: the registry, which starts and stops the models;
  - then by mode:
      - alone (one process): C{listener-0}, C{listener-1}, ... (L{Listener});
      - the C{--processes} primary: C{worker-port} (the private port workers forward to),
        C{workers} (L{WorkerProcesses}, stopped before the models), then the shared
        addresses C{listener-0}, ... (L{SharedListener}: one listening socket each, whose
        connections the primary serves or hands to a worker; on stop they close first);
      - a worker: C{primary-link} (L{WorkerControl}: the primary's notices on stdin), then
        its inherited links C{listener-0}, ... (the connections the primary hands it);
  - C{readiness}: last, so that on stop it is the first to say "not ready".

The usage recorder (C{usage}, when usage is on) is started before them all and stopped once
they all have: it writes the usage of the requests drained on stop.
"""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

from aibackend.admin import ModelManager, load_models
from aibackend.auth import Guard
from aibackend.config import Config
from aibackend.destinations import DestinationPolicy
from aibackend.keys import KeyManager
from aibackend.listeners import Listener, SharedListener, StartupError
from aibackend.metrics import Metrics
from aibackend.policy import Policy
from aibackend.processes import (
    Forwarder, PrimaryStates, ProcessCollector, WorkerControl, WorkerProcesses, new_token, restart_local, resync,
    worker_builder,
)
from aibackend.proctree import SubreaperService
from aibackend.ratelimit import LimitTable, Limiter
from aibackend.redislimits import LeaseService, RedisLimiter
from aibackend.redisstore import FollowService, ISharedStore, RedisStore, StoreCollector
from aibackend.registry import ModelDeps, ModelRegistry
from aibackend.root import FrontDoor
from aibackend.server import AibackendSite, release_freed_memory
from aibackend.store import SQLiteStore
from aibackend.redisusage import open_redis_usage
from aibackend.usage import UsageCollector, UsageService, open_usage

DEFAULT_MAX_PERSISTENT_PER_HOST = 64
IDLE_CONNECTION_SECONDS = 120

log = Logger()


class QuietClientFactory(_HTTP11ClientFactory):
    # One "Starting factory" line per upstream connection is noise in the log. (Twisted
    # has no public way to choose the pool's protocol factory: HTTPConnectionPool._factory.)
    noisy = False


class ConnectionPoolService(service.Service):
    """Owns one of the daemon's HTTP connection pools and closes it on stop."""

    def __init__(self, pool):
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


class ReadinessService(service.Service):
    """Says the front door is ready once everything before it has started, and not ready at stop."""

    name = "readiness"

    def __init__(self, front_door, reactor):
        self.front_door = front_door
        self.reactor = reactor

    def startService(self):
        super().startService()
        self.front_door.accepting = True
        freeze_start_up()

    def stopService(self):
        self.front_door.accepting = False
        ignore_stop_signals(self.reactor)
        return super().stopService()


def ignore_stop_signals(reactor) -> None:
    """
    Once the daemon is stopping, a second SIGTERM or SIGINT (an impatient Ctrl-C, a
    supervisor that sends the signal again) says so in the log and changes nothing: the
    drain goes on. Twisted's handler would stop the reactor a second time, which logs a
    critical C{ReactorNotRunning} traceback. Only a signal the reactor handles (its
    C{sigTerm} / C{sigInt}, installed when twistd runs it), never one a test process that
    built the daemon itself handles.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        # The reactor's handler is one of its bound methods.
        if getattr(signal.getsignal(number), "__self__", None) is reactor:
            signal.signal(number, _already_stopping)


def _already_stopping(number: int, frame) -> None:
    log.info("Received {signal} while stopping: the drain goes on (SIGKILL stops at once)",
             signal=signal.Signals(number).name)


def freeze_start_up() -> None:
    """
    Take what start-up made (modules, classes, routes, the configuration, the models'
    parts: it lives as long as the daemon) out of the garbage collector's generations
    (C{gc.freeze}), once it has started: a full collection, which comes whenever the
    objects alive have grown by a quarter (10,000 held streams are a million objects),
    then no longer walks them all again. Start-up's own garbage is collected first.
    """
    gc.collect()
    gc.freeze()


class StoreService(service.Service):
    """Closes the store on stop (after the registry, which may still be writing)."""

    name = "store"

    def __init__(self, store):
        self.store = store

    def stopService(self):
        super().stopService()
        return self.store.close()


class LimitTableService(service.Service):
    """
    Removes the primary's limits' table file on stop. Its mapping stays (as a worker's
    does) until the process ends: the requests still draining, and the workers still
    ending, settle into it (a root service's children stop all at once).
    """

    name = "limits"

    def __init__(self, table: LimitTable):
        self.table = table

    def stopService(self):
        super().stopService()
        self.table.remove()


def limit_table(processes: int, worker: dict | None, state_dir: str | None) -> LimitTable | None:
    """
    The table the limits are kept in: with C{--processes}, the primary's file (made here
    in the primary, opened in a worker); None for a daemon alone (its Limiter keeps one
    in memory), and for one built without a state directory (a test's: each process then
    keeps its own).

    @raise StartupError: the file cannot be made or opened.
    """
    try:
        if worker is not None:
            return LimitTable.open(worker["limits"], worker["number"]) if worker.get("limits") else None
        if processes > 1 and state_dir is not None:
            return LimitTable.create(state_dir, processes)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise StartupError(f"cannot use the limits' table in the state directory {state_dir}: {why}") from None
    return None


class Root(service.MultiService):
    """
    The daemon's root service.

    @param log_observer: a factory of the log observer the daemon's log goes to instead
        of twistd's own lines (C{--log-format json}), or None. twistd's logger uses the
        C{ILogObserver} component of its application when no C{--logger} is given (the
        way a C{.tac} file chooses one); handed to the application, this service sets it
        there. twistd starts its logger after making the service, and before starting it.
    """

    def __init__(self, log_observer: Callable[[], Any] | None = None):
        super().__init__()
        self.log_observer = log_observer
        # Services started before the children and stopped once they all have (the usage
        # recorder: the requests the registry drains on stop are recorded too).
        self.outer: list = []

    def startService(self):
        for outer in self.outer:
            outer.startService()
        super().startService()

    def stopService(self):
        d = super().stopService()
        for outer in reversed(self.outer):
            d.addCallback(lambda _, outer=outer: outer.stopService())
        return d

    def setServiceParent(self, parent):
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver) is None):
            parent.setComponent(ILogObserver, self.log_observer())
        super().setServiceParent(parent)


@dataclass(frozen=True)
class Parts:
    """What every process of the daemon has, built once; the parts a reader may need."""

    registry: ModelRegistry
    manager: ModelManager
    front_door: FrontDoor
    site: AibackendSite
    guard: Guard
    metrics: Metrics
    store: Any
    deps: ModelDeps
    runtime_deps: ModelDeps
    policy: DestinationPolicy
    keys: KeyManager
    limiter: Any = None  # the aibackend.ratelimit.Limiter of keys' and models' limits


@dataclass(frozen=True)
class Built:
    """The daemon L{build} made: its root service (for twistd) and its L{Parts}."""

    service: Root
    parts: Parts


def _add(root, name: str, child):
    child.setName(name)
    child.setServiceParent(root)
    return child


def _raise_open_files_limit(connections: int) -> None:
    """Let the daemon hold its max_connections (the soft limit is often 1024), up to the hard limit."""
    try:
        import resource  # here: Unix only, and only needed once, at start

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = connections + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def open_store(reactor, state_dir: str, url: str | None = None, password: str | None = None,
               prefix: str = "aibackend:", *, opener=SQLiteStore, args=()):
    """
    The SQLite store in C{state_dir}, made (0700) if it is not there (or what
    C{opener(reactor, state_dir, *args)} makes there: the usage's); or, given a
    C{redis://} C{url}, the shared store in that Redis (L{aibackend.redisstore}).

    @raise StartupError: the directory or the database cannot be used.
    """
    if url is not None:
        try:
            return RedisStore(reactor, url, password=password, prefix=prefix)
        except ValueError as e:  # redis-py's word on a URL that config.check_store_url let through
            raise StartupError(f"cannot use the store's URL: {e}") from None
    try:
        return opener(reactor, state_dir, *args)
    except (OSError, sqlite3.Error) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise StartupError(f"cannot use the state directory {state_dir}: {why}") from None


def build(config: Config, reactor, *, listen, max_body_bytes, environ=None, state_dir=None, admin_token=None,
          store=None, store_url=None, store_password=None, processes=1, worker=None, worker_argv=None, subreaper=False,
          log_observer=None) -> Built:
    """
    Wire the daemon: its parts (L{build_parts}), then the listeners of its mode: alone, the
    C{--processes} primary (C{processes > 1}), or a worker (C{worker} given).

    @param state_dir: where runtime changes are kept (ignored when C{store} or C{store_url} is given).
    @param store_url: a shared store's C{redis://} URL (C{--store}), C{store_password} its password.
    @param worker: what the primary told this worker (L{aibackend.processes.worker_settings}).
    @param worker_argv: the command line of a worker (the primary's).
    @param subreaper: make the process a child subreaper (L{aibackend.proctree}), so
        that what the model processes start is found and stopped however it escapes.
    @param log_observer: see L{Root}.
    """
    environ = os.environ if environ is None else environ
    root = Root(log_observer)
    if subreaper:  # first: started before any model process, stopped with the rest
        _add(root, "subreaper", SubreaperService(reactor))
    if store is None:
        store = open_store(reactor, state_dir, store_url, store_password, config.server.store_prefix)
    primary_states = PrimaryStates() if worker is not None else None
    internal_token = new_token() if worker is None and processes > 1 else None
    parts = build_parts(root, config, reactor, store=store, environ=environ, listen=listen,
                      max_body_bytes=max_body_bytes, admin_token=admin_token, internal_token=internal_token,
                      worker=worker, primary_states=primary_states, processes=processes, state_dir=state_dir)
    if worker is None and ISharedStore.providedBy(store):
        _follow_shared_store(root, parts, config, store)
    if worker is not None:
        _serve_as_worker(root, parts, reactor, config, worker, primary_states, listen)
    elif processes > 1:
        _serve_as_primary(root, parts, reactor, listen, processes, worker_argv, internal_token)
    else:
        _serve_alone(root, parts, reactor, listen)
    _add(root, "readiness", ReadinessService(parts.front_door, reactor))
    return Built(root, parts)


def build_parts(root, config: Config, reactor, *, store, environ, listen, max_body_bytes, admin_token=None,
               internal_token=None, worker=None, primary_states=None, processes=1, state_dir=None) -> Parts:
    """
    The HTTP pools, the store, the registry with the configured and the kept runtime
    models, the manager, the guard, the metrics, the front door and its site, the
    policy; the services among them added to C{root}.

    @param processes: the C{--processes} count (the primary's; a worker's is in C{worker}).
    @param state_dir: where the limits' shared table is made (C{--processes}) and the
        usage kept (None: in memory).
    """
    server = config.server

    def make_pool(name):
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = DEFAULT_MAX_PERSISTENT_PER_HOST
        pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
        pool._factory = QuietClientFactory
        _add(root, name, ConnectionPoolService(pool))
        return pool

    policy = DestinationPolicy(server.allowed_destinations)
    deps = ModelDeps(reactor=reactor, pool=make_pool("pool"), environ=environ)
    # Runtime models connect through a pool of their own: a connection made for a trusted
    # model is never handed to one whose destinations are checked.
    runtime_deps = ModelDeps(reactor=reactor, pool=make_pool("runtime-pool"), environ=environ,
                             destination_policy=policy)
    StoreService(store).setServiceParent(root)

    # The limits' table (see the policy below), closed after the registry has drained.
    table = limit_table(processes, worker, state_dir)
    if table is not None:
        if worker is None:
            _add(root, "limits", LimitTableService(table))

    builder = None
    if worker is not None:
        builder = worker_builder(worker, lambda runtime: runtime_deps if runtime else deps, primary_states)
    registry = ModelRegistry(deps, runtime_deps, drain_timeout=server.drain_timeout, builder=builder)
    registry.setServiceParent(root)
    manager = ModelManager(
        registry, store, server, clock=reactor, destination_policy=policy,
        config_ids=[spec.id for spec in config.models], environ=environ,
    )
    load_models(registry, store, config, manager.validate, log, manager.tables)

    guard = Guard(admin_token, listen, server.api_keys, internal_token=internal_token)
    keys = KeyManager(guard.keys, store, clock=reactor)
    keys.load()
    log.info("aibackend: {note}; runtime HTTP models may reach {policy}", note=guard.startup_note(),
             policy=policy.describe())
    metrics = Metrics(registry)
    front_door = FrontDoor(registry, reactor, manager=manager, guard=guard, metrics=metrics, keys=keys)

    # --- policy (issue 18) ---
    # The limits of keys and models (aibackend.ratelimit), in a table every process shares
    # (--processes: a file in the state directory, made by the primary and opened by the
    # workers; alone, in memory). The limiter always exists (cheap: nothing is done for a
    # request whose key and model have no limits); the Policy only once something needs it
    # (build_policy).
    local_limiter = limiter = Limiter(reactor, table, metrics=metrics, log=log)
    if isinstance(store, RedisStore):
        # A fleet's limits (issue 19): in Redis, with the local limiter the fallback while Redis is down
        # (its table what Parts.limiter gives the workers).
        limiter = RedisLimiter(store, reactor, local=local_limiter, metrics=metrics,
                               lease_seconds=server.store_lease_seconds)
        _add(root, "fleet-limits", LeaseService(limiter))
    usage = None
    # [server] usage: true, false, or unset (on whenever the daemon has client keys or
    # limits: keys made at runtime too). The recorder (its file or Redis connection, its
    # thread) is opened only while usage is on (build_policy), unless usage = false. With
    # --store redis:// the rows go to the fleet's Redis (aibackend.redisusage), else to
    # STATE/usage.sqlite3 (every --processes process writes its own rows, either way).
    if server.usage is not False:
        retention = server.usage_retention_days
        if isinstance(store, RedisStore):
            usage = UsageService(lambda: open_redis_usage(reactor, store, retention))
        else:
            usage = UsageService(lambda: open_store(reactor, state_dir, opener=open_usage, args=(retention,)))
        root.outer.append(usage)  # stopped last: what is drained on stop is recorded
        core = front_door.core
        metrics.collectors.register(UsageCollector(
            current=lambda: usage.recorder, in_use=lambda: core.policy is not None and core.policy.usage is not None))
    wire_policy(front_door.core, server, keys, registry, limiter=limiter, usage=usage)
    site = AibackendSite(
        front_door.resource(), max_body_bytes=max_body_bytes, metrics=metrics, reactor=reactor,
        timeout=server.idle_timeout, header_timeout=server.header_timeout, max_connections=server.max_connections,
        access_log=server.access_log, body_timeout=server.body_timeout, min_body_rate=server.min_body_rate,
        send_timeout=server.send_timeout, max_connections_per_peer=server.max_connections_per_peer,
    )
    release_freed_memory()
    _raise_open_files_limit(server.max_connections)
    return Parts(registry=registry, manager=manager, front_door=front_door, site=site, guard=guard,
                metrics=metrics, store=store, deps=deps, runtime_deps=runtime_deps, policy=policy,
                keys=keys, limiter=local_limiter)


# --- policy (issue 18): the relay's Policy, from the server spec and the key ring ---


def build_policy(server, keyring, registry, *, limiter=None, usage=None):
    """
    The relay's L{Policy} for what is configured and kept, or None: nothing to admit,
    and the hot path does nothing for one. Each part of issue 18 is a reason to have one:

      - keys: a stored key has models to enforce (L{Policy.admit}) and may carry limits;
        configured C{api_keys} and the admin token call every model without limits, so
        they alone need no policy for themselves;
      - limits: a model of C{registry} with C{[models.limits]};
      - usage: the recorder (L{aibackend.usage}), unless C{usage = false}; with C{usage}
        unset it is used only once the daemon has client keys (configured or stored) or
        limits. It is opened when it is used (L{UsageService.on}) and closed when it is no
        longer (the last key deleted: L{UsageService.off}).

    A policy made has the limiter whatever made it (a key's limits are known per request).

    @param server: the configuration's server spec.
    @param keyring: the guard's L{aibackend.keys.KeyRing}.
    @param usage: the L{UsageService}, or None (C{usage = false}).
    @raise StartupError: the recorder cannot be opened.
    """
    limited = any(entry.spec.limits is not None for entry in registry.entries())
    recorder = None
    if usage is not None:
        if server.usage is None and not (keyring.required or limited):
            usage.off()
        else:
            recorder = usage.on()
    if keyring.stored or limited or recorder is not None:
        return Policy(limiter=limiter, usage=recorder)
    return None


def wire_policy(core, server, keys: KeyManager, registry, *, limiter=None, usage=None) -> None:
    """
    Give C{core} the policy L{build_policy} makes, now and each time the keys change (the
    first key made at runtime, or read by a worker) or a model is added (one with limits).
    The limiter and the recorder are the same objects in every policy made, so a request
    admitted by one is settled by the next.
    """

    def make_policy(_entry=None) -> None:
        try:
            core.policy = build_policy(server, keys.ring, registry, limiter=limiter, usage=usage)
        except StartupError as e:  # (at start, it stops the daemon: below) the usage could not be opened
            log.error("aibackend: the usage cannot be recorded: {why}", why=e)
            core.policy = build_policy(server, keys.ring, registry, limiter=limiter)

    core.policy = build_policy(server, keys.ring, registry, limiter=limiter, usage=usage)
    keys.updated.append(make_policy)
    registry.added.append(make_policy)


def _follow_shared_store(root, parts: Parts, config: Config, store) -> None:
    """
    The daemon (the primary, with C{--processes}: its workers follow it as they follow its
    own changes) follows what the other daemons on the same store change, models and keys;
    after a change made here, a change to the same model or key that came meanwhile is
    applied too.
    """
    manager = parts.manager
    log.info("aibackend: runtime changes are kept in the shared store {url} (keys {prefix}*), followed here",
             url=store.url, prefix=store.prefix)
    _add(root, "store-follower", FollowService(store, lambda changes, full: manager.follow(config, changes, full)))

    def after_change(model_id):
        if not store.behind():
            return manager.follow(config, store.changes())
        return None

    manager.changed.insert(0, after_change)
    # The keys too, on the same feed: another daemon's key change held here (then told to the workers).
    keys = parts.keys
    store.follow_keys(keys.follow)
    keys.followed = lambda: None if store.behind() else store.key_rows()
    parts.metrics.collectors.register(StoreCollector(store))


def _serve_alone(root, parts: Parts, reactor, listen) -> None:
    for index, description in enumerate(listen):
        _add(root, f"listener-{index}", Listener(reactor, description, parts.site))


def _serve_as_primary(root, parts: Parts, reactor, listen, count: int, worker_argv, internal_token) -> None:
    # The private port workers forward to, then the workers; the public sockets last,
    # so that on stop they close first.
    private = _add(root, "worker-port",
                   Listener(reactor, "tcp:0:interface=127.0.0.1", parts.site, what="port for worker processes"))
    shared = [SharedListener.bound(reactor, parts.site, description, count) for description in listen]
    workers = _add(root, "workers", WorkerProcesses(reactor, count, worker_argv, shared, private, internal_token,
                                                    registry=parts.registry))
    parts.manager.changed.append(workers.sync)
    parts.keys.changed.append(lambda name: workers.sync(f"key {name}"))
    # The limits' table every worker opens; what a worker that ended held there is given back.
    workers.settings["limits"] = parts.limiter.table.path
    workers.ended.append(parts.limiter.forget_process)
    parts.manager.restarted.append(lambda model_id: workers.notify(f"restart {model_id}"))
    for index, listener in enumerate(shared):
        _add(root, f"listener-{index}", listener)
    parts.metrics.collectors.register(ProcessCollector("primary"))


def _serve_as_worker(root, parts: Parts, reactor, config: Config, worker: dict, primary_states, listen=()) -> None:
    parts.front_door.primary = Forwarder(reactor, parts.deps.pool, worker["primary"], worker["token"])

    def follow():
        d = resync(parts.registry, config, parts.store, parts.manager.validate, log)
        return d.addCallback(lambda _: parts.keys.reload())  # the keys too: a revoked key is refused here next

    _add(root, "primary-link", WorkerControl(
        reactor, follow, restart_local(parts.registry, log), ack_fd=worker.get("ack"),
        states=primary_states))
    listen = list(listen)
    for index, (fd, family) in enumerate(worker["fds"]):
        # The primary's sockets come in the order of the listen addresses, which the worker is given too.
        description = listen[index] if index < len(listen) else None
        _add(root, f"listener-{index}", SharedListener.adopted(reactor, parts.site, fd, family, description))
    parts.metrics.collectors.register(ProcessCollector(f"worker-{worker['number']}"))
