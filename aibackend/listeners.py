"""
The daemon's listening sockets, and the one-line failure of a start that cannot listen.

A listen address is a Twisted server endpoint description (C{tcp:8080:interface=127.0.0.1},
C{ssl:...}, C{unix:...}). L{check_endpoint} parses one without a reactor (C{postOptions});
L{Listener} listens on one for a single process; L{SharedListener} is a TCP (or TLS)
address that the C{--processes} processes share, each on a socket of its own
(C{SO_REUSEPORT}, see there). A TCP or TLS listener gets a listen backlog of L{DEFAULT_BACKLOG} unless its
description gives one.
"""

from __future__ import annotations

import os
import select
import socket

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import DeferredList
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IReadDescriptor
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
    C{(family, host, port, backlog)} of a TCP or TLS listen description, which processes
    can share.

    @raise ValueError: it is neither (C{unix:}...).
    """
    endpoint = endpoints.serverFromString(_NoReactor(), with_backlog(description))
    if isinstance(endpoint, endpoints.TCP6ServerEndpoint):
        family = socket.AF_INET6
    elif isinstance(endpoint, endpoints.TCP4ServerEndpoint):
        family = socket.AF_INET
    elif isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        family = socket.AF_INET6 if ":" in (endpoint._interface or "") else socket.AF_INET
    else:
        raise ValueError(f"--processes shares TCP sockets only (TLS included); {description!r} is not tcp:, "
                         "tcp6: or ssl:")
    # Twisted's TCP and TLS endpoints keep what they were given in these fields and offer no reader.
    host = endpoint._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return family, host, endpoint._port, endpoint._backlog


def served_factory(description: str, factory):
    """
    What a process serves a shared address's connections with: C{factory}, in TLS for an
    C{ssl:} address (its key and certificate as the description gives them, as Twisted's
    own C{ssl:} endpoint would serve them).
    """
    endpoint = endpoints.serverFromString(_NoReactor(), description)
    if not isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        return factory
    from twisted.protocols.tls import TLSMemoryBIOFactory  # here: only ssl: needs pyOpenSSL

    # The endpoint keeps the context factory it parsed in this field and offers no reader.
    return TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)


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


def claim(family: int, host: str, port: int) -> int:
    """
    Make sure that no other process listens on C{(host, port)}, and learn the port (0: a
    free one): bind a socket there I{without} C{SO_REUSEPORT}, then close it. A process
    of the same user that holds the port with C{SO_REUSEPORT} would let our sockets join
    its group, and the kernel would share our connections with it; this bind fails
    instead (C{EADDRINUSE}), as it does for a port held without it.

    @return: the port.
    @raise OSError: the port is taken (or cannot be bound).
    """
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        return probe.getsockname()[1]


def reuseport_socket(family: int, host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking socket listening on C{(host, port)} with C{SO_REUSEPORT}, one of a group."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def accept_waiting(port, limit: int = 64) -> int:
    """
    Accept what waits in a listening port's queue (its C{doRead}, until the socket has
    nothing more to accept): called just before the port closes, since closing a socket
    resets the connections in its queue. A port that is not a reactor's descriptor (a
    test's fake) has nothing to accept.

    @return: how many times the port accepted.
    """
    if not IReadDescriptor.providedBy(port):
        return 0
    poller = select.poll()
    poller.register(port.fileno(), select.POLLIN)
    rounds = 0
    while rounds < limit and poller.poll(0):
        port.doRead()
        rounds += 1
    return rounds


def _stop(port):
    """Stop a port, after accepting what waits in its queue."""
    accept_waiting(port)
    return port.stopListening()


class SharedListener(service.Service):
    """
    A TCP address served by the C{--processes} processes, each on a listening socket of
    its own in one C{SO_REUSEPORT} group: the kernel hashes each new connection to one of
    the group's sockets, so connections spread over the processes (on one shared socket,
    whichever process woke first took a burst of them all).

    The primary (L{bound}) makes the whole group as it starts, before privileges are
    dropped and before any worker runs: it L{claim}s the address (no other process
    listens there; port 0 becomes the free port found), then binds one socket for itself
    and one for each worker number (1 to C{processes - 1}). It keeps every worker's
    socket for the daemon's life and serves it itself whenever its worker is not
    listening on it: before the worker has started (L{handed_over} when the worker says
    it listens), and after it ended (L{taken_back}), until the worker started again in
    its place inherits the same socket. So no connection the kernel gave a socket waits
    for a worker that is not there, and a restarted worker needs no bind (nor the
    privileges a low port needs). A worker (L{adopted}) serves the socket it inherited.

    On stop, each process first accepts what waits in its socket's queue
    (L{accept_waiting}), then closes it; the primary closes its copies of the workers'
    sockets too, so that each closes with its worker. What reaches a socket between its
    last accept and its close (microseconds) is reset, as at any server's last close;
    Linux 5.14+ with C{net.ipv4.tcp_migrate_req = 1} moves those to another socket of
    the group instead.
    """

    log = Logger()

    def __init__(self, reactor, factory, *, description=None, inherited=None, processes: int = 1):
        self.reactor = reactor
        self.factory = factory
        self.description = description
        self.inherited = inherited  # (fd, family) in a worker
        self.processes = processes
        self.family = None
        self.socket = None  # the primary's own socket
        self.port = None  # the port serving this process's own socket
        self.worker_sockets: dict[int, socket.socket] = {}  # in the primary: worker number -> its socket
        self.serving: dict[int, object] = {}  # in the primary: worker number -> the port serving it here
        self.address = None

    @classmethod
    def bound(cls, reactor, factory, description: str, processes: int = 2) -> SharedListener:
        """The primary's: binds the group of C{description} for C{processes} processes when it starts."""
        return cls(reactor, factory, description=description, processes=processes)

    @classmethod
    def adopted(cls, reactor, factory, fd: int, family: int, description: str | None = None) -> SharedListener:
        """
        A worker's: adopts the socket it inherited as C{fd} when it starts, and serves it
        as C{description} says (in TLS for C{ssl:}).
        """
        return cls(reactor, factory, description=description, inherited=(fd, family))

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.description is not None:
            try:
                self.factory = served_factory(self.description, self.factory)
            except Exception as e:  # the parser raises many kinds for many endpoint types
                raise StartupError(f"cannot listen on {self.description!r}: {e}") from None
        if self.inherited is not None:
            fd, self.family = self.inherited
            self.port = self.reactor.adoptStreamPort(fd, self.family, self.factory)
            os.close(fd)  # adoptStreamPort took a copy
            return
        sockets = []
        try:
            family, host, port, backlog = shared_address(self.description)
            port = claim(family, host, port)
            for _ in range(self.processes):
                sockets.append(reuseport_socket(family, host, port, backlog))
        except (OSError, ValueError) as e:
            for sock in sockets:
                sock.close()
            raise StartupError(f"cannot listen on {self.description!r}: {e}") from None
        self.family = family
        self.socket, *others = sockets
        self.worker_sockets = dict(enumerate(others, 1))
        self.port = self.reactor.adoptStreamPort(self.socket.fileno(), family, self.factory)
        self.address = describe_address(self.port.getHost())
        for number in self.worker_sockets:
            self.serving[number] = self.reactor.adoptStreamPort(self.worker_sockets[number].fileno(), family,
                                                                self.factory)
        self.log.info("aibackend listening on {address} ({count} sockets, one a process)",
                      address=self.address, count=len(sockets))

    def socket_for(self, number: int) -> socket.socket:
        """The socket worker C{number} inherits (the primary's)."""
        return self.worker_sockets[number]

    def handed_over(self, number: int):
        """Worker C{number} listens on its socket now: the primary stops serving it (None if it was not)."""
        port = self.serving.pop(number, None)
        if port is None:
            return None
        self.log.info("aibackend worker {number} serves its socket on {address}", number=number,
                      address=self.address)
        return port.stopListening()  # what waits in the queue is the worker's to accept

    def taken_back(self, number: int) -> None:
        """Worker C{number} ended: the primary serves its socket until another takes it."""
        if not self.running or number in self.serving or number not in self.worker_sockets:
            return
        self.serving[number] = self.reactor.adoptStreamPort(self.worker_sockets[number].fileno(), self.family,
                                                            self.factory)

    def stopService(self):
        super().stopService()
        stopped = []
        if self.port is not None:
            stopped.append(_stop(self.port))
        for port in self.serving.values():
            stopped.append(_stop(port))
        self.serving.clear()
        for sock in [self.socket, *self.worker_sockets.values()]:
            if sock is not None:
                sock.close()
        self.socket = None
        self.worker_sockets.clear()
        stopped = [d for d in stopped if d is not None]
        return DeferredList(stopped) if stopped else None
