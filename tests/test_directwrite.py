"""
aibackend.directwrite: held writes on real loopback TCP connections.

The transports are the real reactor's (tcp.Server and tcp.Client over 127.0.0.1); the
turns of L{Writes} run on an injected Clock, so a test says when a turn ends.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport

from aibackend.directwrite import LOOK_EVERY, Writes, hold_writes


class Recorder(protocol.Protocol):
    """The peer: keeps what it receives, and says when the connection ends."""

    def __init__(self):
        self.received = b""
        self.made = defer.Deferred()
        self.lost = defer.Deferred()
        self.waiting = []

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.received += data
        for size, d in list(self.waiting):
            if len(self.received) >= size:
                self.waiting.remove((size, d))
                d.callback(self.received)

    def connectionLost(self, reason):
        self.lost.callback(reason.value)

    def until(self, size: int) -> defer.Deferred:
        """Fires once C{size} bytes have arrived."""
        if len(self.received) >= size:
            return defer.succeed(self.received)
        d = defer.Deferred()
        self.waiting.append((size, d))
        return d


class Sends:
    """Stands in for a transport's socket and counts its send() calls; C{take} bytes at most each."""

    def __init__(self, sock, take: int | None = None, error: Exception | None = None):
        self.sock = sock
        self.take = take
        self.error = error
        self.calls: list[bytes] = []

    def send(self, data):
        if self.error is not None:
            raise self.error
        data = bytes(data)
        self.calls.append(data)
        return self.sock.send(data if self.take is None else data[:self.take])

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest_twisted.async_yield_fixture
async def pair():
    """A connected (client transport, server-side Recorder), both on the real reactor."""
    server_side = Recorder()
    factory = protocol.Factory.forProtocol(lambda: server_side)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    client_side = Recorder()
    await endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client_side)
    await server_side.made
    yield client_side.transport, server_side
    if client_side.transport.connected:
        client_side.transport.abortConnection()
        await client_side.lost
    await port.stopListening()


@pytest.fixture
def held(pair):
    """The pair's client transport with held writes, its turns on a Clock: (transport, peer, clock, writes, sends)."""
    transport, peer = pair
    clock = Clock()
    writes, sends = wrap(transport, clock)
    return transport, peer, clock, writes, sends


def wrap(transport, clock, **options) -> tuple[Writes, Sends]:
    writes = hold_writes(transport, clock)
    sends = transport.socket = Sends(transport.socket, **options)
    return writes, sends


