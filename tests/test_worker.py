"""
aibackend.worker run as a real child process (tests/models/worker_cases.py), fed request
lines on its stdin, its stdout read line by line with a deadline: the jsonl protocol as
a model written with the helper library speaks it.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

from aibackend.worker import BadInput, ModelError, chat, count_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(ROOT, "tests", "models", "worker_cases.py")
BATCH_CASES = os.path.join(ROOT, "tests", "models", "batch_cases.py")


def strict_json(line: bytes):
    """Parse as JSON proper: NaN and Infinity are not JSON."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


class Worker:
    """A worker_cases.py process: write requests, read its stdout as JSON lines."""

    def __init__(self, concurrency: int = 1, argv=None):
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, *(argv or [CASES, str(concurrency)])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self):
        for line in self.process.stderr:
            self.stderr += line

    def write(self, *messages) -> None:
        self.process.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
        self.process.stdin.flush()

    def predict(self, request_id, data) -> None:
        self.write({"id": request_id, "op": "predict", "input": data})

    def next_line(self, timeout: float = 5) -> bytes:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing on stdout within {timeout} s; stderr: {self.stderr[-2000:]!r}")
        assert line is not None, f"stdout closed; stderr: {self.stderr[-2000:]!r}"
        return line

    def next(self, timeout: float = 5):
        line = self.next_line(timeout)
        assert line.endswith(b"\n")
        return strict_json(line)

    def until(self, predicate, timeout: float = 5) -> tuple[list, dict]:
        """Read messages until one matches; @return: (the ones before, the match)."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return before, message
            before.append(message)

    def answer(self, request_id, timeout: float = 5) -> dict:
        _, message = self.until(lambda m: m.get("id") == request_id, timeout)
        return message

    def ready(self) -> "Worker":
        self.until(lambda m: m == {"ready": True})
        return self

    def nothing_more(self, wait: float) -> list:
        """Whatever arrives within C{wait} seconds."""
        got = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is not None:
                got.append(strict_json(line))
        return got

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                return self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(3)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(3)
        return self.process.returncode


@pytest.fixture
def start_worker():
    workers = []

    def start(concurrency: int = 1, argv=None) -> Worker:
        worker = Worker(concurrency, argv)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


def test_the_worker_says_ready_once_load_has_returned(start_worker):
    worker = start_worker()

    before, ready = worker.until(lambda m: "ready" in m)

    assert ready == {"ready": True}
    # print() inside load() already goes to the log, before the ready line.
    assert before == [{"log": "loading the model", "level": "info"}]
    worker.predict("q", {"op": "loaded"})
    assert worker.next() == {"id": "q", "output": {"loaded": True}}


def test_the_answer_carries_the_request_id(start_worker):
    worker = start_worker().ready()

    worker.predict("req-7f3a", {"x": [1, 2]})
    worker.write({"id": 42, "input": {"op omitted": True}})

    assert worker.next() == {"id": "req-7f3a", "output": {"echo": {"x": [1, 2]}}}
    assert worker.next() == {"id": 42, "output": {"echo": {"op omitted": True}}}


def test_bad_input_answers_400_and_logs_no_traceback(start_worker):
    worker = start_worker().ready()

    worker.predict("b", {"op": "bad"})
    worker.predict("t", {"op": "teapot"})

    assert worker.next() == {"id": "b", "error": {"message": 'send {"op": "..."}', "status": 400}}
    assert worker.next() == {"id": "t", "error": {"message": "short and stout", "status": 418}}


def test_an_exception_answers_500_and_its_traceback_goes_to_the_log(start_worker):
    worker = start_worker().ready()

    worker.predict("x", {"op": "boom"})

    before, answer = worker.until(lambda m: m.get("id") == "x")
    assert answer == {"id": "x", "error": {"message": "RuntimeError: boom", "status": 500}}
    (logged,) = before
    assert logged["level"] == "error"
    assert logged["log"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: boom" in logged["log"]
    assert "worker_cases.py" in logged["log"]


def test_print_inside_the_model_becomes_log_lines_and_never_corrupts_the_protocol(start_worker):
    worker = start_worker().ready()

    worker.predict("p", {"op": "print", "text": 'looks like {"id": "p", "output": 0}'})
    worker.predict("after", {"n": 1})

    before, answer = worker.until(lambda m: m.get("id") == "p")
    assert answer == {"id": "p", "output": {"printed": True}}
    assert before == [
        {"log": 'looks like {"id": "p", "output": 0}', "level": "info"},
        {"log": "a second line ends here", "level": "info"},
    ]
    assert worker.next() == {"id": "after", "output": {"echo": {"n": 1}}}
    # What is written on file descriptor 1 itself ends up on stderr, not in the protocol.
    assert worker.close() == 0
    assert b"written on fd 1" in worker.stderr


def test_concurrency_answers_out_of_order(start_worker):
    worker = start_worker(concurrency=2).ready()

    worker.predict("slow", {"op": "sleep", "seconds": 0.6})
    worker.predict("fast", {"op": "sleep", "seconds": 0})

    assert worker.next()["id"] == "fast"
    assert worker.next() == {"id": "slow", "output": {"slept": 0.6, "tag": None}}


def test_without_concurrency_requests_are_answered_in_order(start_worker):
    worker = start_worker().ready()

    worker.predict("slow", {"op": "sleep", "seconds": 0.3})
    worker.predict("fast", {"op": "sleep", "seconds": 0})

    assert [worker.next()["id"], worker.next()["id"]] == ["slow", "fast"]


def test_a_cancel_for_a_request_not_yet_started_drops_it(start_worker):
    worker = start_worker(concurrency=2).ready()

    worker.predict("a", {"op": "sleep", "seconds": 0.4})
    worker.predict("b", {"op": "sleep", "seconds": 0.4})
    worker.predict("c", {"op": "sleep", "seconds": 0})  # waits for a thread
    worker.write({"id": "c", "op": "cancel"})
    worker.predict("d", {"op": "sleep", "seconds": 0})

    answered = [worker.next()["id"] for _ in range(3)]

    assert sorted(answered) == ["a", "b", "d"]
    assert worker.nothing_more(0.2) == []


def test_a_cancel_drops_a_queued_request_without_concurrency_too(start_worker):
    worker = start_worker().ready()

    worker.predict("a", {"op": "sleep", "seconds": 0.3})
    worker.predict("b", {"op": "sleep", "seconds": 0})
    worker.write({"id": "b", "op": "cancel"})
    worker.predict("c", {"op": "sleep", "seconds": 0})

    assert [worker.next()["id"], worker.next()["id"]] == ["a", "c"]


def test_a_request_id_cancelled_while_running_can_be_used_again(start_worker):
    worker = start_worker(concurrency=2).ready()
    worker.predict("retry-me", {"op": "sleep", "seconds": 0.3})
    time.sleep(0.1)
    worker.write({"id": "retry-me", "op": "cancel"})  # too late: it is running
    assert worker.next()["id"] == "retry-me"

    worker.predict("retry-me", {"op": "sleep", "seconds": 0, "tag": "second try"})

    assert worker.answer("retry-me", timeout=2) == {"id": "retry-me", "output": {"slept": 0, "tag": "second try"}}


def test_output_that_is_not_json_answers_500(start_worker):
    worker = start_worker().ready()

    worker.predict("o", {"op": "object"})

    answer = worker.next()
    assert answer["id"] == "o"
    assert answer["error"]["status"] == 500
    assert "not JSON" in answer["error"]["message"]


def test_nan_in_the_output_never_reaches_the_protocol_as_invalid_json(start_worker):
    worker = start_worker().ready()

    worker.predict("n", {"op": "nan"})

    answer = worker.next()  # parses strictly
    assert answer["id"] == "n"


def test_numpy_values_answer_as_json_lists_and_numbers(start_worker):
    pytest.importorskip("numpy")
    worker = start_worker().ready()

    worker.predict("np", {"op": "numpy"})

    assert worker.next(timeout=10) == {"id": "np", "output": {"array": [0, 1, 2], "scalar": 0.5, "pair": [1, 2]}}


def test_lines_that_are_not_requests_are_logged_and_skipped(start_worker):
    worker = start_worker().ready()

    worker.process.stdin.write(b"this is not json\n\n[1, 2]\n")
    worker.write({"op": "predict", "input": "no id"}, {"id": "u", "op": "explode"})
    worker.predict("ok", {"fine": True})

    before, answer = worker.until(lambda m: m.get("id") == "ok")
    assert answer == {"id": "ok", "output": {"echo": {"fine": True}}}
    warnings = [m for m in before if "log" in m]
    assert [m["level"] for m in warnings] == ["warning"] * 3
    assert warnings[0]["log"].startswith("not a request: b'this is not json")
    assert {"id": "u", "error": {"message": "unknown op 'explode'", "status": 400}} in before


def test_the_worker_finishes_running_requests_and_exits_when_stdin_closes(start_worker):
    worker = start_worker(concurrency=2).ready()
    worker.predict("last", {"op": "sleep", "seconds": 0.3})

    worker.process.stdin.close()

    assert worker.next() == {"id": "last", "output": {"slept": 0.3, "tag": None}}
    assert worker.process.wait(5) == 0


def test_a_model_with_a_cancel_method_is_told_to_stop_work_in_progress(start_worker):
    worker = start_worker(2).ready()
    worker.predict("long", {"op": "interruptible", "seconds": 30})
    time.sleep(0.3)  # it is running
    started = time.monotonic()
    worker.write({"id": "long", "op": "cancel"})
    answer = worker.answer("long", timeout=10)
    assert answer["output"] == {"stopped": True, "id": "long"}
    assert time.monotonic() - started < 5


# --- generators stream ---------------------------------------------------------------


@pytest.mark.parametrize("op", ["stream", "astream"])
def test_a_generator_predict_streams_each_value_as_a_chunk_line_the_moment_it_is_yielded(start_worker, op):
    worker = start_worker().ready()
    worker.predict("g", {"op": op, "words": ["a", "b", "c"], "pause": 0.3})

    arrivals = []
    while True:
        message = worker.next()
        if message.get("id") != "g":
            continue
        arrivals.append((time.time(), message))
        if "chunk" not in message:
            break
    chunks = [m["chunk"] for _, m in arrivals[:-1]]
    assert [c["word"] for c in chunks] == ["a", "b", "c"]
    assert arrivals[-1][1] == {"id": "g", "done": True}
    # Each line was flushed as it was yielded: the first came long before the last was made.
    assert arrivals[0][0] < chunks[-1]["at"] - 0.4
    for (arrived, _), chunk in zip(arrivals, chunks):
        assert arrived - chunk["at"] < 0.25


def test_a_generator_that_returns_a_value_ends_with_it_as_the_output(start_worker):
    worker = start_worker().ready()
    worker.predict("g", {"op": "stream", "words": ["x"], "returns": {"total": 1}})
    before, end = worker.until(lambda m: m.get("id") == "g" and "chunk" not in m)
    assert [m["chunk"]["word"] for m in before if m.get("id") == "g"] == ["x"]
    assert end == {"id": "g", "output": {"total": 1}}


@pytest.mark.parametrize("op", ["stream", "astream"])
def test_an_exception_mid_stream_is_the_error_line_after_the_chunks(start_worker, op):
    worker = start_worker().ready()
    worker.predict("g", {"op": op, "words": ["a", "b", "c"], "boom_at": 2})
    before, end = worker.until(lambda m: m.get("id") == "g" and "chunk" not in m)
    assert [m["chunk"]["word"] for m in before if m.get("id") == "g"] == ["a", "b"]
    assert end["error"]["status"] == 500
    assert "boom mid-stream" in end["error"]["message"]


@pytest.mark.parametrize("op", ["stream", "astream"])
@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_cancel_closes_the_generator_and_its_finally_runs(start_worker, op, concurrency):
    worker = start_worker(concurrency).ready()
    worker.predict("g", {"op": op, "words": ["w"], "forever": True, "pause": 0.05})
    worker.until(lambda m: m.get("id") == "g" and "chunk" in m)
    worker.write({"id": "g", "op": "cancel"})
    worker.until(lambda m: m.get("log") == "finally ran for g")
    # Nothing more for it once closed (a chunk already on its way may still come first).
    later = worker.nothing_more(0.3)
    assert all(m.get("id") != "g" for m in later), later
    # The worker goes on serving.
    worker.predict("after", {"op": "echo"})
    assert worker.answer("after")["output"] == {"echo": {"op": "echo"}}


def test_streams_run_side_by_side_with_concurrency(start_worker):
    worker = start_worker(2).ready()
    worker.predict("one", {"op": "stream", "words": ["a", "b"], "pause": 0.3})
    worker.predict("two", {"op": "astream", "words": ["c", "d"], "pause": 0.3})
    seen = []
    ends = 0
    while ends < 2:
        message = worker.next()
        if "id" in message:
            seen.append(message["id"])
            ends += "chunk" not in message
    assert seen[:2] in (["one", "two"], ["two", "one"])  # both began before either ended


# The chat helper (aibackend.worker.chat): a pure function of the request, tested in-process.


def drained(stream):
    """A chat predict's chunks and the output it returns."""
    chunks = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as stop:
            return chunks, stop.value


