"""Train a CartPole policy that acts from camera frames: behaviour cloning with DAgger.

    python -m training pixel-policy --name cartpole_pixels --seed 0 --min-return 475

Why imitation, not PPO from pixels: the project already ships a state policy that plays
CartPole perfectly (`cartpole`, 500/500). Cloning it into a CNN that sees only frames is
supervised learning, which is cheap and stable on 2 CPU cores; PPO from pixels needs far more
environment steps and its result varies by seed. Plain cloning fails where the student drifts
into states the teacher never visited; DAgger (Ross et al., 2011) fixes that: the student drives,
the teacher labels every state it reached, and the student is retrained on everything so far.

One run, top to bottom:
  1. iteration 0: the teacher drives; iterations 1..N: the student drives; the teacher (the
     state policy's ONNX file, reading the true state) labels each step with its action,
     probabilities and value;
  2. after each iteration, train the CNN on all labelled frames (cross-entropy to the teacher's
     probabilities, plus the value); evaluate on 10 episodes (a line per iteration);
  3. evaluate: 100 episodes on fixed seeds, acting from frames only (the state is never read);
  4. export ONNX: uint8 frames [N, 4, 32, 120] -> action, probabilities, value; check parity
     with torch on 1,000+ real frames;
  5. write models/policy/<name>/<version>/ with the card, the curve and a strip of what the
     camera sees.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from services.contracts.predictor import Predictor
from services.contracts.pixels import BLOCK, CROP_ROWS, FRAME_SHAPE, FRAMES, LUMA, FrameStack, camera_frame
from training import export

ENV_ID = "CartPole-v1"
EVAL_SEED = 1_000_000  # the state policies' evaluation seeds: the same 100 episodes


class CameraObservation(gym.ObservationWrapper):
    """CartPole seen through its own renderer: observations are the last 4 camera frames
    (services/contracts/pixels.py), uint8 [4, 32, 120]. Make the env with render_mode="rgb_array"."""

    def __init__(self, env: gym.Env, frames: int = FRAMES):
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError("CameraObservation needs gym.make(..., render_mode='rgb_array')")
        self.stack = FrameStack(frames)
        self.observation_space = gym.spaces.Box(0, 255, (frames, *FRAME_SHAPE), np.uint8)

    def reset(self, **kwargs):
        self.stack.frames.clear()
        return super().reset(**kwargs)

    def observation(self, _state):
        frame = camera_frame(self.env.render())
        return self.stack.push(frame) if self.stack.frames else self.stack.reset(frame)


def make_env() -> CameraObservation:
    return CameraObservation(gym.make(ENV_ID, render_mode="rgb_array"))


class PixelPolicy(nn.Module):
    """A small CNN (about 1M weights; 0.2 ms a frame on one CPU core). Pixels are inverted, so
    the white background is 0 and the cart and pole are what excites the first layer, and the
    differences between consecutive frames come in as channels of their own, amplified: the
    velocities the policy needs are changes of a fraction of a pixel, grey levels of the block
    averages. Without both, cloning stalled at chance (loss ln 2) in the first trials."""

    def __init__(self, frames: int = FRAMES, actions: int = 2):
        super().__init__()
        h, w = FRAME_SHAPE
        self.features = nn.Sequential(
            nn.Conv2d(2 * frames - 1, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 5, stride=2, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * ((h + 7) // 8) * ((w + 7) // 8), 256), nn.ReLU())
        self.logits = nn.Linear(256, actions)
        self.value = nn.Linear(256, 1)

    def forward(self, frames: torch.Tensor):
        ink = 1.0 - frames.float() / 255.0
        motion = (ink[:, 1:] - ink[:, :-1]) * 8.0
        features = self.features(torch.cat([ink, motion], dim=1))
        return self.logits(features), self.value(features).squeeze(1)


class Exported(nn.Module):
    """The policy as served: uint8 frames -> action, probabilities, value."""

    def __init__(self, policy: PixelPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, observation):
        logits, value = self.policy(observation)
        return logits.argmax(dim=1), torch.softmax(logits, dim=1), value


class Teacher:
    """The shipped state policy (its ONNX file), reading the true state."""

    def __init__(self, path: Path):
        self.predict = Predictor(path)

    def __call__(self, state: np.ndarray):
        action, probabilities, value = self.predict(state[None])
        return int(action[0]), probabilities[0], float(value[0])


def rollout(env, teacher: Teacher, student: PixelPolicy | None, seed: int, record: dict | None,
            beta: float = 0.0):
    """One episode. The student drives when given (else the teacher), except that each step
    the teacher takes over with probability beta (DAgger's mixture); every step is labelled by
    the teacher when `record` is given. Returns the episode's return."""
    observation, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    total, done = 0.0, False
    while not done:
        label = teacher(np.asarray(env.unwrapped.state))
        if record is not None:
            record["frames"].append(observation)
            record["probabilities"].append(label[1])
            record["values"].append(label[2])
        if student is None or rng.random() < beta:
            action = label[0]
        else:
            with torch.no_grad():
                action = int(student(torch.from_numpy(observation[None]))[0].argmax(1))
        observation, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        done = terminated or truncated
    return total


def evaluate(student: PixelPolicy, episodes: int, seed: int, record: list | None = None,
             progress: bool = False) -> np.ndarray:
    """Episodes acting from frames only: the state is never read."""
    env = make_env()
    returns = []
    for i in tqdm(range(episodes), desc="evaluate", disable=not progress, leave=False, mininterval=2):
        observation, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            if record is not None:
                record.append(observation)
            with torch.no_grad():
                action = int(student(torch.from_numpy(observation[None]))[0].argmax(1))
            observation, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.asarray(returns)


def train(student: PixelPolicy, data: dict, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    frames = torch.from_numpy(np.stack(data["frames"]))
    targets = torch.from_numpy(np.stack(data["probabilities"]).astype(np.float32))
    values = torch.from_numpy(np.asarray(data["values"], np.float32))
    optimiser = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    student.train()
    loss_sum = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(frames), generator=generator)
        loss_sum, batches = 0.0, 0
        for start in range(0, len(frames), batch_size):
            batch = order[start:start + batch_size]
            logits, value = student(frames[batch])
            # Cross-entropy to the teacher's probabilities; the value is scaled to about 1.
            loss = -(targets[batch] * torch.log_softmax(logits, 1)).sum(1).mean() + \
                0.1 * ((value - values[batch]) / 50.0).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            loss_sum, batches = loss_sum + loss.item(), batches + 1
        loss_sum /= batches
    student.eval()
    return loss_sum


def check_parity(student: PixelPolicy, onnx_path: Path, frames: np.ndarray) -> dict:
    action, probabilities, value = Predictor(onnx_path)(frames)
    with torch.no_grad():
        ref = Exported(student).eval()(torch.from_numpy(frames))
    report = {"observations": int(len(frames)), "source": "frames of the 100 evaluation episodes",
              "actions_identical": bool(np.array_equal(action, ref[0].numpy())),
              "max_abs_diff_probabilities": float(np.abs(probabilities - ref[1].numpy()).max()),
              "max_abs_diff_value": float(np.abs(value - ref[2].numpy()).max())}
    return export.parity(report, report["actions_identical"] and report["max_abs_diff_probabilities"] <= 1e-5
                         and report["max_abs_diff_value"] <= 1e-3)


def camera_strip(frames: list[np.ndarray], out: Path) -> None:
    """What the camera saw: 8 observations of an evaluation episode, their 4 frames each."""
    from PIL import Image

    picked = [frames[i] for i in np.linspace(0, len(frames) - 1, 8).astype(int)]
    rows = [np.concatenate([np.pad(f, 1, constant_values=128) for f in obs], axis=1) for obs in picked]
    image = Image.fromarray(np.concatenate(rows, axis=0))
    image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(out)


def plot_curve(points: list[tuple], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [p[1] for p in points]
    ax.errorbar(steps, [p[2] for p in points], yerr=[p[3] for p in points], marker="o", capsize=3)
    ax.axhline(475, color="grey", linestyle="--", linewidth=1, label="CartPole-v1 solved (475)")
    ax.set_xlabel("labelled frames (DAgger iterations)")
    ax.set_ylabel("return from pixels (10 episodes)")
    ax.set_title("CartPole-v1 from camera frames: DAgger")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


@dataclass
class Args:
    name: str
    seed: int
    iterations: int
    episodes: int
    epochs: int
    batch_size: int
    lr: float
    beta: float
    eval_episodes: int
    teacher: Path
    models_dir: Path
    version: int | None
    min_return: float | None
    threads: int


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(prog="python -m training pixel-policy", description=__doc__.split("\n")[0])
    p.add_argument("--name", default="cartpole_pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=10, help="DAgger iterations after the teacher's own")
    p.add_argument("--episodes", type=int, default=8, help="episodes per iteration")
    p.add_argument("--epochs", type=int, default=4, help="passes over all labelled frames per iteration")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.5, help="the teacher drives a step with probability beta**iteration")
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--teacher", type=Path, default=Path("models/policy/cartpole/1/model.onnx"),
                   help="the state policy that labels every frame")
    p.add_argument("--models-dir", type=Path, default=Path("models/policy"))
    p.add_argument("--version", type=int)
    p.add_argument("--min-return", type=float, help="fail (and write nothing) below this mean return")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return Args(**vars(p.parse_args(argv)))


def main(argv=None):
    args = parse_args(argv)
    command = "python -m training pixel-policy " + shlex.join(sys.argv[2:] if argv is None else argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    teacher, student, env = Teacher(args.teacher), PixelPolicy(), make_env()
    data = {"frames": [], "probabilities": [], "values": []}
    curve, started = [], time.time()
    print(f"DAgger on {ENV_ID} from camera frames {FRAMES}x{FRAME_SHAPE[0]}x{FRAME_SHAPE[1]}: teacher "
          f"{args.teacher}, {args.iterations} iterations of {args.episodes} episodes, seed {args.seed}")
    for iteration in range(args.iterations + 1):
        driver = None if iteration == 0 else student  # iteration 0: the teacher drives
        seeds = [args.seed * 100_000 + iteration * args.episodes + e for e in range(args.episodes)]
        beta = args.beta ** iteration  # iteration 0: the teacher alone
        driven = [rollout(env, teacher, driver, s, data, beta) for s in tqdm(seeds, desc=f"iteration {iteration}",
                                                                             leave=False)]
        loss = train(student, data, args.epochs, args.batch_size, args.lr, args.seed + iteration)
        check = evaluate(student, 10, 500_000 + args.seed * 100 + iteration * 10)
        curve.append((iteration, len(data["frames"]), float(check.mean()), float(check.std())))
        tqdm.write(f"[iteration {iteration}] {'teacher' if driver is None else 'student'} drove "
                   f"{np.mean(driven):6.1f}, frames {len(data['frames']):>7,}, loss {loss:.4f}, "
                   f"student from pixels {check.mean():6.1f} +/- {check.std():5.1f}")
    train_seconds = time.time() - started

    seen: list[np.ndarray] = []
    returns = evaluate(student, args.eval_episodes, EVAL_SEED, record=seen, progress=True)
    print(f"evaluation from pixels only: mean return {returns.mean():.2f} +/- {returns.std():.2f} "
          f"over {args.eval_episodes} episodes (min {returns.min():.0f})")
    if args.min_return is not None and returns.mean() < args.min_return:
        raise SystemExit(f"mean return {returns.mean():.2f} is below --min-return {args.min_return}")

    out = export.new_version_dir(args.models_dir, args.name, args.version)
    onnx_path = out / "model.onnx"
    export.export_onnx(Exported(student), torch.zeros((2, FRAMES, *FRAME_SHAPE), dtype=torch.uint8), onnx_path,
                       ["observation"], ["action", "probabilities", "value"])
    frames = np.stack(seen)
    pick = np.random.default_rng(args.seed).choice(len(frames), size=min(2000, len(frames)), replace=False)
    parity = check_parity(student, onnx_path, frames[pick])
    print(f"export: {onnx_path} parity {parity}")
    plot_curve(curve, out / "learning_curve.png")
    camera_strip(seen[:500], out / "camera.png")

    card = {
        "name": args.name,
        "version": out.name,
        "kind": "policy",
        "description": f"CNN policy for {ENV_ID} acting from camera frames, cloned from the state policy with DAgger",
        "training": {
            "method": "behaviour cloning with DAgger corrections (imitation of the state policy; no reward used)",
            "teacher": str(args.teacher),
            "data": f"{len(data['frames'])} camera frames of {ENV_ID} labelled by the teacher",
            "command": command,
            "seed": args.seed,
            "iterations": args.iterations,
            "episodes_per_iteration": args.episodes,
            "epochs_per_iteration": args.epochs,
            "beta": f"the teacher drives each step with probability {args.beta}**iteration",
            "duration_s": round(train_seconds, 1),
            "device": "cpu",
            "curve": [{"iteration": i, "frames": n, "mean_return": m, "std_return": s} for i, n, m, s in curve],
        },
        "metrics": {**export.return_metrics(returns, EVAL_SEED, 475.0),
                    "observations": "camera frames only: the evaluation never reads the state"},
        "export": {"opset": 17, "parity": parity},
        "contract": {
            "env_id": ENV_ID,
            "inputs": [{"name": "observation", "dtype": "uint8", "shape": ["N", FRAMES, *FRAME_SHAPE]}],
            "outputs": [
                {"name": "action", "dtype": "int64", "shape": ["N"], "meaning": "deterministic action (argmax)"},
                {"name": "probabilities", "dtype": "float32", "shape": ["N", 2], "meaning": "action probabilities"},
                {"name": "value", "dtype": "float32", "shape": ["N"],
                 "meaning": "state value estimate (the teacher's, cloned)"},
            ],
            "observation_space": {"type": "Box", "shape": [FRAMES, *FRAME_SHAPE], "dtype": "uint8",
                                  "low": 0, "high": 255},
            "action_space": {"type": "Discrete", "n": 2},
            "action_meanings": ["push the cart to the left", "push the cart to the right"],
            "camera": {
                "source": f"gymnasium {ENV_ID} render_mode='rgb_array', 400x600 RGB",
                "crop_rows": list(CROP_ROWS),
                "greyscale": f"Y = {LUMA[0]:.3f} R + {LUMA[1]:.3f} G + {LUMA[2]:.3f} B (ITU-R BT.601), float32",
                "resize": f"mean of each {BLOCK}x{BLOCK} block, rounded half to even, uint8",
                "frame_shape": list(FRAME_SHAPE),
                "frames": FRAMES,
                "order": "oldest first; after reset, the first frame repeated",
                "code": "services/contracts/pixels.py (camera_frame, FrameStack)",
            },
        },
    }
    export.write_card(out, card, extra_packages=["torch", "gymnasium", "onnx"])
    print(f"wrote {out}: mean return {returns.mean():.2f} from pixels")
    return out


if __name__ == "__main__":
    main()
