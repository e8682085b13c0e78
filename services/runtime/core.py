"""The runtime a service holds: its models, loaded and warmed up in the background.

    self.runtime = Runtime(service="policy", kind="policy")   # in the service's __init__
    model = self.runtime.get(name)                           # 404 / 400 / 503 as ApiError
    model = self.runtime.get(None, kind="face_detector")     # the only model of that kind
    outputs = await model(rows)                              # adaptive batching, metrics

A service is ready (its /readyz answers 200) only once every model of its kind in the
repository is verified against its card, has a session on the chosen device, and has run
its warm-up. A model that is missing, corrupt or mismatched keeps the service not ready,
with one log line saying why.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import platform
import threading
import time
from pathlib import Path

import numpy as np

from services.runtime import device, repository
from services.runtime.batching import DynamicBatcher
from services.runtime.config import Settings
from services.runtime.errors import ApiError, shown
from services.runtime.metrics import metrics

log = logging.getLogger("services.runtime")


def _log_to_stderr() -> None:
    """BentoML configures only its own loggers; give ours a handler so load lines show."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s",
                                               "%Y-%m-%dT%H:%M:%S%z"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

ONNX_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


class LoadedModel:
    """One model version with its onnxruntime session and its batcher."""

    def __init__(self, service: str, entry: repository.ModelEntry, settings: Settings):
        self.service, self.entry = service, entry
        self.session, self.provider, self.provider_reason = device.create_session(
            entry.path, settings.device, settings.infer_threads)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_dtype = ONNX_TYPES.get(first.type, np.float32)
        self.input_shape = [d if isinstance(d, int) else None for d in first.shape]  # None: dynamic
        self.output_names = [o.name for o in self.session.get_outputs()]
        m = metrics()
        self._timer = m["inference_seconds"].labels(service, entry.name, entry.version, self.provider)
        self._batch_sizes = m["batch_size"].labels(service, entry.name)
        # A card may cap the rows of one merged batch (a 512x512 detector batch of 512 rows
        # would take gigabytes); the smaller of it and BATCH_MAX_ROWS applies.
        self.max_rows = min(settings.batch_max_rows, int(entry.card.get("contract", {}).get("max_batch_rows") or
                                                         settings.batch_max_rows))
        self.batcher = DynamicBatcher(self.run, enabled=settings.batching, max_rows=self.max_rows,
                                      wait_ms=settings.batch_wait_ms, on_batch=self._batch_sizes.observe,
                                      name=entry.name)

    name = property(lambda self: self.entry.name)
    version = property(lambda self: self.entry.version)
    card = property(lambda self: self.entry.card)

    def run(self, rows: np.ndarray) -> list[np.ndarray]:
        """One synchronous onnxruntime run on a batch (what the batcher calls)."""
        started = time.perf_counter()
        outputs = self.session.run(self.output_names, {self.input_name: rows})
        self._timer.observe(time.perf_counter() - started)
        return outputs

    async def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        return await self.batcher(np.ascontiguousarray(rows, dtype=self.input_dtype))

    def warm_up(self, batch_sizes: list[int], min_seconds: float) -> None:
        static = [d or 1 for d in self.input_shape[1:]]
        deadline = time.monotonic() + min_seconds
        while True:
            for n in batch_sizes:
                self.session.run(self.output_names, {self.input_name: np.zeros([n, *static], self.input_dtype)})
            if time.monotonic() >= deadline:
                return

    def describe(self) -> dict:
        card = self.card
        return {
            "name": self.name,
            "version": self.version,
            "kind": card.get("kind"),
            "sha256": card.get("sha256"),
            "provider": self.provider,
            "provider_reason": self.provider_reason,
            "description": card.get("description"),
            "contract": card.get("contract"),
            "metrics": card.get("metrics"),
            "trained_with": (card.get("training") or {}).get("command"),
        }


