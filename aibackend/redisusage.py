"""
A fleet's usage in Redis (issue 19 item 1): with C{--store redis://...}, every daemon of
the fleet (and every process of C{--processes N}: each writes its own) adds its usage
rows to the shared store's Redis instead of its own C{usage.sqlite3}, so C{/get/usage} on
any of them answers the fleet's sums.

L{RedisUsage} is an L{aibackend.usage.IUsageStore}, as L{aibackend.usage.UsageDatabase}
is: the same L{aibackend.usage.UsageRecorder} sums the requests in memory per (key,
model, minute) and hands it batches, one at a time, on its own thread (never the
reactor's), through a client of its own (one connection: L{RedisStore.client
<aibackend.redisstore.RedisStore.client>}); a query is read on that thread too.

In Redis, under the store's prefix (C{aibackend:} unless configured):

  - C{PREFIX}usage:[MINUTE,"KEY","MODEL"] (the JSON text of the row's place), a hash per
    (key, model, minute): C{requests}, C{client_errors}, C{server_errors}, C{cancelled},
    C{tokens_in}, C{tokens_out} (C{HINCRBY}), C{latency_sum} (C{HINCRBYFLOAT}),
    C{latency_max} (the largest); it expires at its minute plus the retention
    (C{usage_retention_days}, C{EXPIREAT}): bounded without a sweep;
  - C{PREFIX}usage:index, a sorted set: each row's place, scored by its minute, which a
    query reads L{PAGE_ROWS} rows at a time (however wide its range); trimmed past the
    retention (C{ZREMRANGEBYSCORE}) by the recorder's hourly prune;
  - C{PREFIX}usage:written:WRITER, per recorder (a random id): the number of the last
    chunk of rows it added (expiring a day after its last write).

A batch is written in one pipeline of L{ADD} scripts, one per L{CHUNK} rows (atomic each:
a chunk is added whole or not at all, without holding Redis for long). A write whose
answer was lost (a timeout, a connection cut, a paused Redis that runs it later) is tried
again with the same rows under the same numbers (the recorder keeps a failed batch as it
was): a chunk whose number is not past the writer's last is not added again, so a row
counts once. Chunks are numbered in order and a writer writes one batch at a time, so the
last number is all that must be kept.

Redis down: the rows wait in the recorder's bounded memory (at most
L{aibackend.usage.MAX_PENDING_ROWS}; past it drops counted and logged once), tried again
every second, written once Redis answers; C{/get/usage} answers 503 C{store_unavailable}.

What a query sees: what every process of the fleet has written, and this process's
pending rows (written first); another process's last second may not be there yet. A
daemon's retention applies to the rows it writes (give the fleet one C{usage_retention_days}).
The C{aibackend_usage_*} metrics stay each process's own.
"""

from __future__ import annotations

import json
import math
import secrets
import time

from zope.interface import implementer

from aibackend.redisstore import StoreUnavailable
from aibackend.usage import (
    CANCELLED, CLIENT_ERRORS, LATENCY_MAX, LATENCY_SUM, MAX_ROWS, OK, SERVER_ERRORS, TOKENS_IN, TOKENS_OUT,
    QUERY_SECONDS, IUsageStore, Selection, answer, iso, recorder_for,
)

CHUNK = 500  # rows per script: Redis runs one in about a millisecond
PAGE_ROWS = 1000  # a query reads the index this many rows at a time (and their hashes: one pipeline)
WRITTEN_SECONDS = 86400  # how long a writer's last chunk number is kept after its last write
FIELDS = ("requests", "client_errors", "server_errors", "cancelled", "tokens_in", "tokens_out", "latency_sum",
          "latency_max")