def words_reply(text):
    """A reply yielding C{text}'s words (each with the space before it but the first), told what it got."""
    seen = {}

    def reply(messages, **params):
        seen.update(messages=messages, params=params)
        for i, word in enumerate(text.split()):
            yield word if i == 0 else " " + word

    return reply, seen


def test_chat_streams_each_piece_and_ends_with_the_whole_text_finish_reason_and_usage():
    reply, seen = words_reply("Hello there, friend.")
    chunks, output = drained(chat(reply)({"messages": [{"role": "user", "content": "Hi, you!"}], "seed": 7}))
    assert chunks == ["Hello", " there,", " friend."]
    assert output == {
        "content": "Hello there, friend.", "finish_reason": "stop",
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }
    assert seen == {"messages": [{"role": "user", "content": "Hi, you!"}], "params": {"seed": 7}}


def test_chat_passes_every_parameter_but_its_own_and_counts_every_message():
    reply, seen = words_reply("ok")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]}]
    _, output = drained(chat(reply)({"messages": messages, "max_tokens": 5, "stop": None, "temperature": 0.5,
                                     "top_p": 1, "n": 1, "user": "u"}))
    assert seen["params"] == {"temperature": 0.5, "top_p": 1, "n": 1, "user": "u"}
    assert seen["messages"][1] == {"role": "user", "content": "one two"}  # text parts joined
    assert output["usage"]["prompt_tokens"] == 5  # "Be brief." is 3, "one two" 2


