"""Canary releases and shadow traffic on a running policy service (issue 30).

Real `bentoml serve` processes, a private copy of the shipped CartPole policy with three new
versions: an identical copy (promoted), one whose value output turns NaN once the cart is more
than 1.0 from the centre (it passes the gate, whose probes stay near the centre, and fails on
live traffic), and one whose actions are flipped (loaded with the gate's agreement lowered,
then caught disagreeing on live traffic).
"""

from __future__ import annotations

import json

import math
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from onnx import helper, numpy_helper

from conftest import POLICIES, error_of, running_service
from test_model_lifecycle import admin, flip_actions, info, new_version, settings

CENTRE = [0.01, 0.2, -0.03, -0.25]
OFF_CENTRE = [1.5, 0.2, -0.03, -0.25]  # the NaN version's trap; the shipped policy answers it


def nan_off_centre(model) -> None:
    """value + 0 * log(relu(1 - |x|)): NaN where the cart position |x| >= 1, unchanged elsewhere."""
    graph = model.graph
    producer = next(n for n in graph.node if "value" in n.output)
    producer.output[list(producer.output).index("value")] = "value_raw"
    const = lambda name, values, dtype=np.float32: graph.initializer.append(  # noqa: E731
        numpy_helper.from_array(np.array(values, dtype), name))
    const("trap_start", [0], np.int64), const("trap_end", [1], np.int64), const("trap_axis", [1], np.int64)
    const("trap_one", [1.0]), const("trap_zero", [0.0]), const("trap_shape", [-1], np.int64)
    obs = graph.input[0].name
    graph.node.extend([
        helper.make_node("Slice", [obs, "trap_start", "trap_end", "trap_axis"], ["trap_x"]),
        helper.make_node("Abs", ["trap_x"], ["trap_abs"]),
        helper.make_node("Sub", ["trap_one", "trap_abs"], ["trap_gap"]),
        helper.make_node("Relu", ["trap_gap"], ["trap_relu"]),
        helper.make_node("Log", ["trap_relu"], ["trap_log"]),
        helper.make_node("Mul", ["trap_log", "trap_zero"], ["trap_nan"]),
        helper.make_node("Reshape", ["trap_nan", "trap_shape"], ["trap_flat"]),
        helper.make_node("Add", ["value_raw", "trap_flat"], ["value"]),
    ])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary")
    models = tmp / "models"
    shutil.copytree(POLICIES, models / "policy")
    cartpole = models / "policy" / "cartpole"
    new_version(models, "cartpole", "2", cartpole / "1")
    new_version(models, "cartpole", "3", cartpole / "1", edit=nan_off_centre)
    new_version(models, "cartpole", "4", cartpole / "1", edit=flip_actions)
    with running_service("policy", tmp, env=settings(models, tmp / "control")) as server:
        for version, body in (("2", {}), ("3", {}), ("4", {"min_agreement": 0})):
            r = admin(server, f"/models/cartpole/versions/{version}/load", body)
            assert r.status_code == 200 and r.json()["gate"]["passed"], r.text
        server.control = tmp / "control"
        yield server


class Clients:
    """Threads sending /act back to back with `observation`; every answer kept."""

    def __init__(self, server, observation, count: int = 4):
        self.server, self.observation, self.answers, self.stop = server, observation, [], threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(count)]

    def run(self):
        with requests.Session() as session:
            while not self.stop.is_set():
                r = session.post(f"{self.server.url}/act", json={"observations": [self.observation],
                                                                 "model": "cartpole"}, timeout=30)
                self.answers.append((r.status_code, r.json()))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def serve_one(server):
    r = admin(server, "/models/cartpole/serve", {"version": "1"})
    assert r.status_code == 200, r.text


