"""Train, evaluate and export a MuJoCo robot's policy (soft actor-critic, training/robot_sac.py).

    python -m training robot --env HalfCheetah-v5
    python -m training robot --env Ant-v5
    python -m training robot --env HalfCheetah-v5 --resume             # from runs/robot/halfcheetah/
    python -m training robot --env HalfCheetah-v5 --resume --steps 1500000   # train on past the first target
    python -m training robot --env Ant-v5 --screen                     # updates/s of each network size, batch

One run, top to bottom:
  1. train: a progress bar with the running return and updates/s, an evaluation line (10
     deterministic episodes) every --eval-every steps, a checkpoint (networks, optimisers, replay
     buffer, curve) every --checkpoint-every steps; --resume continues from the last one;
  2. evaluate: 100 episodes on fixed seeds with the deterministic policy (tanh of the mean);
  3. export the actor to ONNX (training/robot_export.py): observation -> action within the bounds,
     the Gaussian's std and mean before squashing, and the critics' value of the action;
     parity with the JAX policy on observations from the evaluation rollouts;
  4. write models/policy/<name>/<version>/ with the card and learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

# The zoo's published figures (rl-baselines3-zoo benchmark, 1M steps, MuJoCo v3 environments):
# theirs, not measured here, and the targets this project's robots are measured against.
ZOO = {
    "HalfCheetah-v5": {"target": 9500.0, "zoo": {"SAC": 9535, "TD3": 9709, "TQC": 12090}},
    "Ant-v5": {"target": 5000.0, "zoo": {"SAC": 4615, "TD3": 5813, "TQC": 3339}},
}
CURVE_EPISODES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training robot", description=__doc__.split("\n")[0])
    p.add_argument("--env", default="HalfCheetah-v5", help="a gymnasium MuJoCo environment with a Box action space")
    p.add_argument("--name", help="model name (default: the env id, lower-case, without -vN)")
    p.add_argument("--steps", type=int, default=1_000_000, help="environment steps (one update per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--learning-starts", type=int, default=10_000, help="random actions before learning")
    p.add_argument("--burst", type=int, default=64, help="env steps between bursts of as many updates (even)")
    p.add_argument("--buffer", type=int, default=1_000_000)
    p.add_argument("--eval-every", type=int, default=25_000)
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=50_000)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/robot"))
    p.add_argument("--resume", action="store_true", help="continue from <runs-dir>/<name>/checkpoint.npz")
    p.add_argument("--models-dir", type=Path, default=Path("models/policy"))
    p.add_argument("--version", type=int, help="default: one past the newest version present")
    p.add_argument("--no-export", action="store_true", help="train and evaluate only")
    p.add_argument("--parity-observations", type=int, default=5000)
    p.add_argument("--screen", action="store_true", help="only measure updates/s for hidden 128/256 x batch 128/256 "
                   "on this machine (one core), and exit")
    args = p.parse_args(argv)
    if args.burst % 2:
        p.error("--burst must be even (updates come in critic, critic+actor pairs)")
    args.name = args.name or args.env.split("-v")[0].lower()
    return args


def make_env(env_id: str, **kwargs):
    import gymnasium as gym

    env = gym.make(env_id, **kwargs)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise SystemExit(f"{env_id}: the action space {env.action_space} is not a Box")
    return env


def scale(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """tanh's [-1, 1] to the action space's bounds."""
    return low + (action + 1.0) * 0.5 * (high - low)


def evaluate(policy, env_id: str, episodes: int, first_seed: int, record: list | None = None,
             progress: bool = False) -> np.ndarray:
    """Deterministic episodes on seeds first_seed.., all stepped together (one policy call per step)."""
    from tqdm import tqdm

    envs = [make_env(env_id) for _ in range(episodes)]
    low, high = envs[0].action_space.low, envs[0].action_space.high
    obs = np.stack([env.reset(seed=first_seed + i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    returns, alive = np.zeros(episodes), np.ones(episodes, bool)
    with tqdm(desc="evaluate", total=episodes, disable=not progress, leave=False, mininterval=2) as bar:
        while alive.any():
            idx = np.flatnonzero(alive)
            if record is not None:
                record.extend(obs[idx])
            actions = scale(np.asarray(policy(obs[idx])), low, high)
            for j, i in enumerate(idx):
                o, r, terminated, truncated, _ = envs[i].step(actions[j])
                obs[i], returns[i] = o, returns[i] + r
                if terminated or truncated:
                    alive[i] = False
                    bar.update()
    for env in envs:
        env.close()
    return returns


class Checkpoint:
    """runs/robot/<name>/checkpoint.npz: everything --resume needs, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "checkpoint.npz"

    def save(self, sac, state, replay, step: int, curve: list, episodes: list, rng: np.random.Generator,
             timing: dict):
        self.folder.mkdir(parents=True, exist_ok=True)
        leaves = {f"state_{i:03d}": x for i, x in enumerate(sac.state_leaves(state))}
        buffer = {f"buffer_{k}": v for k, v in replay.arrays().items()}
        meta = json.dumps({"step": step, "curve": curve, "episodes": episodes, "rng": rng.bit_generator.state,
                           "timing": timing})
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, meta=np.array(meta), **leaves, **buffer)
        tmp.replace(self.path)

    def load(self, sac, template, replay):
        with np.load(self.path) as saved:
            meta = json.loads(str(saved["meta"]))
            leaves = [saved[k] for k in sorted(k for k in saved.files if k.startswith("state_"))]
            replay.restore({k[len("buffer_"):]: saved[k] for k in saved.files if k.startswith("buffer_")})
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
        # timing: the wall seconds of the steps trained by runs that recorded them (all but the
        # first checkpoints of the shipped robots, written before the timer existed).
        timing = meta.get("timing", {"timed_steps": 0, "seconds": 0.0})
        return (sac.state_from_leaves(template, leaves), meta["step"], meta["curve"], meta["episodes"], rng,
                timing)


