"""
A fleet: three real daemons (twistd, loopback) on one real redis-server of the module's
own (C{--store redis://...}), started once for the module; a real HTTP model server
behind the models they add. What one daemon changes, the others serve within 2 s, in
order; concurrent changes through all three end with one registry, the same as Redis's;
Redis restarted (its append-only file kept) or paused (SIGSTOP): the daemons keep
serving, admin changes answer 503, and all follow again once it is back.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from aibackend.testing import Daemon, ModelServer, Multi, wait_until

FOLLOW_DEADLINE = 2.0  # what the fleet promises: a change is served everywhere within 2 s


@pytest.fixture(scope="module")
def model_server():
    server = ModelServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    daemons = []
    try:
        for name in "abc":  # c with --processes 2: its worker follows through its primary
            state = tmp_path_factory.mktemp(f"state-{name}")
            kind, more = (Multi, {"processes": 2}) if name == "c" else (Daemon, {})
            daemons.append(kind(None, "--store", redis_server.url, state=str(state), cwd=str(state), **more))
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()
    for daemon in daemons:
        daemon.assert_no_bug_logged()


def table(model_id: str, url: str, **more) -> dict:
    return {"id": model_id, "type": "http", "url": url, **more}


def runtime_models(daemon) -> dict:
    """The daemon's runtime models: id -> the timeout its spec says (what tells a replacement apart)."""
    models = {}
    for model_id, model in daemon.models().items():
        if model["origin"] == "runtime":
            reply = daemon.status(model_id)
            if reply.status != 200:  # removed meanwhile: ask again
                return None
            models[model_id] = reply.json()["spec"]["timeout"]
    return models


def in_redis(redis_server) -> dict:
    kept = redis_server.client().hgetall("aibackend:models")
    return {model_id: json.loads(record)["table"].get("timeout", 30.0)
            for model_id, record in kept.items() if json.loads(record)["action"] == "add"}


def test_a_model_added_on_one_daemon_is_served_by_the_others_within_2_s(fleet, model_server):
    a, b, c = fleet
    assert a.add(table("everywhere", model_server.url)).status == 201

    for daemon in (b, c):
        wait_until(lambda: daemon.predict("everywhere", {"x": 1}).status == 200, FOLLOW_DEADLINE,
                   f"daemon {daemon.port} to serve the model added on another")
        assert daemon.models()["everywhere"]["origin"] == "runtime"
    worker = c.wait_workers(1).pop()
    wait_until(lambda: c.request_to(worker, "POST", "/post/predict?id=everywhere", {"x": 1}).status == 200,
               FOLLOW_DEADLINE, "daemon c's worker to serve it")


def test_a_model_removed_on_one_daemon_is_gone_from_the_others_within_2_s(fleet, model_server):
    a, b, c = fleet
    assert b.add(table("short-lived", model_server.url)).status == 201
    wait_until(lambda: "short-lived" in a.models() and "short-lived" in c.models(), FOLLOW_DEADLINE, "the add")

    assert b.remove("short-lived").status == 200

    for daemon in (a, c):
        wait_until(lambda: daemon.predict("short-lived").status == 404, FOLLOW_DEADLINE,
                   f"daemon {daemon.port} to forget the model removed on another")


def test_a_replacement_reaches_the_others_and_the_listing_says_the_stores_state(fleet, model_server):
    a, b, c = fleet
    assert a.add(table("replaced", model_server.url, timeout=5)).status == 201
    assert c.add(table("replaced", model_server.url, timeout=7), "?replace=true").status == 200

    for daemon in (a, b):
        wait_until(lambda: daemon.status("replaced").json()["spec"]["timeout"] == 7, FOLLOW_DEADLINE, "the replacement")
    store = b.request("GET", "/get/models").json()["store"]
    assert (store["backend"], store["up"], store["url"]) == ("redis", True, a_url(fleet))
    assert b.metric("aibackend_store_up") == 1.0
    assert b.status("replaced").json()["store"]["up"] is True


def a_url(fleet) -> str:
    return fleet[0].process.argv[fleet[0].process.argv.index("--store") + 1]


