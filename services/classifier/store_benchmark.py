"""Benchmark the classifier's taught-examples store and matching, in-process, back-ends side by side.

For each back-end and each number N of taught examples (random unit float32 vectors):

  load      seconds to import N examples (store.load, in chunks of --chunk, one transaction each)
  first     Matcher.prepare, what the service does before it is ready: builds the worker's
            cache, or the HNSW index
  check     Matcher(store).nearest() of one query, median and p95 over --queries calls after the
            first; the generation read every request does is included
  after     the first check after another store object (another replica) added one example:
            the cache refresh a request pays after a change elsewhere (median of 5)
  teach     store.add() of one example with N already there, one transaction (median of 20)
  cache MB  the numpy matrix each worker holds (0 where the search runs in PostgreSQL)
  recall@1  for HNSW: how often its best match is the exact best (the others are exact), for
            random queries (the worst case: in 1,280 random dimensions every example is
            nearly as far as every other) and for queries near a taught example (another
            photo of something taught: the example plus noise, cosine about 0.9)

Back-ends: sqlite (a temporary file, numpy search), postgresql-numpy (TEACH_PGVECTOR=off),
postgresql-pgvector (exact search in the database), postgresql-hnsw (TEACH_PGVECTOR=hnsw: an
HNSW index, approximate). PostgreSQL 16 + pgvector is the
one the tests start (tests/postgres.py, binaries from the pgserver package), on a unix socket.

    python -m services.classifier.store_benchmark                                   # 1000, 10000, 100000
    python -m services.classifier.store_benchmark --sizes 1000 2000 --queries 10    # a quick look
    python -m services.classifier.store_benchmark --backends sqlite --out benchmarks/store.md
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.contracts.versions import machine
from services.classifier.matching import Matcher
from services.classifier.state import now, unit
from services.classifier.store import Example, open_store

ROOT = Path(__file__).resolve().parents[2]
SEARCH = {"sqlite": "auto", "postgresql-numpy": "off", "postgresql-pgvector": "auto", "postgresql-hnsw": "hnsw"}
BACKENDS = list(SEARCH)
SHA = "b" * 64  # one model: every example and query is compared with every other
AFTER_REPEATS, TEACH_REPEATS = 5, 20
NEAR_NOISE = 0.0135  # per dimension: cosine about 0.9 with the taught example, like the teach calibration's
                     # augmented copies of one image (median 0.90)


@dataclass
class Row:
    backend: str
    n: int
    load_s: float
    first_s: float
    check_p50_ms: float
    check_p95_ms: float
    after_change_ms: float
    teach_ms: float
    cache_mb: float
    recall: float
    near_recall: float


def examples(rng: np.random.Generator, start: int, count: int, dim: int) -> list[Example]:
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    taught = now()
    return [Example(f"{start + i:032x}", f"name{(start + i) % 100}", "fashion", SHA, v, "bench.jpg", taught)
            for i, v in enumerate(vectors)]


def query(rng: np.random.Generator, dim: int) -> np.ndarray:
    return unit(rng.standard_normal(dim), dim)[None, :]


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1000


def measure(backend: str, url: str, n: int, args) -> Row:
    store, other = open_store(url, SEARCH[backend]), open_store(url, SEARCH[backend])  # `other`: another replica
    rng = np.random.default_rng(n)
    try:
        # 1. load N examples, chunk by chunk (first chunk replaces, so the database starts empty)
        load_s = 0.0
        with tqdm(total=n, desc=f"{backend} load {n}", unit="ex", leave=False) as bar:
            for start in range(0, n, args.chunk):
                chunk = examples(rng, start, min(args.chunk, n - start), args.dim)
                started = time.perf_counter()
                store.load(chunk, replace=start == 0, limit=n)
                load_s += time.perf_counter() - started
                bar.update(len(chunk))

        # 2. check: the first search (builds the cache, or the HNSW index), then single queries
        matcher = Matcher(store)
        first_s = timed(lambda: matcher.prepare(SHA, args.dim))
        queries = [query(rng, args.dim) for _ in range(args.queries)]
        times = [timed(lambda q=q: matcher.nearest(SHA, q, 1)) for q in queries]
        recall = near_recall = float("nan")
        if backend == "postgresql-hnsw":  # approximate: how often its best is the exact best
            exact = Matcher(open_store(url, "off"))

            def agree(qs):
                return float(np.mean([matcher.nearest(SHA, q, 1)[0][0][0].id == exact.nearest(SHA, q, 1)[0][0][0].id
                                      for q in qs]))

            recall = agree(queries)
            # Realistic checks: another photo of something taught, i.e. a query near a stored example.
            stored = store.examples()[:: max(1, n // args.queries)][:args.queries]
            near_recall = agree([unit(e.embedding + NEAR_NOISE * rng.standard_normal(args.dim), args.dim)[None, :]
                                 for e in stored])

        # 3. the first check after another replica's change (the cache refresh it triggers)
        after = []
        for i in range(AFTER_REPEATS):
            other.add(examples(rng, n + i, 1, args.dim), limit=n + 100)
            q = query(rng, args.dim)
            after.append(timed(lambda: matcher.nearest(SHA, q, 1)))

        # 4. teach: one example, one transaction, with N (and a few) already there
        ones = [examples(rng, n + AFTER_REPEATS + i, 1, args.dim) for i in range(TEACH_REPEATS)]
        teach = [timed(lambda one=one: store.add(one, limit=n + 100)) for one in ones]

        cache_mb = 0.0 if matcher.in_database else matcher.cache(SHA, args.dim).matrix.nbytes / 1e6
        return Row(backend, n, load_s, first_s, ms(times, 50), ms(times, 95), ms(after, 50), ms(teach, 50), cache_mb,
                   recall, near_recall)
    finally:
        store.close()
        other.close()


def table(rows: list[Row]) -> str:
    lines = ["| backend | N | load s | first search s | check p50 ms | check p95 ms | first check after another "
             "replica's change ms | teach ms | cache MB per worker | recall@1 random / near |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        recall = "exact" if np.isnan(r.recall) else f"{r.recall:.2f} / {r.near_recall:.2f}"
        lines.append(f"| {r.backend} | {r.n:,} | {r.load_s:.2f} | {r.first_s:.2f} | {r.check_p50_ms:.2f} | "
                     f"{r.check_p95_ms:.2f} | {r.after_change_ms:.2f} | {r.teach_ms:.2f} | {r.cache_mb:.1f} | {recall} |")
    return "\n".join(lines)


def start_postgres():
    sys.path.insert(0, str(ROOT / "tests"))  # tests/ is not a package
    from postgres import Postgres

    return Postgres()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.classifier.store_benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="numbers of taught examples")
    p.add_argument("--dim", type=int, default=1280, help="embedding size (the fashion model's is 1280)")
    p.add_argument("--queries", type=int, default=50, help="single-query checks timed per backend and size")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    p.add_argument("--chunk", type=int, default=5000, help="examples per load transaction")
    p.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    args = p.parse_args(argv)
    command = "python -m services.classifier.store_benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)

    rows: list[Row] = []
    postgres = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # still stop PostgreSQL (the finally below)
    with tempfile.TemporaryDirectory(prefix="store-bench-") as folder:
        try:
            if any(b.startswith("postgresql") for b in args.backends):
                print("starting PostgreSQL 16 + pgvector (pgserver binaries) ...", flush=True)
                postgres = start_postgres()
            for n in args.sizes:
                for backend in args.backends:
                    name = f"bench_{backend.replace('-', '_')}_{n}"
                    url = f"sqlite:///{folder}/{name}.db" if backend == "sqlite" else postgres.create_database(name)
                    row = measure(backend, url, n, args)
                    rows.append(row)
                    print(f"  {backend:<20} N={n:>7,}: load {row.load_s:7.2f} s  check p50 {row.check_p50_ms:7.2f} ms"
                          f"  p95 {row.check_p95_ms:7.2f} ms  after change {row.after_change_ms:7.2f} ms"
                          f"  teach {row.teach_ms:6.2f} ms  cache {row.cache_mb:6.1f} MB", flush=True)
        finally:
            if postgres is not None:
                postgres.stop()

    text = table(rows)
    print("\n" + text)
    if args.out:
        args.out.write_text("\n".join([
            "# Taught-examples store benchmark", "",
            f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Date: {now()}  ",
            f"Embeddings: {args.dim} float32, random unit vectors; check = one query, k=1, "
            f"median/p95 of {args.queries} after a warm call; first check after another replica's change: "
            f"median of {AFTER_REPEATS}; teach: median of {TEACH_REPEATS}.", "", text, ""]))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
