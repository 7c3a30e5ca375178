"""
Write a subprocess model in a few lines: C{aibackend.worker} speaks the daemon's C{jsonl}
protocol for you. It needs nothing but the standard library.

    from aibackend.worker import BadInput, serve

    def predict(data):
        if "text" not in data:
            raise BadInput('send {"text": "..."}')   # the client gets 400
        return {"length": len(data["text"])}

    serve(predict)

A model is a function of the request's JSON, or an object with C{predict(input)} and,
if it has one, C{load()} (called once before the daemon is told the model is ready).

What C{serve} does:
  - reads C{{"id", "op", "input"}} lines on stdin and answers C{{"id", "output"}} or
    C{{"id", "error": {"message", "status"}}} on the real stdout;
  - prints C{{"ready": true}} once C{load()} has returned;
  - C{BadInput} (or any exception with a C{status} attribute) answers that status;
    any other exception answers 500 and its traceback goes to the model's log;
  - C{concurrency=N} runs up to N predictions at once in threads (for models that
    release the GIL or wait on I/O); the daemon's C{max_inflight} should match;
  - C{print()} and anything else written to stdout is sent to the model's log instead of
    corrupting the protocol; so is L{log};
  - a C{cancel} for a request that has not started yet drops it; a model object with a
    C{cancel(request_id)} method is also told, so it can stop work in progress (its
    C{predict} learns its own request's id from L{current_request_id});
  - a C{predict} written as a generator (C{yield}) or an async generator streams: each
    value it yields is written (and flushed) at once as a C{{"id", "chunk"}} line, and
    its end as C{{"id", "done": true}}, or C{{"id", "output": v}} if it ends with
    C{return v}; an exception on the way is the error line. A cancel closes the
    generator (a plain one before its next step, an async one where it awaits), so its
    C{finally:} runs. Clients that do not ask for a stream get the chunks gathered
    (README "How models answer").

        def predict(data):
            for word in data["text"].split():
                yield word + " "

  - a batch (C{{"id": <batch id>, "op": "batch", "batch": [{"id", "input"}, ...]}}, sent
    to a model with C{[models.batching]}) goes to the model's C{predict_batch(inputs)} if it
    has one: a list of outputs, one per input, in order, where an exception instance in
    an output's place answers that request with its error (C{BadInput("...")}: 400); an
    exception raised fails the whole batch. Without C{predict_batch}, C{predict} is called
    for each input, as if each came alone:

        def predict_batch(inputs):
            return model.predict([row["features"] for row in inputs]).tolist()

  - L{chat} turns a function that yields a chat reply's text pieces into such a predict,
    for models served through the OpenAI-compatible API (README "Chat models"):

        @chat
        def predict(messages, **params):
            yield from my_model(messages[-1]["content"])
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import sys
import threading
import traceback
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor

__all__ = ["BadInput", "ModelError", "chat", "count_tokens", "current_request_id", "log", "serve", "tensor"]


class ModelError(Exception):
    """An error answered to the client with C{status} (500 unless said)."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadInput(ModelError):
    """The request's input is not what the model takes: the client gets 400."""

    status = 400


_channel = None
_lock = threading.Lock()


def _line(message: dict) -> bytes:
    return (json.dumps(message, default=_to_json, allow_nan=False) + "\n").encode("utf-8")


def _send(message: dict) -> None:
    line = _line(message)
    with _lock:
        _channel.write(line)
        _channel.flush()


