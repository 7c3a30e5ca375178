"""
aibackend.usage on a Clock, with a real SQLite file in tmp_path: requests aggregated per
(key, model, minute), written a second later in a thread (here: a writer the test runs or
holds), bounded in memory when the writer is stuck, the retention, queries and their
filters, the /metrics families and their label cap, and what stopping leaves.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface.verify import verifyObject

from aibackend import errors
from aibackend.config import ConfigError, parse_config
from aibackend.policy import Call, Caller, IUsageRecorder, Policy, TokenCount
from aibackend.testing import failure_of, has_fired, result_of
from aibackend.usage import (
    ANONYMOUS, FILENAME, FLUSH_SECONDS, OFF_GRACE_SECONDS, OTHER, QUERY_SECONDS, STOP_SECONDS, IUsageReader,
    Selection, UsageCollector, UsageDatabase, UsageRecorder, UsageUnavailable,
)

ALICE = Caller("alice")
BOB = Caller("bob")
NOW = 1_800_000_000.0  # a minute's start: 2027-01-15T08:00:00Z


class Writer:
    """
    The recorder's thread, as the test runs it: each call waits in C{calls} until
    L{run} (or at once, C{held=False}); L{fail_next} makes the next call raise.
    """

    def __init__(self, held: bool = False):
        self.held = held
        self.calls: list = []
        self.failures: list = []

    def __call__(self, function, *args):
        if not self.held:
            return self._run(function, args)
        d = Deferred()
        self.calls.append((function, args, d))
        return d

    def _run(self, function, args):
        if self.failures:
            error = self.failures.pop(0)

            def function(*args):
                raise error
        return maybeDeferred(function, *args)

    def fail_next(self, error: Exception) -> None:
        self.failures.append(error)

    def run(self) -> None:
        """Run what waits (and what that makes wait), in order."""
        while self.calls:
            function, args, d = self.calls.pop(0)
            self._run(function, args).chainDeferred(d)


@pytest.fixture
def database(tmp_path):
    db = UsageDatabase(str(tmp_path / FILENAME))
    yield db
    db.close()


def recorder_of(clock, database, writer=None, **options) -> UsageRecorder:
    clock.advance(NOW - clock.seconds())
    recorder = UsageRecorder(clock, database, in_thread=writer or Writer(), **options)
    recorder.start()
    return recorder


def stopped(recorder) -> None:
    result_of(recorder.stop())


def rows(path) -> list:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT key_name, model, minute, requests, client_errors, server_errors, cancelled,"
                          " tokens_in, tokens_out, latency_sum, latency_max FROM usage_minutes"
                          " ORDER BY minute, key_name, model").fetchall()


def query(recorder, **selection) -> dict:
    return json.loads(result_of(recorder.query(Selection.parse(**selection))))


def tokens(prompt, completion) -> TokenCount:
    count = TokenCount(reserve=100)
    count.prompt, count.completion = prompt, completion
    return count


def test_the_recorder_and_its_reader_provide_their_interfaces(clock, database):
    recorder = recorder_of(clock, database)
    assert verifyObject(IUsageRecorder, recorder) and verifyObject(IUsageReader, recorder)
    stopped(recorder)


def test_requests_are_summed_per_key_model_and_minute_and_written_a_second_later(clock, database):
    recorder = recorder_of(clock, database)
    recorder.record(ALICE, "chat", 200, 0.25, tokens(10, 5))
    recorder.record(ALICE, "chat", 200, 0.75, tokens(3, None))
    recorder.record(ALICE, "iris", 404, 0.01, None)
    recorder.record(None, "chat", 503, 0.5, tokens(None, None))
    assert rows(database.path) == []  # nothing written on the request path

    clock.advance(FLUSH_SECONDS)
    assert rows(database.path) == [
        ("-", "chat", NOW, 1, 0, 1, 0, 0, 0, 0.5, 0.5),
        ("alice", "chat", NOW, 2, 0, 0, 0, 13, 5, 1.0, 0.75),
        ("alice", "iris", NOW, 1, 1, 0, 0, 0, 0, 0.01, 0.01),
    ]
    assert clock.getDelayedCalls() == []  # nothing pending: no timer

    # The same minute again adds to its row; the next minute has its own.
    recorder.record(ALICE, "chat", 200, 1.5, tokens(1, 1))
    clock.advance(FLUSH_SECONDS)
    clock.advance(60)
    recorder.record(ALICE, "chat", 200, 0.1, None)
    clock.advance(FLUSH_SECONDS)
    assert [row for row in rows(database.path) if row[:2] == ("alice", "chat")] == [
        ("alice", "chat", NOW, 3, 0, 0, 0, 14, 6, 2.5, 1.5),
        ("alice", "chat", NOW + 60, 1, 0, 0, 0, 0, 0, 0.1, 0.1),
    ]
    stopped(recorder)


def test_statuses_are_ok_client_errors_server_errors_or_cancelled(clock, database):
    recorder = recorder_of(clock, database)
    for status in (200, 201, 304, 400, 401, 403, 404, 429, 499, 500, 502, 503, 504):
        recorder.record(BOB, "m", status, 0.001, None)
    (row,) = query(recorder)["usage"]
    assert (row["requests"], row["ok"], row["client_errors"], row["server_errors"], row["cancelled"]) == (
        13, 3, 5, 4, 1)
    stopped(recorder)


def test_the_table_has_one_row_per_key_model_and_minute_however_many_requests(clock, database):
    recorder = recorder_of(clock, database)
    for _ in range(5):
        for _ in range(100):
            recorder.record(ALICE, "chat", 200, 0.01, None)
        clock.advance(FLUSH_SECONDS)
    assert [row[:4] for row in rows(database.path)] == [("alice", "chat", NOW, 500)]
    stopped(recorder)


def test_the_database_is_the_owners_alone(tmp_path):
    database = UsageDatabase(str(tmp_path / "state" / FILENAME))
    database.close()
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(database.path).st_mode) == 0o600


def test_two_recorders_on_one_database_add_up(clock, tmp_path):
    """As --processes N does: each process writes its own, a query sees them all."""
    path = str(tmp_path / FILENAME)
    first, second = UsageDatabase(path), UsageDatabase(path)
    one, two = recorder_of(clock, first), recorder_of(clock, second)
    one.record(ALICE, "chat", 200, 0.5, tokens(2, 3))
    two.record(ALICE, "chat", 500, 1.0, tokens(4, 0))
    clock.advance(FLUSH_SECONDS)
    (row,) = query(one)["usage"]
    assert (row["requests"], row["server_errors"], row["tokens_in"], row["tokens_out"], row["latency_ms_max"]) == (
        2, 1, 6, 3, 1000.0)
    stopped(one)
    stopped(two)


# --- a slow or stuck store ---------------------------------------------------------


def test_one_write_at_a_time_and_memory_bounded_while_the_writer_is_stuck(clock, database):
    writer = Writer(held=True)
    recorder = recorder_of(clock, database, writer, max_pending=3)
    writer.run()  # the retention's delete at start
    recorder.record(ALICE, "a", 200, 0.1, None)
    clock.advance(FLUSH_SECONDS)
    assert len(writer.calls) == 1 and recorder.unwritten == 1  # being written, and stuck

    # Requests of the rows in memory are counted; new rows past the cap are not kept.
    for minute in range(5):
        recorder.record(ALICE, "a", 200, 0.1, None)
        recorder.record(BOB, "a", 200, 0.1, None)
        clock.advance(60)
    assert len(writer.calls) == 1  # the one write in progress: no other one started
    assert recorder.unwritten == 3 and recorder.dropped == 8
    assert recorder.totals[("alice", "a")][0] == 6  # the metrics count them all

    writer.run()
    clock.advance(FLUSH_SECONDS)
    writer.run()
    written = rows(database.path)
    assert [row[:4] for row in written] == [("alice", "a", NOW, 2), ("bob", "a", NOW, 1)]
    assert recorder.unwritten == 0 and clock.getDelayedCalls() == []
    stopped_with(writer, recorder)


def stopped_with(writer, recorder) -> None:
    d = recorder.stop()
    writer.run()
    result_of(d)


def test_the_drop_is_logged_once_until_writes_succeed_again(clock, database, capture_events):
    writer = Writer(held=True)
    recorder = recorder_of(clock, database, writer, max_pending=1)
    writer.run()
    recorder.record(ALICE, "a", 200, 0.1, None)
    clock.advance(FLUSH_SECONDS)
    for key in ("b", "c", "d"):
        recorder.record(Caller(key), "a", 200, 0.1, None)
    warnings = [event for event in capture_events if "not kept" in event["log_format"]]
    assert len(warnings) == 1
    writer.run()
    assert any("written again" in event["log_format"] for event in capture_events)
    assert recorder.dropped == 3
    stopped_with(writer, recorder)


@pytest.fixture
def capture_events():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_a_failed_write_keeps_its_rows_for_the_next_one(clock, database, capture_events):
    writer = Writer()
    recorder = recorder_of(clock, database, writer)
    recorder.record(ALICE, "a", 200, 0.1, tokens(1, 2))
    writer.fail_next(sqlite3.OperationalError("disk I/O error"))
    clock.advance(FLUSH_SECONDS)
    assert rows(database.path) == [] and recorder.failed_writes == 1
    said = [event for event in capture_events if "could not be written" in event["log_format"]]
    assert len(said) == 1 and said[0]["why"] == "disk I/O error"
    recorder.record(ALICE, "a", 500, 0.3, tokens(4, 0))
    writer.fail_next(sqlite3.OperationalError("disk I/O error"))
    clock.advance(FLUSH_SECONDS)  # tried again, with what came since: said once
    assert len([event for event in capture_events if "could not be written" in event["log_format"]]) == 1
    clock.advance(FLUSH_SECONDS)
    assert rows(database.path) == [("alice", "a", NOW, 2, 0, 1, 0, 5, 2, 0.4, 0.3)]
    assert any("written again" in event["log_format"] for event in capture_events)
    stopped(recorder)


def test_a_query_waits_for_the_store_at_most_a_while(clock, database):
    writer = Writer(held=True)
    recorder = recorder_of(clock, database, writer)
    writer.run()
    recorder.record(ALICE, "a", 200, 0.1, None)
    clock.advance(FLUSH_SECONDS)  # stuck
    d = recorder.query(Selection())
    clock.advance(QUERY_SECONDS)
    error = failure_of(d, UsageUnavailable).value
    assert error.status == 503 and error.headers == {"Retry-After": "1"}
    assert "did not answer within 10 s" in error.message
    stopped_with(writer, recorder)


def test_a_store_that_fails_a_query_answers_503(clock, database):
    writer = Writer()
    recorder = recorder_of(clock, database, writer)
    writer.fail_next(sqlite3.OperationalError("database is locked"))  # the flush: nothing to write, not called
    writer.failures.clear()
    d = recorder.flush()
    result_of(d)
    writer.fail_next(sqlite3.OperationalError("database is locked"))
    error = failure_of(recorder.query(Selection()), UsageUnavailable).value
    assert error.message == "the usage store failed: database is locked"
    stopped(recorder)


# --- the retention -------------------------------------------------------------------


def test_rows_past_the_retention_are_deleted_at_start_and_hourly(clock, database):
    recorder = recorder_of(clock, database, retention_days=1)
    recorder.record(ALICE, "a", 200, 0.1, None)
    clock.advance(FLUSH_SECONDS)
    stopped(recorder)

    # A day and a minute later, a new recorder deletes it at start.
    clock.advance(86400 + 60)
    later = UsageRecorder(clock, UsageDatabase(database.path), in_thread=Writer(), retention_days=1)
    later.record(BOB, "a", 200, 0.1, None)
    later.start()
    assert [row[0] for row in rows(database.path)] == ["bob"]

    # Hourly while it writes.
    clock.advance(1800)
    later.record(ALICE, "b", 200, 0.1, None)
    clock.advance(FLUSH_SECONDS)
    assert [row[0] for row in rows(database.path)] == ["bob", "alice"]  # the last delete was half an hour ago
    clock.advance(86400 - 1800 + 60)
    later.record(Caller("carol"), "b", 200, 0.1, None)
    clock.advance(FLUSH_SECONDS)
    assert [row[0] for row in rows(database.path)] == ["alice", "carol"]  # bob's minute is more than a day old
    stopped(later)


# --- queries -----------------------------------------------------------------------------


def test_a_query_sums_per_key_and_model_what_is_not_written_yet_included(clock, database):
    recorder = recorder_of(clock, database)
    recorder.record(ALICE, "chat", 200, 0.2, tokens(10, 20))
    clock.advance(FLUSH_SECONDS)
    clock.advance(60)
    recorder.record(ALICE, "chat", 400, 0.4, tokens(1, 0))
    recorder.record(None, "iris", 200, 0.001, None)
    answer = query(recorder)  # the second minute is still pending: written first
    assert answer == {
        "since": None, "until": "2027-01-15T08:01:01Z", "group": "total", "key": None, "model": None,
        "count": 2, "truncated": False,
        "totals": {"requests": 3, "ok": 2, "client_errors": 1, "server_errors": 0, "cancelled": 0,
                   "tokens_in": 11, "tokens_out": 20, "latency_ms_mean": 200.333, "latency_ms_max": 400.0},
        "usage": [
            {"key": ANONYMOUS, "model": "iris", "requests": 1, "ok": 1, "client_errors": 0, "server_errors": 0,
             "cancelled": 0, "tokens_in": 0, "tokens_out": 0, "latency_ms_mean": 1.0, "latency_ms_max": 1.0},
            {"key": "alice", "model": "chat", "requests": 2, "ok": 1, "client_errors": 1, "server_errors": 0,
             "cancelled": 0, "tokens_in": 11, "tokens_out": 20, "latency_ms_mean": 300.0, "latency_ms_max": 400.0},
        ],
    }
    stopped(recorder)


def test_a_query_filters_by_key_model_and_time_and_groups_by_minute(clock, database):
    recorder = recorder_of(clock, database)
    for minute in range(3):
        recorder.record(ALICE, "chat", 200, 0.1, None)
        recorder.record(BOB, "chat", 200, 0.1, None)
        recorder.record(ALICE, "iris", 200, 0.1, None)
        clock.advance(60)

    def pairs(**selection):
        return [(row["key"], row["model"], row["requests"]) for row in query(recorder, **selection)["usage"]]

    assert pairs(key="alice") == [("alice", "chat", 3), ("alice", "iris", 3)]
    assert pairs(model="chat") == [("alice", "chat", 3), ("bob", "chat", 3)]
    assert pairs(key="alice", model="iris") == [("alice", "iris", 3)]
    assert pairs(key="carol") == []
    # A minute is in a window it overlaps: since inside the first minute takes it.
    assert pairs(model="iris", since=str(NOW + 59)) == [("alice", "iris", 3)]
    assert pairs(model="iris", since=str(NOW + 60)) == [("alice", "iris", 2)]
    assert pairs(model="iris", since="2027-01-15T08:01:00Z", until="2027-01-15T08:01:30") == [("alice", "iris", 1)]
    assert pairs(model="iris", until=str(NOW - 1)) == []

    by_minute = query(recorder, key="bob", group="minute")
    assert [(row["minute"], row["requests"]) for row in by_minute["usage"]] == [
        ("2027-01-15T08:00:00Z", 1), ("2027-01-15T08:01:00Z", 1), ("2027-01-15T08:02:00Z", 1)]
    assert by_minute["totals"]["requests"] == 3 and by_minute["group"] == "minute"
    stopped(recorder)


@pytest.mark.parametrize("where", [
    "minute <= ? AND minute >= ?", "minute <= ? AND minute >= ? AND key_name = ?",
    "minute <= ? AND minute >= ? AND model = ?", "minute <= ? AND key_name = ? AND model = ?",
])
def test_queries_search_an_index_never_the_whole_table(database, where):
    plan = database.connection.execute(
        f"EXPLAIN QUERY PLAN SELECT key_name, model, sum(requests) FROM usage_minutes WHERE {where}"
        " GROUP BY key_name, model", (1,) * where.count("?")).fetchall()
    assert plan[0][3].startswith("SEARCH usage_minutes USING "), plan


@pytest.mark.parametrize("selection, message", [
    ({"since": "yesterday"}, "since must be seconds since the epoch or an ISO 8601 time, got 'yesterday'"),
    ({"until": "2027-13-01"}, "until must be seconds since the epoch or an ISO 8601 time, got '2027-13-01'"),
    ({"since": "nan"}, "since must be a finite time, got 'nan'"),
    ({"since": "200", "until": "100"}, "since (200) is after until (100)"),
    ({"group": "hour"}, "group must be one of total, minute, got 'hour'"),
    ({"key": ""}, "key is empty: give a key or leave it out"),
    ({"model": ""}, "model is empty: give a model or leave it out"),
])
def test_a_bad_selection_is_a_400_that_says_why(selection, message):
    with pytest.raises(errors.BadRequest) as raised:
        Selection.parse(**selection)
    assert raised.value.message == message and raised.value.status == 400


def test_times_far_away_are_bounded(clock, database):
    recorder = recorder_of(clock, database)
    recorder.record(ALICE, "a", 200, 0.1, None)
    assert query(recorder, since="-1e30", until="1e300")["count"] == 1
    stopped(recorder)


# --- /metrics -------------------------------------------------------------------------------


def scrape(recorder) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(UsageCollector(recorder))
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples}


def test_the_metrics_count_requests_tokens_and_latency_per_key_and_model(clock, database):
    recorder = recorder_of(clock, database)
    recorder.record(ALICE, "chat", 200, 0.25, tokens(7, 9))
    recorder.record(ALICE, "chat", 499, 0.5, None)
    recorder.record(None, "chat", 502, 1.0, None)
    samples = scrape(recorder)
    alice = (("key", "alice"), ("model", "chat"))

    def sample(name, *labels, who=alice):
        return samples[(name, tuple(sorted(who + labels)))]

    assert sample("aibackend_usage_requests_total", ("outcome", "ok")) == 1
    assert sample("aibackend_usage_requests_total", ("outcome", "cancelled")) == 1
    assert sample("aibackend_usage_requests_total", ("outcome", "client_error")) == 0
    assert sample("aibackend_usage_requests_total", ("outcome", "server_error"),
                  who=(("key", "-"), ("model", "chat"))) == 1
    assert sample("aibackend_usage_tokens_total", ("direction", "in")) == 7
    assert sample("aibackend_usage_tokens_total", ("direction", "out")) == 9
    assert sample("aibackend_usage_latency_seconds_count") == 2
    assert sample("aibackend_usage_latency_seconds_sum") == 0.75
    assert samples[("aibackend_usage_dropped_total", ())] == 0
    assert samples[("aibackend_usage_unwritten_rows", ())] == 2
    clock.advance(FLUSH_SECONDS)
    assert scrape(recorder)[("aibackend_usage_unwritten_rows", ())] == 0
    stopped(recorder)


def test_past_the_series_cap_keys_are_other(clock, database):
    recorder = recorder_of(clock, database, max_series=2)
    for name in ("a", "b", "c", "d"):
        recorder.record(Caller(name), "chat", 200, 0.1, None)
    recorder.record(Caller("e"), "iris", 200, 0.1, None)
    keys = {(dict(labels)["key"], dict(labels)["model"])
            for (name, labels), _ in scrape(recorder).items() if name == "aibackend_usage_requests_total"}
    assert keys == {("a", "chat"), ("b", "chat"), (OTHER, "chat"), (OTHER, "iris")}
    assert scrape(recorder)[("aibackend_usage_requests_total",
                             (("key", OTHER), ("model", "chat"), ("outcome", "ok")))] == 2
    # The store keeps every key.
    assert {row["key"] for row in query(recorder)["usage"]} == {"a", "b", "c", "d", "e"}
    stopped(recorder)


# --- the policy, and stopping -----------------------------------------------------------------


def test_the_policy_records_each_call_once(clock, database):
    recorder = recorder_of(clock, database)
    policy = Policy(usage=recorder)
    call = Call(ALICE, "chat", tokens(1, 2), None)
    policy.settle(call, 200, 0.5)
    policy.settle(call, 200, 0.5)
    assert recorder.totals[("alice", "chat")] == [1, 0, 0, 0, 1, 2, 0.5]
    stopped(recorder)


def test_record_never_raises(clock, database, logged_errors):
    recorder = recorder_of(clock, database)
    recorder.record(ALICE, "chat", "not a status", 0.5, None)  # a bug upstream: logged, not raised
    assert len(logged_errors.flush(TypeError)) == 1
    stopped(recorder)


def test_stopping_writes_what_is_pending_and_then_nothing(clock, database):
    recorder = recorder_of(clock, database)
    recorder.record(ALICE, "chat", 200, 0.5, None)
    assert clock.getDelayedCalls() != []
    d = recorder.stop()
    assert has_fired(d) and clock.getDelayedCalls() == []
    assert [row[:4] for row in rows(database.path)] == [("alice", "chat", NOW, 1)]
    recorder.record(ALICE, "chat", 200, 0.5, None)  # too late: not kept, no timer
    assert clock.getDelayedCalls() == [] and recorder.unwritten == 0
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        database.read(Selection(), NOW)


def test_stopping_waits_for_a_stuck_write_at_most_a_while(clock, database, capture_events):
    writer = Writer(held=True)
    recorder = recorder_of(clock, database, writer)
    writer.run()
    recorder.record(ALICE, "chat", 200, 0.5, None)
    d = recorder.stop()
    assert not has_fired(d)
    clock.advance(STOP_SECONDS)
    assert has_fired(d) and clock.getDelayedCalls() == []
    assert any("did not answer within" in event["log_format"] for event in capture_events)
    writer.run()  # the hung write ends: nothing else is done


def test_a_recorder_never_started_closes_its_database(clock, database):
    recorder = UsageRecorder(clock, database, in_thread=Writer(held=True))
    result_of(recorder.stop())
    with pytest.raises(sqlite3.ProgrammingError):
        database.read(Selection(), NOW)


# --- the configuration ------------------------------------------------------------------------


def test_usage_is_unset_true_or_false_and_its_retention_is_bounded():
    assert parse_config({}).server.usage is None
    assert parse_config({"server": {"usage": False}}).server.usage is False
    assert parse_config({"server": {"usage": True, "usage_retention_days": 7}}).server.usage_retention_days == 7
    assert parse_config({}).server.usage_retention_days == 30
    with pytest.raises(ConfigError) as raised:
        parse_config({"server": {"usage": "on", "usage_retention_days": 0}})
    assert raised.value.problems == [("server.usage", "must be true or false, got a string"),
                                     ("server.usage_retention_days", "must be at least 1, got 0")]


# --- the daemon's wiring ------------------------------------------------------------------------


def test_the_recorder_stops_once_every_other_service_has(clock):
    """What the registry drains on stop is recorded: the usage service stops last (daemon.Root.outer)."""
    from twisted.application import service

    from aibackend.daemon import Root

    draining = Deferred()
    order = []

    class Draining(service.Service):
        def stopService(self):
            super().stopService()
            order.append("models")
            return draining

    class Last(service.Service):
        def startService(self):
            super().startService()
            order.append("usage started")

        def stopService(self):
            super().stopService()
            order.append("usage")

    root = Root()
    Draining().setServiceParent(root)
    root.outer.append(Last())
    root.startService()
    assert order == ["usage started"]
    stopping = root.stopService()
    assert order == ["usage started", "models"] and not has_fired(stopping)
    draining.callback(None)
    assert order == ["usage started", "models", "usage"] and has_fired(stopping)


def test_the_daemon_has_a_policy_with_usage_when_usage_is_on_or_keys_are_set(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from aibackend.daemon import build
    from aibackend.store import MemoryStore

    def policy_of(server: dict):
        cfg = parse_config({"server": server}, environ={})
        built = build(cfg, MemoryReactorClock(), listen=[], max_body_bytes=10, store=MemoryStore(), environ={},
                      state_dir=str(tmp_path))
        return built.parts.front_door.core.policy

    assert policy_of({}) is None
    assert policy_of({"usage": False, "api_keys": ["k" * 16]}) is None
    for server in ({"usage": True}, {"api_keys": ["k" * 16]}):
        policy = policy_of(server)
        # (the limiter is the daemon's one, idle while no key or model has limits)
        assert isinstance(policy.usage, UsageRecorder) and policy.limiter is not None
        policy.usage.database.close()
    assert os.path.exists(tmp_path / FILENAME)


def test_a_request_a_worker_forwarded_is_left_to_the_workers_policy():
    """The primary's guard marks it forwarded; its policy admits nothing for it (usage counted once)."""
    from twisted.web.test.requesthelper import DummyRequest

    from aibackend.auth import Guard

    guard = Guard(None, ["tcp:0:interface=127.0.0.1"], internal_token="t" * 32)
    forwarded, client = DummyRequest([b""]), DummyRequest([b""])
    forwarded.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + b"t" * 32])
    for request in (forwarded, client):
        request.aibackend_caller, request.aibackend_forwarded = None, False
        guard.check_client(request)
    assert forwarded.aibackend_forwarded and not client.aibackend_forwarded

    class Entry:
        model_id = "chat"

    policy = Policy(usage=object())
    assert policy.admit(forwarded, Entry()) is None
    assert policy.admit(client, Entry()).caller is None


