"""
The usage seam: one suite run against both L{aibackend.usage.IUsageStore}s (a daemon's
SQLite file and the fleet's Redis, L{aibackend.redisusage.RedisUsage}: a real
redis-server of the module's own), called as the recorder's thread calls them; then what
the Redis side adds: a write tried again counts once, rows expire with the retention, a
Redis that cannot be reached is one of the store's problems (503 store_unavailable).
"""

from __future__ import annotations

import itertools
import json

import pytest
from zope.interface.verify import verifyObject

from aibackend.redisstore import RedisStore
from aibackend.redisusage import RedisUsage
from aibackend.testing import free_port
from aibackend.usage import FILENAME, QUERY_SECONDS, IUsageStore, Selection, UsageDatabase

NOW = 1_800_000_000.0  # a minute's start: 2027-01-15T08:00:00Z
_prefixes = itertools.count()


def figures(requests=1, client=0, server=0, cancelled=0, tokens_in=0, tokens_out=0, latency=0.1, most=None):
    """A row as the recorder hands it (by index: ok, client_errors, server_errors, cancelled, ...)."""
    return [requests - client - server - cancelled, client, server, cancelled, tokens_in, tokens_out,
            latency * requests, latency if most is None else most]


@pytest.fixture
def open_redis_store():
    """RedisStores (closed at the end) on a Redis URL, each with the test's prefix unless told."""
    from twisted.internet import reactor

    stores = []
    prefix = f"usagetest{next(_prefixes)}:"

    def open_(url, prefix=prefix):
        stores.append(RedisStore(reactor, url, prefix=prefix))
        return stores[-1]

    yield open_
    for store in stores:
        store.close()


@pytest.fixture(params=["sqlite", "redis"])
def any_usage(request, tmp_path, open_redis_store):
    """Each usage store, opened as often as asked on the same place (another process, another daemon)."""
    opened = []
    if request.param == "sqlite":
        def open_(retention_days=30):
            opened.append(UsageDatabase(str(tmp_path / FILENAME)))
            return opened[-1]
    else:
        url = request.getfixturevalue("redis_server").url
        store = open_redis_store(url)

        def open_(retention_days=30):
            opened.append(RedisUsage(store, retention_days))
            return opened[-1]
    yield open_
    for usage in opened:
        usage.close()


def read(usage, now=NOW + 120, **selection) -> dict:
    answer = json.loads(usage.read_json(Selection.parse(**selection), now))
    assert answer == usage.read(Selection.parse(**selection), now)
    return answer


# --- the seam: both stores ------------------------------------------------------------------


def test_each_store_provides_the_interface(any_usage):
    assert verifyObject(IUsageStore, any_usage())


def test_rows_are_added_and_summed_per_key_and_model(any_usage):
    usage = any_usage()
    usage.write({("alice", "a", NOW): figures(2, client=1, tokens_in=3, tokens_out=4, latency=0.1, most=0.15),
                 ("alice", "b", NOW): figures(1, server=1)}, None, 1)
    usage.write({("alice", "a", NOW): figures(1, cancelled=1, latency=0.3),
                 ("bob", "a", NOW + 60): figures(5, tokens_out=10, latency=0.2)}, None, 2)

    answer = read(usage)
    assert answer["count"] == 3 and answer["truncated"] is False and answer["group"] == "total"
    alice_a, alice_b, bob_a = answer["usage"]
    assert alice_a == {"key": "alice", "model": "a", "requests": 3, "ok": 1, "client_errors": 1, "server_errors": 0,
                       "cancelled": 1, "tokens_in": 3, "tokens_out": 4,
                       "latency_ms_mean": pytest.approx(166.667), "latency_ms_max": 300.0}
    assert (alice_b["key"], alice_b["model"], alice_b["server_errors"], alice_b["ok"]) == ("alice", "b", 1, 0)
    assert (bob_a["key"], bob_a["requests"], bob_a["tokens_out"], bob_a["latency_ms_max"]) == ("bob", 5, 10, 200.0)
    assert answer["totals"]["requests"] == 9 and answer["totals"]["latency_ms_max"] == 300.0
    assert (answer["since"], answer["until"]) == (None, "2027-01-15T08:02:00Z")


