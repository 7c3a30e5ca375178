"""
Framing a model's output into lines: L{LineBuffer} on its own, then L{ModelProcess}
fed awkwardly split chunks over a StringTransport, reporting to a recording pool.
"""

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from aibackend.supervisor import OVERSIZE, STDERR_LINE_BYTES, LineBuffer, ModelProcess


def feed_all(buffer, chunks):
    out = []
    for chunk in chunks:
        out.extend(buffer.feed(chunk))
        assert len(buffer.pending()) <= buffer.limit
    return out


def byte_by_byte(data: bytes):
    return [data[i : i + 1] for i in range(len(data))]


# --- LineBuffer ----------------------------------------------------------------


def test_lines_fed_byte_by_byte_come_out_whole():
    data = b'{"a": 1}\n{"b": [1, 2]}\n\nlast\n'

    lines = feed_all(LineBuffer(1024), byte_by_byte(data))

    assert lines == [b'{"a": 1}', b'{"b": [1, 2]}', b"", b"last"]


def test_many_lines_in_one_chunk():
    data = b"".join(b'{"n": %d}\n' % n for n in range(500))

    lines = LineBuffer(1024).feed(data)

    assert lines == [b'{"n": %d}' % n for n in range(500)]


def test_an_unfinished_line_waits_for_its_end():
    buffer = LineBuffer(1024)

    assert buffer.feed(b'{"a": 1}\n{"b"') == [b'{"a": 1}']
    assert buffer.pending() == b'{"b"'
    assert buffer.feed(b": 2") == []
    assert buffer.feed(b"}\n") == [b'{"b": 2}']
    assert buffer.pending() == b""


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 64])
def test_crlf_line_ends_are_removed_however_split(split):
    data = b'{"a": 1}\r\n{"b": 2}\r\nplain\n'
    chunks = [data[i : i + split] for i in range(0, len(data), split)]

    lines = feed_all(LineBuffer(1024), chunks)

    assert lines == [b'{"a": 1}', b'{"b": 2}', b"plain"]


def test_a_line_of_exactly_the_limit_is_kept():
    assert LineBuffer(8).feed(b"12345678\n") == [b"12345678"]


def test_an_oversize_line_is_reported_once_and_framing_resumes():
    buffer = LineBuffer(64)
    chunks = [b'{"before": 1}\n', b"x" * 50, *([b"y" * 100] * 20), b"z" * 10 + b'\n{"after": 2}\n']

    lines = feed_all(buffer, chunks)

    assert lines == [b'{"before": 1}', OVERSIZE, b'{"after": 2}']
    assert buffer.pending() == b""


def test_an_oversize_line_fed_byte_by_byte_never_fills_the_buffer():
    buffer = LineBuffer(16)
    out = []
    for byte in byte_by_byte(b"a" * 1000 + b"\nok\n"):
        out.extend(buffer.feed(byte))
        assert len(buffer.pending()) <= 16

    assert out == [OVERSIZE, b"ok"]


def test_an_oversize_line_inside_one_big_chunk():
    big = b"q" * 10_000

    lines = LineBuffer(64).feed(b"one\n" + big + b"\ntwo\n" + big + b"\nthree\n")

    assert lines == [b"one", OVERSIZE, b"two", OVERSIZE, b"three"]


def test_an_unfinished_oversize_line_is_not_held():
    buffer = LineBuffer(64)

    assert buffer.feed(b"w" * 10_000) == [OVERSIZE]
    assert buffer.pending() == b""
    assert buffer.feed(b"w" * 10_000) == []
    assert buffer.pending() == b""
    assert buffer.feed(b"\nnext\n") == [b"next"]


def test_truncate_mode_gives_the_head_of_a_long_line_once():
    buffer = LineBuffer(10, truncate=True)
    chunks = [b"0123", b"456789abcdef", b"ghij" * 100, b"\nshort\n"]

    lines = feed_all(buffer, chunks)

    assert lines == [b"0123456789", b"short"]


def test_truncate_mode_byte_by_byte():
    buffer = LineBuffer(4, truncate=True)

    lines = feed_all(buffer, byte_by_byte(b"abcdefgh\r\nij\r\n"))

    assert lines == [b"abcd", b"ij"]


# --- ModelProcess ------------------------------------------------------------------


class RecordingPool:
    """What a ModelProcess tells its pool, in order."""

    def __init__(self):
        self.clock = Clock()
        self.events = []

    def on_spawned(self, process):
        self.events.append(("spawned", process.pid))

    def on_line(self, process, line):
        self.events.append(("line", line))

    def on_oversize(self, process):
        self.events.append(("oversize",))

    def on_read(self, process):
        self.events.append(("read",))

    def on_stdout_closed(self, process):
        self.events.append(("stdout closed",))

    def on_stderr(self, process, line):
        self.events.append(("stderr", line))

    def on_exited(self, process, reason):
        self.events.append(("exited",))


class ProcessTransport(StringTransport):
    pid = 4242


def without_reads(events):
    return [event for event in events if event != ("read",)]


def connected(max_line_bytes=1024):
    pool = RecordingPool()
    process = ModelProcess(pool, 0, max_line_bytes)
    process.makeConnection(ProcessTransport())
    return pool, process


def test_the_process_tells_its_pool_it_started_with_its_pid():
    pool, process = connected()

    assert process.pid == 4242
    assert pool.events == [("spawned", 4242)]