def train(args):
    """Steps 1: returns the trained state, the curve and the wall time."""
    import jax
    from tqdm import tqdm

    from training import robot_sac as sac

    env = make_env(args.env)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    h = sac.Hyper(hidden=args.hidden, batch=args.batch)
    state = sac.init_state(jax.random.PRNGKey(args.seed), obs_dim, act_dim, h)
    replay = sac.Replay(args.buffer, obs_dim, act_dim)
    checkpoint = Checkpoint(args.runs_dir / args.name)
    step, curve, episodes, rng = 0, [], [], np.random.default_rng(args.seed)
    timing = {"timed_steps": 0, "seconds": 0.0}
    if args.resume:
        if not checkpoint.path.exists():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint.path}")
        state, step, curve, episodes, rng, timing = checkpoint.load(sac, state, replay)
        print(f"resumed from {checkpoint.path} at step {step:,} ({replay.size:,} transitions)")
    if step >= args.steps:
        return state, curve, episodes, timing

    print(f"SAC on {args.env} ({obs_dim}-d observation, {act_dim}-d action) for {args.steps:,} steps, "
          f"seed {args.seed}, networks {h.hidden}x{h.hidden}, batch {h.batch}")
    obs, _ = env.reset(seed=args.seed * 1000 + len(episodes))
    episode_return, recent = 0.0, deque((e["return"] for e in episodes[-10:]), maxlen=10)
    act_key = jax.random.PRNGKey(args.seed + 1 + step)
    started, first_step, updates, update_seconds, stats = time.time(), step, 0, 0.0, None

    def timing_now() -> dict:
        return {"timed_steps": timing["timed_steps"] + step - first_step,
                "seconds": round(timing["seconds"] + time.time() - started, 1)}

    bar = tqdm(total=args.steps, initial=step, desc=args.name, unit="step", mininterval=2, smoothing=0.05)
    while step < args.steps:
        for _ in range(args.burst):
            if step < args.learning_starts:
                action = rng.uniform(-1, 1, act_dim).astype(np.float32)
            else:
                action, act_key = sac.explore(state["actor"], obs[None].astype(np.float32), act_key)
                action = np.asarray(action)[0]
            nxt, reward, terminated, truncated, _ = env.step(scale(action, low, high))
            replay.add(obs, action, reward, nxt, float(terminated))  # a time limit is not a terminal state
            obs, episode_return, step = nxt, episode_return + float(reward), step + 1
            if terminated or truncated:
                episodes.append({"step": step, "return": episode_return})
                recent.append(episode_return)
                obs, _ = env.reset(seed=args.seed * 1000 + len(episodes))
                episode_return = 0.0
            if step % args.eval_every == 0:
                returns = evaluate(lambda o: sac.deterministic(state["actor"], o), args.env, CURVE_EPISODES,
                                   10_000 + args.seed)
                curve.append({"timesteps": step, "mean_return": float(returns.mean()),
                              "std_return": float(returns.std())})
                tqdm.write(f"[eval] step {step:>9,}  return {returns.mean():9.1f} +/- {returns.std():7.1f} "
                           f"over {CURVE_EPISODES} episodes")
            if step % args.checkpoint_every == 0:
                checkpoint.save(sac, state, replay, step, curve, episodes, rng, timing_now())
        if step >= args.learning_starts:
            t = time.time()
            state, stats = sac.update_burst(state, replay.sample(rng, args.burst, h.batch), -float(act_dim), h)
            jax.block_until_ready(state["log_alpha"])
            updates, update_seconds = updates + args.burst, update_seconds + time.time() - t
        bar.update(args.burst)
        if stats is not None:
            bar.set_postfix(ret=f"{np.mean(recent) if recent else 0:.0f}", alpha=f"{float(stats[1]):.3f}",
                            upd_s=f"{updates / max(update_seconds, 1e-9):.0f}", refresh=False)
    bar.close()
    checkpoint.save(sac, state, replay, step, curve, episodes, rng, timing_now())
    wall = time.time() - started
    print(f"trained to step {step:,} in {wall / 60:.1f} min ({(step - first_step) / max(wall, 1e-9):.0f} "
          f"steps/s this run; updates alone {updates / max(update_seconds, 1e-9):.0f}/s)")
    return state, curve, episodes, timing_now()


