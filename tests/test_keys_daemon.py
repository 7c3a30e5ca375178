"""
Client keys through the real daemon (C{twistd aibackend} on a free loopback port, admin
operations from loopback without a token, as C{make run}'s): a key's life (made, used,
listed without its secret, rotated, revoked), its models on every front door (the real
C{openai} client for /v1), keys kept across a restart, and a revocation every process of
C{--processes 2} follows before it is answered.
"""

from __future__ import annotations

import json
import os
import sys

import openai
import pytest

from aibackend.testing import ROOT, Daemon, Multi, toml_models, wait_until

CHAT_MODEL = os.path.join("tests", "models", "oa_chat.py")  # relative: the daemon runs in ROOT
HELLO = [{"role": "user", "content": "hello there"}]
V2_INPUT = {"inputs": [{"name": "messages", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
# iris's tensors: a request not of them is a 400 for a key that may call it, a 403 before for one that may not.
IRIS_V2 = '[models.v2]\ninputs = [{ name = "instances", datatype = "FP32", shape = [-1, 4] }]\n'

pytestmark = pytest.mark.timeout(90)


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


def config(tmp, *models, more: str = "") -> str:
    path = tmp / "aibackend.toml"
    path.write_text(
        f"[server]\nstate_dir = {json.dumps(str(tmp / 'state'))}\ndrain_timeout = 2\n"
        f"allowed_commands = [{json.dumps(os.path.realpath(sys.executable))}]\n\n" + toml_models(*models) + more
    )
    return str(path)


def chat_model(model_id):
    return {"id": model_id, "type": "subprocess", "command": ["python", CHAT_MODEL], "protocol": "jsonl",
            "timeout": 20}


def add_key(daemon, **table):
    reply = daemon.request("POST", "/post/addkey", table)
    assert reply.status == 201, reply
    return reply.json()["secret"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys-daemon")
    started = Daemon(config(tmp, chat_model("chat"), chat_model("iris"), more=IRIS_V2), cwd=ROOT)
    try:
        wait_until(lambda: all(started.request("GET", f"/get/status?id={m}").json().get("state") == "ready"
                               for m in ("chat", "iris")), 20, "the models to be ready")
        yield started
    finally:
        started.stop()


def test_a_key_made_used_listed_rotated_and_revoked(daemon):
    # (The module's first test: no key exists yet, anyone may call.)
    assert daemon.predict("chat", {"prompt": "hi"}).status == 200
    made = daemon.request("POST", "/post/addkey", {"name": "life", "models": "*", "limits": {"rpm": 1000}})
    assert made.status == 201, made
    secret = made.json()["secret"]
    assert secret.startswith(f"aib-{made.json()['id']}-")

    assert daemon.predict("chat", {"prompt": "hi"}, bearer(secret)).status == 200
    assert daemon.predict("chat", {"prompt": "hi"}).status == 401  # keys are required now

    listed = daemon.request("GET", "/get/keys")
    assert listed.status == 200
    (key,) = [key for key in listed.json()["keys"] if key["name"] == "life"]
    assert key["models"] == "*" and key["limits"] == {"rpm": 1000} and key["revoked"] is None
    assert secret not in listed.body.decode() and secret[-20:] not in listed.body.decode()

    rotated = daemon.request("POST", "/post/rotatekey?name=life")
    assert rotated.status == 200, rotated
    new = rotated.json()["secret"]
    assert daemon.predict("chat", {"prompt": "hi"}, bearer(secret)).status == 401
    assert daemon.predict("chat", {"prompt": "hi"}, bearer(new)).status == 200

    assert daemon.request("POST", "/post/revokekey?name=life").status == 200
    refused = daemon.predict("chat", {"prompt": "hi"}, bearer(new))
    assert refused.status == 401 and refused.json()["error"]["type"] == "unauthorized"
    for text in (secret, new, secret[-20:], new[-20:]):
        assert text not in daemon.output  # nothing secret in the log, access lines included
    daemon.assert_no_bug_logged()


def test_a_keys_models_are_enforced_on_every_front_door(daemon):
    secret = add_key(daemon, name="chat-only", models=["chat"])
    headers = bearer(secret)

    forbidden = daemon.predict("iris", {"prompt": "hi"}, headers)
    assert forbidden.status == 403 and forbidden.json()["error"]["model"] == "iris", forbidden
    assert daemon.predict("chat", {"prompt": "hi"}, headers).status == 200

    v2 = daemon.request("POST", "/v2/models/iris/infer", V2_INPUT, headers)
    assert v2.status == 403 and "may not call model 'iris'" in v2.json()["error"], v2
    # (Refused before the request is read against iris's tensors: with a key for every model it is a 400.)
    anything = bearer(add_key(daemon, name="v2-everything"))
    assert daemon.request("POST", "/v2/models/iris/infer", V2_INPUT, anything).status == 400
    assert daemon.request("GET", "/v2/models/iris/ready", headers=headers).status == 403
    assert daemon.request("GET", "/v2/models", headers=headers).json() == {"models": ["chat"]}

    with openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key=secret, max_retries=0,
                       timeout=20) as client:
        with pytest.raises(openai.PermissionDeniedError) as raised:
            client.chat.completions.create(model="iris", messages=HELLO)
        assert raised.value.status_code == 403 and "iris" in raised.value.message
        answer = client.chat.completions.create(model="chat", messages=HELLO)
        assert answer.choices[0].message.content == "You said: hello there"
        assert [model.id for model in client.models.list()] == ["chat"]
        with pytest.raises(openai.PermissionDeniedError):
            client.models.retrieve("iris")


def test_keys_and_revocations_survive_a_restart(tmp_path):
    path = config(tmp_path)
    first = Daemon(path, cwd=ROOT)
    try:
        kept = add_key(first, name="kept", models=["chat"])
        gone = add_key(first, name="gone")
        assert first.request("POST", "/post/revokekey?name=gone").status == 200
        first.terminate()
        again = Daemon(path, cwd=ROOT)
    finally:
        first.stop()
    try:
        assert again.request("GET", "/get/models", headers=bearer(kept)).status == 200
        assert again.request("GET", "/get/models", headers=bearer(gone)).status == 401
        assert again.request("GET", "/get/models").status == 401
        keys = {key["name"]: key for key in again.request("GET", "/get/keys").json()["keys"]}
        assert keys["kept"]["models"] == ["chat"] and keys["kept"]["revoked"] is None
        assert keys["gone"]["revoked"] is not None
    finally:
        again.stop()


def test_with_two_processes_every_one_follows_a_key_before_the_answer(tmp_path):
    # "iris" is an HTTP model whose server is not there: a key that may not call it is
    # refused by the policy (403) before any connection is tried.
    path = config(tmp_path, {"id": "iris", "type": "http", "url": "http://127.0.0.1:9/"})
    daemon = Multi(path, cwd=ROOT, processes=2)
    try:
        worker = daemon.wait_workers(1).pop()
        wait_until(lambda: "worker 1 is handed connections" in daemon.output, 15, "the worker to listen")
        # Made and revoked through the worker, which has the primary do it (FORWARDED).
        made = daemon.request_to(worker, "POST", "/post/addkey", {"name": "shared", "models": ["chat"]})
        assert made.status == 201, made
        secret = made.json()["secret"]
        headers = bearer(secret)
        for pid in (daemon.pid, worker):
            assert daemon.request_to(pid, "GET", "/get/models", headers=headers).status == 200
            assert daemon.request_to(pid, "POST", "/post/predict?id=iris", b"{}", headers).status == 403
        statuses = [daemon.request("GET", "/get/models", headers=headers).status for _ in range(20)]
        assert statuses == [200] * 20

        revoked = daemon.request_to(worker, "POST", "/post/revokekey?name=shared")
        assert revoked.status == 200, revoked
        statuses = [daemon.request("GET", "/get/models", headers=headers).status for _ in range(40)]
        assert statuses == [401] * 40
        for pid in (daemon.pid, worker):
            assert daemon.request_to(pid, "GET", "/get/models", headers=headers).status == 401
        daemon.assert_no_bug_logged()
    finally:
        daemon.stop()
