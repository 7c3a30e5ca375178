"""
The HTTP server side: the daemon's L{Site}, its connections and the limits they hold.

Twisted buffers a request's whole body before any resource sees it, in a temporary file
on disk past 100 kB. Here the body is bounded by C{max_body_bytes}, so it is kept in
memory, once: a body that announces (C{Content-Length}, or a chunk's size line) or grows
past the limit is refused with a JSON 413 at once and the connection closed, without
reading the rest.

Each connection is an L{AibackendChannel}: Twisted's L{HTTPChannel} reading requests with
llhttp (L{aibackend.llchannel.LlhttpChannel}), with the daemon's client limits: every
refusal of a request that is not HTTP/1.1 (a malformed request line, header or chunked
body, a request line or header section too large) is answered in the daemon's JSON error
shape; a request has C{header_timeout} for its headers, C{body_timeout} for its body
and must keep up C{min_body_rate} after a grace period; an answer the client does not read
for C{send_timeout} closes the connection; and a peer may hold only
C{max_connections_per_peer} connections. One timer a connection watches all of it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
from collections import OrderedDict
from io import BytesIO
from time import time
from urllib.parse import unquote_to_bytes

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, datetimeToString, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site
from twisted.web.server import version as SERVER_VERSION

from aibackend.directwrite import LARGE, hold_writes
from aibackend.errors import CLIENT_CLOSED, PayloadTooLarge, refusal_document
from aibackend.ids import new_request_id, request_id_from_headers
from aibackend.llchannel import LlhttpChannel


access_log = Logger(namespace="aibackend.access")

# A deadline is taken as reached this close to it (seconds): a timer set for a time fires
# at that time give or take a float's rounding.
_EPSILON = 1e-6
# The refusal (aibackend.metrics) each of the server's own answers counts as (a 413 is
# counted where it is decided, as body_too_large).
_REFUSAL_OF_KIND = {
    "bad_request": "malformed_request", "uri_too_long": "malformed_request",
    "headers_too_large": "malformed_request", "request_timeout": "slow_client",
    "model_unavailable": "connection_limit",
}


def error_answer(status: int, reason: str, kind: str, message: str, request_id: str,
                 path: bytes | None = None) -> bytes:
    """
    A whole HTTP/1.1 answer in the error shape of the route C{path} names (the daemon's
    when it is not known yet), that closes the connection (a 503, the daemon holding as
    many connections as it may, says to retry in a second).
    """
    body = json.dumps(refusal_document(path, status, kind, message, request_id)).encode()
    return b"\r\n".join([
        b"HTTP/1.1 %d %s" % (status, reason.encode()),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"X-Request-Id: " + request_id.encode(),
        b"Date: " + http_date(),
        *([b"Retry-After: 1"] if status == 503 else []),
        b"Connection: close",
    ]) + b"\r\n\r\n" + body


_date_second = None
_date = b""


def http_date() -> bytes:
    """The Date header's value now (Twisted's C{datetimeToString()}), made once a second."""
    global _date_second, _date
    second = int(time())
    if second != _date_second:
        _date = datetimeToString(second)
        _date_second = second
    return _date


_SERVER_LINE = b"Server: " + SERVER_VERSION
# The names answer_head looks out for (as Headers spells them).
_DATE, _SERVER, _CONTENT_TYPE, _CONTENT_LENGTH = b"Date", b"Server", b"Content-Type", b"Content-Length"
_NOTED = frozenset((_DATE, _SERVER, _CONTENT_TYPE, _CONTENT_LENGTH))


def answer_head(version: bytes, code: int, reason: bytes, headers: Headers, whole: bool = False) -> bytes | None:
    """
    An answer's head (its status line and its headers, to the empty line) in one join:
    C{headers}, with C{Server} and C{Date} first unless they are set there. Twisted's
    L{Request.process} sets those two on every request's L{Headers} (a Date string made
    each time); here they are the site's, the Date made once a second (L{http_date}).

    @param whole: the head of an answer whose body is written at once (L{BoundedRequest.write}):
        None if it has no Content-Type or no Content-Length (Twisted's own write adds a
        default type, or frames the body chunked).
    """
    lines = [b"%s %d %s" % (version, code, reason), _SERVER_LINE, b"Date: " + http_date()]
    noted = 0
    for name, values in headers.getAllRawHeaders():
        if name in _NOTED:
            if name == _DATE:
                lines[2] = None
            elif name == _SERVER:
                lines[1] = None
            else:
                noted += 1
        for value in values:
            lines.append(name + b": " + value)
    if whole and noted != 2:
        return None
    if lines[1] is None or lines[2] is None:
        lines = [line for line in lines if line is not None]
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class AibackendChannel(LlhttpChannel):
    """
    An HTTP/1.1 connection with the daemon's client limits (see the module's docstring).

    The limits cost the hot path nothing it did not pay before: one timer a connection,
    set when the first request starts and looking, when it fires, at what is awaited
    (headers, a body, the client reading its answer, an idle keep-alive connection: the
    idle timeout Twisted's own DelayedCall kept, L{setTimeout}), then setting itself for
    what is left; a body that arrives with its headers never arms it.

    Requests are read by llhttp (L{LlhttpChannel}); this class adds the limits and
    answers every refusal in the daemon's JSON error shape.
    """

    log = Logger()

    site = None

    # The daemon's own attributes, and those HTTPChannel.__init__ always sets (none has a
    # class default), are slots: the instance's __dict__ keeps fewer than 30 keys, CPython's
    # limit for a dict that shares its class's keys (under 300 bytes; past it, a dict of
    # its own, 1.5 KB): an open connection costs that much less (10,000 held streams, 15 MB).
    __slots__ = (
        "peer", "refusal", "writes", "timer", "head_since", "body_since", "body_armed", "stalled_since",
        "_local", "_remote", "idle_since",
    )

    def __init__(self):
        super().__init__()
        self.peer = None  # the client's address (a host), for the per-peer cap
        self.refusal = None  # (status, reason, kind, message): answered once connected
        self.writes = None  # aibackend.directwrite's, on a plain TCP connection
        self.timer = None
        self.head_since = None  # when the request whose headers are awaited began
        self.body_since = None  # when the body now awaited began
        self.body_armed = False
        self.stalled_since = None  # when the client stopped reading what it is sent
        self._local = None
        self._remote = None
        self.idle_since = None  # the idle timeout's start (Twisted's timeOut): no request in progress

    # --- the connection ------------------------------------------------------------------

    def connectionMade(self):
        if self.refusal is None and self.site.header_timeout:
            # Before Twisted's setTimeout (the idle timeout, in super()), so that the timer is
            # made once, for the nearer deadline: moving a DelayedCall sooner searches the
            # reactor's whole heap (O(connections)).
            self.head_since = self.site.reactor.seconds()
        super().connectionMade()
        # Each request asks its channel for the local address (one getsockname() call a
        # request) and the client's (a new address object): answers that never change on a
        # connection.
        self._local = self.transport.getHost()
        self._remote = self.transport.getPeer()
        self.writes = hold_writes(self.transport, self.site.reactor)
        if self.refusal is not None:
            self.answer(*self.refusal)
        elif self.head_since is not None and self.timer is None:
            self._arm(self.head_since + self.site.header_timeout)  # (set already, unless there is no idle timeout)

    def writeHeaders(self, version, code, reason, headers):
        """
        Write an answer's head (Twisted's L{HTTPChannel.writeHeaders}), made by
        L{answer_head}: in one join, with the site's C{Server} and C{Date}.
        """
        if not isinstance(headers, Headers):
            return super().writeHeaders(version, code, reason, headers)
        self.transport.write(answer_head(version, int(code), reason, headers))

    def getHost(self):
        return self._local if self._local is not None else super().getHost()

    def getPeer(self):
        return self._remote if self._remote is not None else super().getPeer()

    @property
    def body_limit(self):
        return self.site.max_body_bytes

    def dataReceived(self, data):
        writes = self.writes
        if writes is None:
            super().dataReceived(data)
            if self.body_since is not None and not self.body_armed:
                self._arm_body()
            return
        writes.event_begins()
        try:
            super().dataReceived(data)
            if self.body_since is not None and not self.body_armed:
                self._arm_body()
        finally:
            writes.event_done()  # the request written to a model goes now

    # --- the steps of a request (LlhttpChannel's) ----------------------------------------

    def head_started(self):
        if self.head_since is None:
            self._start_head()

    def head_received(self, request, version):
        self.head_since = None
        hosts = request.requestHeaders.getRawHeaders(b"host")
        if hosts is None:
            if version == b"HTTP/1.1":
                request.refuse(400, "Bad Request", "bad_request", "an HTTP/1.1 request must have a Host header")
                return False
            if not isinstance(self._local, (IPv4Address, IPv6Address)):
                # HTTP/1.0 on a unix socket: Twisted names the host from the local
                # address, which has none (Klein would raise), so the host is this one.
                request.requestHeaders.setRawHeaders(b"host", [b"localhost"])
        elif len(hosts) > 1:
            request.refuse(400, "Bad Request", "bad_request", "the request has more than one Host header")
            return False
        return True

    def body_expected(self, request):
        self.body_since = request.aibackend_started  # gotLength's "now"
        self.body_armed = False

    def body_too_large(self):
        self.requests[-1].refuse_too_large(None)

    def pauseProducing(self):
        # The transport holds more than it can send: the client is not reading its answer.
        super().pauseProducing()
        if self.stalled_since is None and self.site.send_timeout:
            self.stalled_since = self.site.reactor.seconds()
            self._arm(self.stalled_since + self.site.send_timeout)

    def resumeProducing(self):
        self.stalled_since = None
        super().resumeProducing()

    def connectionLost(self, reason):
        self.head_since = self.body_since = self.stalled_since = None
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        self.site.connection_lost(self)
        super().connectionLost(reason)

    # --- refusals, in the daemon's shape ---------------------------------------------------

    def _respondToBadRequestAndDisconnect(self):
        # Twisted's Request calls it for a form it cannot parse (none is parsed here).
        self.refuse(400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1")

    def refuse(self, status: int, reason: str, kind: str, message: str) -> None:
        """Refuse the request being read (if any) in the error shape, and close."""
        if self.requests:
            self.requests[-1].refuse(status, reason, kind, message)
        else:
            self.answer(status, reason, kind, message)

    def answer(self, status: int, reason: str, kind: str, message: str, request_id: str | None = None,
               path: bytes | None = None) -> int:
        """
        Answer straight onto the connection (no request was dispatched) and close it.

        @return: the length of the answer's body (0 if the connection was closing).
        """
        self.head_since = self.body_since = None
        if self.closing or self.transport is None:
            return 0
        self.closing = True
        self.persistent = False
        metrics = self.site.metrics
        if metrics is not None and kind in _REFUSAL_OF_KIND:
            metrics.refused(_REFUSAL_OF_KIND[kind])
        answer = error_answer(status, reason, kind, message, request_id or new_request_id(), path)
        self.transport.write(answer)
        self.transport.loseConnection()
        return len(answer) - answer.index(b"\r\n\r\n") - 4

    # --- the timer -------------------------------------------------------------------------

    def setTimeout(self, period):
        """
        Twisted's idle timeout (L{TimeoutMixin.setTimeout}: C{idle_timeout}, off while a
        request is in progress), kept by the connection's one timer instead of a
        DelayedCall of its own: Twisted cancels that call at each request and makes a new
        one after it, and a cancelled call stays in the reactor's heap until its time (a
        held stream's connection held one for C{idle_timeout}). When it is reached,
        Twisted's C{timeoutConnection} closes the connection, as before.
        """
        previous = self.timeOut
        self.timeOut = period
        if period is None:
            self.idle_since = None
            return previous
        site = self.site
        reactor = site.reactor
        now = self.idle_since = reactor.seconds()
        at = now + period
        timer = self.timer
        if timer is None:
            if self.head_since is not None:
                at = min(at, self.head_since + site.header_timeout)  # a new connection's
            self.timer = reactor.callLater(max(0.0, at - now), self._check)
        elif timer.getTime() > at:
            timer.reset(period)  # rare: a timer set for later (a send_timeout past idle_timeout)
        return previous

    def resetTimeout(self):
        """Data came: an idle connection's timeout counts from now (L{TimeoutMixin.resetTimeout})."""
        if self.idle_since is not None:
            self.idle_since = self.site.reactor.seconds()

    def _start_head(self) -> None:
        if not self.site.header_timeout:
            return
        self.head_since = self.site.reactor.seconds()
        # By the header deadline, even if the timer is set later (a send timeout of the
        # request before, on a kept-alive connection).
        self._arm(self.head_since + self.site.header_timeout)

    def _arm_body(self) -> None:
        self.body_armed = True
        site = self.site
        at = self.body_since + (site.body_timeout or float("inf"))
        if site.min_body_rate:
            at = min(at, self.body_since + site.body_grace)
        if at != float("inf"):
            self._arm(at)

    def _arm(self, at: float) -> None:
        """Make the timer fire by C{at} (it fires earlier if something else is due first)."""
        now = self.site.reactor.seconds()
        timer = self.timer
        if timer is None:
            self.timer = self.site.reactor.callLater(max(0.0, at - now), self._check)
        elif timer.getTime() > at:
            timer.reset(max(0.0, at - now))

    def _check(self) -> None:
        self.timer = None
        if self.closing:
            return
        site = self.site
        now = site.reactor.seconds()
        due = []
        if self.head_since is not None:
            at = self.head_since + site.header_timeout
            if now >= at - _EPSILON:
                return self._head_expired()
            due.append(at)
        if self.idle_since is not None and self.timeOut is not None:
            at = self.idle_since + self.timeOut
            if now >= at - _EPSILON:
                self.idle_since = None
                self.timeoutConnection()
                return
            due.append(at)
        if self.body_since is not None and self.body_armed:
            at = self._body_due(now)
            if at is None:
                return
            due.append(at)
        if self.stalled_since is not None:
            at = self.stalled_since + site.send_timeout
            if now >= at - _EPSILON:
                self.log.info("closing a connection from {peer}: its client has not read its answer for {seconds} s",
                              peer=self.transport.getPeer(), seconds=site.send_timeout)
                self.closing = True
                if site.metrics is not None:
                    site.metrics.refused("slow_client")
                self.transport.abortConnection()
                return
            due.append(at)
        if due:
            self._arm(min(due))

    def _head_expired(self) -> None:
        self.head_since = None
        if not self.requests or not self._handlingRequest:
            self.refuse(408, "Request Timeout", "request_timeout",
                        f"the request's headers did not arrive within {self.site.header_timeout:g} s")

    def _body_due(self, now: float):
        """
        Check the body awaited against its deadline and rate.

        @return: when to look again, or None if it was refused.
        """
        site = self.site
        elapsed = now - self.body_since
        if site.body_timeout and elapsed >= site.body_timeout - _EPSILON:
            self.refuse(408, "Request Timeout", "request_timeout",
                        f"the request's body did not arrive within {site.body_timeout:g} s")
            return None
        at = self.body_since + site.body_timeout if site.body_timeout else float("inf")
        if site.min_body_rate:
            received = self.requests[-1].body_size
            if elapsed >= site.body_grace - _EPSILON and received < site.min_body_rate * elapsed - _EPSILON:
                self.refuse(408, "Request Timeout", "request_timeout",
                            f"the request's body came slower than {site.min_body_rate:g} bytes/s")
                return None
            # When the body would fall under the rate if nothing more came.
            at = min(at, self.body_since + max(site.body_grace, received / site.min_body_rate))
        return at if at != float("inf") else None

    # --- eviction --------------------------------------------------------------------------

    def eviction_rank(self, now: float):
        """
        How readily this connection is closed to make room for a new one (lower first),
        or None if it may not be: one whose request is being served.
        """
        if self.closing:
            return None
        if self.stalled_since is not None:
            # A client that does not read its answer (even one that is all written: a
            # connection closed politely would keep what it holds until it is read)
            return (1, self.stalled_since)
        if not self.requests:
            return (0, 0.0)  # idle
        if self.head_since is not None:
            return (2, self.head_since)  # headers still coming
        if self.body_since is not None:
            elapsed = max(now - self.body_since, 1e-3)
            return (3, self.requests[-1].body_size / elapsed)  # the slowest body first
        return None


