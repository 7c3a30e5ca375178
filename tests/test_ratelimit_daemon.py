"""
The limits of models (C{[models.limits]}, L{aibackend.ratelimit}) in the real daemon with
C{--processes 2}: a burst of 200 requests over many connections, spread by the kernel over
both processes, against C{rpm = 50} gets 50 (plus what refills while the burst lasts);
the 429's headers; and C{/v1} with the official C{openai} client, which raises its
C{RateLimitError} with OpenAI's headers.

One daemon serves the module: tests/models/oa_chat.py (a jsonl chat model the primary
runs and the worker forwards to) under several ids, each with its own limits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import openai
import pytest

from aibackend.testing import ROOT, Multi, toml_models, wait_until

CHAT_MODEL = os.path.join("tests", "models", "oa_chat.py")
HELLO = [{"role": "user", "content": "hello there"}]
BURST = 200
RPM = 50

pytestmark = pytest.mark.timeout(120)


def chat_model(model_id: str, **limits) -> dict:
    return {"id": model_id, "type": "subprocess", "command": ["python", CHAT_MODEL], "protocol": "jsonl",
            "max_inflight": 8, "max_queue": 400, "timeout": 30, "limits": limits}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ratelimit-daemon")
    server = {"state_dir": str(tmp / "state"), "drain_timeout": 2,
              "allowed_commands": [os.path.realpath(sys.executable)]}
    config = (
        "[server]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in server.items()) + "\n"
        + toml_models(chat_model("burst", rpm=RPM), chat_model("tight", rpm=1), chat_model("tokens", tpm=200),
                      chat_model("free"), chat_model("single", max_concurrent=1))
    )
    path = tmp / "aibackend.toml"
    path.write_text(config)
    started = Multi(str(path), state=str(tmp / "state"), processes=2, cwd=ROOT)
    try:
        started.wait_workers(1)

        def ready(model):
            return started.request("GET", f"/get/status?id={model}").json().get("state") == "ready"

        wait_until(lambda: all(ready(m) for m in ("burst", "tight", "tokens", "free", "single")), 30, "the models to be ready")
        # Both processes listen: fresh connections reach either.
        wait_until(lambda: len({answering(started) for _ in range(20)}) == 2, 20, "both processes to answer")
        yield started
    finally:
        started.stop()
    started.assert_no_bug_logged()


def answering(daemon) -> str:
    """Which process answered a fresh connection's scrape (aibackend_process_info)."""
    text = daemon.request("GET", "/metrics").body.decode()
    return "primary" if 'process="primary"' in text else "worker"


