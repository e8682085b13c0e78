"""Drive a gymnasium environment with a served policy: every action comes over HTTP.

    python -m training play --env CartPole-v1 --url http://127.0.0.1:3001 --episodes 10
    python -m training play --env CartPole-v1 --pixels --record episode.gif

Runs the environment here, sends each observation to POST /act, steps with the answer,
and prints each episode's return and the mean. With --pixels the policy gets camera frames
(services/contracts/pixels.py: rendered here, cropped, greyscale, shrunk, the last 4 stacked), sent
as raw bytes (--form b64, the default), PNGs (--form png) or JSON numbers (--form json);
--record saves the first episode as the camera saw it, with each chosen push drawn on it.
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
         record_every: int = 2) -> list[float]:
    if pixels:
        from training.pixel_policy import make_env

        if env_id != "CartPole-v1":
            raise SystemExit("--pixels: the camera contract is CartPole-v1's (services/contracts/pixels.py)")
        env = make_env()
    else:
        env, form = gym.make(env_id), "json"
    returns, seen = [], []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            action = act(url, observation, model, api_key, form)
            if record and episode == 0:
                seen.append((observation[-1].copy(), action))  # the newest frame: what the camera sees now
            observation, reward, terminated, truncated, _ = env.step(
                np.asarray(action, dtype=env.action_space.dtype) if isinstance(action, list) else action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        print(f"episode {episode + 1:>3}/{episodes}: return {total:8.2f}", flush=True)
    env.close()
    if record and pixels:
        save_gif(seen[::record_every], record, record_every)
        print(f"recorded episode 1 as the camera saw it: {record}")
    return returns


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
    p.add_argument("--record", help="save the first episode as a GIF of what the camera saw (--pixels)")
    p.add_argument("--record-every", type=int, default=2, help="keep every n-th step in the GIF")
    args = p.parse_args(argv)
    if args.record and not args.pixels:
        raise SystemExit("--record shows what the camera saw: use it with --pixels")
    model = args.model or policy_for(args.url, args.env, args.pixels)
    returns = play(args.env, args.url, args.episodes, args.seed, model, args.api_key, args.pixels, args.form,
                   args.record, args.record_every)
    print(f"mean return {np.mean(returns):.2f} +/- {np.std(returns):.2f} over {len(returns)} episodes")
    return returns


if __name__ == "__main__":
    main()
