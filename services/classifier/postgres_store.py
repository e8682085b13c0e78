"""The taught-examples store on PostgreSQL (psycopg 3), for workers and replicas on several
machines: the SQL of store.SqlStore, plus pgvector when the extension is there (nearest-neighbour
search in the database, exact or HNSW; TEACH_PGVECTOR)."""

from __future__ import annotations

import re
from collections import Counter
from urllib.parse import urlsplit

import numpy as np

from services.classifier.store import COLUMNS, Example, SqlStore, StoreError, log

class PostgresStore(SqlStore):
    kind = "postgresql"
    blob = "BYTEA"

    def __init__(self, url: str, use_pgvector: str = "auto"):
        self.use_pgvector = use_pgvector  # auto | on | hnsw | off (TEACH_PGVECTOR)
        self._indexed: set[str] = set()   # models whose HNSW index exists
        super().__init__(url)

    def _connect(self):
        import psycopg

        # Bounded waits: a connect gives up after 10 s, a statement after 30 s, and TCP
        # keepalives notice a dead server or network in about 25 s (a request then gets 503).
        return psycopg.connect(self.url, autocommit=True, connect_timeout=10, keepalives=1, keepalives_idle=10,
                               keepalives_interval=5, keepalives_count=3, options="-c statement_timeout=30000",
                               application_name="onnx-model-serving classifier")

    def _begin(self, cursor, write: bool) -> None:
        # Reads see one snapshot (a cache refresh reads three things that must agree); writes
        # stay READ COMMITTED, so the generation row's lock queues them instead of failing them.
        cursor.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def _is_database_error(self, exc: Exception) -> bool:
        import psycopg

        return isinstance(exc, psycopg.Error)

    def _lock_schema(self, cursor) -> None:
        # Workers and replicas that start together would race on CREATE TABLE; one at a time.
        cursor.execute("SELECT pg_advisory_xact_lock(7203311)")

    def _schema_in_place(self, cursor) -> bool:
        # CREATE INDEX IF NOT EXISTS and ALTER TABLE lock the table even when there is nothing to
        # do: a worker starting while another teaches deadlocked with it (seen in CI). Look first.
        cursor.execute("SELECT to_regclass('taught_examples'), to_regclass('taught_examples_model_seq'), "
                       "to_regclass('taught_examples_name'), to_regclass('taught_meta')")
        if any(name is None for name in cursor.fetchone()):
            return False
        cursor.execute("SELECT COUNT(*) FROM taught_meta WHERE key IN ('generation', 'examples')")
        return cursor.fetchone()[0] == 2

    def _is_transient(self, exc: BaseException | None) -> bool:
        from psycopg import errors

        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure, errors.LockNotAvailable))

    def _extend_schema(self, cursor) -> None:
        if self.use_pgvector == "off":
            return
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
        if cursor.fetchone() is None:
            if self.use_pgvector in ("on", "hnsw"):
                raise StoreError(f"TEACH_PGVECTOR={self.use_pgvector} but the pgvector extension is not installed "
                                 "in this PostgreSQL")
            log.info("classifier: pgvector is not installed; searching a replica-local cache")
            return
        cursor.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        if cursor.fetchone() is None:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS vector")
        cursor.execute("SELECT attstorage FROM pg_attribute WHERE attrelid = 'taught_examples'::regclass "
                       "AND attname = 'vec' AND NOT attisdropped")
        storage = cursor.fetchone()
        if storage is None:
            cursor.execute("ALTER TABLE taught_examples ADD COLUMN IF NOT EXISTS vec vector")
        if storage is None or storage[0] != "m":
            # Vectors stay in the row (compressed only if a row must shrink): a search reads every
            # vector, and fetching out-of-line (TOASTed) ones made exact search 3-4x slower.
            cursor.execute("ALTER TABLE taught_examples ALTER COLUMN vec SET STORAGE MAIN")
        # Rows written before pgvector was there (or with TEACH_PGVECTOR=off) get their vector now.
        cursor.execute("SELECT id, embedding FROM taught_examples WHERE vec IS NULL")
        missing = cursor.fetchall()
        if missing:
            cursor.executemany("UPDATE taught_examples SET vec = %s::vector WHERE id = %s",
                               [(_vector_text(np.frombuffer(bytes(e), "<f4")), i) for i, e in missing])
        self.pgvector = True

    def _insert(self, cursor, examples: list[Example], seq: int) -> None:
        if not self.pgvector:
            return super()._insert(cursor, examples, seq)
        cursor.executemany(
            f"INSERT INTO taught_examples ({COLUMNS}, seq, vec) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::vector)",
            [(e.id, e.name, e.model, e.model_sha256, np.asarray(e.embedding, "<f4").tobytes(), e.source, e.taught, seq,
              _vector_text(e.embedding)) for e in examples])
        self._model_counts(cursor, Counter(e.model_sha256 for e in examples))

    def nearest(self, model_sha256: str, queries: np.ndarray, k: int) -> tuple[list[list[tuple]], int]:
        """The nearest examples by inner product (cosine: every embedding is unit length) for each
        query, and how many examples the model has: one snapshot, one transaction. Exact (a scan
        of the model's rows), or approximate through an HNSW index with TEACH_PGVECTOR=hnsw."""
        if not self.pgvector:
            return super().nearest(model_sha256, queries, k)
        if not re.fullmatch(r"[0-9a-f]{64}", model_sha256):
            raise ValueError("model_sha256 must be 64 hex digits")
        dim = queries.shape[1]
        if self.use_pgvector == "hnsw":
            self._ensure_index(model_sha256, dim)  # made at start; here for callers that did not
            # Literal predicate and typed expression: the form the model's partial index matches.
            search = (f"SELECT id, name, -(vec::vector({dim}) <#> %(q)s::vector({dim})) FROM taught_examples "
                      f"WHERE model_sha256 = '{model_sha256}' AND vector_dims(vec) = {dim} "
                      f"ORDER BY vec::vector({dim}) <#> %(q)s::vector({dim}) LIMIT %(k)s")
        else:
            search = ("SELECT id, name, -(vec <#> %(q)s::vector) FROM taught_examples "
                      "WHERE model_sha256 = %(sha)s AND vector_dims(vec) = %(dim)s "
                      "ORDER BY vec <#> %(q)s::vector, seq, id LIMIT %(k)s")
        answers = []
        with self._read() as cursor:
            if self.use_pgvector == "hnsw":
                cursor.execute(f"SET LOCAL hnsw.ef_search = {max(HNSW_EF_SEARCH, 2 * k)}")
            for vector in queries:
                cursor.execute(search, {"q": _vector_text(vector), "sha": model_sha256, "dim": dim, "k": k})
                answers.append([(i, n, float(s)) for i, n, s in cursor.fetchall()])
            cursor.execute("SELECT value FROM taught_meta WHERE key = %s", (f"examples:{model_sha256}",))
            row = cursor.fetchone()
            return answers, int(row[0]) if row else 0

    def prepare_search(self, model_sha256: str, dim: int) -> None:
        """Before serving a model: its HNSW index, when TEACH_PGVECTOR=hnsw."""
        if self.pgvector and self.use_pgvector == "hnsw":
            self._ensure_index(model_sha256, dim)

    def _ensure_index(self, model_sha256: str, dim: int) -> None:
        """One HNSW index per model (pgvector indexes need a fixed dimension). The service makes
        it at start, before it is ready; building it over many rows takes long (without the
        statement timeout) and holds writes meanwhile."""
        if model_sha256 in self._indexed:
            return
        if not re.fullmatch(r"[0-9a-f]{64}", model_sha256):
            raise ValueError("model_sha256 must be 64 hex digits")
        with self._write() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(7203312)")  # one builder at a time
            cursor.execute("SET LOCAL statement_timeout = 0")
            cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")  # the graph in memory: a much faster build
            cursor.execute(f"CREATE INDEX IF NOT EXISTS taught_hnsw_{model_sha256[:16]}_{dim} ON taught_examples "
                           f"USING hnsw ((vec::vector({dim})) vector_ip_ops) "
                           f"WHERE model_sha256 = '{model_sha256}' AND vector_dims(vec) = {dim}")
        self._analyze()
        self._indexed.add(model_sha256)

    def _analyze(self) -> None:
        """Fresh planner statistics: with stale ones PostgreSQL sorts a scan instead of using the index."""
        with self._lock:
            connection = self._connection or self._connect()
            self._connection = connection
            connection.execute("ANALYZE taught_examples")

    def load(self, examples: list[Example], replace: bool, limit: int) -> tuple[int, int]:
        result = super().load(examples, replace, limit)
        if self.use_pgvector == "hnsw" and len(examples) > 100:
            self._analyze()
        return result

    def describe(self) -> dict:
        where = urlsplit(self.url)
        return {"backend": "postgresql", "host": where.hostname or "(unix socket)", "database": where.path.lstrip("/"),
                "search": SEARCH[self.use_pgvector] if self.pgvector else "numpy (replica-local cache)"}


HNSW_EF_SEARCH = 100  # candidates an HNSW search keeps (pgvector's default is 40): recall over speed
SEARCH = {"auto": "pgvector exact (in the database)", "on": "pgvector exact (in the database)",
          "hnsw": "pgvector hnsw (approximate, in the database)"}


def _vector_text(vector: np.ndarray) -> str:
    """pgvector's text form; repr of each float32 (as a Python float) reads back exactly."""
    return "[" + ",".join(map(repr, np.asarray(vector, np.float32).tolist())) + "]"
