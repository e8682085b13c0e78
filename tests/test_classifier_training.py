"""Training smoke tests: really train (tiny budgets), export, re-check the ONNX, serve it, and
run the evidence command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import requests
from PIL import Image

from classifier_helpers import Offline, encode, fashion_images, upload, varied_files
from conftest import ROOT, running_service

pytestmark = pytest.mark.slow  # trains and exports classifiers: `pytest -m "not slow"` leaves it out

TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--val-size", "100", "--test-limit", "64",
        "--probe-epochs", "3", "--threads", "1"]


def run(*args, timeout=240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained by the project's own command on 4 images per class."""
    root = tmp_path_factory.mktemp("tiny-models")
    result = run("classifier", "--name", "tiny", "--per-class", "4", "--models-dir", str(root / "classifier"), *TINY,
                 "--calibration-pairs", "32", "--no-domain")  # tests/test_domain.py runs that step
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, root / "classifier" / "tiny" / "1"


def test_training_writes_a_complete_card_and_plots(trained):
    _, out = trained
    card = json.loads((out / "model.json").read_text())
    assert card["kind"] == "classifier" and card["training"]["train_images"] == 40
    assert card["training"]["command"].startswith("python -m training classifier --name tiny")
    assert 0.0 <= card["metrics"]["test_accuracy"] <= 1.0 and card["metrics"]["test_images"] == 64
    assert card["export"]["parity"]["passed"] and card["export"]["parity"]["max_abs_diff_logits"] <= 1e-4
    prep = card["contract"]["preprocessing"]
    assert (prep["input_size"], prep["channel_order"], prep["colour"]) == (32, "RGB", "grey")
    assert len(card["contract"]["labels"]) == 10 and -1 <= card["contract"]["match_threshold"] <= 1
    assert (out / "confusion_matrix.png").stat().st_size > 5000 and (out / "learning_curves.png").stat().st_size > 5000
    assert (out / "model.onnx").stat().st_size < 20e6


def test_exported_onnx_rechecked(trained):
    """Independent of the training script's own check: valid graph, dynamic batch, unit-length embeddings."""
    _, out = trained
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    offline = Offline(out)
    files = [encode(i, "PNG") for i in fashion_images(5)[0]]
    logits, embedding = offline.run(files)
    assert logits.shape == (5, 10) and embedding.shape[0] == 5
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([offline.run([f])[0] for f in files])
    np.testing.assert_allclose(one_by_one, logits, atol=1e-4)  # batch size does not change the answer


def test_trained_model_is_served_exactly_as_offline(trained, tmp_path):
    root, out = trained
    files = varied_files()
    with running_service("classifier", tmp_path, env={"MODELS_DIR": str(root),
                                                      "TEACH_STORE": f"sqlite:///{tmp_path / 't.db'}"}) as server:
        body = requests.post(f"{server.url}/classify", files=upload(files), data={"top_k": "3"}, timeout=60).json()
        info = requests.get(f"{server.url}/info", timeout=10).json()
    assert body["model"] == "tiny"
    expected = Offline(out).probabilities(list(files.values()))
    for served, probs in zip(body["predictions"], expected):
        np.testing.assert_allclose([p["score"] for p in served], np.sort(probs)[::-1][:3], atol=1e-5)
    assert info["teach"]["models"][0]["threshold"] == json.loads((out / "model.json").read_text())["contract"]["match_threshold"]


def test_image_folder_training_with_a_linear_probe(tmp_path):
    """A user's own images: one subfolder per class, any format and size."""
    rng = np.random.default_rng(0)
    for name, colour in (("red things", (200, 30, 30)), ("blue things", (30, 30, 200))):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (40 + i, 50, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    (tmp_path / "photos" / "red things" / "broken.png").write_bytes(b"not a png")
    result = run("classifier", "--data", str(tmp_path / "photos"), "--name", "colours", "--mode", "probe",
                 "--models-dir", str(tmp_path / "models"), "--test-fraction", "0.25", "--image-size", "32",
                 "--batch-size", "16", "--threads", "1", "--calibration-pairs", "4", "--probe-epochs", "300")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "skipped" in result.stdout and "broken.png" in result.stdout
    card = json.loads((tmp_path / "models" / "colours" / "1" / "model.json").read_text())
    assert card["contract"]["labels"] == ["blue things", "red things"]
    assert card["contract"]["preprocessing"]["colour"] == "rgb" and card["training"]["mode"] == "probe"
    assert card["metrics"]["test_accuracy"] == 1.0  # red against blue: a linear probe must get it right


def test_missing_weights_fail_clearly(tmp_path):
    result = run("classifier", "--weights", str(tmp_path / "nope.pth"), "--models-dir", str(tmp_path), *TINY)
    assert result.returncode != 0 and "nope.pth: no such file" in result.stderr
    assert not list(tmp_path.glob("*/*/model.json"))


def test_evidence_command_with_a_tiny_budget(trained, tmp_path):
    _, out = trained
    card_path = tmp_path / "model.json"
    card_path.write_text((out / "model.json").read_text())
    result = run("evidence", "--sizes", "2", "--small-epochs", "1", "--epoch-images", "16", "--val-limit", "20",
                 "--out", str(tmp_path / "evidence"), "--card", str(card_path), *TINY)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evidence = json.loads((tmp_path / "evidence" / "evidence.json").read_text())
    assert {(r["per_class"], r["method"]) for r in evidence["rows"]} == {("2", m) for m in ("finetune", "probe", "scratch")}
    assert all(r["train_images"] == 20 and 0 <= r["test_accuracy"] <= 1 for r in evidence["rows"])
    assert "| pretrained + fine-tuning |" in evidence["table_markdown"]
    assert json.loads(card_path.read_text())["metrics"]["evidence"]["rows"] == evidence["rows"]
