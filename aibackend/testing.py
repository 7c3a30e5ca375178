"""
Fakes and helpers the tests share (and that people writing model types may reuse).

Nothing here imports the global reactor: every fake takes the clock it runs on.

In memory:

  - L{FakeModel}: an L{IModel} whose answers the test decides (a canned
    L{ModelAnswer}, an error, a Deferred the test fires later), and which records every
    body and context it received.
  - L{HangingClient}: a treq-like client whose requests never answer, recording what was
    sent and what was cancelled (for deadlines on a L{Clock}).
  - L{FakeStreamingModel}: one that streams as the test says; L{RecordingChunks}, an
    L{IChunks} that keeps the chunks it is given.
  - L{result_of}, L{failure_of}: the synchronous C{successResultOf}/C{failureResultOf}
    of trial, for pytest.
  - L{StubFrontDoor}: a L{FrontDoor} served by the daemon's own Site over connections
    in memory (L{twisted.test.iosim}), with a C{call} that answers a L{Response}
    (status, headers, body, json) at once, and an C{open} whose streamed answer
    L{DoorStream} reads as it comes; L{ManagedFrontDoor}, one with a model manager.
  - L{assert_error}, L{parse_response}: the daemon's error shape; a raw HTTP answer read;
    L{sse_blocks}, L{sse_data}, L{sse_events}: a Server-Sent Events body taken apart.

The real thing, for the integration tests (blocking code, beside the reactor):
  - L{Daemon}: the real C{twistd aibackend} on a free loopback port (L{Multi}: with
    C{--processes}), its log, requests to it (L{Reply}), and its stop (SIGTERM, reaped);
    L{Streamed}: a request to it whose answer is read on a raw socket as it comes (its
    body's pieces and events, each with when it arrived).
  - L{ExampleModelServer}: examples/http_model_server.py on a free loopback port;
    L{ModelServer}: an HTTP model in a thread of the test, keeping what it is sent;
    L{StreamingModelServer}: one that streams (SSE or JSON lines) as its request says.
  - L{Process}: any child process with its output read; L{alive}, L{reaped},
    L{children}... what /proc says; L{wait_until}, L{free_port}, L{toml_models}.
"""

from __future__ import annotations

import bisect
import errno
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers as HTTPHeaders
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from aibackend.admin import ModelManager
from aibackend.config import ModelSpec, parse_config
from aibackend.destinations import DestinationPolicy
from aibackend.errors import OPENAI_TYPES
from aibackend.httpmodel import BytesBody
from aibackend.interfaces import READY, IChunks, IModel, IStreaming, ModelAnswer, RequestContext
from aibackend.logs import ModelLog
from aibackend.modelstate import ModelState, Waiters
from aibackend.processes import WorkerProcesses
from aibackend.registry import ModelDeps, ModelRegistry
from aibackend.server import AibackendSite
from aibackend.store import MemoryStore


# --- Deferreds, synchronously --------------------------------------------------


def result_of(d: Deferred):
    """
    @return: what C{d} has already fired with.
    @raise AssertionError: if C{d} has not fired, or failed (the failure is shown).
    """
    results = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has not fired yet")
    result = results[0]
    if isinstance(result, Failure):
        raise AssertionError(f"{d!r} failed:\n{result.getTraceback()}")
    return result


def has_fired(d: Deferred) -> bool:
    """Has C{d} a result yet (not only been called, but not waiting on another)?"""
    seen = []

    def look(result):
        seen.append(True)
        return result

    d.addBoth(look)
    return bool(seen)


def failure_of(d: Deferred, *expected) -> Failure:
    """
    @param expected: exception types, one of which the failure must be.
    @return: the failure C{d} has already failed with (it is handled from here on).
    @raise AssertionError: if C{d} has not fired, succeeded, or failed otherwise.
    """
    results = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has not fired yet")
    result = results[0]
    if not isinstance(result, Failure):
        raise AssertionError(f"{d!r} succeeded with {result!r}; expected a failure")
    if expected and not result.check(*expected):
        raise AssertionError(
            f"{d!r} failed with {result.type.__name__}, not one of "
            f"{', '.join(t.__name__ for t in expected)}:\n{result.getTraceback()}"
        )
    return result


# --- a model ------------------------------------------------------------------


@dataclass
class Received:
    """One request a fake model was sent."""

    body: bytes
    context: RequestContext

    def json(self):
        return json.loads(self.body)


class _Clockless:
    def seconds(self) -> float:
        return 0.0


@implementer(IModel)
class FakeModel:
    """
    A model whose answers the test decides.

    By default it answers C{200 {"ok": true}}. Then:
      - L{answers}: a canned answer for every request;
      - L{fails}: every send fails (asynchronously) with the given error;
      - L{raises}: every send raises the error at once (a broken model type);
      - L{holds}: every send returns a Deferred the test fires later (see L{pending});
        cancelling it is recorded in L{cancelled}.

    Its L{state} is the test's to set (C{model.state = "failed"}): those waiting and
    watching hear of it as from any model. Its requests in flight are the held ones.

    @ivar received: a L{Received} per request, in order.
    @ivar pending: the Deferreds handed out while holding, not yet fired.
    @ivar cancelled: the L{Received} whose held Deferred was cancelled.
    @ivar last_failure: the test's to set too.
    @ivar request_timeout: how long a removal waits for the held requests (0: not at all).
    """

    type_name = "fake"
    log = Logger()
    queued = 0
    last_failure = None
    startup_timeout = 0.0

    def __init__(self, model_id: str = "fake", clock=None, *, log_entries: int = 1000, state: str = READY,
                 request_timeout: float = 0.0):
        self.model_id = model_id
        self.spec = ModelSpec(id=model_id, type=self.type_name, log_entries=log_entries)
        self.model_log = ModelLog(clock if clock is not None else _Clockless(), log_entries)
        self.received: list[Received] = []
        self.pending: list[Deferred] = []
        self.cancelled: list[Received] = []
        self.request_timeout = request_timeout
        self._state = ModelState(self, state, why=lambda: self.last_failure)
        self._idle = Waiters()
        self.answers()

    # IModel

    @property
    def state(self) -> str:
        return self._state.value

    @state.setter
    def state(self, state: str) -> None:
        self._state.set(state)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def whenReady(self) -> Deferred:
        return self._state.when_ready()

    def whenIdle(self) -> Deferred:
        return self._idle.wait() if self.pending else succeed(None)

    def watch(self, callback):
        return self._state.watch(callback)

    # what the next requests get

    def answers(self, status: int = 200, body=b'{"ok": true}', headers=None) -> "FakeModel":
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self._outcome = ("answer", ModelAnswer(status=status, body=body, headers=dict(headers or {})))
        return self

    def fails(self, error: BaseException) -> "FakeModel":
        self._outcome = ("fail", error)
        return self

    def raises(self, error: BaseException) -> "FakeModel":
        self._outcome = ("raise", error)
        return self

    def holds(self) -> "FakeModel":
        self._outcome = ("hold", None)
        return self

    # ISender

    def send(self, body: bytes, context: RequestContext) -> Deferred:
        received = Received(body, context)
        self.received.append(received)
        kind, value = self._outcome
        if kind == "answer":
            return succeed(value)
        if kind == "fail":
            return fail(value)
        if kind == "raise":
            raise value
        d = Deferred(lambda d: self._cancelled(d, received))
        self.pending.append(d)
        d.addBoth(self._forget, d)
        return d

    def describe(self) -> dict:
        return {"id": self.model_id, "type": self.type_name, "state": self.state, "requests": len(self.received)}

    def _cancelled(self, d, received):
        self.cancelled.append(received)

    def _forget(self, result, d):
        if d in self.pending:
            self.pending.remove(d)
            if not self.pending:
                self._idle.fire()
        return result


@implementer(IPushProducer)
class Stream:
    """
    One request to a L{FakeStreamingModel}: the test drives it (L{chunk}, L{end},
    L{fail}); what the daemon did to it is recorded (L{pauses}, L{resumes}, L{stopped},
    L{cancelled}).
    """

    def __init__(self, body: bytes, context: RequestContext, chunks):
        self.body = body
        self.context = context
        self.chunks = chunks
        self.pauses = 0
        self.resumes = 0
        self.stopped = False
        self.cancelled = False
        self.d = Deferred(self._cancel)

    def chunk(self, value) -> None:
        """Give one chunk (a value made JSON, or JSON bytes as they are)."""
        self.chunks.chunk(value if isinstance(value, bytes) else json.dumps(value).encode())

    def end(self, output=None) -> None:
        """End the stream: with a final output (a value or JSON bytes), or None (done)."""
        if output is not None and not isinstance(output, bytes):
            output = json.dumps(output).encode()
        self.d.callback(output)

    def fail(self, error: BaseException) -> None:
        self.d.errback(error)

    # the producer the model registers

    def pauseProducing(self) -> None:
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.resumes += 1

    def stopProducing(self) -> None:
        # As a real model's producer: stopping it stops the work (the stream is cancelled).
        self.stopped = True
        if not self.d.called:
            self.d.cancel()

    def _cancel(self, d) -> None:
        self.cancelled = True


