"""
The front door: C{/{post|get}/{operation}?id={model id}}, as the original project had it.

Handlers are thin: they read the request, call the registry or a model, and raise the
typed errors of L{aibackend.errors}, which L{FrontDoor.api_error} renders as the one JSON
error shape. Every answer is JSON and carries C{X-Request-Id}.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_plus

import orjson
from klein import Klein
from twisted.internet import threads
from twisted.internet.defer import CancelledError, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed as RouteMethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import RequestRedirect

from aibackend import errors
from aibackend.admin import describe, table_from_query
from aibackend.auth import Guard
from aibackend.config import MAX_ID_LENGTH
from aibackend.ids import request_id_from_headers
from aibackend.interfaces import RequestContext
from aibackend.jsonread import JSONProblem, read_json
from aibackend.logs import normalize_level, parse_since, select
from aibackend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from aibackend.metrics import Metrics

JSON = b"application/json"
# A client that goes away before its answer is logged with nginx's status for it.
CLIENT_CLOSED = 499
WORDS = {"post": b"POST", "get": b"GET"}
BOTH = (b"GET", b"POST")
REFUSALS = {401: "unauthorized", 403: "forbidden", 503: "model_unavailable"}
POST_ONLY = (b"POST",)
# What a worker process (--processes) has the primary process do.
FORWARDED = frozenset({"addmodel", "removemodel", "restart"})
# Declared body types taken as JSON text: JSON itself, plain text, and what
# `curl -d` sends by default. Anything else declared is refused (415).
JSON_LIKE_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded")
# A model's log longer than this is filtered and rendered in a thread (getlogs).
THREAD_ABOVE_ENTRIES = 100
# A predict body orjson refuses and longer than this is read again by json in a thread.
THREAD_ABOVE_BYTES = 256 * 1024


class FastRoot(Resource):
    """
    The daemon's root resource: C{POST /post/predict} goes straight to
    L{FrontDoor.render_predict}, every other request to the Klein app.
    """

    isLeaf = True

    def __init__(self, door, klein_resource):
        super().__init__()
        self.door = door
        self.klein_resource = klein_resource

    def render(self, request):
        guard = self.door.guard
        if guard.watching_for_proxies:
            guard.notice_proxy(request)
        if request.method == b"POST" and request.path == b"/post/predict":
            return self.door.render_predict(request)
        # Klein answers a path, Host or method that is not UTF-8 itself, in text and with
        # a logged traceback: they are the client's mistake, answered in the route's shape.
        problem = not_utf8(request)
        if problem is not None:
            return self.door.render_route_error(request, errors.BadRequest(problem))
        return self.klein_resource.render(request)


def not_utf8(request) -> str | None:
    """What of the request Klein decodes (path, Host, method) is not UTF-8, or None."""
    for what, value in (
        ("the request's path is not UTF-8 once its %-escapes are decoded", b"/".join(request.postpath)),
        ("the Host header is not UTF-8", request.getHeader(b"host") or b""),
        ("the request's method is not UTF-8", request.method),
    ):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return what
    return None


def routing(app: Klein) -> Klein:
    """
    Make a Klein app's routes match paths as they are: werkzeug would answer a path with
    an empty segment (C{/get//models}, C{/v2/models/%2F/ready}) with a redirect to the
    path without it, and the daemon never redirects: no route has an empty segment, so
    such a path is not found (404). Called before the first route is declared: a rule
    reads the map's setting when it is added. (Werkzeug's other redirect, to a rule's
    trailing slash, is answered as not found by the error handlers.)
    """
    app.url_map.merge_slashes = False
    return app


def is_v2(request) -> bool:
    """Is the request for the Open Inference Protocol's routes (whose errors have their own shape)?"""
    return errors.is_v2_path(request.path)


def sized(request, body: bytes) -> bytes:
    """Give the answer a Content-Length (instead of chunked encoding)."""
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    return body


def parse_json(body: bytes, what: str = "the request body", *, finite: bool = False):
    """
    Parse JSON from a client strictly (L{aibackend.jsonread.read_json}: UTF-8, no NaN or
    Infinity, at most C{MAX_JSON_DEPTH} levels deep).

    @raise errors.BadRequest: with what is wrong and where.
    """
    try:
        return read_json(body, what, finite=finite)
    except JSONProblem as e:
        raise errors.BadRequest(str(e)) from None


def orjson_takes(body: bytes) -> bool:
    """
    Whether a body passed on unchanged is strict JSON by orjson, which is several times
    faster than json and as strict (no NaN, UTF-8 only, at most 1,024 levels deep). What it
    refuses goes through L{parse_json}, whose word is final and whose messages say where.
    (orjson reads integers past 64 bits as floats, so its values are not kept; the daemon
    never walks this body, so its depth is orjson's.)
    """
    try:
        orjson.loads(body)
        return True
    except orjson.JSONDecodeError:
        return False


def query_params(request) -> dict[str, list[str]]:
    """
    The query parameters, split on C{&} and also on C{?}, as the original project's
    examples separate them (C{?id=m?type=httpmodel}).

    @raise errors.BadRequest: if the query is not UTF-8.
    """
    _, _, query = request.uri.partition(b"?")
    params: dict[str, list[str]] = {}
    if not query:
        return params
    try:
        text = query.decode("utf-8")
        for part in text.replace("?", "&").split("&"):
            if not part:
                continue
            key, _, value = part.partition("=")
            params.setdefault(unquote_plus(key, errors="strict"), []).append(unquote_plus(value, errors="strict"))
    except UnicodeError:
        raise errors.BadRequest("the query string is not valid UTF-8") from None
    return params


def single(params: dict, name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise errors.BadRequest(f"give {name} only once")
    return values[0]


def model_id_param(params: dict) -> str:
    model_id = single(params, "id")
    if model_id is None:
        raise errors.BadRequest("missing the model id: add ?id=MODEL to the URL")
    if not model_id:
        raise errors.BadRequest("the model id is empty: add ?id=MODEL to the URL")
    if len(model_id) > MAX_ID_LENGTH:
        raise errors.BadRequest(f"the model id is {len(model_id)} characters long; ids have at most {MAX_ID_LENGTH}")
    return model_id


def _int_param(params, name, minimum=0):
    text = single(params, name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise errors.BadRequest(f"{name} must be a whole number, got {text!r}") from None
    if value < minimum:
        raise errors.BadRequest(f"{name} must be at least {minimum}, got {value}")
    return value


class FrontDoor:
    """
    The daemon's HTTP API as a Klein class app.

    @param registry: the L{aibackend.registry.ModelRegistry}.
    @param clock: an L{IReactorTime}, for latencies.
    @param in_thread: C{deferToThread}'s signature; tests run the function at once.
    """

    app = routing(Klein())
    log = Logger()

    def __init__(self, registry, clock, *, manager=None, guard=None, metrics=None, in_thread=None):
        self.registry = registry
        self.clock = clock
        # How work too long for the reactor thread is done (rendering a long log, large
        # tensors in aibackend.v2): the reactor's thread pool, bounded.
        self.in_thread = in_thread if in_thread is not None else threads.deferToThread
        self.manager = manager
        self.metrics = metrics if metrics is not None else Metrics(registry)
        # Ready for work: set once the daemon has started, cleared when it begins to stop.
        self.accepting = False
        self.guard = guard if guard is not None else Guard(None, ["unix:"])
        # operation -> (handler, an admin operation?, the methods it takes)
        self.operations = {
            "predict": (self.predict, False, BOTH),
            "getlogs": (self.getlogs, False, BOTH),
            "models": (self.list_models, False, BOTH),
            "status": (self.status, False, BOTH),
            "cleanlogs": (self.cleanlogs, True, POST_ONLY),
        }
        if manager is not None:
            self.operations.update(
                {
                    "addmodel": (self.addmodel, True, POST_ONLY),
                    "removemodel": (self.removemodel, True, POST_ONLY),
                    "restart": (self.restart, True, POST_ONLY),
                }
            )

        # With --processes, in a worker process: the way to the primary process (an
        # aibackend.processes.Forwarder).
        self.primary = None
        from aibackend.v2 import OpenInference  # here: aibackend.v2 imports this module

        self.open_inference = OpenInference(self)
        self._v2 = self.open_inference.resource()

    def resource(self):
        """The root resource: the hot route straight to its handler, the rest through Klein."""
        return FastRoot(self, self.app.resource())

    # --- plumbing -----------------------------------------------------------

    @staticmethod
    def begin(request) -> str:
        """
        Give the request its id (once), and mark the answer as JSON.
        """
        request_id = getattr(request, "aibackend_request_id", None)
        if request_id is None:
            request_id = request_id_from_headers(request.requestHeaders)
            request.aibackend_request_id = request_id
            request.responseHeaders.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
            request.responseHeaders.setRawHeaders(b"content-type", [JSON])
        return request_id

    def render_error(self, request, error: errors.ApiError) -> bytes:
        request_id = self.begin(request)
        reason = REFUSALS.get(error.status)
        if reason is not None:
            self.metrics.refused(reason)
        request.setResponseCode(error.status)
        for name, value in error.headers.items():
            request.responseHeaders.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])
        request.responseHeaders.setRawHeaders(b"content-type", [JSON])
        return sized(request, json.dumps(error.as_json(request_id)).encode())

    def render_route_error(self, request, error: errors.ApiError) -> bytes:
        """An error before routing, in the shape of the route the path is under."""
        if is_v2(request):
            return self.open_inference.render_error(request, error)
        return self.render_error(request, error)

    @app.handle_errors(errors.ApiError)
    def api_error(self, request, failure):
        return self.render_error(request, failure.value)

    @app.handle_errors(RouteNotFound, RequestRedirect)
    def route_not_found(self, request, failure):
        # RequestRedirect: werkzeug's redirects are off (routing()); should one come, the
        # path the client sent is still not a route.
        path = request.path.decode("latin-1")
        if is_v2(request):
            return self.open_inference.route_not_found(request, failure)
        return self.render_error(
            request,
            errors.NotFound(f"no route {path!r}: use /post/OPERATION?id=MODEL or /get/OPERATION?id=MODEL"),
        )

    @app.handle_errors(RouteMethodNotAllowed)
    def route_method_not_allowed(self, request, failure):
        allowed = sorted(failure.value.valid_methods or ())
        return self.render_error(
            request,
            errors.MethodNotAllowed(f"{request.method.decode('latin-1')} is not allowed here", allowed),
        )

    @app.handle_errors(CancelledError)
    def cancelled(self, request, failure):
        if getattr(request, "_disconnected", False):
            return b""  # the client went away; nobody is left to answer
        return self.render_error(
            request, errors.ModelUnavailable("the request was abandoned before it was answered")
        )

    @app.handle_errors(Exception)
    def unexpected(self, request, failure):
        # The path only: a query string may carry a key.
        self.log.failure("unexpected error answering {method} {path}", failure,
                         method=request.method.decode("latin-1"), path=request.path.decode("latin-1"))
        return self.render_error(request, errors.InternalError("the daemon failed unexpectedly; see its log"))

    # --- routes -------------------------------------------------------------

    @app.route("/health/live", branch=False)
    def health_live(self, request):
        self.begin(request)
        return sized(request, b'{"status": "live"}')

    @app.route("/health/ready", branch=False)
    def health_ready(self, request):
        self.begin(request)
        states = {}
        for model in self.registry.models():
            state = getattr(model, "state", "ready")
            states[state] = states.get(state, 0) + 1
        body = {"status": "ready" if self.accepting else "not ready", "models": states}
        if not self.accepting:
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"1")
            body["reason"] = "the daemon is starting or stopping"
        return sized(request, json.dumps(body).encode())

    @app.route("/v2", branch=True)
    def open_inference_protocol(self, request):
        """The Open Inference Protocol's routes (L{aibackend.v2})."""
        if request.path in (b"/v2", b"/v2/"):
            return self.open_inference_server(request)
        return self._v2

    @app.route("/v2/", branch=False)
    def open_inference_server(self, request):
        # Routed here, not in the v2 app (werkzeug redirects its empty path): its errors
        # still take the protocol's shape.
        try:
            return self.open_inference.server_metadata(request)
        except errors.ApiError as error:
            return self.open_inference.render_error(request, error)

    @app.route("/metrics", branch=False)
    def metrics_page(self, request):
        self.begin(request)
        self.guard.check_client(request)
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
        return sized(request, self.metrics.render())

    @app.route("/<string:word>/<string:operation>", branch=False)
    def front_door(self, request, word, operation):
        request_id = self.begin(request)
        expected = WORDS.get(word.lower())
        if expected is None:
            raise errors.NotFound(
                f"no route {request.path.decode('latin-1')!r}: the first path word is 'post' or 'get'"
            )
        method = request.method
        if method != expected:
            raise errors.MethodNotAllowed(
                f"/{word}/ takes {expected.decode()} requests, not {method.decode('latin-1')}",
                [expected.decode()],
            )
        found = self.operations.get(operation)
        if found is None:
            raise errors.UnknownOperation(
                f"unknown operation {operation!r}: use one of {', '.join(self.operations)}"
            )
        handler, admin, methods = found
        model_id = single(params := query_params(request), "id")
        request.aibackend_model = model_id if model_id and len(model_id) <= MAX_ID_LENGTH else None
        if method not in methods:
            raise errors.MethodNotAllowed(
                f"{operation} changes the daemon: use POST /post/{operation}", ["POST"]
            )
        if admin:
            self.guard.check_admin(request)
            if self.primary is not None and operation in FORWARDED:
                return self.forward(request)
        else:
            self.guard.check_client(request)
        return handler(request, request_id, params)

    def forward(self, request):
        """
        Have the primary process do an operation that changes the models (in a worker
        process). The primary answers once every worker, this one included, has
        followed the change (aibackend.processes.WorkerProcesses.sync).
        """
        return self.primary.forward(request).addCallback(lambda body: sized(request, body))

    def render_predict(self, request):
        """
        C{POST /post/predict}, the route nearly every request takes, without Klein's
        routing (werkzeug matching, URL parts, IKleinRequest): the same checks, handler
        and error answers as through L{front_door}.
        """
        try:
            request_id = self.begin(request)
            params = query_params(request)
            model_id = single(params, "id")
            request.aibackend_model = model_id if model_id and len(model_id) <= MAX_ID_LENGTH else None
            self.guard.check_client(request)
            d = self.predict(request, request_id, params)
        except errors.ApiError as error:
            return self.render_error(request, error)
        except Exception:
            return self.unexpected(request, Failure())
        finished = request.notifyFinish()
        finished.addErrback(lambda _: d.cancel())
        d.addErrback(self._predict_failed, request)
        d.addCallback(self._write, request)
        d.addErrback(self.log.failure, "writing an answer")
        return NOT_DONE_YET

    def _predict_failed(self, failure, request):
        if failure.check(errors.ApiError):
            return self.render_error(request, failure.value)
        if failure.check(CancelledError):
            return self.cancelled(request, failure)
        return self.unexpected(request, failure)

    @staticmethod
    def _write(body, request):
        if request.finished or getattr(request, "_disconnected", False):
            return
        if body:
            request.write(body)
        request.finish()

    # --- operations ---------------------------------------------------------

    def request_body(self, request, params) -> bytes:
        """The JSON text a predict sends: the POST body, or GET's other query parameters."""
        if request.method != b"POST":
            fields = {
                name: values[0] if len(values) == 1 else values
                for name, values in params.items()
                if name != "id"
            }
            return json.dumps(fields).encode()
        content_type = request.getHeader(b"content-type")
        if content_type:
            media = content_type.split(b";")[0].strip().lower().decode("latin-1")
            if media not in JSON_LIKE_TYPES and not media.endswith("+json"):
                raise errors.UnsupportedMediaType(f"the request body must be JSON, not {media}")
        body = request.content.read().strip()
        return body or b"{}"

    def predict(self, request, request_id, params):
        model = self.registry.get(model_id_param(params))
        started = self.clock.seconds()
        context = RequestContext(request_id=request_id, operation="predict")

        def refused(error):
            self._log_request(model, request_id, started, error.status, error.message)

        try:
            body = self.request_body(request, params)
            if orjson_takes(body):
                return self.relay(request, model, body, context, started)
            if len(body) <= THREAD_ABOVE_BYTES:
                parse_json(body)
                return self.relay(request, model, body, context, started)
        except errors.ApiError as error:
            refused(error)
            raise

        # What orjson refused, read again by json: a large body in a thread, so that it
        # holds up no other request (json takes seconds for a few megabytes).
        def not_json(failure):
            if failure.check(errors.ApiError):
                refused(failure.value)
            return failure

        return self.in_thread(parse_json, body).addCallbacks(
            lambda _: self.relay(request, model, body, context, started), not_json)

    def relay(self, request, model, body: bytes, context: RequestContext, started: float, shape=None):
        """
        Send C{body} to C{model} and answer the client with what it answers (or with what
        C{shape} makes of that L{ModelAnswer}); the outcome is logged and counted once.

        @return: a Deferred of the answer's body, or failing with an L{errors.ApiError}.
        """
        entry = self.registry.entry(model.model_id)
        stats = entry.stats
        stats.in_flight += 1
        d = maybeDeferred(model.send, body, context)

        def settled(result):
            stats.in_flight -= 1
            return result

        d.addBoth(settled)
        if shape is not None:
            d.addCallback(shape)
        operation = context.operation

        def answered(answer):
            self._log_request(model, context.request_id, started, answer.status, None, operation)
            request.setResponseCode(answer.status)
            for name, value in answer.headers.items():
                request.responseHeaders.setRawHeaders(name, [value])
            return sized(request, answer.body)

        def failed(failure):
            if failure.check(errors.ApiError):
                self._log_request(model, context.request_id, started, failure.value.status, failure.value.message,
                                  operation)
            elif failure.check(CancelledError):
                if getattr(request, "_disconnected", False):
                    self._log_request(model, context.request_id, started, CLIENT_CLOSED, "the client went away",
                                      operation)
                    return failure
                error = errors.ModelUnavailable(
                    f"model {model.model_id!r} abandoned the request (it is stopping or was removed)",
                    model=model.model_id,
                )
                self._log_request(model, context.request_id, started, error.status, error.message, operation)
                raise error
            else:
                self._log_request(model, context.request_id, started, 500, failure.getErrorMessage(), operation)
            return failure

        d.addCallbacks(answered, failed)
        return d

    def _log_request(self, model, request_id, started, status, error, operation="predict"):
        seconds = self.clock.seconds() - started
        if model.model_id in self.registry:
            self.metrics.observe(self.registry.entry(model.model_id), operation, status, seconds)
        latency_ms = seconds * 1000.0
        model.model_log.request(
            request_id=request_id, operation=operation, status=status, latency_ms=latency_ms, error=error
        )

    def getlogs(self, request, request_id, params):
        model = self.registry.get(model_id_param(params))
        limit = _int_param(params, "limit")
        since_text = single(params, "since")
        level_text = single(params, "level")
        try:
            since = parse_since(since_text) if since_text is not None else None
            level = normalize_level(level_text) if level_text is not None else None
        except ValueError as e:
            raise errors.BadRequest(str(e)) from None
        log = model.model_log
        # What the answer shows, taken now (cheap); filtering and rendering read only these.
        entries, model_id, max_entries, dropped = log.snapshot(), model.model_id, log.max_entries, log.dropped

        def render() -> bytes:
            found = select(entries, limit=limit, since=since, level=level)
            return json.dumps({"model": model_id, "count": len(found), "max_entries": max_entries,
                               "dropped": dropped, "entries": found}).encode()

        if len(entries) <= THREAD_ABOVE_ENTRIES:
            return sized(request, render())
        # A full log is milliseconds of work: done on the reactor thread, a burst of
        # getlogs would hold up every other request.
        return self.in_thread(render).addCallback(lambda body: sized(request, body))

    def cleanlogs(self, request, request_id, params):
        model = self.registry.get(model_id_param(params))
        removed = model.model_log.clear()
        self.log.info("log of model {model} cleaned: {removed} entries removed (request {request_id})",
                      model=model.model_id, removed=removed, request_id=request_id)
        return sized(request, json.dumps({"model": model.model_id, "removed": removed}).encode())

    # --- runtime management -------------------------------------------------

    def list_models(self, request, request_id, params):
        models = [describe(self.registry, model) for model in self.registry.models()]
        return sized(request, json.dumps({"count": len(models), "models": models}).encode())

    def status(self, request, request_id, params):
        entry = self.registry.entry(model_id_param(params))
        model = entry.model
        described = describe(self.registry, model)
        described["spec"] = entry.spec.public()
        described["log_entries"] = len(model.model_log)
        return sized(request, json.dumps(described).encode())

    def addmodel(self, request, request_id, params):
        replace = (single(params, "replace") or "false").lower()
        if replace not in ("true", "false", "1", "0", "yes", "no"):
            raise errors.BadRequest(f"replace must be true or false, got {replace!r}")
        body = request.content.read().strip()
        if body:
            table = parse_json(body)
            if not isinstance(table, dict):
                raise errors.BadRequest("addmodel takes a JSON object, the keys of a [[models]] entry")
            query_id = single(params, "id")
            if query_id is not None:
                if "id" in table and table["id"] != query_id:
                    raise errors.BadRequest("the id in the query and the id in the body differ")
                table["id"] = query_id
        else:
            table = table_from_query(params)
        d = self.manager.add(table, replace=replace in ("true", "1", "yes"))

        def added(result):
            request.setResponseCode(200 if result["replaced"] else 201)
            return sized(request, json.dumps(result).encode())

        return d.addCallback(added)

    def removemodel(self, request, request_id, params):
        d = self.manager.remove(model_id_param(params))
        return d.addCallback(lambda result: sized(request, json.dumps(result).encode()))

    def restart(self, request, request_id, params):
        result = self.manager.restart(model_id_param(params))
        return sized(request, json.dumps(result).encode())
