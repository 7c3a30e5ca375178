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

A request may be a stream (C{head} given to L{LeanClient.request}): once the answer's
headers are read, C{head(answer, transport)} says how its body is read. A reader (an
object with C{feed(data)}, C{finish()}, C{ended} and C{output}: L{aibackend.streambody}'s
readers) is fed each piece of the body as llhttp gives it, in the reactor turn it came
(chunked transfer-encoding decoded), and the request fires with C{(answer, output, True)}
at the reader's end event (the rest of the body is then read and dropped for up to
L{DRAIN_SECONDS}) or the body's clean end; None reads the body whole, as a plain request's,
to C{(answer, body)}. A reader that raises fails the request with what it raised and
closes the connection. C{transport} is the connection's, for the caller's flow control
(C{pauseProducing}/C{resumeProducing}); it reads again before the connection is reused.

A plain request may have a deadline (C{timeout}): past it, the request fails with Twisted's
C{defer.TimeoutError}, as C{Deferred.addTimeout} would fail it, and its connection is
closed. On a kept-alive connection it is kept by the connection's one timer, which also
closes it once it has been idle for L{IDLE_SECONDS}: a request moves that timer (when it is
already due later, Twisted's C{DelayedCall.reset} only notes the new time), instead of
making and cancelling two DelayedCalls of its own, which a busy reactor keeps in its heap
until their time.
"""

from __future__ import annotations

from collections import defaultdict

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeadlineExceeded
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import URI

from aibackend.directwrite import flush, hold_writes

MAX_IDLE_PER_HOST = 64
IDLE_SECONDS = 120.0
# How long the rest of a streamed body is read (and dropped) after its reader's end
# event, before its connection is closed instead (one whose answer ends goes back to the pool).
DRAIN_SECONDS = 1.0


class ResponseTooLarge(Exception):
    """The answer is longer than the model's C{max_response_bytes}."""

    def __init__(self, limit: int):
        super().__init__(f"the answer is longer than {limit} bytes")
        self.limit = limit


def deadline_passed(result, timeout):
    """C{Deferred.addTimeout}'s C{onTimeoutCancel}: the request failed with the deadline's error."""
    raise DeadlineExceeded(timeout, "Deferred")


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
        # The one timer (L{_timer_fired}): the request's deadline while one is sent with
        # a timeout, else, kept alive and unused, the idle timeout; None: neither.
        self.timer = None
        self.deadline = None  # the request's deadline (the clock's seconds), or None
        self.timeout = None  # its timeout (for its error)
        self.idle = False  # kept alive, unused (in the client's idle connections)
        self.parser = None
        self.writes = None
        self.exchange = None  # a streamed answer's (L{_Streamed}), while one is read
        self.drain = None

    def connectionMade(self) -> None:
        self.writes = hold_writes(self.transport, self.client.reactor)

    # --- a request ------------------------------------------------------------

    def send(self, data: bytes, limit: int, timeout: float | None = None) -> Deferred:
        self.deferred = Deferred(self._cancel)
        if timeout is not None:
            # The request's deadline, on the connection's timer: made sooner if due later
            # (an idle timer, reset to the time it is due: noted, no heap operation).
            reactor = self.client.reactor
            self.timeout = timeout
            deadline = self.deadline = reactor.seconds() + timeout
            timer = self.timer
            if timer is None:
                self.timer = reactor.callLater(timeout, self._timer_fired)
            elif timer.getTime() > deadline:
                timer.reset(timeout)
        self.limit = limit
        self.size = 0
        self.chunks = []
        self.headers = {}
        self.header_name = None
        self.complete = False
        self.headers_done = False
        self.interim = False
        self.received = False
        if self.parser is None:
            # Made once for the plain answers of a kept-alive connection: llhttp reads one
            # answer after another (and making one looks up its callbacks, three of which
            # this class has not: an AttributeError raised and dropped each).
            self.parser = httptools.HttpResponseParser(self)
        self._write(data)
        return self.deferred

    def stream(self, data: bytes, limit: int, head) -> Deferred:
        """A request whose answer's body C{head} says how to read (see the module's docstring)."""
        self.deferred = Deferred(self._cancel)
        self.received = False
        self.exchange = exchange = _Streamed(self, head, limit)
        self.parser = httptools.HttpResponseParser(exchange)
        self._write(data)
        return self.deferred

    def _write(self, data) -> None:
        """
        Write a request: its bytes, or (head, a large body) one after the other, not
        joined. A quiet reactor sends it at once (L{aibackend.directwrite}): the model
        starts on it while the daemon finishes the event that made it.
        """
        transport = self.transport
        if type(data) is bytes:
            transport.write(data)
        else:
            for part in data:
                transport.write(part)
        writes = self.writes
        if writes is not None and not writes.busy:
            flush(transport)

    def _cancel(self, d):
        # The deadline passed, or the client went away: the answer is no longer wanted,
        # and the connection, midway through it, cannot be used again.
        self.deferred = None
        self.deadline = None
        self.stop_timer()
        if self.exchange is not None:
            self.exchange.over = True  # (a cancel set off by a chunk: nothing more is read)
            self._stream_over()
        self.transport.abortConnection()

    def _finish(self, result) -> None:
        d, self.deferred = self.deferred, None
        self.deadline = None
        self.chunks = []  # an idle connection must not keep its last answer's body
        if d is not None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # --- the timer ----------------------------------------------------------------

    def rest(self, seconds: float) -> None:
        """Kept alive, unused: closed after C{seconds} unless a request comes first."""
        self.idle = True
        timer = self.timer
        if timer is None:
            self.timer = self.client.reactor.callLater(seconds, self._timer_fired)
        else:
            timer.reset(seconds)  # (most often later than it was due: noted, not moved)

    def stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timer_fired(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is not None and self.deferred is not None:
            now = self.client.reactor.seconds()
            if deadline > now:  # the idle time the timer had came first
                self.timer = self.client.reactor.callLater(deadline - now, self._timer_fired)
                return
            # The deadline passed: the answer is no longer wanted, and the connection,
            # midway through it, cannot be used again (as a cancel by addTimeout).
            d, self.deferred = self.deferred, None
            self.deadline = None
            self.parser = None
            self.chunks = []
            self.transport.abortConnection()
            d.errback(Failure(DeadlineExceeded(self.timeout, "Deferred")))
        elif self.idle:
            self.transport.loseConnection()

    # --- llhttp's callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer in the same read, nobody asked for: not kept
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.setdefault(name.lower(), []).append(value)

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        if _interim(self.parser):
            # A 1xx (103 Early Hints, an unasked 100 Continue) before the answer: passed over.
            self.interim = True
            self.headers = {}
            return
        self.headers_done = True
        # Asked here: once the message is complete, llhttp no longer says (and what
        # follows it in the same read is another answer's).
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.size += len(body)
        if self.size > self.limit:
            self.chunks = []
            self._finish(Failure(ResponseTooLarge(self.limit)))
            self.stop_timer()
            self.transport.abortConnection()
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True

    # --- the connection ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        writes = self.writes
        if writes is None:
            self._received(data)
            return
        writes.event_begins()
        try:
            self._received(data)
        finally:
            writes.event_done()  # the answer written to the client goes now

    def _received(self, data: bytes) -> None:
        if self.exchange is not None:
            self._stream_received(data)
            return
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
            self.stop_timer()
            self.transport.abortConnection()
            return
        if self.complete and self.deferred is not None:
            answer = Answer(self.status, self.headers)
            body = b"".join(self.chunks)
            keep = self.keep_alive
            self._finish((answer, body))
            if keep:
                self.client._release(self)
            else:
                self.stop_timer()
                self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.client._forget(self)
        if self.exchange is not None:
            self._stream_lost(reason)
            return
        if self.deferred is None:
            return
        if self.headers_done and not self.complete and self._until_close():
            # An answer whose body runs until the connection closes (no length given).
            self._finish((Answer(self.status, self.headers), b"".join(self.chunks)))
            return
        if self.received:
            self._finish(Failure(ResponseFailed([reason])))
        else:
            self._finish(Failure(ResponseNeverReceived([reason])))


    def _until_close(self, headers=None) -> bool:
        """Has the answer neither a length nor chunks, so that the end of the connection ends it?"""
        headers = self.headers if headers is None else headers
        encodings = b",".join(headers.get(b"transfer-encoding", ())).lower()
        return b"content-length" not in headers and b"chunked" not in encodings

    # --- a streamed answer ------------------------------------------------------

    def _stream_received(self, data: bytes) -> None:
        exchange = self.exchange
        self.received = True
        broken = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            # (Not a callback's: they do not raise.) Bytes after a complete answer, or
            # after the reader's end event, spoil only the connection.
            reader = exchange.reader
            if not exchange.complete and exchange.failure is None and not (reader is not None and reader.ended):
                exchange.failure = Failure(ResponseFailed([Failure(e)]))
            exchange.keep_alive = False
            broken = True
        if self.exchange is not exchange:
            return  # cancelled meanwhile (by what a chunk set off): the connection is closed
        if exchange.failure is not None:
            self._stream_over()
            self._fire(exchange.failure)
            self.transport.abortConnection()
            return
        if exchange.complete:
            self._stream_complete(exchange)
            return
        reader = exchange.reader
        if reader is not None and reader.ended and self.deferred is not None:
            if broken:  # what followed the end event is not HTTP: the stream is over, the connection too
                self._stream_over()
                self._fire((exchange.answer, reader.output, True))
                self.transport.abortConnection()
                return
            # The reader's end event: the stream is over, the rest of its body is dropped
            # as it comes (a paused connection reads again), for a while.
            self.transport.resumeProducing()
            self.drain = self.client.reactor.callLater(DRAIN_SECONDS, self._drained)
            self._fire((exchange.answer, reader.output, True))
        elif broken and self.deferred is None:  # bytes past the end event that are not HTTP
            self._stream_over()
            self.transport.abortConnection()

    def _fire(self, result) -> None:
        d, self.deferred = self.deferred, None
        if d is not None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _stream_complete(self, exchange) -> None:
        """The answer is complete: the request's result, and the connection kept (reading) or closed."""
        self._stream_over()
        if self.deferred is not None:
            result = exchange.result()
            if isinstance(result, Failure):
                self._fire(result)
                self.transport.abortConnection()
                return
            self._fire(result)
        if exchange.keep_alive:
            self.transport.resumeProducing()  # the caller's flow control may have paused it
            self.client._release(self)
        else:
            self.transport.loseConnection()

    def _drained(self) -> None:
        self.drain = None
        self._stream_over()
        self.transport.abortConnection()

    def _stream_over(self) -> None:
        self.exchange = None
        self.parser = None
        drain, self.drain = self.drain, None
        if drain is not None and drain.active():
            drain.cancel()

    def _stream_lost(self, reason) -> None:
        exchange = self.exchange
        self._stream_over()
        if self.deferred is None:
            return  # its stream was over (the rest being drained), or given up
        if exchange.headers_done and not exchange.complete and self._until_close(exchange.headers):
            self._fire(exchange.result())  # a body that runs until the connection closes
        elif self.received:
            self._fire(Failure(ResponseFailed([reason])))
        else:
            self._fire(Failure(ResponseNeverReceived([reason])))


class _Streamed:
    """
    llhttp's callbacks for a streamed answer (L{Connection.stream}). None raises: a
    failure is kept (L{failure}) for the connection to act on once llhttp returns, and
    what comes after it, or after the reader's end event (L{over}), is dropped.
    """

    __slots__ = ("connection", "head", "limit", "headers", "headers_done", "keep_alive", "answer", "reader",
                 "chunks", "size", "complete", "over", "failure", "interim")

    def __init__(self, connection: Connection, head, limit: int):
        self.connection = connection
        self.head = head
        self.limit = limit
        self.headers: dict = {}
        self.headers_done = False
        self.keep_alive = False
        self.answer = None
        self.reader = None
        self.chunks: list = []  # a body read whole (head said None)
        self.size = 0
        self.complete = False
        self.over = False
        self.failure = None
        self.interim = False

    def result(self):
        """The request's result once the body has ended (or a Failure)."""
        reader = self.reader
        if reader is None:
            return (self.answer, b"".join(self.chunks))
        if not reader.ended:
            try:
                reader.finish()
            except Exception:
                return Failure()
        return (self.answer, reader.output, True)

    def _fail(self, failure: Failure) -> None:
        self.failure = failure
        self.over = True
        self.chunks = []

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer nobody asked for: the connection is not kept
            self.keep_alive = False
            self.over = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:
            self.headers.setdefault(name.lower(), []).append(value)

    def on_headers_complete(self) -> None:
        if self.headers_done or self.over:
            return
        connection = self.connection
        parser = connection.parser
        if _interim(parser):  # a 1xx before the answer: passed over
            self.interim = True
            self.headers = {}
            return
        self.headers_done = True
        self.keep_alive = parser.should_keep_alive()
        self.answer = Answer(parser.get_status_code(), self.headers)
        try:
            self.reader = self.head(self.answer, connection.transport)
        except Exception:
            self._fail(Failure())

    def on_body(self, body: bytes) -> None:
        if self.over:
            return
        reader = self.reader
        if reader is None:
            self.size += len(body)
            if self.size > self.limit:
                self._fail(Failure(ResponseTooLarge(self.limit)))
                return
            self.chunks.append(body)
            return
        try:
            reader.feed(body)
        except Exception:
            self._fail(Failure())
            return
        if reader.ended:
            self.over = True

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
        elif not self.complete:
            self.complete = True
            self.over = True


def _interim(parser) -> bool:
    """Is the answer whose head llhttp has just read an interim one (1xx, but 101: a switch, never asked)?"""
    status = parser.get_status_code()
    return 100 <= status < 200 and status != 101


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
        # Closed (its model stopped): a connection an answer still in flight frees then is
        # closed, not kept; a request after that (the model started again) opens it again.
        self.closed = False

    def request(self, uri: bytes, data: bytes, limit: int, head=None, timeout: float | None = None) -> Deferred:
        """
        Send C{data} (a whole request: request line, headers, body; or a sequence of
        its parts) to the server of C{uri}; fires with C{(Answer, body)}, C{body} at most
        C{limit} bytes (else L{ResponseTooLarge}). With C{head}, a stream (see the module's
        docstring): C{head(answer, transport)} says how the body is read once its headers are.
        With C{timeout} (a plain request's), the whole exchange's deadline, connecting
        included: past it, the request fails with Twisted's C{defer.TimeoutError} (as
        C{Deferred.addTimeout}'s, L{deadline_passed}) and its connection is closed.
        """
        if self.closed:
            self.closed = False
        parsed = self._uris.get(uri)
        if parsed is None:
            parsed = self._uris[uri] = URI.fromBytes(uri)
        key = (parsed.scheme, parsed.host, parsed.port)
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            connection.idle = False
            transport = connection.transport
            if getattr(transport, "connected", True) and not getattr(transport, "disconnecting", False):
                if head is not None:
                    connection.stop_timer()
                    return connection.stream(data, limit, head)
                if timeout is None:
                    connection.stop_timer()
                # (Else its timer, the idle one, becomes the request's deadline.)
                return connection.send(data, limit, timeout)
            connection.stop_timer()
        endpoint = self.endpoint_factory.endpointForURI(parsed)
        factory = _QuietFactory.forProtocol(lambda: Connection(self, key))
        d = endpoint.connect(factory)
        if head is not None:
            return d.addCallback(lambda connection: connection.stream(data, limit, head))
        d.addCallback(lambda connection: connection.send(data, limit))
        if timeout is not None:
            # A new connection: the deadline covers the connecting too (a rare path: a
            # DelayedCall of its own).
            d.addTimeout(timeout, self.reactor, onTimeoutCancel=deadline_passed)
        return d

    def _release(self, connection) -> None:
        idle = self._idle[connection.key]
        if self.closed or len(idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        idle.append(connection)
        connection.rest(self.idle_seconds)

    def _forget(self, connection) -> None:
        connection.stop_timer()
        connection.idle = False
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        """Close every idle connection, and each one in use once its answer is done (at stop)."""
        self.closed = True
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.stop_timer()
                connection.idle = False
                connection.transport.loseConnection()
            idle.clear()


__all__ = ["DRAIN_SECONDS", "Answer", "LeanClient", "ResponseTooLarge", "deadline_passed"]
