"""One loaded model version: its onnxruntime session on the chosen device, its batcher and its
metrics. The Runtime (core.py) holds these and decides which version serves.

    outputs = await model(rows)   # adaptive batching (batching.py), timed in /metrics
"""

from __future__ import annotations

import time

import numpy as np

from services.contracts import device, repository
from services.contracts.predictor import ELEMENT_TYPES
from services.runtime.batching import DynamicBatcher
from services.runtime.config import Settings
from services.runtime.metrics import metrics


class LoadedModel:
    """One model version with its onnxruntime session and its batcher."""

    def __init__(self, service: str, entry: repository.ModelEntry, settings: Settings):
        self.service, self.entry = service, entry
        self.session, self.provider, self.provider_reason = device.create_session(
            entry.path, settings.device, settings.infer_threads)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_dtype = ELEMENT_TYPES.get(first.type) or np.float32
        self.input_shape = [d if isinstance(d, int) else None for d in first.shape]  # None: dynamic
        self.output_names = [o.name for o in self.session.get_outputs()]
        m = metrics()
        self._timer = m["inference_seconds"].labels(service, entry.name, entry.version, self.provider)
        self._batch_sizes = m["batch_size"].labels(service, entry.name)
        self.answers = m["answers"].labels(service, entry.name, entry.version)  # requests this version took
        self.taken = 0  # the same, in this worker since the last rollout log line (Runtime._log_answers)
        # A card may cap the rows of one merged batch (a 512x512 detector batch of 512 rows
        # would take gigabytes); the smaller of it and MAX_MERGED_ROWS applies.
        self.max_rows = min(settings.max_merged_rows, entry.spec.contract.max_batch_rows or settings.max_merged_rows)
        self.batcher = DynamicBatcher(self.run, enabled=settings.batching, max_rows=self.max_rows,
                                      wait_ms=settings.batch_wait_ms, on_batch=self._batch_sizes.observe,
                                      name=entry.name, inline_ms=settings.inline_infer_ms,
                                      attributes={"model": entry.name, "model.version": entry.version,
                                                  "onnxruntime.provider": self.provider},
                                      on_queue=m["queue_rows"].labels(service, entry.name).set)

    name = property(lambda self: self.entry.name)
    version = property(lambda self: self.entry.version)
    card = property(lambda self: self.entry.card)  # as written
    spec = property(lambda self: self.entry.spec)  # typed (services/contracts/cards.py)

    def run(self, rows: np.ndarray) -> list[np.ndarray]:
        """One synchronous onnxruntime run on a batch (what the batcher calls)."""
        started = time.perf_counter()
        outputs = self.session.run(self.output_names, {self.input_name: rows})
        self._timer.observe(time.perf_counter() - started)
        return outputs

    async def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        return await self.batcher(np.ascontiguousarray(rows, dtype=self.input_dtype))

    def warm_up(self, batch_sizes: list[int], min_seconds: float) -> None:
        static = [d or 1 for d in self.input_shape[1:]]
        deadline = time.monotonic() + min_seconds
        while True:
            for n in batch_sizes:
                self.session.run(self.output_names, {self.input_name: np.zeros([n, *static], self.input_dtype)})
            if time.monotonic() >= deadline:
                return

    def describe(self) -> dict:
        card = self.card
        return {
            "name": self.name,
            "version": self.version,
            "kind": card.get("kind"),
            "sha256": card.get("sha256"),
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "description": card.get("description"),
            "contract": card.get("contract"),
            "metrics": card.get("metrics"),
            "trained_with": (card.get("training") or {}).get("command"),
        }
