"""
A lean HTTP/1.1 client for the hot path: one POST to a model server, on a kept-alive
connection, answered with its status, a few headers and the whole body.

Twisted's Agent does the same in pure Python in several layers (URI parsing, the pool's
keys, a request object that writes itself, a line-by-line response parser, a body
protocol), which cost about a third of the daemon's time per request. Here a request is
one write of bytes prepared once per model (the request line and fixed headers), and the
response is parsed by llhttp, the C parser of Node.js, through C{httptools}. Connections
are still made by Twisted endpoints (the same C{IAgentEndpointFactory}: the endpoint
cache, or the destination policy's guarded endpoints), and failures are the exceptions
Twisted's client raises (C{ConnectError}, C{ResponseFailed}, ...), so the HTTP model's
error handling is the same for both.

Like Twisted's Agent with a POST, a request is never sent twice: a kept-alive connection
that the server closed as the request was written fails that request.
"""

from __future__ import annotations

from collections import defaultdict

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import URI

from aibackend.directwrite import hold_writes

MAX_IDLE_PER_HOST = 64
IDLE_SECONDS = 120.0


class ResponseTooLarge(Exception):
    """The answer is longer than the model's C{max_response_bytes}."""

    def __init__(self, limit: int):
        super().__init__(f"the answer is longer than {limit} bytes")
        self.limit = limit


class Answer:
    """What a model server answered: C{code}, C{headers} (L{Headers}-like, read only), the body."""

    __slots__ = ("code", "_headers")

    def __init__(self, code: int, headers: dict):
        self.code = code
        self._headers = headers

    @property
    def headers(self):
        return self

    def getRawHeaders(self, name: bytes, default=None):
        values = self._headers.get(name.lower())
        return values if values is not None else default


class Connection(Protocol):
    """One connection to a model server: one request at a time, kept alive between them."""

    def __init__(self, client, key):
        self.client = client
        self.key = key
        self.deferred = None
        self.idle_timer = None
        self.parser = None
        self.writes = None

    def connectionMade(self) -> None:
        self.writes = hold_writes(self.transport, self.client.reactor)

    # --- a request ------------------------------------------------------------

    def send(self, data: bytes, limit: int) -> Deferred:
        self.deferred = Deferred(self._cancel)
        self.limit = limit
        self.size = 0
        self.chunks = []
        self.headers = {}
        self.header_name = None
        self.complete = False
        self.headers_done = False
        self.received = False
        self.parser = httptools.HttpResponseParser(self)
        if type(data) is bytes:
            self.transport.write(data)
        else:  # (head, a large body): written one after the other, not joined
            for part in data:
                self.transport.write(part)
        return self.deferred

    def _cancel(self, d):
        # The deadline passed, or the client went away: the answer is no longer wanted,
        # and the connection, midway through it, cannot be used again.
        self.deferred = None
        self.transport.abortConnection()

    def _finish(self, result) -> None:
        d, self.deferred = self.deferred, None
        self.parser = None
        self.chunks = []  # an idle connection must not keep its last answer's body
        if d is not None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # --- llhttp's callbacks ---------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.setdefault(name.lower(), []).append(value)

    def on_headers_complete(self) -> None:
        self.headers_done = True
        # Asked here: once the message is complete, llhttp no longer says.
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            self.chunks = []
            self._finish(Failure(ResponseTooLarge(self.limit)))
            self.transport.abortConnection()
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # --- the connection ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._received(data)
        if self.writes is not None:
            self.writes.event_done()  # the answer written to the client goes now

    def _received(self, data: bytes) -> None:
        if self.deferred is None:
            # Bytes nobody asked for (or the rest of an abandoned answer): close.
            self.transport.abortConnection()
            return
        self.received = True
        parser = self.parser
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(Failure(ResponseFailed([Failure(e)])))
            self.transport.abortConnection()
            return
        if self.complete and self.deferred is not None:
            answer = Answer(parser.get_status_code(), self.headers)
            body = b"".join(self.chunks)
            keep = self.keep_alive
            self._finish((answer, body))
            if keep:
                self.client._release(self)
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.client._forget(self)
        if self.deferred is None:
            return
        if self.headers_done and not self.complete and self._until_close():
            # An answer whose body runs until the connection closes (no length given).
            self._finish((Answer(self.parser.get_status_code(), self.headers), b"".join(self.chunks)))
            return
        if self.received:
            self._finish(Failure(ResponseFailed([reason])))
        else:
            self._finish(Failure(ResponseNeverReceived([reason])))


    def _until_close(self) -> bool:
        """Has the answer neither a length nor chunks, so that the end of the connection ends it?"""
        encodings = b",".join(self.headers.get(b"transfer-encoding", ())).lower()
        return b"content-length" not in self.headers and b"chunked" not in encodings


class _QuietFactory(Factory):
    noisy = False  # no "Starting factory" line for each connection


class LeanClient:
    """
    Connections to model servers, kept alive and reused (at most L{MAX_IDLE_PER_HOST}
    idle per server, each closed after L{IDLE_SECONDS} unused).

    @param endpoint_factory: an C{IAgentEndpointFactory} (C{endpointForURI}).
    """

    def __init__(self, reactor, endpoint_factory, *, max_idle: int = MAX_IDLE_PER_HOST,
                 idle_seconds: float = IDLE_SECONDS):
        self.reactor = reactor
        self.endpoint_factory = endpoint_factory
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict = defaultdict(list)
        self._uris: dict = {}

    def request(self, uri: bytes, data: bytes, limit: int) -> Deferred:
        """
        Send C{data} (a whole request: request line, headers, body; or a sequence of
        its parts) to the server of C{uri}; fires with C{(Answer, body)}.
        """
        parsed = self._uris.get(uri)
        if parsed is None:
            parsed = self._uris[uri] = URI.fromBytes(uri)
        key = (parsed.scheme, parsed.host, parsed.port)
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.idle_timer is not None and connection.idle_timer.active():
                connection.idle_timer.cancel()
            connection.idle_timer = None
            transport = connection.transport
            if getattr(transport, "connected", True) and not getattr(transport, "disconnecting", False):
                return connection.send(data, limit)
        endpoint = self.endpoint_factory.endpointForURI(parsed)
        factory = _QuietFactory.forProtocol(lambda: Connection(self, key))
        d = endpoint.connect(factory)
        return d.addCallback(lambda connection: connection.send(data, limit))

    def _release(self, connection) -> None:
        idle = self._idle[connection.key]
        if len(idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        idle.append(connection)
        connection.idle_timer = self.reactor.callLater(self.idle_seconds, connection.transport.loseConnection)

    def _forget(self, connection) -> None:
        if connection.idle_timer is not None and connection.idle_timer.active():
            connection.idle_timer.cancel()
        connection.idle_timer = None
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        """Close every idle connection (at stop)."""
        for idle in list(self._idle.values()):
            for connection in list(idle):
                if connection.idle_timer is not None and connection.idle_timer.active():
                    connection.idle_timer.cancel()
                connection.idle_timer = None
                connection.transport.loseConnection()
            idle.clear()


__all__ = ["Answer", "LeanClient", "ResponseTooLarge"]
