"""
Keys in a store several daemons share (L{aibackend.keys.KeyManager} following a shared
store's feed), in memory: the rows another daemon changed held and told to the workers,
nothing told when nothing changed, a key required while the store cannot say which keys
it has, a change made here not undoing another daemon's that came meanwhile, and one
reload at a time.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from aibackend.keys import KeyManager, KeyRecord, KeyRing, digest, new_secret
from aibackend.store import MemoryStore
from aibackend.testing import has_fired, result_of


def a_key(name: str = "team", key_id: str = "0123456789ab") -> tuple[KeyRecord, str]:
    secret = new_secret(key_id)
    return KeyRecord(key_id=key_id, name=name, models=None, limits=None, created=1.0, digest=digest(secret)), secret


def manager(store=None) -> tuple[KeyManager, list, list]:
    keys = KeyManager(KeyRing(), store if store is not None else MemoryStore(), clock=Clock())
    told, updated = [], []
    keys.changed.append(lambda name: told.append(name) or succeed(None))
    keys.updated.append(lambda: updated.append(True))
    keys.load()
    return keys, told, updated


def test_the_rows_another_daemon_changed_are_held_and_told_once():
    keys, told, updated = manager()
    record, secret = a_key()

    result_of(keys.follow([record.row()]))
    assert keys.ring.caller(secret).name == "team" and told == ["team"] and updated == [True]

    result_of(keys.follow([record.row()]))  # the same again (a full read after a gap): nothing to tell
    assert told == ["team"] and updated == [True]

    result_of(keys.follow([replace(record, revoked=2.0).row()]))
    assert keys.ring.caller(secret) is None and told == ["team", "team"]
    assert keys.ring.required  # a revoked key still makes keys required


def test_a_store_that_cannot_say_its_keys_at_start_makes_a_key_required_until_it_does():
    class Unreachable(MemoryStore):
        def load_keys(self):
            return None

    keys, told, updated = manager(Unreachable())
    assert keys.ring.required and not keys.ring.stored

    result_of(keys.follow([]))  # it answers: no key kept, the daemon is open again as configured
    assert not keys.ring.required and updated == [True] and told == []


def test_a_change_made_here_holds_what_the_feed_brought_meanwhile():
    class Held(MemoryStore):
        def rotate_key(self, key_id, digest, when):
            super().rotate_key(key_id, digest, when)
            self.held = Deferred()
            return self.held

    store = Held()
    keys, told, _ = manager(store)
    record, _ = a_key()
    result_of(store.put_key(record.row()))
    result_of(keys.follow(store.load_keys()))

    rotating = keys.rotate("team")
    store.keys[record.key_id]["revoked"] = 5.0  # another daemon revoked it meanwhile: the feed brought it
    result_of(keys.follow(store.load_keys()))
    keys.followed = store.load_keys  # the shared store's rows, this rotation among them
    store.held.callback(None)
    new_secret_ = result_of(rotating)["secret"]

    assert keys.ring.records["team"].revoked == 5.0 and keys.ring.caller(new_secret_) is None


def test_one_reload_at_a_time_so_an_older_read_never_undoes_a_newer():
    class Slow(MemoryStore):
        def __init__(self):
            super().__init__()
            self.reads = []

        def read_keys(self):
            self.reads.append(Deferred())
            return self.reads[-1]

    store = Slow()
    keys, _, _ = manager(store)
    record, secret = a_key()

    first, second = keys.reload(), keys.reload()
    assert len(store.reads) == 1  # the second read waits for the first
    store.reads[0].callback([record.row()])
    assert has_fired(first) and len(store.reads) == 2
    store.reads[1].callback([replace(record, revoked=3.0).row()])
    assert has_fired(second) and keys.ring.caller(secret) is None
