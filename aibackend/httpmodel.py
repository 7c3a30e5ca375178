"""
HTTP models: a model server reached over HTTP, local or an external hosted API.

The daemon POSTs the client's JSON body unchanged to the model's URL with
C{Content-Type: application/json}, C{X-Request-Id} and the model's configured headers,
through one daemon-owned persistent connection pool. The whole exchange, body
included, has one deadline on the injected clock; redirects are never followed; the
answer must be strict JSON (L{aibackend.jsonread.model_json}: UTF-8, no NaN or Infinity), and the
model's own status is passed through.

Streams (L{IStreaming}): a stream request is sent like a plain one, with C{Accept:
text/event-stream, application/x-ndjson, application/json} (L{STREAM_ACCEPT}), through
the same client (the lean one, L{aibackend.client}, or treq for the routes it does not
send), and the answer's C{Content-Type} says how it is read (L{aibackend.streambody}):
Server-Sent Events and JSON lines chunk by chunk as they arrive, anything else whole, as
the stream's output. A plain request answered in events
or lines gets them gathered into one JSON answer (L{aibackend.streambody.gather}).
A native v2 server's C{generate_stream} (the Open Inference Protocol's generate
extension, on its own route) says an error after its first event as one more event,
C{data: {"error": "..."}}: that event ends the stream as the server's error (a 502
carrying its words), not as one more chunk.

An HTTP model with C{[models.batching]} is a L{BatchingHttpModel}: its plain requests wait
in a L{aibackend.batching.Batcher}, and each batch is one POST of a JSON array of their
bodies to the batching C{url}, answered by an array of their answers in the same order.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import deque
from http.cookiejar import CookieJar, DefaultCookiePolicy

import orjson
from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeadlineExceeded
from twisted.application.service import Service
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.error import SchemeNotSupported
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import alsoProvides, implementer

from aibackend import __version__
from aibackend.batching import BatchingModel, OneCall
from aibackend.client import LeanClient, ResponseTooLarge, deadline_passed
from aibackend.config import expand_env, read_key_file
from aibackend.destinations import DestinationDenied, GuardedEndpointFactory
from aibackend.directwrite import LARGE
from aibackend.errors import (
    ApiError, BadGateway, Forbidden, GatewayTimeout, ModelBusy, ModelError, ModelUnavailable, error_message,
)
from aibackend.interfaces import (
    READY, STOPPED, IBatching, IModel, IReplicated, IRestartable, IStreaming, ModelAnswer,
)
from aibackend.jsonread import NotClientJSON, model_json
from aibackend.limits import ConcurrencyLimit
from aibackend.logs import ModelLog
from aibackend.modelstate import ModelState
from aibackend.replicas import Replica, ReplicaRefused, ReplicaSet
from aibackend.streambody import BadStream, StreamBody, UpstreamFlow, gather, reader_for
from aibackend.supervisor import PoolEvents, ProcessPool

USER_AGENT = f"aibackend/{__version__}".encode()
# A path segment the lean client sends as it is (anything else goes through treq, quoted).
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._~-]+$")
# The operations whose other routes go through the lean client: the OpenAI API's
# (aibackend.openai_api's names), a few fixed routes each request of which is small work.
LEAN_OPERATIONS = frozenset({"chat.completions", "completions", "embeddings"})
# The request lines of other routes (L{HttpModel._route_head}) a model keeps made.
MAX_ROUTE_HEADS = 64
SNIPPET = 200
PROBE_INTERVAL = 0.25
# The operation of the Open Inference Protocol's generate_stream (aibackend.v2), whose
# server says an error in a chunk of its own (see the module's docstring).
GENERATE_STREAM = "generate_stream"
# What a stream request accepts (a configured Accept header is sent instead).
STREAM_ACCEPT = b"text/event-stream, application/x-ndjson, application/json"
# Content types a plain answer is read as it is, without asking which reader it needs.
PLAIN_TYPES = frozenset({
    b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8",
    b"application/json; charset=UTF-8",
})


@implementer(IAgentEndpointFactory)
class EndpointCache:
    """
    An Agent's endpoints, made once per scheme, host and port: Agent's own factory makes
    a new one, IDNA encoding included, for every request.
    """

    def __init__(self, reactor, connect_timeout: float):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._tls_policy = BrowserLikePolicyForHTTPS()
        self._endpoints: dict = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            # The URI is already ASCII (a name in IDNA form, or an address).
            host = uri.host.decode("ascii", "replace").strip("[]")
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._connect_timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
            if len(self._endpoints) < 1024:
                self._endpoints[key] = endpoint
        return endpoint


class _BoundedBody(Protocol):
    """
    Collects a response body up to a limit; past it, or when its Deferred is
    cancelled, the connection is closed instead of read on.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _):
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks.clear()
            self.finished.errback(ResponseTooLarge(self._limit))
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


def read_body(response, limit: int) -> Deferred[bytes]:
    """Read C{response}'s body, failing with L{ResponseTooLarge} past C{limit} bytes."""
    if response.length == 0:
        return succeed(b"")
    protocol = _BoundedBody(limit)
    response.deliverBody(protocol)
    return protocol.finished


def _no_cookies() -> CookieJar:
    """A cookie jar that keeps nothing: one client's cookies must never reach another's request."""
    return CookieJar(DefaultCookiePolicy(allowed_domains=[]))


def not_strict_json(body: bytes) -> str | None:
    """
    What keeps C{body} from being strict JSON text (L{aibackend.jsonread.model_json}, the
    rule a subprocess model's answers follow too); None if it is.
    """
    try:
        model_json(body)
    except NotClientJSON as e:
        return e.reason
    return None


