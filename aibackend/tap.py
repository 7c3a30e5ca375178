"""
C{twistd aibackend}: the command-line options and the service they make.

Like C{twisted/web/tap.py}: L{Options} is declarative and validates in C{postOptions};
L{makeService} only wires. The C{.tac} file uses both. A bad configuration or a
listening address that cannot be used ends the start with one clear line on stderr and
a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from aibackend import __version__
from aibackend.config import Config, ConfigError, load_config

DEFAULT_MAX_PERSISTENT_PER_HOST = 64
IDLE_CONNECTION_SECONDS = 120


class StartupError(SystemExit):
    """
    Ends C{twistd} with a message and exit status 1, without a traceback.

    twistd prints a L{usage.UsageError} after the whole C{--help} text; a bad
    configuration deserves one line.
    """

    def __init__(self, lines):
        if isinstance(lines, str):
            lines = [lines]
        super().__init__("\n".join(f"aibackend: {line}" for line in lines))


class Options(usage.Options):
    """twistd aibackend [options]"""

    synopsis = "[options]"
    longdesc = (
        "aibackend: one daemon in front of every AI model. Clients call "
        "/post/predict?id=MODEL (and getlogs, cleanlogs); models are HTTP model servers "
        "or supervised programs, configured in a TOML file. Listens on "
        "tcp:8080:interface=127.0.0.1 unless the configuration or --listen says otherwise."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file (models, listen addresses, limits)."],
        ["max-body-bytes", None, None, "The largest request body accepted, in bytes (default 16 MiB).", int],
        ["state", None, None,
         "The state directory, where models added or removed at runtime are kept "
         "(default: the configuration's state_dir, else $XDG_STATE_HOME/aibackend or ~/.local/state/aibackend)."],
        ["log-format", None, "text", "text (twistd's own lines) or json (one JSON object a line, for log shippers)."],
        ["processes", None, "1",
         "How many reactor processes serve the listening sockets (TCP only), sharing one set of "
         "models: a number, or auto for one per core."],
        ["admin-token-file", None, None,
         "A file whose first line is the admin token (16 characters or more) that admin "
         "operations need; AIBACKEND_ADMIN_TOKEN works too. Without one, admin operations are "
         "allowed only from loopback while the daemon listens on loopback alone."],
    ]

    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.toml")})

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """
        A Twisted server endpoint to listen on, such as tcp:8080:interface=127.0.0.1,
        ssl:8443:privateKey=key.pem:certKey=cert.pem or unix:/run/aibackend.sock.
        Repeat for several; replaces the configuration's addresses.
        """
        self["listen"].append(description)

    def opt_version(self):
        """Print the version and exit."""
        print(f"aibackend {__version__}")
        sys.exit(0)

    def postOptions(self):
        try:
            self.config = load_config(self["config"]) if self["config"] else Config()
        except ConfigError as e:
            raise StartupError(e.lines()) from None
        server = self.config.server
        self.listen = tuple(self["listen"]) or server.listen
        self.max_body_bytes = self["max-body-bytes"] or server.max_body_bytes
        if self.max_body_bytes < 1:
            raise StartupError("--max-body-bytes must be at least 1")
        for description in self.listen:
            problem = check_endpoint(description)
            if problem:
                raise StartupError(f"cannot listen on {description!r}: {problem}")
        from aibackend.processes import parse_processes, shared_address, worker_settings

        self.worker = worker_settings(os.environ)
        try:
            self.processes = 1 if self.worker else parse_processes(self["processes"])
            if self.processes > 1:
                for description in self.listen:
                    shared_address(_NoReactor(), description)
        except ValueError as e:
            raise StartupError(str(e)) from None
        if self["log-format"] not in ("text", "json"):
            raise StartupError(f"--log-format must be text or json, got {self['log-format']!r}")
        if self["log-format"] == "json" and self.parent is not None:
            # twistd builds its log observer from its own --logger option, after this.
            from aibackend import logs

            logs.JSON_LOG_FILE = self.parent.get("logfile")
            self.parent["logger"] = "aibackend.logs.json_log_observer"
        from aibackend.auth import TokenError, read_admin_token
        from aibackend.store import default_state_dir

        try:
            self.admin_token = read_admin_token(self["admin-token-file"], os.environ)
        except TokenError as e:
            raise StartupError(str(e)) from None
        self.state_dir = os.path.abspath(self["state"] or server.state_dir or default_state_dir())
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StartupError(f"cannot use the state directory {self.state_dir}: {e.strerror or e}") from None

    def worker_argv(self) -> list[str]:
        """The command line of a worker process (C{--processes}): the same daemon, one reactor."""
        argv = ["-c", "from twisted.scripts.twistd import run; run()", "--pidfile=", "--nodaemon"]
        logfile = self.parent.get("logfile") if self.parent is not None else None
        if logfile and logfile != "-":
            argv.append(f"--logfile={os.path.abspath(logfile)}")
        argv += ["aibackend", "--state", self.state_dir, "--max-body-bytes", str(self.max_body_bytes),
                 "--log-format", self["log-format"]]
        if self["config"]:
            argv += ["--config", os.path.abspath(self["config"])]
        if self["admin-token-file"]:
            argv += ["--admin-token-file", os.path.abspath(self["admin-token-file"])]
        for description in self.listen:
            argv += ["--listen", description]
        return argv


def check_endpoint(description: str) -> str | None:
    """
    @return: what is wrong with a server endpoint description, or None.
    """
    try:
        endpoints.serverFromString(_NoReactor(), description)
    except Exception as e:  # the parser raises many kinds for many endpoint types
        return str(e) or type(e).__name__
    return None


class _NoReactor:
    """Stands in for the reactor while an endpoint string is only parsed."""


DEFAULT_BACKLOG = 1024
_BACKLOG_TYPES = ("tcp:", "tcp6:", "ssl:")


def with_backlog(description: str) -> str:
    """
    A TCP or TLS listen description with a listen backlog of L{DEFAULT_BACKLOG} unless it
    gives one: Twisted's default of 50 makes a burst of new clients wait for SYN retries
    (a second or more); nginx listens with 511, the kernel caps it at somaxconn.
    """
    if description.startswith(_BACKLOG_TYPES) and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class Listener(StreamServerEndpointService):
    """
    Listens on one endpoint; failing to listen ends the start-up with one line, and the
    address really listened on is logged (useful with port 0).
    """

    log = Logger()
    _raiseSynchronously = True

    def __init__(self, reactor, description: str, factory, *, what: str = "listening on"):
        super().__init__(endpoints.serverFromString(reactor, with_backlog(description)), factory)
        self.description = description
        self.what = what
        self.port = None

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(f"cannot listen on {self.description!r}: {e}") from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        self.log.info("aibackend {what} {address}", what=self.what, address=describe_address(port.getHost()))
        return port


def describe_address(address) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{address.port}"
    return f"unix:{getattr(address, 'name', address)}"


class ConnectionPoolService(service.Service):
    """Owns the daemon's HTTP connection pool and closes it on stop."""

    def __init__(self, pool):
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