def spin(seconds: float = 0.05) -> defer.Deferred:
    """Let the real reactor run a little."""
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_what_one_event_writes_goes_out_in_one_send_once_the_event_is_done(held):
    transport, peer, clock, writes, sends = held

    transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n"])
    transport.write(b"{}")
    assert sends.calls == []  # held

    writes.event_done()

    assert sends.calls == [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"]
    assert await peer.until(39) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert transport._tempDataLen == 0 and transport.dataBuffer == b""  # Twisted's buffer never used
    clock.advance(0)  # the turn ends: nothing more to send
    assert len(sends.calls) == 1


@pytest_twisted.ensureDeferred
async def test_a_busy_reactor_sends_at_the_end_of_the_turn(held):
    transport, peer, clock, writes, sends = held
    other = StringTransport()
    # A turn that writes to two connections makes the reactor busy for the next turn.
    transport.write(b"a")
    writes.hold(other, b"x")  # (another connection's write, as hold_writes' write would do)
    other._aibackend_held = None
    clock.advance(0)
    assert sends.calls == [b"a"] and writes.busy

    transport.write(b"b")
    writes.event_done()
    assert sends.calls == [b"a"]  # busy: held until the turn ends
    clock.advance(0)

    assert sends.calls == [b"a", b"b"]
    assert not writes.busy  # that turn wrote to one connection
    assert await peer.until(2) == b"ab"


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_goes_to_twisteds_buffer_in_order(held):
    transport, peer, clock, writes, sends = held
    sends.take = 3

    transport.write(b"0123456789")
    writes.event_done()
    assert sends.calls == [b"0123456789"]
    assert transport._tempDataLen == 7  # the rest, in Twisted's buffer
    transport.write(b"abc")  # behind it, not sent before it
    writes.event_done()
    assert len(sends.calls) == 1
    sends.take = None

    assert await peer.until(13) == b"0123456789abc"


@pytest_twisted.ensureDeferred
async def test_a_send_that_fails_leaves_the_data_to_twisted(held):
    transport, peer, clock, writes, sends = held
    sends.error = BlockingIOError()

    transport.write(b"later")
    writes.event_done()
    assert transport._tempDataLen == 5
    sends.error = None

    assert await peer.until(5) == b"later"


@pytest_twisted.ensureDeferred
async def test_closing_sends_what_is_held_first(held):
    transport, peer, clock, writes, sends = held

    transport.write(b"last words")
    transport.loseConnection()

    assert sends.calls == [b"last words"]
    await peer.lost
    assert peer.received == b"last words"
    clock.advance(0)
    assert [data for data in sends.calls if data] == [b"last words"]  # (Twisted's close sends b"")


@pytest_twisted.ensureDeferred
async def test_half_closing_sends_what_is_held_first(held):
    transport, peer, clock, writes, sends = held

    transport.write(b"then EOF")
    transport.loseWriteConnection()

    assert await peer.until(8) == b"then EOF"
    await peer.lost
    clock.advance(0)


@pytest_twisted.ensureDeferred
async def test_aborting_drops_what_is_held(held):
    transport, peer, clock, writes, sends = held

    transport.write(b"never")
    transport.abortConnection()
    clock.advance(0)

    assert sends.calls == []
    await peer.lost
    assert peer.received == b""


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_before_its_turn_ends_sends_nothing(held):
    transport, peer, clock, writes, sends = held
    transport.write(b"too late")
    transport.connected = False  # as connectionLost leaves it

    clock.advance(0)

    assert sends.calls == []
    transport.connected = True  # for the fixture's cleanup


@pytest_twisted.ensureDeferred
async def test_a_write_after_close_was_asked_for_goes_through_twisted(held):
    transport, peer, clock, writes, sends = held
    transport.disconnecting = True  # what loseConnection sets, before its own flush runs

    transport.write(b"buffered")

    assert transport._aibackend_held is None and transport._tempDataLen == 8
    transport.disconnecting = False
    assert await peer.until(8) == b"buffered"
    clock.advance(0)


@pytest_twisted.ensureDeferred
async def test_text_is_still_refused_as_twisted_refuses_it(pair):
    transport, _ = pair
    clock = Clock()
    wrap(transport, clock)

    with pytest.raises(TypeError):
        transport.write("text")
    with pytest.raises(TypeError):
        transport.writeSequence(["text"])


@pytest_twisted.ensureDeferred
async def test_once_the_reactor_is_stopping_writes_go_at_once(pair):
    """The shutdown may close every connection before another turn: nothing waits for one."""
    from twisted.internet.testing import MemoryReactorClock

    transport, peer = pair
    stopping = MemoryReactorClock()
    writes, sends = wrap(transport, stopping)
    writes.busy = True
    transport.write(b"held ")
    assert sends.calls == []

    [(trigger, _, _)] = stopping.triggers["before"]["shutdown"]
    trigger()
    assert sends.calls == [b"held "]

    transport.write(b"then at once")
    assert sends.calls == [b"held ", b"then at once"]
    assert await peer.until(17) == b"held then at once"


def test_only_plain_tcp_transports_are_changed():
    transport = StringTransport()
    write = transport.write

    assert hold_writes(transport, Clock()) is None
    assert transport.write == write


@pytest_twisted.ensureDeferred
async def test_each_turn_has_one_timer_and_none_is_left(held):
    transport, peer, clock, writes, sends = held

    transport.write(b"1")
    writes.event_done()
    transport.write(b"2")
    writes.event_done()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)

    assert clock.getDelayedCalls() == []
    assert sends.calls == [b"1", b"2"]
    assert await peer.until(2) == b"12"
    await spin()


@pytest_twisted.ensureDeferred
async def test_another_kind_of_event_sends_through_the_reactors_writes(pair):
    from aibackend.directwrite import event_done

    transport, peer = pair
    clock = Clock()
    event_done(clock)  # no connection on that reactor yet: nothing to do
    writes, sends = wrap(transport, clock)
    transport.write(b"from a model process")

    event_done(clock)

    assert sends.calls == [b"from a model process"]
    assert await peer.until(20) == b"from a model process"
    clock.advance(0)


