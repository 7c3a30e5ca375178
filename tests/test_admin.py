"""
Runtime model management through the front door (L{aibackend.admin.ModelManager} behind
L{aibackend.testing.StubFrontDoor}, a L{MemoryStore}, a L{Clock}): C{addmodel} in its
three forms, the runtime rules (programs, destinations, C{${VAR}}), replacement without
a gap, C{removemodel}, C{models}, C{status} with secrets masked, C{restart}, the guard,
and how kept changes are loaded at start.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import pytest_twisted
from twisted.application.service import Service
from zope.interface import implementer

from aibackend import config
from aibackend.admin import ModelManager, load_models, table_from_query
from aibackend.auth import Guard
from aibackend.destinations import DestinationPolicy
from aibackend.errors import BadGateway, Forbidden, GatewayTimeout
from aibackend.interfaces import IRestartable, ModelAnswer
from aibackend.store import Change, MemoryStore
from aibackend.testing import ADMIN_TOKEN as TOKEN
from aibackend.testing import FakeModel, HeldStore, assert_error, failure_of, has_fired, result_of
from aibackend.testing import ManagedFrontDoor as Door
KEY = "client-key-0123456789"
README_LINE = '/post/addmodel?id=myverygoodmodel?type=httpmodel?dest="127.0.0.1:8888"'
PYTHON = os.path.realpath(sys.executable)


def server_spec(**server) -> config.ServerSpec:
    """A [server] table, normalised as the configuration file's is."""
    return config.parse_config({"server": server}, environ={}).server


class ServiceModel(FakeModel, Service):
    """A fake model with a lifetime (started and stopped by the registry), a state, and in-flight requests."""

    def __init__(self, model_id, clock, *, state="ready", timeout=None):
        FakeModel.__init__(self, model_id, clock, state=state, request_timeout=timeout or 0.0)
        if timeout is not None:
            self.spec = config.HttpModelSpec(id=model_id, type="http", url="http://127.0.0.1:9/", timeout=timeout)

    def describe(self):
        return {**FakeModel.describe(self), "state": self.state, "in_flight": self.in_flight}


@pytest.fixture
def old(clock):
    return ServiceModel("m", clock)


@pytest.fixture
def door(clock, old):
    return Door(clock, old, FakeModel("other", clock))


def http_spec(model_id="m", **keys):
    problems = []
    spec = config.parse_model(config.Table({"id": model_id, "type": "http", **keys}, "", problems), environ={})
    assert problems == []
    return spec


# --- the query forms --------------------------------------------------------------------------


def test_the_originals_query_becomes_a_table_without_the_quotes():
    assert table_from_query({"id": ["myverygoodmodel"], "type": ["httpmodel"], "dest": ['"127.0.0.1:8888"']}) == {
        "id": "myverygoodmodel", "type": "httpmodel", "dest": "127.0.0.1:8888",
    }


def test_query_values_other_than_names_are_read_as_json():
    table = table_from_query({
        "id": ["123"], "type": ["http"], "url": ["http://h/"], "timeout": ["5"], "max_restarts": ["3"],
        "command": ['["python", "m.py"]'], "headers": ['{"X-A": "b"}'], "replace": ["true"],
        "cwd": ["/tmp"], "protocol": ["jsonl"], "note": ["not json"], "quoted": ["'5'"],
    })

    assert table == {
        "id": "123", "type": "http", "url": "http://h/", "timeout": 5, "max_restarts": 3,
        "command": ["python", "m.py"], "headers": {"X-A": "b"}, "cwd": "/tmp", "protocol": "jsonl",
        "note": "not json", "quoted": "5",
    }


def test_a_repeated_query_parameter_is_a_list():
    assert table_from_query({"command": ["python", "m.py"]}) == {"command": ["python", "m.py"]}


# --- addmodel: three forms ----------------------------------------------------------------------


def test_the_readme_line_adds_an_http_model(door):
    response = door.call("POST", README_LINE)

    assert response.status == 201, response.body
    assert response.header("Content-Type") == "application/json"
    answer = response.json()
    assert (answer["added"], answer["replaced"]) == ("myverygoodmodel", False)
    model = answer["model"]
    assert (model["id"], model["type"], model["state"]) == ("myverygoodmodel", "http", "ready")
    assert model["origin"] == "runtime"
    assert model["url"] == "http://127.0.0.1:8888"
    assert door.ids() == ["m", "other", "myverygoodmodel"]
    assert door.store.load() == [
        Change("myverygoodmodel", "add", {"id": "myverygoodmodel", "type": "httpmodel", "dest": "127.0.0.1:8888"})
    ]


def test_proper_query_parameters_add_a_model(door):
    response = door.call("POST", "/post/addmodel?id=q&type=http&dest=127.0.0.1:8888/predict&timeout=5")

    assert response.status == 201, response.body
    spec = door.status("q").json()["spec"]
    assert (spec["url"], spec["timeout"]) == ("http://127.0.0.1:8888/predict", 5.0)


