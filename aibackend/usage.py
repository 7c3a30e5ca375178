"""
What each key used of each model: requests, errors, tokens in and out, latency, kept per
minute off the request path (in the daemon's SQLite file, or with C{--store redis://} in
the fleet's Redis: L{aibackend.redisusage}), queried by admins (C{/get/usage}) and summed
in C{/metrics}.

L{UsageRecorder} is the relay's L{aibackend.policy.IUsageRecorder}. Its L{record
<UsageRecorder.record>}, called once per request on the reactor thread by
L{aibackend.policy.Policy.settle}, only adds to two dicts in memory (a microsecond or two):

  - the row of the request's (key, model, minute), pending until it is written: requests,
    C{client_errors} (a 4xx but 499), C{server_errors} (a 5xx), C{cancelled} (499: the
    client went away before its answer), C{tokens_in} / C{tokens_out} (the request's
    L{aibackend.policy.TokenCount}: its C{prompt} and C{completion}; 0 when it has none),
    the latency's sum and maximum;
  - the cumulative figures of its (key, model) since the process started, which
    L{UsageCollector} reads at each scrape (C{aibackend_usage_*}).

A request without a key (C{caller is None}) is the key L{ANONYMOUS} (C{-}, which no key's
name can be).

Where the rows go and are read from is an L{IUsageStore}: L{UsageDatabase} (SQLite:
C{STATE/usage.sqlite3}) or L{aibackend.redisusage.RedisUsage} (the fleet's Redis).
The pending rows are written a second after the first of them came (L{FLUSH_SECONDS}),
in one batch, by one thread of the recorder's own: in SQLite one transaction, an UPSERT
per row that adds to what is there, so the table has one row per (key, model, minute)
however many requests came; every process of C{--processes N} adds its own into the same
database (or Redis: a query sees them all; each process's metrics are its own). Rows older
than the retention (C{usage_retention_days}, L{DEFAULT_RETENTION_DAYS}) are deleted by
that thread, once an hour while it writes. One write at a time: while one is slow (the
disk, a lock held by another process, Redis gone), rows wait in memory, at most
L{MAX_PENDING_ROWS} of them (pending, being written, and those of a failed write); past it
a new row's request is not kept in the store (counted in C{aibackend_usage_dropped_total},
logged once until writes succeed again), though the metrics still count it. A write that
fails keeps its rows as they were, under the same batch number (L{IUsageStore.write}): the
next write, a second later, tries them again first, then what came meanwhile. On stop,
what is pending is written (waiting at most L{STOP_SECONDS}).

The recorder (its file or connection, its thread) exists only while usage is on
(L{UsageService}): C{usage = true}, or unset and the daemon has keys or limits (and for
L{OFF_GRACE_SECONDS} after, for the requests still in flight when it turned off).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from twisted.application import service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.defer import TimeoutError as Timeout  # addTimeout's (not the builtin)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from aibackend import errors
from aibackend.config import DEFAULT_USAGE_RETENTION_DAYS as DEFAULT_RETENTION_DAYS
from aibackend.logs import parse_since
from aibackend.policy import IUsageRecorder
from aibackend.store import private_files

FILENAME = "usage.sqlite3"
ANONYMOUS = "-"  # the key of requests without one
OTHER = "other"  # the key label of (key, model) series past MAX_SERIES in /metrics
FLUSH_SECONDS = 1.0
PRUNE_SECONDS = 3600.0
MAX_PENDING_ROWS = 50_000  # (key, model, minute) rows in memory, pending or being written
MAX_SERIES = 1000  # (key, model) series in /metrics
STOP_SECONDS = 10.0  # how long stopping waits for the last write
QUERY_SECONDS = 10.0  # how long a query waits for the store
OFF_GRACE_SECONDS = 300.0  # how long a recorder turned off records the requests still in flight
MAX_ROWS = 10_000  # rows one query answers
BUSY_TIMEOUT_MS = 5000  # how long a write waits for another process's lock
LATEST = 253402300740  # the last minute ISO 8601 says (9999-12-31T23:59:00Z): a bound on since and until

# A row, pending or cumulative: its figures by index. The first four are the outcomes.
OK, CLIENT_ERRORS, SERVER_ERRORS, CANCELLED, TOKENS_IN, TOKENS_OUT, LATENCY_SUM, LATENCY_MAX = range(8)
OUTCOMES = ("ok", "client_error", "server_error", "cancelled")
GROUPS = ("total", "minute")

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_minutes (
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    minute INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    client_errors INTEGER NOT NULL,
    server_errors INTEGER NOT NULL,
    cancelled INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    latency_sum REAL NOT NULL,
    latency_max REAL NOT NULL,
    PRIMARY KEY (key_name, model, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_minute ON usage_minutes (minute);
"""

