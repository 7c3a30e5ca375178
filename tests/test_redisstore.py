"""
The store seam: one suite run against both L{aibackend.store.IModelStore}s (SQLite and
the shared Redis store), then what the Redis store adds: its change feed, its resync
after a gap, Redis gone or paused, its masked URL. Against a real redis-server of the
module's own (L{aibackend.testing.RedisServer}), on the real reactor.
"""

from __future__ import annotations

import itertools
import json

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from aibackend.redisstore import WRITE, ISharedStore, RedisStore, StoreUnavailable, masked_url
from aibackend.errors import NotFound
from aibackend.store import Change, IKeyStore, IModelStore, KeyExists, SQLiteStore
from aibackend.testing import RedisServer, need_redis_server

TABLE = {"id": "m", "type": "http", "url": "http://127.0.0.1:1/"}
_prefixes = itertools.count()


def _prefix() -> str:
    return f"test{next(_prefixes)}:"


@pytest_twisted.async_yield_fixture
async def open_redis(redis_server):
    """Open Redis stores (a prefix of the test's own unless told) on the real reactor; closed at the end."""
    from twisted.internet import reactor

    stores = []
    prefix = _prefix()

    def open_(prefix=prefix, url=None, **options):
        store = RedisStore(reactor, url or redis_server.url, prefix=prefix, **options)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


@pytest_twisted.async_yield_fixture(params=["sqlite", "redis"])
async def any_store(request, tmp_path):
    """Each store the daemon can have, opened twice on the same place (the second: a restart, or another daemon)."""
    from twisted.internet import reactor

    stores = []
    if request.param == "sqlite":
        def open_():
            stores.append(SQLiteStore(reactor, str(tmp_path / "state")))
            return stores[-1]
    else:
        server = request.getfixturevalue("redis_server")
        prefix = _prefix()

        def open_():
            stores.append(RedisStore(reactor, server.url, prefix=prefix))
            return stores[-1]

    yield open_
    for store in stores:
        await store.close()


async def eventually(predicate, timeout: float = 5.0, what: str = "it"):
    from twisted.internet import reactor

    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"gave up after {timeout} s waiting for {what}")


# --- the seam: both stores ----------------------------------------------------------------


def test_each_store_provides_the_interface(any_store):
    assert verifyObject(IModelStore, any_store())


@pytest_twisted.ensureDeferred
async def test_what_is_kept_is_read_again_one_change_per_model_the_newest_last(any_store):
    store = any_store()
    await store.put("a", TABLE)
    await store.put("b", {"id": "b"})
    await store.remove("from-config")
    await store.put("gone", {"id": "gone"})
    await store.forget("gone")

    again = any_store()
    expected = [Change("a", "add", TABLE), Change("b", "add", {"id": "b"}), Change("from-config", "remove")]
    assert sorted(again.load(), key=lambda change: change.model_id) == expected
    assert sorted(await again.read(), key=lambda change: change.model_id) == expected


@pytest_twisted.ensureDeferred
async def test_a_runtime_add_over_a_removed_config_model_is_an_add_again(any_store):
    store = any_store()
    await store.remove("m")
    await store.put("m", TABLE)

    assert any_store().load() == [Change("m", "add", TABLE)]


@pytest_twisted.ensureDeferred
async def test_the_store_keeps_a_copy_of_the_table(any_store):
    store = any_store()
    table = dict(TABLE)
    await store.put("m", table)
    table["url"] = "http://changed/"

    assert (await any_store().read()) == [Change("m", "add", TABLE)]


@pytest_twisted.ensureDeferred
async def test_closing_an_unused_store_is_fine(any_store):
    await any_store().close()


# --- the Redis store ----------------------------------------------------------------------


def test_the_redis_store_is_a_shared_store(open_redis):
    assert verifyObject(ISharedStore, open_redis())


@pytest_twisted.ensureDeferred
async def test_a_change_is_one_atomic_write_the_hash_the_counter_and_the_feed(open_redis, redis_server):
    store = open_redis(prefix="atomic:")
    await store.put("m", TABLE)
    await store.remove("c")
    await store.forget("m")

    client = redis_server.client()
    assert client.get("atomic:version") == "3"
    assert client.hgetall("atomic:models") == {"c": '{"v":2,"action":"remove","table":null}'}
    feed = [(fields["v"], fields["id"], fields["action"]) for _, fields in client.xrange("atomic:changes")]
    assert feed == [("1", "m", "add"), ("2", "c", "remove"), ("3", "m", "forget")]
    assert json.loads(client.xrange("atomic:changes")[0][1]["table"]) == TABLE


