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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from loadtests.workloads import WORKLOADS, Workload
from loadtests.wrk import Tally, Wrk
from services.contracts import processes
from services.contracts.versions import machine

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = [1, 8, 32, 64]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64]
WRK_CONNECTIONS = [1, 64]
FLOORS = {"floor": {}, "floor_fixed": {"FLOOR_FIXES": "on"}}  # bare BentoML; with our fixes to it


@dataclass
class FloorRun:
    """Requests/s at one connection count: ours and the floors', from the same alternating slices."""
    connections: int
    tallies: dict[str, Tally]

    def ratio(self, floor: str = "floor") -> float:
        return self.tallies["served"].per_second / self.tallies[floor].per_second


@dataclass
class FormRun:
    """The policy's /act at one batch size and connection count, JSON against .npy."""
    connections: int
    batch: int
    tallies: dict[str, Tally]


@dataclass
class ServedRun:
    concurrency: int
    batching: bool
    requests: int = 0
    items: int = 0
    failures: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


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
def serving(target: str, name: str, server_cores: set[int], env: dict, logs: Path, label: str):
    """A `bentoml serve` of target pinned to the server's cores; yields its URL (and keeps the
    process in serving.process, for the flame graphs)."""
    port = processes.free_port()
    log = open(logs / f"server-{label}.log", "w")
    process = subprocess.Popen(["taskset", "-c", ",".join(map(str, sorted(server_cores))), sys.executable, "-m",
                                "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env={**os.environ, **env, **processes.own_home(name, port, os.environ)},
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


def plot(name: str, workload: Workload, raw: dict[int, float], runs: list[ServedRun], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for batching, style in ((True, "o-"), (False, "s--")):
        xs = [r.concurrency for r in runs if r.batching == batching]
        ys = [r.items_per_s for r in runs if r.batching == batching]
        ax.plot(xs, ys, style, label=f"served, batching {'on' if batching else 'off'}")
    ax.axhline(max(raw.values()), color="grey", linestyle=":", label="raw in-process (best batch)")
    ax.set(xscale="log", xticks=CONCURRENCY, xlabel="concurrent clients", ylabel=f"{workload.unit}/s",
           title=f"{name}: throughput")
    ax.set_xticklabels([str(c) for c in CONCURRENCY])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(f"{name}_throughput.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for batching, style in ((True, "-"), (False, "--")):
        sel = [r for r in runs if r.batching == batching]
        for q, marker in ((50, "o"), (95, "^"), (99, "v")):
            ax.plot([r.concurrency for r in sel], [r.percentile(q) for r in sel], style, marker=marker,
                    label=f"p{q}, batching {'on' if batching else 'off'}")
    ax.set(xscale="log", yscale="log", xticks=CONCURRENCY, xlabel="concurrent clients", ylabel="latency (ms)",
           title=f"{name}: latency percentiles")
    ax.set_xticklabels([str(c) for c in CONCURRENCY])
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(f"{name}_latency.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)
    return files


def report(results: dict, command: str, server_cores: set[int], client_cores: set[int], out: Path,
           device: str = "cpu") -> str:
    lines = ["# Benchmarks", "",
             f"Command: `{command}`  ", f"Machine: {machine()}  ",
             f"Device: {device} (INFER_DEVICE={device} for the servers, the same provider for the raw runs)  ",
             f"Cores: servers (bentoml serve, INFER_THREADS=1) on {sorted(server_cores)}, load generators on "
             f"{sorted(client_cores)}; the raw figure runs on the server's cores with one onnxruntime thread.", "",
             "## Summary", "",
             "served / floor: our service's requests/s over a bare BentoML service's with the same endpoint and a "
             "fixed answer of the same size (`services/floor.py`), both driven by wrk in alternating slices; "
             "\"floor + fixes\" is that bare service with the fixes to BentoML our services run with "
             "(`services/runtime/pauses.py`, `hot_path.py`), so it isolates the cost of our own code. "
             "p99 / p50: latency at 64 clients, batching on, from the benchmark's own client.", "",
             "| service | served / floor, 1 conn | served / floor, 64 conn | served / (floor + fixes), 1 | "
             "served / (floor + fixes), 64 | p99 / p50 at 64 clients | served / raw at saturation |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (workload, raw, runs, floor_runs, _, _) in results.items():
        by = {f.connections: f for f in floor_runs}
        on64 = next(r for r in runs if r.batching and r.concurrency == 64)
        best = max(r.items_per_s for r in runs if r.batching)
        lines.append(f"| {name} | {by[1].ratio():.2f} | {by[64].ratio():.2f} | {by[1].ratio('floor_fixed'):.2f} | "
                     f"{by[64].ratio('floor_fixed'):.2f} | {on64.percentile(99) / on64.percentile(50):.2f} | "
                     f"{best / max(raw.values()):.0%} |")
    lines += [""] + summary_targets(results) + [""]
    for name, (workload, raw, runs, floor_runs, form_runs, raw_model) in results.items():
        best_raw = max(raw.values())
        on = {r.concurrency: r for r in runs if r.batching}
        off = {r.concurrency: r for r in runs if not r.batching}
        lines += [f"## {name}", "", workload.description, "",
                  f"(a) raw in-process, {workload.unit}/s by batch size: " +
                  ", ".join(f"{b}: {v:,.0f}" for b, v in raw.items()), "",
                  f"(b) against the framework's floor (wrk, {floor_runs[0].tallies['served'].seconds:.0f} s per "
                  "server and connection count, in alternating slices):", "",
                  "| connections | served req/s | floor req/s | floor + fixes req/s | served / floor | "
                  "served / (floor + fixes) | failed |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for f in floor_runs:
            t = f.tallies
            lines.append(f"| {f.connections} | {t['served'].per_second:,.0f} | {t['floor'].per_second:,.0f} | "
                         f"{t['floor_fixed'].per_second:,.0f} | **{f.ratio():.2f}** | {f.ratio('floor_fixed'):.2f} | "
                         f"{sum(x.failures for x in t.values())} |")
        if form_runs:
            model_only = raw_model is not None
            lines += ["", f"JSON against .npy ({workload.forms}), {workload.unit}/s" +
                      (f"; raw generation: the model and uint8 conversion in-process, no encoding, "
                       f"{workload.unit}/s by batch size: " + ", ".join(f"{b}: {v:,.0f}" for b, v in raw_model.items())
                       if model_only else "") + ":", "",
                      f"| {workload.unit} per request | connections | JSON | .npy | .npy / JSON |" +
                      (" JSON / raw generation | .npy / raw generation |" if model_only else ""),
                      "|---:|---:|---:|---:|---:|" + ("---:|---:|" if model_only else "")]
            for f in form_runs:
                json_rate, npy_rate = (f.tallies[k].per_second * f.batch for k in ("json", "npy"))
                line = (f"| {f.batch} | {f.connections} | {json_rate:,.0f} | {npy_rate:,.0f} | "
                        f"{npy_rate / json_rate:.2f} |")
                if model_only:
                    ceiling = raw_model[min(raw_model, key=lambda b: abs(b - f.batch))]
                    line += f" {json_rate / ceiling:.0%} | **{npy_rate / ceiling:.0%}** |"
                lines.append(line)
        lines += ["", "(c), (d) latency from the benchmark's client, batching on and off:", "",
                  f"| clients | batching | {workload.unit}/s | req/s | p50 ms | p95 ms | p99 ms | p99 / p50 | "
                  "failures |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            lines.append(f"| {r.concurrency} | {'on' if r.batching else 'off'} | {r.items_per_s:,.1f} | "
                         f"{r.requests_per_s:,.1f} | {r.percentile(50):.1f} | {r.percentile(95):.1f} | "
                         f"{r.percentile(99):.1f} | {r.percentile(99) / r.percentile(50):.2f} | {r.failures} |")
        saturation_on = max(r.items_per_s for r in on.values())
        lines += ["", f"- served at saturation (batching on): {saturation_on:,.1f} {workload.unit}/s = "
                      f"**{saturation_on / best_raw:.0%} of raw** ({best_raw:,.0f})",
                  f"- batching on / off at 64 clients: **{on[64].requests_per_s / off[64].requests_per_s:.2f}x** "
                  f"requests/s ({on[64].requests_per_s:,.1f} vs {off[64].requests_per_s:,.1f})", ""]
        lines += target_lines(name, workload, raw, on, off)
        lines += [f"![{name} throughput](benchmarks/{name}_throughput.png) "
                  f"![{name} latency](benchmarks/{name}_latency.png)", ""]
    if device == "cpu":
        lines += ["## GPU", "",
                  "Not measured: this machine has no GPU (nor has CI). On a machine with one, the same tables with "
                  "the CUDA execution provider: `make benchmark BENCHMARK_ARGS=\"--device cuda --out "
                  "BENCHMARKS-gpu.md\"`. onnxruntime I/O binding is not used: it has not been measured.", ""]
    lines += ["## Elsewhere", "",
              "- [benchmarks/store.md](benchmarks/store.md): the classifier's taught-examples store, check and teach "
              "times at 1e3 to 1e5 examples per back-end (`python -m services.classifier.store_benchmark`).",
              "- [benchmarks/workers.md](benchmarks/workers.md): requests/s with WORKERS=1 and 2 "
              "(`python -m loadtests.benchmark --compare-workers 1 2`).",
              "- [benchmarks/faces.md](benchmarks/faces.md): the face pipeline per photo by size, each step and one "
              "served /check (`python -m loadtests.faces_benchmark`).",
              "- [benchmarks/tail.md](benchmarks/tail.md): the p99 tail, garbage-collection stalls, found and removed; "
              "p99 / p50 before and after.",
              "- [benchmarks/hot_path.md](benchmarks/hot_path.md): where a request's time went (py-spy flame graphs), "
              "what was removed, and the access log's cost.", ""]
    text = "\n".join(lines) + "\n"
    return text


def summary_targets(results: dict) -> list[str]:
    """The performance issue's targets, each met or not, from this run's figures."""
    lines = []
    if "policy" in results:
        by = {f.connections: f for f in results["policy"][3]}
        for connections, target in ((1, 0.95), (64, 1.0)):
            ratio = by[connections].ratio()
            lines.append(f"- target: policy `/act` served / floor >= {target:.2f} at {connections} connection"
                         f"{'s' if connections > 1 else ''}: **{'met' if ratio >= target else 'missed'}** "
                         f"({ratio:.2f}).")
    tails = {name: next(r for r in runs if r.batching and r.concurrency == 64)
             for name, (_, _, runs, _, _, _) in results.items()}
    worst = max(tails, key=lambda n: tails[n].percentile(99) / tails[n].percentile(50))
    ratio = tails[worst].percentile(99) / tails[worst].percentile(50)
    lines.append(f"- target: p99 <= 3 x p50 at 64 clients for every service: **{'met' if ratio <= 3 else 'missed'}** "
                 f"(highest: {worst}, {ratio:.2f}).")
    return lines


TARGETS = {"policy": "batching on at least 3x the requests/s of batching off, at 64 clients",
           "generator": "served images/s at least 70% of raw generation plus PNG encoding",
           "classifier": "served images/s at saturation at least 70% of raw, decoding included"}


def target_lines(name: str, workload: Workload, raw: dict, on: dict, off: dict) -> list[str]:
    """The issue's target for this service, met or not, and the measured cause of any gap.

    The server has one core, so its time per request at saturation is 1 / (requests/s);
    the model's own time per item is 1 / raw throughput. What batching or the HTTP layer can
    win or lose follows from those two numbers, both measured in this run."""
    if name not in TARGETS:
        return [f"- {workload.unit}/s at 1 client: {on[1].items_per_s:,.1f}; at 64 clients: "
                f"{on[64].items_per_s:,.1f} ({on[64].items_per_s / max(raw.values()):.0%} of raw).", ""]
    best = max(on.values(), key=lambda r: r.items_per_s)
    per_request_ms = 1000 / best.requests_per_s
    items = best.items / max(best.requests, 1)
    model_ms = 1000 * items / max(raw.values())
    if name == "policy":
        ratio = on[64].requests_per_s / off[64].requests_per_s
        met = ratio >= 3
        on_ms, off_ms = 1000 / on[64].requests_per_s, 1000 / off[64].requests_per_s
        model_batch1_ms = 1000 / raw[1]
        cause = (f"at 64 clients the server spends {off_ms:.2f} ms of CPU per request with batching off and "
                 f"{on_ms:.2f} ms with it on. Batching saves {off_ms - on_ms:.2f} ms per request: the per-request "
                 f"hop to the inference thread and onnxruntime's call overhead (the model's own arithmetic is "
                 f"{model_batch1_ms:.3f} ms per observation). The {on_ms:.2f} ms left is HTTP, JSON and Python "
                 f"request handling in BentoML, paid by every request whatever the batching; 3x would need the "
                 f"unbatched path to cost {3 * on_ms:.2f} ms.")
        closing = ("send many observations per request (the vectorised-environment pattern, which /act "
                   "supports), or a leaner HTTP front end")
        figure = f"{ratio:.2f}x"
    else:
        ratio = best.items_per_s / max(raw.values())
        met = ratio >= 0.7
        overhead_ms = per_request_ms - model_ms
        cause = (f"per request of {items:.0f} images the server spends {per_request_ms:.1f} ms, of which the same "
                 f"work in-process takes {model_ms:.1f} ms; the remaining {overhead_ms:.1f} ms "
                 f"({overhead_ms / per_request_ms:.0%}) is HTTP, {'multipart parsing' if name == 'classifier' else 'base64 and JSON'} "
                 f"and request handling on the same core.")
        closing = "more images per request, or a core of its own for the HTTP work (more than this machine's two)"
        figure = f"{ratio:.0%} of raw"
    return [f"- target: {TARGETS[name]}: **{'met' if met else 'missed'}** ({figure}).",
            f"- measured cause: {cause} What would close it: {closing}." if not met else f"- where the time goes: {cause}",
            ""]


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
                urls[setting] = stack.enter_context(serving(spec.target, f"{name}-setting{k}", server_cores, env, logs,
                                                            f"{name}-setting{k}"))
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
                        "e.g. ACCESS_LOG=all ACCESS_LOG=sampled ACCESS_LOG=off; writes benchmarks/settings.md "
                        "(settings-<services>.md with --services)")
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
