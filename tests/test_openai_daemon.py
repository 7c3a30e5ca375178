"""
The OpenAI-compatible API (C{/v1}) through the real daemon (C{twistd aibackend} on a free
loopback port), called with the official C{openai} client, sync and async.

One daemon serves the whole module, with client keys (every call sends one):

  - C{chat}: tests/models/oa_chat.py, a jsonl chat and completion model written with
    aibackend.worker (a generator: it streams);
  - C{narrow}: the same model, one request at a time and no queue: a second request at
    once is shed (429 here);
  - C{embed}: tests/models/oa_embed.py, a jsonl embedding model.

About the clients: C{OpenAI} (httpx) is called from plain test functions, which
pytest-twisted runs while the reactor's greenlet is idle; C{AsyncOpenAI} runs in its own
asyncio loop (C{asyncio.run}) in the same way. Retries are off: each test sees the
daemon's first answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import openai
import pytest

from aibackend.testing import ROOT, Daemon, toml_models, wait_until

KEY = "client-key-openai-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT_MODEL = os.path.join("tests", "models", "oa_chat.py")  # relative: the daemon runs in ROOT
EMBED_MODEL = os.path.join("tests", "models", "oa_embed.py")
HELLO = [{"role": "user", "content": "hello there"}]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-daemon")
    server = {"state_dir": str(tmp / "state"), "api_keys": [KEY], "drain_timeout": 2,
              "allowed_commands": [os.path.realpath(sys.executable)]}
    config = (
        "[server]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in server.items()) + "\n"
        + toml_models(
            {"id": "chat", "type": "subprocess", "command": ["python", CHAT_MODEL], "protocol": "jsonl",
             "max_inflight": 8, "timeout": 20},
            {"id": "narrow", "type": "subprocess", "command": ["python", CHAT_MODEL], "protocol": "jsonl",
             "max_inflight": 1, "max_queue": 0, "timeout": 20},
            {"id": "embed", "type": "subprocess", "command": ["python", EMBED_MODEL], "protocol": "jsonl",
             "timeout": 20},
        )
    )
    path = tmp / "aibackend.toml"
    path.write_text(config)
    started = Daemon(str(path), cwd=ROOT)
    try:
        def ready(model):
            return started.request("GET", f"/get/status?id={model}", headers=AUTH).json().get("state") == "ready"

        wait_until(lambda: all(ready(m) for m in ("chat", "narrow", "embed")), 20, "the models to be ready")
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def client(daemon):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=KEY, max_retries=0,
                       timeout=20) as made:
        yield made


def async_client(daemon, **kwargs):
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=KEY, max_retries=0,
                              timeout=20, **kwargs)


def requests_of(daemon, model, request_id):
    reply = daemon.request("GET", f"/get/getlogs?id={model}", headers=AUTH)
    return [entry for entry in reply.json()["entries"]
            if entry["event"] == "request" and entry["request_id"] == request_id]


# --- models ------------------------------------------------------------------------------


def test_the_models_list(client):
    models = client.models.list()
    assert [model.id for model in models] == ["chat", "narrow", "embed"]
    assert {model.owned_by for model in models} == {"aibackend"}
    assert client.models.retrieve("embed").id == "embed"


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nobody", messages=HELLO)
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody")


def test_a_bad_key_is_an_authentication_error(daemon):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="not-the-key-0123456789",
                       max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="chat", messages=HELLO)


# --- chat ------------------------------------------------------------------------------


def test_a_chat_completion(client):
    completion = client.chat.completions.create(model="chat", messages=HELLO, temperature=0)

    assert completion.object == "chat.completion" and completion.model == "chat"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "You said: hello there"
    assert choice.finish_reason == "stop"
    # The model counts words: two in the prompt, four said.
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.total_tokens) == (2, 4, 6)


def test_max_tokens_is_the_models_and_ends_with_length(client):
    completion = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=2)
    assert completion.choices[0].message.content == "You said:"
    assert completion.choices[0].finish_reason == "length"


def test_a_streamed_chat_comes_chunk_by_chunk_with_usage_last(client):
    words = " ".join(f"w{i}" for i in range(6))
    stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": words}],
                                            temperature=0.15, stream=True,
                                            stream_options={"include_usage": True})
    arrivals = []
    chunks = []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)

    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in content) == "You said: " + words
    assert len(content) == 8  # one per word
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # 150 ms between words: they were not sent together.
    assert arrivals[len(content) - 1] - arrivals[0] >= 0.5


def test_a_completion(client):
    completion = client.completions.create(model="chat", prompt="once upon", max_tokens=3)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "You said: once"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == 3  # estimated: "once upon" is 9 characters


def test_a_streamed_completion(client):
    stream = client.completions.create(model="chat", prompt="a b", stream=True)
    texts = [chunk.choices[0].text for chunk in stream]
    assert "".join(texts) == "You said: a b"


def test_with_raw_response_has_the_request_id(client):
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=HELLO,
                                                           extra_headers={"X-Request-Id": "oa-raw-1"})
    assert raw.headers["x-request-id"] == "oa-raw-1"
    assert raw.headers["content-type"] == "application/json"
    assert raw.parse().id == "chatcmpl-oa-raw-1"
    streamed = client.chat.completions.with_raw_response.create(model="chat", messages=HELLO, stream=True,
                                                                extra_headers={"X-Request-Id": "oa-raw-2"})
    assert streamed.headers["x-request-id"] == "oa-raw-2"
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert {chunk.id for chunk in streamed.parse()} == {"chatcmpl-oa-raw-2"}


def test_a_model_failure_is_an_api_status_error(client):
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "fail"}])
    assert raised.value.status_code == 500
    assert raised.value.response.headers["x-request-id"]


def test_a_model_that_fails_mid_stream_ends_it_with_an_error_event(client):
    stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "break"}],
                                            stream=True)
    pieces = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["You"]
    assert "the model broke mid-stream" in raised.value.message


def test_shedding_is_a_rate_limit_error(client, daemon):
    holding = threading.Thread(target=lambda: client.chat.completions.create(
        model="narrow", messages=[{"role": "user", "content": "one two three"}], temperature=0.3))
    holding.start()
    try:
        wait_until(lambda: daemon.request("GET", "/get/status?id=narrow", headers=AUTH).json()["in_flight"] == 1,
                   5, "narrow's request to be in flight")
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(model="narrow", messages=HELLO)
        assert raised.value.response.headers["retry-after"] == "1"
    finally:
        holding.join(20)


def test_a_client_that_leaves_mid_stream_cancels_the_model_and_is_logged_499(client, daemon):
    stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "forever"}],
                                            temperature=0.05, stream=True,
                                            extra_headers={"X-Request-Id": "oa-leaves"})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()

    wait_until(lambda: requests_of(daemon, "chat", "oa-leaves"), 5, "the stream's end to be logged")
    [entry] = requests_of(daemon, "chat", "oa-leaves")
    assert (entry["operation"], entry["status"]) == ("chat.completions", 499)
    wait_until(lambda: daemon.request("GET", "/get/status?id=chat", headers=AUTH).json()["in_flight"] == 0, 3,
               "the model's request to end")


# --- embeddings --------------------------------------------------------------------------------


def test_embeddings_as_floats_and_base64(client):
    floats = client.embeddings.create(model="embed", input=["a cat", "the dog runs"], encoding_format="float",
                                      dimensions=4)
    # The client's default asks for base64 and decodes it.
    decoded = client.embeddings.create(model="embed", input=["a cat", "the dog runs"], dimensions=4)

    assert [len(item.embedding) for item in floats.data] == [4, 4]
    assert [item.index for item in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == 5
    for plain, other in zip(floats.data, decoded.data):
        assert other.embedding == pytest.approx(plain.embedding, abs=1e-6)


def test_one_string_is_one_vector_and_usage_may_be_estimated(client):
    embedded = client.embeddings.create(model="embed", input="single", user="bare")
    assert len(embedded.data) == 1 and len(embedded.data[0].embedding) == 3
    assert embedded.usage.prompt_tokens == 2  # estimated: six characters


def test_a_model_asked_for_what_it_does_not_serve_is_a_bad_request(client):
    # Each model refuses the other's body itself (a model whose answer does not fit the
    # route is a 400 of the front door's: tests/test_openai.py).
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="chat", input="x")
    assert "send messages or a prompt" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="embed", messages=HELLO)
    assert "send {\"input\": [text, ...]}" in raised.value.message


# --- async ---------------------------------------------------------------------------------


def test_the_async_client_chats_streams_and_embeds(daemon):
    async def use():
        async with async_client(daemon) as aclient:
            models = [model.id async for model in aclient.models.list()]
            completion = await aclient.chat.completions.create(model="chat", messages=HELLO)
            stream = await aclient.chat.completions.create(model="chat", messages=HELLO, stream=True)
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
            embedded = await aclient.embeddings.create(model="embed", input=["x y"])
            try:
                await aclient.chat.completions.create(model="nobody", messages=HELLO)
            except openai.NotFoundError:
                missing = True
            else:
                missing = False
            return models, completion, pieces, embedded, missing

    models, completion, pieces, embedded, missing = asyncio.run(use())

    assert models == ["chat", "narrow", "embed"]
    assert completion.choices[0].message.content == "You said: hello there"
    assert "".join(pieces) == "You said: hello there"
    assert len(embedded.data) == 1
    assert missing


def test_raw_http_errors_have_openais_shape(daemon):
    reply = daemon.request("POST", "/v1/chat/completions", {"model": "chat"}, headers=AUTH)
    assert reply.status == 400
    assert reply.json() == {"error": {"message": "messages must be a non-empty array of {role, content}",
                                      "type": "invalid_request_error", "param": "messages",
                                      "code": "bad_request"}}
    assert reply.headers["x-request-id"]
