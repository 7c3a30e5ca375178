"""
aibackend.logs.ModelLog: each model's bounded log, on an injected clock.
"""

import pytest

from aibackend.logs import MAX_FIELD_CHARS, ModelLog, normalize_level, parse_since

# 2026-01-02T03:04:05Z
T0 = 1767323045.0


@pytest.fixture
def log(clock):
    clock.advance(T0)
    return ModelLog(clock, max_entries=5)


def events(entries):
    return [entry["event"] for entry in entries]


def test_an_entry_has_its_time_level_event_and_fields(log):
    entry = log.append("info", "added", type="http", nothing=None)

    assert entry == {
        "seq": 1,
        "time": "2026-01-02T03:04:05.000Z",
        "timestamp": T0,
        "level": "info",
        "event": "added",
        "type": "http",
    }
    assert log.query() == [entry]


def test_the_log_is_bounded_and_drops_the_oldest_first(log, clock):
    for n in range(8):
        log.append("info", f"e{n}")
        clock.advance(1)

    assert len(log) == 5
    assert log.max_entries == 5
    assert events(log.query()) == ["e3", "e4", "e5", "e6", "e7"]
    assert log.dropped == 3
    assert [entry["seq"] for entry in log.query()] == [4, 5, 6, 7, 8]


def test_nothing_is_dropped_below_the_bound(log):
    for n in range(5):
        log.append("info", f"e{n}")

    assert log.dropped == 0
    assert len(log) == 5


def test_a_log_holds_at_least_one_entry(clock):
    with pytest.raises(ValueError):
        ModelLog(clock, max_entries=0)


def test_limit_gives_the_newest_entries_oldest_first(log):
    for n in range(4):
        log.append("info", f"e{n}")

    assert events(log.query(limit=2)) == ["e2", "e3"]
    assert events(log.query(limit=10)) == ["e0", "e1", "e2", "e3"]
    assert log.query(limit=0) == []


def test_since_is_strictly_after(log, clock):
    for n in range(3):
        log.append("info", f"e{n}")
        clock.advance(10)

    assert events(log.query(since=T0)) == ["e1", "e2"]
    assert events(log.query(since=T0 + 10)) == ["e2"]
    assert events(log.query(since=T0 - 1)) == ["e0", "e1", "e2"]
    assert log.query(since=T0 + 20) == []


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("1767323045", T0),
        ("1767323045.5", T0 + 0.5),
        ("2026-01-02T03:04:05Z", T0),
        ("2026-01-02T03:04:05+00:00", T0),
        ("2026-01-02T04:04:05+01:00", T0),
        ("2026-01-02T03:04:05", T0),  # no offset: UTC
        ("2026-01-02T03:04:05.250Z", T0 + 0.25),
    ],
)
def test_since_is_epoch_seconds_or_iso_8601(text, seconds):
    assert parse_since(text) == seconds


def test_since_as_iso_8601_filters(log, clock):
    log.append("info", "before")
    clock.advance(60)
    log.append("info", "after")

    assert events(log.query(since=parse_since("2026-01-02T03:04:30Z"))) == ["after"]


@pytest.mark.parametrize("text", ["yesterday", "", "2026-13-45"])
def test_a_bad_since_says_what_is_accepted(text):
    with pytest.raises(ValueError) as caught:
        parse_since(text)

    assert "ISO 8601" in str(caught.value)


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity"])
def test_since_must_be_a_finite_time(text):
    with pytest.raises(ValueError):
        parse_since(text)


def test_level_gives_that_level_and_more_severe(log):
    for level in ("debug", "info", "warning", "error"):
        log.append(level, level)

    assert events(log.query(level="debug")) == ["debug", "info", "warning", "error"]
    assert events(log.query(level="warning")) == ["warning", "error"]
    assert events(log.query(level="error")) == ["error"]


@pytest.mark.parametrize(
    "name, level",
    [("INFO", "info"), ("warn", "warning"), ("Warning", "warning"), ("err", "error"), ("critical", "error")],
)
def test_level_names_are_forgiving(name, level):
    assert normalize_level(name) == level


def test_an_unknown_level_is_refused_with_the_choices():
    with pytest.raises(ValueError) as caught:
        normalize_level("loud")

    assert "debug, info, warning, error" in str(caught.value)