@implementer(IStreaming)
class FakeStreamingModel(FakeModel):
    """
    A L{FakeModel} that also streams: each L{stream} call makes a L{Stream} (in
    L{streams}) which registers itself as the request's producer (unless
    C{producer=False}) and whose chunks and end the test gives.
    """

    def __init__(self, model_id: str = "fake", clock=None, *, producer: bool = True, **kwargs):
        super().__init__(model_id, clock, **kwargs)
        self.producer = producer
        self.streams: list[Stream] = []

    @property
    def in_flight(self) -> int:
        return len(self.pending) + sum(1 for s in self.streams if not s.d.called)

    def stream(self, body: bytes, context: RequestContext, chunks) -> Deferred:
        stream = Stream(body, context, chunks)
        self.streams.append(stream)
        if self.producer:
            chunks.registerProducer(stream, True)
        return stream.d


@implementer(IChunks)
class RecordingChunks:
    """An L{IChunks} that keeps the chunks it is given (L{texts}) and the producer registered."""

    def __init__(self):
        self.texts: list[bytes] = []
        self.producer = None
        self.registered = 0

    def chunk(self, data: bytes) -> None:
        self.texts.append(data)

    @property
    def values(self) -> list:
        return [json.loads(text) for text in self.texts]

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming is True
        self.producer = producer
        self.registered += 1

    def unregisterProducer(self) -> None:
        self.producer = None


# --- a model server in memory ---------------------------------------------------


@implementer(IAgentEndpointFactory)
class MemoryEndpoints:
    """
    An C{IAgentEndpointFactory} whose connections reach a twisted.web resource in memory
    (L{twisted.test.iosim}): given to an L{aibackend.httpmodel.HttpModel} as its
    C{endpoints}, its requests go through the clients production uses (the lean client
    of the hot path, Agent for the rest), over no socket. What is written moves when the
    test says, with L{flush}.

    @ivar refusing: a connection failure (an exception) every new connection gets
        instead, or None.
    @ivar refused_ports: port -> the connection failure each connection to it gets.
    @ivar connections: every connection made, as C{(client transport, server transport)}.
    """

    def __init__(self, resource=None, *, site=None):
        if site is None:
            # The server's timers (its idle timeout) run on a clock of their own: the test's
            # clock has only the model's.
            site = Site(resource, reactor=Clock())
            site.noisy = False
        self.site = site
        self.refusing: BaseException | None = None
        self.refused_ports: dict = {}  # port -> the connection failure its connections get
        self.connections: list = []
        self._pumps: list = []

    def endpointForURI(self, uri):
        return _MemoryEndpoint(self, uri)

    def flush(self) -> None:
        """Move what was written either way until nothing moves."""
        moved = True
        while moved:
            moved = False
            for pump in list(self._pumps):
                if pump.pump():
                    moved = True
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(pump)

    def drop(self) -> None:
        """Close both ends of every open connection (a client that goes away)."""
        for pump in list(self._pumps):
            pump.serverIO.loseConnection()
            pump.clientIO.loseConnection()
        self.flush()

    def _connect(self, uri, factory) -> Deferred:
        if self.refusing is not None:
            return fail(self.refusing)
        if uri.port in self.refused_ports:
            return fail(self.refused_ports[uri.port])
        server_address = IPv4Address("TCP", "127.0.0.1", uri.port)
        client_address = IPv4Address("TCP", "127.0.0.1", 31337)
        server = self.site.buildProtocol(client_address)
        server_io = iosim.FakeTransport(server, isServer=True, hostAddress=server_address,
                                        peerAddress=client_address)
        client = factory.buildProtocol(server_address)
        client_io = iosim.FakeTransport(client, isServer=False, hostAddress=client_address,
                                        peerAddress=server_address)
        self._pumps.append(iosim.connect(server, server_io, client, client_io, greet=False))
        self.connections.append((client_io, server_io))
        return succeed(client)


class _MemoryEndpoint:
    def __init__(self, endpoints: MemoryEndpoints, uri):
        self._endpoints = endpoints
        self._uri = uri

    def connect(self, factory) -> Deferred:
        return self._endpoints._connect(self._uri, factory)


class HeldModelServer(MemoryEndpoints):
    """
    L{MemoryEndpoints} to a model server whose every request waits for the test to
    answer it (L{answer}), in the order they came (L{requests}: twisted.web requests).
    """

    def __init__(self):
        super().__init__(_Holding(self))
        self.requests: list = []
        self._lost: list = []  # the requests whose connection closed before their answer

    def answer(self, index: int = 0, status: int = 200, body: bytes = b'{"ok": true}', headers=None) -> None:
        """Answer the request C{index} and let the answer reach the client."""
        request = self.requests[index]
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        request.write(body)
        request.finish()
        self.flush()

    def drop(self, index: int = 0) -> None:
        """Close the connection of request C{index} without answering."""
        self.requests[index].channel.transport.loseConnection()
        self.flush()

    def abandoned(self, index: int = 0) -> bool:
        """Whether the client closed the connection of request C{index} before its answer."""
        self.flush()
        return self.requests[index] in self._lost

    def url(self, index: int) -> str:
        """The URL request C{index} was sent to (host, port and path)."""
        request = self.requests[index]
        return f"http://127.0.0.1:{request.getHost().port}{request.uri.decode()}"

    def urls(self) -> list[str]:
        return [self.url(index) for index in range(len(self.requests))]


class _Holding(Resource):
    isLeaf = True

    def __init__(self, server: HeldModelServer):
        super().__init__()
        self._server = server

    def render(self, request):
        self._server.requests.append(request)
        request.notifyFinish().addErrback(lambda _: self._server._lost.append(request))
        return NOT_DONE_YET


# --- an HTTP client -----------------------------------------------------------


@dataclass
class Posted:
    """One request a L{HangingClient} was asked to make."""

    url: object
    data: bytes
    headers: object
    kwargs: dict
    deferred: Deferred
    cancelled: bool = False


@dataclass
class HangingClient:
    """
    A treq-like client whose requests are never answered, only possibly cancelled.

    @ivar posted: a L{Posted} per request.
    """

    posted: list = field(default_factory=list)

    def post(self, url, data=None, headers=None, **kwargs) -> Deferred:
        def cancel(d):
            posted.cancelled = True

        d = Deferred(cancel)
        posted = Posted(url, data, headers, kwargs, d)
        self.posted.append(posted)
        return d


class JSONResponse:
    """
    An L{IResponse} stand-in with a JSON body delivered at once, to answer a
    L{HangingClient}'s (or any fake client's) request Deferred.
    """

    def __init__(self, code: int = 200, body: bytes = b'{"ok": true}'):
        self.code = code
        self.headers = HTTPHeaders({b"content-type": [b"application/json"]})
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol) -> None:

        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


# --- the front door, in memory -------------------------------------------------


@dataclass
class Response:
    """What a client saw."""

    status: int
    headers: object  # twisted.web.http_headers.Headers
    body: bytes

    def header(self, name: str):
        """The first value of header C{name}, as text, or None."""
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return values[0].decode("latin-1") if values else None

    def json(self):
        return json.loads(self.body)


def _body_at_once(body) -> BytesBody:
    """A request body written whole as soon as the request is (so a request can answer at once)."""
    return BytesBody(body.encode("utf-8") if isinstance(body, str) else bytes(body))


class StubFrontDoor:
    """
    A L{aibackend.root.FrontDoor} over a registry, reached through treq's L{HTTPClient} and
    an L{Agent} whose every connection is made in memory (L{twisted.test.iosim}) to the
    daemon's own Site (L{AibackendSite}) and Request: no socket.

    @param clock: the clock the front door and the registry's models run on.
    @param models: models to register.
    @param max_body_bytes: the site's body limit.
    @param in_thread: how the front door does work in a thread (at once by default).
    """

    def __init__(self, clock, models=(), *, max_body_bytes: int = 16 * 1024 * 1024, guard=None, manager=None,
                 in_thread=None):
        # The front doors import klein, which imports the global reactor: imported when a test builds one.
        from aibackend.root import FrontDoor

        self.clock = clock
        self.registry = ModelRegistry(ModelDeps(reactor=clock, environ={}))
        for model in models:
            self.registry.add(model)
        # Work the daemon does in a thread is done at once (no thread pool runs here).
        self.front_door = FrontDoor(self.registry, clock, guard=guard, manager=manager,
                                    in_thread=in_thread if in_thread is not None else maybeDeferred)
        # The site's own timers (header and idle deadlines) run on a clock nobody turns.
        memory = MemoryReactorClock()
        self.site = AibackendSite(
            self.front_door.resource(), max_body_bytes=max_body_bytes, reactor=memory,
            metrics=self.front_door.metrics,
        )
        self._connections = MemoryEndpoints(site=self.site)
        self._client = HTTPClient(Agent.usingEndpointFactory(memory, self._connections),
                                  data_to_body_producer=_body_at_once)

    def request(self, method: str, url: str, **kwargs) -> Deferred:
        """
        Start a request; the Deferred fires with a L{Response} once the whole answer
        is in (call L{flush} after firing a model's held Deferred).
        """
        if url.startswith("/"):
            url = "http://localhost" + url
        d = self._client.request(method, url, **kwargs)

        def read(response):
            return treq.content(response).addCallback(
                lambda body: Response(response.code, response.headers, body)
            )

        d.addCallback(read)
        self.flush()
        return d

    def open(self, method: str, url: str, **kwargs) -> Deferred:
        """
        Start a request; the Deferred fires with treq's response as soon as its status
        and headers are in (a streamed answer's body is then read with C{treq.collect}).
        """
        if url.startswith("/"):
            url = "http://localhost" + url
        d = self._client.request(method, url, **kwargs)
        self.flush()
        return d

    def call(self, method: str, url: str, **kwargs) -> Response:
        """Make a request whose answer comes at once, and return it."""
        return result_of(self.request(method, url, **kwargs))

    def flush(self) -> None:
        self._connections.flush()

    def drop_connections(self) -> None:
        """Drop every connection between the client and the site, as a client that goes away."""
        self._connections.drop()