@pytest_twisted.ensureDeferred
async def test_a_follower_gets_every_change_another_store_makes_in_order(open_redis):
    follower, writer = open_redis(), open_redis()
    seen = []
    follower.follow(lambda changes, full: seen.append(changes))
    await eventually(lambda: seen, what="the first full read")
    assert seen[0] == []

    for index in range(20):
        await writer.put(f"m{index}", {"id": f"m{index}"})
    await writer.put("m0", {"id": "m0", "timeout": 3})  # replaced: moved last, as SQLite orders it
    await writer.remove("m1")

    await eventually(lambda: follower.version == 22, what="the feed")
    assert seen[-1] == [Change(f"m{i}", "add", {"id": f"m{i}"}) for i in range(2, 20)] + [
        Change("m0", "add", {"id": "m0", "timeout": 3}), Change("m1", "remove")]
    assert follower.state()["up"] is True


@pytest_twisted.ensureDeferred
async def test_an_apply_that_raises_is_logged_and_the_follower_reads_on(open_redis, logged_errors):
    follower, writer = open_redis(), open_redis()
    seen = []

    def apply(changes, full):
        seen.append(changes)
        if len(seen) == 2:
            raise RuntimeError("a bug in the daemon's apply")

    follower.follow(apply)
    await eventually(lambda: seen, what="the first full read")
    await writer.put("m0", {"id": "m0"})
    await eventually(lambda: len(seen) >= 2, what="the change that fails to apply")
    await writer.put("m1", {"id": "m1"})
    await eventually(lambda: follower.version == 2 and len(seen) >= 3, what="the feed, read on")
    assert seen[-1][-1] == Change("m1", "add", {"id": "m1"})
    assert len(logged_errors.flush(RuntimeError)) == 1


@pytest_twisted.ensureDeferred
async def test_a_change_made_here_is_answered_once_the_feed_brought_it_back(open_redis):
    store = open_redis()
    applied = []
    store.follow(lambda changes, full: applied.append([c.model_id for c in changes]))
    await eventually(lambda: applied, what="the first full read")

    await store.put("m", TABLE)

    assert store.version == 1 and applied[-1] == ["m"] and not store.behind()


@pytest_twisted.ensureDeferred
async def test_a_gap_in_the_feed_makes_the_follower_read_everything_again(open_redis, redis_server):
    follower = open_redis()
    seen, fulls = [], []
    follower.follow(lambda changes, full: (seen.append(changes), fulls.append(full)))
    await eventually(lambda: seen, what="the first full read")
    writer = open_redis()
    await writer.put("a", {"id": "a"})
    await eventually(lambda: follower.version == 1, what="the first change")

    # Behind the feed's back (as a trimmed stream would look): the counter jumps, the hash changes.
    client = redis_server.client()
    prefix = follower.prefix
    client.set(prefix + "version", 41)
    client.hset(prefix + "models", "b", '{"v":41,"action":"add","table":{"id":"b"}}')
    await writer.put("c", {"id": "c"})  # version 42: not 2

    await eventually(lambda: follower.version == 42, what="the resync")
    assert [change.model_id for change in seen[-1]] == ["a", "b", "c"]
    assert fulls == [True, False, True]  # the first read, the change, the read after the gap


@pytest_twisted.ensureDeferred
async def test_redis_restarted_the_follower_resyncs_and_keeps_what_was_acknowledged(open_redis, redis_server):
    follower, writer = open_redis(), open_redis()
    seen = []
    follower.follow(lambda changes, full: seen.append(changes))
    await writer.put("kept", {"id": "kept"})
    await eventually(lambda: follower.version == 1, what="the change")

    redis_server.restart()  # its append-only file, fsynced at every write, brings it back
    await eventually(lambda: follower.state()["up"] and follower.version == 1 and seen[-1], what="the resync")
    await writer.put("after", {"id": "after"})  # the writer's connection reconnects too

    await eventually(lambda: follower.version == 2, what="the change after the restart")
    assert [change.model_id for change in seen[-1]] == ["kept", "after"]