class BoundedRequest(Request):
    """A request whose body may not exceed its site's C{max_body_bytes}."""

    # What Twisted's Request.__init__ always sets (none has a class default) goes in slots,
    # so that the instance's __dict__ keeps fewer than 30 keys, CPython's limit for a dict
    # that shares its class's keys: under 300 bytes, not 1.5 KB, for each request (a held
    # stream holds its request: 10,000 of them, 12 MB).
    __slots__ = (
        "notifications", "channel", "client", "host", "requestHeaders", "received_cookies", "responseHeaders",
        "cookies", "transport", "queued", "_parsePOSTFormSubmission", "_adapterCache",
    )

    body_size = 0
    refused = False
    aibackend_started = None
    # Set by the front doors (aibackend.web.begin, the routes that name a model), read by
    # the access line and a worker's forwarder: None until then.
    aibackend_request_id = None
    aibackend_model = None
    # The client went away (its connection was lost) before the answer was finished.
    aibackend_gone = False
    # A streamed answer's figures, set by the relay (aibackend.relay.StreamWriter): its
    # chunks, first_chunk_ms and stream_end, for the access line. None for a plain answer.
    aibackend_stream = None
    # A request to a model with fallbacks: its aibackend.relay.Chain (the attempts, the
    # model that served), for the access line. None for any other.
    aibackend_chain = None
    # Whole, and handed to its resource (so it has a method and a path to log).
    aibackend_processed = False
    aibackend_args = None  # the query's parameters, once read (args)
    # The Deferred of the answer (aibackend.relay.Relay.answer), cancelled if the client
    # goes away first: one attribute, not a notifyFinish() Deferred a request.
    aibackend_answering = None
    # Who sent it (an aibackend.policy.Caller: a client key), set by the guard
    # (aibackend.auth.Guard.check_client) when the request carries a key; None otherwise.
    aibackend_caller = None
    # A worker process's request forwarded to the primary (--processes), set by the guard: its
    # limits were kept in the worker (aibackend.policy.Policy.admit does not keep them again).
    aibackend_forwarded = False

    def __init__(self, channel, *args, **kwargs):
        """
        Twisted's L{Request.__init__} (twisted.web.server's, which calls twisted.web.http's
        and L{Componentized}'s) in one call, for the channel's every request: what they set
        (the slots above), set here, to the same values (a test compares the two); the site
        parses no form. Anything more asked of it is Twisted's own.
        """
        if args or kwargs:
            super().__init__(channel, *args, **kwargs)
            return
        self.notifications = []
        self.channel = channel
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.requestHeaders = Headers()
        self.received_cookies = {}
        self.responseHeaders = Headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = False
        self._adapterCache = {}

    def gotLength(self, length):
        self.aibackend_started = self.channel.site.reactor.seconds()
        self.content = BytesIO()
        if length is not None and length > self.channel.site.max_body_bytes:
            self.refuse_too_large(length)

    def connectionLost(self, reason):
        self.aibackend_gone = True  # before the errbacks of notifyFinish(), which read it
        channel = self.channel
        super().connectionLost(reason)
        answering = self.aibackend_answering
        if answering is not None:
            self.aibackend_answering = None
            answering.cancel()  # after the errbacks of notifyFinish(), as if it were one of them
        if self.aibackend_processed and not self.finished and channel is not None:
            # The client left before its answer was finished: finish() never comes, so the
            # request gets its access event here (499, as every request whose client left:
            # AibackendSite.log), after the errbacks above have cancelled its work (a
            # stream's end is known then).
            channel.site.log(self)

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.body_size += len(data)
        if self.body_size > self.channel.site.max_body_bytes:
            self.refuse_too_large(None)
            return
        self.content.write(data)

    def refuse_too_large(self, length) -> None:
        limit = self.channel.site.max_body_bytes
        said = f"{length} bytes" if length is not None else "more"
        error = PayloadTooLarge(f"the request body is {said}; the limit is {limit} bytes")
        metrics = self.channel.site.metrics
        if metrics is not None:
            metrics.refused("body_too_large")
        self.refuse(413, "Payload Too Large", error.type, error.message)

    def refuse(self, status: int, reason: str, kind: str, message: str) -> None:
        """
        Answer before the request is dispatched, straight onto the transport (nothing
        else writes to it), and close.
        """
        if self.refused:
            return
        self.refused = True
        channel = self.channel
        self.content = BytesIO()
        # No "100 Continue" after the refusal: the channel sends one after gotLength.
        self.requestHeaders.removeHeader(b"expect")
        request_id = request_id_from_headers(self.requestHeaders)
        # The request never reaches finish(), so give it its access event here. Its
        # method and path are still only the channel's (requestReceived comes later).
        self.method = channel.method or b"-"
        self.uri = channel.target or b"-"
        self.path = self.uri.split(b"?", 1)[0]
        sent = channel.answer(status, reason, kind, message, request_id, self.path)
        self.code = status
        self.sentLength = sent
        self.aibackend_request_id = request_id
        channel.site.log(self)

    def requestReceived(self, command, path, version):
        """
        The whole request is in: Twisted's L{Request.requestReceived}, without the work
        the daemon does not use: the site parses no form, and the query's parameters
        (C{args}) are parsed when first read (the daemon's routes read the query
        themselves, L{aibackend.web.query_params}).
        """
        self.content.seek(0, 0)
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        self.process()

    @property
    def args(self):
        """The query's parameters (Twisted's C{Request.args}), parsed when first read."""
        args = self.aibackend_args
        if args is None:
            query = self.uri.partition(b"?")[2]
            args = self.aibackend_args = parse_qs(query, 1) if query else {}
        return args

    @args.setter
    def args(self, value):
        self.aibackend_args = value

    def process(self):
        self.channel.body_since = None
        if self.refused:
            return
        self.aibackend_processed = True
        if self.body_size > LARGE:
            # The body is held once: getvalue() trims the buffer to its size, and read()
            # then hands on that same bytes object instead of a copy.
            self.content.getvalue()
        path = self.path
        if path == b"*":
            super().process()  # (Twisted answers it itself)
            return
        # Twisted's Request.process, but for two things: the Server and Date headers are
        # written with the answer's head (AibackendChannel.writeHeaders, BoundedRequest.write),
        # not set on each request's Headers; and no resource of the daemon encodes its
        # answers (twisted.web.resource.EncodingResourceWrapper), so none is looked for.
        site = self.site = self.channel.site
        self.prepath = []
        # Without a %-escape a segment is as it is (unquote_to_bytes would return it). (find:
        # CPython's `bytes in bytes` first tries the operand as an integer, raising and
        # clearing a TypeError each time, about 1,800 instructions.)
        self.postpath = (path[1:].split(b"/") if path.find(b"%") < 0
                         else list(map(unquote_to_bytes, path[1:].split(b"/"))))
        try:
            resource = site.resource
            if resource.isLeaf:
                # Site.getResourceFor's walk ends at once at a leaf (the daemon's Root):
                # what it sets is set here, without the walk.
                self.sitepath = []
            else:
                resource = site.getResourceFor(self)
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    def finish(self):
        """
        Twisted's L{Request.finish} (twisted.web.server's, then twisted.web.http's, then its
        clean-up) in one call, for an answer written whole by L{write} (its head and body
        in one write: nothing chunked, no producer, nobody waiting on L{notifyFinish}):
        the access event, then the channel told the request is done, as Twisted does it.
        Anything else (a client gone, a second finish, nothing written yet, a stream) is
        Twisted's own finish.
        """
        if (
            self.aibackend_gone
            or self.finished
            or not self.startedWriting
            or self.chunked
            or self.producer is not None
            or self.notifications
            or self.queued
        ):
            return super().finish()
        channel = self.channel
        factory = channel.factory
        if factory is not None:
            factory.log(self)
        self.finished = 1
        channel.requestDone(self)
        del self.channel
        if self.content is not None:
            self.content.close()
            del self.content

    def write(self, data):
        """
        Twisted's L{Request.write}; the first write of an answer whose type and length are
        set (the relay's, every route's JSON) goes with its head (L{answer_head}) in one
        transport write, the body as it is if it is large (L{LARGE}: not copied).

        (Twisted's own write makes a HEAD request's answer bodiless when its resource
        cannot answer HEAD: no resource of the daemon declines a method, L{Root} routes
        every one, so a write comes with the request's own method.)
        """
        if (
            self.startedWriting
            or self.finished
            or self.aibackend_gone
            or self.method == b"HEAD"
            or self.code in NO_BODY_CODES
            or self.cookies
            or self.etag is not None
            or self.lastModified is not None
            or type(data) is not bytes
        ):
            return super().write(data)
        head = answer_head(self.clientproto, self.code, self.code_message, self.responseHeaders, True)
        if head is None:
            return super().write(data)
        self.startedWriting = 1
        self.sentLength += len(data)
        transport = self.channel.transport
        if len(data) >= LARGE:
            transport.write(head)
            transport.write(data)
        else:
            transport.write(head + data)



