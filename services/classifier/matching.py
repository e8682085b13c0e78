"""Nearest taught examples for query embeddings: exact cosine search.

Every embedding is unit length (state.py), so cosine similarity is a dot product. Two ways,
the same answers:
- pgvector: the store searches in the database (PostgreSQL with the extension); workers
  hold no copy of the embeddings.
- a replica-local cache: one float32 matrix per model, searched with numpy. Before every
  search the store's generation is read (one tiny query); when it moved, only what changed
  is fetched (ids and seqs of every row, embeddings of rows newer than the cache). So a
  change made through any worker or replica is seen by the very next request here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from services.classifier.store import SqlStore


@dataclass(frozen=True)
class Match:
    id: str
    name: str
    similarity: float


@dataclass(frozen=True)
class Cache:
    """One model's taught examples at one generation; never changed, only replaced. Its rows
    are the first `len(ids)` rows of `buffer`, which has room to grow: a newer cache may append
    rows past them in place (no copy of the whole matrix per teach), which this one never reads."""
    generation: int = -1
    ids: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    seqs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    buffer: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    max_seq: int = -1

    @property
    def matrix(self) -> np.ndarray:
        return self.buffer[:len(self.ids)]


class Matcher:
    def __init__(self, store: SqlStore):
        self.store = store
        self._caches: dict[str, Cache] = {}
        self._refreshing = threading.Lock()

    @property
    def in_database(self) -> bool:
        return self.store.pgvector

    def prepare(self, model_sha256: str, dim: int) -> None:
        """Before serving a model: build its cache (or its index in the database), so the first
        request does not pay for it."""
        if self.in_database:
            self.store.prepare_search(model_sha256, dim)
        else:
            self.cache(model_sha256, dim)

    def nearest(self, model_sha256: str, queries: np.ndarray, k: int) -> tuple[list[list[Match]], int]:
        """The k nearest taught examples of this model for each query row, and how many there are.
        Blocking (database and numpy): call it from a worker thread."""
        if self.in_database:
            answers, total = self.store.nearest(model_sha256, queries, k)
            return [[Match(*row) for row in rows] for rows in answers], total
        cache = self.cache(model_sha256, queries.shape[1])
        if not cache.ids:
            return [[] for _ in queries], 0
        similarity = queries.astype(np.float32) @ cache.matrix.T          # [queries, examples]
        k = min(k, len(cache.ids))
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k] if k < len(cache.ids) else \
            np.tile(np.arange(len(cache.ids)), (len(queries), 1))
        answers = []
        for row, candidates in zip(similarity, top):
            order = candidates[np.lexsort((candidates, -row[candidates]))]  # best first; ties: oldest first
            answers.append([Match(cache.ids[j], cache.names[j], float(row[j])) for j in order])
        return answers, len(cache.ids)

    def cache(self, model_sha256: str, dim: int) -> Cache:
        """This model's cache, brought up to the store's generation."""
        cache = self._caches.get(model_sha256, Cache())
        if cache.generation == self.store.generation():
            return cache
        with self._refreshing:  # one refresh at a time; a waiter finds it done
            cache = self._caches.get(model_sha256, Cache())
            generation, present, fresh = self.store.changes(model_sha256, cache.max_seq, len(cache.ids))
            if generation == cache.generation:
                return cache
            fresh = [row for row in fresh if row[3].shape == (dim,)]  # another dimension: not this model's
            if present is None:  # nothing cached was forgotten or renamed: keep every row, append
                keep = list(range(len(cache.ids)))
            else:
                keep = [j for j, (i, s) in enumerate(zip(cache.ids, cache.seqs)) if present.get(i) == s]
                kept = {cache.ids[j] for j in keep}
                if any(s <= cache.max_seq and i not in kept for i, s in present.items()):
                    # Rows older than the cache that it never held: the store was restored from a
                    # copy (its generation went back). Start over, or they would stay unseen.
                    cache, keep = Cache(), []
                    generation, _, fresh = self.store.changes(model_sha256, -1, 0)
                    fresh = [row for row in fresh if row[3].shape == (dim,)]
            size = len(keep) + len(fresh)
            buffer = cache.buffer
            if present is not None or buffer.shape[1:] != (dim,) or len(buffer) < size:
                buffer = np.empty((max(64, size, 2 * len(keep)), dim), np.float32)  # room: amortised O(1) a row
                buffer[:len(keep)] = cache.buffer[keep] if keep else 0
            if fresh:
                buffer[len(keep):size] = np.stack([r[3] for r in fresh])
            cache = Cache(generation, tuple(cache.ids[j] for j in keep) + tuple(r[0] for r in fresh),
                          tuple(cache.names[j] for j in keep) + tuple(r[1] for r in fresh),
                          np.concatenate([cache.seqs[keep], np.array([r[2] for r in fresh], np.int64)]), buffer,
                          max(cache.max_seq, max((r[2] for r in fresh), default=-1)))
            self._caches[model_sha256] = cache
            return cache
