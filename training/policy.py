"""Train, evaluate and export a reinforcement-learning policy (Stable-Baselines3 PPO or DQN).

    python -m training policy --env CartPole-v1 --name cartpole --seed 0

One run does the whole job, top to bottom:
  1. train with periodic evaluation (progress bar, learning-curve PNG);
  2. evaluate: 100 episodes, fixed seeds, deterministic actions;
  3. export to ONNX: observations [N, *obs] -> action, probabilities (discrete), value;
  4. check the export: onnx.checker, then parity with the torch policy on observations
     from real rollouts;
  5. write models/policy/<name>/<version>/{model.onnx, model.json, learning_curve.png}.

Works with any gymnasium environment whose observation space is a Box and whose action
space is Discrete or Box. Known environments get tuned hyperparameters (rl-zoo's); others
get PPO defaults.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from tqdm import tqdm

from services.contracts.predictor import Predictor
from training import export

# Hyperparameters from rl-baselines3-zoo, which solve these environments reliably.
PRESETS: dict[str, dict] = {
    "CartPole-v1": dict(
        algo="ppo", timesteps=100_000, n_envs=8,
        hparams=dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                     ent_coef=0.0, learning_rate="lin_0.001", clip_range="lin_0.2"),
    ),
    "LunarLander-v3": dict(
        algo="ppo", timesteps=1_000_000, n_envs=16,
        hparams=dict(n_steps=1024, batch_size=64, gae_lambda=0.98, gamma=0.999, n_epochs=4,
                     ent_coef=0.01),
    ),
}
DEFAULT_PRESET = dict(algo="ppo", timesteps=200_000, n_envs=8, hparams={})

# What each discrete action does, shown by the service's /info.
ACTION_MEANINGS = {
    "CartPole-v1": ["push the cart to the left", "push the cart to the right"],
    "LunarLander-v3": ["do nothing", "fire the left orientation engine",
                       "fire the main engine", "fire the right orientation engine"],
}


def linear_schedule(spec):
    """rl-zoo's "lin_<value>": decay linearly from value to 0 over training."""
    if isinstance(spec, str) and spec.startswith("lin_"):
        start = float(spec[4:])
        return lambda progress_remaining: progress_remaining * start
    return spec


class EvalCurve(BaseCallback):
    """Evaluate every `every` steps on fixed seeds; record (timesteps, mean return); print a line."""

    def __init__(self, env_id: str, every: int, episodes: int, seed: int):
        super().__init__()
        self.env_id, self.every, self.episodes, self.seed = env_id, every, episodes, seed
        self.points: list[tuple[int, float, float]] = []
        self._next = every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            self._next += self.every
            returns = run_episodes(self.model, self.env_id, self.episodes, self.seed)
            self.points.append((self.num_timesteps, float(np.mean(returns)), float(np.std(returns))))
            tqdm.write(f"[eval] step {self.num_timesteps:>9,}  return {np.mean(returns):8.2f} "
                       f"+/- {np.std(returns):6.2f} over {self.episodes} episodes")
        return True


def run_episodes(model, env_id: str, episodes: int, seed: int, record: list | None = None,
                 progress: bool = False) -> np.ndarray:
    """Deterministic episodes on seeds seed, seed+1, ...; optionally record every observation."""
    env = gym.make(env_id)
    returns = []
    for i in tqdm(range(episodes), desc="evaluate", disable=not progress, leave=False, mininterval=2):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            if record is not None:
                record.append(obs)
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.asarray(returns)


class OnnxPolicy(torch.nn.Module):
    """The SB3 policy as a pure function of an observation batch, for export.

    Outputs: action (argmax for Discrete, the clipped mean for Box), probabilities
    (Discrete) or action_std (Box, for sampling), and the state value.
    """

    def __init__(self, model):
        super().__init__()
        self.policy = model.policy
        self.is_dqn = isinstance(model, DQN)
        space = model.action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        if not self.discrete:
            self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32))

    def forward(self, observation: torch.Tensor):
        if self.is_dqn:  # Q-values: greedy action, softmax over Q as probabilities, max Q as value
            q = self.policy.q_net(observation)
            return q.argmax(dim=1), torch.softmax(q, dim=1), q.max(dim=1).values
        features = self.policy.extract_features(observation, self.policy.pi_features_extractor)
        latent_pi, latent_vf = self.policy.mlp_extractor(features)
        value = self.policy.value_net(latent_vf).squeeze(1)
        logits_or_mean = self.policy.action_net(latent_pi)
        if self.discrete:
            return logits_or_mean.argmax(dim=1), torch.softmax(logits_or_mean, dim=1), value
        mean = torch.clamp(logits_or_mean, self.low, self.high)
        std = torch.exp(self.policy.log_std).expand_as(mean)
        return mean, std, value


