"""ResponseStore: stored Responses API responses in SQLite under the server's state dir.

Each stored response keeps the response object as it was returned, the whole conversation it answered
(every earlier turn's input and output, then this request's input; never `instructions`) and its owner
(`jarvis.auth`: a keyed hash of the API key that made it; none on a server without keys). So
`previous_response_id` rebuilds a conversation from one row, even after a restart or after an earlier
response in the chain was deleted. A row is committed (WAL, synchronous=FULL, on the store's own thread:
`jarvis.sqlite_store`) before the response reaches the client, so a response the client saw survives a
crash. `store: false` responses never come here. A database from before owners were recorded gets the
column on open; its rows are owned by no one, which only an admin key sees.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jarvis.sqlite_store import SQLiteStore

log = logging.getLogger("jarvis.responses")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, previous_response_id TEXT,
    response TEXT NOT NULL, context TEXT NOT NULL, owner TEXT);
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


@dataclass
class StoredResponse:
    response: dict[str, Any]
    context: list[dict[str, Any]]  # the input items it answered, earlier turns included, oldest first
    owner: str | None

    def conversation(self) -> list[dict[str, Any]]:
        """What a follow-up with `previous_response_id` continues: the context, then the response's output."""
        return [*self.context, *self.response["output"]]


class ResponseStore(SQLiteStore):
    def __init__(self, database: Path) -> None:
        super().__init__(database, _SCHEMA)
        if migrated := self.add_column("responses", "owner", "TEXT"):
            log.warning("%s: %d stored response(s) from before owners were recorded are now owned by no one: "
                        "only an admin key sees them", database, migrated)

    def save(self, response: dict[str, Any], context: list[dict[str, Any]], owner: str | None = None) -> None:
        """Keep `response`, the conversation it answered (input items, oldest first) and its owner."""
        row = (response["id"], response["created_at"], response.get("previous_response_id"), json.dumps(response),
               json.dumps(context), owner)
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)

    def find(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute("SELECT response, context, owner FROM responses WHERE id = ?",
                                   (response_id,)).fetchone()
        return StoredResponse(json.loads(row[0]), json.loads(row[1]), row[2]) if row else None

    def delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            cursor = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cursor.rowcount == 1
