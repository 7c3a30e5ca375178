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

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
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
    "JSONResponse",
    "Posted",
    "Received",
    "Response",
    "StubFrontDoor",
    "failure_of",
    "has_fired",
    "result_of",
]
