"""
Load shedding of HTTP models: at most C{max_concurrency} requests in flight, at most
C{max_queue} waiting; past both, 503 with Retry-After at once, never counted as a failure
of the model.
"""

import pytest
from twisted.internet.defer import CancelledError

from aibackend.config import HttpModelSpec
from aibackend.errors import GatewayTimeout, ModelUnavailable
from aibackend.httpmodel import HttpModel
from aibackend.interfaces import RequestContext
from aibackend.testing import HeldModelServer, failure_of, has_fired, result_of


@pytest.fixture
def client():
    """The model server, in memory: each request waits for the test's answer."""
    return HeldModelServer()


def make_model(clock, client, **fields):
    spec = HttpModelSpec(id="m", type="http", url="http://127.0.0.1:9/predict", timeout=10.0, **fields)
    model = HttpModel(spec, reactor=clock, endpoints=client, environ={})
    model.endpoints = client
    return model


def send(model, n):
    d = model.send(b"{}", RequestContext(request_id=f"r{n}"))
    model.endpoints.flush()
    return d


def no_timer_left(clock, model) -> bool:
    """Nothing on the clock once the model's kept-alive connections are closed (as at stop)."""
    model.stopService()
    model.endpoints.flush()
    return clock.getDelayedCalls() == []


def test_past_max_concurrency_requests_wait_and_past_max_queue_they_are_shed(clock, client):
    model = make_model(clock, client, max_concurrency=2, max_queue=1)
    first, second, waiting = send(model, 1), send(model, 2), send(model, 3)

    assert len(client.requests) == 2  # the third waits for a place
    assert model.describe()["queued"] == 1
    with pytest.raises(ModelUnavailable) as shed:
        send(model, 4)
    assert shed.value.status == 503
    assert shed.value.headers == {"Retry-After": "1"}
    assert "max_concurrency" in shed.value.message and "max_queue" in shed.value.message
    assert model.shed == 1 and model.failures == 0  # a refusal is not the model's failure

    client.answer(0)
    assert result_of(first).status == 200
    assert len(client.requests) == 3  # the waiting one took the free place
    assert client.requests[2].requestHeaders.getRawHeaders(b"x-request-id") == [b"r3"]
    assert model.describe()["queued"] == 0

    client.answer(1)
    client.answer(2, body=b'{"n": 3}')
    assert result_of(second).status == 200
    assert result_of(waiting).body == b'{"n": 3}'
    assert model.in_flight == 0
    assert no_timer_left(clock, model)


def test_the_deadline_covers_the_time_spent_waiting(clock, client):
    model = make_model(clock, client, max_concurrency=1, max_queue=5)
    held = send(model, 1)
    waiting = send(model, 2)

    clock.advance(10)

    error = failure_of(waiting, GatewayTimeout).value
    assert error.status == 504 and "max_concurrency" in error.message
    failure_of(held, GatewayTimeout)
    assert client.abandoned(0)
    assert len(client.requests) == 1  # the one that timed out waiting was never sent
    assert model.describe()["queued"] == 0 and model.in_flight == 0
    assert no_timer_left(clock, model)


def test_a_request_sent_after_waiting_has_only_what_is_left_of_its_deadline(clock, client):
    model = make_model(clock, client, max_concurrency=1, max_queue=5)
    held = send(model, 1)
    waiting = send(model, 2)
    clock.advance(7)
    client.answer(0)
    assert result_of(held).status == 200
    assert len(client.requests) == 2

    clock.advance(2.9)
    assert not has_fired(waiting)
    clock.advance(0.2)
    failure_of(waiting, GatewayTimeout)
    assert no_timer_left(clock, model)


def test_a_waiting_request_whose_client_left_gives_up_its_place(clock, client):
    model = make_model(clock, client, max_concurrency=1, max_queue=1)
    held = send(model, 1)
    gone = send(model, 2)

    gone.cancel()
    failure_of(gone, CancelledError)
    assert model.describe()["queued"] == 0
    waiting = send(model, 3)  # the queue has room again
    client.answer(0)
    result_of(held)
    assert [r.requestHeaders.getRawHeaders(b"x-request-id") for r in client.requests] == [[b"r1"], [b"r3"]]
    client.answer(1)
    assert result_of(waiting).status == 200
    assert no_timer_left(clock, model)


def test_without_max_concurrency_nothing_waits(clock, client):
    model = make_model(clock, client)
    pending = [send(model, n) for n in range(50)]
    assert len(client.requests) == 50
    for index in range(len(client.requests)):
        client.answer(index)
    assert all(result_of(d).status == 200 for d in pending)
    assert no_timer_left(clock, model)
