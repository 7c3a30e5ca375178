"""
The safety nets in conftest.py catch what they are there for.
"""

import gc

from twisted.internet.defer import fail
from twisted.logger import Logger


def test_an_unhandled_error_in_a_deferred_is_caught(logged_errors):
    d = fail(ZeroDivisionError("lost"))
    del d
    gc.collect()

    flushed = logged_errors.flush(ZeroDivisionError)

    assert [event["log_failure"].getErrorMessage() for event in flushed] == ["lost"]
    assert logged_errors.events == []


def test_a_logged_failure_is_caught(logged_errors):
    try:
        1 / 0
    except ZeroDivisionError:
        Logger().failure("while dividing")

    assert len(logged_errors.events) == 1
    assert logged_errors.flush(KeyError) == []
    assert len(logged_errors.flush(ZeroDivisionError)) == 1


def test_ordinary_log_events_are_not_errors(logged_errors):
    Logger().info("model {model} answered {status}", model="m", status=200)
    Logger().warn("just a warning")

    assert logged_errors.events == []


def test_the_clock_fixture_is_a_clock(clock):
    calls = []
    clock.callLater(1, calls.append, "fired")
    clock.advance(1)
    assert calls == ["fired"]
    assert clock.getDelayedCalls() == []


def test_a_lost_deferred_in_a_reference_cycle_is_still_caught_with_the_import_time_heap_frozen(logged_errors):
    # conftest.py freezes what exists once the tests are collected out of the garbage
    # collection (gc.freeze), not what a test makes: a failed Deferred that only the cyclic
    # collector frees still says so.
    assert gc.get_freeze_count() > 0
    loop = [fail(ZeroDivisionError("in a cycle"))]
    loop.append(loop)
    del loop
    gc.collect()

    flushed = logged_errors.flush(ZeroDivisionError)

    assert [event["log_failure"].getErrorMessage() for event in flushed] == ["in a cycle"]