def _to_json(value):
    """numpy arrays and scalars, sets, tuples and UTF-8 bytes answer as JSON lists, numbers and strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# The Open Inference Protocol's datatypes as numpy's (BYTES are Python strings).
NUMPY_TYPES = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}


def tensor(data, name: str, datatype: str | None = None):
    """
    One input of a request as a tensor: a numpy array where numpy is installed, the
    nested lists as sent otherwise. With the Open Inference Protocol each input tensor
    arrives as the key of its name (see the README), so this reads v2 inputs and plain
    JSON alike.

        pixels = tensor(data, "pixels", "FP32")     # numpy.float32 array

    @param datatype: a v2 datatype (C{"FP32"}, C{"INT64"}, C{"BYTES"}, ...) or a numpy
        dtype; None keeps what numpy makes of the values.
    @raise BadInput: the input is missing or is not a tensor of that type (400).

    Answers may hold numpy arrays and scalars as they are: C{serve} sends them as lists
    and numbers.
    """
    if not isinstance(data, dict) or name not in data:
        raise BadInput(f"the request has no input {name!r}")
    value = data[name]
    try:
        import numpy  # here: numpy is optional; without it the value is given as it is
    except ImportError:
        return value
    dtype = NUMPY_TYPES.get(datatype, datatype) if isinstance(datatype, str) else datatype
    try:
        array = numpy.asarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadInput(f"input {name!r} is not a {datatype or 'numeric'} tensor: {e}") from None
    if array.dtype == object and dtype != "object":
        raise BadInput(f"input {name!r} is not a regular tensor (its rows differ in length or type)")
    return array


_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """
    An estimate of C{text}'s tokens that needs no tokenizer: its words and punctuation
    marks (C{"Hello, world!"} is 4). What L{chat} counts a prompt in.
    """
    return len(_TOKEN.findall(text))


def _message_text(message, index: int) -> str:
    """A chat message's content as text (a string, or a list of text parts)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadInput(f"messages[{index}] must be an object with a role and a content")
    content = message.get("content")
    if content is None:
        return ""  # an assistant message that only called tools
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadInput(f"messages[{index}].content: this model takes text parts only")
            parts.append(part["text"])
        return "".join(parts)
    raise BadInput(f"messages[{index}].content must be a string or a list of text parts")


def _chat_request(data, cap, default):
    """The messages, the piece limit, the stop sequences and the other parameters of a chat request."""
    if not isinstance(data, dict):
        raise BadInput('send {"messages": [{"role": "user", "content": "..."}]} or {"prompt": "..."}')
    params = dict(data)
    if "messages" in params and "prompt" in params:
        raise BadInput("give messages or a prompt, not both")
    if "messages" in params:
        messages = params.pop("messages")
        if not isinstance(messages, list) or not messages:
            raise BadInput("messages must be a list of at least one message")
        texts = [_message_text(message, i) for i, message in enumerate(messages)]
        messages = [dict(message, content=text) for message, text in zip(messages, texts)]
    elif "prompt" in params:
        prompt = params.pop("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadInput("prompt must be a string (one prompt per request)")
        messages = [{"role": "user", "content": prompt}]
    else:
        raise BadInput('send {"messages": [{"role": "user", "content": "..."}]} or {"prompt": "..."}')
    limit = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = params.pop(name, None)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (cap is not None and value > cap):
            most = f"from 1 to {cap}" if cap is not None else "1 or more"
            raise BadInput(f"{name} must be a whole number {most}")
        limit = value if limit is None else min(limit, value)
    if limit is None:
        limit = default
    stop = params.pop("stop", None)
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise BadInput("stop must be a string or a list of up to 4 non-empty strings")
    return messages, limit, stop, params


def _held_back(text: str, stop: list) -> int:
    """How many characters at the end of C{text} could begin a stop sequence."""
    longest = 0
    for sequence in stop:
        for size in range(min(len(sequence) - 1, len(text)), longest, -1):
            if text.endswith(sequence[:size]):
                longest = size
                break
    return longest


def _chat_stream(reply, limit, stop, prompt_tokens):
    """A reply's pieces as chunks, cut at the piece limit or a stop sequence; returns the output."""
    taken, finish, held, sent = 0, "stop", "", []
    try:
        for piece in iter((reply,)) if isinstance(reply, str) else reply:
            if not isinstance(piece, str):
                raise ModelError(f"a chat reply yields strings, not {type(piece).__name__}")
            taken += 1
            text = held + piece
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                held = ""
                if cut:
                    sent.append(text[:cut])
                    yield text[:cut]
                break
            keep = _held_back(text, stop) if stop else 0
            held = text[len(text) - keep:] if keep else ""
            if len(text) > keep:
                sent.append(text[:len(text) - keep])
                yield sent[-1]
            if limit is not None and taken >= limit:
                finish = "length"
                break
        if held:
            sent.append(held)
            yield held
    finally:
        if isinstance(reply, Generator):
            reply.close()  # the reply's finally runs now, not when it is collected
    return {
        "content": "".join(sent),
        "finish_reason": finish,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": taken,
                  "total_tokens": prompt_tokens + taken},
    }


