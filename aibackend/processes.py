"""
C{--processes N}: N reactor processes serving one listening socket, with one registry.

The primary process (the one C{twistd} started) listens on each listen address, alone,
and starts N-1 worker processes, each of which inherits a link to it for each address (a
Unix socket pair). The primary accepts every connection and serves it itself or hands its
file descriptor to a worker on the worker's link, whichever process holds the fewest
connections of that address (L{aibackend.listeners.SharedListener}): the split is even,
not the kernel's draw. A worker is handed connections once it has said so on its ack pipe
(C{listening}) and until it ends; meanwhile the primary serves them. The primary owns the models:

  - an HTTP model is a client: each process calls the model's server itself, through its
    own connection pool (a server the daemon starts, C{command}, is started once, by the
    primary);
  - a subprocess model's processes are started once, by the primary; a worker forwards
    the requests for it to the primary over a private loopback port. With C{per_process
    = true} in its configuration, each process starts its own pool instead;
  - admin operations (addmodel, removemodel, restart and the v2 repository) are
    forwarded to the primary, which keeps the change and tells every worker, which reads
    the change from the store, builds the same models and says so on a pipe of its own.
    The primary answers once every worker has followed (or after C{SYNC_TIMEOUT}, logged),
    so a request sent after the answer finds the change in every process. A restart
    reaches the pools of per_process models in every process.
  - the primary tells each worker the state of the models it runs for them (ready,
    starting, failed...) each time it changes, so a worker's readiness answers are the
    primary's.

Stopping the primary (SIGTERM, Ctrl-C) stops the workers first (each drains like the
primary does), then the models. A worker whose primary dies ends too (its stdin closes,
and on Linux it is sent SIGTERM).

The primary speaks to each worker on the worker's stdin, one line a notice
(L{ControlChannel}): C{sync N} (the models changed: follow, then say C{synced N} on the
ack pipe; a worker whose re-read failed says nothing and reads again), C{restart ID},
C{state ID STATE} and C{forget ID}. A worker says C{listening} on its ack pipe once it has
started (its links read, its front door ready). A model id is 1 to 128
characters of C{[A-Za-z0-9_.-]} and a state one of L{aibackend.interfaces.STATES}: a
line is short, and its fields have no spaces.

Logs, model logs (C{cleanlogs} too) and /metrics are per process; a scrape says which
process answered it (C{aibackend_process_info}, L{ProcessCollector}).
"""
from __future__ import annotations

import io
import json
import os
import secrets
import sys
from dataclasses import replace

from prometheus_client.core import GaugeMetricFamily
from twisted.application import service
from twisted.internet import protocol, stdio
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from zope.interface import alsoProvides, implementer

from aibackend import config, errors
from aibackend.admin import apply_specs, desired_specs
from aibackend.httpmodel import HttpModel
from aibackend.interfaces import IModel, IRestartable, IStreaming, STARTING, STATES, STOPPED
from aibackend.modelstate import ModelState
from aibackend.registry import default_build

WORKER_ENV = "AIBACKEND_WORKER"
PGROUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pgroup.py")
FIRST_INHERITED_FD = 3
FORWARDED_HEADERS = (b"content-type", b"origin")
# The longest line the primary writes to a worker ("state" + an id of 128 + a state is
# far less); the worker's channel reads lines of up to LineOnlyReceiver.MAX_LENGTH.
MAX_NOTICE = 1024


def parse_processes(text: str) -> int:
    """C{--processes}: a count, or C{auto} for one per core."""
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"--processes is a number or auto, got {text!r}") from None
    if not 1 <= count <= 256:
        raise ValueError(f"--processes must be from 1 to 256, got {count}")
    return count


def forwarded(spec) -> bool:
    """Does a worker forward the requests for the model of C{spec} to the primary?"""
    return isinstance(spec, config.SubprocessModelSpec) and not spec.per_process


# --- in the primary -----------------------------------------------------------------


