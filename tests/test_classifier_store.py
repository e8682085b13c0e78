"""The taught-examples store and matching, in-process, against a real SQLite file and a real
PostgreSQL server (with pgvector, and with it turned off: the replica-local cache)."""

from __future__ import annotations

import base64
import sqlite3
import uuid

import numpy as np
import pytest

from services.classifier import state
from services.classifier.limits import check_name
from services.classifier.matching import Matcher
from services.classifier.store import Example, TooManyExamples, open_store
from services.runtime import ApiError

SHA = "a" * 64
OTHER_SHA = "b" * 64
DIM = 16


POSTGRES_SEARCH = {"postgresql": "auto", "postgresql-hnsw": "hnsw", "postgresql-no-pgvector": "off"}


@pytest.fixture(params=["sqlite", *POSTGRES_SEARCH])
def store_url(request, tmp_path, postgres):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'taught.db'}", "auto"
    return postgres.create_database(f"t{uuid.uuid4().hex[:12]}"), POSTGRES_SEARCH[request.param]


def make(name: str, vector, sha: str = SHA) -> Example:
    return Example(uuid.uuid4().hex, name, "m", sha, state.unit(np.asarray(vector, np.float32), None), "f.png", state.now())


def rng_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_changes_are_transactions_and_bump_the_generation(store_url):
    url, pgvector = store_url
    store = open_store(url, pgvector)
    assert store.pgvector == (url.startswith("postgresql") and pgvector != "off")
    g0 = store.generation()
    vectors = rng_vectors(5)
    assert store.add([make("ann", vectors[0]), make("ann", vectors[1])], limit=4) == 2
    assert store.add([make("bob", vectors[2])], limit=4) == 1
    assert store.generation() == g0 + 2
    with pytest.raises(TooManyExamples):
        store.add([make("cat", vectors[3]), make("cat", vectors[4])], limit=4)
    assert store.counts() == {"ann": 2, "bob": 1} and store.generation() == g0 + 2  # refused: nothing changed
    with pytest.raises(KeyError):
        store.forget(name="nobody")
    assert store.generation() == g0 + 2
    assert store.rename("anna", name="ann") == 2
    assert store.forget(id=store.examples()[-1].id) == 1  # the newest change: the renamed rows
    assert store.counts() == {"anna": 1, "bob": 1}
    store.close()


def test_a_second_store_on_the_same_database_sees_every_change_at_once(store_url):
    """Two processes (here two connections) on one database: what one writes, the other's
    matcher finds in its very next search; forget and rename likewise."""
    url, pgvector = store_url
    writer, reader = open_store(url, pgvector), open_store(url, pgvector)
    matcher = Matcher(reader)
    vectors = rng_vectors(3, seed=1)
    assert matcher.nearest(SHA, vectors[:1], 1) == ([[]], 0)
    taught = make("ann", vectors[0])
    writer.add([taught], limit=100)
    [[best]], total = matcher.nearest(SHA, vectors[:1], 1)
    assert (best.id, best.name, total) == (taught.id, "ann", 1) and best.similarity == pytest.approx(1.0, abs=1e-5)
    writer.rename("anna", id=taught.id)
    assert matcher.nearest(SHA, vectors[:1], 1)[0][0][0].name == "anna"
    writer.add([make("bob", vectors[1]), make("other model", vectors[1], sha=OTHER_SHA)], limit=100)
    [[first, second]], total = matcher.nearest(SHA, vectors[1:2], 5)
    assert (first.name, second.name, total) == ("bob", "anna", 2)  # the other model's example is never compared
    writer.forget(name="bob")
    [[only]], total = matcher.nearest(SHA, vectors[1:2], 5)
    assert (only.name, total) == ("anna", 1)


