"""
The two line protocols of subprocess models (C{DESIGN.md}, README "How models answer"):
what a request is written as, what a model process's stdout lines mean, and what becomes
of a request that is cancelled or times out. A L{aibackend.subprocess.SubprocessModel}
chooses one when built and hands it its processes' lines.

  - L{JsonLines} (C{jsonl}): answers carry ids. Each request gets a wire id no other
    request of the model ever gets, and an answer goes only to the request in flight
    under its exact id in the process that printed it; any other is logged and dropped.
    A process may work on several requests at once (C{max_inflight}). A batching model's
    batch is one line holding several requests, each still answered under its own id
    (L{JsonLines.write_batch}).
  - L{RawLines} (C{raw}): answers carry nothing. A raw answer is exactly one JSON line,
    printed while its request is the one in flight. Any other JSON line and any binary
    output is a protocol error: the request fails with 502 and the process is replaced.
    An answer is given only once the rest of its read has been looked at, and the next
    request is written only once stdout has been polled again (on Linux, also once the
    process's main thread is asleep, as in its read of stdin).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

from aibackend.errors import BadGateway, ModelError
from aibackend.interfaces import ModelAnswer
from aibackend.jsonread import NotClientJSON, model_json
from aibackend.logs import normalize_level

SNIPPET = 200
# raw: how long to wait, at most, for a process still running after its answer: first
# QUIET_TURNS turns of the reactor (a process on its way back to reading its stdin is
# usually there by then), then QUIET_STEP, twice as long, ... QUIET_TRIES times (127 ms).
QUIET_TURNS = 4
QUIET_STEP = 0.001
QUIET_TRIES = 7
# jsonl: how many wire ids of requests that were cancelled or timed out are remembered, so
# that the lines a model still prints for them (a generator's next chunks) are expected.
LATE_IDS = 1024


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")


# Bytes no text line holds (C0 controls but tab, backspace, carriage return and escape; DEL).
_NOT_TEXT = re.compile(rb"[\x00-\x07\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")


def is_text(line: bytes) -> bool:
    """Whether a line is text (UTF-8, no control characters but tab, backspace, CR and ESC)."""
    if _NOT_TEXT.search(line):
        return False
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# The id a jsonl line opens with, read off its text (for a line no parser can read whole).
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.)*")')


def leading_id(line: bytes):
    """The C{"id"} a jsonl line begins with (aibackend.worker's spelling), if any."""
    found = _LEADING_ID.match(line)
    if found is None:
        return None
    try:
        return json.loads(found.group(1))
    except ValueError:
        return None


def output_text(message: dict, line: bytes, key: str = "output") -> bytes:
    """
    The JSON text of an answer's C{output} (or C{chunk}: C{key}), as the model wrote it
    when its line is C{{"id": ..., "output": ...}} in the usual spelling
    (aibackend.worker's), so that it is passed on unchanged instead of decoded and
    encoded again.
    """
    line = line.rstrip()
    if len(message) == 2 and line.endswith(b"}"):
        prefix = b'{"id": ' + json.dumps(message["id"]).encode() + b', "' + key.encode() + b'": '
        if line.startswith(prefix):
            return line[len(prefix):-1].strip()
    # Read again with json: orjson, which read the line first, makes integers past 64 bits floats.
    return json.dumps(json.loads(line.decode("utf-8"))[key], allow_nan=False).encode()


def stream_result(answer: ModelAnswer):
    """What a stream's Deferred fires with: the output's JSON text, None (done), or its error."""
    if answer.status < 400:
        return answer.body
    error = json.loads(answer.body)["error"]
    raise ModelError(answer.status, error["message"], kind=error["type"], model=error.get("model"))


class Gathered:
    """The chunks of a plain request to a model that answers in chunks (README "How models answer")."""

    __slots__ = ("texts", "strings", "size")

    def __init__(self):
        self.texts = []  # each chunk's JSON text
        self.strings = []  # while every chunk is a string: the strings
        self.size = 2  # the gathered answer's length, as an array (its brackets and commas)

    def add(self, value, text: bytes) -> None:
        self.size += len(text) + (1 if self.texts else 0)
        self.texts.append(text)
        if self.strings is not None:
            if isinstance(value, str):
                self.strings.append(value)
            else:
                self.strings = None

    def answer(self) -> bytes:
        """All strings: one string; else an array of the chunks (no chunk at all: [])."""
        if self.strings is not None and self.texts:
            return json.dumps("".join(self.strings)).encode()
        return b"[" + b",".join(self.texts) + b"]"


def one_line(body: bytes) -> bytes:
    """JSON text on one line: a line break in JSON text is only ever white space."""
    if b"\n" in body or b"\r" in body:
        return body.replace(b"\r", b" ").replace(b"\n", b" ")
    return body


class JsonLines:
    """
    The C{jsonl} protocol of one model (L{aibackend.subprocess.SubprocessModel}, C{model}).
    """

    name = "jsonl"
    # A process says {"ready": true} when it is.
    ready_on_spawn = False

    def __init__(self, model):
        self.model = model
        self.capacity = model.spec.max_inflight
        # wire id -> why it ended here ("cancelled", "timed out"), or None once a late line
        # of it was logged: the requests the model may still print lines for.
        self.ended: OrderedDict = OrderedDict()
        # A batching model's batches written and not all answered: batch wire id -> Batch.
        self.batches: dict = {}

    def _ended_here(self, wire_id: str, why: str) -> None:
        ended = self.ended
        ended[wire_id] = why
        if len(ended) > LATE_IDS:
            ended.popitem(last=False)

    def _unknown(self, process, wire_id, line: bytes, final: bool) -> None:
        """
        A line for no request in flight: expected (logged once, at info) if its request was
        just cancelled or timed out, as a model finishing its line or a generator its next
        chunk does; a warning for any other id.
        """
        ended = self.ended
        if isinstance(wire_id, str) and wire_id in ended:
            why = ended[wire_id]
            if final:
                del ended[wire_id]  # the model is done with it
            elif why is not None:
                ended[wire_id] = None  # its next lines are not logged
            if why is not None:
                self.model.model_log.append(
                    "info", "answer to an unknown request", slot=process.slot, pid=process.pid,
                    line=_text(line[:SNIPPET]), request=why,
                )
            return
        self.model.model_log.append(
            "warning", "answer to an unknown request", slot=process.slot, pid=process.pid,
            line=_text(line[:SNIPPET] if not final else line),
        )

    def write(self, process, pending) -> None:
        process.write(
            b'{"id": ' + json.dumps(pending.wire_id).encode() + b', "op": "predict", "input": '
            + one_line(pending.body) + b"}\n"
        )

    def write_batch(self, process, batch) -> None:
        """
        A batch, in one line: C{{"id": <batch id>, "op": "batch", "batch": [{"id": ...,
        "input": ...}, ...]}}. Each request is answered by its own line, as a single one is;
        an C{error} line under the batch's id fails those of it not answered yet.
        """
        self.batches[batch.wire_id] = batch
        dumps = json.dumps
        parts = [b'{"id": ' + dumps(pending.wire_id).encode() + b', "input": ' + one_line(pending.body) + b"}"
                 for pending in batch.items]
        process.write(b'{"id": ' + dumps(batch.wire_id).encode() + b', "op": "batch", "batch": ['
                      + b", ".join(parts) + b"]}\n")

    def batch_done(self, batch) -> None:
        """Every request of a batch is answered (or abandoned)."""
        self.batches.pop(batch.wire_id, None)

    def _batch_failed(self, process, batch, message) -> None:
        """An C{error} line under a batch's id: each of its requests not answered yet gets that error."""
        model = self.model
        inflight = process.inflight
        for pending in list(batch.items):
            if inflight.get(pending.wire_id) is pending:
                del inflight[pending.wire_id]
                model.settle(pending, self._model_error(pending, message["error"]))
        model.dispatch()

    def cancelled(self, process, pending) -> None:
        """The client went away: the process is told, and the place goes to the next request."""
        model = self.model
        process.inflight.pop(pending.wire_id, None)
        model.settle(pending)
        self._ended_here(pending.wire_id, "cancelled")
        process.write(b'{"id": ' + json.dumps(pending.wire_id).encode() + b', "op": "cancel"}\n')
        model.dispatch()

    def timed_out(self, process, pending) -> None:
        """
        A request timed out (answered already): a hung process is replaced, another told to
        drop it. A process working on a batch answers it in one write at its end, so it is
        hung only once every request of the batch has timed out with nothing printed: until
        then the others of the batch, whose deadlines come later, are still its work.
        """
        batch = pending.batch
        inflight = process.inflight
        if batch is not None and any(inflight.get(other.wire_id) is other for other in batch.items):
            self._ended_here(pending.wire_id, "timed out")
            self.model.dispatch()
            return
        if process.last_output <= pending.sent_at:
            self.model.pool.terminate(process, "the process is hung: it printed nothing since the timed-out request")
        else:
            self._ended_here(pending.wire_id, "timed out")
            process.write(b'{"id": ' + json.dumps(pending.wire_id).encode() + b', "op": "cancel"}\n')
            self.model.dispatch()

    def gone(self, process) -> None:
        """A process went: nothing of its own to forget."""

    def read(self, process) -> None:
        """A read is over: each of its answers was given as its line came."""

    def line(self, process, line: bytes) -> None:
        try:
            message = model_json(line)
        except NotClientJSON as e:
            self._not_strict_json(process, line, e)
            return
        self._message(process, message, line)

    def _not_strict_json(self, process, line: bytes, problem: NotClientJSON) -> None:
        """
        A stdout line that is not JSON is the model's chatter, logged. One that is JSON
        but for NaN, Infinity or its depth is an answer the client could not parse: a 502
        for the request whose id it opens with.
        """
        model_log = self.model.model_log
        if not problem.is_json:
            model_log.append("warning", "stdout", slot=process.slot, pid=process.pid, line=_text(line))
            return
        wire_id = leading_id(line)
        pending = process.inflight.pop(wire_id, None) if isinstance(wire_id, str) else None
        model_log.append("warning", "answer is not strict JSON", slot=process.slot, pid=process.pid,
                         line=_text(line[:SNIPPET]))
        if pending is not None:
            if pending.chunks is not None or pending.gathered is not None:
                # Mid-stream: the model would go on with a stream no one reads.
                process.write(b'{"id": ' + json.dumps(wire_id).encode() + b', "op": "cancel"}\n')
            self._bad_answer(pending, problem.reason)

    def _message(self, process, message, line: bytes) -> None:
        model = self.model
        if not isinstance(message, dict):
            model.model_log.append("warning", "unexpected output", slot=process.slot, pid=process.pid,
                                   line=_text(line))
            return
        if "id" not in message:
            if message.get("ready") is True:
                model.pool.mark_ready(process)
            elif "log" in message:
                self._model_says(process, message)
            else:
                model.model_log.append(
                    "warning", "unexpected output", slot=process.slot, pid=process.pid, line=_text(line)
                )
            return
        if "chunk" in message and "output" not in message and "error" not in message:
            self._chunk(process, message, line)
            return
        # Only the request in flight in this process under this exact id: an answer to
        # any other (unknown, timed out, cancelled, answered already) is dropped.
        pending = process.inflight.pop(message["id"], None) if isinstance(message["id"], str) else None
        if pending is None:
            batch = self.batches.get(message["id"]) if self.batches and isinstance(message["id"], str) else None
            if batch is not None and batch.process is process and "error" in message:
                self._batch_failed(process, batch, message)
                return
            self._unknown(process, message["id"], line, True)
            return
        if "error" in message:
            model.settle(pending, self._model_error(pending, message["error"]))
        elif "output" in message:
            try:
                body = output_text(message, line)
            except (ValueError, RecursionError):
                self._bad_answer(pending, "answered an output that cannot be written as strict JSON")
                return
            model.settle(pending, ModelAnswer(status=200, body=body))
        elif message.get("done") is True:
            if pending.chunks is not None:
                body = None
            elif pending.gathered is not None:
                body = pending.gathered.answer()
            else:
                body = b"[]"
            model.settle(pending, ModelAnswer(status=200, body=body))
        else:
            self._bad_answer(pending, f"answered without 'output' or 'error': {_text(line[:SNIPPET])!r}")
            return
        model.dispatch()

    def _chunk(self, process, message, line: bytes) -> None:
        """
        A piece of an answer: a stream's goes to its client at once; a plain request's is
        gathered (bounded by max_line_bytes) until the answer ends.
        """
        wire_id = message["id"]
        pending = process.inflight.get(wire_id) if isinstance(wire_id, str) else None
        if pending is None:
            self._unknown(process, wire_id, line, False)
            return
        try:
            text = output_text(message, line, "chunk")
        except (ValueError, RecursionError):
            del process.inflight[wire_id]
            process.write(b'{"id": ' + json.dumps(wire_id).encode() + b', "op": "cancel"}\n')
            self._bad_answer(pending, "answered a chunk that cannot be written as strict JSON")
            return
        chunks = pending.chunks
        if chunks is not None:
            try:
                chunks.chunk(text)
            except Exception:
                # A bug in the reader must not break the process's protocol: that stream ends.
                self.model.log.failure("model {model}: a stream's reader failed on a chunk", model=self.model.model_id)
                pending.deferred.cancel()
            return
        gathered = pending.gathered
        if gathered is None:
            gathered = pending.gathered = Gathered()
        gathered.add(message["chunk"], text)
        limit = self.model.spec.process.max_line_bytes
        if gathered.size > limit:
            del process.inflight[wire_id]
            process.write(b'{"id": ' + json.dumps(wire_id).encode() + b', "op": "cancel"}\n')
            self._bad_answer(pending, f"answered more than max_line_bytes ({limit} bytes) in chunks")

    def _bad_answer(self, pending, why: str) -> None:
        """A model's answer no client could use: 502, and the place goes to the next request."""
        model = self.model
        model.settle(pending, error=BadGateway(f"model {model.model_id!r} {why}", model=model.model_id))
        model.dispatch()

    def _model_error(self, pending, error) -> ModelAnswer:
        if isinstance(error, dict):
            message = error.get("message")
            status = error.get("status", 500)
            kind = error.get("type", "model_error")
        else:
            message, status, kind = error, 500, "model_error"
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            status = 500
        body = {
            "error": {
                "type": kind if isinstance(kind, str) else "model_error",
                "message": message if isinstance(message, str) else json.dumps(message),
                "model": self.model.model_id,
                "request_id": pending.context.request_id,
            }
        }
        return ModelAnswer(status=status, body=json.dumps(body).encode())

    def _model_says(self, process, message) -> None:
        level = message.get("level", "info")
        try:
            level = normalize_level(level) if isinstance(level, str) else "info"
        except ValueError:
            level = "info"
        text = message["log"]
        self.model.model_log.append(
            level, "model", slot=process.slot, pid=process.pid,
            message=text if isinstance(text, str) else json.dumps(text),
        )


class _RawProcess:
    """What the raw protocol keeps of one process."""

    __slots__ = ("answer", "sent_any", "settling")

    def __init__(self):
        self.answer = None  # (pending, body, problem): read, not given yet (the read is not over)
        self.sent_any = False  # a request was ever written to it
        self.settling = None  # the wait before the next request may be written


def _raw(process) -> _RawProcess:
    kept = process.lines
    if kept is None:
        kept = process.lines = _RawProcess()
    return kept


def _hold(process, kept: _RawProcess) -> None:
    """The process takes no request while an answer of it is being given or settling."""
    process.held = kept.answer is not None or kept.settling is not None


class RawLines:
    """
    The C{raw} protocol of one model (L{aibackend.subprocess.SubprocessModel}, C{model}):
    one request at a time per process.
    """

    name = "raw"
    ready_on_spawn = True
    capacity = 1

    def __init__(self, model):
        self.model = model

    def write(self, process, pending) -> None:
        _raw(process).sent_any = True
        process.write(one_line(pending.body) + b"\n")

    def cancelled(self, process, pending) -> None:
        """
        The client went away: the process is still working on the request and its answer
        cannot be told from the next one's, so the place stays taken until the answer
        comes (and is dropped) or the timeout kills the process.
        """

    def timed_out(self, process, pending) -> None:
        """A request timed out (answered already): a raw process cannot be asked to drop it."""
        self.model.model_log.append(
            "warning", "request timed out", slot=process.slot, pid=process.pid, request_id=pending.context.request_id
        )
        self.model.pool.terminate(process, "a request timed out; a raw process cannot be asked to drop it")

    def gone(self, process) -> None:
        """A process went: its answer not yet given, and its wait before the next request, with it."""
        kept = _raw(process)
        kept.answer = None
        if kept.settling is not None:
            if kept.settling.active():
                kept.settling.cancel()
            kept.settling = None
        _hold(process, kept)

    def read(self, process) -> None:
        """A read is over; the answer it held is given, unless a line is still being printed."""
        kept = process.lines
        if kept is None or kept.answer is None or process.state != "ready" or process.partial_line():
            return
        model = self.model
        pending, body, problem = kept.answer
        kept.answer = None
        process.inflight.pop(pending.wire_id, None)
        # The next request waits for stdout to be polled again: a line printed just
        # after this answer is then caught as the protocol error it is. (Set first: the
        # answer's callbacks may send the next request at once.)
        kept.settling = model.pool.clock.callLater(0, self._settling, process, 0)
        _hold(process, kept)
        if problem is not None:
            model.settle(pending, error=BadGateway(f"model {model.model_id!r} {problem}", model=model.model_id))
        else:
            model.settle(pending, ModelAnswer(status=200, body=body))

    def _settling(self, process, tries: int) -> None:
        kept = _raw(process)
        kept.settling = None
        if process.state != "ready":
            _hold(process, kept)
            return
        pool = self.model.pool
        if tries < QUIET_TURNS + QUIET_TRIES and pool.launcher.busy(process.transport):
            # Still running (between two writes?): let it, and look again.
            delay = 0 if tries < QUIET_TURNS else QUIET_STEP * 2 ** (tries - QUIET_TURNS)
            kept.settling = pool.clock.callLater(delay, self._settling, process, tries + 1)
            return
        # Called from a timed call: the next one comes after the reactor's next poll.
        kept.settling = pool.clock.callLater(0, self._settled, process)

    def _settled(self, process) -> None:
        kept = _raw(process)
        kept.settling = None
        _hold(process, kept)
        self.model.dispatch()

    def line(self, process, line: bytes) -> None:
        if process.state not in ("starting", "ready"):
            return  # the output of a process on its way out: no answer can come of it
        model_log = self.model.model_log
        kept = _raw(process)
        problem = None
        try:
            model_json(line)
        except NotClientJSON as e:
            if not e.is_json:
                if is_text(line):
                    model_log.append("warning", "stdout", slot=process.slot, pid=process.pid, line=_text(line))
                    return
                self._protocol_error(process, "printed binary data on stdout", line)
                return
            problem = e.reason  # JSON, but not for clients
        if process.inflight and kept.answer is None and kept.settling is None:
            (pending,) = process.inflight.values()  # raw: one at a time
            kept.answer = (pending, line.strip(), problem)
            _hold(process, kept)
            return
        if not process.inflight and not kept.sent_any:
            # Before its first request a process answers no one: a banner.
            model_log.append("warning", "unexpected output", slot=process.slot, pid=process.pid, line=_text(line))
            return
        if process.inflight:
            self._protocol_error(process, "printed more than one JSON line for a request", line)
        else:
            self._protocol_error(process, "printed a JSON line while no request was waiting for one", line)

    def _protocol_error(self, process, why: str, line: bytes) -> None:
        """Output no request may be given; what is in flight fails, and the process is replaced."""
        model = self.model
        model.pool.last_error = f"a process {why}"
        model.model_log.append("error", "protocol error", slot=process.slot, pid=process.pid, error=why,
                               line=_text(line[:SNIPPET]))
        model.log.warn("model {model}: a raw process {why}; it is replaced", model=model.model_id, why=why)
        model.pool.terminate(process, f"the model process {why} (a raw answer is one JSON line per request)",
                             on_purpose=False)


PROTOCOLS = {protocol.name: protocol for protocol in (RawLines, JsonLines)}
