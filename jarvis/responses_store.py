"""ResponseStore: stored Responses API responses in SQLite under the server's state dir.

Each stored response keeps the response object as it was returned and the whole conversation it
answered (every earlier turn's input and output, then this request's input; never `instructions`), so
`previous_response_id` rebuilds a conversation from one row, even after a restart or after an earlier
response in the chain was deleted. A row is committed (WAL, synchronous=FULL) before the response
reaches the client, so a response the client saw survives a crash. `store: false` responses never
come here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, previous_response_id TEXT,
    response TEXT NOT NULL, context TEXT NOT NULL);
"""

_stores: dict[Path, ResponseStore] = {}
_stores_lock = threading.Lock()


def responses_store(state_path: Path) -> ResponseStore:
    """The one store of a state dir in this process (the route and the batch runner share it)."""
    path = (state_path / "responses.sqlite3").resolve()
    with _stores_lock:
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = ResponseStore(path)
        return store


class ResponseStore:
    def __init__(self, database: Path) -> None:
        database.parent.mkdir(parents=True, exist_ok=True)
        self.database = database
        self._lock = threading.Lock()
        self._db = sqlite3.connect(database, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a response the client saw survives a crash, even of the OS
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save(self, response: dict[str, Any], context: list[dict[str, Any]]) -> None:
        """Keep `response` and the conversation it answered (input items, oldest first)."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (response["id"], response["created_at"], response.get("previous_response_id"),
                              json.dumps(response), json.dumps(context)))

    def get(self, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE id = ?", (response_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def context(self, response_id: str) -> list[dict[str, Any]] | None:
        """The input items a response answered (earlier turns included), oldest first."""
        with self._lock:
            row = self._db.execute("SELECT context FROM responses WHERE id = ?", (response_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """What a follow-up with `previous_response_id` continues: the context, then the response's output."""
        with self._lock:
            row = self._db.execute("SELECT response, context FROM responses WHERE id = ?",
                                   (response_id,)).fetchone()
        if row is None:
            return None
        return [*json.loads(row[1]), *json.loads(row[0])["output"]]

    def delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            cursor = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cursor.rowcount == 1
