"""Serve every service that has models in the repository, each as a real `bentoml serve`.

    python -m services [--host 127.0.0.1] [--port policy=3001] [--models-dir models]
    python -m services --exec policy      # one service in the foreground (containers)

Starts one process per service with at least one model in its repository models/<service>/, waits until
each answers /readyz, prints the URLs, and stops them all on Ctrl-C (or SIGTERM).
A service whose models fail to load never becomes ready: its log line is printed and the
launcher stops everything with exit status 1.
"""

from __future__ import annotations

import argparse
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

from services.runtime.repository import list_models

ROOT = Path(__file__).resolve().parent.parent


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


def servable(models_dir: Path) -> list[ServiceSpec]:
    """The services that exist in this checkout and have at least one model to serve."""
    return [s for s in SERVICES if s.module_file.exists() and list_models(models_dir / s.name)]


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


def exec_one(name: str, host: str, port: int, models_dir: Path) -> int:
    """Replace this process with `bentoml serve` of one service, so signals reach it directly."""
    specs = {spec.name: spec for spec in SERVICES}
    if name not in specs:
        print(f"unknown service {name!r}: choose one of {sorted(specs)} (--exec NAME or SERVICE=NAME)",
              file=sys.stderr)
        return 2
    os.environ["MODELS_DIR"] = str(models_dir)
    os.environ.update(own_home(name, port, os.environ))
    os.chdir(ROOT)
    os.execv(sys.executable, serve_command(specs[name], host, port))


def parse_ports(items: list[str]) -> dict[str, int]:
    ports = {s.name: env_port(f"{s.name.upper()}_PORT", s.port) for s in SERVICES}
    for item in items:
        name, sep, port = item.partition("=")
        if not sep or name not in ports or not port.isdigit():
            raise SystemExit(f"--port {item!r}: expected NAME=PORT with NAME in {sorted(ports)}")
        ports[name] = int(port)
    return ports


def env_port(variable: str, default: int) -> int:
    """A port from the environment. Kubernetes sets POLICY_PORT=tcp://10.0.0.1:3000 in every pod
    of a namespace with a Service named policy (service links): not ours, so it is ignored."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    if value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    if "://" in value:
        return default
    raise SystemExit(f"{variable}={value!r}: expected a port number")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m services", description=__doc__.split("\n")[0])
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", action="append", default=[], metavar="NAME=PORT",
                   help="override a port (defaults: policy=3001 generator=3002 classifier=3003)")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("MODELS_DIR", ROOT / "models")))
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for each /readyz")
    p.add_argument("--exec", nargs="?", const=os.environ.get("SERVICE", ""), metavar="SERVICE",
                   help="become `bentoml serve` of one service on $PORT (a container's entry point; "
                        "SERVICE defaults to $SERVICE)")
    args = p.parse_args(argv)
    ports = parse_ports(args.port)
    models_dir = args.models_dir.resolve()
    if args.exec is not None:
        return exec_one(args.exec, args.host, int(os.environ.get("PORT", 3000)), models_dir)

    specs = servable(models_dir)
    if not specs:
        print(f"no models to serve under {models_dir}", file=sys.stderr)
        return 1
    env = {"MODELS_DIR": str(models_dir)}
    running = [(spec, start(spec, ports[spec.name], args.host, env)) for spec in specs]
    stopping = False

    def shut_down(*_):
        nonlocal stopping
        if not stopping:
            stopping = True
            print("\nstopping services ...", flush=True)
            for _, process in running:
                stop(process)

    signal.signal(signal.SIGTERM, lambda *_: (shut_down(), sys.exit(0)))
    # Ctrl-C: claimed explicitly, because a launcher started in the background by a shell
    # inherits SIGINT as ignored and would otherwise never see it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for spec, process in running:
            url = f"http://{args.host}:{ports[spec.name]}"
            if not wait_ready(url, process, args.timeout):
                reason = failure(url) or "see its log above"
                print(f"{spec.name} did not become ready at {url}: {reason}", file=sys.stderr)
                shut_down()
                return 1
        print("\nserving (Ctrl-C stops all):", flush=True)
        for spec, _ in running:
            url = f"http://{args.host}:{ports[spec.name]}"
            models = ", ".join(list_models(models_dir / spec.name))
            print(f"  {spec.name:<11} {url}   models: {models}   (console {url}/ui, docs {url}/)", flush=True)
        while all(process.poll() is None for _, process in running):
            time.sleep(0.5)
        print("a service exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        shut_down()


if __name__ == "__main__":
    sys.exit(main())
