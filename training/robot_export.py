"""A trained robot's actor (and critics) as ONNX, checked, with its model card (training/robot.py step 3-4).

The graph, for observations [N, obs_dim] (float32):
  action       [N, act_dim]  low + (tanh(mean) + 1) / 2 * (high - low): the deterministic action,
                             always within the action space's bounds
  action_std   [N, act_dim]  the Gaussian's std before squashing
  value        [N]           min(Q1, Q2) of (observation, deterministic action): the critics' estimate
  action_mean  [N, act_dim]  the Gaussian's mean before squashing
A sampled action is low + (tanh(action_mean + action_std * z) + 1) / 2 * (high - low), z ~ N(0, 1)
(the card's contract says action_squashing "tanh"; services/policy.py samples it so).
Observations are clipped to +/-OBSERVATION_CLIP inside the graph so that no finite float32 input
can overflow the network into NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training import export

OBSERVATION_CLIP = 1e6
RANGE_MARGIN = 0.1  # the observation range: what the evaluation saw, widened by this much of its span each side
OUTPUTS = ["action", "action_std", "value", "action_mean"]


def torch_module(state, low: np.ndarray, high: np.ndarray):
    """The JAX parameters as a torch module (what torch.onnx exports)."""
    import torch

    def linear(layers):
        mods = []
        for i, (w, b) in enumerate(layers):
            lin = torch.nn.Linear(*np.asarray(w).shape)
            with torch.no_grad():
                lin.weight.copy_(torch.as_tensor(np.array(w).T))
                lin.bias.copy_(torch.as_tensor(np.array(b)))
            mods += [lin] + ([torch.nn.ReLU()] if i < len(layers) - 1 else [])
        return torch.nn.Sequential(*mods)

    from training.robot_sac import LOG_STD_MAX, LOG_STD_MIN

    class Robot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.actor = linear(state["actor"])
            self.q1, self.q2 = linear(state["critic"][0]), linear(state["critic"][1])
            self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
            self.register_buffer("half_span", torch.as_tensor((high - low) / 2, dtype=torch.float32))

        def forward(self, observation):
            observation = torch.clamp(observation, -OBSERVATION_CLIP, OBSERVATION_CLIP)
            mean, log_std = self.actor(observation).chunk(2, dim=-1)
            log_std = torch.clamp(log_std, LOG_STD_MIN, LOG_STD_MAX)
            squashed = torch.tanh(mean)
            x = torch.cat([observation, squashed], dim=-1)
            value = torch.minimum(self.q1(x), self.q2(x)).squeeze(-1)
            return self.low + (squashed + 1) * self.half_span, torch.exp(log_std), value, mean

    return Robot().eval()


def actuators(env) -> list[str]:
    """What each action dimension drives: the MuJoCo model's actuators and their joints."""
    import mujoco

    model = env.unwrapped.model
    names = []
    for i in range(model.nu):
        actuator = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_ACTUATOR, i) or f"actuator {i}"
        joint = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, int(model.actuator_trnid[i, 0]))
        gear = float(model.actuator_gear[i, 0])
        names.append(f"{actuator}: torque on joint {joint} (gear {gear:g})")
    return names


def observation_range(seen: np.ndarray, episodes: int) -> dict:
    low, high = seen.min(axis=0), seen.max(axis=0)
    margin = RANGE_MARGIN * np.maximum(high - low, 1e-3)
    return {"low": [float(v) for v in low - margin], "high": [float(v) for v in high + margin],
            "source": f"min and max of {len(seen):,} observations from the {episodes} evaluation episodes, "
                      f"widened by {RANGE_MARGIN:.0%} of the span each side"}


def check_parity(state, onnx_path: Path, observations: np.ndarray, low, high) -> dict:
    """The ONNX file against the JAX policy the evaluation ran, on its own rollouts' observations."""
    from services.contracts.predictor import Predictor
    from training import robot_sac as sac
    from training.robot import scale

    action, std, value, mean = Predictor(onnx_path)(observations)
    jax_action = scale(np.asarray(sac.deterministic(state["actor"], observations)), low, high)
    jax_mean, jax_log_std = (np.asarray(x) for x in sac.actor_head(state["actor"], observations))
    q1, q2 = sac.q_values(state["critic"], observations, np.tanh(jax_mean))
    report = {
        "observations": int(len(observations)),
        "source": "deterministic evaluation rollouts of the trained policy (JAX)",
        "max_abs_diff_action": float(np.abs(action - jax_action).max()),
        "max_abs_diff_action_std": float(np.abs(std - np.exp(jax_log_std)).max()),
        "max_abs_diff_action_mean": float(np.abs(mean - jax_mean).max()),
        "max_abs_diff_value": float(np.abs(value - np.minimum(np.asarray(q1), np.asarray(q2))).max()),
        "actions_within_bounds": bool(((action >= low) & (action <= high)).all()),
    }
    scale_value = max(1.0, float(np.abs(value).max()))
    ok = (report["max_abs_diff_action"] <= 1e-4 and report["max_abs_diff_action_std"] <= 1e-4
          and report["max_abs_diff_action_mean"] <= 1e-3 and report["max_abs_diff_value"] <= 1e-4 * scale_value
          and report["actions_within_bounds"])
    return export.parity(report, ok)


