"""Model versions on a running service: load, gate, switch, roll back, unload (issue 14).

Real `bentoml serve` processes of the policy service, a private copy of the shipped models
with new version folders made from them: an identical copy (passes the gate), a corrupt file
(sha256 refused), another environment's policy (contract refused) and a policy whose actions
are flipped (agreement refused).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import onnx
import pytest
import requests
from onnx import numpy_helper

from conftest import error_of, running_service
from services.contracts.repository import sha256_file

ADMIN_KEY, API_KEY = "admin-secret", "client-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
OBSERVATION = [[0.01, 0.2, -0.03, -0.25]]


def new_version(models: Path, name: str, version: str, source: Path, edit=None) -> Path:
    """A version folder copied from `source` (a version folder), with model.onnx optionally
    changed by edit(onnx_model) and the card's sha256 made to match it."""
    target = models / "policy" / name / version
    shutil.copytree(source, target)
    if edit is not None:
        model = onnx.load(target / "model.onnx")
        edit(model)
        onnx.save(model, target / "model.onnx")
        card = json.loads((target / "model.json").read_text())
        card["sha256"] = sha256_file(target / "model.onnx")
        (target / "model.json").write_text(json.dumps(card, indent=2))
    return target


def flip_actions(model) -> None:
    """Negate the action head: every greedy CartPole action becomes the other one."""
    for tensor in model.graph.initializer:
        if tensor.name.startswith("policy.action_net."):
            tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))


@pytest.fixture()
def versions(models_copy) -> Path:
    cartpole = models_copy / "policy" / "cartpole"
    new_version(models_copy, "cartpole", "2", cartpole / "1")
    corrupt = new_version(models_copy, "cartpole", "3", cartpole / "1")
    with open(corrupt / "model.onnx", "r+b") as f:  # one byte changed: the card's sha256 no longer matches
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    new_version(models_copy, "cartpole", "4", models_copy / "policy" / "lunarlander" / "1")
    new_version(models_copy, "cartpole", "5", cartpole / "1", edit=flip_actions)
    card_edited(models_copy, "policy", "cartpole", "6", lambda card: card["metrics"].update(mean_return=200.0))
    card_edited(models_copy, "policy", "cartpole", "7", lambda card: card["contract"]["action_space"].pop("n"))
    return models_copy


def settings(models: Path, control: Path, **extra) -> dict:
    # Start with version 1: without a pin the newest folder (5) would serve.
    return {"MODELS_DIR": str(models), "MODEL_CONTROL_DIR": str(control), "MODEL_VERSIONS": "cartpole=1",
            "ADMIN_KEY": ADMIN_KEY, "MODEL_CONTROL_POLL": "0.2", **extra}


def admin(server, path: str, body: dict | None = None, headers=ADMIN, timeout: float = 120):
    return requests.post(f"{server.url}{path}", json=body or {}, headers=headers, timeout=timeout)


def act(server, headers=None, **fields):
    return requests.post(f"{server.url}/act", json={"observations": OBSERVATION, "model": "cartpole", **fields},
                         headers=headers, timeout=30)


def info(server, headers=None) -> dict:
    return requests.get(f"{server.url}/info", headers=headers, timeout=10).json()


