"""
The daemon's listening sockets, and the one-line failure of a start that cannot listen.

A listen address is a Twisted server endpoint description (C{tcp:8080:interface=127.0.0.1},
C{ssl:...}, C{unix:...}). L{check_endpoint} parses one without a reactor (C{postOptions});
L{Listener} listens on one for a single process; L{SharedListener} is a TCP socket that
the C{--processes} primary binds and its workers inherit and adopt. A TCP or TLS listener
gets a listen backlog of L{DEFAULT_BACKLOG} unless its description gives one.
"""

from __future__ import annotations

import os
import socket

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger

DEFAULT_BACKLOG = 1024
_BACKLOG_TYPES = ("tcp:", "tcp6:", "ssl:")


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


class _NoReactor:
    """Stands in for the reactor while an endpoint string is only parsed."""


def check_endpoint(description: str) -> str | None:
    """
    @return: what is wrong with a server endpoint description, or None.
    """
    try:
        endpoints.serverFromString(_NoReactor(), description)
    except Exception as e:  # the parser raises many kinds for many endpoint types
        return str(e) or type(e).__name__
    return None


def with_backlog(description: str) -> str:
    """
    A TCP or TLS listen description with a listen backlog of L{DEFAULT_BACKLOG} unless it
    gives one: Twisted's default of 50 makes a burst of new clients wait for SYN retries
    (a second or more); nginx listens with 511, the kernel caps it at somaxconn.
    """
    if description.startswith(_BACKLOG_TYPES) and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def shared_address(description: str):
    """
    C{(family, host, port, backlog)} of a TCP listen description, which processes can share.

    @raise ValueError: it is not a TCP endpoint.
    """
    endpoint = endpoints.serverFromString(_NoReactor(), with_backlog(description))
    if isinstance(endpoint, endpoints.TCP6ServerEndpoint):
        family = socket.AF_INET6
    elif isinstance(endpoint, endpoints.TCP4ServerEndpoint):
        family = socket.AF_INET
    else:
        raise ValueError(f"--processes shares TCP sockets only; {description!r} is not tcp: or tcp6:")
    # Twisted's TCP endpoints keep what they were given in these fields and offer no reader.
    host = endpoint._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return family, host, endpoint._port, endpoint._backlog


def describe_address(address) -> str:
    """An address listened on, as a log line shows it (C{http://127.0.0.1:8080}, C{unix:/path})."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        shown = f"[{address.host}]" if ":" in address.host else address.host
        return f"http://{shown}:{address.port}"
    if isinstance(address, UNIXAddress):  # its name is bytes (it showed as unix:b'/path')
        return f"unix:{os.fsdecode(address.name)}"
    return f"unix:{address}"


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


class SharedListener(service.Service):
    """
    A listening socket served by several processes (C{--processes}): the primary binds it
    (L{bound}) and passes it on; a worker adopts the one it inherited (L{inherited}).
    """

    log = Logger()

    def __init__(self, reactor, factory, *, description=None, inherited=None):
        self.reactor = reactor
        self.factory = factory
        self.description = description
        self.inherited = inherited  # (fd, family) in a worker
        self.socket = None
        self.port = None

    @classmethod
    def bound(cls, reactor, factory, description: str) -> SharedListener:
        """The primary's: binds C{description} when it starts."""
        return cls(reactor, factory, description=description)

    @classmethod
    def adopted(cls, reactor, factory, fd: int, family: int) -> SharedListener:
        """A worker's: adopts the socket it inherited as C{fd} when it starts."""
        return cls(reactor, factory, inherited=(fd, family))

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.inherited is not None:
            fd, family = self.inherited
            self.port = self.reactor.adoptStreamPort(fd, family, self.factory)
            os.close(fd)  # adoptStreamPort took a copy
            return
        try:
            family, host, port, backlog = shared_address(self.description)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except (OSError, ValueError) as e:
            raise StartupError(f"cannot listen on {self.description!r}: {e}") from None
        self.socket = sock
        self.port = self.reactor.adoptStreamPort(sock.fileno(), family, self.factory)
        self.log.info("aibackend listening on {address}", address=describe_address(self.port.getHost()))

    def stopService(self):
        super().stopService()
        d = self.port.stopListening() if self.port is not None else None
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        return d
