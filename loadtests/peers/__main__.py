"""Our services against the servers a user would pick instead, on the same ONNX files, in one run.

    make peers                                    # builds .venv-peers, then every peer and endpoint
    python -m loadtests.peers                     # the same, once .venv-peers exists
    python -m loadtests.peers --peers triton ray --endpoints act

For each endpoint (/act: one CartPole observation per request; /classify: the benchmark's body
of 8 Fashion-MNIST files) our service (a real `bentoml serve` at its defaults) stays up, and each
peer in turn (loadtests/peers/<peer>_peer.py: LitServe, Ray Serve, Mosec, Triton through
PyTriton, TorchServe, each doing loadtests/peers/work.py's work) is started beside it:

  1. check: every prepared request goes to ours and to the peer, and each answer must equal
     onnxruntime's answer in this process to the same inputs (actions, labels and flags exactly,
     numbers to 1e-4) before anything is timed; a peer that answers wrong is not timed;
  2. throughput: wrk (loadtests/wrk.py) on the client's cores, ours and the peer in alternating
     slices, at 1 and 64 connections; the server not being driven is stopped (SIGSTOP) meanwhile,
     so each slice has the server's cores to itself;
  3. latency: this process's client (aiohttp, on the client's cores), again alternating, at 1
     and 64 concurrent clients: p50 and p99. Its own cost is in both servers' figures alike.

Servers on the first half of the cores with one onnxruntime thread each, the load on the other
half. Writes benchmarks/peers.md, peers.json and peers.png (beside --out's folder).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loadtests.benchmark import cpu_split, server_env, serving
from loadtests.peers import wire
from loadtests.peers.work import ROOT
from loadtests.workloads import WORKLOADS
from loadtests.wrk import Tally, Wrk
from services.contracts import processes
from services.contracts.versions import machine, software_versions

CONNECTIONS = (1, 64)
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


@dataclass(frozen=True)
class Peer:
    name: str
    module: str                   # loadtests.peers.<module>: its server
    packages: tuple[str, ...]     # distributions whose versions the report names
    wire: str                     # how its clients call it: "ours", "torchserve" or "triton" (wire.py)
    config: str                   # what it is configured with, for the report
    ports: int = 1                # consecutive ports it listens on (HTTP first)


WAIT = "no extra wait for a batch to fill"
PEERS = {p.name: p for p in [
    Peer("litserve", "litserve_peer", ("litserve", "fastapi", "uvicorn"), "ours",
         f"one worker (`workers_per_device=1`), one API server, `max_batch_size=64`, `batch_timeout=0` ({WAIT}); "
         "uvicorn's access log at its default (info)"),
    Peer("ray", "ray_peer", ("ray",), "ours",
         f"Ray Serve, one replica (`num_cpus=1`), `@serve.batch(max_batch_size=64, batch_wait_timeout_s=0)` ({WAIT}), "
         "`max_ongoing_requests=64` (Ray's guide for batching; its default 5 caps a batch at 5); `ray.init(num_cpus=1)`, "
         "no dashboard; its HTTP proxy, controller and daemons pinned with it"),
    Peer("mosec", "mosec_peer", ("mosec",), "ours",
         "one worker, `max_batch_size=64`, `max_wait_time=1` ms (its smallest: 0 means its 10 ms default); "
         "its Rust HTTP server, logging at its default (info)"),
    Peer("triton", "triton_peer", ("nvidia-pytriton", "tritonclient"), "triton",
         "Triton Inference Server bundled by PyTriton, one model instance (PyTriton's Python backend), dynamic "
         "batching `max_batch_size=64`, `max_queue_delay_microseconds=0`; KServe v2 protocol over HTTP "
         "(JSON for /act, the binary tensor extension for the image files); logging at its default", ports=3),
    Peer("torchserve", "torchserve_peer", ("torchserve",), "torchserve",
         "one worker (`minWorkers=maxWorkers=1`), `batchSize=64`, `maxBatchDelay=1` ms (its smallest), token "
         "authorisation off, its default log4j logging; Java 17 frontend", ports=3),
]}


@dataclass(frozen=True)
class Endpoint:
    name: str
    service: str    # ours
    workload: str   # loadtests.workloads: our requests
    unit: str
    per_request: int
    description: str


ENDPOINTS = {e.name: e for e in [
    Endpoint("act", "policy", "policy", "observations", 1,
             "one CartPole observation per request (real rollout observations), the newest cartpole model"),
    Endpoint("classify", "classifier", "classifier", "images", 8,
             "8 real Fashion-MNIST test files per request (PNG and JPEG, 28 to 112 px), the newest fashion model "
             "(int8, version 2): decoding, preprocessing, the network, softmax, top 5 and the out-of-domain score"),
]}


def inputs(endpoint: Endpoint) -> list:
    """What each prepared request carries: an observation row, or a request's 8 files."""
    if endpoint.name == "act":
        return [[row] for row in WORKLOADS["policy"].observations[:256]]
    from loadtests.classifier_data import samples

    pool = samples()
    return [[(name, data) for name, data, _ in pool[i:i + endpoint.per_request]]
            for i in range(0, len(pool), endpoint.per_request)]


