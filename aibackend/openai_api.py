"""
The OpenAI-compatible API, under C{/v1}: the routes the official C{openai} client calls
(C{GET /v1/models}, C{GET /v1/models/{id}}, C{POST /v1/chat/completions},
C{/v1/completions}, C{/v1/embeddings}), for every model the daemon serves, translated to
the relay and back as L{aibackend.v2} does for the Open Inference Protocol.

A model whose server speaks OpenAI itself (an HTTP model with C{[models.openai] native =
true}) is proxied route by route: the request goes to the same route under the model's URL
(its base, e.g. C{http://host:8000/v1}), as it came but for C{model} (the upstream's name),
with the model's key; its answer, its errors (status and body) and its stream's events
come back as its server wrote them. Every other model is adapted. An adapted model gets, as its predict body (exactly what
C{/post/predict} would send it):

  - chat completions: the request object without C{model}, C{stream} and
    C{stream_options}: C{messages} and the parameters as the client gave them
    (C{max_tokens}, C{temperature}, C{stop}, C{n}, C{seed}...);
  - completions: the same, with C{prompt};
  - embeddings: C{{"input": [text, ...]}} (a single string made a list of one) and the
    other parameters but C{encoding_format}, which the front door applies.

It answers a chat or completion with a string (the text) or C{{"content", "finish_reason"?,
"usage"?}}; streaming, with chunks that are strings (text deltas) or
C{{"content"?, "finish_reason"?, "usage"?}}, and a final output that may carry
C{finish_reason} and C{usage}. An embedding model answers C{{"embeddings": [[...], ...],
"usage"?}} or a bare list of vectors, one per input. Usage a model does not give is
estimated (L{estimate_tokens}). Which routes a model serves is known by its answer: one
that does not fit the route (an embedder's vectors for a chat, a chat model's text for
embeddings) is a 400 that says what the route needs. A stream asked of a model that
cannot stream (a raw program) is made of its whole answer, sent once it came.

Errors are OpenAI's, C{{"error": {"message", "type", "param", "code"}}}
(L{errors.openai_document}), with the request's C{X-Request-Id} in the headers; a model
that is busy (its queue is full: shed) is a 429, as OpenAI says "rate limited". A stream's
error after its first byte is a last C{data: {"error": ...}} event.
"""

from __future__ import annotations

import base64
import json
import struct

import orjson
from klein import Klein
from twisted.python.failure import Failure

from aibackend import errors
from aibackend.httpmodel import UpstreamError, in_own_shape
from aibackend.interfaces import IStreaming, ModelAnswer, RequestContext
from aibackend.jsonread import MAX_JSON_DEPTH, JSONProblem, read_json, too_deep
from aibackend.policy import TokenCount, check_model, may_call
from aibackend.ratelimit import DEFAULT_COMPLETION_TOKENS
from aibackend.relay import Framing
from aibackend.web import (
    JSON,
    THREAD_ABOVE_BYTES,
    ErrorShape,
    begin,
    handle_errors,
    routing,
    sized,
)

CONTENT_TYPE = b"text/event-stream; charset=utf-8"
DONE = b"data: [DONE]\n\n"
# The request's keys that are the front door's, never sent to an adapted model.
FRONT_DOOR_KEYS = ("model", "stream", "stream_options")
EMBEDDINGS_DROPPED = FRONT_DOOR_KEYS + ("encoding_format",)  # the front door applies the encoding
FINISH_REASONS = ("stop", "length", "content_filter", "tool_calls")
# Operations, as the model's log and the metrics name them (aibackend.httpmodel's
# LEAN_OPERATIONS names them too: their routes go through its lean client).
CHAT, COMPLETIONS, EMBEDDINGS = "chat.completions", "completions", "embeddings"
ROUTES = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions", EMBEDDINGS: "/v1/embeddings"}
# The routes a POST takes past Klein (aibackend.root.Root, OpenAIAPI.render_operation), by their bytes.
POST_ROUTES = {path.encode("ascii"): operation for operation, path in ROUTES.items()}
# The headers of a stream made of a whole answer (a model that cannot stream).
WHOLE_STREAM_HEADERS = {b"content-type": CONTENT_TYPE, b"cache-control": b"no-cache"}
TEXT_ANSWER = 'a chat or completion model answers a string or {"content": text, "finish_reason"?, "usage"?}'
EMBEDDINGS_ANSWER = 'an embedding model answers {"embeddings": [[float, ...], ...]} or a list of vectors'


def estimate_tokens(text: str) -> int:
    """
    The tokens of C{text}, estimated when a model does not count them: one per four
    characters, rounded up (OpenAI's rule of thumb for English).
    """
    return tokens_of(len(text))


def tokens_of(characters: int) -> int:
    """L{estimate_tokens} for a text of C{characters} characters."""
    return (characters + 3) // 4


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


class RateLimited(errors.ApiError):
    """A model that shed the request (its queue is full), as OpenAI's 429."""

    status = 429
    type = "rate_limit_exceeded"


class ParamError(errors.BadRequest):
    """A 400 about one parameter of the request (OpenAI's C{param})."""

    def __init__(self, message: str, param: str, *, model: str | None = None):
        super().__init__(message, model=model)
        self.param = param


class ModelNotFound(errors.NotFound):
    """A model the request names that the daemon does not have (OpenAI's C{model_not_found})."""

    type = "model_not_found"
    param = "model"