UPSERT = """
INSERT INTO usage_minutes (key_name, model, minute, requests, client_errors, server_errors, cancelled,
                           tokens_in, tokens_out, latency_sum, latency_max)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key_name, model, minute) DO UPDATE SET
    requests = requests + excluded.requests,
    client_errors = client_errors + excluded.client_errors,
    server_errors = server_errors + excluded.server_errors,
    cancelled = cancelled + excluded.cancelled,
    tokens_in = tokens_in + excluded.tokens_in,
    tokens_out = tokens_out + excluded.tokens_out,
    latency_sum = latency_sum + excluded.latency_sum,
    latency_max = max(latency_max, excluded.latency_max)
"""

FIGURES = ("sum(requests), sum(client_errors), sum(server_errors), sum(cancelled), sum(tokens_in), "
           "sum(tokens_out), sum(latency_sum), max(latency_max)")


class UsageUnavailable(errors.ApiError):
    """The usage store did not answer a query in time (a write holds it, or the disk)."""

    status = 503
    type = "usage_unavailable"

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": "1"})


class IUsageReader(Interface):
    """Usage that admins may query (C{/get/usage})."""

    def query(selection):
        """
        The usage a L{Selection} asks for, what is not written yet included.

        @return: a Deferred of the answer (JSON text, bytes; see L{UsageDatabase.read}),
            or failing with L{UsageUnavailable}.
        """


class IUsageStore(Interface):
    """
    Where the usage rows go and are read from: L{UsageDatabase} (a daemon's own SQLite
    file) or L{aibackend.redisusage.RedisUsage} (the fleet's Redis). Every method but
    the attributes' is blocking, called by the recorder's one thread.
    """

    problems = Attribute(
        "The exceptions of a store that failed (a disk, a lock held too long, a Redis that cannot be "
        "reached): logged as a warning, a query answered 503; any other is a bug (logged with its traceback).")

    def write(rows, cutoff, batch):
        """
        Add C{rows} ((key, model, minute) -> figures, by the indexes L{OK}...L{LATENCY_MAX});
        forget the minutes before C{cutoff}, if given. C{batch}: the recorder's number for
        these rows, the same when a failed write is tried again with them (a store whose
        write can be made without its answer reaching us uses it to add them once).
        """

    def read(selection, now):
        """The answer to a L{Selection} (a dict: see L{UsageDatabase.read}), at C{now}."""

    def read_json(selection, now):
        """L{read}'s answer as JSON text (bytes)."""

    def unavailable(message):
        """The L{errors.ApiError} (503) a query answers when the store failed with one of L{problems}."""

    def close():
        """Nothing is written or read after."""


@dataclass(frozen=True)
class Selection:
    """
    What a usage query asks for: the rows of minutes that overlap [since, until] (unix
    seconds; None: from the first kept, up to now), of one key and one model (None:
    all), summed per (key, model) (C{group="total"}) or one row per minute too
    (C{"minute"}).
    """

    key: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None
    group: str = "total"

    @classmethod
    def parse(cls, *, key=None, model=None, since=None, until=None, group=None) -> "Selection":
        """
        From a query's texts (None: not given).

        @raise errors.BadRequest: a time that is neither seconds since the epoch nor ISO
            8601, an empty key or model, since after until, an unknown group.
        """
        for name, value in (("key", key), ("model", model)):
            if value is not None and not value:
                raise errors.BadRequest(f"{name} is empty: give a {name} or leave it out")
        times = {}
        for name, text in (("since", since), ("until", until)):
            if text is None:
                times[name] = None
                continue
            try:
                value = parse_since(text, name)
            except ValueError as e:
                raise errors.BadRequest(str(e)) from None
            times[name] = min(max(value, 0.0), float(LATEST))
        if times["since"] is not None and times["until"] is not None and times["since"] > times["until"]:
            raise errors.BadRequest(f"since ({since}) is after until ({until})")
        if group is None:
            group = "total"
        elif group not in GROUPS:
            raise errors.BadRequest(f"group must be one of {', '.join(GROUPS)}, got {group!r}")
        return cls(key=key, model=model, since=times["since"], until=times["until"], group=group)

    def check(self, now: float) -> None:
        """
        A range that can hold usage at C{now}: C{since} not past the current minute.

        @raise errors.BadRequest: it is (the usage of minutes to come: always empty).
        """
        if self.since is not None and self.since // 60 * 60 > now:
            raise errors.BadRequest(
                f"since ({iso(self.since)}) is in the future (the daemon's time is {iso(now)}): there is no "
                f"usage there yet; give a time in the past, or leave since out")