class Client(threading.Thread):
    """One client sending /act back to back, recording (status, version) of every answer."""

    def __init__(self, server, headers=None):
        super().__init__(daemon=True)
        self.server, self.headers = server, headers
        self.answers: list[tuple[int, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                try:
                    r = session.post(f"{self.server.url}/act", json={"observations": OBSERVATION, "model": "cartpole"},
                                     headers=self.headers, timeout=30)
                    self.answers.append((r.status_code, r.json().get("version") if r.ok else r.text[:200]))
                except requests.RequestException as exc:
                    self.answers.append((0, str(exc)))

    def mark(self) -> int:
        return len(self.answers)


def test_admin_api_is_off_without_admin_key(policy_server):
    error = error_of(admin(policy_server, "/models/cartpole/serve", {"version": "1"}), 403)
    assert error["code"] == "admin_disabled" and "ADMIN_KEY" in error["message"]
    error = error_of(admin(policy_server, "/models/cartpole/versions/1/load"), 403)
    assert error["code"] == "admin_disabled"
    body = info(policy_server)
    assert body["model_control"]["admin_api"].startswith("off")
    assert body["versions"]["cartpole"] == {"serving": "1", "loaded": ["1"], "refused": {}}


def test_load_gate_switch_and_roll_back_under_load(versions, tmp_path):
    env = settings(versions, tmp_path / "control", API_KEY=API_KEY, ROLLOUT_LOG_SECONDS="1")
    with running_service("policy", tmp_path, env=env) as server:
        # The two keys open different doors.
        assert error_of(admin(server, "/models/cartpole/versions/2/load", headers=CLIENT), 401)["code"] == \
            "unauthorized"
        assert error_of(admin(server, "/models/cartpole/versions/2/load", headers={}), 401)["code"] == "unauthorized"
        assert error_of(act(server, headers=ADMIN), 401)["code"] == "unauthorized"

        clients = [Client(server, CLIENT) for _ in range(2)]
        for client in clients:
            client.start()
        time.sleep(1.0)

        loaded = admin(server, "/models/cartpole/versions/2/load")
        assert loaded.status_code == 200, loaded.text
        gate = loaded.json()["gate"]
        assert loaded.json()["state"] == "loaded" and gate["passed"], gate
        checks = {c["check"]: c for c in gate["checks"]}
        assert set(checks) == {"contract", "parity", "outputs", "agreement", "quality"}
        assert checks["quality"]["metric"] == "mean_return" and checks["quality"]["min_value"] == 475.0
        assert checks["agreement"]["agreement"] == 1.0 and checks["agreement"]["probes"] == 1000
        time.sleep(0.5)
        before_switch = [c.mark() for c in clients]

        switched = admin(server, "/models/cartpole/serve", {"version": "2"})
        assert switched.json() == {"model": "cartpole", "serving": "2", "previous": "1", "changed": True}
        after_switch = [c.mark() for c in clients]
        time.sleep(1.0)

        # Per-request version: the old one still answers when asked for.
        r = act(server, headers=CLIENT, version="1")
        assert r.status_code == 200 and r.json()["version"] == "1"
        r = act(server, headers=CLIENT, version=2)
        assert r.status_code == 200 and r.json()["version"] == "2"
        error = error_of(act(server, headers=CLIENT, version="9"), 404)
        assert error["code"] == "version_not_found" and "['1', '2']" in error["message"]

        versions_info = info(server)["versions"]["cartpole"]
        assert versions_info["serving"] == "2" and versions_info["loaded"] == ["1", "2"]

        before_rollback = [c.mark() for c in clients]
        back = admin(server, "/models/cartpole/serve", {"version": 1})
        assert back.json()["serving"] == "1" and back.json()["previous"] == "2"
        after_rollback = [c.mark() for c in clients]
        time.sleep(1.0)
        for client in clients:
            client.stop.set()
            client.join(30)

        for client, a, b, b2, c in zip(clients, before_switch, after_switch, before_rollback, after_rollback):
            answers = client.answers
            failures = [x for x in answers if x[0] != 200]
            assert not failures, failures[:3]
            versions_seen = [v for _, v in answers]
            # One client asks one request at a time: its answers go 1... then 2... then 1... (the
            # one request in flight at each switch may answer from either side of it).
            assert set(versions_seen[:a]) == {"1"}
            assert set(versions_seen[b + 1:b2]) == {"2"} and b2 - b > 5
            assert set(versions_seen[c + 1:]) == {"1"}
            runs = [v for i, v in enumerate(versions_seen) if i == 0 or v != versions_seen[i - 1]]
            assert runs == ["1", "2", "1"], runs

        # The metrics name the version of every answer.
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'model_requests_total{model="cartpole",service="policy",version="2"}' in text
        assert re.search(r'model_serving\{model="cartpole",pid="\d+",service="policy",version="1"\} 1\.0', text)

        # Unload: not the serving version; the other one goes, and requests for it are refused.
        error = error_of(admin(server, "/models/cartpole/versions/1/unload"), 409)
        assert error["code"] == "version_serving"
        r = admin(server, "/models/cartpole/versions/2/unload")
        assert r.status_code == 200 and r.json()["loaded"] == ["1"], r.text
        assert error_of(act(server, headers=CLIENT, version="2"), 404)["code"] == "version_not_found"
        assert error_of(admin(server, "/models/cartpole/serve", {"version": "2"}), 404)["code"] == \
            "version_not_loaded"
        assert "unloaded cartpole version 2" in server.log()
        # While both were loaded, the log named how many answers each version gave.
        assert re.search(r"cartpole answers in the last 1 s by version: 1: \d+, 2 \(serving\): [1-9]", server.log())


def test_bad_versions_are_refused_and_the_old_one_keeps_serving(versions, tmp_path):
    with running_service("policy", tmp_path, env=settings(versions, tmp_path / "control")) as server:
        corrupt = error_of(admin(server, "/models/cartpole/versions/3/load"), 422)
        assert corrupt["code"] == "version_refused" and "sha256" in corrupt["message"]

        incompatible = error_of(admin(server, "/models/cartpole/versions/4/load"), 422)
        assert incompatible["code"] == "gate_failed"
        contract = next(c for c in incompatible["gate"]["checks"] if c["check"] == "contract")
        assert not contract["passed"] and any("observation_space" in p for p in contract["problems"])

        flipped = error_of(admin(server, "/models/cartpole/versions/5/load"), 422)
        assert flipped["code"] == "gate_failed" and "agreement" in flipped["message"]
        agreement = next(c for c in flipped["gate"]["checks"] if c["check"] == "agreement")
        assert agreement["agreement"] < 0.1 and agreement["min_agreement"] == 0.9

        # A card missing a field its kind needs is refused at load, naming the field (not a 500 later).
        incomplete = error_of(admin(server, "/models/cartpole/versions/7/load"), 422)
        assert incomplete["code"] == "version_refused"
        assert "contract.action_space" in incomplete["message"] and "needs n" in incomplete["message"]

        assert error_of(admin(server, "/models/cartpole/versions/77/load"), 404)["code"] == "version_not_found"
        assert error_of(admin(server, "/models/nope/versions/1/load"), 404)["code"] == "model_not_found"
        assert error_of(admin(server, "/models/cartpole/serve", {"version": "5"}), 404)["code"] == \
            "version_not_loaded"

        body = info(server)["versions"]["cartpole"]
        assert body["serving"] == "1" and body["loaded"] == ["1"]
        assert set(body["refused"]) == {"3", "4", "5", "7"} and "sha256" in body["refused"]["3"]
        r = act(server)
        assert r.status_code == 200 and r.json()["version"] == "1"
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert re.search(r'model_info\{model="cartpole",pid="\d+",provider="\w+",service="policy",sha256="\w+",'
                         r'version="4"\} 0\.0', text), "a refused version is not counted as loaded"

        # The gate's threshold is the admin's to lower, per call: the flipped policy then loads.
        r = admin(server, "/models/cartpole/versions/5/load", {"min_agreement": 0})
        assert r.status_code == 200 and r.json()["gate"]["passed"], r.text
        assert act(server, version="5").json()["actions"] == [1 - act(server).json()["actions"][0]]
        assert info(server)["versions"]["cartpole"]["refused"] == {"3": body["refused"]["3"],
                                                                  "4": body["refused"]["4"],
                                                                  "7": body["refused"]["7"]}
        # ... but not the quality check: a version whose card measured a worse return stays out.
        worse = error_of(admin(server, "/models/cartpole/versions/6/load", {"min_agreement": 0}), 422)
        quality = next(c for c in worse["gate"]["checks"] if c["check"] == "quality")
        assert not quality["passed"] and quality["value"] == 200.0 and quality["serving_value"] == 500.0


@pytest.mark.parametrize("path, body, status, code", [
    ("/models/cartpole/serve", {"version": "two"}, 400, "invalid_field"),
    ("/models/cartpole/serve", {}, 400, "invalid_field"),
    ("/models/cartpole/serve", {"version": "1", "force": "yes"}, 400, "invalid_field"),
    ("/models/cartpole/serve", {"version": "1", "canary": 5}, 400, "unknown_field"),
    ("/models/cartpole/versions/2/load", {"min_agreement": 1.5}, 400, "invalid_field"),
    ("/models/cartpole/versions/2/load", [1], 400, "invalid_request"),
    ("/models/cartpole/versions/2/delete", {}, 404, "not_found"),
])
def test_admin_requests_are_validated(lifecycle_server, path, body, status, code):
    r = requests.post(f"{lifecycle_server.url}{path}", data=json.dumps(body), headers=ADMIN, timeout=30)
    assert error_of(r, status)["code"] == code


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    models = tmp / "models"
    shutil.copytree(Path(__file__).resolve().parent.parent / "models" / "policy", models / "policy")
    with running_service("policy", tmp, env=settings(models, tmp / "control")) as server:
        yield server


def test_admin_body_limits(lifecycle_server):
    r = requests.post(f"{lifecycle_server.url}/models/cartpole/serve", data=b"{" + b" " * 10_000 + b"}",
                      headers=ADMIN, timeout=30)
    assert error_of(r, 413)["code"] == "body_too_large"
    r = requests.post(f"{lifecycle_server.url}/models/cartpole/serve", data=b"{not json", headers=ADMIN, timeout=30)
    assert error_of(r, 400)["code"] == "invalid_request"
    r = requests.get(f"{lifecycle_server.url}/models/cartpole/serve", headers=ADMIN, timeout=30)
    assert error_of(r, 405)["code"] == "method_not_allowed"


def test_the_openapi_document_has_the_admin_api(lifecycle_server):
    paths = requests.get(f"{lifecycle_server.url}/docs.json", timeout=30).json()["paths"]
    for route in ("/models/{name}/versions/{version}/load", "/models/{name}/versions/{version}/unload",
                  "/models/{name}/serve"):
        operation = paths[route]["post"]
        assert operation["parameters"][0]["schema"]["enum"] == \
            ["ant", "cartpole", "cartpole_pixels", "halfcheetah", "lunarlander"]
        assert {"200", "401", "403", "404", "409", "415", "504"} <= set(operation["responses"])
        assert ("422" in operation["responses"]) == route.endswith("/load")  # only a load is refused or gated


def test_every_worker_follows_and_a_restart_keeps_the_choice(versions, tmp_path):
    control = tmp_path / "control"
    env = settings(versions, control, WORKERS="2")
    with running_service("policy", tmp_path, env=env) as server:
        assert admin(server, "/models/cartpole/versions/2/load").status_code == 200
        assert admin(server, "/models/cartpole/serve", {"version": "2"}).json()["serving"] == "2"
        time.sleep(1.5)  # several MODEL_CONTROL_POLL periods: the other worker has followed
        # Each worker either switched, or (still starting when the choice was made) started with it.
        log = server.log()
        assert log.count("cartpole now serves version 2 (was 1)") + \
            log.count("cartpole starts with version 2, chosen over the admin API") == 2, log[-3000:]
        # Fresh connections spread over both workers; each answers with the new version.
        seen = {act(server).json()["version"] for _ in range(40)}
        assert seen == {"2"}
        record = json.loads((control / "policy" / "serving.json").read_text())
        assert record["models"]["cartpole"] == {"serving": "2", "loaded": ["1", "2"], "default": "1"}
        assert record["repository"] == str((versions / "policy").resolve())

    # A restart serves what was chosen, not the MODEL_VERSIONS pin, and says so.
    with running_service("policy", tmp_path, env=settings(versions, control)) as server:
        body = info(server)["versions"]["cartpole"]
        assert body["serving"] == "2" and body["loaded"] == ["1", "2"]
        assert act(server).json()["version"] == "2"
        assert "chosen over the admin API" in server.log()

    # Until the deployment changes what it starts with (here a new pin; a new image with a newer
    # version folder is the same): then the deployment wins and the stale choice is dropped.
    with running_service("policy", tmp_path, env=settings(versions, control, MODEL_VERSIONS="cartpole=2")) as server:
        assert info(server)["versions"]["cartpole"]["loaded"] == ["2"]
        assert "the deployment's choice wins" in server.log()
    assert "cartpole" not in json.loads((control / "policy" / "serving.json").read_text())["models"]


def renamed_copy(models: Path, service: str, name: str, version: str) -> None:
    """Version `version` of a model: the same weights in a new file (another sha256), as a
    re-export gives; its taught examples are its own."""
    target = models / service / name / version
    shutil.copytree(models / service / name / "1", target)
    model = onnx.load(target / "model.onnx")
    model.doc_string = f"{name} version {version}"
    onnx.save(model, target / "model.onnx")
    card = json.loads((target / "model.json").read_text())
    card["sha256"] = sha256_file(target / "model.onnx")
    (target / "model.json").write_text(json.dumps(card, indent=2))


def float_classifier_copy(models: Path) -> None:
    """The shipped classifier networks with version 1 only (the float originals): the versions a
    test makes are made from it, under names the shipped int8 versions would otherwise hold."""
    source = Path(__file__).resolve().parent.parent / "models" / "classifier"
    shutil.copytree(source, models / "classifier",
                    ignore=lambda folder, names: [n for n in names if n.isdigit() and n != "1"])


def test_a_classifier_version_is_taught_before_it_serves(tmp_path):
    models = tmp_path / "models"
    float_classifier_copy(models)
    renamed_copy(models, "classifier", "faces", "2")
    env = {"MODELS_DIR": str(models), "MODEL_CONTROL_DIR": str(tmp_path / "control"), "ADMIN_KEY": ADMIN_KEY,
           "MODEL_VERSIONS": "faces=1", "TEACH_STORE": f"sqlite:///{tmp_path / 'taught.db'}"}
    faces = Path(__file__).parent / "fixtures" / "faces"

    def post(server, route, *names, **data):
        files = [("images", (f"{n}.jpg", (faces / f"{n}.jpg").read_bytes(), "image/jpeg")) for n in names]
        return requests.post(f"{server.url}{route}", files=files, data=data, timeout=120)

    with running_service("classifier", tmp_path, env=env) as server:
        assert post(server, "/teach", "obama", name="Barack Obama").json()["version"] == "1"
        r = admin(server, "/models/faces/versions/2/load")
        assert r.status_code == 200 and r.json()["gate"]["passed"], r.text
        agreement = next(c for c in r.json()["gate"]["checks"] if c["check"] == "agreement")
        assert agreement["agreement"] == 1.0 and agreement["probes"] == 9

        # Taught examples belong to the version whose descriptors made them.
        error = error_of(admin(server, "/models/faces/serve", {"version": "2"}), 409)
        assert error["code"] == "untaught_version" and "version=2" in error["message"]
        r = post(server, "/teach", "obama", name="Barack Obama", version="2")
        assert r.status_code == 200 and r.json()["version"] == "2", r.text
        r = post(server, "/check", "obama2", version="2")
        assert r.json()["results"][0]["faces"][0]["name"] == "Barack Obama" and r.json()["version"] == "2"
        assert admin(server, "/models/faces/serve", {"version": "2"}).json()["serving"] == "2"
        r = post(server, "/check", "obama3")
        assert r.json()["version"] == "2" and r.json()["results"][0]["faces"][0]["name"] == "Barack Obama"

        # Rolling back finds version 1's examples where they were.
        assert admin(server, "/models/faces/serve", {"version": "1"}).json()["serving"] == "1"
        taught = requests.post(f"{server.url}/taught", json={}, timeout=10).json()
        assert taught["version"] == "1" and taught["names"] == [{"name": "Barack Obama", "examples": 1}]
        forgotten = requests.post(f"{server.url}/forget", json={"name": "Barack Obama", "version": "2"}, timeout=10)
        assert forgotten.json() == {"forgotten": 1}
        assert error_of(admin(server, "/models/faces/serve", {"version": "2"}), 409)["code"] == "untaught_version"
        r = admin(server, "/models/faces/serve", {"version": "2", "force": True})
        assert r.status_code == 200 and r.json()["serving"] == "2"
        r = post(server, "/check", "obama2")
        assert r.json()["version"] == "2" and r.json()["results"][0]["faces"][0]["name"] is None


def card_edited(models: Path, service: str, name: str, version: str, edit) -> None:
    """A version with the same weights whose card says something else (what a retrained model's
    card could say)."""
    target = models / service / name / version
    shutil.copytree(models / service / name / "1", target)
    card = json.loads((target / "model.json").read_text())
    edit(card)
    (target / "model.json").write_text(json.dumps(card, indent=2))


def in_process_runtime(models: Path, tmp_path: Path, service: str, kind, monkeypatch, pins: str = "fashion=1"):
    from services.runtime import Runtime, Settings

    for key, value in {"MODELS_DIR": str(models), "MODEL_CONTROL_DIR": str(tmp_path / "control"),
                       "MODEL_VERSIONS": pins}.items():
        monkeypatch.setenv(key, value)
    runtime = Runtime(service, kind, Settings.from_env(service))  # this test's settings, not the process's
    assert runtime.wait(120), runtime.failure
    return runtime


def test_the_generator_gate_compares_measured_fid(tmp_path, monkeypatch):
    from services.runtime import ApiError

    models = tmp_path / "models"
    # version 1 only: the versions below are made from it (a shipped later version has another contract)
    shutil.copytree(Path(__file__).resolve().parent.parent / "models" / "generator" / "fashion" / "1",
                    models / "generator" / "fashion" / "1")
    fid = json.loads((models / "generator" / "fashion" / "1" / "model.json").read_text())["metrics"]["fid"]
    card_edited(models, "generator", "fashion", "2", lambda card: card["metrics"].update(fid=fid * 0.9))
    card_edited(models, "generator", "fashion", "3", lambda card: card["metrics"].update(fid=fid * 1.1))
    card_edited(models, "generator", "fashion", "4", lambda card: card["contract"].update(latent_dim=64))
    runtime = in_process_runtime(models, tmp_path, "generator", "generator", monkeypatch)

    report = runtime.load_version("fashion", "2")["gate"]
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] and checks["outputs"]["within_output_range"] and checks["outputs"]["probes"] == 64
    assert checks["quality"]["metric"] == "fid" and checks["quality"]["value"] < checks["quality"]["serving_value"]
    assert "agreement" not in checks
    with pytest.raises(ApiError) as worse:
        runtime.load_version("fashion", "3")
    assert worse.value.code == "gate_failed" and "quality check failed" in worse.value.message
    with pytest.raises(ApiError) as latent:
        runtime.load_version("fashion", "4")
    assert "contract.latent_dim" in latent.value.message
    assert sorted(runtime.versions["fashion"]) == ["1", "2"] and set(runtime.refused["fashion"]) == {"3", "4"}


def test_the_classifier_gate_keeps_the_labels_clients_read(tmp_path, monkeypatch):
    from services.runtime import ApiError

    models = tmp_path / "models"
    float_classifier_copy(models)
    card_edited(models, "classifier", "fashion", "2", lambda card: card["contract"]["labels"].reverse())
    renamed_copy(models, "classifier", "fashion", "3")
    from services.classifier.faces import KINDS

    runtime = in_process_runtime(models, tmp_path, "classifier", KINDS, monkeypatch)
    with pytest.raises(ApiError) as relabelled:
        runtime.load_version("fashion", "2")
    assert relabelled.value.code == "gate_failed" and "contract.labels" in relabelled.value.message
    report = runtime.load_version("fashion", "3")["gate"]
    agreement = next(c for c in report["checks"] if c["check"] == "agreement")
    assert agreement["agreement"] == 1.0 and agreement["probes"] == 500


def test_unloading_frees_the_session(models_copy, tmp_path, monkeypatch):
    import asyncio
    import gc
    import weakref

    import numpy as np

    new_version(models_copy, "cartpole", "2", models_copy / "policy" / "cartpole" / "1")
    runtime = in_process_runtime(models_copy, tmp_path, "policy", "policy", monkeypatch, pins="cartpole=1")
    runtime.load_version("cartpole", "2")
    model = runtime.get("cartpole", version="2")
    asyncio.run(model(np.zeros((3, 4), np.float32)))  # its batcher has run: a task and a thread to let go
    model_ref, session_ref = weakref.ref(model), weakref.ref(model.session)
    del model
    runtime.unload_version("cartpole", "2")
    deadline = time.monotonic() + 10
    while session_ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert model_ref() is None and session_ref() is None
    assert sorted(runtime.versions["cartpole"]) == ["1"]


def test_the_probes_command_reproduces_the_shipped_probes(tmp_path):
    import subprocess
    import sys

    import numpy as np

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "models", tmp_path / "models", ignore=shutil.ignore_patterns("probes.npz"))
    subprocess.run([sys.executable, "-m", "training", "probes", "--models-dir", str(tmp_path / "models")],
                   cwd=root, check=True, capture_output=True, timeout=300)
    shipped = sorted(p.relative_to(root / "models") for p in (root / "models").glob("*/*/probes.npz"))
    made = sorted(p.relative_to(tmp_path / "models") for p in (tmp_path / "models").glob("*/*/probes.npz"))
    assert shipped == made and len(shipped) == 10  # every model but the generator (seeds are its probes)
    for path in shipped:
        with np.load(root / "models" / path) as a, np.load(tmp_path / "models" / path) as b:
            assert sorted(a.files) == sorted(b.files)
            if path.parts[0] == "policy":
                # Rollouts act through onnxruntime, whose kernels differ in the last bit between
                # CPUs: a near-tie action may flip on another machine and the episode go its own
                # way after it. The start of the first episode is the same everywhere.
                assert a["inputs"].shape == b["inputs"].shape
                np.testing.assert_allclose(a["inputs"][:50], b["inputs"][:50], rtol=1e-5, atol=1e-6)
                continue
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{path}: {key}")


