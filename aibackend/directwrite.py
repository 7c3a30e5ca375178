"""
Writes that reach the socket without a trip through the reactor's write registration.

Twisted's TCP transport buffers every write: C{write()} registers the socket with the
reactor for writing, the reactor's next C{epoll_wait} reports it writable, the data is
sent, and the socket is unregistered again. That is two C{epoll_ctl} calls, one more
C{epoll_wait} and a dispatch for every write. The hot path writes three times per
request: the request to the model, then the answer's headers and its body to the client.

Here, what is written to a transport with nothing buffered is held and sent with one
C{send()}: the answer's headers and body go out together. When it is sent depends on how
busy the reactor is:

  - quiet (its last turn wrote to at most one connection): as soon as the event that
    wrote it has been handled (L{Writes.event_done}); a request to a model goes at once
    (the lean client's L{flush}), so the model starts on it while the daemon is still
    finishing its own bookkeeping;
  - busy: at the end of the reactor's turn, once every event of the turn is handled.
    Sending at once then costs more CPU per request than Twisted's own path (measured
    with wrk at concurrency 32: more and smaller wake-ups of the model server and of
    the daemon); holding until the end of the turn keeps the batching a busy reactor
    gets for free.

A turn's end is a C{callLater(0)}. A busy reactor needs one each turn; a quiet one sends
at each event's end and needs it only to see whether it is still quiet, so for what a
connection's event writes (between L{Writes.event_begins} and L{Writes.event_done}) it
looks at one turn (the first, then one in L{LOOK_EVERY} holds) and makes no DelayedCall
for the others: at concurrency 1 that was two DelayedCalls a request. What is written
outside such an event (a timer's answer, a model process's output) always has its turn's
end to be sent at.

Whatever the reactor's mood, a stream's first chunk goes at once (L{flush}): the time to
a stream's first token matters more than the one more C{send()}.

Only what the kernel does not take goes to Twisted's own buffer, so flow control and
producers work as before. A large write (C{LARGE} bytes or more: a big request body on its
way to a model, a big answer) is not held: what is held before it is sent, and it goes to
Twisted's buffer as it is, which sends it in slices without a copy; joining it to what is
held, or slicing off what the kernel took, would copy all of it. A connection that is
closed sends what it holds first. It applies to plain TCP transports only
(L{twisted.internet.tcp.Server} and C{Client}); TLS and anything else keep Twisted's write.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.logger import Logger

LARGE = 65536
# A quiet reactor looks at how busy its turn is at one hold in this many (see above).
LOOK_EVERY = 16

# What of a Twisted TCP connection this module reads (none of it is public API): if a
# Twisted release has not all of it, held writes turn themselves off, saying so once.
RELIED_ON = (
    "_tempDataLen", "offset", "dataBuffer", "socket", "connected", "_aborting", "TLS",
    "disconnecting", "_writeDisconnecting", "_writeDisconnected",
)
_log = Logger()
_usable: bool | None = None  # known at the first connection


class Writes:
    """The held writes of one reactor."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.held: list = []
        self.call = None
        self.written = 0  # connections written to in this turn (a turn looked at)
        self.busy = False  # the last turn looked at wrote to more than one
        self.unlooked = LOOK_EVERY - 1  # holds of a quiet reactor since it looked (the first is)
        self.in_event = False  # a connection's event is being handled (its end calls event_done)
        # Once the reactor is stopping, what is written goes at once: the shutdown may
        # close every connection (disconnectAll) before another turn begins.
        self.stopping = False
        add_trigger = getattr(reactor, "addSystemEventTrigger", None)
        if add_trigger is not None:
            add_trigger("before", "shutdown", self.reactor_stopping)

    def reactor_stopping(self) -> None:
        self.stopping = True
        self.send_held()

    def hold(self, transport, data: bytes) -> None:
        transport._aibackend_held = [data]
        if self.stopping:
            send(transport)
            return
        self.held.append(transport)
        if self.call is None:
            if not self.busy and self.in_event:
                # Quiet: L{event_done} sends it; this turn's end is looked at now and then.
                self.unlooked += 1
                if self.unlooked < LOOK_EVERY:
                    return
                self.unlooked = 0
            self.call = self.reactor.callLater(0, self.end_of_turn)
        self.written += 1

    def event_begins(self) -> None:
        """A connection's event is being handled; L{event_done} follows, whatever happens."""
        self.in_event = True

    def event_done(self) -> None:
        """An event was handled: if the reactor is quiet, send what it wrote now."""
        self.in_event = False
        if not self.busy and self.held:
            self.send_held()

    def end_of_turn(self) -> None:
        self.call = None
        self.busy = self.written > 1
        self.written = 0
        if not self.busy:
            self.unlooked = 0
        self.send_held()

    def send_held(self) -> None:
        held, self.held = self.held, []
        for transport in held:
            send(transport)