def openai_error(error: errors.ApiError) -> errors.ApiError:
    """
    The error as the OpenAI API says it: a model that shed the request (its queue is
    full, L{aibackend.limits.ConcurrencyLimit.busy}) is a 429 with the same words and Retry-After.
    """
    if isinstance(error, errors.ModelBusy):
        limited = RateLimited(error.message, model=error.model)
        limited.headers = dict(error.headers)
        return limited
    return error


class OpenAIShape(ErrorShape):
    """OpenAI's errors: C{{"error": {"message", "type", "param", "code"}}}, the request id in a header."""

    document = staticmethod(errors.openai_document)

    def render(self, request, error: errors.ApiError) -> bytes:
        if isinstance(error, UpstreamError):
            # A native model's server's own error to a stream request: its status and body
            # (an adapted model's was made an ApiError of this shape: in_own_shape).
            begin(request)
            request.setResponseCode(error.status)
            for name, value in error.headers.items():
                request.responseHeaders.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])
            request.responseHeaders.setRawHeaders(b"content-type", [JSON])
            return sized(request, json.dumps(error.document).encode())
        return super().render(request, openai_error(error))

    def no_route(self, request) -> errors.ApiError:
        return errors.NotFound(f"no OpenAI-compatible route {request.path.decode('latin-1')!r}")


def _json(request, body, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [JSON])
    return sized(request, json.dumps(body).encode())


def native_name(model) -> str:
    """The name on its server of a model whose server speaks OpenAI itself."""
    return model.spec.openai.model or model.model_id


class PassedThrough(Framing):
    """
    A native model's stream: each event's data as its server wrote it, in a C{data:}
    event of its own, and C{data: [DONE]} at the end (the server's own, which ended the
    stream, L{aibackend.streambody}); an error after the first byte is a last C{data:
    {"error": ...}}. A server that answered a stream request with one JSON answer (not
    events) has it sent as one event, then C{[DONE]}.
    """

    def __init__(self):
        super().__init__("openai", CONTENT_TYPE, (b"data: ", b"\n\n"), (b"", b""), (b"data: ", b"\n\n"))

    def end(self, output: bytes | None) -> bytes:
        if output is None:
            return DONE
        return self.chunk(output) + DONE


PASSED = PassedThrough()


def _native_usage(value, tokens: TokenCount) -> bool:
    """Say in C{tokens} the C{usage} of a native server's answer or event C{value}, if it has one."""
    usage = value.get("usage") if isinstance(value, dict) else None
    if not isinstance(usage, dict):
        return False
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not (_count(prompt) and _count(completion)):
        return False
    tokens.prompt, tokens.completion = prompt, completion
    return True


class NativeTokens:
    """
    The relay's shape for a native model's plain answer whose tokens are counted: the
    answer as it came, its C{usage} said in the L{TokenCount} (else estimated: the
    prompt's, and a quarter of the answer's bytes).
    """

    __slots__ = ("tokens", "prompt_tokens")

    def __init__(self, tokens: TokenCount, prompt_tokens: int):
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens

    def shape(self, answer: ModelAnswer) -> ModelAnswer:
        if answer.status < 400:
            try:
                value = orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                value = None
            if not _native_usage(value, self.tokens):
                self.tokens.prompt, self.tokens.completion = self.prompt_tokens, tokens_of(len(answer.body))
        return answer


class CountedPassThrough(PassedThrough):
    """
    L{PassedThrough} for a stream whose tokens are counted (one per request): each event
    is read for its usage (OpenAI's last chunk, with C{include_usage}), else its text
    (C{choices[].delta.content}, C{choices[].text}) counted for an estimate, said in the
    L{TokenCount} as the stream goes (a stream that ends early is settled with it).
    """

    def __init__(self, tokens: TokenCount, prompt_tokens: int):
        super().__init__()
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.chars = 0
        self.told = False  # the server said its usage

    def _count(self, data: bytes) -> None:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if _native_usage(value, self.tokens):
            self.told = True
            return
        if self.told or not isinstance(value, dict) or not isinstance(value.get("choices"), list):
            return
        for choice in value["choices"]:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    self.chars += len(text)
        self.tokens.prompt, self.tokens.completion = self.prompt_tokens, tokens_of(self.chars)

    def chunk(self, data: bytes) -> bytes:
        self._count(data)
        return super().chunk(data)

    def end(self, output: bytes | None) -> bytes:
        if output is not None:
            self._count(output)
        return super().end(output)
# Where a native model's server is sent each operation, under its URL (e.g. http://host/v1).
UPSTREAM_PATHS = {CHAT: ("chat", "completions"), COMPLETIONS: ("completions",), EMBEDDINGS: ("embeddings",)}


def _model_entry(model, created: int) -> dict:
    return {"id": model.model_id, "object": "model", "created": created, "owned_by": "aibackend"}


# --- JSON ----------------------------------------------------------------------------------

# A run of digits orjson may not read as json does: an integer past 64 bits (orjson makes it a
# float, json keeps it whole). A text with one (a string's digits too) is read by json. Found
# by mapping every digit to 0 and looking for 19 of them (a third of a regex's time).
_DIGITS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19


