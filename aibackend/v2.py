"""
The Open Inference Protocol (KServe v2, REST): the routes Triton's, KServe's, MLServer's
and Seldon's clients call, under C{/v2}, for every model the daemon serves.

  - A model whose server speaks v2 itself (an HTTP model with C{[models.v2] native =
    true}: a Triton, MLServer or KServe server) is proxied: the request goes to the same
    route of its server.
  - Every other model is adapted (L{aibackend.tensors}): the v2 request becomes the
    model's plain JSON, one key per input, and its JSON answer becomes output tensors.

The generate extension (C{/generate}, C{/generate_stream}: L{aibackend.generate}) is
adapted and proxied the same way: an adapted model gets the flat request object as its
predict body and its output becomes the flat answer object; a native model's server gets
the request as it came.

Versions: an adapted model has exactly one version, C{"1"} unless C{[models.v2]} says
C{version}; replacing a model does not add a version. A native model's versions are its
server's, passed through.

Only JSON tensors are taken. Binary tensor data and shared memory are refused with a 400
that names the client option to use instead; binary outputs asked for are answered as
JSON, which the clients read as well. Errors are C{{"error": "..."}}, as the protocol has
them, with the request's C{X-Request-Id} in the headers.
"""

from __future__ import annotations

import json

from klein import Klein
from twisted.internet.defer import inlineCallbacks, maybeDeferred

import aibackend
from aibackend import errors
from aibackend.api import cannot_stream
from aibackend.generate import Answers, GenerateFraming, model_body
from aibackend.httpmodel import in_own_shape
from aibackend.batching import TensorBatch
from aibackend.interfaces import FAILED, READY, IBatching, IStreaming, ModelAnswer, RequestContext, RowsContext
from aibackend.jsonread import JSONProblem, read_json
from aibackend.policy import check_model, may_call
from aibackend.tensors import TensorError, batch_rows, output_tensor, read_input, reshape
# Bodies larger than THREAD_ABOVE_BYTES are read, checked and converted in a thread (see _work).
from aibackend.web import (
    JSON,
    THREAD_ABOVE_BYTES,
    ErrorShape,
    begin,
    handle_errors,
    parse_json,
    routing,
    sized,
)

EXTENSIONS = ["model_repository", "generate"]
# Model states as the repository index names them.
STATES = {"ready": "READY", "starting": "LOADING", "restarting": "LOADING", "stopping": "UNLOADING",
          "stopped": "UNAVAILABLE", "failed": "UNAVAILABLE"}
BINARY_INPUT = (
    "binary tensor data is not supported here: send the tensor as JSON "
    "(tritonclient and KServe: InferInput.set_data_from_numpy(array, binary_data=False))"
)
SHARED_MEMORY = (
    "shared memory tensors are not supported here: send the tensor as JSON "
    "(tritonclient: set_data_from_numpy(array, binary_data=False) instead of set_shared_memory)"
)


def _json(request, body, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [JSON])
    return sized(request, json.dumps(body).encode())


def _body(request, *, empty=None):
    """The request body as JSON, whatever its Content-Type says (clients differ)."""
    return _document(_body_text(request), empty=empty)


def _body_text(request) -> bytes:
    text = request.content.read().strip()
    if text and request.getHeader(b"inference-header-content-length") is not None:
        raise errors.BadRequest(BINARY_INPUT)
    return text


def _document(text: bytes, *, empty=None):
    if not text:
        if empty is None:
            raise errors.BadRequest("the request body is empty: send a JSON object")
        return empty
    document = parse_json(text, finite=True)  # written out again (native models): no Infinity
    if not isinstance(document, dict):
        raise errors.BadRequest(f"the request body must be a JSON object, got {type(document).__name__}")
    return document


def _error_text(answer: ModelAnswer) -> str:
    """What a model's error answer says, as one line."""
    try:
        document = read_json(answer.body, "the answer", finite=True)
    except JSONProblem:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return answer.body[:200].decode("utf-8", "replace")


def _answer_document(model, answer: ModelAnswer):
    """A model's answer read as JSON (L{read_json}'s rules), or the 502 that says why not."""
    try:
        return read_json(answer.body, f"the answer of model {model.model_id!r}", finite=True)
    except JSONProblem as e:
        raise errors.BadGateway(str(e), model=model.model_id) from None


