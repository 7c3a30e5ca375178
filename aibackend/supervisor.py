"""
The supervisor of model processes (like Twisted's C{procmon}), apart from what the
processes say:

  - L{LineBuffer} frames a byte stream into lines, never holding more than its limit.
  - L{ModelProcess} is the ProcessProtocol of one process: it frames stdout and stderr and
    tells its pool what happened. It decides nothing.
  - L{Launcher} starts a process leading a process group of its own and signals it with
    every process below it (L{aibackend.proctree}).
  - L{ProcessPool} spawns N processes, marks them ready, restarts them with growing
    backoff after a crash, is C{failed} after a crash loop and tries again with a capped
    backoff, and stops them with SIGTERM, then SIGKILL after a grace period. Every timer
    it starts is kept where it can be cancelled. What the processes' output means is its
    L{PoolEvents}' to say: a subprocess model's line protocol (L{aibackend.lines}), an
    HTTP model's server readiness (L{aibackend.httpmodel}).
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys

from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from aibackend import proctree
from aibackend.directwrite import event_done
from aibackend.interfaces import FAILED, READY, RESTARTING, STARTING, STOPPED, STOPPING
from aibackend.modelstate import ModelState

PGROUP_WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pgroup.py")
STDERR_LINE_BYTES = 4096
# How long a process whose stdout closed may take to exit before it counts as broken.
STDOUT_CLOSED_GRACE = 0.5

OVERSIZE = object()


class LineBuffer:
    """
    Splits a byte stream into lines (without their C{\\n}).

    A line longer than C{limit} is never kept whole: with C{truncate} its first C{limit}
    bytes are given (the rest dropped); without, L{OVERSIZE} is given in its place.
    Either way the buffer holds at most C{limit} bytes.
    """

    def __init__(self, limit: int, *, truncate: bool = False):
        self.limit = limit
        self.truncate = truncate
        self._parts: list[bytes] = []
        self._size = 0
        self._skipping = False

    def feed(self, data: bytes) -> list:
        out = []
        start = 0
        end = len(data)
        while start < end:
            newline = data.find(b"\n", start)
            if newline < 0:
                self._keep(data[start:], out)
                break
            if self._skipping:
                self._skipping = False
            else:
                self._keep(data[start:newline], out)
                if not self._skipping:
                    line = b"".join(self._parts)
                    out.append(line[:-1] if line.endswith(b"\r") else line)
            self._skipping = False
            self._parts.clear()
            self._size = 0
            start = newline + 1
        return out

    def _keep(self, chunk: bytes, out: list) -> None:
        if self._skipping or not chunk:
            return
        if self._size + len(chunk) <= self.limit:
            self._parts.append(chunk)
            self._size += len(chunk)
            return
        if self.truncate:
            self._parts.append(chunk[: self.limit - self._size])
            out.append(b"".join(self._parts))
        else:
            out.append(OVERSIZE)
        self._parts.clear()
        self._size = 0
        self._skipping = True

    def pending(self) -> bytes:
        """What is buffered of an unfinished line."""
        return b"".join(self._parts)

    def flush(self) -> list:
        """The unfinished last line, if any (the stream has ended)."""
        rest = b"" if self._skipping else b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._skipping = False
        return [rest] if rest.strip() else []


class Launcher:
    """
    Starts model processes, each leading a process group of its own, and stops them
    with everything they started (L{aibackend.proctree}).
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.orphans = proctree.orphans_of(reactor)
        # model pid -> the descendants seen when it was signalled: once it has exited
        # they are orphans (the daemon's children, as a subreaper) to end as well.
        self.trees: dict[int, dict[int, proctree.Stat]] = {}

    def spawn(self, protocol, settings, env):
        args = [sys.executable, "-S", PGROUP_WRAPPER, settings.executable, *settings.command[1:]]
        return self.reactor.spawnProcess(
            protocol, sys.executable, args, env=env, path=settings.cwd or None
        )

    def signal(self, process, name: str) -> None:
        """
        Send SIG{name} to the process's group (to the process alone before it has one)
        and to every process below it, in its group or not.
        """
        pid = getattr(process, "pid", None)
        if pid is None:
            return
        number = getattr(signal, "SIG" + name)
        below = proctree.descendants(pid)  # found before any of them is signalled
        self.trees.setdefault(pid, {}).update((entry.pid, entry) for entry in below)
        try:
            os.killpg(pid, number)
        except (ProcessLookupError, PermissionError):
            try:
                process.signalProcess(name)
            except (ierror.ProcessExitedAlready, OSError):
                pass
        for entry in below:
            proctree.signal(entry, number)

    def process_exited(self, pid):
        """
        A model process has exited: SIGKILL what is left of its group, and of what it
        started: the descendants seen when it was signalled, and the orphans (now the
        daemon's children) of its session or group. Every orphan is adopted, so it is
        reaped when it ends.

        @return: a Deferred that fires once the ones killed are reaped, or None.
        """
        if pid is None:
            return None
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        seen = self.trees.pop(pid, {})
        for entry in seen.values():
            proctree.signal(entry, signal.SIGKILL)
        adopted = self.orphans.sweep()
        mine = [
            orphan for orphan in adopted
            if orphan.stat.session == pid or orphan.stat.pgrp == pid
            or (orphan.pid in seen and seen[orphan.pid].start == orphan.stat.start)
        ]
        if not mine:
            return None
        return self.orphans.kill(mine)

    def busy(self, process) -> bool:
        """Whether the process's main thread is running (not asleep, as in a read of its stdin)."""
        pid = getattr(process, "pid", None)
        return pid is not None and proctree.running(pid)


