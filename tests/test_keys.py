"""
Client keys as stored objects (aibackend.keys): the ring, hashing, both stores, the guard,
the admin operations and a key's models on every front door, in memory.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from aibackend.auth import Guard, bearer
from aibackend.config import parse_config
from aibackend.daemon import wire_policy
from aibackend.errors import Unauthorized
from aibackend.keys import SECRET_LENGTH, KeyManager, KeyRecord, KeyRing, digest, key_id_of, new_secret
from aibackend.policy import Caller
from aibackend.ratelimit import Limits
from aibackend.store import IKeyStore, KeyExists, MemoryStore, SQLiteStore
from aibackend.testing import ADMIN_TOKEN, FakeModel, StubFrontDoor, assert_error, assert_openai_error
from aibackend.testing import assert_v2_error, failure_of, has_fired, result_of

LOOPBACK = ["tcp:0:interface=127.0.0.1"]
CONFIGURED = "configured-key-0123456789"


class HeldStore(MemoryStore):
    """A MemoryStore whose key writes wait for the test (a slow disk)."""

    def __init__(self):
        super().__init__()
        self.held: list[Deferred] = []

    def put_key(self, row):
        done = super().put_key(row)
        held = Deferred()
        self.held.append(held)
        return held.addCallback(lambda _: done)

    def revoke_key(self, key_id, when):
        super().revoke_key(key_id, when)
        held = Deferred()
        self.held.append(held)
        return held


class Keyed:
    """A StubFrontDoor with a KeyManager over a store and the daemon's policy wiring."""

    def __init__(self, clock, *models, store=None, guard=None):
        self.store = store if store is not None else MemoryStore()
        self.guard = guard if guard is not None else Guard(None, LOOPBACK)
        self.door = StubFrontDoor(clock, models or (FakeModel("chat", clock), FakeModel("iris", clock)),
                                  guard=self.guard)
        self.keys = KeyManager(self.guard.keys, self.store, clock=clock)
        self.keys.load()
        self.door.front_door.api.use_keys(self.keys)
        self.core = self.door.front_door.core
        wire_policy(self.core, parse_config({"server": {}}, environ={}).server, self.keys, self.door.registry)

    def call(self, method, url, key=None, **kwargs):
        if key is not None:
            kwargs.setdefault("headers", {})["Authorization"] = f"Bearer {key}"
        return self.door.call(method, url, **kwargs)

    def add(self, **table):
        return self.call("POST", "/post/addkey", data=json.dumps(table).encode())


# --- secrets and the ring ----------------------------------------------------------------------


def test_a_secret_names_its_key_and_is_stored_as_its_sha256():
    secret = new_secret("0123456789ab")
    assert secret.startswith("aib-0123456789ab-") and len(secret) == SECRET_LENGTH
    assert key_id_of(secret) == "0123456789ab"
    assert key_id_of(CONFIGURED) is None and key_id_of("aib-short") is None
    assert digest(secret) == hashlib.sha256(secret.encode()).digest()
    assert new_secret("0123456789ab") != secret


def record(name="team", secret=None, **fields):
    secret = secret or new_secret("0123456789ab")
    return KeyRecord(key_id=key_id_of(secret), name=name, models=fields.pop("models", ("chat",)),
                     limits=fields.pop("limits", None), created=1.0, digest=digest(secret), **fields)


