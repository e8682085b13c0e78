"""Run a Locust scenario headless against the services, write its reports, apply the SLO gate.

    python -m loadtests.run policy --users 32 --spawn-rate 8 --duration 30s
    python -m loadtests.run mixed --slo loadtests/slo.json --out reports/
    python -m loadtests.run policy --policy-url http://127.0.0.1:3001   # local launcher or compose

Scenarios are the Locust files in this folder (policy, and generator/classifier/faces/mixed
where present). Each user class reads its service's base URL from POLICY_URL, GENERATOR_URL or
CLASSIFIER_URL (defaults: the launcher's and compose's ports on 127.0.0.1).

The gate (loadtests/slo.json, or --slo): the failure ratio over all requests, and the p95
latency per endpoint (Locust's request names, matched by prefix). Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
URL_VARIABLES = {"policy": "POLICY_URL", "generator": "GENERATOR_URL", "classifier": "CLASSIFIER_URL"}
DEFAULT_URLS = {"policy": "http://127.0.0.1:3001", "generator": "http://127.0.0.1:3002",
                "classifier": "http://127.0.0.1:3003"}


def scenarios() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py")
                  if p.stem in {"policy", "generator", "classifier", "faces", "mixed"})


def service_url(name: str) -> str:
    return os.environ.get(URL_VARIABLES[name], DEFAULT_URLS[name]).rstrip("/")


def gate(stats_csv: Path, slo: dict) -> list[str]:
    """The SLO misses (empty when the run passes)."""
    rows = list(csv.DictReader(open(stats_csv)))
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    if total is None or int(total["Request Count"]) == 0:
        return ["no requests were made"]
    misses = []
    ratio = int(total["Failure Count"]) / int(total["Request Count"])
    if ratio > slo["max_failure_ratio"]:
        misses.append(f"failure ratio {ratio:.4f} > {slo['max_failure_ratio']}")
    for row in rows:
        if row["Name"] == "Aggregated" or row["95%"] in ("", "N/A"):
            continue
        limit = next((ms for prefix, ms in slo["p95_ms"].items() if row["Name"].startswith(prefix)), None)
        if limit is not None and float(row["95%"]) > limit:
            misses.append(f"{row['Type']} {row['Name']}: p95 {float(row['95%']):.0f} ms > {limit} ms")
    return misses


def print_summary(stats_csv: Path) -> None:
    print(f"{'endpoint':<34} {'requests':>9} {'failures':>9} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}")
    for row in csv.DictReader(open(stats_csv)):
        print(f"{(row['Type'] + ' ' + row['Name']).strip():<34} {row['Request Count']:>9} {row['Failure Count']:>9} "
              f"{float(row['Requests/s']):>8.1f} {row['50%']:>7} {row['95%']:>7} {row['99%']:>7}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=scenarios())
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--spawn-rate", type=float, default=8)
    p.add_argument("--duration", default="30s", help="Locust run time, e.g. 30s, 2m")
    p.add_argument("--tags", nargs="*", help="only tasks with these tags")
    p.add_argument("--out", type=Path, default=ROOT / "reports", help="folder for the CSV and HTML reports")
    p.add_argument("--slo", type=Path, default=HERE / "slo.json")
    for name, variable in URL_VARIABLES.items():
        p.add_argument(f"--{name}-url", default=service_url(name), help=f"default ${variable} or {DEFAULT_URLS[name]}")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / args.scenario
    env = {**os.environ, **{URL_VARIABLES[n]: getattr(args, f"{n}_url") for n in URL_VARIABLES}}
    command = [sys.executable, "-m", "locust", "-f", str(HERE / f"{args.scenario}.py"), "--headless",
               "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.duration,
               "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary", "--loglevel", "WARNING",
               "--exit-code-on-error", "0"]  # the gate below decides
    if args.tags:
        command += ["--tags", *args.tags]
    print(f"running {args.scenario}: {args.users} users, spawn rate {args.spawn_rate}/s, {args.duration}", flush=True)
    result = subprocess.run(command, cwd=ROOT, env=env)
    stats = Path(f"{prefix}_stats.csv")
    if result.returncode != 0 or not stats.exists():
        print(f"locust failed with exit status {result.returncode}", file=sys.stderr)
        return result.returncode or 1
    print_summary(stats)
    slo = json.loads(args.slo.read_text())
    misses = gate(stats, slo)
    print(f"reports: {stats}, {prefix}.html")
    if misses:
        print("SLO MISSED:\n  " + "\n  ".join(misses), file=sys.stderr)
        return 1
    print(f"SLO met (failure ratio <= {slo['max_failure_ratio']}, p95 per endpoint within {args.slo.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
