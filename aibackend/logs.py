"""
Each model's own log: a bounded ring of JSON-able entries, newest last.

An entry is written per request (time, request id, operation, status, latency, error)
and per lifecycle event (added, removed, process started/exited, ...). The log never
grows past its bound: the oldest entries are dropped first, and every text field is
capped so one huge line cannot hold memory.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from datetime import datetime, timezone

from twisted.logger import jsonFileLogObserver

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
LEVEL_ALIASES = {"warn": "warning", "err": "error", "critical": "error"}

DEFAULT_MAX_ENTRIES = 1000
MAX_FIELD_CHARS = 4096


def normalize_level(name: str) -> str:
    """
    @return: the canonical level name for C{name} (case-insensitive).
    @raise ValueError: if it is not a level.
    """
    key = name.strip().lower()
    key = LEVEL_ALIASES.get(key, key)
    if key not in LEVELS:
        raise ValueError(f"unknown level {name!r}: use one of {', '.join(LEVELS)}")
    return key


def parse_since(value: str, name: str = "since") -> float:
    """
    Parse a C{since} filter (or another time, C{name}, in its messages): seconds since
    the epoch, or an ISO 8601 time (UTC if no offset is given).

    @raise ValueError: with a message for the client.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"{name} must be a finite time, got {value!r}")
        return seconds
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{name} must be seconds since the epoch or an ISO 8601 time, got {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _cap(value):
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[:MAX_FIELD_CHARS] + f"... [{len(value) - MAX_FIELD_CHARS} more characters]"
    return value


_second = [None, ""]  # the last whole second formatted, and its text (the reactor thread's)


def _iso(seconds: float, second: list = _second) -> str:
    """
    C{2026-01-02T03:04:05.678Z}: each request's entry has one, so a second's text is reused
    (C{second}: the last whole second and its text; another thread passes a list of its own).
    """
    whole = int(seconds // 1)
    micro = round((seconds - whole) * 1e6)  # as datetime rounds a timestamp
    if micro >= 1_000_000:
        whole, micro = whole + 1, 0
    if whole != second[0]:
        second[:] = [whole, datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{second[1]}.{micro // 1000:03d}Z"


def _request_entry(record: tuple, second: list) -> dict:
    """The entry of a request's record (L{ModelLog.request}): what append() would have made of it."""
    seq, now, status, request_id, operation, latency_ms, error = record
    entry = {
        "seq": seq, "time": _iso(now, second), "timestamp": now,
        "level": "info" if status < 400 else "warning" if status < 500 else "error",
        "event": "request", "request_id": _cap(request_id), "operation": operation, "status": status,
        "latency_ms": round(latency_ms, 3),
    }
    if error is not None:
        entry["error"] = _cap(error)
    return entry


def entries_of(records: list) -> list:
    """
    A log's L{ModelLog.snapshot} as entries (dicts): a request's record made its entry
    here, when the log is read, not when the request is written. Safe in any thread.
    """
    second = [None, ""]
    return [record if type(record) is dict else _request_entry(record, second) for record in records]


def select(entries: list, *, limit: int | None = None, since: float | None = None, level: str | None = None) -> list:
    """
    @param entries: a log's L{ModelLog.snapshot} (or its L{entries_of}).
    @param limit: at most this many entries, the newest ones.
    @param since: only entries strictly after this time (seconds since the epoch).
    @param level: only entries of this level or a more severe one.
    @return: the matching entries, oldest first.
    """
    floor = LEVELS[level] if level is not None else None
    entries = entries_of(entries)
    if since is not None or floor is not None:
        entries = [
            entry
            for entry in entries
            if (since is None or entry["timestamp"] > since)
            and (floor is None or LEVELS[entry["level"]] >= floor)
        ]
    if limit is not None:
        entries = entries[-limit:] if limit else []
    return entries


class ModelLog:
    """
    A bounded log of one model's requests and events.

    @param clock: an L{IReactorTime} (C{seconds()} gives the entries' time).
    @param max_entries: how many entries are kept; older ones are dropped.
    """

    def __init__(self, clock, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._entries: deque[dict] = deque(maxlen=max_entries)
        self._seq = 0
        self.dropped = 0

    @property
    def max_entries(self) -> int:
        return self._entries.maxlen

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, level: str, event: str, **fields) -> dict:
        """
        Add an entry. C{None} fields are left out; long strings are capped.

        @return: the entry.
        """
        now = self._clock.seconds()
        self._seq += 1
        entry = {"seq": self._seq, "time": _iso(now), "timestamp": now, "level": level, "event": event}
        for key, value in fields.items():
            if value is not None:
                entry[key] = _cap(value)
        if len(self._entries) == self._entries.maxlen:
            self.dropped += 1
        self._entries.append(entry)
        return entry

    def request(self, *, request_id: str, operation: str, status: int, latency_ms: float, error=None) -> dict:
        """
        Record one request: C{info} when it succeeded, C{warning} for a client error,
        C{error} for a failure of the model or the daemon.

        @return: its entry.
        """
        self.record_request(request_id, operation, status, latency_ms, error)
        return _request_entry(self._entries[-1], _second)

    def record_request(self, request_id: str, operation: str, status: int, latency_ms: float,
                       error: str | None) -> None:
        """
        L{request} for the hot path, which does not read the entry: one is written for every
        request, so it is kept as a tuple, made an entry (L{entries_of}) when the log is read.
        """
        self._seq += 1
        entries = self._entries
        if len(entries) == entries.maxlen:
            self.dropped += 1
        entries.append((self._seq, self._clock.seconds(), status, request_id, operation, latency_ms, error))

    def snapshot(self) -> list:
        """
        The entries as they are now, oldest first: a copy of the ring, cheap (the
        entries themselves are never changed once written), to be read anywhere,
        another thread included. A request's entry is still its record (a tuple:
        L{record_request}): L{select} and L{entries_of} make the entries of a snapshot.
        """
        return list(self._entries)

    def query(self, *, limit: int | None = None, since: float | None = None, level: str | None = None) -> list:
        """L{select} over the entries as they are now."""
        return select(self.snapshot(), limit=limit, since=since, level=level)

    def clear(self) -> int:
        """
        Remove every entry.

        @return: how many were removed.
        """
        removed = len(self._entries)
        self._entries.clear()
        return removed


# --- the daemon's own log as JSON lines (twistd aibackend --log-format json) --------------


def json_log_observer(path: str | None = None):
    """
    A twistd log observer writing one JSON object a line (twisted.logger's event, fields
    and all) to C{path} (twistd's log file), or stdout without one (in the foreground).
    """
    if path and path != "-":
        stream = open(path, "a", encoding="utf-8")
    else:
        stream = sys.stdout
    return jsonFileLogObserver(stream, recordSeparator="")
