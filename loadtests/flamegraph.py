"""Flame graphs of a busy service worker: where a request's time goes, recorded by py-spy.

    python -m loadtests.flamegraph                                   # every service, docs/flamegraphs/
    python -m loadtests.flamegraph --services policy --connections 64 --seconds 20

Each service is served as in the benchmark (`bentoml serve`, one worker pinned to the server's
cores, INFER_THREADS=1) and driven by wrk with the benchmark's requests while py-spy samples
the worker process from outside (no change to it). Only the thread holding the GIL is sampled
(--gil), so the graph is the Python time that requests cost; onnxruntime's own work, which
releases the GIL, shows as the call that started it. The SVGs open in any browser (click to
zoom). Set GC_FREEZE, ACCESS_LOG etc. in the environment to profile other settings.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from loadtests.benchmark import cpu_split, server_env, serving
from loadtests.workloads import WORKLOADS
from loadtests.wrk import Tally, Wrk
from services.contracts import processes

ROOT = Path(__file__).resolve().parent.parent


def worker_pid(server_pid: int) -> int:
    """The BentoML worker under a `bentoml serve` (circus starts it as a child)."""
    for pid in processes.descendants(server_pid):
        try:
            if b"_bentoml_impl.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise SystemExit("no BentoML worker process found")


def record(name: str, connections: int, seconds: float, rate: int, out: Path) -> Path:
    workload = WORKLOADS[name]
    spec = next(s for s in processes.SERVICES if s.name == (workload.service or workload.name))
    server_cores, client_cores = cpu_split()
    svg = out / f"{name}-{connections}conn.svg"
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flamegraph-")))
        url = stack.enter_context(serving(spec.target, name, server_cores, server_env(workload, True, 1, "cpu"),
                                          logs, name))
        pid = worker_pid(serving.process.pid)
        wrk = stack.enter_context(contextlib.closing(Wrk(workload.wrk_requests(), client_cores)))
        tally = Tally()
        load = threading.Thread(target=wrk.run, args=(url, connections, seconds + 4, tally))
        load.start()
        try:
            py_spy = str(Path(sys.executable).parent / "py-spy")
            subprocess.run(["taskset", "-c", ",".join(map(str, sorted(client_cores))), py_spy, "record",
                            "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate), "--gil",
                            "--format", "flamegraph", "--output", str(svg)], check=True, timeout=seconds + 120)
        finally:
            load.join()
    print(f"{name}: {tally.per_second:,.0f} requests/s at {connections} connection(s) while recording -> {svg}",
          flush=True)
    return svg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.flamegraph", description=__doc__.split("\n")[0])
    p.add_argument("--services", nargs="*", default=["policy", "generator", "classifier"])
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "flamegraphs")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.services:
        record(name, args.connections, args.seconds, args.rate, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
