"""
The daemon's listening sockets, and the one-line failure of a start that cannot listen.

A listen address is a Twisted server endpoint description (C{tcp:8080:interface=127.0.0.1},
C{ssl:...}, C{unix:...}). L{check_endpoint} parses one without a reactor (C{postOptions});
L{Listener} listens on one for a single process; L{SharedListener} is a TCP (or TLS)
address that the C{--processes} processes share: the primary accepts each connection and
serves it or hands it to a worker, whichever has the fewest open (see there). A TCP or TLS listener gets a listen backlog of L{DEFAULT_BACKLOG} unless its
description gives one.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from aibackend.server import AibackendSite

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


def listening_socket(family: int, host: str, port: int, backlog: int) -> socket.socket:
    """
    A non-blocking socket listening on C{(host, port)} (0: a free port). Without
    C{SO_REUSEPORT}: a port another process listens on is refused (C{EADDRINUSE}), with or
    without C{SO_REUSEPORT} on its side, so no other program shares the connections.

    @raise OSError: the port is taken (or cannot be bound).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# What the accept loop gives up on for this turn (the reactor calls it again when more comes).
_ACCEPT_LATER = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# A link that takes no more now (the worker reads none of it; or too many descriptors in
# flight, past RLIMIT_NOFILE), though its worker is there.
_LINK_FULL = (errno.EAGAIN, errno.ETOOMANYREFS, errno.ENOBUFS, errno.ENOMEM)
# Most connections a worker is sent and has not said it took: past them, one is passed over
# (a worker that is stopped or hung holds no more than this waiting).
MAX_UNREAD = 128
# Most connections accepted in one turn of the reactor (as Twisted's own ports do).
MAX_ACCEPTS = 64
# Longest a stop waits for the connections it took (that waited in the listen queue, or
# on a worker's link) to end: their requests are read and answered meanwhile (a client
# that keeps its connection after the answer has it closed by the reactor's shutdown).
STOP_SERVE_SECONDS = 1.0
# What a worker says on its link, a byte each: it took the oldest connection it was sent
# and not yet answered; that one's descriptor was cut off (its file limit: the primary
# serves it); one it took ended.
TOOK, CUT_OFF, ENDED = b"+", b"!", b"-"


class _Adopting:
    """
    What a connection handed to this process is built with: the served factory's
    protocol, its channel (inside TLS for C{ssl:}) kept in C{opened} until it ends.
    """

    def __init__(self, factory, opened: set, born: dict | None = None, seconds=None):
        self.factory = factory
        self.opened = opened
        self.born = born  # channel -> when it was adopted (a stop waits for the newest: see stopService)
        self.seconds = seconds

    def buildProtocol(self, addr):
        built = self.factory.buildProtocol(addr)
        if built is not None:
            channel = built.wrappedProtocol if isinstance(built, ProtocolWrapper) else built
            self.opened.add(channel)
            if self.born is not None:
                self.born[channel] = self.seconds()
        return built


def _adopt(reactor, fd: int, family: int, adopting: _Adopting) -> None:
    """Serve connected socket C{fd} here (the reactor takes a copy; C{fd} is closed)."""
    try:
        reactor.adoptStreamConnection(fd, family, adopting)
    finally:
        os.close(fd)


