"""
Where runtime changes are kept (L{aibackend.store}): the in-memory store, and the SQLite
store on the real reactor (writes in a thread of its own, durable once acknowledged,
readable by the standard library's C{sqlite3} while the daemon still has it open).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from aibackend.store import Change, IModelStore, MemoryStore, SQLiteStore, default_state_dir
from aibackend.testing import Daemon, result_of

TABLE = {"id": "m", "type": "http", "url": "http://127.0.0.1:9001/echo", "timeout": 5, "headers": {"X-A": "é"}}


def rows(path) -> list[tuple]:
    """What another reader sees in the store's file, through the standard library."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT id, action, spec FROM changes ORDER BY rowid").fetchall()
    finally:
        connection.close()


# --- in memory ----------------------------------------------------------------------------------


def test_the_memory_store_provides_the_interface():
    assert verifyObject(IModelStore, MemoryStore())


def test_the_memory_store_keeps_the_last_change_of_each_model_in_order():
    store = MemoryStore()

    result_of(store.put("a", {"id": "a"}))
    result_of(store.put("b", {"id": "b"}))
    result_of(store.remove("config-model"))
    result_of(store.put("a", {"id": "a", "timeout": 2}))
    result_of(store.forget("b"))

    assert store.load() == [Change("config-model", "remove"), Change("a", "add", {"id": "a", "timeout": 2})]
    result_of(store.close())


def test_the_memory_store_keeps_a_copy_of_the_table():
    store = MemoryStore()
    table = {"id": "a"}
    store.put("a", table)
    table["id"] = "changed"

    assert store.load()[0].table == {"id": "a"}


# --- SQLite -------------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def open_store(tmp_path):
    """Open SQLite stores on the real reactor; each is closed at the end of the test."""
    from twisted.internet import reactor

    stores = []

    def open_(directory=None):
        store = SQLiteStore(reactor, str(directory or tmp_path / "state"))
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


def test_the_sqlite_store_provides_the_interface(open_store):
    assert verifyObject(IModelStore, open_store())


def test_the_state_directory_is_made_private(open_store, tmp_path):
    store = open_store(tmp_path / "deep" / "state")

    assert os.path.isfile(store.path)
    assert stat.S_IMODE(os.stat(tmp_path / "deep" / "state").st_mode) == 0o700
    assert store.load() == []


