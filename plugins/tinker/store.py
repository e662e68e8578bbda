"""TinkerStore: the Tinker service's sessions, training models, sampling sessions, checkpoints and futures.

One SQLite database under the service's folder (`jarvis.sqlite_store`: WAL, synchronous=FULL, its own
thread). Every row records its owner (`jarvis.auth`: a keyed hash of the API key that made it), and every
lookup takes the caller, so another key's objects answer as unknown. A future is recorded when it is
accepted and again when it ends, with its result: a client that polls after a restart gets the result, or,
for work the restart cut short, a server error saying so, never a future that waits forever.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jarvis.auth import Principal
from jarvis.sqlite_store import SQLiteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, owner TEXT, created_at REAL NOT NULL, finished_at REAL, tags TEXT);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, owner TEXT, session_id TEXT NOT NULL, base_model TEXT NOT NULL, lora TEXT NOT NULL,
    created_at REAL NOT NULL, last_request_at REAL NOT NULL, user_metadata TEXT);
CREATE TABLE IF NOT EXISTS samplers (
    id TEXT PRIMARY KEY, owner TEXT, session_id TEXT NOT NULL, base_model TEXT NOT NULL, model_path TEXT,
    adapter TEXT, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY, owner TEXT, model_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    folder TEXT NOT NULL, created_at REAL NOT NULL, size_bytes INTEGER, user_metadata TEXT);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, owner TEXT, kind TEXT NOT NULL, state TEXT NOT NULL, content_type TEXT,
    body BLOB, error TEXT, category TEXT, created_at REAL NOT NULL);
"""

RESTARTED = "The server restarted before this request finished; send it again."


class TinkerStore(SQLiteStore):
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        super().__init__(root / "tinker.sqlite3", _SCHEMA)
        with self._lock, self._db:  # work a previous process accepted and never finished
            self._db.execute("UPDATE futures SET state = 'failed', error = ?, category = 'server' "
                             "WHERE state = 'pending'", (RESTARTED,))

    def _visible(self, table: str, key: str, value: str, viewer: Principal) -> dict[str, Any] | None:
        mine, params = viewer.owner_filter()
        with self._lock:
            row = self._db.execute(f"SELECT * FROM {table} WHERE {key} = ? AND {mine}", (value, *params)).fetchone()
        return dict(row) if row else None

    # --- sessions ----------------------------------------------------------------------------------

    def add_session(self, session_id: str, owner: str | None, tags: list[str]) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, NULL, ?)",
                             (session_id, owner, time.time(), json.dumps(tags)))

    def session(self, session_id: str, viewer: Principal) -> dict[str, Any] | None:
        return self._visible("sessions", "id", session_id, viewer)

    def finish_session(self, session_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE sessions SET finished_at = ? WHERE id = ? AND finished_at IS NULL",
                             (time.time(), session_id))

    # --- training models ---------------------------------------------------------------------------

    def add_model(self, model_id: str, owner: str | None, session_id: str, base_model: str, lora: dict[str, Any],
                  user_metadata: dict[str, Any] | None) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (model_id, owner, session_id, base_model, json.dumps(lora), now, now,
                              json.dumps(user_metadata) if user_metadata else None))

    def model(self, model_id: str, viewer: Principal) -> dict[str, Any] | None:
        row = self._visible("models", "id", model_id, viewer)
        if row is not None:
            row["lora"] = json.loads(row["lora"])
        return row

    def touch_model(self, model_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE models SET last_request_at = ? WHERE id = ?", (time.time(), model_id))

    def models(self, viewer: Principal, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        mine, params = viewer.owner_filter()
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM models WHERE {mine} ORDER BY created_at DESC LIMIT ? OFFSET ?",
                                    (*params, limit, offset)).fetchall()
            total = self._db.execute(f"SELECT COUNT(*) FROM models WHERE {mine}", params).fetchone()[0]
        return [{**dict(r), "lora": json.loads(r["lora"])} for r in rows], total

    # --- sampling sessions -------------------------------------------------------------------------

    def add_sampler(self, sampler_id: str, owner: str | None, session_id: str, base_model: str,
                    model_path: str | None, adapter: str | None) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO samplers VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (sampler_id, owner, session_id, base_model, model_path, adapter, time.time()))

    def sampler(self, sampler_id: str, viewer: Principal) -> dict[str, Any] | None:
        return self._visible("samplers", "id", sampler_id, viewer)

    # --- checkpoints -------------------------------------------------------------------------------

    def add_checkpoint(self, path: str, owner: str | None, model_id: str, kind: str, name: str, folder: Path,
                       user_metadata: dict[str, Any] | None) -> None:
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (path, owner, model_id, kind, name, str(folder), time.time(), size,
                              json.dumps(user_metadata) if user_metadata else None))

    def checkpoint(self, path: str, viewer: Principal) -> dict[str, Any] | None:
        return self._visible("checkpoints", "path", path, viewer)

    def checkpoints(self, model_id: str, viewer: Principal) -> list[dict[str, Any]]:
        mine, params = viewer.owner_filter()
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM checkpoints WHERE model_id = ? AND {mine} ORDER BY created_at",
                                    (model_id, *params)).fetchall()
        return [dict(r) for r in rows]

    def delete_checkpoint(self, path: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM checkpoints WHERE path = ?", (path,))

    # --- futures -----------------------------------------------------------------------------------

    def add_future(self, request_id: str, owner: str | None, kind: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO futures (request_id, owner, kind, state, created_at) "
                             "VALUES (?, ?, ?, 'pending', ?)", (request_id, owner, kind, time.time()))

    def end_future(self, request_id: str, state: str, content_type: str | None, body: bytes | None,
                   error: str | None, category: str | None) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE futures SET state = ?, content_type = ?, body = ?, error = ?, category = ? "
                             "WHERE request_id = ?", (state, content_type, body, error, category, request_id))

    def future(self, request_id: str, viewer: Principal) -> dict[str, Any] | None:
        return self._visible("futures", "request_id", request_id, viewer)
