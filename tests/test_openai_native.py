"""
A native OpenAI model (C{[models.openai] native = true}) through the real daemon, with the
real C{openai} client: tests/models/openai_server.py, started by the daemon, is its
upstream. Requests are proxied route by route (only C{model} rewritten), streams passed
through event by event as the upstream wrote them, its errors passed on, its key sent
upstream and never shown.
"""

from __future__ import annotations

import http.client
import json
import os
import sys

import openai
import pytest

from aibackend.testing import ROOT, Daemon, Streamed, free_port, toml_models, wait_until

KEY = "client-key-native-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVER = os.path.join("tests", "models", "openai_server.py")  # relative: the daemon runs in ROOT

pytestmark = pytest.mark.timeout(60)


class Native:
    def __init__(self, daemon: Daemon, upstream_port: int):
        self.daemon = daemon
        self.upstream_port = upstream_port

    def records(self) -> dict:
        connection = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
        try:
            connection.request("GET", "/records")
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-native")
    port = free_port()
    server = {"state_dir": str(tmp / "state"), "api_keys": [KEY], "drain_timeout": 2,
              "allowed_commands": [os.path.realpath(sys.executable)]}
    config = (
        "[server]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in server.items()) + "\n"
        + toml_models({
            "id": "up", "type": "http", "url": f"http://127.0.0.1:{port}/v1", "timeout": 20,
            "command": ["python", SERVER, "--port", str(port)], "health_path": "/health",
            "openai": {"native": True, "model": "upstream-name", "api_key": "${UPSTREAM_TEST_KEY}"},
        }, {
            # The same server as an adapted model (no [models.openai]): its errors are ours to shape.
            "id": "adapted", "type": "http", "url": f"http://127.0.0.1:{port}/v1/chat/completions", "timeout": 20,
        })
    )
    path = tmp / "aibackend.toml"
    path.write_text(config)
    daemon = Daemon(str(path), cwd=ROOT, env={"UPSTREAM_TEST_KEY": UPSTREAM_KEY})
    try:
        wait_until(lambda: daemon.request("GET", "/get/status?id=up", headers=AUTH).json().get("state") == "ready",
                   20, "the native model to be ready")
        yield Native(daemon, port)
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def client(native):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{native.daemon.port}/v1", api_key=KEY, max_retries=0,
                       timeout=20) as made:
        yield made


def test_the_models_list_names_it_by_our_id(client):
    assert [model.id for model in client.models.list()] == ["up", "adapted"]
    assert client.models.retrieve("up").id == "up"


def test_a_chat_is_proxied_with_only_the_model_rewritten(native, client):
    answer = client.chat.completions.create(model="up", messages=[{"role": "user", "content": "hi there"}],
                                            temperature=0.5, max_tokens=7, user="u1")
    assert answer.choices[0].message.content == "echo: hi there"
    assert answer.id == "up-1" and answer.usage.total_tokens == 5  # the upstream's answer, as it wrote it
    assert answer.model == "upstream-name"
    sent = native.records()["bodies"][-1]
    assert sent == {"model": "upstream-name", "messages": [{"role": "user", "content": "hi there"}],
                    "temperature": 0.5, "max_tokens": 7, "user": "u1"}


def test_embeddings_are_proxied(native, client):
    answer = client.embeddings.create(model="up", input=["abc", "de"])
    assert [item.embedding for item in answer.data] == [[3.0, 1.0], [2.0, 1.0]]
    assert native.records()["bodies"][-1]["input"] == ["abc", "de"]


def test_a_stream_passes_through_as_the_upstream_wrote_it(native):
    streamed = Streamed(native.daemon.port, "POST", "/v1/chat/completions",
                        {"model": "up", "stream": True, "messages": [{"role": "user", "content": "a b"}]},
                        headers=AUTH)
    assert streamed.status == 200
    assert streamed.headers.get("content-type").startswith("text/event-stream")
    body = streamed.read_all()
    head = '{"id":"up-1","object":"chat.completion.chunk","created":1,"model":"upstream-name","choices":'
    assert body.decode() == (
        f'data: {head}[{{"index":0,"delta":{{"content":"echo:"}},"finish_reason":null}}],"seq":0}}\n\n'
        f'data: {head}[{{"index":0,"delta":{{"content":" a"}},"finish_reason":null}}],"seq":1}}\n\n'
        f'data: {head}[{{"index":0,"delta":{{"content":" b"}},"finish_reason":null}}],"seq":2}}\n\n'
        f'data: {head}[{{"index":0,"delta":{{}},"finish_reason":"stop"}}],"seq":3}}\n\n'
        "data: [DONE]\n\n"
    )


