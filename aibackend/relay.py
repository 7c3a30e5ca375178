"""
The relay below every front door, and the daemon's state they share.

A front door (L{aibackend.api}, L{aibackend.v2}) translates its protocol into a resolved
request (the model's registry entry, the body to send, a L{RequestContext}) and back; the
L{Relay} does what they all do with it, once: count it in flight, send it to the model,
log it in the model's log and the metrics, and map the outcome (the model's answer, an
L{errors.ApiError}, a request cancelled because its client went away or its model is
stopping, a bug) to what the client is told. (The guard is checked by each front door
at its entrance, with L{Core.guard}, before the request is resolved: a client without a
key learns nothing of which models exist.) L{Core} holds what every front door reads:
the registry, the guard, the metrics, the clock, the model manager, the way to the
primary process (C{--processes}), readiness, and the relay.
"""

from __future__ import annotations

import json

from twisted.internet import threads
from twisted.internet.defer import CancelledError, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from aibackend import errors
from aibackend.auth import Guard
from aibackend.directwrite import flush
from aibackend.interfaces import IChunks
from aibackend.metrics import Metrics
from aibackend.server import BoundedRequest
from aibackend.web import UNEXPECTED, client_gone, sized

CLIENT_CLOSED = errors.CLIENT_CLOSED  # a client that went away before its answer (nginx's 499)


class Core:
    """
    The daemon's state the front doors share, given to each of them.

    @param registry: the L{aibackend.registry.ModelRegistry}.
    @param clock: an L{IReactorTime}, for latencies.
    @param manager: the L{aibackend.admin.ModelManager}, or None (no runtime changes).
    @param guard: the L{aibackend.auth.Guard} (by default: a unix socket's, no keys).
    @param metrics: the L{aibackend.metrics.Metrics} (by default, the registry's own).
    @param in_thread: C{deferToThread}'s signature; tests run the function at once.

    @ivar accepting: ready for work: set once the daemon has started, cleared when it
        begins to stop.
    @ivar primary: with C{--processes}, in a worker process: the way to the primary
        process (an L{aibackend.processes.Forwarder}); otherwise None.
    @ivar relay: the L{Relay}.
    """

    def __init__(self, registry, clock, *, manager=None, guard=None, metrics=None, in_thread=None):
        self.registry = registry
        self.clock = clock
        self.manager = manager
        self.guard = guard if guard is not None else Guard(None, ["unix:"])
        self.metrics = metrics if metrics is not None else Metrics(registry)
        # How work too long for the reactor thread is done (rendering a long log, large
        # tensors in aibackend.v2): the reactor's thread pool, bounded.
        self.in_thread = in_thread if in_thread is not None else threads.deferToThread
        self.accepting = False
        self.primary = None
        self.relay = Relay(clock, self.metrics)

    @property
    def policy(self):
        """The relay's L{aibackend.policy.Policy}, or None (no keys, limits or usage)."""
        return self.relay.policy

    @policy.setter
    def policy(self, policy) -> None:
        self.relay.policy = policy

    def forward(self, request):
        """
        Have the primary process do an operation that changes the models (in a worker
        process). The primary answers once every worker, this one included, has
        followed the change (aibackend.processes.WorkerProcesses.sync).

        @return: a Deferred of the answer's body.
        """
        return self.primary.forward(request).addCallback(lambda body: sized(request, body))


