"""Record real observations for the policy load test: episodes of each shipped policy, run
in-process with onnxruntime, with the deterministic action the model gave for each.

    python -m loadtests.record_policy_rollouts   # writes loadtests/data/policy_rollouts.json
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np

from services.contracts import repository
from services.contracts.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "data" / "policy_rollouts.json"


def record(entry: repository.ModelEntry, per_model: int, seed: int) -> dict:
    predict = Predictor.of(entry)
    env = gym.make(entry.card["contract"]["env_id"])
    observations, actions = [], []
    obs, _ = env.reset(seed=seed)
    while len(observations) < per_model:
        action = predict(obs[None])[0][0]
        observations.append(obs.astype(np.float32).tolist())
        actions.append(action.tolist())
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return {"version": entry.version, "sha256": entry.card["sha256"], "observations": observations,
            "actions": actions}


def main(per_model: int = 512, seed: int = 123) -> None:
    policies = ROOT / "models" / "policy"
    entries = [repository.resolve(policies, name, kind="policy") for name in repository.list_models(policies)]
    # State-vector policies only: a pixel policy's observations are camera frames (its probes.npz).
    data = {e.name: record(e, per_model, seed) for e in entries if "camera" not in e.card["contract"]}
    OUT.write_text(json.dumps(data))
    counts = ", ".join(f"{name} ({len(rollout['observations'])})" for name, rollout in data.items())
    print(f"wrote {OUT}: {counts}")


if __name__ == "__main__":
    main()