def test_numpy_cache_and_pgvector_give_the_same_answers(postgres):
    database = f"t{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(database)
    with_vector, cached, hnsw = (Matcher(open_store(url, mode)) for mode in ("auto", "off", "hnsw"))
    assert with_vector.in_database and hnsw.in_database and not cached.in_database
    vectors = rng_vectors(2000, seed=2, dim=64)
    open_store(url, "auto").add([make(f"n{i % 7}", v) for i, v in enumerate(vectors)], limit=10_000)
    queries = rng_vectors(50, seed=3, dim=64)
    a, total_a = with_vector.nearest(SHA, queries, 5)
    b, total_b = cached.nearest(SHA, queries, 5)
    c, total_c = hnsw.nearest(SHA, queries, 5)
    assert total_a == total_b == total_c == 2000
    recall = np.mean([len({m.id for m in x} & {m.id for m in y}) / 5 for x, y in zip(b, c)])
    assert recall >= 0.95, f"HNSW recall@5 {recall:.3f}"  # approximate, but close
    index = postgres.psql(database, "SELECT indexname FROM pg_indexes WHERE indexname "
                          f"LIKE 'taught_hnsw_{SHA[:16]}%'")
    assert index.strip(), "the HNSW index was not made"
    assert [[m.id for m in row] for row in a] == [[m.id for m in row] for row in b]
    np.testing.assert_allclose([[m.similarity for m in row] for row in a], [[m.similarity for m in row] for row in b],
                               atol=1e-5)
    exact = queries @ vectors.T
    np.testing.assert_allclose([row[0].similarity for row in b], exact.max(axis=1), atol=1e-5)


def test_pgvector_turned_on_later_fills_in_the_vectors_of_older_rows(postgres):
    url = postgres.create_database(f"t{uuid.uuid4().hex[:12]}")
    vectors = rng_vectors(4, seed=4)
    open_store(url, "off").add([make("old", v) for v in vectors], limit=10)
    later = Matcher(open_store(url, "on"))
    [[best]], total = later.nearest(SHA, vectors[2:3], 1)
    assert best.similarity == pytest.approx(1.0, abs=1e-5) and total == 4


def test_import_merge_replace_and_limits_in_one_transaction(store_url):
    url, pgvector = store_url
    store = open_store(url, pgvector)
    vectors = rng_vectors(4, seed=5)
    first = [make("a", vectors[0]), make("b", vectors[1])]
    assert store.load(first, replace=False, limit=3) == (2, 2)
    assert store.load(first + [make("c", vectors[2])], replace=False, limit=3) == (1, 3)  # known ids skipped
    with pytest.raises(TooManyExamples):
        store.load([make("d", vectors[3])], replace=False, limit=3)
    assert store.count() == 3
    assert store.load([make("d", vectors[3])], replace=True, limit=3) == (1, 1)
    assert store.counts() == {"d": 1}
    assert store.import_once("legacy", first, limit=3) == 2
    assert store.import_once("legacy", first, limit=3) is None  # once only
    assert store.count() == 3


def test_sqlite_file_is_wal_and_holds_float32_blobs(tmp_path):
    path = tmp_path / "t.db"
    store = open_store(f"sqlite:///{path}")
    vector = rng_vectors(1, seed=6)[0]
    store.add([make("ann", vector)], limit=10)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        [(blob,)] = db.execute("SELECT embedding FROM taught_examples").fetchall()
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4"), vector)


@pytest.mark.parametrize("url", ["mysql://x", "sqlite://relative.db", "sqlite:///", "taught.db"])
def test_a_wrong_store_url_says_what_to_write(url):
    with pytest.raises(ValueError, match="TEACH_STORE"):
        open_store(url)


def imported(vector_bytes: bytes, dim: int | None = DIM, **overrides) -> list[Example]:
    entry = {"id": uuid.uuid4().hex, "name": "x", "model": "m", "model_sha256": SHA,
             "embedding": base64.b64encode(vector_bytes).decode()} | overrides
    return state.parse({"format": 1, "examples": [entry]}, {SHA: dim} if dim else {},
                       lambda name, field: check_name(name, 64, field))