class Relay:
    """
    Sends resolved requests to their models and says how each went.

    @param clock: an L{IReactorTime}, for latencies.
    @param metrics: the L{aibackend.metrics.Metrics}.

    @ivar policy: the L{aibackend.policy.Policy} that admits and settles every request
        (keys' models, limits, usage), or None: nothing to admit, nothing done for it.
    """

    log = Logger()

    def __init__(self, clock, metrics):
        self.clock = clock
        self.metrics = metrics
        self.policy = None

    def send(self, request, entry, body: bytes, context, started: float, shape=None, tokens=None):
        """
        Send C{body} to the model of registry entry C{entry} and answer the client with
        what it answers (or with what C{shape} makes of that L{ModelAnswer}); the outcome
        is logged and counted once.

        @param started: when the request came (the clock's seconds), for its latency.
        @param tokens: the request's L{aibackend.policy.TokenCount} (its shape fills it
            in), or None: a model whose answers carry no token counts.
        @return: a Deferred of the answer's body, or failing with an L{errors.ApiError}
            (or, when the client went away, with the L{CancelledError}).
        @raise errors.ApiError: the policy refused the request (a key that may not call
            the model, a limit reached) before it was sent.
        """
        policy = self.policy
        call = None if policy is None else policy.admit(request, entry, tokens)
        entry.stats.in_flight += 1
        d = maybeDeferred(entry.model.send, body, context)
        # The outcome is a _Sent's to tell: bound methods of one small object, not three
        # closures a request.
        sent = _Sent(self, request, entry, context, started, shape is None, call)
        if shape is None:
            d.addCallbacks(sent.answered, sent.failed)  # each settles the request first
        else:
            d.addBoth(sent.settled)
            d.addCallback(shape)
            d.addCallbacks(sent.answered, sent.failed)
        return d

    def stream(self, request, entry, body: bytes, context, started: float, framing: "Framing", shape,
               tokens=None):
        """
        The streaming twin of L{send}: have the model of C{entry} (an L{IStreaming})
        answer in chunks, each written to the client at once in C{framing}'s format, then
        the final event. An error before the first byte fails the Deferred (the front
        door answers it as a plain request's error, in C{shape}); after it, the error
        event (C{shape}'s document) ends the stream. The outcome is logged and counted
        once: 200 for a stream that ended, the error's status for one that failed (before
        or after its first byte), 499 when the client went away (the model's stream is
        cancelled: cancelling the Deferred returned cancels it).

        The model's spec bounds the stream (L{StreamWriter}): C{first_chunk_timeout} and
        C{stream_idle_timeout} (504, the model's work cancelled), C{keepalive_seconds}
        (SSE comments while nothing is written), C{max_stream_buffer_bytes} (what may wait
        for a slow reader; past it, L{SlowReader}, the model's work cancelled).

        @param tokens: as L{send}'s.
        @return: a Deferred firing with None once the request is finished, or failing
            with an L{errors.ApiError} (or the L{CancelledError} of a client gone).
        @raise errors.ApiError: the policy refused the request, as L{send}'s.
        """
        policy = self.policy
        call = None if policy is None else policy.admit(request, entry, tokens)
        stats = entry.stats
        stats.in_flight += 1
        stats.stream_began()
        writer = StreamWriter(request, framing, self.clock, spec=entry.spec, stats=stats, started=started)
        request.aibackend_stream = writer  # the access event's stream fields (aibackend.server)
        writer.begin()
        d = maybeDeferred(entry.model.stream, body, context, writer)
        if not d.called:
            writer.watch(d)
        # The outcome is the writer's to tell (StreamWriter.ended, .failed): two bound methods
        # on the stream's Deferred, no closures (a held stream holds them all).
        writer.relay, writer.entry, writer.context, writer.shape, writer.call = self, entry, context, shape, call
        d.addCallbacks(writer.ended, writer.failed)
        return d

    def _stream_done(self, writer, entry, request_id, operation, started, status, error, how: str) -> None:
        writer.stream_end = how
        self.metrics.stream_ended(entry, how)
        seconds = self.done(entry, request_id, operation, started, status, error)
        call = writer.call
        if call is not None:
            self.policy.settle(call, status, seconds)

    def done(self, entry, request_id: str, operation: str, started: float, status: int, error: str | None) -> float:
        """
        Log a request to the model of C{entry} (its log, the metrics): one sent, or one
        refused before it was (a body that is not JSON).

        @return: its latency, in seconds.
        """
        seconds = self.clock.seconds() - started
        self.metrics.observe(entry, operation, status, seconds)
        entry.model.model_log.record_request(request_id, operation, status, seconds * 1000.0, error)
        return seconds

    def _settle(self, call, entry, request_id: str, operation: str, started: float, status: int,
                error: str | None) -> None:
        """L{done}, then the policy's settlement of C{call} (if the policy admitted it)."""
        seconds = self.done(entry, request_id, operation, started, status, error)
        if call is not None:
            self.policy.settle(call, status, seconds)

    def refused(self, failure, entry, request_id: str, operation: str, started: float):
        """
        An errback: log an L{errors.ApiError} that refused the request before it was sent
        (C{d.addErrback(relay.refused, entry, request_id, operation, started)}).
        """
        if failure.check(errors.ApiError):
            error = failure.value
            self.done(entry, request_id, operation, started, error.status, error.message)
        return failure

    def answer(self, request, d, shape) -> object:
        """
        The fast path's end (no Klein between the request and the relay): answer the
        request with what C{d} fires with, or its failure in C{shape} (an
        L{aibackend.web.ErrorShape}), and cancel C{d} if the client goes away.

        @return: C{NOT_DONE_YET}, for C{render}.
        """
        if isinstance(request, BoundedRequest):
            request.aibackend_answering = d  # cancelled when its connection is lost
        else:
            request.notifyFinish().addErrback(_cancel, d)
        # One callback pair (the answer, or the failure in the shape), not three steps.
        d.addCallbacks(_answered, _refused, callbackArgs=(request,), errbackArgs=(request, shape))
        return NOT_DONE_YET


