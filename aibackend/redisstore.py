"""
The fleet's shared store: the runtime registry in Redis (C{--store redis://HOST:PORT/DB}).

Every daemon on the same Redis keeps its runtime changes there instead of in its own
SQLite file, and follows the others' changes: L{RedisStore} implements
L{aibackend.store.IModelStore} as L{aibackend.store.SQLiteStore} does (a change per model
id: C{add} with its table, or C{remove}), and L{ISharedStore} on top of it (a change
feed, the store's state for C{/metrics} and C{/get/models}).

In Redis, under a prefix (C{aibackend:} unless configured):

  - C{PREFIX}models, a hash: model id -> C{{"v": version, "action": "add"|"remove",
    "table": {...}|null}} (the kept change; C{v} orders them as SQLite's C{changed_at});
  - C{PREFIX}version, the counter: one more at every change;
  - C{PREFIX}changes, a stream: one entry per change (C{v}, C{id}, C{action}, C{table};
    C{forget} drops the id; a key's change: C{v}, C{kind} C{key}, C{id}, C{row}), trimmed to
    about L{FEED_LENGTH} entries;
  - C{PREFIX}keys, a hash: key id -> its row (L{aibackend.store.IKeyStore}: plain JSON, the
    secret's SHA-256, never the secret), and C{PREFIX}keynames: name -> id (a name is
    taken once: C{HSETNX}; freed when its key is deleted: a C{row} of C{null} on the feed).

The client keys (L{IKeyStore}) are changes on the same feed, counted by the same version:
a key made, revoked or rotated on one daemon is held by every other (its C{follow_keys}
callback: the L{aibackend.keys.KeyManager}, which tells its C{--processes} workers), in
order with the models' changes, and read again whole after any gap.

One Lua script makes a change (the counter, the hash and the stream together: atomic, and
in the order Redis ran them), another reads everything at once (the counter, the hash and
the stream's last entry id). A daemon follows the stream from that id (C{XREAD BLOCK});
an entry whose version is not the next one (a trimmed feed, a Redis that lost or reloaded
its data) or a lost connection makes it read everything again and apply the difference.

The client is redis-py (C{redis}), Redis's own and well maintained (RESP3, streams, Lua
scripts, TLS with C{rediss://}), with its blocking calls in a bounded pool of threads of
this store's own, and one thread for the feed's blocking read, so the reactor never waits
on Redis; txredisapi is native Twisted but sees few releases and has no stream commands.
Every call has a timeout (L{CALL_TIMEOUT}: connect and read); redis-py's own retries are
off (a write retried after a timeout could be made twice): the feed reconnects with a
backoff (L{RETRY_DELAYS}), and a write that fails answers 503.

The fleet's limits use this store's client, threads and prefix too
(L{aibackend.redislimits}: L{RedisStore.script} and L{RedisStore.call}), and the usage its
prefix and options, with a connection of its own (L{aibackend.redisusage}: L{RedisStore.client}).

Redis down: the daemon keeps serving the registry it has and honouring the keys it holds
(a revoked one stays refused); admin changes, keys' included, answer 503
(L{StoreUnavailable}); once the feed reads again, the daemon resyncs from a full read. A
daemon that starts while Redis cannot be reached requires a key (configured C{api_keys}
work; stored ones once Redis answers): it never opens to everyone for want of its keys. A
write that timed out may still be made once a paused Redis resumes: it then reaches
every daemon through the feed, as any change.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.core import GaugeMetricFamily
from twisted.application import service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from aibackend.errors import ApiError, NotFound
from aibackend.store import Change, IKeyStore, IModelStore, KeyExists

DEFAULT_PREFIX = "aibackend:"
CALL_TIMEOUT = 2.0  # seconds: connecting, and each answer
FEED_BLOCK_MS = 1000  # how long one XREAD waits for a change
FEED_LENGTH = 10_000  # the stream is trimmed to about this many entries (MAXLEN ~)
FEED_COUNT = 500  # entries read at once
ACK_WAIT = 2.0  # seconds a change waits for the feed to bring it back (then it is answered anyway)
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # between attempts to reach Redis again, the last repeated
CALL_THREADS = 4

# KEYS: version, models, changes; ARGV: id, action (add, remove or forget), table JSON or "null", feed length.
WRITE = """
local v = redis.call('INCR', KEYS[1])
if ARGV[2] == 'forget' then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[2], ARGV[1], '{"v":' .. v .. ',"action":"' .. ARGV[2] .. '","table":' .. ARGV[3] .. '}')
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'v', v, 'id', ARGV[1], 'action', ARGV[2], 'table', ARGV[3])
return v
"""

# KEYS: version, models, changes, keys. The version, the stream's last entry id, the hashes.
SNAPSHOT = """
local v = redis.call('GET', KEYS[1])
if not v then v = '0' end
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {v, id, redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[4])}
"""

# KEYS: version, changes, keys, keynames; ARGV: id, name, row JSON, feed length.
# A new key: -1 when its id or name is taken, else the version.
PUT_KEY = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return -1 end
if redis.call('HSETNX', KEYS[4], ARGV[2], ARGV[1]) == 0 then return -1 end
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'v', v, 'kind', 'key', 'id', ARGV[1], 'row', ARGV[3])
return v
"""