def ended(server, timeout: float = 60) -> dict:
    """The canary's outcome from /info, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = info(server)["model_control"]["canaries"].get("cartpole", {})
        if state.get("running") is None and state.get("last"):
            return state["last"]
        time.sleep(0.2)
    raise AssertionError(f"the canary did not end: {state}")


def canary(server, **plan):
    r = admin(server, "/models/cartpole/canary", plan)
    assert r.status_code == 200, r.text
    return r.json()["canary"]


def test_a_canary_that_errors_on_live_inputs_rolls_back_and_clients_never_see_it(server):
    serve_one(server)
    with Clients(server, OFF_CENTRE) as clients:
        plan = canary(server, version="3", share=0.5, min_requests=500, window_s=600)
        last = ended(server, 30)
    assert last["id"] == plan["id"] and last["outcome"] == "rolled_back"
    assert "NaN" in last["reason"] and last["figures"]["candidate_errors"] >= 1
    # Every client got the serving version's answer, finite, never a 5xx: the failed runs were answered again.
    assert clients.answers and all(status == 200 for status, _ in clients.answers)
    assert {body["version"] for _, body in clients.answers} == {"1"}
    assert all(math.isfinite(body["values"][0]) for _, body in clients.answers)
    assert info(server)["versions"]["cartpole"]["serving"] == "1"
    assert "canary rolled_back" in server.log()
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert re.search(r'model_canary_decisions_total\{model="cartpole",outcome="rolled_back",service="policy",'
                     r'version="3"\} [1-9]', metrics), metrics[-2000:]


def test_a_canary_that_disagrees_rolls_back_within_its_window(server):
    serve_one(server)
    with Clients(server, CENTRE) as clients:
        canary(server, version="4", share=0.5, min_requests=500, window_s=600, min_agreement=0.9, compare_share=1.0,
               min_compared=20)
        last = ended(server, 30)
        mark = len(clients.answers)
        time.sleep(1.0)
    assert last["outcome"] == "rolled_back" and "agreement" in last["reason"]
    assert last["figures"]["agreement"] < 0.9 and last["figures"]["compared_rows"] >= 1
    assert all(status == 200 for status, _ in clients.answers)
    # After the decision (and one poll for the worker to follow), only the serving version answers.
    assert {body["version"] for _, body in clients.answers[mark + 20:]} == {"1"}


def test_shadow_answers_never_reach_clients(server):
    serve_one(server)
    shipped = requests.post(f"{server.url}/act", json={"observations": [CENTRE], "model": "cartpole"},
                            timeout=10).json()["actions"]
    with Clients(server, CENTRE) as clients:
        canary(server, version="4", mode="shadow", share=1.0, min_requests=500, window_s=600, min_compared=30)
        last = ended(server, 30)
    assert last["mode"] == "shadow" and last["outcome"] == "rolled_back" and "agreement" in last["reason"]
    assert last["figures"]["compared_rows"] >= 1
    assert {body["version"] for _, body in clients.answers} == {"1"}
    assert all(body["actions"] == shipped for _, body in clients.answers)  # never the flipped action


def test_a_good_canary_is_promoted_under_traffic(server):
    serve_one(server)
    with Clients(server, CENTRE) as clients:
        plan = canary(server, version="2", share=0.5, min_requests=120, window_s=2, min_compared=10,
                      max_p99_ratio=5.0)
        running = info(server)["model_control"]["canaries"]["cartpole"]["running"]
        assert running["version"] == "2" and running["share"] == 0.5
        last = ended(server, 60)
        time.sleep(0.5)
    assert last["id"] == plan["id"] and last["outcome"] == "promoted", last
    assert last["figures"]["candidate_requests"] >= 120 and last["figures"]["agreement"] == 1.0
    assert all(status == 200 for status, _ in clients.answers)
    assert {body["version"] for _, body in clients.answers} == {"1", "2"}  # both answered during the canary
    assert clients.answers[-1][1]["version"] == "2"
    assert info(server)["versions"]["cartpole"]["serving"] == "2"
    record = json.loads((server.control / "policy" / "serving.json").read_text())["models"]["cartpole"]
    assert record["serving"] == "2" and "canary" not in record and record["last_canary"]["outcome"] == "promoted"
    serve_one(server)


@pytest.mark.parametrize("path, body, status, code", [
    ("/models/cartpole/canary", {"version": "2", "share": 0}, 400, "invalid_field"),
    ("/models/cartpole/canary", {"version": "2", "share": 1.5}, 400, "invalid_field"),
    ("/models/cartpole/canary", {"version": "2", "mode": "blue"}, 400, "invalid_field"),
    ("/models/cartpole/canary", {"version": "2", "min_requests": 1.5}, 400, "invalid_field"),
    ("/models/cartpole/canary", {"version": "2", "max_error_rate": True}, 400, "invalid_field"),
    ("/models/cartpole/canary", {"version": "2", "colour": 1}, 400, "unknown_field"),
    ("/models/cartpole/canary", {}, 400, "invalid_field"),
    ("/models/cartpole/canary", {"version": "1"}, 409, "canary_of_serving"),
    ("/models/cartpole/canary", {"version": "9"}, 404, "version_not_loaded"),
    ("/models/nothing/canary", {"version": "2"}, 404, "model_not_found"),
    ("/models/cartpole/canary/stop", {}, 404, "no_canary"),
])
def test_canary_requests_are_validated(server, path, body, status, code):
    serve_one(server)
    assert error_of(admin(server, path, body), status)["code"] == code


def test_a_running_canary_is_stopped_or_ended_by_a_switch(server):
    serve_one(server)
    canary(server, version="2", share=0.1, window_s=600)
    assert error_of(admin(server, "/models/cartpole/canary", {"version": "4"}), 409)["code"] == "canary_in_progress"
    assert error_of(admin(server, "/models/cartpole/versions/2/unload"), 409)["code"] == "version_in_canary"
    r = admin(server, "/models/cartpole/canary/stop")
    assert r.status_code == 200 and r.json()["last_canary"]["outcome"] == "stopped"
    canary(server, version="2", share=0.1, window_s=600)
    assert admin(server, "/models/cartpole/serve", {"version": "4"}).status_code == 200
    last = ended(server, 10)
    assert last["outcome"] == "stopped" and "switched to 4" in last["reason"]
    assert requests.post(f"{server.url}/models/cartpole/canary", json={"version": "2"}, timeout=10).status_code == 401
    serve_one(server)


def test_every_worker_follows_the_decision(tmp_path, models_copy):
    cartpole = models_copy / "policy" / "cartpole"
    new_version(models_copy, "cartpole", "2", cartpole / "1")
    env = settings(models_copy, tmp_path / "control", WORKERS="2")
    with running_service("policy", tmp_path, env=env) as server:
        assert admin(server, "/models/cartpole/versions/2/load").status_code == 200
        deadline = time.monotonic() + 60  # the other worker loads it too
        while server.log().count("loaded cartpole version 2 on") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        with Clients(server, CENTRE, count=6) as clients:
            canary(server, version="2", share=0.5, min_requests=120, window_s=2, min_compared=10, max_p99_ratio=5.0)
            last = ended(server, 60)
            time.sleep(1.5)
        assert last["outcome"] == "promoted", last
        # Each worker counted its own traffic into the sum the decision was made on ...
        tallies = list((tmp_path / "control" / "policy" / "canary").glob(f"cartpole-{last['id']}/*.json"))
        assert len(tallies) == 2, tallies
        # ... and each switched when it was decided (one log line per worker).
        assert server.log().count("cartpole now serves version 2 (was 1)") == 2, server.log()[-3000:]
        seen = {requests.post(f"{server.url}/act", json={"observations": [CENTRE], "model": "cartpole"},
                              timeout=10).json()["version"] for _ in range(40)}
        assert seen == {"2"}
        assert all(status == 200 for status, _ in clients.answers)


def test_the_judge_decides_as_soon_as_the_limits_cannot_be_met():
    """The judge's arithmetic on tallies, without a service (the rest of this file runs one)."""
    from types import SimpleNamespace

    from services.runtime.canary import Canary, Plan, Tally

    model = SimpleNamespace(spec=SimpleNamespace(kind="policy"), version="1")
    plan = Plan(version="2", min_requests=100, max_error_rate=0.05, min_agreement=0.9, min_compared=50,
                window_s=10, max_p99_ratio=2.0, started_at=1000.0)
    judge = Canary(plan, model, model, Path("/nonexistent")).judge

    def tallies(requests=0, errors=0, compared=0, agreed=0, ms=1.0, serving_ms=1.0):
        c, s = Tally(), Tally()
        for _ in range(requests):
            c.took(ms / 1000)
        for _ in range(200):
            s.took(serving_ms / 1000)
        c.requests += errors
        c.errors, c.compared, c.agreed = errors, compared, agreed
        return {"candidate": c, "serving": s}

    assert judge(tallies(10, errors=5), now=1001) is None            # 5 of 100 allowed: not decided yet
    assert judge(tallies(10, errors=6), now=1001)[0] == "rolled_back"  # 6 > 5: cannot be met any more
    assert judge(tallies(10, compared=10, agreed=5), now=1001) is None  # 5 of 50 may disagree
    assert judge(tallies(10, compared=10, agreed=4), now=1001)[0] == "rolled_back"
    assert judge(tallies(150, compared=60, agreed=60, ms=3.0), now=1001)[0] == "rolled_back"  # p99 3x
    assert judge(tallies(150, compared=60, agreed=60), now=1005) is None  # the window has not passed
    assert judge(tallies(150, compared=40, agreed=40), now=1011) is None  # too few compared rows
    assert judge(tallies(150, compared=60, agreed=60), now=1011)[0] == "promoted"


