"""
The daemon's own front door: C{/{post|get}/{operation}?id={model id}}, as the original
project had it, and C{/health/live}, C{/health/ready}, C{/metrics}.

Handlers are thin: they read the request, call the registry, the relay or the model
manager, and raise the typed errors of L{aibackend.errors}, which L{DaemonShape} renders
as the one JSON error shape. Every answer is JSON and carries C{X-Request-Id}.
C{POST /post/predict}, the route nearly every request takes, comes past Klein
(L{OperationAPI.render_predict}) to the same checks and the same relay.
"""

from __future__ import annotations

import json

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure

from aibackend import errors
from aibackend.admin import describe, table_from_query
from aibackend.config import MAX_ID_LENGTH
from aibackend.interfaces import IStreaming, RequestContext
from aibackend.logs import normalize_level, parse_since, select
from aibackend.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from aibackend.policy import check_model, may_call
from aibackend.ratelimit import LimitReached
from aibackend.redisstore import ISharedStore
from aibackend.relay import NDJSON, SSE
from aibackend.usage import IUsageReader, Selection
from aibackend.web import (
    THREAD_ABOVE_BYTES,
    ErrorShape,
    begin,
    handle_errors,
    orjson_takes,
    parse_json,
    query_params,
    routing,
    single,
    sized,
)

WORDS = {"post": b"POST", "get": b"GET"}
BOTH = (b"GET", b"POST")
POST_ONLY = (b"POST",)
# What a worker process (--processes) has the primary process do: it keeps the change and
# tells every worker, which follows before the primary answers (the key changes too).
FORWARDED = frozenset({"addmodel", "removemodel", "restart", "addkey", "revokekey", "rotatekey", "deletekey"})
# Declared body types taken as JSON text: JSON itself, plain text, and what
# `curl -d` sends by default. Anything else declared is refused (415).
JSON_LIKE_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded")
# A model's log longer than this is filtered and rendered in a thread (getlogs).
THREAD_ABOVE_ENTRIES = 100


def model_id_param(params: dict) -> str:
    model_id = single(params, "id")
    if model_id is None:
        raise errors.BadRequest("missing the model id: add ?id=MODEL to the URL")
    if not model_id:
        raise errors.BadRequest("the model id is empty: add ?id=MODEL to the URL")
    if len(model_id) > MAX_ID_LENGTH:
        raise errors.BadRequest(f"the model id is {len(model_id)} characters long; ids have at most {MAX_ID_LENGTH}")
    return model_id


def key_name_param(params: dict) -> str:
    name = single(params, "name")
    if not name:
        raise errors.BadRequest("missing the key's name: add ?name=KEY to the URL")
    return name


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


STREAM_WORDS = {"true": True, "1": True, "false": False, "0": False}
# Query parameters that are the front door's, never a GET predict's input fields.
NOT_INPUTS = ("id", "stream")


def stream_framing(request, params: dict):
    """
    Whether a predict asks for a stream, and in which format: C{Accept:
    application/x-ndjson} gives NDJSON; C{Accept: text/event-stream} or C{?stream=true}
    gives Server-Sent Events (L{aibackend.relay.SSE}); None for a plain answer.

    @raise errors.BadRequest: C{stream} is not true, false, 1 or 0.
    """
    text = single(params, "stream") if "stream" in params else None
    asked = None
    if text is not None:
        asked = STREAM_WORDS.get(text.lower())
        if asked is None:
            raise errors.BadRequest(f"stream must be true or false, got {text!r}")
    accept = request.requestHeaders.getRawHeaders(b"accept")
    if accept:
        accepted = b",".join(accept).lower()
        if b"application/x-ndjson" in accepted and asked is not False:
            return NDJSON
        if b"text/event-stream" in accepted and asked is not False:
            return SSE
    return SSE if asked else None


def cannot_stream(entry) -> errors.BadRequest:
    spec = entry.spec
    if spec.type == "subprocess" and spec.protocol == "raw":
        return errors.BadRequest(f"model {entry.model_id!r} cannot stream (protocol raw)", model=entry.model_id)
    return errors.BadRequest(
        f"model {entry.model_id!r} cannot stream: its type does not answer in chunks", model=entry.model_id
    )


class DaemonShape(ErrorShape):
    """The daemon's errors: C{{"error": {"type", "message", "model", "request_id"}}}."""

    document = staticmethod(errors.daemon_document)

    def no_route(self, request) -> errors.ApiError:
        path = request.path.decode("latin-1")
        return errors.NotFound(f"no route {path!r}: use /post/OPERATION?id=MODEL or /get/OPERATION?id=MODEL")

    def not_allowed(self, request, allowed) -> errors.ApiError:
        return errors.MethodNotAllowed(f"{request.method.decode('latin-1')} is not allowed here", allowed)

    def abandoned(self) -> errors.ApiError:
        return errors.ModelUnavailable("the request was abandoned before it was answered")


