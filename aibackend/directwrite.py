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
    wrote it has been handled (L{Writes.event_done}), so the model starts on a request
    while the daemon is still finishing its own bookkeeping;
  - busy: at the end of the reactor's turn, once every event of the turn is handled.
    Sending at once then costs more CPU per request than Twisted's own path (measured
    with wrk at concurrency 32: more and smaller wake-ups of the model server and of
    the daemon); holding until the end of the turn keeps the batching a busy reactor
    gets for free.

Only what the kernel does not take goes to Twisted's own buffer, so flow control and
producers work as before. A connection that is closed sends what it holds first. It
applies to plain TCP transports only (L{twisted.internet.tcp.Server} and C{Client}); TLS
and anything else keep Twisted's write.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from twisted.internet import tcp


class Writes:
    """The held writes of one reactor."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.held: list = []
        self.call = None
        self.written = 0  # connections written to in this turn
        self.busy = False  # the last turn wrote to more than one

    def hold(self, transport, data: bytes) -> None:
        transport._aibackend_held = [data]
        self.held.append(transport)
        self.written += 1
        if self.call is None:
            self.call = self.reactor.callLater(0, self.end_of_turn)

    def event_done(self) -> None:
        """An event was handled: if the reactor is quiet, send what it wrote now."""
        if not self.busy and self.held:
            self.send_held()

    def end_of_turn(self) -> None:
        self.call = None
        self.busy = self.written > 1
        self.written = 0
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
    transport._aibackend_buffered_write(data)


_writes: WeakKeyDictionary = WeakKeyDictionary()


def writes_for(reactor) -> Writes:
    writes = _writes.get(reactor)
    if writes is None:
        writes = _writes[reactor] = Writes(reactor)
    return writes


def hold_writes(transport, reactor) -> Writes | None:
    """
    Make C{transport}'s C{write} and C{writeSequence} hold what is written while its
    buffer is empty, and send it with one C{send()} (see the module's docstring).

    @return: the reactor's L{Writes} (call its C{event_done} once an event is handled),
        or None where it does not apply (not a plain TCP connection).
    """
    if type(transport) not in (tcp.Server, tcp.Client) or getattr(transport, "TLS", False):
        return None
    writes = writes_for(reactor)
    buffered_write = transport._aibackend_buffered_write = transport.write
    lose, lose_write, abort = transport.loseConnection, transport.loseWriteConnection, transport.abortConnection
    transport._aibackend_held = None

    def write(data: bytes) -> None:
        held = transport._aibackend_held
        if held is not None and type(data) is bytes:
            held.append(data)
        elif (
            type(data) is bytes
            and data
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnecting
            and not transport._writeDisconnected
        ):
            writes.hold(transport, data)
        else:
            buffered_write(data)

    def writeSequence(iovec) -> None:
        write(b"".join(iovec))

    def loseConnection(*args, **kwargs):
        send(transport)
        return lose(*args, **kwargs)

    def loseWriteConnection():
        send(transport)
        return lose_write()

    def abortConnection():
        transport._aibackend_held = None
        return abort()

    transport.write = write
    transport.writeSequence = writeSequence
    transport.loseConnection = loseConnection
    transport.loseWriteConnection = loseWriteConnection
    transport.abortConnection = abortConnection
    return writes
