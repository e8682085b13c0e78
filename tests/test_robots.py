"""MuJoCo robots (issue 28): a tiny soft actor-critic run through checkpoint, resume, export, card,
probes and a real policy service; continuous actions within bounds; `play` over HTTP; the gate.

The tiny run (32-unit networks, 2,048 steps) walks nowhere; what it checks is the path a real
run takes (`python -m training robot --env HalfCheetah-v5`), with the same code.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests

from conftest import POLICIES, ROOT, error_of, running_service
from services.contracts.predictor import Predictor
from services.contracts.repository import version_dirs

pytestmark = pytest.mark.slow
ENV = "HalfCheetah-v5"
TINY = ["--env", ENV, "--hidden", "32", "--learning-starts", "512", "--burst", "64", "--eval-every", "1024",
        "--checkpoint-every", "1024", "--eval-episodes", "3", "--parity-observations", "500"]
ADMIN_KEY = "robot-admin"


def training(*args, timeout=600):
    result = subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """models/policy/halfcheetah/1 from a tiny run, trained in two halves (--resume), with probes."""
    root = tmp_path_factory.mktemp("robot")
    models, runs = root / "models", root / "runs"
    common = [*TINY, "--models-dir", str(models / "policy"), "--runs-dir", str(runs)]
    first = training("robot", *common, "--steps", "1024", "--no-export")
    assert "evaluation: mean return" in first and (runs / "halfcheetah" / "checkpoint.npz").exists()
    second = training("robot", *common, "--steps", "2048", "--resume")
    assert "resumed from" in second and "at step 1,024" in second
    probes = training("probes", "--models-dir", str(models), "--only", "halfcheetah", "--episodes", "1")
    assert json.loads(probes.strip().splitlines()[-1])["probes"] == 1000
    return models


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with running_service("policy", tmp_path_factory.mktemp("robot-server"),
                         env={"MODELS_DIR": str(tiny), "ADMIN_KEY": ADMIN_KEY}) as running:
        yield running


def card_of(models):
    return json.loads((models / "policy" / "halfcheetah" / "1" / "model.json").read_text())


def test_the_card_records_training_quality_parity_and_the_contract(tiny):
    card = card_of(tiny)
    assert card["training"]["timesteps"] == 2048 and len(card["training"]["learning_curve"]) == 2
    assert card["metrics"]["episodes"] == 3 and math.isfinite(card["metrics"]["mean_return"])
    assert card["metrics"]["target"] == {"mean_return": 9500.0, "met": False}
    assert "theirs" in card["metrics"]["published_by_others"]["source"]
    assert card["export"]["parity"]["passed"] and card["export"]["parity"]["actions_within_bounds"]
    contract = card["contract"]
    assert contract["action_squashing"] == "tanh" and [o["name"] for o in contract["outputs"]] == \
        ["action", "action_std", "value", "action_mean"]
    assert len(contract["action_meanings"]) == 6 and contract["action_meanings"][0].startswith("bthigh")
    assert (tiny / "policy" / "halfcheetah" / "1" / "learning_curve.png").stat().st_size > 10_000


def observations(n: int, seed: int = 0) -> np.ndarray:
    import gymnasium as gym

    env, seen = gym.make(ENV), []
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        seen.append(obs)
        obs, *_ = env.step(rng.uniform(-1, 1, 6))
    env.close()
    return np.asarray(seen, np.float32)


def act(server, body, **kw):
    return requests.post(f"{server.url}/act", json=body, timeout=30, **kw)


def test_served_actions_equal_the_onnx_files_in_json_and_npy(server, tiny):
    batch = observations(64)
    expected = Predictor(tiny / "policy" / "halfcheetah" / "1" / "model.onnx")(batch)
    r = act(server, {"observations": batch.tolist(), "model": "halfcheetah"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["actions"], np.float32), expected[0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.json()["values"], np.float32), expected[2], rtol=1e-5, atol=1e-5)
    buffer = io.BytesIO()
    np.save(buffer, batch)
    r = requests.post(f"{server.url}/act?model=halfcheetah", data=buffer.getvalue(), timeout=30,
                      headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    answer = np.load(io.BytesIO(r.content))
    assert answer.dtype == np.float32 and answer.shape == (64, 6)
    np.testing.assert_allclose(answer, expected[0], atol=1e-6)


@pytest.mark.parametrize("value", [0.0, 1e6, -1e6, 1e30, -1e30, 3.0e38, -3.0e38])
def test_actions_stay_within_the_bounds_for_extreme_observations(server, value):
    batch = np.full((4, 17), value, np.float32)
    batch[1, ::2] = -value  # mixed signs too
    for deterministic in (True, False):
        r = act(server, {"observations": batch.tolist(), "model": "halfcheetah", "deterministic": deterministic,
                         "seed": 3})
        assert r.status_code == 200, r.text
        actions = np.asarray(r.json()["actions"])
        assert actions.shape == (4, 6) and np.isfinite(actions).all()
        assert (actions >= -1).all() and (actions <= 1).all(), actions
        if value != 0.0:  # 1e6 is far beyond any rollout (zero may be too: not every dimension crosses it)
            assert r.json()["outside_training_range"] == [True] * 4


def test_observations_outside_the_measured_range_are_flagged(server, tiny):
    known = card_of(tiny)["contract"]["observation_range"]
    inside = (np.asarray(known["low"]) + np.asarray(known["high"])) / 2
    outside = inside.copy()
    outside[8] = known["high"][8] + 1.0  # one joint velocity beyond what the evaluation saw
    r = act(server, {"observations": [inside.tolist(), outside.tolist()], "model": "halfcheetah"})
    assert r.json()["outside_training_range"] == [False, True]
    buffer = io.BytesIO()
    np.save(buffer, np.stack([outside, inside, outside]).astype(np.float32))
    r = requests.post(f"{server.url}/act?model=halfcheetah", data=buffer.getvalue(), timeout=30,
                      headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert r.headers["x-outside-training-range"] == "0,2"


def test_sampling_gives_action_std_and_follows_the_seed(server):
    body = {"observations": observations(8).tolist(), "model": "halfcheetah", "deterministic": False}
    a, b, c = (act(server, {**body, "seed": seed}).json() for seed in (7, 7, 8))
    assert a["actions"] == b["actions"] and a["actions"] != c["actions"]
    std = np.asarray(a["action_std"])
    assert std.shape == (8, 6) and (std > 0).all()
    assert (np.abs(np.asarray(a["actions"])) <= 1).all()


@pytest.mark.parametrize("observation,says", [
    ([0.0] * 16, "expected shape [17], got [16]"),
    ([0.0] * 4, "expected shape [17], got [4]"),  # a CartPole-sized vector
    (["a"] * 17, "got strings"),
])
def test_bad_observations_are_400s_naming_the_problem(server, observation, says):
    error = error_of(act(server, {"observations": [[0.0] * 17, observation], "model": "halfcheetah"}), 400)
    assert error["code"] == "invalid_observation" and error["field"] == "observations[1]" and says in error["message"]


def test_nan_and_a_wrong_npy_shape_are_400s(server):
    body = json.dumps({"observations": [[0.0] * 16 + [math.nan]], "model": "halfcheetah"})
    r = requests.post(f"{server.url}/act", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert error_of(r, 400)["code"] in ("non_finite_observation", "invalid_json")
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 4), np.float32))
    r = requests.post(f"{server.url}/act?model=halfcheetah", data=buffer.getvalue(), timeout=30,
                      headers={"Content-Type": "application/x-npy"})
    error = error_of(r, 400)
    assert error["code"] == "invalid_shape" and "[N, 17]" in error["message"]


def test_info_describes_spaces_joints_and_figures(server, tiny):
    robot = requests.get(f"{server.url}/info", timeout=30).json()["policies"]["halfcheetah"]
    assert robot["env_id"] == ENV and robot["action_space"]["shape"] == [6]
    assert robot["action_space"]["low"] == [-1.0] * 6 and robot["action_squashing"] == "tanh"
    assert robot["action_meanings"] == card_of(tiny)["contract"]["action_meanings"]
    assert robot["measured"]["mean_return"] == card_of(tiny)["metrics"]["mean_return"]
    assert robot["measured"]["target"]["mean_return"] == 9500.0


def test_play_walks_the_robot_over_http_and_records_a_gif(server, tmp_path):
    gif = tmp_path / "cheetah.gif"
    out = subprocess.run([sys.executable, "-m", "training", "play", "--env", ENV, "--url", server.url,
                          "--episodes", "1", "--max-steps", "200", "--record", str(gif), "--record-steps", "20"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "episode   1/1" in out.stdout and "mean return" in out.stdout
    from PIL import Image

    with Image.open(gif) as image:
        assert image.size == (320, 240) and image.n_frames == 10


def test_the_gate_refuses_a_robot_whose_card_measured_a_worse_return(server, tiny):
    version = tiny / "policy" / "halfcheetah" / "1"
    worse = version.parent / "2"
    shutil.copytree(version, worse)
    card = card_of(tiny)
    served = card["metrics"]["mean_return"]
    card["metrics"]["mean_return"] = served - 0.5 * abs(served) - 100  # well beyond the 5% tolerance
    (worse / "model.json").write_text(json.dumps(card))
    r = requests.post(f"{server.url}/models/halfcheetah/versions/2/load", json={}, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    error = error_of(r, 422)
    quality = next(c for c in error["gate"]["checks"] if c["check"] == "quality")
    assert not quality["passed"] and quality["serving_value"] == round(served, 4)
    agreement = next(c for c in error["gate"]["checks"] if c["check"] == "agreement")
    assert agreement["passed"]  # the same network: only the measured return tells them apart


def test_shipped_robots_meet_their_card_contract(policy_server):
    info = requests.get(f"{policy_server.url}/info", timeout=30).json()["policies"]
    for name, env_id, act_dim in (("halfcheetah", "HalfCheetah-v5", 6), ("ant", "Ant-v5", 8)):
        card = json.loads((version_dirs(POLICIES / name)[-1] / "model.json").read_text())  # what serves
        assert info[name]["env_id"] == env_id and info[name]["measured"]["episodes"] == 100
        assert len(card["contract"]["action_meanings"]) == act_dim and card["metrics"]["episodes"] == 100
        assert (POLICIES / name / "probes.npz").exists()
