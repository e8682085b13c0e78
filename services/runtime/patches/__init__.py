"""Our fixes to BentoML and uvicorn, in one place, and the versions they were written for.

    patches.install(service, name, header_timeout)   # add_http_layer calls it for every service
    patches.status()                                 # in /info: written for, running, matching

- pauses.py: BentoML's traffic timer cancelled once a request is answered, and what is alive
  after warm-up frozen out of garbage collection (the p99 tail);
- hot_path.py: per-request work BentoML does that these services do not use (media types,
  tracing when unconfigured, its access log, the endpoint lookup), and bounded path labels;
- connections.py: a header timer on uvicorn's h11 protocol (slowloris).

Each reaches into the framework's internals, so each is tied to the versions below: with
another version installed the service still starts, says so in its log and in /info, and
tests/test_patches.py (which pins what each patch relies on) fails in the suite.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

from services.runtime.patches import connections, hot_path, pauses

WRITTEN_FOR = {"bentoml": "1.4.40", "uvicorn": "0.55.0"}
log = logging.getLogger("services.runtime")


@functools.cache  # installed versions cannot change while a server runs; /info asks each time
def status() -> dict:
    running = {}
    for package in WRITTEN_FOR:
        try:
            running[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            running[package] = None
    matches = running == WRITTEN_FOR
    answer = {"written_for": WRITTEN_FOR, "running": running, "matches": matches}
    if not matches:
        answer["warning"] = ("the BentoML/uvicorn fixes (services/runtime/patches/) were written for "
                             f"{_versions(WRITTEN_FOR)} and run on {_versions(running)}: check them "
                             "(tests/test_patches.py) before trusting this server's latency")
    return answer


def _versions(packages: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in packages.items())


def install(service, name: str, header_timeout: float) -> None:
    said = status()
    if not said["matches"]:
        log.warning("%s: %s", name, said["warning"])
    connections.install(header_timeout)  # before uvicorn accepts the first connection
    pauses.install_timeout_fix()
    hot_path.cache_media_types(service)
    hot_path.install_lean_middlewares()
    hot_path.cache_bound_methods()
