"""Adaptive (dynamic) batching across concurrent requests, one batcher per model.

Requests are validated first, then their rows are queued. One worker task runs one batch at
a time on a dedicated thread (onnxruntime releases the GIL, so the event loop keeps parsing
requests meanwhile). When a batch finishes, every row that queued up behind it (up to
max_rows) becomes the next batch: no added latency when idle, large batches under load, as
Triton's dynamic batcher does. batch_wait_ms > 0 additionally holds the first request that
long for company.

A model so small that a batch takes less than inline_ms (CartPole's policy: 7 microseconds a
row) runs on the event loop instead: handing it to the thread and back costs more than the run
itself. The latest batch's time per row decides, so the first batch is timed on the thread.

Why not BentoML's batchable API: it takes exactly one argument, so the public endpoints
(with model, deterministic, seed, ...) would need a second hop, and a bad row in one request
must not fail the others. Here each request is checked before it joins a batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from services.runtime import tracing

InferFn = Callable[[np.ndarray], Sequence[np.ndarray]]


class DynamicBatcher:
    def __init__(self, infer: InferFn, *, enabled: bool, max_rows: int, wait_ms: float,
                 on_batch: Callable[[int], None] | None = None, name: str = "model", inline_ms: float = 0.0,
                 attributes: dict | None = None, on_queue: Callable[[int], None] | None = None):
        self.infer, self.enabled, self.max_rows, self.wait_s = infer, enabled, max_rows, wait_ms / 1000
        self.attributes = attributes or {"model": name}  # on its trace spans (tracing.py)
        self.inline_s = inline_ms / 1000
        self.row_seconds: float | None = None  # the latest batch's time per row; None: none run yet
        self.on_batch = on_batch or (lambda rows: None)
        self.on_queue = on_queue or (lambda rows: None)  # rows still waiting as each batch starts
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        # Each queued request: its rows, its answer, its trace span's context and when it queued.
        self._queue: deque[tuple[np.ndarray, asyncio.Future, object, int]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def close(self) -> None:
        """The model is unloaded: finish what is queued, then let the worker task and thread go
        (they hold the model's session). Callable from any thread. A request that took the
        model before it was unloaded still gets its answer, run on its own."""
        self._closed = True
        if self._loop is not None and self._wakeup is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the loop has ended
                pass
        else:
            self._executor.shutdown(wait=False)

    async def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        """Run the model on rows [n, ...]; returns its outputs for exactly these rows."""
        loop = asyncio.get_running_loop()
        if self._closed:
            return list(await asyncio.to_thread(self.infer, rows))
        context = tracing.current() if tracing.enabled else None
        if not self.enabled:
            self.on_batch(len(rows))
            if context is None:
                return list(await self._run_batch(loop, rows))
            with tracing.batch_spans([(context, len(rows), tracing.now_ns())], len(rows), self.attributes):
                return list(await self._run_batch(loop, rows))
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._loop = loop
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self._queue.append((rows, future, context, tracing.now_ns() if context is not None else 0))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not (self._closed and not self._queue):
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if self.wait_s > 0:
                    deadline = time.monotonic() + self.wait_s
                    while sum(len(queued[0]) for queued in self._queue) < self.max_rows and time.monotonic() < deadline:
                        await asyncio.sleep(min(0.0005, deadline - time.monotonic()))
                batch = self._take()
                if not batch:
                    continue
                rows = batch[0][0] if len(batch) == 1 else np.concatenate([queued[0] for queued in batch])
                self.on_batch(len(rows))
                self.on_queue(sum(len(queued[0]) for queued in self._queue) if self._queue else 0)
                try:
                    if tracing.enabled:
                        with tracing.batch_spans([(c, len(r), at) for r, _, c, at in batch], len(rows),
                                                 self.attributes):
                            outputs = await self._run_batch(loop, rows)
                    else:
                        outputs = await self._run_batch(loop, rows)
                except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                    for _, future, _, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for part, future, _, _ in batch:
                    end = start + len(part)
                    if not future.done():  # the client may have gone away
                        future.set_result([out[start:end] for out in outputs])
                    start = end
        self._executor.shutdown(wait=False)

    async def _run_batch(self, loop, rows: np.ndarray) -> Sequence[np.ndarray]:
        """On the event loop when the estimate says it is quicker than the hop, else on the thread."""
        if self.row_seconds is not None and len(rows) * self.row_seconds <= self.inline_s:
            return self._timed(rows)
        return await loop.run_in_executor(self._executor, self._timed, rows)

    def _timed(self, rows: np.ndarray) -> Sequence[np.ndarray]:
        started = time.perf_counter()
        outputs = self.infer(rows)
        self.row_seconds = (time.perf_counter() - started) / max(1, len(rows))
        return outputs

    def _take(self) -> list[tuple]:
        """Queued requests in arrival order, up to max_rows rows (at least one request).
        Requests cancelled while queued (client gone, request timed out) are dropped unrun."""
        while self._queue and self._queue[0][1].done():
            self._queue.popleft()
        if not self._queue:
            return []
        batch = [self._queue.popleft()]
        rows = len(batch[0][0])
        while self._queue and rows + len(self._queue[0][0]) <= self.max_rows:
            part = self._queue.popleft()
            if not part[1].done():
                batch.append(part)
                rows += len(part[0])
        return batch
