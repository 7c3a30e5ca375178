"""
What every front door does with HTTP, apart from its protocol: read a request (query
parameters, strict JSON bodies), begin an answer (its request id, JSON), give it a length,
and render errors in the front door's shape (L{ErrorShape}), from its Klein app's handlers
(L{handle_errors}) and from the relay alike.

The front doors (L{aibackend.api}, L{aibackend.v2}) import this module, never each other.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_plus

import orjson
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed as RouteMethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import RequestRedirect

from aibackend import errors
from aibackend.ids import request_id_from_headers
from aibackend.jsonread import JSONProblem, read_json

JSON = b"application/json"
# The refusals counted in the metrics, by status (aibackend.metrics.REFUSAL_REASONS).
REFUSALS = {401: "unauthorized", 403: "forbidden", 503: "model_unavailable"}
# A body (or an answer) longer than this is read, checked or converted in a thread.
THREAD_ABOVE_BYTES = 256 * 1024
ABANDONED = "the request was abandoned before it was answered"
# Reason phrases of the statuses the daemon answers that Twisted's table lacks (it says
# "Unknown Status"): a limit's 429.
PHRASES = {429: b"Too Many Requests"}
UNEXPECTED = "the daemon failed unexpectedly; see its log"


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


def begin(request) -> str:
    """Give the request its id (once), and mark the answer as JSON."""
    request_id = request.aibackend_request_id
    if request_id is None:
        request_id = request_id_from_headers(request.requestHeaders)
        request.aibackend_request_id = request_id
        request.responseHeaders.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
        request.responseHeaders.setRawHeaders(b"content-type", [JSON])
    return request_id


def sized(request, body: bytes) -> bytes:
    """Give the answer a Content-Length (instead of chunked encoding)."""
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def client_gone(request) -> bool:
    """Has the client gone away (its connection lost) before its answer was finished?"""
    return request.aibackend_gone


def not_utf8(request) -> str | None:
    """What of the request Klein decodes (path, Host, method) is not UTF-8, or None."""
    if not _utf8(b"/".join(request.postpath)):
        return "the request's path is not UTF-8 once its %-escapes are decoded"
    problem = host_not_utf8(request)
    if problem is not None:
        return problem
    if not _utf8(request.method):
        return "the request's method is not UTF-8"
    return None


def host_not_utf8(request) -> str | None:
    """
    L{not_utf8} for a request whose path and method are known to be ASCII (a route
    past Klein, matched by its bytes): only its Host can be what Klein would not decode.
    """
    host = request.getHeader(b"host")
    if host is None or _utf8(host):
        return None
    return "the Host header is not UTF-8"


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- reading requests -------------------------------------------------------------


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
        # Without a %-escape or a +, a part is as it is (unquote_plus would return it). (In
        # the text: CPython's `bytes in bytes` raises and clears a TypeError each time.)
        plain = "%" not in text and "+" not in text
        for part in text.replace("?", "&").split("&"):
            if not part:
                continue
            key, _, value = part.partition("=")
            if plain:
                params.setdefault(key, []).append(value)
            else:
                params.setdefault(unquote_plus(key, errors="strict"), []).append(unquote_plus(value, errors="strict"))
    except UnicodeError:
        raise errors.BadRequest("the query string is not valid UTF-8") from None
    return params


def single(params: dict, name: str) -> str | None:
    """The one value of query parameter C{name}, or None; a 400 if it is given twice."""
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise errors.BadRequest(f"give {name} only once")
    return values[0]


# --- errors -------------------------------------------------------------------------


class Abandoned(errors.ApiError):
    """A request cancelled while its client was still there, as /v2 answers it (no Retry-After)."""

    status = 503
    type = "model_unavailable"


class ErrorShape:
    """
    How one front door answers a failure: the one place its error document is made.
    Subclasses say the document (L{document}) and the words of the failures routing finds
    (L{no_route}, L{not_allowed}, L{abandoned}).

    @param metrics: the daemon's L{aibackend.metrics.Metrics}, which counts refusals.
    """

    log = Logger()

    def __init__(self, metrics):
        self.metrics = metrics

    @staticmethod
    def document(error: errors.ApiError, request_id: str) -> dict:
        raise NotImplementedError

    def no_route(self, request) -> errors.ApiError:
        raise NotImplementedError

    def not_allowed(self, request, allowed: list[str]) -> errors.ApiError:
        """A method the route does not take: a 405 that names the ones it does (with Allow)."""
        method = request.method.decode("latin-1")
        return errors.MethodNotAllowed(f"{method} is not allowed here: use {' or '.join(allowed)}", allowed)

    def abandoned(self) -> errors.ApiError:
        """A request cancelled while its client was still there."""
        return Abandoned(ABANDONED)

    def render(self, request, error: errors.ApiError) -> bytes:
        """Answer C{error}: its status, its headers, the document."""
        request_id = begin(request)
        reason = REFUSALS.get(error.status)
        if reason is not None:
            self.metrics.refused(reason)
        request.setResponseCode(error.status, PHRASES.get(error.status))
        headers = request.responseHeaders
        for name, value in error.headers.items():
            headers.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])
        headers.setRawHeaders(b"content-type", [JSON])
        return sized(request, json.dumps(self.document(error, request_id)).encode())

    def failure(self, request, failure) -> bytes:
        """
        Answer whatever a request failed with: an L{errors.ApiError} as itself, what
        routing raised (no such route, a method the route does not take), a cancelled
        request (nothing, if its client went away), and anything else as a logged 500.
        """
        error = failure.value
        if isinstance(error, errors.ApiError):
            return self.render(request, error)
        if isinstance(error, (RouteNotFound, RequestRedirect)):
            # RequestRedirect: werkzeug's redirects are off (routing()); should one come,
            # the path the client sent is still not a route.
            return self.render(request, self.no_route(request))
        if isinstance(error, RouteMethodNotAllowed):
            return self.render(request, self.not_allowed(request, sorted(error.valid_methods or ())))
        if isinstance(error, CancelledError):
            if client_gone(request):
                return b""  # nobody is left to answer
            return self.render(request, self.abandoned())
        # The path only: a query string may carry a key.
        self.log.failure("unexpected error answering {method} {path}", failure,
                         method=request.method.decode("latin-1"), path=request.path.decode("latin-1"))
        return self.render(request, errors.InternalError(UNEXPECTED))


def handle_errors(app: Klein) -> Klein:
    """
    Have a Klein class app answer every failure of its routes, and of its routing, in the
    shape of its front door: the instance's C{shape} (an L{ErrorShape}). Called once the
    app's class is made, or before its first route: it is the app's only error handler.
    """

    @app.handle_errors(Exception)
    def failed(door, request, failure):
        return door.shape.failure(request, failure)

    return app