def describe_exit(reason) -> str:
    value = getattr(reason, "value", reason)
    signal_number = getattr(value, "signal", None)
    if signal_number:
        try:
            return f"killed by signal {signal.Signals(signal_number).name}"
        except ValueError:
            return f"killed by signal {signal_number}"
    code = getattr(value, "exitCode", None)
    return f"exited with status {code}" if code is not None else "exited"


class ModelProcess(ProcessProtocol):
    """
    One model process: frames its output into lines for its pool.

    @ivar state: C{starting}, C{ready}, C{stopping} or C{exited}.
    @ivar inflight: wire id -> pending request, the requests it works on (kept by the
        model that sends them, L{aibackend.subprocess.SubprocessModel}).
    @ivar stdout_closed: its stdout has closed (it ends, or it closed it and lives on).
    @ivar held: its line protocol holds it (no request may be written to it now).
    @ivar lines: what its line protocol keeps of it (L{aibackend.lines}), or None.
    """

    def __init__(self, pool, slot: int, max_line_bytes: int):
        self.pool = pool
        self.slot = slot
        self.state = "starting"
        self.pid = None
        self.inflight: dict = {}
        self.started_at = pool.clock.seconds()
        self.last_output = self.started_at
        self.stopping_on_purpose = False
        self.stdout_closed = False
        self.startup_timer = None
        self.kill_timer = None
        self.stdout_timer = None
        self.held = False
        self.lines = None
        self.paused_by: set = set()  # the streams that have paused its stdout
        self.exited = Deferred()
        self._stdout = LineBuffer(max_line_bytes)
        self._stderr = LineBuffer(STDERR_LINE_BYTES, truncate=True)

    def connectionMade(self):
        self.pid = self.transport.pid
        self.pool.on_spawned(self)

    def write(self, data: bytes) -> None:
        if self.state in ("starting", "ready") and self.transport is not None:
            self.transport.write(data)

    def pause_stdout(self, holder) -> None:
        """Stop reading the process's output while C{holder} (a stream's slow reader) needs it."""
        if not self.paused_by and self.transport is not None and self.state != "exited":
            self.transport.pauseProducing()
        self.paused_by.add(holder)

    def resume_stdout(self, holder) -> None:
        """C{holder} no longer needs the output held; it is read again once no one does."""
        if holder in self.paused_by:
            self.paused_by.discard(holder)
            if not self.paused_by and self.transport is not None and self.state != "exited":
                self.transport.resumeProducing()

    def partial_line(self) -> bool:
        """Whether stdout ended (so far) in the middle of a line."""
        return bool(self._stdout.pending())

    def outReceived(self, data: bytes):
        self.last_output = self.pool.clock.seconds()
        for line in self._stdout.feed(data):
            if self.state == "exited":
                break
            if line is OVERSIZE:
                self.pool.on_oversize(self)
            elif line.strip():
                self.pool.on_line(self, line)
        if self.state != "exited":
            self.pool.on_read(self)  # the whole of this read has been looked at
        event_done(self.pool.clock)  # the answers written to clients go now (aibackend.directwrite)

    def outConnectionLost(self):
        self.stdout_closed = True
        self.pool.on_stdout_closed(self)

    def errReceived(self, data: bytes):
        for line in self._stderr.feed(data):
            if line.strip():
                self.pool.on_stderr(self, line)

    def errConnectionLost(self):
        # A crash message without a line end ("fatal: ..."; exit(1)) is still worth keeping.
        for line in self._stderr.flush():
            self.pool.on_stderr(self, line)

    def processExited(self, reason):
        # processExited, not processEnded: a grandchild that keeps our pipes open must
        # not delay noticing the crash.
        self.pool.on_exited(self, reason)


