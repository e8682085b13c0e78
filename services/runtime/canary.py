"""Canary releases and shadow traffic: a loaded, gated version is judged on live traffic, then
promoted or rolled back by the service itself.

    POST /models/cartpole/canary  {"version": "2", "share": 0.1}              a tenth of the traffic
    POST /models/cartpole/canary  {"version": "2", "mode": "shadow"}          a copy, never answered
    POST /models/cartpole/canary/stop                                          end it, nothing changes

In `canary` mode the candidate answers `share` of the requests that name no version. In `shadow`
mode `share` of those requests is copied to it: clients get the serving version's answer, and
the candidate's is only compared. The judge watches the candidate (PLAN_FIELDS):

- errors: a run that raises, or outputs the service would not send (NaN or Infinity, a policy's
  action outside its space). The request is answered again by the serving version, so clients
  see only its answer; the error counts against the candidate.
- latency: the candidate's p99 over the serving version's p99, both measured here (model call,
  queue included), at most max_p99_ratio, judged once each has P99_MIN_SAMPLES answers.
- agreement (policies and classifiers): on a compare_share sample of the candidate's answers
  the serving version answers the same rows, compared as the gate compares (gate.AGREEMENT).

It rolls back the moment the limits can no longer be met (more errors than max_error_rate
allows over min_requests, more disagreements than min_agreement allows over min_compared) and
promotes once window_s has passed with at least min_requests and min_compared and every
figure within its limit. Every worker counts its own traffic in a tally file beside the control
record (MODEL_CONTROL_DIR/<service>/canary/) and judges the sum; the first to decide writes the
decision to the control record, and every worker and replica follows it (control.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from services.contracts.repository import write_json_atomic
from services.runtime import gate, tracing

# Latency buckets, 50 us to 100 s, 10% apart: tallies from several workers add up bucket by bucket.
EDGES = 50e-6 * 1.1 ** np.arange(153)
MAX_SHADOW_COPIES = 32   # in flight per model and worker: a copy is skipped (and counted) beyond it
AGREEING_KINDS = ("policy", "classifier")
P99_MIN_SAMPLES = 100    # below it a 99th percentile is the slowest single request: latency is not judged


@dataclass
class Plan:
    """One canary as the admin asked for it and the control record keeps it."""
    version: str
    mode: str = "canary"
    share: float = 0.1
    window_s: float = 60.0
    min_requests: int = 100
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.5
    min_agreement: float | None = 0.9
    compare_share: float = 0.25
    min_compared: int = 50
    id: str = ""
    started_at: float = 0.0  # wall clock, so every worker and replica measures the same window

    @classmethod
    def of(cls, record: dict) -> "Plan":
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})


# The fields POST /models/{name}/canary takes: (kind, minimum, maximum, what it means).
PLAN_FIELDS = {
    "mode": (str, None, None, "canary: the candidate answers `share` of requests; shadow: it gets a copy"),
    "share": (float, 0.0, 1.0, "share of the requests that name no version (above 0)"),
    "window_s": (float, 0.0, 86400.0, "seconds before a promotion at the earliest"),
    "min_requests": (int, 1, 10_000_000, "candidate requests before a promotion"),
    "max_error_rate": (float, 0.0, 1.0, "errors per candidate request"),
    "max_p99_ratio": (float, 0.0, 1000.0, "candidate p99 latency over the serving version's"),
    "min_agreement": (float, 0.0, 1.0, "rows answered the same as the serving version (policies, classifiers)"),
    "compare_share": (float, 0.0, 1.0, "share of candidate answers compared with the serving version's"),
    "min_compared": (int, 1, 10_000_000, "compared rows before a promotion"),
}
ABOVE_MINIMUM = ("share", "compare_share", "max_p99_ratio")  # their minimum itself is not allowed: 0 means nothing


@dataclass
class Tally:
    """What one worker saw of one version during a canary; tallies add up across workers."""
    requests: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(EDGES) + 1))
    compared: int = 0
    agreed: int = 0
    skipped: int = 0           # shadow copies not sent (MAX_SHADOW_COPIES in flight)
    last_error: str | None = None

    def took(self, seconds: float) -> None:
        self.requests += 1
        self.latency[int(np.searchsorted(EDGES, seconds))] += 1

    def add(self, other: "Tally") -> None:
        for name in ("requests", "errors", "compared", "agreed", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]
        self.last_error = other.last_error or self.last_error

    def p99(self) -> float | None:
        """The 99th percentile's bucket's upper edge, in seconds (within 10%)."""
        total = sum(self.latency)
        if not total:
            return None
        rank, seen = math.ceil(0.99 * total), 0
        for i, count in enumerate(self.latency):
            seen += count
            if seen >= rank:
                return float(EDGES[min(i, len(EDGES) - 1)])
        return None


def allowed(rate: float, count: int) -> int:
    """How many of `count` may fail at `rate` (0.1 of 50 is 5, not 4.999...)."""
    return math.floor(rate * count + 1e-9)


def output_problem(model, outputs) -> str | None:
    """Why outputs may not be sent to a client (None: they may)."""
    for name, out in zip(model.output_names, outputs):
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            return f"output {name} holds NaN or Infinity"
    if model.spec.kind == "policy":
        space, actions = model.spec.contract.action_space, outputs[0]
        if space.type == "Discrete" and ((actions < 0) | (actions >= space.n)).any():
            return f"an action outside Discrete({space.n})"
        if space.type == "Box":
            low, high = space.bounds()
            if ((actions < low - 1e-6) | (actions > high + 1e-6)).any():
                return "an action outside the action space's bounds"
    return None


class EvenShare:
    """Exactly `share` of calls, spread evenly: every 10th at 0.1 (no randomness to explain)."""

    def __init__(self, share: float):
        self.share, self.credit = share, 0.0

    def take(self) -> bool:
        self.credit += self.share
        if self.credit >= 1.0 - 1e-9:
            self.credit -= 1.0
            return True
        return False


class Canary:
    """A running canary in one worker: it routes, tallies and judges."""

    def __init__(self, plan: Plan, candidate, serving, tally_dir: Path):
        self.plan, self.candidate, self.serving = plan, candidate, serving
        self.tallies = {"candidate": Tally(), "serving": Tally()}
        self.tally_file = tally_dir / f"{socket.gethostname()}-{os.getpid()}.json"
        self.stopped: str | None = None  # set when this worker's own tally already fails: stop routing
        self.last_figures: dict | None = None  # of the merged tallies, at the latest judging
        self._share, self._compare = EvenShare(plan.share), EvenShare(plan.compare_share)
        self._copies: set[asyncio.Task] = set()
        judged = candidate.spec.kind in AGREEING_KINDS and plan.min_agreement is not None
        self.agrees = gate.AGREEMENT[candidate.spec.kind] if judged else None

    # Routing -----------------------------------------------------------------------------

    def route(self):
        """The model-like object one request that names no version is answered by."""
        if self.stopped is not None:
            return self.serving
        if self.plan.mode == "shadow":
            return Answer(self, self.serving, copy=self._share.take())
        return Answer(self, self.candidate if self._share.take() else self.serving)

    def compare_now(self) -> bool:
        return self.agrees is not None and self._compare.take()

    def count_error(self, problem: str) -> None:
        tally = self.tallies["candidate"]
        tally.requests += 1
        tally.errors += 1
        tally.last_error = problem[:300]
        self._stop_if_failed()

    def compare(self, old, new) -> None:
        fraction, _ = self.agrees(old, new, self.candidate, self.serving)
        rows = len(old[0])
        tally = self.tallies["candidate"]
        tally.compared += rows
        tally.agreed += int(round(fraction * rows))
        self._stop_if_failed()

    def _stop_if_failed(self) -> None:
        """This worker's own figures already fail: it stops routing now; the next judging records it."""
        verdict = self.judge(self.tallies)
        if verdict and verdict[0] == "rolled_back":
            self.stopped = verdict[1]

    def shadow(self, rows: np.ndarray, served: list) -> None:
        if len(self._copies) >= MAX_SHADOW_COPIES:
            self.tallies["candidate"].skipped += 1
            return
        task = asyncio.get_running_loop().create_task(self._shadow_run(rows, served))
        self._copies.add(task)
        task.add_done_callback(self._copies.discard)

    async def _shadow_run(self, rows: np.ndarray, served: list) -> None:
        started = time.perf_counter()
        try:
            outputs = await self.candidate(rows)
            problem = output_problem(self.candidate, outputs)
        except Exception as exc:  # noqa: BLE001 - any failure of the candidate is its error
            problem, outputs = f"{type(exc).__name__}: {exc}", None
        if problem is not None:
            return self.count_error(problem)
        self.tallies["candidate"].took(time.perf_counter() - started)
        if self.agrees is not None:
            self.compare(served, outputs)

    # Judging -----------------------------------------------------------------------------

    def write_tally(self) -> None:
        self.tally_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.tally_file, {role: asdict(t) for role, t in self.tallies.items()})

    def merged(self) -> dict[str, Tally]:
        """Every worker's tally of this canary, added up (this worker's own as it is now)."""
        total = {"candidate": Tally(), "serving": Tally()}
        for path in sorted(self.tally_file.parent.glob("*.json")):
            if path == self.tally_file:
                continue
            try:
                data = json.loads(path.read_text())
                for role in total:
                    total[role].add(Tally(**data[role]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a tally being replaced, or damaged: the next look has it
        for role in total:
            total[role].add(self.tallies[role])
        return total

    def judge(self, tallies: dict[str, Tally], now: float | None = None) -> tuple[str, str] | None:
        """("promoted" | "rolled_back", why) once decided, else None."""
        plan, c, s = self.plan, tallies["candidate"], tallies["serving"]
        if c.errors > allowed(plan.max_error_rate, max(c.requests, plan.min_requests)):
            return "rolled_back", (f"error rate {c.errors}/{c.requests} is over max_error_rate {plan.max_error_rate} "
                                   f"(last error: {c.last_error})")
        if self.agrees is not None and c.compared:
            disagreed = c.compared - c.agreed
            if disagreed > allowed(1 - plan.min_agreement, max(c.compared, plan.min_compared)):
                return "rolled_back", (f"agreement {c.agreed}/{c.compared} rows with version {self.serving.version} "
                                       f"is under min_agreement {plan.min_agreement}")
        if c.requests - c.errors < plan.min_requests:
            return None
        ours, theirs = c.p99(), s.p99()
        if min(c.requests, s.requests) >= P99_MIN_SAMPLES and ours > plan.max_p99_ratio * theirs:
            return "rolled_back", (f"p99 latency {ours * 1000:.2f} ms is over max_p99_ratio {plan.max_p99_ratio} "
                                   f"x the serving version's {theirs * 1000:.2f} ms")
        if self.agrees is not None and c.compared < plan.min_compared:
            return None
        if (now or time.time()) - plan.started_at < plan.window_s:
            return None
        return "promoted", "every figure within its limit over the window"

    def figures(self, tallies: dict[str, Tally]) -> dict:
        c, s = tallies["candidate"], tallies["serving"]
        p99 = {role: t.p99() for role, t in tallies.items()}
        return {"candidate_requests": c.requests, "candidate_errors": c.errors,
                "error_rate": round(c.errors / c.requests, 4) if c.requests else None,
                "candidate_p99_ms": None if p99["candidate"] is None else round(p99["candidate"] * 1000, 3),
                "serving_requests": s.requests,
                "serving_p99_ms": None if p99["serving"] is None else round(p99["serving"] * 1000, 3),
                "compared_rows": c.compared, "agreement": round(c.agreed / c.compared, 4) if c.compared else None,
                "shadow_copies_skipped": c.skipped, "last_error": c.last_error,
                "elapsed_s": round(time.time() - self.plan.started_at, 1)}


class Answer:
    """One request's model during a canary: looks like the model that answers it (its name,
    version, spec, card ...), and tallies the call. A candidate whose run fails is replaced by
    the serving version for this request, so `version` names whoever answered."""

    def __init__(self, canary: Canary, model, copy: bool = False):
        self._canary, self._model, self._copy = canary, model, copy

    @property
    def answering(self):
        return self._model

    def __getattr__(self, name):
        return getattr(self._model, name)

    async def __call__(self, rows: np.ndarray) -> list:
        canary, model = self._canary, self._model
        started = time.perf_counter()
        if model is canary.serving:
            outputs = await model(rows)
            canary.tallies["serving"].took(time.perf_counter() - started)
            if self._copy:
                canary.shadow(rows, outputs)
            return outputs
        compare = canary.compare_now()
        try:
            if compare:
                outputs, served = await asyncio.gather(model(rows), canary.serving(rows))
            else:
                outputs = await model(rows)
            problem = output_problem(model, outputs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the candidate is its error, not the client's
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            canary.tallies["candidate"].took(time.perf_counter() - started)
            if compare:
                canary.compare(served, outputs)
            return outputs
        canary.count_error(problem)
        self._model = canary.serving
        tracing.annotate(**{"model.version": canary.serving.version, "canary.fallback": problem})
        return await canary.serving(rows)