@implementer(IReadDescriptor)
class _Link:
    """
    The primary's end of a worker's link (a Unix socket pair): each connection handed to
    the worker goes as one byte (its address family) with its file descriptor
    (C{SCM_RIGHTS}); the worker answers each in order, C{+} (it took it) or C{!} (its
    descriptor was cut off there, at the worker's file limit: the primary serves it), and
    says C{-} for each it took that ended.

    The primary keeps its copy of each connection until the worker has said it took it
    (C{unread}): if the worker ends first, what it never read is served by the primary
    (closing the last copy of a connection whose request came resets it). C{open} is how
    many the worker holds (handed, not ended); C{ready} while it is handed connections.
    """

    def __init__(self, listener, number: int, sock: socket.socket):
        self.listener = listener
        self.number = number
        self.sock = sock
        self.open = 0
        self.ready = False
        self.unread: deque = deque()

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return f"worker-{self.number}-link"

    def hand(self, conn: socket.socket, family: int) -> bool:
        """
        Send connection C{conn} to the worker (kept until it says it took it): False if it
        cannot take it now (full, too far behind, or gone).
        """
        if len(self.unread) >= MAX_UNREAD:
            return False  # it reads none of it (stopped, or hung): served elsewhere
        try:
            socket.send_fds(self.sock, [bytes([family])], [conn.fileno()], socket.MSG_NOSIGNAL)
        except OSError as e:
            if e.errno not in _LINK_FULL:  # gone, or stopping (it shut its end for reading)
                self.ready = False  # and what it took, it says before its end closes (doRead)
            return False
        self.unread.append(conn)
        self.open += 1
        return True

    def doRead(self):
        if not self.read():
            self.listener.gone(self)

    def read(self) -> bool:
        """Read what the worker said: False at the end of the link (the worker has gone)."""
        while True:
            try:
                said = self.sock.recv(4096)
            except BlockingIOError:
                return True
            except OSError:
                said = b""
            if not said:
                return False
            for answer in said:  # (a byte each: in order, one a connection handed, one an end)
                if answer == ENDED[0]:
                    self.open = max(0, self.open - 1)
                elif not self.unread:
                    continue
                elif answer == TOOK[0]:
                    self.unread.popleft().close()  # the worker has it
                elif answer == CUT_OFF[0]:
                    self.open = max(0, self.open - 1)  # it never held it: served here
                    self.listener._serve(self.unread.popleft())

    def connectionLost(self, reason):
        pass

    def close(self, unread: bool) -> list[socket.socket]:
        """
        Close the link: with C{unread}, what the worker never said it took is returned (to
        be served elsewhere), else closed (the worker, still there, serves it).
        """
        if self.sock.fileno() >= 0:
            self.read()
        left = list(self.unread)
        self.unread.clear()
        self.sock.close()
        if unread:
            return left
        for conn in left:
            conn.close()
        return []


@implementer(IReadDescriptor)
class _Acceptor:
    """The primary's listening socket, whose connections are each given to a process (L{SharedListener.place})."""

    def __init__(self, listener, sock: socket.socket):
        self.listener = listener
        self.sock = sock
        self.failing = False  # said once, until an accept succeeds (the reactor calls again at once)

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "aibackend-accept"

    def doRead(self):
        self.accept()  # (what doRead returns, the reactor takes for why the descriptor was lost)

    def accept(self, place=True) -> int:
        """Accept up to L{MAX_ACCEPTS} connections and place them: how many were accepted."""
        accepted = 0
        for _ in range(MAX_ACCEPTS):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return accepted
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue  # that one went before it was accepted
                if self.failing:
                    pass
                elif e.errno not in _ACCEPT_LATER:
                    self.listener.log.failure("accepting on {address}", address=self.listener.address)
                else:
                    self.listener.log.warn("aibackend: cannot accept on {address} now: {why}",
                                           address=self.listener.address, why=os.strerror(e.errno))
                self.failing = True
                return accepted
            self.failing = False
            accepted += 1
            conn.setblocking(False)  # as a reactor's connection must be (in the worker too: one file)
            self.listener.place(conn, place)
        return accepted

    def drain(self) -> int:
        """Accept (and serve here) all that waits in the queue: how many."""
        total = 0
        while (accepted := self.accept(place=False)) == MAX_ACCEPTS:
            total += accepted
        return total + accepted

    def connectionLost(self, reason):
        pass


