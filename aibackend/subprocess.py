"""
Subprocess models: programs the daemon starts, supervises and talks to in JSON lines.

Three layers, each testable on its own:

  - L{LineBuffer} frames a byte stream into lines, never holding more than its limit.
  - L{ModelProcess} is the ProcessProtocol of one process: it frames stdout and stderr and
    tells its pool what happened. It decides nothing.
  - L{ProcessPool} is the supervisor (like Twisted's C{procmon}): it spawns N processes,
    each in a process group of its own, marks them ready, restarts them with growing
    backoff after a crash, is C{failed} after a crash loop and tries again with a capped
    backoff, and stops them (and every process below them, L{aibackend.proctree}) with
    SIGTERM, then SIGKILL after a grace period. Every timer it starts is kept where it
    can be cancelled.

L{SubprocessModel} is a pool that dispatches requests (least in-flight first, a bounded
queue) in the C{raw} or C{jsonl} protocol of C{DESIGN.md}, and sees to it that no answer
reaches a request other than its own.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import sys
from collections import deque

from twisted.application.service import Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

from aibackend import proctree
from aibackend.directwrite import event_done
from aibackend.errors import BadGateway, GatewayTimeout, ModelUnavailable
from aibackend.interfaces import (
    FAILED, READY, RESTARTING, STARTING, STOPPED, STOPPING, IModel, IRestartable, ModelAnswer,
)
from aibackend.jsonread import NotClientJSON, model_json
from aibackend.logs import ModelLog, normalize_level
from aibackend.modelstate import ModelState, Waiters

PGROUP_WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pgroup.py")
STDERR_LINE_BYTES = 4096
SNIPPET = 200
# How long a process whose stdout closed may take to exit before it counts as broken.
STDOUT_CLOSED_GRACE = 0.5
# raw: how long to wait, at most, for a process still running after its answer: first
# QUIET_TURNS turns of the reactor (a process on its way back to reading its stdin is
# usually there by then), then QUIET_STEP, twice as long, ... QUIET_TRIES times (127 ms).
QUIET_TURNS = 4
QUIET_STEP = 0.001
QUIET_TRIES = 7

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
    @ivar inflight: wire id -> pending request (used by L{SubprocessModel}).
    @ivar stdout_closed: its stdout has closed (it ends, or it closed it and lives on).
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
        # raw (L{SubprocessModel}): the answer read but not yet given, a request was
        # ever written, and the wait before the next one may be written.
        self.answer = None
        self.sent_any = False
        self.settling = None
        self.exited = Deferred()
        self._stdout = LineBuffer(max_line_bytes)
        self._stderr = LineBuffer(STDERR_LINE_BYTES, truncate=True)

    def connectionMade(self):
        self.pid = self.transport.pid
        self.pool._process_spawned(self)

    def write(self, data: bytes) -> None:
        if self.state in ("starting", "ready") and self.transport is not None:
            self.transport.write(data)

    def partial_line(self) -> bool:
        """Whether stdout ended (so far) in the middle of a line."""
        return bool(self._stdout.pending())

    def outReceived(self, data: bytes):
        self.last_output = self.pool.clock.seconds()
        for line in self._stdout.feed(data):
            if self.state == "exited":
                break
            if line is OVERSIZE:
                self.pool._process_oversize(self)
            elif line.strip():
                self.pool._process_line(self, line)
        if self.state != "exited":
            self.pool._process_read(self)  # the whole of this read has been looked at
        event_done(self.pool.clock)  # the answers written to clients go now (aibackend.directwrite)

    def outConnectionLost(self):
        self.stdout_closed = True
        self.pool._process_stdout_closed(self)

    def errReceived(self, data: bytes):
        for line in self._stderr.feed(data):
            if line.strip():
                self.pool._process_stderr(self, line)

    def errConnectionLost(self):
        # A crash message without a line end ("fatal: ..."; exit(1)) is still worth keeping.
        for line in self._stderr.flush():
            self.pool._process_stderr(self, line)

    def processExited(self, reason):
        # processExited, not processEnded: a grandchild that keeps our pipes open must
        # not delay noticing the crash.
        self.pool._process_exited(self, reason)


def _refreshes(method):
    """A L{ProcessPool} method after which the pool's state may have changed: its watchers hear of it."""

    @functools.wraps(method)
    def refreshing(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            self._state.set(self._current_state())

    return refreshing


class ProcessPool(Service):
    """
    Supervises C{size} processes of one model.

    Subclasses say what a process's output means (L{process_line}), when a process is
    ready (C{ready_on_spawn}, or by calling L{mark_ready}), and what becomes of its work
    when it goes (L{process_gone}).

    A crash loop (C{max_restarts} deaths in a row, each within C{min_uptime} of its
    start) makes the pool C{failed}, which is not the end: it tries again after a wait
    that doubles with each failed try, from C{max_backoff} up to
    C{max_crash_loop_backoff} (as Kubernetes' CrashLoopBackOff does). A try is on trial:
    the pool stays C{failed} (it takes no requests) until the try's processes have run
    for C{min_uptime}; then it is back, its count started again. L{restart} tries at once,
    with no trial.
    """

    log = Logger()
    ready_on_spawn = True
    # Whether stdout is how the processes answer: one that closes it and lives on is broken.
    stdout_is_protocol = False

    def __init__(self, *, model_id, settings, size, reactor, model_log, environ, launcher=None, state=None):
        self.model_id = model_id
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
        self.pool_stopping()
        waiting = []
        for process in self.slots:
            if process is not None:
                waiting.append(process.exited)
                self._terminate(process, "the model is stopping")
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
        process = ModelProcess(self, slot, getattr(self.settings, "max_line_bytes", 64 * 1024 * 1024))
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

    def _process_spawned(self, process) -> None:
        self.model_log.append(
            "info", "process started", slot=process.slot, pid=process.pid, command=" ".join(self.settings.command)
        )
        self.process_started(process)
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
        self.process_ready(process)

    def _startup_timed_out(self, process) -> None:
        process.startup_timer = None
        why = f"did not become ready within startup_timeout ({self.settings.startup_timeout:g} s)"
        self.last_error = why
        self.model_log.append("error", "startup timed out", slot=process.slot, pid=process.pid, error=why)
        self.log.warn("model {model}: a process {why}", model=self.model_id, why=why)
        # Not on purpose: a model that never gets ready is a crash loop like any other.
        self._terminate(process, why, on_purpose=False)
        self.startup_failed(why)

    @_refreshes
    def _terminate(self, process, why: str, *, on_purpose: bool = True) -> None:
        """Ask a process to stop (close its stdin, SIGTERM its group), SIGKILL after the grace period."""
        if process.state in ("stopping", "exited"):
            return
        process.state = "stopping"
        process.stopping_on_purpose = on_purpose
        self._cancel_timer(process, "startup_timer")
        self._cancel_timer(process, "stdout_timer")
        self.process_gone(process, why)
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

    def _process_stdout_closed(self, process) -> None:
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
        self._terminate(process, f"the model process {why}", on_purpose=False)

    @_refreshes
    def _process_exited(self, process, reason) -> None:
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
            self.process_gone(process, f"the model process {how}")
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
                self._terminate(process, f"the model failed: {self.failed_reason}")
        self.retry_timer = self.clock.callLater(delay, self._retry)
        self.pool_failed(self.failed_reason)

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
        self.pool_back()

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

    def _process_stderr(self, process, line: bytes) -> None:
        self.model_log.append("warning", "stderr", slot=process.slot, pid=process.pid, line=_text(line))

    def _process_line(self, process, line: bytes) -> None:
        self.process_line(process, line)

    def _process_read(self, process) -> None:
        self.process_read(process)

    def _process_oversize(self, process) -> None:
        limit = self.settings.max_line_bytes
        why = f"the model printed a line longer than max_line_bytes ({limit} bytes)"
        self.last_error = why
        self.model_log.append("error", "line too long", slot=process.slot, pid=process.pid, error=why)
        self._terminate(process, why, on_purpose=False)

    # --- hooks ----------------------------------------------------------------

    def process_started(self, process) -> None:
        """A process was spawned."""

    def process_ready(self, process) -> None:
        """A process became ready."""

    def process_line(self, process, line: bytes) -> None:
        """A line on a process's stdout; by default, it goes to the model's log."""
        self.model_log.append("info", "stdout", slot=process.slot, pid=process.pid, line=_text(line))

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


def _output_text(message: dict, line: bytes) -> bytes:
    """
    The JSON text of an answer's C{output}, as the model wrote it when its line is
    C{{"id": ..., "output": ...}} in the usual spelling (aibackend.worker's), so that it
    is passed on unchanged instead of decoded and encoded again.
    """
    line = line.rstrip()
    if len(message) == 2 and line.endswith(b"}"):
        prefix = b'{"id": ' + json.dumps(message["id"]).encode() + b', "output": '
        if line.startswith(prefix):
            return line[len(prefix):-1].strip()
    # Read again with json: orjson, which read the line first, makes integers past 64 bits floats.
    return json.dumps(json.loads(line.decode("utf-8"))["output"], allow_nan=False).encode()


def one_line(body: bytes) -> bytes:
    """JSON text on one line: a line break in JSON text is only ever white space."""
    if b"\n" in body or b"\r" in body:
        return body.replace(b"\r", b" ").replace(b"\n", b" ")
    return body


class Pending:
    """A request on its way through a subprocess model."""

    __slots__ = ("body", "context", "deferred", "timer", "process", "wire_id", "sent_at", "abandoned")

    def __init__(self, body, context):
        self.body = body
        self.context = context
        self.deferred = None
        self.timer = None
        self.process = None
        self.wire_id = None
        self.sent_at = None
        self.abandoned = False


@implementer(IModel, IRestartable)
class SubprocessModel(ProcessPool):
    """
    A model served by programs the daemon runs, in the C{raw} or C{jsonl} line protocol.

    No answer reaches a request other than its own:

      - C{jsonl} answers carry ids. Each request gets a wire id no other request of the
        model ever gets (its request id, C{#}, a counter of the model's), and an answer
        goes only to the request in flight under its exact id in the process that
        printed it. An answer to any other id (an unknown, a timed-out or cancelled
        request, a second answer) is logged and dropped.
      - C{raw} answers carry nothing: a raw answer is exactly one JSON line, printed
        while its request is the one in flight. Any other JSON line (a second one for
        the request, one while none is in flight) and any binary (non-text) output is a
        protocol error: the request in flight fails with 502 and the process is
        replaced. An answer is given only once the rest of the read it came in has
        been looked at, and a process is written its next request only once its
        stdout has been polled again after the answer (on Linux, also once its main
        thread is asleep, as in its read of stdin), so that a line printed just after
        the answer is caught. Text lines that are not JSON are the model's chatter,
        logged, wherever they come.

    @param spec: an L{aibackend.config.SubprocessModelSpec}.
    """

    type_name = "subprocess"
    stdout_is_protocol = True

    def __init__(self, spec, *, reactor, environ=None, launcher=None):
        environ = os.environ if environ is None else environ
        model_log = ModelLog(reactor, spec.log_entries)
        super().__init__(
            model_id=spec.id,
            settings=spec.process,
            size=spec.workers,
            reactor=reactor,
            model_log=model_log,
            environ=environ,
            launcher=launcher,
        )
        self.spec = spec
        self.jsonl = spec.protocol == "jsonl"
        self.ready_on_spawn = not self.jsonl
        self.capacity = spec.max_inflight if self.jsonl else 1
        self.queue: deque[Pending] = deque()
        self.requests = 0
        self.failures = 0
        self._wire_counter = 0
        self._idle = Waiters()
        self.request_timeout = float(spec.timeout)
        self.startup_timeout = float(spec.process.startup_timeout)

    @classmethod
    def from_spec(cls, spec, deps):
        return cls(spec, reactor=deps.reactor, environ=deps.environ)

    @property
    def in_flight(self) -> int:
        return sum(len(process.inflight) for process in self.slots if process is not None)

    @property
    def queued(self) -> int:
        return len(self.queue)

    def whenReady(self) -> Deferred:
        return self._state.when_ready()

    def watch(self, callback):
        return self._state.watch(callback)

    def whenIdle(self) -> Deferred:
        if not self.queue and not self.in_flight:
            return succeed(None)
        return self._idle.wait()

    def _maybe_idle(self) -> None:
        if self._idle and not self.queue and not self.in_flight:
            self._idle.fire()

    def describe(self) -> dict:
        return {
            "id": self.model_id,
            "type": self.type_name,
            "state": self.state,
            "protocol": self.spec.protocol,
            "in_flight": self.in_flight,
            "queued": len(self.queue),
            "requests": self.requests,
            "failures": self.failures,
            "restarts": self.restarts,
            "next_restart_in": self.next_restart_in(),
            "trial_ends_in": self.trial_ends_in(),
            "last_error": self.last_failure,
            "processes": self.describe_processes(),
        }

    # --- sending ------------------------------------------------------------

    def send(self, body: bytes, context) -> Deferred:
        self.requests += 1
        if self.failed_reason is not None:
            self.failures += 1
            wait = self.retry_after()
            if self.trial_timer is None:
                when = f"it is tried again in {wait} s"
            else:
                when = f"it is being tried again, and takes requests if it runs for another {wait} s"
            raise ModelUnavailable(
                f"model {self.model_id!r} has failed: {self.failed_reason}; {when} (an admin can restart it now)",
                model=self.model_id,
                retry_after=wait,
            )
        if self.stopping or not self.running:
            self.failures += 1
            raise ModelUnavailable(f"model {self.model_id!r} is not running", model=self.model_id)
        pending = Pending(body, context)
        pending.deferred = Deferred(lambda d: self._cancelled(pending))
        process = self._least_busy()
        if process is None and len(self.queue) >= self.spec.max_queue:
            self.failures += 1
            raise ModelUnavailable(
                f"model {self.model_id!r} is busy: {len(self.queue)} requests are waiting (max_queue)",
                model=self.model_id,
                retry_after=self.retry_after(),
            )
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
            and process.answer is None
            and process.settling is None
        )

    def _least_busy(self):
        best = None
        for process in self.slots:
            if process is not None and self._takes_requests(process):
                if best is None or len(process.inflight) < len(best.inflight):
                    best = process
        return best

    def _dispatch(self) -> None:
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
        process.inflight[wire_id] = pending
        process.sent_any = True
        if self.jsonl:
            process.write(
                b'{"id": ' + json.dumps(wire_id).encode() + b', "op": "predict", "input": '
                + one_line(pending.body) + b"}\n"
            )
        else:
            process.write(one_line(pending.body) + b"\n")

    def _settle(self, pending: Pending, result=None, error=None) -> None:
        """Answer a request once: stop its timer, fire its Deferred (unless abandoned)."""
        if pending.timer is not None:
            if pending.timer.active():
                pending.timer.cancel()
            pending.timer = None
        if not (pending.abandoned or pending.deferred.called):
            if error is not None:
                self.failures += 1
                pending.deferred.errback(error)
            else:
                if result.status >= 400:
                    self.failures += 1
                pending.deferred.callback(result)
        if self._idle:
            self._maybe_idle()

    def _cancelled(self, pending: Pending) -> None:
        """The client went away: forget the request, and free its place if we can."""
        pending.abandoned = True
        if pending in self.queue:
            self.queue.remove(pending)
            self._settle(pending)
            return
        process = pending.process
        if process is None:
            self._settle(pending)
            return
        if self.jsonl:
            process.inflight.pop(pending.wire_id, None)
            self._settle(pending)
            process.write(b'{"id": ' + json.dumps(pending.wire_id).encode() + b', "op": "cancel"}\n')
            self._dispatch()
        # raw: the process is still working on it and its answer cannot be told from the
        # next one's, so the place stays taken until the answer comes (and is dropped) or
        # the timeout kills the process.

    def _timed_out(self, pending: Pending) -> None:
        pending.timer = None
        timeout = GatewayTimeout(
            f"model {self.model_id!r} did not answer within {self.spec.timeout:g} s", model=self.model_id
        )
        if pending in self.queue:
            self.queue.remove(pending)
            self._settle(pending, error=timeout)
            return
        process = pending.process
        process.inflight.pop(pending.wire_id, None)
        self._settle(pending, error=timeout)
        if not self.jsonl:
            self.model_log.append(
                "warning", "request timed out", slot=process.slot, pid=process.pid, request_id=pending.context.request_id
            )
            self._terminate(process, "a request timed out; a raw process cannot be asked to drop it")
        elif process.last_output <= pending.sent_at:
            self._terminate(process, "the process is hung: it printed nothing since the timed-out request")
        else:
            process.write(b'{"id": ' + json.dumps(pending.wire_id).encode() + b', "op": "cancel"}\n')
            self._dispatch()

    # --- pool hooks -----------------------------------------------------------

    def process_ready(self, process) -> None:
        self._dispatch()

    def process_gone(self, process, why: str) -> None:
        process.answer = None
        if process.settling is not None:
            if process.settling.active():
                process.settling.cancel()
            process.settling = None
        inflight = list(process.inflight.values())
        process.inflight.clear()
        for pending in inflight:
            self._settle(
                pending,
                error=BadGateway(f"model {self.model_id!r}: {why} while handling the request", model=self.model_id),
            )
        if self.queue and not self.ready_processes() and self.stopping:
            self._fail_queue(ModelUnavailable(f"model {self.model_id!r} is stopping", model=self.model_id))
        else:
            self._dispatch()

    def startup_failed(self, why: str) -> None:
        if not self.ready_processes():
            self._fail_queue(
                ModelUnavailable(
                    f"model {self.model_id!r} is not ready: a process {why}; it is being restarted",
                    model=self.model_id,
                    retry_after=self.retry_after(),
                )
            )

    def pool_failed(self, why: str) -> None:
        wait = self.retry_after()
        self._fail_queue(
            ModelUnavailable(f"model {self.model_id!r} has failed: {why}; it is tried again in {wait} s",
                             model=self.model_id, retry_after=wait)
        )

    def pool_back(self) -> None:
        self._dispatch()

    def pool_stopping(self) -> None:
        self._fail_queue(ModelUnavailable(f"model {self.model_id!r} is stopping", model=self.model_id))

    def _fail_queue(self, error) -> None:
        while self.queue:
            self._settle(self.queue.popleft(), error=error)

    # --- what the process says ------------------------------------------------

    def process_line(self, process, line: bytes) -> None:
        if not self.jsonl:
            self._raw_line(process, line)
            return
        try:
            message = model_json(line)
        except NotClientJSON as e:
            self._not_strict_json(process, line, e)
            return
        self._jsonl_message(process, message, line)

    def process_read(self, process) -> None:
        """raw: a read is over; the answer it held is given, unless a line is still being printed."""
        if process.answer is None or process.state != "ready" or process.partial_line():
            return
        pending, body, problem = process.answer
        process.answer = None
        process.inflight.pop(pending.wire_id, None)
        # The next request waits for stdout to be polled again: a line printed just
        # after this answer is then caught as the protocol error it is. (Set first: the
        # answer's callbacks may send the next request at once.)
        process.settling = self.clock.callLater(0, self._settling, process, 0)
        if problem is not None:
            self._settle(pending, error=BadGateway(f"model {self.model_id!r} {problem}", model=self.model_id))
        else:
            self._settle(pending, ModelAnswer(status=200, body=body))

    def _settling(self, process, tries: int) -> None:
        process.settling = None
        if process.state != "ready":
            return
        if tries < QUIET_TURNS + QUIET_TRIES and self.launcher.busy(process.transport):
            # Still running (between two writes?): let it, and look again.
            delay = 0 if tries < QUIET_TURNS else QUIET_STEP * 2 ** (tries - QUIET_TURNS)
            process.settling = self.clock.callLater(delay, self._settling, process, tries + 1)
            return
        # Called from a timed call: the next one comes after the reactor's next poll.
        process.settling = self.clock.callLater(0, self._settled, process)

    def _settled(self, process) -> None:
        process.settling = None
        self._dispatch()

    def _raw_line(self, process, line: bytes) -> None:
        if process.state not in ("starting", "ready"):
            return  # the output of a process on its way out: no answer can come of it
        problem = None
        try:
            model_json(line)
        except NotClientJSON as e:
            if not e.is_json:
                if is_text(line):
                    self.model_log.append("warning", "stdout", slot=process.slot, pid=process.pid, line=_text(line))
                    return
                self._protocol_error(process, "printed binary data on stdout", line)
                return
            problem = e.reason  # JSON, but not for clients
        if process.inflight and process.answer is None and process.settling is None:
            (pending,) = process.inflight.values()  # raw: one at a time
            process.answer = (pending, line.strip(), problem)
            return
        if not process.inflight and not process.sent_any:
            # Before its first request a process answers no one: a banner.
            self.model_log.append("warning", "unexpected output", slot=process.slot, pid=process.pid,
                                  line=_text(line))
            return
        if process.inflight:
            self._protocol_error(process, "printed more than one JSON line for a request", line)
        else:
            self._protocol_error(process, "printed a JSON line while no request was waiting for one", line)

    def _protocol_error(self, process, why: str, line: bytes) -> None:
        """raw: output no request may be given; what is in flight fails, and the process is replaced."""
        self.last_error = f"a process {why}"
        self.model_log.append("error", "protocol error", slot=process.slot, pid=process.pid, error=why,
                              line=_text(line[:SNIPPET]))
        self.log.warn("model {model}: a raw process {why}; it is replaced", model=self.model_id, why=why)
        self._terminate(process, f"the model process {why} (a raw answer is one JSON line per request)",
                        on_purpose=False)

    def _not_strict_json(self, process, line: bytes, problem: NotClientJSON) -> None:
        """
        jsonl: a stdout line that is not JSON is the model's chatter, logged. One that is
        JSON but for NaN, Infinity or its depth is an answer the client could not
        parse: a 502 for the request whose id it opens with.
        """
        if not problem.is_json:
            self.model_log.append("warning", "stdout", slot=process.slot, pid=process.pid, line=_text(line))
            return
        wire_id = leading_id(line)
        pending = process.inflight.pop(wire_id, None) if isinstance(wire_id, str) else None
        self.model_log.append("warning", "answer is not strict JSON", slot=process.slot, pid=process.pid,
                              line=_text(line[:SNIPPET]))
        if pending is not None:
            self._bad_answer(pending, problem.reason)

    def _jsonl_message(self, process, message, line: bytes) -> None:
        if not isinstance(message, dict):
            self.model_log.append("warning", "unexpected output", slot=process.slot, pid=process.pid, line=_text(line))
            return
        if "id" not in message:
            if message.get("ready") is True:
                self.mark_ready(process)
            elif "log" in message:
                self._model_says(process, message)
            else:
                self.model_log.append(
                    "warning", "unexpected output", slot=process.slot, pid=process.pid, line=_text(line)
                )
            return
        # Only the request in flight in this process under this exact id: an answer to
        # any other (unknown, timed out, cancelled, answered already) is dropped.
        pending = process.inflight.pop(message["id"], None) if isinstance(message["id"], str) else None
        if pending is None:
            self.model_log.append(
                "warning", "answer to an unknown request", slot=process.slot, pid=process.pid, line=_text(line)
            )
            return
        if "error" in message:
            self._settle(pending, self._model_error(pending, message["error"]))
        elif "output" in message:
            try:
                body = _output_text(message, line)
            except (ValueError, RecursionError):
                self._bad_answer(pending, "answered an output that cannot be written as strict JSON")
                return
            self._settle(pending, ModelAnswer(status=200, body=body))
        else:
            self._bad_answer(pending, f"answered without 'output' or 'error': {_text(line[:SNIPPET])!r}")
            return
        self._dispatch()

    def _bad_answer(self, pending: Pending, why: str) -> None:
        """A model's answer no client could use: 502, and the place goes to the next request."""
        self._settle(pending, error=BadGateway(f"model {self.model_id!r} {why}", model=self.model_id))
        self._dispatch()

    def _model_error(self, pending: Pending, error) -> ModelAnswer:
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
                "model": self.model_id,
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
        self.model_log.append(
            level, "model", slot=process.slot, pid=process.pid,
            message=text if isinstance(text, str) else json.dumps(text),
        )