def test_a_url_may_be_given_percent_encoded(door):
    response = door.call("POST", "/post/addmodel?id=q&type=http&url=https%3A%2F%2F127.0.0.1%3A8443%2Fv1%3Fa%3Db")

    assert response.status == 201, response.body
    assert door.status("q").json()["spec"]["url"] == "https://127.0.0.1:8443/v1?a=b"


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded", None])
def test_a_json_body_adds_a_model(door, content_type):
    table = {"id": "j", "type": "http", "url": "http://127.0.0.1:8888/echo", "timeout": 7.5,
             "headers": {"X-Model": "j"}}
    headers = {"Content-Type": content_type} if content_type else {}

    response = door.call("POST", "/post/addmodel", data=json.dumps(table).encode(), headers=headers)

    assert response.status == 201, response.body
    spec = door.status("j").json()["spec"]
    assert (spec["url"], spec["timeout"], spec["headers"]) == ("http://127.0.0.1:8888/echo", 7.5, {"X-Model": "j"})
    assert door.store.load() == [Change("j", "add", table)]


def test_the_body_may_leave_the_id_to_the_query(door):
    response = door.add({"type": "http", "dest": "127.0.0.1:8888"}, "?id=fromquery")

    assert response.status == 201, response.body
    assert door.status("fromquery").json()["spec"]["url"] == "http://127.0.0.1:8888"


def test_ids_in_the_query_and_the_body_must_agree(door):
    response = door.add({"id": "a", "type": "http", "dest": "127.0.0.1:8888"}, "?id=b")

    assert_error(response, 400, "bad_request", message="differ")
    assert door.ids() == ["m", "other"]


@pytest.mark.parametrize("dest, url", [
    ("127.0.0.1:8888", "http://127.0.0.1:8888"),
    ("127.0.0.1:8888/v1/predict?x=1", "http://127.0.0.1:8888/v1/predict?x=1"),
    ("[::1]:8888", "http://[::1]:8888"),
    ("https://127.0.0.1:8443/p", "https://127.0.0.1:8443/p"),
])
def test_a_dest_without_a_scheme_means_http(clock, dest, url):
    door = Door(clock)

    response = door.add({"id": "d", "type": "http", "dest": dest})

    assert response.status == 201, response.body
    assert door.status("d").json()["spec"]["url"] == url


# --- addmodel: validation ---------------------------------------------------------------------------


def test_an_invalid_model_is_400_with_the_configurations_own_errors_and_key_paths(door):
    table = {"id": "bad id!", "type": "http", "url": "ftp://127.0.0.1/", "timeout": 0, "bogus": 1,
             "headers": {"X-A": 5}}
    with pytest.raises(config.ConfigError) as caught:
        config.parse_config({"models": [dict(table)]}, environ={})

    response = door.add(table)

    error = assert_error(response, 400, "bad_request", model="bad id!")
    problems = [(path.removeprefix("models[0]."), message) for path, message in caught.value.problems]
    assert {path for path, _ in problems} == {"id", "url", "timeout", "bogus", "headers"}
    for path, message in problems:
        assert f"{path}: {message}" in error["message"]
    assert door.ids() == ["m", "other"]
    assert door.store.load() == []


@pytest.mark.parametrize("query, expected", [
    ("?type=http&dest=127.0.0.1:8888", ["id: is required"]),
    ("?id=x&dest=127.0.0.1:8888", ["type: is required"]),
    ("?id=x&type=teapot", ["type: unknown model type 'teapot'"]),
    ("?id=x&type=http", ["url: is required"]),
    ("?id=x&type=http&dest=127.0.0.1:8888&url=http://127.0.0.1:1/", ["give only one of url, dest"]),
    ("?id=x&type=http&url=127.0.0.1:8888", ["url: must be an http:// or https:// URL"]),
    ("?id=x&type=http&dest=127.0.0.1:8888&timeout=soon", ["timeout: must be a number, got a string"]),
    ("?id=x&type=subprocess", ["command: is required"]),
    ("", ["id: is required", "type: is required"]),
])
def test_query_forms_are_validated_like_the_configuration(door, query, expected):
    response = door.call("POST", "/post/addmodel" + query)

    error = assert_error(response, 400, "bad_request", model="x" if "id=x" in query else None)
    for text in expected:
        assert text in error["message"], error["message"]
    assert door.ids() == ["m", "other"]


@pytest.mark.parametrize("body, message", [
    (b"[1, 2]", "JSON object"),
    (b'"http"', "JSON object"),
    (b"{not json", "not valid JSON"),
    (b'{"id": "x", "timeout": NaN}', "not valid JSON"),
])
def test_a_body_that_is_not_a_json_object_is_400(door, body, message):
    response = door.call("POST", "/post/addmodel", data=body, headers={"Content-Type": "application/json"})

    assert_error(response, 400, "bad_request", message=message)


