"""
The limits of a client key or of a model: requests per minute, tokens per minute and
concurrent requests, and the L{Limiter} that keeps them (an L{aibackend.policy.ILimiter}).

L{Limits} is what a key (L{aibackend.keys}) or a model's C{[models.limits]} table says;
L{parse_limits} reads one from a plain table (an C{addkey} body's C{limits}, a stored key)
with a clear message for each wrong value.

How the limits are kept, and why so:

  - Requests and tokens per minute are each a GCRA (the generic cell rate algorithm, a
    token bucket kept as one number, its "theoretical arrival time"): a bucket of the
    whole minute's allowance, refilled continuously. From idle, a burst of 200 requests
    against C{rpm = 50} gets exactly 50, plus what refills while the burst lasts (one
    every 1.2 s); a fixed window would let 2 x 50 through around a window's edge, and a
    sliding log would keep one timestamp per request. One float per limit, one compare
    per request: exact, bounded, and what a Redis script does as well (issue 19).
  - Concurrent requests are a counter, taken at admission and given back once the
    request ended, whatever its outcome (L{aibackend.policy.Policy.settle}). A request
    whose limits are only requests per minute holds nothing: it has nothing to settle.
  - Tokens are reserved when the request starts (L{aibackend.policy.TokenCount.reserve}:
    the request's C{max_tokens} or C{max_completion_tokens}, else
    L{DEFAULT_COMPLETION_TOKENS}, plus the prompt's estimate; a reservation is at most the
    whole C{tpm}), so that a burst cannot overshoot; when it ends they are settled with
    what the answer said it used (C{TokenCount.used()}): the difference is given back or
    charged (a bucket may go into debt, and then admits nothing until it is repaid). A
    request that ended with no count (refused by its model, failed before an answer) is
    given back its whole reservation. Only requests with a token count (C{/v1}) are
    counted against C{tpm}.
  - A request is admitted only if every limit that applies (its key's and its model's)
    admits it, all reserved at once or none (one lock around them all).

Every process of a daemon started with C{--processes N} reads and writes the same
L{LimitTable}: rows in a file in the state directory, C{mmap}'d by each process, made by
the primary and opened by the workers, each operation under an exclusive C{flock} (a lock
and a few C{struct} reads: microseconds, no round trip to another process). A row is a
scope (a key or a model, by a 64-bit hash of its name), its two GCRA times and its
requests in flight, in all and per process: when a worker ends, the primary gives back
what it held (L{Limiter.forget_process}). The table has a fixed number of rows (L{ROWS}),
whatever the number of keys and models: a name takes a free row near its hash's place
(or one whose state says nothing any more: idle, nothing in flight), and a name that
finds none is not limited until one frees (logged). A daemon of one process keeps the
same table in its own memory.

Past a limit the request is refused with L{LimitReached} (429): C{Retry-After} and
OpenAI's C{x-ratelimit-*} headers, counted in the metrics as a refusal
(C{aibackend_refusals{reason="rate_limited"}}, C{aibackend_limited{model, scope, limit}}),
never as a request to the model. Everything runs on an injected clock.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass

from zope.interface import implementer

from aibackend import errors
from aibackend.policy import IChainLimiter

# The names of a limits table, and what each bounds.
LIMIT_KEYS = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute (models whose answers carry token usage)",
    "max_concurrent": "requests in flight at once",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """
    What a key or a model may do; None for a limit not set.

    @ivar rpm: requests per minute.
    @ivar tpm: tokens per minute.
    @ivar max_concurrent: requests in flight at once.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def any(self) -> bool:
        """Is any limit set?"""
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None

    def table(self) -> dict:
        """The limits set, as a plain table (what L{parse_limits} reads back)."""
        return {name: value for name in LIMIT_KEYS if (value := getattr(self, name)) is not None}


