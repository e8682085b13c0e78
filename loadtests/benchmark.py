"""Benchmark each service against the raw runtime and the framework's floor, side by side, in one run:

  (a) raw onnxruntime throughput of the same model file in-process, batch sizes 1 to 64
      (for images: decoding or PNG encoding included, as the service does it);
  (b) the framework floor: requests/s of the service and of a bare BentoML service with the
      same endpoint that answers a fixed answer of the same size (services/floor.py), plain
      and with the project's fixes to BentoML, driven by wrk at 1 and 64 connections in
      alternating slices (loadtests/wrk.py); for the policy also JSON against .npy bodies
      at 1 and 64 observations per request;
  (c) served throughput and p50/p95/p99 latency at 1, 8, 32 and 64 concurrent clients
      (this process's aiohttp client), adaptive batching on;
  (d) the same with batching off.

    python -m loadtests.benchmark                          # every service with a workload and models
    python -m loadtests.benchmark --services policy --duration 5
    python -m loadtests.benchmark --device cuda --out BENCHMARKS-gpu.md   # on a machine with a GPU
    python -m loadtests.benchmark --services classifier --compare-workers 1 2 --server-cores all

Cores: the servers (real `bentoml serve`s, one onnxruntime thread) are pinned to the first
half of the cores, the load generators (wrk, and this process with asyncio + aiohttp) to the
other half, and the raw figure is measured on the server's cores with the same thread count.
So the load generator never takes the server's CPU, and raw and served use the same compute.
Prints a table and writes BENCHMARKS.md with PNG plots beside it (benchmarks/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from loadtests.benchmark_report import CONCURRENCY, FloorRun, FormRun, ServedRun, plot, report
from loadtests.workloads import WORKLOADS, Workload
from loadtests.wrk import Tally, Wrk
from services.contracts import processes
from services.contracts.versions import machine

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
WRK_CONNECTIONS = [1, 64]
FLOORS = {"floor": {}, "floor_fixed": {"FLOOR_FIXES": "on"}}  # bare BentoML; with our fixes to it


def cpu_split() -> tuple[set[int], set[int]]:
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    return set(cores[:half]), set(cores[half:]) or set(cores[:half])


def raw_throughput(workload: Workload, server_cores: set[int], seconds: float, device: str = "cpu",
                   method: str = "raw") -> dict[int, float]:
    """Items per second in-process at each batch size, on the server's cores, one onnxruntime thread
    (method: the workload's raw, or raw_model, the model alone, where it has one)."""
    code = (
        "import json, sys, os; from loadtests.workloads import WORKLOADS; "
        f"os.sched_setaffinity(0, {sorted(server_cores)}); "
        f"print(json.dumps(WORKLOADS[{workload.name!r}].{method}({BATCH_SIZES}, {seconds})))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "BENCHMARK_DEVICE": device})
    if result.returncode != 0:
        raise SystemExit(f"raw benchmark of {workload.name} failed:\n{result.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


async def drive(url: str, workload: Workload, concurrency: int, seconds: float, run: ServedRun) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm the connections and the service's batch paths before measuring.
        await asyncio.gather(*(workload.call(session, url, i) for i in range(concurrency)))
        deadline = time.perf_counter() + seconds

        async def client(index: int):
            i = index
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                ok, items = await workload.call(session, url, i)
                run.latencies_ms.append((time.perf_counter() - started) * 1000)
                run.requests += 1
                run.items += items if ok else 0
                run.failures += 0 if ok else 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        run.seconds = time.perf_counter() - started


@contextlib.contextmanager
def serving(target: str, name: str, server_cores: set[int], env: dict, logs: Path, label: str, cwd: Path = ROOT):
    """A `bentoml serve` of target pinned to the server's cores; yields its URL (and keeps the
    process in serving.process, for the flame graphs). `cwd`: the checkout whose code it serves."""
    port = processes.free_port()
    log = open(logs / f"server-{label}.log", "w")
    process = subprocess.Popen(["taskset", "-c", ",".join(map(str, sorted(server_cores))), sys.executable, "-m",
                                "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                               cwd=cwd, env={**os.environ, **env, **processes.own_home(name, port, os.environ)},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not processes.wait_ready(url, process, 180):
            raise SystemExit(f"{target} did not become ready; see {log.name}")
        serving.process = process
        yield url
    finally:
        processes.stop(process)
        log.close()


def server_env(workload: Workload, batching: bool, workers: int, device: str) -> dict:
    return {"MODELS_DIR": str(ROOT / "models"), "INFER_THREADS": "1", "ADAPTIVE_BATCHING": "on" if batching else "off",
            "WORKERS": str(workers), "INFER_DEVICE": device, **workload.server_env}


def latency_runs(url: str, workload: Workload, batching: bool, seconds: float, workers: int) -> list[ServedRun]:
    runs = []
    for concurrency in CONCURRENCY:
        run = ServedRun(concurrency, batching)
        asyncio.run(drive(url, workload, concurrency, seconds, run))
        print(f"  {workload.name:<10} batching {'on ' if batching else 'off'} workers {workers} {concurrency:>3} clients: "
              f"{run.items_per_s:8.1f} {workload.unit}/s  {run.requests_per_s:8.1f} req/s  "
              f"p50 {run.percentile(50):7.1f} ms  p95 {run.percentile(95):7.1f} ms  "
              f"p99 {run.percentile(99):7.1f} ms  failures {run.failures}", flush=True)
        runs.append(run)
    return runs


def served(workload: Workload, server_cores: set[int], batching: bool, seconds: float, logs: Path,
           workers: int = 1, device: str = "cpu") -> list[ServedRun]:
    spec = next(s for s in processes.SERVICES if s.name == (workload.service or workload.name))
    label = f"{workload.name}-{'on' if batching else 'off'}-w{workers}"
    with serving(spec.target, workload.name, server_cores, server_env(workload, batching, workers, device),
                 logs, label) as url:
        return latency_runs(url, workload, batching, seconds, workers)


def against_floor(workload: Workload, server_cores: set[int], client_cores: set[int], slice_seconds: float,
                  slices: int, logs: Path, device: str) -> tuple[list[FloorRun], list[FormRun]]:
    """(b): our service and the two floors, up together on the server's cores, driven in turn by
    wrk in slices of slice_seconds, so that drift on the machine hits all three alike."""
    spec = next(s for s in processes.SERVICES if s.name == (workload.service or workload.name))
    env = server_env(workload, True, 1, device)
    requests = workload.wrk_requests()
    with contextlib.ExitStack() as stack:
        urls = {"served": stack.enter_context(serving(spec.target, workload.name, server_cores, env, logs,
                                                      f"{workload.name}-served"))}
        answer = logs / f"floor-answer-{workload.name}.json"
        answer.write_bytes(fetch(urls["served"], requests[0]))  # the floor answers this, byte for byte
        for floor, extra in FLOORS.items():
            urls[floor] = stack.enter_context(serving(workload.floor, f"{workload.name}-{floor}", server_cores,
                                                      {**env, **extra, "FLOOR_ANSWER": str(answer)}, logs,
                                                      f"{workload.name}-{floor}"))
        wrk = stack.enter_context(contextlib.closing(Wrk(requests, client_cores)))
        floor_runs = []
        for connections in WRK_CONNECTIONS:
            tallies = {name: Tally() for name in urls}
            for _ in range(slices):
                for name, url in urls.items():
                    wrk.run(url, connections, slice_seconds, tallies[name])
            floor_runs.append(FloorRun(connections, tallies))
            print(f"  {workload.name:<10} wrk {connections:>2} connections: " + "  ".join(
                f"{name} {t.per_second:8.1f} req/s ({t.failures} failed)" for name, t in tallies.items())
                + f"  served/floor {floor_runs[-1].ratio():.2f}", flush=True)
        form_runs = []
        if hasattr(workload, "batch_requests"):  # JSON against .npy (the policy's bodies, the generator's answers)
            for batch in workload.form_batches:
                wrks = {form: stack.enter_context(contextlib.closing(Wrk(workload.batch_requests(batch, form),
                                                                          client_cores))) for form in ("json", "npy")}
                for connections in WRK_CONNECTIONS:
                    tallies = {form: Tally() for form in wrks}
                    for _ in range(slices):
                        for form, form_wrk in wrks.items():
                            form_wrk.run(urls["served"], connections, slice_seconds, tallies[form])
                    form_runs.append(FormRun(connections, batch, tallies))
                    print(f"  {workload.name:<10} {batch:>2} per request, {connections:>2} connections: " +
                          "  ".join(f"{form} {t.per_second * batch:9.1f} {workload.unit}/s ({t.failures} failed)"
                                    for form, t in tallies.items()), flush=True)
        return floor_runs, form_runs


def fetch(url: str, request) -> bytes:
    import urllib.request

    sent = urllib.request.Request(f"{url}{request.path}", data=request.body, method="POST",
                                  headers={"Content-Type": request.content_type})
    with urllib.request.urlopen(sent, timeout=60) as response:
        return response.read()


def compare_workers(names: list[str], counts: list[int], server_cores: set[int], seconds: float, logs: Path,
                    command: str) -> str:
    """Requests/s of each service with WORKERS=N for each N, in one run, as a Markdown table."""
    lines = [f"`{command}` on {machine()}, server on cores {sorted(server_cores)}:", "",
             "| service | clients | " + " | ".join(f"WORKERS={n} req/s" for n in counts) +
             f" | ratio {counts[-1]}/{counts[0]} |", "|---|---:|" + "---:|" * (len(counts) + 1)]
    for name in names:
        by_count = {n: served(WORKLOADS[name], server_cores, True, seconds, logs, workers=n) for n in counts}
        for i, concurrency in enumerate(CONCURRENCY):
            rates = [by_count[n][i].requests_per_s for n in counts]
            lines.append(f"| {name} | {concurrency} | " + " | ".join(f"{r:,.1f}" for r in rates) +
                         f" | {rates[-1] / rates[0]:.2f}x |")
    return "\n".join(lines)


def compare_settings(names: list[str], settings: list[str], server_cores: set[int], client_cores: set[int],
                     slice_seconds: float, slices: int, logs: Path, command: str) -> str:
    """Requests/s of each service under each setting (NAME=value[,NAME=value]), servers up together
    and driven by wrk in alternating slices: what a setting costs, in one run."""
    lines = [f"`{command}` on {machine()}, servers on cores {sorted(server_cores)}, wrk on "
             f"{sorted(client_cores)}, {slices} slices of {slice_seconds:g} s per server:", "",
             "| service | connections | " + " | ".join(f"{s} req/s" for s in settings) + " |",
             "|---|---:|" + "---:|" * len(settings)]
    for name in names:
        workload = WORKLOADS[name]
        spec = next(s for s in processes.SERVICES if s.name == (workload.service or workload.name))
        with contextlib.ExitStack() as stack:
            urls = {}
            for k, setting in enumerate(settings):
                env = {**server_env(workload, True, 1, "cpu"),
                       **dict(item.split("=", 1) for item in setting.split(",") if item)}
                # CHECKOUT=<dir>: serve that checkout's code (another commit), the same models
                checkout = Path(env.pop("CHECKOUT", ROOT)).resolve()
                env["PYTHONPATH"] = str(checkout)
                urls[setting] = stack.enter_context(serving(spec.target, f"{name}-setting{k}", server_cores, env, logs,
                                                            f"{name}-setting{k}", cwd=checkout))
            wrk = stack.enter_context(contextlib.closing(Wrk(workload.wrk_requests(), client_cores)))
            for connections in WRK_CONNECTIONS:
                tallies = {setting: Tally() for setting in settings}
                for _ in range(slices):
                    for setting, url in urls.items():
                        wrk.run(url, connections, slice_seconds, tallies[setting])
                base = tallies[settings[0]].per_second
                lines.append(f"| {name} | {connections} | " + " | ".join(
                    f"{t.per_second:,.0f} ({t.per_second / base:.2f})" for t in tallies.values()) + " |")
                print(lines[-1], flush=True)
    lines += ["", f"In brackets: relative to {settings[0]}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--services", nargs="*", default=None, help=f"default: all of {sorted(WORKLOADS)} with models")
    p.add_argument("--duration", type=float, default=8, help="seconds per served measurement")
    p.add_argument("--raw-seconds", type=float, default=2, help="seconds per raw batch size")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--compare-workers", nargs="+", type=int, metavar="N",
                   help="instead of the full run: served throughput (batching on) with WORKERS=N for each N, "
                        "side by side; writes benchmarks/workers.md beside --out")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="the servers' INFER_DEVICE and the raw runs' execution provider (cuda needs a GPU)")
    p.add_argument("--slices", type=int, default=3, help="wrk slices per server and connection count")
    p.add_argument("--slice-seconds", type=float, default=2, help="seconds per wrk slice")
    p.add_argument("--compare-settings", nargs="+", metavar="NAME=VALUE[,NAME=VALUE]",
                   help="instead of the full run: requests/s under each setting, side by side (wrk); "
                        "e.g. ACCESS_LOG=all ACCESS_LOG=sampled ACCESS_LOG=off; CHECKOUT=<dir> serves another "
                        "checkout's code (before/after a change: CHECKOUT=/tmp/old CHECKOUT=.); writes "
                        "benchmarks/settings.md (settings-<services>.md with --services)")
    p.add_argument("--server-cores", choices=["half", "all"], default="half",
                   help="half: server and load generator on separate cores (default); all: the server may use "
                        "every core (the load generator shares them), for --compare-workers")
    args = p.parse_args(argv)
    command = "python -m loadtests.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)
    names = args.services or [n for n, w in WORKLOADS.items()
                              if (ROOT / "models" / (w.service or n) / w.model).is_dir()]
    server_cores, client_cores = cpu_split()
    if args.server_cores == "all":
        server_cores = client_cores = set(os.sched_getaffinity(0))
    os.sched_setaffinity(0, client_cores)
    plots = args.out.parent / "benchmarks"  # beside the report, which links them relatively
    plots.mkdir(exist_ok=True)
    if args.compare_workers:
        text = compare_workers(names, args.compare_workers, server_cores, args.duration, plots, command)
        print(text)
        (plots / "workers.md").write_text(f"# Requests/s by WORKERS\n\n{text}\n")
        print(f"\nwrote {plots / 'workers.md'}")
        return 0
    if args.compare_settings:
        text = compare_settings(names, args.compare_settings, server_cores, client_cores, args.slice_seconds,
                                args.slices, plots, command)
        out = plots / ("settings-" + "-".join(names) + ".md" if args.services else "settings.md")
        out.write_text(f"# Requests/s by setting\n\n{text}\n")
        print(f"\nwrote {out}")
        return 0
    results = {}
    for name in names:
        workload = WORKLOADS[name]
        print(f"{name}: raw in-process on cores {sorted(server_cores)} ...", flush=True)
        raw = raw_throughput(workload, server_cores, args.raw_seconds, args.device)
        print("  " + ", ".join(f"batch {b}: {v:,.0f} {workload.unit}/s" for b, v in raw.items()), flush=True)
        raw_model = (raw_throughput(workload, server_cores, args.raw_seconds, args.device, "raw_model")
                     if hasattr(workload, "raw_model") else None)
        floor_runs, form_runs = against_floor(workload, server_cores, client_cores, args.slice_seconds, args.slices,
                                              plots, args.device)
        runs = (served(workload, server_cores, True, args.duration, plots, device=args.device)
                + served(workload, server_cores, False, args.duration, plots, device=args.device))
        plot(name, workload, raw, runs, plots)
        results[name] = (workload, raw, runs, floor_runs, form_runs, raw_model)
    (plots / "results.json").write_text(json.dumps(
        {name: {"raw": raw, "served": [{**vars(r), "latencies_ms": None, "p50": r.percentile(50),
                                        "p95": r.percentile(95), "p99": r.percentile(99)} for r in runs],
                "floor": [{"connections": f.connections, **{k: vars(t) for k, t in f.tallies.items()}}
                          for f in floor_runs],
                "forms": [{"connections": f.connections, "batch": f.batch, **{k: vars(t) for k, t in f.tallies.items()}}
                          for f in form_runs], "raw_model": raw_model}
         for name, (_, raw, runs, floor_runs, form_runs, raw_model) in results.items()}, indent=1))
    text = report(results, command, server_cores, client_cores, args.out, args.device)
    args.out.write_text(text)
    print(f"\nwrote {args.out}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