class _WorkerProtocol(protocol.ProcessProtocol):
    MAX_LINE = 1024

    def __init__(self, group, number, started: float, ack_fd: int):
        self.group = group
        self.number = number
        self.started = started
        self.ack_fd = ack_fd
        self.exited: Deferred = Deferred()
        self.pid = None
        self._buffer = b""

    def connectionMade(self):
        self.pid = self.transport.pid

    def childDataReceived(self, childFD, data):
        if childFD != self.ack_fd:
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()[-self.MAX_LINE:]
        for line in lines:
            word, _, number = line.decode("ascii", "replace").strip().partition(" ")
            if word == "synced" and number.isdigit():
                self.group.worker_synced(self, int(number))
            elif word == "listening" and not number:
                self.group.worker_listening(self)

    def processEnded(self, reason):
        self.exited.callback(reason.value.exitCode)
        self.group.worker_ended(self, reason)


class ModelStates:
    """
    The primary's side of the workers' view of its models: it watches each model that
    workers forward to it (L{forwarded}) and has the workers told each change of its
    state (C{state ID STATE}), and of a model that went (C{forget ID}).

    @param registry: the primary's L{aibackend.registry.ModelRegistry}.
    @param tell: called with each notice line, for every worker.
    """

    def __init__(self, registry, tell):
        self.registry = registry
        self.tell = tell
        self._watched: dict[str, tuple] = {}  # id -> (model, stop watching)

    def follow(self) -> None:
        """Watch the models the registry has now; tell what is new or gone."""
        now = {entry.model_id: entry.model for entry in self.registry.entries() if forwarded(entry.spec)}
        for model_id, (model, stop) in list(self._watched.items()):
            if now.get(model_id) is not model:
                stop()
                del self._watched[model_id]
                if model_id not in now:
                    self.tell(f"forget {model_id}")
        for model_id, model in now.items():
            if model_id not in self._watched:
                self._watched[model_id] = (model, model.watch(self._changed))
                self.tell(self._notice(model))

    def notices(self) -> list[str]:
        """What a new worker is told first: the state of every model watched."""
        return [self._notice(model) for model, _ in self._watched.values()]

    def stop(self) -> None:
        for _, stop in self._watched.values():
            stop()
        self._watched.clear()

    def _changed(self, model) -> None:
        self.tell(self._notice(model))

    @staticmethod
    def _notice(model) -> str:
        return f"state {model.model_id} {model.state}"


