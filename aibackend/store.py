"""
Where runtime changes to the registry are kept, so that they survive a restart.

L{IModelStore} is the seam: today one daemon keeps its changes in an embedded SQLite
database under its state directory (the standard library's C{sqlite3}: nothing to
install, transactional, readable after a crash at any point); a fleet of daemons shares
one in Redis (L{aibackend.redisstore.RedisStore}: the same interfaces).

What is kept is a change per model id: C{add} with the model's table (as C{addmodel}
got it, so it is validated again on load), or C{remove} (a model of the configuration
file that was removed at runtime). An C{addmodel} is acknowledged only once its change
is committed (WAL, C{synchronous=FULL}), so C{kill -9} loses nothing acknowledged.

The client keys (L{aibackend.keys}) are kept in the same database, table C{keys}, behind
their own seam, L{IKeyStore}: a key is a row of plain JSON values (L{IKeyStore}'s
docstring), its secret's SHA-256 and never the secret. A key change too is answered
only once committed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from dataclasses import dataclass

from twisted.internet.defer import fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    id TEXT PRIMARY KEY,
    action TEXT NOT NULL CHECK (action IN ('add', 'remove')),
    spec TEXT,
    changed_at REAL NOT NULL
)
"""

KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    digest TEXT NOT NULL,
    models TEXT,
    limits TEXT,
    created REAL NOT NULL,
    rotated REAL,
    revoked REAL
)
"""
KEY_COLUMNS = ("id", "name", "digest", "models", "limits", "created", "rotated", "revoked")


class KeyExists(Exception):
    """L{IKeyStore.put_key}: the store holds a key of that id or name already."""


@dataclass(frozen=True)
class Change:
    model_id: str
    action: str  # "add" or "remove"
    table: dict | None = None


class IModelStore(Interface):
    def load():
        """
        Read every kept change, at start (before the reactor runs; may block).

        @return: a list of L{Change}.
        """

    def read():
        """
        Read every kept change while the reactor runs, off its thread.

        @return: a Deferred of a list of L{Change}.
        """

    def put(model_id, table):
        """Keep a runtime-added model. @return: a Deferred that fires once it is durable."""

    def remove(model_id):
        """Keep that a model is removed. @return: a Deferred that fires once it is durable."""

    def forget(model_id):
        """Keep nothing about a model any more. @return: a Deferred that fires once durable."""

    def close():
        """@return: a Deferred that fires once the store is closed."""


class IKeyStore(Interface):
    """
    Where the client keys are kept (L{aibackend.keys.KeyManager} is the writer: the one
    of the daemon, or of each daemon of a fleet on a shared store; the workers of
    C{--processes} read it).

    A key is a row, a dict of plain JSON values: C{id} (12 hex digits), C{name} (unique),
    C{digest} (the hex SHA-256 of its secret), C{models} (a list of model ids, or None
    for every model), C{limits} (a table of L{aibackend.ratelimit.LIMIT_KEYS}, or None),
    C{created}, C{rotated}, C{revoked} (seconds since the epoch, or None). A revoked
    key keeps its row (and its name); only C{delete_key} removes one. Every write's
    Deferred fires once the change is durable.
    """

    def load_keys():
        """
        Read every key, at start (before the reactor runs; may block).

        @return: a list of rows, or None: a shared store that cannot be read now (the
            daemon then requires a key until the store's feed brings them).
        """

    def read_keys():
        """Read every key while the reactor runs, off its thread. @return: a Deferred of a list of rows."""

    def put_key(row):
        """
        Keep a new key.

        @return: a Deferred, failing with L{KeyExists} if its id or name is taken.
        """

    def revoke_key(key_id, when):
        """Keep that key C{key_id} is revoked since C{when}. @return: a Deferred."""

    def rotate_key(key_id, digest, when):
        """Keep key C{key_id}'s new C{digest} (hex), rotated at C{when}. @return: a Deferred."""

    def delete_key(key_id):
        """Forget key C{key_id} (its name may be taken again). @return: a Deferred."""


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "aibackend")


def private_files(state_dir: str, path: str, log) -> None:
    """
    Make the database at C{path} readable by its owner alone (0600, whatever the umask),
    with the WAL and shared-memory files next to it (SQLite gives those the mode of the
    database; one left by an older version is tightened too). A directory made here is
    0700; an existing one is left as it is (it may be shared on purpose), but a warning
    says when others may enter it.
    """
    try:
        os.makedirs(state_dir, 0o700)
        os.chmod(state_dir, 0o700)  # exactly, whatever the umask
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(state_dir).st_mode)
        if mode & 0o077:
            log.warn(
                "the state directory {directory} is open to its group or others (mode {mode}); "
                "chmod 700 it to keep the names and the changes kept there private",
                directory=state_dir, mode=f"{mode:04o}",
            )
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if stat.S_IMODE(os.stat(name).st_mode) != 0o600:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass
        except PermissionError:  # another user's file in a directory shared on purpose
            log.warn("the state file {name} is open to others and not the daemon's to make private",
                     name=name)


def _key_row(values) -> dict:
    row = dict(zip(KEY_COLUMNS, values))
    for column in ("models", "limits"):
        row[column] = None if row[column] is None else json.loads(row[column])
    return row


