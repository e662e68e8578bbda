"""BatchJobStore: uploaded files, batch jobs and their per-line results in SQLite, file bodies on disk.

Everything a job needs to survive a crash lives here. A result is committed
(one row per input line, keyed by the line's number) before it counts as
done, and a second result for the same line is ignored, so a line that ran
twice around a crash still appears once. Output and error files are always
written from these rows, in input order. File bodies live under the store's
own folder, named by their generated id; an uploaded filename is only a label.

Every file and batch records its owner (`jarvis.auth`: a keyed hash of the API key that made it; a batch's
output and error files are its owner's). Lookups return the owner with the object, for the routes to
check; lists select the caller's rows in SQL, so pages are whole. A database from before owners were
recorded gets the columns on open; its rows are owned by no one, which only an admin key sees.
A server calls every method through `await store.run(...)` (`jarvis.sqlite_store`): writes and their
fsyncs never run on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jarvis.auth import SINGLE_USER, Principal
from jarvis.sqlite_store import SQLiteStore

log = logging.getLogger("jarvis.batch")

TERMINAL = ("completed", "failed", "cancelled", "expired")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
               "cancelling_at", "cancelled_at")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, owner TEXT);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT, input_path TEXT,
    input_sha256 TEXT, completion_window TEXT NOT NULL, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER,
    completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER,
    cancelled_at INTEGER, output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL DEFAULT 0,
    errors TEXT, metadata TEXT, owner TEXT);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, ok INTEGER NOT NULL,
    record TEXT NOT NULL, PRIMARY KEY (batch_id, line));
"""


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


