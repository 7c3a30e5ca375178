"""
Subprocess models: programs the daemon starts, supervises and talks to in JSON lines.

A L{SubprocessModel} is made of parts, each testable on its own:

  - its processes' supervisor, a L{aibackend.supervisor.ProcessPool} (spawn, readiness,
    restarts with backoff, crash loops, stopping with everything the processes started);
  - its line protocol, L{aibackend.lines.RawLines} or L{aibackend.lines.JsonLines},
    chosen once: how a request is written and what a line of stdout means;
  - its concurrency limit, a L{aibackend.limits.ConcurrencyLimit}: the requests in flight,
    the bounded queue of those waiting for a free process, shedding past it.

The model dispatches requests (least in-flight process first) and sees to it that no
answer reaches a request other than its own.

The names the supervisor and the line protocols had here are kept importable.
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.internet.interfaces import IPushProducer
from zope.interface import alsoProvides, implementer

from aibackend.errors import BadGateway, GatewayTimeout, ModelUnavailable
from aibackend.interfaces import STOPPED, IModel, IRestartable, IStreaming
from aibackend.limits import ConcurrencyLimit
from aibackend.lines import (
    PROTOCOLS, SNIPPET, JsonLines, RawLines, is_text, leading_id, one_line, output_text, stream_result,
)
from aibackend.logs import ModelLog
from aibackend.modelstate import ModelState
from aibackend.supervisor import (
    OVERSIZE, PGROUP_WRAPPER, STDERR_LINE_BYTES, STDOUT_CLOSED_GRACE, Launcher, LineBuffer, ModelProcess,
    PoolEvents, ProcessPool, describe_exit,
)

__all__ = [
    "SubprocessModel", "Pending", "RawLines", "JsonLines", "Launcher", "LineBuffer", "ModelProcess", "PoolEvents",
    "ProcessPool", "OVERSIZE", "PGROUP_WRAPPER", "STDERR_LINE_BYTES", "STDOUT_CLOSED_GRACE", "SNIPPET",
    "describe_exit", "is_text", "leading_id", "one_line", "output_text",
]


class Pending:
    """A request on its way through a subprocess model."""

    __slots__ = ("body", "context", "deferred", "timer", "process", "wire_id", "sent_at", "abandoned", "counted",
                 "chunks", "gathered", "paused", "model")

    def __init__(self, body, context):
        self.body = body
        self.context = context
        self.deferred = None
        self.timer = None
        self.process = None
        self.wire_id = None
        self.sent_at = None
        self.abandoned = False
        self.counted = False  # in flight, in the limit's count
        self.chunks = None  # a stream's IChunks
        self.gathered = None  # a plain request's chunks so far (lines.Gathered)
        self.paused = False  # a stream whose reader is slow
        self.model = None  # the SubprocessModel it was sent to

    def cancel(self, deferred) -> None:
        """Its Deferred's canceller: the client went away (a bound method, not a closure a request)."""
        self.model._cancelled(self)


def _unregister(result, chunks):
    chunks.unregisterProducer()
    return result


def _streamed(answer, chunks):
    chunks.unregisterProducer()
    return stream_result(answer)


@implementer(IPushProducer)
class StreamProducer:
    """
    A stream's flow control: its slow reader pauses the reading of its process's stdout,
    while the stream is the only request in flight in that process. Reading a process's
    stdout is all or nothing: a process working on other requests too (C{max_inflight}
    above 1) is not held up for one slow reader; what waits for that reader is bounded by
    the relay instead (C{max_stream_buffer_bytes}, past which the stream is cut), and a
    request given to a process held by a stream releases it (L{SubprocessModel._assign}).
    """

    __slots__ = ("pending",)

    def __init__(self, pending: Pending):
        self.pending = pending

    def pauseProducing(self) -> None:
        pending = self.pending
        if not pending.paused:
            pending.paused = True
            process = pending.process
            if process is not None and pending.counted and len(process.inflight) == 1:
                process.pause_stdout(pending)

    def resumeProducing(self) -> None:
        pending = self.pending
        if pending.paused:
            pending.paused = False
            if pending.process is not None:
                pending.process.resume_stdout(pending)

    def stopProducing(self) -> None:
        self.pending.deferred.cancel()