def test_a_query_filters_by_key_model_and_time_and_groups_by_minute(any_usage):
    usage = any_usage()
    usage.write({("alice", "a", NOW): figures(1), ("alice", "a", NOW + 60): figures(2),
                 ("bob", "a", NOW + 60): figures(4), ("alice", "b", NOW + 7200): figures(8)}, None, 1)
    later = NOW + 7300

    assert read(usage, later, key="alice")["totals"]["requests"] == 11
    assert read(usage, later, key="alice", model="a")["totals"]["requests"] == 3
    assert read(usage, later, model="a", since=str(NOW + 30))["totals"]["requests"] == 7  # its minute counts
    assert read(usage, later, until=str(NOW + 59))["totals"]["requests"] == 1
    assert read(usage, NOW + 60)["totals"]["requests"] == 7  # (until: now)
    assert read(usage, later, key="nobody") == {
        "since": None, "until": "2027-01-15T10:01:40Z", "group": "total", "key": "nobody", "model": None,
        "count": 0, "truncated": False, "usage": [],
        "totals": {"requests": 0, "ok": 0, "client_errors": 0, "server_errors": 0, "cancelled": 0, "tokens_in": 0,
                   "tokens_out": 0, "latency_ms_mean": None, "latency_ms_max": 0.0}}

    by_minute = read(usage, later, group="minute")
    assert [(row["minute"], row["key"], row["model"], row["requests"]) for row in by_minute["usage"]] == [
        ("2027-01-15T08:00:00Z", "alice", "a", 1), ("2027-01-15T08:01:00Z", "alice", "a", 2),
        ("2027-01-15T08:01:00Z", "bob", "a", 4), ("2027-01-15T10:00:00Z", "alice", "b", 8)]


def test_two_writers_on_one_place_add_up(any_usage):
    """Two processes of --processes N on one file, or two daemons of a fleet on one Redis."""
    one, two = any_usage(), any_usage()
    one.write({("alice", "a", NOW): figures(1, latency=0.5)}, None, 1)
    two.write({("alice", "a", NOW): figures(2, latency=0.1)}, None, 1)  # (its own numbers)
    (row,) = read(one)["usage"]
    assert (row["requests"], row["latency_ms_max"]) == (3, 500.0)
    assert read(two) == read(one)


def test_minutes_before_the_cutoff_are_forgotten(any_usage):
    usage = any_usage()
    usage.write({("alice", "a", NOW): figures(1), ("alice", "a", NOW + 60): figures(2)}, None, 1)
    usage.write({}, NOW + 60, 2)
    assert read(usage)["totals"]["requests"] == 2


def test_a_failed_query_is_a_503(any_usage):
    error = any_usage().unavailable("it failed")
    assert error.status == 503 and error.headers == {"Retry-After": "1"} and "it failed" in error.message


def test_a_query_over_the_widest_range_answers_as_a_narrow_one(any_usage, monkeypatch):
    """since 1970 and until 9999 (what Selection accepts): the same rows, in the same order, as the rows' own range."""
    monkeypatch.setattr("aibackend.redisusage.PAGE_ROWS", 2)  # (Redis: a minute's rows on three pages)
    usage = any_usage()
    # "a!" sorts before "a" in the index's members (the JSON text) but after it in the answer
    usage.write({(key, model, NOW + 60 * n): figures(n + 1) for n in range(3) for key in ("a", "a!", "b")
                 for model in ("m", "n")}, None, 1)
    usage.write({("a", "m", NOW + 86400 * 200): figures(7)}, None, 2)
    now = NOW + 86400 * 200 + 60
    for group in ("total", "minute"):
        narrow = read(usage, now, since=str(NOW), until=str(now), group=group)
        wide = read(usage, now, since="1970-01-01T00:00:00Z", until="9999-12-31T23:59:00Z", group=group)
        assert {**wide, "since": None, "until": None} == {**narrow, "since": None, "until": None}
        assert read(usage, now, group=group)["usage"] == narrow["usage"]
    assert narrow["count"] == 19 and narrow["totals"]["requests"] == 3 * 2 * 6 + 7
    assert [(row["minute"][11:16], row["key"], row["model"]) for row in narrow["usage"][:6]] == [
        ("08:00", "a", "m"), ("08:00", "a", "n"), ("08:00", "a!", "m"), ("08:00", "a!", "n"), ("08:00", "b", "m"),
        ("08:00", "b", "n")]


# --- Redis ---------------------------------------------------------------------------------


def test_a_batch_written_again_under_its_number_counts_once(redis_server, open_redis_store, monkeypatch):
    """A write whose answer was lost is tried again as it was: its chunks already added are not added again."""
    monkeypatch.setattr("aibackend.redisusage.CHUNK", 2)
    usage = RedisUsage(open_redis_store(redis_server.url), 30)
    rows = {("k", "a", NOW + 60 * n): figures(1) for n in range(5)}  # three chunks
    usage.write(rows, None, 7)
    usage.write(rows, None, 7)
    assert read(usage, NOW + 600)["totals"]["requests"] == 5
    usage.write({("k", "a", NOW): figures(1)}, None, 8)
    assert read(usage, NOW + 600)["totals"]["requests"] == 6
    other = RedisUsage(usage.store, 30)  # another writer: numbers of its own
    other.write({("k", "a", NOW): figures(1)}, None, 1)
    assert read(usage, NOW + 600)["totals"]["requests"] == 7
    usage.close(), other.close()


