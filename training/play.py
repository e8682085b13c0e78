"""Drive a gymnasium environment with a served policy: every action comes over HTTP.

    python -m training play --env CartPole-v1 --url http://127.0.0.1:3001 --episodes 10
    python -m training play --env CartPole-v1 --pixels --record episode.gif
    python -m training play --env HalfCheetah-v5 --episodes 10 --record cheetah.gif

Runs the environment here, sends each observation to POST /act, steps with the answer,
and prints each episode's return and the mean. With --pixels the policy gets camera frames
(services/contracts/pixels.py: rendered here, cropped, greyscale, shrunk, the last 4 stacked), sent
as raw bytes (--form b64, the default), PNGs (--form png) or JSON numbers (--form json);
--record saves the first episode as the camera saw it, with each chosen push drawn on it. For a
MuJoCo robot, --record saves the first episode as MuJoCo renders it offscreen (OSMesa unless
MUJOCO_GL says otherwise), in real time, with the joints' commands drawn as bars.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import urllib.request

import gymnasium as gym
import numpy as np


def observation_body(observation: np.ndarray, form: str) -> dict:
    """One observation as /act takes it: JSON numbers, or for camera frames raw bytes or PNGs."""
    if form == "b64":
        return {"observations_b64": base64.b64encode(observation.tobytes()).decode(), "shape": [1, *observation.shape]}
    if form == "png":
        from PIL import Image

        def png(frame: np.ndarray) -> str:
            buffer = io.BytesIO()
            Image.fromarray(frame, "L").save(buffer, "PNG")
            return base64.b64encode(buffer.getvalue()).decode()

        return {"frames_png": [[png(frame) for frame in observation]]}
    return {"observations": [observation.tolist()]}


def act(url: str, observation: np.ndarray, model: str | None, api_key: str | None, form: str = "json") -> int | list:
    body = {**observation_body(observation, form), "deterministic": True}
    if model:
        body["model"] = model
    request = urllib.request.Request(f"{url.rstrip('/')}/act", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["actions"][0]


def policy_for(url: str, env_id: str, pixels: bool = False) -> str | None:
    """The served policy trained on env_id (seeing frames or the state), from GET /info."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/info", timeout=30) as response:
        policies = json.loads(response.read()).get("policies", {})
    matching = [name for name, policy in policies.items() if policy.get("env_id") == env_id and
                (policy.get("observation_space", {}).get("dtype") == "uint8") == pixels]
    if not matching:
        raise SystemExit(f"{url} serves no {'pixel ' if pixels else ''}policy for {env_id}: it serves "
                         f"{sorted(policies)}")
    return matching[0]


def play(env_id: str, url: str, episodes: int, seed: int, model: str | None = None,
         api_key: str | None = None, pixels: bool = False, form: str = "b64", record: str | None = None,
         record_every: int = 2, record_steps: int = 300, max_steps: int | None = None) -> list[float]:
    if pixels:
        from training.pixel_policy import make_env

        if env_id != "CartPole-v1":
            raise SystemExit("--pixels: the camera contract is CartPole-v1's (services/contracts/pixels.py)")
        env = make_env()
    elif record:
        os.environ.setdefault("MUJOCO_GL", "osmesa")  # read when MuJoCo's renderer is first made
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        env, form = gym.make(env_id, render_mode="rgb_array", width=320, height=240), "json"
    else:
        env, form = gym.make(env_id), "json"
    returns, seen = [], []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        total, done, step = 0.0, False, 0
        while not done:
            action = act(url, observation, model, api_key, form)
            if record and episode == 0 and pixels:
                seen.append((observation[-1].copy(), action))  # the newest frame: what the camera sees now
            elif record and episode == 0 and step < record_steps and step % record_every == 0:
                seen.append((env.render(), np.asarray(action, np.float32), total))
            observation, reward, terminated, truncated, _ = env.step(
                np.asarray(action, dtype=env.action_space.dtype) if isinstance(action, list) else action)
            total, step = total + float(reward), step + 1
            done = terminated or truncated or (max_steps is not None and step >= max_steps)
        returns.append(total)
        print(f"episode {episode + 1:>3}/{episodes}: return {total:8.2f}", flush=True)
    if record and pixels:
        save_gif(seen[::record_every], record, record_every)
        print(f"recorded episode 1 as the camera saw it: {record}")
    elif record:
        step_seconds = float(getattr(env.unwrapped, "dt", 0.05))
        save_robot_gif(seen, record, record_every, step_seconds, env.action_space)
        print(f"recorded the first {min(record_steps, len(seen) * record_every)} steps of episode 1 as MuJoCo "
              f"rendered them: {record}")
    env.close()
    return returns