def test_a_classifier_canary_answers_classify_and_leaves_teaching_to_the_serving_version(tmp_path):
    """/classify goes through the canary; the teach endpoints (taught state belongs to a version)
    and the face networks do not."""
    from classifier_helpers import fashion_png
    from test_model_lifecycle import ADMIN_KEY, float_classifier_copy, renamed_copy

    models = tmp_path / "models"
    float_classifier_copy(models)
    renamed_copy(models, "classifier", "fashion", "2")
    renamed_copy(models, "classifier", "faces", "2")
    env = {"MODELS_DIR": str(models), "MODEL_CONTROL_DIR": str(tmp_path / "control"), "ADMIN_KEY": ADMIN_KEY,
           "MODEL_VERSIONS": "fashion=1,faces=1", "MODEL_CONTROL_POLL": "0.2",
           "TEACH_STORE": f"sqlite:///{tmp_path / 'taught.db'}"}
    with running_service("classifier", tmp_path, env=env) as server:
        assert admin(server, "/models/fashion/versions/2/load").status_code == 200
        assert admin(server, "/models/faces/versions/2/load").status_code == 200
        refused = error_of(admin(server, "/models/faces/canary", {"version": "2"}), 422)
        assert refused["code"] == "canary_unsupported"
        plan = {"version": "2", "share": 0.5, "min_requests": 12, "window_s": 1, "compare_share": 1.0,
                "min_compared": 6}
        assert admin(server, "/models/fashion/canary", plan).status_code == 200
        versions = set()
        with requests.Session() as session:
            for i in range(30):
                r = session.post(f"{server.url}/classify", files=[("images", ("x.png", fashion_png(i % 5),
                                                                              "image/png"))], timeout=30)
                assert r.status_code == 200, r.text
                versions.add(r.json()["version"])
                if i == 0:  # teaching during the canary uses the serving version
                    r = session.post(f"{server.url}/teach", files=[("images", ("x.png", fashion_png(0),
                                                                               "image/png"))],
                                     data={"name": "shirt", "model": "fashion"}, timeout=30)
                    assert r.status_code == 200 and r.json()["version"] == "1", r.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            last = info(server)["model_control"]["canaries"].get("fashion", {}).get("last")
            if last:
                break
            time.sleep(0.2)
        assert versions == {"1", "2"}
        # The serving version has a taught example and version 2 none: the promotion is refused
        # by the classifier's own rule, so the canary ends rolled back, saying why.
        assert last["outcome"] == "rolled_back" and "untaught_version" not in last["reason"]
        assert "taught" in last["reason"] and last["figures"]["agreement"] == 1.0
        assert info(server)["versions"]["fashion"]["serving"] == "1"