class DoorStream:
    """
    A streamed answer through a L{StubFrontDoor}, read as it comes: the response once its
    status and headers are in (None before), and the body's bytes so far (L{body} flushes
    the connections first); L{ended}, treq's collect of the body, fires at its end.
    """

    def __init__(self, door: StubFrontDoor, method: str, url: str, **kwargs):
        self.door = door
        self.received: list[bytes] = []
        self.response = None
        self.ended = None
        door.open(method, url, **kwargs).addCallback(self._got)

    def _got(self, response):
        self.response = response
        self.ended = treq.collect(response, self.received.append)

    @property
    def body(self) -> bytes:
        self.door.flush()
        return b"".join(self.received)

    def header(self, name: str):
        """The first value of header C{name}, as text, or None."""
        values = self.response.headers.getRawHeaders(name.encode("latin-1"))
        return values[0].decode("latin-1") if values else None


class ManagedFrontDoor:
    """
    A L{StubFrontDoor} with a model manager (L{aibackend.admin.ModelManager}), its store
    (a L{MemoryStore} unless given), and the models it started with: the runtime
    operations (addmodel, removemodel, restart, /v2 load and unload) in memory.
    """

    def __init__(self, clock, *models, server=None, store=None, guard=None, environ=None):
        self.clock = clock
        self.server = server or parse_config({"server": {}}, environ={}).server
        self.store = store if store is not None else MemoryStore()
        self.manager = ModelManager(
            None, self.store, self.server, clock=clock,
            destination_policy=DestinationPolicy(self.server.allowed_destinations),
            config_ids=[model.model_id for model in models], environ=environ if environ is not None else {},
        )
        self.stub = StubFrontDoor(clock, models, guard=guard, manager=self.manager)
        self.manager.registry = self.registry = self.stub.registry

    def call(self, method, url, **kwargs):
        return self.stub.call(method, url, **kwargs)

    def request(self, method, url, **kwargs):
        return self.stub.request(method, url, **kwargs)

    def add(self, table=None, query="", **kwargs):
        if table is not None:
            kwargs["data"] = json.dumps(table).encode()
            kwargs.setdefault("headers", {"Content-Type": "application/json"})
        return self.call("POST", "/post/addmodel" + query, **kwargs)

    def predict(self, model_id, body=b"{}", **kwargs):
        return self.call("POST", f"/post/predict?id={model_id}", data=body, **kwargs)

    def ids(self):
        response = self.call("GET", "/get/models")
        assert response.status == 200, response.body
        return [model["id"] for model in response.json()["models"]]

    def status(self, model_id):
        return self.call("GET", f"/get/status?id={model_id}")


def assert_v2_error(response, status, *, message=None) -> str:
    """The Open Inference Protocol's error shape: C{{"error": "text"}}, JSON, with the request's id; the text."""
    assert response.status == status, response.body
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Request-Id")
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"]
    if message is not None:
        assert message in body["error"], body["error"]
    return body["error"]


def assert_error(response, status, error_type, *, model=None, message=None) -> dict:
    """The daemon's one error shape (of the plain routes), as JSON, with the request's id."""
    assert response.status == status, response.body
    assert response.header("Content-Type") == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == response.header("X-Request-Id")
    if model is not None:
        assert error["model"] == model
    else:
        assert "model" not in error
    if message is not None:
        assert message in error["message"], error["message"]
    return error


def parse_response(raw: bytes):
    """One raw HTTP answer: (status, headers with lower-case names, body, the bytes after the body)."""
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {raw[:300]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return status, headers, rest[:length], rest[length:]


def sse_blocks(body: bytes) -> list[bytes]:
    """Each event (and comment) of a Server-Sent Events body as it is written, without the blank line after it."""
    return [block for block in body.split(b"\n\n") if block]


def sse_data(body: bytes) -> list:
    """
    The JSON of each C{data:} event of a Server-Sent Events body, in order: every event
    but comments (keepalives) must be one line C{data: <JSON>}.
    """
    events = [event for event in sse_blocks(body) if not event.startswith(b":")]
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events), body
    return [json.loads(event[len(b"data: "):]) for event in events]


def sse_events(body: bytes) -> list[tuple[str, str]]:
    """(event name, data as written) of each event of a Server-Sent Events body; C{"message"} when it has no name."""
    found = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            found.append((fields.get("event", "message"), fields["data"]))
    return found



# --- the real daemon, in a child process ---------------------------------------
#
# What the integration tests share: the real C{twistd aibackend} (the one beside this
# Python) on a free loopback port, the processes it starts as /proc shows them, and the
# example HTTP model server. Plain blocking code (subprocess, threads, http.client): it
# runs beside the reactor pytest-twisted runs, never on it. Every wait has a deadline.
# The paths are of the source tree (the package is installed editable to be tested).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MODEL_SERVER = os.path.join(ROOT, "examples", "http_model_server.py")
MISBEHAVE = os.path.join(ROOT, "tests", "models", "misbehave.py")
PHOENIX = os.path.join(ROOT, "tests", "models", "phoenix.py")  # crashes until its flag file exists
STREAMER = os.path.join(ROOT, "tests", "models", "streamer.py")  # a hand-written jsonl model that streams
STREAM_WORKER = os.path.join(ROOT, "tests", "models", "stream_worker.py")  # an aibackend.worker generator
STREAM_ACCEPT = {"sse": "text/event-stream", "ndjson": "application/x-ndjson"}  # a Streamed's framing, asked
LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"
START_DEADLINE = 20.0
HEX32 = re.compile(r"^[0-9a-f]{32}$")  # a request id the daemon made
ADMIN_TOKEN = "admin-token-0123456789abcdef"  # long enough to be taken
LISTENING = re.compile(r"aibackend listening on http://([0-9.]+):(\d+)")
TWISTD_MARK = "twisted.scripts.twistd"  # on the command line of every twistd process
BUG_SIGNS = ("Traceback", "Unhandled error", "Unhandled Error")


def wait_until(predicate, timeout: float, what: str):
    """Poll C{predicate} until it is true (returned), for C{timeout} seconds at most."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago): connecting to it is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Could a server listen on 127.0.0.1:C{port} now?"""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def assert_no_bug_logged(output: str) -> None:
    """The daemon's log shows no traceback and no unhandled error of its own."""
    for sign in BUG_SIGNS:
        assert sign not in output, output[-8000:]


def event_text(line: str) -> str:
    """A log line as text: itself, or the formatted event if it is a JSON event (--log-format json)."""
    if line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            return line
        if isinstance(event, dict) and "log_format" in event:
            return formatEvent(event)
    return line


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of them are the same in TOML


def toml_models(*models: dict) -> str:
    """C{[[models]]} tables of flat keys (an inline table for a dict)."""
    return "\n".join(
        "[[models]]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in model.items())
        for model in models
    )


def config_text(*models, **server) -> str:
    """A configuration: a C{[server]} table of these keys, then the models."""
    lines = []
    if server:
        lines.append("[server]")
        lines += [f"{key} = {toml_value(value)}" for key, value in server.items()]
    return "\n".join(lines) + "\n" + toml_models(*models)


def write(path, text) -> str:
    """Write C{text} to C{path} (a L{pathlib.Path}); its name."""
    path.write_text(text)
    return str(path)


def misbehaving(model_id: str, *args: str, **keys) -> dict:
    """A subprocess model of C{tests/models/misbehave.py} (run with C{python} from PATH)."""
    return {"id": model_id, "type": "subprocess", "command": ["python", MISBEHAVE, *args], **keys}


def run(argv, *, env=None, cwd=None, deadline=START_DEADLINE) -> subprocess.CompletedProcess:
    """Run a command that is expected to end by itself, output captured apart."""
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=deadline,
                          stdin=subprocess.DEVNULL)


# --- processes, as /proc shows them --------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data.rpartition(")")[2].split()


def proc_state(pid: int) -> str | None:
    """The state letter of a process in /proc (R, S, Z, ...), or None if there is none."""
    fields = _stat(pid)
    return fields[0] if fields else None


def alive(pid: int) -> bool:
    """Is C{pid} running (there, and not a zombie)?"""
    return proc_state(pid) not in (None, "Z", "X")


def reaped(pid: int) -> bool:
    """Is C{pid} gone from /proc (ended, and waited for by its parent)?"""
    return proc_state(pid) is None


def stopped(pid: int) -> bool:
    """Is C{pid} stopped (SIGSTOP)?"""
    return proc_state(pid) in ("T", "t")


def parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def start_time(pid: int) -> int | None:
    """When C{pid} started (in clock ticks since boot): tells a process from a later one of the same pid."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode("utf-8", "replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def children(pid: int) -> set[int]:
    """The live (not zombie) children of C{pid}."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and parent_of(int(name)) == pid and alive(int(name)):
            found.add(int(name))
    return found


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def with_mark(pids, mark: str) -> set[int]:
    """The processes of C{pids} with C{mark} in a part of their command line."""
    return {pid for pid in pids if any(mark in part for part in cmdline(pid))}


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets C{pid} holds open."""
    inodes = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _tcp_sockets():
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            yield fields[1], fields[2], fields[3], int(fields[9])


def _loopback(port: int) -> str:
    return f"0100007F:{port:04X}"


def listening_inode(port: int) -> int:
    """The inode of the socket listening on 127.0.0.1:C{port}."""
    for local, _, state, inode in _tcp_sockets():
        if local == _loopback(port) and state == "0A":
            return inode
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def accepted_inode(port: int, client_port: int) -> int:
    """The inode of the server's end of a connection (0 until a process has accepted it)."""
    for local, remote, state, inode in _tcp_sockets():
        if local == _loopback(port) and remote == _loopback(client_port):
            return inode
    return 0