class BatchJobStore(SQLiteStore):
    """One SQLite database plus a `files/` folder, both under `root`."""

    def __init__(self, root: Path, database: Path | None = None) -> None:
        self.root = root
        self.files_dir = root / "files"
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(database or root / "batch.sqlite3", _SCHEMA)
        for table in ("files", "batches"):
            if migrated := self.add_column(table, "owner", "TEXT"):
                log.warning("%s: %d %s from before owners were recorded are now owned by no one: only an admin "
                            "key sees them", self.database, migrated, table)

    # --- files -----------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        """Where a file's body lives: always inside `files_dir`, whatever the id holds."""
        self.files_dir.mkdir(exist_ok=True)
        name = hashlib.sha256(file_id.encode()).hexdigest()[:32]
        return self.files_dir / f"{name}.jsonl"

    def add_file(self, file_id: str, filename: str, purpose: str, size: int,
                 owner: str | None = None) -> dict[str, Any]:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                             (file_id, filename, purpose, size, int(time.time()), owner))
        return self.get_file(file_id)  # type: ignore[return-value]

    def keep_upload(self, received: Path, file_id: str, filename: str, purpose: str, size: int,
                    owner: str | None) -> dict[str, Any]:
        """An uploaded file, made durable (its bytes fsynced, then renamed into place) and recorded."""
        with received.open("rb") as f:
            os.fsync(f.fileno())
        received.replace(self.file_path(file_id))
        _sync_folder(self.files_dir)
        return self.add_file(file_id, filename, purpose, size, owner)

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        found = self.find_file(file_id)
        return found[0] if found else None

    def find_file(self, file_id: str) -> tuple[dict[str, Any], str | None] | None:
        """A file object and its owner."""
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return (file_object(row), row["owner"]) if row else None

    def list_files(self, purpose: str | None, after: str | None, limit: int, ascending: bool,
                   viewer: Principal = SINGLE_USER) -> tuple[list[dict[str, Any]], bool]:
        return self._page("files", file_object, after, limit, ascending, viewer,
                          ("purpose = ?", purpose) if purpose else None)

    def delete_file(self, file_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file_id).unlink(missing_ok=True)

    def batches_reading(self, file_id: str) -> list[str]:
        """Active batches whose input is this file."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM batches WHERE input_file_id = ? AND status IN ({','.join('?' * len(ACTIVE))})",
                (file_id, *ACTIVE)).fetchall()
        return [r["id"] for r in rows]

    # --- batches ---------------------------------------------------------------------------

    def create_batch(self, *, endpoint: str, completion_window: str, input_file_id: str | None = None,
                     input_path: Path | None = None, input_sha256: str | None = None,
                     metadata: dict[str, Any] | None = None, expires_in_s: int | None = None,
                     batch_id: str | None = None, owner: str | None = None) -> str:
        batch_id = batch_id or new_batch_id()
        created = int(time.time())
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, input_path, input_sha256, completion_window, "
                "status, created_at, expires_at, metadata, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, 'validating', ?, ?, ?, ?)",
                (batch_id, endpoint, input_file_id, str(input_path) if input_path else None, input_sha256,
                 completion_window, created, created + expires_in_s if expires_in_s else None,
                 json.dumps(metadata) if metadata else None, owner))
        return batch_id

    def batch_row(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return dict(row) if row else None

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        found = self.find_batch(batch_id)
        return found[0] if found else None

    def find_batch(self, batch_id: str) -> tuple[dict[str, Any], str | None] | None:
        """A batch object and its owner."""
        row = self.batch_row(batch_id)
        return (batch_object(row, self.counts(batch_id)), row["owner"]) if row else None

    def list_batches(self, after: str | None, limit: int,
                     viewer: Principal = SINGLE_USER) -> tuple[list[dict[str, Any]], bool]:
        return self._page("batches", lambda row: batch_object(dict(row), self.counts(row["id"])),
                          after, limit, False, viewer, None)

    def active_batches(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM batches WHERE status IN ({','.join('?' * len(ACTIVE))}) "
                                    "ORDER BY rowid", ACTIVE).fetchall()
        return [r["id"] for r in rows]

    def set_status(self, batch_id: str, status: str, **fields: Any) -> None:
        """Move a batch to `status`, stamping `<status>_at` the first time, plus any other columns."""
        stamp = f"{status}_at"
        if stamp in _TIMESTAMPS:
            fields.setdefault(stamp, int(time.time()))
        columns = {"status": status, **{k: json.dumps(v) if k == "errors" and v is not None else v
                                        for k, v in fields.items()}}
        assignments = ", ".join(f"{k} = COALESCE({k}, ?)" if k in _TIMESTAMPS else f"{k} = ?" for k in columns)
        with self._lock, self._db:
            self._db.execute(f"UPDATE batches SET {assignments} WHERE id = ?", (*columns.values(), batch_id))

    # --- results ---------------------------------------------------------------------------

    def record_result(self, batch_id: str, line: int, custom_id: str | None, ok: bool,
                      record: dict[str, Any]) -> bool:
        """Commit one line's result; False when that line already had one (it ran twice around a crash)."""
        with self._lock, self._db:
            cursor = self._db.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)",
                                      (batch_id, line, custom_id, int(ok), json.dumps(record)))
        return cursor.rowcount == 1

    def done_lines(self, batch_id: str) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))}

    def counts(self, batch_id: str) -> tuple[int, int]:
        """(completed, failed) results committed so far."""
        with self._lock:
            done = dict(self._db.execute("SELECT ok, COUNT(*) FROM results WHERE batch_id = ? GROUP BY ok",
                                         (batch_id,)).fetchall())
        return done.get(1, 0), done.get(0, 0)

    def results(self, batch_id: str, ok: bool) -> Iterator[str]:
        """The committed output (ok) or error lines, in input order, as JSON text."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM results WHERE batch_id = ? AND ok = ? ORDER BY line",
                                    (batch_id, int(ok))).fetchall()
        for row in rows:
            yield row[0]

    def export(self, batch_id: str, ok: bool | None, path: Path) -> int:
        """Write results (ok, failed, or both when None) to `path` atomically; returns the line count."""
        tmp = path.with_name(path.name + ".tmp")
        count = 0
        with self._lock, tmp.open("w", encoding="utf-8") as f:
            kinds = [True, False] if ok is None else [ok]
            query = (f"SELECT record FROM results WHERE batch_id = ? AND ok IN ({','.join('?' * len(kinds))}) "
                     "ORDER BY line")
            for row in self._db.execute(query, (batch_id, *map(int, kinds))):
                f.write(row[0] + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        _sync_folder(path.parent)
        return count

    def publish_results(self, batch_id: str) -> dict[str, str | None]:
        """Turn the committed results into the batch's output and error files (same ids when redone), owned
        by the batch's owner."""
        owner = (self.batch_row(batch_id) or {}).get("owner")
        fields: dict[str, str | None] = {}
        for ok, kind, column in ((True, "output", "output_file_id"), (False, "error", "error_file_id")):
            file_id = "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]
            path = self.file_path(file_id)
            if self.export(batch_id, ok, path):
                self.add_file(file_id, f"{batch_id}_{kind}.jsonl", f"batch_{kind}", path.stat().st_size, owner)
                fields[column] = file_id
            else:
                path.unlink(missing_ok=True)
                fields[column] = None
        return fields

    def delete_batch(self, batch_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
            self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))

    # --- paging ----------------------------------------------------------------------------

    def _page(self, table: str, render: Any, after: str | None, limit: int, ascending: bool,
              viewer: Principal, where: tuple[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
        """One page of the rows `viewer` may see; `after` (an id the viewer cannot see counts as unknown: no
        anchor) continues a listing."""
        mine, mine_params = viewer.owner_filter()
        clauses, params = [mine], [*mine_params]
        if where:
            clauses.append(where[0])
            params.append(where[1])
        with self._lock:
            if after:
                anchor = self._db.execute(f"SELECT rowid FROM {table} WHERE id = ? AND {mine}",
                                          (after, *mine_params)).fetchone()
                if anchor is not None:
                    clauses.append("rowid > ?" if ascending else "rowid < ?")
                    params.append(anchor[0])
            sql = (f"SELECT * FROM {table} WHERE {' AND '.join(clauses)}"
                   f" ORDER BY rowid {'ASC' if ascending else 'DESC'} LIMIT ?")
            rows = self._db.execute(sql, (*params, limit + 1)).fetchall()
            return [render(r) for r in rows[:limit]], len(rows) > limit


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so a file renamed into it is there after a crash of the OS."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_object(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "expires_at": None, "status_details": None}


def batch_object(row: dict[str, Any], counts: tuple[int, int]) -> dict[str, Any]:
    completed, failed = counts
    errors = json.loads(row["errors"]) if row.get("errors") else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        "created_at": row["created_at"], "expires_at": row["expires_at"],
        **{k: row[k] for k in _TIMESTAMPS},
        "request_counts": {"total": row["total"], "completed": completed, "failed": failed},
        "metadata": json.loads(row["metadata"]) if row.get("metadata") else None,
    }
