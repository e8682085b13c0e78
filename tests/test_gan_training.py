"""Train -> measure -> export -> serve a DCGAN with budgets of seconds, into a temporary repository.

Runs the project's real command (`python -m training gan`) as a user would, on a few hundred
Fashion-MNIST images and on a folder of pictures at 64 px RGB, then resumes from a checkpoint,
then serves the result with a real `bentoml serve`.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
from PIL import Image

from conftest import ROOT, running_service
from services.contracts.latents import seed_latent
from services.contracts import repository
from training.datasets import load_image_folder

pytestmark = pytest.mark.slow  # trains generators: `pytest -m "not slow"` leaves it out

TINY = ["--epochs", "1", "--batch-size", "64", "--fid-samples", "256", "--kid-subset", "64", "--threads", "1"]


def train(*args, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "training", "gan", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def onnx_images(path, latents) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"latent": np.asarray(latents, np.float32)})[0]


def test_train_measure_export_resume_and_serve(tmp_path):
    root, run = tmp_path / "models", tmp_path / "run"
    common = ["--name", "tiny", "--limit", "256", "--models-dir", str(root / "generator"), "--run-dir", str(run)]
    out = train(*common, *TINY).stdout
    assert "epoch 1/1: loss D" in out and "FID" in out and "parity" in out

    entry = repository.resolve(root / "generator", "tiny", kind="generator")  # verifies the card's sha256
    card, folder = entry.card, entry.path.parent
    onnx.checker.check_model(str(entry.path), full_check=True)
    assert entry.path.stat().st_size < 20_000_000
    assert card["export"]["parity"]["passed"] and card["export"]["parity"]["max_abs_diff"] <= 1e-4
    assert card["export"]["parity"]["uint8_identical_batch_of_1_vs_64"] is True
    assert card["training"]["seed"] == 0 and "python -m training gan" in card["training"]["command"]
    assert card["training"]["hyperparameters"]["lr"] == 2e-4 and card["training"]["hyperparameters"]["beta1"] == 0.5
    metrics = card["metrics"]
    assert metrics["samples"] == {"generated": 256, "held_out_real": 256}
    assert metrics["floor"]["fid"] < metrics["ceiling"]["fid"] and np.isfinite(metrics["fid"])
    assert sum(metrics["class_histogram"]["counts"].values()) == 256
    assert 0 <= metrics["class_histogram"]["confident_share"] <= 1
    assert metrics["feature_extractor"]["file"] == "training/assets/fashion_cnn.pt"
    contract = card["contract"]
    assert (contract["latent_dim"], contract["image_size"], contract["channels"]) == (100, 28, 1)
    assert "default_rng(seed)" in contract["seed_to_latent"]
    for name in ("samples.png", "loss_curve.png"):
        assert (folder / name).stat().st_size > 2000
    assert (run / "samples" / "epoch_001.png").exists() and (run / "checkpoint.pt").exists()

    for n in (1, 5, 33):  # dynamic batch; tanh range
        images = onnx_images(entry.path, np.random.default_rng(n).standard_normal((n, 100)))
        assert images.shape == (n, 1, 28, 28) and np.abs(images).max() <= 1.0

    # Resume: one more epoch from the checkpoint, exported as version 2.
    resumed = train(*common, *TINY[2:], "--epochs", "2", "--resume").stdout
    assert "resumed from" in resumed and "epoch 2/2: loss D" in resumed and "epoch 1/2" not in resumed
    second = repository.resolve(root / "generator", "tiny").card
    assert second["training"]["resumed_after_epochs"] == [1]
    assert second["version"] == "2" and [e["epoch"] for e in second["training"]["per_epoch"]] == [1, 2]
    assert second["training"]["iterations"] == 2 * card["training"]["iterations"]
    assert (run / "samples" / "epoch_002.png").exists()

    # A checkpoint with other settings is refused, with a reason.
    refused = train(*common, *TINY[2:], "--epochs", "3", "--resume", "--ngf", "32", expect_ok=False)
    assert refused.returncode != 0 and "other settings" in refused.stderr

    # Serve the newest version and check it draws what the file draws.
    with running_service("generator", tmp_path, env={"MODELS_DIR": str(root)}) as server:
        body = requests.post(f"{server.url}/generate", json={"seed": 9, "n": 2}, timeout=30).json()
        assert (body["model"], body["version"]) == ("tiny", "2")
        expected = onnx_images(folder.parent / "2" / "model.onnx", np.stack([seed_latent(9, 100), seed_latent(10, 100)]))
        for image, want in zip(body["images"], expected):
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(image))))
            np.testing.assert_array_equal(pixels, np.clip(np.rint((want[0] + 1) * 127.5), 0, 255).astype(np.uint8))


def make_pictures(folder, count_per_class=12):
    """Small RGB pictures of two kinds, in odd sizes, as a user's photo folder would be."""
    rng = np.random.default_rng(0)
    for kind, (w, h) in (("discs", (90, 70)), ("stripes", (60, 100))):
        (folder / kind).mkdir(parents=True)
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(count_per_class):
            if kind == "discs":
                mask = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (10 + 2 * i) ** 2
            else:
                mask = (xx // (4 + i % 5)) % 2 == 0
            colour = rng.integers(40, 255, 3)
            picture = np.where(mask[..., None], colour, 255 - colour).astype(np.uint8)
            Image.fromarray(picture).save(folder / kind / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_loading(tmp_path):
    make_pictures(tmp_path / "pictures", 3)
    images, labels, classes = load_image_folder(tmp_path / "pictures", size=32, channels=3)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert classes == ["discs", "stripes"] and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    grey, flat_labels, flat_classes = load_image_folder(tmp_path / "pictures" / "discs", size=28, channels=1)
    assert grey.shape == (3, 28, 28, 1) and flat_classes == ["discs"] and set(flat_labels) == {0}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        load_image_folder(tmp_path / "empty", 28, 1)


def test_64px_rgb_from_a_folder_of_pictures(tmp_path):
    make_pictures(tmp_path / "pictures")
    models, run = tmp_path / "models" / "generator", tmp_path / "run"
    out = train("--data", str(tmp_path / "pictures"), "--name", "pictures", "--image-size", "64", "--channels", "3",
                "--epochs", "1", "--batch-size", "8", "--ngf", "8", "--ndf", "8", "--fid-samples", "32",
                "--kid-subset", "16", "--holdout", "0.25", "--threads", "1", "--models-dir", str(models),
                "--run-dir", str(run)).stdout
    assert "DCGAN 64x64x3 on 18 images" in out
    entry = repository.resolve(models, "pictures", kind="generator")
    contract = entry.card["contract"]
    assert (contract["image_size"], contract["channels"]) == (64, 3)
    assert contract["outputs"][0]["shape"] == ["N", 3, 64, 64]
    assert "image folder" in entry.card["training"]["data"] and entry.card["training"]["classes"] == ["discs", "stripes"]
    assert onnx_images(entry.path, np.zeros((3, 100))).shape == (3, 3, 64, 64)
    assert entry.card["export"]["parity"]["passed"]
    assert Image.open(entry.path.parent / "samples.png").mode == "RGB"
    assert json.loads((entry.path.parent / "model.json").read_text())["metrics"]["samples"]["held_out_real"] == 6