def test_a_completion_prompt_reaches_the_reply_as_one_user_message():
    reply, seen = words_reply("ok")
    for prompt in ("the daemon", ["the daemon"]):
        drained(chat(reply)({"prompt": prompt}))
        assert seen["messages"] == [{"role": "user", "content": "the daemon"}]


@pytest.mark.parametrize("limits, taken", [
    ({"max_tokens": 2}, 2), ({"max_completion_tokens": 3}, 3), ({"max_tokens": 4, "max_completion_tokens": 2}, 2),
])
def test_max_tokens_cuts_the_reply_with_finish_reason_length_and_closes_it(limits, taken):
    closed = []

    def reply(messages):
        try:
            while True:
                yield "w "
        finally:
            closed.append(True)

    chunks, output = drained(chat(reply)(dict({"messages": [{"role": "user", "content": "go"}]}, **limits)))
    assert chunks == ["w "] * taken
    assert output["finish_reason"] == "length" and output["content"] == "w " * taken
    assert output["usage"]["completion_tokens"] == taken
    assert closed == [True]  # the reply's finally ran as the stream ended


def test_the_helpers_limits_bound_a_reply_and_a_request():
    def endless(messages):
        while True:
            yield "w"

    predict = chat(max_tokens=10, default_tokens=4)(endless)
    assert drained(predict({"prompt": "x"}))[0] == ["w"] * 4
    assert drained(predict({"prompt": "x", "max_tokens": 10}))[0] == ["w"] * 10
    with pytest.raises(BadInput, match="^max_tokens must be a whole number from 1 to 10$"):
        predict({"prompt": "x", "max_tokens": 11})
    assert drained(chat(max_tokens=3)(endless)({"prompt": "x"}))[1]["finish_reason"] == "length"