def memory_kb(pid: int, field: str = "VmRSS") -> int:
    """A figure of process C{pid}'s memory, in kB, as /proc/PID/status says: its resident set (VmRSS), or C{field}."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def blocked_writing(pid: int) -> bool:
    """
    Is a thread of process C{pid} asleep writing to a full pipe (its stdout, when the
    daemon has stopped reading it)? What the kernel says in C{/proc/PID/task/*/wchan}.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/wchan") as f:
                if "pipe_write" in f.read():
                    return True
        except (FileNotFoundError, ProcessLookupError):
            continue
    return False


@contextmanager
def pids_stopped(pids):
    """The processes stopped (SIGSTOP); continued (SIGCONT) whatever happens."""
    pids = list(pids)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: all(stopped(pid) for pid in pids), 5, f"{pids} to stop")
        yield
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


class Process:
    """
    A child process whose output is read by threads into L{lines}, so it never blocks on
    a full pipe. Its stderr goes with its stdout, unless C{separate_stderr}: then it is
    read apart too (L{stdout}, L{stderr}).
    """

    def __init__(self, argv, *, env=None, cwd=None, separate_stderr: bool = False):
        self.argv = argv
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
        self.pid = self.popen.pid
        self._readers = [threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout), daemon=True)]
        if separate_stderr:
            self._readers.append(threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr),
                                                  daemon=True))
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines):
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                lines.append(line)
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end (L{subprocess.TimeoutExpired} if it does not); its status."""
        return self.popen.wait(timeout)

    def _reading(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def wait_for(self, pattern, deadline: float = START_DEADLINE) -> re.Match:
        """Wait until a line (a JSON event as its text) matches C{pattern}, a regular expression."""
        regex = re.compile(pattern)
        end = time.monotonic() + deadline
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(event_text(line))
                    if match:
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._reading():
                    raise AssertionError(f"{self.argv[0]} ended ({self.popen.returncode}) before saying "
                                         f"{regex.pattern!r}:\n{self.output[-8000:]}")
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.argv[0]} did not say {regex.pattern!r} within {deadline} s:\n"
                                         f"{self.output[-8000:]}")
                self._changed.wait(min(left, 0.2))

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(5)

    def terminate(self, deadline: float = 10.0) -> int:
        """SIGTERM, wait up to C{deadline} s, SIGKILL if needed; the exit status (the process is reaped)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(deadline)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._join()
        return self.popen.returncode

    def wait_exit(self, deadline: float = START_DEADLINE) -> int:
        """Wait for the process to end by itself; if it does not in time, end it and fail."""
        try:
            self.popen.wait(deadline)
        except subprocess.TimeoutExpired:
            self.terminate()
            raise AssertionError(f"{self.argv} still running after {deadline} s:\n{self.output[-8000:]}")
        self._join()
        return self.popen.returncode


class Headers(dict):
    """Response headers, by lower-case name, looked up whatever the case."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name.lower())

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)


class Reply(NamedTuple):
    """What a client of the real daemon saw: also a tuple (status, headers, body)."""

    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    def error(self, status: int, error_type: str) -> dict:
        """The daemon's one error shape, with this status and type."""
        assert self.status == status, self
        assert self.headers["content-type"] == "application/json"
        error = self.json()["error"]
        assert error["type"] == error_type, self
        assert error["message"] and error["request_id"] == self.headers["x-request-id"]
        return error

    def __repr__(self):
        return f"<Reply {self.status} {self.body[:300]!r}>"


def call(port: int, method: str, path: str, body=None, headers=None, timeout: float = 15.0) -> Reply:
    """One request on a connection of its own to 127.0.0.1:C{port}."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, Headers((k.lower(), v) for k, v in response.getheaders()), response.read())
    finally:
        connection.close()


def _json_body(body, headers):
    """A dict or list body as JSON (and its content type, unless given); any other as it is."""
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    return body, headers


class Daemon:
    """
    C{twistd -n aibackend} in a child process, on a free loopback port unless told
    (C{listen}); ready once its log says where it listens.

    @param config: the configuration file (none: the daemon's defaults).
    @param extra: more command-line arguments.
    @param state: the C{--state} directory (none: the configuration's, or C{$XDG_STATE_HOME}'s).
    @param env: variables added to this process's environment.
    @param admin_token: given as C{AIBACKEND_ADMIN_TOKEN}.
    @param processes: C{--processes}.
    @param separate_stderr: read its stderr apart from its stdout.
    @param wait: wait until it listens (else call L{wait_listening}).
    """

    def __init__(self, config: str | None = None, *extra: str, state=None, cwd=None, env=None,
                 listen: str | None = LOOPBACK_ANY_PORT, admin_token: str | None = None, processes=None,
                 separate_stderr: bool = False, wait: bool = True, deadline: float = START_DEADLINE):
        argv = [TWISTD, "--pidfile=", "-n", "aibackend"]
        if config is not None:
            argv += ["--config", str(config)]
        if state is not None:
            argv += ["--state", str(state)]
        if listen is not None:
            argv += ["--listen", listen]
        if processes is not None:
            argv += ["--processes", str(processes)]
        argv += extra
        environ = {**os.environ, **(env or {})}
        if admin_token is not None:
            environ["AIBACKEND_ADMIN_TOKEN"] = admin_token
        self.state = state
        self.port: int | None = None
        self.process = Process(argv, env=environ, cwd=cwd, separate_stderr=separate_stderr)
        self.pid = self.process.pid
        if wait:
            self.wait_listening(deadline)

    # the process

    @property
    def output(self) -> str:
        """Everything it wrote, as text."""
        return self.process.output

    @property
    def lines(self) -> list[str]:
        return self.process.lines

    @property
    def stdout(self) -> list[str]:
        return self.process.stdout

    @property
    def stderr(self) -> list[str]:
        """Its stderr lines (with C{separate_stderr}; else they are in L{stdout})."""
        return self.process.stderr

    def log_text(self, count: int = 60) -> str:
        """Its last C{count} lines."""
        return "\n".join(self.lines[-count:])

    def assert_no_bug_logged(self) -> None:
        assert_no_bug_logged(self.output)

    def wait_listening(self, timeout: float = START_DEADLINE) -> "Daemon":
        """Wait until it listens (its port known); stopped if it does not."""
        if self.port is None:
            try:
                match = self.process.wait_for(LISTENING, timeout)
            except BaseException:
                self.stop()
                raise
            self.port = int(match.group(2))
        return self

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM; it must end within C{timeout} s (else it is killed and the test fails); its status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.terminate(0)
                raise AssertionError(f"the daemon did not stop within {timeout} s of SIGTERM:\n{self.log_text()}")
        return self.process.terminate()

    def stop(self) -> int:
        """At the end of a test, whatever happened in it: SIGTERM, then SIGKILL after 10 s; reaped."""
        return self.process.terminate(10)

    def high_water_kb(self) -> int:
        """Its peak resident memory (VmHWM), in kB."""
        return memory_kb(self.pid, "VmHWM")

    # requests

    def connect(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 15) -> Reply:
        """One request on a new connection; a dict or list body is sent as JSON."""
        body, headers = _json_body(body, headers)
        return call(self.port, method, path, body, headers, timeout)

    def predict(self, model_id: str, payload=None, headers=None, timeout: float = 15) -> Reply:
        """POST /post/predict: C{payload} as JSON (C{{}} if none), or bytes as they are."""
        if not isinstance(payload, bytes):
            payload = json.dumps(payload if payload is not None else {}).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", f"/post/predict?id={model_id}", payload, headers, timeout)

    def add(self, table: dict, query: str = "", headers=None) -> Reply:
        return self.request("POST", "/post/addmodel" + query, table, headers)

    def remove(self, model_id: str, headers=None) -> Reply:
        return self.request("POST", f"/post/removemodel?id={model_id}", b"", headers)

    def models(self, headers=None) -> dict:
        """GET /get/models, by id."""
        reply = self.request("GET", "/get/models", headers=headers)
        assert reply.status == 200, reply
        return {model["id"]: model for model in reply.json()["models"]}

    def status(self, model_id: str) -> Reply:
        return self.request("GET", f"/get/status?id={model_id}")

    def wait_state(self, model_id: str, state: str, timeout: float = 5) -> dict:
        """Wait until the model's status says C{state}; that status."""
        found = {}

        def reached():
            reply = self.status(model_id)
            found.update(reply.json())
            return reply.status == 200 and found.get("state") == state

        wait_until(reached, timeout, f"model {model_id} to be {state} (it is {found.get('state')})")
        return found

    def pids(self, model_id: str) -> set[int]:
        """The pids of the model's processes, as its status says."""
        reply = self.status(model_id)
        assert reply.status == 200, reply
        return {process["pid"] for process in reply.json()["processes"]}

    def logs(self, model_id: str) -> list[dict]:
        """The model's log entries (GET /get/getlogs)."""
        reply = self.request("GET", f"/get/getlogs?id={model_id}")
        assert reply.status == 200, reply
        return reply.json()["entries"]

    def events(self, model_id: str, name: str) -> list[dict]:
        return [entry for entry in self.logs(model_id) if entry["event"] == name]

    def access_line(self, request_id: str, timeout: float = 5) -> str:
        """The access event's line of request C{request_id}, once it is in the daemon's log (there must be one)."""
        def found():
            return [line for line in self.lines if f"request={request_id} " in line + " " and " bytes " in line]
        (line,) = wait_until(found, timeout, f"the access event of request {request_id}")
        return line

    def model_pids(self, model_id: str) -> set[int]:
        """Every process the model's log says was started."""
        return {entry["pid"] for entry in self.events(model_id, "process started")}

    def ready_pids(self, model_id: str) -> set[int]:
        return {entry["pid"] for entry in self.events(model_id, "process ready")}

    def scrape(self):
        """@return: (content type, the /metrics page's text, its samples as [(name, labels, value)])."""
        reply = self.request("GET", "/metrics")
        assert reply.status == 200, reply.body
        text = reply.body.decode("utf-8")
        samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
        return reply.headers["content-type"], text, samples

    def metric(self, name: str, **labels):
        """The value of the one sample C{name} with exactly C{labels}, or None."""
        for sample_name, sample_labels, value in self.scrape()[2]:
            if sample_name == name and sample_labels == labels:
                return value
        return None


class Multi(Daemon):
    """
    A L{Daemon} with C{--processes}: a primary and its workers, told apart through /proc.

    Which process serves a connection is the primary's choice (the one holding the fewest);
    L{connection_to} takes one pinned to a process, as /proc shows.
    """

    def workers(self) -> set[int]:
        """The worker processes: the primary's children that run twistd."""
        return with_mark(children(self.pid), TWISTD_MARK)

    def worker(self) -> int:
        (worker,) = self.workers()
        return worker

    def wait_workers(self, count: int, timeout: float = 10, exclude=()) -> set[int]:
        found = set()

        def enough():
            found.clear()
            found.update(self.workers() - set(exclude))
            return len(found) == count

        wait_until(enough, timeout, f"{count} worker process(es) (found {found})\n{self.output[-3000:]}")
        return set(found)

    def tagged(self, parent: int, tag: str) -> set[int]:
        """The children of C{parent} with C{tag} on their command line."""
        return with_mark(children(parent), tag)

    def wait_tagged(self, parent: int, tag: str, count: int, timeout: float = 10) -> set[int]:
        wait_until(lambda: len(self.tagged(parent, tag)) == count, timeout,
                   f"{count} {tag} process(es) under {parent} (found {self.tagged(parent, tag)})")
        return self.tagged(parent, tag)

    def primary_stopped(self):
        """The primary stopped (SIGSTOP; SIGCONT after): the connections the kernel gives its socket wait meanwhile."""
        return pids_stopped([self.pid])

    def connection_to(self, pid: int, timeout: float = 15) -> http.client.HTTPConnection:
        """
        A connection that process C{pid} (the primary or a worker) holds. The primary
        gives each new connection to the process holding the fewest: connections held by
        another process are kept open (so the next goes elsewhere) until one is C{pid}'s,
        then closed; one that none took within a second (the primary is stopped) is closed.
        """
        deadline = time.monotonic() + timeout
        ours = {self.pid} | self.workers()
        others = []
        try:
            while True:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
                connection.connect()
                client_port = connection.sock.getsockname()[1]
                holder = _accepted_by(ours, self.port, client_port, min(1.0, max(0.1, deadline - time.monotonic())))
                if holder == self.pid:  # (the primary holds each a moment, as it hands it over)
                    time.sleep(0.05)
                    holder = _accepted_by(ours, self.port, client_port, 1.0)
                if holder == pid:
                    return connection
                others.append(connection)
                if time.monotonic() > deadline:
                    raise AssertionError(f"process {pid} took none of the connections made in {timeout:g} s "
                                         f"(the last: {holder or 'nobody'})")
        finally:
            for other in others:
                other.close()

    def request_to(self, pid: int, method: str, path: str, body=None, headers=None) -> Reply:
        """One request on a connection process C{pid} accepted."""
        body, headers = _json_body(body, headers)
        connection = self.connection_to(pid)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return Reply(response.status, Headers((k.lower(), v) for k, v in response.getheaders()), response.read())
        finally:
            connection.close()


class StreamEvent(NamedTuple):
    """
    One event of a streamed answer: C{kind} is C{"chunk"}, C{"done"} or C{"error"};
    C{data} the chunk, the final output, or the error document; C{at} when the bytes that
    completed it arrived (time.time(), the clock models write in their chunks).
    """

    at: float
    kind: str
    data: object


class Streamed:
    """
    A request to the real daemon whose answer is read as it comes, on a raw socket: the
    request is sent at once; L{status}, L{version} and L{headers} wait for the answer's head;
    its body is taken as it arrives (chunked encoding undone; without it, to its length or
    to the connection's end) into L{body}, each piece with the moment it came in
    L{arrivals}. Read it as bytes (L{read_until}, L{read_all}, L{rest}) or as events
    (L{events}, L{read_events}: SSE or NDJSON, as the answer's type says), or both: the
    events are read from the same body. L{leave} drops the connection (the client goes
    away, at any point); L{close} at the end.

    @param body: a dict or list is sent as JSON; bytes (or text) as they are; any body
        goes with C{Content-Type: application/json} unless the headers say otherwise.
    @param framing: C{"sse"} or C{"ndjson"}, asked for with C{Accept} (unless the headers
        have one); None sends no C{Accept} (the path may say C{stream=true}).
    @param receive_buffer: the client socket's C{SO_RCVBUF}, set before it connects (a
        small one makes a slow reader whose daemon soon pauses the model).
    @param sock: a socket connected already (L{Multi.connection_to}'s C{.sock}) to send
        the request on, instead of a new one.
    @param http_version: C{"1.1"}, or C{"1.0"} (the answer then ends with the connection).
    @ivar request_id: the C{X-Request-Id} the request was sent with, if any.
    @ivar comments: how many SSE comment lines (keepalives) L{events} has passed over.
    """

    def __init__(self, port: int, method: str, path: str, body=None, *, framing: str | None = "sse",
                 headers=None, timeout: float = 15.0, receive_buffer: int | None = None, sock=None,
                 http_version: str = "1.1"):
        body, headers = _json_body(body, headers)
        headers = dict(headers or {})
        if isinstance(body, str):
            body = body.encode("utf-8")
        if framing is not None and not any(name.lower() == "accept" for name in headers):
            headers["Accept"] = STREAM_ACCEPT[framing]
        if body is not None:
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(len(body))
        self.request_id = next((value for name, value in headers.items() if name.lower() == "x-request-id"), None)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", port))
        self.sock = sock
        self.sock.settimeout(timeout)
        lines = [f"{method} {path} HTTP/{http_version}", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        self.arrivals: list[tuple[float, bytes]] = []  # (when, the body's bytes that came then)
        self.comments = 0
        self._raw = bytearray()  # received, not yet taken into the body
        self._body = bytearray()
        self._ends: list[int] = []  # the body's length after each piece of arrivals
        self._at = 0.0  # when the last bytes came
        self._closed = False  # the daemon closed the connection
        self._ended = False  # the body is complete
        self._length = None  # what is left of a body of known length (None: chunked, or to the close)
        self._chunked = False
        self._cursor = 0  # how far into the body the events have been read
        self._head = None

    # the answer's head

    def head(self) -> "Streamed":
        """Wait for the status line and headers."""
        if self._head is None:
            while b"\r\n\r\n" not in self._raw:
                if not self._receive():
                    raise AssertionError(f"the connection closed before the answer's head: {bytes(self._raw)!r}")
            end = self._raw.index(b"\r\n\r\n")
            head = bytes(self._raw[:end]).decode("latin-1")
            del self._raw[:end + 4]
            status_line, *header_lines = head.split("\r\n")
            version, status = status_line.split()[:2]
            headers = Headers()
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._head = (version, int(status), headers)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._chunked = True
            elif "content-length" in headers:
                self._length = int(headers["content-length"])
            self._take()
        return self

    @property
    def version(self) -> str:
        """The answer's HTTP version, as its status line says (C{"HTTP/1.1"})."""
        return self.head()._head[0]

    @property
    def status(self) -> int:
        return self.head()._head[1]

    @property
    def headers(self) -> Headers:
        return self.head()._head[2]

    # the body, as bytes

    @property
    def body(self) -> bytes:
        """The body so far."""
        return bytes(self._body)

    @property
    def ended(self) -> bool:
        """Has the body ended (by its own framing, or by the connection's end)?"""
        return self._ended

    def read_until(self, wanted: bytes) -> bytes:
        """Read until the body holds C{wanted} (it must come before the body ends); the body so far."""
        while wanted not in self._body and self._read():
            pass
        assert wanted in self._body, f"{wanted!r} never came; the body: {bytes(self._body[-500:])!r}"
        return self.body

    def read_all(self, timeout: float | None = None) -> bytes:
        """Read to the body's end (within C{timeout} s, if given); the whole body."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._read():
            assert deadline is None or time.monotonic() < deadline, \
                f"the stream did not end within {timeout} s: {bytes(self._body[-300:])!r}"
        return self.body

    def rest(self) -> bytes:
        """What L{events} has not read of the body, read to its end (a plain answer, or what a stream still had)."""
        self.read_all()
        return bytes(self._body[self._cursor:])

    # the body, as events

    def events(self):
        """Each event as it arrives, until the stream ends (the done or error event, or the body's end)."""
        if self.headers.get("content-type") == "application/x-ndjson":
            for line, at in self._lines():
                event = self._ndjson(json.loads(line), at)
                yield event
                if event.kind != "chunk":
                    return
            return
        kind, data = None, []
        for line, at in self._lines():
            if line.startswith(b":"):
                self.comments += 1
            elif line.startswith(b"event: "):
                kind = line[len(b"event: "):].decode()
            elif line.startswith(b"data: "):
                data.append(line[len(b"data: "):].decode())
            elif line == b"":
                if data:
                    value = json.loads("\n".join(data))
                    if kind == "done":
                        value = value["output"]
                    event = StreamEvent(at, kind or "chunk", value)
                    yield event
                    if event.kind != "chunk":
                        return
                kind, data = None, []
            else:
                raise AssertionError(f"not a line of Server-Sent Events: {line[:200]!r}")
        assert kind is None and not data, f"the stream ended in the middle of an event: {bytes(self._body[-300:])!r}"

    def read_events(self) -> list[StreamEvent]:
        """Every event, then the body's end: nothing may come after the last event. The connection is closed after."""
        try:
            events = list(self.events())
            assert self.rest() == b"", "bytes after the stream's last event"
            return events
        finally:
            self.close()

    @staticmethod
    def _ndjson(value, at: float) -> StreamEvent:
        if isinstance(value, dict) and set(value) == {"chunk"}:
            return StreamEvent(at, "chunk", value["chunk"])
        if isinstance(value, dict) and value.get("done") is True:
            return StreamEvent(at, "done", value["output"])
        return StreamEvent(at, "error", value)

    def _lines(self):
        """Each line of the body (without its line end) as soon as it has come, with when it came."""
        while True:
            end = self._body.find(b"\n", self._cursor)
            if end >= 0:
                line = bytes(self._body[self._cursor:end])
                self._cursor = end + 1
                yield line, self.arrivals[bisect.bisect_right(self._ends, end)][0]
            elif not self._read():
                if self._cursor < len(self._body):
                    raise AssertionError(f"the stream ended in the middle of a line: {bytes(self._body[-200:])!r}")
                return

    # the socket

    def _receive(self) -> bool:
        """One read of the socket into the received bytes; False once the connection has ended."""
        if self._closed:
            return False
        data = self.sock.recv(65536)
        self._at = time.time()
        if not data:
            self._closed = True
            return False
        self._raw += data
        return True

    def _read(self) -> bool:
        """Wait until more of the body has come; False (nothing more) once the body has ended."""
        before = len(self._body)
        self.head()  # the bytes that came with the head count as more
        while len(self._body) == before and not self._ended:
            if not self._receive():
                self._ended = True  # the connection's end ends the body, whatever its framing said
            self._take()
        return len(self._body) > before

    def _take(self) -> None:
        """Move what has been received of the body to L{body} (whole chunks only, with chunked encoding)."""
        if self._chunked:
            while not self._ended:
                line_end = self._raw.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(bytes(self._raw[:line_end]).split(b";")[0], 16)
                if size == 0:
                    self._ended = True
                    return
                if len(self._raw) < line_end + 2 + size + 2:
                    return
                self._piece(bytes(self._raw[line_end + 2:line_end + 2 + size]))
                del self._raw[:line_end + 2 + size + 2]
            return
        if self._raw:
            piece = bytes(self._raw if self._length is None else self._raw[:self._length])
            self._raw.clear()
            if self._length is not None:
                self._length -= len(piece)
            self._piece(piece)
        if self._closed or self._length == 0:
            self._ended = True

    def _piece(self, piece: bytes) -> None:
        self._body += piece
        self._ends.append(len(self._body))
        self.arrivals.append((self._at, piece))

    def leave(self) -> float:
        """Drop the connection now, as a client that goes away; when it did (time.time())."""
        at = time.time()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # gone already
        self.close()
        return at

    def close(self) -> None:
        self.sock.close()


class ExampleModelServer:
    """examples/http_model_server.py, the README's model server, on a free loopback port (L{port})."""

    def __init__(self):
        self.process = Process([sys.executable, MODEL_SERVER, "--listen", LOOPBACK_ANY_PORT])
        try:
            self.port = int(self.process.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        except BaseException:
            self.process.terminate()
            raise

    def stop(self) -> int:
        return self.process.terminate()


class _QuietHandler(BaseHTTPRequestHandler):
    """How the test's HTTP servers answer: HTTP/1.1, nothing logged."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self) -> bytes:
        """The request's body (its Content-Length's worth)."""
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class _ThreadedServer:
    """An HTTP server on 127.0.0.1 (a free port) in threads of this process: L{port}, L{url}, L{close}."""

    def _serve(self, handler: type, path: str) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class ModelServer(_ThreadedServer):
    """
    An HTTP model on 127.0.0.1 (a free port) in a thread of this process: every request
    (any method, any path) is kept in L{received} as (path, headers, body) and answered
    by L{answer}: C{200 {"ok": true}} here, whatever a subclass says.
    """

    def __init__(self):
        self.received: list[tuple[str, dict, bytes]] = []
        self._changed = threading.Condition()
        server = self

        class Handler(_QuietHandler):
            def do_POST(self):
                body = self.read_body()
                headers = dict(self.headers.items())
                with server._changed:
                    server.received.append((self.path, headers, body))
                    server._changed.notify_all()
                status, more, answer = server.answer(self.path, headers, body)
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **more}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the daemon gave up on us

            do_GET = do_POST

        self._serve(Handler, "/predict")

    def answer(self, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        """(status, headers, body) of the answer to a request (in the request's thread)."""
        return 200, {}, b'{"ok": true}'

    @property
    def hits(self) -> int:
        """How many requests it was sent."""
        with self._changed:
            return len(self.received)

    def requests_to(self, prefix: str) -> list[tuple[str, dict, bytes]]:
        with self._changed:
            return [r for r in self.received if r[0].startswith(prefix)]

    def wait_for(self, prefix: str, timeout: float = 5) -> None:
        """Wait until a request to a path that starts with C{prefix} has come."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(r[0].startswith(prefix) for r in self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no request to {prefix} within {timeout} s")
                self._changed.wait(left)


class UpstreamStream:
    """What a L{StreamingModelServer} did with one request: its plan, writes, and end."""

    def __init__(self, plan: dict):
        self.plan = plan
        self.writes: list[float] = []  # when the writing of each chunk began (time.time())
        self.written = 0  # bytes written so far
        self.release = threading.Event()  # the test lets a "gate" stream go on
        self.gone = threading.Event()  # a write failed: the client (the daemon) left
        self.ended = threading.Event()  # the handler is done, whatever happened


class StreamingModelServer(_ThreadedServer):
    """
    A model server on 127.0.0.1 (a free port), in threads of the test, that answers each
    POST with a stream (chunked encoding) as its JSON body says:

      - C{format}: C{"sse"} (C{text/event-stream}), C{"ndjson"} (C{application/x-ndjson})
        or C{"json"} (the chunks as one JSON array); C{crlf}: SSE lines end with CRLF;
      - C{chunks}: the chunks' values, each written (and flushed) on its own, C{pause}
        seconds apart; C{gate}: after the first chunk, wait for the test's C{release}
        (up to 10 s); C{forever}: write the chunks again and again until a write fails
        (C{limit}: at most that many bytes); C{size}: each chunk a string of that many
        bytes instead;
      - C{end}: C{"openai"} (C{data: [DONE]}), C{"done"} (aibackend's done event/line,
        with C{output}), or nothing (the body just ends); C{error}: an error event/line
        (this document) after the chunks instead;
      - C{tag}: the name of the request in L{streams} (an L{UpstreamStream}).
    """

    def __init__(self):
        self.streams: dict[str, UpstreamStream] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(_QuietHandler):
            def do_POST(self):
                plan = json.loads(self.read_body() or b"{}")
                stream = UpstreamStream(plan)
                stream.accept = self.headers.get("Accept")
                with server._lock:
                    server.streams[plan.get("tag", "")] = stream
                try:
                    server._answer(self, plan, stream)
                except OSError:
                    stream.gone.set()
                finally:
                    stream.ended.set()
                    self.close_connection = True

        self._serve(Handler, "/stream")

    def _answer(self, handler, plan: dict, stream: UpstreamStream) -> None:
        kind = plan.get("format", "sse")
        eol = "\r\n" if plan.get("crlf") else "\n"
        handler.send_response(plan.get("status", 200))
        handler.send_header("Content-Type", {"sse": "text/event-stream", "ndjson": "application/x-ndjson",
                                             "json": "application/json"}[kind])
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def write(text: str) -> None:
            data = text.encode()
            stream.writes.append(time.time())  # before: the client may read it before this thread goes on
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            stream.written += len(data)

        def piece(value) -> str:
            text = json.dumps(value)
            if kind == "sse":
                return f"data: {text}{eol}{eol}"
            if kind == "ndjson":
                return text + "\n"
            return text

        values = plan.get("chunks", [])
        if plan.get("size"):
            values = ["x" * plan["size"]]
        if kind == "json":
            write(json.dumps(values))
        else:
            n = 0
            while n < len(values) or (plan.get("forever") and stream.written < plan.get("limit", 1 << 40)):
                if n and plan.get("pause"):
                    time.sleep(plan["pause"])
                write(piece(values[n % len(values)]))
                if n == 0 and plan.get("gate"):
                    stream.release.wait(10)
                n += 1
            if plan.get("error") is not None:
                text = json.dumps(plan["error"])
                write(f"event: error{eol}data: {text}{eol}{eol}" if kind == "sse" else text + "\n")
            elif plan.get("end") == "openai":
                write(f"data: [DONE]{eol}{eol}")
            elif plan.get("end") == "done":
                output = json.dumps({"output": plan.get("output")})
                if kind == "sse":
                    write(f"event: done{eol}data: {output}{eol}{eol}")
                else:
                    write(json.dumps({"done": True, "output": plan.get("output")}) + "\n")
        handler.wfile.write(b"0\r\n\r\n")

    def stream(self, tag: str, timeout: float = 10) -> UpstreamStream:
        """The request tagged C{tag}, once it has come."""
        wait_until(lambda: tag in self.streams, timeout, f"the upstream to be sent request {tag!r}")
        return self.streams[tag]

    def close(self) -> None:
        for stream in list(self.streams.values()):
            stream.release.set()
        super().close()


# --- the --processes primary's workers, on a fake reactor ---------------------------------------


class FakeWorkerTransport:
    """A worker process's transport: what was written to it and the signals it was sent."""

    def __init__(self, pid):
        self.pid = pid
        self.signals = []
        self.written = []

    def signalProcess(self, name):
        self.signals.append(name)

    def write(self, data):
        self.written.append(data)


class SpawningClock:
    """A Clock that also spawns (fake) processes: C{spawned} holds what each was given."""

    def __init__(self, clock):
        self.clock = clock
        self.spawned = []

    def __getattr__(self, name):
        return getattr(self.clock, name)

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        transport = FakeWorkerTransport(1000 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, env, childFDs))
        return transport


class FakeListener:
    """
    A shared listen address, as the workers inherit it: every worker's socket has file
    descriptor C{fileno} (IPv4); C{handed} and C{taken} list the worker numbers the
    primary stopped serving and served again.
    """

    def __init__(self, fileno):
        self.socket = type("Sock", (), {"fileno": lambda self: fileno, "family": socket.AF_INET})()
        self.handed: list[int] = []
        self.taken: list[int] = []

    def socket_for(self, number):
        return self.socket

    def handed_over(self, number):
        self.handed.append(number)

    def taken_back(self, number):
        self.taken.append(number)

    def spawned(self, number):
        pass  # (a real one closes its copy of the worker's end of the link)


class FakePrivate:
    """The private port the workers forward to (4321)."""

    port = type("Port", (), {"getHost": lambda self: type("Address", (), {"port": 4321})()})()


def workers_on(clock, count=2, registry=None):
    """C{count} - 1 worker processes of a primary (L{aibackend.processes.WorkerProcesses}), started on C{clock}."""
    reactor = SpawningClock(clock)
    workers = WorkerProcesses(reactor, count, ["-c", "pass"], [FakeListener(7)], FakePrivate(), "token",
                              registry=registry)
    workers.startService()
    return reactor, workers


def end_worker(worker):
    """A worker process ends (exit status 1)."""
    worker.processEnded(Failure(ProcessTerminated(exitCode=1)))


__all__ = [
    "FakeListener",
    "FakePrivate",
    "FakeWorkerTransport",
    "SpawningClock",
    "end_worker",
    "workers_on",
    "ADMIN_TOKEN",
    "Daemon",
    "DoorStream",
    "ExampleModelServer",
    "FakeModel",
    "HEX32",
    "HangingClient",
    "Headers",
    "HeldModelServer",
    "JSONResponse",
    "LOOPBACK_ANY_PORT",
    "MISBEHAVE",
    "MODEL_SERVER",
    "PHOENIX",
    "RecordingChunks",
    "ManagedFrontDoor",
    "MemoryEndpoints",
    "ModelServer",
    "Multi",
    "Posted",
    "Process",
    "ROOT",
    "STREAMER",
    "STREAM_ACCEPT",
    "STREAM_WORKER",
    "Received",
    "Reply",
    "Response",
    "StreamEvent",
    "Streamed",
    "StreamingModelServer",
    "StubFrontDoor",
    "TWISTD",
    "UpstreamStream",
    "accepted_inode",
    "alive",
    "assert_error",
    "assert_v2_error",
    "assert_no_bug_logged",
    "blocked_writing",
    "call",
    "children",
    "cmdline",
    "config_text",
    "descendants",
    "event_text",
    "failure_of",
    "free_port",
    "has_fired",
    "listening_inode",
    "memory_kb",
    "misbehaving",
    "parent_of",
    "parse_response",
    "pids_stopped",
    "port_is_free",
    "proc_state",
    "reaped",
    "result_of",
    "run",
    "socket_inodes",
    "sse_blocks",
    "sse_data",
    "sse_events",
    "start_time",
    "stopped",
    "toml_models",
    "wait_until",
    "with_mark",
    "write",
]


# --- oa-front (issue 15) ---


def openai_events(body: bytes, *, done: bool = True) -> list:
    """
    The JSON of each C{data:} event of an OpenAI stream (comments skipped), in order; with
    C{done}, the last event must be C{data: [DONE]} (it is not in the list).
    """
    events = [event for event in sse_blocks(body) if not event.startswith(b":")]
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events), body
    if done:
        assert events and events[-1] == b"data: [DONE]", body
        events = events[:-1]
    return [json.loads(event[len(b"data: "):]) for event in events]


def assert_openai_error(response, status, code, *, message=None, param=None) -> dict:
    """OpenAI's error shape (C{{"error": {"message", "type", "param", "code"}}}), JSON, with a request id."""
    assert response.status == status, response.body
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Request-Id")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    assert error["type"] == OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"), error
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param, error
    if message is not None:
        assert message in error["message"], error["message"]
    return error


# --- batch (session 16) ---

from aibackend.interfaces import IBatching  # noqa: E402  (this section's own import, kept with it for the merge)


@dataclass
class SentBatch:
    """A batch a L{FakeBatchingModel} was sent: its items and the Deferreds the test fires."""

    items: list
    deferreds: list

    @property
    def ids(self) -> list:
        return [item.context.request_id for item in self.items]

    def answer(self, index: int, body: bytes = b'{"ok": true}', status: int = 200) -> None:
        self.deferreds[index].callback(ModelAnswer(status=status, body=body))

    def answer_all(self) -> None:
        for index, item in enumerate(self.items):
            self.answer(index, json.dumps({"answer": item.context.request_id}).encode())


@implementer(IBatching)
class FakeBatchingModel:
    """
    An L{aibackend.interfaces.IBatching} model in memory for a L{aibackend.batching.Batcher}:
    records each batch it is sent (L{SentBatch}), and the requests whose Deferred was
    cancelled at it; C{refuse} (an exception) makes L{admit} refuse.
    """

    def __init__(self, batching):
        self.batching = batching
        self.batch_stats = None
        self.batches: list[SentBatch] = []
        self.cancelled: list[str] = []
        self.admitted: list[int] = []
        self.refuse = None
        self.broken = None  # an exception send_batch raises

    def admit(self, waiting: int) -> None:
        self.admitted.append(waiting)
        if self.refuse is not None:
            raise self.refuse

    def send_batch(self, items: list) -> list:
        if self.broken is not None:
            raise self.broken
        deferreds = [Deferred(lambda d, request_id=item.context.request_id: self.cancelled.append(request_id))
                     for item in items]
        self.batches.append(SentBatch(list(items), deferreds))
        return deferreds


class LineProcess:
    """
    The transport of a model process a L{LineLauncher} "started": what the daemon writes on
    its stdin, and what the test makes it print and how it ends.
    """

    def __init__(self, protocol, pid: int):
        self.protocol = protocol
        self.pid = pid
        self.stdin = b""

    def write(self, data: bytes) -> None:
        self.stdin += data

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, name) -> None:
        pass

    def messages(self) -> list:
        return [json.loads(line) for line in self.stdin.split(b"\n")[:-1]]

    def batches(self) -> list:
        """The batch messages written to it."""
        return [message for message in self.messages() if message.get("op") == "batch"]

    def says(self, *messages) -> None:
        self.protocol.outReceived(b"".join(json.dumps(message).encode() + b"\n" for message in messages))

    def answers_batch(self, batch: dict, answer=lambda item: {"output": {"echo": item["input"]}}) -> None:
        """Answer each request of a batch message, in one read: C{answer(item)} -> the line's other keys."""
        self.says(*({"id": item["id"], **answer(item)} for item in batch["batch"]))

    def killed(self, signal: int = 9) -> None:
        self.protocol.processExited(Failure(ProcessTerminated(signal=signal)))

    @property
    def alive(self) -> bool:
        return self.protocol.state != "exited"


class LineLauncher:
    """Stands in for L{aibackend.supervisor.Launcher}: no process is started (L{LineProcess})."""

    def __init__(self):
        self.spawned: list[LineProcess] = []
        self._next_pid = 2001

    def spawn(self, protocol, settings, env):
        process = LineProcess(protocol, self._next_pid)
        self._next_pid += 1
        self.spawned.append(process)
        protocol.makeConnection(process)
        return process

    def signal(self, process, name: str) -> None:
        pass

    def process_exited(self, pid):
        return None

    def busy(self, process) -> bool:
        return False

    def live(self) -> list[LineProcess]:
        return [process for process in self.spawned if process.alive]


BATCH_CASES = os.path.join(ROOT, "tests", "models", "batch_cases.py")  # an aibackend.worker predict_batch model


# --- reuseport (session 16) ---


def _tcp_sockets_all():
    """Like C{_tcp_sockets}, with each socket's queue: C{(local, remote, state, inode, rx_queue)}."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    yield fields[1], fields[2], fields[3], int(fields[9]), int(fields[4].split(":")[1], 16)
        except FileNotFoundError:
            continue


def listening_inodes(port: int) -> set[int]:
    """The inodes of every socket listening on 127.0.0.1:C{port} (one a process, with C{--processes})."""
    return {inode for local, _, state, inode, _ in _tcp_sockets_all() if local == _loopback(port) and state == "0A"}


def waiting_to_be_accepted(inodes) -> int:
    """The connections waiting in the queues of the listening sockets C{inodes} (/proc/net/tcp's rx_queue)."""
    return sum(queue for _, _, state, inode, queue in _tcp_sockets_all() if state == "0A" and inode in inodes)


def _accepted_by(pids, port: int, client_port: int, timeout: float) -> int | None:
    """Which of C{pids} accepted the connection from C{client_port} within C{timeout} s (None: none did)."""
    deadline = time.monotonic() + timeout
    while True:
        inode = accepted_inode(port, client_port)
        if inode:
            for pid in pids:
                if inode in socket_inodes(pid):
                    return pid
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def process_info(reply_or_text) -> dict[str, str]:
    """The labels of C{aibackend_process_info} in a /metrics answer (C{process}, C{pid}): which process answered."""
    text = reply_or_text if isinstance(reply_or_text, str) else reply_or_text.body.decode()
    found = re.search(r"^aibackend_process_info\{(.*)\} 1\.0$", text, re.M)
    assert found, text[-2000:]
    return dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))


def process_of(reply_or_text) -> str:
    """Which process answered a /metrics request: C{primary} or C{worker-N}."""
    return process_info(reply_or_text)["process"]


def fresh_connection_counts(port: int, count: int, path: str = "/metrics") -> dict[str, int]:
    """GET C{path} (/metrics) on C{count} fresh connections: how many each process answered."""
    counts: dict[str, int] = {}
    for _ in range(count):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read().decode()
            assert response.status == 200, (response.status, body[:500])
        finally:
            connection.close()
        name = process_of(body)
        counts[name] = counts.get(name, 0) + 1
    return counts


# --- batch2 (session 16) ---


class BatchModelServer(ModelServer):
    """
    An HTTP model that batches (L{ModelServer}, each request kept in L{received}): a POST
    to C{/batch} (a JSON array of C{{"x": number}} bodies) is answered by one
    C{{"y": 2x, "batch": size}} per body, in order, after C{delay} seconds (a model's
    fixed cost, so that requests gather); L{sizes} are the batches' sizes it was sent.
    Anything else is answered as a request alone: C{{"y": 2x, "batch": 0}}.
    """

    def __init__(self, delay: float = 0.02):
        self.delay = delay
        self.sizes: list[int] = []
        super().__init__()

    def answer(self, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        document = json.loads(body)
        if path != "/batch":
            return 200, {}, json.dumps({"y": 2 * document["x"], "batch": 0}).encode()
        with self._changed:
            self.sizes.append(len(document))
        time.sleep(self.delay)
        return 200, {}, json.dumps([{"y": 2 * item["x"], "batch": len(document)} for item in document]).encode()


# --- llserver (session 16) ---


def parse_responses(raw: bytes) -> list:
    """Every whole HTTP answer in C{raw}, in order: (status, headers with lower-case names, body) each."""
    answers = []
    while raw:
        status, headers, body, raw = parse_response(raw)
        answers.append((status, headers, body))
    return answers


def connect_channel(site, host: str = "127.0.0.1", port: int = 5000):
    """
    A connection of C{site}'s (its real channel, L{AibackendSite}'s) over a
    L{StringTransport} from C{host}:C{port}: (the channel, the transport).
    """
    # (imported here: this section of the module may not change the imports at its top)
    from twisted.internet.testing import StringTransport

    protocol = site.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    protocol.makeConnection(transport)
    return protocol, transport


# --- fallbacks (session 18) ---

from aibackend.configbase import MODEL_FIELDS  # noqa: E402  (this section's own import, kept with it for the merge)


@dataclass(frozen=True)
class TimedSpec(ModelSpec):
    """A fake model's spec with a C{timeout} of its own (L{ModelSpec}'s is a constant of each type)."""

    timeout: float = 60.0


def with_fallbacks(model, *fallbacks: str, timeout: float = 60.0):
    """Give fake C{model} (before it is registered) the C{fallbacks} and C{timeout} of its spec; C{model}."""
    values = {name: getattr(model.spec, name) for name in MODEL_FIELDS}  # its v2 and openai tables kept
    values["fallbacks"] = tuple(fallbacks)
    model.spec = TimedSpec(**values, timeout=timeout)
    return model


def fallback_steps(metrics_text: str) -> dict:
    """C{aibackend_fallbacks_total}'s samples from a scrape: C{(model, fallback, reason) -> count}."""
    return {
        (sample.labels["model"], sample.labels["fallback"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(metrics_text) if family.name == "aibackend_fallbacks"
        for sample in family.samples if sample.name == "aibackend_fallbacks_total"
    }


@contextmanager
def access_events_logged():
    """The events of the C{aibackend.access} namespace logged while the block runs (a list that fills)."""
    events: list[dict] = []

    def observe(event):
        if event.get("log_namespace") == "aibackend.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


# --- REDIS (session 18) ---


REDIS_MISSING = ("redis-server is not installed: `make test` installs Debian's redis-server package "
                 "(apt-get install redis-server)")


def find_redis_server() -> str | None:
    """The redis-server program (on PATH, or Debian's /usr/bin/redis-server), or None."""
    # (imported here: this section of the module may not change the imports at its top)
    import shutil

    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


def need_redis_server() -> str:
    """
    The redis-server program; without one the test is skipped, or fails when C{CI=true}
    (where a missing install step must not pass unseen).
    """
    import pytest  # here: only the tests that need Redis use it

    found = find_redis_server()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(REDIS_MISSING + " (CI=true: a test that needs Redis fails without it)")
        pytest.skip(REDIS_MISSING)
    return found


class RedisServer:
    """
    A C{redis-server} of the test's own on a free loopback port, its files in
    C{directory} (an append-only file fsynced at every write, C{appendfsync always}: a
    change Redis acknowledged survives L{restart}; no RDB snapshots), stopped by L{stop}.

    @param program: the redis-server (L{need_redis_server}).
    @param port: its port (default: a free one).
    """

    def __init__(self, program: str, directory, password: str | None = None, port: int | None = None):
        self.program = program
        self.directory = str(directory)
        self.password = password
        self.port = port or free_port()
        self.process: Process | None = None
        self.paused = False
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
                "--logfile", "", "--databases", "4"]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    def start(self, deadline: float = 10.0) -> None:
        """Start it (again, on the same port and files) and wait until it answers."""
        self.process = Process(self.argv(), cwd=self.directory)
        wait_until(self._answers, deadline, f"redis-server on port {self.port} to answer")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server ended ({self.process.returncode}):\n{self.process.output[-4000:]}")
        try:
            return self.client().ping()
        except OSError:
            return False
        except Exception as e:  # redis-py's ConnectionError while it starts (it is not an OSError)
            if type(e).__name__ in ("ConnectionError", "BusyLoadingError", "TimeoutError"):
                return False
            raise

    def client(self):
        """A redis-py client of it (blocking: for the test's own thread)."""
        import redis  # here: the package the daemon's shared store needs, only for these tests

        return redis.Redis(port=self.port, host="127.0.0.1", password=self.password, socket_timeout=5,
                           decode_responses=True)

    def pause(self) -> None:
        """SIGSTOP: it holds its connections and answers nothing until L{resume}."""
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self) -> None:
        """Stop it (SIGTERM; its append-only file is complete) and start it again on the same port."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            if self.paused:
                self.resume()
            self.process.terminate(10)
            self.process = None


# --- lead (session 18) ---


class HeldStore(MemoryStore):
    """A model store whose writes are durable when the test says (fire or fail each of C{writes})."""

    def __init__(self):
        super().__init__()
        self.writes: list[Deferred] = []

    def put(self, model_id, table):
        super().put(model_id, table)
        d = Deferred()
        self.writes.append(d)
        return d



# --- REDIS2 (session 18) ---


def start_fleet(redis_url: str, mktemp, names: str = "abc", multi: str = "c", config: str | None = None) -> list:
    """
    Daemons on one shared store (C{--store redis_url}), each with a state directory of its
    own (C{mktemp(name)}: pytest's C{tmp_path_factory.mktemp}); the one named C{multi} with
    C{--processes 2} (its worker follows through its primary); each with the configuration
    file C{config}, if given. Stopped by L{stop_fleet}.
    """
    daemons = []
    try:
        for name in names:
            state = mktemp(f"state-{name}")
            kind, more = (Multi, {"processes": 2}) if name == multi else (Daemon, {})
            daemons.append(kind(config, "--store", redis_url, state=str(state), cwd=str(state), **more))
    except BaseException:
        stop_fleet(daemons, check=False)
        raise
    return daemons


def stop_fleet(daemons, check: bool = True) -> None:
    """Stop every daemon of L{start_fleet}; then (C{check}) none may have logged a bug."""
    for daemon in daemons:
        daemon.stop()
    if check:
        for daemon in daemons:
            daemon.assert_no_bug_logged()


# --- lead (session 20) ---


def name_caller(door, caller) -> None:
    """
    Have C{door}'s guard name every request it lets in C{caller} (as it names a request
    that carries that key), for unit tests of a key's limits on a L{StubFrontDoor}.
    """
    guard = door.front_door.core.guard
    let_in = guard.check_client

    def named(request):
        let_in(request)
        request.aibackend_caller = caller

    guard.check_client = named