# --- session 20: a failed batch tried again as it was; ranges that cannot hold usage; opened only while on ---


def test_a_failed_batch_is_tried_again_as_it_was_under_its_number(clock, database):
    """So that a store whose write was made though its answer was lost (Redis) adds it once."""
    calls = []
    writer = Writer()

    def in_thread(function, *args):
        if function == database.write:
            calls.append((dict(args[0]), args[2]))
        return writer(function, *args)

    recorder = recorder_of(clock, database, in_thread)
    recorder.record(ALICE, "a", 200, 0.1, None)
    writer.fail_next(sqlite3.OperationalError("disk I/O error"))
    clock.advance(FLUSH_SECONDS)
    recorder.record(BOB, "a", 200, 0.1, None)  # came meanwhile: its own batch, after
    assert recorder.unwritten == 2
    clock.advance(FLUSH_SECONDS)
    assert [(sorted(rows), batch) for rows, batch in calls[-3:]] == [
        ([("alice", "a", NOW)], 1), ([("alice", "a", NOW)], 1), ([("bob", "a", NOW)], 2)]
    assert recorder.unwritten == 0 and clock.getDelayedCalls() == []
    assert [row[:4] for row in rows(database.path)] == [("alice", "a", NOW, 1), ("bob", "a", NOW, 1)]
    stopped(recorder)


