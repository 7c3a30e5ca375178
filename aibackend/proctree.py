"""
The processes a model process starts, found and stopped however they try to escape.

A model process leads a process group (and session) of its own, so one C{killpg} reaches
what it starts. A descendant that calls C{setsid()} or C{setpgid()} leaves that group;
when its parent dies it is reparented, and without help it would outlive the daemon.
Three things catch it (on Linux; elsewhere each is a no-op):

  - L{become_subreaper}: the daemon is a child subreaper (C{PR_SET_CHILD_SUBREAPER}), so
    an orphaned descendant of a model process is reparented to the daemon, not to init:
    it stays findable, as one of the daemon's own children.
  - L{descendants}: every process below a model process, read from C{/proc} (each
    thread's C{children} file, or a scan of C{/proc} where the kernel has none), so the
    supervisor signals all of them, not only the group.
  - L{Orphans}: the daemon's children that Twisted did not start. Twisted waits only for
    the processes it spawned (each registered with its reaper,
    L{twisted.internet.process.registerReapProcessHandler}); an adopted orphan is
    registered the same way, so Twisted's own C{SIGCHLD} handling reaps it when it ends
    and no zombie stays behind. Only those pids are waited for, never with C{-1}: the exit
    status of a process Twisted is waiting for is never taken from it.

A pid alone is not an identity (pids are reused): a process is known by its pid and its
start time (C{/proc/<pid>/stat}), and is signalled only while both still match. An
adopted orphan cannot be mistaken: until the daemon reaps it, its pid stays its own.
"""

from __future__ import annotations

import os
import signal as signals
import sys
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet import process as twisted_process
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

log = Logger()

PR_SET_CHILD_SUBREAPER = 36
MAX_PROCESSES = 100_000  # a bound on any walk of /proc


def become_subreaper() -> bool:
    """
    Make this process a child subreaper (Linux): orphaned descendants are reparented
    to it instead of init. Once per process is enough; C{fork} does not inherit it.

    @return: whether it is one now.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # here: Linux only, and only when asked to be a subreaper

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Stat:
    """What C{/proc/<pid>/stat} says of a process."""

    pid: int
    state: str  # R, S, D, Z, ...
    ppid: int
    pgrp: int
    session: int
    start: int  # clock ticks after boot: with the pid, the process's identity

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X")


def parse_stat(pid: int, text: str) -> Stat:
    # The command name is in parentheses and may hold anything, ")" included.
    fields = text.rpartition(")")[2].split()
    return Stat(pid=pid, state=fields[0], ppid=int(fields[1]), pgrp=int(fields[2]),
                session=int(fields[3]), start=int(fields[19]))


def stat(pid: int, task: int | None = None) -> Stat | None:
    """The process (or one of its threads) as /proc has it, or None if there is none."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        with open(path) as f:
            text = f.read()
        return parse_stat(pid, text)
    except (OSError, ValueError, IndexError):
        return None


def process_table() -> dict[int, Stat]:
    """Every process /proc shows (empty where there is no /proc)."""
    table: dict[int, Stat] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            found = stat(int(name))
            if found is not None:
                table[found.pid] = found
            if len(table) >= MAX_PROCESSES:
                break
    return table


