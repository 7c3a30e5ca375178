"""
The HTTP server side: a L{Site} whose requests enforce the body limit.

Twisted buffers a request's whole body before any resource sees it, in a temporary file
on disk past 100 kB. Here the body is bounded by C{max_body_bytes}, so it is kept in
memory, and a body that announces (C{Content-Length}) or grows past the limit is refused
with a JSON 413 at once and the connection closed, without reading the rest.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from io import BytesIO

from twisted.logger import Logger
from twisted.web.http import datetimeToString
from twisted.web.server import Request, Site

from aibackend.directwrite import hold_writes
from aibackend.errors import PayloadTooLarge
from aibackend.ids import new_request_id, request_id_from_headers


access_log = Logger(namespace="aibackend.access")


class _ClientLimits:
    """
    The header deadline of one client connection.

    A request's headers must arrive within C{header_timeout} of its first byte. The timer
    is not made and cancelled for each request (a kept-alive connection would make one a
    request): L{start} and L{stop} only note when the wait began, and one timer a
    connection looks at that when it fires, and sets itself again for what is left.
    """

    def __init__(self, site, channel, http):
        self.site = site
        self.channel = channel
        self.http = http
        self.timer = None
        self.waiting_since = None
        self.refuse = False
        self.writes = None  # aibackend.directwrite's, on a plain TCP connection

    def start(self) -> None:
        if not self.site.header_timeout:
            return
        if self.waiting_since is None:
            self.waiting_since = self.site.reactor.seconds()
        if self.timer is None:
            self.timer = self.site.reactor.callLater(self.site.header_timeout, self._check)

    def stop(self) -> None:
        self.waiting_since = None

    def close(self) -> None:
        self.waiting_since = None
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        self.timer = None
        if self.waiting_since is None:
            return  # no headers awaited: the next request's first byte sets the timer again
        left = self.waiting_since + self.site.header_timeout - self.site.reactor.seconds()
        if left > 0:
            self.timer = self.site.reactor.callLater(left, self._check)
            return
        self._expired()

    def _expired(self) -> None:
        self.waiting_since = None
        if not self.http.requests or not getattr(self.http, "_handlingRequest", False):
            self.answer(408, "Request Timeout", "request_timeout",
                        f"the request's headers did not arrive within {self.site.header_timeout:g} s")

    def answer(self, status: int, reason: str, kind: str, message: str) -> None:
        """Answer straight onto the connection (no request was dispatched) and close it."""
        request_id = new_request_id()
        body = json.dumps({"error": {"type": kind, "message": message, "request_id": request_id}}).encode()
        head = [
            f"HTTP/1.1 {status} {reason}".encode(),
            b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(),
            b"X-Request-Id: " + request_id.encode(),
            b"Connection: close",
        ]
        transport = self.http.transport
        if transport is not None:
            transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            transport.loseConnection()


class BoundedRequest(Request):
    """A request whose body may not exceed its site's C{max_body_bytes}."""

    _body_size = 0
    _refused = False

    def gotLength(self, length):
        self.aibackend_started = self.channel.site.reactor.seconds()
        self.content = BytesIO()
        self._body_size = 0
        if length is not None and length > self.channel.site.max_body_bytes:
            self._refuse(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._body_size += len(data)
        if self._body_size > self.channel.site.max_body_bytes:
            self._refuse(None)
            return
        self.content.write(data)

    def _refuse(self, length):
        """
        Answer 413 before the body is read, straight onto the transport (the request
        has not been dispatched, so nothing else writes to it), and close.
        """
        self._refused = True
        self.content = BytesIO()
        # No "100 Continue" after the refusal: the channel sends one after gotLength.
        self.requestHeaders.removeHeader(b"expect")
        limit = self.channel.site.max_body_bytes
        said = f"{length} bytes" if length is not None else "more"
        error = PayloadTooLarge(f"the request body is {said}; the limit is {limit} bytes")
        request_id = request_id_from_headers(self.requestHeaders)
        body = json.dumps(error.as_json(request_id)).encode()
        head = [
            b"HTTP/1.1 413 Payload Too Large",
            b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(),
            b"X-Request-Id: " + request_id.encode(),
            b"Date: " + datetimeToString(),
            b"Connection: close",
        ]
        metrics = getattr(self.channel.site, "metrics", None)
        if metrics is not None:
            metrics.refused("body_too_large")
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        transport.loseConnection()
        # The request never reaches finish(), so give it its access event here. Its
        # method and path are still only the channel's (requestReceived comes later).
        self.method = getattr(self.channel, "_command", None) or b"-"
        self.uri = getattr(self.channel, "_path", None) or b"-"
        self.path = self.uri.split(b"?", 1)[0]
        self.code = 413
        self.sentLength = len(body)
        self.aibackend_request_id = request_id
        self.channel.site.log(self)

    def process(self):
        if self._refused:
            return
        super().process()


class AibackendSite(Site):
    """
    The daemon's site: bounded request bodies, no form parsing (every body is JSON,
    and parsing each POST's Content-Type through the C{email} package costs a third of
    a request's CPU), no tracebacks shown to clients.
    """

    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, resource, *, max_body_bytes: int, metrics=None, header_timeout: float = 10.0,
                 max_connections: int = 10000, access_log: bool = True, **kwargs):
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.channels: OrderedDict = OrderedDict()  # open connections, oldest first

    def buildProtocol(self, addr):
        """
        A connection with the daemon's client limits: its request headers must arrive
        within C{header_timeout} (else 408), and past C{max_connections} the oldest idle
        connection is closed to make room (or, if none is idle, the new one is refused).
        """
        channel = super().buildProtocol(addr)
        http = getattr(channel, "_channel", channel)
        limits = _ClientLimits(self, channel, http)
        if len(self.channels) >= self.max_connections and not self._evict_idle():
            limits.refuse = True
        self.channels[channel] = limits
        if self.metrics is not None:
            self.metrics.daemon.open_connections += 1
        # The generic channel hands makeConnection to the HTTP/1.1 channel inside it.
        made, received, headers_in, lost = (
            http.connectionMade, channel.dataReceived, http.allHeadersReceived, channel.connectionLost,
        )

        def connectionMade():
            made()
            # Each request asks its channel for the local address: one getsockname() call
            # a request, for an answer that never changes on a connection.
            if http.transport is not None:
                host = http.transport.getHost()
                http.getHost = lambda: host
                limits.writes = hold_writes(http.transport, self.reactor)
            if limits.refuse:
                limits.answer(503, "Service Unavailable", "model_unavailable",
                              f"the daemon holds its maximum of {self.max_connections} connections")
            else:
                limits.start()

        def dataReceived(data):
            if not http.requests:
                limits.start()
            result = received(data)
            if limits.writes is not None:
                limits.writes.event_done()  # the request written to a model goes now
            return result

        def allHeadersReceived():
            limits.stop()
            return headers_in()

        def connectionLost(reason):
            limits.close()
            self.channels.pop(channel, None)
            if self.metrics is not None:
                self.metrics.daemon.open_connections -= 1
            return lost(reason)

        http.connectionMade = connectionMade
        channel.dataReceived = dataReceived
        http.allHeadersReceived = allHeadersReceived
        channel.connectionLost = connectionLost
        return channel

    def _evict_idle(self) -> bool:
        """Close the oldest connection that has no request in progress."""
        for channel, limits in self.channels.items():
            if not limits.http.requests and limits.http.transport is not None:
                self.channels.pop(channel)
                limits.http.transport.loseConnection()
                return True
        return False

    def log(self, request):
        """
        One access event per request, with fields (no query string: it may hold
        what an addmodel was given; no headers: they may hold tokens).
        """
        if not self.access_log:
            return
        path = request.path.decode("latin-1")
        parts = path.strip("/").split("/")
        started = getattr(request, "aibackend_started", None)
        latency_ms = round((self.reactor.seconds() - started) * 1000, 3) if started is not None else None
        peer = request.getClientAddress()
        peer = getattr(peer, "host", None) or str(peer)
        method = request.method.decode("latin-1")
        model = getattr(request, "aibackend_model", None)
        request_id = getattr(request, "aibackend_request_id", None)
        # The line is made here, once, with an f-string: the log system's own formatting of a
        # many-field template costs several times more, on every request.
        access_log.info(
            "{line}",
            line=f"{peer} {method} {path} {request.code} {request.sentLength} bytes {latency_ms} ms "
                 f"model={model} request={request_id}",
            peer=peer,
            method=method,
            path=path,
            operation=parts[1] if len(parts) == 2 else None,
            model=model,
            status=request.code,
            bytes=request.sentLength,
            latency_ms=latency_ms,
            request_id=getattr(request, "aibackend_request_id", None),
        )
