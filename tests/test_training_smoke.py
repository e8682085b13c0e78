"""Train -> evaluate -> export -> serve, with budgets of seconds, into a temporary repository.

Runs the project's real commands as a user would: `python -m training policy` for a
Discrete (CartPole) and a Box (Pendulum) action space, then `python -m services` (the
launcher) on that repository, then HTTP calls, then Ctrl-C.
"""

import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests

from conftest import ROOT, free_port
from services.contracts import repository

pytestmark = pytest.mark.slow  # trains models: `pytest -m "not slow"` leaves it out


def train(models_dir, *args):
    command = [sys.executable, "-m", "training", "policy", "--models-dir", str(models_dir), "--seed", "1",
               "--eval-episodes", "5", "--curve-episodes", "2", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_train_export_and_serve(tmp_path):
    root = tmp_path / "models"
    models = root / "policy"
    out = train(models, "--env", "CartPole-v1", "--name", "cartpole-smoke", "--timesteps", "4000", "--n-envs", "4")
    assert "[eval] step" in out and "evaluation: mean return" in out
    train(models, "--env", "Pendulum-v1", "--name", "pendulum", "--timesteps", "2048", "--n-envs", "2")

    for name in ("cartpole-smoke", "pendulum"):
        entry = repository.resolve(models, name, kind="policy")  # verifies the sha256 the card records
        onnx.checker.check_model(str(entry.path))
        card = entry.card
        assert card["export"]["parity"]["passed"] and card["export"]["parity"]["observations"] >= 500
        assert card["training"]["seed"] == 1 and "python -m training policy" in card["training"]["command"]
        assert card["metrics"]["episodes"] == 5 and np.isfinite(card["metrics"]["mean_return"])
        assert (entry.path.parent / "learning_curve.png").stat().st_size > 5000
        session = ort.InferenceSession(str(entry.path), providers=["CPUExecutionProvider"])
        shape = card["contract"]["observation_space"]["shape"]
        for n in (1, 7, 300):  # the batch axis is dynamic
            outputs = session.run(None, {"observation": np.zeros((n, *shape), np.float32)})
            assert all(len(o) == n for o in outputs)
    assert repository.resolve(models, "pendulum").card["contract"]["action_space"]["type"] == "Box"

    port = free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "services", "--models-dir", str(root),
                                 "--port", f"policy={port}"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = launcher.stdout.readline()
            lines.append(line)
            if "serving (Ctrl-C stops all)" in line or launcher.poll() is not None:
                break
        assert any("serving" in line for line in lines), "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{port}"
        info = requests.get(f"{url}/info").json()
        assert {m["name"] for m in info["models"]} == {"cartpole-smoke", "pendulum"}
        r = requests.post(f"{url}/act", json={"observations": [[0.1, 0.0, 0.0, 0.0]], "model": "cartpole-smoke"})
        assert r.status_code == 200 and r.json()["actions"][0] in (0, 1) and r.json()["version"] == "1"
        r = requests.post(f"{url}/act", json={"observations": [[1.0, 0.0, 0.5]] * 3, "model": "pendulum",
                                              "deterministic": False, "seed": 3})
        body = r.json()
        assert r.status_code == 200 and np.asarray(body["actions"]).shape == (3, 1) and "action_std" in body
        assert all(-2.0 <= a[0] <= 2.0 for a in body["actions"])  # sampled, then clipped to the Box
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(30)
    assert launcher.returncode == 0
    time.sleep(1)
    try:
        requests.get(f"http://127.0.0.1:{port}/livez", timeout=2)
        raise AssertionError("the service still answers after Ctrl-C")
    except requests.ConnectionError:
        pass


def test_min_return_gate_writes_nothing(tmp_path):
    command = [sys.executable, "-m", "training", "policy", "--env", "CartPole-v1", "--timesteps", "256",
               "--n-envs", "2", "--eval-episodes", "2", "--curve-episodes", "1", "--min-return", "490",
               "--models-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "below --min-return" in result.stderr
    assert repository.list_models(tmp_path) == []


def test_launcher_refuses_an_empty_repository(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services", "--models-dir", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no models to serve" in result.stderr


def test_launcher_stops_at_once_when_a_service_cannot_be_ready(tmp_path, models_copy):
    """A corrupt model: the launcher says which file and why, and exits 1 without waiting out its timeout."""
    onnx = models_copy / "policy" / "lunarlander" / "1" / "model.onnx"
    onnx.write_bytes(b"not an onnx file")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "services", "--models-dir", str(models_copy),
                             "--port", f"policy={free_port()}", "--timeout", "170"],
                            cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert result.returncode == 1
    assert "lunarlander" in result.stderr and "does not match its card" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 60
