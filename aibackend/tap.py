"""
C{twistd aibackend}: the command-line options and the service they make.

Like C{twisted/web/tap.py}: L{Options} is declarative and validates in C{postOptions};
L{makeService} only wires. The C{.tac} file uses both. A bad configuration or a
listening address that cannot be used ends the start with one clear line on stderr and
a non-zero exit, never a traceback.
"""

from __future__ import annotations

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


class Listener(StreamServerEndpointService):
    """
    Listens on one endpoint; failing to listen ends the start-up with one line, and the
    address really listened on is logged (useful with port 0).
    """

    log = Logger()
    _raiseSynchronously = True

    def __init__(self, reactor, description: str, factory):
        super().__init__(endpoints.serverFromString(reactor, description), factory)
        self.description = description
        self.port = None

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(f"cannot listen on {self.description!r}: {e}") from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        self.log.info("aibackend listening on {address}", address=describe_address(port.getHost()))
        return port


def describe_address(address) -> str:
    host = getattr(address, "host", None)
    if host is not None:
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{address.port}"
    return f"unix:{getattr(address, 'name', address)}"


class ConnectionPoolService(service.Service):
    """Owns the daemon's HTTP connection pool and closes it on stop."""

    name = "http-pool"

    def __init__(self, pool):
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


def build_service(config: Config, reactor, *, listen, max_body_bytes, environ=None):
    """
    Wire the daemon: the HTTP pool, the registry with the configured models, the front
    door, and a listener per address.

    @return: the root L{service.MultiService}.
    """
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    class QuietClientFactory(_HTTP11ClientFactory):
        # One "Starting factory" line per upstream connection is noise in the log.
        noisy = False

    from aibackend.api import FrontDoor
    from aibackend.registry import ModelDeps, ModelRegistry
    from aibackend.server import AibackendSite

    root = service.MultiService()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = DEFAULT_MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
    pool._factory = QuietClientFactory
    ConnectionPoolService(pool).setServiceParent(root)

    deps = ModelDeps(reactor=reactor, pool=pool)
    if environ is not None:
        deps.environ = environ
    registry = ModelRegistry(deps)
    registry.setServiceParent(root)
    for spec in config.models:
        registry.add(registry.build(spec))

    front_door = FrontDoor(registry, reactor)
    site = AibackendSite(front_door.resource(), max_body_bytes=max_body_bytes)
    root.front_door = front_door
    root.registry = registry
    root.listeners = []
    for description in listen:
        listener = Listener(reactor, description, site)
        listener.setServiceParent(root)
        root.listeners.append(listener)
    return root


def makeService(options: Options):
    from twisted.internet import reactor

    return build_service(
        options.config, reactor, listen=options.listen, max_body_bytes=options.max_body_bytes
    )