@pytest_twisted.ensureDeferred
async def test_redis_paused_changes_are_refused_with_503_and_the_store_says_it_is_down(open_redis, redis_server):
    store = open_redis()
    seen = []
    store.follow(lambda changes, full: seen.append(changes))
    await eventually(lambda: seen, what="the first full read")

    redis_server.pause()
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await store.put("m", TABLE)  # at most the call timeout
        assert refused.value.status == 503 and "cannot be reached" in refused.value.message
        await eventually(lambda: store.state()["up"] is False, what="the store down")
        with pytest.raises(StoreUnavailable):
            await store.put("m", TABLE)  # at once, now that the feed knows
    finally:
        redis_server.resume()
    await eventually(lambda: store.state()["up"], timeout=10, what="the store back")
    await store.put("back", {"id": "back"})
    assert "back" in [change.model_id for change in store.changes()]


def test_a_store_that_cannot_reach_redis_starts_empty_and_says_so(open_redis):
    from twisted.logger import LogLevel, capturedLogs

    from aibackend.testing import free_port

    store = open_redis(url=f"redis://:s3cret-password@127.0.0.1:{free_port()}/0", timeout=0.5)
    with capturedLogs() as events:
        assert store.load() == []
    (warning,) = [e for e in events if e["log_level"] == LogLevel.warn]
    assert "cannot be reached" in warning["log_format"]
    assert "s3cret" not in repr(warning) and store.state()["up"] is False
    assert "s3cret" not in json.dumps(store.state())


def test_the_url_is_shown_without_its_password():
    assert masked_url("redis://:pw@10.0.0.1:6379/2") == "redis://***@10.0.0.1:6379/2"
    assert masked_url("rediss://user:pw@[::1]:6380/0") == "rediss://***@[::1]:6380/0"
    assert masked_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest_twisted.ensureDeferred
async def test_a_password_from_a_file_reaches_a_redis_that_needs_one(tmp_path):
    from twisted.internet import reactor

    server = RedisServer(need_redis_server(), tmp_path, password="a-long-redis-password")
    try:
        denied = RedisStore(reactor, server.url, prefix="p:")
        with pytest.raises(StoreUnavailable) as refused:
            await denied.put("m", TABLE)
        assert "password" not in refused.value.message
        await denied.close()
        store = RedisStore(reactor, server.url, prefix="p:", password="a-long-redis-password")
        await store.put("m", TABLE)
        assert store.load() == [Change("m", "add", TABLE)]
        await store.close()
    finally:
        server.stop()


# --- the switch: configuration and options ------------------------------------------------


def test_the_store_key_takes_a_redis_url_with_a_password_from_the_environment():
    from aibackend.config import parse_config

    server = parse_config({"server": {"store": "redis://:${REDIS_PASSWORD}@10.0.0.1:6379/2"}},
                          environ={"REDIS_PASSWORD": "pw"}).server
    assert server.store == "redis://:pw@10.0.0.1:6379/2" and server.store_prefix == "aibackend:"
    assert parse_config({}).server.store is None  # SQLite, the default


@pytest.mark.parametrize("url, why", [
    ("sqlite:///x", "must be a redis:// or rediss:// (TLS) URL, got sqlite: scheme"),
    ("redis:///0", "names no host"),
    ("redis://:secret@host:99999/0", "has a port that is not a number"),
    ("rediss://host:6379/zero", "names a database that is not a number"),
    ("redis://:${MISSING}@host/0", "names environment variable MISSING that is not set"),
])
def test_a_bad_store_url_is_a_clear_error_naming_the_key_never_the_password(url, why):
    from aibackend.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"store": url}}, environ={})
    text = "\n".join(caught.value.lines())
    assert "server.store" in text and why in text and "secret" not in text


def test_the_store_option_and_its_password_file(tmp_path):
    from aibackend.listeners import StartupError
    from aibackend.tap import Options

    password = tmp_path / "redis-password"
    password.write_text("from-a-file\n")
    options = Options()
    options.parseOptions(["--store", "rediss://10.0.0.1:6380/1", "--store-password-file", str(password),
                          "--processes", "2", "--listen", "tcp:8080:interface=127.0.0.1"])
    assert (options.store_url, options.store_password) == ("rediss://10.0.0.1:6380/1", "from-a-file")
    argv = options.worker_argv()
    assert argv[argv.index("--store") + 1] == "rediss://10.0.0.1:6380/1"
    assert argv[argv.index("--store-password-file") + 1] == str(password)

    with pytest.raises(StartupError) as caught:
        Options().parseOptions(["--store", "http://:secret@host/"])
    assert "--store must be a redis://" in str(caught.value) and "secret" not in str(caught.value)
    with pytest.raises(StartupError) as caught:
        Options().parseOptions(["--store", "redis://host/0", "--store-password-file", str(tmp_path / "none")])
    assert "cannot read the store's password file" in str(caught.value)