def test_the_openai_client_streams_from_it(client):
    stream = client.chat.completions.create(model="up", messages=[{"role": "user", "content": "x y"}], stream=True)
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "echo: x y"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_key_goes_upstream_and_is_never_shown(native, client):
    client.chat.completions.create(model="up", messages=[{"role": "user", "content": "k"}])
    assert set(native.records()["auth"]) == {f"Bearer {UPSTREAM_KEY}"}
    shown = native.daemon.request("GET", "/get/status?id=up", headers=AUTH)
    assert shown.status == 200 and UPSTREAM_KEY.encode() not in shown.body
    models = native.daemon.request("GET", "/get/models", headers=AUTH)
    assert UPSTREAM_KEY.encode() not in models.body
    assert shown.json()["spec"]["openai"] == {"native": True, "model": "upstream-name", "api_key": "***"}
    assert UPSTREAM_KEY not in native.daemon.output
    logs = native.daemon.request("GET", "/get/getlogs?id=up", headers=AUTH)
    assert logs.status == 200 and UPSTREAM_KEY.encode() not in logs.body


def test_the_upstreams_error_reaches_the_client(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="up", messages=[{"role": "user", "content": "fail"}])
    assert raised.value.status_code == 400
    assert raised.value.code == "upstream_says_no" and raised.value.message.endswith("the upstream says no")
    with pytest.raises(openai.BadRequestError) as raised:  # a stream's, before its first event
        list(client.chat.completions.create(model="up", messages=[{"role": "user", "content": "fail"}],
                                            stream=True))
    assert raised.value.code == "upstream_says_no"


def test_an_adapted_http_models_error_to_a_stream_is_in_openais_shape_not_the_models(client):
    # The model's own 400 (OpenAI-shaped here, with its own code) is an adapted model's
    # error: its words and status, in the daemon's OpenAI document (code model_error),
    # plain and streamed alike; only a native model's error is passed on as it came.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            answer = client.chat.completions.create(model="adapted", messages=[{"role": "user", "content": "fail"}],
                                                    stream=stream)
            list(answer) if stream else None
        assert raised.value.status_code == 400, stream
        assert raised.value.code == "model_error", (stream, raised.value.body)
        assert raised.value.message.endswith("the upstream says no"), stream


def test_a_client_leaving_mid_stream_closes_the_upstream_connection(native):
    streamed = Streamed(native.daemon.port, "POST", "/v1/chat/completions",
                        {"model": "up", "stream": True, "messages": [{"role": "user", "content": "slow"}]},
                        headers={**AUTH, "X-Request-Id": "native-leaves"})
    assert streamed.status == 200
    streamed.read_until(b'"seq":0}\n\n')
    streamed.leave()
    wait_until(lambda: native.records()["streams"].get("native-leaves") == "closed", 10,
               "the upstream to see its client leave")


def test_each_route_goes_to_the_same_route_upstream(native, client):
    # The upstream has no /v1/completions: its own 404 reaches the client.
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="up", prompt="p")
    assert raised.value.code == "not_found" and "no route /v1/completions" in raised.value.message
    assert native.records()["bodies"][-1] == {"model": "upstream-name", "prompt": "p"}


def test_a_large_request_is_proxied_whole(native, client):
    # (Read in a thread, as a large body is: the native models' names go with it.)
    text = "w" * 300_000
    answer = client.embeddings.create(model="up", input=text)
    assert answer.data[0].embedding == [300_000.0, 1.0]
    assert native.records()["bodies"][-1] == {"model": "upstream-name", "input": text, "encoding_format": "base64"}


def test_a_plain_answer_to_a_stream_request_is_one_event(native):
    streamed = Streamed(native.daemon.port, "POST", "/v1/chat/completions",
                        {"model": "up", "stream": True, "messages": [{"role": "user", "content": "plain"}]},
                        headers=AUTH)
    assert streamed.status == 200
    first, done = streamed.read_all().decode().split("\n\n")[:2]
    assert json.loads(first.removeprefix("data: "))["choices"][0]["message"]["content"] == "echo: plain"
    assert done == "data: [DONE]"


def test_a_number_past_64_bits_is_passed_on_as_it_is(native, client):
    client.chat.completions.create(model="up", messages=[{"role": "user", "content": "n"}], seed=2**70)
    assert native.records()["bodies"][-1]["seed"] == 2**70
