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

import logging
import threading
import time
from pathlib import Path

from services.contracts import repository
from services.contracts.versions import software_versions
from services.runtime import gate, tracing
from services.runtime import patches
from services.runtime.patches import pauses
from services.runtime.config import Settings, settings_for
from services.runtime.control import ControlFile
from services.runtime.errors import ANSWERING, ApiError, clip, shown
from services.runtime.metrics import metrics
from services.runtime.model import LoadedModel
from services.runtime.releases import Releases

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

class Runtime:
    """A service's models: one serving version per model name, any others loaded beside it.

    `models` maps each name to its serving version and is replaced whole on a switch, so a
    request that took a model keeps that one to its end, and the next request gets the new one:
    no request ever sees a half-switched model. `versions` holds every loaded version.
    """

    def __init__(self, service: str, kind: str | tuple[str, ...], settings: Settings | None = None):
        _log_to_stderr()
        self.service, self.kind = service, kind
        self.settings = settings or settings_for(service)
        self.models: dict[str, LoadedModel] = {}
        self.versions: dict[str, dict[str, LoadedModel]] = {}
        self.refused: dict[str, dict[str, str]] = {}  # name -> version -> why it was not loaded
        self.serve_checks: list = []  # a service's own conditions for a switch: fn(candidate, serving, force)
        self.on_load: list = []       # called with each version loaded after start (before it can serve)
        self.canary_kinds = (kind,) if isinstance(kind, str) else tuple(kind)  # models a canary may release
        self.releases = Releases(self)  # canaries and shadows (releases.py, canary.py)
        self.ready = False
        metrics()["ready"].labels(service).set(0)
        self.failure: str | None = None
        self.control = ControlFile(self.settings.control_dir, service, self.repository)
        self._changing = threading.RLock()  # one load, switch or unload at a time
        self._loading: set[tuple[str, str]] = set()  # versions being loaded now: a second load is a 409
        self._loading_lock = threading.Lock()
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
            record = self._current_record(names)
            for name in names:
                chosen = record.get(name, {})
                serving = self._open(self._starting_entry(name, chosen.get("serving")))
                self._add(serving)
                self._switch(serving)
                for version in chosen.get("loaded", []):
                    if version != serving.version:
                        self._load_quietly(name, version)
            with self._changing:
                self.releases.follow(record)  # a canary that was running before a restart goes on
            pauses.freeze_long_lived(self.service, self.settings.gc_freeze)
            self.ready = True
            metrics()["ready"].labels(self.service).set(1)
            log.info("%s: ready with %d model(s) in %.1fs", self.service, len(self.models), time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the service not ready, said once
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("%s: NOT READY - %s", self.service, self.failure)
            return
        threading.Thread(target=self._follow, name=f"{self.service}-control", daemon=True).start()

    def _starting_entry(self, name: str, recorded: str | None) -> repository.ModelEntry:
        """The version a model starts with: the one last chosen over the admin API, else the
        MODEL_VERSIONS pin, else the newest."""
        pinned = self.settings.model_versions.get(name)
        if recorded and (self.repository / name / recorded / repository.CARD_FILE).exists():
            if pinned and pinned != recorded:
                log.warning("%s: %s starts with version %s, chosen over the admin API (%s), not the MODEL_VERSIONS "
                            "pin %s", self.service, name, recorded, self.control.path, pinned)
            return repository.resolve(self.repository, name, recorded, kind=self.kind)
        if recorded:
            log.warning("%s: %s version %s chosen over the admin API is gone from the repository; starting with "
                        "the %s", self.service, name, recorded, "pinned version" if pinned else "newest")
        return repository.resolve(self.repository, name, pinned, kind=self.kind)

    def _default_version(self, name: str) -> str | None:
        """The version the deployment starts `name` with: its MODEL_VERSIONS pin, else the newest."""
        pinned = self.settings.model_versions.get(name)
        found = repository.version_dirs(self.repository / name)
        return pinned or (found[-1].name if found else None)

    def _current_record(self, names: list[str]) -> dict[str, dict]:
        """The admin API's recorded choices that still apply. A choice stands until the deployment
        changes what it would start with (a new newest version in the image, a new MODEL_VERSIONS
        pin): then the deployment wins, the stale choice is dropped and the log says so."""
        try:
            record = self.control.read()
        except (OSError, ValueError) as exc:
            log.error("%s: ignoring the model control record %s: %s", self.service, self.control.path, exc)
            return {}
        stale = [n for n in names if n in record and record[n].get("default") not in (None, self._default_version(n))]
        for name in stale:
            log.warning("%s: %s: the deployment now starts version %s (was %s when version %s was chosen over the "
                        "admin API); the deployment's choice wins", self.service, name, self._default_version(name),
                        record[name]["default"], record[name]["serving"])
            del record[name]
        if stale:
            try:
                self.control.update(lambda models: [models.pop(n, None) for n in stale])
            except OSError as exc:
                log.error("%s: cannot update %s: %s", self.service, self.control.path, exc)
        return record

    def _open(self, entry: repository.ModelEntry) -> LoadedModel:
        """A verified entry -> a session on the chosen device, warmed up."""
        model = LoadedModel(self.service, entry, self.settings)
        model.warm_up(sorted({1, min(self.settings.max_request_items, model.max_rows)}), self.settings.warmup_min_seconds)
        metrics()["model_info"].labels(self.service, entry.name, entry.version, entry.card["sha256"],
                                       model.provider).set(1)
        log.info("%s: loaded %s version %s on %s (%s)", self.service, entry.name, entry.version, model.provider,
                 model.provider_reason)
        return model

    def _add(self, model: LoadedModel) -> None:
        self.versions = {**self.versions, model.name: {**self.versions.get(model.name, {}), model.version: model}}
        self.refused.get(model.name, {}).pop(model.version, None)

    def _switch(self, model: LoadedModel) -> None:
        previous = self.models.get(model.name)
        self.models = {**self.models, model.name: model}  # one assignment: requests see old or new
        serving = metrics()["serving"]
        if previous is not None and previous is not model:
            serving.labels(self.service, model.name, previous.version).set(0)
            log.info("%s: %s now serves version %s (was %s)", self.service, model.name, model.version,
                     previous.version)
        serving.labels(self.service, model.name, model.version).set(1)

    def _drop(self, name: str, version: str) -> None:
        model = self.versions.get(name, {}).get(version)
        if model is None:
            return
        self.versions = {**self.versions, name: {v: m for v, m in self.versions[name].items() if v != version}}
        self._discard(model)
        log.info("%s: unloaded %s version %s", self.service, name, version)

    def _discard(self, model: LoadedModel) -> None:
        """A version that will not serve: its batcher ends, and its session goes with the last
        request that holds it; the metrics stop counting it as loaded."""
        model.batcher.close()
        metrics()["model_info"].labels(self.service, model.name, model.version, model.card["sha256"],
                                       model.provider).set(0)
        metrics()["serving"].labels(self.service, model.name, model.version).set(0)

    def _known(self, name: str) -> None:
        if name not in self.versions:
            raise ApiError(404, "model_not_found", f"no model {shown(name)}; this service serves "
                           f"{sorted(self.versions)}", field="name")

    def _entry(self, name: str, version: str) -> repository.ModelEntry:
        """A version folder of a model this service serves, verified; ApiError otherwise."""
        self._known(name)
        if not repository.is_version_name(version) or not (self.repository / name / version /
                                                           repository.CARD_FILE).exists():
            present = [d.name for d in repository.version_dirs(self.repository / name)]
            raise ApiError(404, "version_not_found", f"model {name} has no version {shown(version)} in "
                           f"{self.repository / name}; there are {present}", field="version")
        try:
            return repository.verify(name, self.repository / name / version, self.kind,
                                     root=Path(self.settings.models_dir))
        except repository.ModelLoadError as exc:
            self.refused.setdefault(name, {})[version] = str(exc)
            raise ApiError(422, "version_refused", str(exc), field="version") from None

    def _load_quietly(self, name: str, version: str) -> LoadedModel | None:
        """Load a version another worker chose (its gate passed there); a failure is logged."""
        try:
            model = self._open(self._entry(name, version))
        except ApiError as exc:
            log.error("%s: cannot load %s version %s: %s", self.service, name, version, exc.message)
            return None
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors: one line, the rest keep serving
            self.refused.setdefault(name, {})[version] = f"{type(exc).__name__}: {exc}"
            log.error("%s: cannot load %s version %s: %s", self.service, name, version, exc)
            return None
        try:
            for hook in self.on_load:  # the service's own preparation (a cache, statistics to read)
                hook(model)
        except Exception as exc:  # noqa: BLE001 - this worker goes on without that version, said why
            self._discard(model)
            self.refused.setdefault(name, {})[version] = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            log.error("%s: cannot prepare %s version %s: %s", self.service, name, version, getattr(exc, "message", exc))
            return None
        self._add(model)
        return model

    @property
    def repository(self) -> Path:
        """This service's model repository: MODELS_DIR/<service>."""
        return Path(self.settings.models_dir) / self.service

    def wait(self, timeout: float | None = None) -> bool:
        self._loader.join(timeout)
        return self.ready

    # Model control (the admin API, admin.py) -------------------------------------------

    def load_version(self, name: str, version: str, min_agreement: float | None = None) -> dict:
        """Verify, load, warm up and gate a version beside the serving one (blocking: call it
        from a thread). A version that fails stays unloaded, with the reason kept for /info."""
        self._require_ready()
        version = str(version)
        with self._loading_lock:  # a second load of the same version does not queue behind the first
            if (name, version) in self._loading:
                raise ApiError(409, "load_in_progress", f"{name} version {version} is being loaded by another "
                               "request; its answer says how it went (or GET /info after it)", field="version")
            self._loading.add((name, version))
        try:
            return self._load_version(name, version, min_agreement)
        finally:
            with self._loading_lock:
                self._loading.discard((name, version))

    def _load_version(self, name: str, version: str, min_agreement: float | None) -> dict:
        with self._changing:
            self._catch_up()
            loaded = self.versions.get(name, {}).get(version)
            if loaded is not None:
                return self._state(loaded) | {"already_loaded": True}
            entry = self._entry(name, version)
            started = time.monotonic()
            try:
                model = self._open(entry)
            except Exception as exc:  # noqa: BLE001 - a model onnxruntime refuses
                self.refused.setdefault(name, {})[version] = f"{type(exc).__name__}: {exc}"
                raise ApiError(422, "version_refused", f"onnxruntime cannot load {entry.path}: {exc}",
                               field="version") from None
            serving = self.models.get(name)
            agreement = self.settings.gate_min_agreement if min_agreement is None else min_agreement
            try:
                report = gate.check(model, serving, self.repository, agreement, self.settings.gate_quality_tolerance)
            except Exception as exc:  # noqa: BLE001 - e.g. an unreadable probes file: refused, said why
                report = {"passed": False, "checks": [], "reason": f"the gate could not run: {type(exc).__name__}: "
                          f"{clip(str(exc), 300)}"}
            if not report["passed"]:
                self.refused.setdefault(name, {})[version] = report["reason"]
                self._discard(model)
                log.warning("%s: %s version %s refused by the gate: %s", self.service, name, version,
                            report["reason"])
                raise ApiError(422, "gate_failed", f"{name} version {version} did not pass the gate: "
                               f"{report['reason']}", field="version", gate=report)
            try:
                for hook in self.on_load:
                    hook(model)
            except Exception as exc:  # noqa: BLE001 - the service's own preparation: refused, said why, never a 500
                reason = f"the service could not prepare it: {type(exc).__name__}: {clip(str(exc), 300)}"
                self.refused.setdefault(name, {})[version] = reason
                self._discard(model)
                log.warning("%s: %s version %s refused: %s", self.service, name, version, reason)
                raise ApiError(422, "version_refused", f"{name} version {version}: {reason}", field="version") from None
            self._record(name, lambda chosen: chosen["loaded"].append(version), undo=lambda: self._discard(model))
            self._add(model)
            log.info("%s: %s version %s passed the gate (%s)", self.service, name, version,
                     ", ".join(f"{c['check']} ok" for c in report["checks"]))
            return self._state(model) | {"gate": report, "seconds": round(time.monotonic() - started, 2)}

    def serve_version(self, name: str, version: str, force: bool = False) -> dict:
        """Switch `name` to a loaded version (rolling back is the same call with the old one)."""
        self._require_ready()
        with self._changing:
            self._catch_up()
            candidate = self._loaded(name, str(version))
            previous = self.models[name]
            if candidate is not previous:
                for condition in self.serve_checks:
                    condition(candidate, previous, force)
                self._record(name, lambda chosen: chosen.update(serving=candidate.version) or self.releases.cancel(
                    chosen, f"the serving version was switched to {candidate.version} over the admin API"))
                self._switch(candidate)
                self.releases.follow(self.control.read())
            return {"model": name, "serving": candidate.version, "previous": previous.version,
                    "changed": candidate is not previous}

    def unload_version(self, name: str, version: str) -> dict:
        self._require_ready()
        with self._changing:
            self._catch_up()
            model = self._loaded(name, str(version))
            if model is self.models[name]:
                raise ApiError(409, "version_serving", f"{name} version {version} is serving and cannot be unloaded; "
                               "switch to another version first", field="version")
            canary = self.releases.active.get(name)
            if canary is not None and canary.candidate is model:
                raise ApiError(409, "version_in_canary", f"{name} version {version} is in a canary; stop it first: "
                               f"POST /models/{name}/canary/stop", field="version")
            self._record(name, lambda chosen: chosen.update(loaded=[v for v in chosen["loaded"] if v != version]))
            self._drop(name, model.version)
            return {"model": name, "version": model.version, "state": "unloaded",
                    "loaded": sorted(self.versions[name], key=int)}

    def _catch_up(self) -> None:
        """Follow what any worker recorded: every MODEL_CONTROL_POLL seconds, and before an admin
        call (one right after a load may reach a worker whose next look is still to come)."""
        try:
            if self.control.changed():
                self._apply(self.control.read())
        except Exception as exc:  # noqa: BLE001 - a bad record is logged; the poller must live on
            log.error("%s: cannot follow %s: %s", self.service, self.control.path, exc)

    def _require_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, "not_ready", self.failure or "models are still loading; retry shortly")

    def _loaded(self, name: str, version: str) -> LoadedModel:
        self._known(name)
        model = self.versions[name].get(version)
        if model is None:
            raise ApiError(404, "version_not_loaded", f"{name} version {shown(version)} is not loaded (loaded: "
                           f"{sorted(self.versions[name], key=int)}); load it first: POST /models/{name}/versions/"
                           f"{clip(version, 20)}/load", field="version")
        return model

    def _record(self, name: str, change, undo=None) -> None:
        """Write a change of `name` to the control file that every worker follows."""
        serving = self.models[name]

        def apply(models: dict) -> None:
            chosen = models.setdefault(name, {"serving": serving.version, "loaded": []})
            chosen["default"] = self._default_version(name)
            change(chosen)
            chosen["loaded"] = sorted({*chosen["loaded"], chosen["serving"]}, key=int)

        try:
            self.control.update(apply)
        except OSError as exc:
            if undo is not None:
                undo()
            raise ApiError(503, "control_unwritable", f"the change cannot be recorded in {self.control.path} "
                           f"(MODEL_CONTROL_DIR), so the service's workers cannot follow it: {exc}") from None

    def _follow(self) -> None:
        """Every MODEL_CONTROL_POLL seconds: follow the control file written by any worker; every
        ROLLOUT_LOG_SECONDS while a model has several versions loaded, log who answered."""
        last_summary = time.monotonic()
        while True:
            time.sleep(self.settings.control_poll)
            self._catch_up()
            try:
                self.releases.judge()
            except Exception as exc:  # noqa: BLE001 - logged; the poller must live on
                log.exception("%s: cannot judge a canary: %s", self.service, exc)
            if time.monotonic() - last_summary >= self.settings.rollout_log_seconds:
                last_summary = time.monotonic()
                self._log_answers()

    def _log_answers(self) -> None:
        """During a rollout (several versions of a model loaded), one line per model naming how
        many requests each version answered: the version of every answer, without a log line
        per request (the access log's cost is the hot path's)."""
        for name, loaded in self.versions.items():
            counts = {version: model.taken for version, model in loaded.items()}
            for model in loaded.values():
                model.taken = 0
            if len(loaded) > 1 and any(counts.values()):
                serving = self.models[name].version
                log.info("%s: %s answers in the last %g s by version: %s", self.service, name,
                         self.settings.rollout_log_seconds,
                         ", ".join(f"{v}{' (serving)' if v == serving else ''}: {n}"
                                   for v, n in sorted(counts.items(), key=lambda item: int(item[0]))))

    def _apply(self, record: dict[str, dict]) -> None:
        with self._changing:
            for name, chosen in record.items():
                if name not in self.versions:
                    continue
                wanted = {chosen["serving"], *chosen["loaded"]}
                for version in sorted(wanted - set(self.versions[name]), key=int):
                    self._load_quietly(name, version)
                target = self.versions[name].get(chosen["serving"])
                if target is not None and target is not self.models[name]:
                    self._switch(target)
                for version in set(self.versions[name]) - wanted - {self.models[name].version}:
                    self._drop(name, version)
            self.releases.follow(record)

    def _state(self, model: LoadedModel) -> dict:
        return {"model": model.name, "version": model.version,
                "state": "serving" if self.models.get(model.name) is model else "loaded"}

    # Requests --------------------------------------------------------------------------

    def choices(self, kind: str | None = None) -> tuple[list[str], bool]:
        """The model names a request may give (of `kind`), and whether it must give one."""
        names = sorted(n for n, m in self.models.items() if kind is None or m.spec.kind == kind)
        return names, len(names) > 1

    def get(self, name: str | None, kind: str | None = None, version: str | None = None,
            canary: bool = False) -> LoadedModel:
        """The model a request names, or the only one (of `kind`, when given): its serving
        version, or the loaded `version` asked for; ApiError otherwise. With `canary`, a request
        that names no version may be answered by (or copied to) a version in a canary."""
        if not self.ready:
            raise ApiError(503, "not_ready", self.failure or "models are still loading; retry shortly")
        models = self.models
        candidates = sorted(n for n, m in models.items() if kind is None or m.spec.kind == kind)
        if name is None:
            if len(candidates) != 1:
                raise ApiError(400, "model_required", f"name a model: this endpoint serves {candidates}",
                               field="model")
            name = candidates[0]
        model = models.get(name) if name in candidates else None
        if model is None:
            raise ApiError(404, "model_not_found", f"no model {shown(name)}; this endpoint serves {candidates}",
                           field="model")
        if version is not None:
            loaded = self.versions.get(name, {})
            model = loaded.get(version)
            if model is None:
                raise ApiError(404, "version_not_found", f"{name} has no loaded version {shown(version)}; loaded: "
                               f"{sorted(loaded, key=int)} (serving {models[name].version})", field="version")
        answering = model
        if canary and version is None and self.releases.active:
            model = self.releases.route(name, model)
            answering = getattr(model, "answering", model)  # a canary's Answer: the version it sends the request to
        answering.answers.inc()
        answering.taken += 1
        if tracing.enabled:
            tracing.annotate(model=name, **{"model.version": model.version})
        ANSWERING.set((self.service, answering.name, answering.version))
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
            "versions": {name: {"serving": self.models[name].version if name in self.models else None,
                                "loaded": sorted(loaded, key=int),
                                "refused": dict(self.refused.get(name, {}))}
                         for name, loaded in self.versions.items()},
            "model_control": {"admin_api": "on (ADMIN_KEY)" if self.settings.admin_key else "off (set ADMIN_KEY)",
                              "record": str(self.control.path.resolve()), "poll_s": self.settings.control_poll,
                              "gate": {"min_agreement": self.settings.gate_min_agreement,
                                       "quality_tolerance": self.settings.gate_quality_tolerance},
                              "canaries": self.releases.info()},
            "limits": self.settings.limits(),
            "auth": "bearer API key on POST endpoints" if self.settings.api_key else "none",
            "tracing": "OTLP/HTTP (OTEL_* variables)" if self.settings.tracing else "off",
            "software": dict(software_versions()),
            "framework_fixes": patches.status(),  # services/runtime/patches/: written for these versions
            **extra,
        }