def chat(reply=None, *, max_tokens: int | None = None, default_tokens: int | None = None):
    """
    A chat model's predict from a function of its messages that yields the reply's text
    in pieces (words, tokens: each piece counts as one completion token). Use it as a
    decorator, with or without C{max_tokens}, or call it: C{serve(chat(reply))}.

        @chat(max_tokens=200)
        def predict(messages, temperature=1.0, **others):
            for word in answer(messages[-1]["content"], temperature):
                yield word

    The request is what the OpenAI-compatible API sends an adapted model (README "Chat
    models"): C{{"messages": [{"role", "content"}, ...]}} (content a string or a list of
    text parts, given to C{reply} as one string), or C{{"prompt": "..."}} (a completion),
    given to C{reply} as one user message; with the parameters as the client gave them.
    The helper takes C{max_tokens} / C{max_completion_tokens} (the most pieces: the reply
    is closed there, C{finish_reason} C{"length"}) and C{stop} (up to 4 strings: the text
    ends before the first one, C{"stop"}; a piece that may begin one is held back until
    it is known not to); every other parameter (temperature, seed, top_p, n, user...) is
    passed to C{reply} as a keyword argument: take the ones the model honours and accept
    the others with C{**others}.

    Streamed, each piece is a chunk (a string); the output at the end, and the whole
    answer of a plain request, is C{{"content": text, "finish_reason": "stop" | "length",
    "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}}, prompt tokens
    counted by L{count_tokens} over every message's content.

    @param max_tokens: the most pieces of a reply, and the limit a request may ask for
        (more is a 400); None: as many as the reply gives, or as the request says.
    @param default_tokens: the most pieces when the request does not say (None:
        C{max_tokens}).
    """
    if reply is None:
        return lambda function: chat(function, max_tokens=max_tokens, default_tokens=default_tokens)
    default = default_tokens if default_tokens is not None else max_tokens

    def predict(data):
        messages, limit, stop, params = _chat_request(data, max_tokens, default)
        prompt_tokens = sum(count_tokens(message["content"]) for message in messages)
        return _chat_stream(reply(messages, **params), limit, stop, prompt_tokens)

    return predict


def log(message, level: str = "info") -> None:
    """Write an entry to the model's log in the daemon (C{getlogs})."""
    if _channel is None:
        sys.stderr.write(f"{level}: {message}\n")
        return
    _send({"log": message, "level": level})


