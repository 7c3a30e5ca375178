"""
The daemon's front doors over one core, and the root resource that mounts them.

L{FrontDoor} builds the L{Core} (the state every front door shares, and the relay) and
the front doors over it: the daemon's own routes (L{aibackend.api.OperationAPI}), the
Open Inference Protocol's (L{aibackend.v2.OpenInference}) and the OpenAI-compatible API's
(L{aibackend.openai_api.OpenAIAPI}). L{Root} sends each request to its front door:
C{POST /post/predict} and a POST to OpenAI's chat completions, completions and embeddings
straight to their handlers, a C{/v2} path to the protocol's app, any other C{/v1} path to
OpenAI's, every other request to the daemon's Klein app.
"""

from __future__ import annotations

from twisted.web.resource import Resource

from aibackend import errors
from aibackend.api import OperationAPI
from aibackend.errors import is_openai_path, is_v2_path
from aibackend.openai_api import POST_ROUTES, OpenAIAPI
from aibackend.relay import Core
from aibackend.v2 import OpenInference
from aibackend.web import host_not_utf8, not_utf8


class Root(Resource):
    """
    The daemon's root resource: C{POST /post/predict} goes straight to
    L{OperationAPI.render_predict}, a POST to C{/v1/chat/completions}, C{/v1/completions}
    or C{/v1/embeddings} to L{OpenAIAPI.render_operation}, a C{/v2} path to
    L{OpenInference}, any other C{/v1} path to L{OpenAIAPI}, every other request to the
    daemon's Klein app.
    """

    isLeaf = True

    def __init__(self, core: Core, api: OperationAPI, open_inference: OpenInference, openai: OpenAIAPI):
        super().__init__()
        self.guard = core.guard
        self.api = api
        self.open_inference = open_inference
        self.openai = openai
        self.klein_resource = api.resource()

    def render(self, request):
        guard = self.guard
        if guard.watching_for_proxies:
            guard.notice_proxy(request)
        path = request.path
        if request.method == b"POST":
            if path == b"/post/predict":
                return self.api.render_predict(request)
            operation = POST_ROUTES.get(path)
            if operation is not None:
                # Its path and method are ASCII: only the Host can be what Klein would refuse.
                problem = host_not_utf8(request)
                if problem is not None:
                    return self.openai.shape.render(request, errors.BadRequest(problem))
                return self.openai.render_operation(request, operation)
        v2 = is_v2_path(path)
        openai = not v2 and is_openai_path(path)
        # Klein answers a path, Host or method that is not UTF-8 itself, in text and with
        # a logged traceback: they are the client's mistake, answered in the route's shape.
        problem = not_utf8(request)
        if problem is not None:
            shape = self.open_inference.shape if v2 else self.openai.shape if openai else self.api.shape
            return shape.render(request, errors.BadRequest(problem))
        if v2:
            return self.open_inference.render(request)
        if openai:
            return self.openai.render(request)
        return self.klein_resource.render(request)


class FrontDoor:
    """
    The daemon's front doors over one L{Core}, and their root resource.

    @param registry: the L{aibackend.registry.ModelRegistry}.
    @param clock: an L{IReactorTime}, for latencies.
    @param in_thread: C{deferToThread}'s signature; tests run the function at once.
    @param keys: the L{aibackend.keys.KeyManager} behind the key operations, or None (none).
    (The other parameters are L{Core}'s.)

    @ivar core: the L{Core}.
    @ivar api: the daemon's own routes (L{OperationAPI}).
    @ivar open_inference: the C{/v2} routes (L{OpenInference}).
    @ivar openai: the C{/v1} routes (L{OpenAIAPI}).
    """

    def __init__(self, registry, clock, *, manager=None, guard=None, metrics=None, in_thread=None, keys=None):
        self.core = Core(registry, clock, manager=manager, guard=guard, metrics=metrics, in_thread=in_thread)
        self.registry = registry
        self.metrics = self.core.metrics
        self.guard = self.core.guard
        self.api = OperationAPI(self.core)
        if keys is not None:
            self.api.use_keys(keys)
        self.open_inference = OpenInference(self.core)
        self.openai = OpenAIAPI(self.core)

    def resource(self) -> Root:
        """The root resource: the hot route straight to its handler, the rest to their apps."""
        return Root(self.core, self.api, self.open_inference, self.openai)

    @property
    def accepting(self) -> bool:
        """Ready for work (L{Core.accepting}): set once the daemon has started, cleared when it stops."""
        return self.core.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.core.accepting = value

    @property
    def primary(self):
        """The way to the primary process, in a worker process (L{Core.primary})."""
        return self.core.primary

    @primary.setter
    def primary(self, forwarder) -> None:
        self.core.primary = forwarder