_malloc_trim = None  # libc's, once release_freed_memory() has applied
# A request whose body or answer is larger than this makes the site give freed memory back.
_TRIM_AFTER = 1 << 20


def release_freed_memory() -> bool:
    """
    Make glibc's malloc give large freed blocks back to the system.

    By default glibc raises its mmap threshold to the size of each large block that is
    freed (up to 32 MiB), so that after one large request body the next ones are taken
    from the heap, and a heap freed in the middle stays with the process: after a burst
    of large bodies the daemon kept most of its peak memory. Setting the threshold
    (128 KiB, glibc's initial one) turns that adjustment off: a large block is its own
    mapping, returned when freed. What is left in the heap (the 64 KiB pieces a body is
    read in) is returned by C{malloc_trim}, which the site calls at most once a second
    after a request with a large body or answer (L{AibackendSite.log}).

    @return: whether it applied (glibc only).
    """
    global _malloc_trim
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (mallopt(M_MMAP_THRESHOLD, 128 * 1024) and mallopt(M_TRIM_THRESHOLD, 256 * 1024)):
        return False
    _malloc_trim = malloc_trim
    return True


class AibackendSite(Site):
    """
    The daemon's site: its connections are L{AibackendChannel}s, bounded request
    bodies, no form parsing (every body is JSON, and parsing each POST's Content-Type
    through the C{email} package costs a third of a request's CPU), no tracebacks shown
    to clients.
    """

    protocol = AibackendChannel
    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, resource, *, max_body_bytes: int, metrics=None, header_timeout: float = 10.0,
                 max_connections: int = 10000, access_log: bool = True, body_timeout: float = 60.0,
                 min_body_rate: float = 240.0, body_grace: float = 5.0, send_timeout: float = 60.0,
                 max_connections_per_peer: int = 1000, **kwargs):
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.min_body_rate = min_body_rate
        self.body_grace = body_grace
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.channels: OrderedDict = OrderedDict()  # open connections, oldest first
        self.peers: dict = {}  # client host -> its open connections
        # Called with each connection that ends (a channel), for whoever counts them
        # (aibackend.listeners' balance of --processes): once a connection, never a request.
        self.on_connection_lost: list = []
        self._trim_call = None

    def acceptableProtocols(self):
        # The channel speaks HTTP/1.1 only: never offer h2 over TLS's ALPN.
        return [b"http/1.1"]

    def buildProtocol(self, addr):
        """
        A connection with the daemon's client limits. Past C{max_connections_per_peer}
        from one client address, or past C{max_connections} in all, a connection (of that
        address, or any) is closed to make room: an idle one, else the one holding the
        most for the least progress (see L{AibackendChannel.eviction_rank}); if every one
        is being served, the new one is refused (503).
        """
        channel = super().buildProtocol(addr)
        if self.metrics is not None:
            self.metrics.daemon.open_connections += 1
        peer = addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else None
        if peer is not None and self.max_connections_per_peer:
            held = self.peers.get(peer, 0)
            if held >= self.max_connections_per_peer and not self._evict(peer):
                channel.refusal = (503, "Service Unavailable", "model_unavailable",
                                   f"this client address holds the daemon's maximum of "
                                   f"{self.max_connections_per_peer} connections a client")
                return channel
        if len(self.channels) >= self.max_connections and not self._evict():
            channel.refusal = (503, "Service Unavailable", "model_unavailable",
                               f"the daemon holds its maximum of {self.max_connections} connections")
            return channel
        if peer is not None and self.max_connections_per_peer:
            self.peers[peer] = self.peers.get(peer, 0) + 1
            channel.peer = peer
        self.channels[channel] = None
        return channel

    def connection_lost(self, channel) -> None:
        self.channels.pop(channel, None)
        if channel.peer is not None:
            held = self.peers.get(channel.peer, 1) - 1
            if held > 0:
                self.peers[channel.peer] = held
            else:
                self.peers.pop(channel.peer, None)
            channel.peer = None
        if self.metrics is not None:
            self.metrics.daemon.open_connections -= 1
        for hook in self.on_connection_lost:
            hook(channel)

    def _evict(self, peer=None) -> bool:
        """
        Close the connection that is readiest to go (see L{AibackendChannel.eviction_rank}),
        of client address C{peer} alone if given (the peer is at its own cap).
        """
        now = self.reactor.seconds()
        chosen = chosen_rank = None
        for channel in self.channels:
            if channel.transport is None or (peer is not None and channel.peer != peer):
                continue
            rank = channel.eviction_rank(now)
            if rank is None:
                continue
            if rank[0] == 0:
                chosen, chosen_rank = channel, rank
                break  # the oldest idle one
            if chosen_rank is None or rank < chosen_rank:
                chosen, chosen_rank = channel, rank
        if chosen is None:
            return False
        self.channels.pop(chosen)
        if chosen_rank[0] != 0:
            AibackendChannel.log.info(
                "at {limit}: closing the connection from {peer} that holds the most for the "
                "least progress ({what})",
                limit="max_connections_per_peer" if peer is not None else "max_connections",
                peer=chosen.transport.getPeer(),
                what=("does not read its answer", "headers still coming", "the slowest body")[chosen_rank[0] - 1])
        if chosen_rank[0] == 0:
            chosen.closing = True
            chosen.transport.loseConnection()
        elif chosen_rank[0] == 1:
            chosen.closing = True
            chosen.transport.abortConnection()  # it does not read: what it holds goes nowhere
        else:
            chosen.refuse(503, "Service Unavailable", "model_unavailable",
                          "the daemon is at its maximum of connections, and this one was the slowest")
        return True

    def _trim_soon(self) -> None:
        if self._trim_call is None:
            self._trim_call = self.reactor.callLater(1.0, self._trim)

    def _trim(self) -> None:
        self._trim_call = None
        _malloc_trim(0)

    def stopFactory(self):
        if self._trim_call is not None and self._trim_call.active():
            self._trim_call.cancel()
        self._trim_call = None
        super().stopFactory()

    def log(self, request):
        """
        One access event per request, with fields (no query string: it may hold
        what an addmodel was given; no headers: they may hold tokens).
        """
        if _malloc_trim is not None and (request.sentLength > _TRIM_AFTER or request.body_size > _TRIM_AFTER):
            self._trim_soon()
        if not self.access_log:
            return
        path = request.path.decode("latin-1")
        parts = path.strip("/").split("/")
        started = request.aibackend_started if isinstance(request, BoundedRequest) else None
        latency_ms = round((self.reactor.seconds() - started) * 1000, 3) if started is not None else None
        peer = request.getClientAddress()
        peer = getattr(peer, "host", None) or str(peer)
        method = request.method.decode("latin-1")
        model = request.aibackend_model
        request_id = request.aibackend_request_id
        # A client that left is logged with nginx's status for it, whatever was begun for it
        # (a route may still finish a request whose connection is going).
        status = CLIENT_CLOSED if request.aibackend_gone else request.code
        stream = request.aibackend_stream
        if stream is not None or request.aibackend_chain is not None:
            self._log_stream(request, stream, status, peer, method, path, parts, model, request_id, latency_ms)
            return
        # The line is made here, once, with an f-string: the log system's own formatting of a
        # many-field template costs several times more, on every request.
        access_log.info(
            "{line}",
            line=f"{peer} {method} {path} {status} {request.sentLength} bytes {latency_ms} ms "
                 f"model={model} request={request_id}",
            peer=peer,
            method=method,
            path=path,
            operation=parts[1] if len(parts) == 2 else None,
            model=model,
            status=status,
            bytes=request.sentLength,
            latency_ms=latency_ms,
            request_id=request_id,
        )

    def _log_stream(self, request, stream, status, peer, method, path, parts, model, request_id, latency_ms) -> None:
        """
        A streamed answer's access event: a plain one's fields, and its chunks, first chunk
        and end; and a request to a model with fallbacks: the attempts (C{chain}:
        C{"id:status"} each, in turn) and the model that served it (C{served_by}).
        """
        more = {}
        line = (f"{peer} {method} {path} {status} {request.sentLength} bytes {latency_ms} ms "
                f"model={model} request={request_id}")
        if stream is not None:
            chunks, first_chunk_ms, stream_end = stream.chunks, stream.first_chunk_ms, stream.stream_end
            line += f" chunks={chunks} first_chunk_ms={first_chunk_ms} stream_end={stream_end}"
            more.update(chunks=chunks, first_chunk_ms=first_chunk_ms, stream_end=stream_end)
        chain = request.aibackend_chain
        if chain is not None:
            tried = ">".join(chain.tried)
            line += f" served_by={chain.served} chain={tried}"
            more.update(served_by=chain.served, chain=tried)
        access_log.info(
            "{line}",
            line=line,
            peer=peer,
            method=method,
            path=path,
            operation=parts[1] if len(parts) == 2 else None,
            model=model,
            status=status,
            bytes=request.sentLength,
            latency_ms=latency_ms,
            request_id=request_id,
            **more,
        )
