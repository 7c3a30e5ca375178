"""
Streamed answers end to end (issue 14): the real C{twistd aibackend} on a free loopback
port, real jsonl model processes (C{tests/models/streamer.py}, written by hand, and
C{tests/models/stream_worker.py}, an aibackend.worker generator), and a client reading
each stream on a real socket as it comes (L{aibackend.testing.Streamed}).

One daemon serves the module (its models are ready before the first test); each test
uses request ids and tags of its own, so none disturbs another. Client keys and runtime
models need a daemon configured otherwise: that test starts its own.

Times are compared only for order (a chunk arrived before the next was made), with the
model's own timestamps (time.time(), the same clock as the client's); the delay between
a client leaving and the model seeing it is printed (run with C{-s} to see it) and held
to a generous bound: the machine running the tests is loaded.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest

from aibackend.testing import (
    ADMIN_TOKEN, STREAM_WORKER, STREAMER, Daemon, Streamed, blocked_writing, config_text, toml_models, wait_until,
)

pytestmark = pytest.mark.timeout(30)

KEY = "client-key-0123456789abcdef"
CANCEL_BOUND = 2.0  # seconds: the target is 0.1 s; the bound is loose for a loaded machine
_ids = itertools.count()


def streamer(model_id: str, **keys) -> dict:
    return {"id": model_id, "type": "subprocess", "protocol": "jsonl", "command": ["python", STREAMER],
            "timeout": 30, **keys}


MODELS = (
    streamer("streamer", workers=2, max_inflight=64),  # many streams at once
    streamer("single"),  # one request at a time: a request left in it would hold up the next
    {"id": "gen", "type": "subprocess", "protocol": "jsonl", "command": ["python", STREAM_WORKER], "timeout": 30},
    streamer("crasher", restart_backoff=0.1),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    where = tmp_path_factory.mktemp("streaming-daemon")
    config = where / "aibackend.toml"
    config.write_text(toml_models(*MODELS))
    daemon = Daemon(str(config), state=str(where / "state"), cwd=str(where))
    try:
        for model in MODELS:
            daemon.wait_state(model["id"], "ready", timeout=20)
        yield daemon
    finally:
        daemon.stop()
    daemon.assert_no_bug_logged()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def post(daemon, model_id: str, ask, framing="sse", request_id=None, headers=None, **options) -> Streamed:
    headers = dict(headers or {})
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return Streamed(daemon.port, "POST", f"/post/predict?id={model_id}", ask, framing=framing, headers=headers,
                    **options)


def requests_logged(daemon, model_id: str, request_id: str) -> list[dict]:
    return [e for e in daemon.events(model_id, "request") if e.get("request_id") == request_id]


def logged_once(daemon, model_id: str, request_id: str) -> dict:
    wait_until(lambda: requests_logged(daemon, model_id, request_id), 5, f"request {request_id} in the log")
    (entry,) = requests_logged(daemon, model_id, request_id)
    return entry


def assert_streaming_headers(stream: Streamed, framing: str) -> None:
    assert stream.status == 200
    headers = stream.headers
    assert headers["content-type"] == {"sse": "text/event-stream", "ndjson": "application/x-ndjson"}[framing]
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert headers["x-request-id"]


# --- 1. chunks reach the client before the model has finished -----------------------------


@pytest.mark.parametrize("method, framing", [("POST", "sse"), ("POST", "ndjson"), ("GET", "sse"), ("GET", "ndjson")])
def test_each_chunk_reaches_the_client_before_the_model_makes_the_next(daemon, method, framing):
    tag = unique(f"{method}-{framing}")
    ask = {"op": "ticks", "n": 3, "pause": 0.25, "tag": tag, "end": "output"}
    if method == "POST":
        stream = post(daemon, "streamer", ask, framing)
    elif framing == "sse":  # GET asks with ?stream=true, not Accept
        stream = Streamed(daemon.port, "GET", "/get/predict?id=streamer&stream=true&" + urlencode(ask), framing=None)
    else:
        stream = Streamed(daemon.port, "GET", "/get/predict?id=streamer&" + urlencode(ask), framing="ndjson")
    assert_streaming_headers(stream, framing)

    events = stream.read_events()

    chunks, last = events[:-1], events[-1]
    assert [(e.kind, e.data["tag"], e.data["i"]) for e in chunks] == [("chunk", tag, i) for i in range(3)]
    assert (last.kind, last.data) == ("done", {"tag": tag, "chunks": 3})
    # Each chunk was read by the client before the model made the next one (0.25 s later).
    for chunk, following in zip(chunks, chunks[1:]):
        assert chunk.at < following.data["at"], f"chunk {chunk.data['i']} came only after the next was made"
    lags = [round((e.at - e.data["at"]) * 1000, 1) for e in chunks]
    print(f"\n{method} {framing}: ms from the model's write to the client's read, per chunk: {lags}")


def test_a_worker_generators_chunks_reach_the_client_before_it_makes_the_next(daemon):
    words = ["one", "two", "three"]
    stream = post(daemon, "gen", {"words": words, "pause": 0.25, "chunks": "stamped"}, "ndjson")
    assert_streaming_headers(stream, "ndjson")

    events = stream.read_events()

    chunks = events[:-1]
    assert [(e.kind, e.data["word"]) for e in chunks] == [("chunk", word) for word in words]
    assert (events[-1].kind, events[-1].data) == ("done", None)
    for chunk, following in zip(chunks, chunks[1:]):
        assert chunk.at < following.data["at"], f"{chunk.data['word']!r} came only after the next was made"


# --- 2. 100 concurrent streams ------------------------------------------------------------------


def test_a_hundred_concurrent_streams_each_get_exactly_their_own_chunks_in_order(daemon):
    count, n = 100, 4
    run = unique("many")
    everyone = threading.Barrier(count, timeout=20)  # the requests go together

    def one(k):
        framing = "sse" if k % 2 else "ndjson"
        everyone.wait()
        stream = post(daemon, "streamer", {"op": "ticks", "n": n, "pause": 0.25, "tag": f"{run}-{k}", "end": "output"},
                      framing, request_id=f"{run}-{k}", timeout=30)
        assert_streaming_headers(stream, framing)
        return stream.read_events()

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))

    for k, events in enumerate(results):
        tag = f"{run}-{k}"
        assert [(e.kind, e.data["tag"], e.data["i"]) for e in events[:-1]] == [("chunk", tag, i) for i in range(n)]
        assert (events[-1].kind, events[-1].data) == ("done", {"tag": tag, "chunks": n})
    # They were streaming at the same time, on both processes.
    spans = [(events[0].data["at"], events[-2].data["at"]) for events in results]
    together = max(sum(1 for start, end in spans if start <= moment <= end) for moment, _ in spans)
    print(f"\nstreams in flight together at most: {together} of {count}")
    assert together >= count // 2
    assert len({e.data["pid"] for events in results for e in events[:-1]}) == 2
    # Nothing is left in flight, and each stream was logged once, as 200.
    status = daemon.status("streamer").json()
    assert (status["in_flight"], status["queued"]) == (0, 0)
    logged = [e for e in daemon.events("streamer", "request") if e["request_id"].startswith(f"{run}-")]
    assert sorted(e["request_id"] for e in logged) == sorted(f"{run}-{k}" for k in range(count))
    assert {e["status"] for e in logged} == {200}


# --- 3. a client that leaves ends the model's work -----------------------------------------------


LEAVING = {
    "jsonl-script": ("single", {"op": "ticks", "end": "never", "pause": 0.05}, {"op": "pid"}, None),
    "worker-generator": ("gen", {"words": ["w"], "forever": True, "pause": 0.05}, {"words": ["a", "b"]},
                         ("GeneratorExit",)),
    "worker-async-generator": ("gen", {"words": ["w"], "forever": True, "pause": 0.05, "async": True},
                               {"words": ["a", "b"]}, ("CancelledError", "GeneratorExit")),
}


@pytest.mark.parametrize("case", list(LEAVING))
def test_a_client_that_leaves_mid_stream_ends_the_models_work(daemon, tmp_path, case):
    model_id, ask, after, how = LEAVING[case]
    mark = tmp_path / "cancelled"
    request_id = unique("leaves")
    counted = {"model": model_id, "operation": "predict", "status_class": "4xx"}
    before = daemon.metric("aibackend_requests_total", **counted) or 0

    stream = post(daemon, model_id, {**ask, "mark": str(mark)}, request_id=request_id)
    events = stream.events()
    for _ in range(3):
        assert next(events).kind == "chunk"
    left = stream.leave()

    wait_until(mark.exists, 5, "the model to see the cancel")
    seen = json.loads(mark.read_text().splitlines()[-1])
    delay = seen["at"] - left
    print(f"\n{case}: the model saw the client leave {delay * 1000:.1f} ms after it did")
    assert delay < CANCEL_BOUND
    if how is not None:
        assert seen["how"] in how
    else:
        assert seen["id"].startswith(request_id + "#")

    entry = logged_once(daemon, model_id, request_id)
    assert (entry["status"], entry["error"]) == (499, "the client went away")
    assert daemon.metric("aibackend_requests_total", **counted) == before + 1
    # The request never finished, yet it has its access event: 499, its chunks, how it ended.
    line = daemon.access_line(request_id)
    assert f" POST /post/predict 499 " in line, line
    assert "chunks=3 " in line and line.endswith("stream_end=cancelled"), line
    # No process is left busy: the next request (the model takes one at a time) is answered
    # now, not after the 30 s timeout of a request left in the process.
    reply = daemon.predict(model_id, after, timeout=10)
    assert reply.status == 200, reply
    status = daemon.status(model_id).json()
    assert (status["in_flight"], status["queued"]) == (0, 0)
    # Nothing came for the request after its cancel (it came before that next answer, if at all).
    late = [e for e in daemon.logs(model_id) if request_id in e.get("line", "")]
    assert late == [], "the model wrote for the request after the cancel"


def test_a_client_that_leaves_before_the_first_chunk_ends_the_models_work(daemon, tmp_path):
    for method in ("POST", "GET"):
        mark = tmp_path / f"cancelled-{method}"
        request_id = unique(f"early-{method}")
        ask = {"op": "ticks", "first": 20, "end": "never", "mark": str(mark)}
        headers = {"X-Request-Id": request_id}
        if method == "POST":
            stream = post(daemon, "single", ask, headers=headers)
        else:
            stream = Streamed(daemon.port, "GET", "/get/predict?id=single&" + urlencode(ask), headers=headers)
        wait_until(lambda: daemon.status("single").json()["in_flight"] == 1, 5, "the request to reach the model")

        left = stream.leave()  # nothing of the answer has come: not even its status

        wait_until(mark.exists, 5, "the model to see the cancel")
        delay = json.loads(mark.read_text())["at"] - left
        print(f"\n{method}, before the first chunk: the model saw the client leave {delay * 1000:.1f} ms after it did")
        assert delay < CANCEL_BOUND
        assert logged_once(daemon, "single", request_id)["status"] == 499
        assert f" {method} /{method.lower()}/predict 499 0 bytes " in daemon.access_line(request_id)
        assert daemon.predict("single", {"op": "pid"}, timeout=10).status == 200


def test_a_plain_request_whose_client_leaves_has_its_access_event_with_499(daemon, tmp_path):
    request_id = unique("plain-leaves")
    ask = {"op": "ticks", "first": 20, "end": "never", "mark": str(tmp_path / "cancelled")}
    stream = post(daemon, "single", ask, framing=None, request_id=request_id)
    wait_until(lambda: daemon.status("single").json()["in_flight"] == 1, 5, "the request to reach the model")
    stream.leave()
    assert logged_once(daemon, "single", request_id)["status"] == 499
    line = daemon.access_line(request_id)
    assert " POST /post/predict 499 0 bytes " in line and "stream_end" not in line, line


def test_a_client_that_leaves_while_its_stream_waits_for_the_model_frees_its_place(daemon):
    busy = post(daemon, "single", {"op": "ticks", "n": 4, "pause": 0.2, "end": "output", "tag": "busy"})
    events = busy.events()
    assert next(events).kind == "chunk"
    request_id = unique("queued")
    waiting = post(daemon, "single", {"op": "ticks", "n": 1}, request_id=request_id)
    wait_until(lambda: daemon.status("single").json()["queued"] == 1, 5, "the second stream to wait")

    waiting.leave()

    wait_until(lambda: daemon.status("single").json()["queued"] == 0, 5, "the queue to be empty")
    assert logged_once(daemon, "single", request_id)["status"] == 499
    rest = list(events)  # the stream in the process goes on, untouched
    busy.close()
    assert [e.data["i"] for e in rest[:-1]] == [1, 2, 3]
    assert (rest[-1].kind, rest[-1].data) == ("done", {"tag": "busy", "chunks": 4})


PAUSED = {
    "jsonl-script": ("single", {"op": "ticks", "end": "never", "pause": 0, "pad": 2000}, {"op": "pid"}),
    "worker-generator": ("gen", {"words": ["w" * 2000], "forever": True, "pause": 0}, {"words": ["a"]}),
}


@pytest.mark.parametrize("case", list(PAUSED))
def test_a_slow_reader_that_leaves_a_paused_stream_ends_the_models_work(daemon, tmp_path, case):
    model_id, ask, after = PAUSED[case]
    (pid,) = daemon.pids(model_id)
    mark = tmp_path / "cancelled"
    request_id = unique("paused")
    stream = post(daemon, model_id, {**ask, "mark": str(mark)}, request_id=request_id, receive_buffer=4096)
    assert next(stream.events()).kind == "chunk"
    # The client reads no more: the daemon stops reading the model, which then blocks writing.
    wait_until(lambda: blocked_writing(pid), 10, "the model to be paused (blocked writing its stdout)")

    left = stream.leave()

    wait_until(mark.exists, 5, "the model to see the cancel")
    delay = json.loads(mark.read_text().splitlines()[-1])["at"] - left
    print(f"\n{case}, paused: the model saw the client leave {delay * 1000:.1f} ms after it did")
    assert delay < CANCEL_BOUND
    assert logged_once(daemon, model_id, request_id)["status"] == 499
    reply = daemon.predict(model_id, after, timeout=10)
    assert reply.status == 200, reply
    late = [e for e in daemon.logs(model_id) if request_id in e.get("line", "")]
    print(f"{case}, paused: {len(late)} lines the model had written for the request were read after it left")


# --- 4. an error in the middle ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
def test_an_error_line_after_chunks_ends_the_stream_with_the_error_document(daemon, framing):
    request_id = unique(f"fails-{framing}")
    stream = post(daemon, "streamer", {"op": "ticks", "n": 2, "end": "error", "status": 422,
                                       "message": "ran out of words", "tag": request_id}, framing, request_id)
    assert_streaming_headers(stream, framing)  # the status went with the first chunk

    events = stream.read_events()

    assert [e.kind for e in events] == ["chunk", "chunk", "error"]
    assert events[-1].data == {"error": {"type": "model_error", "message": "ran out of words", "model": "streamer",
                                         "request_id": request_id}}
    entry = logged_once(daemon, "streamer", request_id)
    assert (entry["status"], entry["error"]) == (422, "ran out of words")


def test_a_worker_generator_that_raises_mid_stream_ends_it_with_the_error_event(daemon):
    request_id = unique("boom")
    stream = post(daemon, "gen", {"words": ["a", "b", "c"], "boom_at": 2}, request_id=request_id)
    assert_streaming_headers(stream, "sse")

    events = stream.read_events()

    assert [(e.kind, e.data) for e in events[:-1]] == [("chunk", "a"), ("chunk", " b")]
    assert events[-1].kind == "error"
    assert events[-1].data == {"error": {"type": "model_error", "message": "RuntimeError: boom mid-stream",
                                         "model": "gen", "request_id": request_id}}
    assert logged_once(daemon, "gen", request_id)["status"] == 500


@pytest.mark.parametrize("framing", ["sse", "ndjson"])
def test_an_error_before_the_first_chunk_is_answered_with_its_status(daemon, framing):
    request_id = unique(f"refused-{framing}")
    stream = post(daemon, "streamer", {"op": "ticks", "n": 0, "end": "error", "status": 422, "message": "no words"},
                  framing, request_id)
    try:
        assert stream.status == 422
        assert stream.headers["content-type"] == "application/json"
        assert json.loads(stream.rest()) == {"error": {"type": "model_error", "message": "no words",
                                                       "model": "streamer", "request_id": request_id}}
    finally:
        stream.close()
    assert logged_once(daemon, "streamer", request_id)["status"] == 422


def test_the_sse_error_event_is_on_the_wire_as_documented(daemon):
    request_id = unique("fails-raw")
    stream = post(daemon, "streamer", {"op": "ticks", "n": 1, "end": "error", "status": 503, "message": "no"},
                  "sse", request_id)
    try:
        body = stream.rest()
    finally:
        stream.close()
    document = {"error": {"type": "model_error", "message": "no", "model": "streamer", "request_id": request_id}}
    chunk, error, end = body.split(b"\n\n")
    assert chunk.startswith(b'data: {"tag": null, "i": 0, ')
    assert error == b"event: error\ndata: " + json.dumps(document).encode()
    assert end == b""


# --- 5. a model that crashes mid-stream -------------------------------------------------------------


def test_a_model_that_crashes_mid_stream_ends_it_with_an_error_event_and_is_restarted(daemon):
    request_id = unique("crash")
    stream = post(daemon, "crasher", {"op": "ticks", "n": 2, "end": "crash"}, request_id=request_id)
    assert_streaming_headers(stream, "sse")

    events = stream.read_events()

    assert [e.kind for e in events] == ["chunk", "chunk", "error"]
    error = events[-1].data["error"]
    assert (error["type"], error["model"], error["request_id"]) == ("bad_gateway", "crasher", request_id)
    assert "exited with status 3" in error["message"]
    assert logged_once(daemon, "crasher", request_id)["status"] == 502
    crashed = events[0].data["pid"]
    wait_until(lambda: daemon.ready_pids("crasher") - {crashed}, 10, "the process to be restarted")
    daemon.wait_state("crasher", "ready", timeout=10)

    again = post(daemon, "crasher", {"op": "ticks", "n": 2, "end": "output", "tag": "again"}).read_events()

    assert [(e.kind, e.data["i"]) for e in again[:-1]] == [("chunk", 0), ("chunk", 1)]
    assert (again[-1].kind, again[-1].data) == ("done", {"tag": "again", "chunks": 2})
    assert again[0].data["pid"] != crashed
    assert [e["error"] for e in daemon.events("crasher", "process exited")] == ["exited with status 3"]


# --- 6. client keys, and a model added at runtime ---------------------------------------------------


def test_streams_through_client_keys_and_from_a_model_added_at_runtime(start_daemon):
    daemon = start_daemon(
        config_text=config_text(streamer("keyed"), api_keys=[KEY], allowed_commands=[sys.executable]),
        admin_token=ADMIN_TOKEN,
    )
    keyed = {"Authorization": f"Bearer {KEY}"}
    ask = {"op": "ticks", "n": 2, "end": "output", "tag": "k"}

    def refused(model_id, headers=None):
        stream = post(daemon, model_id, ask, headers=headers)
        try:
            assert stream.status == 401  # before any byte of a stream
            assert stream.headers["content-type"] == "application/json"
            assert stream.headers["www-authenticate"].startswith("Bearer")
            assert json.loads(stream.rest())["error"]["type"] == "unauthorized"
        finally:
            stream.close()

    def streams(model_id, headers):
        stream = post(daemon, model_id, ask, headers=headers)
        assert_streaming_headers(stream, "sse")
        events = stream.read_events()
        assert [e.kind for e in events] == ["chunk", "chunk", "done"]
        assert events[-1].data == {"tag": "k", "chunks": 2}

    wait_until(lambda: daemon.request("GET", "/get/status?id=keyed", headers=keyed).json()["state"] == "ready",
               20, "the model to be ready")
    refused("keyed")
    refused("keyed", {"Authorization": "Bearer wrong-key-0123456789abcdef"})
    streams("keyed", keyed)

    table = {"id": "late", "type": "subprocess", "protocol": "jsonl", "command": [sys.executable, STREAMER]}
    daemon.add(table, headers=keyed).error(401, "unauthorized")  # a client key is no admin token
    added = daemon.add(table, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert added.status == 201, added
    wait_until(lambda: daemon.request("GET", "/get/status?id=late", headers=keyed).json()["state"] == "ready",
               20, "the runtime model to be ready")
    refused("late")
    streams("late", keyed)
    streams("late", {"Authorization": f"Bearer {ADMIN_TOKEN}"})  # the admin token is a client key too
    daemon.assert_no_bug_logged()


# --- 7. a plain request to a streaming model -----------------------------------------------------


def test_a_plain_request_to_a_streaming_worker_gets_the_chunks_gathered(daemon):
    words = ["the", "daemon", "answers"]

    joined = daemon.predict("gen", {"words": words})
    stamped = daemon.predict("gen", {"words": words, "chunks": "stamped"})
    by_get = daemon.request("GET", "/get/predict?id=gen&" + urlencode({"words": words}, doseq=True))
    asked_plain = daemon.request("POST", "/post/predict?id=gen&stream=false", {"words": words},
                                 {"Accept": "text/event-stream"})
    done = daemon.predict("streamer", {"op": "ticks", "n": 2, "tag": "plain"})
    output = daemon.predict("streamer", {"op": "ticks", "n": 2, "tag": "plain", "end": "output"})

    for reply in (joined, by_get, asked_plain):
        assert reply.status == 200, reply
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == "the daemon answers"  # strings: joined into one
    assert [chunk["word"] for chunk in stamped.json()] == words  # other chunks: an array of them
    assert [(chunk["tag"], chunk["i"]) for chunk in done.json()] == [("plain", 0), ("plain", 1)]
    assert output.json() == {"tag": "plain", "chunks": 2}  # an output: the answer, as it is
