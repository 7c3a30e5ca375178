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
answer reaches a request other than its own. A C{jsonl} model with C{[models.batching]}
is a L{BatchingSubprocessModel}: its plain requests wait in a L{aibackend.batching.Batcher}
and go to a process in batches.

The names the supervisor and the line protocols had here are kept importable.
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.internet.interfaces import IPushProducer
from zope.interface import alsoProvides, implementer

from aibackend.batching import BatchingModel
from aibackend.errors import BadGateway, GatewayTimeout, ModelBusy, ModelUnavailable
from aibackend.interfaces import STOPPED, IBatching, IModel, IRestartable, IStreaming
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
    "SubprocessModel", "BatchingSubprocessModel", "Batch", "Pending", "RawLines", "JsonLines", "Launcher",
    "LineBuffer", "ModelProcess", "PoolEvents",
    "ProcessPool", "OVERSIZE", "PGROUP_WRAPPER", "STDERR_LINE_BYTES", "STDOUT_CLOSED_GRACE", "SNIPPET",
    "describe_exit", "is_text", "leading_id", "one_line", "output_text",
]


class Pending:
    """A request on its way through a subprocess model."""

    __slots__ = ("body", "context", "deferred", "timer", "process", "wire_id", "sent_at", "abandoned", "counted",
                 "chunks", "gathered", "paused", "model", "batch")

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
        self.batch = None  # the Batch it is part of (a batching model's)

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
        if spec.batching is not None and cls is SubprocessModel:
            cls = BatchingSubprocessModel
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
            "queued": self.queued,
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

    def _unavailable(self):
        """Why the model takes no request now (a L{ModelUnavailable}), or None."""
        pool = self.pool
        if pool.failed_reason is not None:
            wait = pool.retry_after()
            if pool.trial_timer is None:
                when = f"it is tried again in {wait} s"
            else:
                when = f"it is being tried again, and takes requests if it runs for another {wait} s"
            return ModelUnavailable(
                f"model {self.model_id!r} has failed: {pool.failed_reason}; {when} (an admin can restart it now)",
                model=self.model_id,
                retry_after=wait,
            )
        if pool.stopping or not pool.running:
            return ModelUnavailable(f"model {self.model_id!r} is not running", model=self.model_id)
        return None

    def _send(self, pending: Pending) -> Deferred:
        self.requests += 1
        pool = self.pool
        if pool.failed_reason is not None or pool.stopping or not pool.running:
            self.failures += 1
            raise self._unavailable()
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


class Batch:
    """
    Requests a batching model sends in one message (L{BatchingSubprocessModel}): their
    L{Pending}s, each in flight under its own wire id, answered by its own line.

    @ivar wire_id: the batch's own id (an C{error} line under it fails each request of
        the batch not answered yet), once written.
    @ivar open: how many of its requests are not answered yet, once written.
    """

    __slots__ = ("items", "wire_id", "open", "process")

    def __init__(self, items: list):
        self.items = items
        self.wire_id = None
        self.open = 0
        self.process = None


