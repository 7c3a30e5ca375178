"""
aibackend.limits.ConcurrencyLimit on its own: places, the bounded queue and its 503, the
wait for a place and its 504, and the wait for idleness.
"""

import pytest
from twisted.internet.defer import CancelledError

from aibackend.errors import GatewayTimeout
from aibackend.limits import ConcurrencyLimit
from aibackend.testing import failure_of, has_fired, result_of


def test_places_are_handed_to_those_waiting_in_order(clock):
    limit = ConcurrencyLimit("m", max_queue=2, max_in_flight=1)
    assert limit.has_room()
    limit.started()
    assert not limit.has_room() and not limit.full()
    # As a model does: the one given a place starts at once (in the Deferred's callback).
    first, second = limit.wait_for_place(10, clock), limit.wait_for_place(10, clock)
    for waiter in (first, second):
        waiter.addCallback(lambda _: limit.started())
    assert limit.full() and limit.queued == 2

    assert limit.finished("the answer") == "the answer"  # a Deferred's callback: the result goes on
    assert has_fired(first) and not has_fired(second)
    assert limit.in_flight == 1
    limit.finished()
    assert has_fired(second) and limit.queued == 0
    assert clock.getDelayedCalls() == []


def test_a_full_queue_sheds_with_the_message_of_the_limit(clock):
    bounded = ConcurrencyLimit("m", max_queue=0, max_in_flight=2)
    bounded.in_flight = 2
    error = bounded.busy(retry_after=1)
    assert error.status == 503 and error.headers == {"Retry-After": "1"}
    assert error.message == "model 'm' is busy: 2 requests in flight (max_concurrency) and 0 waiting (max_queue)"
    assert bounded.shed == 1

    per_process = ConcurrencyLimit("p", max_queue=0)
    error = per_process.busy(retry_after=3)
    assert error.message == "model 'p' is busy: 0 requests are waiting (max_queue)"
    assert error.headers == {"Retry-After": "3"}


def test_a_wait_for_a_place_has_a_deadline_and_may_be_cancelled(clock):
    limit = ConcurrencyLimit("m", max_queue=5, max_in_flight=1)
    limit.started()
    late, gone = limit.wait_for_place(2, clock), limit.wait_for_place(2, clock)

    gone.cancel()
    failure_of(gone, CancelledError)
    assert limit.queued == 1
    clock.advance(2)
    error = failure_of(late, GatewayTimeout).value
    assert error.message == "model 'm' did not answer within 2 s (the request waited for one of its max_concurrency places)"
    assert limit.queued == 0
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("queued", [False, True])
def test_when_idle_fires_once_nothing_is_in_flight_or_queued(clock, queued):
    limit = ConcurrencyLimit("m", max_queue=5, max_in_flight=1)
    assert result_of(limit.when_idle()) is None
    limit.started()
    if queued:
        limit.wait_for_place(10, clock).addCallback(lambda _: limit.started())
    idle = limit.when_idle()
    limit.finished()
    if queued:
        assert not has_fired(idle)  # the place went to the one waiting
        limit.finished()
    assert result_of(idle) is None

    limit.started()
    abandoned = limit.when_idle()
    abandoned.cancel()  # stops the wait only
    failure_of(abandoned, CancelledError)
    limit.finished()
    assert clock.getDelayedCalls() == []