@implementer(IReadDescriptor)
class _Inbox:
    """
    A worker's end of its link (see L{_Link}): adopts each connection the primary hands
    it, answers each (C{+}, or C{!} for one whose descriptor was cut off: a byte a
    connection, so that the primary's matching stays in step; once a read) and says C{-}
    for each that ended (held back while the primary reads none, sent with the next). Its
    last read (on stop, or at the link's end) says what it took before the link closes.
    """

    log = Logger()

    def __init__(self, listener, sock: socket.socket):
        self.listener = listener
        self.sock = sock
        self.unsent = bytearray()

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "aibackend-inbox"

    def doRead(self):
        while True:
            try:
                families, fds, flags, _ = socket.recv_fds(self.sock, MAX_ACCEPTS, MAX_ACCEPTS)
            except BlockingIOError:
                break
            except OSError:
                families, fds, flags = b"", [], 0
            if not families and not fds:  # the primary is gone (its stdin says so too) or stopped handing
                self.listener.reactor.removeReader(self)
                break  # (what was taken is said first: a stopping worker's last read ends here)
            # One answer a connection handed (a byte each): the primary matches them in order.
            for index, family in enumerate(families):
                if index >= len(fds):
                    self.unsent += CUT_OFF  # its descriptor never came (our file limit): the primary serves it
                    continue
                self.unsent += TOOK
                try:
                    _adopt(self.listener.reactor, fds[index], family, self.listener.adopting)
                except Exception:
                    self.log.failure("adopting a connection the primary handed")
                    self.unsent += ENDED
            for fd in fds[len(families):]:  # (never: each descriptor comes with its byte)
                os.close(fd)
            if flags & socket.MSG_CTRUNC:
                self.log.error("aibackend worker: {count} connection(s) the primary handed were cut off its link "
                               "(too many files open here?): served by the primary",
                               count=max(0, len(families) - len(fds)))
        self.flush()

    def ended(self, channel) -> None:
        """One of the connections handed here ended: say so."""
        self.unsent += ENDED
        self.flush()

    def flush(self) -> None:
        if not self.unsent or self.sock.fileno() < 0:
            return
        try:
            del self.unsent[:self.sock.send(self.unsent, socket.MSG_NOSIGNAL)]
        except OSError:
            pass  # the primary reads nothing now, or is gone: sent with the next

    def connectionLost(self, reason):
        pass