class OperationAPI:
    """
    The daemon's own routes as a Klein class app, over the daemon's L{Core}.

    @param core: the L{aibackend.relay.Core}: registry, guard, metrics, manager, relay.
    """

    app = handle_errors(routing(Klein()))
    log = Logger()

    def __init__(self, core):
        self.core = core
        self.registry = core.registry
        self.relay = core.relay
        self.shape = DaemonShape(core.metrics)
        # operation -> (handler, an admin operation?, the methods it takes)
        self.operations = {
            "predict": (self.predict, False, BOTH),
            "getlogs": (self.getlogs, False, BOTH),
            "models": (self.list_models, False, BOTH),
            "status": (self.status, False, BOTH),
            "cleanlogs": (self.cleanlogs, True, POST_ONLY),
            "usage": (self.usage, True, BOTH),
        }
        if core.manager is not None:
            self.operations.update(
                {
                    "addmodel": (self.addmodel, True, POST_ONLY),
                    "removemodel": (self.removemodel, True, POST_ONLY),
                    "restart": (self.restart, True, POST_ONLY),
                }
            )

    def use_keys(self, keys) -> None:
        """
        Offer the admin operations on client keys (C{addkey}, C{keys}, C{revokekey},
        C{rotatekey}) over C{keys}, an L{aibackend.keys.KeyManager}.
        """
        self.keys = keys
        self.operations.update(
            {
                "addkey": (self.addkey, True, POST_ONLY),
                "keys": (self.list_keys, True, BOTH),
                "revokekey": (self.revokekey, True, POST_ONLY),
                "rotatekey": (self.rotatekey, True, POST_ONLY),
                "deletekey": (self.deletekey, True, POST_ONLY),
            }
        )

    def resource(self):
        return self.app.resource()

    # --- routes -------------------------------------------------------------

    @app.route("/health/live", branch=False)
    def health_live(self, request):
        begin(request)
        return sized(request, b'{"status": "live"}')

    @app.route("/health/ready", branch=False)
    def health_ready(self, request):
        begin(request)
        states = {}
        for model in self.registry.models():
            state = model.state
            states[state] = states.get(state, 0) + 1
        accepting = self.core.accepting
        body = {"status": "ready" if accepting else "not ready", "models": states}
        if not accepting:
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"1")
            body["reason"] = "the daemon is starting or stopping"
        return sized(request, json.dumps(body).encode())

    @app.route("/metrics", branch=False)
    def metrics_page(self, request):
        begin(request)
        self.core.guard.check_client(request)
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
        return sized(request, self.core.metrics.render())

    @app.route("/<string:word>/<string:operation>", branch=False)
    def front_door(self, request, word, operation):
        request_id = begin(request)
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
        return self.operation(request, request_id, operation)

    def operation(self, request, request_id: str, operation: str):
        """
        Check a request for C{operation} (it exists, takes this method, the guard lets
        the client in) and hand it to the operation's handler: Klein's route and the
        fast path alike.
        """
        found = self.operations.get(operation)
        if found is None:
            raise errors.UnknownOperation(
                f"unknown operation {operation!r}: use one of {', '.join(self.operations)}"
            )
        handler, admin, methods = found
        model_id = single(params := query_params(request), "id")
        request.aibackend_model = model_id if model_id and len(model_id) <= MAX_ID_LENGTH else None
        if request.method not in methods:
            raise errors.MethodNotAllowed(
                f"{operation} changes the daemon: use POST /post/{operation}", ["POST"]
            )
        if admin:
            self.core.guard.check_admin(request)
            if self.core.primary is not None and operation in FORWARDED:
                return self.core.forward(request)
        else:
            self.core.guard.check_client(request)
        return handler(request, request_id, params)

    def render_predict(self, request):
        """
        C{POST /post/predict}, the route nearly every request takes, without Klein's
        routing (werkzeug matching, URL parts, IKleinRequest): L{operation}'s checks and
        handler, answered by the relay (L{aibackend.relay.Relay.answer}) in this front
        door's shape, as Klein's error handlers would.
        """
        try:
            d = self.operation(request, begin(request), "predict")
        except Exception:
            return self.shape.failure(request, Failure())
        return self.relay.answer(request, d, self.shape)

    # --- operations ---------------------------------------------------------

    def request_body(self, request, params) -> bytes:
        """The JSON text a predict sends: the POST body, or GET's other query parameters."""
        if request.method != b"POST":
            fields = {
                name: values[0] if len(values) == 1 else values
                for name, values in params.items()
                if name not in NOT_INPUTS
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
        entry = self.registry.entry(model_id_param(params))
        relay = self.relay
        started = relay.clock.seconds()
        context = RequestContext(request_id=request_id, operation="predict")
        try:
            framing = stream_framing(request, params)
            if framing is None:
                send = relay.send
            elif IStreaming.providedBy(entry.model):
                def send(request, entry, body, context, started):
                    return relay.stream(request, entry, body, context, started, framing, self.shape)
            else:
                raise cannot_stream(entry)
            body = self.request_body(request, params)
            if orjson_takes(body):
                return send(request, entry, body, context, started)
            if len(body) <= THREAD_ABOVE_BYTES:
                parse_json(body)
                return send(request, entry, body, context, started)
        except (LimitReached, errors.Forbidden, errors.Unauthorized):
            # A refusal (a limit, a key that may not call the model, a mock failure without
            # admin rights), not a request to the model: counted as one, as on /v2 and /v1.
            raise
        except errors.ApiError as error:
            relay.done(entry, request_id, "predict", started, error.status, error.message)
            raise

        # What orjson refused, read again by json: a large body in a thread, so that it
        # holds up no other request (json takes seconds for a few megabytes).
        d = self.core.in_thread(parse_json, body)
        d.addErrback(relay.refused, entry, request_id, "predict", started)
        return d.addCallback(lambda _: send(request, entry, body, context, started))

    def getlogs(self, request, request_id, params):
        model = self.registry.get(model_id_param(params))
        check_model(request.aibackend_caller, model.model_id)
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
        return self.core.in_thread(render).addCallback(lambda body: sized(request, body))

    def cleanlogs(self, request, request_id, params):
        model = self.registry.get(model_id_param(params))
        removed = model.model_log.clear()
        self.log.info("log of model {model} cleaned: {removed} entries removed (request {request_id})",
                      model=model.model_id, removed=removed, request_id=request_id)
        return sized(request, json.dumps({"model": model.model_id, "removed": removed}).encode())

    def usage(self, request, request_id, params):
        """What each key used of each model (aibackend.usage), read off the reactor thread."""
        policy = self.core.policy
        reader = None if policy is None else policy.usage
        if not IUsageReader.providedBy(reader):
            raise errors.NotFound("this daemon records no usage: set usage = true in [server]")
        selection = Selection.parse(**{name: single(params, name) for name in ("key", "model", "since", "until",
                                                                             "group")})
        return reader.query(selection).addCallback(lambda body: sized(request, body))

    # --- runtime management -------------------------------------------------

    def list_models(self, request, request_id, params):
        caller = request.aibackend_caller
        models = [describe(self.registry, model) for model in self.registry.models()
                  if may_call(caller, model.model_id)]
        listed = {"count": len(models), "models": models}
        self._store_state(listed)
        return sized(request, json.dumps(listed).encode())

    def _store_state(self, answer: dict) -> None:
        """A fleet's shared store: its state (no secret) in C{answer}, from the process that follows it."""
        manager = self.core.manager
        if manager is not None and ISharedStore.providedBy(manager.store):
            state = manager.store.state()
            if state["following"]:  # (a --processes worker follows its primary)
                answer["store"] = state

    def status(self, request, request_id, params):
        entry = self.registry.entry(model_id_param(params))
        check_model(request.aibackend_caller, entry.model_id)
        model = entry.model
        described = describe(self.registry, model)
        described["spec"] = entry.spec.public()
        described["log_entries"] = len(model.model_log)
        self._store_state(described)
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
        d = self.core.manager.add(table, replace=replace in ("true", "1", "yes"))

        def added(result):
            request.setResponseCode(200 if result["replaced"] else 201)
            return sized(request, json.dumps(result).encode())

        return d.addCallback(added)

    def removemodel(self, request, request_id, params):
        d = self.core.manager.remove(model_id_param(params))
        return d.addCallback(lambda result: sized(request, json.dumps(result).encode()))

    def restart(self, request, request_id, params):
        result = self.core.manager.restart(model_id_param(params))
        return sized(request, json.dumps(result).encode())

    # --- client keys (aibackend.keys) -----------------------------------------

    def addkey(self, request, request_id, params):
        body = request.content.read().strip()
        if not body:
            raise errors.BadRequest('addkey takes a JSON object: {"name": ..., "models": [...] or "*", "limits": {...}}')
        d = self.keys.add(parse_json(body))

        def added(result):
            request.setResponseCode(201)
            return sized(request, json.dumps(result).encode())

        return d.addCallback(added)

    def list_keys(self, request, request_id, params):
        keys = self.keys.keys()
        return sized(request, json.dumps({"count": len(keys), "keys": keys}).encode())

    def revokekey(self, request, request_id, params):
        d = self.keys.revoke(key_name_param(params))
        return d.addCallback(lambda result: sized(request, json.dumps(result).encode()))

    def rotatekey(self, request, request_id, params):
        d = self.keys.rotate(key_name_param(params))
        return d.addCallback(lambda result: sized(request, json.dumps(result).encode()))

    def deletekey(self, request, request_id, params):
        d = self.keys.delete(key_name_param(params))
        return d.addCallback(lambda result: sized(request, json.dumps(result).encode()))
