"""
Replicas of an HTTP model: least in flight first, ejection after failures in a row
(growing each time), retry on another replica only when nothing reached the first, the
active health check, and what the client sees when none is left.
"""

import pytest
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from aibackend.config import HttpModelSpec
from aibackend.errors import BadGateway, ModelUnavailable
from aibackend.httpmodel import HttpModel
from aibackend.interfaces import RequestContext
from aibackend.testing import JSONResponse, failure_of, result_of

A, B, C = "http://127.0.0.1:9101/p", "http://127.0.0.1:9102/p", "http://127.0.0.1:9103/p"


class Client:
    """Records each request by URL; the test answers them."""

    def __init__(self):
        self.calls = []  # (url text, Deferred)

    def _call(self, url, **kwargs):
        d = Deferred()
        self.calls.append((str(url.to_text()), d))
        return d

    def post(self, url, data=None, headers=None, **kwargs):
        return self._call(url)

    def get(self, url, **kwargs):
        return self._call(url)

    def urls(self):
        return [url for url, _ in self.calls]


@pytest.fixture
def client():
    return Client()


def make(clock, client, urls=(A, B), **fields):
    spec = HttpModelSpec(id="m", type="http", url=urls[0], urls=tuple(urls), timeout=30.0, **fields)
    return HttpModel(spec, reactor=clock, client=client, environ={})


def send(model, n=0):
    return model.send(b"{}", RequestContext(request_id=f"r{n}"))


def refuse(d):
    d.errback(Failure(ierror.ConnectionRefusedError("refused")))


def test_requests_go_to_the_replica_with_the_fewest_in_flight(clock, client):
    model = make(clock, client, urls=(A, B, C))
    pending = [send(model, n) for n in range(3)]
    assert sorted(client.urls()) == [A, B, C]  # one each
    client.calls[1][1].callback(JSONResponse())  # the one at B finishes
    pending.append(send(model, 3))
    assert client.urls()[3] == client.urls()[1]  # B was the least busy
    for _, d in client.calls:
        if not d.called:
            d.callback(JSONResponse())
    assert all(result_of(d).status == 200 for d in pending)


def test_a_refused_connection_is_retried_on_another_replica(clock, client):
    model = make(clock, client)
    answer = send(model)
    first_url, first = client.calls[0]
    refuse(first)
    assert len(client.calls) == 2 and client.calls[1][0] != first_url
    client.calls[1][1].callback(JSONResponse(body=b'{"from": "the other"}'))
    assert result_of(answer).body == b'{"from": "the other"}'


def test_a_request_that_may_have_been_received_is_never_sent_twice(clock, client):
    model = make(clock, client)
    answer = send(model)
    client.calls[0][1].errback(Failure(ResponseFailed([Failure(ierror.ConnectionLost())])))
    error = failure_of(answer, BadGateway).value
    assert error.status == 502
    assert len(client.calls) == 1


def test_every_replica_refusing_is_502(clock, client):
    model = make(clock, client)
    answer = send(model)
    refuse(client.calls[0][1])
    refuse(client.calls[1][1])
    error = failure_of(answer, BadGateway).value
    assert error.status == 502 and "connection refused" in error.message
    assert len(client.calls) == 2


def test_five_failures_in_a_row_eject_a_replica_for_a_time_that_grows(clock, client):
    model = make(clock, client, eject_seconds=10.0)
    for n in range(5):
        answer = send(model, n)
        url, d = client.calls[-1]
        if url == A:
            d.callback(JSONResponse(500, b'{"error": "boom"}'))
            assert result_of(answer).status == 500  # the model's own 5xx is passed through
        else:
            d.callback(JSONResponse())
        # keep A failing: send until A has failed five times
    failures_at_a = sum(1 for url, _ in client.calls if url == A)
    while model.replicas[0].ejections == 0:
        answer = send(model)
        url, d = client.calls[-1]
        d.callback(JSONResponse(500, b'{"error": "boom"}') if url == A else JSONResponse())
        result_of(answer)
    assert model.ejections == 1
    assert model.describe()["replicas"][0]["ejected_for_s"] == 10.0
    assert [e["event"] for e in model.model_log.query() if e["event"] == "replica ejected"]

    before = len(client.calls)
    for n in range(4):
        d = send(model, n)
        assert client.calls[-1][0] == B  # A is out
        client.calls[-1][1].callback(JSONResponse())
        result_of(d)
    assert len(client.calls) == before + 4

    clock.advance(10)  # back in; failing five times more ejects it for twice as long
    while model.replicas[0].ejections == 1:
        answer = send(model)
        url, d = client.calls[-1]
        d.callback(JSONResponse(503, b'{"error": "busy"}') if url == A else JSONResponse())
        result_of(answer)
    assert model.describe()["replicas"][0]["ejected_for_s"] == 20.0
    assert failures_at_a >= 1


def test_all_replicas_ejected_is_503_with_retry_after(clock, client):
    model = make(clock, client, eject_after=1, eject_seconds=7.0)
    for _ in range(2):
        answer = send(model)
        client.calls[-1][1].callback(JSONResponse(500, b'{"error": "x"}'))
        result_of(answer)
    assert model.ejections == 2
    with pytest.raises(ModelUnavailable) as refused:
        send(model)
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"] == "8"
    clock.advance(7)
    answer = send(model)
    client.calls[-1][1].callback(JSONResponse())
    assert result_of(answer).status == 200


def test_a_single_url_is_never_ejected(clock, client):
    model = make(clock, client, urls=(A,), eject_after=1)
    for _ in range(3):
        answer = send(model)
        refuse(client.calls[-1][1])
        assert failure_of(answer, BadGateway).value.status == 502
    assert model.ejections == 0


def test_the_active_health_check_ejects_and_restores(clock, client):
    model = make(clock, client, health_path="/health", health_interval=5.0)
    model.startService()
    clock.advance(0)
    assert sorted(client.urls()) == ["http://127.0.0.1:9101/health", "http://127.0.0.1:9102/health"]
    probes = dict(client.calls)
    probes["http://127.0.0.1:9101/health"].errback(Failure(ierror.ConnectionRefusedError()))
    probes["http://127.0.0.1:9102/health"].callback(JSONResponse())
    assert [r.healthy for r in model.replicas] == [False, True]

    client.calls.clear()
    answer = send(model)
    assert client.urls() == [B]
    client.calls[0][1].callback(JSONResponse())
    result_of(answer)

    client.calls.clear()
    clock.advance(5)
    for url, d in list(client.calls):
        d.callback(JSONResponse())
    assert [r.healthy for r in model.replicas] == [True, True]
    assert "replica restored" in [e["event"] for e in model.model_log.query()]

    clock.advance(5)  # a probe in flight when the model stops is cancelled, no timer left
    model.stopService()
    assert clock.getDelayedCalls() == []
