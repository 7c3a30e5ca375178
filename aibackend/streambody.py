"""
A streamed HTTP answer read into chunks, as its bytes arrive: what an HTTP model's
upstream answers in Server-Sent Events (L{EventStream}) or in JSON lines (L{JsonLines}),
fed by the lean client (L{aibackend.client}: each piece of the body as llhttp gives it,
in the reactor turn it came in), by L{StreamBody} (the body protocol of an Agent
response, for the streams the lean client does not send), or all at once (L{gather}: a
plain request's answer).

Readers are plain objects, fed bytes split anywhere: C{feed(data)} hands each chunk to
C{emit(value, text)} (the chunk's value, and its JSON text as the upstream wrote it);
an end event sets C{ended} (and C{output}, the final output's JSON text, or None); an
error event raises the L{aibackend.errors.ApiError} it says; an answer no client could use
raises L{BadStream}. C{finish()} is the body's clean end.

  - Server-Sent Events (C{text/event-stream}), read per the WHATWG spec: lines end with
    CRLF, LF or CR; C{data} lines are joined with LF; comments, C{id} and C{retry} are
    ignored; an event with no data is not dispatched, nor is one the body ends in the
    middle of. An event's data is a chunk, but C{data: [DONE]} (OpenAI's convention)
    ends the stream, and so does an event named C{done} (aibackend's own framing,
    L{aibackend.relay.SSE}: its data is C{{"output": ...}}, or empty); one named
    C{error} fails it.
  - JSON lines (C{application/x-ndjson}, C{application/jsonl}...): each non-blank line is
    a chunk as it is, except aibackend's own envelope (L{aibackend.relay.NDJSON}), read
    only when a line has exactly its keys: C{{"chunk": x}} is the chunk C{x},
    C{{"done": true, "output": y}} ends the stream (C{null}: no output), and an error
    document (C{{"error": ...}}) fails it.

Every chunk must be strict JSON (L{aibackend.jsonread.model_json}, as a subprocess model's
lines), and no line or event may be longer than the model's C{max_response_bytes}; the
stream as a whole is not bounded.
"""

from __future__ import annotations

import json
import re

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from aibackend import errors
from aibackend.client import DRAIN_SECONDS
from aibackend.jsonread import NotClientJSON, model_json
from aibackend.errors import ModelError
from aibackend.lines import Gathered

SNIPPET = 200

SSE_TYPES = frozenset({b"text/event-stream"})
JSON_LINES_TYPES = frozenset({
    b"application/x-ndjson", b"application/ndjson", b"application/jsonl", b"application/x-jsonl",
    b"application/jsonlines", b"application/x-jsonlines", b"application/json-lines",
})
# The statuses of the daemon's error types, for an error document that says only its type.
STATUSES = {
    kind.type: kind.status
    for kind in (
        errors.BadRequest, errors.Unauthorized, errors.Forbidden, errors.NotFound, errors.UnknownModel,
        errors.UnknownOperation, errors.MethodNotAllowed, errors.Conflict, errors.PayloadTooLarge,
        errors.UnsupportedMediaType, errors.ModelUnavailable, errors.BadGateway, errors.GatewayTimeout,
        errors.InternalError,
    )
}
STATUSES.update({"model_error": 500, "request_timeout": 408})

_BREAKS = re.compile(rb"\r\n|\r|\n")
_HAS_BREAK = re.compile(rb"[\r\n]").search


class BadStream(Exception):
    """
    A streamed answer no client could use; its text says why, to follow the model's name
    (C{"model 'm' " + why}: a 502).
    """

    @property
    def why(self) -> str:
        return self.args[0]


def snippet(data: bytes) -> str:
    text = data[:SNIPPET].decode("utf-8", "replace")
    return repr(text) + (f" ... ({len(data)} bytes)" if len(data) > SNIPPET else "")


def reader_for(content_type: bytes | None):
    """The reader class of an answer with this C{Content-Type} (None: plain JSON, read whole)."""
    if not content_type:
        return None
    media = content_type.split(b";", 1)[0].strip().lower()
    if media in SSE_TYPES:
        return EventStream
    if media in JSON_LINES_TYPES:
        return JsonLines
    return None


def _strict(text: bytes):
    try:
        return model_json(text)
    except NotClientJSON as e:
        raise BadStream(f"{e.reason} in a chunk: {snippet(text)}") from None


def _member_text(line: bytes, value: dict, prefix: bytes, key: str) -> bytes:
    """
    The JSON text of C{value[key]}, where C{line} is the JSON text of C{value}, an object of
    that one key (or of C{done} and it): cut out of the line when it is spelled as the
    daemon writes it (C{prefix}, the value, C{"}"}), so that it is passed on unchanged.
    """
    if line.startswith(prefix) and line.endswith(b"}"):
        return line[len(prefix):-1].strip()
    # Read again with json: orjson, which read the line first, makes integers past 64 bits floats.
    return json.dumps(json.loads(line.decode("utf-8"))[key], allow_nan=False).encode()