def test_200_concurrent_changes_through_the_three_end_with_one_registry_the_same_as_redis(
        fleet, model_server, redis_server):
    ids = [f"churn{index}" for index in range(12)]
    answers = []
    lock = threading.Lock()

    def change(worker: int):
        rng = random.Random(worker)
        for step in range(25):
            daemon = fleet[(worker + step) % 3]
            model_id = rng.choice(ids)
            if rng.random() < 0.3:
                status = daemon.remove(model_id).status
            else:
                status = daemon.add(table(model_id, model_server.url, timeout=rng.randint(1, 60)),
                                    "?replace=true").status
            with lock:
                answers.append(status)

    threads = [threading.Thread(target=change, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert len(answers) == 200
    # A change refused is one that met another on the same model (409) or removed one already gone (404).
    assert set(answers) <= {200, 201, 404, 409}, sorted(set(answers))
    assert answers.count(200) + answers.count(201) > 100

    def same():
        seen = [runtime_models(daemon) for daemon in fleet]
        kept = in_redis(redis_server)
        wanted = {k: v for k, v in kept.items() if k.startswith("churn")}
        return all(s is not None and {k: v for k, v in s.items() if k.startswith("churn")} == wanted for s in seen)

    wait_until(same, FOLLOW_DEADLINE * 2, "every daemon to show the registry Redis keeps")


def test_redis_restarted_mid_test_nothing_acknowledged_is_lost_and_every_daemon_follows(
        fleet, model_server, redis_server):
    a, b, c = fleet
    assert a.add(table("before-restart", model_server.url)).status == 201

    redis_server.restart()

    def added_after():
        return b.add(table("after-restart", model_server.url)).status == 201  # 503 until b is back

    wait_until(added_after, 15, "daemon b to take a change again")
    for daemon in fleet:
        wait_until(lambda: {"before-restart", "after-restart"} <= set(daemon.models()), FOLLOW_DEADLINE * 2,
                   f"daemon {daemon.port} to resync")
        assert daemon.predict("before-restart").status == 200
    worker = c.wait_workers(1).pop()
    for model_id in ("before-restart", "after-restart"):
        wait_until(lambda: c.request_to(worker, "POST", f"/post/predict?id={model_id}", {}).status == 200,
                   FOLLOW_DEADLINE, f"daemon c's worker to serve {model_id}")


def test_redis_paused_the_fleet_serves_changes_answer_503_and_all_follow_once_it_is_back(
        fleet, model_server, redis_server):
    a, b, c = fleet
    assert a.add(table("while-paused", model_server.url)).status == 201
    wait_until(lambda: "while-paused" in c.models(), FOLLOW_DEADLINE, "the add")
    # c's worker follows its primary a moment later: the registry it knows is the one paused with.
    worker = c.wait_workers(1).pop()
    wait_until(lambda: c.request_to(worker, "POST", "/post/predict?id=while-paused", {}).status == 200,
               FOLLOW_DEADLINE, "daemon c's worker to serve the add")

    redis_server.pause()
    try:
        started = time.monotonic()
        refused = b.add(table("refused", model_server.url))
        waited = time.monotonic() - started
        error = refused.error(503, "store_unavailable")
        assert "cannot be reached" in error["message"] and waited < 10, (error, waited)
        for daemon in fleet:
            assert daemon.predict("while-paused").status == 200  # the last known registry keeps serving
            assert daemon.request("GET", "/health/ready").status == 200
        # (b: with --processes, as c has, the store's state is the primary's metrics and listing)
        wait_until(lambda: b.metric("aibackend_store_up") == 0.0, 10, "daemon b to say the store is down")
        assert b.request("GET", "/get/models").json()["store"]["up"] is False
        assert c.remove("while-paused").error(503, "store_unavailable")
    finally:
        redis_server.resume()

    wait_until(lambda: c.add(table("after-pause", model_server.url)).status == 201, 15, "the store back")
    for daemon in fleet:
        wait_until(lambda: "after-pause" in daemon.models(), FOLLOW_DEADLINE * 2, f"daemon {daemon.port} to follow")
    wait_until(lambda: a.metric("aibackend_store_up") == 1.0 and b.metric("aibackend_store_up") == 1.0,
               FOLLOW_DEADLINE, "the store's state up again")
