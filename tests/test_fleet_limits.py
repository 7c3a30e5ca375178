"""
Limits across a fleet: three real daemons (twistd, loopback; one with C{--processes 2})
on one real redis-server of the module's own, their limits in Redis
(L{aibackend.redislimits}): a burst through all three against a key's limit lets through
exactly the limit (at most one more), a model with fallbacks included (its key counted
once a request, its model's limit the fleet's), and the concurrency slots a daemon killed with
C{kill -9} held are freed within its lease (C{store_lease_seconds = 1} here; 30 s by
default).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from aibackend.testing import ModelServer, start_fleet, stop_fleet, wait_until

KEY_DEADLINE = 10.0  # setting up (the 2 s a change takes is tests/test_fleet_keys.py's and test_fleet_daemon.py's to check)
LEASE_SECONDS = 1.0

pytestmark = pytest.mark.timeout(180)


class SlowModelServer(ModelServer):
    """Answers a path with C{slow} in it after 20 s (a request held in flight), the others at once."""

    def answer(self, path, headers, body):
        if "slow" in path:
            time.sleep(20)
        return super().answer(path, headers, body)


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "aibackend.toml"
    config.write_text(f"[server]\nstore_lease_seconds = {LEASE_SECONDS}\nmax_connections_per_peer = 0\n")
    daemons = start_fleet(redis_server.url, tmp_path_factory.mktemp, config=str(config))
    model = SlowModelServer()
    try:
        assert daemons[0].add({"id": "m", "type": "http", "url": model.url}).status == 201
        assert daemons[0].add({"id": "slow", "type": "http", "url": model.url.replace("/predict", "/slow"),
                               "timeout": 60}).status == 201
        for daemon in daemons:
            wait_until(lambda: {"m", "slow"} <= set(daemon.models()), KEY_DEADLINE, "the models everywhere")
        yield daemons
    finally:
        stop_fleet(daemons, check=False)  # (one of them was killed)
        model.close()


def add_key(daemon, name: str, limits: dict) -> str:
    reply = daemon.request("POST", "/post/addkey", {"name": name, "models": "*", "limits": limits})
    assert reply.status == 201, reply
    return reply.json()["secret"]


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def test_a_burst_through_three_daemons_gets_exactly_the_keys_limit(fleet):
    secret = add_key(fleet[0], "burst", {"rpm": 50})
    for daemon in fleet:
        wait_until(lambda: any(key["name"] == "burst" for key in daemon.request("GET", "/get/keys").json()["keys"]),
                   KEY_DEADLINE, f"the key on daemon {fleet.index(daemon)}")

    statuses, lock = [], threading.Lock()

    def send(index: int):
        for step in range(25):
            status = fleet[(index + step) % 3].predict("m", {"x": 1}, bearer(secret)).status
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert len(statuses) == 200 and set(statuses) <= {200, 429}, sorted(set(statuses))
    # From idle: the bucket's 50, plus what refilled while the burst lasted (one every 1.2 s).
    print(f"\nfleet burst: {statuses.count(200)} of 200 admitted against rpm 50 through 3 daemons")
    assert 50 <= statuses.count(200) <= 51, statuses.count(200)


def test_a_model_with_fallbacks_is_held_to_the_fleets_limits_and_its_key_counted_once(fleet):
    # "capped" (20 a minute across the fleet) falls back to "m"; the key's 50 a minute counts each
    # client request once, whichever model serves it. (Before: per daemon, each attempt counted.)
    server = ModelServer()
    try:
        reply = fleet[0].add({"id": "capped", "type": "http", "url": server.url, "fallbacks": ["m"],
                              "limits": {"rpm": 20}})
        assert reply.status == 201, reply
        secret = add_key(fleet[0], "chained", {"rpm": 50})
        for daemon in fleet:
            wait_until(lambda: b'"capped"' in daemon.request("GET", "/get/models", headers=bearer(secret)).body,
                       KEY_DEADLINE, f"the model and the key on daemon {fleet.index(daemon)}")

        served, lock = [], threading.Lock()

        def send(index: int):
            for step in range(25):
                reply = fleet[(index + step) % 3].predict("capped", {"x": 1}, bearer(secret))
                with lock:
                    served.append((reply.status, reply.headers.get("x-aibackend-model")))

        threads = [threading.Thread(target=send, args=(index,)) for index in range(8)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        lasted = time.monotonic() - began
    finally:
        server.close()

    statuses = [status for status, _ in served]
    assert len(served) == 200 and set(statuses) <= {200, 429}, sorted(set(statuses))
    by_capped = served.count((200, "capped"))
    by_m = served.count((200, "m"))
    print(f"\nfleet burst through a chain: {statuses.count(200)} of 200 admitted against the key's rpm 50, "
          f"{by_capped} served by the model capped at rpm 20, {by_m} by its fallback ({lasted:.2f} s)")
    # From idle, each bucket's allowance, plus what refilled while the burst lasted (one every 1.2 s, 3 s);
    # per daemon, or with each attempt counted against the key, it would be far from both.
    assert 50 <= statuses.count(200) <= 51 + int(lasted / 1.2), (statuses.count(200), lasted)
    assert 20 <= by_capped <= 21 + int(lasted / 3.0), (by_capped, lasted)
    assert by_capped + by_m == statuses.count(200)


def test_the_slots_a_daemon_killed_with_kill_9_held_are_freed_within_its_lease(fleet, redis_server):
    a, b, c = fleet
    secret = add_key(a, "slots", {"max_concurrent": 2})
    for daemon in (a, b):
        wait_until(lambda: daemon.predict("m", {"x": 1}, bearer(secret)).status == 200, KEY_DEADLINE,
                   f"the key on daemon {fleet.index(daemon)}")
    def hold():
        try:
            a.predict("slow", {"x": 1}, bearer(secret), timeout=30)
        except OSError:  # a is killed meanwhile
            pass

    held = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for thread in held:
        thread.start()
    # (Probed only once both are held: a probe in flight meanwhile would take one of the two slots.)
    leases = redis_server.client()
    wait_until(lambda: leases.zcard("aibackend:lease:key:slots") == 2, 5, "both slots held by daemon a")
    assert b.predict("m", {"x": 1}, bearer(secret)).status == 429

    os.kill(a.pid, signal.SIGKILL)
    a.process.popen.wait(10)
    killed = time.monotonic()

    wait_until(lambda: b.predict("m", {"x": 1}, bearer(secret)).status == 200, LEASE_SECONDS + 2,
               "daemon b to have a slot again once daemon a's leases expired")
    print(f"\nslots of a daemon killed with kill -9 freed after {time.monotonic() - killed:.2f} s "
          f"(lease {LEASE_SECONDS} s)")