def snippet(body: bytes) -> str:
    text = body[:SNIPPET].decode("utf-8", "replace")
    return repr(text) + (f" ... ({len(body)} bytes)" if len(body) > SNIPPET else "")


class ServerReadiness(PoolEvents):
    """
    What the supervisor (L{aibackend.supervisor.ProcessPool}) of the model server process
    of an HTTP model that has a C{command} is told: a process is ready once its URL
    answers (C{health_path} with a 2xx, or a TCP connection to its host and port).
    """

    def __init__(self, model):
        self.model = model
        self._probes: dict = {}

    def process_started(self, process) -> None:
        self._probe_later(process, 0)

    def _probe_later(self, process, delay) -> None:
        pool = process.pool
        if process.state == "starting" and pool.running and not pool.stopping:
            self._probes[process] = pool.clock.callLater(delay, self._probe, process)

    def _probe(self, process) -> None:
        """Probe once; the probe in flight is kept (like the timer) so it can be cancelled."""
        self._probes.pop(process, None)
        if process.state != "starting":
            return
        d = self._probes[process] = self.model.probe()

        def probed(ok):
            if self._probes.get(process) is d:
                del self._probes[process]
            if ok is True:
                process.pool.mark_ready(process)
            else:
                self._probe_later(process, PROBE_INTERVAL)

        d.addCallbacks(probed, lambda failure: probed(False))

    def process_gone(self, process, why: str) -> None:
        pending = self._probes.pop(process, None)
        if isinstance(pending, Deferred):
            pending.cancel()
        elif pending is not None and pending.active():
            pending.cancel()


@implementer(IBodyProducer)
class BytesBody:
    """A request body of bytes, written at once (Agent's FileBodyProducer takes turns of the global reactor)."""

    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer) -> Deferred:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class UpstreamError(ModelError):
    """
    An HTTP model's own 4xx or 5xx JSON answer to a stream request (before any chunk):
    answered as a plain request's is, the model's body with its status (and its
    C{Retry-After}), instead of the daemon's error document.
    """

    def __init__(self, answer: ModelAnswer, model_id: str):
        self.document = json.loads(answer.body)
        message = error_message(self.document)
        if message is None:
            message = f"model {model_id!r} answered status {answer.status}"
        headers = {}
        for name, value in answer.headers.items():
            try:
                headers[name.decode("ascii")] = value.decode("ascii")
            except UnicodeDecodeError:
                pass
        super().__init__(answer.status, message, model=model_id, headers=headers)

    def as_json(self, request_id):
        return self.document


def in_own_shape(failure):
    """
    An errback for a front door whose errors have a shape of their own (an adapted model
    on C{/v1} or C{/v2}): an L{UpstreamError} becomes a plain L{ModelError} with the same
    status, words and C{Retry-After}, so that the front door's shape renders it; the
    model's own document is passed on only where the protocol is the model's (C{/post},
    native models).
    """
    if failure.check(UpstreamError):
        upstream = failure.value
        raise ModelError(upstream.status, upstream.message, model=upstream.model, headers=upstream.headers)
    return failure


def _cancelled_as_such(request: Deferred) -> Deferred:
    """
    C{request}'s outcome, but cancelling it fails it with C{CancelledError} (Agent fails a
    request cancelled before its answer with C{ResponseNeverReceived}, the lean client one
    cancelled while it connects with C{ConnectingCancelledError}, which would be taken for
    a replica that refused it), so that the relay tells a client that left (499) from a
    model that broke the exchange off (502).
    """
    cancelled = []

    def cancel(_) -> None:
        cancelled.append(True)
        request.cancel()

    def passed(result):
        if cancelled and isinstance(result, Failure) and not result.check(CancelledError):
            return Failure(CancelledError())
        return result

    d = Deferred(cancel)
    request.addBoth(passed).chainDeferred(d)
    return d


def _header_block(headers: dict) -> bytes:
    """
    C{headers} as the lean client writes them: a configured header replaces the default
    of the same name in any case (as in Agent's L{Headers}), and C{X-Request-Id} is the
    request's own, written after them.
    """
    last = {}
    for name, values in headers.items():
        last.pop(name.lower(), None)  # (a name set again goes where it was set last)
        last[name.lower()] = (name, values[0])
    return b"".join(name + b": " + value + b"\r\n" for key, (name, value) in last.items() if key != b"x-request-id")


def _unregister(result, chunks):
    chunks.unregisterProducer()
    return result


