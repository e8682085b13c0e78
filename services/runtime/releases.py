"""The runtime's side of canary releases (canary.py): start and stop them over the admin API,
follow them from the control record, judge them every MODEL_CONTROL_POLL seconds, and write
the decision that every worker and replica then follows.

The control record keeps, per model, the running canary's plan (`canary`) and how the last one
ended (`last_canary`: outcome, reason, figures); /info shows both, /metrics counts decisions
(model_canary_decisions_total) and marks running canaries (model_canary_active).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import asdict

from services.runtime.canary import AGREEING_KINDS, Canary, Plan
from services.runtime.errors import ApiError
from services.runtime.metrics import metrics

log = logging.getLogger("services.runtime")
OUTCOMES = ("promoted", "rolled_back", "stopped")


class Releases:
    def __init__(self, runtime):
        self.runtime = runtime
        self.active: dict[str, Canary] = {}   # model name -> its running canary, in this worker
        self.last: dict[str, dict] = {}       # model name -> how its last canary ended (from the record)

    @property
    def folder(self):
        return self.runtime.control.path.parent / "canary"

    def route(self, name: str, model):
        """The model-like object that answers a request for `name`'s serving version."""
        canary = self.active.get(name)
        return model if canary is None or canary.serving is not model else canary.route()

    # The admin API ------------------------------------------------------------------------

    def start(self, name: str, version: str, fields: dict) -> dict:
        rt = self.runtime
        rt._require_ready()
        with rt._changing:
            rt._catch_up()
            candidate = rt._loaded(name, version)
            serving = rt.models[name]
            if candidate is serving:
                raise ApiError(409, "canary_of_serving", f"{name} version {version} is the serving version; a canary "
                               "needs another loaded version", field="version")
            if candidate.spec.kind not in rt.canary_kinds:
                raise ApiError(422, "canary_unsupported", f"{name} is a {candidate.spec.kind}; this service runs "
                               f"canaries of {list(rt.canary_kinds)} (answers that read no taught state)",
                               field="name")
            if candidate.card["contract"].get("preprocessing") != serving.card["contract"].get("preprocessing"):
                raise ApiError(422, "canary_unsupported", f"{name} version {version} prepares its inputs differently "
                               f"from version {serving.version} (contract.preprocessing): their answers on one "
                               "request cannot be compared; switch with POST /models/{name}/serve", field="version")
            if name in self.active:
                raise ApiError(409, "canary_in_progress", f"{name} version {self.active[name].plan.version} is in a "
                               f"canary; stop it first: POST /models/{name}/canary/stop", field="name")
            plan = Plan(version=version, **{"min_agreement": rt.settings.gate_min_agreement, **fields},
                        id=uuid.uuid4().hex[:12], started_at=time.time())
            if candidate.spec.kind not in AGREEING_KINDS:
                plan.min_agreement = None  # a generator's point is to differ
            for old in self.folder.glob(f"{name}-*"):  # tallies of canaries that have ended
                shutil.rmtree(old, ignore_errors=True)
            rt._record(name, lambda chosen: chosen.update(canary=asdict(plan)))
            self.follow(rt.control.read())
            log.info("%s: %s version %s: %s started against version %s (%s)", rt.service, name, version, plan.mode,
                     serving.version, ", ".join(f"{k} {v}" for k, v in asdict(plan).items()
                                                if k not in ("version", "id", "started_at")))
            return {"model": name, "serving": serving.version, "state": "running", "canary": asdict(plan)}

    def stop(self, name: str) -> dict:
        rt = self.runtime
        rt._require_ready()
        with rt._changing:
            rt._catch_up()
            rt._known(name)
            canary = self.active.get(name)
            if canary is None:
                raise ApiError(404, "no_canary", f"{name} has no canary running", field="name")
            self._decide(name, canary, "stopped", "stopped over the admin API", canary.figures(canary.merged()))
            return {"model": name, "serving": rt.models[name].version, "state": "stopped",
                    "last_canary": self.last.get(name)}

    # Following the record -----------------------------------------------------------------

    def follow(self, record: dict[str, dict]) -> None:
        """Start and end this worker's canaries as the record says (called under the runtime's lock,
        after the versions it names are loaded)."""
        rt = self.runtime
        gauge = metrics()["canary_active"]
        for name in rt.versions:
            chosen = record.get(name, {})
            if chosen.get("last_canary"):
                self.last[name] = chosen["last_canary"]
            wanted, local = chosen.get("canary"), self.active.get(name)
            if local is not None and (wanted is None or wanted.get("id") != local.plan.id
                                      or local.serving is not rt.models[name]):
                del self.active[name]
                gauge.labels(rt.service, name, local.plan.version, local.plan.mode).set(0)
                ended = self.last.get(name, {})
                if ended.get("id") == local.plan.id:
                    log.info("%s: %s version %s: %s %s (%s)", rt.service, name, local.plan.version, local.plan.mode,
                             ended.get("outcome"), ended.get("reason"))
                local = None
            if wanted is not None and local is None:
                plan = Plan.of(wanted)
                candidate = rt.versions[name].get(plan.version)
                if candidate is None:
                    log.error("%s: %s version %s is in a canary but not loaded here", rt.service, name, plan.version)
                    continue
                self.active[name] = Canary(plan, candidate, rt.models[name], self.folder / f"{name}-{plan.id}")
                gauge.labels(rt.service, name, plan.version, plan.mode).set(1)
                for outcome in OUTCOMES:  # from 0, so that Prometheus's increase() sees the first decision
                    metrics()["canary_decisions"].labels(rt.service, name, plan.version, outcome).inc(0)

    def cancel(self, chosen: dict, reason: str) -> None:
        """In a record change that switches the serving version: a running canary ends with it."""
        if chosen.get("canary"):
            chosen["last_canary"] = {**chosen.pop("canary"), "outcome": "stopped", "reason": reason,
                                     "ended_at": time.time()}

    # Judging ------------------------------------------------------------------------------

    def judge(self) -> None:
        """Every MODEL_CONTROL_POLL seconds: share this worker's tally, judge the sum, decide."""
        for name, canary in list(self.active.items()):
            try:
                canary.write_tally()
            except OSError as exc:
                log.error("%s: cannot write the canary tally %s: %s", self.runtime.service, canary.tally_file, exc)
            tallies = canary.merged()
            canary.last_figures = canary.figures(tallies)
            verdict = canary.judge(tallies) or (("rolled_back", canary.stopped) if canary.stopped else None)
            if verdict is not None:
                with self.runtime._changing:
                    if self.active.get(name) is canary:
                        self._decide(name, canary, *verdict, canary.last_figures)

    def _decide(self, name: str, canary: Canary, outcome: str, reason: str, figures: dict) -> None:
        rt, plan = self.runtime, canary.plan
        if outcome == "promoted":
            try:
                for condition in rt.serve_checks:  # the classifier's taught-examples rule applies here too
                    condition(canary.candidate, canary.serving, False)
            except ApiError as exc:
                outcome, reason = "rolled_back", f"the promotion was refused: {exc.message}"
        decided = []

        def apply(models: dict) -> None:
            chosen = models.get(name)
            if not chosen or (chosen.get("canary") or {}).get("id") != plan.id:
                return  # another worker decided first
            del chosen["canary"]
            if outcome == "promoted":
                chosen["serving"] = plan.version
            chosen["last_canary"] = {**asdict(plan), "outcome": outcome, "reason": reason, "figures": figures,
                                     "serving_before": canary.serving.version, "ended_at": time.time()}
            decided.append(True)

        try:
            rt.control.update(apply)
        except OSError as exc:
            log.error("%s: cannot record the canary decision in %s (tried again next poll): %s", rt.service,
                      rt.control.path, exc)
            return
        if decided:
            metrics()["canary_decisions"].labels(rt.service, name, plan.version, outcome).inc()
            (log.warning if outcome == "rolled_back" else log.info)(
                "%s: %s version %s: %s %s: %s (%s)", rt.service, name, plan.version, plan.mode, outcome, reason,
                ", ".join(f"{k} {v}" for k, v in figures.items() if v is not None))
        rt._apply(rt.control.read())

    def info(self) -> dict:
        running = {name: {"state": "running", **asdict(c.plan), "serving": c.serving.version,
                          "figures": c.last_figures or c.figures(c.tallies),
                          "stopped_here": c.stopped}
                   for name, c in self.active.items()}
        return {name: {"running": running.get(name), "last": self.last.get(name)}
                for name in sorted({*running, *self.last})}