def read_strict(data: bytes, what: str):
    """
    L{aibackend.jsonread.read_json}C{(data, what, finite=True)}, orjson first: orjson is
    several times faster and as strict (UTF-8, no NaN or Infinity, no number too large for
    a double), and reads the same values, but for integers past 64 bits (a text with a run
    of 19 digits is read by json) and for the depth (a document orjson reads is measured as
    json's is). What orjson refuses (a lone surrogate, which json takes) is read by json,
    whose word is final and whose messages say where.

    @raise JSONProblem: with what is wrong and where.
    """
    if _LONG_DIGITS not in data.translate(_DIGITS_ZERO):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            # Deeper than MAX_JSON_DEPTH takes more brackets than that.
            if len(data) <= MAX_JSON_DEPTH or not too_deep(data):
                return value
    return read_json(data, what, finite=True)


def _dumps(document) -> bytes:
    """A document as JSON: orjson's (several times faster), json's for what it cannot write (an integer past 64 bits)."""
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return json.dumps(document).encode()


# --- requests ------------------------------------------------------------------------------


def read_document(text: bytes) -> dict:
    """
    An OpenAI request's body: a JSON object that names a model.

    @raise errors.BadRequest: it is not, or C{model} is not a model's name.
    """
    if not text:
        raise errors.BadRequest("the request body is empty: send a JSON object")
    try:
        document = read_strict(text, "the request body")
    except JSONProblem as e:
        raise errors.BadRequest(str(e)) from None
    if not isinstance(document, dict):
        raise errors.BadRequest(f"the request body must be a JSON object, got {_kind(document)}")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise ParamError("model must be given: the id of a model (GET /v1/models lists them)", "model")
    return document


def read_request(text: bytes, operation: str) -> tuple[dict, bool, bool]:
    """
    Check an OpenAI request's body for C{operation}.

    @return: the request object, whether it asks for a stream, and whether for the
        usage chunk (C{stream_options.include_usage}).
    @raise errors.BadRequest: the body is not a JSON object, or a key the front door
        reads (C{model}, C{stream}, C{stream_options}, C{messages}, C{prompt},
        C{input}, C{encoding_format}) is missing or not what it must be.
    """
    return check_request(read_document(text), operation)