class SharedListener(service.Service):
    """
    A TCP (or TLS) address served by the C{--processes} processes, every connection by the
    process with the fewest of this address's connections open (a tie: the next in turn).

    The primary (L{bound}) listens on the address alone, on one socket, and accepts every
    connection: it serves it itself or hands its file descriptor to a worker over that
    worker's link, a Unix socket pair it inherited (C{SCM_RIGHTS}, L{_Link}); the worker
    adopts it (C{adoptStreamConnection}, L{adopted}) and says on the link when it ends.
    The counts are exact, so a burst of new connections (a benchmark's, which then keeps
    them) ends split within one; with C{SO_REUSEPORT}, a socket a process, the kernel
    hashed each connection to one at random (32 connections: 16 +- 2.8 each). Node's
    cluster module does the same for the same reason. The price is the primary's: one
    C{sendmsg} (and a C{close}) for each connection it hands, the worker's C{recvmsg}, and a
    byte back when it ends; nothing a request.

    TLS (C{ssl:}) is wrapped by the process that serves the connection: the descriptor is
    handed before the handshake, so the handshakes spread too.

    A worker is handed connections once it says it listens (L{handed_over}) and until it
    ends (L{taken_back}) or its link breaks: until then, and while every worker is away,
    the primary serves every connection, so none waits for a worker that is not there. The
    primary keeps its copy of each connection handed until the worker says it took it: what
    a worker that ended never took (it died, or stopped, with connections in its link) is
    served by the primary, not reset. A worker that has not taken L{MAX_UNREAD} of what it
    was sent (stopped, hung), or whose link is full, is passed over. Stopping a worker
    first shuts its end for reading (what the primary sends after that fails, and is served
    elsewhere), then takes what was sent, and says so (the primary, at the link's end,
    serves only what it did not take). On stop, the primary serves what waits in its
    socket's queue itself, then closes it; its workers (stopped after it) serve what they
    were sent. What a stop takes so is served: the stop's Deferred fires once those
    connections have ended, or after L{STOP_SERVE_SECONDS} (twistd's shutdown waits for
    it, as for the requests the models drain; then the reactor closes what is left). A
    primary whose reactor is stopped (or busy) leaves new connections in the listen queue
    until it runs: the connections handed before are its workers' to serve.
    """

    log = Logger()

    def __init__(self, reactor, factory, *, description=None, inherited=None, processes: int = 1):
        self.reactor = reactor
        self.site = factory  # the connections that end are counted through it (an AibackendSite)
        self.factory = factory
        self.description = description
        self.inherited = inherited  # (fd, family) in a worker: its link
        self.processes = processes
        self.family = None
        self.socket = None  # the primary's listening socket; a worker's link
        self.address = None
        self.here: set = set()  # the channels of this address's connections served in this process
        self.born: dict = {}  # those channels -> when each was adopted
        self.adopting = None
        self.links: dict[int, _Link] = {}  # in the primary: worker number -> its link
        self._children: dict[int, socket.socket] = {}  # their ends, until the worker is started
        self._acceptor = None
        self._inbox = None
        self._turn = 0
        self._stopping = None  # on stop: (the connections taken then, fired once they have ended)
        self._stopping_call = None

    @classmethod
    def bound(cls, reactor, factory, description: str, processes: int = 2) -> SharedListener:
        """The primary's: listens on C{description} for C{processes} processes when it starts."""
        return cls(reactor, factory, description=description, processes=processes)

    @classmethod
    def adopted(cls, reactor, factory, fd: int, family: int, description: str | None = None) -> SharedListener:
        """
        A worker's: serves the connections handed on the link it inherited as C{fd}, as
        C{description} says (in TLS for C{ssl:}).
        """
        return cls(reactor, factory, description=description, inherited=(fd, family))

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.description is not None:
            try:
                self.factory = served_factory(self.description, self.factory)
            except Exception as e:  # the parser raises many kinds for many endpoint types
                raise StartupError(f"cannot listen on {self.description!r}: {e}") from None
        self.adopting = _Adopting(self.factory, self.here, self.born, lambda: self.reactor.seconds())
        if isinstance(self.site, AibackendSite):
            self.site.on_connection_lost.append(self._ended)
        if self.inherited is not None:
            fd, _ = self.inherited
            self.socket = socket.socket(fileno=fd)
            self.socket.setblocking(False)
            self._inbox = _Inbox(self, self.socket)
            self.factory.doStart()
            self.reactor.addReader(self._inbox)
            return
        try:
            family, host, port, backlog = shared_address(self.description)
            self.socket = listening_socket(family, host, port, backlog)
        except (OSError, ValueError) as e:
            raise StartupError(f"cannot listen on {self.description!r}: {e}") from None
        self.family = family
        self.address = describe_address(_address(family, self.socket.getsockname()))
        self.factory.doStart()
        self._acceptor = _Acceptor(self, self.socket)
        self.reactor.addReader(self._acceptor)
        self.log.info("aibackend listening on {address} (for {count} processes, each connection to the one "
                      "with the fewest)", address=self.address, count=self.processes)

    # --- in the primary ------------------------------------------------------------------

    def socket_for(self, number: int) -> socket.socket:
        """
        The end of a new link that worker C{number} inherits (L{spawned} closes the
        primary's copy once the worker has it); its connections come once it listens.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.setblocking(False)
        self._drop(number, unread=True)
        self._closed_child(number)
        self.links[number] = _Link(self, number, mine)
        self._children[number] = theirs
        self.reactor.addReader(self.links[number])
        return theirs

    def spawned(self, number: int) -> None:
        """Worker C{number} was started with its end of the link: the primary closes its copy."""
        self._closed_child(number)

    def handed_over(self, number: int) -> None:
        """Worker C{number} listens now: it is handed its share of the new connections."""
        link = self.links.get(number)
        if link is None or link.ready:
            return
        link.ready = True
        self.log.info("aibackend worker {number} is handed connections on {address}", number=number,
                      address=self.address)

    def taken_back(self, number: int) -> None:
        """
        Worker C{number} ended: the others (and the primary) serve the new connections, and
        the primary what it was sent and never took.
        """
        self._drop(number, unread=True)
        self._closed_child(number)

    def gone(self, link: _Link) -> None:
        """C{link} ended (its worker is gone, or stopped and has said what it took)."""
        if self.links.get(link.number) is link:
            self._drop(link.number, unread=True)

    def place(self, conn: socket.socket, hand: bool = True) -> None:
        """
        Serve accepted connection C{conn} in the process with the fewest of this address's
        connections open (ties in turn; here with C{hand=False}, or when no worker can
        take it).
        """
        if hand and self.links:
            ready = [link for link in self.links.values() if link.ready]
            count = len(ready) + 1
            start = self._turn % count
            self._turn += 1
            best, fewest = None, None
            for index in range(count):
                at = (start + index) % count
                candidate = ready[at - 1] if at else None
                held = candidate.open if candidate is not None else len(self.here)
                if fewest is None or held < fewest:
                    best, fewest = candidate, held
            if best is not None and best.hand(conn, self.family):
                return  # (the link keeps conn until the worker took it)
        self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        fd = conn.detach()
        try:
            _adopt(self.reactor, fd, self.family, self.adopting)
        except Exception:
            self.log.failure("serving a connection on {address}", address=self.address)

    def _drop(self, number: int, unread: bool) -> None:
        """
        Close worker C{number}'s link: what it never took is served here (C{unread}: it has
        ended), or left to it (it is there, and stops after the primary).
        """
        link = self.links.pop(number, None)
        if link is None:
            return
        self.reactor.removeReader(link)
        left = link.close(unread)
        if left:
            self.log.info("aibackend: {count} connection(s) handed to worker {number}, which ended before it took "
                          "them, served by the primary", count=len(left), number=number)
        for conn in left:
            self._serve(conn)

    def _closed_child(self, number: int) -> None:
        theirs = self._children.pop(number, None)
        if theirs is not None:
            theirs.close()

    # --- in every process ------------------------------------------------------------------

    def _ended(self, channel) -> None:
        if channel in self.here:
            self.here.discard(channel)
            self.born.pop(channel, None)
            if self._inbox is not None:
                self._inbox.ended(channel)
            if self._stopping is not None:
                caught, _ = self._stopping
                caught.discard(channel)
                if not caught:
                    self._served()

    def stopService(self):
        """
        Stop handing and taking connections; what waits in the listen queue (the primary)
        or was sent on the link (a worker) is taken here and served: the Deferred returned
        fires once those connections have ended, or after L{STOP_SERVE_SECONDS} (a client
        that keeps its connection after its answer), None when there were none.
        """
        super().stopService()
        before = set(self.here)
        if self._acceptor is not None:
            self.reactor.removeReader(self._acceptor)
            self._acceptor.drain()  # closing resets what waits in the queue: served here
            self._acceptor = None
        if self._inbox is not None:
            # What the primary sends from now on fails there (and is served elsewhere); what
            # it sent before is taken (and said so, for the primary not to serve it too).
            try:
                self.socket.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            self.reactor.removeReader(self._inbox)
            self._inbox.doRead()
            self._inbox = None
        for number in list(self.links):
            self._drop(number, unread=False)  # the workers stop after: they serve what they were sent
        for number in list(self._children):
            self._closed_child(number)
        if self.socket is not None:
            self.socket.close()
        # What was taken now, and what was taken in the last moments before (a connection
        # handed over or accepted just before the stop, its request perhaps not read yet):
        # served before the stop is done, as what waited in the queue.
        caught = self.here - before
        if self.born:  # (none taken: no clock read, as in a reactor without one)
            recent = self.reactor.seconds() - STOP_SERVE_SECONDS
            caught |= {channel for channel in self.here if self.born.get(channel, recent) > recent}
        if not caught:
            self._stopped()
            return None
        self._stopping = (caught, Deferred())
        self._stopping_call = self.reactor.callLater(STOP_SERVE_SECONDS, self._served)
        return self._stopping[1]

    def _served(self) -> None:
        """What was taken on stop has ended (or its time is up): the stop is done."""
        stopping, self._stopping = self._stopping, None
        if stopping is None:
            return
        call, self._stopping_call = self._stopping_call, None
        if call is not None and call.active():
            call.cancel()
        self._stopped()
        stopping[1].callback(None)

    def _stopped(self) -> None:
        if isinstance(self.site, AibackendSite) and self._ended in self.site.on_connection_lost:
            self.site.on_connection_lost.remove(self._ended)
        if self.socket is not None:
            self.socket = None
            self.factory.doStop()


def _address(family: int, name):
    """The address a listening socket's C{getsockname()} names."""
    if family == socket.AF_INET6:
        return IPv6Address("TCP", name[0], name[1])
    return IPv4Address("TCP", name[0], name[1])