class _Sent:
    """
    A request L{Relay.send} sent: its outcome, told once (the model's log, the metrics)
    and made the client's answer. C{settling}: L{answered} and L{failed} settle it (no
    shape runs between the model's answer and them), else L{settled} does, first.
    """

    __slots__ = ("relay", "request", "entry", "stats", "context", "started", "settling", "call")

    def __init__(self, relay, request, entry, context, started: float, settling: bool, call=None):
        self.relay = relay
        self.call = call  # the policy's aibackend.policy.Call, or None
        self.request = request
        self.entry = entry
        self.stats = entry.stats
        self.context = context
        self.started = started
        self.settling = settling

    def settled(self, result):
        self.stats.in_flight -= 1
        return result

    def answered(self, answer):
        if self.settling:
            self.stats.in_flight -= 1
        context = self.context
        self.relay._settle(self.call, self.entry, context.request_id, context.operation, self.started,
                           answer.status, None)
        request = self.request
        request.setResponseCode(answer.status)
        headers = answer.headers
        if headers:
            response_headers = request.responseHeaders
            for name, value in headers.items():
                response_headers.setRawHeaders(name, [value])
        return sized(request, answer.body)

    def failed(self, failure):
        if self.settling:
            self.stats.in_flight -= 1
        relay, entry, started, call = self.relay, self.entry, self.started, self.call
        request_id, operation = self.context.request_id, self.context.operation
        if failure.check(errors.ApiError):
            relay._settle(call, entry, request_id, operation, started, failure.value.status, failure.value.message)
        elif failure.check(CancelledError):
            if client_gone(self.request):
                relay._settle(call, entry, request_id, operation, started, CLIENT_CLOSED, "the client went away")
                return failure
            model_id = entry.model_id
            error = errors.ModelUnavailable(
                f"model {model_id!r} abandoned the request (it is stopping or was removed)", model=model_id
            )
            relay._settle(call, entry, request_id, operation, started, error.status, error.message)
            raise error
        else:
            relay._settle(call, entry, request_id, operation, started, 500, failure.getErrorMessage())
        return failure


class SlowReader(errors.ApiError):
    """
    A stream's client read slower than its model wrote, and more than the model's
    C{max_stream_buffer_bytes} waited unsent: the stream was cut (its error event's type).
    """

    status = 408
    type = "slow_client"