def test_replace_must_be_a_boolean(door):
    response = door.call("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:1&replace=maybe")

    assert_error(response, 400, "bad_request", message="replace must be true or false")


# --- addmodel: an existing id ------------------------------------------------------------------------


def test_an_existing_id_is_409_and_the_model_keeps_serving(door, old):
    response = door.call("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:8888")

    assert_error(response, 409, "conflict", model="m", message="replace=true")
    assert door.predict("m").status == 200
    assert len(old.received) == 1
    assert door.store.load() == []


def test_a_runtime_model_added_twice_is_409(door):
    assert door.call("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1").status == 201

    response = door.call("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:2")

    assert_error(response, 409, "conflict", model="r")
    assert door.status("r").json()["url"] == "http://127.0.0.1:1"


def test_replace_of_an_id_that_does_not_exist_is_an_add(door):
    response = door.call("POST", "/post/addmodel?id=new&type=http&dest=127.0.0.1:1&replace=true")

    assert response.status == 201, response.body
    assert response.json()["replaced"] is False


def stage(door, monkeypatch, clock, state="starting"):
    """Make the next model the registry builds a L{ServiceModel} the test makes ready."""
    staged = ServiceModel("m", clock, state=state)
    real_build = door.registry.build

    def build(spec, *, runtime=False):
        real_build(spec, runtime=runtime)  # still a buildable spec
        return staged

    monkeypatch.setattr(door.registry, "build", build)
    return staged


def test_a_replacement_takes_over_only_once_it_is_ready(door, old, clock, monkeypatch):
    door.registry.startService()
    staged = stage(door, monkeypatch, clock)

    d = door.request("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:8888&replace=true")

    assert staged.running and old.running
    statuses = []
    for _ in range(5):  # while the replacement starts, the old one answers every request
        statuses.append(door.predict("m").status)
        clock.advance(0.1)
        door.stub.flush()
        assert not has_fired(d)
    assert statuses == [200] * 5
    assert (len(old.received), len(staged.received)) == (5, 0)
    assert door.status("m").json()["state"] == "ready"  # the old one's

    staged.state = "ready"
    clock.advance(0.1)
    door.stub.flush()

    response = result_of(d)
    assert response.status == 200, response.body
    assert response.json()["replaced"] is True
    assert door.predict("m").status == 200
    assert (len(old.received), len(staged.received)) == (5, 1)
    assert not old.running and staged.running
    assert door.store.load() == [Change("m", "add", {"id": "m", "type": "http", "dest": "127.0.0.1:8888"})]
    assert door.ids() == ["m", "other"]
    assert door.status("m").json()["origin"] == "runtime"
    result_of(door.registry.stopService())


def test_requests_in_flight_on_the_replaced_model_finish_there(door, old, clock, monkeypatch):
    door.registry.startService()
    staged = stage(door, monkeypatch, clock, state="ready")
    old.spec = config.HttpModelSpec(id="m", type="http", url="http://127.0.0.1:9/", timeout=10)
    old.request_timeout = 10.0
    old.holds()
    slow = door.request("POST", "/post/predict?id=m", data=b'{"slow": 1}')

    response = door.add({"id": "m", "type": "http", "dest": "127.0.0.1:8888"}, "?replace=true")

    assert response.status == 200, response.body
    assert door.predict("m").status == 200
    assert len(staged.received) == 1
    assert old.running  # draining
    old.pending[0].callback(ModelAnswer(200, b'{"old": 1}'))
    door.stub.flush()
    assert result_of(slow).json() == {"old": 1}
    clock.advance(0.05)
    assert not old.running
    result_of(door.registry.stopService())


@pytest.mark.parametrize("how", ["failed", "never ready"])
def test_a_replacement_that_does_not_get_ready_is_503_and_the_old_one_keeps_serving(door, old, clock, monkeypatch, how):
    door.registry.startService()
    staged = stage(door, monkeypatch, clock)

    d = door.request("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:8888&replace=true")
    if how == "failed":
        staged.state = "failed"
        clock.advance(0.1)
    else:
        clock.pump([0.1] * 11)  # a model without processes gets one second
    door.stub.flush()

    response = result_of(d)
    error = assert_error(response, 503, "model_unavailable", model="m", message="the old one keeps serving")
    assert response.header("Retry-After") == "1"
    assert "replacement" in error["message"]
    assert door.predict("m").status == 200
    assert len(old.received) == 1 and old.running
    assert not staged.running
    assert door.store.load() == []
    result_of(door.registry.stopService())


def test_a_model_being_changed_cannot_be_changed_or_removed_meanwhile(door, old, clock, monkeypatch):
    door.registry.startService()
    staged = stage(door, monkeypatch, clock)
    d = door.request("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:8888&replace=true")

    again = door.call("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:9999&replace=true")
    remove = door.call("POST", "/post/removemodel?id=m")

    assert_error(again, 409, "conflict", model="m", message="being changed")
    assert_error(remove, 409, "conflict", model="m", message="being changed")
    staged.state = "ready"
    clock.advance(0.1)
    door.stub.flush()
    assert result_of(d).status == 200
    result_of(door.registry.stopService())