@pytest.fixture
def no_umask():
    """A umask of 0, as a careless service manager may leave it: modes are the code's alone."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest_twisted.ensureDeferred
async def test_the_database_and_its_wal_files_are_the_owners_alone_whatever_the_umask(open_store, tmp_path, no_umask):
    store = open_store(tmp_path / "new" / "state")
    await store.put("m", TABLE)  # the WAL and shared-memory files exist once something is written

    assert os.path.exists(store.path + "-wal") and os.path.exists(store.path + "-shm")
    assert {name: mode(store.path + name) for name in ("", "-wal", "-shm")} == {"": 0o600, "-wal": 0o600,
                                                                               "-shm": 0o600}
    assert mode(tmp_path / "new" / "state") == 0o700


@pytest_twisted.ensureDeferred
async def test_files_an_older_version_left_readable_are_tightened(open_store, tmp_path, no_umask):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = str(state / SQLiteStore.filename)
    older = sqlite3.connect(path, isolation_level=None)  # kept open: its WAL files stay
    try:
        older.execute("PRAGMA journal_mode=WAL")
        older.execute("CREATE TABLE t (x)")
        older.execute("INSERT INTO t VALUES (1)")
        for name in ("", "-wal", "-shm"):
            os.chmod(path + name, 0o644)

        store = open_store(state)
        await store.put("m", TABLE)

        assert [mode(path + name) for name in ("", "-wal", "-shm")] == [0o600, 0o600, 0o600]
    finally:
        older.close()


@pytest.mark.parametrize("directory_mode", [0o755, 0o750, 0o777])
def test_an_existing_directory_open_to_others_is_left_as_it_is_with_a_warning(open_store, tmp_path, no_umask,
                                                                              directory_mode):
    from twisted.logger import LogLevel, capturedLogs

    state = tmp_path / "shared"
    state.mkdir()
    os.chmod(state, directory_mode)

    with capturedLogs() as events:
        store = open_store(state)

    assert mode(state) == directory_mode
    assert mode(store.path) == 0o600
    [warning] = [event for event in events if event["log_level"] == LogLevel.warn]
    assert warning["directory"] == str(state) and warning["mode"] == f"{directory_mode:04o}"
    assert "chmod 700" in warning["log_format"]


def test_a_private_existing_directory_gets_no_warning(open_store, tmp_path):
    from twisted.logger import LogLevel, capturedLogs

    state = tmp_path / "private"
    state.mkdir(mode=0o700)

    with capturedLogs() as events:
        open_store(state)

    assert [event for event in events if event["log_level"] >= LogLevel.warn] == []


@pytest_twisted.ensureDeferred
async def test_an_acknowledged_change_is_in_the_file_at_once(open_store):
    """Acknowledged means committed: another reader sees it while the store is still open."""
    store = open_store()

    await store.put("m", TABLE)
    assert [(i, a) for i, a, _ in rows(store.path)] == [("m", "add")]

    await store.remove("config-model")
    assert [(i, a) for i, a, _ in rows(store.path)] == [("m", "add"), ("config-model", "remove")]

    await store.forget("m")
    assert rows(store.path) == [("config-model", "remove", None)]


@pytest_twisted.ensureDeferred
async def test_what_is_kept_is_loaded_again(open_store, tmp_path):
    store = open_store()
    await store.put("a", TABLE)
    await store.put("b", {"id": "b", "type": "http", "url": "http://127.0.0.1:1/"})
    await store.remove("from-config")
    await store.put("a", {**TABLE, "timeout": 9})  # replaced: the newest table, moved last
    await store.put("gone", {"id": "gone"})
    await store.forget("gone")
    await store.close()

    again = open_store()

    # One change per model, the newest (the order of changes within a millisecond is not kept).
    assert sorted(again.load(), key=lambda change: change.model_id) == [
        Change("a", "add", {**TABLE, "timeout": 9}),
        Change("b", "add", {"id": "b", "type": "http", "url": "http://127.0.0.1:1/"}),
        Change("from-config", "remove"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_runtime_add_over_a_removed_config_model_is_an_add_again(open_store):
    store = open_store()
    await store.remove("m")
    await store.put("m", TABLE)

    assert store.load() == [Change("m", "add", TABLE)]


@pytest_twisted.ensureDeferred
async def test_writes_happen_in_a_thread_of_their_own_never_the_reactors(tmp_path):
    from twisted.internet import reactor

    threads = []

    class Watched(SQLiteStore):
        def _write(self, *args):
            threads.append(threading.current_thread())
            return super()._write(*args)

        def _forget(self, *args):
            threads.append(threading.current_thread())
            return super()._forget(*args)

    store = Watched(reactor, str(tmp_path / "state"))
    try:
        await store.put("a", TABLE)
        await store.remove("b")
        await store.forget("a")
    finally:
        await store.close()

    assert len(threads) == 3
    assert len(set(threads)) == 1
    assert threads[0] is not threading.main_thread()
    assert "aibackend-store" in threads[0].name


@pytest_twisted.ensureDeferred
async def test_the_file_is_durable_wal_and_passes_an_integrity_check(open_store):
    store = open_store()
    for n in range(20):
        await store.put(f"m{n}", {**TABLE, "id": f"m{n}"})

    connection = sqlite3.connect(store.path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("SELECT count(*) FROM changes").fetchone() == (20,)
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_closing_twice_and_closing_an_unused_store_are_fine(open_store, tmp_path):
    unused = open_store(tmp_path / "unused")
    await unused.close()

    used = open_store()
    await used.put("a", TABLE)
    await used.close()


def test_the_default_state_directory_follows_xdg_state_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == str(tmp_path / "aibackend")

    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == str(tmp_path / "home" / ".local" / "state" / "aibackend")


@pytest.mark.parametrize("action", ["add", "remove"])
def test_the_file_refuses_an_unknown_action(open_store, action):
    store = open_store()
    connection = sqlite3.connect(store.path)
    try:
        connection.execute("INSERT INTO changes VALUES ('ok', ?, NULL, 0)", (action,))
        with pytest.raises(sqlite3.IntegrityError):
            connection.execute("INSERT INTO changes VALUES ('bad', 'explode', NULL, 0)")
        connection.commit()
    finally:
        connection.close()


def test_the_changes_are_read_off_the_reactor_thread_while_it_runs(tmp_path):
    import threading
    import time

    from twisted.internet import reactor as real_reactor

    from aibackend.store import SQLiteStore

    store = SQLiteStore(real_reactor, str(tmp_path))
    threads = []
    load = store.load
    store.load = lambda: threads.append(threading.current_thread()) or load()
    try:
        d = store.read()
        deadline = time.monotonic() + 5
        while not threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads and threads[0] is not threading.main_thread()
    finally:
        store._stop_threads()
        store._db.close()
    d.addErrback(lambda failure: None)


def test_a_memory_store_reads_at_once():
    from aibackend.store import MemoryStore
    from aibackend.testing import result_of

    store = MemoryStore()
    store.put("m", {"id": "m"})

    assert [change.model_id for change in result_of(store.read())] == ["m"]


@pytest.mark.timeout(30)
def test_the_daemons_state_is_private_after_an_addmodel(tmp_path):
    """The real daemon, started with the usual umask (022), keeps its state 0600 in a 0700 directory."""
    config = tmp_path / "aibackend.toml"
    config.write_text("")
    state = tmp_path / "state"
    previous = os.umask(0o022)
    try:
        daemon = Daemon(str(config), state=str(state), cwd=str(tmp_path))
    finally:
        os.umask(previous)
    try:
        reply = daemon.add({"id": "kept", "type": "http", "url": "http://127.0.0.1:9/"})
        assert reply.status == 201, reply
        path = str(state / SQLiteStore.filename)
        modes = {name: mode(path + name) for name in ("", "-wal", "-shm") if os.path.exists(path + name)}
    finally:
        daemon.terminate()
    daemon.assert_no_bug_logged()

    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}
    assert mode(state) == 0o700
