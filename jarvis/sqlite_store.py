"""A SQLite database driven by one worker thread of its own, so the event loop never waits on a write.

Stores (stored responses, the batch plugin's files and jobs) commit with WAL and `synchronous=FULL`: a
row is on disk, even across a crash of the OS, before the 200 that promises it. An fsync takes from a
tenth of a millisecond to tens of them, and the event loop serves every token stream of the server, so a
server calls its stores with `await store.run(store.method, ...)`: the call runs on the store's thread and
the loop goes on serving while it syncs. The methods themselves are plain and thread-safe (one lock per
connection), for offline commands and tests. Calls on one store run one at a time, in the order made.

`add_column` is the one migration stores need so far: a column added to an existing database, the rows
already there getting its default.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class SQLiteStore:
    def __init__(self, database: Path, schema: str) -> None:
        database.parent.mkdir(parents=True, exist_ok=True)
        self.database = database
        self._lock = threading.RLock()
        self._db = sqlite3.connect(database, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives a crash, even of the OS
        self._db.executescript(schema)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"store-{database.stem}")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on the store's thread; the caller's event loop serves on meanwhile. A
        cancelled caller does not cancel a write already handed over: it still commits."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    def add_column(self, table: str, column: str, declaration: str) -> int:
        """Add `column` to `table` unless it is there; returns how many existing rows got the default."""
        with self._lock:
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column in columns:
                return 0
            with self._db:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def close(self) -> None:
        self._worker.shutdown(wait=True)  # writes handed over before the close still commit
        with self._lock:
            self._db.close()