@pytest_twisted.ensureDeferred
async def test_held_writes_turn_themselves_off_once_on_a_twisted_without_what_they_read(pair, monkeypatch):
    from twisted.logger import globalLogPublisher

    from aibackend import directwrite

    transport, peer = pair
    monkeypatch.setattr(directwrite, "RELIED_ON", (*directwrite.RELIED_ON, "_a_field_twisted_never_had"))
    monkeypatch.setattr(directwrite, "_usable", None)
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        assert hold_writes(transport, Clock()) is None
        assert hold_writes(transport, Clock()) is None
    finally:
        globalLogPublisher.removeObserver(said.append)

    warnings = [e for e in said if "held writes are off" in e.get("log_format", "")]
    assert len(warnings) == 1 and warnings[0]["missing"] == "_a_field_twisted_never_had"
    transport.write(b"plain")  # Twisted's own write, untouched
    assert await peer.until(5) == b"plain"


def test_this_twisted_has_everything_held_writes_read(pair):
    from aibackend.directwrite import RELIED_ON

    transport, _ = pair
    assert [name for name in RELIED_ON if not hasattr(transport, name)] == []


@pytest_twisted.ensureDeferred
async def test_flush_sends_what_is_held_at_once_even_on_a_busy_reactor(held):
    from aibackend.directwrite import flush

    transport, peer, clock, writes, sends = held
    writes.busy = True
    transport.write(b"data: first\n\n")
    assert sends.calls == []

    flush(transport)

    assert sends.calls == [b"data: first\n\n"]
    transport.write(b"data: second\n\n")
    writes.event_done()
    assert len(sends.calls) == 1  # the rest waits for the turn's end, as before
    clock.advance(0)
    assert sends.calls[1:] == [b"data: second\n\n"]
    flush(StringTransport())  # a transport whose writes are not held: nothing to do


@pytest_twisted.ensureDeferred
async def test_a_quiet_reactor_looks_at_one_turn_in_look_every_of_its_connections_events(held):
    transport, peer, clock, writes, sends = held
    timers = []
    for index in range(2 * LOOK_EVERY + 1):
        writes.event_begins()
        transport.write(b"%d," % index)
        timers.append(len(clock.getDelayedCalls()))
        writes.event_done()
        assert sends.calls[-1] == b"%d," % index  # sent at the event's end, looked at or not
        clock.advance(0)
    # The first turn is looked at, then one in LOOK_EVERY: the others make no DelayedCall.
    assert [i for i, count in enumerate(timers) if count] == [0, LOOK_EVERY, 2 * LOOK_EVERY]
    assert not writes.busy and clock.getDelayedCalls() == []
    expected = b"".join(b"%d," % index for index in range(2 * LOOK_EVERY + 1))
    assert await peer.until(len(expected)) == expected


@pytest_twisted.ensureDeferred
async def test_a_quiet_reactor_whose_turn_writes_to_many_connections_becomes_busy_within_look_every(held):
    transport, peer, clock, writes, sends = held
    writes.event_begins()
    transport.write(b"first")
    writes.event_done()
    clock.advance(0)  # the first turn, looked at: quiet
    others = [StringTransport() for _ in range(LOOK_EVERY + 1)]
    for other in others:  # one turn, an event for each connection
        writes.event_begins()
        writes.hold(other, b"x")  # (another connection's write, as hold_writes' write would do)
        other._aibackend_held = None
        writes.event_done()
    clock.advance(0)
    assert writes.busy
    writes.event_begins()
    transport.write(b"b")
    writes.event_done()
    assert sends.calls == [b"first"]  # busy: held until the turn ends
    clock.advance(0)
    assert sends.calls == [b"first", b"b"]
    assert await peer.until(6) == b"firstb"


@pytest_twisted.ensureDeferred
async def test_what_a_quiet_reactor_writes_outside_a_connections_event_goes_at_its_turns_end(held):
    transport, peer, clock, writes, sends = held
    writes.event_begins()
    transport.write(b"a")
    writes.event_done()
    clock.advance(0)
    writes.event_begins()
    transport.write(b"b")  # a turn not looked at: no DelayedCall
    assert clock.getDelayedCalls() == []
    writes.event_done()

    transport.write(b"c")  # a timer's write, say: no event_done follows

    assert sends.calls == [b"a", b"b"] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert sends.calls == [b"a", b"b", b"c"]
    assert await peer.until(3) == b"abc"