# --- addmodel: acknowledged once durable ---------------------------------------------------------


def test_an_add_is_answered_and_served_only_once_it_is_durable(clock):
    store = HeldStore()
    door = Door(clock, store=store)

    d = door.request("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1")

    assert not has_fired(d)
    assert "r" not in door.registry
    store.writes[0].callback(None)
    door.stub.flush()
    assert result_of(d).status == 201
    assert door.ids() == ["r"]


def test_an_add_the_store_cannot_keep_is_500_and_not_registered(clock, logged_errors):
    store = HeldStore()
    door = Door(clock, store=store)
    d = door.request("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1")

    store.writes[0].errback(OSError(28, "No space left on device"))
    door.stub.flush()

    assert_error(result_of(d), 500, "internal_error")
    assert door.ids() == []
    assert len(logged_errors.flush(OSError)) == 1


def test_a_replacement_the_store_cannot_keep_is_stopped(clock, logged_errors, monkeypatch):
    store = HeldStore()
    old = ServiceModel("m", clock)
    door = Door(clock, old, store=store)
    door.registry.startService()
    staged = stage(door, monkeypatch, clock, state="ready")

    d = door.request("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:1&replace=true")
    store.writes[0].errback(OSError(28, "No space left on device"))
    door.stub.flush()
    logged_errors.flush(OSError)

    assert_error(result_of(d), 500, "internal_error")
    assert door.registry.get("m") is old
    try:
        assert not staged.running, "the replacement that was never registered still runs"
    finally:
        staged.stopService()
        result_of(door.registry.stopService())


# --- the runtime rules ---------------------------------------------------------------------------------


def subprocess_table(model_id="s", program=None, **keys):
    return {"id": model_id, "type": "subprocess", "command": [program or sys.executable, "-c", "pass"], **keys}


def test_a_runtime_subprocess_model_is_403_by_default(door):
    response = door.add(subprocess_table())

    assert_error(response, 403, "forbidden", model="s", message="allowed_commands is empty")
    assert door.ids() == ["m", "other"]
    assert door.store.load() == []


def test_the_python_shorthand_is_not_a_way_around_allowed_commands(door):
    response = door.call("POST", '/post/addmodel?id=s&type=subprocess&command=["python","-c","pass"]')

    assert_error(response, 403, "forbidden", model="s")


def test_an_http_model_the_daemon_would_start_is_403_by_default_too(door):
    response = door.add({"id": "srv", "type": "http", "url": "http://127.0.0.1:9/", "command": [sys.executable]})

    assert_error(response, 403, "forbidden", model="srv", message="allowed_commands")


def test_a_program_off_the_list_is_403(clock):
    door = Door(clock, server=server_spec(allowed_commands=["/bin/true"]))

    response = door.add(subprocess_table())

    assert_error(response, 403, "forbidden", model="s", message="is not in allowed_commands")


def test_an_allowed_program_may_be_started(clock):
    door = Door(clock, server=server_spec(allowed_commands=[sys.executable]))

    response = door.add(subprocess_table(workers=2))

    assert response.status == 201, response.body
    assert response.json()["model"]["type"] == "subprocess"
    assert door.status("s").json()["spec"]["command"] == [sys.executable, "-c", "pass"]


def test_programs_are_compared_by_their_resolved_path(clock, tmp_path):
    link = tmp_path / "py"
    link.symlink_to(sys.executable)
    door = Door(clock, server=server_spec(allowed_commands=[str(link)]))

    response = door.add(subprocess_table(program=PYTHON))

    assert response.status == 201, response.body


@pytest.mark.parametrize("table, where", [
    ({"id": "h", "type": "http", "url": "http://127.0.0.1:1/", "headers": {"Authorization": "Bearer ${HOME}"}},
     "headers.Authorization"),
    (subprocess_table("e", env={"TOKEN": "${AIBACKEND_ADMIN_TOKEN}"}), "env.TOKEN"),
])
def test_runtime_environment_references_are_403(clock, table, where):
    door = Door(clock, server=server_spec(allowed_commands=[sys.executable]),
                environ={"HOME": "/root", "AIBACKEND_ADMIN_TOKEN": TOKEN})

    response = door.add(table)

    error = assert_error(response, 403, "forbidden", message=where)
    assert "${VAR}" in error["message"]
    assert TOKEN not in response.body.decode()
    assert door.ids() == []


def test_runtime_environment_references_in_the_query_form_are_403(door):
    response = door.call("POST", '/post/addmodel?id=h&type=http&dest=127.0.0.1:1&headers={"X-Key":"${HOME}"}')

    assert_error(response, 403, "forbidden", message="headers.X-Key")