def _refreshes(method):
    """A L{ProcessPool} method after which the pool's state may have changed: its watchers hear of it."""

    @functools.wraps(method)
    def refreshing(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self._state.set(self._current_state())

    return refreshing


class PoolEvents:
    """
    What a L{ProcessPool} tells whoever uses its processes (a model), and what that one
    says back: what a process's output means (L{process_line}), when a process is ready
    (the pool's C{ready_on_spawn}, or L{ProcessPool.mark_ready}), and what becomes of its
    work when it goes (L{process_gone}). Each does nothing here; a user overrides those
    it needs. C{process.pool} is the pool.
    """

    def process_started(self, process) -> None:
        """A process was spawned."""

    def process_ready(self, process) -> None:
        """A process became ready."""

    def process_line(self, process, line: bytes) -> None:
        """A line on a process's stdout; by default, it goes to the model's log."""
        process.pool.model_log.append("info", "stdout", slot=process.slot, pid=process.pid, line=_text(line))

    def process_read(self, process) -> None:
        """Every line of one read of a process's stdout has been given to L{process_line}."""

    def process_gone(self, process, why: str) -> None:
        """A process is stopping or has exited; whatever it was doing will not be done."""

    def startup_failed(self, why: str) -> None:
        """A process did not become ready in time."""

    def pool_failed(self, why: str) -> None:
        """The pool entered a crash loop: it is failed until a try of it lasts."""

    def pool_back(self) -> None:
        """A failed pool's try lasted: it takes requests again."""

    def pool_stopping(self) -> None:
        """The pool is stopping."""


class ProcessPool(Service):
    """
    Supervises C{size} processes of one model, and tells C{events} (a L{PoolEvents}) what
    happens to them.

    @param ready_on_spawn: a process is ready once spawned (else once L{mark_ready}).
    @param stdout_is_protocol: stdout is how the processes answer: one that closes it
        and lives on is broken.
    @param state: the L{aibackend.modelstate.ModelState} the pool sets (its model's).

    A crash loop (C{max_restarts} deaths in a row, each within C{min_uptime} of its
    start) makes the pool C{failed}, which is not the end: it tries again after a wait
    that doubles with each failed try, from C{max_backoff} up to
    C{max_crash_loop_backoff} (as Kubernetes' CrashLoopBackOff does). A try is on trial:
    the pool stays C{failed} (it takes no requests) until the try's processes have run
    for C{min_uptime}; then it is back, its count started again. L{restart} tries at once,
    with no trial.
    """

    log = Logger()

    def __init__(self, *, model_id, settings, size, reactor, model_log, environ, launcher=None, state=None,
                 events: PoolEvents | None = None, ready_on_spawn: bool = True, stdout_is_protocol: bool = False):
        self.model_id = model_id
        self.events = events if events is not None else PoolEvents()
        self.ready_on_spawn = ready_on_spawn
        self.stdout_is_protocol = stdout_is_protocol
        # What a process's output is given to, looked up once: each line of every answer comes here.
        self.on_line = self.events.process_line
        self.on_read = self.events.process_read
        self.settings = settings
        self.size = size
        self.clock = reactor
        self.model_log = model_log
        self.environ = environ
        self.launcher = launcher if launcher is not None else Launcher(reactor)
        self.slots: list = [None] * size
        self.restart_timers: dict = {}
        self.retry_timer = None  # the next try of a failed pool
        self.trial_timer = None  # a try on trial: back once it has run min_uptime
        self.quick_deaths = 0
        self.crash_loops = 0  # failed tries in a row
        self.restarts = 0
        self.failed_reason: str | None = None
        self.last_error: str | None = None
        self.stopping = False
        # What the pool's state is to its model's watchers (the model's, when it has one:
        # an HTTP model's server): set after every change, never computed when read.
        self._state = state if state is not None else ModelState(self, STOPPED, why=lambda: self.last_failure)

    # --- state ------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    def _current_state(self) -> str:
        if self.failed_reason is not None:
            return FAILED
        if self.stopping or not self.running:
            return STOPPED if not any(self.slots) else STOPPING
        states = [process.state for process in self.slots if process is not None]
        if "ready" in states:
            return READY
        if self.restart_timers and "starting" not in states:
            return RESTARTING
        return STARTING

    @property
    def last_failure(self) -> str | None:
        return self.failed_reason or self.last_error

    @property
    def live_processes(self) -> int:
        return sum(1 for process in self.slots if process is not None)

    def ready_processes(self) -> list:
        return [process for process in self.slots if process is not None and process.state == "ready"]

    def describe_processes(self) -> list:
        now = self.clock.seconds()
        return [
            {
                "slot": index,
                "pid": process.pid,
                "state": process.state,
                "in_flight": len(process.inflight),
                "uptime_s": round(now - process.started_at, 3),
            }
            for index, process in enumerate(self.slots)
            if process is not None
        ]

    def next_restart_in(self) -> float | None:
        """Seconds until the next process is started (a restart, or a failed pool's next try), if one is due."""
        return self._first_of([*self.restart_timers.values(), self.retry_timer])

    def trial_ends_in(self) -> float | None:
        """Seconds until a failed pool's try, if it keeps running, is back."""
        return self._first_of([self.trial_timer])

    def _first_of(self, timers) -> float | None:
        times = [timer.getTime() for timer in timers if timer is not None]
        return round(max(0.0, min(times) - self.clock.seconds()), 3) if times else None

    # --- lifecycle ----------------------------------------------------------

    @_refreshes
    def startService(self):
        super().startService()
        self.stopping = False
        for slot in range(self.size):
            self._spawn(slot)

    @_refreshes
    def stopService(self):
        super().stopService()
        self.stopping = True
        self._cancel_restarts()
        self.events.pool_stopping()
        waiting = []
        for process in self.slots:
            if process is not None:
                waiting.append(process.exited)
                self.terminate(process, "the model is stopping")
        if not waiting:
            return succeed(None)
        return DeferredList(waiting)

    @_refreshes
    def restart(self) -> None:
        """Bring a failed pool back at once: forget the crash loop and spawn again."""
        self.failed_reason = None
        self.quick_deaths = 0
        self.crash_loops = 0
        self._cancel_restarts(keep_restarts=True)
        self.model_log.append("info", "restart requested")
        if self.running:
            for slot in range(self.size):
                if self.slots[slot] is None and slot not in self.restart_timers:
                    self._spawn(slot)

    def _cancel_restarts(self, keep_restarts: bool = False) -> None:
        if not keep_restarts:
            for timer in self.restart_timers.values():
                timer.cancel()
            self.restart_timers.clear()
        for name in ("retry_timer", "trial_timer"):
            timer = getattr(self, name)
            if timer is not None:
                if timer.active():
                    timer.cancel()
                setattr(self, name, None)

    @_refreshes
    def _spawn(self, slot: int) -> None:
        self.restart_timers.pop(slot, None)
        if self.stopping or not self.running or (self.failed_reason is not None and self.trial_timer is None):
            return
        if self.slots[slot] is not None:
            return  # still held by a process on its way out; its exit spawns the next
        process = ModelProcess(self, slot, self.settings.max_line_bytes)
        self.slots[slot] = process
        process.startup_timer = self.clock.callLater(
            self.settings.startup_timeout, self._startup_timed_out, process
        )
        try:
            self.launcher.spawn(process, self.settings, self.settings.child_env(self.environ))
        except Exception as e:  # a bad cwd, an unexecutable program, out of processes
            self._cancel_timers(process)
            self.slots[slot] = None
            process.state = "exited"
            process.exited.callback(None)
            self.last_error = f"cannot start the process: {e}"
            self.model_log.append("error", "spawn failed", slot=slot, error=str(e))
            self._crashed(slot, uptime=0.0)

    def on_spawned(self, process) -> None:
        self.model_log.append(
            "info", "process started", slot=process.slot, pid=process.pid, command=" ".join(self.settings.command)
        )
        self.events.process_started(process)
        if self.ready_on_spawn:
            self.mark_ready(process)

    @_refreshes
    def mark_ready(self, process) -> None:
        if process.state != "starting":
            return
        self._cancel_timer(process, "startup_timer")
        process.state = "ready"
        self.model_log.append(
            "info",
            "process ready",
            slot=process.slot,
            pid=process.pid,
            startup_ms=round((self.clock.seconds() - process.started_at) * 1000, 3),
        )
        self.events.process_ready(process)

    def _startup_timed_out(self, process) -> None:
        process.startup_timer = None
        why = f"did not become ready within startup_timeout ({self.settings.startup_timeout:g} s)"
        self.last_error = why
        self.model_log.append("error", "startup timed out", slot=process.slot, pid=process.pid, error=why)
        self.log.warn("model {model}: a process {why}", model=self.model_id, why=why)
        # Not on purpose: a model that never gets ready is a crash loop like any other.
        self.terminate(process, why, on_purpose=False)
        self.events.startup_failed(why)

    @_refreshes
    def terminate(self, process, why: str, *, on_purpose: bool = True) -> None:
        """Ask a process to stop (close its stdin, SIGTERM its group), SIGKILL after the grace period."""
        if process.state in ("stopping", "exited"):
            return
        process.state = "stopping"
        process.stopping_on_purpose = on_purpose
        self._cancel_timer(process, "startup_timer")
        self._cancel_timer(process, "stdout_timer")
        self.events.process_gone(process, why)
        try:
            if process.transport is not None:
                process.transport.closeStdin()  # a line program ends on EOF
        except OSError:
            pass  # the pipe is already gone with the process
        self.launcher.signal(process.transport, "TERM")
        process.kill_timer = self.clock.callLater(self.settings.kill_timeout, self._kill, process)

    def _kill(self, process) -> None:
        process.kill_timer = None
        self.model_log.append(
            "warning", "process killed", slot=process.slot, pid=process.pid,
            error=f"still running {self.settings.kill_timeout:g} s after SIGTERM",
        )
        self.launcher.signal(process.transport, "KILL")

    def _cancel_timer(self, process, name: str) -> None:
        timer = getattr(process, name)
        if timer is not None:
            if timer.active():
                timer.cancel()
            setattr(process, name, None)

    def _cancel_timers(self, process) -> None:
        self._cancel_timer(process, "startup_timer")
        self._cancel_timer(process, "kill_timer")
        self._cancel_timer(process, "stdout_timer")

    def on_stdout_closed(self, process) -> None:
        """
        Its stdout closed. Usually the process is ending (its exit is noticed a moment
        later); one still there after L{STDOUT_CLOSED_GRACE} closed it and lives on.
        """
        if self.stdout_is_protocol and process.state in ("starting", "ready"):
            process.stdout_timer = self.clock.callLater(STDOUT_CLOSED_GRACE, self._stdout_closed_alive, process)

    def _stdout_closed_alive(self, process) -> None:
        process.stdout_timer = None
        why = "closed its stdout and kept running"
        self.last_error = f"a process {why}"
        self.model_log.append("error", "stdout closed", slot=process.slot, pid=process.pid, error=why)
        self.terminate(process, f"the model process {why}", on_purpose=False)

    @_refreshes
    def on_exited(self, process, reason) -> None:
        was = process.state
        process.state = "exited"
        self._cancel_timers(process)
        cleaned = self.launcher.process_exited(process.pid)
        current = self.slots[process.slot] is process
        if current:
            self.slots[process.slot] = None
        how = describe_exit(reason)
        uptime = self.clock.seconds() - process.started_at
        crashed = not (process.stopping_on_purpose or self.stopping)
        if crashed:
            self.last_error = f"a process {how} after {uptime:.1f} s"
        self.model_log.append(
            "error" if crashed else "info",
            "process exited",
            slot=process.slot,
            pid=process.pid,
            error=how,
            uptime_s=round(uptime, 3),
        )
        if was != "stopping":
            self.events.process_gone(process, f"the model process {how}")
        if cleaned is None:
            process.exited.callback(None)
        else:  # what it started is being killed: a stop waits for that too
            cleaned.addBoth(lambda _: process.exited.callback(None))
        if not current or self.stopping or not self.running:
            return
        if self.failed_reason is not None:
            if self.trial_timer is not None:
                if crashed:  # a try that did not last: failed again
                    self._crashed(process.slot, uptime)
                else:  # one stopped on purpose (the try before it, still going): its place is taken
                    self._schedule_spawn(process.slot, 0)
            return
        if crashed:
            self._crashed(process.slot, uptime)
        else:
            self._schedule_spawn(process.slot, 0)

    def _crashed(self, slot: int, uptime: float) -> None:
        if uptime < self.settings.min_uptime:
            self.quick_deaths += 1
        else:
            self.quick_deaths = 1
            self.crash_loops = 0
        if self.quick_deaths >= self.settings.max_restarts:
            self._crash_loop()
            return
        delay = min(self.settings.restart_backoff * 2 ** (self.quick_deaths - 1), self.settings.max_backoff)
        self.model_log.append("warning", "restart scheduled", slot=slot, delay_s=delay)
        self._schedule_spawn(slot, delay)

    @_refreshes
    def _crash_loop(self) -> None:
        """Too many quick deaths: the pool has failed, and tries again after a growing wait."""
        self.crash_loops += 1
        settings = self.settings
        delay = min(settings.max_backoff * 2 ** (self.crash_loops - 1), settings.max_crash_loop_backoff)
        tries = f", and so did each of the {self.crash_loops - 1} tries since" if self.crash_loops > 1 else ""
        self.failed_reason = (
            f"its processes died {settings.max_restarts} times in a row within "
            f"{settings.min_uptime:g} s of starting{tries} (last: {self.last_error})"
        )
        self.model_log.append("error", "failed", error=self.failed_reason, retry_in_s=delay)
        self.log.error("model {model} failed: {why}; trying again in {delay:g} s", model=self.model_id,
                       why=self.failed_reason, delay=delay)
        self._cancel_restarts()
        for process in list(self.slots):
            if process is not None:
                self.terminate(process, f"the model failed: {self.failed_reason}")
        self.retry_timer = self.clock.callLater(delay, self._retry)
        self.events.pool_failed(self.failed_reason)

    @_refreshes
    def _retry(self) -> None:
        """A failed pool's next try: its processes are started again, on trial for min_uptime."""
        self.retry_timer = None
        self.trial_timer = self.clock.callLater(self.settings.min_uptime, self._trial_passed)
        self.restarts += 1
        self.model_log.append("info", "trying again after a crash loop", attempt=self.crash_loops)
        for slot in range(self.size):
            self._spawn(slot)

    @_refreshes
    def _trial_passed(self) -> None:
        """The try ran for min_uptime: the pool is back, and its count starts again."""
        self.trial_timer = None
        self.failed_reason = None
        self.quick_deaths = 0
        self.crash_loops = 0
        self.model_log.append("info", "back after a crash loop")
        self.log.info("model {model} is back after a crash loop", model=self.model_id)
        self.events.pool_back()

    @_refreshes
    def _schedule_spawn(self, slot: int, delay: float) -> None:
        if slot in self.restart_timers:
            return
        self.restarts += 1
        self.restart_timers[slot] = self.clock.callLater(delay, self._spawn, slot)

    def retry_after(self) -> int:
        """Seconds a client should wait before trying a model that is not ready."""
        wait = self._first_of([*self.restart_timers.values(), self.retry_timer, self.trial_timer])
        return max(1, math.ceil(wait)) if wait is not None else 1

    # --- output -------------------------------------------------------------

    def on_stderr(self, process, line: bytes) -> None:
        self.model_log.append("warning", "stderr", slot=process.slot, pid=process.pid, line=_text(line))

    def on_oversize(self, process) -> None:
        limit = self.settings.max_line_bytes
        why = f"the model printed a line longer than max_line_bytes ({limit} bytes)"
        self.last_error = why
        self.model_log.append("error", "line too long", slot=process.slot, pid=process.pid, error=why)
        self.terminate(process, why, on_purpose=False)


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")