def save_robot_gif(steps: list, path: str, every: int, step_seconds: float, space) -> None:
    """MuJoCo's frames in real time, with each joint's served command drawn as a bar under them."""
    from PIL import Image, ImageDraw

    low, high = space.low, space.high
    pictures = []
    for i, (frame, action, total) in enumerate(steps):
        image = Image.fromarray(frame).convert("RGB")
        draw = ImageDraw.Draw(image)
        width = (image.width - 20) / len(action)
        for j, a in enumerate(action):  # a bar per joint: up for positive torque, down for negative
            x, fraction = 10 + j * width, (float(a) - low[j]) / (high[j] - low[j]) * 2 - 1
            y0, y1 = sorted((image.height - 22, image.height - 22 - 16 * fraction))
            draw.rectangle([x + 2, y0, x + width - 2, y1], fill=(43, 108, 176))
        draw.text((6, 4), f"step {i * every}  return {total:7.1f}", fill=(20, 20, 20))
        pictures.append(image.quantize(colors=64))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 * step_seconds * every),
                     loop=0, optimize=True)


def save_gif(steps: list[tuple[np.ndarray, int]], path: str, every: int, scale: int = 4) -> None:
    """The camera's newest frame at each step, enlarged, with the chosen push as an arrow."""
    from PIL import Image, ImageDraw

    pictures = []
    for i, (frame, action) in enumerate(steps):
        image = Image.fromarray(frame, "L").resize((frame.shape[1] * scale, frame.shape[0] * scale),
                                                 Image.Resampling.NEAREST).convert("RGB")
        draw = ImageDraw.Draw(image)
        y, x = 10, image.width - 40
        arrow = [(x, y), (x + 24, y + 8), (x, y + 16)] if action == 1 else [(x + 24, y), (x, y + 8), (x + 24, y + 16)]
        draw.polygon(arrow, fill=(43, 108, 176))
        draw.text((6, 4), f"step {i * every + 1}", fill=(95, 107, 122))
        pictures.append(image)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=20 * every, loop=0, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m training play", description=__doc__.split("\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--url", default="http://127.0.0.1:3001")
    p.add_argument("--model", help="policy name (needed when the service serves several)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("API_KEY"))
    p.add_argument("--pixels", action="store_true", help="the policy sees camera frames, not the state")
    p.add_argument("--form", choices=["b64", "png", "json"], default="b64", help="how frames are sent (--pixels)")
    p.add_argument("--record", help="save the first episode as a GIF: what the camera saw (--pixels), or "
                   "what MuJoCo renders (a robot)")
    p.add_argument("--record-every", type=int, default=2, help="keep every n-th step in the GIF")
    p.add_argument("--record-steps", type=int, default=300, help="a robot's GIF: the first n steps")
    p.add_argument("--max-steps", type=int, help="end each episode after n steps (default: the env's time limit)")
    args = p.parse_args(argv)
    if args.record and not args.pixels and args.env in ("CartPole-v1", "LunarLander-v3"):
        raise SystemExit("--record draws what the camera saw (--pixels) or a MuJoCo robot")
    model = args.model or policy_for(args.url, args.env, args.pixels)
    returns = play(args.env, args.url, args.episodes, args.seed, model, args.api_key, args.pixels, args.form,
                   args.record, args.record_every, args.record_steps, args.max_steps)
    print(f"mean return {np.mean(returns):.2f} +/- {np.std(returns):.2f} over {len(returns)} episodes")
    return returns


if __name__ == "__main__":
    main()