def test_a_daemon_started_while_redis_is_unreachable_serves_its_models_then_follows(tmp_path):
    """Startup with Redis unreachable: the configuration's models now (logged), the runtime ones once it answers."""
    from aibackend.testing import Daemon, free_port, wait_until

    program = need_redis_server()
    port = free_port()
    url = f"redis://:never-logged-password@127.0.0.1:{port}/0"
    (tmp_path / "redis").mkdir()
    config = tmp_path / "aibackend.toml"
    config.write_text('[[models]]\nid = "configured"\ntype = "http"\nurl = "http://127.0.0.1:1/"\n')
    daemon = Daemon(str(config), "--store", url, state=str(tmp_path / "state"), cwd=str(tmp_path),
                    admin_token="an-admin-token-of-test-length")
    admin = {"Authorization": "Bearer an-admin-token-of-test-length"}
    server = None
    try:
        assert set(daemon.models(headers=admin)) == {"configured"}
        assert "cannot be reached" in daemon.output
        # Its stored keys not known yet: a key is required (never open to everyone for want of them).
        daemon.request("GET", "/get/models").error(401, "unauthorized")
        refused = daemon.add({"id": "early", "type": "http", "url": "http://127.0.0.1:1/"}, headers=admin)
        refused.error(503, "store_unavailable")

        server = RedisServer(program, tmp_path / "redis", port=port, password="never-logged-password")
        kept = json.dumps({"id": "kept", "type": "http", "url": "http://127.0.0.1:1/"})
        server.client().eval(WRITE, 3, "aibackend:version", "aibackend:models", "aibackend:changes",
                             "kept", "add", kept, 100)  # as another daemon writes
        wait_until(lambda: set(daemon.models(headers=admin)) == {"configured", "kept"}, 10,
                   "the runtime model once Redis answers")
        assert daemon.add({"id": "later", "type": "http", "url": "http://127.0.0.1:1/"}, headers=admin).status == 201
        assert set(daemon.models()) == {"configured", "kept", "later"}  # no key kept: open again, as configured
    finally:
        daemon.stop()
        if server is not None:
            server.stop()
    daemon.assert_no_bug_logged()
    assert "never-logged-password" not in daemon.output and "redis://***@127.0.0.1" in daemon.output


# --- threads and timers ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_is_called_off_the_reactor_thread_the_feed_on_a_thread_of_its_own(open_redis):
    import threading

    store = open_redis()
    threads = {}
    write, xread = store._write, store._feed_client.xread

    def recorded(name, function):
        def call(*args, **kwargs):
            threads.setdefault(name, set()).add(threading.current_thread().name)
            return function(*args, **kwargs)
        return call

    store._write = recorded("write", write)
    store._feed_client.xread = recorded("feed", xread)
    store.follow(lambda changes, full: None)
    await store.put("m", TABLE)
    await eventually(lambda: "feed" in threads, what="the feed's read")

    reactor_thread = threading.main_thread().name
    assert reactor_thread not in threads["write"] | threads["feed"]
    assert all("aibackend-redis-feed" in name for name in threads["feed"])
    assert all("aibackend-redis-" in name and "feed" not in name for name in threads["write"])


@pytest_twisted.ensureDeferred
async def test_closing_a_store_that_waits_to_reconnect_leaves_no_timer(open_redis, redis_server):
    from twisted.internet import reactor

    def ours():
        return [call for call in reactor.getDelayedCalls()
                if getattr(call.func, "__self__", None) is store and call.active()]

    store = open_redis(timeout=0.3)
    store.follow(lambda changes, full: None)
    await eventually(lambda: store.state()["up"], what="the first full read")
    redis_server.pause()
    try:
        await eventually(lambda: ours(), timeout=10, what="a retry timer")
    finally:
        redis_server.resume()
    await store.close()

    assert ours() == []


