"""
aibackend.client's streams over real loopback sockets (the real reactor): a stream that
ends cleanly leaves its connection to the next request, one cancelled mid-body closes its
socket at once (the upstream sees it) and is never reused, a paused connection reads
nothing until it is resumed, and an upstream that closes mid-stream fails it as Twisted's
client would. The byte-level cases are in test_client.py, over StringTransports.
"""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet import endpoints, protocol, reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.web._newclient import ResponseFailed
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from aibackend.client import LeanClient
from aibackend.streambody import EventStream
from aibackend.testing import failure_of, result_of

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class Upstream(protocol.Protocol):
    """One connection of the upstream: each request answered with an SSE head, then what the test writes."""

    def connectionMade(self):
        self.buffer = b""
        self.requests = 0
        self.lost = Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.requests += 1
            self.transport.write(SSE_HEAD)

    def event(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end(self) -> None:
        self.transport.write(b"0\r\n\r\n")

    def connectionLost(self, reason):
        self.lost.callback(None)


@implementer(IAgentEndpointFactory)
class Loopback:
    def endpointForURI(self, uri):
        return endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", uri.port, timeout=5)


async def until(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def upstream():
    factory = protocol.Factory.forProtocol(Upstream)
    factory.noisy = False
    factory.connections = []
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    client = LeanClient(reactor, Loopback())
    factory.client = client
    factory.uri = b"http://127.0.0.1:%d/stream" % port.getHost().port
    try:
        yield factory
    finally:
        client.close()
        for connection in factory.connections:
            connection.transport.loseConnection()
        await port.stopListening()
        for connection in factory.connections:
            await connection.lost


def start(upstream, *, paused: bool = False):
    """A stream to the upstream: (its Deferred, the texts of its chunks so far)."""
    texts = []

    def head(answer, transport):
        if paused:
            transport.pauseProducing()
            texts.append(transport)
        return EventStream(lambda value, text: texts.append(text), 1000, "m")

    request = b"POST /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"
    d = upstream.client.request(upstream.uri, request, 1000, head)
    d.addBoth(lambda result: (texts.append(END), result)[1])
    return d, texts


END = "the end"


@pytest_twisted.ensureDeferred
async def test_a_stream_that_ends_cleanly_leaves_its_connection_to_the_next(upstream):
    for n in range(1, 3):
        d, texts = start(upstream)
        await until(lambda: upstream.connections and upstream.connections[-1].requests == n, "the request")
        server = upstream.connections[-1]
        server.event(b"data: %d\n\n" % n)
        await until(lambda: texts, "the chunk")
        assert texts == [b"%d" % n]
        server.event(b"data: [DONE]\n\n")
        server.end()
        await until(lambda: END in texts, "the end")
        assert result_of(d)[1:] == (None, True)
    assert len(upstream.connections) == 1


@pytest_twisted.ensureDeferred
async def test_a_stream_cancelled_mid_body_closes_its_socket_and_is_not_reused(upstream):
    d, texts = start(upstream)
    await until(lambda: upstream.connections and upstream.connections[0].requests == 1, "the request")
    first = upstream.connections[0]
    first.event(b"data: 1\n\n")
    await until(lambda: texts, "the chunk")
    d.cancel()
    failure_of(d, CancelledError)
    await first.lost  # the upstream sees it (the test's timeout bounds the wait)

    d, texts = start(upstream)
    await until(lambda: len(upstream.connections) == 2, "a new connection")
    d.cancel()
    failure_of(d, CancelledError)


@pytest_twisted.ensureDeferred
async def test_a_paused_connection_reads_nothing_until_resumed(upstream):
    d, seen = start(upstream, paused=True)
    await until(lambda: seen, "the head")
    transport = seen.pop()
    server = upstream.connections[0]
    server.event(b"data: 1\n\n")
    await deferLater(reactor, 0.2, lambda: None)
    assert seen == []  # written, but not read
    transport.resumeProducing()
    await until(lambda: seen, "the chunk")
    assert seen == [b"1"]
    server.event(b"data: [DONE]\n\n")
    server.end()
    await until(lambda: END in seen, "the end")
    assert result_of(d)[1:] == (None, True)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_closes_mid_stream_fails_it(upstream):
    d, texts = start(upstream)
    await until(lambda: upstream.connections and upstream.connections[0].requests == 1, "the request")
    server = upstream.connections[0]
    server.event(b"data: 1\n\n")
    await until(lambda: texts, "the chunk")
    server.transport.loseConnection()
    await until(lambda: END in texts, "the failure")
    failure_of(d, ResponseFailed)
    assert texts == [b"1", END]