def check_request(document: dict, operation: str) -> tuple[dict, bool, bool]:
    """L{read_request} for a document L{read_document} read."""
    stream = document.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool) or (stream and operation == EMBEDDINGS):
        raise ParamError(f"stream must be true or false, got {_kind(stream)}" if not isinstance(stream, bool)
                         else "embeddings do not stream: leave stream out", "stream")
    options = document.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise ParamError(f"stream_options must be an object, got {_kind(options)}", "stream_options")
        if not stream:
            raise ParamError("stream_options is only for a stream: set stream to true", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ParamError("stream_options.include_usage must be true or false", "stream_options.include_usage")
    if operation == CHAT:
        messages = document.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ParamError("messages must be a non-empty array of {role, content}", "messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ParamError(f"messages[{index}] must be an object with a role", f"messages[{index}]")
    elif operation == COMPLETIONS:
        prompt = document.get("prompt")
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        ):
            raise ParamError("prompt must be a string (or an array of strings)", "prompt")
    else:
        inputs = document.get("input")
        if isinstance(inputs, str):
            document["input"] = [inputs]
        elif not (isinstance(inputs, list) and inputs and all(isinstance(i, str) for i in inputs)):
            raise ParamError(
                "input must be a string or a non-empty array of strings (token arrays are not taken: send text)",
                "input",
            )
        encoding = document.get("encoding_format")
        if encoding not in (None, "float", "base64"):
            raise ParamError(f"encoding_format must be float or base64, got {encoding!r}", "encoding_format")
    return document, stream, include_usage


def _no_native(name: str) -> None:
    return None


def prepare(text: bytes, operation: str, native_name=_no_native) -> tuple:
    """
    L{read_request}, then what the model is sent (L{model_body}) and the prompt's text
    (L{prompt_text}): the request's work, done in a thread for a large body. A request
    for a model whose server speaks OpenAI itself (C{native_name(id)} is its name there,
    None for any other model) is that server's to judge: only read (L{read_document}),
    and sent as it came, its C{model} made the upstream's name.

    @return: (document, stream, include_usage, body, prompt); for a native model's
        request, (the model's id, stream, body, (the tokens it would reserve, its prompt's):
        L{reservation} with the whole text's estimate) with stream C{True} only if asked so.
    """
    document = read_document(text)
    name = document["model"]
    upstream_name = native_name(name)
    if upstream_name is not None:
        document["model"] = upstream_name
        prompt_tokens = tokens_of(len(text))
        return (name, document.get("stream") is True, _dumps(document),
                (reservation(document, operation, prompt_tokens), prompt_tokens))
    document, stream, include_usage = check_request(document, operation)
    return document, stream, include_usage, model_body(document, operation), prompt_text(document, operation)


def reservation(document: dict, operation: str, prompt_tokens: int) -> int:
    """
    The tokens a request reserves against a C{tpm} limit (L{aibackend.ratelimit}): its
    prompt's (estimated), and for a chat or completion what it may write:
    C{max_completion_tokens} or C{max_tokens} (times C{n}), else
    L{DEFAULT_COMPLETION_TOKENS}.
    """
    if operation == EMBEDDINGS:
        return prompt_tokens
    most = document.get("max_completion_tokens")
    if not _count(most) or most < 0:
        most = document.get("max_tokens")
    if not _count(most) or most < 0:
        most = DEFAULT_COMPLETION_TOKENS
    choices = document.get("n")
    if _count(choices) and choices > 1:
        most *= choices
    return prompt_tokens + most


def settle_usage(tokens: TokenCount | None, usage: dict) -> None:
    """Say in C{tokens} (if any) what an answer's full usage (L{full_usage}) says."""
    if tokens is not None:
        tokens.prompt = usage["prompt_tokens"]
        tokens.completion = usage["completion_tokens"]


def model_body(document: dict, operation: str) -> bytes:
    """What an adapted model is sent: the request without the front door's keys."""
    drop = EMBEDDINGS_DROPPED if operation == EMBEDDINGS else FRONT_DOOR_KEYS
    return _dumps({key: value for key, value in document.items() if key not in drop})


def prompt_text(document: dict, operation: str) -> str:
    """The request's text, for an estimate of its tokens."""
    if operation == CHAT:
        parts = []
        for message in document["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # content parts: their text
                parts.extend(part["text"] for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
        return "\n".join(parts)
    if operation == COMPLETIONS:
        prompt = document["prompt"]
        return prompt if isinstance(prompt, str) else "\n".join(prompt)
    return "\n".join(document["input"])


# --- answers --------------------------------------------------------------------------------


def _route_error(model_id: str, operation: str, what: str, needs: str) -> errors.BadRequest:
    return errors.BadRequest(
        f"model {model_id!r} cannot serve {ROUTES[operation]}: it answered {what}; {needs}", model=model_id
    )


def _usage(value, model_id: str, operation: str) -> dict | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and _count(value.get("prompt_tokens", 0))
            and _count(value.get("completion_tokens", 0))):
        raise errors.BadGateway(
            f"model {model_id!r} answered a bad usage: it must be {{\"prompt_tokens\": n, \"completion_tokens\": n}}",
            model=model_id,
        )
    return value


def _count(value) -> bool:
    """Is C{value} a count of tokens (an integer, not a boolean)?"""
    return isinstance(value, int) and not isinstance(value, bool)


def _finish(value, model_id: str) -> str | None:
    if value is None or value in FINISH_REASONS:
        return value
    raise errors.BadGateway(
        f"model {model_id!r} answered finish_reason {value!r}: it must be one of {', '.join(FINISH_REASONS)}",
        model=model_id,
    )


def read_text_answer(value, model_id: str, operation: str) -> tuple[str, str | None, dict | None]:
    """
    A chat or completion model's answer (or a streaming model's chunks, gathered as a
    JSON array): its text, finish_reason and usage (None where it gives none).

    @raise errors.BadRequest: the answer is not a chat model's (the model cannot serve
        the route).
    """
    if isinstance(value, str):
        return value, None, None
    if isinstance(value, dict):
        content = value.get("content", "")
        if not isinstance(content, str) or ("content" not in value and "finish_reason" not in value):
            raise _route_error(model_id, operation, f"an object with keys {', '.join(map(repr, value)) or 'none'}",
                               TEXT_ANSWER)
        return content, _finish(value.get("finish_reason"), model_id), _usage(value.get("usage"), model_id, operation)
    if isinstance(value, list) and all(isinstance(item, (str, dict)) for item in value):
        # A stream gathered (aibackend.lines): its chunks in order.
        texts, finish, usage = [], None, None
        for item in value:
            text, item_finish, item_usage = read_text_answer(item, model_id, operation)
            texts.append(text)
            finish = item_finish or finish
            usage = item_usage or usage
        return "".join(texts), finish, usage
    raise _route_error(model_id, operation, _kind(value), TEXT_ANSWER)


def read_embeddings(value, model_id: str, count: int) -> tuple[list, dict | None]:
    """
    An embedding model's answer: its vectors (one per input) and usage (or None).

    @raise errors.BadRequest: it is not an embedding model's answer.
    @raise errors.BadGateway: it is, but the vectors are not one list of numbers per input.
    """
    usage = None
    if isinstance(value, dict) and "embeddings" in value:
        usage = value.get("usage")
        if usage is not None and not (isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int)):
            raise errors.BadGateway(f"model {model_id!r} answered a bad usage: it must be {{\"prompt_tokens\": n}}",
                                    model=model_id)
        value = value["embeddings"]
    elif not isinstance(value, list):
        what = (f"an object with keys {', '.join(map(repr, value)) or 'none'}" if isinstance(value, dict)
                else _kind(value))
        raise _route_error(model_id, EMBEDDINGS, what, EMBEDDINGS_ANSWER)
    if not isinstance(value, list) or not all(isinstance(vector, list) for vector in value):
        raise _route_error(model_id, EMBEDDINGS, "something else than a list of vectors", EMBEDDINGS_ANSWER)
    if len(value) != count:
        raise errors.BadGateway(f"model {model_id!r} answered {len(value)} vectors for {count} inputs",
                                model=model_id)
    for vector in value:
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector):
            raise errors.BadGateway(f"model {model_id!r} answered a vector that is not all numbers", model=model_id)
    return value, usage


def full_usage(usage: dict | None, prompt: str, completion) -> dict:
    """
    OpenAI's usage object: the model's counts where it gave them, estimates for the rest
    (C{completion} is the completion's text, or the number of its characters).
    """
    usage = usage or {}
    prompt_tokens = usage.get("prompt_tokens")
    if prompt_tokens is None:
        prompt_tokens = estimate_tokens(prompt)
    completion_tokens = usage.get("completion_tokens")
    if completion_tokens is None:
        completion_tokens = estimate_tokens(completion) if isinstance(completion, str) else tokens_of(completion)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _vector(vector: list, encoding: str):
    if encoding == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return [float(x) for x in vector]