def upstream_error(value, text: bytes, model_id: str) -> errors.ApiError:
    """
    What an upstream's error event (or error line) says: aibackend's error document
    (C{{"error": {"type", "message", ...}}}) is the error it names, with its status (its
    C{status}, or its type's); the Open Inference Protocol's (C{{"error": "..."}}) and
    anything else, a 502 naming the model.
    """
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        kind = error.get("type")
        kind = kind if isinstance(kind, str) else "model_error"
        status = error.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            status = STATUSES.get(kind, 502)
        return ModelError(status, error["message"], kind=kind, model=model_id)
    if isinstance(error, str):
        return errors.BadGateway(f"model {model_id!r} sent an error: {error}", model=model_id)
    return errors.BadGateway(f"model {model_id!r} sent an error event: {snippet(text)}", model=model_id)


class _Reader:
    """What both readers share: the lines not yet ended, bounded."""

    ended = False
    output = None

    def __init__(self, emit, limit: int, model_id: str):
        self.emit = emit
        self.limit = limit
        self.model_id = model_id
        self._held: list[bytes] = []  # the start of a line whose end has not come
        self._held_size = 0

    def _hold(self, data: bytes) -> None:
        self._held_size += len(data)
        if self._held_size > self.limit:
            raise BadStream(f"sent a line longer than max_response_bytes ({self.limit} bytes)")
        self._held.append(data)

    def _with_held(self, data: bytes) -> bytes:
        if self._held:
            self._held.append(data)
            data = b"".join(self._held)
            self._held = []
            self._held_size = 0
        return data

    def _end(self, output: bytes | None) -> None:
        self.ended = True
        self.output = output
        self._held = []


class EventStream(_Reader):
    """Server-Sent Events (C{text/event-stream}), read into chunks (see the module's docstring)."""

    def __init__(self, emit, limit: int, model_id: str):
        super().__init__(emit, limit, model_id)
        self._skip_lf = False  # the last read ended with CR: a LF that opens the next is its line end
        self._data: list[bytes] = []
        self._data_size = 0
        self._event = b""

    def feed(self, data: bytes) -> None:
        if self.ended or not data:
            return
        if (data[-2:] == b"\n\n" and not self._held and not self._data and not self._event and not self._skip_lf
                and b"\r" not in data and self._whole_events(data)):
            return
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
                if not data:
                    return
        if _HAS_BREAK(data) is None:
            self._hold(data)
            return
        data = self._with_held(data)
        lines = _BREAKS.split(data)
        rest = lines.pop()
        if not rest and data[-1:] == b"\r":
            self._skip_lf = True
        for line in lines:
            self._line(line)
            if self.ended:
                return
        if rest:
            self._hold(rest)

    def _whole_events(self, data: bytes) -> bool:
        """
        What upstreams write most (one or more whole events of one C{data} line each, after
        a whole event), read as L{_line} and L{_dispatch} would read it, faster; False
        (nothing done) for anything else.
        """
        events = data[:-2].split(b"\n\n")
        limit = self.limit + 5
        for event in events:
            if event[:6] != b"data: " or b"\n" in event or len(event) > limit:
                return False
        emit = self.emit
        for event in events:
            text = event[6:]
            if text == b"[DONE]":
                self._end(None)
                return True
            emit(_strict(text), text)
        return True

    def finish(self) -> None:
        """The body ended: an event not ended by a blank line is not dispatched (the spec's rule)."""

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line[:1] == b":":
            return  # a comment (a keepalive)
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data_size += len(value) + 1
            if self._data_size > self.limit:
                raise BadStream(f"sent an event longer than max_response_bytes ({self.limit} bytes)")
            self._data.append(value)
        elif name == b"event":
            self._event = value
        # id, retry and any other field: nothing to the daemon

    def _dispatch(self) -> None:
        data, event = self._data, self._event
        self._data, self._data_size, self._event = [], 0, b""
        if not data:
            return
        text = data[0] if len(data) == 1 else b"\n".join(data)
        if event == b"done":
            self._end(self._done_output(text))
        elif event == b"error":
            try:
                value = model_json(text)
            except NotClientJSON:
                value = None
            raise upstream_error(value, text, self.model_id)
        elif text == b"[DONE]" and event in (b"", b"message"):
            self._end(None)
        else:
            # The default event, and any other named one (an upstream's own kinds of chunk).
            self.emit(_strict(text), text)

    def _done_output(self, text: bytes) -> bytes | None:
        if not text.strip():
            return None
        value = _strict(text)
        if not isinstance(value, dict) or list(value) != ["output"]:
            raise BadStream(f"sent a done event that is not {{\"output\": ...}}: {snippet(text)}")
        if value["output"] is None:
            return None
        return _member_text(text.strip(), value, b'{"output": ', "output")