def expected_answers(endpoint: Endpoint, items: list) -> list[list[dict]]:
    """onnxruntime's answer in this process to every request's inputs (work.py: the same code)."""
    from loadtests.peers import work

    if endpoint.name == "act":
        policy = work.Policy()
        return [wire.canonical_rows("act", policy.act(np.asarray(rows, np.float32))) for rows in items]
    classifier = work.Classifier()
    return [wire.canonical_rows("classify", classifier.classify([data for _, data in files])) for files in items]


@dataclass
class Latency:
    """Latencies of one server at one concurrency, over the slices run so far."""
    ms: list[float] = field(default_factory=list)
    failures: int = 0
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.ms, q)) if self.ms else float("nan")


async def latency_slice(url: str, requests: list, concurrency: int, seconds: float, tally: Latency) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def send(i: int) -> bool:
            r = requests[i % len(requests)]
            async with session.post(f"{url}{r.path}", data=r.body,
                                    headers={"Content-Type": r.content_type, **r.headers}) as response:
                await response.read()
                return response.status == 200

        await asyncio.gather(*(send(i) for i in range(concurrency)))  # open the connections first
        deadline = time.perf_counter() + seconds

        async def client(i: int) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                ok = await send(i)
                tally.ms.append((time.perf_counter() - started) * 1000)
                tally.failures += 0 if ok else 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        tally.seconds += time.perf_counter() - started


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    while True:
        first = processes.free_port()
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def post(url: str, request, timeout: float = 30) -> tuple[int, bytes]:
    sent = urllib.request.Request(f"{url}{request.path}", data=request.body, method="POST",
                                  headers={"Content-Type": request.content_type, **request.headers})
    try:
        with urllib.request.urlopen(sent, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def peer_env(python: Path) -> dict:
    """PyTriton's Python backend stub links the system's libpython; a Python built elsewhere (pyenv)
    needs its own libpython found first, or the stub fails to start (its stdlib and C parts differ)."""
    libdir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True).stdout.strip()
    return {"LD_LIBRARY_PATH": os.pathsep.join(p for p in [libdir, os.environ.get("LD_LIBRARY_PATH", "")] if p),
            "PYTHONPATH": str(ROOT), "MODELS_DIR": str(ROOT / "models"), "INFER_THREADS": "1",
            "PATH": os.pathsep.join([str(python.parent), os.environ.get("PATH", "")])}