def test_literal_runtime_headers_are_kept_and_masked(door):
    response = door.add({"id": "h", "type": "http", "url": "http://127.0.0.1:1/",
                         "headers": {"Authorization": "Bearer literal-secret", "X-Mode": "fast"}})

    assert response.status == 201, response.body
    status = door.status("h")
    assert status.json()["spec"]["headers"] == {"Authorization": "***", "X-Mode": "fast"}
    assert b"literal-secret" not in status.body
    assert b"literal-secret" not in response.body


@pytest.mark.parametrize("dest", [
    "169.254.169.254", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
    "http://[fe80::1]:8080/", "http://100.100.100.200/", "0.0.0.0:8080", "http://[::ffff:169.254.169.254]/",
])
def test_a_denied_destination_is_403(door, dest):
    response = door.add({"id": "ssrf", "type": "http", "dest": dest})

    assert_error(response, 403, "forbidden", model="ssrf", message="allowed_destinations")
    assert door.ids() == ["m", "other"]
    assert door.store.load() == []


@pytest.mark.parametrize("url", [
    "http://2852039166/", "http://0xa9fea9fe/", "http://0251.0376.0251.0376/", "http://169.254.43518/",
    "http://0:8080/", "http://[fe80::1%25eth0]:8080/", "http://[::ffff:a9fe:a9fe]/",
])
@pytest_twisted.ensureDeferred
async def test_other_spellings_of_a_denied_address_are_403(clock, url):
    """The check is made on the address the name resolves to, however the address is written."""
    door = Door(clock)

    with pytest.raises(Forbidden) as caught:
        await door.manager.add({"id": "spelled", "type": "http", "url": url})

    assert caught.value.status == 403
    assert "spelled" not in door.registry
    assert door.store.load() == []


def test_a_batch_url_to_a_denied_destination_is_403(door):
    response = door.add({"id": "ssrf", "type": "http", "url": "http://127.0.0.1:8888/predict",
                         "batching": {"max_batch_size": 4, "max_delay_ms": 1,
                                      "url": "http://169.254.169.254/latest/meta-data/"}})

    assert_error(response, 403, "forbidden", model="ssrf", message="allowed_destinations")
    assert door.ids() == ["m", "other"]
    assert door.store.load() == []


def test_an_explicit_destination_list_allows_only_it(clock):
    door = Door(clock, server=server_spec(allowed_destinations=["127.0.0.1"]))

    assert door.add({"id": "ok", "type": "http", "dest": "127.0.0.1:8888"}).status == 201
    assert_error(door.add({"id": "no", "type": "http", "dest": "127.0.0.2:8888"}), 403, "forbidden", model="no")
    assert_error(door.add({"id": "no", "type": "http", "dest": "8.8.8.8:80"}), 403, "forbidden", model="no")


@pytest_twisted.ensureDeferred
async def test_a_name_is_checked_on_the_address_it_resolves_to(clock):
    allowed = ModelManager(Door(clock).registry, MemoryStore(), server_spec(), clock=clock,
                           destination_policy=DestinationPolicy(["127.0.0.1/32"]))
    denied = ModelManager(Door(clock).registry, MemoryStore(), server_spec(), clock=clock,
                          destination_policy=DestinationPolicy(["10.0.0.0/8"]))
    table = {"id": "byname", "type": "http", "url": "http://localhost:8888/"}

    assert (await allowed.add(dict(table)))["added"] == "byname"
    with pytest.raises(Forbidden) as caught:
        await denied.add(dict(table))

    assert "localhost resolves to" in caught.value.message
    assert "byname" not in denied.registry


def test_config_models_are_not_held_to_the_runtime_rules(clock):
    """Programs, destinations and ${VAR}: the operator's file is trusted."""
    cfg = config.parse_config({"models": [
        subprocess_table("prog", env={"HOME": "${HOME}"}),
        {"id": "meta", "type": "http", "url": "http://169.254.169.254/"},
    ]}, environ={"HOME": "/root"})
    door = Door(clock)

    load_models(door.registry, MemoryStore(), cfg, door.manager.validate, Recorder())

    assert door.ids() == ["prog", "meta"]


# --- removemodel ---------------------------------------------------------------------------------


def test_removing_an_absent_model_is_404(door):
    assert_error(door.call("POST", "/post/removemodel?id=ghost"), 404, "unknown_model", model="ghost")
    assert_error(door.call("POST", "/post/removemodel"), 400, "bad_request")


def test_a_removed_runtime_model_is_gone_and_forgotten(door):
    door.call("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1")

    response = door.call("POST", "/post/removemodel?id=r")

    assert response.status == 200, response.body
    assert response.json() == {"removed": "r"}
    assert door.ids() == ["m", "other"]
    assert_error(door.predict("r"), 404, "unknown_model", model="r")
    assert door.store.load() == []
    assert_error(door.call("POST", "/post/removemodel?id=r"), 404, "unknown_model", model="r")