# KEYS: version, changes, keys; ARGV: id, the row as read, the row changed, feed length.
# A key's row replaced if it is still the one read (else -2: read it again), -1 if there is none.
UPDATE_KEY = """
local kept = redis.call('HGET', KEYS[3], ARGV[1])
if not kept then return -1 end
if kept ~= ARGV[2] then return -2 end
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'v', v, 'kind', 'key', 'id', ARGV[1], 'row', ARGV[3])
return v
"""
# KEYS: version, changes, keys, keynames; ARGV: id, feed length. A key forgotten, its name free again
# (0: there was none).
DELETE_KEY = """
local kept = redis.call('HGET', KEYS[3], ARGV[1])
if not kept then return 0 end
local name = cjson.decode(kept)['name']
if redis.call('HGET', KEYS[4], name) == ARGV[1] then redis.call('HDEL', KEYS[4], name) end
redis.call('HDEL', KEYS[3], ARGV[1])
local v = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'v', v, 'kind', 'key', 'id', ARGV[1], 'row', 'null')
return v
"""
UPDATE_ATTEMPTS = 10  # a key's row changed by another daemon between the read and the write: read again


class StoreUnavailable(ApiError):
    """The shared store cannot be reached or refused a change: nothing was acknowledged (503)."""

    status = 503
    type = "store_unavailable"

    def __init__(self, message: str, *, model: str | None = None):
        super().__init__(message, model=model, headers={"Retry-After": "1"})


class ISharedStore(IModelStore):
    """A store several daemons share: each follows the changes the others make."""

    def follow(apply):
        """
        Follow the changes from now on, in order: C{apply(changes, full)} is called with
        every kept change (a list of L{Change}, as L{IModelStore.read} gives) after a full
        read (C{full} true: at start, after a reconnect or a gap), and after each change
        that came; it may return a Deferred.
        """

    def follow_keys(apply):
        """
        Before L{follow}: C{apply(rows)} is called with every key's row (as
        L{IKeyStore.read_keys} gives) after each full read and after each key's change that
        came; it may return a Deferred (not waited for).
        """

    def key_rows():
        """Every key's row as last followed, without reading the store."""

    def changes():
        """The kept changes as last followed (a list of L{Change}), without reading the store."""

    def behind():
        """Whether a change made here has not come back through the feed yet (L{changes} is older)."""

    def state():
        """
        The store's state, for status (no secret): a dict with C{url}, C{following} (this
        process follows the store: a C{--processes} worker follows its primary instead, and
        only the primary's C{/metrics} and C{/get/models} show the state), C{up},
        C{version}, C{lag_seconds}.
        """


