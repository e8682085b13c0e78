"""The services as processes: their names, `bentoml serve` targets and default ports, and how to
start one, wait until it is ready and stop it (with every worker). The launcher (services/launch.py),
the tests and the benchmarks all start servers this way; nothing here imports a service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # also its model repository: MODELS_DIR/<name>
    target: str  # bentoml serve target, module:Class
    port: int

    @property
    def module_file(self) -> Path:
        return ROOT / (self.target.split(":")[0].replace(".", "/") + ".py")


SERVICES = [
    ServiceSpec("policy", "services.policy:Policy", 3001),
    ServiceSpec("generator", "services.generator:Generator", 3002),
    ServiceSpec("classifier", "services.classifier.service:Classifier", 3003),
]


def serve_command(spec: ServiceSpec, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", spec.target, "--host", host, "--port", str(port)]


def own_home(name: str, port: int, environ: dict) -> dict:
    """A BENTOML_HOME of this server's own. Every `bentoml serve` keeps its Prometheus files in
    $BENTOML_HOME/prometheus_multiproc_dir and empties it when it starts: servers sharing one
    home overwrite each other's /metrics (and one starting can break another's /metrics)."""
    base = Path(environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    return {"BENTOML_HOME": str(base / "servers" / f"{name}-{port}")}


def free_port(low: int = 20_000) -> int:
    """A port to start a server on beside others (tests, soak, benchmark), free right now.

    Below the kernel's ephemeral range on purpose: a port that bind(0) hands out comes from that
    range, and an outgoing connection opened meanwhile can take it before the server binds it
    ("Address already in use", seen once in the soak test). Outgoing connections never use
    ports below the range, so a free one there stays free unless someone binds it explicitly."""
    import random
    import socket

    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32_768
    high = max(first_ephemeral, low + 1_000)
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


def start(spec: ServiceSpec, port: int, host: str = "127.0.0.1", env: dict | None = None,
          log_file=None) -> subprocess.Popen:
    """Start `bentoml serve` for one service in its own process group, with its own BENTOML_HOME."""
    environ = {**os.environ, **(env or {})}
    environ.update(own_home(spec.name, port, environ))
    return subprocess.Popen(serve_command(spec, host, port), cwd=ROOT, env=environ, start_new_session=True,
                            stdout=log_file, stderr=subprocess.STDOUT if log_file else None)


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Poll GET url/readyz until 200. False as soon as the process exits or the service
    reports a load failure in /info (a bad model, INFER_DEVICE=cuda without CUDA), or
    when the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except urllib.error.HTTPError:  # 503: up, not ready; has loading failed for good?
            if failure(url):
                return False
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    return False


def failure(url: str) -> str | None:
    """Why the service at url will never be ready (from GET /info), or None."""
    try:
        with urllib.request.urlopen(f"{url}/info", timeout=2) as response:
            return json.loads(response.read()).get("failure")
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below pid. BentoML's workers call setsid, so a process group misses them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the server, which stops its workers; SIGKILL whatever of its tree is left."""
    tree = descendants(process.pid)
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
    _kill(tree)


def crash(process: subprocess.Popen) -> None:
    """SIGKILL the server and all its workers at once: no shutdown code runs (a power cut)."""
    tree = descendants(process.pid)
    _kill([process.pid, *tree])
    process.wait()