def test_a_removed_config_model_is_kept_removed(door, old):
    door.registry.startService()

    response = door.call("POST", "/post/removemodel?id=m")

    assert response.status == 200, response.body
    assert door.ids() == ["other"]
    assert door.store.load() == [Change("m", "remove")]
    assert not old.running


def test_a_config_model_removed_then_added_again_is_kept_as_the_add(door):
    door.call("POST", "/post/removemodel?id=m")

    response = door.call("POST", "/post/addmodel?id=m&type=http&dest=127.0.0.1:1")

    assert response.status == 201
    assert door.store.load() == [Change("m", "add", {"id": "m", "type": "http", "dest": "127.0.0.1:1"})]


def test_a_request_in_flight_during_removal_gets_its_answer_and_then_the_model_stops(clock):
    slow = ServiceModel("slow", clock, timeout=10).holds()
    door = Door(clock, slow)
    door.registry.startService()
    in_flight = door.request("POST", "/post/predict?id=slow", data=b'{"n": 1}')
    assert slow.in_flight == 1

    removing = door.request("POST", "/post/removemodel?id=slow")

    assert not has_fired(removing)
    assert_error(door.predict("slow"), 404, "unknown_model", model="slow")  # no new request reaches it
    assert slow.running
    clock.advance(1)
    slow.pending[0].callback(ModelAnswer(200, b'{"finished": true}'))
    door.stub.flush()
    assert result_of(in_flight).json() == {"finished": True}
    clock.advance(0.05)
    door.stub.flush()
    assert result_of(removing).json() == {"removed": "slow"}
    assert not slow.running


def test_a_request_that_outlasts_the_drain_does_not_hold_the_removal_forever(clock):
    slow = ServiceModel("slow", clock, timeout=2).holds()
    door = Door(clock, slow)
    door.registry.startService()
    in_flight = door.request("POST", "/post/predict?id=slow", data=b"{}")
    removing = door.request("POST", "/post/removemodel?id=slow")

    clock.pump([0.05] * 41)
    door.stub.flush()

    assert result_of(removing).status == 200
    assert not slow.running
    slow.pending[0].callback(ModelAnswer(200, b'{"late": true}'))
    door.stub.flush()
    assert result_of(in_flight).status == 200


# --- models and status ---------------------------------------------------------------------------


ENV = {"MODEL_SECRET": "s3cr3t-from-env"}


def secret_models(clock):
    from aibackend.httpmodel import HttpModel
    from aibackend.subprocess import SubprocessModel

    cfg = config.parse_config({"models": [
        {"id": "hosted", "type": "http", "url": "https://api.example/v1",
         "headers": {"Authorization": "Bearer ${MODEL_SECRET}", "X-Api-Key": "literal-key-value",
                     "X-Tenant": "${MODEL_SECRET}", "X-Trace": "on"}},
        {"id": "local", "type": "subprocess", "command": [sys.executable, "-c", "pass"], "workers": 2,
         "env": {"TOKEN": "${MODEL_SECRET}", "MODE": "fast"}},
    ]}, environ=ENV)
    hosted, local = cfg.models
    return HttpModel(hosted, reactor=clock, environ=ENV), SubprocessModel(local, reactor=clock, environ=ENV)


def test_models_lists_every_model_with_its_type_state_counters_and_origin(clock):
    door = Door(clock, *secret_models(clock), FakeModel("fake", clock))
    door.call("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1")

    response = door.call("GET", "/get/models")

    assert response.status == 200
    answer = response.json()
    assert answer["count"] == 4
    by_id = {model["id"]: model for model in answer["models"]}
    assert list(by_id) == ["hosted", "local", "fake", "r"]
    assert {i: (m["type"], m["origin"]) for i, m in by_id.items()} == {
        "hosted": ("http", "config"), "local": ("subprocess", "config"), "fake": ("fake", "config"),
        "r": ("http", "runtime"),
    }
    assert (by_id["hosted"]["state"], by_id["hosted"]["in_flight"], by_id["hosted"]["requests"]) == ("ready", 0, 0)
    assert by_id["local"]["processes"] == [] and by_id["local"]["queued"] == 0
    assert b"s3cr3t" not in response.body and b"literal-key-value" not in response.body
    assert door.call("POST", "/post/models").status == 200


def test_status_shows_the_spec_with_secrets_masked(clock):
    door = Door(clock, *secret_models(clock))

    hosted = door.status("hosted")
    local = door.status("local")

    assert hosted.status == 200 and local.status == 200
    assert hosted.json()["spec"]["headers"] == {
        "Authorization": "***", "X-Api-Key": "***", "X-Tenant": "***", "X-Trace": "on",
    }
    assert hosted.json()["origin"] == "config"
    assert local.json()["spec"]["env"] == {"TOKEN": "***", "MODE": "fast"}
    assert local.json()["spec"]["workers"] == 2
    for response in (hosted, local):
        assert b"s3cr3t" not in response.body
        assert b"literal-key-value" not in response.body
        assert {"id", "type", "state", "spec", "origin", "log_entries"} <= set(response.json())