def export_onnx(model, obs_shape: tuple, path: Path) -> list[str]:
    module = OnnxPolicy(model).eval()
    discrete = module.discrete
    outputs = ["action", "probabilities" if discrete else "action_std", "value"]
    export.export_onnx(module, torch.zeros((2, *obs_shape), dtype=torch.float32), path, ["observation"], outputs)
    return outputs


def check_parity(model, onnx_path: Path, observations: np.ndarray) -> dict:
    """Compare the ONNX graph with the torch policy that SB3 itself uses to act."""
    onnx_action, onnx_second, onnx_value = Predictor(onnx_path)(observations)
    torch_action, _ = model.predict(observations, deterministic=True)
    discrete = isinstance(model.action_space, gym.spaces.Discrete)
    with torch.no_grad():
        ref = OnnxPolicy(model).eval()(torch.as_tensor(observations))
    report = {
        "observations": int(len(observations)),
        "source": "deterministic evaluation rollouts of the trained policy",
        "actions_identical": bool(np.array_equal(onnx_action, torch_action) if discrete
                                  else np.allclose(onnx_action, torch_action, atol=1e-5)),
        "max_abs_diff_second_output": float(np.abs(onnx_second - ref[1].numpy()).max()),
        "max_abs_diff_value": float(np.abs(onnx_value - ref[2].numpy()).max()),
    }
    ok = (report["actions_identical"] and report["max_abs_diff_second_output"] <= 1e-5
          and report["max_abs_diff_value"] <= 1e-4)
    return export.parity(report, ok)


def space_contract(space: gym.Space) -> dict:
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box):
        # JSON has no infinity: an unbounded side is written as null.
        finite = lambda a: [None if not np.isfinite(v) or abs(v) > 1e30 else float(v) for v in a.ravel()]
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype),
                "low": finite(space.low), "high": finite(space.high)}
    raise SystemExit(f"unsupported space {space}: observations must be a Box, actions Discrete or Box")


