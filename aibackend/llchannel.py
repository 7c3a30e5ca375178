"""
HTTP/1.1 requests read by llhttp, the C parser of Node.js (through C{httptools}, as the
client side in L{aibackend.client}), in place of Twisted's line-by-line reading.

L{LlhttpChannel} is Twisted's L{HTTPChannel}, every part of it that answers kept (the
L{Request}, producers, the idle timeout, how a connection closes), with the reading of
requests replaced: Twisted's is pure Python, a method call and a few copies for every line
(LineReceiver, lineReceived, headerReceived), and it was the largest cost of a request left
in the daemon.

How a request is read:

  - its head (the request line and the headers) by llhttp, in strict mode: the line split,
    the method, the target, every header name and value checked in C, one Python call a
    header. The head is fed to llhttp up to its end, the first empty line (CRLF CRLF; llhttp
    refuses a bare LF, so a head it accepts cannot end anywhere else), and llhttp must have
    taken it whole there, or the request is refused;
  - its body by the channel, framed from the headers llhttp checked (one Content-Length,
    or Transfer-Encoding: chunked alone): a Content-Length body is handed to the request as
    it arrives and also fed to llhttp, which only counts it (no callback), to be at the next
    request's start; a chunked body goes to L{ChunkedBody}, the strict decoder that refuses
    a chunk too large from its size line, before its data (llhttp does not say a chunk's
    size), and the next request gets a new parser.

So the channel knows where each request ends, and stops there: what follows (a pipelined
request) is held, not read, until the answer before it is done, as Twisted does: one
request at a time, answered in order, the transport paused once more than 16 KiB is held.

Refusals are the subclass's (L{LlhttpChannel.refuse}); the channel asks for one for a head
llhttp refuses or that is too large, a body framed wrongly and a chunked body that is
malformed or too large.

Twisted names no public way to drive its channel from another parser: what this module
reads or sets of HTTPChannel's private state is in L{LlhttpChannel} alone, and said there.
"""

from __future__ import annotations

import re

import httptools
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import InvalidHeaderName