def test_status_needs_an_id_of_a_model(door):
    assert_error(door.call("GET", "/get/status"), 400, "bad_request")
    assert_error(door.call("GET", "/get/status?id=ghost"), 404, "unknown_model", model="ghost")


# --- restart ---------------------------------------------------------------------------------------


@implementer(IRestartable)
class FailingPool(ServiceModel):
    """A model whose processes have failed until it is restarted."""

    live_processes = 0

    def __init__(self, model_id, clock):
        super().__init__(model_id, clock, state="failed")
        self.restarted = 0

    @property
    def restarts(self):
        return self.restarted

    def restart(self):
        self.restarted += 1
        self.state = "starting"


def test_restart_brings_a_failed_model_back(clock):
    pool = FailingPool("p", clock)
    door = Door(clock, pool)

    response = door.call("POST", "/post/restart?id=p")

    assert response.status == 200, response.body
    assert response.json()["restarted"] == "p"
    assert response.json()["model"]["state"] == "starting"
    assert pool.restarted == 1


def test_restart_of_a_model_without_processes_is_400(door):
    assert_error(door.call("POST", "/post/restart?id=other"), 400, "bad_request", model="other",
                 message="no processes")


def test_restart_of_an_absent_model_is_404(door):
    assert_error(door.call("POST", "/post/restart?id=ghost"), 404, "unknown_model", model="ghost")


# --- admin operations are POST and guarded ----------------------------------------------------------


@pytest.mark.parametrize("operation", ["addmodel", "removemodel", "restart", "cleanlogs"])
def test_admin_operations_take_post_only(door, operation):
    response = door.call("GET", f"/get/{operation}?id=m&type=http&dest=127.0.0.1:1")

    assert_error(response, 405, "method_not_allowed", message=f"POST /post/{operation}")
    assert response.header("Allow") == "POST"
    assert door.ids() == ["m", "other"]


@pytest.mark.parametrize("operation", ["addmodel", "removemodel", "restart", "cleanlogs"])
def test_with_a_token_admin_operations_without_it_are_401(clock, operation):
    door = Door(clock, FakeModel("m", clock), guard=Guard(TOKEN, ["tcp:0:interface=127.0.0.1"]))

    missing = door.call("POST", f"/post/{operation}?id=m")
    wrong = door.call("POST", f"/post/{operation}?id=m", headers={"Authorization": "Bearer " + "x" * 28})

    assert_error(missing, 401, "unauthorized")
    assert missing.header("WWW-Authenticate").startswith("Bearer")
    assert_error(wrong, 401, "unauthorized")
    assert wrong.header("WWW-Authenticate").startswith("Bearer")
    assert door.ids() == ["m"]