@contextlib.contextmanager
def peer_serving(peer: Peer, endpoint: Endpoint, python: Path, cores: set[int], probe, logs: Path):
    """The peer's server pinned to the server's cores; yields its URL once `probe` is answered 200."""
    port = free_ports(peer.ports)
    log = open(logs / f"server-peer-{peer.name}-{endpoint.name}.log", "w")
    process = subprocess.Popen(["taskset", "-c", ",".join(map(str, sorted(cores))), str(python), "-m",
                                f"loadtests.peers.{peer.module}", "--endpoint", endpoint.name, "--port", str(port)],
                               cwd=ROOT, env={**os.environ, **peer_env(python)}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while post(url, probe, timeout=10)[0] != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{peer.name} did not start; see {log.name}")
            time.sleep(0.5)
        yield url, process
    finally:
        processes.stop(process)
        log.close()


def check(url: str, requests: list, expected: list[list[dict]], wire_name: str, endpoint: str) -> str | None:
    """None when every answer equals onnxruntime's; else what differs, for the first that does."""
    for k, (request, want) in enumerate(zip(requests, expected)):
        status, body = post(url, request)
        if status != 200:
            return f"request {k}: HTTP {status}: {body[:200]!r}"
        problem = wire.differs(want, wire.parse(wire_name, endpoint, body))
        if problem:
            return f"request {k}: {problem}"
    return None


def versions(python: Path, packages: tuple[str, ...]) -> dict:
    code = ("import importlib.metadata as m, json, sys, numpy, onnxruntime; "
            "print(json.dumps({**{n: m.version(n) for n in sys.argv[1:]}, "
            "'onnxruntime': onnxruntime.__version__, 'numpy': numpy.__version__}))")
    out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


def compare(endpoint: Endpoint, peers: list[Peer], python: Path, server_cores: set[int], client_cores: set[int],
            slices: int, slice_seconds: float, latency_seconds: float, logs: Path) -> list[dict]:
    """Every peer against ours on one endpoint: one result per peer (check, req/s, latency)."""
    items = inputs(endpoint)
    expected = expected_answers(endpoint, items)
    ours_requests = wire.requests("ours", endpoint.name, items)
    results = []
    target = next(s.target for s in processes.SERVICES if s.name == endpoint.service)
    env = server_env(WORKLOADS[endpoint.workload], True, 1, "cpu")
    with serving(target, f"peers-{endpoint.service}", server_cores, env, logs, f"peers-ours-{endpoint.name}") as ours:
        problem = check(ours, ours_requests, expected, "ours", endpoint.name)
        if problem:
            raise SystemExit(f"our /{endpoint.name} does not answer as onnxruntime does: {problem}")
        for peer in peers:
            result = {"peer": peer.name, "endpoint": endpoint.name, "config": peer.config,
                      "versions": versions(python, peer.packages)}
            results.append(result)
            requests = wire.requests(peer.wire, endpoint.name, items)
            print(f"/{endpoint.name}: {peer.name} {result['versions']}", flush=True)
            try:
                with peer_serving(peer, endpoint, python, server_cores, requests[0], logs) as (url, process):
                    if peer.wire == "triton":
                        result["versions"]["tritonserver"] = wire.triton_version(url)
                    problem = check(url, requests, expected, peer.wire, endpoint.name)
                    result["check"] = problem or "equal"
                    if problem:
                        print(f"  {peer.name}: answers differ from onnxruntime's, not timed: {problem}", flush=True)
                        continue
                    result["runs"] = drive({"ours": (ours, serving.process, ours_requests),
                                            "peer": (url, process, requests)}, client_cores, slices,
                                           slice_seconds, latency_seconds, endpoint, peer.name)
            except RuntimeError as error:
                result["check"] = f"did not run: {error}"
                print(f"  {result['check']}", flush=True)
    return results


def pause(process: subprocess.Popen, resume: bool) -> None:
    """Stop (SIGSTOP) or resume a server and every process below it. The idle server of a pair is
    stopped while the other is driven: a peer's workers polling their queues, Ray's daemons or
    Java's threads would otherwise take the shared core from the one being measured."""
    for pid in [process.pid, *processes.descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT if resume else signal.SIGSTOP)


def drive(servers: dict, client_cores: set[int], slices: int, slice_seconds: float, latency_seconds: float,
          endpoint: Endpoint, name: str) -> list[dict]:
    """servers: {"ours": (url, process, requests), "peer": (...)}; each slice runs one of them alone."""
    runs = []
    with contextlib.ExitStack() as stack:
        wrks = {side: stack.enter_context(contextlib.closing(Wrk(requests, client_cores)))
                for side, (_, _, requests) in servers.items()}
        stack.callback(lambda: [pause(process, True) for _, process, _ in servers.values()])

        def alone(side: str) -> str:
            for other, (_, process, _) in servers.items():
                pause(process, other == side)
            time.sleep(0.2)  # let the resumed one settle
            return servers[side][0]

        for connections in CONNECTIONS:
            tallies = {side: Tally() for side in servers}
            latencies = {side: Latency() for side in servers}
            for _ in range(slices):
                for side in servers:
                    wrks[side].run(alone(side), connections, slice_seconds, tallies[side])
            for _ in range(slices):
                for side in servers:
                    url = alone(side)
                    asyncio.run(latency_slice(url, servers[side][2], connections, latency_seconds, latencies[side]))
            run = {"connections": connections}
            for side in servers:
                t, lat = tallies[side], latencies[side]
                run[side] = {"requests_per_s": t.per_second, "items_per_s": t.per_second * endpoint.per_request,
                             "failures": t.failures + lat.failures, "p50_ms": lat.percentile(50),
                             "p99_ms": lat.percentile(99), "latency_samples": len(lat.ms)}
            peer_rate = run["peer"]["requests_per_s"]
            run["ours_over_peer"] = run["ours"]["requests_per_s"] / peer_rate if peer_rate else float("nan")
            runs.append(run)
            print(f"  {connections:>2} connections: {name} {run['peer']['requests_per_s']:8.1f} req/s "
                  f"(p50 {run['peer']['p50_ms']:.2f} p99 {run['peer']['p99_ms']:.2f} ms)  ours "
                  f"{run['ours']['requests_per_s']:8.1f} req/s (p50 {run['ours']['p50_ms']:.2f} p99 "
                  f"{run['ours']['p99_ms']:.2f} ms)  ours/{name} {run['ours_over_peer']:.2f}", flush=True)
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.peers", description=__doc__.split("\n")[0])
    p.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    p.add_argument("--endpoints", nargs="+", choices=list(ENDPOINTS), default=list(ENDPOINTS))
    p.add_argument("--peer-python", type=Path, default=PEERS_PYTHON,
                   help="the Python the peers run with (default .venv-peers, `make peers-venv` builds it)")
    p.add_argument("--slices", type=int, default=3, help="alternating slices per server and connection count")
    p.add_argument("--slice-seconds", type=int, default=3, help="seconds per wrk slice (wrk takes whole seconds)")
    p.add_argument("--latency-seconds", type=float, default=2, help="seconds per latency slice")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers.md")
    args = p.parse_args(argv)
    if not args.peer_python.exists():
        raise SystemExit(f"{args.peer_python} is missing: `make peers-venv` builds it (loadtests/peers/requirements.txt)")
    command = "python -m loadtests.peers " + shlex.join(sys.argv[1:] if argv is None else argv)
    server_cores, client_cores = cpu_split()
    os.sched_setaffinity(0, client_cores)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.endpoints:
        results += compare(ENDPOINTS[name], [PEERS[p] for p in args.peers], args.peer_python, server_cores,
                           client_cores, args.slices, args.slice_seconds, args.latency_seconds, args.out.parent)
    setup = {"command": command, "machine": machine(), "server_cores": sorted(server_cores),
             "client_cores": sorted(client_cores), "slices": args.slices, "slice_seconds": args.slice_seconds,
             "latency_seconds": args.latency_seconds, "ours": software_versions()}
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "results": results}, indent=1))
    from loadtests.peers.report import plot, report

    text = report(setup, results, ENDPOINTS, PEERS)
    args.out.write_text(text)
    plot(results, ENDPOINTS, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out}, {args.out.with_suffix('.json').name} and {args.out.with_suffix('.png').name}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