def parse_limits(table, where: str = "limits") -> Limits:
    """
    Read a limits table: each of L{LIMIT_KEYS} a whole number of at least 1, or absent.

    @param where: what the table is, for the messages (C{"limits"}, C{"models.limits"}).
    @raise ValueError: the table is wrong; the message names the key and says why.
    """
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table of {', '.join(LIMIT_KEYS)}, not {type(table).__name__}")
    unknown = sorted(name for name in table if name not in LIMIT_KEYS)
    if unknown:
        raise ValueError(f"{where} has no key {unknown[0]!r}: its keys are {', '.join(LIMIT_KEYS)}")
    values = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{name} ({LIMIT_KEYS[name]}) must be a whole number of at least 1, "
                             f"not {value!r}")
        values[name] = value
    return Limits(**values)


# --- the limiter --------------------------------------------------------------------

# The tokens a request reserves for its completion when it says no max_tokens (nor
# max_completion_tokens); its prompt's estimate is reserved too. Settled when it ends.
DEFAULT_COMPLETION_TOKENS = 512
# What a limit per minute spans, in seconds.
MINUTE = 60.0
# A time this close is reached (the clock's float arithmetic).
_EPSILON = 1e-9

# The table: a header, then ROWS rows. A row: its scope's hash (0: free), the GCRA times of
# its requests and its tokens (the clock's seconds), its requests in flight in all, then
# those of each process (int32 each). Little-endian, fixed sizes: every process reads it alike.
MAGIC = b"AIBLIM01"
HEADER = struct.Struct("<8sII")  # magic, rows, processes
ROW = struct.Struct("<Qddq")
_HASH = struct.Struct("<Q")
_HASH_REQUESTS = struct.Struct("<Qd")  # a row's first two fields: its scope's hash, its requests' GCRA time
_REQUESTS = struct.Struct("<d")
_COUNT = struct.Struct("<i")
ROWS = 8192
# How many rows from its hash's place a name may take (and is looked for in).
PROBES = 16
TABLE_PREFIX = "limits-"
TABLE_SUFFIX = ".table"


class LimitReached(errors.ApiError):
    """
    A limit of a key or of a model refused the request: 429, with C{Retry-After} and
    OpenAI's C{x-ratelimit-*} headers; OpenAI's error type says which limit
    (C{requests} or C{tokens}), its code is C{rate_limit_exceeded}, as OpenAI's are.

    @ivar scope: C{key} or C{model}.
    @ivar limit: C{rpm}, C{tpm} or C{max_concurrent}.
    """

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, model: str, scope: str, limit: str, headers: dict):
        super().__init__(message, model=model, headers=headers)
        self.scope = scope
        self.limit = limit
        self.openai_type = "tokens" if limit == "tpm" else "requests"


def reset_text(seconds: float) -> str:
    """
    A time as OpenAI's C{x-ratelimit-reset-*} headers write it (Go's durations):
    C{0s}, C{120ms}, C{1s}, C{8.64s}, C{6m0s}, C{1h2m3s}.
    """
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    milliseconds = math.ceil(seconds * 1000 - 1e-6)
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    second = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{second}s"
    if minutes:
        return f"{minutes}m{second}s"
    return f"{second}s"


def scope_hash(kind: str, name: str) -> int:
    """A scope's row key: 64 bits of BLAKE2b of its kind and name (never 0: a free row's)."""
    value = _HASH.unpack(hashlib.blake2b(f"{kind}\0{name}".encode("utf-8", "surrogatepass"),
                                         digest_size=8).digest())[0]
    return value or 1