def test_without_redis_server_a_test_skips_locally_and_fails_under_ci(monkeypatch):
    from aibackend import testing

    monkeypatch.setattr(testing, "find_redis_server", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        testing.need_redis_server()
    assert "redis-server is not installed" in str(failed.value) and "CI=true" in str(failed.value)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        testing.need_redis_server()


@pytest_twisted.ensureDeferred
async def test_rediss_talks_tls_to_a_redis_whose_certificate_the_system_trusts(tmp_path, monkeypatch):
    """rediss://: TLS, the certificate checked against the system's CAs (SSL_CERT_FILE names a private one)."""
    import shutil
    import subprocess

    from twisted.internet import reactor

    from aibackend.testing import Process, free_port, wait_until

    program = need_redis_server()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test TLS with")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=aibackend test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "ext")
    port = free_port()
    server = Process([program, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
                      "--tls-cert-file", "server.pem", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.pem",
                      "--tls-auth-clients", "no", "--dir", str(tmp_path)], cwd=str(tmp_path))
    try:
        wait_until(lambda: "Ready to accept connections" in server.output, 10, "redis-server with TLS")
        untrusted = RedisStore(reactor, f"rediss://127.0.0.1:{port}/0", prefix="tls:")
        with pytest.raises(StoreUnavailable):  # a certificate nobody vouches for
            await untrusted.put("m", TABLE)
        await untrusted.close()

        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
        store = RedisStore(reactor, f"rediss://127.0.0.1:{port}/0", prefix="tls:")
        await store.put("m", TABLE)
        assert (await store.read()) == [Change("m", "add", TABLE)]
        await store.close()
    finally:
        server.terminate()


@pytest_twisted.ensureDeferred
async def test_a_change_is_answered_after_a_while_when_the_feed_is_late_and_the_store_says_it_is_behind(open_redis):
    import threading

    store = open_redis()
    held = threading.Event()
    xread = store._feed_client.xread

    entered = threading.Event()

    def late(*args, **kwargs):
        entered.set()
        held.wait(10)
        return xread(*args, **kwargs)

    applied = []
    store.follow(lambda changes, full: applied.append(changes))
    await eventually(lambda: applied, what="the first full read")
    store._feed_client.xread = late
    await eventually(entered.is_set, what="the feed's next read (held)")
    try:
        await store.put("m", TABLE)  # committed; answered after ACK_WAIT without the feed
        assert store.behind() and store.changes() == []
    finally:
        held.set()
    await eventually(lambda: not store.behind(), what="the feed to catch up")
    assert store.changes() == [Change("m", "add", TABLE)]


# --- the keys: both stores (L{aibackend.store.IKeyStore}) -----------------------------------


def key_row(key_id: str = "0123456789ab", name: str = "team", **more) -> dict:
    return {"id": key_id, "name": name, "digest": "cd" * 32, "models": ["chat"], "limits": {"rpm": 60},
            "created": 1764622822.123456, "rotated": None, "revoked": None, **more}


def test_each_store_provides_the_key_interface(any_store):
    assert verifyObject(IKeyStore, any_store())


@pytest_twisted.ensureDeferred
async def test_each_store_keeps_keys_revoked_and_rotated_as_they_were_written(any_store):
    store = any_store()
    first, second = key_row(), key_row("ba9876543210", "other", models=None, limits=None, created=1764622823.5)
    await store.put_key(first)
    await store.put_key(second)
    await store.revoke_key(first["id"], 1764622900.25)
    await store.rotate_key(second["id"], "ef" * 32, 1764622901.75)

    expected = [{**first, "revoked": 1764622900.25}, {**second, "digest": "ef" * 32, "rotated": 1764622901.75}]
    assert await store.read_keys() == expected
    assert any_store().load_keys() == expected  # a restart, or another daemon


@pytest_twisted.ensureDeferred
async def test_each_store_refuses_a_key_whose_id_or_name_is_taken(any_store):
    store = any_store()
    await store.put_key(key_row())
    with pytest.raises(KeyExists):
        await store.put_key(key_row(name="another"))  # the same id
    with pytest.raises(KeyExists):
        await any_store().put_key(key_row("ffffffffffff"))  # the same name, through another store
    await store.put_key(key_row("ffffffffffff", "another"))
    assert [row["name"] for row in await store.read_keys()] == ["team", "another"]


@pytest_twisted.ensureDeferred
async def test_each_store_forgets_a_deleted_key_and_frees_its_name(any_store):
    store = any_store()
    await store.put_key(key_row())
    await store.delete_key("0123456789ab")
    await store.delete_key("0123456789ab")  # gone already: nothing to do

    assert await store.read_keys() == []
    await any_store().put_key(key_row("ffffffffffff"))  # the name is free again
    assert [row["id"] for row in any_store().load_keys()] == ["ffffffffffff"]


# --- the keys in Redis ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_key_change_is_on_the_feed_counted_with_the_models(open_redis, redis_server):
    store = open_redis(prefix="keyed:")
    await store.put("m", TABLE)
    await store.put_key(key_row())
    await store.revoke_key("0123456789ab", 5.0)

    client = redis_server.client()
    assert client.get("keyed:version") == "3"
    assert client.hgetall("keyed:keynames") == {"team": "0123456789ab"}
    assert json.loads(client.hget("keyed:keys", "0123456789ab")) == key_row(revoked=5.0)
    feed = [(fields["v"], fields.get("kind"), fields["id"]) for _, fields in client.xrange("keyed:changes")]
    assert feed == [("1", None, "m"), ("2", "key", "0123456789ab"), ("3", "key", "0123456789ab")]
    assert "cd" * 32 in client.xrange("keyed:changes")[1][1]["row"]  # the digest, never a secret


@pytest_twisted.ensureDeferred
async def test_many_daemons_making_one_name_at_once_one_gets_it(open_redis):
    stores = [open_redis() for _ in range(4)]
    results = await DeferredList([store.put_key(key_row(f"{index:012x}", "wanted"))
                                  for index, store in enumerate(stores * 3)], consumeErrors=True)
    made = [ok for ok, _ in results if ok]
    refused = [failure for ok, failure in results if not ok]
    assert len(made) == 1 and all(failure.check(KeyExists) for failure in refused)
    assert [row["name"] for row in await stores[0].read_keys()] == ["wanted"]


@pytest_twisted.ensureDeferred
async def test_a_revocation_and_a_rotation_at_once_both_hold(open_redis):
    stores = [open_redis() for _ in range(2)]
    await stores[0].put_key(key_row())
    await DeferredList([stores[0].revoke_key("0123456789ab", 9.0), stores[1].rotate_key("0123456789ab", "ef" * 32, 8.0)])
    (row,) = await stores[1].read_keys()
    assert (row["revoked"], row["digest"], row["rotated"]) == (9.0, "ef" * 32, 8.0)


@pytest_twisted.ensureDeferred
async def test_revoking_a_key_redis_does_not_have_is_not_found(open_redis):
    with pytest.raises(NotFound):
        await open_redis().revoke_key("0123456789ab", 1.0)


@pytest_twisted.ensureDeferred
async def test_a_follower_holds_the_keys_another_store_changes_and_all_of_them_after_a_gap(
        open_redis, redis_server):
    follower, writer = open_redis(), open_redis()
    told = []
    follower.follow_keys(lambda rows: told.append(rows))
    follower.follow(lambda changes, full: None)
    await eventually(lambda: told, what="the first full read")
    assert told == [[]]

    await writer.put_key(key_row())
    await writer.put("m", TABLE)
    await writer.revoke_key("0123456789ab", 5.0)
    await eventually(lambda: follower.version == 3, what="the feed")
    assert told[-1] == [key_row(revoked=5.0)] == follower.key_rows()
    await writer.put_key(key_row("aaaaaaaaaaaa", "deleted"))
    await writer.delete_key("aaaaaaaaaaaa")
    await eventually(lambda: follower.version == 5, what="the deletion")
    assert told[-1] == [key_row(revoked=5.0)]

    # Behind the feed's back (a trimmed stream): the counter jumps, a key appears.
    client = redis_server.client()
    client.set(follower.prefix + "version", 43)
    client.hset(follower.prefix + "keys", "ba9876543210", json.dumps(key_row("ba9876543210", "late")))
    await writer.put("n", TABLE)
    await eventually(lambda: follower.version == 44, what="the resync")
    assert [row["name"] for row in told[-1]] == ["team", "late"]


@pytest_twisted.ensureDeferred
async def test_redis_paused_key_changes_answer_503_and_the_keys_known_are_kept(open_redis, redis_server):
    store = open_redis()
    store.follow(lambda changes, full: None)
    await store.put_key(key_row())
    await eventually(lambda: store.key_rows(), what="the key back through the feed")

    redis_server.pause()
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await store.revoke_key("0123456789ab", 5.0)
        assert refused.value.status == 503 and "keys known now are honoured" in refused.value.message
        await eventually(lambda: store.state()["up"] is False, what="the store down")
        with pytest.raises(StoreUnavailable):
            await store.put_key(key_row("ba9876543210", "other"))  # at once
        assert store.key_rows() == [key_row()]
    finally:
        redis_server.resume()
    await eventually(lambda: store.state()["up"], timeout=10, what="the store back")
    await store.put_key(key_row("ba9876543210", "other"))


def test_a_store_that_cannot_reach_redis_says_its_keys_are_not_known(open_redis):
    from aibackend.testing import free_port

    store = open_redis(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    assert store.load() == [] and store.load_keys() is None