# KEYS: the index, the writer's last chunk number, then each row's hash. ARGV: the chunk's number, how long
# the number is kept, the retention (seconds), then per row: its place (the index's member), its minute,
# requests, client_errors, server_errors, cancelled, tokens_in, tokens_out, latency_sum, latency_max.
# The rows added: 1, or 0 when the chunk was (its number is not past the last).
ADD = """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local chunk = tonumber(ARGV[1])
if chunk <= last then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
local retention = tonumber(ARGV[3])
for i = 3, #KEYS do
  local h, a = KEYS[i], 3 + (i - 3) * 10
  local minute = tonumber(ARGV[a + 2])
  redis.call('HINCRBY', h, 'requests', ARGV[a + 3])
  redis.call('HINCRBY', h, 'client_errors', ARGV[a + 4])
  redis.call('HINCRBY', h, 'server_errors', ARGV[a + 5])
  redis.call('HINCRBY', h, 'cancelled', ARGV[a + 6])
  redis.call('HINCRBY', h, 'tokens_in', ARGV[a + 7])
  redis.call('HINCRBY', h, 'tokens_out', ARGV[a + 8])
  redis.call('HINCRBYFLOAT', h, 'latency_sum', ARGV[a + 9])
  local most = redis.call('HGET', h, 'latency_max')
  if (not most) or tonumber(ARGV[a + 10]) > tonumber(most) then
    redis.call('HSET', h, 'latency_max', ARGV[a + 10])
  end
  redis.call('EXPIREAT', h, minute + retention)
  redis.call('ZADD', KEYS[1], minute, ARGV[a + 1])
end
return 1
"""