def _parameters(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.BadRequest(f"{where}.parameters must be an object")
    return value


class V2Shape(ErrorShape):
    """The Open Inference Protocol's errors: C{{"error": "..."}}, the request id in a header."""

    document = staticmethod(errors.v2_document)

    def no_route(self, request) -> errors.ApiError:
        return errors.NotFound(f"no Open Inference Protocol route {request.path.decode('latin-1')!r}")


class OpenInference:
    """
    The C{/v2} routes, a Klein app over the daemon's L{Core}, mounted by
    L{aibackend.root.Root}.

    @param core: the L{aibackend.relay.Core}: registry, guard, manager, readiness, relay.
    """

    app = handle_errors(routing(Klein()))

    def __init__(self, core, *, in_thread=None):
        self.core = core
        self.registry = core.registry
        self.shape = V2Shape(core.metrics)
        # How large tensors are handled off the reactor thread: the daemon's way.
        self.in_thread = in_thread if in_thread is not None else core.in_thread
        self._resource = self.app.resource()

    def render(self, request):
        """
        Answer a request for a C{/v2} path, given by the root resource with the whole
        path still to go (C{request.postpath}).
        """
        if request.path in (b"/v2", b"/v2/"):
            # Werkzeug would redirect the empty path under /v2: the server's metadata is
            # answered here, for every method, in the protocol's shape.
            try:
                return self.server_metadata(request)
            except errors.ApiError as error:
                return self.shape.render(request, error)
        request.prepath.append(request.postpath.pop(0))  # b"v2": the app's routes are below it
        if not request.postpath[0]:
            # /v2//...: Klein would read the empty segment as the path's leading slash.
            return self.shape.render(request, self.shape.no_route(request))
        return self._resource.render(request)

    # --- plumbing -----------------------------------------------------------

    def begin(self, request, *, client=True) -> str:
        request_id = begin(request)
        if client:
            self.core.guard.check_client(request)
        return request_id

    def _entry(self, request, name: str, version: str | None):
        """The registry entry of the model a route names (in the version it names, if any)."""
        request.aibackend_model = name
        entry = self.registry.entry(name)
        # A key's models, before the request is read against the model's tensors (which
        # would tell a key that may not call it what the model takes); the relay checks again.
        check_model(request.aibackend_caller, entry.model_id)
        v2 = entry.model.spec.v2
        if version is not None and not v2.native and version != v2.version:
            raise errors.NotFound(
                f"model {name!r} has no version {version!r}: it has one version, {v2.version!r}", model=name
            )
        return entry

    def _model(self, request, name: str, version: str | None):
        return self._entry(request, name, version).model

    # --- server -------------------------------------------------------------

    @app.route("/", methods=["GET"], branch=False)
    def server_metadata(self, request):
        self.begin(request)
        return _json(request, {"name": "aibackend", "version": aibackend.__version__, "extensions": EXTENSIONS})

    @app.route("/health/live", methods=["GET"], branch=False)
    def live(self, request):
        self.begin(request, client=False)
        return _json(request, {"live": True})

    @app.route("/health/ready", methods=["GET"], branch=False)
    def ready(self, request):
        self.begin(request, client=False)
        if not self.core.accepting:
            request.setHeader(b"retry-after", b"1")
            return _json(request, {"error": "the daemon is starting or stopping", "ready": False}, 503)
        return _json(request, {"ready": True})

    @app.route("/models", methods=["GET"], branch=False)
    def models(self, request):
        self.begin(request)
        caller = request.aibackend_caller
        return _json(request, {"models": [model.model_id for model in self.registry.models()
                                          if may_call(caller, model.model_id)]})

    # --- one model ----------------------------------------------------------

    @app.route("/models/<string:name>", methods=["GET"], branch=False)
    @app.route("/models/<string:name>/versions/<string:version>", methods=["GET"], branch=False)
    def model_metadata(self, request, name, version=None):
        request_id = self.begin(request)
        model = self._model(request, name, version)
        v2 = model.spec.v2
        if v2.native:
            return self._native_get(request, model, request_id, version, (), rename=True)
        return _json(request, {
            "name": model.model_id,
            "versions": [v2.version],
            "platform": v2.platform or f"aibackend_{model.type_name}",
            "inputs": [tensor.public() for tensor in v2.inputs],
            "outputs": [tensor.public() for tensor in v2.outputs],
        })

    @app.route("/models/<string:name>/ready", methods=["GET"], branch=False)
    @app.route("/models/<string:name>/versions/<string:version>/ready", methods=["GET"], branch=False)
    def model_ready(self, request, name, version=None):
        request_id = self.begin(request)
        model = self._model(request, name, version)
        state = model.state
        if state != READY:
            return _json(request, {"error": f"model {name!r} is not ready: it is {state}", "name": name,
                                   "ready": False}, 503)
        if model.spec.v2.native:
            return self._native_get(request, model, request_id, version, ("ready",), ready=True)
        return _json(request, {"name": name, "ready": True})

    def _upstream_path(self, model, version, tail) -> tuple:
        v2 = model.spec.v2
        path = ("v2", "models", v2.model or model.model_id)
        if version is not None:
            path += ("versions", version)
        return path + tuple(tail)

    def _native_get(self, request, model, request_id, version, tail, *, rename=False, ready=False):
        context = RequestContext(request_id=request_id, operation="v2", method=b"GET",
                                 path=self._upstream_path(model, version, tail))
        d = model.send(b"", context)

        def answered(answer):
            if answer.status != 200:
                if ready:
                    return _json(request, {"error": f"model {model.model_id!r} is not ready on its server: "
                                                    f"{_error_text(answer)}", "name": model.model_id,
                                           "ready": False}, 503)
                return _json(request, {"error": _error_text(answer)}, answer.status)
            if ready:
                return _json(request, {"name": model.model_id, "ready": True})
            document = _answer_document(model, answer)
            if rename and isinstance(document, dict):
                document["name"] = model.model_id
            return _json(request, document)

        return d.addCallback(answered)

    # --- inference ----------------------------------------------------------

    @app.route("/models/<string:name>/infer", methods=["POST"], branch=False)
    @app.route("/models/<string:name>/versions/<string:version>/infer", methods=["POST"], branch=False)
    def infer(self, request, name, version=None):
        request_id = self.begin(request)
        entry = self._entry(request, name, version)
        model = entry.model
        relay = self.core.relay
        started = relay.clock.seconds()

        def prepare_for(model, version, text):
            document = _document(text)
            if model.spec.v2.native:
                context = RequestContext(request_id=request_id, operation="infer",
                                         path=self._upstream_path(model, version, ("infer",)))
                return self._native_request(model, document), self._native_answer, context
            body, shape, batch = self._adapted_request(model, document)
            if batch is not None:
                return body, shape, RowsContext(request_id=request_id, operation="infer", batch=batch)
            return body, shape, RequestContext(request_id=request_id, operation="infer")

        def prepare(text):
            body, shape, context = prepare_for(model, version, text)
            if not entry.spec.fallbacks:
                return body, context, shape, None

            def made(prepared):
                body, shape, context = prepared
                return body, context, shape

            def retarget(fallback):
                # A fallback's request is made for it (its tensors, native or not), and its
                # answer shaped as its own; a version asked for is the first model's. A large
                # body's in a thread, as the first model's was (the relay's chain waits for it).
                if len(text) > THREAD_ABOVE_BYTES:
                    return self.in_thread(prepare_for, fallback.model, None, text).addCallback(made)
                return made(prepare_for(fallback.model, None, text))

            return body, context, shape, retarget

        d = self._work(prepare, maybeDeferred(_body_text, request))
        d.addErrback(relay.refused, entry, request_id, "infer", started)
        return d.addCallback(lambda prepared: relay.send(request, entry, prepared[0], prepared[1], started,
                                                         prepared[2], retarget=prepared[3]))

    # --- the generate extension (aibackend.generate) -------------------------------

    @app.route("/models/<string:name>/generate", methods=["POST"], branch=False)
    @app.route("/models/<string:name>/versions/<string:version>/generate", methods=["POST"], branch=False)
    def generate(self, request, name, version=None):
        return self._generate(request, name, version, "generate")

    @app.route("/models/<string:name>/generate_stream", methods=["POST"], branch=False)
    @app.route("/models/<string:name>/versions/<string:version>/generate_stream", methods=["POST"], branch=False)
    def generate_stream(self, request, name, version=None):
        return self._generate(request, name, version, "generate_stream")

    def _generate(self, request, name, version, operation: str):
        """
        generate (one answer object, through L{Relay.send}: a model that streams gathers
        its chunks) or generate_stream (Server-Sent Events, through L{Relay.stream}). A
        native model's server gets the request as it came, on the same route.
        """
        request_id = self.begin(request)
        entry = self._entry(request, name, version)
        model = entry.model
        relay = self.core.relay
        started = relay.clock.seconds()
        stream = operation == "generate_stream"
        if stream and not IStreaming.providedBy(model):
            error = cannot_stream(entry)
            relay.done(entry, request_id, operation, started, error.status, error.message)
            raise error
        native = model.spec.v2.native

        def prepare_for(model, version, text):
            """The body, context and shaping (a stream's framing) of model C{model}'s request."""
            document = _document(text)
            if model.spec.v2.native:  # its server is the judge of the rest
                path = self._upstream_path(model, version, (operation,))
                context = RequestContext(request_id=request_id, operation=operation, path=path)
                return text, context, GenerateFraming(None) if stream else self._native_answer
            answers = Answers(model.model_id, model.spec.v2.version)
            context = RequestContext(request_id=request_id, operation=operation)
            shaping = GenerateFraming(answers) if stream else self._generated(model, answers)
            return model_body(document), context, shaping

        def prepare(text):
            prepared = prepare_for(model, version, text)
            if not entry.spec.fallbacks:
                return prepared, None

            def retarget(fallback):
                # Made for the fallback (native or not), its answers its own; the version is the first model's.
                # A large body's in a thread, as the first model's was (the relay's chain waits for it).
                if stream and fallback.model.spec.v2.native != native:
                    raise errors.BadRequest(f"model {fallback.model_id!r} is {'' if native else 'not '}native, "
                                            f"and the stream's error events are the first model's")
                if len(text) > THREAD_ABOVE_BYTES:
                    return self.in_thread(prepare_for, fallback.model, None, text)
                return prepare_for(fallback.model, None, text)

            return prepared, retarget

        d = self._work(prepare, maybeDeferred(_body_text, request))
        d.addErrback(relay.refused, entry, request_id, operation, started)

        def send(prepared):
            (body, context, shaping), retarget = prepared
            if stream:
                return relay.stream(request, entry, body, context, started, shaping, self.shape, retarget=retarget)
            return relay.send(request, entry, body, context, started, shaping, retarget=retarget)

        d.addCallback(send)
        return d if native or not stream else d.addErrback(in_own_shape)

    def _generated(self, model, answers: Answers):
        """What makes an adapted model's answer the extension's answer object (or its error)."""

        def convert(answer: ModelAnswer) -> ModelAnswer:
            return ModelAnswer(200, answers.answer(answer.body, model.model_id))

        def shape(answer: ModelAnswer):
            if answer.status >= 400:
                return ModelAnswer(answer.status, json.dumps({"error": _error_text(answer)}).encode(), answer.headers)
            if len(answer.body) > THREAD_ABOVE_BYTES:
                return self.in_thread(convert, answer)
            return convert(answer)

        return shape

    def _work(self, function, text_or_deferred):
        """
        C{function(text)}, in a thread when the text is large: reading, checking and
        converting tensors is Python work for each value, which would hold up every other
        request for the length of a big one.
        """

        def run(text):
            if len(text) > THREAD_ABOVE_BYTES:
                return self.in_thread(function, text)
            return function(text)

        return text_or_deferred.addCallback(run)

    @staticmethod
    def _inputs(document) -> list:
        inputs = document.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise errors.BadRequest("the request has no inputs: send {\"inputs\": [{name, shape, datatype, data}]}")
        read = []
        for index, tensor in enumerate(inputs):
            where = f"inputs[{index}]"
            if isinstance(tensor, dict):
                parameters = _parameters(tensor.get("parameters"), where)
                if "binary_data_size" in parameters:
                    raise errors.BadRequest(BINARY_INPUT)
                if "shared_memory_region" in parameters:
                    raise errors.BadRequest(SHARED_MEMORY)
            try:
                read.append(read_input(tensor, where))
            except TensorError as e:
                raise errors.BadRequest(str(e)) from None
        seen = set()
        for name, *_ in read:
            if name in seen:  # (a set: a request of many inputs is not quadratic work)
                raise errors.BadRequest(f"input {name!r} is given twice")
            seen.add(name)
        return read

    @staticmethod
    def _requested_outputs(document) -> list[str] | None:
        outputs = document.get("outputs")
        if outputs is None:
            return None
        if not isinstance(outputs, list):
            raise errors.BadRequest("outputs must be a list of {name, parameters}")
        names = []
        for index, output in enumerate(outputs):
            if not isinstance(output, dict) or not isinstance(output.get("name"), str):
                raise errors.BadRequest(f"outputs[{index}] must be an object with a name")
            parameters = _parameters(output.get("parameters"), f"outputs[{index}]")
            if "shared_memory_region" in parameters:
                raise errors.BadRequest(SHARED_MEMORY)
            if parameters.get("classification"):
                raise errors.BadRequest(
                    f"output {output['name']!r}: the classification extension is not supported; "
                    "ask for the output without class_count"
                )
            names.append(output["name"])
        return names

    def _native_request(self, model, document) -> bytes:
        self._inputs(document)
        self._requested_outputs(document)
        # Answers come back as JSON: binary outputs asked for are asked for as JSON.
        parameters = document.get("parameters")
        if isinstance(parameters, dict) and "binary_data_output" in parameters:
            parameters["binary_data_output"] = False
        for output in document.get("outputs") or ():
            if isinstance(output.get("parameters"), dict) and "binary_data" in output["parameters"]:
                output["parameters"]["binary_data"] = False
        return json.dumps(document).encode()

    def _native_answer(self, answer: ModelAnswer) -> ModelAnswer:
        if answer.status >= 400:
            return ModelAnswer(answer.status, json.dumps({"error": _error_text(answer)}).encode(), answer.headers)
        return answer

    def _adapted_request(self, model, document):
        v2 = model.spec.v2
        inputs = self._inputs(document)
        requested = self._requested_outputs(document)
        if v2.inputs:
            declared = {tensor.name: tensor for tensor in v2.inputs}
            given = {name for name, *_ in inputs}
            missing = [name for name in declared if name not in given]
            if missing:
                raise errors.BadRequest(
                    f"model {model.model_id!r} needs input {', '.join(map(repr, missing))}; "
                    f"it takes {', '.join(map(repr, declared))}"
                )
            for name, datatype, shape, _ in inputs:
                tensor = declared.get(name)
                if tensor is None:
                    raise errors.BadRequest(
                        f"model {model.model_id!r} has no input {name!r}; it takes {', '.join(map(repr, declared))}"
                    )
                if datatype != tensor.datatype:
                    raise errors.BadRequest(f"input {name!r} is {datatype}; the model takes {tensor.datatype}")
                try:
                    tensor.check_shape(shape, "input")
                except TensorError as e:
                    raise errors.BadRequest(str(e)) from None
        if requested is not None and v2.outputs:
            known = [tensor.name for tensor in v2.outputs]
            for name in requested:
                if name not in known:
                    raise errors.BadRequest(
                        f"model {model.model_id!r} has no output {name!r}; it gives {', '.join(map(repr, known))}"
                    )
        body = json.dumps({name: reshape(flat, shape) for name, _, shape, flat in inputs}).encode()
        request_id = document.get("id")

        def convert(answer: ModelAnswer) -> ModelAnswer:
            return ModelAnswer(200, json.dumps(self._outputs(model, answer, requested, request_id)).encode())

        def shape(answer: ModelAnswer):
            if answer.status >= 400:
                return ModelAnswer(answer.status, json.dumps({"error": _error_text(answer)}).encode(), answer.headers)
            if len(answer.body) > THREAD_ABOVE_BYTES:
                return self.in_thread(convert, answer)
            return convert(answer)

        return body, shape, self._tensor_batch(model, document, inputs)

    @staticmethod
    def _tensor_batch(model, document, inputs) -> TensorBatch | None:
        """
        For a batching model whose inputs all declare a batch dimension (C{-1} first): how
        the request is concatenated with others (L{TensorBatch}: only with those of the same
        inputs' names, datatypes and other dimensions, and the same parameters), as Triton's
        dynamic batcher does. (Once the request is checked: L{_adapted_request}.)
        """
        if not IBatching.providedBy(model):
            return None
        rows = batch_rows(inputs, model.spec.v2.inputs)
        if rows is None:
            return None
        parameters = [document.get("parameters")]
        parameters += [tensor.get("parameters") for tensor in document["inputs"]]
        key = (tuple(sorted((name, datatype, tuple(shape[1:])) for name, datatype, shape, _ in inputs)),
               json.dumps(parameters, sort_keys=True))
        return TensorBatch(key, rows)

    @staticmethod
    def _outputs(model, answer: ModelAnswer, requested, request_id) -> dict:
        v2 = model.spec.v2
        value = _answer_document(model, answer)
        if not isinstance(value, dict):
            value = {(v2.outputs[0].name if len(v2.outputs) == 1 else "output"): value}
        declared = {tensor.name: tensor for tensor in v2.outputs}
        names = list(requested) if requested is not None else list(declared or value)
        outputs = []
        for name in names:
            if name not in value:
                raise errors.BadGateway(
                    f"model {model.model_id!r} answered without output {name!r} "
                    f"(it answered {', '.join(map(repr, value)) or 'nothing'})",
                    model=model.model_id,
                )
            try:
                outputs.append(output_tensor(name, value[name], declared.get(name)))
            except TensorError as e:
                raise errors.BadGateway(f"model {model.model_id!r} answered a bad {e}", model=model.model_id) from None
        result = {"model_name": model.model_id, "model_version": v2.version, "outputs": outputs}
        if request_id is not None:
            result["id"] = request_id
        return result

    # --- the model repository extension ---------------------------------------

    @app.route("/repository/index", methods=["POST"], branch=False)
    def repository_index(self, request):
        self.begin(request)
        if self.core.primary is not None:
            return self.core.forward(request)
        document = _body(request, empty={})
        only_ready = document.get("ready", False)
        if not isinstance(only_ready, bool):
            raise errors.BadRequest("ready must be true or false")
        index = []
        for model in self.registry.models():
            state = model.state
            entry = {"name": model.model_id, "version": model.spec.v2.version,
                     "state": STATES.get(state, "UNAVAILABLE"), "reason": ""}
            if state == FAILED:
                entry["reason"] = model.last_failure or "its processes failed"
            index.append(entry)
        manager = self.core.manager
        for name, (spec, *_) in sorted((manager.unloaded if manager else {}).items()):
            index.append({"name": name, "version": spec.v2.version, "state": "UNAVAILABLE", "reason": "unloaded"})
        if only_ready:
            index = [entry for entry in index if entry["state"] == "READY"]
        return _json(request, index)

    def _manager(self, request):
        self.begin(request, client=False)
        self.core.guard.check_admin(request)
        if self.core.manager is None and self.core.primary is None:
            raise errors.NotFound("this daemon does not manage models at runtime")
        return self.core.manager

    @app.route("/repository/models/<string:name>/load", methods=["POST"], branch=False)
    @inlineCallbacks
    def load(self, request, name):
        manager = self._manager(request)
        if self.core.primary is not None:
            return (yield self.core.forward(request))
        document = _body(request, empty={})
        parameters = _parameters(document.get("parameters"), "the request")
        table = None
        for key in parameters:
            if key.startswith("file:"):
                raise errors.BadRequest(
                    "model files cannot be uploaded: give the model's [[models]] table as JSON in the config parameter"
                )
            if key != "config":
                raise errors.BadRequest(f"unknown load parameter {key!r}: only config is taken")
        if "config" in parameters:
            config_text = parameters["config"]
            if not isinstance(config_text, str):
                raise errors.BadRequest("parameters.config must be a string of JSON (a [[models]] table)")
            # A lone surrogate (a \ud800 escape) does not encode: parse_json calls it not UTF-8.
            table = parse_json(config_text.encode("utf-8", "surrogatepass"), "parameters.config")
            if not isinstance(table, dict):
                raise errors.BadRequest("parameters.config must be a JSON object (a [[models]] table)")
        result = yield manager.load(name, table)
        return _json(request, result)

    @app.route("/repository/models/<string:name>/unload", methods=["POST"], branch=False)
    @inlineCallbacks
    def unload(self, request, name):
        manager = self._manager(request)
        if self.core.primary is not None:
            return (yield self.core.forward(request))
        _body(request, empty={})
        result = yield manager.unload(name)
        return _json(request, result)
