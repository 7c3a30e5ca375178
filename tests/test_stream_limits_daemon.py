"""
A stream's limits on the real daemon (issue 14): C{first_chunk_timeout}, C{stream_idle_timeout},
keepalives, and a slow reader of a fast model (the daemon's memory stays bounded: its
model is paused, or its stream cut past C{max_stream_buffer_bytes}). One daemon for the
module, serving tests/models/streamer.py (a jsonl model that logs each cancel it gets)
under several ids, each with the settings its test needs; clients on raw sockets.
"""

import json
import sys
import time

import pytest

from aibackend.testing import STREAMER, Daemon, Streamed, config_text, sse_blocks, wait_until, write

MIB = 1 << 20


def streamer(model_id: str, **keys) -> dict:
    return {"id": model_id, "type": "subprocess", "protocol": "jsonl", "command": [sys.executable, STREAMER],
            "timeout": 30, **keys}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stream-limits")
    text = config_text(
        streamer("first", first_chunk_timeout=1),
        streamer("idle", stream_idle_timeout=1),
        streamer("slow", keepalive_seconds=0.3),
        streamer("flood", max_inflight=2, max_stream_buffer_bytes=MIB),
    )
    daemon = Daemon(write(directory / "aibackend.toml", text), state=str(directory / "state"), cwd=str(directory))
    try:
        for model_id in ("first", "idle", "slow", "flood"):
            daemon.wait_state(model_id, "ready", timeout=15)
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def open_stream(daemon, model_id: str, body: dict, *, receive_buffer: int | None = None) -> Streamed:
    """One streamed request (SSE) of an id of its own, on a raw socket."""
    return Streamed(daemon.port, "POST", f"/post/predict?id={model_id}", body, timeout=10,
                    headers={"X-Request-Id": f"limits-{model_id}-{time.monotonic_ns()}", "Connection": "close"},
                    receive_buffer=receive_buffer)


def cancels(daemon, model_id: str) -> list[str]:
    return [entry["message"] for entry in daemon.events(model_id, "model") if entry["message"].startswith("cancel for")]


def requests(daemon, model_id: str, request_id: str) -> list[tuple]:
    """The request's entries in the model's log: (status, error)."""
    return [(entry["status"], entry.get("error")) for entry in daemon.events(model_id, "request")
            if entry["request_id"] == request_id]


def cancelled(daemon, model_id: str, request_id: str) -> bool:
    """Has the model logged the cancel of that request (its wire id is the request id, '#', a number)?"""
    return any(message.startswith(f"cancel for {request_id}#") for message in cancels(daemon, model_id))


@pytest.mark.timeout(30)
def test_no_first_chunk_within_first_chunk_timeout_is_a_504_and_the_model_is_sent_a_cancel(daemon):
    began = time.monotonic()
    reply = daemon.predict("first", {"op": "wait", "seconds": 20},
                           headers={"Accept": "text/event-stream", "X-Request-Id": "limits-first"})
    took = time.monotonic() - began

    error = reply.error(504, "gateway_timeout")
    assert error["message"] == "model 'first' sent no chunk within 1 s (first_chunk_timeout)"
    assert took < 15  # well before the model's own 20 s (and its 30 s timeout)
    wait_until(lambda: cancelled(daemon, "first", "limits-first"), 5, "the model to hear the cancel")
    assert requests(daemon, "first", "limits-first") == [(504, error["message"])]


@pytest.mark.timeout(30)
def test_a_gap_past_stream_idle_timeout_ends_the_stream_with_an_error_event_and_cancels_the_model(daemon):
    client = open_stream(daemon, "idle", {"op": "gap", "seconds": 20})
    try:
        body = client.read_all(timeout=15)
    finally:
        client.close()
    assert (client.version, client.status) == ("HTTP/1.1", 200)
    first, last = sse_blocks(body)
    assert first == b'data: "a"'
    assert last.startswith(b"event: error\ndata: ")
    document = json.loads(last.split(b"data: ", 1)[1])
    assert document["error"] == {"type": "gateway_timeout", "model": "idle", "request_id": client.request_id,
                                 "message": "model 'idle' sent no chunk for 1 s (stream_idle_timeout)"}
    wait_until(lambda: cancelled(daemon, "idle", client.request_id), 5, "the model to hear the cancel")
    assert requests(daemon, "idle", client.request_id) == [
        (504, "model 'idle' sent no chunk for 1 s (stream_idle_timeout)")
    ]