# The empty line that ends a head.
_HEAD_END = b"\r\n\r\n"
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
_VERSIONS_SAID = frozenset(_VERSIONS.values())
# A request line's method and target, as Twisted took them (a token; printable bytes).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\xb0]+\Z")
# What of pipelined requests is held before the transport is paused (Twisted's
# _optimisticEagerReadSize).
HELD_BEFORE_PAUSE = 0x4000
# The longest line of a chunked body (a chunk's size and extensions, or a trailer).
_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 16384
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Headers a request seldom has, whose values the channel reads once the head is in: noted
# (a bit each) as llhttp reads their names, so that a head without them is not searched for
# them. (A name in any case is the same header: Twisted's Headers takes it so.)
_TRANSFER_ENCODING, _EXPECT, _COOKIE = 1, 2, 4
_NOTED_HEADERS = {b"transfer-encoding": _TRANSFER_ENCODING, b"expect": _EXPECT, b"cookie": _COOKIE}


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp: the channel has said why (C{problem})."""


class LlhttpChannel(HTTPChannel):
    """
    Twisted's L{HTTPChannel} reading requests with llhttp (see the module's docstring).

    A subclass says how to refuse (L{refuse}, L{body_too_large}) and may hook the steps of
    a request (L{head_started}, L{head_received}, L{body_expected}).

    Of HTTPChannel's private state, this class alone sets or reads (Twisted 24.7 to 26.10;
    its reading code, which used them, is replaced, the rest of the class still uses them):
      - C{_handlingRequest}: true while a request is being answered. HTTPChannel's
        C{pauseProducing} and C{resumeProducing} (the transport's buffer is full, then
        empty) read it: reading is paused with the answer only between requests;
      - C{_networkProducer}: the transport as a push producer (HTTPChannel registers it in
        C{connectionMade}): paused while too much of pipelined requests is held, resumed
        when a request is done, as Twisted's C{requestDone} does (if it was paused, by this
        class or by HTTPChannel's C{pauseProducing}: C{network_paused});
      - C{_waitingForTransport}: the transport asked to pause; reading must not resume then.
    """

    log = Logger()

    # The longest request line (LineReceiver's MAX_LENGTH, as before) and, HTTPChannel's,
    # the most headers and the largest head.
    MAX_LENGTH = 16384
    body_limit = None  # the largest body in bytes (None: no limit)

    __slots__ = (
        "requests", "_handlingRequest", "_dataBuffer", "_transferDecoder",  # HTTPChannel.__init__'s
        "parser", "current", "method", "target", "http_version", "keep_alive", "head_done", "head_size",
        "head_tail", "header_count", "noted", "problem", "body_left", "chunked", "held", "held_size", "parsing",
        "saved_timeout", "closing", "network_paused",
    )

    def __init__(self):
        super().__init__()
        self.parser = None  # llhttp's, for requests to come (a new one after a chunked body)
        self.current = None  # the request being read, once its request line is in
        self.method = None  # the request line's, as llhttp read it (bytes)
        self.target = None
        self.http_version = None  # llhttp's, "1.1"
        self.keep_alive = True
        self.head_done = False  # llhttp has read the whole head
        self.head_size = 0  # bytes of the head fed to llhttp so far (0: no request begun)
        self.head_tail = b""  # the last bytes of them (an empty line may begin there)
        self.header_count = 0
        self.noted = 0  # the _NOTED_HEADERS the head being read has (their bits)
        self.problem = None  # why a callback stopped llhttp: a refusal's (status, reason, kind, message)
        self.body_left = 0  # bytes of a Content-Length body still to come
        self.chunked = None  # the chunked body's decoder
        self.held = []  # what came while a request was answered: pipelined requests
        self.held_size = 0
        self.parsing = False
        self.saved_timeout = None  # the idle timeout, off while a request is answered
        self.closing = False  # refused (or closed on purpose): nothing more is read
        # The transport may have been paused (pipelined requests held, or HTTPChannel's
        # pauseProducing between requests): requestDone resumes it only then, not at every
        # request (three calls into the reactor a request for a transport never paused).
        self.network_paused = False

    # --- for subclasses ------------------------------------------------------------------

    def refuse(self, status: int, reason: str, kind: str, message: str) -> None:
        """Refuse the request being read (if any), answering it, and close the connection."""
        raise NotImplementedError

    def body_too_large(self) -> None:
        """The chunked body being read grew past L{body_limit}: refuse it."""
        self.refuse(413, "Payload Too Large", "payload_too_large", "the request body is too large")

    def head_started(self) -> None:
        """The first byte of a request's head has come."""

    def head_received(self, request, version: bytes) -> bool:
        """
        The request's head is in (its headers are on C{request}), before its length is
        known. Return False if it was refused.
        """
        return True

    def body_expected(self, request) -> None:
        """The request has a body, to come (not refused)."""

    # --- reading -------------------------------------------------------------------------

    def dataReceived(self, data):
        self.resetTimeout()
        if self._handlingRequest:
            self._hold(data)
            return
        self.parsing = True
        try:
            while data and not self.closing:
                if self.body_left:
                    data = self._identity(data)
                elif self.chunked is not None:
                    data = self._chunks(data)
                else:
                    data = self._head(data)
                if data and self._handlingRequest:
                    self._hold(data)
                    break
        finally:
            self.parsing = False

    def _hold(self, data: bytes) -> None:
        if self.closing or not self.persistent:
            return  # after the connection's last request, what comes is not read (as Twisted)
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size > HELD_BEFORE_PAUSE and not self._waitingForTransport:
            # The client sends more while its answer is not done: it waits (TCP backpressure).
            self._networkProducer.pauseProducing()
            self.network_paused = True

    def pauseProducing(self):
        if not self._handlingRequest:
            self.network_paused = True  # HTTPChannel's pauses the transport too, then
        super().pauseProducing()

    def _head(self, data: bytes) -> bytes:
        """Read what of C{data} is a request's head; return what follows it."""
        size = self.head_size
        if size == 0:
            if not self.persistent:
                return b""  # the connection's last request is in: what follows is not read
            if data[0] == 13 or self.head_tail:
                data = self._skip_empty_lines(data)
                if not data:
                    return data
            if self.parser is None:
                self.parser = httptools.HttpRequestParser(self)
            self.method = self.target = None
            self.header_count = 0
            self.noted = 0
            self.head_done = False
            self.head_started()
            at = data.find(_HEAD_END)
            end = at + 4 if at >= 0 else -1
        else:
            # The empty line may have begun in what came before.
            at = (self.head_tail + data[:3]).find(_HEAD_END)
            if at >= 0:
                end = at + 4 - len(self.head_tail)
            else:
                at = data.find(_HEAD_END)
                end = at + 4 if at >= 0 else -1
        # end: where the head ends in data, or -1 if it does not end there.
        segment = data if end < 0 or end == len(data) else data[:end]
        if self.current is None and not self._request_line(segment, size):
            return b""
        self.head_size = size + len(segment)
        try:
            self.parser.feed_data(segment)
        except httptools.HttpParserUpgrade:
            # llhttp takes what follows this head as another protocol's (an Upgrade header, or
            # CONNECT): the channel frames its body from its headers, as any other, and the
            # next request gets a new parser.
            self.parser = None
        except httptools.HttpParserCallbackError:
            self._stopped()
            return b""
        except httptools.HttpParserError as e:
            self._malformed(e, segment if size == 0 else None)
            return b""
        # The head's size as Twisted counted it: its lines, without their CRLFs.
        if self.head_size - 2 * (self.header_count + 1) - (2 if end >= 0 else 0) > self.totalHeadersSize:
            self.refuse(431, "Request Header Fields Too Large", "headers_too_large",
                        f"the request's headers are more than {self.totalHeadersSize} bytes")
            return b""
        if self.head_done == (end < 0):
            # llhttp and the channel do not agree on where the head ends (never, with a
            # strict llhttp): what follows cannot be framed safely.
            self._refuse_malformed("its head does not end at its first empty line")
            return b""
        if end < 0:
            self.head_tail = (self.head_tail + segment)[-3:]
            return b""
        self.head_size = 0
        self.head_tail = b""
        return self._head_complete(data, end)

    def _skip_empty_lines(self, data: bytes) -> bytes:
        """Empty lines before a request are ignored (RFC 9112, section 2.2), a CRLF split between reads too."""
        if self.head_tail:  # a CR, alone, came last
            self.head_tail = b""
            if data[:1] == b"\n":
                data = data[1:]
        while data[:2] == b"\r\n":
            data = data[2:]
        if data == b"\r":
            self.head_tail = data
            return b""
        return data

    def _request_line(self, segment: bytes, size: int) -> bool:
        """
        Check the request line while it comes (its length, its CRLF), and make its request
        once it is whole. Return False if it was refused.
        """
        at = segment.find(b"\n")
        if at < 0:
            if size + len(segment) > self.MAX_LENGTH:
                self._line_too_long()
                return False
            return True
        if not (segment[at - 1] == 13 if at else self.head_tail[-1:] == b"\r"):
            # RFC 9112 allows a server to refuse a bare LF; llhttp does, but this says why.
            self.refuse(400, "Bad Request", "bad_request", "a line of the request ends in a bare LF, not CRLF")
            return False
        if size + at - 1 > self.MAX_LENGTH:
            self._line_too_long()
            return False
        request = self.current = self.requestFactory(self)
        self.requests.append(request)
        return True

    def _line_too_long(self) -> None:
        self.refuse(414, "URI Too Long", "uri_too_long", f"the request line is longer than {self.MAX_LENGTH} bytes")

    # llhttp's callbacks (the head only: llhttp is given no on_body or on_message_complete).

    def on_url(self, url: bytes) -> None:
        if self.target is None:
            self.target = url
            self.method = self.parser.get_method()  # read before its target
        else:
            self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        count = self.header_count = self.header_count + 1
        if count > self.maxHeaders:
            self.problem = (431, "Request Header Fields Too Large", "headers_too_large",
                            f"the request has more than {self.maxHeaders} headers")
            raise _Stop()
        try:
            # llhttp strips the spaces before a value, not those after it.
            self.current.requestHeaders.addRawHeader(name, value.rstrip(b" \t"))
        except InvalidHeaderName:
            self.problem = (400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1: a header's name")
            raise _Stop() from None
        noted = _NOTED_HEADERS.get(name.lower())
        if noted is not None:
            self.noted |= noted

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.head_done = True
        # Asked now: once the message is complete, llhttp no longer says.
        self.keep_alive = parser.should_keep_alive()
        self.http_version = parser.get_http_version()

    def _stopped(self) -> None:
        problem, self.problem = self.problem, None
        if problem is None:
            self.log.failure("a parser callback failed")
            problem = (400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1")
        self.refuse(*problem)

    def _malformed(self, error: Exception, segment: bytes | None) -> None:
        if segment is not None:
            # The request line as it came (llhttp may have stopped in it: a method it does
            # not know, a target it refuses): if it is one, its target names the route (the
            # refusal's shape) and the access event's method and path; if not, neither is known.
            words = segment.split(b"\r\n", 1)[0].split(b" ")
            if len(words) == 3 and words[2] in _VERSIONS_SAID and _TOKEN.match(words[0]) and _TARGET.match(words[1]):
                self.method, self.target = words[0], words[1]
            else:
                self.method = self.target = None
        self._refuse_malformed(str(error) or "llhttp refuses it")

    def _refuse_malformed(self, why: str) -> None:
        self.refuse(400, "Bad Request", "bad_request", f"the request is not valid HTTP/1.1: {why}")

    def _head_complete(self, data: bytes, end: int) -> bytes:
        request = self.current
        version = self.http_version = _VERSIONS.get(self.http_version)
        if version is None:
            # llhttp reads 0.9, 2.0 and 3.0 too; a request line is HTTP/1.0 or HTTP/1.1.
            self.method = self.target = None
            self._refuse_malformed("its version is not HTTP/1.0 or HTTP/1.1")
            return b""
        if not self.head_received(request, version):
            return b""
        headers = request.requestHeaders
        # llhttp has refused two Content-Lengths, one with anything but digits, and one
        # beside a Transfer-Encoding; it takes a coding before chunked, which is not done.
        noted = self.noted
        codings = headers.getRawHeaders(b"transfer-encoding") if noted & _TRANSFER_ENCODING else None
        if codings is not None:
            if len(codings) != 1 or codings[0].lower() != b"chunked":
                self._refuse_malformed("its Transfer-Encoding is not chunked alone")
                return b""
            length = None
        else:
            lengths = headers.getRawHeaders(b"content-length")
            length = int(lengths[0]) if lengths is not None else 0
        if noted & _COOKIE:
            request.parseCookies()  # (without a Cookie header, there is nothing to parse)
        if version == b"HTTP/1.1":
            self.persistent = self.keep_alive
            if not self.keep_alive:
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        else:
            self.persistent = False  # as Twisted: an HTTP/1.0 connection is never kept
        request.gotLength(length)
        if self.closing:
            return b""  # too large
        expect = headers.getRawHeaders(b"expect") if noted & _EXPECT else None
        if expect is not None and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        rest = data[end:] if end < len(data) else b""
        if length == 0:
            self._dispatch()
            return rest
        if length is None:
            self.chunked = ChunkedBody(self, request.handleContentChunk, self.body_limit)
            self.parser = None  # left inside the body: the next request gets a new one
        else:
            self.body_left = length
        self.body_expected(request)
        return rest

    def _identity(self, data: bytes) -> bytes:
        left = self.body_left
        if len(data) > left:
            rest = data[left:]
            data = data[:left]
        else:
            rest = b""
        self.body_left = left = left - len(data)
        parser = self.parser
        if parser is not None:
            parser.feed_data(data)  # llhttp counts it (no callback), to be at the next request's start
        self.current.handleContentChunk(data)
        if left == 0 and not self.closing:
            self._dispatch()
        return rest

    def _chunks(self, data: bytes) -> bytes:
        rest = self.chunked.feed(data)
        if rest is None:
            return b""  # more to come, or refused
        self.chunked = None
        self._dispatch()
        return rest

    def _dispatch(self) -> None:
        """The whole request is in: hand it on (as Twisted's allContentReceived)."""
        request = self.current
        self.current = None
        # No idle timeout while the request is answered, however long that takes.
        if self.timeOut:
            self.saved_timeout = self.setTimeout(None)
        self._handlingRequest = True
        request.requestReceived(self.method, self.target, self.http_version)

    def requestDone(self, request):
        """The request answered is done: read what is held, the next request, if the connection is kept."""
        if request is not self.requests[0]:
            raise TypeError
        del self.requests[0]
        if self.network_paused and not self._waitingForTransport:
            self.network_paused = False
            self._networkProducer.resumeProducing()
        if not self.persistent:
            self.loseConnection()
            return
        self._handlingRequest = False
        if self.saved_timeout:
            self.setTimeout(self.saved_timeout)
            self.saved_timeout = None
        if self.held and not self.parsing:
            data = b"".join(self.held)
            self.held = []
            self.held_size = 0
            self.dataReceived(data)

    def connectionLost(self, reason):
        self.closing = True
        self.held = []
        self.parser = None  # (it holds the channel's callbacks)
        self.chunked = None
        super().connectionLost(reason)


class ChunkedBody:
    """
    A strict decoder of a chunked request body (RFC 9112, section 7.1): each line must end
    with CRLF (a bare LF is a 400 at once, not a wait for a CRLF that never comes), and a
    chunk whose size would take the body past its limit is refused (413) from its size line,
    before its data is read.

    @param channel: the L{LlhttpChannel} it refuses on.
    @param data_received: called with each piece of the body's data.
    @param limit: the largest body in bytes, or None.
    """

    def __init__(self, channel, data_received, limit: int | None):
        self.channel = channel
        self.data_received = data_received
        self.limit = limit
        self.announced = 0  # the sizes of the chunks so far
        self.remaining = 0
        self.state = "size"
        self.pending = b""
        self.trailers = 0

    def feed(self, data: bytes) -> bytes | None:
        """
        Read C{data}: return what follows the body once it has ended (b"" if nothing),
        None if more is to come or it was refused.
        """
        if self.pending:
            data = self.pending + data
            self.pending = b""
        position, end = 0, len(data)
        while position < end:
            state = self.state
            if state == "data":
                take = min(self.remaining, end - position)
                self.data_received(data if take == end else data[position:position + take])
                position += take
                self.remaining -= take
                if self.channel.closing:
                    self.state = "stopped"
                    return None
                if self.remaining == 0:
                    self.state = "crlf"
            elif state == "crlf":
                if end - position < 2:
                    self.pending = data[position:]
                    return None
                if data[position:position + 2] != b"\r\n":
                    return self._bad("a chunk's data does not end with CRLF")
                position += 2
                self.state = "size"
            elif state in ("size", "trailer"):
                newline = data.find(b"\n", position)
                if newline == -1:
                    if end - position > _MAX_CHUNK_LINE:
                        return self._bad("a line of the chunked body is too long")
                    self.pending = data[position:]
                    return None
                if newline == position or data[newline - 1] != 13:
                    return self._bad("a line of the chunked body ends with a bare LF, not CRLF")
                line = data[position:newline - 1]
                position = newline + 1
                if state == "size":
                    if not self._size(line):
                        return None
                elif line:
                    self.trailers += len(line) + 2
                    if self.trailers > _MAX_TRAILERS:
                        return self._bad("the chunked body's trailers are too long")
                else:
                    self.state = "done"
                    return data[position:]
            else:
                return None  # stopped: nothing more is read
        return None

    def _size(self, line: bytes) -> bool:
        size = line.split(b";", 1)[0].rstrip(b" \t")
        if not size or len(size) > 16 or not _HEX.issuperset(size):
            self._bad("a chunk's size is not a hexadecimal number")
            return False
        length = int(size, 16)
        if length == 0:
            self.state = "trailer"
            return True
        self.announced += length
        if self.limit is not None and self.announced > self.limit:
            self.state = "stopped"
            self.channel.body_too_large()
            return False
        self.state = "data"
        self.remaining = length
        return True

    def _bad(self, message: str) -> None:
        self.state = "stopped"
        self.channel.refuse(400, "Bad Request", "bad_request", message)