class JsonLines(_Reader):
    """JSON lines (C{application/x-ndjson}...), read into chunks (see the module's docstring)."""

    def feed(self, data: bytes) -> None:
        if self.ended or not data:
            return
        if b"\n" not in data:
            self._hold(data)
            return
        lines = self._with_held(data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            self._line(line)
            if self.ended:
                return
        if rest:
            self._hold(rest)

    def finish(self) -> None:
        """The body ended: a last line without its line end is a line too."""
        if self._held and not self.ended:
            self._line(self._with_held(b""))

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return  # blank lines (a keepalive) are no chunk
        if len(line) > self.limit:
            raise BadStream(f"sent a line longer than max_response_bytes ({self.limit} bytes)")
        value = _strict(line)
        if type(value) is dict:
            size = len(value)
            if size == 1:
                if "chunk" in value:
                    self.emit(value["chunk"], _member_text(line, value, b'{"chunk": ', "chunk"))
                    return
                if "error" in value:
                    raise upstream_error(value, line, self.model_id)
            elif size == 2 and value.get("done") is True and "output" in value:
                output = None
                if value["output"] is not None:
                    output = _member_text(line, value, b'{"done": true, "output": ', "output")
                self._end(output)
                return
        self.emit(value, line)


def gather(reader_class, body: bytes, limit: int, model_id: str) -> bytes:
    """
    A plain request's answer out of a whole streamed body (README "How models answer", the
    rule of C{jsonl} models: L{aibackend.lines.Gathered}): the final output if there is
    one; else all-string chunks joined, or an array of the chunks (C{[]}: none).

    @raise BadStream: the chunks gathered are longer than C{limit}, or one is not strict JSON.
    @raise errors.ApiError: the upstream's error event.
    """
    gathered = Gathered()

    def add(value, text: bytes) -> None:
        gathered.add(value, text)
        if gathered.size > limit:
            raise BadStream(f"answered more than max_response_bytes ({limit} bytes) in chunks")

    reader = reader_class(add, limit, model_id)
    reader.feed(body)
    if not reader.ended:
        reader.finish()
    if reader.output is not None:
        return reader.output
    return gathered.answer()


@implementer(IPushProducer)
class UpstreamFlow:
    """
    A stream's flow control (the producer a streaming HTTP model registers with its
    L{aibackend.interfaces.IChunks}): its slow reader pauses the reading of the upstream's
    connection; stopping it (the client left) cancels the stream, which closes that
    connection. The connection's transport is attached once its answer's headers say it
    is a stream (by either client: the lean one's or Agent's connection).

    @ivar stream: the stream's Deferred (what stopping cancels).
    """

    def __init__(self):
        self.transport = None
        self.paused = False
        self.stream: Deferred | None = None

    def attach(self, transport) -> None:
        self.transport = transport
        if self.paused:
            transport.pauseProducing()

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            if self.transport is not None:
                self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None:
                self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.stream is not None:
            # (A fired Deferred ignores it; one waiting on another cancels that one.)
            self.stream.cancel()


class StreamBody(Protocol):
    """
    The body of a streamed answer (C{response.deliverBody}): each read is given to the
    reader at once, so each chunk goes on in the reactor turn its bytes came in.
    L{finished} fires with the output's JSON text (or None) at the end event or the
    body's clean end, or fails: with L{BadStream}, the upstream's error, or
    C{ResponseFailed} when the connection is lost before the answer is complete.
    Cancelling it closes the connection at once. After an end event the rest of the body
    is read and dropped for up to L{DRAIN_SECONDS}, then the connection is closed.

    @param clock: for that wait.
    """

    def __init__(self, reader, clock):
        self.reader = reader
        self.clock = clock
        self.finished: Deferred = Deferred(self._cancel)
        self._drain = None

    def _cancel(self, _) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return  # past the end event (or given up): dropped
        reader = self.reader
        try:
            reader.feed(data)
        except Exception:
            self.finished.errback(Failure())
            self.transport.stopProducing()
            return
        if reader.ended:
            self.transport.resumeProducing()  # the rest is dropped as fast as it comes
            self._drain = self.clock.callLater(DRAIN_SECONDS, self.transport.stopProducing)
            self.finished.callback(reader.output)

    def connectionLost(self, reason) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and drain.active():
            drain.cancel()
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            try:
                self.reader.finish()
            except Exception:
                self.finished.errback(Failure())
                return
            self.finished.callback(self.reader.output)
        elif reason.check(ResponseFailed):
            self.finished.errback(reason)
        else:
            self.finished.errback(Failure(ResponseFailed([reason])))