def test_the_ring_finds_a_stored_key_by_its_secret_and_refuses_a_revoked_one():
    ring = KeyRing()
    assert not ring.required
    secret = new_secret("0123456789ab")
    ring.replace([record(secret=secret, limits=Limits(rpm=5))])
    assert ring.required and ring.stored
    assert ring.caller(secret) == Caller("team", frozenset({"chat"}), Limits(rpm=5))
    assert ring.caller(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert ring.caller(new_secret("0123456789ab")) is None  # the same id, another secret
    ring.put(record(secret=secret, revoked=2.0))
    assert ring.caller(secret) is None
    assert ring.required  # a revoked key still exists: revoking the last key never opens the daemon


def test_configured_keys_are_named_by_position_and_the_admin_token_admin():
    ring = KeyRing(["first-key-0123456789", CONFIGURED], ADMIN_TOKEN)
    assert ring.required and not ring.stored
    assert ring.caller("first-key-0123456789") == Caller("config-1")
    assert ring.caller(CONFIGURED) == Caller("config-2")
    assert ring.caller(ADMIN_TOKEN) == Caller("admin")
    assert ring.caller("wrong") is None


def test_a_stored_key_reads_back_from_its_row():
    kept = record(limits=Limits(rpm=10, max_concurrent=2), rotated=3.0)
    assert KeyRecord.from_row(json.loads(json.dumps(kept.row()))) == kept
    assert "digest" not in kept.public() and kept.public()["prefix"] == "aib-0123456789ab-"
    with pytest.raises(ValueError, match="name"):
        KeyRecord.from_row({**kept.row(), "name": "no spaces"})


# --- the stores ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryStore()
        return
    from twisted.internet import reactor

    kept = SQLiteStore(reactor, str(tmp_path / "state"))
    yield kept
    kept._db.close()


def test_both_stores_keep_keys(store):
    verifyObject(IKeyStore, store)
    row = record(limits=Limits(tpm=100)).row()
    store._put_key(row) if isinstance(store, SQLiteStore) else store.put_key(row)
    assert store.load_keys() == [row]
    if isinstance(store, SQLiteStore):
        with pytest.raises(KeyExists):
            store._put_key({**row, "id": "ffffffffffff"})
        store._update_key(row["id"], "revoked = ?", (7.0,))
        store._update_key(row["id"], "digest = ?, rotated = ?", ("ab" * 32, 8.0))
    else:
        assert isinstance(failure_of(store.put_key({**row, "id": "ffffffffffff"})).value, KeyExists)
        store.revoke_key(row["id"], 7.0)
        store.rotate_key(row["id"], "ab" * 32, 8.0)
    assert store.load_keys() == [{**row, "revoked": 7.0, "digest": "ab" * 32, "rotated": 8.0}]


def test_sqlite_keeps_keys_across_a_restart(tmp_path):
    from twisted.internet import reactor

    first = SQLiteStore(reactor, str(tmp_path))
    row = record().row()
    first._put_key(row)
    first._update_key(row["id"], "revoked = ?", (5.0,))
    first._db.close()
    again = SQLiteStore(reactor, str(tmp_path))
    assert again.load_keys() == [{**row, "revoked": 5.0}]
    again._db.close()


# --- the admin operations -----------------------------------------------------------------------


def test_addkey_shows_the_secret_once_and_the_key_works_at_once(clock):
    keyed = Keyed(clock)
    assert keyed.core.policy is None  # no key: no policy, anyone may call
    assert keyed.call("POST", "/post/predict?id=iris", data=b"{}").status == 200

    made = keyed.add(name="team-a", models=["chat"], limits={"rpm": 60})
    assert made.status == 201, made.body
    body = made.json()
    secret = body.pop("secret")
    assert body == {"name": "team-a", "id": key_id_of(secret), "prefix": f"aib-{key_id_of(secret)}-",
                    "models": ["chat"], "limits": {"rpm": 60}, "created": "1970-01-01T00:00:00Z",
                    "rotated": None, "revoked": None}
    assert keyed.core.policy is not None  # made with the first key

    assert keyed.call("POST", "/post/predict?id=chat", secret, data=b"{}").status == 200
    assert_error(keyed.call("POST", "/post/predict?id=chat", data=b"{}"), 401, "unauthorized")

    listed = keyed.call("GET", "/get/keys")
    assert listed.status == 200
    assert listed.json() == {"count": 1, "keys": [body]}
    assert secret not in listed.body.decode() and secret[len("aib-") + 13:] not in listed.body.decode()
    stored = json.dumps(keyed.store.load_keys())
    assert secret not in stored and hashlib.sha256(secret.encode()).hexdigest() in stored


def test_rotate_refuses_the_old_secret_at_once_and_revoke_refuses_the_key(clock):
    keyed = Keyed(clock)
    old = keyed.add(name="team", models="*").json()["secret"]
    clock.advance(10)
    rotated = keyed.call("POST", "/post/rotatekey?name=team")
    assert rotated.status == 200, rotated.body
    new = rotated.json()["secret"]
    assert rotated.json()["rotated"] == "1970-01-01T00:00:10Z" and key_id_of(new) == key_id_of(old)
    assert_error(keyed.call("POST", "/post/predict?id=iris", old, data=b"{}"), 401, "unauthorized")
    assert keyed.call("POST", "/post/predict?id=iris", new, data=b"{}").status == 200

    revoked = keyed.call("POST", "/post/revokekey?name=team")
    assert revoked.status == 200 and revoked.json()["revoked"] == "1970-01-01T00:00:10Z"
    assert_error(keyed.call("POST", "/post/predict?id=iris", new, data=b"{}"), 401, "unauthorized")
    # In each front door's shape:
    assert_v2_error(keyed.call("GET", "/v2/models/iris", new), 401)
    assert_openai_error(keyed.call("POST", "/v1/chat/completions", new,
                                   data=b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'),
                        401, "unauthorized")
    assert keyed.call("POST", "/post/revokekey?name=team").status == 200  # again: nothing changes
    assert_error(keyed.call("POST", "/post/rotatekey?name=team"), 409, "conflict", message="revoked")
    # Revoking the last key leaves keys required.
    assert_error(keyed.call("POST", "/post/predict?id=iris", data=b"{}"), 401, "unauthorized")


def test_delete_forgets_a_key_and_with_none_left_no_key_is_needed(clock):
    keyed = Keyed(clock)
    first = keyed.add(name="first").json()["secret"]
    second = keyed.add(name="second").json()["secret"]
    deleted = keyed.call("POST", "/post/deletekey?name=first")
    assert deleted.status == 200 and deleted.json()["deleted"] and "secret" not in deleted.json()
    assert_error(keyed.call("POST", "/post/predict?id=iris", first, data=b"{}"), 401, "unauthorized")
    assert keyed.call("POST", "/post/predict?id=iris", second, data=b"{}").status == 200
    assert [key["name"] for key in keyed.call("GET", "/get/keys").json()["keys"]] == ["second"]
    assert list(keyed.store.keys.values())[0]["name"] == "second"  # forgotten by the store too
    assert_error(keyed.call("POST", "/post/deletekey?name=first"), 404, "not_found")
    assert keyed.add(name="first").status == 201  # the name is free again
    for name in ("first", "second"):
        assert keyed.call("POST", f"/post/deletekey?name={name}").status == 200
    assert keyed.call("POST", "/post/predict?id=iris", data=b"{}").status == 200  # no key left: open again
    assert keyed.core.policy is None or keyed.core.policy.usage is not None


@pytest.mark.parametrize("table, message", [
    ({}, "needs a name"),
    ({"name": "a b"}, "not 'a b'"),
    ({"name": "x" * 65}, "1 to 64"),
    ({"name": "admin"}, "reserved"),
    ({"name": "config-1"}, "reserved"),
    ({"name": "other"}, "reserved"),
    ({"name": "-"}, "the first a letter"),
    ({"name": ".hidden"}, "the first a letter"),
    ({"name": "k", "models": []}, "non-empty list"),
    ({"name": "k", "models": "chat"}, "non-empty list"),
    ({"name": "k", "models": ["bad id!"]}, "not a model id"),
    ({"name": "k", "limits": {"rpm": 0}}, "limits.rpm"),
    ({"name": "k", "limits": {"rps": 1}}, "no key 'rps'"),
    ({"name": "k", "secret": "mine"}, "no key 'secret'"),
    ([1], "JSON object"),
])
def test_addkey_refuses_a_wrong_table(clock, table, message):
    keyed = Keyed(clock)
    answer = keyed.call("POST", "/post/addkey", data=json.dumps(table).encode())
    assert_error(answer, 400, "bad_request", message=message)
    assert keyed.store.keys == {}


def test_names_are_unique_and_unknown_keys_404(clock):
    keyed = Keyed(clock)
    assert keyed.add(name="team").status == 201
    assert_error(keyed.add(name="team"), 409, "conflict")
    assert_error(keyed.call("POST", "/post/revokekey?name=nobody"), 404, "not_found")
    assert_error(keyed.call("POST", "/post/rotatekey?name=nobody"), 404, "not_found")
    assert_error(keyed.call("POST", "/post/revokekey"), 400, "bad_request", message="?name=")
    assert_error(keyed.call("POST", "/post/addkey"), 400, "bad_request")
    assert_error(keyed.call("GET", "/post/addkey"), 405, "method_not_allowed")
    assert_error(keyed.call("GET", "/get/revokekey?name=team"), 405, "method_not_allowed")


def test_a_model_not_there_yet_may_be_named(clock):
    keyed = Keyed(clock)
    assert keyed.add(name="later", models=["not-yet"]).json()["models"] == ["not-yet"]


def test_an_answer_waits_for_the_store_and_a_second_change_meanwhile_is_a_conflict(clock):
    keyed = Keyed(clock, store=HeldStore())
    pending = keyed.door.request("POST", "/post/addkey", data=b'{"name": "slow"}')
    assert not has_fired(pending)
    assert_error(keyed.add(name="slow"), 409, "conflict")
    keyed.store.held.pop().callback(None)
    keyed.door.flush()
    assert result_of(pending).status == 201
    pending = keyed.door.request("POST", "/post/revokekey?name=slow")
    assert not has_fired(pending)
    keyed.store.held.pop().callback(None)
    keyed.door.flush()
    assert result_of(pending).status == 200


def test_key_operations_are_admin_operations(clock):
    keyed = Keyed(clock, guard=Guard(ADMIN_TOKEN, LOOPBACK))
    assert_error(keyed.add(name="team"), 401, "unauthorized")
    secret = keyed.call("POST", "/post/addkey", ADMIN_TOKEN, data=b'{"name": "team"}').json()["secret"]
    for method, url in (("GET", "/get/keys"), ("POST", "/post/revokekey?name=team"),
                        ("POST", "/post/rotatekey?name=team")):
        assert_error(keyed.call(method, url, secret), 401, "unauthorized")
    assert keyed.call("GET", "/get/keys", ADMIN_TOKEN).status == 200


def test_keys_are_loaded_from_the_store_at_start(clock):
    store = MemoryStore()
    first = Keyed(clock, store=store)
    secret = first.add(name="team", models=["chat"]).json()["secret"]
    revoked = first.add(name="gone").json()["secret"]
    first.call("POST", "/post/revokekey?name=gone")

    again = Keyed(clock, store=store)
    assert again.core.policy is not None
    assert again.call("POST", "/post/predict?id=chat", secret, data=b"{}").status == 200
    assert_error(again.call("POST", "/post/predict?id=chat", revoked, data=b"{}"), 401, "unauthorized")
    assert [key["name"] for key in again.call("GET", "/get/keys").json()["keys"]] == ["gone", "team"]


def test_reload_follows_the_store(clock):
    store = MemoryStore()
    primary, worker = Keyed(clock, store=store), Keyed(clock, store=store)
    secret = primary.add(name="team").json()["secret"]
    assert worker.core.policy is None
    result_of(worker.keys.reload())
    assert worker.core.policy is not None
    assert worker.call("POST", "/post/predict?id=iris", secret, data=b"{}").status == 200
    primary.call("POST", "/post/revokekey?name=team")
    result_of(worker.keys.reload())
    assert_error(worker.call("POST", "/post/predict?id=iris", secret, data=b"{}"), 401, "unauthorized")


def test_a_change_waits_for_the_followers(clock):
    keyed = Keyed(clock)
    told, waiting = [], Deferred()
    keyed.keys.changed.append(lambda name: (told.append(name), waiting)[1])
    pending = keyed.door.request("POST", "/post/addkey", data=b'{"name": "team"}')
    assert told == ["team"] and not has_fired(pending)
    waiting.callback(None)
    keyed.door.flush()
    assert result_of(pending).status == 201


# --- the guard ----------------------------------------------------------------------------------


def test_configured_keys_and_the_admin_token_keep_working_beside_stored_ones(clock):
    keyed = Keyed(clock, guard=Guard(ADMIN_TOKEN, LOOPBACK, [CONFIGURED]))
    for key in (CONFIGURED, ADMIN_TOKEN):
        assert keyed.call("POST", "/post/predict?id=iris", key, data=b"{}").status == 200
    secret = keyed.call("POST", "/post/addkey", ADMIN_TOKEN, data=b'{"name": "team"}').json()["secret"]
    for key in (CONFIGURED, ADMIN_TOKEN, secret):
        assert keyed.call("POST", "/post/predict?id=iris", key, data=b"{}").status == 200
    answer = keyed.call("POST", "/post/predict?id=iris", "wrong-0123456789", data=b"{}")
    assert_error(answer, 401, "unauthorized")
    assert answer.header("WWW-Authenticate") == 'Bearer realm="aibackend"'


class Request:
    aibackend_caller = None

    def __init__(self, key=None):
        self.key = key

    def getHeader(self, name):
        assert name == b"authorization"
        return None if self.key is None else f"Bearer {self.key}".encode()


def test_the_guard_names_the_caller():
    guard = Guard(ADMIN_TOKEN, LOOPBACK, [CONFIGURED])
    for key, name in ((CONFIGURED, "config-1"), (ADMIN_TOKEN, "admin")):
        request = Request(key)
        guard.check_client(request)
        assert request.aibackend_caller.name == name
    with pytest.raises(Unauthorized):
        guard.check_client(Request())
    open_guard = Guard(None, LOOPBACK)
    request = Request("anything")
    open_guard.check_client(request)  # no key exists: anyone may call, unnamed
    assert request.aibackend_caller is None


class RawRequest:
    """A request whose Authorization header is the bytes given (None: none)."""

    aibackend_caller = None

    def __init__(self, header):
        self.header = header

    def getHeader(self, name):
        assert name == b"authorization"
        return self.header


def test_the_guard_reads_a_header_as_bearer_and_the_ring_do():
    # The guard reads the header's bytes (its hot path); what it finds is what bearer()'s
    # text and KeyRing.caller() find, whatever the spelling, the spaces, or bytes past ASCII.
    stored_secret = new_secret("0123456789ab")
    ring = KeyRing([CONFIGURED, "cl\u00e9-0123456789abcdef"], ADMIN_TOKEN)
    ring.replace([KeyRecord(key_id="0123456789ab", name="team-a", models=None, limits=None, created=0.0,
                            digest=digest(stored_secret))])
    guard = Guard(ADMIN_TOKEN, LOOPBACK, keys=ring)
    secrets = [CONFIGURED, ADMIN_TOKEN, stored_secret, "wrong-0123456789", "", stored_secret[:-1] + "x"]
    headers = [b"Bearer " + b"cl\xe9-0123456789abcdef", "Bearer cl\u00e9-0123456789abcdef".encode(), b"Bearer",
               b"Basic " + CONFIGURED.encode(), b"Bearer\t" + CONFIGURED.encode(), b"", None]
    for secret in secrets:
        for spelling in (b"Bearer ", b"bearer ", b"BEARER  ", b"Bearer \x1f", b"Bearer \t"):
            headers.append(spelling + secret.encode() + b" \x1c")
            headers.append(spelling + secret.encode())
    found = set()
    for header in headers:
        request = RawRequest(header)
        given = bearer(request)
        expected = None if given is None else ring.caller(given)
        try:
            guard.check_client(request)
        except Unauthorized:
            assert expected is None, header
        else:
            assert request.aibackend_caller is expected is not None, header
            found.add(expected.name)
    assert found == {"config-1", "config-2", "admin", "team-a"}


# --- a key's models on every front door ---------------------------------------------------------


@pytest.fixture
def chat_only(clock):
    keyed = Keyed(clock)
    keyed.secret = keyed.add(name="chat-team", models=["chat"]).json()["secret"]
    return keyed


def test_a_key_for_chat_may_not_call_iris_on_any_front_door(chat_only):
    secret = chat_only.secret
    assert_error(chat_only.call("POST", "/post/predict?id=iris", secret, data=b"{}"), 403, "forbidden",
                 model="iris", message="may not call model 'iris'")
    assert_error(chat_only.call("GET", "/get/predict?id=iris", secret), 403, "forbidden", model="iris")
    assert_v2_error(chat_only.call("POST", "/v2/models/iris/infer", secret,
                                   data=b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'),
                    403, message="may not call model 'iris'")
    assert_openai_error(chat_only.call("POST", "/v1/chat/completions", secret,
                                       data=b'{"model": "iris", "messages": [{"role": "user", "content": "hi"}]}'),
                        403, "forbidden", message="may not call model 'iris'")
    for url in ("/get/status?id=iris", "/get/getlogs?id=iris"):
        assert_error(chat_only.call("GET", url, secret), 403, "forbidden", model="iris")
    for url in ("/v2/models/iris", "/v2/models/iris/ready"):
        assert_v2_error(chat_only.call("GET", url, secret), 403)
    assert_openai_error(chat_only.call("GET", "/v1/models/iris", secret), 403, "forbidden")
    # chat is allowed everywhere
    assert chat_only.call("POST", "/post/predict?id=chat", secret, data=b"{}").status == 200
    for url in ("/get/status?id=chat", "/get/getlogs?id=chat", "/v2/models/chat", "/v1/models/chat"):
        assert chat_only.call("GET", url, secret).status == 200, url


def test_listings_show_only_the_keys_models(chat_only):
    secret = chat_only.secret
    assert [m["id"] for m in chat_only.call("GET", "/get/models", secret).json()["models"]] == ["chat"]
    assert chat_only.call("GET", "/v2/models", secret).json() == {"models": ["chat"]}
    assert [m["id"] for m in chat_only.call("GET", "/v1/models", secret).json()["data"]] == ["chat"]
    everything = chat_only.add(name="all").json()["secret"]
    assert len(chat_only.call("GET", "/v1/models", everything).json()["data"]) == 2


# --- the daemon's wiring ------------------------------------------------------------------------


def test_the_daemon_has_a_policy_only_once_a_key_exists():
    from twisted.internet.testing import MemoryReactorClock

    from aibackend.daemon import build

    def built(store, **server):
        cfg = parse_config({"server": server}, environ={})
        return build(cfg, MemoryReactorClock(), listen=[], max_body_bytes=1000, store=store, environ={}).parts

    assert built(MemoryStore()).front_door.core.policy is None
    # Configured keys call every model without limits: a policy only for their usage (on
    # by default once there are keys), none with usage = false.
    assert built(MemoryStore(), api_keys=[CONFIGURED], usage=False).front_door.core.policy is None
    configured = built(MemoryStore(), api_keys=[CONFIGURED]).front_door.core.policy
    assert configured is not None and configured.usage is not None  # (and the limiter, idle: no limits)
    store = MemoryStore()
    store.put_key(record().row())
    parts = built(store)
    assert parts.front_door.core.policy is not None
    assert parts.guard.keys.required and list(parts.guard.keys.records) == ["team"]
