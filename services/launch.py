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
import os
import signal
import sys
import time
from pathlib import Path

from services.contracts.processes import (ROOT, SERVICES, ServiceSpec, failure, own_home, serve_command, start, stop,
                                         wait_ready)
from services.contracts.repository import list_models

def servable(models_dir: Path) -> list[ServiceSpec]:
    """The services that exist in this checkout and have at least one model to serve."""
    return [s for s in SERVICES if s.module_file.exists() and list_models(models_dir / s.name)]


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