def test_rows_expire_with_the_retention_and_the_index_is_trimmed(redis_server, open_redis_store):
    store = open_redis_store(redis_server.url)
    usage = RedisUsage(store, 1)
    client = redis_server.client()
    now = float(client.time()[0] // 60 * 60)
    usage.write({("k", "a", now): figures(1), ("k", "a", now - 86400 - 60): figures(1)}, None, 1)
    kept = client.keys(f"{store.prefix}usage:\\[*")  # (a glob: [ escaped)
    assert kept == [f'{store.prefix}usage:[{int(now)}, "k", "a"]']  # the other had expired already
    assert 86400 - 120 < client.ttl(kept[0]) <= 86400
    assert client.zcard(f"{store.prefix}usage:index") == 2
    usage.write({}, now - 86400, 2)  # the hourly prune
    assert client.zrange(f"{store.prefix}usage:index", 0, -1) == [f'[{int(now)}, "k", "a"]']
    assert read(usage, now + 60)["totals"]["requests"] == 1
    usage.close()


def test_a_redis_that_cannot_be_reached_is_one_of_the_stores_problems(open_redis_store):
    usage = RedisUsage(open_redis_store(f"redis://127.0.0.1:{free_port()}/0"), 30)
    with pytest.raises(usage.problems):
        usage.write({("k", "a", NOW): figures(1)}, None, 1)
    with pytest.raises(usage.problems):
        usage.read(Selection(), NOW)
    error = usage.unavailable("ConnectionError: refused")
    assert (error.status, error.type) == (503, "store_unavailable")
    usage.close()


def counted_ranges(monkeypatch, usage, most=100) -> list:
    """The index reads (ZRANGEBYSCORE) of C{usage}'s client, counted; past C{most} they fail (not run for hours)."""
    calls = []
    real = usage._client.zrangebyscore

    def counting(*args, **kwargs):
        calls.append(args)
        if len(calls) > most:
            raise AssertionError(f"more than {most} ZRANGEBYSCORE round trips")
        return real(*args, **kwargs)

    monkeypatch.setattr(usage._client, "zrangebyscore", counting)
    return calls


def test_a_query_over_any_range_reads_the_index_a_page_of_rows_at_a_time(redis_server, open_redis_store,
                                                                         monkeypatch):
    """Not an hour at a time: since 1970 or until 9999 is one round trip for a few rows, not millions."""
    usage = RedisUsage(open_redis_store(redis_server.url), 30)
    usage.write({("k", "a", NOW): figures(1), ("k", "a", NOW + 86400 * 20): figures(2)}, None, 1)
    calls = counted_ranges(monkeypatch, usage)
    server = redis_server.client()
    for since, until in [(None, None), ("1970-01-01T00:00:00Z", None), (None, "9999-12-31T23:59:00Z"),
                         ("1970-01-01T00:00:00Z", "9999-12-31T23:59:00Z")]:
        for group in ("total", "minute"):
            del calls[:]
            commands = server.info("stats")["total_commands_processed"]
            answer = read(usage, NOW + 86400 * 21, since=since, until=until, group=group)  # (read twice)
            assert answer["totals"]["requests"] == 3
            assert len(calls) == 2  # one page each read
            assert server.info("stats")["total_commands_processed"] - commands <= 2 * 4 + 1
    monkeypatch.setattr("aibackend.redisusage.PAGE_ROWS", 2)
    usage.write({("k", "b", NOW + 60 * n): figures(1) for n in range(5)}, None, 2)  # 7 rows: 4 pages
    del calls[:]
    assert usage.read(Selection.parse(since="1970-01-01T00:00:00Z"), NOW + 86400 * 21)["totals"]["requests"] == 8
    assert len(calls) == 4
    usage.close()


def test_a_minute_of_more_rows_than_a_page_is_read_whole(redis_server, open_redis_store, monkeypatch):
    monkeypatch.setattr("aibackend.redisusage.PAGE_ROWS", 2)
    usage = RedisUsage(open_redis_store(redis_server.url), 30)
    usage.write({(f"k{n}", "a", NOW + 60 * (n // 5)): figures(n + 1) for n in range(10)}, None, 1)
    answer = read(usage, NOW + 600, group="minute")
    assert [(row["minute"][14:16], row["key"], row["requests"]) for row in answer["usage"]] == [
        ("00", f"k{n}", n + 1) for n in range(5)] + [("01", f"k{n}", n + 1) for n in range(5, 10)]
    assert answer["totals"]["requests"] == 55
    usage.close()


def test_a_query_stops_reading_once_its_time_is_up(redis_server, open_redis_store, monkeypatch):
    """The recorder has stopped waiting (503 after QUERY_SECONDS): the thread does not read on behind it."""
    monkeypatch.setattr("aibackend.redisusage.PAGE_ROWS", 1)
    times = iter([0.0, 1.0, QUERY_SECONDS + 0.5])  # when the read starts, after its first page, its second
    usage = RedisUsage(open_redis_store(redis_server.url), 30, seconds=lambda: next(times))
    usage.write({("k", "a", NOW + 60 * n): figures(1) for n in range(5)}, None, 1)
    calls = counted_ranges(monkeypatch, usage)
    with pytest.raises(usage.problems) as raised:
        usage.read(Selection(), NOW + 600)
    assert len(calls) == 2 and "did not finish within 10 s" in str(raised.value)
    assert usage.unavailable(str(raised.value)).status == 503
    usage.close()