@implementer(IUsageStore)
class RedisUsage:
    """
    The usage rows in the shared store's Redis (see the module).

    @param store: the L{aibackend.redisstore.RedisStore}: its Redis, prefix and options.
    @param retention_days: how long a row is kept (its hash expires then).
    @param seconds: C{() -> float}, a monotonic clock read on the recorder's thread: when a
        query's time is up (L{read}).
    """

    def __init__(self, store, retention_days: float, *, seconds=time.monotonic):
        self.store = store
        self.problems = store.failures
        self.retention = int(retention_days * 86400)
        self.prefix = store.prefix + "usage:"
        self.index = self.prefix + "index"
        self.writer = secrets.token_hex(8)
        self._written_key = f"{self.prefix}written:{self.writer}"
        self._client = store.client()
        self._seconds = seconds
        self._add = self._client.register_script(ADD)

    def _hash(self, member: str) -> str:
        return self.prefix + member

    def write(self, rows: dict, cutoff: float | None, batch: int) -> None:
        """L{IUsageStore.write}: the rows in chunks, one pipeline; the index trimmed before C{cutoff}."""
        pipe = self._client.pipeline(transaction=False)
        places = list(rows.items())
        for number, start in enumerate(range(0, len(places), CHUNK)):
            keys, args = [self.index, self._written_key], [batch * 1000 + number, WRITTEN_SECONDS, self.retention]
            for (key, model, minute), row in places[start:start + CHUNK]:
                member = json.dumps([int(minute), key, model])
                keys.append(self._hash(member))
                args += [member, int(minute),
                         row[OK] + row[CLIENT_ERRORS] + row[SERVER_ERRORS] + row[CANCELLED], row[CLIENT_ERRORS],
                         row[SERVER_ERRORS], row[CANCELLED], row[TOKENS_IN], row[TOKENS_OUT],
                         repr(float(row[LATENCY_SUM])), repr(float(row[LATENCY_MAX]))]
            self._add(keys=keys, args=args, client=pipe)
        if cutoff is not None:
            pipe.zremrangebyscore(self.index, "-inf", f"({int(cutoff)}")
        pipe.execute()

    def read(self, selection: Selection, now: float) -> dict:
        """
        The fleet's rows that L{selection} asks for, summed as L{aibackend.usage.UsageDatabase.read} does.

        The index is read L{PAGE_ROWS} rows at a time, by rank from where the page before
        ended (not by hours of minutes: any range, since 1970 or until 9999, is as many
        round trips as its rows make pages), each page's hashes in one pipeline.

        @raise TimeoutError: the read took longer than L{aibackend.usage.QUERY_SECONDS}
            (the recorder answered 503 already): the rest is not read.
        """
        deadline = self._seconds() + QUERY_SECONDS
        since = selection.since
        until = now if selection.until is None else selection.until
        low = "-inf" if since is None else int(since // 60 * 60)  # (the index's scores are whole minutes)
        high = int(until)
        skip, seen = 0, set()  # the ranks of score low that the pages before read, and their rows
        by_minute = selection.group == "minute"
        sums: dict = {}  # (key, model) -> figures
        rows: list = []  # by minute: the rows so far (at most MAX_ROWS + 1), in order
        minutes: dict = {}  # by minute: (minute, key, model) -> figures, of the minutes not yet whole
        total = None
        while True:
            members = self._client.zrangebyscore(self.index, low, high, start=skip, num=PAGE_ROWS,
                                                 withscores=True)
            places = []
            for member, _ in members:
                if member in seen:  # read already: a row added since, ahead of it in the index, pushed it here
                    continue
                minute, key, model = json.loads(member)
                if selection.key is not None and key != selection.key:
                    continue
                if selection.model is not None and model != selection.model:
                    continue
                places.append((minute, key, model, member))
            if places:
                pipe = self._client.pipeline(transaction=False)
                for *_, member in places:
                    pipe.hmget(self._hash(member), FIELDS)
                for (minute, key, model, _), found in zip(places, pipe.execute()):
                    if found[0] is None:  # expired since the index was read
                        continue
                    figures = [int(value) for value in found[:6]] + [float(found[6]), float(found[7])]
                    total = _added(total, figures)
                    if by_minute:
                        minutes[(minute, key, model)] = _added(minutes.get((minute, key, model)), figures)
                    else:
                        sums[(key, model)] = _added(sums.get((key, model)), figures)
            if len(members) < PAGE_ROWS:
                break
            last = int(members[-1][1])
            if by_minute:  # the minutes before the page's last are whole: in order (not the index's)
                rows += _in_order(minutes, rows, before=last)
            at_last = {member for member, score in members if score == last}
            skip, seen = (skip, seen) if last == low else (0, set())
            skip, seen, low = skip + len(at_last), seen | at_last, last
            if self._seconds() > deadline:
                raise TimeoutError(f"the usage query did not finish within {QUERY_SECONDS:g} s")
        if by_minute:
            rows += _in_order(minutes, rows)
        else:
            rows = [({"key": key, "model": model}, figures) for (key, model), figures in sorted(sums.items())]
        return answer(selection, until, rows, truncated=len(rows) > MAX_ROWS, totals=total)

    def read_json(self, selection: Selection, now: float) -> bytes:
        return json.dumps(self.read(selection, now)).encode()

    def unavailable(self, message: str) -> StoreUnavailable:
        return StoreUnavailable(f"the shared store (Redis) cannot answer the usage query ({message}): the "
                                f"fleet's usage is read once it answers again; try again")

    def close(self) -> None:
        self._client.close()


def _in_order(minutes: dict, rows: list, before: float = math.inf) -> list:
    """
    The by-minute rows of C{minutes} before the minute C{before} (all: by default), taken out
    of it, in order; none once C{rows} holds more than L{MAX_ROWS} (the answer is truncated).
    """
    done = sorted(place for place in minutes if place[0] < before)
    taken = [(place, minutes.pop(place)) for place in done]
    if len(rows) > MAX_ROWS:
        return []
    return [({"key": key, "model": model, "minute": iso(minute)}, figures)
            for (minute, key, model), figures in taken]


def _added(figures: list | None, more: list) -> list:
    """C{figures} (requests, client_errors, ..., latency_sum, latency_max) with C{more} added (a new list if None)."""
    if figures is None:
        return list(more)
    for index in range(7):
        figures[index] += more[index]
    figures[7] = max(figures[7], more[7])
    return figures


def open_redis_usage(reactor, store, retention_days: float):
    """The recorder of the fleet's usage in C{store}'s Redis (L{RedisUsage}), with a thread of its own."""
    return recorder_for(reactor, RedisUsage(store, retention_days), retention_days)
