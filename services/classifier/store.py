"""Taught examples in a real database, shared by every worker and replica.

    store = open_store("sqlite:///data/classifier/taught.db")     # or postgresql://user:pw@host/db
    store.add(examples, limit=10_000)                               # one transaction: all of it or nothing
    store.generation()                                              # the change counter caches compare

Two back-ends, one class of SQL (SqlStore) with a subclass each:
- SQLite (standard library): the embedded default. WAL journal, synchronous=FULL, BEGIN IMMEDIATE
  for every change, so several worker processes on one host share one file safely.
- PostgreSQL (psycopg 3): for workers and replicas on several machines. With the pgvector
  extension the embeddings are also kept as `vector` and nearest-neighbour search runs in the
  database (matching.py); without it, every replica searches its own cached matrix.

Every change is one transaction that also bumps the `generation` counter and stamps the rows it
writes with the new value (`seq`). The counter's row lock serialises writers, so seqs commit in
order, and a reader whose cached generation equals the store's has seen every change: a name
taught through one worker or replica is found by any other in its very next request.
Embeddings are float32 little-endian bytes, unit length (state.py validates every one).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

log = logging.getLogger("services.classifier")


@dataclass(frozen=True)
class Example:
    id: str                 # 32 hex digits
    name: str
    model: str              # the model that made the embedding, and its file's sha256:
    model_sha256: str       # embeddings of different models are never compared
    embedding: np.ndarray   # float32, unit length
    source: str = ""        # the uploaded file's name
    taught: str = ""        # UTC time, ISO 8601


class StoreError(RuntimeError):
    """The database cannot be reached or refused a change; nothing was changed (HTTP 503)."""


class TooManyExamples(Exception):
    def __init__(self, total: int, limit: int):
        super().__init__(f"{total} examples is over the limit of {limit}")
        self.total, self.limit = total, limit


SCHEMA = [
    """CREATE TABLE IF NOT EXISTS taught_examples (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        embedding {blob} NOT NULL,
        source TEXT NOT NULL,
        taught TEXT NOT NULL,
        seq BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS taught_examples_model_seq ON taught_examples (model_sha256, seq)",
    "CREATE INDEX IF NOT EXISTS taught_examples_name ON taught_examples (name)",
    "CREATE TABLE IF NOT EXISTS taught_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO taught_meta (key, value) VALUES ('generation', 0) ON CONFLICT (key) DO NOTHING",
    # How many examples there are, in all and per model, kept in step by every change: a teach's
    # limit check and a check's count read one row instead of counting the table.
    "INSERT INTO taught_meta (key, value) SELECT 'examples', COUNT(*) FROM taught_examples WHERE true "
    "ON CONFLICT (key) DO NOTHING",
    "INSERT INTO taught_meta (key, value) SELECT 'examples:' || model_sha256, COUNT(*) FROM taught_examples "
    "WHERE true GROUP BY model_sha256 ON CONFLICT (key) DO NOTHING",
]
COLUMNS = "id, name, model, model_sha256, embedding, source, taught"
SCHEMA_ATTEMPTS = 5