@pytest.mark.timeout(30)
def test_a_keepalive_comment_arrives_on_the_socket_while_the_model_is_slow(daemon):
    client = open_stream(daemon, "slow", {"op": "wait", "seconds": 1.5})
    try:
        body = client.read_all(timeout=15)
    finally:
        client.close()
    assert (client.version, client.status) == ("HTTP/1.1", 200)
    assert client.headers["content-type"].startswith("text/event-stream")
    events = sse_blocks(body)
    assert events[0] == b": keepalive"  # the status and headers went with it
    assert events[-2:] == [b'data: "late"', b'event: done\ndata: {"output": null}']
    assert set(events[:-2]) == {b": keepalive"} and len(events) >= 4
    # The first keepalive reached the client well before the model's chunk.
    keepalive_at = next(when for when, piece in client.arrivals if b": keepalive" in piece)
    chunk_at = next(when for when, piece in client.arrivals if b'"late"' in piece)
    assert chunk_at - keepalive_at > 0.5
    assert requests(daemon, "slow", client.request_id) == [(200, None)]


def progress(path) -> int:
    try:
        with open(path) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0


def settled(path, quiet: float = 0.5):
    """Wait until the model's progress stops moving: its writes are blocked."""
    last = [-1, time.monotonic()]

    def still():
        now, value = time.monotonic(), progress(path)
        if value != last[0]:
            last[:] = [value, now]
            return False
        return now - last[1] > quiet

    wait_until(still, 15, "the model's writes to stop")
    return last[0]


@pytest.mark.timeout(60)
def test_a_client_that_reads_nothing_pauses_a_fast_model_and_the_daemons_memory_stays_bounded(daemon, tmp_path):
    # 200 MB offered by the model to a client that reads none of it; the stream is the only
    # request of its process, so the process's stdout is no longer read.
    path = str(tmp_path / "progress")
    before = daemon.high_water_kb()
    client = open_stream(daemon, "flood", {"op": "flood", "size": 64 * 1024, "count": 3200, "progress": path},
                         receive_buffer=64 * 1024)
    try:
        held = settled(path)
        assert held < 32 * MIB  # paused: the model is blocked in its write, far from 200 MB
        assert daemon.high_water_kb() - before < 32 * 1024
    finally:
        client.close()  # the client leaves: the model is cancelled
    wait_until(lambda: cancelled(daemon, "flood", client.request_id), 10, "the model to hear the cancel")
    wait_until(lambda: requests(daemon, "flood", client.request_id), 5, "the request to be logged")
    assert requests(daemon, "flood", client.request_id) == [(499, "the client went away")]
    assert daemon.high_water_kb() - before < 32 * 1024


@pytest.mark.timeout(60)
def test_a_slow_reader_beside_another_request_of_its_process_is_cut_past_max_stream_buffer_bytes(daemon, tmp_path):
    # Another request in flight in the same process: the slow reader does not hold the
    # process up, so what waits for it grows until the relay cuts the stream.
    hold = Streamed(daemon.port, "POST", "/post/predict?id=flood", {"op": "hold", "seconds": 30}, framing=None,
                    headers={"X-Request-Id": "limits-hold"}, timeout=10)
    path = str(tmp_path / "progress")
    try:
        wait_until(lambda: any(entry["message"].startswith("holding limits-hold#")
                               for entry in daemon.events("flood", "model")),
                   10, "the held request to reach the model")
        before = daemon.high_water_kb()
        client = open_stream(daemon, "flood", {"op": "flood", "size": 64 * 1024, "count": 3200, "progress": path},
                             receive_buffer=64 * 1024)
        try:
            wait_until(lambda: requests(daemon, "flood", client.request_id), 20, "the stream to be cut")
            assert [status for status, _ in requests(daemon, "flood", client.request_id)] == [408]
            assert daemon.high_water_kb() - before < 32 * 1024
            assert progress(path) < 150 * MIB  # cut, not given all 200 MB
            client.read_all(timeout=20)  # the client reads at last: its chunks, then the error event
        finally:
            client.close()
        last = sse_blocks(client.body)[-1]
        document = json.loads(last.split(b"data: ", 1)[1])
        assert document["error"]["type"] == "slow_client"
        assert document["error"]["message"] == (
            f"the client read too slowly: more than {MIB} bytes of the stream waited to be sent "
            f"(max_stream_buffer_bytes)"
        )
        wait_until(lambda: cancelled(daemon, "flood", client.request_id), 10, "the model to hear the cancel")
        assert daemon.high_water_kb() - before < 32 * 1024
    finally:
        hold.close()


def test_the_stream_settings_given_are_in_the_models_status(daemon):
    specs = {model_id: daemon.status(model_id).json()["spec"] for model_id in ("first", "idle", "slow", "flood")}

    assert specs["first"]["first_chunk_timeout"] == 1.0
    assert specs["idle"]["stream_idle_timeout"] == 1.0
    assert specs["slow"]["keepalive_seconds"] == 0.3
    assert specs["flood"]["max_stream_buffer_bytes"] == MIB
    assert "keepalive_seconds" not in specs["first"]  # a default is in the reference, not repeated here
