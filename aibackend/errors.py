"""
The errors the daemon answers with, each with its HTTP status.

Every answer the daemon makes itself on failure has one shape::

    {"error": {"type": "...", "message": "...", "model": "...", "request_id": "..."}}

Handlers raise these; each front door renders them (L{aibackend.web.ErrorShape}) with one
of the three documents made here: the daemon's (L{daemon_document}); for the Open
Inference Protocol's routes (C{/v2}), that protocol's own, C{{"error": "..."}}
(L{v2_document}); for the OpenAI-compatible routes (C{/v1}), OpenAI's
(L{openai_document}). L{refusal_document} picks one by path for the HTTP server.
"""

from __future__ import annotations

# A client that went away before its answer was finished is logged with nginx's status for it.
CLIENT_CLOSED = 499


def is_v2_path(path: bytes) -> bool:
    """Is C{path} one of the Open Inference Protocol's routes (whose errors have their own shape)?"""
    return path == b"/v2" or path.startswith(b"/v2/")


def is_openai_path(path: bytes) -> bool:
    """Is C{path} one of the OpenAI-compatible routes (whose errors have OpenAI's shape)?"""
    return path == b"/v1" or path.startswith(b"/v1/")


def refusal_document(path: bytes | None, status: int, kind: str, message: str, request_id: str) -> dict:
    """
    The error document of a request refused before any route saw it (by the HTTP server:
    a body over the limit, two C{Host} headers...), in the shape of the front door its
    path names: C{/v2}'s own, OpenAI's (whose C{type} says the C{status}), or the daemon's.
    """
    error = ApiError(message)
    error.status = status
    error.type = kind
    if path is not None and is_v2_path(path):
        return v2_document(error, request_id)
    if path is not None and is_openai_path(path):
        return openai_document(error, request_id)
    return daemon_document(error, request_id)


def daemon_document(error: ApiError, request_id: str | None) -> dict:
    """The daemon's error shape: C{{"error": {"type", "message", "model", "request_id"}}}."""
    return error.as_json(request_id)


def v2_document(error: ApiError, request_id: str | None) -> dict:
    """The Open Inference Protocol's error shape, C{{"error": "..."}} (the id is in a header)."""
    return {"error": error.message}


# OpenAI's error types, by status (what its clients read besides the status).
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
                409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                429: "rate_limit_error"}


def openai_document(error: ApiError, request_id: str | None) -> dict:
    """
    OpenAI's error shape, C{{"error": {"message", "type", "param", "code"}}}: C{type} is
    OpenAI's for the status (L{OPENAI_TYPES}; C{server_error} for a 5xx) unless the error
    says its own (C{openai_type}), C{code} the daemon's own type of the error, C{param} the
    request's key it is about, if any (the id is in a header).
    """
    status = error.status
    kind = error.openai_type or OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.type}}


def error_message(document) -> str | None:
    """
    The words of an error document a model or its server answered: C{error.message} of
    C{{"error": {"message": ...}}} (OpenAI's shape, the daemon's), or C{error} of
    C{{"error": "..."}} (the Open Inference Protocol's); None for any other document (or
    None, for a body that is not JSON).
    """
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) else None
    return error if isinstance(error, str) else None


class ApiError(Exception):
    """
    A failure the client is told about, with the status that tells it what to do.

    @ivar status: the HTTP status code.
    @ivar type: a short machine-readable name (C{snake_case}).
    @ivar model: the model id the error is about, if any.
    @ivar headers: extra response headers (C{Allow}, C{Retry-After}).
    """

    status = 500
    type = "internal_error"
    param = None  # the request's key the error is about (OpenAI's errors say it)
    openai_type = None  # OpenAI's type for it, when not its status's (a limit's: "requests", "tokens")

    def __init__(self, message: str, *, model: str | None = None, headers=None):
        super().__init__(message)
        self.message = message
        self.model = model
        self.headers = dict(headers or {})

    def as_json(self, request_id: str | None) -> dict:
        error = {"type": self.type, "message": self.message}
        if self.model is not None:
            error["model"] = self.model
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}


class BadRequest(ApiError):
    """Malformed JSON, a missing C{id}, a bad parameter."""

    status = 400
    type = "bad_request"


class Unauthorized(ApiError):
    status = 401
    type = "unauthorized"


class Forbidden(ApiError):
    status = 403
    type = "forbidden"


class NotFound(ApiError):
    """An unknown route."""

    status = 404
    type = "not_found"


class UnknownModel(NotFound):
    type = "unknown_model"

    def __init__(self, model_id: str):
        super().__init__(f"no model with id {model_id!r}", model=model_id)


class UnknownOperation(NotFound):
    type = "unknown_operation"


class MethodNotAllowed(ApiError):
    status = 405
    type = "method_not_allowed"

    def __init__(self, message: str, allowed):
        super().__init__(message, headers={"Allow": ", ".join(allowed)})


class Conflict(ApiError):
    status = 409
    type = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    type = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    type = "unsupported_media_type"


class ModelUnavailable(ApiError):
    """The model is not ready (starting, restarting, failed), its queue is full, or it is overloaded."""

    status = 503
    type = "model_unavailable"

    def __init__(self, message: str, *, model: str | None = None, retry_after: int = 1):
        super().__init__(message, model=model, headers={"Retry-After": str(int(retry_after))})
        self.retry_after = retry_after


class ModelBusy(ModelUnavailable):
    """A request shed: the model's places and its queue are full (503, as every unavailable model's)."""


class ModelError(ApiError):
    """
    A model's own error answer (a 4xx or 5xx), said in the front door's shape: the
    model's status and words (L{error_message}), type C{model_error} unless the model
    said its own (a subprocess model's C{error} line, whose type the daemon gave it).
    """

    type = "model_error"

    def __init__(self, status: int, message: str, *, model: str | None = None, headers=None,
                 kind: str | None = None):
        super().__init__(message, model=model, headers=headers)
        self.status = status
        if kind is not None:
            self.type = kind


class BadGateway(ApiError):
    """The model crashed mid-request, answered something that is not JSON, or refused the connection."""

    status = 502
    type = "bad_gateway"


class GatewayTimeout(ApiError):
    """The model did not answer in time."""

    status = 504
    type = "gateway_timeout"


class InternalError(ApiError):
    status = 500
    type = "internal_error"