def _children_files(pid: int) -> list[int] | None:
    """The children of C{pid} from /proc/<pid>/task/*/children; None if the kernel has no such file."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread ended meanwhile
            return None  # CONFIG_PROC_CHILDREN is off
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[Stat]:
    """
    Every process below C{pid} (children, their children, ...), as they are now.
    """
    if not os.path.isdir(f"/proc/{pid}"):
        return []
    direct = _children_files(pid)
    if direct is not None:
        found: list[Stat] = []
        seen = {pid}
        todo = direct
        while todo and len(found) < MAX_PROCESSES:
            child = todo.pop()
            if child in seen:
                continue
            seen.add(child)
            child_stat = stat(child)
            if child_stat is None:
                continue
            found.append(child_stat)
            todo.extend(_children_files(child) or [])
        return found
    by_parent: dict[int, list[Stat]] = {}
    for entry in process_table().values():
        by_parent.setdefault(entry.ppid, []).append(entry)
    found = []
    seen = {pid}
    todo = [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            if child.pid not in seen:
                seen.add(child.pid)
                found.append(child)
                todo.append(child.pid)
    return found


def running(pid: int) -> bool:
    """
    Whether the main thread of process C{pid} is running or waiting for a CPU (state
    R): between two writes, say, rather than asleep in a read. False if unknown.
    """
    # Read with os calls, not open(): this is asked after every raw answer.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return False
    try:
        text = os.read(fd, 512)
    except OSError:
        return False
    finally:
        os.close(fd)
    end = text.rfind(b")")  # the command's name, in parentheses, may hold anything
    return end >= 0 and text[end + 2:end + 3] == b"R"


def signal(process: Stat, number: int) -> bool:
    """Send a signal to C{process} if it is still the same process (pid and start time)."""
    now = stat(process.pid)
    if now is None or now.start != process.start or now.dead:
        return False
    try:
        os.kill(process.pid, number)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Orphan:
    """
    An orphan the daemon adopted, registered with Twisted's reaper: Twisted calls
    L{reapProcess} on each C{SIGCHLD} (as it does for its own processes).
    """

    def __init__(self, orphans: "Orphans", found: Stat):
        self.orphans = orphans
        self.stat = found
        self.pid = found.pid
        self.ended: Deferred = Deferred()
        self.registered = False

    def reapProcess(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0  # not a child any more: nothing left to wait for
        if pid:
            if self.registered:
                self.registered = False
                twisted_process.unregisterReapProcessHandler(self.pid, self)
            self.processEnded(status)

    def processEnded(self, status) -> None:
        """Reaped (by L{reapProcess}, or by Twisted on registering it)."""
        self.orphans.adopted.pop(self.pid, None)
        if not self.ended.called:
            self.ended.callback(status)


class Orphans:
    """
    The orphans this process adopted as a child subreaper: its own children that Twisted
    did not spawn. One per process (L{orphans_of}). Until it is a subreaper (L{subreaper},
    set by L{SubreaperService}) it adopts nothing: a child it did not spawn through
    Twisted is then someone else's to wait for (a test's C{subprocess.Popen}, say).
    """

    def __init__(self, reactor, pid: int | None = None):
        self.reactor = reactor
        self.pid = os.getpid() if pid is None else pid
        self.adopted: dict[int, Orphan] = {}
        self.subreaper = False

    def sweep(self) -> list[Orphan]:
        """
        Adopt every child of this process that no one waits for (Twisted reaps what it
        spawned): each is reaped once it ends. A dead one is reaped at once.

        @return: every orphan adopted and not yet reaped.
        """
        if not self.subreaper:
            return []
        known = twisted_process.reapProcessHandlers
        for entry in process_table().values():
            if entry.ppid != self.pid or entry.pid in known or entry.pid in self.adopted:
                continue
            orphan = Orphan(self, entry)
            self.adopted[entry.pid] = orphan
            orphan.registered = True
            # Twisted waits for it once (WNOHANG): a zombie is reaped here and now.
            twisted_process.registerReapProcessHandler(entry.pid, orphan)
            if orphan.ended.called:
                orphan.registered = False
        return list(self.adopted.values())

    def stop(self, orphans, grace: float) -> Deferred:
        """
        SIGTERM C{orphans}, SIGKILL those still there C{grace} seconds later.

        @return: a Deferred that fires once every one is reaped (or a second after the
            SIGKILL, which is logged: a process in uninterruptible sleep).
        """
        orphans = [orphan for orphan in orphans if not orphan.ended.called]
        if not orphans:
            return succeed(None)
        for orphan in orphans:
            self._send(orphan, signals.SIGTERM)
        return self._wait(orphans, grace, then_kill=True)

    def kill(self, orphans) -> Deferred:
        """SIGKILL C{orphans}; fires once every one is reaped (or after a second)."""
        orphans = [orphan for orphan in orphans if not orphan.ended.called]
        if not orphans:
            return succeed(None)
        for orphan in orphans:
            self._send(orphan, signals.SIGKILL)
        return self._wait(orphans, 1.0, then_kill=False)

    def _send(self, orphan: Orphan, number: int) -> None:
        try:
            os.kill(orphan.pid, number)  # an unreaped child: its pid is still its own
        except (ProcessLookupError, PermissionError):
            pass

    def _wait(self, orphans, delay: float, *, then_kill: bool) -> Deferred:
        done = DeferredList([orphan.ended for orphan in orphans], consumeErrors=True)
        result: Deferred = Deferred()

        def late():
            left = [orphan for orphan in orphans if not orphan.ended.called]
            if then_kill:
                log.info("{count} orphaned model descendants still running {grace} s after SIGTERM: SIGKILL",
                         count=len(left), grace=delay)
                self.kill(left).chainDeferred(result)
            else:
                log.warn("orphaned model descendants not reaped a second after SIGKILL: {pids}",
                         pids=[orphan.pid for orphan in left])
                result.callback(None)

        timer = self.reactor.callLater(delay, late)

        def ended(_):
            if timer.active():
                timer.cancel()
                result.callback(None)

        done.addCallback(ended)
        return result


_orphans: dict = {}  # reactor -> its Orphans (a process has one reactor)


def orphans_of(reactor) -> Orphans:
    """This process's L{Orphans} (one per reactor, made on first use)."""
    found = _orphans.get(reactor)
    if found is None or found.pid != os.getpid():
        found = _orphans[reactor] = Orphans(reactor)
    return found


class SubreaperService(Service):
    """
    Makes this process a child subreaper when it starts (before the model processes);
    when it stops, ends the orphans it adopted that still run (SIGTERM, then SIGKILL
    after C{grace} seconds) and waits until they are reaped. The descendants of the model
    processes still running are the supervisors' to stop.
    """

    def __init__(self, reactor, grace: float = 5.0):
        self.reactor = reactor
        self.grace = grace

    def startService(self):
        super().startService()
        orphans_of(self.reactor).subreaper = become_subreaper()

    def stopService(self):
        super().stopService()
        orphans = orphans_of(self.reactor)
        return orphans.stop(orphans.sweep(), self.grace)