def test_with_a_token_the_token_adds_a_model(clock):
    door = Door(clock, guard=Guard(TOKEN, ["tcp:0:interface=127.0.0.1"]))

    response = door.call("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1",
                         headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status == 201, response.body
    assert door.ids() == ["r"]


def test_without_a_token_a_daemon_listening_beyond_loopback_refuses_admin_operations(clock):
    door = Door(clock, guard=Guard(None, ["tcp:0:interface=0.0.0.0"]))

    response = door.call("POST", "/post/addmodel?id=r&type=http&dest=127.0.0.1:1")

    assert_error(response, 403, "forbidden", message="listens beyond loopback")
    assert door.call("GET", "/get/models").status == 200
    assert door.ids() == []


@pytest.mark.parametrize("url, headers, status", [
    ("http://127.0.0.1:8080", {}, 201),
    ("http://localhost:8080", {}, 201),
    ("http://evil.example:8080", {}, 403),
    ("http://127.0.0.1:8080", {"Origin": "http://evil.example"}, 403),
    ("http://127.0.0.1:8080", {"Origin": "http://127.0.0.1:8080"}, 201),
])
def test_without_a_token_loopback_rules_apply(clock, url, headers, status):
    door = Door(clock, guard=Guard(None, ["tcp:0:interface=127.0.0.1"]))

    response = door.call("POST", url + "/post/addmodel?id=r&type=http&dest=127.0.0.1:1", headers=headers)

    assert response.status == status, response.body
    if status == 403:
        assert_error(response, 403, "forbidden")


def test_api_keys_guard_predict_and_the_reading_operations(clock):
    model = FakeModel("m", clock)
    door = Door(clock, model, guard=Guard(TOKEN, ["tcp:0:interface=127.0.0.1"], [KEY]))

    for url in ("/post/predict?id=m", "/get/models", "/get/status?id=m", "/get/getlogs?id=m"):
        method = "POST" if url.startswith("/post/") else "GET"
        missing = door.call(method, url, data=b"{}" if method == "POST" else None)
        assert_error(missing, 401, "unauthorized")
        assert missing.header("WWW-Authenticate").startswith("Bearer")
        for key in (KEY, TOKEN):
            assert door.call(method, url, headers={"Authorization": f"Bearer {key}"}).status == 200, (url, key)
    assert_error(door.predict("m", headers={"Authorization": "Bearer wrong-key-0123456789"}), 401, "unauthorized")
    assert len(model.received) == 2


# --- what is loaded at start -------------------------------------------------------------------------


class Recorder:
    """A logger that keeps what it is told."""

    def __init__(self):
        self.errors = []

    def error(self, format, **fields):
        self.errors.append(fields)


def test_at_start_the_registry_is_the_config_plus_the_kept_changes(clock):
    cfg = config.parse_config({"models": [
        {"id": "kept", "type": "http", "url": "http://127.0.0.1:1/"},
        {"id": "overridden", "type": "http", "url": "http://127.0.0.1:2/"},
        {"id": "removed", "type": "http", "url": "http://127.0.0.1:3/"},
    ]}, environ={})
    store = MemoryStore()
    store.put("added", {"id": "added", "type": "httpmodel", "dest": "127.0.0.1:4"})
    store.put("overridden", {"id": "overridden", "type": "http", "url": "http://127.0.0.1:22/"})
    store.remove("removed")
    store.remove("never-existed")
    door = Door(clock)
    log = Recorder()

    load_models(door.registry, store, cfg, door.manager.validate, log)

    assert door.ids() == ["kept", "overridden", "added"]
    assert door.status("overridden").json()["url"] == "http://127.0.0.1:22/"
    assert door.status("overridden").json()["origin"] == "runtime"
    assert door.status("kept").json()["origin"] == "config"
    assert door.status("added").json()["url"] == "http://127.0.0.1:4"
    assert log.errors == []


def test_a_kept_model_that_breaks_the_rules_now_is_logged_and_left_out(clock):
    store = MemoryStore()
    store.put("prog", subprocess_table("prog"))  # allowed once, not any more
    store.put("ok", {"id": "ok", "type": "http", "url": "http://127.0.0.1:1/"})
    store.put("broken", {"id": "broken", "type": "http"})
    door = Door(clock)
    log = Recorder()

    load_models(door.registry, store, config.Config(), door.manager.validate, log)

    assert door.ids() == ["ok"]
    assert {entry["model"] for entry in log.errors} == {"prog", "broken"}
    why = {entry["model"]: entry["why"] for entry in log.errors}
    assert "allowed_commands" in why["prog"]
    assert "url" in why["broken"]


# --- the daemon's wiring: runtime models connect through the destination policy ------------------------


def test_runtime_models_connect_only_where_the_policy_allows_config_models_anywhere():
    """As if a runtime model's name were rebound to a denied address after addmodel checked it."""
    from twisted.internet.testing import MemoryReactorClock

    from aibackend.interfaces import RequestContext
    from aibackend.daemon import build

    reactor = MemoryReactorClock()
    cfg = config.parse_config({"server": {"allowed_destinations": ["127.0.0.1"]}}, environ={})
    registry = build(cfg, reactor, listen=[], max_body_bytes=1000, store=MemoryStore(), environ={}).parts.registry
    spec = http_spec("rebound", url="http://127.0.0.2:9/", timeout=5)

    runtime = registry.build(spec, runtime=True)
    refused = runtime.send(b"{}", RequestContext(request_id="r"))
    assert reactor.tcpClients == []
    trusted = registry.build(spec, runtime=False)
    attempted = trusted.send(b"{}", RequestContext(request_id="t"))
    assert [client[1] for client in reactor.tcpClients] == [9]

    assert failure_of(refused, Forbidden).value.status == 403
    reactor.advance(10)  # nobody answers the trusted model's connection
    failure_of(attempted, BadGateway, GatewayTimeout)


@pytest_twisted.ensureDeferred
async def test_every_replica_url_of_a_runtime_model_is_checked():
    from twisted.internet import reactor

    from aibackend.admin import ModelManager
    from aibackend.config import ServerSpec
    from aibackend.destinations import DestinationPolicy
    from aibackend.errors import Forbidden
    from aibackend.registry import ModelDeps, ModelRegistry
    from aibackend.store import MemoryStore

    registry = ModelRegistry(ModelDeps(reactor=reactor, environ={}))
    manager = ModelManager(registry, MemoryStore(), ServerSpec(), clock=reactor,
                           destination_policy=DestinationPolicy(None), environ={})
    table = {"id": "r", "type": "http", "urls": ["http://127.0.0.1:9/p", "http://169.254.169.254/latest"]}
    with pytest.raises(Forbidden) as refused:
        await manager.add(table)
    assert "169.254.169.254" in refused.value.message
    assert "r" not in registry
