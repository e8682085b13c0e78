"""A robot's control loop over HTTP: per-step latency from the client, as a controller sees it.

    python -m loadtests.control_loop                       # HalfCheetah-v5 and Ant-v5, shipped models
    python -m loadtests.control_loop --env Ant-v5 --steps 500
    python -m loadtests.control_loop --url http://127.0.0.1:3001   # a service already running

Four loops per robot, each stepping the MuJoCo environment here with the served action:
  one robot, one connection, JSON body and answer          (--steps steps)
  one robot, one connection, .npy body and answer          (--steps steps)
  64 robots, one request of 64 observations per step       (--steps steps)
  64 robots, 64 clients of one observation each            (--steps // 4 steps each, asyncio + aiohttp)
The latency is the request alone (sent to answer read), not the simulator's step. Without --url
the policy service is started here, pinned to the first half of the cores with one onnxruntime
thread, and the client runs on the other half (as loadtests/benchmark.py does). Prints a table
and writes it with the command to --out (benchmarks/robots.md) and the figures to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import io
import json
import os
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from services.contracts.versions import machine

ROOT = Path(__file__).resolve().parent.parent
ROBOTS = {"HalfCheetah-v5": "halfcheetah", "Ant-v5": "ant"}
FLEET = 64


def percentiles(latencies_ms: list[float]) -> dict:
    values = np.asarray(latencies_ms)
    return {"p50_ms": round(float(np.percentile(values, 50)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3),
            "max_ms": round(float(values.max()), 3), "requests": int(len(values))}


class Connection:
    """One keep-alive HTTP/1.1 connection: what a controller holds open to its policy."""

    def __init__(self, url: str):
        parts = urlparse(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def post(self, path: str, body: bytes, headers: dict) -> bytes:
        self.conn.request("POST", path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"POST {path}: {response.status} {data[:300]!r}")
        return data


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def one_robot(url: str, env_id: str, model: str, steps: int, form: str, robots: int = 1) -> dict:
    """`robots` environments stepped together, one request per step on one connection."""
    import gymnasium as gym

    envs = [gym.make(env_id) for _ in range(robots)]
    obs = np.stack([env.reset(seed=i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    conn, latencies, total = Connection(url), [], 0.0
    started = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        if form == "json":
            answer = conn.post("/act", json.dumps({"observations": obs.tolist(), "model": model}).encode(),
                               {"Content-Type": "application/json"})
            actions = np.asarray(json.loads(answer)["actions"], np.float32)
        else:
            answer = conn.post(f"/act?model={model}", npy(obs),
                               {"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
            actions = np.load(io.BytesIO(answer))
        latencies.append((time.perf_counter() - t) * 1000)
        for i, env in enumerate(envs):
            o, r, terminated, truncated, _ = env.step(actions[i])
            total += float(r)
            obs[i] = env.reset()[0] if terminated or truncated else o
    seconds = time.perf_counter() - started
    for env in envs:
        env.close()
    return {**percentiles(latencies), "loop_steps_per_s": round(steps / seconds, 1),
            "return_per_robot": round(total / robots, 1)}


async def fleet_of_clients(url: str, env_id: str, model: str, steps: int, clients: int) -> dict:
    """`clients` robots, each its own connection sending one observation per step."""
    import aiohttp
    import gymnasium as gym

    latencies: list[float] = []

    async def robot(session, index: int):
        env = gym.make(env_id)
        obs, _ = env.reset(seed=index)
        for _ in range(steps):
            t = time.perf_counter()
            async with session.post(f"{url}/act", json={"observations": [obs.tolist()], "model": model}) as r:
                if r.status != 200:
                    raise SystemExit(f"/act: {r.status} {await r.text()}")
                action = (await r.json())["actions"][0]
            latencies.append((time.perf_counter() - t) * 1000)
            obs, _, terminated, truncated, _ = env.step(np.asarray(action, np.float32))
            if terminated or truncated:
                obs, _ = env.reset()
        env.close()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(robot(session, i) for i in range(clients)))
        seconds = time.perf_counter() - started
    return {**percentiles(latencies), "steps_per_s_all_robots": round(clients * steps / seconds, 1)}


def measure(url: str, env_id: str, steps: int) -> dict:
    model = ROBOTS.get(env_id) or env_id.split("-v")[0].lower()
    one_robot(url, env_id, model, 50, "json")  # warm the connection and the service's paths
    return {
        "1 robot, JSON": one_robot(url, env_id, model, steps, "json"),
        "1 robot, .npy": one_robot(url, env_id, model, steps, "npy"),
        f"{FLEET} robots, one request of {FLEET}": one_robot(url, env_id, model, steps, "npy", robots=FLEET),
        f"{FLEET} robots, {FLEET} clients of 1": asyncio.run(fleet_of_clients(url, env_id, model, max(steps // 4, 1),
                                                                              FLEET)),
    }


def table(results: dict) -> str:
    lines = ["| robot | loop | per-step p50 (ms) | p99 (ms) | max (ms) | requests | loop rate |",
             "|---|---|---:|---:|---:|---:|---|"]
    for env_id, loops in results.items():
        for loop, r in loops.items():
            rate = (f"{r['loop_steps_per_s']:,.0f} steps/s" if "loop_steps_per_s" in r
                    else f"{r['steps_per_s_all_robots']:,.0f} robot-steps/s")
            if "of 64" in loop and "loop_steps_per_s" in r:
                rate += f" ({r['loop_steps_per_s'] * FLEET:,.0f} robot-steps/s)"
            lines.append(f"| {env_id} | {loop} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | "
                         f"{r['requests']:,} | {rate} |")
    return "\n".join(lines)


@contextlib.contextmanager
def policy_service(server_cores: set[int], logs: Path, models: Path):
    from loadtests.benchmark import serving
    from services.contracts import processes

    spec = next(s for s in processes.SERVICES if s.name == "policy")
    env = {"MODELS_DIR": str(models), "INFER_THREADS": "1", "WORKERS": "1"}
    with serving(spec.target, "policy", server_cores, env, logs, "control-loop") as url:
        yield url


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m loadtests.control_loop", description=__doc__.split("\n")[0])
    p.add_argument("--env", nargs="*", default=list(ROBOTS), help="robots (gymnasium ids)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--url", help="a running policy service (default: start one, pinned)")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models", help="MODELS_DIR of the started service")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "robots.md")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "robots.json")
    args = p.parse_args(argv)
    command = "python -m loadtests.control_loop " + shlex.join(sys.argv[1:] if argv is None else argv)
    from loadtests.benchmark import cpu_split

    server_cores, client_cores = cpu_split()
    logs = ROOT / "benchmarks"
    with (contextlib.nullcontext(args.url) if args.url else policy_service(server_cores, logs, args.models_dir)) as url:
        if not args.url:
            os.sched_setaffinity(0, client_cores)
        results = {env_id: measure(url, env_id, args.steps) for env_id in args.env}
    text = table(results)
    print(text)
    where = "a running service at " + args.url if args.url else (
        f"the policy service started here on core(s) {sorted(server_cores)} (1 worker, 1 onnxruntime thread), "
        f"the client on {sorted(client_cores)}")
    args.out.write_text(f"# Robots' control loop over HTTP\n\n`{command}` on {machine()}; {where}.\n"
                        f"Per-step latency is the request alone, measured by the client.\n\n{text}\n")
    args.json.write_text(json.dumps({"command": command, "machine": machine(), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