class _NoLock:
    """A table only this process reads: nothing to lock."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


class _FileLock:
    """An exclusive C{flock} on the table's file (each process has its own open file, so its own lock)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class LimitTable:
    """
    The rows the limits are kept in (see the module's docstring): in this process's memory
    (L{local}), or in a file every process of the daemon maps (L{create} in the primary,
    L{open} in a worker). L{lock} and L{unlock} bracket every reading and writing.

    @ivar process: this process's number (0: the primary, or a daemon alone; a worker's own).
    @ivar path: the file, or None.
    """

    def __init__(self, buffer, *, process: int = 0, lock=None, path: str | None = None, fd: int | None = None):
        magic, rows, processes = HEADER.unpack_from(buffer, 0)
        if magic != MAGIC or rows < 1 or processes < 1:
            raise ValueError("not a limits table")
        if not 0 <= process < processes:
            raise ValueError(f"process {process} is not one of the table's {processes}")
        self.buffer = buffer
        self.rows = rows
        self.processes = processes
        self.process = process
        self.row_size = ROW.size + _COUNT.size * processes
        self.own = ROW.size + _COUNT.size * process  # this process's count, from a row's start
        self.path = path
        self.fd = fd
        self.shared = lock is not None  # (else lock and unlock do nothing: callers may skip them)
        lock = lock if lock is not None else _NoLock()
        self.lock, self.unlock = lock.acquire, lock.release
        self.found: dict[int, int] = {}  # hash -> its row's offset, as last found (checked at each use)

    @staticmethod
    def size(rows: int, processes: int) -> int:
        return HEADER.size + rows * (ROW.size + _COUNT.size * processes)

    @classmethod
    def local(cls, rows: int = ROWS) -> "LimitTable":
        """A table in this process's memory (a daemon of one process)."""
        buffer = bytearray(cls.size(rows, 1))
        HEADER.pack_into(buffer, 0, MAGIC, rows, 1)
        return cls(buffer)

    @classmethod
    def create(cls, state_dir: str, processes: int, rows: int = ROWS) -> "LimitTable":
        """
        The table of a C{--processes} primary: a new file (0600) in C{state_dir}, named by
        the primary's pid (tables left by primaries that are gone are removed first).

        @raise OSError: it cannot be made.
        """
        os.makedirs(state_dir, 0o700, exist_ok=True)  # (a Redis store makes no state directory itself)
        for stale in glob.glob(os.path.join(state_dir, f"{TABLE_PREFIX}*{TABLE_SUFFIX}")):
            pid = os.path.basename(stale)[len(TABLE_PREFIX):-len(TABLE_SUFFIX)]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                try:
                    os.unlink(stale)
                except OSError:
                    pass
        path = os.path.join(state_dir, f"{TABLE_PREFIX}{os.getpid()}{TABLE_SUFFIX}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            size = cls.size(rows, processes)
            os.ftruncate(fd, size)  # zeros: every row free (a sparse file)
            buffer = mmap.mmap(fd, size)
            HEADER.pack_into(buffer, 0, MAGIC, rows, processes)
        except BaseException:
            os.close(fd)
            raise
        return cls(buffer, process=0, lock=_FileLock(fd), path=path, fd=fd)

    @classmethod
    def open(cls, path: str, process: int) -> "LimitTable":
        """
        A worker's view of its primary's table.

        @raise OSError: the file is not there; ValueError: it is not a limits table.
        """
        fd = os.open(path, os.O_RDWR)
        try:
            header = os.pread(fd, HEADER.size, 0)
            magic, rows, processes = HEADER.unpack(header) if len(header) == HEADER.size else (b"", 0, 0)
            if magic != MAGIC:
                raise ValueError(f"{path} is not a limits table")
            buffer = mmap.mmap(fd, cls.size(rows, processes))
            return cls(buffer, process=process, lock=_FileLock(fd), path=path, fd=fd)
        except BaseException:
            os.close(fd)
            raise

    def remove(self) -> None:
        """Remove the file (the primary, on stop): the processes that map it still can, until they end."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def close(self, *, remove: bool = False) -> None:
        """Unmap the file (and, in the primary, remove it): nothing may use the table after."""
        if remove:
            self.remove()
        if self.fd is None:
            return
        self.buffer.close()
        os.close(self.fd)
        self.fd = None

    # --- rows (called with the lock held) -------------------------------------------------

    def find(self, key: int) -> int | None:
        """The offset of C{key}'s row, or None."""
        buffer = self.buffer
        offset = self.found.get(key)
        if offset is not None and _HASH.unpack_from(buffer, offset)[0] == key:
            return offset
        rows, row_size, start = self.rows, self.row_size, key % self.rows
        for step in range(min(PROBES, rows)):
            offset = HEADER.size + ((start + step) % rows) * row_size
            if _HASH.unpack_from(buffer, offset)[0] == key:
                self._remember(key, offset)
                return offset
        return None

    def claim(self, key: int, now: float, skip=()) -> int | None:
        """
        C{key}'s row, taken if it has none (a free row near its place, or an idle one, but
        none of C{skip}: the rows of the other limits of the same admission, which look idle
        until it is written); None: none is.
        """
        offset = self.find(key)
        if offset is not None:
            return offset
        buffer, rows, row_size, start = self.buffer, self.rows, self.row_size, key % self.rows
        for step in range(min(PROBES, rows)):
            offset = HEADER.size + ((start + step) % rows) * row_size
            if offset in skip:
                continue
            taken, requests_at, tokens_at, in_flight = ROW.unpack_from(buffer, offset)
            if taken == 0 or (in_flight <= 0 and requests_at <= now and tokens_at <= now):
                ROW.pack_into(buffer, offset, key, 0.0, 0.0, 0)
                buffer[offset + ROW.size:offset + row_size] = bytes(row_size - ROW.size)
                self._remember(key, offset)
                return offset
        return None

    def _remember(self, key: int, offset: int) -> None:
        found = self.found
        if len(found) >= 2 * self.rows:  # bounded: names come and go
            found.clear()
        found[key] = offset

    def forget_process(self, process: int) -> int:
        """
        Process C{process} has ended: what it had in flight is given back (its count made
        0 in every row).

        @return: the requests given back.
        """
        given = 0
        position = ROW.size + _COUNT.size * process
        self.lock()
        try:
            buffer = self.buffer
            for index in range(self.rows):
                offset = HEADER.size + index * self.row_size
                count = _COUNT.unpack_from(buffer, offset + position)[0]
                if count:
                    key, requests_at, tokens_at, in_flight = ROW.unpack_from(buffer, offset)
                    ROW.pack_into(buffer, offset, key, requests_at, tokens_at, max(0, in_flight - count))
                    _COUNT.pack_into(buffer, offset + position, 0)
                    given += count
        finally:
            self.unlock()
        return given

    def in_flight(self, kind: str, name: str) -> int:
        """The requests of scope C{kind} C{name} in flight now, over every process (0 if it has no row)."""
        self.lock()
        try:
            offset = self.find(scope_hash(kind, name))
            return 0 if offset is None else ROW.unpack_from(self.buffer, offset)[3]
        finally:
            self.unlock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Scope:
    """A key or a model, as the table knows it."""

    __slots__ = ("kind", "name", "key", "what", "offset")

    def __init__(self, kind: str, name: str):
        self.kind = kind
        self.name = name
        self.key = scope_hash(kind, name)
        self.what = f"{kind} {name!r}"
        self.offset = None  # its row's offset, as last found (checked at each use: another name may take it)


class Admission:
    """
    What L{Limiter.acquire} holds for one request: for each scope, its row (a row in use
    is never taken by another name) and the tokens it reserved there (and at what rate,
    to settle them).
    """

    __slots__ = ("held",)

    def __init__(self, held: list):
        # [(row offset, row key, its times and in flight as taken, seconds a token, tokens reserved, True)]
        self.held = held


@implementer(IChainLimiter)
class Limiter:
    """
    The limits of keys (L{aibackend.policy.Caller.limits}) and of models (their spec's
    C{limits}, C{[models.limits]}), kept in a L{LimitTable}.

    @param clock: an C{IReactorTime} (its C{seconds}); every process of a daemon must
        read the same time (the reactor's: the wall clock).
    @param table: the L{LimitTable} (by default, one in this process's memory).
    @param metrics: the L{aibackend.metrics.Metrics} that count refusals, or None.
    @param log: a C{twisted.logger.Logger} for a name the table has no row for, or None.
    """

    MAX_SCOPES = 4096  # the scopes remembered (their hashes); past it, made again

    def __init__(self, clock, table: LimitTable | None = None, *, metrics=None, log=None):
        self.clock = clock
        self.table = table if table is not None else LimitTable.local()
        self.metrics = metrics
        self.log = log
        self.unlimited = 0  # requests a limit could not be kept for (no row free for its name)
        self._keys: dict[str, _Scope] = {}
        self._models: dict[str, _Scope] = {}
        self._quiet: Limiter | None = None  # a fallback chain's attempts' (acquire_attempt), made once needed

    def _scope(self, scopes: dict, kind: str, name: str) -> _Scope:
        scope = scopes.get(name)
        if scope is None:
            if len(scopes) >= self.MAX_SCOPES:
                scopes.clear()
            scope = scopes[name] = _Scope(kind, name)
        return scope

    def acquire(self, caller, entry, tokens):
        key_limits = caller.limits if caller is not None else None
        model_limits = entry.spec.limits
        # One scope whose limits here are requests per minute only (tpm counts a request
        # with a token count only): what most requests are, taken by _requests_only.
        if key_limits is None:
            if model_limits is None:
                return None
            if model_limits.max_concurrent is None and (tokens is None or model_limits.tpm is None):
                name = entry.model_id
                try:
                    scope = self._models[name]
                except KeyError:
                    scope = self._scope(self._models, "model", name)
                return self._requests_only(scope, model_limits, entry, tokens)
        elif (model_limits is None and key_limits.max_concurrent is None
              and (tokens is None or key_limits.tpm is None)):
            return self._requests_only(self._scope(self._keys, "key", caller.name), key_limits, entry, tokens)
        applied = []
        if key_limits is not None:
            applied.append((self._scope(self._keys, "key", caller.name), key_limits))
        if model_limits is not None:
            applied.append((self._scope(self._models, "model", entry.model_id), model_limits))
        reserve = tokens.reserve if tokens is not None else 0
        table = self.table
        buffer, found, unpack = table.buffer, table.found, ROW.unpack_from
        now = self.clock.seconds()
        reached = now + MINUTE + _EPSILON
        changes = []
        chosen = []  # the rows of this admission's limits, so far
        table.lock()
        try:
            # First every limit is looked at (a refusal raises before anything is taken)...
            for scope, limits in applied:
                key = scope.key
                offset = found.get(key)
                if offset is not None:
                    taken, requests_at, tokens_at, in_flight = unpack(buffer, offset)
                if offset is None or taken != key:
                    offset = table.claim(key, now, chosen)
                    if offset is None:
                        self._no_row(scope)
                        continue
                    _, requests_at, tokens_at, in_flight = unpack(buffer, offset)
                chosen.append(offset)
                rpm = limits.rpm
                if rpm is not None:
                    requests_at = (requests_at if requests_at > now else now) + MINUTE / rpm
                    if requests_at > reached:
                        raise self._refusal(scope, "rpm", limits, applied, entry, now, reserve)
                tpm = limits.tpm
                if tpm is not None and tokens is not None:
                    per_token = MINUTE / tpm
                    charged = reserve if reserve < tpm else tpm
                    tokens_at = (tokens_at if tokens_at > now else now) + charged * per_token
                    if tokens_at > reached:
                        raise self._refusal(scope, "tpm", limits, applied, entry, now, reserve)
                else:
                    per_token = charged = 0
                most = limits.max_concurrent
                if most is not None:
                    if in_flight >= most:
                        raise self._refusal(scope, "max_concurrent", limits, applied, entry, now, reserve)
                    in_flight += 1
                elif per_token:
                    in_flight += 1  # held (its row with it) until its tokens are settled
                else:
                    changes.append((offset, key, requests_at, tokens_at, in_flight, 0, 0, False))
                    continue  # requests per minute only: nothing to give back, nothing held
                changes.append((offset, key, requests_at, tokens_at, in_flight, per_token, charged, True))
            # ... then all of them are taken.
            pack = ROW.pack_into
            own = table.own if table.processes > 1 else None
            held = []
            for change in changes:
                offset, key, requests_at, tokens_at, in_flight, _, _, holds = change
                pack(buffer, offset, key, requests_at, tokens_at, in_flight)
                if holds:
                    held.append(change)
                    if own is not None:
                        _COUNT.pack_into(buffer, offset + own, _COUNT.unpack_from(buffer, offset + own)[0] + 1)
        finally:
            table.unlock()
        return Admission(held) if held else None

    def _requests_only(self, scope: _Scope, limits: Limits, entry, tokens) -> None:
        """
        L{acquire} of a request that only the requests per minute of one scope (a key or
        a model) apply to: its GCRA time read and written, nothing held (so nothing to
        release: None), no list or tuple made for it.
        """
        rpm = limits.rpm
        if rpm is None:
            return None  # (tokens per minute, and no token count: nothing applies)
        key = scope.key
        table = self.table
        buffer = table.buffer
        now = self.clock.seconds()
        shared = table.shared
        if shared:
            table.lock()
        try:
            offset = scope.offset
            if offset is not None:
                taken, requests_at = _HASH_REQUESTS.unpack_from(buffer, offset)
            if offset is None or taken != key:
                offset = scope.offset = table.claim(key, now)
                if offset is None:
                    self._no_row(scope)
                    return None
                requests_at = _HASH_REQUESTS.unpack_from(buffer, offset)[1]
            requests_at = (requests_at if requests_at > now else now) + MINUTE / rpm
            if requests_at > now + MINUTE + _EPSILON:
                raise self._refusal(scope, "rpm", limits, [(scope, limits)], entry, now,
                                    tokens.reserve if tokens is not None else 0)
            _REQUESTS.pack_into(buffer, offset + _HASH.size, requests_at)
        finally:
            if shared:
                table.unlock()
        return None

    def release(self, admission, tokens):
        used = tokens.used() if tokens is not None else None
        if used is None:
            used = 0  # nothing known to be used: the whole reservation is given back
        table = self.table
        buffer, unpack, pack = table.buffer, ROW.unpack_from, ROW.pack_into
        own = table.own if table.processes > 1 else None
        table.lock()
        try:
            for offset, key, _, _, _, per_token, charged, _ in admission.held:
                taken, requests_at, tokens_at, in_flight = unpack(buffer, offset)
                if taken != key:  # cannot be, while it is in flight: but never write another's row
                    continue
                if per_token:  # what it used, less what it reserved: given back or charged
                    tokens_at += (used - charged) * per_token
                if own is None:
                    in_flight -= 1
                else:
                    mine = _COUNT.unpack_from(buffer, offset + own)[0]
                    if mine > 0:  # else: given back already (its process was forgotten)
                        _COUNT.pack_into(buffer, offset + own, mine - 1)
                        in_flight -= 1
                pack(buffer, offset, key, requests_at, tokens_at, in_flight if in_flight > 0 else 0)
        finally:
            table.unlock()

    def acquire_attempt(self, caller, entry, tokens):
        """
        A fallback chain's attempt (L{aibackend.policy.IChainLimiter}): admitted as by
        L{acquire}, by a twin of this limiter on the same table that counts no refusal,
        and what it holds split into the key's part and the model's.
        """
        quiet = self._quiet
        if quiet is None:
            quiet = self._quiet = Limiter(self.clock, self.table, log=self.log)
        admission = quiet.acquire(caller, entry, tokens)
        if admission is None:
            return None, None
        model = quiet._scope(quiet._models, "model", entry.model_id).key
        key_part = [held for held in admission.held if held[1] != model]
        model_part = [held for held in admission.held if held[1] == model]
        return Admission(key_part) if key_part else None, Admission(model_part) if model_part else None

    def forget_process(self, process: int) -> int:
        """A worker process ended: what it had in flight is given back (L{LimitTable.forget_process})."""
        return self.table.forget_process(process)

    def _no_row(self, scope: _Scope) -> None:
        self.unlimited += 1
        if self.log is not None and (self.unlimited & (self.unlimited - 1)) == 0:  # the 1st, 2nd, 4th...
            self.log.warn("aibackend: the limits table has no free row for {scope}: its limits are not kept "
                          "until one frees ({count} requests so far)", scope=scope.what, count=self.unlimited)

    def _refusal(self, scope: _Scope, limit: str, limits: Limits, applied, entry, now: float,
                 reserve: int) -> LimitReached:
        """The 429 of C{scope}'s C{limit} (the table is locked: its rows are read as they are)."""
        table, buffer = self.table, self.table.buffer
        states = []
        for other, other_limits in applied:
            offset = table.find(other.key)
            if offset is not None:
                _, requests_at, tokens_at, in_flight = ROW.unpack_from(buffer, offset)
                states.append((other, other_limits, max(requests_at - now, 0.0), max(tokens_at - now, 0.0)))
        return refusal(scope, limit, limits, states, entry, reserve, self.metrics)


def refusal(scope, limit: str, limits: Limits, states, entry, reserve: int, metrics=None) -> LimitReached:
    """
    The 429 of C{scope}'s C{limit} (C{scope}: a key or a model, with its C{kind} and
    C{what}), from the states of every scope that applies (C{states}: C{(scope, its
    Limits, seconds until its requests' bucket is full again, the same of its tokens')},
    C{scope} among them): the local L{Limiter}'s and a fleet's (L{aibackend.redislimits}).
    """
    headers = {}
    # OpenAI's headers: of the limit that refused, else of the tightest scope with that limit.
    for kind, field, index in (("requests", "rpm", 1), ("tokens", "tpm", 2)):
        best = None
        for other, other_limits, *debts in states:
            if getattr(other_limits, field) is None:
                continue
            allowance = getattr(other_limits, field)
            debt = debts[index - 1]  # seconds until its bucket is full again
            remaining = max(0, math.floor((MINUTE - debt) * allowance / MINUTE + 1e-9))
            candidate = (other is not scope or limit != field, remaining, allowance, debt)
            if best is None or candidate < best:
                best = candidate
        if best is not None:
            _, remaining, allowance, debt = best
            headers[f"x-ratelimit-limit-{kind}"] = str(allowance)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{kind}"] = reset_text(debt)
    requests_debt, tokens_debt = next(debts for other, _, *debts in states if other is scope)
    if limit == "rpm":
        wait = requests_debt + MINUTE / limits.rpm - MINUTE
        message = (f"Rate limit reached for {scope.what} on requests per min (RPM): Limit {limits.rpm}, "
                   f"Requested 1. Please try again in {reset_text(wait)}.")
    elif limit == "tpm":
        asked = min(reserve, limits.tpm)
        wait = tokens_debt + asked * MINUTE / limits.tpm - MINUTE
        message = (f"Rate limit reached for {scope.what} on tokens per min (TPM): Limit {limits.tpm}, "
                   f"Requested {reserve}. Please try again in {reset_text(wait)}.")
    else:
        wait = 1.0
        message = (f"Too many requests in flight for {scope.what}: Limit {limits.max_concurrent} at once "
                   f"(max_concurrent). Please try again once one has ended.")
    headers["Retry-After"] = str(max(1, math.ceil(wait - 1e-9)))
    if metrics is not None:
        metrics.limited(entry, scope.kind, limit)
    return LimitReached(message, model=entry.model_id, scope=scope.kind, limit=limit, headers=headers)