def iso(seconds: float) -> str:
    """C{2026-12-01T20:11:00Z}."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def described(figures) -> dict:
    """A row's JSON from its figures (as L{FIGURES} reads them)."""
    requests, client, server, cancelled, tokens_in, tokens_out, latency_sum, latency_max = figures
    return {
        "requests": requests, "ok": requests - client - server - cancelled, "client_errors": client,
        "server_errors": server, "cancelled": cancelled, "tokens_in": tokens_in, "tokens_out": tokens_out,
        "latency_ms_mean": round(latency_sum * 1000.0 / requests, 3) if requests else None,
        "latency_ms_max": round(latency_max * 1000.0, 3),
    }


def answer(selection: Selection, until: float, rows: list, *, truncated: bool, totals) -> dict:
    """
    A query's answer (C{/get/usage}'s JSON), as every L{IUsageStore} gives it.

    @param until: the range's end (C{now} when the selection has none).
    @param rows: (the row's place: C{key}, C{model}, and C{minute} by minute; its figures
        as L{FIGURES} reads them), in order: the first L{MAX_ROWS} are answered.
    @param truncated: there were more rows.
    @param totals: the figures of all the rows selected, or None (none).
    """
    usage = []
    for place, figures in rows[:MAX_ROWS]:
        usage.append({**place, **described(figures)})
    return {
        "since": None if selection.since is None else iso(selection.since), "until": iso(until),
        "group": selection.group, "key": selection.key, "model": selection.model, "count": len(usage),
        "truncated": truncated, "totals": described(totals or (0, 0, 0, 0, 0, 0, 0.0, 0.0)), "usage": usage,
    }


