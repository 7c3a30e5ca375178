"""
Client keys as stored objects: made, listed, revoked and rotated by admin operations
(C{addkey}, C{keys}, C{revokekey}, C{rotatekey}), kept in the store, and looked up by the
guard (L{aibackend.auth.Guard.check_client}) for every request, which then carries the
key's L{aibackend.policy.Caller}.

A key has an id (12 hex digits, public: it names the key in lists), a unique name
(C{[A-Za-z0-9_.-]{1,64}}: the label usage and metrics use), the models it may call (a
list of ids, or every model), optional limits (L{aibackend.ratelimit.Limits}), the times
it was created, last rotated and revoked, and the SHA-256 of its secret, never the
secret itself. The secret is shown once, when the key is made (or rotated):
C{aib-<id>-<43 characters of secrets.token_urlsafe(32)>}, so a leaked one is recognised
(secret scanners) and its key found with one dict access.

Why SHA-256 and not bcrypt or argon2: those are slow on purpose, to make guessing a
human's password (a few dozen bits) expensive. A secret here is 256 random bits: no
guess list gets anywhere near it, so a slow hash would protect nothing and cost its
milliseconds on every request. A fast hash keeps the stored value useless to whoever
reads the database (it is not the secret), and comparing digests with
C{hmac.compare_digest} takes the same time whatever the secret given. The id in the
secret is public (it is listed), so finding the key by it leaks nothing.

Keys are required once any key exists: a configured C{api_keys} entry, or a key in the
store (revoked ones included, so that revoking the last key never opens the daemon to
everyone; deleting the last one, C{deletekey}, does). A daemon with neither lets anyone
call its models, as before.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from hashlib import sha256
from hmac import compare_digest

from twisted.internet.defer import DeferredLock, inlineCallbacks
from twisted.logger import Logger

from aibackend import errors
from aibackend.config import ID_PATTERN, MAX_ID_LENGTH
from aibackend.policy import Caller
from aibackend.ratelimit import Limits, parse_limits
from aibackend.store import KeyExists

PREFIX = "aib-"
ID_DIGITS = 12
# aib-<12 hex digits>-<token_urlsafe(32): 43 characters>
SECRET_LENGTH = len(PREFIX) + ID_DIGITS + 1 + 43
# (Beginning with a letter or digit: "-" is the usage's anonymous key, aibackend.usage.)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
# The names the guard gives the keys that are not stored (configured api_keys by position, the
# admin token): a stored key may not take one, so that usage and metrics never mix them up.
CONFIGURED_NAME = re.compile(r"config-[0-9]+", re.ASCII)
ADMIN_NAME = "admin"
# The label /metrics gives the usage of keys past its bound (aibackend.usage.OTHER).
OTHER_NAME = "other"
ADMIN_CALLER = Caller(ADMIN_NAME)
ALL_MODELS = "*"
ADDKEY_KEYS = ("name", "models", "limits")
_PREFIX = PREFIX.encode()
_ID_START, _ID_END = len(PREFIX), len(PREFIX) + ID_DIGITS
_DASH = ord("-")


def digest(secret: str) -> bytes:
    """The SHA-256 of a secret (see the module's docstring for why a fast hash)."""
    return sha256(secret.encode("utf-8")).digest()


def new_secret(key_id: str) -> str:
    """A new secret for key C{key_id}: C{aib-<id>-<256 random bits, URL-safe>}."""
    return f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def new_key_id() -> str:
    return secrets.token_hex(ID_DIGITS // 2)


def key_id_of(secret: str) -> str | None:
    """The key id a secret names, or None when it is not one of ours (a configured key, say)."""
    if len(secret) == SECRET_LENGTH and secret.startswith(PREFIX) and secret[len(PREFIX) + ID_DIGITS] == "-":
        return secret[len(PREFIX):len(PREFIX) + ID_DIGITS]
    return None


def _time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_name(name) -> str:
    """@raise errors.BadRequest: C{name} is not a key's name."""
    if not isinstance(name, str) or not name:
        raise errors.BadRequest("a key needs a name: 1 to 64 characters of A-Z a-z 0-9 _ . -, the first a letter "
                                "or a digit")
    if NAME_PATTERN.fullmatch(name) is None:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise errors.BadRequest(f"a key's name is 1 to 64 characters of A-Z a-z 0-9 _ . -, the first a letter or "
                                f"a digit, not {shown!r}")
    return name


def read_models(value) -> tuple | None:
    """
    The models of an C{addkey} body: absent or C{"*"} for every model, else a non-empty
    list of model ids. Ids of models the daemon does not have (yet) are allowed: models
    come and go at runtime, and a key made for a model before it is added is not wrong.

    @return: the sorted ids, or None for every model.
    @raise errors.BadRequest: anything else.
    """
    if value is None or value == ALL_MODELS:
        return None
    if not isinstance(value, list) or not value:
        raise errors.BadRequest('models is a non-empty list of model ids, or "*" for every model')
    for model_id in value:
        if (not isinstance(model_id, str) or not model_id or len(model_id) > MAX_ID_LENGTH
                or ID_PATTERN.match(model_id) is None):
            raise errors.BadRequest(f"models: {model_id!r} is not a model id")
    return tuple(sorted(set(value)))


@dataclass(frozen=True)
class KeyRecord:
    """
    One stored key (never its secret).

    @ivar key_id: 12 hex digits, public.
    @ivar name: unique, a bounded label.
    @ivar models: the sorted model ids it may call, or None for every model.
    @ivar limits: its L{Limits}, or None.
    @ivar created: when it was made (seconds since the epoch); C{rotated} and C{revoked}
        likewise, or None.
    @ivar digest: the SHA-256 of its secret.
    """

    key_id: str
    name: str
    models: tuple | None
    limits: Limits | None
    created: float
    digest: bytes
    rotated: float | None = None
    revoked: float | None = None

    def caller(self) -> Caller:
        """The L{Caller} a request with this key carries."""
        models = None if self.models is None else frozenset(self.models)
        return Caller(self.name, models, self.limits)

    def public(self) -> dict:
        """What an admin may see: neither the secret nor its hash."""
        return {
            "name": self.name,
            "id": self.key_id,
            "prefix": f"{PREFIX}{self.key_id}-",
            "models": ALL_MODELS if self.models is None else list(self.models),
            "limits": None if self.limits is None else self.limits.table(),
            "created": _time(self.created),
            "rotated": _time(self.rotated),
            "revoked": _time(self.revoked),
        }

    def row(self) -> dict:
        """What the store keeps (L{aibackend.store.IKeyStore}): plain JSON values."""
        return {
            "id": self.key_id, "name": self.name, "digest": self.digest.hex(),
            "models": None if self.models is None else list(self.models),
            "limits": None if self.limits is None else self.limits.table(),
            "created": self.created, "rotated": self.rotated, "revoked": self.revoked,
        }

    @classmethod
    def from_row(cls, row: dict) -> KeyRecord:
        """
        A key as the store kept it (read again with the same checks as C{addkey}).

        @raise ValueError: the row is not a key's (the message says why).
        """
        limits = row.get("limits")
        try:
            models = read_models(row.get("models"))
            name = check_name(row.get("name"))
        except errors.ApiError as e:
            raise ValueError(e.message) from None
        return cls(
            key_id=str(row["id"]), name=name, models=models,
            limits=None if not limits else parse_limits(limits, f"the limits of key {name}"),
            created=float(row["created"]), digest=bytes.fromhex(row["digest"]),
            rotated=None if row.get("rotated") is None else float(row["rotated"]),
            revoked=None if row.get("revoked") is None else float(row["revoked"]),
        )


class KeyRing:
    """
    The keys a request may carry, in memory: the stored keys (by id), the configured
    C{api_keys} (L{Caller}s named C{config-1}, C{config-2}... by position) and the admin
    token (named C{admin}).

    @ivar required: does a client need a key? (any configured or stored key exists)
    @ivar stored: does the store hold any key (revoked ones included)?
    """

    def __init__(self, configured=(), admin_token: str | None = None):
        # (digest, Caller) of every key that is not stored, compared one by one (few).
        fixed = [(digest(key), Caller(f"config-{number}")) for number, key in enumerate(configured, 1)]
        if admin_token:
            fixed.append((digest(admin_token), ADMIN_CALLER))
        self._fixed = tuple(fixed)
        self._configured = bool(configured)
        # Active stored keys by id (as bytes: what L{secret_caller} slices from a secret): (digest, Caller).
        self._active: dict[bytes, tuple[bytes, Caller]] = {}
        self.records: dict[str, KeyRecord] = {}  # by name, revoked ones included
        self.stored = False
        self.required = self._configured

    def replace(self, records) -> None:
        """Hold exactly C{records} (what the store has)."""
        self.records = {record.name: record for record in records}
        self._index()

    def unknown(self) -> None:
        """
        The stored keys cannot be read now (a shared store that does not answer at start):
        require a key until they are (L{replace}), so that the daemon never opens to
        everyone for want of its keys.
        """
        self.required = True

    def put(self, record: KeyRecord) -> None:
        """Hold C{record} in place of the key of its name, if any."""
        self.records[record.name] = record
        self._index()

    def forget(self, record: KeyRecord) -> None:
        """Hold the key of C{record}'s name no more."""
        self.records.pop(record.name, None)
        self._index()

    def _index(self) -> None:
        # A new dict, bound at once: a lookup never sees one half made.
        self._active = {record.key_id.encode("utf-8", "surrogatepass"): (record.digest, record.caller())
                        for record in self.records.values() if record.revoked is None}
        self.stored = bool(self.records)
        self.required = self._configured or self.stored

    def caller(self, secret: str) -> Caller | None:
        """
        The L{Caller} of the key whose secret is C{secret}, or None (no such key, or it is
        revoked or rotated away). Digests are compared with C{hmac.compare_digest}.
        """
        return self.secret_caller(secret.encode("utf-8"))

    def secret_caller(self, secret: bytes) -> Caller | None:
        """
        L{caller} of a secret's UTF-8 bytes (the guard's hot path: a header's bytes, no
        text made of them): one dict access by the id the secret names (L{key_id_of}, on
        bytes), one SHA-256, one comparison with each key that is not stored.
        """
        given = sha256(secret).digest()
        if len(secret) == SECRET_LENGTH and secret[_ID_END] == _DASH and secret.startswith(_PREFIX):
            found = self._active.get(secret[_ID_START:_ID_END])
            if found is not None and compare_digest(given, found[0]):
                return found[1]
        # Compare with every key that is not stored, always, so the time taken says nothing about which.
        matched = None
        for key_digest, caller in self._fixed:
            if compare_digest(given, key_digest) and matched is None:
                matched = caller
        return matched


class KeyManager:
    """
    The admin operations on keys: each change is kept in the store (durable before it
    is answered), then held by the ring, then told to whoever follows (L{changed}: with
    C{--processes}, the workers, which read the store again before the primary answers).

    @param ring: the guard's L{KeyRing}.
    @param store: an L{aibackend.store.IKeyStore} (each of the daemon's stores is one: SQLite,
        memory, the fleet's Redis).
    @param clock: an C{IReactorTime}, for the times a key keeps.

    @ivar changed: callables (given the key's name) returning Deferreds, awaited before an
        operation answers.
    @ivar updated: callables (no argument) called whenever the ring changed, here, by
        L{reload} or by L{follow} (the daemon makes its policy once the first key exists).
    @ivar followed: a shared store's callable giving every key's row as its feed last
        brought them, or None while a change made here has not come back through it; None
        (the attribute): the store is not shared. After a change made here, the ring holds
        those rows, so that another daemon's change to the same key that came meanwhile
        (a revocation) is not undone by this one's.
    """

    log = Logger()

    def __init__(self, ring: KeyRing, store, *, clock):
        self.ring = ring
        self.store = store
        self.clock = clock
        self.changed = []
        self.updated = []
        self.followed = None
        self._unknown = False  # the store could not say which keys it has (at start)
        # One reload at a time: two reads at once (two quick changes) may end in either order, and the
        # older one held last would undo the newer (a revocation).
        self._reloads = DeferredLock()
        self._busy: set[str] = set()  # names being changed by a request that is not answered yet

    def load(self) -> None:
        """Read the stored keys, at start (before the reactor runs; may block)."""
        rows = self.store.load_keys()
        if rows is None:  # a shared store that cannot be reached now: what it says comes by L{follow}
            self._unknown = True
            self.ring.unknown()
            self.log.warn("aibackend: the stored client keys cannot be read now: every client needs a key "
                          "(configured api_keys work; stored keys once the store answers)")
            return
        self._hold(rows)
        records = self.ring.records.values()
        if records:
            self.log.info("aibackend: {count} client key(s) kept ({revoked} revoked): every client needs a key",
                          count=len(records), revoked=sum(record.revoked is not None for record in records))

    def reload(self):
        """Read the stored keys again, off the reactor thread (a worker follows its primary). @return: a Deferred."""
        return self._reloads.run(lambda: self.store.read_keys().addCallback(self._hold))

    @inlineCallbacks
    def follow(self, rows):
        """
        Hold every key's row as a shared store's feed brought them (another daemon changed
        a key, or the feed read everything again), then tell whoever follows (L{changed}:
        the workers) when anything changed. @return: a Deferred.
        """
        changed = self._hold(rows)
        if changed:
            for callback in self.changed:
                yield callback(changed[0])

    def _hold(self, rows) -> list:
        """Hold exactly C{rows}. @return: the names of the keys that changed (sorted)."""
        records = {}
        for row in rows:
            try:
                record = KeyRecord.from_row(row)
            except (ValueError, KeyError, TypeError) as e:
                self.log.error("a stored key ({key_id}) cannot be read and is ignored: {why}",
                               key_id=str(row.get("id")), why=str(e))
            else:
                records[record.name] = record
        held = self.ring.records
        changed = sorted(name for name in records.keys() | held.keys() if records.get(name) != held.get(name))
        if changed or self._unknown:
            self._unknown = False
            self.ring.replace(records.values())
            self._updated()
        return changed

    def _updated(self) -> None:
        for callback in self.updated:
            callback()

    def keys(self) -> list[dict]:
        """Every key, by name, without secret or hash."""
        return [self.ring.records[name].public() for name in sorted(self.ring.records)]

    def _record(self, name: str) -> KeyRecord:
        check_name(name)
        record = self.ring.records.get(name)
        if record is None:
            raise errors.NotFound(f"no key named {name!r}: GET /get/keys lists them")
        return record

    @inlineCallbacks
    def _keep(self, name: str, write, record: KeyRecord, hold=None):
        """
        Keep a change (C{write}: called for the store's Deferred), hold it (C{hold(record)}:
        by default, the ring's C{put}), tell the followers; one change to a name at a time.
        """
        if name in self._busy:
            raise errors.Conflict(f"key {name!r} is being changed by another request")
        self._busy.add(name)
        try:
            try:
                yield write()
            except KeyExists:  # made by another process of a fleet meanwhile
                raise errors.Conflict(f"a key named {name!r} exists: choose another") from None
            rows = self.followed() if self.followed is not None else None
            if rows is None:
                (self.ring.put if hold is None else hold)(record)
                self._updated()
            else:  # the shared store's keys, this change among them
                self._hold(rows)
            for callback in self.changed:
                yield callback(name)
        finally:
            self._busy.discard(name)

    @inlineCallbacks
    def add(self, table) -> dict:
        """
        C{addkey}: a new key from C{table} (C{name}, C{models}, C{limits}).

        @return: a Deferred of its public record with C{secret}, shown this once.
        @raise errors.BadRequest: a wrong table; L{errors.Conflict}: the name is taken.
        """
        if not isinstance(table, dict):
            raise errors.BadRequest("addkey takes a JSON object: name, models (a list or \"*\"), limits")
        unknown = sorted(key for key in table if key not in ADDKEY_KEYS)
        if unknown:
            raise errors.BadRequest(f"addkey has no key {unknown[0]!r}: its keys are {', '.join(ADDKEY_KEYS)}")
        name = check_name(table.get("name"))
        if name in (ADMIN_NAME, OTHER_NAME) or CONFIGURED_NAME.fullmatch(name):
            raise errors.BadRequest(f"the key name {name!r} is reserved (the admin token, configured api_keys, "
                                    "the usage of keys past /metrics' bound)")
        models = read_models(table.get("models"))
        limits = table.get("limits")
        try:
            limits = parse_limits(limits) if limits else None
        except ValueError as e:
            raise errors.BadRequest(str(e)) from None
        if name in self.ring.records:
            raise errors.Conflict(f"a key named {name!r} exists (revoked keys keep their names): choose another")
        key_id = new_key_id()
        secret = new_secret(key_id)
        record = KeyRecord(key_id=key_id, name=name, models=models, limits=limits, created=self.clock.seconds(),
                           digest=digest(secret))
        yield self._keep(name, lambda: self.store.put_key(record.row()), record)
        self.log.info("key {name} added (id {key_id}, models {models})", name=name, key_id=key_id,
                      models="all" if models is None else ",".join(models))
        return {**record.public(), "secret": secret}

    @inlineCallbacks
    def revoke(self, name: str) -> dict:
        """C{revokekey}: the key is refused from now on (already revoked: nothing changes). @return: a Deferred."""
        record = self._record(name)
        if record.revoked is not None:
            return record.public()
        revoked = replace(record, revoked=self.clock.seconds())
        yield self._keep(name, lambda: self.store.revoke_key(record.key_id, revoked.revoked), revoked)
        self.log.info("key {name} revoked (id {key_id})", name=name, key_id=record.key_id)
        return revoked.public()

    @inlineCallbacks
    def delete(self, name: str) -> dict:
        """
        C{deletekey}: the key is forgotten (refused from now on, its name free again); with
        no key left, clients need none again. @return: a Deferred of what it was.
        """
        record = self._record(name)
        yield self._keep(name, lambda: self.store.delete_key(record.key_id), record, hold=self.ring.forget)
        self.log.info("key {name} deleted (id {key_id})", name=name, key_id=record.key_id)
        return {**record.public(), "deleted": True}

    @inlineCallbacks
    def rotate(self, name: str) -> dict:
        """C{rotatekey}: a new secret (shown this once); the old one is refused at once. @return: a Deferred."""
        record = self._record(name)
        if record.revoked is not None:
            raise errors.Conflict(f"key {name!r} is revoked: make a new key (addkey)")
        secret = new_secret(record.key_id)
        rotated = replace(record, digest=digest(secret), rotated=self.clock.seconds())
        yield self._keep(name, lambda: self.store.rotate_key(record.key_id, rotated.digest.hex(), rotated.rotated),
                         rotated)
        self.log.info("key {name} rotated (id {key_id})", name=name, key_id=record.key_id)
        return {**rotated.public(), "secret": secret}