class Runtime:
    def __init__(self, service: str, kind: str | tuple[str, ...], settings: Settings | None = None):
        _log_to_stderr()
        self.service, self.kind = service, kind
        self.settings = settings or Settings.from_env(service)
        self.models: dict[str, LoadedModel] = {}
        self.ready = False
        self.failure: str | None = None
        self._loader = threading.Thread(target=self._load_all, name=f"{service}-loader", daemon=True)
        self._loader.start()
        if self.settings.workers > 1:
            # Workers share one listening socket and a worker accepts connections only once its
            # service is built: waiting here keeps requests away from a worker still loading
            # (one worker's /readyz says nothing of the others'). With one worker, loading stays
            # in the background so /readyz and /info can say why it is not ready yet.
            self._loader.join()

    # Loading -------------------------------------------------------------------------

    def _load_all(self) -> None:
        started = time.monotonic()
        try:
            repo = self.repository
            names = repository.list_models(repo)
            if not names:
                raise repository.ModelLoadError(f"no models under {Path(repo).resolve()}")
            loaded = {}
            for name in names:
                entry = repository.resolve(repo, name, self.settings.model_versions.get(name), kind=self.kind)
                model = LoadedModel(self.service, entry, self.settings)
                model.warm_up(sorted({1, min(self.settings.max_batch_size, model.max_rows)}),
                              self.settings.warmup_min_seconds)
                metrics()["model_info"].labels(self.service, name, entry.version, entry.card["sha256"],
                                               model.provider).set(1)
                loaded[name] = model
                log.info("%s: loaded %s version %s on %s (%s)", self.service, name, entry.version,
                         model.provider, model.provider_reason)
            self.models = loaded
            self.ready = True
            log.info("%s: ready with %d model(s) in %.1fs", self.service, len(loaded), time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the service not ready, said once
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("%s: NOT READY - %s", self.service, self.failure)

    @property
    def repository(self) -> Path:
        """This service's model repository: MODELS_DIR/<service>."""
        return Path(self.settings.models_dir) / self.service

    def wait(self, timeout: float | None = None) -> bool:
        self._loader.join(timeout)
        return self.ready

    # Requests --------------------------------------------------------------------------

    def choices(self, kind: str | None = None) -> tuple[list[str], bool]:
        """The model names a request may give (of `kind`), and whether it must give one."""
        names = sorted(n for n, m in self.models.items() if kind is None or m.card.get("kind") == kind)
        return names, len(names) > 1

    def get(self, name: str | None, kind: str | None = None) -> LoadedModel:
        """The model a request names, or the only one (of `kind`, when given); ApiError otherwise."""
        if not self.ready:
            raise ApiError(503, "not_ready", self.failure or "models are still loading; retry shortly")
        candidates = sorted(n for n, m in self.models.items() if kind is None or m.card.get("kind") == kind)
        if name is None:
            if len(candidates) == 1:
                return self.models[candidates[0]]
            raise ApiError(400, "model_required", f"name a model: this endpoint serves {candidates}", field="model")
        model = self.models.get(name) if name in candidates else None
        if model is None:
            raise ApiError(404, "model_not_found", f"no model {shown(name)}; this endpoint serves {candidates}",
                           field="model")
        return model

    def info(self, **extra) -> dict:
        return {
            "service": self.service,
            "ready": self.ready,
            "failure": self.failure,
            "device": {"requested": self.settings.device,
                       "providers": sorted({m.provider for m in self.models.values()})},
            "repository": str(Path(self.repository).resolve()),
            "models": [m.describe() for m in self.models.values()],
            "limits": self.settings.limits(),
            "auth": "bearer API key on POST endpoints" if self.settings.api_key else "none",
            "software": dict(software_versions()),
            **extra,
        }


SERVING_PACKAGES = ("bentoml", "onnxruntime-gpu", "onnxruntime", "numpy", "pillow")


@functools.lru_cache(maxsize=None)
def software_versions(packages: tuple[str, ...] = SERVING_PACKAGES) -> dict:
    """Python and package versions (installed ones only); cached, they cannot change while running."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