def test_a_flush_waits_for_what_came_after_a_failed_batch(clock, database):
    writer = Writer()
    recorder = recorder_of(clock, database, writer)
    recorder.record(ALICE, "a", 200, 0.1, None)
    writer.fail_next(sqlite3.OperationalError("disk I/O error"))
    clock.advance(FLUSH_SECONDS)
    recorder.record(BOB, "a", 200, 0.1, None)
    result_of(recorder.flush())
    assert len(rows(database.path)) == 2 and recorder.unwritten == 0
    stopped(recorder)


@pytest.mark.parametrize("selection", [{"since": str(NOW + 60)}, {"since": str(NOW + 3600), "until": str(NOW + 7200)},
                                       {"since": "9999-01-01T00:00:00Z"}])
def test_a_since_in_the_future_is_a_400_that_says_why(clock, database, selection):
    recorder = recorder_of(clock, database)
    with pytest.raises(errors.BadRequest) as raised:
        recorder.query(Selection.parse(**selection))
    assert raised.value.status == 400
    assert raised.value.message.startswith("since (") and "is in the future (the daemon's time is " \
        "2027-01-15T08:00:00Z): there is no usage there yet" in raised.value.message
    assert query(recorder, since=str(NOW + 59))["count"] == 0  # this minute: a 200
    stopped(recorder)


