"""
C{--processes N}: N reactor processes serving one listening socket, with one registry.

The primary process (the one C{twistd} started) binds each listening socket itself and
serves it, and starts N-1 worker processes that inherit the sockets and adopt them
(C{adoptStreamPort}); the kernel hands each new connection to one of them. The primary
owns the models:

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
  - a worker learns the state of the models the primary runs (ready, starting, failed...)
    by asking it every second, so its readiness answers are the primary's.

Stopping the primary (SIGTERM, Ctrl-C) stops the workers first (each drains like the
primary does), then the models. A worker whose primary dies ends too (its stdin closes,
and on Linux it is sent SIGTERM).

Logs, model logs (C{cleanlogs} too) and /metrics are per process.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import sys
from dataclasses import replace

from twisted.application import service
from twisted.internet import protocol, stdio
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from aibackend import config, errors
from aibackend.admin import desired_specs
from aibackend.httpmodel import HttpModel
from aibackend.registry import default_build

WORKER_ENV = "AIBACKEND_WORKER"
PGROUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pgroup.py")
FIRST_INHERITED_FD = 3
FORWARDED_HEADERS = (b"content-type", b"origin")


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

    def processEnded(self, reason):
        self.exited.callback(reason.value.exitCode)
        self.group.worker_ended(self, reason)


class WorkerProcesses(service.Service):
    """
    The primary's worker processes: started after everything else, stopped first, and
    restarted if one ends while the daemon runs (after a second, doubling up to 30 s for
    one that keeps ending within 10 s of its start).

    @param argv: the worker's command line (C{twistd ... aibackend ...}).
    @param listeners: the L{aibackend.listeners.SharedListener}s whose sockets each worker inherits.
    @param private: the listener workers forward to (its port is known once listening).
    """

    log = Logger()
    name = "workers"
    SYNC_TIMEOUT = 10.0
    RESTART_DELAY = 1.0
    MAX_RESTART_DELAY = 30.0
    MIN_UPTIME = 10.0

    def __init__(self, reactor, count, argv, listeners, private, token, *, stop_timeout=40.0):
        self.reactor = reactor
        self.count = count
        self.argv = list(argv)
        self.listeners = listeners
        self.private = private
        self.token = token
        self.stop_timeout = stop_timeout
        self.workers: dict[int, _WorkerProtocol] = {}
        self._restarts = {}
        self._delays: dict[int, float] = {}
        self._sequence = 0
        self._waits: list[_SyncWait] = []

    def startService(self):
        super().startService()
        for number in range(1, self.count):
            self._spawn(number)

    def _spawn(self, number):
        self._restarts.pop(number, None)
        inherited = []
        child_fds = {0: "w", 1: 1, 2: 2}
        for index, listener in enumerate(self.listeners):
            fd = FIRST_INHERITED_FD + index
            child_fds[fd] = listener.socket.fileno()
            inherited.append([fd, int(listener.socket.family)])
        ack_fd = FIRST_INHERITED_FD + len(self.listeners)
        child_fds[ack_fd] = "r"
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps({
            "number": number,
            "fds": inherited,
            "ack": ack_fd,
            "primary": self.private.port.getHost().port,
            "token": self.token,
        })
        worker = _WorkerProtocol(self, number, self.reactor.seconds(), ack_fd)
        self.reactor.spawnProcess(worker, sys.executable, [sys.executable, PGROUP, sys.executable] + self.argv,
                                  env=env, childFDs=child_fds)
        self.workers[number] = worker
        self.log.info("aibackend worker {number} started (pid {pid})", number=number, pid=worker.pid)

    def worker_ended(self, worker, reason):
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        self._followed(worker, None)  # a new worker reads the store as it starts
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
        told = []
        for worker in list(self.workers.values()):
            try:
                worker.transport.write(change.encode("ascii") + b"\n")
            except Exception:  # a worker that is going away; it is restarted in full
                continue
            told.append(worker)
        return told

    def sync(self, model_id: str | None = None) -> Deferred:
        """
        Tell every worker that the models changed.

        @return: a Deferred that fires once each worker told has followed (or ended), or
            after C{SYNC_TIMEOUT} seconds, logged: it never fails.
        """
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


# --- in a worker ---------------------------------------------------------------


def worker_settings(environ) -> dict | None:
    """What the primary told this worker (None in the primary)."""
    text = environ.get(WORKER_ENV)
    return json.loads(text) if text else None


class ForwardedModel(HttpModel):
    """
    A worker's stand-in for a model the primary runs: requests go to the primary's
    front door over its private port.
    """

    def __init__(self, spec, primary_port: int, token: str, states=None, **kwargs):
        self.original_spec = spec
        self._states = states if states is not None else {}
        forwarded = config.HttpModelSpec(
            id=spec.id, type="http", log_entries=spec.log_entries, v2=spec.v2,
            url=f"http://127.0.0.1:{primary_port}/post/predict?id={spec.id}",
            timeout=float(getattr(spec, "timeout", 60.0)) + 5.0,
            connect_timeout=5.0,
            headers={"Authorization": f"Bearer {token}"},
        )
        super().__init__(forwarded, **kwargs)
        self.type_name = spec.type

    @property
    def state(self) -> str:
        """The model's state in the primary, as last heard (starting until then)."""
        return self._states.get(self.model_id, "starting")

    def describe(self) -> dict:
        described = super().describe()
        described["type"] = self.original_spec.type
        described["served_by"] = "the primary process"
        described.pop("url", None)
        described.pop("replicas", None)
        return described