def test_filters_combine(log, clock):
    log.append("error", "old-error")
    clock.advance(10)
    log.append("info", "new-info")
    log.append("error", "new-error-1")
    log.append("error", "new-error-2")

    assert events(log.query(since=T0, level="error", limit=1)) == ["new-error-2"]


def test_clear_empties_the_log_and_says_how_many_went(log):
    for n in range(3):
        log.append("info", f"e{n}")

    assert log.clear() == 3
    assert log.query() == []
    assert log.clear() == 0


def test_long_strings_are_capped(log):
    entry = log.append("error", "request", error="x" * (MAX_FIELD_CHARS + 1000), status=500)

    assert entry["error"] == "x" * MAX_FIELD_CHARS + "... [1000 more characters]"
    assert entry["status"] == 500


def test_a_string_at_the_cap_is_kept_whole(log):
    entry = log.append("error", "request", error="y" * MAX_FIELD_CHARS)

    assert entry["error"] == "y" * MAX_FIELD_CHARS


@pytest.mark.parametrize(
    "status, level", [(200, "info"), (302, "info"), (404, "warning"), (499, "warning"), (502, "error")]
)
def test_a_request_entry(log, clock, status, level):
    entry = log.request(request_id="r1", operation="predict", status=status, latency_ms=12.34567, error=None)

    assert entry["level"] == level
    assert entry["event"] == "request"
    assert entry["request_id"] == "r1"
    assert entry["operation"] == "predict"
    assert entry["status"] == status
    assert entry["latency_ms"] == 12.346
    assert "error" not in entry


def test_a_request_entry_is_what_append_makes_of_it(clock):
    from aibackend.logs import ModelLog

    fast, generic = ModelLog(clock, max_entries=2), ModelLog(clock, max_entries=2)
    for status, error in ((200, None), (404, "no such thing"), (503, "x" * 5000)):
        made = fast.request(request_id="r-1", operation="predict", status=status, latency_ms=1.23456, error=error)
        level = "info" if status < 400 else "warning" if status < 500 else "error"
        expected = generic.append(level, "request", request_id="r-1", operation="predict", status=status,
                                  latency_ms=1.235, error=error)
        assert made == expected
    assert (fast.dropped, len(fast)) == (generic.dropped, len(generic)) == (1, 2)


def test_a_snapshot_is_the_log_as_it_was_and_select_filters_it_as_query_does():
    from twisted.internet.task import Clock

    from aibackend.logs import ModelLog, select

    clock = Clock()
    log = ModelLog(clock, max_entries=3)
    for level in ("info", "warning", "error"):
        clock.advance(1)
        log.append(level, level)

    snapshot = log.snapshot()
    log.append("info", "later")
    log.clear()

    assert [entry["event"] for entry in snapshot] == ["info", "warning", "error"]
    assert select(snapshot, level="warning", limit=1) == [snapshot[2]]
    assert select(snapshot, since=1.5) == snapshot[1:]
    assert select(snapshot, limit=0) == []
    assert select(snapshot) == snapshot


def test_a_request_recorded_on_the_hot_path_reads_back_as_its_entry():
    """record_request keeps a tuple; a snapshot read through select (or entries_of) has the entry append() makes."""
    from twisted.internet.task import Clock

    from aibackend.logs import ModelLog, entries_of, select

    clock = Clock()
    clock.advance(1767225600.25)
    fast, generic = ModelLog(clock, max_entries=3), ModelLog(clock, max_entries=3)
    fast.append("info", "added")
    generic.append("info", "added")
    for status, error in ((200, None), (404, "no such thing"), (503, "x" * 5000)):
        clock.advance(0.5)
        fast.record_request("r-1", "predict", status, 1.23456, error)
        level = "info" if status < 400 else "warning" if status < 500 else "error"
        generic.append(level, "request", request_id="r-1", operation="predict", status=status, latency_ms=1.235,
                       error=error)
    expected = generic.snapshot()

    assert (fast.dropped, len(fast)) == (generic.dropped, len(generic)) == (1, 3)
    assert entries_of(fast.snapshot()) == select(fast.snapshot()) == fast.query() == expected
    assert select(fast.snapshot(), level="error") == [expected[-1]]
    assert select(fast.snapshot(), since=clock.seconds() - 0.75, limit=1) == expected[-1:]