def usage_service(clock, tmp_path):
    """A started L{UsageService} of C{tmp_path}'s usage file (at L{NOW}), and the recorders it opens."""
    from aibackend.usage import UsageService

    opened = []

    def open_recorder():
        opened.append(UsageRecorder(clock, UsageDatabase(str(tmp_path / FILENAME)), in_thread=Writer()))
        return opened[-1]

    clock.advance(NOW)
    usage = UsageService(open_recorder)
    usage.startService()
    return usage, opened


def test_the_usage_service_opens_the_recorder_only_when_on_and_closes_it_when_off(clock, tmp_path):
    usage, opened = usage_service(clock, tmp_path)
    assert usage.recorder is None and opened == [] and not os.path.exists(tmp_path / FILENAME)
    usage.off()  # (off already: nothing)
    first = usage.on()
    assert usage.on() is first and opened == [first]
    first.record(ALICE, "a", 200, 0.1, None)
    usage.off()
    assert usage.recorder is None
    # Written (it was started: the service runs), then closed once the requests in flight had their grace.
    assert [row[:4] for row in rows(tmp_path / FILENAME)] == [("alice", "a", NOW, 1)]
    clock.advance(OFF_GRACE_SECONDS)
    with pytest.raises(sqlite3.ProgrammingError):
        first.database.read(Selection(), NOW)
    second = usage.on()
    assert second is not first
    result_of(usage.stopService())
    assert usage.recorder is None and clock.getDelayedCalls() == []
    assert usage.on() is None and opened == [first, second]  # (a key made while the daemon stops)
    with pytest.raises(sqlite3.ProgrammingError):
        second.database.read(Selection(), NOW)


