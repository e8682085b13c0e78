"""The teach/check match threshold, calibrated on the exported model: cosine similarities of the
served embedding for another photo of the same thing (an augmented copy) against pairs of
different classes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from services.contracts import imaging
from services.contracts.predictor import Predictor
from training.datasets import load_fashion_mnist


def augmented_copy(image: Image.Image, rng) -> Image.Image:
    """What a user sends when checking something already taught: another photo of the same
    thing, here simulated by a shift, a slight rescale, brightness change, resizing to a
    different resolution and JPEG re-encoding."""
    import io

    from PIL import ImageEnhance

    w, h = image.size
    scale = rng.uniform(0.9, 1.1)
    dx, dy = rng.integers(-w // 14, w // 14 + 1, size=2)
    moved = image.transform(image.size, Image.Transform.AFFINE, (1 / scale, 0, dx, 0, 1 / scale, dy),
                            resample=Image.Resampling.BILINEAR)
    moved = ImageEnhance.Brightness(moved).enhance(rng.uniform(0.8, 1.2))
    moved = moved.resize((int(w * rng.uniform(2, 5)),) * 2, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    moved.convert("RGB").save(buffer, "JPEG", quality=int(rng.integers(70, 95)))
    return Image.open(io.BytesIO(buffer.getvalue()))


def calibrate_threshold(path: Path, images: np.ndarray, labels: np.ndarray, prep: dict, mean, std,
                        seed: int, pairs: int = 500, target_false_match: float = 0.01) -> dict:
    """Cosine similarities of the served embedding for the same item (against an augmented
    copy) and for pairs of items of different classes; the threshold is the lowest that keeps
    the false-match rate over different-class pairs at or below the target."""
    predict = Predictor(path)
    rng = np.random.default_rng(seed + 7)
    pick = rng.choice(len(images), size=min(pairs, len(images)), replace=False)

    def embed(pils):
        x = imaging.normalise(np.stack([imaging.prepare(p, **prep) for p in pils]), mean, std)
        return predict(x, outputs=["embedding"], rows=128)[0]

    originals = [Image.fromarray(images[i]) for i in pick]
    copies = [augmented_copy(p, rng) for p in originals]
    e_orig, e_copy = embed(originals), embed(copies)
    positives = np.sum(e_orig * e_copy, axis=1)
    sims = e_orig @ e_orig.T
    picked = labels[pick]
    other = picked[:, None] != picked[None, :]
    alike = (picked[:, None] == picked[None, :]) & ~np.eye(len(pick), dtype=bool)
    other_class, same_class = sims[other], sims[alike]
    nearest_other = np.where(other, sims, -np.inf).max(axis=1)  # as if all the others were taught
    threshold = float(np.quantile(other_class, 1 - target_false_match)) if other_class.size else 0.5
    threshold = math.ceil(threshold * 1e4 + 1e-9) / 1e4  # rounded up: never under the measured quantile
    return {"threshold": threshold, "similarity": "cosine of L2-normalised embeddings",
            "method": f"{len(pick)} test images; positives: each against an augmented copy of itself (shift, "
                      "rescale, brightness, resize, JPEG); negatives: every pair of images of different classes "
                      f"({int(other_class.size)} pairs); threshold = the {1 - target_false_match:.0%} quantile "
                      "of the negatives, rounded up",
            "images": int(len(pick)),
            "target_false_match_rate": target_false_match,
            "same_item_match_rate": float((positives >= threshold).mean()),
            "other_class_false_match_rate": float((other_class >= threshold).mean()),
            "same_class_other_item_match_rate": float((same_class >= threshold).mean()) if same_class.size else None,
            "nearest_of_all_other_classes_match_rate": float((nearest_other >= threshold).mean()),
            "positive_similarity_median": float(np.median(positives)),
            "other_class_similarity_median": float(np.median(other_class)) if other_class.size else None}


def recalibrate(version_dir: Path, pairs: int, seed: int, command: str) -> dict:
    """Re-measure the teach threshold of an exported Fashion-MNIST model; update its card."""
    from services.contracts.repository import write_json_atomic

    card_path = Path(version_dir) / "model.json"
    card = json.loads(card_path.read_text())
    prep_card = card["contract"]["preprocessing"]
    images, labels = load_fashion_mnist("test")
    calibration = calibrate_threshold(Path(version_dir) / "model.onnx", images[:, :, :, 0], labels,
                                      imaging.contract_args(prep_card), prep_card["mean"], prep_card["std"],
                                      seed, pairs=pairs)
    calibration["command"] = command
    card["metrics"]["teach_calibration"] = calibration
    card["contract"]["match_threshold"] = calibration["threshold"]
    write_json_atomic(card_path, card)  # the sha256 is the ONNX file's: the card stays valid
    return calibration
