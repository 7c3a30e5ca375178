"""
Streams under C{--processes 2} (issue 14, item 9): a worker's stand-in for a jsonl model the
primary runs (aibackend.processes.ForwardedModel) streams, by asking the primary's front
door for JSON lines; a client that leaves the worker cancels the model in the primary.
One real daemon (aibackend.testing.Multi) for the module.
"""

import json
import os
import sys
import tomllib

import pytest

from aibackend.testing import ROOT, Multi, Streamed, sse_events, toml_models, wait_until, write

WORKER_CASES = os.path.join(ROOT, "tests", "models", "worker_cases.py")
RAW_MODEL = os.path.join(ROOT, "examples", "raw_model.py")


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    directory = tmp_path_factory.mktemp("streaming-processes")
    config = write(directory / "aibackend.toml", toml_models(
        {"id": "gen", "type": "subprocess", "protocol": "jsonl", "timeout": 30, "max_inflight": 4,
         "command": [sys.executable, WORKER_CASES, "4"]},
        {"id": "adder", "type": "subprocess", "protocol": "raw", "command": [sys.executable, RAW_MODEL]},
    ))
    daemon = Multi(config, state=str(directory / "state"), processes=2, cwd=str(directory))
    try:
        daemon.worker_pid = next(iter(daemon.wait_workers(1)))
        wait_until(lambda: daemon.request_to(daemon.worker_pid, "POST", "/post/predict?id=gen", {"x": 1}).status
                   == 200, 20, "the worker to reach the model")
        yield daemon
    finally:
        daemon.stop()


def stream_at(daemon, pid: int, body: dict, headers: dict) -> Streamed:
    connection = daemon.connection_to(pid)
    return Streamed(daemon.port, "POST", "/post/predict?id=gen", body, framing=None, headers=headers,
                    sock=connection.sock)


def primary_log(daemon, request_id: str) -> list[dict]:
    reply = daemon.request_to(daemon.pid, "GET", "/get/getlogs?id=gen")
    assert reply.status == 200, reply
    return [entry for entry in reply.json()["entries"] if request_id in json.dumps(entry)]


@pytest.mark.parametrize("protocol, streams", [("jsonl", True), ("raw", False)])
def test_a_workers_stand_in_streams_as_the_primarys_model_does(clock, protocol, streams):
    from zope.interface.verify import verifyObject

    from aibackend.config import parse_config
    from aibackend.interfaces import IStreaming
    from aibackend.processes import ForwardedModel, PrimaryStates

    config = parse_config(tomllib.loads(toml_models({"id": "m", "type": "subprocess", "protocol": protocol,
                                                     "command": [sys.executable, RAW_MODEL]})))
    [spec] = config.models
    model = ForwardedModel(spec, 4321, "t" * 20, PrimaryStates(), reactor=clock)
    assert IStreaming.providedBy(model) is streams
    if streams:
        assert verifyObject(IStreaming, model)


@pytest.mark.timeout(60)
def test_a_worker_streams_a_model_the_primary_runs_chunk_by_chunk(multi):
    words = ["one", "two", "three"]
    client = stream_at(multi, multi.worker_pid, {"op": "stream", "words": words, "pause": 0.3},
                       {"Accept": "text/event-stream", "X-Request-Id": "through-the-worker"})
    try:
        client.read_until(b'"word": "one"')
        first = client.arrivals[0][0]
        body = client.read_all()
    finally:
        client.close()
    assert client.status == 200 and client.headers["content-type"] == "text/event-stream"
    found = sse_events(body)
    assert [json.loads(data)["word"] for name, data in found[:-1]] == words
    assert found[-1] == ("done", '{"output": null}')
    made_last = json.loads(found[-2][1])["at"]
    assert first < made_last - 0.3  # the first word was here well before the model made the last

    # The primary served it as a stream (200), for the same request id.
    assert [entry["status"] for entry in primary_log(multi, "through-the-worker") if entry["event"] == "request"] \
        == [200]
    # A plain request through the worker gets the words gathered.
    reply = multi.request_to(multi.worker_pid, "POST", "/post/predict?id=gen",
                             {"op": "stream", "words": words})
    assert reply.status == 200, reply
    assert [chunk["word"] for chunk in reply.json()] == words


@pytest.mark.timeout(60)
def test_a_client_that_leaves_the_worker_cancels_the_model_in_the_primary(multi):
    client = stream_at(multi, multi.worker_pid, {"op": "stream", "words": ["w"], "forever": True, "pause": 0.05},
                       {"Accept": "application/x-ndjson", "X-Request-Id": "leaves-the-worker"})
    try:
        client.read_until(b'{"chunk": {"word": "w"')
        assert client.headers["content-type"] == "application/x-ndjson"
    finally:
        client.close()

    def cancelled():
        entries = primary_log(multi, "leaves-the-worker")
        statuses = [entry.get("status") for entry in entries if entry["event"] == "request"]
        ran = any("finally ran for" in json.dumps(entry) for entry in entries)
        return statuses == [499] and ran

    wait_until(cancelled, 10, "the primary to log the request as 499 and the model's generator to be closed")


@pytest.mark.timeout(30)
def test_a_raw_model_cannot_stream_through_a_worker_either(multi):
    reply = multi.request_to(multi.worker_pid, "POST", "/post/predict?id=adder&stream=true", {"numbers": [1]})
    assert reply.error(400, "bad_request")["message"] == "model 'adder' cannot stream (protocol raw)"