@implementer(IModel, IReplicated, IStreaming)
class HttpModel(Service):
    """
    A model served by an HTTP server. One with a C{command} (a server the daemon starts)
    provides L{IRestartable} too.

    @param spec: an L{aibackend.config.HttpModelSpec}.
    @param reactor: the reactor (clock and connections).
    @param pool: the daemon's L{HTTPConnectionPool}, shared by every HTTP model.
    @param endpoints: the C{IAgentEndpointFactory} its connections are made with (by
        default, an L{EndpointCache}, or the destination policy's guarded endpoints);
        tests give L{aibackend.testing.MemoryEndpoints}.
    @param client: a treq-like client for the requests the lean client does not send
        (the health check, the Open Inference Protocol's other routes, plain or streamed),
        instead of treq over C{endpoints}.
    @param stream_accept: the C{Accept} header of a stream request (L{STREAM_ACCEPT}; a
        worker's model forwarded to the primary asks for JSON lines only).
    """

    type_name = "http"
    log = Logger()

    def __init__(self, spec, *, reactor, pool=None, environ=None, client=None, launcher=None,
                 destination_policy=None, endpoints=None, stream_accept: bytes = STREAM_ACCEPT):
        self.spec = spec
        self.model_id = spec.id
        self.model_log = ModelLog(reactor, spec.log_entries)
        self._clock = reactor
        self._destination_policy = destination_policy
        self.replica_set = ReplicaSet(spec, reactor, self.model_log, self.probe)
        self.replicas = self.replica_set.replicas
        # Looked up once: every request asks for a replica and says how it went.
        self._pick = self.replica_set.pick
        self._replica_outcome = self.replica_set.outcome
        self._url = self.replicas[0].url
        if endpoints is not None:
            factory = endpoints
        elif destination_policy is not None:
            # A runtime model: connect only where the policy allows, checked on the
            # address really connected to.
            factory = GuardedEndpointFactory(reactor, destination_policy, spec.connect_timeout)
        else:
            factory = EndpointCache(reactor, spec.connect_timeout)
        if client is None:
            client = HTTPClient(Agent.usingEndpointFactory(reactor, factory, pool=pool), cookiejar=_no_cookies())
        # The hot path and streams: each request one write of bytes made ahead, the answer
        # parsed in C (aibackend.client). treq stays for health checks and the Open
        # Inference Protocol's other routes.
        self._lean = LeanClient(reactor, factory)
        self._route_heads: dict = {}
        self._client = client
        environ = os.environ if environ is None else environ
        self._headers = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
            b"User-Agent": [USER_AGENT],
        }
        for name, template in spec.headers.items():
            self._headers[name.encode("ascii")] = [expand_env(template, environ).encode("utf-8")]
        openai = spec.openai
        if openai.api_key is not None or openai.api_key_file is not None:
            # A server that speaks OpenAI itself: its key (never logged; masked in the spec's view).
            key = (expand_env(openai.api_key, environ) if openai.api_key is not None
                   else read_key_file(openai.api_key_file))
            self._headers[b"Authorization"] = [b"Bearer " + key.encode("utf-8")]
        # A stream asks for events or lines, unless the configuration says what to accept.
        self._stream_headers = dict(self._headers)
        if not any(name.lower() == "accept" for name in spec.headers):
            self._stream_headers[b"Accept"] = [stream_accept]
        # The same headers as the lean client writes them, after each replica's request
        # line; the request's own X-Request-Id follows them (a configured one gives way).
        self._header_block = _header_block(self._headers)
        self._stream_header_block = _header_block(self._stream_headers)
        self.limit = ConcurrencyLimit(spec.id, max_queue=spec.max_queue, max_in_flight=spec.max_concurrency)
        self.requests = 0
        self.failures = 0
        self.request_timeout = float(spec.timeout)
        self.startup_timeout = float(spec.process.startup_timeout) if spec.process is not None else 0.0
        # Ready for good without a server to start; with one, its supervisor sets it.
        self._state = ModelState(self, READY if spec.process is None else STOPPED, why=lambda: self.last_failure)
        self.server = None
        if spec.process is not None:
            alsoProvides(self, IRestartable)
            self.server = ProcessPool(
                model_id=spec.id,
                settings=spec.process,
                size=1,
                reactor=reactor,
                model_log=self.model_log,
                environ=environ,
                launcher=launcher,
                state=self._state,
                events=ServerReadiness(self),
                ready_on_spawn=False,
            )

    @classmethod
    def from_spec(cls, spec, deps):
        if spec.batching is not None and cls is HttpModel:
            cls = BatchingHttpModel
        return cls(
            spec,
            reactor=deps.reactor,
            pool=deps.pool,
            environ=deps.environ,
            destination_policy=deps.destination_policy,
        )

    def startService(self):
        super().startService()
        if self.server is not None:
            self.server.startService()
        else:
            self.replica_set.start_checks()

    def stopService(self):
        super().stopService()
        self.replica_set.stop_checks()
        self._lean.close()
        if self.server is not None and self.server.running:
            return self.server.stopService()
        return None

    # --- IModel -------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def in_flight(self) -> int:
        return self.limit.in_flight

    @property
    def queued(self) -> int:
        return len(self.limit.queue)

    @property
    def shed(self) -> int:
        return self.limit.shed

    @property
    def last_failure(self) -> str | None:
        return self.server.last_failure if self.server is not None else None

    def whenReady(self) -> Deferred:
        return self._state.when_ready()

    def watch(self, callback):
        return self._state.watch(callback)

    def whenIdle(self) -> Deferred:
        return self.limit.when_idle()

    # --- IRestartable (with a server) ---------------------------------------

    @property
    def restarts(self) -> int:
        return self.server.restarts if self.server is not None else 0

    @property
    def live_processes(self) -> int:
        return self.server.live_processes if self.server is not None else 0

    def restart(self) -> None:
        if self.server is not None:
            self.server.restart()

    def describe(self) -> dict:
        described = {
            "id": self.model_id,
            "type": self.type_name,
            "state": self.state,
            "url": self.spec.url,
            "in_flight": self.in_flight,
            "queued": len(self.limit.queue),
            "requests": self.requests,
            "failures": self.failures,
            "shed": self.shed,
        }
        if self.replica_set.several or self.spec.health_interval:
            described["replicas"] = self.replica_set.describe()
        if self.server is not None:
            described["restarts"] = self.server.restarts
            described["last_error"] = self.server.last_failure
            described["next_restart_in"] = self.server.next_restart_in()
            described["processes"] = self.server.describe_processes()
        return described

    # --- replicas -----------------------------------------------------------

    @property
    def ejections(self) -> int:
        return self.replica_set.ejections

    def probe(self, replica: Replica | None = None) -> Deferred[bool]:
        """Does the model server answer? (Its health path with a 2xx, or a TCP connection.)"""
        base = (replica or self.replicas[0]).url
        if self.spec.health_path:
            url = base.replace(path=(), query=()).click(self.spec.health_path)
            d = self._client.get(url, allow_redirects=False, unbuffered=True)

            def answered(response):
                ok = 200 <= response.code < 300
                body = read_body(response, 65536)
                body.addBoth(lambda _: ok)
                return body

            d.addCallback(answered)
        else:
            if self._destination_policy is not None:
                # A runtime model's probe goes only where its requests may go.
                endpoint = GuardedEndpointFactory(self._clock, self._destination_policy, 1).endpointForURI(
                    URI.fromBytes(self._url.to_uri().to_text().encode("ascii"))
                )
            else:
                endpoint = HostnameEndpoint(self._clock, self._url.host, self._url.port, timeout=1)
            d = endpoint.connect(Factory.forProtocol(Protocol))
            d.addCallback(lambda protocol: protocol.transport.loseConnection() or True)
        return d.addTimeout(1, self._clock)

    def _not_ready(self) -> ModelUnavailable:
        state = self._state.value
        why = self.server.failed_reason if state == "failed" else f"its server is {state}"
        return ModelUnavailable(
            f"model {self.model_id!r} is not ready: {why}",
            model=self.model_id,
            retry_after=self.server.retry_after(),
        )

    def send(self, body: bytes, context) -> Deferred[ModelAnswer]:
        if self.server is not None and self._state.value != READY:
            raise self._not_ready()
        timeout = self.spec.timeout
        deadline = self._clock.seconds() + timeout
        limit = self.limit
        if not limit.max_in_flight or limit.in_flight < limit.max_in_flight:  # limit.has_room(), inline
            return self._post(body, context, deadline)
        if limit.full():
            raise limit.busy(retry_after=1)
        waiter = limit.wait_for_place(timeout, self._clock)
        waiter.addCallback(lambda _: self._post(body, context, deadline))
        return waiter

    def _post(self, body: bytes, context, deadline: float, tried: tuple = ()) -> Deferred[ModelAnswer]:
        left = deadline - self._clock.seconds()
        if left <= 0:
            raise self.limit.place_timeout(self.spec.timeout)
        replica = self._pick(tried)
        if replica is None:
            raise self.replica_set.none_left()
        d = self._attempt(replica, body, context, left)
        if self.replica_set.several:

            def elsewhere(failure):
                # Nothing of the request reached this replica: another may take it. A
                # request that may have been received is never sent twice.
                failure.trap(ReplicaRefused)
                if self._pick(tried + (replica,)) is None:
                    return failure
                return self._post(body, context, deadline, tried + (replica,))

            d.addErrback(elsewhere)
        return d

    def _attempt(self, replica: Replica, body: bytes, context, left: float) -> Deferred[ModelAnswer]:
        self.limit.in_flight += 1  # limit.started(), inline
        self.requests += 1
        replica.in_flight += 1
        try:
            line = replica.head if context.path is None else self._route_head(replica, context)
            if line is not None:
                # The lean client reads the body itself. (L{_request_bytes}, inline: the hot path.)
                head = (
                    line, self._header_block, b"X-Request-Id: ", context.request_id.encode("ascii"),
                    b"\r\nContent-Length: ", str(len(body)).encode("ascii"), b"\r\n\r\n",
                )
                # A large body is written after its head, not copied into one string with it.
                data = b"".join((*head, body)) if len(body) < LARGE else (b"".join(head), body)
                # The deadline is the lean client's to keep (on its connection's one timer).
                d = self._lean.request(replica.uri, data, self.spec.max_response_bytes, timeout=left)
            else:
                headers = Headers(self._headers)
                headers.setRawHeaders(b"X-Request-Id", [context.request_id.encode("ascii")])
                url = replica.url.replace(path=replica.base_path + tuple(context.path), query=(), fragment="")
                d = self._client.request(context.method.decode("ascii"), url, data=body or None, headers=headers,
                                         allow_redirects=False, unbuffered=True)
                d.addCallback(self._read)
                # Cancelling the exchange fails it with whatever the client layer makes of
                # the cancel (ResponseNeverReceived before the headers); past the deadline it
                # is a 504.
                d.addTimeout(left, self._clock, onTimeoutCancel=deadline_passed)
        except Exception:
            d = fail()  # counted in flight above: the outcome below uncounts it
        # The replica's outcome, the answer (or the failure) and the freed place, in one
        # callback pair (L{_attempted}, L{_attempt_failed}), not three steps of the Deferred.
        d.addCallbacks(self._attempted, self._attempt_failed, callbackArgs=(replica, context.path is not None),
                       errbackArgs=(replica,))
        return d

    def _attempted(self, result, replica: Replica, other_route: bool) -> ModelAnswer:
        """An attempt's answer: counted for its replica, made a L{ModelAnswer}, its place freed."""
        try:
            self._replica_outcome(result, replica)
            return self._answered(result, other_route)
        finally:
            self.limit.finished()

    def _attempt_failed(self, failure, replica: Replica):
        """An attempt's failure: counted for its replica, made the client's error, its place freed."""
        try:
            self._replica_outcome(failure, replica)
            return self._failed(failure, replica)
        finally:
            self.limit.finished()

    def _route_head(self, replica: Replica, context) -> bytes | None:
        """
        The request line and Host of a POST to another route of the model's server (a
        native OpenAI server's, L{LEAN_OPERATIONS}), for the lean client: made once per
        route (a few are kept); None for any other (treq sends it, quoted).
        """
        if context.method != b"POST" or context.operation not in LEAN_OPERATIONS:
            return None
        key = (replica.head, context.path)
        line = self._route_heads.get(key)
        if line is None:
            segments = replica.base_path + tuple(context.path)
            if not all(type(segment) is str and SAFE_SEGMENT.match(segment) for segment in segments):
                return None
            line = (b"POST /" + "/".join(segments).encode("ascii")
                    + replica.head[replica.head.index(b" HTTP/1.1\r\n"):])
            if len(self._route_heads) < MAX_ROUTE_HEADS:
                self._route_heads[key] = line
        return line

    # --- IStreaming -----------------------------------------------------------

    def stream(self, body: bytes, context, chunks) -> Deferred:
        """
        Send a request whose answer comes in chunks (see the module's docstring): each
        chunk goes to C{chunks} in the reactor turn its bytes came in, a slow reader of
        C{chunks} pauses the reading of the upstream's connection, and cancelling (the
        client left, a deadline) closes that connection at once. The model's C{timeout}
        bounds the whole stream. Like a plain request, a stream is counted in flight and
        in the limit, and goes to another replica only when the one it was sent to could
        not be connected to (before any chunk).

        @return: a Deferred firing with the output's JSON text, or None.
        """
        if self.server is not None and self._state.value != READY:
            raise self._not_ready()
        timeout = self.spec.timeout
        deadline = self._clock.seconds() + timeout
        limit = self.limit
        flow = UpstreamFlow()
        chunks.registerProducer(flow, True)
        try:
            if limit.has_room():
                d = self._stream_post(body, context, chunks, flow, deadline)
            elif limit.full():
                raise limit.busy(retry_after=1)
            else:
                d = limit.wait_for_place(timeout, self._clock)
                d.addCallback(lambda _: self._stream_post(body, context, chunks, flow, deadline))
        except BaseException:
            chunks.unregisterProducer()
            raise
        flow.stream = d
        return d.addBoth(_unregister, chunks)

    def _stream_post(self, body: bytes, context, chunks, flow, deadline: float, tried: tuple = ()) -> Deferred:
        left = deadline - self._clock.seconds()
        if left <= 0:
            raise self.limit.place_timeout(self.spec.timeout)
        replica = self._pick(tried)
        if replica is None:
            raise self.replica_set.none_left()
        d = self._stream_attempt(replica, body, context, chunks, flow, left)
        if self.replica_set.several:

            def elsewhere(failure):
                # Nothing reached this replica (so no chunk came): another may take it.
                failure.trap(ReplicaRefused)
                if self._pick(tried + (replica,)) is None:
                    return failure
                return self._stream_post(body, context, chunks, flow, deadline, tried + (replica,))

            d.addErrback(elsewhere)
        return d

    def _stream_attempt(self, replica: Replica, body: bytes, context, chunks, flow, left: float) -> Deferred:
        self.limit.in_flight += 1
        self.requests += 1
        replica.in_flight += 1
        other_route = context.path is not None
        error_chunks = other_route and context.operation == GENERATE_STREAM
        try:
            # The lean client, as for a plain request: the model's URL, or another route it
            # sends (L{_route_head}: a POST of L{LEAN_OPERATIONS} to a path that needs no
            # quoting). treq sends the rest: another method, a path to quote, another
            # operation's route (a v2 server's generate_stream).
            line = replica.head if not other_route else self._route_head(replica, context)
            if line is not None:
                data = self._request_bytes(line, self._stream_header_block, body, context)

                def head(answer, transport):
                    reader = self._stream_reader(answer, chunks, error_chunks)
                    if reader is not None:
                        flow.attach(transport)
                    return reader

                d = _cancelled_as_such(self._lean.request(replica.uri, data, self.spec.max_response_bytes, head))
                d.addErrback(self._bad_stream)
            else:
                headers = Headers(self._stream_headers)
                headers.setRawHeaders(b"X-Request-Id", [context.request_id.encode("ascii")])
                url = replica.url.replace(path=replica.base_path + tuple(context.path), query=(), fragment="")
                d = _cancelled_as_such(self._client.request(context.method.decode("ascii"), url,
                                                             data=BytesBody(body), headers=headers,
                                                             allow_redirects=False, unbuffered=True))
                d.addCallback(self._streaming, chunks, flow, error_chunks)
        except Exception:
            d = fail()
        d.addTimeout(left, self._clock, onTimeoutCancel=deadline_passed)
        d.addBoth(self._replica_outcome, replica)
        d.addCallbacks(self._stream_ended, self._failed, callbackArgs=(other_route,), errbackArgs=(replica,))
        d.addBoth(self.limit.finished)
        return d

    def _request_bytes(self, line: bytes, header_block: bytes, body: bytes, context):
        """A request for the lean client: its request line, headers and body (a large body apart)."""
        head = (
            line, header_block, b"X-Request-Id: ", context.request_id.encode("ascii"),
            b"\r\nContent-Length: ", str(len(body)).encode("ascii"), b"\r\n\r\n",
        )
        # A large body is written after its head, not copied into one string with it.
        return b"".join((*head, body)) if len(body) < LARGE else (b"".join(head), body)

    def _stream_reader(self, response, chunks, error_chunks: bool):
        """
        The reader of a stream's answer (L{aibackend.streambody}), each chunk of which
        goes to C{chunks}: a 2xx in events or lines; None for any other (read whole).
        With C{error_chunks} (a v2 server's generate_stream), a chunk C{{"error": "..."}}
        fails the stream with its words.
        """
        content_types = response.headers.getRawHeaders(b"content-type")
        reader = reader_for(content_types[0]) if content_types and 200 <= response.code < 300 else None
        if reader is None:
            return None
        chunk = chunks.chunk
        if error_chunks:
            model_id = self.model_id

            def emit(value, text: bytes) -> None:
                if type(value) is dict and len(value) == 1 and type(value.get("error")) is str:
                    raise BadGateway(value["error"], model=model_id)
                chunk(text)
        else:

            def emit(value, text: bytes) -> None:
                chunk(text)

        return reader(emit, self.spec.max_response_bytes, self.model_id)

    def _streaming(self, response, chunks, flow, error_chunks: bool = False) -> Deferred:
        """
        Agent's answer to a stream came: a 2xx in events or lines is read chunk by chunk,
        to C{(response, output, True)}; any other is read whole, to C{(response, body)}.
        """
        reader = self._stream_reader(response, chunks, error_chunks)
        if reader is None:
            return self._read(response)
        protocol = StreamBody(reader, self._clock)
        response.deliverBody(protocol)
        # Once delivering has begun: Agent resumes the transport as it hands the body over.
        if protocol.transport is not None:
            flow.attach(protocol.transport)
        d = protocol.finished
        d.addCallbacks(lambda output: (response, output, True), self._bad_stream)
        return d

    def _bad_stream(self, failure):
        failure.trap(BadStream)
        raise BadGateway(f"model {self.model_id!r} {failure.value.why}", model=self.model_id)

    def _stream_ended(self, result, other_route: bool):
        if len(result) == 3:
            return result[1]
        answer = self._answered(result, other_route)
        if answer.status < 300:
            return answer.body
        raise UpstreamError(answer, self.model_id)

    def _read(self, response):
        d = read_body(response, self.spec.max_response_bytes)
        d.addCallback(lambda body: (response, body))
        return d

    def _answered(self, result, other_route: bool = False) -> ModelAnswer:
        response, body = result
        status = response.code
        if other_route and not body.strip():
            # A v2 server answers some routes (readiness) with a status and no body.
            body = b"{}"
        if 300 <= status < 400:
            location = response.headers.getRawHeaders(b"location", [b""])[0].decode("latin-1")
            raise BadGateway(
                f"model {self.model_id!r} answered a redirect ({status}) to {location!r}; "
                "redirects are not followed",
                model=self.model_id,
            )
        content_types = response.headers.getRawHeaders(b"content-type")
        reader = None
        if content_types is not None and content_types[0] not in PLAIN_TYPES and status < 300:
            reader = reader_for(content_types[0])
        if reader is not None:
            # Events or JSON lines answering a plain request: gathered into one answer.
            try:
                body = gather(reader, body, self.spec.max_response_bytes, self.model_id)
            except BadStream as e:
                raise BadGateway(f"model {self.model_id!r} {e.why}", model=self.model_id) from None
            except ApiError:
                self.failures += 1  # the upstream's error event: a failure, as its error status would be
                raise
        else:
            problem = not_strict_json(body)
            if problem is not None:
                content_type = (content_types or [b"none"])[0].decode("latin-1")
                raise BadGateway(
                    f"model {self.model_id!r} {problem} "
                    f"(status {status}, content-type {content_type}): {snippet(body)}",
                    model=self.model_id,
                ) from None
        if status >= 400:
            self.failures += 1
        headers = {}
        if status in (429, 503):
            # When to try again is the model's to say (and a worker's forwarded answer's).
            retry_after = response.headers.getRawHeaders(b"retry-after")
            if retry_after:
                headers[b"Retry-After"] = retry_after[0]
        return ModelAnswer(status=status, body=body, headers=headers)

    def _failed(self, failure, replica=None):
        if failure.check(ApiError):
            self.failures += 1
            return failure
        if failure.check(CancelledError):
            # The client went away and the request was abandoned: nothing to answer.
            return failure
        self.failures += 1
        model = self.model_id
        if failure.check(DeadlineExceeded):
            raise GatewayTimeout(f"model {model!r} did not answer within {self.spec.timeout:g} s", model=model)
        if failure.check(ierror.TimeoutError):
            raise GatewayTimeout(
                f"cannot connect to model {model!r} at {replica.text if replica else self.spec.url} "
                f"within {self.spec.connect_timeout:g} s",
                model=model,
            )
        if failure.check(DestinationDenied):
            raise Forbidden(f"model {model!r} may not be reached: {failure.getErrorMessage()}", model=model)
        if failure.check(ResponseTooLarge):
            raise BadGateway(
                f"model {model!r} answered more than max_response_bytes ({self.spec.max_response_bytes} bytes)",
                model=model,
            )
        if failure.check(ierror.ConnectingCancelledError, ierror.ConnectError, ierror.DNSLookupError):
            reason = failure.getErrorMessage()
            if failure.check(ierror.ConnectionRefusedError):
                reason = "connection refused"
            elif failure.check(ierror.DNSLookupError):
                reason = "host name not found"
            where = replica.text if replica else self.spec.url
            raise ReplicaRefused(f"cannot connect to model {model!r} at {where}: {reason}", model=model)
        if failure.check(ResponseFailed, ierror.ConnectionLost, ierror.ConnectionDone):
            raise BadGateway(f"model {model!r} closed the connection before answering in full", model=model)
        self.log.failure("model {model} failed in an unexpected way", failure, model=model)
        raise BadGateway(f"model {model!r} failed: {failure.getErrorMessage()}", model=model)