def test_the_usage_of_requests_in_flight_when_usage_turns_off_is_kept(clock, tmp_path):
    """The last key deleted mid-request: the calls admitted before still hold the old policy, its recorder."""
    usage, _ = usage_service(clock, tmp_path)
    policy = Policy(usage=usage.on())
    done, in_flight = Call(ALICE, "a", None, None), Call(BOB, "a", tokens(3, 4), None)
    policy.settle(done, 200, 0.1)
    usage.off()
    assert usage.recorder is None
    assert [row[:4] for row in rows(tmp_path / FILENAME)] == [("alice", "a", NOW, 1)]  # written at once
    clock.advance(30)
    policy.settle(in_flight, 200, 30.0)  # it ends: recorded, and written a second later
    clock.advance(FLUSH_SECONDS)
    assert [row[:4] + row[7:9] for row in rows(tmp_path / FILENAME)] == [("alice", "a", NOW, 1, 0, 0),
                                                                         ("bob", "a", NOW, 1, 3, 4)]
    clock.advance(OFF_GRACE_SECONDS - 30 - FLUSH_SECONDS)  # then it is closed (its thread ended)
    assert clock.getDelayedCalls() == []
    with pytest.raises(sqlite3.ProgrammingError):
        policy.usage.database.read(Selection(), NOW)
    result_of(usage.stopService())


