"""
Fallback chains through the real daemon (C{twistd aibackend} on a free loopback port): a
chain whose first model (a real HTTP model server) is killed mid-test keeps answering from
the second, which the answer names; a stream whose first model is unreachable streams from
its fallback; an admin's mock failure, with and without the token; /v1 through a chain with
the official C{openai} client. One daemon serves the module:

  - C{first}: an HTTP model on examples/http_model_server.py (a process, killed in one test),
    falling back to C{second}, a L{ModelServer} of the test's;
  - C{chat}: tests/models/oa_chat.py (a jsonl model that streams, OpenAI-shaped);
  - C{gone}: an HTTP model on a port where nothing listens, falling back to C{chat}.
"""

from __future__ import annotations

import json
import os
import sys

import openai
import pytest

from aibackend.testing import (
    ROOT, Daemon, ExampleModelServer, ModelServer, Multi, Streamed, free_port, toml_models, wait_until,
)

TOKEN = "fallbacks-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CHAT_MODEL = os.path.join("tests", "models", "oa_chat.py")  # relative: the daemon runs in ROOT
HELLO = [{"role": "user", "content": "hello there"}]

pytestmark = pytest.mark.timeout(60)


class Named(ModelServer):
    """A model server whose every answer is C{{"from": name}}."""

    def __init__(self, name: str):
        self.name = name
        super().__init__()

    def answer(self, path, headers, body):
        return 200, {}, json.dumps({"from": self.name}).encode()


@pytest.fixture(scope="module")
def servers():
    first, second = ExampleModelServer(), Named("second")
    yield first, second
    first.stop()
    second.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, servers):
    first, second = servers
    tmp = tmp_path_factory.mktemp("fallbacks-daemon")
    nowhere = f"http://127.0.0.1:{free_port()}/predict"
    config = (
        f'[server]\nstate_dir = {json.dumps(str(tmp / "state"))}\ndrain_timeout = 2\n'
        f"allowed_commands = {json.dumps([os.path.realpath(sys.executable)])}\n\n"
        + toml_models(
            {"id": "first", "type": "http", "url": f"http://127.0.0.1:{first.port}/echo", "timeout": 10,
             "fallbacks": ["second"]},
            {"id": "second", "type": "http", "url": second.url, "timeout": 10},
            {"id": "chat", "type": "subprocess", "command": ["python", CHAT_MODEL], "protocol": "jsonl",
             "max_inflight": 8, "timeout": 20},
            {"id": "gone", "type": "http", "url": nowhere, "timeout": 10, "fallbacks": ["missing", "chat"]},
        )
    )
    path = tmp / "aibackend.toml"
    path.write_text(config)
    started = Daemon(str(path), cwd=ROOT, admin_token=TOKEN)
    try:
        wait_until(lambda: started.status("chat").json().get("state") == "ready", 20, "model chat to be ready")
        yield started
    finally:
        started.stop()


def test_a_chain_whose_first_model_is_killed_answers_from_the_second(daemon, servers):
    first, second = servers
    reply = daemon.predict("first", {"x": 1}, headers={"X-Request-Id": "fb-before"})
    assert reply.status == 200 and reply.json()["echo"] == {"x": 1}
    assert reply.headers["x-aibackend-model"] == "first"
    assert "served_by=first chain=first:200" in daemon.access_line("fb-before")
    first.process.popen.kill()  # the model server is gone: its connection reset, then refused
    first.process.popen.wait(5)
    for n in range(3):
        reply = daemon.predict("first", {"x": 1}, headers={"X-Request-Id": f"fb-after-{n}"})
        assert reply.status == 200 and reply.json() == {"from": "second"}, reply
        assert reply.headers["x-aibackend-model"] == "second"
    assert second.received[-1][2] == b'{"x": 1}'  # the same bytes
    line = daemon.access_line("fb-after-0")
    assert " 200 " in line and "model=first" in line and "served_by=second chain=first:502>second:200" in line
    assert daemon.metric("aibackend_fallbacks_total", model="first", fallback="second", reason="bad_gateway") == 3
    statuses = [entry["status"] for entry in daemon.logs("first") if entry["event"] == "request"]
    assert statuses[-3:] == [502, 502, 502]  # each attempt in its own model's log
    daemon.assert_no_bug_logged()