def write_version(args, command: str, state, curve: list, episodes: list, timing: dict, returns: np.ndarray,
                  eval_seed: int, seen: np.ndarray) -> Path:
    import torch

    from training.policy import plot_curve, space_contract
    from training.robot import ZOO, make_env

    env = make_env(args.env)
    obs_space, act_space = env.observation_space, env.action_space
    low, high = act_space.low.astype(np.float32), act_space.high.astype(np.float32)
    meanings = actuators(env)
    env.close()

    out = export.new_version_dir(args.models_dir, args.name, args.version)
    onnx_path = out / "model.onnx"
    export.export_onnx(torch_module(state, low, high), torch.zeros((2, obs_space.shape[0])), onnx_path,
                       ["observation"], OUTPUTS)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(seen), size=min(args.parity_observations, len(seen)), replace=False)
    parity = check_parity(state, onnx_path, seen[pick], low, high)
    print(f"export: {onnx_path} parity {parity}")

    reference = ZOO.get(args.env, {})
    points = [(p["timesteps"], p["mean_return"], p["std_return"]) for p in curve]
    points.append((points[-1][0] if points else 0, float(returns.mean()), float(returns.std())))
    plot_curve(points, out / "learning_curve.png", f"SAC on {args.env}", reference.get("target"))
    act_shape = list(act_space.shape)
    metrics = export.return_metrics(returns, eval_seed, reference.get("target"))
    if reference:
        metrics["target"] = {"mean_return": reference["target"], "met": bool(returns.mean() >= reference["target"])}
        metrics["published_by_others"] = {
            "source": "rl-baselines3-zoo benchmark (theirs, not measured here): 1M steps on the MuJoCo v3 "
                      "environment",
            "mean_return": reference["zoo"]}
    card = {
        "name": args.name,
        "version": out.name,
        "kind": "policy",
        "description": f"soft actor-critic policy for the MuJoCo robot {args.env}",
        "training": {
            "data": f"interaction with the gymnasium environment {args.env} (MuJoCo)",
            "command": command,
            "seed": args.seed,
            "algorithm": "SAC (training/robot_sac.py: JAX, delayed actor updates, automatic temperature)",
            "timesteps": int(curve[-1]["timesteps"]) if curve else 0,
            "hyperparameters": {"hidden": args.hidden, "batch": args.batch, "learning_starts": args.learning_starts,
                                "burst": args.burst, "buffer": args.buffer, "gamma": 0.99, "tau": 0.005,
                                "lr": 3e-4, "actor_update_every": 2, "target_entropy": -float(act_shape[0])},
            # Wall time of the steps whose runs timed them (a run resumed from an untimed checkpoint
            # times its own steps only): steps/s on this machine, environment and evaluations included.
            "duration_s": timing["seconds"],
            "timed_steps": timing["timed_steps"],
            "steps_per_s": round(timing["timed_steps"] / timing["seconds"], 1) if timing["seconds"] else None,
            "training_episodes": len(episodes),
            "learning_curve": curve,
        },
        "metrics": metrics,
        "export": {"opset": 17, "parity": parity, "observation_clip": OBSERVATION_CLIP},
        "contract": {
            "env_id": args.env,
            "inputs": [{"name": "observation", "dtype": "float32", "shape": ["N", *obs_space.shape]}],
            "outputs": [
                {"name": "action", "dtype": "float32", "shape": ["N", *act_shape],
                 "meaning": "deterministic action: low + (tanh(action_mean) + 1) / 2 * (high - low)"},
                {"name": "action_std", "dtype": "float32", "shape": ["N", *act_shape],
                 "meaning": "standard deviation of the Gaussian before tanh squashing"},
                {"name": "value", "dtype": "float32", "shape": ["N"],
                 "meaning": "min of the two critics' Q of the deterministic action"},
                {"name": "action_mean", "dtype": "float32", "shape": ["N", *act_shape],
                 "meaning": "mean of the Gaussian before tanh squashing"},
            ],
            "observation_space": space_contract(obs_space),
            "action_space": space_contract(act_space),
            "action_meanings": meanings,
            "action_squashing": "tanh",
            "observation_range": observation_range(seen, args.eval_episodes),
        },
    }
    export.write_card(out, card, extra_packages=["jax", "torch", "gymnasium", "mujoco", "onnx"])
    print(f"wrote {out}: mean return {returns.mean():.1f}")
    return out