def screen(env_id: str, burst: int, seconds: float = 5.0) -> list[dict]:
    """What one update costs here, per candidate size: the learner's speed decides what fits a session."""
    import jax

    from training import robot_sac as sac

    env = make_env(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    rows = []
    for hidden in (128, 256):
        for batch in (128, 256):
            h = sac.Hyper(hidden=hidden, batch=batch)
            state = sac.init_state(jax.random.PRNGKey(0), obs_dim, act_dim, h)
            replay = sac.Replay(10_000, obs_dim, act_dim)
            rng = np.random.default_rng(0)
            for _ in range(10_000):
                replay.add(rng.standard_normal(obs_dim), rng.uniform(-1, 1, act_dim), 0.0,
                           rng.standard_normal(obs_dim), 0.0)
            state, _ = sac.update_burst(state, replay.sample(rng, burst, batch), -float(act_dim), h)  # compile
            jax.block_until_ready(state["log_alpha"])
            started, updates = time.time(), 0
            while time.time() - started < seconds:
                state, _ = sac.update_burst(state, replay.sample(rng, burst, batch), -float(act_dim), h)
                updates += burst
            jax.block_until_ready(state["log_alpha"])
            rows.append({"hidden": hidden, "batch": batch, "updates_per_s": round(updates / (time.time() - started))})
            hours = 1_000_000 / rows[-1]["updates_per_s"] / 3600
            print(f"{env_id}: hidden {hidden}, batch {batch}: {rows[-1]['updates_per_s']:,} updates/s "
                  f"(1M updates in {hours:.1f} h)", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.screen:
        return screen(args.env, args.burst)
    command = "python -m training robot " + shlex.join(sys.argv[2:] if argv is None else argv)
    from training import robot_sac as sac

    state, curve, episodes, timing = train(args)
    seen: list[np.ndarray] = []
    eval_seed = 1_000_000 + args.seed
    returns = evaluate(lambda o: sac.deterministic(state["actor"], o), args.env, args.eval_episodes, eval_seed,
                       record=seen, progress=True)
    goal = ZOO.get(args.env, {}).get("target")
    print(f"evaluation: mean return {returns.mean():.1f} +/- {returns.std():.1f} over {args.eval_episodes} "
          f"episodes" + (f" (target {goal:,.0f}: {'met' if returns.mean() >= goal else 'missed'})" if goal else ""))
    if args.no_export:
        return None
    from training import robot_export

    return robot_export.write_version(args, command, state, curve, episodes, timing, returns, eval_seed,
                                      np.asarray(seen, np.float32))


if __name__ == "__main__":
    main()