# The SSE comment a stream gets while it waits (a line a client's EventSource ignores).
SSE_KEEPALIVE = b": keepalive\n\n"
# A deadline this close is reached (the clock's float arithmetic).
_EPSILON = 1e-9


class Framing:
    """
    How a streamed answer is written: its content type, and the bytes of a chunk, of the
    end and of an error (and of a keepalive, L{keepalive}). A chunk's JSON goes as the
    model gave it, its line breaks (JSON whitespace only: a string's are escaped) made
    spaces, so that it stays one line.
    """

    def __init__(self, name: str, content_type: bytes, chunk, end, error):
        self.name = name
        self.content_type = content_type
        self._chunk, self._end, self._error = chunk, end, error

    def chunk(self, data: bytes) -> bytes:
        if b"\n" in data or b"\r" in data:
            data = data.replace(b"\r", b" ").replace(b"\n", b" ")
        return self._chunk[0] + data + self._chunk[1]

    def end(self, output: bytes | None) -> bytes:
        if output is None:
            output = b"null"
        elif b"\n" in output or b"\r" in output:
            output = output.replace(b"\r", b" ").replace(b"\n", b" ")
        return self._end[0] + output + self._end[1]

    def error(self, document: dict) -> bytes:
        return self._error[0] + json.dumps(document).encode() + self._error[1]

    def keepalive(self) -> bytes | None:
        """
        What is written while a stream has written nothing for C{keepalive_seconds}, or
        None for nothing: an SSE comment for Server-Sent Events (any framing of type
        C{text/event-stream}); nothing in other formats, where every line is an event.
        """
        media = self.content_type.split(b";", 1)[0].strip().lower()  # without its charset
        return SSE_KEEPALIVE if media == b"text/event-stream" else None


SSE = Framing("sse", b"text/event-stream", (b"data: ", b"\n\n"),
              (b'event: done\ndata: {"output": ', b"}\n\n"), (b"event: error\ndata: ", b"\n\n"))
NDJSON = Framing("ndjson", b"application/x-ndjson", (b'{"chunk": ', b"}\n"),
                 (b'{"done": true, "output": ', b"}\n"), (b"", b"\n"))


