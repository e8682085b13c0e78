"""Drive a gymnasium environment with a served policy: every action comes over HTTP.

    python -m training play --env CartPole-v1 --url http://127.0.0.1:3001 --episodes 10

Runs the environment here, sends each observation to POST /act, steps with the answer,
and prints each episode's return and the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request

import gymnasium as gym
import numpy as np


def act(url: str, observation: np.ndarray, model: str | None, api_key: str | None) -> int | list:
    body = {"observations": [observation.tolist()], "deterministic": True}
    if model:
        body["model"] = model
    request = urllib.request.Request(f"{url.rstrip('/')}/act", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["actions"][0]


def policy_for(url: str, env_id: str) -> str | None:
    """The served policy trained on env_id, from GET /info (None: let the service pick)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/info", timeout=30) as response:
        policies = json.loads(response.read()).get("policies", {})
    matching = [name for name, policy in policies.items() if policy.get("env_id") == env_id]
    if not matching:
        raise SystemExit(f"{url} serves no policy for {env_id}: it serves {sorted(policies)}")
    return matching[0]


def play(env_id: str, url: str, episodes: int, seed: int, model: str | None = None,
         api_key: str | None = None) -> list[float]:
    env = gym.make(env_id)
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            action = act(url, observation, model, api_key)
            observation, reward, terminated, truncated, _ = env.step(
                np.asarray(action, dtype=env.action_space.dtype) if isinstance(action, list) else action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
        print(f"episode {episode + 1:>3}/{episodes}: return {total:8.2f}", flush=True)
    env.close()
    return returns


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m training play", description=__doc__.split("\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--url", default="http://127.0.0.1:3001")
    p.add_argument("--model", help="policy name (needed when the service serves several)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("API_KEY"))
    args = p.parse_args(argv)
    model = args.model or policy_for(args.url, args.env)
    returns = play(args.env, args.url, args.episodes, args.seed, model, args.api_key)
    print(f"mean return {np.mean(returns):.2f} +/- {np.std(returns):.2f} over {len(returns)} episodes")
    return returns


if __name__ == "__main__":
    main()