class WorkerProcesses(service.Service):
    """
    The primary's worker processes: started after everything else, stopped first, and
    restarted if one ends while the daemon runs (after a second, doubling up to 30 s for
    one that keeps ending within 10 s of its start). Each is told what changes
    (L{sync}, L{notify}) and, given C{registry}, the states of the models it forwards
    to the primary (L{ModelStates}): all of them as it starts, then each change.

    @param argv: the worker's command line (C{twistd ... aibackend ...}).
    @param listeners: the L{aibackend.listeners.SharedListener}s: each worker inherits
        a link of each (C{socket_for(number)}, then C{spawned(number)}); it is handed
        connections while it listens (C{handed_over(number)}, C{taken_back(number)}).
    @param private: the listener workers forward to (its port is known once listening).
    @param registry: the primary's registry, whose models' states workers are told.

    @ivar settings: more of what each worker is told as it starts (in L{WORKER_ENV}: the
        limits' shared table, C{limits}).
    @ivar ended: callables given a worker's number once it has ended (what it held in the
        limits' shared table is given back).
    """

    log = Logger()
    name = "workers"
    SYNC_TIMEOUT = 10.0
    RESTART_DELAY = 1.0
    MAX_RESTART_DELAY = 30.0
    MIN_UPTIME = 10.0

    def __init__(self, reactor, count, argv, listeners, private, token, *, registry=None, stop_timeout=40.0):
        self.reactor = reactor
        self.count = count
        self.argv = list(argv)
        self.listeners = listeners
        self.private = private
        self.token = token
        self.stop_timeout = stop_timeout
        self.states = ModelStates(registry, self.notify) if registry is not None else None
        self.workers: dict[int, _WorkerProtocol] = {}
        self._restarts = {}
        self._delays: dict[int, float] = {}
        self._sequence = 0
        self._waits: list[_SyncWait] = []
        self.settings: dict = {}
        self.ended: list = []

    def startService(self):
        super().startService()
        if self.states is not None:
            self.states.follow()
        for number in range(1, self.count):
            self._spawn(number)

    def _spawn(self, number):
        self._restarts.pop(number, None)
        inherited = []
        child_fds = {0: "w", 1: 1, 2: 2}
        for index, listener in enumerate(self.listeners):
            fd = FIRST_INHERITED_FD + index
            sock = listener.socket_for(number)  # its end of a new link
            child_fds[fd] = sock.fileno()
            inherited.append([fd, int(sock.family)])
        ack_fd = FIRST_INHERITED_FD + len(self.listeners)
        child_fds[ack_fd] = "r"
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps({
            **self.settings,
            "number": number,
            "fds": inherited,
            "ack": ack_fd,
            "primary": self.private.port.getHost().port,
            "token": self.token,
        })
        worker = _WorkerProtocol(self, number, self.reactor.seconds(), ack_fd)
        try:
            self.reactor.spawnProcess(worker, sys.executable, [sys.executable, PGROUP, sys.executable] + self.argv,
                                      env=env, childFDs=child_fds)
        finally:
            for listener in self.listeners:  # the worker has its ends; the primary closes its copies
                listener.spawned(number)
        self.workers[number] = worker
        self.log.info("aibackend worker {number} started (pid {pid})", number=number, pid=worker.pid)
        if self.states is not None:
            # Read once its reactor runs; until then (and for a model not told) it is "starting".
            self._tell(worker, self.states.notices())

    def worker_listening(self, worker) -> None:
        """C{worker} has started and serves what it is handed: it is handed its share."""
        if self.workers.get(worker.number) is worker:
            for listener in self.listeners:
                listener.handed_over(worker.number)

    def worker_ended(self, worker, reason):
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
            for listener in self.listeners:  # the others (and the primary) serve what comes
                listener.taken_back(worker.number)
        self._followed(worker, None)  # a new worker reads the store as it starts
        for ended in self.ended:
            try:
                ended(worker.number)
            except Exception:
                self.log.failure("after worker {number} ended", number=worker.number)
        if self.running:
            quick = self.reactor.seconds() - worker.started < self.MIN_UPTIME
            delay = min(self._delays.get(worker.number, self.RESTART_DELAY / 2) * 2, self.MAX_RESTART_DELAY) \
                if quick else self.RESTART_DELAY
            self._delays[worker.number] = delay
            self.log.error("aibackend worker {number} (pid {pid}) ended: {why}; another in {delay:g} s",
                           number=worker.number, pid=worker.pid, why=reason.getErrorMessage(), delay=delay)
            self._restarts[worker.number] = self.reactor.callLater(delay, self._spawn, worker.number)

    def notify(self, change: str) -> list:
        """Tell every worker C{change} (one line); the workers told."""
        if len(change) > MAX_NOTICE or "\n" in change:
            raise ValueError(f"not a notice for a worker: {change[:80]!r}")
        return [worker for worker in list(self.workers.values()) if self._tell(worker, [change])]

    @staticmethod
    def _tell(worker, lines) -> bool:
        if not lines:
            return True
        try:
            worker.transport.write("".join(f"{line}\n" for line in lines).encode("ascii"))
        except Exception:  # a worker that is going away; it is restarted in full
            return False
        return True

    def sync(self, model_id: str | None = None) -> Deferred:
        """
        Tell every worker that the models changed (the states of new models first).

        @return: a Deferred that fires once each worker told has followed (or ended), or
            after C{SYNC_TIMEOUT} seconds, logged: it never fails.
        """
        if self.states is not None:
            self.states.follow()
        self._sequence += 1
        told = self.notify(f"sync {self._sequence}")
        if not told:
            return succeed(None)
        wait = _SyncWait(self._sequence, set(told), Deferred(), model_id)
        wait.timer = self.reactor.callLater(self.SYNC_TIMEOUT, self._late, wait)
        self._waits.append(wait)
        return wait.done

    def worker_synced(self, worker, sequence: int) -> None:
        self._followed(worker, sequence)

    def _followed(self, worker, sequence: int | None) -> None:
        """C{worker} followed every change up to C{sequence} (None: it ended)."""
        for wait in list(self._waits):
            if sequence is None or sequence >= wait.sequence:
                wait.pending.discard(worker)
                if not wait.pending:
                    self._finish(wait)

    def _late(self, wait) -> None:
        self.log.warn("aibackend: worker(s) {numbers} did not follow the change to model {model} within "
                      "{timeout:g} s; answering without them (they follow it when they can)",
                      numbers=", ".join(str(worker.number) for worker in sorted(wait.pending, key=lambda w: w.number)),
                      model=wait.model_id, timeout=self.SYNC_TIMEOUT)
        self._finish(wait)

    def _finish(self, wait) -> None:
        if wait in self._waits:
            self._waits.remove(wait)
        if wait.timer is not None and wait.timer.active():
            wait.timer.cancel()
        wait.done.callback(None)

    def stopService(self):
        super().stopService()
        if self.states is not None:
            self.states.stop()  # the models stop after the workers: nothing more to tell
        for wait in list(self._waits):
            self._finish(wait)
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = []
        for worker in list(self.workers.values()):
            ended.append(worker.exited)
            worker.transport.signalProcess("TERM")
            kill = self.reactor.callLater(self.stop_timeout, self._kill, worker)
            worker.exited.addBoth(lambda result, kill=kill: (kill.cancel() if kill.active() else None, result)[1])
        return DeferredList(ended) if ended else succeed(None)

    @staticmethod
    def _kill(worker):
        try:
            worker.transport.signalProcess("KILL")
        except Exception:
            pass