@implementer(IUsageStore)
class UsageDatabase:
    """
    The usage table in one SQLite database: C{DIR/usage.sqlite3}, or in memory (C{path}
    None: a daemon whose store keeps nothing). Opened on the calling thread; every other
    method is called by the recorder's one thread.

    @ivar connection: its C{sqlite3} connection.
    """

    log = Logger()
    problems = (sqlite3.Error,)

    def __init__(self, path: str | None):
        self.path = path
        if path is not None:
            private_files(os.path.dirname(path), path, self.log)
        self.connection = sqlite3.connect(path or ":memory:", check_same_thread=False, isolation_level=None)
        self.connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last second
        self.connection.executescript(SCHEMA)

    def write(self, rows: dict, cutoff: float | None, batch: int = 0) -> None:
        """
        Add C{rows} (key, model, minute) -> figures; delete the minutes before C{cutoff}, if
        given (C{batch} unused: one transaction, all written or none).
        """
        with self.connection:
            if rows:
                self.connection.executemany(UPSERT, [
                    (key, model, minute, row[OK] + row[CLIENT_ERRORS] + row[SERVER_ERRORS] + row[CANCELLED],
                     row[CLIENT_ERRORS], row[SERVER_ERRORS], row[CANCELLED], row[TOKENS_IN], row[TOKENS_OUT],
                     row[LATENCY_SUM], row[LATENCY_MAX])
                    for (key, model, minute), row in rows.items()
                ])
            if cutoff is not None:
                self.connection.execute("DELETE FROM usage_minutes WHERE minute < ?", (int(cutoff),))

    def read(self, selection: Selection, now: float) -> dict:
        """The answer to C{selection}, as L{IUsageReader.query} gives it."""
        since = selection.since
        until = now if selection.until is None else selection.until
        where, values = ["minute <= ?"], [int(until)]
        if since is not None:
            where.append("minute >= ?")
            values.append(int(since // 60 * 60))
        for column, value in (("key_name", selection.key), ("model", selection.model)):
            if value is not None:
                where.append(f"{column} = ?")
                values.append(value)
        by_minute = selection.group == "minute"
        columns = "key_name, model, minute" if by_minute else "key_name, model"
        order = "minute, key_name, model" if by_minute else "key_name, model"
        found = self.connection.execute(
            f"SELECT {columns}, {FIGURES} FROM usage_minutes WHERE {' AND '.join(where)}"
            f" GROUP BY {columns} ORDER BY {order} LIMIT ?", (*values, MAX_ROWS + 1),
        ).fetchall()
        totals = self.connection.execute(f"SELECT {FIGURES} FROM usage_minutes WHERE {' AND '.join(where)}",
                                  values).fetchone()
        rows = []
        for found_row in found[:MAX_ROWS]:
            if by_minute:
                key, model, minute, *figures = found_row
                rows.append(({"key": key, "model": model, "minute": iso(minute)}, figures))
            else:
                key, model, *figures = found_row
                rows.append(({"key": key, "model": model}, figures))
        return answer(selection, until, rows, truncated=len(found) > MAX_ROWS, totals=totals if totals[0] else None)

    def read_json(self, selection: Selection, now: float) -> bytes:
        """L{read}'s answer as JSON text (rendered here too: a long answer takes milliseconds)."""
        return json.dumps(self.read(selection, now)).encode()

    def unavailable(self, message: str) -> errors.ApiError:
        return UsageUnavailable(f"the usage store failed: {message}")

    def close(self) -> None:
        self.connection.close()


class _Threads(ThreadPool):
    # Daemon threads: a write stuck past the stop's wait (a hung disk) does not keep the
    # process from exiting.
    threadFactory = partial(threading.Thread, daemon=True)


@implementer(IUsageRecorder, IUsageReader)
class UsageRecorder:
    """
    The usage in memory, written to a L{UsageDatabase} off the reactor thread.

    @param clock: an L{IReactorTime}: the minutes, the flushes, the retention.
    @param database: the L{UsageDatabase}.
    @param retention_days: how long rows are kept.
    @param in_thread: C{(function, *args) -> Deferred}: how the database is called, off
        the reactor thread (L{open_usage}: by a pool of one thread, C{threads}); tests give
        their own.
    @param threads: the L{ThreadPool} behind C{in_thread}, started by L{start} and
        stopped by L{stop}, or None.
    @param max_pending: L{MAX_PENDING_ROWS}.
    @param max_series: L{MAX_SERIES}.

    @ivar totals: (key, model) -> the figures since the process started (L{UsageCollector}).
    @ivar dropped: requests not kept in the store (the rows in memory were at their cap).
    """

    log = Logger()

    def __init__(self, clock, database: UsageDatabase, *, retention_days: float = DEFAULT_RETENTION_DAYS,
                 in_thread, threads=None, max_pending: int = MAX_PENDING_ROWS, max_series: int = MAX_SERIES):
        self.clock = clock
        self.database = database
        self.retention = retention_days * 86400.0
        self.max_pending = max_pending
        self.max_series = max_series
        self._in_thread = in_thread
        self._threads = threads
        self._started = False
        self._pending: dict = {}  # (key, model, minute) -> figures
        self.totals: dict = {}
        self.dropped = 0
        self.failed_writes = 0
        self._being_written = 0  # rows in the write in progress
        self._failed = None  # (batch, rows) of the last write, when it failed: tried again as they are
        self._batches = 0  # the number of the last batch written (IUsageStore.write's batch)
        self._writing = False
        self._waiters: list = []  # flushes waiting for the next write
        self._timer = None
        self._last_prune = -math.inf
        self._dropping = False  # said once until writes succeed again
        self._failing = False
        self._stopped = False
        self._stopping = None

    @property
    def unwritten(self) -> int:
        """Rows in memory: pending, being written, and those of a write that failed."""
        return len(self._pending) + self._being_written + (len(self._failed[1]) if self._failed else 0)

    # --- the request path -------------------------------------------------

    def record(self, caller, model_id: str, status: int, seconds: float, tokens) -> None:
        """One request ended (L{aibackend.policy.IUsageRecorder}): never blocks, never raises."""
        # Every request's path: each figure added with as few steps as can be (subscripts,
        # not get(); no token figures added for a request without a count).
        try:
            name = ANONYMOUS if caller is None else caller.name
            outcome = OK if status < 400 else CANCELLED if status == errors.CLIENT_CLOSED else (
                CLIENT_ERRORS if status < 500 else SERVER_ERRORS)
            try:
                total = self.totals[(name, model_id)]
            except KeyError:
                total = self._total(name, model_id)
            total[outcome] += 1
            total[LATENCY_SUM] += seconds
            if tokens is not None:
                prompt = tokens.prompt or 0
                completion = tokens.completion or 0
                total[TOKENS_IN] += prompt
                total[TOKENS_OUT] += completion
            if self._stopped:
                return
            where = (name, model_id, int(self.clock.seconds() // 60) * 60)
            try:
                row = self._pending[where]
            except KeyError:
                row = self._row(where)
                if row is None:
                    return
            row[outcome] += 1
            row[LATENCY_SUM] += seconds
            if seconds > row[LATENCY_MAX]:
                row[LATENCY_MAX] = seconds
            if tokens is not None:
                row[TOKENS_IN] += prompt
                row[TOKENS_OUT] += completion
        except Exception:
            self.log.failure("usage: a request could not be recorded")

    def _total(self, name: str, model_id: str) -> list:
        """The cumulative figures of a (key, model) seen for the first time (past the cap: key L{OTHER}'s)."""
        if len(self.totals) >= self.max_series:
            total = self.totals.get((OTHER, model_id))
            if total is not None:
                return total
            name = OTHER
        total = self.totals[(name, model_id)] = [0, 0, 0, 0, 0, 0, 0.0]
        return total

    def _row(self, where: tuple) -> list | None:
        """A new pending row, or None when those in memory are at their cap (the request is dropped)."""
        if self.unwritten >= self.max_pending:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                self.log.warn(
                    "usage: {rows} rows wait to be written (the most kept in memory): the usage of new "
                    "(key, model, minute)s is not kept until the store catches up "
                    "(aibackend_usage_dropped_total counts them)", rows=self.unwritten)
            return None
        row = self._pending[where] = [0, 0, 0, 0, 0, 0, 0.0, 0.0]
        if self._timer is None and not self._writing:
            self._timer = self.clock.callLater(FLUSH_SECONDS, self._tick)
        return row

    # --- writing ----------------------------------------------------------

    def _tick(self) -> None:
        self._timer = None
        if not self._writing:
            self._write()

    def flush(self) -> Deferred:
        """
        Write what is pending now (after the write in progress, if one is).

        @return: a Deferred that fires (with None) once it is written, or once writing it failed (logged).
        """
        d = Deferred()
        self._waiters.append(d)
        if not self._writing:
            self._write()
        return d

    def _write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, []
        retried = self._failed is not None
        if retried:
            # The rows of the write that failed, as they were, under the same batch number: a
            # store whose write was made though its answer was lost (a timeout) adds them once.
            (batch, rows), self._failed = self._failed, None
        else:
            rows, self._pending = self._pending, {}
            batch = self._batches + 1 if rows else self._batches
        now = self.clock.seconds()
        cutoff = None
        if now - self._last_prune >= PRUNE_SECONDS:
            self._last_prune = now
            cutoff = now - self.retention
        if not rows and cutoff is None:
            for waiter in waiters:
                waiter.callback(None)
            return
        self._batches = batch
        self._writing = True
        self._being_written = len(rows)
        d = self._call(self.database.write, rows, cutoff, batch)
        d.addCallbacks(self._written, self._not_written, errbackArgs=(batch, rows))
        d.addBoth(self._next, waiters, retried)

    def _call(self, function, *args) -> Deferred:
        return self._in_thread(function, *args)

    def _written(self, _) -> None:
        if self._failing or self._dropping:
            self.log.info("usage: written again ({dropped} requests not kept meanwhile)", dropped=self.dropped)
        self._failing = self._dropping = False

    def _not_written(self, failure, batch: int, rows: dict) -> None:
        self.failed_writes += 1
        if not self._failing:  # said once until a write succeeds
            self._failing = True
            if failure.check(*self.database.problems):  # the disk, a lock held too long, Redis gone: no bug
                self.log.warn("usage: {rows} rows could not be written ({why}); tried again with the next write",
                              rows=len(rows), why=failure.getErrorMessage())
            else:
                self.log.failure("usage: {rows} rows could not be written (tried again with the next write)",
                                 failure, rows=len(rows))
        # Kept as they are (they count in unwritten already): the next write tries them first.
        self._failed = (batch, rows)

    def _next(self, _, waiters: list, retried: bool) -> None:
        self._writing = False
        self._being_written = 0
        if retried and self._failed is None and (self._pending or waiters):
            # The rows of a failed write are written at last: what came meanwhile goes now (and a
            # flush waiting is done once it has).
            self._waiters[:0] = waiters
            self._write()
            return
        for waiter in waiters:
            waiter.callback(None)
        if self._waiters:
            self._write()
        elif (self._pending or self._failed) and self._timer is None and not self._stopped:
            self._timer = self.clock.callLater(FLUSH_SECONDS, self._tick)

    # --- reading ----------------------------------------------------------

    def query(self, selection: Selection) -> Deferred:
        """
        L{IUsageReader.query}: what is pending is written first, then the database read.

        @raise errors.BadRequest: a range that cannot hold usage yet (L{Selection.check}).
        """
        selection.check(self.clock.seconds())
        d = self.flush()
        d.addCallback(lambda _: self._call(self.database.read_json, selection, self.clock.seconds()))
        d.addTimeout(QUERY_SECONDS, self.clock)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure):
        if failure.check(Timeout):
            raise UsageUnavailable(f"the usage store did not answer within {QUERY_SECONDS:g} s; try again")
        failure.trap(*self.database.problems)
        raise self.database.unavailable(failure.getErrorMessage())

    # --- the lifetime -----------------------------------------------------

    def start(self) -> None:
        """Start the thread, and delete there what is past the retention."""
        self._started = True
        if self._threads is not None:
            self._threads.start()
        self._write()

    def stop(self) -> Deferred:
        """
        Write what is pending (waiting at most L{STOP_SECONDS}), then close the database:
        nothing more is written, and no timer is left.
        """
        if self._stopping is None:
            self._stopping = d = self.flush() if self._started else succeed(None)
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            d.addTimeout(STOP_SECONDS, self.clock)
            d.addCallbacks(self._close, self._stuck)
        return self._stopping

    def _close(self, _):
        if self.unwritten:  # the last write failed (logged): what it held is not kept
            self.log.warn("usage: {rows} rows not written at the stop (the store failed)", rows=self.unwritten)
        if not self._started:
            self.database.close()
            return None
        d = self._call(self.database.close)
        d.addErrback(lambda failure: self.log.failure("usage: closing the database", failure))
        return d.addBoth(lambda _: self._stop_threads())

    def _stuck(self, failure):
        failure.trap(Timeout)
        self.log.warn("usage: the store did not answer within {seconds} s of the stop: {rows} rows not written",
                      seconds=STOP_SECONDS, rows=self.unwritten)
        # Its (daemon) thread is left to the hung write: stopping the pool would wait for it.

    def _stop_threads(self) -> None:
        if self._threads is not None:
            self._threads.stop()


class UsageService(service.Service):
    """
    The recorder while usage is on: opened (its file or connection, and its thread) only
    once L{on} is called, started with the service (the retention applied), and stopped
    (what is pending written, then closed) by L{off} or with the service. A daemon whose
    usage is unset has none until it has a key or a limit, and none again once it has
    neither (L{aibackend.daemon.build_policy} says which).

    Turned off, the recorder writes what is pending at once but is closed only
    L{OFF_GRACE_SECONDS} later: the requests in flight then, admitted by the policy that
    had it, settle meanwhile and their usage is kept. Turned on again within the grace,
    it is the same recorder again; the service stopping closes it at once (the daemon's
    drain has settled them).

    @param open_recorder: C{() -> UsageRecorder}, not started (L{open_usage}; the fleet's:
        L{aibackend.redisusage.open_redis_usage}); what it raises, L{on} raises.
    @ivar recorder: the recorder while usage is on, else None.
    """

    name = "usage"

    def __init__(self, open_recorder):
        self._open = open_recorder
        self.recorder: UsageRecorder | None = None
        self._closing: list = []  # the stops of the recorders turned off, not done yet
        self._retiring = None  # (the recorder turned off, the timer of its stop) during the grace
        self._ended = False  # stopped: nothing is opened again

    def on(self) -> UsageRecorder | None:
        """The recorder, opened (and started, once the service is) if it was not; None once the service stopped."""
        if self.recorder is None and not self._ended:
            if self._retiring is not None:  # turned off a moment ago: still open
                (self.recorder, timer), self._retiring = self._retiring, None
                timer.cancel()
                return self.recorder
            self.recorder = self._open()
            if self.running:
                self.recorder.start()
        return self.recorder

    def off(self) -> None:
        """
        No recorder: the one there was writes what is pending now, and closes (its thread
        ended) once the requests in flight have had L{OFF_GRACE_SECONDS} to settle.
        """
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            return
        if not self.running:  # (never started, or stopping: nothing more to wait for)
            self._stop(recorder)
            return
        recorder.flush()
        self._retiring = (recorder, recorder.clock.callLater(OFF_GRACE_SECONDS, self._retired))

    def _retired(self) -> None:
        (recorder, _), self._retiring = self._retiring, None
        self._stop(recorder)

    def _stop(self, recorder: UsageRecorder) -> None:
        d = recorder.stop()
        self._closing.append(d)
        d.addBoth(lambda _: self._closing.remove(d))

    def startService(self):
        super().startService()
        if self.recorder is not None:
            self.recorder.start()

    def stopService(self):
        super().stopService()
        self._ended = True
        self.off()
        if self._retiring is not None:
            (recorder, timer), self._retiring = self._retiring, None
            timer.cancel()
            self._stop(recorder)
        return gatherResults(list(self._closing)).addCallback(lambda _: None)


class UsageCollector:
    """
    C{aibackend_usage_*}: the recorder's cumulative figures (this process's: in a fleet too,
    each daemon's metrics are its own), at each scrape; none while C{in_use()} says the
    recorder is not used (usage unset, and no key nor limit yet), or while there is none.

    @param recorder: the L{UsageRecorder}; or C{current}, C{() -> UsageRecorder | None}
        (L{UsageService.recorder}: the one open now).
    """

    def __init__(self, recorder: UsageRecorder | None = None, in_use=lambda: True, *, current=None):
        self.current = current if current is not None else (lambda: recorder)
        self.in_use = in_use

    def collect(self):
        recorder = self.current()
        if recorder is None or not self.in_use():
            return []
        requests = CounterMetricFamily(
            "aibackend_usage_requests", "Requests by key, model and outcome (ok, client_error, server_error, "
            "cancelled), since the process started.", labels=["key", "model", "outcome"])
        tokens = CounterMetricFamily(
            "aibackend_usage_tokens", "Tokens by key, model and direction (in: the prompt, out: the completion).",
            labels=["key", "model", "direction"])
        latency = SummaryMetricFamily(
            "aibackend_usage_latency_seconds", "Time to answer requests, by key and model.", labels=["key", "model"])
        for (key, model), total in sorted(recorder.totals.items()):
            for outcome, name in enumerate(OUTCOMES):
                requests.add_metric([key, model, name], total[outcome])
            tokens.add_metric([key, model, "in"], total[TOKENS_IN])
            tokens.add_metric([key, model, "out"], total[TOKENS_OUT])
            latency.add_metric([key, model], count_value=sum(total[:TOKENS_IN]), sum_value=total[LATENCY_SUM])
        dropped = CounterMetricFamily(
            "aibackend_usage_dropped", "Requests whose usage was not kept in the store (too many rows waited to "
            "be written).")
        dropped.add_metric([], recorder.dropped)
        failed = CounterMetricFamily("aibackend_usage_write_failures", "Writes of the usage that failed.")
        failed.add_metric([], recorder.failed_writes)
        unwritten = GaugeMetricFamily("aibackend_usage_unwritten_rows",
                                      "Rows of usage in memory, waiting to be written or being written.")
        unwritten.add_metric([], recorder.unwritten)
        return [requests, tokens, latency, dropped, failed, unwritten]


def recorder_for(reactor, database, retention_days: float) -> UsageRecorder:
    """The recorder of an L{IUsageStore}, written and read by a thread of its own (started with it)."""
    threads = _Threads(minthreads=1, maxthreads=1, name="aibackend-usage")
    return UsageRecorder(reactor, database, retention_days=retention_days, threads=threads,
                         in_thread=partial(deferToThreadPool, reactor, threads))


def open_usage(reactor, state_dir: str | None, retention_days: float) -> UsageRecorder:
    """
    The recorder of C{DIR/usage.sqlite3} (C{state_dir} None: in memory), written by a
    thread of its own.

    @raise OSError, sqlite3.Error: the database cannot be used.
    """
    path = None if state_dir is None else os.path.join(state_dir, FILENAME)
    return recorder_for(reactor, UsageDatabase(path), retention_days)
