"""
Fakes and helpers the tests share (and that people writing model types may reuse).

Nothing here imports the global reactor: every fake takes the clock it runs on.

  - L{FakeModel}: an L{IModel} whose answers the test decides (a canned
    L{ModelAnswer}, an error, a Deferred the test fires later), and which records every
    body and context it received.
  - L{HangingClient}: a treq-like client whose requests never answer, recording what was
    sent and what was cancelled (for deadlines on a L{Clock}).
  - L{result_of}, L{failure_of}: the synchronous C{successResultOf}/C{failureResultOf}
    of trial, for pytest.
  - L{StubFrontDoor}: a L{FrontDoor} behind L{treq.testing.StubTreq}, with a C{call}
    that answers a L{Response} (status, headers, body, json) at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from aibackend.config import ModelSpec
from aibackend.interfaces import READY, IModel, ModelAnswer, RequestContext
from aibackend.logs import ModelLog
from aibackend.modelstate import ModelState, Waiters


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

    def __init__(self, resource):
        # The server's timers (its idle timeout) run on a clock of their own: the test's
        # clock has only the model's.
        self.site = Site(resource, reactor=Clock())
        self.site.noisy = False
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
        from twisted.web.http_headers import Headers

        self.code = code
        self.headers = Headers({b"content-type": [b"application/json"]})
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

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


class StubFrontDoor:
    """
    A L{aibackend.api.FrontDoor} over a registry, reached through L{StubTreq}: the
    daemon's own Site (L{AibackendSite}) and Request, no socket.

    @param clock: the clock the front door and the registry's models run on.
    @param models: models to register.
    @param max_body_bytes: the site's body limit.
    @param in_thread: how the front door does work in a thread (at once by default).
    """

    def __init__(self, clock, models=(), *, max_body_bytes: int = 16 * 1024 * 1024, guard=None, manager=None,
                 in_thread=None):
        from treq.testing import StubTreq

        from aibackend.api import FrontDoor
        from aibackend.registry import ModelDeps, ModelRegistry
        from aibackend.server import AibackendSite

        self.clock = clock
        self.registry = ModelRegistry(ModelDeps(reactor=clock, environ={}))
        for model in models:
            self.registry.add(model)
        # Work the daemon does in a thread is done at once (no thread pool runs here).
        self.front_door = FrontDoor(self.registry, clock, guard=guard, manager=manager,
                                    in_thread=in_thread if in_thread is not None else maybeDeferred)
        self.stub = StubTreq(self.front_door.resource())
        # StubTreq serves through a plain Site; serve through the daemon's instead (no
        # form parsing, the body limit), on the stub's own memory reactor.
        agent = self.stub._agent
        self.site = AibackendSite(
            self.front_door.resource(), max_body_bytes=max_body_bytes, reactor=agent._memoryReactor,
            metrics=self.front_door.metrics,
        )
        agent._serverFactory = self.site

    def request(self, method: str, url: str, **kwargs) -> Deferred:
        """
        Start a request; the Deferred fires with a L{Response} once the whole answer
        is in (call L{flush} after firing a model's held Deferred).
        """
        if url.startswith("/"):
            url = "http://localhost" + url
        d = self.stub.request(method, url, **kwargs)

        def read(response):
            return self.stub.content(response).addCallback(
                lambda body: Response(response.code, response.headers, body)
            )

        d.addCallback(read)
        self.stub.flush()
        return d

    def call(self, method: str, url: str, **kwargs) -> Response:
        """Make a request whose answer comes at once, and return it."""
        return result_of(self.request(method, url, **kwargs))

    def flush(self) -> None:
        self.stub.flush()


__all__ = [
    "FakeModel",
    "HangingClient",
    "HeldModelServer",
    "JSONResponse",
    "MemoryEndpoints",
    "Posted",
    "Received",
    "Response",
    "StubFrontDoor",
    "failure_of",
    "has_fired",
    "result_of",
]
