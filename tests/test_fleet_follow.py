"""
Following a shared store, in memory on a Clock: L{aibackend.admin.ModelManager.follow}
makes the registry what the configuration and the kept changes say (what another daemon
changed), leaves a model being changed here to its operation, and tells the workers; a
shared store that cannot be reached answers an admin change with 503 in the front door's
shape.
"""

from __future__ import annotations

from twisted.internet.defer import fail

from aibackend import config
from aibackend.redisstore import StoreUnavailable
from aibackend.store import Change, MemoryStore
from aibackend.testing import ManagedFrontDoor as Door
from aibackend.testing import HeldStore, assert_error, assert_v2_error, has_fired, result_of


def http(model_id: str, **more) -> dict:
    return {"id": model_id, "type": "http", "url": "http://127.0.0.1:1/", **more}


def configured(*specs):
    return config.Config(models=tuple(specs))


def test_follow_adds_replaces_and_removes_what_another_daemon_changed(clock):
    door = Door(clock)
    told = []
    door.manager.changed.append(told.append)
    cfg = configured()

    door.manager.follow(cfg, [Change("a", "add", http("a")), Change("b", "add", http("b"))])
    assert door.ids() == ["a", "b"] and told == ["a, b"]
    assert door.manager.tables == {"a": http("a"), "b": http("b")}

    door.manager.follow(cfg, [Change("b", "add", http("b")), Change("a", "add", http("a", timeout=3))])
    assert door.registry.entry("a").spec.timeout == 3 and told[-1] == "a"

    door.manager.follow(cfg, [Change("a", "add", http("a", timeout=3))])
    assert door.ids() == ["a"] and door.manager.tables == {"a": http("a", timeout=3)}


def test_follow_with_nothing_changed_tells_the_workers_only_after_a_full_read(clock):
    door = Door(clock)
    told = []
    door.manager.changed.append(told.append)
    changes = [Change("a", "add", http("a"))]
    door.manager.follow(configured(), changes)

    assert result_of(door.manager.follow(configured(), changes)) is None and len(told) == 1
    door.manager.follow(configured(), changes, full=True)
    assert len(told) == 2


def test_a_model_being_changed_here_is_left_to_its_operation_then_follows(clock):
    held = HeldStore()
    door = Door(clock, store=held)
    d = door.request("POST", "/post/addmodel", data=b'{"id": "m", "type": "http", "url": "http://127.0.0.1:1/"}',
                     headers={"Content-Type": "application/json"})
    assert not has_fired(d)

    # Meanwhile another daemon's change to m, then one to n, come through the feed: m is busy here.
    door.manager.follow(configured(), [Change("m", "add", http("m", timeout=9)), Change("n", "add", http("n"))])
    assert door.ids() == ["n"]

    held.writes[0].callback(None)
    door.stub.flush()
    assert result_of(d).status == 201
    assert door.ids() == ["n", "m"]


def test_an_unreachable_shared_store_answers_changes_with_503_in_each_front_doors_shape(clock):
    door = Door(clock, store=Unreachable())

    response = door.call("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1")
    error = assert_error(response, 503, "store_unavailable")
    assert "cannot be reached" in error["message"] and response.header("Retry-After") == "1"
    assert door.ids() == []

    v2 = door.call("POST", "/v2/repository/models/r/load", data=b'{"parameters": {"config": '
                   b'"{\\"type\\": \\"http\\", \\"url\\": \\"http://127.0.0.1:1/\\"}"}}',
                   headers={"Content-Type": "application/json"})
    assert "cannot be reached" in assert_v2_error(v2, 503)


class Unreachable(MemoryStore):
    """A shared store whose Redis cannot be reached."""

    def put(self, model_id, table):
        return fail(StoreUnavailable("the shared store (Redis) cannot be reached: runtime changes are refused"))
