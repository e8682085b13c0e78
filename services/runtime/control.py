"""The model versions chosen over the admin API, in one small JSON file per service.

    MODEL_CONTROL_DIR/<service>/serving.json
    {"repository": "/srv/models/policy",
     "models": {"cartpole": {"serving": "2", "loaded": ["1", "2"], "default": "3",
                             "canary": {"version": "3", "share": 0.1, ...}, "last_canary": {...}}},
     "changed_at": "2026-11-25T12:00:00Z"}

Why a file: a service runs WORKERS processes (and may run replicas sharing a volume), and an
admin call reaches one of them. That one does the work (load, gate, switch), then writes the
file; every worker looks at it every MODEL_CONTROL_POLL seconds and follows it. It also
outlives a restart: a service that was rolled back keeps serving the version it was rolled
back to, not the newest folder, until the deployment itself changes what it starts with:
`default` is the version the service would start with on its own (the MODEL_VERSIONS pin or
the newest folder) when the choice was made; when that differs at start (a new image with a
newer version, a new pin), the deployment wins (core.Runtime._current_record). A record
written for another repository is ignored.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from services.contracts.repository import write_json_atomic

CONTROL_FILE = "serving.json"
RELEASE_KEYS = ("canary", "last_canary")  # a running canary's plan, how the last one ended (releases.py)


class ControlFile:
    def __init__(self, directory: Path, service: str, repository: Path):
        self.path = Path(directory) / service / CONTROL_FILE
        self.repository = str(Path(repository).resolve())
        self._seen: tuple | None = None

    def signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self) -> bool:
        """Whether the file differs from when it was last read (cheap: one stat)."""
        return self.signature() != self._seen

    def read(self) -> dict[str, dict]:
        """The recorded choice per model name; {} when there is none for this repository.
        Raises ValueError for a file that is not a record."""
        self._seen = self.signature()
        if self._seen is None:
            return {}
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ValueError(f"{self.path} is not a model control record")
        if data.get("repository") != self.repository:
            return {}
        return {name: {"serving": str(m["serving"]), "loaded": [str(v) for v in m.get("loaded", [])],
                       "default": None if m.get("default") is None else str(m["default"]),
                       **{key: m[key] for key in RELEASE_KEYS if isinstance(m.get(key), dict)}}
                for name, m in data["models"].items() if isinstance(m, dict) and m.get("serving")}

    def update(self, change: Callable[[dict[str, dict]], None]) -> dict[str, dict]:
        """Read, change and write the record under an exclusive lock (two workers' admin calls
        do not lose each other's change). OSError when the directory is not writable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            try:
                models = self.read()
            except ValueError:
                models = {}  # a damaged record is replaced by a whole one
            change(models)
            write_json_atomic(self.path, {"repository": self.repository, "models": models,
                                          "changed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            self._seen = self.signature()
        return models

    @contextmanager
    def _locked(self):
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