def test_a_stream_whose_first_model_is_unreachable_streams_from_its_fallback(daemon):
    stream = Streamed(daemon.port, "POST", "/post/predict?id=gone",
                      {"messages": [{"role": "user", "content": "one two"}]}, headers={"X-Request-Id": "fb-stream"})
    try:
        assert stream.status == 200
        assert stream.headers["x-aibackend-model"] == "chat"
        events = stream.read_events()
    finally:
        stream.close()
    assert [event.kind for event in events] == ["chunk"] * 4 + ["done"]
    line = daemon.access_line("fb-stream")
    assert "served_by=chat chain=gone:502>chat:200" in line and "stream_end=done" in line
    assert "fallback missing of model gone is skipped: there is no such model now" in daemon.output


def test_a_mock_failure_takes_the_admin_token(daemon):
    reply = daemon.predict("second", {}, headers={"X-Aibackend-Mock-Failure": "second"})
    assert reply.status == 200 and "x-aibackend-model" not in reply.headers  # no chain: not read
    reply = daemon.predict("gone", {"prompt": "hi"}, headers={"X-Aibackend-Mock-Failure": "chat"})
    reply.error(401, "unauthorized")
    reply = daemon.predict("gone", {"prompt": "hi"}, headers={"X-Aibackend-Mock-Failure": "gone", **ADMIN})
    assert reply.status == 200 and reply.headers["x-aibackend-model"] == "chat"
    assert daemon.metric("aibackend_fallbacks_total", model="gone", fallback="chat", reason="mock_failure") == 1
    reply = daemon.predict("gone", {"prompt": "hi"}, headers={"X-Aibackend-Mock-Failure": "gone,chat", **ADMIN})
    error = reply.error(503, "model_unavailable")
    assert error["model"] == "chat" and "failed on purpose" in error["message"]


def test_the_openai_client_through_a_chain(daemon):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="unused", max_retries=0,
                       timeout=20) as client:
        raw = client.chat.completions.with_raw_response.create(model="gone", messages=HELLO)
        assert raw.headers["x-aibackend-model"] == "chat"
        completion = raw.parse()
        assert completion.model == "chat"  # shaped for the model that served
        assert completion.choices[0].message.content == "You said: hello there"
        chunks = list(client.chat.completions.create(model="gone", messages=HELLO, stream=True))
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == (
            "You said: hello there")
        assert {chunk.model for chunk in chunks} == {"chat"}


def test_with_processes_the_worker_runs_the_chain_and_the_primary_sends_each_attempt_once(tmp_path):
    second = Named("second")
    config = tmp_path / "aibackend.toml"
    config.write_text(f'[server]\nstate_dir = {json.dumps(str(tmp_path / "state"))}\ndrain_timeout = 2\n\n' + toml_models(
        {"id": "sub", "type": "subprocess", "command": ["python", CHAT_MODEL], "protocol": "jsonl", "timeout": 20,
         "fallbacks": ["second"]},
        {"id": "second", "type": "http", "url": second.url, "timeout": 10},
    ))
    daemon = Multi(str(config), cwd=ROOT, processes=2)
    try:
        wait_until(lambda: daemon.status("sub").json().get("state") == "ready", 20, "model sub to be ready")
        (worker,) = daemon.wait_workers(1)  # --processes 2: the primary and one worker
        reply = daemon.request_to(worker, "POST", "/post/predict?id=sub", {"prompt": "fail"},
                                  {"X-Request-Id": "fb-processes"})
        assert reply.status == 200 and reply.json() == {"from": "second"}, reply
        assert reply.headers["x-aibackend-model"] == "second"
        assert second.hits == 1  # the worker's attempt; the primary did not go on to it as well
        # Two access events: the primary's of the attempt forwarded to it, and the worker's.
        wait_until(lambda: sum("request=fb-processes" in line for line in daemon.lines) == 2, 5, "both events")
        (primary, worker_line) = sorted((line for line in daemon.lines if "request=fb-processes" in line),
                                        key=lambda line: "served_by" in line)
        assert " 500 " in primary and "chain=" not in primary
        assert " 200 " in worker_line and "served_by=second chain=sub:500>second:200" in worker_line
        reply = daemon.predict("sub", {"prompt": "two words"})
        assert reply.headers["x-aibackend-model"] == "sub" and reply.json()["content"] == "You said: two words"
    finally:
        daemon.stop()
        second.close()