@implementer(IModel, IRestartable)
class SubprocessModel(PoolEvents, Service):
    """
    A model served by programs the daemon runs, in the C{raw} or C{jsonl} line protocol
    (L{aibackend.lines}: what each one guarantees).

    No answer reaches a request other than its own: each request gets a wire id no other
    request of the model ever gets (its request id, C{#}, a counter of the model's), and
    a process's answer goes only to a request in flight in that process.

    @param spec: an L{aibackend.config.SubprocessModelSpec}.
    @ivar pool: its processes' supervisor (L{aibackend.supervisor.ProcessPool}).
    @ivar protocol: its line protocol (L{aibackend.lines}).
    @ivar limit: its concurrency limit (L{aibackend.limits.ConcurrencyLimit}).
    """

    type_name = "subprocess"
    log = Logger()

    def __init__(self, spec, *, reactor, environ=None, launcher=None):
        environ = os.environ if environ is None else environ
        self.spec = spec
        self.model_id = spec.id
        self.model_log = ModelLog(reactor, spec.log_entries)
        self.clock = reactor
        self.protocol = PROTOCOLS[spec.protocol](self)
        self.capacity = self.protocol.capacity
        # What the pool hands a process's lines to: the protocol, with no step between.
        self.process_line = self.protocol.line
        self.process_read = self.protocol.read
        self._state = ModelState(self, STOPPED, why=lambda: self.last_failure)
        self.pool = ProcessPool(
            model_id=spec.id,
            settings=spec.process,
            size=spec.workers,
            reactor=reactor,
            model_log=self.model_log,
            environ=environ,
            launcher=launcher,
            state=self._state,
            events=self,
            ready_on_spawn=self.protocol.ready_on_spawn,
            stdout_is_protocol=True,
        )
        self.limit = ConcurrencyLimit(spec.id, max_queue=spec.max_queue)
        self.queue = self.limit.queue
        self.requests = 0
        self.failures = 0
        self._wire_counter = 0
        self.request_timeout = float(spec.timeout)
        self.startup_timeout = float(spec.process.startup_timeout)
        if spec.protocol == "jsonl":
            alsoProvides(self, IStreaming)  # raw answers are one line: they cannot come in chunks

    @classmethod
    def from_spec(cls, spec, deps):
        return cls(spec, reactor=deps.reactor, environ=deps.environ)

    def startService(self):
        super().startService()
        self.pool.startService()

    def stopService(self):
        super().stopService()
        return self.pool.stopService()

    # --- IModel, IRestartable -----------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def in_flight(self) -> int:
        return self.limit.in_flight

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def last_failure(self) -> str | None:
        return self.pool.last_failure

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    @property
    def live_processes(self) -> int:
        return self.pool.live_processes

    @property
    def slots(self) -> list:
        """The pool's processes, by slot (None where there is none now)."""
        return self.pool.slots

    def restart(self) -> None:
        self.pool.restart()

    def whenReady(self) -> Deferred:
        return self._state.when_ready()

    def watch(self, callback):
        return self._state.watch(callback)

    def whenIdle(self) -> Deferred:
        return self.limit.when_idle()

    def describe(self) -> dict:
        pool = self.pool
        return {
            "id": self.model_id,
            "type": self.type_name,
            "state": self.state,
            "protocol": self.spec.protocol,
            "in_flight": self.in_flight,
            "queued": len(self.queue),
            "requests": self.requests,
            "failures": self.failures,
            "restarts": pool.restarts,
            "next_restart_in": pool.next_restart_in(),
            "trial_ends_in": pool.trial_ends_in(),
            "last_error": pool.last_failure,
            "processes": pool.describe_processes(),
        }

    # --- sending ------------------------------------------------------------

    def send(self, body: bytes, context) -> Deferred:
        return self._send(Pending(body, context))

    def stream(self, body: bytes, context, chunks) -> Deferred:
        """
        IStreaming (jsonl only): as L{send}, but each chunk goes to C{chunks} in the reactor
        turn its line was read in; the Deferred fires with the output's JSON text or None.
        """
        pending = Pending(body, context)
        pending.chunks = chunks
        chunks.registerProducer(StreamProducer(pending), True)
        try:
            d = self._send(pending)
        except BaseException:
            chunks.unregisterProducer()
            raise
        # One callback pair, not two (a held stream's Deferred holds them).
        return d.addCallbacks(_streamed, _unregister, callbackArgs=(chunks,), errbackArgs=(chunks,))

    def _send(self, pending: Pending) -> Deferred:
        self.requests += 1
        pool = self.pool
        if pool.failed_reason is not None:
            self.failures += 1
            wait = pool.retry_after()
            if pool.trial_timer is None:
                when = f"it is tried again in {wait} s"
            else:
                when = f"it is being tried again, and takes requests if it runs for another {wait} s"
            raise ModelUnavailable(
                f"model {self.model_id!r} has failed: {pool.failed_reason}; {when} (an admin can restart it now)",
                model=self.model_id,
                retry_after=wait,
            )
        if pool.stopping or not pool.running:
            self.failures += 1
            raise ModelUnavailable(f"model {self.model_id!r} is not running", model=self.model_id)
        pending.model = self
        pending.deferred = Deferred(pending.cancel)
        process = self._least_busy()
        if process is None and self.limit.full():
            self.failures += 1
            raise self.limit.busy(retry_after=pool.retry_after())
        pending.timer = self.clock.callLater(self.spec.timeout, self._timed_out, pending)
        if process is None:
            self.queue.append(pending)
        else:
            self._assign(process, pending)
        return pending.deferred

    def _takes_requests(self, process) -> bool:
        return (
            process.state == "ready"
            and not process.stdout_closed
            and len(process.inflight) < self.capacity
            and not process.held
        )

    def _least_busy(self):
        best = None
        for process in self.pool.slots:
            if process is not None and self._takes_requests(process):
                if best is None or len(process.inflight) < len(best.inflight):
                    best = process
        return best

    def dispatch(self) -> None:
        """Give the requests waiting to the processes that take one."""
        while self.queue:
            process = self._least_busy()
            if process is None:
                return
            self._assign(process, self.queue.popleft())

    def _assign(self, process, pending: Pending) -> None:
        # Never the same for two requests of this model: what answers one cannot answer another.
        self._wire_counter += 1
        wire_id = f"{pending.context.request_id}#{self._wire_counter}"
        pending.wire_id = wire_id
        pending.process = process
        pending.sent_at = self.clock.seconds()
        pending.counted = True
        self.limit.in_flight += 1  # limit.started(), inline
        process.inflight[wire_id] = pending
        if process.paused_by:
            # A stream's slow reader holds this process's stdout: it may no longer, or this
            # request would wait for that reader (the relay bounds what waits for it).
            for holder in list(process.paused_by):
                process.resume_stdout(holder)
        elif pending.paused and len(process.inflight) == 1:
            process.pause_stdout(pending)
        self.protocol.write(process, pending)

    def settle(self, pending: Pending, result=None, error=None) -> None:
        """
        Answer a request once (its process has let it go): stop its timer, fire its
        Deferred (unless abandoned); its place is free.
        """
        if pending.timer is not None:
            if pending.timer.active():
                pending.timer.cancel()
            pending.timer = None
        limit = self.limit
        if pending.counted:
            pending.counted = False
            limit.in_flight -= 1
            if pending.paused:
                pending.process.resume_stdout(pending)
        if not (pending.abandoned or pending.deferred.called):
            if error is not None:
                self.failures += 1
                pending.deferred.errback(error)
            else:
                if result.status >= 400:
                    self.failures += 1
                pending.deferred.callback(result)
        if limit.idle_waiters:
            limit.check_idle()

    def _cancelled(self, pending: Pending) -> None:
        """The client went away: forget the request, and free its place if we can."""
        pending.abandoned = True
        if pending in self.queue:
            self.queue.remove(pending)
            self.settle(pending)
            return
        process = pending.process
        if process is None:
            self.settle(pending)
            return
        self.protocol.cancelled(process, pending)

    def _timed_out(self, pending: Pending) -> None:
        pending.timer = None
        timeout = GatewayTimeout(
            f"model {self.model_id!r} did not answer within {self.spec.timeout:g} s", model=self.model_id
        )
        if pending in self.queue:
            self.queue.remove(pending)
            self.settle(pending, error=timeout)
            return
        process = pending.process
        process.inflight.pop(pending.wire_id, None)
        self.settle(pending, error=timeout)
        self.protocol.timed_out(process, pending)

    # --- what the pool says (PoolEvents) ----------------------------------------

    def process_ready(self, process) -> None:
        self.dispatch()

    def process_gone(self, process, why: str) -> None:
        self.protocol.gone(process)
        inflight = list(process.inflight.values())
        process.inflight.clear()
        for pending in inflight:
            self.settle(
                pending,
                error=BadGateway(f"model {self.model_id!r}: {why} while handling the request", model=self.model_id),
            )
        if self.queue and not self.pool.ready_processes() and self.pool.stopping:
            self._fail_queue(ModelUnavailable(f"model {self.model_id!r} is stopping", model=self.model_id))
        else:
            self.dispatch()

    def startup_failed(self, why: str) -> None:
        if not self.pool.ready_processes():
            self._fail_queue(
                ModelUnavailable(
                    f"model {self.model_id!r} is not ready: a process {why}; it is being restarted",
                    model=self.model_id,
                    retry_after=self.pool.retry_after(),
                )
            )

    def pool_failed(self, why: str) -> None:
        wait = self.pool.retry_after()
        self._fail_queue(
            ModelUnavailable(f"model {self.model_id!r} has failed: {why}; it is tried again in {wait} s",
                             model=self.model_id, retry_after=wait)
        )

    def pool_back(self) -> None:
        self.dispatch()

    def pool_stopping(self) -> None:
        self._fail_queue(ModelUnavailable(f"model {self.model_id!r} is stopping", model=self.model_id))

    def _fail_queue(self, error) -> None:
        while self.queue:
            self.settle(self.queue.popleft(), error=error)
