"""
Replicas of an HTTP model: least in flight first, ejection after failures in a row
(growing each time), retry on another replica only when nothing reached the first, the
active health check, and what the client sees when none is left.
"""

import pytest
from twisted.internet import error as ierror

from aibackend.config import HttpModelSpec
from aibackend.errors import BadGateway, ModelUnavailable
from aibackend.httpmodel import HttpModel
from aibackend.interfaces import RequestContext
from aibackend.testing import HeldModelServer, failure_of, result_of

A, B, C = "http://127.0.0.1:9101/p", "http://127.0.0.1:9102/p", "http://127.0.0.1:9103/p"
PORTS = {A: 9101, B: 9102, C: 9103}


@pytest.fixture
def client():
    """The replicas' servers, in memory (told apart by port): each request waits for the test's answer."""
    return HeldModelServer()


MADE: list = []


@pytest.fixture(autouse=True)
def _close_models(clock):
    """Each test's models close their kept-alive connections at its end (before the clock is checked)."""
    yield
    while MADE:
        model = MADE.pop()
        model.stopService()
        model.endpoints.flush()


def make(clock, client, urls=(A, B), **fields):
    spec = HttpModelSpec(id="m", type="http", url=urls[0], urls=tuple(urls), timeout=30.0, **fields)
    model = HttpModel(spec, reactor=clock, endpoints=client, environ={})
    model.endpoints = client
    MADE.append(model)
    return model


def send(model, n=0):
    d = model.send(b"{}", RequestContext(request_id=f"r{n}"))
    model.endpoints.flush()
    return d


def refuse(client, url):
    """Connections to C{url}'s replica are refused from now on."""
    client.refused_ports[PORTS[url]] = ierror.ConnectionRefusedError("refused")


def test_requests_go_to_the_replica_with_the_fewest_in_flight(clock, client):
    model = make(clock, client, urls=(A, B, C))
    pending = [send(model, n) for n in range(3)]
    assert sorted(client.urls()) == [A, B, C]  # one each
    client.answer(1)  # the one at B finishes
    pending.append(send(model, 3))
    assert client.url(3) == client.url(1)  # B was the least busy
    for index in (0, 2, 3):
        client.answer(index)
    assert all(result_of(d).status == 200 for d in pending)


def test_a_refused_connection_is_retried_on_another_replica(clock, client):
    model = make(clock, client)
    refuse(client, A)  # the first choice (both are idle)
    answer = send(model)
    assert client.urls() == [B]
    client.answer(0, body=b'{"from": "the other"}')
    assert result_of(answer).body == b'{"from": "the other"}'


def test_a_request_that_may_have_been_received_is_never_sent_twice(clock, client):
    model = make(clock, client)
    answer = send(model)
    client.drop(0)
    error = failure_of(answer, BadGateway).value
    assert error.status == 502
    assert len(client.requests) == 1


def test_every_replica_refusing_is_502(clock, client):
    model = make(clock, client)
    refuse(client, A)
    refuse(client, B)
    answer = send(model)
    error = failure_of(answer, BadGateway).value
    assert error.status == 502 and "connection refused" in error.message
    assert client.requests == []


def test_five_failures_in_a_row_eject_a_replica_for_a_time_that_grows(clock, client):
    model = make(clock, client, eject_seconds=10.0)

    def answer_last(answer, failing: int = 500):
        index = len(client.requests) - 1
        if client.url(index) == A:
            client.answer(index, failing, b'{"error": "boom"}')
        else:
            client.answer(index)
        return result_of(answer)

    for n in range(5):
        answer = send(model, n)
        status = answer_last(answer).status
        if client.url(len(client.requests) - 1) == A:
            assert status == 500  # the model's own 5xx is passed through
        # keep A failing: send until A has failed five times
    failures_at_a = sum(1 for url in client.urls() if url == A)
    while model.replicas[0].ejections == 0:
        answer_last(send(model))
    assert model.ejections == 1
    assert model.describe()["replicas"][0]["ejected_for_s"] == 10.0
    assert [e["event"] for e in model.model_log.query() if e["event"] == "replica ejected"]

    before = len(client.requests)
    for n in range(4):
        d = send(model, n)
        assert client.url(len(client.requests) - 1) == B  # A is out
        client.answer(len(client.requests) - 1)
        result_of(d)
    assert len(client.requests) == before + 4

    clock.advance(10)  # back in; failing five times more ejects it for twice as long
    while model.replicas[0].ejections == 1:
        answer_last(send(model), failing=503)
    assert model.describe()["replicas"][0]["ejected_for_s"] == 20.0
    assert failures_at_a >= 1


def test_all_replicas_ejected_is_503_with_retry_after(clock, client):
    model = make(clock, client, eject_after=1, eject_seconds=7.0)
    for _ in range(2):
        answer = send(model)
        client.answer(len(client.requests) - 1, 500, b'{"error": "x"}')
        result_of(answer)
    assert model.ejections == 2
    with pytest.raises(ModelUnavailable) as refused:
        send(model)
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"] == "8"
    clock.advance(7)
    answer = send(model)
    client.answer(len(client.requests) - 1)
    assert result_of(answer).status == 200


def test_a_single_url_is_never_ejected(clock, client):
    model = make(clock, client, urls=(A,), eject_after=1)
    refuse(client, A)
    for _ in range(3):
        answer = send(model)
        assert failure_of(answer, BadGateway).value.status == 502
    assert model.ejections == 0


def test_the_active_health_check_ejects_and_restores(clock, client):
    model = make(clock, client, health_path="/health", health_interval=5.0)
    model.startService()
    clock.advance(0)
    client.flush()
    assert sorted(client.urls()) == ["http://127.0.0.1:9101/health", "http://127.0.0.1:9102/health"]
    probes = {client.url(index): index for index in range(2)}
    client.answer(probes["http://127.0.0.1:9101/health"], 503, b'{"ready": false}')
    client.answer(probes["http://127.0.0.1:9102/health"])
    assert [r.healthy for r in model.replicas] == [False, True]

    answer = send(model)
    assert client.url(2) == B
    client.answer(2)
    result_of(answer)

    clock.advance(5)
    client.flush()
    for index in range(3, len(client.requests)):
        client.answer(index)
    assert [r.healthy for r in model.replicas] == [True, True]
    assert "replica restored" in [e["event"] for e in model.model_log.query()]

    clock.advance(5)  # a probe in flight when the model stops is cancelled, no timer left
    client.flush()
    model.stopService()
    client.flush()
    assert clock.getDelayedCalls() == []
