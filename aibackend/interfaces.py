"""
The extension point: what a model type implements to be reached.

The original project's Go prototype had one interface::

    type Sender interface {
        send(body []byte, qt queryType, options ...any) (Json, error)
    }

L{ISender} is that interface on the reactor: C{send} returns a Deferred of the model's
answer instead of blocking for it. A new model type implements L{ISender}, and registers
its type name with L{aibackend.config.register}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


@dataclass(frozen=True, slots=True)
class RequestContext:
    """
    What a model is told about the request besides its body.

    @ivar request_id: the request's id (the client's C{X-Request-Id}, or one we made).
    @ivar operation: the operation, e.g. C{"predict"}.
    @ivar path: for a model whose server has more than one route (a server that speaks
        the Open Inference Protocol itself): the path segments to send to, under the
        server's base path, instead of the model's URL. Other model types ignore it.
    @ivar method: the HTTP method that goes with C{path}.
    """

    request_id: str
    operation: str = "predict"
    path: tuple | None = None
    method: bytes = b"POST"


@dataclass(frozen=True, slots=True)
class ModelAnswer:
    """
    A model's answer: an HTTP status and a body that is known to be JSON text.

    The body is kept as the bytes the model sent, so that a passed-through answer is
    never decoded and encoded again. C{headers} are the few the client gets too (an
    HTTP model's C{Retry-After} with a 429 or 503).
    """

    status: int
    body: bytes
    headers: dict = field(default_factory=dict)


class ISender(Interface):
    """
    A model the daemon can send requests to.
    """

    model_id = Attribute("The model's id (str).")
    type_name = Attribute("The model type's canonical name, e.g. 'http'.")
    spec = Attribute("The validated, frozen spec the model was built from.")
    model_log = Attribute("The model's own bounded log (an aibackend.logs.ModelLog).")

    def send(body: bytes, context: RequestContext):
        """
        Send a JSON request body to the model.

        @param body: the request's JSON text, as bytes.
        @param context: a L{RequestContext}.
        @return: a Deferred that fires with a L{ModelAnswer}, or fails with an
            L{aibackend.errors.ApiError} (C{BadGateway}, C{GatewayTimeout},
            C{ModelUnavailable}, ...). Cancelling it abandons the request.
        """

    def describe():
        """
        @return: a JSON-able dict describing the model's state, without secrets.
        """
