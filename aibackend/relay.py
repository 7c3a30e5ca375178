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
from aibackend.interfaces import IChunks
from aibackend.metrics import Metrics
from aibackend.web import UNEXPECTED, client_gone, sized

# A client that goes away before its answer is logged with nginx's status for it.
CLIENT_CLOSED = 499


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
    """

    log = Logger()

    def __init__(self, clock, metrics):
        self.clock = clock
        self.metrics = metrics

    def send(self, request, entry, body: bytes, context, started: float, shape=None):
        """
        Send C{body} to the model of registry entry C{entry} and answer the client with
        what it answers (or with what C{shape} makes of that L{ModelAnswer}); the outcome
        is logged and counted once.

        @param started: when the request came (the clock's seconds), for its latency.
        @return: a Deferred of the answer's body, or failing with an L{errors.ApiError}
            (or, when the client went away, with the L{CancelledError}).
        """
        stats = entry.stats
        stats.in_flight += 1
        d = maybeDeferred(entry.model.send, body, context)

        def settled(result):
            stats.in_flight -= 1
            return result

        d.addBoth(settled)
        if shape is not None:
            d.addCallback(shape)
        request_id, operation = context.request_id, context.operation

        def answered(answer):
            self.done(entry, request_id, operation, started, answer.status, None)
            request.setResponseCode(answer.status)
            headers = request.responseHeaders
            for name, value in answer.headers.items():
                headers.setRawHeaders(name, [value])
            return sized(request, answer.body)

        def failed(failure):
            if failure.check(errors.ApiError):
                self.done(entry, request_id, operation, started, failure.value.status, failure.value.message)
            elif failure.check(CancelledError):
                if client_gone(request):
                    self.done(entry, request_id, operation, started, CLIENT_CLOSED, "the client went away")
                    return failure
                model_id = entry.model_id
                error = errors.ModelUnavailable(
                    f"model {model_id!r} abandoned the request (it is stopping or was removed)", model=model_id
                )
                self.done(entry, request_id, operation, started, error.status, error.message)
                raise error
            else:
                self.done(entry, request_id, operation, started, 500, failure.getErrorMessage())
            return failure

        d.addCallbacks(answered, failed)
        return d

    def stream(self, request, entry, body: bytes, context, started: float, framing: "Framing", shape):
        """
        The streaming twin of L{send}: have the model of C{entry} (an L{IStreaming})
        answer in chunks, each written to the client at once in C{framing}'s format, then
        the final event. An error before the first byte fails the Deferred (the front
        door answers it as a plain request's error, in C{shape}); after it, the error
        event (C{shape}'s document) ends the stream. The outcome is logged and counted
        once: 200 for a stream that ended, the error's status for one that failed (before
        or after its first byte), 499 when the client went away (the model's stream is
        cancelled: cancelling the Deferred returned cancels it).

        @return: a Deferred firing with None once the request is finished, or failing
            with an L{errors.ApiError} (or the L{CancelledError} of a client gone).
        """
        stats = entry.stats
        stats.in_flight += 1
        writer = StreamWriter(request, framing)
        d = maybeDeferred(entry.model.stream, body, context, writer)

        def settled(result):
            stats.in_flight -= 1
            return result

        d.addBoth(settled)
        request_id, operation = context.request_id, context.operation

        def ended(output):
            self.done(entry, request_id, operation, started, 200, None)
            writer.end(output)

        def failed(failure):
            if failure.check(CancelledError):
                if writer.gone():
                    self.done(entry, request_id, operation, started, CLIENT_CLOSED, "the client went away")
                    writer.drop()
                    return failure
                model_id = entry.model_id
                error = errors.ModelUnavailable(
                    f"model {model_id!r} abandoned the request (it is stopping or was removed)", model=model_id
                )
            elif failure.check(errors.ApiError):
                error = failure.value
            else:
                self.done(entry, request_id, operation, started, 500, failure.getErrorMessage())
                if not writer.started:
                    writer.drop()
                    return failure  # the front door logs it and answers 500
                self.log.failure("streaming an answer of model {model}", failure, model=entry.model_id)
                writer.fail(shape.document(errors.InternalError(UNEXPECTED), request_id))
                return None
            self.done(entry, request_id, operation, started, error.status, error.message)
            if not writer.started:
                writer.drop()
                raise error
            writer.fail(shape.document(error, request_id))
            return None

        d.addCallbacks(ended, failed)
        return d

    def done(self, entry, request_id: str, operation: str, started: float, status: int, error: str | None):
        """
        Log a request to the model of C{entry} (its log, the metrics): one sent, or one
        refused before it was (a body that is not JSON).
        """
        seconds = self.clock.seconds() - started
        self.metrics.observe(entry, operation, status, seconds)
        entry.model.model_log.request(
            request_id=request_id, operation=operation, status=status, latency_ms=seconds * 1000.0, error=error
        )

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
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(shape.errback, request)
        d.addCallback(_write, request)
        d.addErrback(self.log.failure, "writing an answer")
        return NOT_DONE_YET


class Framing:
    """
    How a streamed answer is written: its content type, and the bytes of a chunk, of the
    end and of an error. A chunk's JSON goes as the model gave it, its line breaks (JSON
    whitespace only: a string's are escaped) made spaces, so that it stays one line.
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


SSE = Framing("sse", b"text/event-stream", (b"data: ", b"\n\n"),
              (b'event: done\ndata: {"output": ', b"}\n\n"), (b"event: error\ndata: ", b"\n\n"))
NDJSON = Framing("ndjson", b"application/x-ndjson", (b'{"chunk": ', b"}\n"),
                 (b'{"done": true, "output": ', b"}\n"), (b"", b"\n"))


@implementer(IChunks)
class StreamWriter:
    """
    The relay's end of one stream (L{IChunks}): writes each chunk to the request in the
    turn it is given (the status and headers with the first byte), hands the model's
    producer to the request (Twisted's transport pauses it while the client's socket is
    full), and finishes the request with the end or an error event.

    @ivar started: whether the first byte has gone (the status is then 200).
    """

    started = False
    producer = None

    def __init__(self, request, framing: Framing):
        self.request = request
        self.framing = framing

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

    def chunk(self, data: bytes) -> None:
        if self._open():
            self.request.write(self.framing.chunk(data))

    def registerProducer(self, producer, streaming: bool) -> None:
        request = self.request
        if request.finished or self.gone():
            return
        self.producer = producer
        request.registerProducer(_ClientEnd(self, producer), True)

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            self.producer = None
            request = self.request
            if request.producer is not None and request.channel is not None:
                request.unregisterProducer()

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
        else:
            self.unregisterProducer()

    def _last(self, data: bytes) -> None:
        if self._open():
            self.unregisterProducer()
            request = self.request
            request.write(data)
            request.finish()


@implementer(IPushProducer)
class _ClientEnd:
    """
    A model's producer as the connection sees it: pausing and resuming pass through.
    Stopping is the connection being lost: a TCP connection stops its producer before the
    request hears that it is gone, so the request is marked gone here first (the cancel
    that follows is then a client that left, 499, not a model that abandoned the request,
    503), and the producer is unregistered while the request still has its channel.
    """

    def __init__(self, writer: StreamWriter, producer):
        self.writer = writer
        self.producer = producer

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        writer = self.writer
        writer.request.aibackend_gone = True
        writer.unregisterProducer()
        self.producer.stopProducing()


def _write(body, request):
    if request.finished or client_gone(request):
        return
    if body:
        request.write(body)
    request.finish()