def test_imported_embeddings_are_renormalised_so_none_can_dominate():
    huge = np.full(DIM, 1e30, np.float32)
    alternating = np.array([3e38, -3e38] * (DIM // 2), np.float32)
    for vector in (huge, alternating):
        [example] = imported(vector.tobytes())
        assert np.linalg.norm(example.embedding) == pytest.approx(1.0, abs=1e-6)
        assert np.isfinite(example.embedding).all()


@pytest.mark.parametrize("vector_bytes, problem", [
    (np.full(DIM, np.nan, np.float32).tobytes(), "not finite"),
    (np.full(DIM, np.inf, np.float32).tobytes(), "not finite"),
    (np.zeros(DIM, np.float32).tobytes(), "is zero"),
    (np.ones(DIM + 1, np.float32).tobytes(), "has 17 values"),
    (b"abc", "buffer size"),
])
def test_unusable_imported_embeddings_are_refused(vector_bytes, problem):
    with pytest.raises(ApiError) as error:
        imported(vector_bytes)
    assert error.value.status == 400 and problem in error.value.message
    assert error.value.field == "state.examples[0].embedding"


def test_imported_names_are_normalised_and_ids_unique():
    [example] = imported(np.ones(DIM, np.float32).tobytes(), name="cafe\u0301")
    assert example.name == "caf\u00e9"
    entry = {"id": "0" * 32, "name": "x", "model": "m", "model_sha256": SHA,
             "embedding": base64.b64encode(np.ones(DIM, np.float32).tobytes()).decode()}
    with pytest.raises(ApiError, match="appears twice"):
        state.parse({"format": 1, "examples": [entry, entry]}, {}, lambda n, f: check_name(n, 64, f))


def test_the_cache_follows_any_sequence_of_changes_made_elsewhere(store_url):
    """Random teach / forget / rename / import through one store; after each, another store's
    matcher (another replica) answers exactly what a search over everything stored answers."""
    url, pgvector = store_url
    writer, matcher = open_store(url, pgvector), Matcher(open_store(url, pgvector))
    rng = np.random.default_rng(7)
    queries = rng_vectors(3, seed=8)
    for step in range(60):
        stored = writer.examples()
        action = rng.choice(["teach", "teach", "teach", "forget", "rename", "import"] if stored else ["teach"])
        if action == "teach":
            name = f"n{rng.integers(5)}"
            writer.add([make(name, v) for v in rng_vectors(int(rng.integers(1, 4)), seed=100 + step)], limit=10_000)
        elif action == "forget":
            victim = stored[int(rng.integers(len(stored)))]
            writer.forget(id=victim.id) if rng.random() < 0.5 else writer.forget(name=victim.name)
        elif action == "rename":
            writer.rename(f"r{step}", id=stored[int(rng.integers(len(stored)))].id)
        else:
            writer.load([make("imported", v) for v in rng_vectors(2, seed=200 + step)], replace=False, limit=10_000)
        everything = [e for e in writer.examples() if e.model_sha256 == SHA]
        answers, total = matcher.nearest(SHA, queries, 3)
        assert total == len(everything), (step, action)
        matrix = np.stack([e.embedding for e in everything])
        for query, answer in zip(queries, answers):
            best = np.argsort(-(matrix @ query), kind="stable")[:3]
            assert [(m.id, m.name) for m in answer] == [(everything[j].id, everything[j].name) for j in best], \
                (step, action)


def test_workers_opening_a_new_database_at_once_all_succeed(store_url):
    """Several workers and replicas start together and create the schema at the same moment
    (on PostgreSQL this raced on CREATE TABLE: 'duplicate key ... pg_type_typname_nsp_index')."""
    import threading

    url, pgvector = store_url
    errors = []

    def open_one():
        try:
            open_store(url, pgvector).close()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_a_worker_opening_the_store_while_another_teaches_does_not_deadlock(postgres):
    """Seen in CI: a worker's schema statements (CREATE INDEX IF NOT EXISTS locks the table even
    when the index exists) met a teach in progress, and PostgreSQL killed one as a deadlock."""
    import threading

    import psycopg

    url = postgres.create_database(f"t{uuid.uuid4().hex[:12]}")
    first = open_store(url)
    first.add([make("ann", rng_vectors(1)[0])], limit=10)
    teach = psycopg.connect(url, autocommit=True)
    try:
        teach.execute("SET deadlock_timeout = '100ms'")
        teach.execute("BEGIN")  # a teach half-way: it holds the counter's row, then inserts an example
        teach.execute("UPDATE taught_meta SET value = value + 1 WHERE key = 'generation'")
        errors = []

        def open_second():
            try:
                open_store(url).close()
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        opener = threading.Thread(target=open_second)
        opener.start()
        opener.join(0.5)  # the second store is opening (or already open)
        teach.execute("INSERT INTO taught_examples (id, name, model, model_sha256, embedding, source, taught, seq) "
                      "VALUES ('x', 'bob', 'm', %s, %s, '', '', 0)", (SHA, b"\0" * 4 * DIM))
        teach.execute("COMMIT")
        opener.join(30)
        assert not opener.is_alive() and not errors, errors
    finally:
        teach.close()
    assert open_store(url).counts() == {"ann": 1, "bob": 1}