def test_an_unreadable_probes_file_refuses_the_version_with_the_reason(models_copy, tmp_path, monkeypatch):
    from services.runtime import ApiError

    new_version(models_copy, "cartpole", "2", models_copy / "policy" / "cartpole" / "1")
    (models_copy / "policy" / "cartpole" / "probes.npz").write_bytes(b"not a numpy archive")
    runtime = in_process_runtime(models_copy, tmp_path, "policy", "policy", monkeypatch, pins="cartpole=1")
    with pytest.raises(ApiError) as refused:
        runtime.load_version("cartpole", "2")
    assert refused.value.status == 422 and "the gate could not run" in refused.value.message
    assert sorted(runtime.versions["cartpole"]) == ["1"] and "2" in runtime.refused["cartpole"]


def test_a_service_hook_that_fails_on_another_workers_load_leaves_the_worker_serving(models_copy, tmp_path,
                                                                                     monkeypatch):
    """A version another worker loaded is loaded here from the control record: if the service's own
    preparation fails (the classifier's cache or statistics), this worker refuses that version and
    says why, instead of letting the exception end the thread that follows the record."""
    new_version(models_copy, "cartpole", "2", models_copy / "policy" / "cartpole" / "1")
    runtime = in_process_runtime(models_copy, tmp_path, "policy", "policy", monkeypatch, pins="cartpole=1")

    def broken(model):
        raise RuntimeError("statistics unreadable")

    runtime.on_load.append(broken)
    assert runtime._load_quietly("cartpole", "2") is None
    assert "statistics unreadable" in runtime.refused["cartpole"]["2"]
    assert runtime.get("cartpole").version == "1" and "2" not in runtime.versions["cartpole"]
    # Loaded over the admin API, the same failure is a 422 naming it, not a 500.
    from services.runtime import ApiError

    del runtime.refused["cartpole"]["2"]
    with pytest.raises(ApiError) as refused:
        runtime.load_version("cartpole", "2")
    assert refused.value.status == 422 and refused.value.code == "version_refused"
    assert "statistics unreadable" in refused.value.message and "2" not in runtime.versions["cartpole"]
