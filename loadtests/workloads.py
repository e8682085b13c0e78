"""What the benchmark sends to each service, and the same work done in-process (the raw ceiling).

A workload knows (1) how to do its service's work without HTTP, on the same model file with
the same onnxruntime session options, and (2) how to make one checked HTTP request.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from services.runtime import device, repository

ROOT = Path(__file__).resolve().parent.parent


def session_for(service: str, name: str):
    entry = repository.resolve(ROOT / "models" / service, name, kind=service)
    session, _, _ = device.create_session(entry.path, "cpu", threads=1)
    return entry, session


def timed(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds` (after one warm-up call)."""
    fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - started)


class Workload:
    name = ""
    unit = "items"
    description = ""
    server_env: dict[str, str] = {}

    def raw(self, batch_sizes: list[int], seconds: float) -> dict[int, float]:
        raise NotImplementedError

    async def call(self, session, url: str, i: int) -> tuple[bool, int]:
        raise NotImplementedError


class PolicyWorkload(Workload):
    name = "policy"
    unit = "observations"
    description = ("`POST /act` with one CartPole observation per request (real rollout observations); "
                   "raw: `session.run` on the same cartpole model.")

    def __init__(self):
        rollouts = json.loads((ROOT / "loadtests" / "data" / "policy_rollouts.json").read_text())
        self.observations = rollouts["cartpole"]["observations"]

    def raw(self, batch_sizes, seconds):
        _, session = session_for("policy", "cartpole")
        rows = np.asarray(self.observations, np.float32)
        out = {}
        for n in batch_sizes:
            batch = np.ascontiguousarray(rows[:n])
            out[n] = n * timed(lambda: session.run(None, {"observation": batch}), seconds)
        return out

    async def call(self, session, url, i):
        body = {"observations": [self.observations[i % len(self.observations)]], "model": "cartpole"}
        async with session.post(f"{url}/act", json=body) as response:
            if response.status != 200:
                return False, 0
            answer = await response.json()
            return len(answer.get("actions", [])) == 1, 1


WORKLOADS: dict[str, Workload] = {"policy": PolicyWorkload()}