def plot_curve(points, out: Path, title: str, target: float | None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, means, stds = (np.array(x) for x in zip(*points))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, means, marker="o", label="mean return (deterministic)")
    ax.fill_between(steps, means - stds, means + stds, alpha=0.25, label="+/- 1 std")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", label=f"solved ({target:g})")
    ax.set(xlabel="environment steps", ylabel="episode return", title=title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training policy", description=__doc__.split("\n")[0])
    p.add_argument("--env", default="CartPole-v1", help="gymnasium environment id")
    p.add_argument("--name", help="model name in the repository (default: env id, lower-case, no version)")
    p.add_argument("--algo", choices=["ppo", "dqn"], help="default: the preset's, else ppo")
    p.add_argument("--timesteps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--n-envs", type=int, help="parallel environments (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: timesteps/10)")
    p.add_argument("--eval-episodes", type=int, default=100, help="episodes of the final evaluation")
    p.add_argument("--curve-episodes", type=int, default=10, help="episodes per learning-curve point")
    p.add_argument("--parity-observations", type=int, default=5000)
    p.add_argument("--models-dir", type=Path, default=Path("models/policy"), help="the policy service's repository")
    p.add_argument("--version", type=int, help="default: one past the newest version present")
    p.add_argument("--min-return", type=float, help="fail (and write nothing) below this mean return")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = "python -m training policy " + shlex.join(sys.argv[2:] if argv is None else argv)
    preset = PRESETS.get(args.env, DEFAULT_PRESET)
    algo = args.algo or preset["algo"]
    timesteps = args.timesteps or preset["timesteps"]
    n_envs = args.n_envs or preset["n_envs"]
    hparams = {k: linear_schedule(v) for k, v in preset["hparams"].items()} if algo == preset["algo"] else {}
    name = args.name or args.env.split("-v")[0].lower()
    torch.set_num_threads(1)  # small MLPs: one thread beats several on 2 cores

    probe = gym.make(args.env)
    obs_space, act_space = probe.observation_space, probe.action_space
    reward_threshold = probe.spec.reward_threshold if probe.spec else None
    probe.close()
    if not isinstance(obs_space, gym.spaces.Box):
        raise SystemExit(f"{args.env}: observation space {obs_space} is not a Box")
    if algo == "dqn" and not isinstance(act_space, gym.spaces.Discrete):
        raise SystemExit("dqn needs a Discrete action space; use --algo ppo")

    # 1. Train.
    vec_env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed)
    cls = PPO if algo == "ppo" else DQN
    model = cls("MlpPolicy", vec_env, seed=args.seed, verbose=0, device="cpu", **hparams)
    curve = EvalCurve(args.env, args.eval_every or max(timesteps // 10, 1), args.curve_episodes,
                      seed=10_000 + args.seed)
    print(f"training {algo.upper()} on {args.env} for {timesteps:,} steps with {n_envs} envs, seed {args.seed}")
    started = time.time()
    model.learn(total_timesteps=timesteps, callback=curve, progress_bar=True)
    train_seconds = time.time() - started

    # 2. Evaluate: fixed seeds, deterministic actions; keep the observations for the parity check.
    seen: list[np.ndarray] = []
    eval_seed = 1_000_000 + args.seed
    returns = run_episodes(model, args.env, args.eval_episodes, eval_seed, record=seen, progress=True)
    print(f"evaluation: mean return {returns.mean():.2f} +/- {returns.std():.2f} "
          f"over {args.eval_episodes} episodes")
    if args.min_return is not None and returns.mean() < args.min_return:
        raise SystemExit(f"mean return {returns.mean():.2f} is below --min-return {args.min_return}")

    # 3-4. Export and check.
    out = export.new_version_dir(args.models_dir, name, args.version)
    onnx_path = out / "model.onnx"
    outputs = export_onnx(model, obs_space.shape, onnx_path)
    rng = np.random.default_rng(args.seed)
    seen_arr = np.asarray(seen, dtype=np.float32)
    pick = rng.choice(len(seen_arr), size=min(args.parity_observations, len(seen_arr)), replace=False)
    parity = check_parity(model, onnx_path, seen_arr[pick])
    print(f"export: {onnx_path} parity {parity}")

    if not curve.points or curve.points[-1][0] != model.num_timesteps:
        curve.points.append((model.num_timesteps, float(returns.mean()), float(returns.std())))
    plot_curve(curve.points, out / "learning_curve.png", f"{algo.upper()} on {args.env}", reward_threshold)

    # 5. The model card.
    discrete = isinstance(act_space, gym.spaces.Discrete)
    act_shape = [] if discrete else list(act_space.shape)
    card = {
        "name": name,
        "version": out.name,
        "kind": "policy",
        "description": f"{algo.upper()} policy for the gymnasium environment {args.env}",
        "training": {
            "data": f"interaction with the gymnasium environment {args.env}",
            "command": command,
            "seed": args.seed,
            "algorithm": algo.upper(),
            "timesteps": int(model.num_timesteps),
            "n_envs": n_envs,
            "hyperparameters": preset["hparams"] if algo == preset["algo"] else "stable-baselines3 defaults",
            "duration_s": round(train_seconds, 1),
            "learning_curve": [{"timesteps": s, "mean_return": m, "std_return": d} for s, m, d in curve.points],
        },
        "metrics": export.return_metrics(returns, eval_seed, reward_threshold),
        "export": {"opset": 17, "parity": parity},
        "contract": {
            "env_id": args.env,
            "inputs": [{"name": "observation", "dtype": "float32", "shape": ["N", *obs_space.shape]}],
            "outputs": [
                {"name": "action", "dtype": "int64" if discrete else "float32", "shape": ["N", *act_shape],
                 "meaning": "deterministic action (argmax)" if discrete else "deterministic action (mean, clipped)"},
                {"name": outputs[1], "dtype": "float32", "shape": ["N", int(act_space.n)] if discrete else ["N", *act_shape],
                 "meaning": "action probabilities" if discrete else "standard deviation of the Gaussian policy"},
                {"name": "value", "dtype": "float32", "shape": ["N"], "meaning": "state value estimate"},
            ],
            "observation_space": space_contract(obs_space),
            "action_space": space_contract(act_space),
            "action_meanings": ACTION_MEANINGS.get(args.env) if discrete else None,
        },
    }
    export.write_card(out, card, extra_packages=["torch", "stable_baselines3", "gymnasium", "onnx"])
    print(f"wrote {out}: mean return {returns.mean():.2f}")
    return out


if __name__ == "__main__":
    main()