def model_failure(answer: ModelAnswer, model_id: str) -> ModelAnswer:
    """
    A model's error answer (a 4xx or 5xx) in OpenAI's shape: its status, its words
    (L{errors.error_message} of its JSON, else the start of its body) and its headers.
    """
    try:
        document = read_strict(answer.body, "the answer")
    except JSONProblem:
        document = None
    message = errors.error_message(document)
    if message is None:
        message = answer.body[:200].decode("utf-8", "replace")
    failure = errors.ModelError(answer.status, message, model=model_id)
    return ModelAnswer(answer.status, _dumps(errors.openai_document(failure, None)), answer.headers)


def answer_value(answer: ModelAnswer, model_id: str):
    """A model's answer read (L{read_strict}); a 502 if it is not JSON the daemon reads."""
    try:
        return read_strict(answer.body, f"the answer of model {model_id!r}")
    except JSONProblem as e:
        raise errors.BadGateway(str(e), model=model_id) from None


class Completions:
    """
    Makes a chat or completion model's text into OpenAI's objects, for one request; its
    L{whole} is the relay's shape for a plain request.

    @param operation: L{CHAT} or L{COMPLETIONS}.
    @param model_id: the model's id, as the client named it.
    @param completion_id: the object's id (the request id, prefixed as OpenAI's are).
    @param created: the clock's seconds, whole.
    @param prompt: the request's text (for estimated usage).
    @param tokens: the request's L{TokenCount} (filled in with the answer's usage), or None.
    """

    __slots__ = ("operation", "model_id", "chat", "id", "object", "chunk_object", "created", "prompt", "tokens")

    def __init__(self, operation: str, model_id: str, request_id: str, created: int, prompt: str,
                 tokens: TokenCount | None = None):
        self.operation = operation
        self.model_id = model_id
        self.chat = chat = operation == CHAT
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.created = created
        self.prompt = prompt
        self.tokens = tokens

    def read(self, answer: ModelAnswer) -> tuple[str, str | None, dict | None]:
        """A model's whole answer (status 200): its text, finish_reason and usage (L{read_text_answer})."""
        return read_text_answer(answer_value(answer, self.model_id), self.model_id, self.operation)

    def whole(self, answer: ModelAnswer) -> ModelAnswer:
        """The relay's shape for a plain request: the model's answer made the completion object."""
        if answer.status >= 400:
            return model_failure(answer, self.model_id)
        return ModelAnswer(200, _dumps(self.answer(*self.read(answer))))

    def answer(self, text: str, finish: str | None, usage: dict | None) -> dict:
        """The whole answer object (no stream)."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish or "stop"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish or "stop"}
        usage = full_usage(usage, self.prompt, text)
        settle_usage(self.tokens, usage)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "choices": [choice], "usage": usage}

    def chunk(self, delta: str | None, *, first: bool = False, finish: str | None = None,
              include_usage: bool = False) -> dict:
        """One stream chunk: a text delta (the role too in a chat's first), or the finish."""
        if self.chat:
            if delta is None:
                content = {"role": "assistant"} if first else {}
            else:
                content = {"role": "assistant", "content": delta} if first else {"content": delta}
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_id,
                 "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        """The last chunk of a stream that asked for usage: no choice, the usage."""
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_id,
                "choices": [], "usage": usage}


def _length(data: bytes) -> int:
    """The characters of a JSON string's text (its JSON length, if it is not strict JSON)."""
    try:
        return len(orjson.loads(data))
    except orjson.JSONDecodeError:
        return len(data) - 2


def _event(document: dict) -> bytes:
    return b"data: " + _dumps(document) + b"\n\n"


class CompletionFraming(Framing):
    """
    A chat's or completion's Server-Sent Events (one per request: it keeps the stream's
    text for estimated usage): a C{data:} chunk object per model chunk that has text (the
    role in a chat's first), then one with the finish_reason, a usage chunk if asked,
    and C{data: [DONE]}; an error after the first byte is a last C{data: {"error": ...}}.

    A chunk's finish_reason and usage are kept for the end (a chunk of only those is an
    empty delta: the writer writes something for each chunk); a chunk that is not JSON is
    sent as its text, and one that is neither a string nor an object as its JSON text.
    Its L{whole} is the relay's shape for a stream asked of a model that cannot stream.

    With a L{TokenCount} (the completions'), it says the stream's usage so far at each
    chunk (the model's, else estimated from the text so far), so that a stream that ends
    early (cut, cancelled, its client gone) is settled with what it wrote.
    """

    def __init__(self, completions: Completions, include_usage: bool):
        super().__init__("openai", CONTENT_TYPE, (b"data: ", b"\n\n"), (b"", b""), (b"data: ", b"\n\n"))
        self.completions = completions
        self.include_usage = include_usage
        self.tokens = completions.tokens
        self.counting = include_usage or self.tokens is not None
        self.first = True
        # The characters of the stream's text, for an estimated usage (counted only when
        # usage is asked or tokens are counted: a stream keeps no text).
        self.chars = 0
        self.finish = None
        self.usage = None
        # A later chunk's event around a text delta's JSON text, made once (_around).
        self._template = None

    def _read(self, data: bytes):
        # orjson: as strict as read_json (a chunk is only read, never written again as it
        # came) and many times faster, per chunk.
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data.decode("utf-8", "replace"), None, None
        if isinstance(value, str):
            return value, None, None
        if isinstance(value, dict):
            content = value.get("content")
            finish = value.get("finish_reason")
            usage = value.get("usage")
            return (content if isinstance(content, str) else None,
                    finish if finish in FINISH_REASONS else None,
                    usage if isinstance(usage, dict) else None)
        return json.dumps(value), None, None

    def chunk(self, data: bytes) -> bytes:
        if not self.first and data[:1] == b'"' and data[-1:] == b'"':
            # A text delta (a word, a token), after the first: its JSON text is put in the
            # event as it came, unread (the common chunk, made without a JSON round trip).
            if self.counting:
                self.chars += _length(data)
                tokens = self.tokens
                if tokens is not None and self.usage is None:
                    tokens.completion = tokens_of(self.chars)
            return self._around(data)
        delta, finish, usage = self._read(data)
        self.finish = finish or self.finish
        self.usage = usage or self.usage
        if delta is None:
            delta = ""
        self.chars += len(delta)
        if self.tokens is not None:
            settle_usage(self.tokens, full_usage(self._usage(), self.completions.prompt, self.chars))
        if self.first:
            self.first = False
            return _event(self.completions.chunk(delta, first=True, include_usage=self.include_usage))
        return self._around(orjson.dumps(delta))

    def _around(self, delta: bytes) -> bytes:
        """A later chunk's event for a text delta's JSON text C{delta} (its template made once)."""
        around = self._template
        if around is None:
            template = _dumps(self.completions.chunk("\x00", include_usage=self.include_usage))
            before, after = template.split(b'"\\u0000"')
            around = self._template = (b"data: " + before, after + b"\n\n")
        return around[0] + delta + around[1]

    def end(self, output: bytes | None) -> bytes:
        if output is None:
            return self._ending(None, None, None)
        return self._ending(*self._read(output))

    def whole(self, answer: ModelAnswer) -> ModelAnswer:
        """
        The relay's shape for a stream asked of a model that cannot stream: its whole
        answer (read as a plain request's is, L{Completions.read}) made the stream's events.
        """
        completions = self.completions
        if answer.status >= 400:
            return model_failure(answer, completions.model_id)
        return ModelAnswer(200, self._ending(*completions.read(answer)), WHOLE_STREAM_HEADERS)

    def _ending(self, content: str | None, finish: str | None, usage: dict | None) -> bytes:
        """The stream's last events: a model's text that came whole (its first chunk), the finish, the usage."""
        self.finish = finish or self.finish
        self.usage = usage or self.usage
        completions = self.completions
        out = b""
        if self.first and content:  # a model that answered in one piece
            self.chars += len(content)
            out = _event(completions.chunk(content, first=True, include_usage=self.include_usage))
            self.first = False
        out += _event(completions.chunk(None, first=self.first, finish=self.finish or "stop",
                                        include_usage=self.include_usage))
        if self.counting:
            usage = full_usage(self._usage(), completions.prompt, self.chars)
            settle_usage(self.tokens, usage)
            if self.include_usage:
                out += _event(completions.usage_chunk(usage))
        return out + DONE

    def _usage(self) -> dict | None:
        """The model's usage, if it gave one that counts (whole numbers)."""
        usage = self.usage
        return usage if usage is not None and all(
            isinstance(usage.get(k, 0), int) for k in ("prompt_tokens", "completion_tokens")) else None


class Embeddings:
    """
    Makes an embedding model's answer OpenAI's list of embeddings, for one request: its
    L{shape} is the relay's (an answer longer than C{THREAD_ABOVE_BYTES} is converted in
    a thread).
    """

    __slots__ = ("model_id", "encoding", "count", "prompt", "in_thread", "tokens")

    def __init__(self, model_id: str, encoding: str, count: int, prompt: str, in_thread,
                 tokens: TokenCount | None = None):
        self.model_id = model_id
        self.encoding = encoding
        self.count = count
        self.prompt = prompt
        self.in_thread = in_thread
        self.tokens = tokens  # the request's TokenCount (its prompt's, once answered), or None

    def shape(self, answer: ModelAnswer):
        if answer.status >= 400:
            return model_failure(answer, self.model_id)
        if len(answer.body) > THREAD_ABOVE_BYTES:
            return self.in_thread(self.convert, answer)
        return self.convert(answer)

    def convert(self, answer: ModelAnswer) -> ModelAnswer:
        model_id, encoding = self.model_id, self.encoding
        vectors, usage = read_embeddings(answer_value(answer, model_id), model_id, self.count)
        prompt_tokens = usage["prompt_tokens"] if usage is not None else estimate_tokens(self.prompt)
        settle_usage(self.tokens, {"prompt_tokens": prompt_tokens, "completion_tokens": 0})
        document = {
            "object": "list",
            "data": [{"object": "embedding", "index": index, "embedding": _vector(vector, encoding)}
                     for index, vector in enumerate(vectors)],
            "model": model_id,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return ModelAnswer(200, _dumps(document))


# --- the routes -----------------------------------------------------------------------------


class OpenAIAPI:
    """
    The C{/v1} routes, a Klein app over the daemon's L{Core}, mounted by
    L{aibackend.root.Root}; a POST to one of the three routes clients call most
    (L{POST_ROUTES}) comes past Klein (L{render_operation}) to the same handler.

    @param core: the L{aibackend.relay.Core}.
    """

    app = handle_errors(routing(Klein()))

    def __init__(self, core, *, in_thread=None):
        self.core = core
        self.registry = core.registry
        self.relay = core.relay
        self.shape = OpenAIShape(core.metrics)
        self.in_thread = in_thread if in_thread is not None else core.in_thread
        # Models have no creation time of their own: the front door's.
        self.created = int(core.clock.seconds())
        self._resource = self.app.resource()

    def render(self, request):
        """Answer a request for a C{/v1} path (the root resource's C{request.postpath} whole)."""
        if request.path in (b"/v1", b"/v1/"):
            return self.shape.render(request, self.shape.no_route(request))
        request.prepath.append(request.postpath.pop(0))  # b"v1": the app's routes are below it
        if not request.postpath[0]:
            return self.shape.render(request, self.shape.no_route(request))
        return self._resource.render(request)

    def render_operation(self, request, operation: str):
        """
        A POST to C{operation}'s route (L{POST_ROUTES}) without Klein's routing (werkzeug
        matching, URL parts, IKleinRequest): L{complete}'s checks and handler, as Klein's
        route calls them, answered by the relay (L{aibackend.relay.Relay.answer}) in
        OpenAI's shape, as Klein's error handlers would.
        """
        try:
            d = self.complete(request, operation)
        except Exception:
            return self.shape.failure(request, Failure())
        return self.relay.answer(request, d, self.shape)

    def begin(self, request) -> str:
        request_id = begin(request)
        self.core.guard.check_client(request)
        return request_id

    @app.route("/models", methods=["GET"], branch=False)
    def models(self, request):
        self.begin(request)
        caller = request.aibackend_caller
        return _json(request, {"object": "list",
                               "data": [_model_entry(model, self.created) for model in self.registry.models()
                                        if may_call(caller, model.model_id)]})

    @app.route("/models/<string:name>", methods=["GET"], branch=False)
    def model(self, request, name):
        self.begin(request)
        request.aibackend_model = name
        entry = self._entry(name)
        check_model(request.aibackend_caller, entry.model_id)
        return _json(request, _model_entry(entry.model, self.created))

    def _entry(self, name: str):
        try:
            return self.registry.entry(name)
        except errors.UnknownModel as e:
            raise ModelNotFound(f"The model {name!r} does not exist: GET /v1/models lists the models",
                                model=name) from e

    # Klein's routes for what the fast path does not take: another method (a 405 with
    # Allow), a path that is one of these once its %-escapes are decoded.
    @app.route("/chat/completions", methods=["POST"], branch=False)
    def chat_completions(self, request):
        return self.complete(request, CHAT)

    @app.route("/completions", methods=["POST"], branch=False)
    def completions(self, request):
        return self.complete(request, COMPLETIONS)

    @app.route("/embeddings", methods=["POST"], branch=False)
    def embeddings(self, request):
        return self.complete(request, EMBEDDINGS)

    def complete(self, request, operation: str):
        """
        A request for C{operation} (L{CHAT}, L{COMPLETIONS}, L{EMBEDDINGS}), Klein's
        route and the fast path alike: the client let in, the body read and checked
        (L{prepare}; in a thread for a large body), and sent by the relay.

        @return: the relay's Deferred.
        @raise errors.ApiError: a request refused at once (a bad body, an unknown model).
        """
        request_id = self.begin(request)
        started = self.relay.clock.seconds()
        text = request.content.read().strip()
        if len(text) > THREAD_ABOVE_BYTES:
            # The native models' names, as they are now (a thread does not read the registry).
            names = {model.model_id: native_name(model) for model in self.registry.models()
                     if model.spec.openai.native}
            d = self.in_thread(prepare, text, operation, names.get)
            return d.addCallback(self._send, request, request_id, operation, started)
        return self._send(prepare(text, operation, self._native_name), request, request_id, operation, started)

    def _native_name(self, name: str) -> str | None:
        """The name on its server of model C{name} if that server speaks OpenAI itself, else None."""
        if name not in self.registry:
            return None
        model = self.registry.get(name)
        return native_name(model) if model.spec.openai.native else None

    def _send(self, prepared, request, request_id: str, operation: str, started: float):
        if len(prepared) == 4:
            return self._proxy(prepared, request, request_id, operation, started)
        document, stream, include_usage, body, prompt = prepared
        name = document["model"]
        request.aibackend_model = name
        entry = self._entry(name)
        model_id = entry.model_id
        relay = self.relay
        context = RequestContext(request_id=request_id, operation=operation)
        created = int(relay.clock.seconds())
        # The request's tokens, only when its policy counts them (a tpm limit, usage kept).
        policy = relay.policy
        tokens = None
        fallbacks = entry.spec.fallbacks  # (a fallback's own tpm counts whether or not this model's does)
        if policy is not None and (policy.counts_tokens(request, entry)
                                   or fallbacks and relay.chain_counts_tokens(request, entry)):
            tokens = TokenCount(reservation(document, operation, estimate_tokens(prompt)))
        # A chain's fallback gets the same body, its answer shaped with its own id.
        retarget = None if not fallbacks else _Adapted(
            self, entry, body, context, document, stream, include_usage, prompt, created, tokens).retarget
        if operation == EMBEDDINGS:
            embeddings = Embeddings(model_id, document.get("encoding_format") or "float", len(document["input"]),
                                    prompt, self.in_thread, tokens)
            return relay.send(request, entry, body, context, started, embeddings.shape, tokens, retarget=retarget)
        completions = Completions(operation, model_id, request_id, created, prompt, tokens)
        if stream:
            framing = CompletionFraming(completions, include_usage)
            if not IStreaming.providedBy(entry.model):
                # A model that cannot stream (a raw program) answers in one piece: the
                # stream is made of its answer, sent whole once it came.
                return relay.send(request, entry, body, context, started, framing.whole, tokens, retarget=retarget)
            return relay.stream(request, entry, body, context, started, framing, self.shape, tokens,
                                retarget=retarget).addErrback(in_own_shape)
        return relay.send(request, entry, body, context, started, completions.whole, tokens, retarget=retarget)

    def _proxy(self, prepared, request, request_id: str, operation: str, started: float):
        """
        A request for a model whose server speaks OpenAI itself: sent to the same route
        under its URL, its answer (or its error, status and body) passed on as it came, a
        stream event by event (L{PASSED}).
        """
        name, stream, body, (reserve, prompt_tokens) = prepared
        request.aibackend_model = name
        entry = self._entry(name)
        relay = self.relay
        context = RequestContext(request_id=request_id, operation=operation, path=UPSTREAM_PATHS[operation])
        policy = relay.policy
        tokens = None
        fallbacks = entry.spec.fallbacks  # (a fallback's own tpm counts whether or not this model's does)
        if policy is not None and (policy.counts_tokens(request, entry)
                                   or fallbacks and relay.chain_counts_tokens(request, entry)):
            # Counted: the usage its server's answer (or its stream's usage event) says, else estimated.
            tokens = TokenCount(reserve)
        native = _Native(entry, body, context, stream, tokens, prompt_tokens)
        retarget = None
        if fallbacks:
            native.in_thread = self.in_thread
            retarget = native.retarget
        if stream:
            return relay.stream(request, entry, body, context, started, native.framing(), self.shape, tokens,
                                retarget=retarget)
        return relay.send(request, entry, body, context, started, native.shape(), tokens, retarget=retarget)


def _other_kind(fallback, entry, native: bool) -> errors.BadRequest:
    kinds = ("speaks OpenAI itself", "is adapted")
    return errors.BadRequest(
        f"model {fallback.model_id!r} {kinds[not native]} and model {entry.model_id!r} {kinds[native]}: a /v1 "
        f"request goes on only to a fallback of the same kind", model=fallback.model_id,
    )


class _Adapted:
    """
    How a /v1 request for an adapted model with fallbacks is made for each fallback
    (L{aibackend.relay.Chain}'s C{retarget}): an adapted model is sent the same body,
    and its answer made OpenAI's with its own id; a native model is skipped (its
    server takes the request as it came, which this one is not any more).
    """

    def __init__(self, door, entry, body, context, document, stream, include_usage, prompt, created, tokens=None):
        self.door, self.entry, self.body, self.context = door, entry, body, context
        self.document, self.stream, self.include_usage, self.prompt, self.created = (
            document, stream, include_usage, prompt, created)
        self.tokens = tokens  # the request's TokenCount (None: not counted), filled by whichever model serves

    def retarget(self, fallback):
        if fallback.model.spec.openai.native:
            raise _other_kind(fallback, self.entry, False)
        operation, model_id = self.context.operation, fallback.model_id
        if operation == EMBEDDINGS:
            document = self.document
            shape = Embeddings(model_id, document.get("encoding_format") or "float", len(document["input"]),
                               self.prompt, self.door.in_thread, self.tokens).shape
            return self.body, self.context, shape
        completions = Completions(operation, model_id, self.context.request_id, self.created, self.prompt,
                                  self.tokens)
        if not self.stream:
            return self.body, self.context, completions.whole
        framing = CompletionFraming(completions, self.include_usage)
        # A stream's chain streams (a fallback that cannot is skipped); a chain whose first
        # model answers whole makes each answer a whole stream.
        return self.body, self.context, framing if IStreaming.providedBy(self.entry.model) else framing.whole


class _Native:
    """
    How a /v1 request for a native model is answered: as it came (L{PASSED}), or, when
    its tokens are counted (C{tokens}, a L{TokenCount}), read for the usage its server
    says; and, with fallbacks, made for each fallback: a native model gets the request
    as it came, its C{model} that server's name; an adapted model is skipped (see
    L{_Adapted}).
    """

    in_thread = None  # with fallbacks: how a fallback's request is made from a large body (None: here)

    def __init__(self, entry, body, context, stream, tokens=None, prompt_tokens=0):
        self.entry, self.body, self.context, self.stream = entry, body, context, stream
        self.tokens, self.prompt_tokens = tokens, prompt_tokens

    def framing(self):
        """A stream's framing: passed on, its usage read when counted."""
        return PASSED if self.tokens is None else CountedPassThrough(self.tokens, self.prompt_tokens)

    def shape(self):
        """A whole answer's shape: None (passed on), or one that reads its usage when counted."""
        return None if self.tokens is None else NativeTokens(self.tokens, self.prompt_tokens).shape

    def retarget(self, fallback):
        """
        The request of native fallback C{fallback}: the body with its server's name, made
        in a thread when it is large (as the first model's was read), else here.
        """
        if not fallback.model.spec.openai.native:
            raise _other_kind(fallback, self.entry, True)
        shaping = self.framing() if self.stream else self.shape()
        name = native_name(fallback.model)
        if self.in_thread is not None and len(self.body) > THREAD_ABOVE_BYTES:
            return self.in_thread(_renamed, self.body, name).addCallback(lambda body: (body, self.context, shaping))
        return _renamed(self.body, name), self.context, shaping


def _renamed(body: bytes, name: str) -> bytes:
    """An OpenAI request's body, its C{model} made C{name}."""
    document = json.loads(body)  # (json: the body may hold an integer orjson cannot read)
    document["model"] = name
    return _dumps(document)