def masked_url(url: str) -> str:
    """C{url} with its password (and user) shown as C{***}."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _decode(record: str, model_id: str) -> Change | None:
    kept = json.loads(record)
    return Change(model_id, kept["action"], kept.get("table"))


def _connection_problem(redis_module):
    return (redis_module.ConnectionError, redis_module.TimeoutError, OSError)


@implementer(ISharedStore, IKeyStore)
class RedisStore:
    """
    The registry's changes in Redis (see the module).

    @param url: C{redis://[:PASSWORD@]HOST:PORT/DB} or C{rediss://...} (TLS).
    @param password: the password, when not in the URL (C{store_password_file}).
    @param prefix: the keys' prefix.
    """

    log = Logger()

    def __init__(self, reactor, url: str, *, password: str | None = None, prefix: str = DEFAULT_PREFIX,
                 timeout: float = CALL_TIMEOUT):
        import redis  # here: only a daemon with --store redis:// needs the client loaded

        self._redis = redis
        self._problems = _connection_problem(redis)
        self._reactor = reactor
        self.url = masked_url(url)
        self.prefix = prefix
        self._keys = [prefix + "version", prefix + "models", prefix + "changes"]
        self._snapshot_keys = self._keys + [prefix + "keys"]
        self._key_keys = [prefix + "version", prefix + "changes", prefix + "keys", prefix + "keynames"]
        no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        options = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=no_retry,
                       retry_on_timeout=False, decode_responses=True, health_check_interval=0)
        if password is not None:
            options["password"] = password
        self._client = redis.Redis.from_url(url, max_connections=CALL_THREADS, **options)
        self._connect = (url, options)  # (the URL keeps its password: never shown; see client)
        # The feed's read blocks FEED_BLOCK_MS on its own connection; an answer later than that by more
        # than the timeout means Redis is gone (or paused).
        feed_options = dict(options, socket_timeout=timeout + FEED_BLOCK_MS / 1000)
        self._feed_client = redis.Redis.from_url(url, max_connections=1, **feed_options)
        self._write = self._client.register_script(WRITE)
        self._snapshot = self._client.register_script(SNAPSHOT)
        self._feed_snapshot = self._feed_client.register_script(SNAPSHOT)
        self._put_key = self._client.register_script(PUT_KEY)
        self._update_key = self._client.register_script(UPDATE_KEY)
        self._delete_key = self._client.register_script(DELETE_KEY)
        self._threads = ThreadPool(minthreads=0, maxthreads=CALL_THREADS, name="aibackend-redis")
        self._feed_thread = ThreadPool(minthreads=0, maxthreads=1, name="aibackend-redis-feed")
        self._started = False
        # What the feed brought: the kept changes in order, the version they are at.
        self._changes: dict[str, Change] = {}
        self.version = -1  # not read yet
        self.up: bool | None = None
        self.last_contact: float | None = None
        self._apply = None
        self._apply_keys = None
        self._key_rows: dict[str, dict] = {}  # by id, as the feed brought them
        self._stream_id = "0-0"
        self._reading: Deferred | None = None
        self._retry = None
        self._failures = 0
        self._closing = False
        self._waits: list = []  # (version, Deferred, timer): changes made here, waiting for the feed
        self._written_version = 0  # the last change made here

    # --- threads ------------------------------------------------------------------

    def _start_threads(self):
        if not self._started:
            self._started = True
            self._threads.start()
            self._feed_thread.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._stop_threads)

    def _stop_threads(self):
        if self._started:
            self._started = False
            self._threads.stop()
            self._feed_thread.stop()

    def _call(self, function, *args):
        self._start_threads()
        return deferToThreadPool(self._reactor, self._threads, function, *args)

    # --- for the fleet's other parts (aibackend.redislimits) ----------------------------

    def script(self, source: str):
        """A Lua script on this store's client (called with C{keys}, C{args}: blocking, so through L{call})."""
        return self._client.register_script(source)

    def call(self, function, *args):
        """C{function(*args)} in this store's pool of threads. @return: a Deferred of what it returns."""
        return self._call(function, *args).addErrback(self._failed_call)

    def _failed_call(self, failure):
        if failure.check(*self._problems):
            self._mark_down(failure.value)
        return failure

    @property
    def unreachable(self) -> tuple:
        """The exceptions of a Redis that cannot be reached (gone, paused, refusing the connection)."""
        return self._problems

    @property
    def failures(self) -> tuple:
        """The exceptions of any call that failed in Redis: unreachable, or refused (an error it answered)."""
        return (self._redis.RedisError, OSError)

    def client(self, max_connections: int = 1):
        """
        A redis-py client of this store's own Redis, with its options (timeouts, no
        retries, the password), and connections of its own (for a part of the fleet that
        calls Redis from a thread of its own: the usage, L{aibackend.redisusage}). Blocking:
        call it off the reactor thread. Closed by its user.
        """
        url, options = self._connect
        return self._redis.Redis.from_url(url, max_connections=max_connections, **options)

    # --- reading --------------------------------------------------------------------

    def _read_all(self, script=None):
        """Blocking: (version, the stream's last id, [Change] in version order, {key id: row})."""
        version, stream_id, flat, flat_keys = (script or self._snapshot)(keys=self._snapshot_keys)
        kept = []
        for index in range(0, len(flat), 2):
            model_id, record = flat[index], flat[index + 1]
            kept.append((json.loads(record)["v"], _decode(record, model_id)))
        kept.sort(key=lambda pair: pair[0])
        key_rows = {flat_keys[index]: json.loads(flat_keys[index + 1]) for index in range(0, len(flat_keys), 2)}
        return int(version), stream_id, [change for _, change in kept], key_rows

    def load(self) -> list:
        """
        Every kept change, at start. With Redis unreachable the daemon starts with the
        configuration's models alone (logged): the feed reads everything once it can.
        """
        try:
            version, stream_id, changes, key_rows = self._read_all()
        except (self._redis.RedisError, OSError) as e:  # gone, or refusing us (a wrong password): logged
            self.up = False
            self.log.warn("aibackend: the shared store {url} cannot be reached ({why}): starting with the "
                          "configuration's models; its runtime models come once it answers",
                          url=self.url, why=self._why(e))
            return []
        self._synced(version, stream_id, changes, key_rows)
        return changes

    def read(self):
        """Every kept change, read from Redis now (a worker's resync); L{StoreUnavailable} if it cannot be."""
        return self._call(self._read_all).addCallbacks(lambda result: result[2], self._not_read)

    def _not_read(self, failure):
        if failure.check(self._redis.RedisError, OSError):
            raise StoreUnavailable(f"the shared store {self.url} cannot be read ({self._why(failure.value)})")
        return failure

    def changes(self) -> list:
        """The kept changes as the feed last brought them."""
        return list(self._changes.values())

    def behind(self) -> bool:
        """A change made here is not back through the feed yet (L{ACK_WAIT} passed): L{changes} is older."""
        return self._written_version > self.version

    def _synced(self, version: int, stream_id: str, changes: list, key_rows: dict) -> None:
        self._changes = {change.model_id: change for change in changes}
        self._key_rows = key_rows
        self.version = version
        self._written_version = min(self._written_version, version)  # the rest comes through the feed, or is lost
        self._stream_id = stream_id
        self.last_contact = self._reactor.seconds()
        if not self.up:
            if self.up is False:
                self.log.info("aibackend: the shared store {url} answers again (version {version})",
                              url=self.url, version=version)
            self.up = True

    # --- writing --------------------------------------------------------------------

    def _change(self, model_id: str, action: str, table=None):
        if self.up is False and self._apply is not None:
            return fail(StoreUnavailable(self._down_message(), model=model_id))
        spec = json.dumps(table) if table is not None else "null"
        d = self._call(self._write, self._keys, [model_id, action, spec, FEED_LENGTH])
        d.addCallbacks(self._written, self._not_written, errbackArgs=(model_id,))
        return d

    def _written(self, version) -> Deferred:
        """Once the feed brought the change back (applied here too), or after L{ACK_WAIT} s."""
        version = int(version)
        self._written_version = max(self._written_version, version)
        if self._apply is None or self.version >= version:
            return succeed(None)
        d = Deferred()
        wait = [version, d, None]
        wait[2] = self._reactor.callLater(ACK_WAIT, self._late, wait)
        self._waits.append(wait)
        return d

    def _late(self, wait) -> None:
        self._waits.remove(wait)
        wait[1].callback(None)

    def _release(self) -> None:
        for wait in [wait for wait in self._waits if wait[0] <= self.version]:
            self._waits.remove(wait)
            wait[2].cancel()
            wait[1].callback(None)

    def _not_written(self, failure, model_id, what=None):
        if failure.check(*self._problems):
            self._mark_down(failure.value)
            raise StoreUnavailable(self._down_message(), model=model_id)
        if failure.check(self._redis.RedisError):
            self.log.error("aibackend: the shared store {url} refused the change to {what}: {why}",
                           url=self.url, what=what or f"model {model_id}", why=failure.value)
            raise StoreUnavailable("the shared store refused the change (see the daemon's log); nothing was "
                                   "changed", model=model_id)
        return failure

    def _down_message(self) -> str:
        return ("the shared store (Redis) cannot be reached: runtime changes are refused until it answers again; "
                "the models known now keep serving, the keys known now are honoured")

    def put(self, model_id: str, table: dict):
        return self._change(model_id, "add", table)

    def remove(self, model_id: str):
        return self._change(model_id, "remove")

    def forget(self, model_id: str):
        return self._change(model_id, "forget")

    # --- keys (IKeyStore) -------------------------------------------------------------

    def load_keys(self):
        """
        Every key, at start (after L{load}, whose read brought them). With Redis
        unreachable: None (not known now: the daemon requires a key until the feed reads them).
        """
        if self.version < 0 and self.up is None:
            self.load()
        if self.up is False:
            return None
        return self.key_rows()

    def read_keys(self):
        """Every key, read from Redis now (a worker follows its primary); L{StoreUnavailable} if it cannot be."""
        return self._call(self._read_all).addCallbacks(
            lambda result: sorted(result[3].values(), key=lambda row: (row["created"], row["id"])), self._not_read)

    def _key_change(self, key_id: str, function, *args):
        if self.up is False and self._apply is not None:
            return fail(StoreUnavailable(self._down_message()))
        d = self._call(function, *args)
        d.addCallbacks(self._key_written, self._not_written, errbackArgs=(None, f"key {key_id}"))
        return d

    def _key_written(self, version) -> Deferred:
        version = int(version)
        if version == -1:
            raise KeyExists()
        if version == -3:
            raise StoreUnavailable("the key is being changed by other daemons: try again")
        return self._written(version)

    def put_key(self, row: dict):
        return self._key_change(row["id"], self._put_key, self._key_keys,
                                [row["id"], row["name"], json.dumps(row), FEED_LENGTH])

    def _update(self, key_id: str, fields: dict):
        """Blocking: the row changed in Redis if no other daemon changed it meanwhile (else read again)."""
        for _ in range(UPDATE_ATTEMPTS):
            kept = self._client.hget(self._key_keys[2], key_id)
            if kept is None:
                raise NotFound(f"the shared store has no key {key_id} (was its Redis emptied?)")
            row = {**json.loads(kept), **fields}
            version = self._update_key(keys=self._key_keys[:3], args=[key_id, kept, json.dumps(row), FEED_LENGTH])
            if int(version) == -1:
                raise NotFound(f"the shared store has no key {key_id} (was its Redis emptied?)")
            if int(version) != -2:
                return version
        return -3

    def revoke_key(self, key_id: str, when: float):
        return self._key_change(key_id, self._update, key_id, {"revoked": when})

    def rotate_key(self, key_id: str, digest: str, when: float):
        return self._key_change(key_id, self._update, key_id, {"digest": digest, "rotated": when})

    def delete_key(self, key_id: str):
        return self._key_change(key_id, self._delete_key, self._key_keys, [key_id, FEED_LENGTH])

    # --- following ------------------------------------------------------------------

    def follow_keys(self, apply) -> None:
        self._apply_keys = apply

    def key_rows(self) -> list:
        return sorted((dict(row) for row in self._key_rows.values()), key=lambda row: (row["created"], row["id"]))

    def follow(self, apply) -> None:
        self._apply = apply
        self._start_threads()
        self._resync()

    def _resync(self) -> None:
        self._retry = None
        if self._closing:
            return
        self._reading = deferToThreadPool(self._reactor, self._feed_thread, self._read_all, self._feed_snapshot)
        self._reading.addCallbacks(self._resynced, self._lost)

    def _resynced(self, result) -> None:
        self._reading = None
        version, stream_id, changes, key_rows = result
        self._failures = 0
        self._synced(version, stream_id, changes, key_rows)
        self._tell_keys()
        # (maybeDeferred: an apply that raises is logged by _applied, and the feed read on)
        self._applied(maybeDeferred(self._apply, self.changes(), True))

    def _applied(self, result) -> None:
        """After an apply (a Deferred or not): release the changes made here, read on."""
        def then(_):
            self._release()
            self._read_feed()
        if isinstance(result, Deferred):
            result.addErrback(lambda failure: self.log.failure("following the shared store", failure))
            result.addCallback(then)
        else:
            then(None)

    def _read_feed(self) -> None:
        if self._closing:
            return
        self._reading = deferToThreadPool(
            self._reactor, self._feed_thread, self._feed_client.xread, {self._keys[2]: self._stream_id},
            FEED_COUNT, FEED_BLOCK_MS)
        self._reading.addCallbacks(self._came, self._lost)

    def _came(self, answer) -> None:
        self._reading = None
        if self.up is False:  # a write found Redis gone meanwhile: read everything again, then say it is back
            self._resync()
            return
        self.last_contact = self._reactor.seconds()
        entries = answer[0][1] if answer else []
        models = keys = False
        for stream_id, fields in entries:
            version = int(fields["v"])
            if version != self.version + 1:
                self.log.info("aibackend: the shared store's feed went from version {had} to {came}: "
                              "reading everything again", had=self.version, came=version)
                if keys:  # what came before the gap is held now; the full read brings the rest
                    self._tell_keys()
                self._resync()
                return
            if fields.get("kind") == "key":
                row = json.loads(fields["row"])
                if row is None:  # deleted
                    self._key_rows.pop(fields["id"], None)
                else:
                    self._key_rows[fields["id"]] = row
                keys = True
            else:
                model_id, action = fields["id"], fields["action"]
                self._changes.pop(model_id, None)
                if action != "forget":
                    table = json.loads(fields["table"])
                    self._changes[model_id] = Change(model_id, action, table)
                models = True
            self.version = version
            self._stream_id = stream_id
        if keys:
            self._tell_keys()
        self._applied(maybeDeferred(self._apply, self.changes(), False) if models else None)

    def _tell_keys(self) -> None:
        if self._apply_keys is not None:
            d = maybeDeferred(self._apply_keys, self.key_rows())
            d.addErrback(lambda failure: self.log.failure("following the shared store's keys", failure))

    def _lost(self, failure) -> None:
        self._reading = None
        if self._closing:
            return
        if not failure.check(self._redis.RedisError, OSError):
            self.log.failure("reading the shared store's feed", failure)
        self._mark_down(failure.value)
        delay = RETRY_DELAYS[min(self._failures, len(RETRY_DELAYS) - 1)]
        self._failures += 1
        self._retry = self._reactor.callLater(delay, self._resync)

    def _mark_down(self, why) -> None:
        if self.up is not False:
            self.log.warn("aibackend: the shared store {url} cannot be reached ({why}): serving the models known "
                          "now, refusing runtime changes, retrying", url=self.url, why=self._why(why))
        self.up = False

    def _why(self, error) -> str:
        # redis-py's messages name the host and port, never the password.
        return f"{type(error).__name__}: {error}"

    # --- state ------------------------------------------------------------------------

    def state(self) -> dict:
        lag = None if self.last_contact is None else max(0.0, self._reactor.seconds() - self.last_contact)
        return {"backend": "redis", "url": self.url, "prefix": self.prefix, "following": self._apply is not None,
                "up": bool(self.up), "version": self.version, "lag_seconds": lag}

    def close(self):
        self._closing = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for wait in self._waits:
            wait[2].cancel()
            wait[1].callback(None)
        self._waits = []
        reading = self._reading
        done = Deferred()

        def stop(_=None):
            self._stop_threads()
            self._client.close()
            self._feed_client.close()
            done.callback(None)

        if reading is not None:
            # The feed's read ends within FEED_BLOCK_MS (or the timeout): its thread is then free to stop.
            reading.addBoth(lambda _: None)
            reading.addCallback(lambda _: stop())
        else:
            stop()
        return done



class FollowService(service.Service):
    """Follows the shared store once the daemon starts (the primary's or the lone daemon's)."""

    name = "store-follower"

    def __init__(self, store: ISharedStore, apply):
        self.store = store
        self.apply = apply

    def startService(self):
        super().startService()
        self.store.follow(self.apply)


class StoreCollector:
    """C{aibackend_store_up}, C{aibackend_store_lag_seconds}, C{aibackend_store_version}."""

    def __init__(self, store: ISharedStore):
        self.store = store

    def collect(self):
        state = self.store.state()
        up = GaugeMetricFamily("aibackend_store_up", "1 while the shared store (Redis) answers, else 0.")
        up.add_metric([], 1 if state["up"] else 0)
        lag = GaugeMetricFamily(
            "aibackend_store_lag_seconds",
            "Seconds since the shared store's feed last answered (the registry is at most this old; "
            "up to about 1 s while nothing changes).")
        lag.add_metric([], state["lag_seconds"] if state["lag_seconds"] is not None else float("nan"))
        version = GaugeMetricFamily("aibackend_store_version", "The shared store's change counter, as followed here.")
        version.add_metric([], state["version"])
        return [up, lag, version]
