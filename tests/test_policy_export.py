"""ONNX export of SB3 policies: parity with torch, and the check really catches a mismatch."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN, PPO

from training import policy as policy_training

pytestmark = pytest.mark.slow  # trains and exports policies: `pytest -m "not slow"` leaves it out


def rollout(model, env_id, n):
    env, seen = gym.make(env_id), []
    obs, _ = env.reset(seed=0)
    while len(seen) < n:
        seen.append(obs)
        obs, _, terminated, truncated, _ = env.step(model.predict(obs, deterministic=True)[0])
        if terminated or truncated:
            obs, _ = env.reset()
    return np.asarray(seen, np.float32)


@pytest.mark.parametrize("cls, env_id", [(PPO, "CartPole-v1"), (DQN, "CartPole-v1"), (PPO, "Pendulum-v1")])
def test_export_matches_torch_on_1000_rollout_observations(tmp_path, cls, env_id):
    model = cls("MlpPolicy", env_id, seed=0, device="cpu")
    model.learn(256)
    path = tmp_path / "model.onnx"
    policy_training.export_onnx(model, model.observation_space.shape, path)
    report = policy_training.check_parity(model, path, rollout(model, env_id, 1000))
    assert report["passed"] and report["actions_identical"] and report["observations"] == 1000
    assert report["max_abs_diff_second_output"] <= 1e-5


def test_parity_check_catches_a_graph_that_drifted(tmp_path):
    model = PPO("MlpPolicy", "CartPole-v1", seed=0, device="cpu")
    path = tmp_path / "model.onnx"
    policy_training.export_onnx(model, (4,), path)
    with torch.no_grad():  # the torch policy changes after export: the graph no longer matches
        model.policy.action_net.weight[0].add_(0.5)  # one action only: softmax ignores shifts of all
    with pytest.raises(SystemExit, match="parity failed"):
        policy_training.check_parity(model, path, rollout(model, "CartPole-v1", 1000))