def test_stdout_lines_split_awkwardly_reach_the_pool_whole_and_blank_lines_are_skipped():
    pool, process = connected()
    data = b'{"id": "a", "output": 1}\r\n\n   \n{"id": "b",' + b' "output": "two"}\n{"ready": true}\n'

    for byte in byte_by_byte(data):
        process.outReceived(byte)

    assert without_reads(pool.events[1:]) == [
        ("line", b'{"id": "a", "output": 1}'),
        ("line", b'{"id": "b", "output": "two"}'),
        ("line", b'{"ready": true}'),
    ]


def test_stdout_output_moves_last_output_forward():
    pool, process = connected()
    pool.clock.advance(5)

    process.outReceived(b"partial")

    assert process.last_output == 5


def test_an_oversize_stdout_line_is_reported_once_and_the_next_line_still_arrives():
    pool, process = connected(max_line_bytes=64)

    process.outReceived(b'{"a": 1}\n' + b"x" * 100)
    for _ in range(100):
        process.outReceived(b"y" * 1000)
        assert len(process._stdout.pending()) <= 64
    process.outReceived(b'\n{"b": 2}\n')

    assert without_reads(pool.events[1:]) == [("line", b'{"a": 1}'), ("oversize",), ("line", b'{"b": 2}')]


def test_the_pool_hears_of_the_end_of_each_read_after_all_its_lines():
    """What SubprocessModel relies on for raw: the rest of a read is seen before an answer is given."""
    pool, process = connected()

    process.outReceived(b'{"a": 1}\n{"b": 2}\n{"c"')
    process.outReceived(b": 3}\n")

    assert pool.events[1:] == [
        ("line", b'{"a": 1}'), ("line", b'{"b": 2}'), ("read",), ("line", b'{"c": 3}'), ("read",),
    ]
    assert not process.partial_line()


def test_an_unfinished_line_at_the_end_of_a_read_is_known():
    pool, process = connected()

    process.outReceived(b'{"a": 1}\nchatter, to be contin')

    assert process.partial_line()
    process.outReceived(b"ued\n")
    assert not process.partial_line()


def test_stdout_closing_is_told_to_the_pool():
    pool, process = connected()

    process.childConnectionLost(1)

    assert pool.events[1:] == [("stdout closed",)]
    assert process.stdout_closed


def test_stderr_lines_are_truncated_not_refused():
    pool, process = connected(max_line_bytes=64)
    long_line = b"e" * (STDERR_LINE_BYTES * 3)

    process.errReceived(b"warn: one\n" + long_line[:5000])
    process.errReceived(long_line[5000:] + b"\r\nwarn: two\n")

    assert pool.events[1:] == [
        ("stderr", b"warn: one"),
        ("stderr", b"e" * STDERR_LINE_BYTES),
        ("stderr", b"warn: two"),
    ]
    assert process._stderr.pending() == b""


def test_stdout_after_the_process_has_exited_is_ignored():
    pool, process = connected()
    process.state = "exited"

    process.outReceived(b'{"id": "late", "output": 1}\n')

    assert pool.events[1:] == []


# --- pausing a process's stdout (a slow stream's reader) ------------------------------


def test_stdout_is_paused_while_any_holder_holds_it_and_resumed_when_none_does():
    pool, process = connected()
    transport = process.transport
    first, second = object(), object()

    process.pause_stdout(first)
    assert transport.producerState == "paused"
    process.pause_stdout(second)
    process.resume_stdout(first)
    assert transport.producerState == "paused"
    process.resume_stdout(first)  # again: no effect
    process.resume_stdout(second)
    assert transport.producerState == "producing"


# --- gathering chunks and a stream's result -------------------------------------------


def test_gathered_strings_are_joined_and_anything_else_is_an_array():
    from aibackend.lines import Gathered

    strings = Gathered()
    for text in ("Hel", "lo"):
        strings.add(text, json.dumps(text).encode())
    assert strings.answer() == b'"Hello"'

    mixed = Gathered()
    mixed.add("a", b'"a"')
    mixed.add({"b": 1}, b'{"b":  1}')
    assert mixed.answer() == b'["a",{"b":  1}]'
    assert mixed.size == len(mixed.answer())
    assert Gathered().answer() == b"[]"


def test_a_chunk_is_taken_as_the_model_wrote_it():
    from aibackend.lines import output_text

    line = b'{"id": "r#1", "chunk": {"big": 123456789012345678901234567890}}'
    assert output_text(json.loads(line), line, "chunk") == b'{"big": 123456789012345678901234567890}'
    other = b'{"chunk": [1,2], "id": "r#1"}'
    assert output_text(json.loads(other), other, "chunk") == b"[1, 2]"


def test_a_stream_result_is_the_output_none_or_the_models_error():
    from aibackend.errors import ApiError
    from aibackend.interfaces import ModelAnswer
    from aibackend.lines import stream_result

    assert stream_result(ModelAnswer(status=200, body=b"[1]")) == b"[1]"
    assert stream_result(ModelAnswer(status=200, body=None)) is None
    body = json.dumps({"error": {"type": "model_error", "message": "no", "model": "m", "request_id": "r"}})
    with pytest.raises(ApiError) as raised:
        stream_result(ModelAnswer(status=429, body=body.encode()))
    assert (raised.value.status, raised.value.type, raised.value.message) == (429, "model_error", "no")