@implementer(IChunks)
class StreamWriter:
    """
    The relay's end of one stream (L{IChunks}): writes each chunk to the request in the
    turn it is given (the status and headers with the first byte), passes the
    connection's flow control to the model's producer, keeps the stream's deadlines and
    keepalives, and finishes the request with the end or an error event.

    Its own producer (L{_ClientEnd}) is the request's for the whole stream, so that it
    knows when the client's connection is full whatever the model registers: bytes
    written while it is are counted, and past the spec's C{max_stream_buffer_bytes} the
    stream is cut (L{cut}: a L{SlowReader}). Its deadlines and keepalive share one
    DelayedCall, moved lazily: a chunk only notes its time, and the call, when it
    fires, looks at what came since and sets itself again (a stream costs one timer,
    however fast its chunks).

    @param clock: the relay's clock (without one, no deadline, no keepalive).
    @param spec: the model's spec (L{aibackend.configbase.ModelSpec}): its stream settings.
    @param stats: the model's L{aibackend.metrics.ModelStats} (chunks, time to the first).
    @param started: when the request came (the clock's seconds).

    @ivar started: whether the first byte has gone (the status is then 200).
    @ivar chunks: chunks written.
    @ivar cut: the L{errors.ApiError} the relay ended the stream with (a deadline, a
        slow reader), or None.
    @ivar stream_end: how the stream ended (L{aibackend.metrics.STREAM_ENDS}), once it has.
    """

    __slots__ = (
        "request", "framing", "clock", "stats", "began", "started", "producer", "chunks", "first_chunk_at",
        "last_chunk_at", "last_write_at", "cut", "stream_end", "paused", "waiting", "timer", "deferred",
        "client_end", "first_chunk_timeout", "idle_timeout", "keepalive_seconds", "max_buffer", "keepalive_bytes",
        "model_id", "relay", "entry", "context", "shape", "call",
    )

    def __init__(self, request, framing: Framing, clock=None, *, spec=None, stats=None, started: float = 0.0):
        self.request = request
        self.framing = framing
        self.started = False
        self.producer = None
        self.clock = clock
        self.stats = stats
        self.began = started
        self.chunks = 0
        self.first_chunk_at = None
        self.last_chunk_at = started  # the model's last sign: its last chunk
        self.last_write_at = started  # the client's: the last byte written
        self.cut = None
        self.stream_end = None
        self.paused = False  # the client's connection is full
        self.waiting = 0  # bytes written since it is
        self.timer = None
        self.deferred = None
        self.client_end = _ClientEnd(self)
        if spec is None or clock is None:
            self.first_chunk_timeout = self.idle_timeout = None
            self.keepalive_seconds = 0.0
            self.max_buffer = None if spec is None else spec.max_stream_buffer_bytes
        else:
            self.first_chunk_timeout = spec.first_chunk_timeout
            self.idle_timeout = spec.stream_idle_timeout
            self.keepalive_seconds = spec.keepalive_seconds
            self.max_buffer = spec.max_stream_buffer_bytes
        self.keepalive_bytes = framing.keepalive() if self.keepalive_seconds else None
        self.model_id = None if spec is None else spec.id
        # The stream's outcome (Relay.stream): told by ended or failed, once; and the
        # policy's aibackend.policy.Call, settled with it (None: no policy).
        self.relay = self.entry = self.context = self.shape = self.call = None

    @property
    def first_chunk_ms(self) -> float | None:
        """Milliseconds from the request to its first chunk (None: none came)."""
        if self.first_chunk_at is None:
            return None
        return round((self.first_chunk_at - self.began) * 1000, 3)

    def gone(self) -> bool:
        """Has the client gone away?"""
        return client_gone(self.request)

    def _open(self) -> bool:
        request = self.request
        if request.finished or self.gone():
            return False
        if not self.started:
            self.started = True
            request.setResponseCode(200)
            headers = request.responseHeaders
            headers.setRawHeaders(b"content-type", [self.framing.content_type])
            headers.setRawHeaders(b"cache-control", [b"no-cache"])
            headers.setRawHeaders(b"x-accel-buffering", [b"no"])
            headers.removeHeader(b"content-length")
        return True

    # --- IChunks ------------------------------------------------------------------

    def chunk(self, data: bytes) -> None:
        if self.cut is not None or not self._open():
            return
        framed = self.framing.chunk(data)
        if self.paused:
            self.waiting += len(framed)
            if self.max_buffer is not None and self.waiting > self.max_buffer:
                self._cut(SlowReader(
                    f"the client read too slowly: more than {self.max_buffer} bytes of the stream waited to be sent "
                    f"(max_stream_buffer_bytes)", model=self.model_id,
                ))
                return
        self.chunks += 1
        stats = self.stats
        if stats is not None:
            stats.stream_chunks += 1
        if self.first_chunk_at is None:
            clock = self.clock
            now = self.first_chunk_at = clock.seconds() if clock is not None else self.began
            self.last_chunk_at = self.last_write_at = now
            if stats is not None:
                stats.first_chunk(now - self.began)
            if self.deferred is not None:
                # From now on the idle deadline counts, not the first chunk's. A later one is
                # left to the timer's tick (a cancelled DelayedCall stays in the reactor's
                # heap until its time); a sooner one replaces it (moving a DelayedCall
                # sooner searches the reactor's whole heap: O(streams)).
                timer = self.timer
                when = self._next()
                if timer is None or when is None or when < timer.getTime():
                    if timer is not None:
                        self.timer = None
                        timer.cancel()
                    self._schedule(now)
            # The first chunk (the time to first token) goes at once, not with what the
            # rest of this read makes (an upstream's events often come several a read).
            request = self.request
            request.write(framed)
            channel = request.channel
            if channel is not None:
                flush(channel.transport)
            return
        elif self.timer is not None:
            self.last_chunk_at = self.last_write_at = self.clock.seconds()
        self.request.write(framed)

    def registerProducer(self, producer, streaming: bool) -> None:
        request = self.request
        if request.finished or self.gone():
            return
        self.producer = producer
        if self.paused:
            producer.pauseProducing()  # the connection is full already: it will not say so again

    def unregisterProducer(self) -> None:
        self.producer = None

    # --- the stream's ends ------------------------------------------------------------

    def begin(self) -> None:
        """Hear from the client's connection (its flow control) from now on."""
        request = self.request
        if request.producer is None and not request.finished and not self.gone():
            request.registerProducer(self.client_end, True)

    def end(self, output: bytes | None) -> None:
        self._last(self.framing.end(output))

    def fail(self, document: dict) -> None:
        self._last(self.framing.error(document))

    def drop(self) -> None:
        """
        Nothing more is written: the error is answered plainly, or the client is gone
        (then the model's producer, if still registered, is stopped: the connection does
        not stop a request's producer itself).
        """
        producer = self.producer
        if producer is not None and self.gone():
            self.producer = None
            producer.stopProducing()
        self._release()

    def _release(self) -> None:
        """The request's producer is no longer the stream's."""
        self.producer = None
        request = self.request
        if request.producer is self.client_end and request.channel is not None:
            request.unregisterProducer()

    def _last(self, data: bytes) -> None:
        if self._open():
            self._release()
            request = self.request
            request.write(data)
            request.finish()
        else:
            self._release()

    # --- the outcome (Relay.stream's callbacks) ---------------------------------------

    def _settled(self) -> None:
        self.entry.stats.in_flight -= 1
        self.stop_clock()

    def ended(self, output) -> None:
        """The model's stream ended with C{output}: logged, counted, and the end event written."""
        self._settled()
        context = self.context
        self.relay._stream_done(self, self.entry, context.request_id, context.operation, self.began, 200, None,
                                "done")
        self.end(output)

    def failed(self, failure):
        """
        The model's stream failed (or was cut, or its client went away): logged and
        counted; before the first byte, the failure goes on to the front door (which
        answers it as a plain request's error); after it, the error event ends the stream.
        """
        self._settled()
        relay, entry, context = self.relay, self.entry, self.context
        request_id, operation, started = context.request_id, context.operation, self.began
        error = self.cut
        if error is not None:
            pass  # the relay ended it: a deadline, or a reader too slow
        elif failure.check(CancelledError):
            if self.gone():
                relay._stream_done(self, entry, request_id, operation, started, CLIENT_CLOSED,
                                   "the client went away", "cancelled")
                self.drop()
                return failure
            model_id = entry.model_id
            error = errors.ModelUnavailable(
                f"model {model_id!r} abandoned the request (it is stopping or was removed)", model=model_id
            )
        elif failure.check(errors.ApiError):
            error = failure.value
        else:
            relay._stream_done(self, entry, request_id, operation, started, 500, failure.getErrorMessage(), "error")
            if not self.started:
                self.drop()
                return failure  # the front door logs it and answers 500
            relay.log.failure("streaming an answer of model {model}", failure, model=entry.model_id)
            self.fail(self.shape.document(errors.InternalError(UNEXPECTED), request_id))
            return None
        how = "timeout" if error.status == errors.GatewayTimeout.status else "error"
        relay._stream_done(self, entry, request_id, operation, started, error.status, error.message, how)
        if not self.started:
            self.drop()
            raise error
        self.fail(self.shape.document(error, request_id))
        return None

    # --- deadlines and keepalives -----------------------------------------------------

    def watch(self, deferred) -> None:
        """Keep the deadlines and keepalives of the stream whose Deferred (the model's) is C{deferred}."""
        self.deferred = deferred
        if self.clock is not None:
            self._schedule(self.clock.seconds())

    def stop_clock(self) -> None:
        """The stream has ended: no deadline, no keepalive any more."""
        self.deferred = None
        timer = self.timer
        if timer is not None:
            self.timer = None
            if timer.active():
                timer.cancel()

    def _next(self) -> float | None:
        """When the timer must next look: the nearest deadline or keepalive, or None."""
        if self.first_chunk_at is None:
            when = None if self.first_chunk_timeout is None else self.began + self.first_chunk_timeout
        else:
            when = None if self.idle_timeout is None else self.last_chunk_at + self.idle_timeout
        if self.keepalive_bytes is not None:
            due = self.last_write_at + self.keepalive_seconds
            if when is None or due < when:
                when = due
        return when

    def _schedule(self, now: float) -> None:
        when = self._next()
        if when is not None and self.deferred is not None:
            self.timer = self.clock.callLater(max(when - now, 0.0), self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.deferred is None:
            return
        now = self.clock.seconds()
        reached = now + _EPSILON
        if self.first_chunk_at is None:
            if self.first_chunk_timeout is not None and reached >= self.began + self.first_chunk_timeout:
                self._cut(errors.GatewayTimeout(
                    f"model {self.model_id!r} sent no chunk within {self.first_chunk_timeout:g} s "
                    f"(first_chunk_timeout)", model=self.model_id,
                ))
                return
        elif self.paused:
            # The client is slow, not the model: a model held for its reader is not idle.
            self.last_chunk_at = now
        elif self.idle_timeout is not None and reached >= self.last_chunk_at + self.idle_timeout:
            self._cut(errors.GatewayTimeout(
                f"model {self.model_id!r} sent no chunk for {self.idle_timeout:g} s (stream_idle_timeout)",
                model=self.model_id,
            ))
            return
        if self.keepalive_bytes is not None and reached >= self.last_write_at + self.keepalive_seconds:
            self.last_write_at = now
            # A client whose connection is full has bytes to read already.
            if not self.paused and self._open():
                self.request.write(self.keepalive_bytes)
        self._schedule(now)

    def _cut(self, error: errors.ApiError) -> None:
        """End the stream from here: the model's work is cancelled, and the client told C{error}."""
        deferred = self.deferred
        if self.cut is not None or deferred is None:
            return
        self.cut = error
        deferred.cancel()


@implementer(IPushProducer)
class _ClientEnd:
    """
    A stream's producer as the connection sees it, for the whole stream: pausing and
    resuming are noted by the writer (its buffer bound) and passed on to the model's
    producer, if it has one. Stopping is the connection being lost: a TCP connection
    stops its producer before the request hears that it is gone, so the request is
    marked gone here first (the cancel that follows is then a client that left, 499,
    not a model that abandoned the request, 503), and the producer is unregistered while
    the request still has its channel.
    """

    __slots__ = ("writer",)

    def __init__(self, writer: StreamWriter):
        self.writer = writer

    def pauseProducing(self) -> None:
        writer = self.writer
        writer.paused = True
        if writer.producer is not None:
            writer.producer.pauseProducing()

    def resumeProducing(self) -> None:
        writer = self.writer
        writer.paused = False
        writer.waiting = 0
        if writer.timer is not None:
            writer.last_chunk_at = writer.clock.seconds()  # the model's idle time counts from now
        if writer.producer is not None:
            writer.producer.resumeProducing()

    def stopProducing(self) -> None:
        writer = self.writer
        writer.request.aibackend_gone = True
        producer = writer.producer
        writer._release()
        if producer is not None:
            producer.stopProducing()


def _cancel(_, d) -> None:
    d.cancel()


def _answered(body, request) -> None:
    try:
        _write(body, request)
    except Exception:
        Relay.log.failure("writing an answer")


def _refused(failure, request, shape) -> None:
    try:
        _write(shape.failure(request, failure), request)
    except Exception:
        Relay.log.failure("writing an answer")


def _write(body, request):
    if request.finished or client_gone(request):
        return
    if body:
        request.write(body)
    request.finish()