class _SyncWait:
    """A change the primary waits for its workers to follow."""

    def __init__(self, sequence: int, pending: set, done: Deferred, model_id):
        self.sequence = sequence
        self.pending = pending
        self.done = done
        self.model_id = model_id
        self.timer = None


def new_token() -> str:
    return secrets.token_urlsafe(32)


class ProcessCollector:
    """
    C{aibackend_process_info{process="primary"|"worker-N", pid="..."} 1} in /metrics:
    which process answered a scrape (each has its own figures), for a scraper or the
    benchmark that counts each process's requests.
    """

    def __init__(self, name: str):
        self.name = name

    def collect(self):
        info = GaugeMetricFamily("aibackend_process_info", "The --processes process that answered this scrape.",
                                 labels=["process", "pid"])
        info.add_metric([self.name, str(os.getpid())], 1)
        return [info]


# --- in a worker ---------------------------------------------------------------


def worker_settings(environ) -> dict | None:
    """What the primary told this worker (None in the primary)."""
    text = environ.get(WORKER_ENV)
    return json.loads(text) if text else None


class PrimaryStates:
    """
    A worker's view of the states of the models the primary runs for it, as the primary
    tells them (L{ControlChannel}); C{starting} for a model not told yet.
    """

    def __init__(self):
        self._states: dict[str, str] = {}
        self._watchers: dict[str, list] = {}

    def get(self, model_id: str) -> str:
        return self._states.get(model_id, STARTING)

    def heard(self, model_id: str, state: str) -> None:
        """The primary says model C{model_id} is C{state} now."""
        self._states[model_id] = state
        for callback in list(self._watchers.get(model_id, ())):
            callback(state)

    def forget(self, model_id: str) -> None:
        """The primary has no such model any more."""
        self._states.pop(model_id, None)

    def watch(self, model_id: str, callback):
        """
        Call C{callback(state)} each time the primary tells model C{model_id}'s state.

        @return: a callable of no arguments that stops the watch.
        """
        self._watchers.setdefault(model_id, []).append(callback)

        def stop() -> None:
            callbacks = self._watchers.get(model_id, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                self._watchers.pop(model_id, None)

        return stop


def forwarded_spec(spec, primary_port: int, token: str) -> config.HttpModelSpec:
    """How a worker reaches the primary's front door for model C{spec}: an HTTP model's spec."""
    return config.HttpModelSpec(
        id=spec.id, type="http", log_entries=spec.log_entries, v2=spec.v2,
        url=f"http://127.0.0.1:{primary_port}/post/predict?id={spec.id}",
        timeout=float(spec.timeout) + 5.0,
        connect_timeout=5.0,
        headers={"Authorization": f"Bearer {token}"},
    )


@implementer(IModel)
class ForwardedModel(service.Service):
    """
    A worker's stand-in for a model the primary runs: requests go to the primary's front
    door over its private port (through an L{HttpModel} of its own), and its state is the
    primary's, as the primary tells it (L{PrimaryStates}). A model that streams (a
    C{jsonl} one) streams here too (L{IStreaming}): the primary is asked for JSON lines
    (its front door's NDJSON, which the HttpModel reads chunk by chunk), and a client that
    leaves this process closes the connection to the primary, which cancels the model's
    work as for a client of its own.

    @param spec: the model's spec (a subprocess model's).
    @param states: the worker's L{PrimaryStates}.
    """

    def __init__(self, spec, primary_port: int, token: str, states: PrimaryStates, *, reactor, pool=None):
        self.model_id = spec.id
        self.type_name = spec.type
        self._to_primary = HttpModel(forwarded_spec(spec, primary_port, token), reactor=reactor, pool=pool,
                                     stream_accept=b"application/x-ndjson")
        if spec.protocol == "jsonl":
            alsoProvides(self, IStreaming)
        self.spec = self._to_primary.spec
        self.model_log = self._to_primary.model_log
        self.request_timeout = self._to_primary.request_timeout
        # The primary starts it; a worker waits for the primary to say it is ready.
        self.startup_timeout = float(spec.process.startup_timeout) if spec.process is not None else 0.0
        self._states = states
        self._state = ModelState(self, states.get(spec.id))
        self._unwatch = None

    def startService(self):
        super().startService()
        self._unwatch = self._states.watch(self.model_id, self._state.set)
        self._state.set(self._states.get(self.model_id))  # what was told since it was made
        self._to_primary.startService()

    def stopService(self):
        super().stopService()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        self._state.set(STOPPED)
        return self._to_primary.stopService()

    @property
    def state(self) -> str:
        """The model's state in the primary, as last told (starting until then)."""
        return self._state.value

    @property
    def in_flight(self) -> int:
        return self._to_primary.in_flight

    @property
    def queued(self) -> int:
        return self._to_primary.queued

    @property
    def last_failure(self) -> str | None:
        return None  # the primary's own answers say why

    def send(self, body: bytes, context):
        return self._to_primary.send(body, context)

    def stream(self, body: bytes, context, chunks):
        """IStreaming (a jsonl model's stand-in): the primary's NDJSON stream, chunk by chunk."""
        return self._to_primary.stream(body, context, chunks)

    def whenReady(self) -> Deferred:
        return self._state.when_ready()

    def whenIdle(self) -> Deferred:
        return self._to_primary.whenIdle()

    def watch(self, callback):
        return self._state.watch(callback)

    def describe(self) -> dict:
        described = self._to_primary.describe()
        described["type"] = self.type_name
        described["state"] = self.state
        described["served_by"] = "the primary process"
        described.pop("url", None)
        described.pop("replicas", None)
        return described


def worker_builder(settings, deps_for, states: PrimaryStates):
    """
    How a worker builds a model: a subprocess model is forwarded to the primary (unless
    C{per_process}); an HTTP model's server process is left to the primary.

    @param deps_for: C{runtime -> ModelDeps}.
    @param states: the L{PrimaryStates} forwarded models take their state from.
    """

    def build(spec, runtime):
        deps = deps_for(runtime)
        if forwarded(spec):
            return ForwardedModel(spec, settings["primary"], settings["token"], states,
                                  reactor=deps.reactor, pool=deps.pool)
        if isinstance(spec, config.HttpModelSpec) and spec.process is not None:
            return default_build(replace(spec, process=None), deps)
        return default_build(spec, deps)

    return build


class Forwarder:
    """A worker's way to the primary for the operations the primary does."""

    def __init__(self, reactor, pool, port: int, token: str):
        self.agent = Agent(reactor, pool=pool)
        self.base = f"http://127.0.0.1:{port}".encode("ascii")
        self.token = token

    def forward(self, request) -> Deferred:
        """
        Send C{request} (method, path, query, body) to the primary; answer the client with
        what the primary answers.
        """
        headers = Headers({b"authorization": [b"Bearer " + self.token.encode("ascii")]})
        request_id = request.aibackend_request_id
        if request_id is not None:
            headers.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
        for name in FORWARDED_HEADERS:
            value = request.getHeader(name)
            if value is not None:
                headers.setRawHeaders(name, [value])
        request.content.seek(0)
        body = request.content.read()
        producer = FileBodyProducer(io.BytesIO(body)) if body else None
        d = self.agent.request(request.method, self.base + request.uri, headers, producer)

        def answered(response):
            request.setResponseCode(response.code)
            for name in (b"content-type", b"allow", b"retry-after", b"www-authenticate"):
                values = response.headers.getRawHeaders(name)
                if values:
                    request.responseHeaders.setRawHeaders(name, values)
            return readBody(response)

        def failed(failure):
            failure.trap(Exception)
            if failure.check(errors.ApiError):
                return failure
            raise errors.BadGateway(f"the daemon's primary process did not answer: {failure.getErrorMessage()}")

        return d.addCallback(answered).addErrback(failed)


def _model_id(text: str) -> bool:
    return len(text) <= config.MAX_ID_LENGTH and config.ID_PATTERN.match(text) is not None


class ControlChannel(LineOnlyReceiver):
    """
    A worker's stdin: the primary's notices (see the module's docstring). End of file:
    the primary is gone, and the worker stops (unless it is stopping already).

    A change is acknowledged (C{synced N}) only once followed: a re-read that failed
    (logged) is not, and is tried again after L{RETRY_DELAY} s, doubling up to
    L{MAX_RETRY_DELAY}, until one succeeds, which acknowledges every change told so far.
    Meanwhile the primary answers as for a worker that did not follow in time (after
    L{WorkerProcesses.SYNC_TIMEOUT}, logged), and never hears that this worker followed
    what it did not.

    @param resync: called for C{sync}; returns a Deferred that fires once followed.
    @param reactor: stopped when the primary is gone (None: nothing to stop).
    @param restart: called with the model id of a C{restart}.
    @param states: the L{PrimaryStates} that C{state} and C{forget} update.
    @param clock: what a failed re-read is tried again on (the reactor unless given;
        None with neither: not tried again).
    """

    delimiter = b"\n"
    log = Logger()
    RETRY_DELAY = 0.25
    MAX_RETRY_DELAY = 30.0

    def __init__(self, resync, reactor, restart=None, states: PrimaryStates | None = None, clock=None):
        self.resync = resync
        self.reactor = reactor
        self.restart = restart
        self.states = states
        self.clock = clock if clock is not None else reactor
        self.closing = False
        self.told = None  # the last numbered change the primary told
        self.retry = None  # the re-read tried again after a failure
        self._delay = 0.0

    def lineReceived(self, line):
        try:
            self._notice(line)
        except Exception:  # a notice that went wrong must not cut the worker off its primary
            self.log.failure("following the primary's notice {line!r}", line=line[:200])

    def _follow(self, sequence: int | None) -> None:
        """Re-read the store; acknowledge C{sequence} (None: nothing to) once followed."""
        d = maybeDeferred(self.resync)
        d.addCallbacks(self._followed, self._not_followed, callbackArgs=(sequence,), errbackArgs=(sequence,))
        d.addErrback(lambda failure: self.log.failure("after following the primary's change", failure))

    def _followed(self, _, sequence: int | None) -> None:
        if self.retry is not None and (self.told is None or (sequence is not None and sequence >= self.told)):
            self._cancel_retry()  # this read covers what the retry was for
        if self.retry is None:
            self._delay = 0.0
        if sequence is not None:  # the primary waits for the answer on the worker's ack pipe
            self.transport.write(f"synced {sequence}\n".encode("ascii"))

    def _not_followed(self, failure, sequence: int | None) -> None:
        retrying = self.clock is not None and not self.closing
        if retrying and self.retry is None:
            self._delay = min(self.MAX_RETRY_DELAY, self._delay * 2 if self._delay else self.RETRY_DELAY)
            self.retry = self.clock.callLater(self._delay, self._again)
        again = f"; reading again in {self._delay:g} s" if retrying else ""
        change = f"change {sequence}" if sequence is not None else "change"
        if failure.check(errors.ApiError):  # the store said why (a shared store unreachable): no traceback
            self.log.warn("aibackend worker: not following the primary's {change} (not acknowledged): {why}{again}",
                          change=change, why=failure.value.message, again=again)
        else:
            self.log.failure("following the primary's {change} (not acknowledged){again}", failure, change=change,
                             again=again)

    def _again(self) -> None:
        self.retry = None
        self._follow(self.told)  # what it reads now covers every change told so far

    def _cancel_retry(self) -> None:
        if self.retry is not None:
            if self.retry.active():
                self.retry.cancel()
            self.retry = None

    def _notice(self, line: bytes) -> None:
        word, _, argument = line.strip().decode("utf-8", "replace").partition(" ")
        if word == "sync":
            sequence = int(argument) if argument.isdigit() else None
            if sequence is not None:
                self.told = max(self.told or 0, sequence)
            self._follow(sequence)
        elif word == "restart" and self.restart is not None:
            self.restart(argument)
        elif word == "state" and self.states is not None:
            model_id, _, state = argument.partition(" ")
            if _model_id(model_id) and state in STATES:
                self.states.heard(model_id, state)
        elif word == "forget" and self.states is not None and _model_id(argument):
            self.states.forget(argument)

    def connectionLost(self, reason):
        self._cancel_retry()
        if not self.closing and self.reactor is not None and self.reactor.running:
            self.log.warn("aibackend worker: the primary process is gone; stopping")
            self.reactor.stop()


def resync(registry, cfg, store, validate, log) -> Deferred:
    """
    Make a worker's registry what the configuration and the kept changes say: add what
    is new, replace what changed, remove what went. The store is read off the reactor
    thread.

    @return: a Deferred that fires once the registry has followed.
    """

    def follow(changes) -> None:
        apply_specs(registry, desired_specs(cfg, changes, validate, log))

    return store.read().addCallback(follow)


class WorkerControl(service.Service):
    """A worker listens to its primary on stdin (L{ControlChannel})."""

    name = "primary-link"

    def __init__(self, reactor, resync_now, restart=None, ack_fd=None, states: PrimaryStates | None = None):
        self.reactor = reactor
        self.resync_now = resync_now
        self.restart = restart
        self.ack_fd = ack_fd
        self.states = states
        self.stdio = None

    def startService(self):
        super().startService()
        # stdout stays twistd's log: the channel writes to the ack pipe the primary reads.
        if self.ack_fd is None:
            self.ack_fd = os.open(os.devnull, os.O_WRONLY)
        channel = ControlChannel(self.resync_now, self.reactor, self.restart, self.states)
        self.stdio = stdio.StandardIO(channel, stdin=0, stdout=self.ack_fd, reactor=self.reactor)
        # The primary hands this worker its share of the connections. The listeners read their links
        # already (privilegedStartService, which every service passes before any starts),
        # and the line leaves once the reactor runs: after every service has started,
        # the readiness last.
        self.stdio.write(b"listening\n")

    def stopService(self):
        super().stopService()
        if self.stdio is not None:
            transport, self.stdio = self.stdio, None
            transport.protocol.closing = True
            transport.loseConnection()


def restart_local(registry, log):
    """A worker's part of a restart: the pool of a per_process model runs here too."""

    def restart(model_id: str) -> None:
        if model_id not in registry:
            return
        model = registry.get(model_id)
        if not IRestartable.providedBy(model):
            return  # a forwarded model's processes are the primary's
        log.info("aibackend worker: restarting model {model} as the primary did", model=model_id)
        model.restart()

    return restart