@implementer(IModelStore, IKeyStore)
class SQLiteStore:
    """
    The changes in C{DIR/models.sqlite3}, written by one thread of its own, in order,
    off the reactor thread.
    """

    filename = "models.sqlite3"
    log = Logger()

    def __init__(self, reactor, state_dir: str):
        self._reactor = reactor
        self.path = os.path.join(state_dir, self.filename)
        private_files(state_dir, self.path, self.log)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._db.execute(KEYS_SCHEMA)
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name="aibackend-store")
        self._started = False

    def _in_thread(self, function, *args):
        if not self._started:
            self._threads.start()
            self._started = True
            self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_threads)
        return deferToThreadPool(self._reactor, self._threads, function, *args)

    def _stop_threads(self):
        if self._started:
            self._started = False
            self._threads.stop()

    def load(self) -> list:
        rows = self._db.execute("SELECT id, action, spec FROM changes ORDER BY changed_at, rowid").fetchall()
        return [Change(model_id, action, json.loads(spec) if spec else None) for model_id, action, spec in rows]

    def read(self):
        return self._in_thread(self.load)

    def _write(self, model_id, action, spec):
        with self._db:
            self._db.execute(
                "INSERT INTO changes (id, action, spec, changed_at) VALUES (?, ?, ?, julianday('now'))"
                " ON CONFLICT(id) DO UPDATE SET action=excluded.action, spec=excluded.spec,"
                " changed_at=excluded.changed_at",
                (model_id, action, spec),
            )

    def put(self, model_id: str, table: dict):
        return self._in_thread(self._write, model_id, "add", json.dumps(table))

    def remove(self, model_id: str):
        return self._in_thread(self._write, model_id, "remove", None)

    def forget(self, model_id: str):
        """Drop what is kept of a model (a runtime model removed again: nothing to remember)."""
        return self._in_thread(self._forget, model_id)

    def _forget(self, model_id):
        with self._db:
            self._db.execute("DELETE FROM changes WHERE id = ?", (model_id,))

    # --- keys (IKeyStore) ---

    def load_keys(self) -> list:
        rows = self._db.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM keys ORDER BY created, rowid").fetchall()
        return [_key_row(values) for values in rows]

    def read_keys(self):
        return self._in_thread(self.load_keys)

    def _put_key(self, row):
        values = [row[column] for column in KEY_COLUMNS]
        for index in (KEY_COLUMNS.index("models"), KEY_COLUMNS.index("limits")):
            values[index] = None if values[index] is None else json.dumps(values[index])
        try:
            with self._db:
                self._db.execute(f"INSERT INTO keys ({', '.join(KEY_COLUMNS)}) VALUES "
                                 f"({', '.join('?' * len(KEY_COLUMNS))})", values)
        except sqlite3.IntegrityError:
            raise KeyExists(row["name"]) from None

    def put_key(self, row: dict):
        return self._in_thread(self._put_key, dict(row))

    def _update_key(self, key_id, assignments, values):
        with self._db:
            self._db.execute(f"UPDATE keys SET {assignments} WHERE id = ?", (*values, key_id))

    def revoke_key(self, key_id: str, when: float):
        return self._in_thread(self._update_key, key_id, "revoked = ?", (when,))

    def rotate_key(self, key_id: str, digest: str, when: float):
        return self._in_thread(self._update_key, key_id, "digest = ?, rotated = ?", (digest, when))

    def _delete_key(self, key_id):
        with self._db:
            self._db.execute("DELETE FROM keys WHERE id = ?", (key_id,))

    def delete_key(self, key_id: str):
        return self._in_thread(self._delete_key, key_id)

    def close(self):
        if not self._started:
            self._db.close()
            return succeed(None)
        d = self._in_thread(self._db.close)
        d.addBoth(lambda result: (self._stop_threads(), result)[1])
        return d


@implementer(IModelStore, IKeyStore)
class MemoryStore:
    """A store that keeps nothing past the process (tests, and --state none)."""

    def __init__(self):
        self.changes: dict[str, Change] = {}
        self.keys: dict[str, dict] = {}  # rows by id, in the order they were made

    def load(self) -> list:
        return list(self.changes.values())

    def read(self):
        return succeed(self.load())

    def put(self, model_id, table):
        self.changes.pop(model_id, None)
        self.changes[model_id] = Change(model_id, "add", dict(table))
        return succeed(None)

    def remove(self, model_id):
        self.changes.pop(model_id, None)
        self.changes[model_id] = Change(model_id, "remove")
        return succeed(None)

    def forget(self, model_id):
        self.changes.pop(model_id, None)
        return succeed(None)

    def close(self):
        return succeed(None)

    # --- keys (IKeyStore) ---

    def load_keys(self) -> list:
        return [dict(row) for row in self.keys.values()]

    def read_keys(self):
        return succeed(self.load_keys())

    def put_key(self, row):
        if row["id"] in self.keys or any(kept["name"] == row["name"] for kept in self.keys.values()):
            return fail(KeyExists(row["name"]))
        self.keys[row["id"]] = dict(row)
        return succeed(None)

    def revoke_key(self, key_id, when):
        self.keys[key_id]["revoked"] = when
        return succeed(None)

    def rotate_key(self, key_id, digest, when):
        self.keys[key_id].update(digest=digest, rotated=when)
        return succeed(None)

    def delete_key(self, key_id):
        self.keys.pop(key_id, None)
        return succeed(None)
