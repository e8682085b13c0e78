"""Soak: the mixed Locust scenario for minutes against freshly started services, with every
worker's memory (RSS) at the start and at the end.

    python -m loadtests.soak                          # 10 minutes, 16 users
    python -m loadtests.soak --minutes 2 --users 8 --out reports/soak

Starts the three services (real `bentoml serve`, a private taught-examples store), warms them
up with a short run, records each worker's RSS, runs `python -m loadtests.run mixed` for the
duration, records RSS again and prints both. It fails (exit 1) when any request failed or a
worker grew by more than the bound: --max-growth-mb (default 64 MB) plus --max-growth-ratio
(default 10%) of its size after warm-up. Python's and glibc's allocators keep freed memory in
pools, so a worker settles some megabytes above its warm-up size; a leak keeps growing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from services.contracts import processes

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("policy", "generator", "classifier")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def workers(process) -> dict[int, float]:
    """RSS of every process of one server (the server itself and its workers), in MB."""
    sizes = {}
    for pid in [process.pid, *processes.descendants(process.pid)]:
        try:
            sizes[pid] = rss_mb(pid)
        except OSError:
            pass
    return sizes


def locust(urls: dict[str, str], users: int, duration: str, out: Path) -> int:
    command = [sys.executable, "-m", "loadtests.run", "mixed", "--users", str(users), "--spawn-rate", str(users),
               "--duration", duration, "--out", str(out)]
    command += [arg for name, url in urls.items() for arg in (f"--{name}-url", url)]
    return subprocess.run(command, cwd=ROOT).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--warmup", default="20s", help="Locust run before the first RSS reading")
    p.add_argument("--max-growth-mb", type=float, default=64)
    p.add_argument("--max-growth-ratio", type=float, default=0.10)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "soak")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        env = {"MODELS_DIR": str(ROOT / "models"), "TEACH_STORE": f"sqlite:///{folder}/taught.db",
               "TEACH_STATE_PATH": f"{folder}/none.json"}
        servers, logs = {}, []
        try:
            specs = {spec.name: spec for spec in processes.SERVICES}
            for name in NAMES:
                port = processes.free_port()  # beside a running `make serve`, not on it
                log = open(args.out / f"{name}.log", "w")
                logs.append(log)
                servers[name] = (f"http://127.0.0.1:{port}", processes.start(specs[name], port, env=env, log_file=log))
            for name, (url, process) in servers.items():
                if not processes.wait_ready(url, process, 180):
                    print(f"{name} did not become ready: see {args.out / (name + '.log')}", file=sys.stderr)
                    return 1
            urls = {name: url for name, (url, _) in servers.items()}
            print(f"warming up for {args.warmup} ...", flush=True)
            locust(urls, args.users, args.warmup, args.out / "warmup")
            before = {name: workers(process) for name, (_, process) in servers.items()}
            print(f"soaking for {args.minutes:g} minutes with {args.users} users ...", flush=True)
            status = locust(urls, args.users, f"{int(args.minutes * 60)}s", args.out)
            after = {name: workers(process) for name, (_, process) in servers.items()}
        finally:
            for _, process in servers.values():
                processes.stop(process)
            for log in logs:
                log.close()

    print(f"\n{'service':<11} {'pid':>7} {'RSS start MB':>13} {'RSS end MB':>11} {'growth MB':>10} {'bound MB':>9}")
    grown = []
    for name in NAMES:
        for pid, start in before[name].items():
            end = after[name].get(pid)
            if end is None:
                grown.append(f"{name} process {pid} is gone")
                continue
            bound = args.max_growth_mb + args.max_growth_ratio * start
            print(f"{name:<11} {pid:>7} {start:>13.1f} {end:>11.1f} {end - start:>10.1f} {bound:>9.1f}")
            if end - start > bound:
                grown.append(f"{name} process {pid} grew {end - start:.1f} MB (bound {bound:.1f} MB)")
    if status != 0:
        print("FAILED: the Locust run had failures or missed its SLO gate (see above)", file=sys.stderr)
    for line in grown:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if status != 0 or grown else 0


if __name__ == "__main__":
    sys.exit(main())