# --- batching ------------------------------------------------------------------------------


def batch_route(replica: Replica, url: str) -> Replica:
    """
    Where a batch for C{replica}'s server is POSTed (C{[models.batching] url}): a path on
    that server, or a whole URL. (A L{Replica} only for its C{head} and C{uri}: the
    replica's own one is ejected, counted, picked.)
    """
    if url.startswith("/"):
        base = replica.url
        url = base.replace(path=(), query=(), fragment="").to_text().rstrip("/") + url
    return Replica(url)


def answer_bytes(element) -> bytes:
    """One element of a batch's answer, as the JSON text of its request's answer."""
    try:
        return orjson.dumps(element)
    except TypeError:  # an integer past 64 bits: json writes it
        return json.dumps(element, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def split_array(answer: ModelAnswer, count: int, model_id: str) -> list:
    """A batch's 2xx answer: a JSON array of one answer per request, in order (L{OneCall}'s split)."""
    answers = model_json(answer.body)  # strict JSON already (L{HttpModel._answered})
    if type(answers) is not list or len(answers) != count:
        said = f"a JSON {type_of(answers)}" if type(answers) is not list else f"{len(answers)} answers"
        raise BadGateway(f"model {model_id!r} answered a batch of {count} requests with {said} "
                         f"(a batch is answered by a JSON array of one answer per request, in order)",
                         model=model_id)
    status = answer.status
    return [ModelAnswer(status=status, body=answer_bytes(element)) for element in answers]


def _raise(error: Exception):
    raise error


class WaitingBatch:
    """A batch of a L{BatchingHttpModel} (its L{OneCall}) waiting for a place, or sent."""

    __slots__ = ("items", "call", "waiter", "merged")

    def __init__(self, items: list, call: OneCall):
        self.items = items
        self.call = call
        self.waiter = None
        self.merged = False  # sent with the batch before it


class SharedExchange:
    """The exchange of batches sent together, as each one's L{OneCall} sees it: abandoned once all of them are."""

    __slots__ = ("exchange", "left")

    def __init__(self, exchange: Deferred, count: int):
        self.exchange = exchange
        self.left = count

    def cancel(self) -> None:
        self.left -= 1
        if not self.left:
            self.exchange.cancel()


def type_of(value) -> str:
    """The JSON name of a value's type, for errors."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool) or value is None:
        return "literal"
    return "number"


# The longest X-Request-Id a batch is sent with: past it, its first ids and how many more
# (a server's header limit is 8 to 16 KiB; a batch may hold thousands of requests).
MAX_BATCH_IDS = 4096


def batch_request_ids(request_ids: list) -> bytes:
    """A batch's X-Request-Id: its requests' ids, comma-separated, in order; past L{MAX_BATCH_IDS}, cut."""
    text = ", ".join(request_ids)
    if len(text) <= MAX_BATCH_IDS:
        return text.encode("ascii")
    shown, length = [], 0
    for request_id in request_ids:
        length += len(request_id) + 2
        if length > MAX_BATCH_IDS - 32:
            break
        shown.append(request_id)
    return f"{', '.join(shown)}, ... ({len(request_ids) - len(shown)} more)".encode("ascii")


@implementer(IBatching)
class BatchingHttpModel(BatchingModel, HttpModel):
    """
    An HTTP model with C{[models.batching]}: its plain requests (C{POST /post/predict})
    wait in a L{aibackend.batching.Batcher}, and each batch is one POST of C{[body, ...]}
    (each request's body as it would be sent alone) to the batching C{url}, through the
    model's own client (its replicas, headers, timeout, destination policy); the answer is
    a JSON array of one answer per request, in order (L{split_array}). A batch takes
    one of the model's C{max_concurrency} places. Requests to its server's other routes
    (the Open Inference Protocol's, a native OpenAI server's) and streams are never batched.
    """

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.start_batching(spec.batching, self._clock, float(spec.timeout))
        self._batch_routes = {replica: batch_route(replica, spec.batching.url) for replica in self.replicas}
        self.waiting_batches: deque = deque()  # batches waiting for a place (WaitingBatch), first come first
        self.queued_items = 0  # their requests

    def send(self, body: bytes, context) -> Deferred[ModelAnswer]:
        if context.path is None:
            return BatchingModel.send(self, body, context)
        return HttpModel.send(self, body, context)

    @property
    def queued(self) -> int:
        return (self.batcher.waiting + self.keyed_waiting() + self.queued_items + len(self.limit.queue)
                - len(self.waiting_batches))

    def admit(self, waiting: int) -> None:
        if self.server is not None and self._state.value != READY:
            raise self._not_ready()
        queued = waiting + self.keyed_waiting() + self.queued_items
        if queued >= self.spec.max_queue:
            self.limit.shed += 1
            raise ModelBusy(f"model {self.model_id!r} is busy: {queued} requests are waiting to be batched or "
                            f"for a place (max_queue)", model=self.model_id, retry_after=1)

    def send_batch(self, items: list) -> list:
        if self.server is not None and self._state.value != READY:
            error = self._not_ready()
            return [fail(error) for _ in items]
        clock = self._clock
        call = OneCall(self, items, clock, math.inf, None)  # each request's own deadline: a timer each
        waiting = WaitingBatch(items, call)
        limit = self.limit
        if limit.has_room():
            self._send_group([waiting])
            return call.deferreds
        self.waiting_batches.append(waiting)
        self.queued_items += len(items)
        latest = max(item.deadline for item in items)
        waiter = waiting.waiter = limit.wait_for_place(max(latest - clock.seconds(), 0), clock)
        waiter.addCallbacks(self._batch_placed, self._batch_not_placed, callbackArgs=(waiting,),
                            errbackArgs=(waiting,))
        call.exchange = waiter  # every request of it gone: it leaves the queue
        return call.deferreds

    def _unqueue_batch(self, waiting: WaitingBatch) -> None:
        self.waiting_batches.remove(waiting)
        self.queued_items -= len(waiting.items)

    def _batch_not_placed(self, failure, waiting: WaitingBatch) -> None:
        if waiting.merged:
            return  # its requests went with the batch before it
        self._unqueue_batch(waiting)
        waiting.call.settle(failure)  # its time ran out (504), or its requests are gone

    def _batch_placed(self, _, waiting: WaitingBatch) -> None:
        """A place freed: the batch goes, with those that waited after it, up to max_batch_size."""
        self._unqueue_batch(waiting)
        group, size = [waiting], len(waiting.items)
        queue, max_size = self.waiting_batches, self.batching.max_batch_size
        while queue and size + len(queue[0].items) <= max_size:
            more = queue[0]
            self._unqueue_batch(more)
            more.merged = True
            more.waiter.cancel()  # out of the limit's queue: the place is this one's
            group.append(more)
            size += len(more.items)
        self._send_group(group)

    def _send_group(self, group: list) -> None:
        """POST the requests of one or more batches as one, and share its outcome out."""
        items = [item for waiting in group for item in waiting.items]
        body = b"[" + b",".join([item.body for item in items]) + b"]"
        request_ids = batch_request_ids([item.context.request_id for item in items])
        exchange = self._post_batch(body, request_ids, len(items), max(item.deadline for item in items))
        if len(group) == 1:
            call = group[0].call
            model_id, count = self.model_id, len(items)
            call.split = lambda answer: split_array(answer, count, model_id)
            call.exchange = exchange
            exchange.addBoth(call.settle)
            return
        shared = SharedExchange(exchange, len(group))
        for waiting in group:
            waiting.call.exchange = shared
        exchange.addBoth(self._share_out, group, len(items))

    def _share_out(self, result, group: list, count: int) -> None:
        """The outcome of batches sent together: each its part (an error for every one of them alike)."""
        if isinstance(result, Failure) or result.status >= 400:
            self.failures += len(group) - 1  # counted once by the exchange, and by each batch but one
        if not isinstance(result, Failure) and result.status < 300:
            try:
                answers = split_array(result, count, self.model_id)
            except ApiError as e:
                error = e
                for waiting in group:
                    waiting.call.split = lambda answer: _raise(error)
            else:
                start = 0
                for waiting in group:
                    end = start + len(waiting.items)
                    waiting.call.split = lambda answer, part=answers[start:end]: part
                    start = end
        for waiting in group:
            waiting.call.settle(result)

    def _post_batch(self, body: bytes, request_ids: bytes, count: int, deadline: float,
                    tried: tuple = ()) -> Deferred[ModelAnswer]:
        left = deadline - self._clock.seconds()
        if left <= 0:
            return fail(self.limit.place_timeout(self.spec.timeout))
        replica = self._pick(tried)
        if replica is None:
            return fail(self.replica_set.none_left())
        if not tried:
            self.batch_stats.sent(count)
        d = self._batch_attempt(replica, body, request_ids, count, left)
        if self.replica_set.several:

            def elsewhere(failure):
                # As L{_post}: only a batch that reached no replica is sent to another.
                failure.trap(ReplicaRefused)
                if self._pick(tried + (replica,)) is None:
                    return failure
                return self._post_batch(body, request_ids, count, deadline, tried + (replica,))

            d.addErrback(elsewhere)
        return d

    def _batch_attempt(self, replica: Replica, body: bytes, request_ids: bytes, count: int,
                       left: float) -> Deferred[ModelAnswer]:
        """As L{_attempt}: one exchange, the batch's, to the replica's batch route (the lean client)."""
        self.limit.in_flight += 1
        self.requests += count
        replica.in_flight += 1
        route = self._batch_routes[replica]
        try:
            head = (
                route.head, self._header_block, b"X-Request-Id: ", request_ids,
                b"\r\nContent-Length: ", str(len(body)).encode("ascii"), b"\r\n\r\n",
            )
            data = b"".join((*head, body)) if len(body) < LARGE else (b"".join(head), body)
            d = self._lean.request(route.uri, data, self.spec.max_response_bytes)
        except Exception:
            d = fail()
        d.addTimeout(left, self._clock, onTimeoutCancel=deadline_passed)
        d.addBoth(self._replica_outcome, replica)
        d.addCallbacks(self._answered, self._failed, errbackArgs=(replica,))
        d.addBoth(self.limit.finished)
        return d

    def stopService(self):
        self.fail_waiting(ModelUnavailable(f"model {self.model_id!r} is stopping", model=self.model_id))
        return super().stopService()

    def describe(self) -> dict:
        described = super().describe()
        described["queued"] = self.queued  # requests, those waiting to be batched or in a batch for a place too
        described["batching"] = self.describe_batching()
        return described
