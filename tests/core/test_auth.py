"""Keys, scopes and owners in process: who a key is, what a route needs, what each caller's store rows are,
and that a busy store never holds up the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import stat
import time

import pytest

from jarvis.auth import (
    ANONYMOUS,
    SINGLE_USER,
    KeyRing,
    Principal,
    access_level,
    control_key,
    key_scopes,
    owner_secret,
)
from jarvis.plugins.batch.store import BatchJobStore
from jarvis.responses_store import ResponseStore
from jarvis.settings import SettingsError, load_settings


def test_keys_from_every_source_with_their_scopes(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nsk-file-user\nsk-file-ops admin  # on call\nsk-env-user admin\n")
    settings = load_settings(api_keys="sk-env-user,sk-other", admin_keys="sk-ops", api_keys_file=keys_file,
                             state_dir=tmp_path / "state")
    assert key_scopes(settings) == {"sk-env-user": {"admin"}, "sk-other": set(), "sk-ops": {"admin"},
                                    "sk-file-user": set(), "sk-file-ops": {"admin"}}
    assert settings.all_api_keys == ["sk-env-user", "sk-other", "sk-ops", "sk-file-user", "sk-file-ops"]
    assert control_key(settings) == "sk-env-user"  # what `jarvis train --publish` sends: an admin key
    keys_file.write_text("sk-x superuser\n")
    with pytest.raises(SettingsError, match="unknown scope 'superuser'"):
        load_settings(api_keys_file=keys_file)


def test_a_key_is_known_by_a_keyed_hash_never_by_itself(tmp_path):
    ring = KeyRing({"sk-a": frozenset(), "sk-admin": frozenset({"admin"})}, owner_secret(tmp_path))
    a, admin = ring.identify("sk-a"), ring.identify("sk-admin")
    assert a == Principal(owner=ring.owner_of("sk-a"), admin=False) and admin is not None and admin.admin
    assert ring.identify("sk-b") is None and ring.identify(None) is None and ring.identify("") is None
    assert a.owner not in ("sk-a", hashlib.sha256(b"sk-a").hexdigest()) and "sk-a" not in a.label
    other_server = KeyRing({"sk-a": frozenset()}, b"another secret")
    assert other_server.owner_of("sk-a") != a.owner  # without the secret a guess cannot be checked
    assert owner_secret(tmp_path) == ring.secret  # kept across restarts
    assert stat.S_IMODE((tmp_path / "owner.secret").stat().st_mode) == 0o600
    assert KeyRing({}, b"").anonymous is SINGLE_USER and ring.anonymous is ANONYMOUS


def test_who_sees_what():
    alice, bob = Principal(owner="a" * 64), Principal(owner="b" * 64)
    assert alice.may_see("a" * 64) and not alice.may_see("b" * 64) and not alice.may_see(None)
    assert SINGLE_USER.may_see(None) and SINGLE_USER.may_see("a" * 64)  # the admin, or a server without keys
    assert not ANONYMOUS.may_see(None) and not bob.may_see(None)  # owned by no one: the admin's


def test_what_each_route_needs(tmp_path):
    settings = load_settings(protect_health=False, engine_info_access="admin")
    assert access_level(settings, "/v1/chat/completions", {}) == "key"
    assert access_level(settings, "/tokenize", {}) == "key"
    assert access_level(settings, "/health", {}) == "open"
    assert access_level(settings, "/metrics", {"access": "admin"}) == "admin"
    assert access_level(settings, "/v1/engine", {"access_setting": "engine_info_access"}) == "admin"
    assert access_level(load_settings(protect_health=True), "/health/ready", {}) == "key"


def test_lists_hold_only_the_callers_rows_and_pages_stay_whole(tmp_path):
    store = BatchJobStore(tmp_path)
    alice, bob = Principal(owner="a" * 64), Principal(owner="b" * 64)
    for i in range(5):  # interleaved owners: a page of one owner's rows must skip the other's
        store.add_file(f"file-a{i}", "x.jsonl", "batch", 1, alice.owner)
        store.add_file(f"file-b{i}", "x.jsonl", "batch", 1, bob.owner)
    store.add_file("file-none", "x.jsonl", "batch", 1, None)
    page, more = store.list_files(None, None, 2, False, alice)
    assert [f["id"] for f in page] == ["file-a4", "file-a3"] and more
    page, more = store.list_files(None, "file-a3", 3, False, alice)
    assert [f["id"] for f in page] == ["file-a2", "file-a1", "file-a0"] and not more
    page, _ = store.list_files(None, "file-b2", 10, False, alice)  # another owner's id anchors nothing
    assert [f["id"] for f in page] == [f"file-a{i}" for i in range(4, -1, -1)]
    assert len(store.list_files(None, None, 100, True, SINGLE_USER)[0]) == 11
    assert store.list_files(None, None, 100, True, ANONYMOUS)[0] == []
    assert store.find_file("file-a0") == (store.get_file("file-a0"), alice.owner)
    batch = store.create_batch(endpoint="/v1/chat/completions", completion_window="24h", owner=bob.owner)
    assert store.list_batches(None, 10, alice)[0] == [] and store.list_batches(None, 10, bob)[0][0]["id"] == batch
    store.close()


def test_a_busy_store_does_not_hold_up_the_event_loop(tmp_path):
    """While a write holds the store (as a slow fsync does), the loop keeps serving; the write then lands."""
    store = ResponseStore(tmp_path / "responses.sqlite3")
    response = {"id": "resp_1", "created_at": 1, "output": []}

    async def scenario() -> tuple[int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        running = asyncio.create_task(ticker())
        with store._lock:  # the store is busy for 0.3 s
            write = asyncio.create_task(store.run(store.save, response, [], "owner-1"))
            started = time.monotonic()
            await asyncio.sleep(0.3)
            ticks_while_busy = ticks
            assert not write.done()
        await write
        running.cancel()
        return ticks_while_busy, time.monotonic() - started

    ticks_while_busy, elapsed = asyncio.run(scenario())
    assert ticks_while_busy >= 5, f"the loop ticked only {ticks_while_busy} times in {elapsed:.2f} s"
    assert store.find("resp_1").owner == "owner-1"
    store.close()