def worker_builder(settings, deps_for, states):
    """
    How a worker builds a model: a subprocess model is forwarded to the primary (unless
    C{per_process}); an HTTP model's server process is left to the primary.

    @param states: model id -> state in the primary (L{PrimaryStates}).
    """
    def build(spec, runtime):
        deps = deps_for(runtime)
        if isinstance(spec, config.SubprocessModelSpec) and not spec.per_process:
            model = ForwardedModel(spec, settings["primary"], settings["token"], states,
                                   reactor=deps.reactor, pool=deps.pool)
        elif isinstance(spec, config.HttpModelSpec) and spec.process is not None:
            model = default_build(replace(spec, process=None), deps)
        else:
            model = default_build(spec, deps)
        return model

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
        request_id = getattr(request, "aibackend_request_id", None)
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


class ControlChannel(LineOnlyReceiver):
    """A worker's stdin: the primary's notices. End of file: the primary is gone."""

    delimiter = b"\n"
    log = Logger()

    def __init__(self, resync, reactor, restart=None):
        self.resync = resync
        self.reactor = reactor
        self.restart = restart

    def lineReceived(self, line):
        word, _, argument = line.strip().decode("utf-8", "replace").partition(" ")
        if word == "sync":
            d = self.resync().addErrback(lambda failure: self.log.failure("following the primary's change", failure))
            if argument.isdigit():  # the primary waits for the answer on the worker's ack pipe
                d.addCallback(lambda _: self.transport.write(f"synced {argument}\n".encode("ascii")))
        elif word == "restart" and self.restart is not None:
            self.restart(argument)

    def connectionLost(self, reason):
        if getattr(self.reactor, "running", False):
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
        wanted = desired_specs(cfg, changes, validate, log)
        for model in registry.models():
            if model.model_id not in wanted:
                registry.remove(model.model_id)
        for model_id, (spec, origin) in wanted.items():
            if model_id in registry:
                if registry.entry(model_id).spec == spec:
                    continue
                registry.replace(registry.build(spec, runtime=origin == "runtime"), origin=origin, spec=spec)
            else:
                registry.add(registry.build(spec, runtime=origin == "runtime"), origin=origin, spec=spec)

    return store.read().addCallback(follow)


def new_token() -> str:
    return secrets.token_urlsafe(32)


class WorkerControl(service.Service):
    """A worker listens to its primary on stdin (L{ControlChannel})."""

    name = "primary-link"

    def __init__(self, reactor, resync_now, restart=None, ack_fd=None):
        self.reactor = reactor
        self.resync_now = resync_now
        self.restart = restart
        self.ack_fd = ack_fd
        self.stdio = None

    def startService(self):
        super().startService()
        # stdout stays twistd's log: the channel writes to the ack pipe the primary reads.
        if self.ack_fd is None:
            self.ack_fd = os.open(os.devnull, os.O_WRONLY)
        self.stdio = stdio.StandardIO(ControlChannel(self.resync_now, self.reactor, self.restart), stdin=0,
                                      stdout=self.ack_fd, reactor=self.reactor)

    def stopService(self):
        super().stopService()
        if self.stdio is not None:
            channel, self.stdio = self.stdio, None
            channel.protocol.reactor = _Stopping()
            channel.loseConnection()


class _Stopping:
    running = False


def restart_local(registry, log):
    """A worker's part of a restart: the pool of a per_process model runs here too."""

    def restart(model_id: str) -> None:
        if model_id not in registry:
            return
        model = registry.get(model_id)
        if isinstance(model, ForwardedModel) or not hasattr(model, "restart"):
            return
        log.info("aibackend worker: restarting model {model} as the primary did", model=model_id)
        model.restart()

    return restart


class PrimaryStates(service.Service):
    """
    A worker's view of the states of the models the primary runs: C{/get/models} on the
    primary's private port, every second.
    """

    INTERVAL = 1.0
    log = Logger()
    name = "primary-states"

    def __init__(self, reactor, pool, port: int, token: str):
        self.reactor = reactor
        self.agent = Agent(reactor, pool=pool)
        self.url = f"http://127.0.0.1:{port}/get/models".encode("ascii")
        self.headers = Headers({b"authorization": [b"Bearer " + token.encode("ascii")]})
        self.states: dict[str, str] = {}
        self._loop = None
        self._asking = None

    def startService(self):
        super().startService()
        self._loop = LoopingCall(self.ask)
        self._loop.clock = self.reactor
        self._loop.start(self.INTERVAL, now=True)

    def ask(self):
        if self._asking is not None:
            return
        d = self._asking = self.agent.request(b"GET", self.url, self.headers)
        d.addCallback(readBody)
        d.addCallback(self._heard)
        d.addErrback(lambda failure: None)  # the primary is starting or stopping: ask again later

        def done(result):
            self._asking = None

        d.addBoth(done)

    def _heard(self, body: bytes) -> None:
        models = json.loads(body).get("models", [])
        self.states.clear()
        self.states.update({model["id"]: model.get("state", "ready") for model in models})

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._asking is not None:
            self._asking.cancel()