def test_a_burst_from_many_connections_over_two_processes_gets_the_limit(daemon):
    statuses = []
    lock = threading.Lock()
    go = threading.Event()

    def ask(count):
        go.wait()
        for _ in range(count):
            reply = daemon.request("POST", "/post/predict?id=burst", {"messages": HELLO}, timeout=60)
            with lock:
                statuses.append((reply.status, reply.headers.get("retry-after")))

    askers = [threading.Thread(target=ask, args=(4,), daemon=True) for _ in range(BURST // 4)]
    for asker in askers:
        asker.start()
    began = time.monotonic()
    go.set()
    for asker in askers:
        asker.join(90)
    lasted = time.monotonic() - began
    assert len(statuses) == BURST
    admitted = sum(1 for status, _ in statuses if status == 200)
    limited = [retry for status, retry in statuses if status == 429]
    assert admitted + len(limited) == BURST, sorted(set(statuses))
    # Exactly the limit, and what refilled while the burst lasted (one every 60/50 s).
    assert RPM <= admitted <= RPM + 1 + int(lasted * RPM / 60), (admitted, lasted)
    assert all(retry is not None and int(retry) >= 1 for retry in limited)
    # Refusals are counted as such, in each process's metrics, never as the model's requests.
    refused = answered = 0
    seen = set()
    for _ in range(40):
        text = daemon.request("GET", "/metrics").body.decode()
        process = "primary" if 'process="primary"' in text else "worker"
        if process in seen:
            continue
        seen.add(process)
        for line in text.splitlines():
            if line.startswith('aibackend_limited_total{limit="rpm",model="burst",scope="model"}'):
                refused += int(float(line.split()[-1]))
            if line.startswith('aibackend_requests_total{model="burst",operation="predict"'):
                answered += int(float(line.split()[-1]))
        if len(seen) == 2:
            break
    assert seen == {"primary", "worker"}
    assert refused == len(limited)
    # The worker's forwarded requests are counted in the primary too (it answers them): at least once each.
    assert admitted <= answered <= 2 * admitted


def test_a_429_over_the_plain_route_and_v2_has_the_headers(daemon):
    first = daemon.request("POST", "/post/predict?id=tight", {"messages": HELLO})
    reply = daemon.request("POST", "/post/predict?id=tight", {"messages": HELLO})
    assert first.status == 200 and reply.status == 429, (first.body, reply.body)
    assert reply.json()["error"]["type"] == "rate_limit_exceeded"
    assert reply.headers["x-ratelimit-limit-requests"] == "1"
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    v2 = daemon.request("POST", "/v2/models/tight/generate", {"text_input": "hi"})
    assert v2.status == 429 and set(v2.json()) == {"error"}
    assert v2.headers["x-ratelimit-limit-requests"] == "1"


@pytest.fixture(scope="module")
def client(daemon):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="none", max_retries=0,
                       timeout=30) as made:
        yield made


def test_v1_the_openai_client_gets_a_rate_limit_error_with_the_headers(daemon, client):
    with pytest.raises(openai.RateLimitError) as raised:
        for _ in range(3):
            client.chat.completions.create(model="tight", messages=HELLO)
    error = raised.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    headers = error.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) >= 1


def test_v1_a_streams_tokens_are_reserved_then_settled(daemon, client):
    """200 tokens a minute: a stream that may write 150 holds 153 (its prompt's 3 too) while it runs."""
    stream = client.chat.completions.create(model="tokens", messages=HELLO, max_tokens=150, temperature=0.3,
                                            stream=True)
    chunks = iter(stream)
    first = next(chunks)  # it runs
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="tokens", messages=HELLO, max_tokens=150)
    assert raised.value.type == "tokens" and raised.value.code == "rate_limit_exceeded"
    headers = raised.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "200"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 150
    text = (first.choices[0].delta.content or "") + "".join(chunk.choices[0].delta.content or ""
                                                             for chunk in chunks if chunk.choices)
    assert text == "You said: hello there"
    # Settled with what it wrote (a few words): another of 150 is let in now.
    answer = client.chat.completions.create(model="tokens", messages=HELLO, max_tokens=150)
    assert answer.usage.total_tokens < 20


def test_a_model_without_limits_is_not_limited(daemon):
    for _ in range(5):
        assert daemon.request("POST", "/post/predict?id=free", {"messages": HELLO}).status == 200


def test_the_places_a_killed_worker_held_are_given_back(daemon):
    """Last in the module: its worker is killed (and another started in its place)."""
    worker = daemon.worker()
    held = daemon.connection_to(worker)
    forever = json.dumps({"messages": [{"role": "user", "content": "forever"}]}).encode()
    held.request("POST", "/post/predict?id=single", body=forever, headers={"Content-Type": "application/json"})
    # The worker's request holds the model's one place: the primary refuses another.
    wait_until(lambda: daemon.request_to(daemon.pid, "POST", "/post/predict?id=single",
                                         {"messages": HELLO}).status == 429, 10, "the worker's request to hold")
    refused = daemon.request_to(daemon.pid, "POST", "/post/predict?id=single", {"messages": HELLO})
    assert refused.status == 429 and refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert "Limit 1 at once" in refused.json()["error"]["message"]
    os.kill(worker, signal.SIGKILL)
    held.close()
    wait_until(lambda: worker not in daemon.workers(), 10, "the primary to reap the killed worker")
    # Its place was given back when it ended.
    wait_until(lambda: daemon.request_to(daemon.pid, "POST", "/post/predict?id=single",
                                         {"messages": HELLO}).status == 200, 10, "the place to be given back")