class _LogWriter:
    """Stands in for sys.stdout: each printed line becomes a log entry."""

    def __init__(self):
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            if line:
                log(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _take_stdout():
    """
    Keep the real stdout for the protocol and point file descriptor 1 and sys.stdout
    elsewhere, so stray prints (even from C code) cannot break it.
    """
    global _channel
    channel_fd = os.dup(1)
    os.dup2(2, 1)
    _channel = os.fdopen(channel_fd, "wb", buffering=0)
    sys.stdout = _LogWriter()


def _error(request_id, e: BaseException) -> None:
    """The model's failure is the client's answer, not our crash."""
    status = getattr(e, "status", 500)
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 500
    if status >= 500:
        log(traceback.format_exc(), "error")
    message = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
    _send({"id": request_id, "error": {"message": message, "status": status}})


def _answer(request_id, predict, data, requests) -> None:
    try:
        output = predict(data)
    except Exception as e:
        _error(request_id, e)
        return
    if inspect.isgenerator(output):
        _stream(request_id, output, requests)
        return
    if inspect.isasyncgen(output):
        _stream_async(request_id, output, requests)
        return
    try:
        _send({"id": request_id, "output": output})
    except (TypeError, ValueError) as e:
        _send({"id": request_id, "error": {"message": f"the model's output is not JSON: {e}", "status": 500}})


def _failed(request_id, e: BaseException) -> None:
    """C{_error} for an exception a model gave back rather than raised (an item of predict_batch)."""
    status = getattr(e, "status", 500)
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 500
    if status >= 500:
        log("".join(traceback.format_exception(e)), "error")
    message = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
    _send({"id": request_id, "error": {"message": message, "status": status}})


def _batch_outputs(predict_batch, inputs) -> list:
    """C{predict_batch(inputs)} checked: a list of as many outputs as inputs."""
    outputs = predict_batch(inputs)
    if inspect.isgenerator(outputs) or inspect.isasyncgen(outputs):
        raise ModelError("predict_batch must return a list of outputs, not a generator")
    outputs = list(outputs)
    if len(outputs) != len(inputs):
        raise ModelError(f"predict_batch returned {len(outputs)} outputs for {len(inputs)} inputs")
    return outputs


def _answer_batch(batch_id, predict_batch, ids, inputs, requests) -> None:
    """
    One call of C{predict_batch} for a batch: each output answers its own request (an
    exception instance in its place is that request's error); an exception raised, or a
    wrong number of outputs, fails the whole batch (one error line under the batch's id).
    """
    try:
        outputs = _batch_outputs(predict_batch, inputs)
    except Exception as e:
        _error(batch_id, e)
        return
    lines = []  # written in one go: a batch's answers cost one write, not one each
    for request_id, output in zip(ids, outputs):
        if requests.cancelled(request_id):
            continue  # the daemon forgot it while the batch was predicted
        if isinstance(output, BaseException):
            _failed(request_id, output)
            continue
        try:
            lines.append(_line({"id": request_id, "output": output}))
        except (TypeError, ValueError) as e:
            lines.append(_line({"id": request_id,
                                "error": {"message": f"the model's output is not JSON: {e}", "status": 500}}))
    if lines:
        with _lock:
            _channel.write(b"".join(lines))
            _channel.flush()


def _chunk(request_id, value) -> bool:
    """Write one chunk line (flushed); False, and the error line, if it is not JSON."""
    try:
        _send({"id": request_id, "chunk": value})
    except (TypeError, ValueError) as e:
        _send({"id": request_id, "error": {"message": f"the model's chunk is not JSON: {e}", "status": 500}})
        return False
    return True


def _stream(request_id, generator, requests) -> None:
    """
    A generator's values, each a chunk line as soon as it is yielded; then C{done}, or
    the C{output} it returns. A cancel closes it before its next step (its C{finally}
    runs); a step under way is not interrupted, and the value it makes is not sent.
    """
    try:
        while True:
            if requests.cancelled(request_id):
                return
            try:
                value = next(generator)
            except StopIteration as stop:
                if stop.value is None:
                    _send({"id": request_id, "done": True})
                else:
                    try:
                        _send({"id": request_id, "output": stop.value})
                    except (TypeError, ValueError) as e:
                        _send({"id": request_id,
                               "error": {"message": f"the model's output is not JSON: {e}", "status": 500}})
                return
            except Exception as e:
                _error(request_id, e)
                return
            if requests.cancelled(request_id):
                return  # cancelled while the value was made: the daemon forgot the request
            if not _chunk(request_id, value):
                return
    finally:
        generator.close()


def _stream_async(request_id, generator, requests) -> None:
    """An async generator's values, as L{_stream}; a cancel cancels it where it awaits."""
    import asyncio  # here: most models never stream asynchronously

    async def drain():
        try:
            async for value in generator:
                if requests.cancelled(request_id):
                    return  # cancelled while the value was made: the daemon forgot the request
                if not _chunk(request_id, value):
                    return
            _send({"id": request_id, "done": True})
        except asyncio.CancelledError:
            pass  # cancelled by the daemon: it wants no answer
        except Exception as e:
            _error(request_id, e)
        finally:
            await generator.aclose()

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(drain())
        with requests.running(request_id, lambda: loop.call_soon_threadsafe(task.cancel)):
            loop.run_until_complete(task)
    finally:
        loop.close()


class _Requests:
    """The requests of one C{serve}: which were cancelled, and how to stop the ones streaming."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cancelled: set = set()
        self._stops: dict = {}  # request id -> how to stop its stream now (async generators)

    def cancel(self, request_id) -> None:
        with self._lock:
            if len(self._cancelled) > 10000:  # ids of requests that had already finished
                self._cancelled.clear()
            self._cancelled.add(request_id)
            stop = self._stops.get(request_id)
        if stop is not None:
            stop()

    def cancelled(self, request_id) -> bool:
        return request_id in self._cancelled

    def take(self, request_id) -> bool:
        """A request about to start: False (and forgotten) if it was cancelled."""
        with self._lock:
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return False
            return True

    def again(self, request_id) -> None:
        """An id may come again (a client retrying with its own id)."""
        with self._lock:
            self._cancelled.discard(request_id)

    @contextlib.contextmanager
    def running(self, request_id, stop):
        with self._lock:
            self._stops[request_id] = stop
            cancelled = request_id in self._cancelled
        if cancelled:
            stop()
        try:
            yield
        finally:
            with self._lock:
                if self._stops.get(request_id) is stop:
                    del self._stops[request_id]


def _predictor(model):
    if isinstance(model, type):
        model = model()
    load = getattr(model, "load", None)
    if callable(load):
        load()
    cancel = getattr(model, "cancel", None)
    cancel = cancel if callable(cancel) else None
    predict_batch = getattr(model, "predict_batch", None)
    predict_batch = predict_batch if callable(predict_batch) else None
    predict = getattr(model, "predict", None)
    if callable(predict):
        return predict, cancel, predict_batch
    if callable(model):
        return model, cancel, predict_batch
    if predict_batch is not None:
        return None, cancel, predict_batch
    raise TypeError("a model is a function, or an object with a predict() or predict_batch() method")


_current = threading.local()


def current_request_id():
    """The id of the request the calling thread is predicting (for a model's C{cancel})."""
    return getattr(_current, "request_id", None)


def serve(model, *, concurrency: int = 1) -> None:
    """
    Serve C{model} on stdin/stdout in the daemon's C{jsonl} protocol until stdin closes.

    @param model: a function of the input, or an object (or class) with C{predict(input)}
        and optionally C{load()}.
    @param concurrency: how many predictions may run at once (threads).
    """
    _take_stdout()
    predict, cancel, predict_batch = _predictor(model)
    if predict is None:
        def predict(data):  # a model of batches alone: one request is a batch of one
            (output,) = _batch_outputs(predict_batch, [data])
            if isinstance(output, BaseException):
                raise output
            return output
    _send({"ready": True})
    requests = _Requests()
    # Predictions run in threads even one at a time, so that stdin is read on meanwhile
    # and a cancel for a request still waiting arrives before it starts.
    executor = ThreadPoolExecutor(max_workers=max(1, concurrency))

    def run(request_id, data):
        if not requests.take(request_id):
            return
        _current.request_id = request_id
        try:
            _answer(request_id, predict, data, requests)
        finally:
            _current.request_id = None

    def run_batch(batch_id, items):
        ids, inputs = [], []
        for item in items:
            if requests.take(item["id"]):
                ids.append(item["id"])
                inputs.append(item.get("input"))
        if not ids:
            return
        _current.request_id = None
        _answer_batch(batch_id, predict_batch, ids, inputs, requests)

    stdin = sys.stdin.buffer
    for raw in stdin:
        if not raw.strip():
            continue
        try:
            message = json.loads(raw)
            request_id = message["id"]
            op = message.get("op", "predict")
        except (ValueError, KeyError, TypeError, AttributeError):
            log(f"not a request: {raw[:200]!r}", "warning")
            continue
        if op == "cancel":
            requests.cancel(request_id)
            if cancel is not None:
                # The model can stop work in progress: tell it (it matches the id with
                # current_request_id() in the thread that is predicting).
                try:
                    cancel(request_id)
                except Exception:
                    log(traceback.format_exc(), "error")
            continue
        if op == "batch":
            items = message.get("batch")
            if not isinstance(items, list) or not all(isinstance(item, dict) and "id" in item for item in items):
                _send({"id": request_id, "error": {"message": "a batch is a list of {id, input}", "status": 400}})
                continue
            for item in items:
                requests.again(item["id"])
            if predict_batch is not None:
                executor.submit(run_batch, request_id, items)
            else:  # predict per item, as if each came alone
                for item in items:
                    executor.submit(run, item["id"], item.get("input"))
            continue
        if op != "predict":
            _send({"id": request_id, "error": {"message": f"unknown op {op!r}", "status": 400}})
            continue
        requests.again(request_id)
        executor.submit(run, request_id, message.get("input"))
    executor.shutdown(wait=True)