class SqlStore:
    """The SQL both back-ends share; a subclass connects and says how transactions begin."""

    kind = "sql"
    pgvector = False  # nearest-neighbour search in the database

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()  # one connection per process, used from worker threads
        self._connection = None
        for attempt in range(1, SCHEMA_ATTEMPTS + 1):
            try:
                self._create_schema()
                break
            except StoreError as exc:
                # A worker that starts while others teach can be picked as a deadlock victim (or
                # time out on a lock): that clears by itself, so try again before saying so.
                if attempt == SCHEMA_ATTEMPTS or not self._is_transient(exc.__cause__):
                    raise
                log.info("classifier: opening the store met a busy database (%s); trying again", exc.__cause__)
                time.sleep(0.2 * attempt)

    def _create_schema(self) -> None:
        with self._write() as cursor:
            self._lock_schema(cursor)
            if not self._schema_in_place(cursor):
                for statement in SCHEMA:
                    cursor.execute(self._sql(statement.format(blob=self.blob)))
            self._extend_schema(cursor)

    # What a back-end provides -------------------------------------------------------------

    blob = "BLOB"

    def _connect(self):
        raise NotImplementedError

    def _begin(self, cursor, write: bool) -> None:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return statement

    def _lock_schema(self, cursor) -> None:
        pass  # SQLite: BEGIN IMMEDIATE already lets one writer in at a time

    def _schema_in_place(self, cursor) -> bool:
        return False  # SQLite: the IF NOT EXISTS statements are cheap and take no extra locks

    def _extend_schema(self, cursor) -> None:
        pass

    def _is_transient(self, exc: BaseException | None) -> bool:
        return False

    def _check_place(self, write: bool) -> None:
        pass  # SQLite: is the file still there, and writable for a change

    def describe(self) -> dict:
        raise NotImplementedError

    # Transactions --------------------------------------------------------------------------

    @contextmanager
    def _transaction(self, write: bool):
        """One transaction on this process's connection: committed on success, rolled back on
        any error. A connection found dead at BEGIN is opened again once (nothing was sent yet);
        a failure after BEGIN is never retried: the caller gets a StoreError (HTTP 503)."""
        with self._lock:
            self._check_place(write)
            for attempt in (1, 2):
                connection = self._connection
                try:
                    if connection is None:
                        connection = self._connection = self._connect()
                    cursor = connection.cursor()
                    self._begin(cursor, write)
                    break
                except Exception as exc:  # noqa: BLE001 - a dead connection: drop it, maybe retry
                    self._drop()
                    if attempt == 2:
                        raise StoreError(f"the taught-examples store is unavailable: {exc}") from exc
            try:
                yield cursor
                cursor.execute("COMMIT")
            except BaseException as exc:
                try:
                    cursor.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - the connection is gone: the server rolls back
                    self._drop()
                if isinstance(exc, (TooManyExamples, KeyError, StoreError)) or not isinstance(exc, Exception):
                    raise
                if self._is_database_error(exc):
                    self._drop()
                    raise StoreError(f"the taught-examples store failed: {exc}") from exc
                raise

    def _is_database_error(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _drop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001
                pass
        self._connection = None

    def _write(self):
        return self._transaction(write=True)

    def _read(self):
        return self._transaction(write=False)

    def close(self) -> None:
        with self._lock:
            self._drop()

    @staticmethod
    def _bump(cursor) -> int:
        cursor.execute("UPDATE taught_meta SET value = value + 1 WHERE key = 'generation' RETURNING value")
        return int(cursor.fetchone()[0])

    def _model_counts(self, cursor, changes: Counter) -> None:
        cursor.executemany(self._sql("INSERT INTO taught_meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                                     "DO UPDATE SET value = taught_meta.value + excluded.value"),
                           [(f"examples:{sha}", n) for sha, n in changes.items()])

    def _count_change(self, cursor, change: int, limit: int | None = None) -> int:
        """Add `change` to the examples count; TooManyExamples (the transaction rolls back) past limit."""
        cursor.execute(self._sql("UPDATE taught_meta SET value = value + ? WHERE key = 'examples' RETURNING value"),
                       (change,))
        total = int(cursor.fetchone()[0])
        if limit is not None and total > limit:
            raise TooManyExamples(total, limit)
        return total

    # Reads ---------------------------------------------------------------------------------

    def generation(self) -> int:
        with self._read() as cursor:
            cursor.execute("SELECT value FROM taught_meta WHERE key = 'generation'")
            return int(cursor.fetchone()[0])

    def counts(self, model_sha256: str | None = None) -> dict[str, int]:
        """Names with their example counts: of one model (its file's sha256), or of every model."""
        with self._read() as cursor:
            if model_sha256 is None:
                cursor.execute("SELECT name, COUNT(*) FROM taught_examples GROUP BY name ORDER BY name")
            else:
                cursor.execute(self._sql("SELECT name, COUNT(*) FROM taught_examples WHERE model_sha256 = ? "
                                         "GROUP BY name ORDER BY name"), (model_sha256,))
            return {name: int(count) for name, count in cursor.fetchall()}

    def count(self, model_sha256: str | None = None) -> int:
        with self._read() as cursor:
            if model_sha256 is None:
                cursor.execute("SELECT value FROM taught_meta WHERE key = 'examples'")
            else:
                cursor.execute(self._sql("SELECT value FROM taught_meta WHERE key = ?"), (f"examples:{model_sha256}",))
            row = cursor.fetchone()
            return int(row[0]) if row else 0

    def examples(self) -> list[Example]:
        """Everything taught, oldest change first (what /state/export writes)."""
        with self._read() as cursor:
            cursor.execute(f"SELECT {COLUMNS} FROM taught_examples ORDER BY seq, id")
            return [_example(row) for row in cursor.fetchall()]

    def changes(self, model_sha256: str, after_seq: int, cached: int) -> tuple[int, dict[str, int] | None, list[tuple]]:
        """For a cache of `cached` rows of one model, complete up to seq `after_seq`, in one
        snapshot: the generation; None if all those rows are still there unchanged (then the
        cache only appends), else every id with its seq; and (id, name, seq, embedding) of the
        rows newer than after_seq. A forget removes rows and a rename gives them a new seq, so
        either makes the count of rows at or below after_seq differ from `cached`."""
        with self._read() as cursor:
            cursor.execute("SELECT value FROM taught_meta WHERE key = 'generation'")
            generation = int(cursor.fetchone()[0])
            cursor.execute(self._sql("SELECT COUNT(*) FROM taught_examples WHERE model_sha256 = ? AND seq <= ?"),
                           (model_sha256, after_seq))
            present = None
            if int(cursor.fetchone()[0]) != cached:
                cursor.execute(self._sql("SELECT id, seq FROM taught_examples WHERE model_sha256 = ?"), (model_sha256,))
                present = {row[0]: int(row[1]) for row in cursor.fetchall()}
            cursor.execute(self._sql("SELECT id, name, seq, embedding FROM taught_examples "
                                     "WHERE model_sha256 = ? AND seq > ? ORDER BY seq, id"), (model_sha256, after_seq))
            fresh = [(i, n, int(s), np.frombuffer(bytes(e), "<f4")) for i, n, s, e in cursor.fetchall()]
        return generation, present, fresh

    def nearest(self, model_sha256: str, queries: np.ndarray, k: int) -> tuple[list[list[tuple]], int]:
        raise NotImplementedError("this store has no nearest-neighbour search; matching.py searches a cache")

    def prepare_search(self, model_sha256: str, dim: int) -> None:
        pass

    # Changes -------------------------------------------------------------------------------

    def add(self, examples: list[Example], limit: int) -> int:
        """Store new examples (all of one name); returns how many that name now has."""
        with self._write() as cursor:
            self._count_change(cursor, len(examples), limit)
            self._insert(cursor, examples, self._bump(cursor))
            cursor.execute(self._sql("SELECT COUNT(*) FROM taught_examples WHERE name = ? AND model_sha256 = ?"),
                           (examples[0].name, examples[0].model_sha256))
            return int(cursor.fetchone()[0])

    @staticmethod
    def _where(column: str, model_sha256: str | None) -> str:
        """Rows by name or id; a name only within one model when given (a face and a jacket may
        share a name), an id anywhere (ids are unique)."""
        return f"{column} = ?" + (" AND model_sha256 = ?" if model_sha256 is not None else "")

    def forget(self, *, name: str | None = None, id: str | None = None,  # noqa: A002 - the API's word
               model_sha256: str | None = None) -> int:
        column, value = ("name", name) if name is not None else ("id", id)
        args = (value,) if model_sha256 is None else (value, model_sha256)
        with self._write() as cursor:
            cursor.execute(self._sql(f"DELETE FROM taught_examples WHERE {self._where(column, model_sha256)} "
                                     "RETURNING model_sha256"), args)
            gone = Counter(row[0] for row in cursor.fetchall())
            removed = sum(gone.values())
            if not removed:
                raise KeyError(column)  # rolled back: the generation stays
            self._count_change(cursor, -removed)
            self._model_counts(cursor, Counter({sha: -n for sha, n in gone.items()}))
            self._bump(cursor)
            return removed

    def rename(self, new_name: str, *, name: str | None = None, id: str | None = None,  # noqa: A002
               model_sha256: str | None = None) -> int:
        column, value = ("name", name) if name is not None else ("id", id)
        args = (value,) if model_sha256 is None else (value, model_sha256)
        with self._write() as cursor:
            seq = self._bump(cursor)
            cursor.execute(self._sql(f"UPDATE taught_examples SET name = ?, seq = ? "
                                     f"WHERE {self._where(column, model_sha256)}"), (new_name, seq, *args))
            if not cursor.rowcount:
                raise KeyError(column)
            return cursor.rowcount

    def load(self, examples: list[Example], replace: bool, limit: int) -> tuple[int, int]:
        """Import: replace everything, or merge (keep what is taught, add unknown ids).
        Returns (examples added, total). One transaction: a refused import changes nothing."""
        with self._write() as cursor:
            return self._load(cursor, examples, replace, limit)

    def import_once(self, marker: str, examples: list[Example], limit: int) -> int | None:
        """Merge examples unless `marker` is recorded (a one-time migration); None if it was.
        Marker and examples commit together, so a crash in between leaves neither."""
        with self._write() as cursor:
            cursor.execute(self._sql("SELECT value FROM taught_meta WHERE key = ?"), (marker,))
            if cursor.fetchone() is not None:
                return None
            cursor.execute(self._sql("INSERT INTO taught_meta (key, value) VALUES (?, ?)"), (marker, int(time.time())))
            return self._load(cursor, examples, replace=False, limit=limit)[0]

    def _load(self, cursor, examples: list[Example], replace: bool, limit: int) -> tuple[int, int]:
        if replace:
            cursor.execute("DELETE FROM taught_examples")
            cursor.execute("UPDATE taught_meta SET value = 0 WHERE key = 'examples'")
            cursor.execute("DELETE FROM taught_meta WHERE key LIKE 'examples:%'")
            new = examples
        else:
            known = set()
            ids = [e.id for e in examples]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                cursor.execute(self._sql(f"SELECT id FROM taught_examples WHERE id IN ({', '.join('?' * len(chunk))})"),
                               chunk)
                known.update(row[0] for row in cursor.fetchall())
            new = [e for e in examples if e.id not in known]
        total = self._count_change(cursor, len(new), limit)
        self._insert(cursor, new, self._bump(cursor))
        return len(new), total

    def _insert(self, cursor, examples: list[Example], seq: int) -> None:
        cursor.executemany(
            self._sql(f"INSERT INTO taught_examples ({COLUMNS}, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
            [(e.id, e.name, e.model, e.model_sha256, np.asarray(e.embedding, "<f4").tobytes(), e.source, e.taught, seq)
             for e in examples])
        self._model_counts(cursor, Counter(e.model_sha256 for e in examples))


def _example(row) -> Example:
    id_, name, model, sha, embedding, source, taught = row
    return Example(id_, name, model, sha, np.frombuffer(bytes(embedding), "<f4"), source, taught)


class SQLiteStore(SqlStore):
    """One file. Its connection would go on writing to a file deleted under it (the inode lives
    while open) and lose every change at the next start, so each transaction first checks the
    file: gone is a 503 until it is back, another file there (a restore) is opened afresh, and a
    change to a file that cannot be written (read-only mode, an immutable flag, a read-only
    disk) is a 503 while reads go on."""

    kind = "sqlite"

    def __init__(self, url: str, path: Path):
        self.path = path
        self._opened: tuple[int, int] | None = None  # (device, inode) of the file the connection holds
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(url)

    def _connect(self):
        import sqlite3

        # Autocommit mode: transactions are begun explicitly (BEGIN IMMEDIATE takes the write
        # lock up front, so two workers never deadlock upgrading a read lock). Only the first
        # connection may create the file: a later one finding it gone must not start empty.
        target = f"file:{quote(str(self.path.absolute()))}?mode={'rw' if self._opened else 'rwc'}"
        connection = sqlite3.connect(target, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # an answered change is on disk
        connection.execute("PRAGMA busy_timeout=30000")
        opened = os.stat(self.path)
        self._opened = (opened.st_dev, opened.st_ino)
        return connection

    def _check_place(self, write: bool) -> None:
        if self._opened is None:
            return  # the first connection creates it
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            self._drop()
            raise StoreError(f"the database file {self.path} is gone (deleted while serving?); nothing was changed: "
                             "put it back (a restored copy is opened at once)") from None
        except OSError as exc:
            raise StoreError(f"the database file {self.path} cannot be read: {exc}") from None
        if self._connection is not None and (now.st_dev, now.st_ino) != self._opened:
            log.info("classifier: %s was replaced (a restore?); opening it again", self.path)
            self._drop()
        if write and not os.access(self.path, os.W_OK):
            raise StoreError(f"the database file {self.path} is read-only; nothing was changed (reads go on)")

    def _begin(self, cursor, write: bool) -> None:
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _is_database_error(self, exc: Exception) -> bool:
        import sqlite3

        return isinstance(exc, sqlite3.Error)

    def describe(self) -> dict:
        return {"backend": "sqlite", "path": str(self.path.resolve()), "search": "numpy (replica-local cache)"}


def open_store(url: str, use_pgvector: str = "auto") -> SqlStore:
    """TEACH_STORE: sqlite:///relative/path.db, sqlite:////absolute/path.db, or postgresql://..."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or len(url) <= len("sqlite:///"):
            raise ValueError(f"TEACH_STORE={url!r}: write sqlite:///relative/file.db or sqlite:////absolute/file.db")
        return SQLiteStore(url, Path(url[len("sqlite:///"):]))
    if scheme in ("postgresql", "postgres"):
        from services.classifier.postgres_store import PostgresStore

        return PostgresStore(url, use_pgvector)
    raise ValueError(f"TEACH_STORE={url!r}: the scheme must be sqlite or postgresql")
