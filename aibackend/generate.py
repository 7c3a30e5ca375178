"""
The Open Inference Protocol's generate extension, as Triton has it
(C{POST /v2/models/{m}[/versions/{v}]/generate} and C{/generate_stream}): the request's
checks, what an adapted model is sent, how its output (or each chunk of it) becomes the
extension's answer object, and the Server-Sent Events those go out as. The routes are
L{aibackend.v2}'s; a native v2 model's server gets the request as it came.

  - The request is a flat JSON object: C{text_input} (a string), other inputs, and
    C{parameters} (an object whose values are strings, numbers or booleans). An adapted
    model gets the object as its predict body with the parameters merged in, one key each
    (a name given twice is a 400): C{{"text_input": "hi", "parameters": {"n": 3}}} reaches
    it as C{{"text_input": "hi", "n": 3}}.
  - The answer is a flat JSON object: C{model_name}, C{model_version}, then the output's
    fields if it is a JSON object (the daemon's name and version win over the model's);
    a string output is C{text_output}; any other value is C{text_output} holding its
    JSON text (C{3} -> C{"3"}).
  - generate_stream sends one C{data:} event per chunk, each such an answer object; a
    stream that ends with an output sends it as one more; then the response ends (there
    is no end event, as in Triton). While nothing is written, the SSE keepalive comment
    goes every C{keepalive_seconds}, as for any stream. An error after the first byte is a last C{data:}
    event holding the extension's error object, C{{"error": "..."}}.
"""

from __future__ import annotations

import json

from aibackend import errors
from aibackend.jsonread import JSONProblem, read_json
from aibackend.relay import Framing

CONTENT_TYPE = b"text/event-stream; charset=utf-8"
_HEAD_KEYS = ("model_name", "model_version")


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def check_request(document: dict) -> dict:
    """
    Check a generate request object (L{aibackend.v2} has made sure it is an object).

    @return: its parameters (an empty dict if it has none).
    @raise errors.BadRequest: C{text_input} is not a string, C{parameters} not an object,
        or one of its values not a string, number or boolean.
    """
    if "text_input" in document and not isinstance(document["text_input"], str):
        raise errors.BadRequest(f"text_input must be a string, got {_kind(document['text_input'])}")
    if "parameters" not in document:
        return {}
    parameters = document["parameters"]
    if not isinstance(parameters, dict):
        raise errors.BadRequest(
            f"parameters must be an object of name: string, number or boolean, got {_kind(parameters)}"
        )
    for name, value in parameters.items():
        if not isinstance(value, (str, int, float)):  # (a bool is an int)
            raise errors.BadRequest(f"parameters.{name} must be a string, number or boolean, got {_kind(value)}")
    return parameters


def model_body(document: dict) -> bytes:
    """
    What an adapted model is sent for a generate request: the object with its
    parameters merged in, one key each.

    @raise errors.BadRequest: as L{check_request} says, or a parameter has the name of
        an input the request gives too.
    """
    parameters = check_request(document)
    if "parameters" not in document:
        return json.dumps(document).encode()
    body = {name: value for name, value in document.items() if name != "parameters"}
    for name, value in parameters.items():
        if name in body:
            raise errors.BadRequest(f"{name!r} is given twice: as an input and in parameters")
        body[name] = value
    return json.dumps(body).encode()


class Answers:
    """
    Makes a model's outputs into the extension's answer objects, for one model and version.

    @param model_name: the model's id, as the client named it.
    @param model_version: its version.
    """

    def __init__(self, model_name: str, model_version: str):
        self.head = {"model_name": model_name, "model_version": model_version}
        # A string output's answer is made without reading it: the head, then the string.
        self._text = json.dumps(self.head).encode()[:-1] + b', "text_output": '

    def document(self, value, text: str) -> dict:
        """The answer object for an output C{value}, whose JSON text is C{text}."""
        if isinstance(value, dict):
            answer = dict(self.head)
            answer.update((name, field) for name, field in value.items() if name not in _HEAD_KEYS)
            return answer
        return {**self.head, "text_output": value if isinstance(value, str) else text}

    def encode(self, data: bytes, what: str = "the chunk") -> bytes:
        """
        The answer object's JSON text for an output's JSON text C{data} (a model's answer
        or one chunk).

        @raise JSONProblem: C{data} is not strict JSON (C{what} it is, for the message).
        """
        text = data if data[:1] == b'"' and data[-1:] == b'"' else data.strip()
        if text[:1] == b'"':  # a string (a word, a token): put in as it is, unread
            return self._text + text + b"}"
        value = read_json(text, what, finite=True)
        return json.dumps(self.document(value, text.decode("utf-8"))).encode()

    def answer(self, data: bytes, model_id: str) -> bytes:
        """L{encode} for a model's whole answer: one that is not strict JSON is a 502."""
        try:
            return self.encode(data, f"the answer of model {model_id!r}")
        except JSONProblem as e:
            raise errors.BadGateway(str(e), model=model_id) from None


class GenerateFraming(Framing):
    """
    generate_stream's Server-Sent Events: C{data: <answer object>} per chunk (and for a
    final output), nothing at the end, C{data: {"error": "..."}} for an error. A chunk
    that is not strict JSON (a model type that does not check its chunks) is sent as
    C{text_output}, its text.

    @param answers: the L{Answers} of the model, or None to send each chunk as it is (a
        native model's server answers in the extension's shape itself; its
        C{{"error": "..."}} event is not a chunk but the stream's error, which
        L{aibackend.httpmodel} raises with its words, so that it is written as the
        error event above and the stream is logged as failed).
    """

    def __init__(self, answers: Answers | None):
        super().__init__("generate", CONTENT_TYPE, (b"data: ", b"\n\n"), (b"", b""), (b"data: ", b"\n\n"))
        self.answers = answers

    def chunk(self, data: bytes) -> bytes:
        answers = self.answers
        if answers is not None:
            try:
                data = answers.encode(data)
            except JSONProblem:
                text = data.decode("utf-8", "replace")
                data = json.dumps({**answers.head, "text_output": text}).encode()
        return super().chunk(data)

    def end(self, output: bytes | None) -> bytes:
        if output is None:
            return b""
        return self.chunk(output)