@pytest.mark.parametrize("stop, chunks, content", [
    ("friend", ["Hello", " there,", " "], "Hello there, "),                     # cut inside a piece
    (["xyz", " there"], ["Hello"], "Hello"),                                    # the first of several
    (", fr", ["Hello", " there"], "Hello there"),                              # across two pieces
    ("there, no", ["Hello", " ", "there, friend."], "Hello there, friend."),   # held back, then let go
    ("Hello", [], ""),                                                          # at once: nothing
])
def test_a_stop_sequence_ends_the_text_before_it_even_across_pieces(stop, chunks, content):
    reply, _ = words_reply("Hello there, friend.")
    got, output = drained(chat(reply)({"prompt": "x", "stop": stop}))
    assert got == chunks and "".join(got) == content
    assert output["content"] == content and output["finish_reason"] == "stop"


def test_a_reply_may_return_a_string_or_a_list_of_pieces():
    assert drained(chat(lambda messages: "all at once")({"prompt": "x"})) == (
        ["all at once"], {"content": "all at once", "finish_reason": "stop",
                          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    assert drained(chat(lambda messages: ["a", "b"])({"prompt": "x"}))[0] == ["a", "b"]


@pytest.mark.parametrize("data, message", [
    (5, 'send {"messages": [{"role": "user", "content": "..."}]} or {"prompt": "..."}'),
    ({"text": "x"}, 'send {"messages": [{"role": "user", "content": "..."}]} or {"prompt": "..."}'),
    ({"messages": [], }, "messages must be a list of at least one message"),
    ({"messages": "hi"}, "messages must be a list of at least one message"),
    ({"messages": [{"content": "hi"}]}, "messages[0] must be an object with a role and a content"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content: this model takes text parts only"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "b"}, "give messages or a prompt, not both"),
    ({"prompt": ["a", "b"]}, "prompt must be a string (one prompt per request)"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens must be a whole number 1 or more"),
    ({"prompt": "a", "max_completion_tokens": True}, "max_completion_tokens must be a whole number 1 or more"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop must be a string or a list of up to 4 non-empty strings"),
    ({"prompt": "a", "stop": [""]}, "stop must be a string or a list of up to 4 non-empty strings"),
    ({"prompt": "a", "stop": 5}, "stop must be a string or a list of up to 4 non-empty strings"),
])
def test_a_bad_chat_request_is_bad_input_before_the_reply_is_asked(data, message):
    asked = []
    with pytest.raises(BadInput) as raised:
        chat(lambda messages, **params: asked.append(messages) or "x")(data)
    assert str(raised.value) == message and raised.value.status == 400
    assert asked == []


def test_a_piece_that_is_not_a_string_is_a_model_error():
    with pytest.raises(ModelError, match="^a chat reply yields strings, not int$") as raised:
        drained(chat(lambda messages: [1])({"prompt": "x"}))
    assert raised.value.status == 500


def test_count_tokens_counts_words_and_punctuation_marks():
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("") == 0
    assert count_tokens("don't stop") == 4  # don ' t stop


# --- batches (op "batch", sent to a model with [models.batching]) --------------------------


def batch(batch_id, *inputs):
    return {"id": batch_id, "op": "batch", "batch": [{"id": f"{batch_id}.{i}", "input": data}
                                                     for i, data in enumerate(inputs)]}


def answers(worker, batch_message) -> dict:
    ids = {item["id"] for item in batch_message["batch"]}
    got = {}
    while ids - set(got):
        message = worker.next()
        if "id" in message:
            got[message["id"]] = message
    return got


def test_a_batch_goes_to_predict_batch_in_one_call_each_output_to_its_own_request(start_worker):
    worker = start_worker(argv=[BATCH_CASES]).ready()
    message = batch("b1", {"x": 1}, {"x": 2}, {"x": 3})

    worker.write(message)
    got = answers(worker, message)

    assert [got[f"b1.{i}"]["output"]["y"] for i in range(3)] == [2, 4, 6]
    assert {got[f"b1.{i}"]["output"]["batch"] for i in range(3)} == {3}


def test_an_exception_in_an_outputs_place_is_that_requests_error(start_worker):
    worker = start_worker(argv=[BATCH_CASES]).ready()
    message = batch("b2", {"x": 1}, {"op": "bad"}, {"x": 5})

    worker.write(message)
    got = answers(worker, message)

    assert got["b2.1"] == {"id": "b2.1", "error": {"message": "x must be a number", "status": 400}}
    assert (got["b2.0"]["output"]["y"], got["b2.2"]["output"]["y"]) == (2, 10)


@pytest.mark.parametrize("op, words", [("boom", "RuntimeError: the whole batch broke"),
                                       ("short", "predict_batch returned 1 outputs for 2 inputs")])
def test_a_batch_that_fails_as_a_whole_is_one_error_under_the_batch_id(start_worker, op, words):
    worker = start_worker(argv=[BATCH_CASES]).ready()

    worker.write(batch("b3", {"x": 1}, {"op": op}))

    _, failed = worker.until(lambda m: m.get("id") == "b3")
    assert failed == {"id": "b3", "error": {"message": words, "status": 500}}
    assert all(m.get("id") not in ("b3.0", "b3.1") for m in worker.nothing_more(0.3))


def test_a_request_cancelled_before_its_batch_starts_is_left_out_of_it(start_worker):
    worker = start_worker(argv=[BATCH_CASES]).ready()
    worker.write(batch("b4", {"x": 1, "sleep": 0.3}))
    worker.write(batch("b5", {"x": 2}, {"x": 3}), {"id": "b5.0", "op": "cancel"})

    got = answers(worker, {"batch": [{"id": "b4.0"}, {"id": "b5.1"}]})

    assert got["b5.1"]["output"] == {"y": 6, "batch": 1, "pid": got["b5.1"]["output"]["pid"]}
    assert all(m.get("id") != "b5.0" for m in worker.nothing_more(0.3))


def test_without_predict_batch_predict_is_called_for_each_item(start_worker):
    worker = start_worker(argv=[BATCH_CASES, "single"]).ready()
    message = batch("b6", {"x": 1}, {"op": "bad"}, {"x": 4})

    worker.write(message)
    got = answers(worker, message)

    assert (got["b6.0"]["output"]["y"], got["b6.2"]["output"]["y"]) == (2, 8)
    assert {got["b6.0"]["output"]["batch"], got["b6.2"]["output"]["batch"]} == {1}
    assert got["b6.1"]["error"] == {"message": "x must be a number", "status": 400}


def test_a_malformed_batch_is_answered_400_under_its_id(start_worker):
    worker = start_worker(argv=[BATCH_CASES]).ready()

    worker.write({"id": "b7", "op": "batch", "batch": [{"input": 1}]})

    assert worker.answer("b7") == {"id": "b7", "error": {"message": "a batch is a list of {id, input}",
                                                          "status": 400}}