class ReadinessService(service.Service):
    """Says the front door is ready once everything before it has started, and not ready at stop."""

    def __init__(self, front_door):
        self.front_door = front_door

    def startService(self):
        super().startService()
        self.front_door.accepting = True

    def stopService(self):
        self.front_door.accepting = False
        return super().stopService()


class StoreService(service.Service):
    """Closes the store on stop (after the registry, which may still be writing)."""

    name = "store"

    def __init__(self, store):
        self.store = store

    def stopService(self):
        super().stopService()
        return self.store.close()


def _raise_open_files_limit(connections: int) -> None:
    """Let the daemon hold its max_connections (the soft limit is often 1024), up to the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = connections + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def build_service(config: Config, reactor, *, listen, max_body_bytes, environ=None, state_dir=None,
                  admin_token=None, store=None, processes=1, worker=None, worker_argv=None, subreaper=False):
    """
    Wire the daemon: the HTTP pools, the store, the registry with the configured and the
    kept runtime models, the front door, and a listener per address.

    @param state_dir: where runtime changes are kept (ignored when C{store} is given).
    @param subreaper: make the process a child subreaper (L{aibackend.proctree}), so
        that what the model processes start is found and stopped however it escapes.
    @return: the root L{service.MultiService}.
    """
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    class QuietClientFactory(_HTTP11ClientFactory):
        # One "Starting factory" line per upstream connection is noise in the log.
        noisy = False

    import os

    from aibackend.admin import ModelManager, load_models
    from aibackend.root import FrontDoor
    from aibackend.auth import Guard
    from aibackend.destinations import DestinationPolicy
    from aibackend.metrics import Metrics
    from aibackend.registry import ModelDeps, ModelRegistry
    from aibackend.server import AibackendSite, release_freed_memory
    from aibackend.store import SQLiteStore

    environ = os.environ if environ is None else environ
    root = service.MultiService()
    if subreaper:  # first: started before any model process, stopped with the rest
        from aibackend.proctree import SubreaperService

        SubreaperService(reactor).setServiceParent(root)

    def make_pool():
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = DEFAULT_MAX_PERSISTENT_PER_HOST
        pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
        pool._factory = QuietClientFactory
        ConnectionPoolService(pool).setServiceParent(root)
        return pool

    if store is None:
        store = SQLiteStore(reactor, state_dir)
    StoreService(store).setServiceParent(root)

    policy = DestinationPolicy(config.server.allowed_destinations)
    deps = ModelDeps(reactor=reactor, pool=make_pool(), environ=environ)
    # Runtime models connect through a pool of their own: a connection made for a trusted
    # model is never handed to one whose destinations are checked.
    runtime_deps = ModelDeps(reactor=reactor, pool=make_pool(), environ=environ, destination_policy=policy)
    from aibackend import processes as multi

    builder = primary_states = None
    if worker is not None:
        primary_states = multi.PrimaryStates(reactor, deps.pool, worker["primary"], worker["token"])
        builder = multi.worker_builder(worker, lambda runtime: runtime_deps if runtime else deps,
                                       primary_states.states)
    registry = ModelRegistry(deps, runtime_deps, drain_timeout=config.server.drain_timeout, builder=builder)
    registry.setServiceParent(root)
    manager = ModelManager(
        registry, store, config.server, clock=reactor, destination_policy=policy,
        config_ids=[spec.id for spec in config.models], environ=environ,
    )
    load_models(registry, store, config, manager.validate, Listener.log, manager.tables)

    internal_token = multi.new_token() if processes > 1 else None
    guard = Guard(admin_token, listen, config.server.api_keys, internal_token=internal_token)
    Listener.log.info("aibackend: {note}; runtime HTTP models may reach {policy}", note=guard.startup_note(),
                      policy=policy.describe())
    metrics = Metrics(registry)
    front_door = FrontDoor(registry, reactor, manager=manager, guard=guard, metrics=metrics)
    server = config.server
    site = AibackendSite(
        front_door.resource(), max_body_bytes=max_body_bytes, metrics=metrics, reactor=reactor,
        timeout=server.idle_timeout, header_timeout=server.header_timeout, max_connections=server.max_connections,
        access_log=server.access_log, body_timeout=server.body_timeout, min_body_rate=server.min_body_rate,
        send_timeout=server.send_timeout, max_connections_per_peer=server.max_connections_per_peer,
    )
    release_freed_memory()
    _raise_open_files_limit(server.max_connections)
    root.front_door = front_door
    root.registry = registry
    root.manager = manager
    root.listeners = []
    if worker is not None:
        front_door.primary = multi.Forwarder(reactor, deps.pool, worker["primary"], worker["token"])
        multi.WorkerControl(reactor, lambda: multi.resync(registry, config, store, manager.validate, Listener.log),
                            multi.restart_local(registry, Listener.log),
                            ack_fd=worker.get("ack")).setServiceParent(root)
        primary_states.setServiceParent(root)
        for fd, family in worker["fds"]:
            listener = multi.SharedListener(reactor, site, inherited=(fd, family))
            listener.setServiceParent(root)
            root.listeners.append(listener)
    elif processes > 1:
        # The private port workers forward to, then the workers; the public sockets last,
        # so that on stop they close first.
        private = Listener(reactor, "tcp:0:interface=127.0.0.1", site, what="port for worker processes")
        private.setServiceParent(root)
        shared = [multi.SharedListener(reactor, site, description=description) for description in listen]
        workers = multi.WorkerProcesses(reactor, processes, worker_argv, shared, private, internal_token)
        workers.setServiceParent(root)
        manager.changed.append(workers.sync)
        manager.restarted.append(lambda model_id: workers.notify(f"restart {model_id}"))
        root.workers = workers
        for listener in shared:
            listener.setServiceParent(root)
            root.listeners.append(listener)
    else:
        for description in listen:
            listener = Listener(reactor, description, site)
            listener.setServiceParent(root)
            root.listeners.append(listener)
    # Last, so that on stop it is the first to say "not ready".
    ReadinessService(front_door).setServiceParent(root)
    return root


def makeService(options: Options):
    from twisted.internet import reactor

    return build_service(
        options.config,
        reactor,
        listen=options.listen,
        max_body_bytes=options.max_body_bytes,
        state_dir=options.state_dir,
        admin_token=options.admin_token,
        processes=options.processes,
        worker=options.worker,
        worker_argv=options.worker_argv() if options.processes > 1 else None,
        subreaper=True,
    )