def test_usage_turned_on_again_before_the_grace_ends_takes_back_its_recorder(clock, tmp_path):
    usage, opened = usage_service(clock, tmp_path)
    first = usage.on()
    usage.off()
    assert usage.on() is first and opened == [first] and clock.getDelayedCalls() == []
    usage.off()
    assert clock.getDelayedCalls() != []
    result_of(usage.stopService())  # the daemon stops meanwhile: closed at once, no timer left
    assert clock.getDelayedCalls() == [] and usage.on() is None
    with pytest.raises(sqlite3.ProgrammingError):
        first.database.read(Selection(), NOW)


def test_the_daemon_opens_the_recorder_once_keys_exist_and_closes_it_when_none_is_left(tmp_path):
    from twisted.internet.testing import MemoryReactorClock

    from aibackend.daemon import build
    from aibackend.store import MemoryStore

    built = build(parse_config({"server": {}}, environ={}), MemoryReactorClock(), listen=[], max_body_bytes=10,
                  store=MemoryStore(), environ={}, state_dir=str(tmp_path))
    core, keys = built.parts.front_door.core, built.parts.keys
    (usage,) = [outer for outer in built.service.outer if outer.name == "usage"]
    assert core.policy is None and usage.recorder is None and not os.path.exists(tmp_path / FILENAME)

    result_of(keys.add({"name": "team", "models": "*"}))
    recorder = core.policy.usage
    assert isinstance(recorder, UsageRecorder) and usage.recorder is recorder
    assert os.path.exists(tmp_path / FILENAME)

    result_of(keys.delete("team"))
    assert core.policy is None and usage.recorder is None
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        recorder.database.read(Selection(), NOW)