@implementer(IBatching)
class BatchingSubprocessModel(BatchingModel, SubprocessModel):
    """
    A C{jsonl} subprocess model with C{[models.batching]}: plain requests wait in a
    L{aibackend.batching.Batcher}, whose batches go to a process in one
    C{{"op": "batch", ...}} message (L{aibackend.lines.JsonLines.write_batch}); a batch
    holds one of the process's C{max_inflight} places. Batches that wait for a free
    process are sent together when one frees, up to C{max_batch_size}. Streams are never
    batched: each goes on its own, as for any jsonl model, holding a place too.
    """

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.start_batching(spec.batching, self.clock, float(spec.timeout))
        self.places: dict = {}  # process -> messages (batches, streams) in flight there
        self.queued_items = 0  # requests of the batches in the queue
        self.queued_batches = 0  # batches in the queue (the rest of it is streams)

    # --- IBatching --------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self.batcher.waiting + self.keyed_waiting() + self._waiting_for_a_place()

    def _waiting_for_a_place(self) -> int:
        """The requests in the queue: those of its batches, and its streams."""
        return self.queued_items + len(self.queue) - self.queued_batches

    def admit(self, waiting: int) -> None:
        pool = self.pool
        if pool.failed_reason is not None or pool.stopping or not pool.running:
            self.requests += 1
            self.failures += 1
            raise self._unavailable()
        queued = waiting + self.keyed_waiting() + self._waiting_for_a_place()
        if queued >= self.spec.max_queue:
            self.requests += 1
            self.failures += 1
            self.limit.shed += 1
            raise ModelBusy(
                f"model {self.model_id!r} is busy: {queued} requests are waiting to be batched or for a "
                f"process (max_queue)",
                model=self.model_id, retry_after=pool.retry_after(),
            )

    def send_batch(self, items: list) -> list:
        n = len(items)
        self.requests += n
        error = self._unavailable()
        if error is not None:
            self.failures += n
            return [fail(error) for _ in items]
        clock = self.clock
        now = clock.seconds()
        batch = Batch([])
        pendings = batch.items
        for item in items:
            pending = Pending(item.body, item.context)
            pending.model = self
            pending.batch = batch
            pending.deferred = Deferred(pending.cancel)
            pending.timer = clock.callLater(max(item.deadline - now, 0), self._timed_out, pending)
            pendings.append(pending)
        process = self._least_busy()
        if process is None:
            self.queue.append(batch)
            self.queued_items += n
            self.queued_batches += 1
        else:
            self._assign(process, batch)
        return [pending.deferred for pending in pendings]

    def describe(self) -> dict:
        described = super().describe()
        described["batching"] = self.describe_batching()
        return described

    # --- places: a batch or a stream holds one --------------------------------------------

    def _takes_requests(self, process) -> bool:
        return (
            process.state == "ready"
            and not process.stdout_closed
            and self.places.get(process, 0) < self.capacity
            and not process.held
        )

    def dispatch(self) -> None:
        queue = self.queue
        max_size = self.batching.max_batch_size
        while queue:
            process = self._least_busy()
            if process is None:
                return
            entry = queue.popleft()
            if type(entry) is Batch:
                self.queued_items -= len(entry.items)
                self.queued_batches -= 1
                # Batches that waited together go together, as far as one batch may hold.
                while queue and type(queue[0]) is Batch and len(entry.items) + len(queue[0].items) <= max_size:
                    more = queue.popleft()
                    self.queued_items -= len(more.items)
                    self.queued_batches -= 1
                    for pending in more.items:
                        pending.batch = entry
                    entry.items.extend(more.items)
            self._assign(process, entry)

    def _assign(self, process, entry) -> None:
        self.places[process] = self.places.get(process, 0) + 1
        if type(entry) is not Batch:
            super()._assign(process, entry)  # a stream
            return
        batch = entry
        batch.process = process
        batch.open = len(batch.items)
        self._wire_counter += 1
        batch.wire_id = f"batch#{self._wire_counter}"
        now = self.clock.seconds()
        inflight = process.inflight
        for pending in batch.items:
            self._wire_counter += 1
            wire_id = f"{pending.context.request_id}#{self._wire_counter}"
            pending.wire_id = wire_id
            pending.process = process
            pending.sent_at = now
            pending.counted = True
            inflight[wire_id] = pending
        self.limit.in_flight += len(batch.items)
        if process.paused_by:
            for holder in list(process.paused_by):
                process.resume_stdout(holder)
        self.batch_stats.sent(len(batch.items))
        self.protocol.write_batch(process, batch)

    def settle(self, pending: Pending, result=None, error=None) -> None:
        counted, process = pending.counted, pending.process
        super().settle(pending, result, error)
        if not counted:
            return
        batch = pending.batch
        if batch is not None:
            batch.open -= 1
            if batch.open:
                return
            self.protocol.batch_done(batch)
        places = self.places
        left = places.get(process, 0) - 1
        if left > 0:
            places[process] = left
        else:
            places.pop(process, None)

    def process_gone(self, process, why: str) -> None:
        super().process_gone(process, why)
        self.places.pop(process, None)

    # --- requests of a batch still in the queue ---------------------------------------------

    def _unqueue(self, pending: Pending) -> None:
        batch = pending.batch
        batch.items.remove(pending)
        self.queued_items -= 1
        if not batch.items:
            self.queue.remove(batch)
            self.queued_batches -= 1

    def _cancelled(self, pending: Pending) -> None:
        if pending.batch is not None and pending.process is None:
            pending.abandoned = True
            self._unqueue(pending)
            self.settle(pending)
            return
        super()._cancelled(pending)

    def _timed_out(self, pending: Pending) -> None:
        if pending.batch is not None and pending.process is None:
            pending.timer = None
            self._unqueue(pending)
            self.settle(pending, error=GatewayTimeout(
                f"model {self.model_id!r} did not answer within {self.spec.timeout:g} s "
                f"(the request waited to be batched and for a process)", model=self.model_id))
            return
        super()._timed_out(pending)

    def pool_stopping(self) -> None:
        self.fail_waiting(ModelUnavailable(f"model {self.model_id!r} is stopping", model=self.model_id))
        super().pool_stopping()

    def _fail_queue(self, error) -> None:
        queue = self.queue
        while queue:
            entry = queue.popleft()
            if type(entry) is Batch:
                self.queued_items -= len(entry.items)
                self.queued_batches -= 1
                for pending in entry.items:
                    self.settle(pending, error=error)
            else:
                self.settle(entry, error=error)