def send(transport) -> None:
    """Send what C{transport} holds (its event or turn is over, or it is closing)."""
    chunks = transport._aibackend_held
    if chunks is None:
        return
    transport._aibackend_held = None
    if not transport.connected or getattr(transport, "_aborting", False):
        return  # closed meanwhile: what was written goes nowhere, as with Twisted's own write
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not transport._tempDataLen and transport.offset == len(transport.dataBuffer):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, or a broken connection: Twisted's write buffers it, and the
            # reactor's next attempt sends it or closes the connection its usual way.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    tcp.Connection.write(transport, data)


class _HeldWrites:
    """
    Mixed in before L{tcp.Server} or L{tcp.Client} (L{hold_writes} changes a
    transport's class): the methods are the class's, so a connection costs one more
    attribute, not closures of its own.
    """

    _aibackend_held = None
    _aibackend_writes: Writes

    def write(self, data: bytes) -> None:
        held = self._aibackend_held
        if type(data) is bytes and len(data) >= LARGE:
            if held is not None:
                send(self)
            tcp.Connection.write(self, data)
        elif held is not None and type(data) is bytes:
            held.append(data)
        elif (
            type(data) is bytes
            and data
            and not self.TLS
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._writeDisconnected
        ):
            self._aibackend_writes.hold(self, data)
        else:
            tcp.Connection.write(self, data)

    def writeSequence(self, iovec) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self, *args, **kwargs):
        send(self)
        return super().loseConnection(*args, **kwargs)

    def loseWriteConnection(self):
        send(self)
        return super().loseWriteConnection()

    def abortConnection(self):
        self._aibackend_held = None
        return super().abortConnection()


class _HeldServer(_HeldWrites, tcp.Server):
    pass


class _HeldClient(_HeldWrites, tcp.Client):
    pass


_HELD = {tcp.Server: _HeldServer, tcp.Client: _HeldClient}
_writes: dict = {}  # reactor -> its Writes (a process has one reactor)


def flush(transport) -> None:
    """
    Send what C{transport} holds now, not at the end of the event or turn: for a write
    whose latency matters more than the one C{send()} it costs (a stream's first chunk).
    A transport whose writes are not held (TLS, not TCP) sends them its own way.
    """
    if isinstance(transport, _HeldWrites):
        send(transport)


def event_done(reactor) -> None:
    """An event other than a connection's was handled (a model process's output, say)."""
    writes = _writes.get(reactor)
    if writes is not None:
        writes.event_done()


def hold_writes(transport, reactor) -> Writes | None:
    """
    Make C{transport}'s C{write} and C{writeSequence} hold what is written while its
    buffer is empty, and send it with one C{send()} (see the module's docstring).

    @return: the reactor's L{Writes} (call its C{event_done} once an event is handled),
        or None where it does not apply (not a plain TCP connection).
    """
    held = _HELD.get(type(transport))
    if held is None or not _fits(transport) or transport.TLS:
        return None
    writes = _writes.get(reactor)
    if writes is None:
        writes = _writes[reactor] = Writes(reactor)
    transport.__class__ = held
    transport._aibackend_writes = writes
    return writes


def _fits(transport) -> bool:
    """Whether this Twisted's TCP connections have what L{RELIED_ON} names (checked once)."""
    global _usable
    if _usable is None:
        missing = [name for name in RELIED_ON if not hasattr(transport, name)]
        _usable = not missing
        if missing:
            _log.warn("held writes are off: this Twisted's TCP connections have no {missing}; "
                      "writes go through Twisted's own buffer", missing=", ".join(missing))
    return _usable
