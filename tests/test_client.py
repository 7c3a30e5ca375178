"""
aibackend.client: the lean HTTP/1.1 client of the hot path, over in-memory transports.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from aibackend.client import LeanClient, ResponseTooLarge
from aibackend.testing import failure_of, has_fired, result_of

URI = b"http://127.0.0.1:9001/predict?x=1"
REQUEST = b"POST /predict?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nContent-Length: 2\r\n\r\n{}"


class Transport(StringTransport):
    def __init__(self):
        super().__init__()
        self.connected = True
        self.aborted = False

    def loseConnection(self):
        super().loseConnection()
        self.connected = False

    def abortConnection(self):
        self.aborted = True
        self.connected = False


class Endpoint:
    def __init__(self, endpoints):
        self.endpoints = endpoints

    def connect(self, factory):
        if self.endpoints.refuse:
            from twisted.internet.defer import fail

            return fail(ConnectionRefusedError("refused"))
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        self.endpoints.made.append((protocol, transport))
        return succeed(protocol)


class Endpoints:
    """An IAgentEndpointFactory whose connections are StringTransports."""

    def __init__(self):
        self.made = []
        self.asked = []
        self.refuse = False

    def endpointForURI(self, uri):
        self.asked.append((uri.scheme, uri.host, uri.port))
        return Endpoint(self)


@pytest.fixture
def endpoints():
    return Endpoints()


@pytest.fixture
def client(clock, endpoints):
    client = LeanClient(clock, endpoints)
    yield client
    client.close()  # the idle connections' timers go with them


def answer(client, endpoints, data: bytes, *, limit=1000, index=-1):
    d = client.request(URI, REQUEST, limit)
    protocol, transport = endpoints.made[index]
    if data:
        protocol.dataReceived(data)
    return d, protocol, transport


def test_a_request_is_written_in_one_go_and_its_answer_read(client, endpoints):
    d, protocol, transport = answer(
        client, endpoints, b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nRetry-After: 3\r\n"
                           b"Content-Length: 12\r\n\r\n{\"ok\": true}")

    response, body = result_of(d)

    assert transport.value() == REQUEST
    assert (response.code, body) == (201, b'{"ok": true}')
    assert response.headers.getRawHeaders(b"Retry-After") == [b"3"]
    assert response.headers.getRawHeaders(b"x-missing", [b"none"]) == [b"none"]
    assert endpoints.asked == [(b"http", b"127.0.0.1", 9001)]


def test_a_kept_alive_connection_is_used_again(client, endpoints, clock):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    first, protocol, transport = answer(client, endpoints, ok)
    result_of(first)
    second = client.request(URI, REQUEST, 1000)
    protocol.dataReceived(ok)

    assert result_of(second)[1] == b"{}"
    assert len(endpoints.made) == 1
    assert transport.value() == REQUEST + REQUEST


def test_an_idle_connection_is_closed_after_a_while(client, endpoints, clock):
    d, protocol, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    result_of(d)

    clock.advance(119)
    assert transport.connected
    clock.advance(2)
    assert not transport.connected


def test_a_connection_the_server_closes_while_idle_is_not_used_again(client, endpoints):
    d, protocol, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    result_of(d)
    transport.connected = False
    protocol.connectionLost(Failure(ConnectionDone()))

    client.request(URI, REQUEST, 1000)

    assert len(endpoints.made) == 2


@pytest.mark.parametrize("close", [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
                                   b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"])
def test_a_connection_the_server_will_close_is_not_kept(client, endpoints, close):
    d, protocol, transport = answer(client, endpoints, close)

    assert result_of(d)[1] == b"{}"
    assert not transport.connected
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2


def test_a_chunked_answer_is_read_whole(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n")
    assert not has_fired(d)
    protocol.dataReceived(b"3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")

    assert result_of(d)[1] == b'{"a": 1}'


def test_an_answer_that_runs_until_the_connection_closes_is_read_whole(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"HTTP/1.0 200 OK\r\n\r\n{\"a\": ")
    protocol.dataReceived(b"1}")
    protocol.connectionLost(Failure(ConnectionDone()))

    assert result_of(d)[1] == b'{"a": 1}'


def test_an_answer_cut_short_is_a_failed_response(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\"")
    protocol.connectionLost(Failure(ConnectionLost()))

    failure_of(d, ResponseFailed)


def test_a_connection_closed_before_any_answer_is_a_response_never_received(client, endpoints):
    d, protocol, _ = answer(client, endpoints, b"")
    protocol.connectionLost(Failure(ConnectionDone()))

    failure_of(d, ResponseNeverReceived)


def test_an_answer_that_is_not_http_is_a_failed_response(client, endpoints):
    d, _, transport = answer(client, endpoints, b"SSH-2.0-OpenSSH\r\n\r\n")

    failure_of(d, ResponseFailed)
    assert transport.aborted


def test_an_answer_longer_than_the_limit_fails_without_being_kept(client, endpoints):
    d, _, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"x" * 20,
                             limit=10)

    failure_of(d, ResponseTooLarge)
    assert transport.aborted


def test_cancelling_aborts_the_connection(client, endpoints):
    d, protocol, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    d.cancel()
    protocol.dataReceived(b"{}")  # the rest of an answer nobody wants

    failure_of(d)
    assert transport.aborted
    client.request(URI, REQUEST, 1000)
    assert len(endpoints.made) == 2


def test_a_refused_connection_fails_the_request(client, endpoints):
    endpoints.refuse = True

    failure_of(client.request(URI, REQUEST, 1000), ConnectionRefusedError)


def test_close_closes_the_idle_connections(client, endpoints):
    d, _, transport = answer(client, endpoints, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    result_of(d)

    client.close()

    assert not transport.connected
