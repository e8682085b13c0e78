"""The benchmark's results and report: what one run measured (the runs below) and BENCHMARKS.md's
tables, targets and plots made from it (loadtests/benchmark.py measures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtests.workloads import Workload
from loadtests.wrk import Tally
from services.contracts.versions import machine

CONCURRENCY = [1, 8, 32, 64]  # the served latency runs' client counts


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
             "(`services/runtime/patches/pauses.py`, `hot_path.py`), so it isolates the cost of our own code. "
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
              "- [benchmarks/restructuring-policy.md](benchmarks/restructuring-policy.md): the policy's /act "
              "requests/s before and after the ground-floor restructuring, served side by side "
              "(`--compare-settings CHECKOUT=<old checkout> CHECKOUT=.`).",
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
