"""Fit, calibrate and measure the clothing classifier's out-of-domain check (services/contracts/domain.py).

    python -m training domain models/classifier/fashion/1 [--seed 0] [--flag-rate 0.015]

1. Embeddings of 20,000 of the images the model was trained on give the class means and the
   shared covariance; with crops of the sample photos scikit-image and scikit-learn ship they
   train the outlier-exposure head (logistic regression). The validation images the training
   command held out (its seed and split, from the card) are the reference both are read against.
2. The threshold is the score that flags `--flag-rate` of those held-out images. The test split
   is only measured, never used to choose.
3. Measured on the official test split, on what a user sends of it (augmented copies: shift,
   rescale, brightness, JPEG), on the generators' images, and on every out-of-domain family
   the installed packages ship (below): the share flagged and the AUROC of each, beside the
   max-softmax baseline. The head has seen the photos, so their row is cross-fitted: each
   photo's crops are scored by a head trained without that photo (two folds by photo).
Writes domain.npz beside the model (its sha256 in the card: contract.domain) and the
measurements in metrics.domain. The model file is unchanged, so taught examples stay valid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from services.contracts import imaging, latents
from services.contracts.domain import SCORE, DomainCheck
from services.contracts.predictor import Predictor
from services.contracts.repository import write_json_atomic
from training.teach_calibration import augmented_copy
from training.datasets import load_fashion_mnist

FILE = "domain.npz"
FIT_IMAGES = 20_000
CROPS = 40
FLAG_RATE = 0.015  # held-out training images flagged: the test split's target is at most 2%
FACE_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faces"
GENERATORS = Path(__file__).resolve().parents[1] / "models" / "generator" / "fashion"
# scikit-image's sample photos (its package data, no download): people, animals, objects, scenes, textures
PHOTOS = ["astronaut", "camera", "cat", "chelsea", "coffee", "coins", "clock", "rocket", "horse", "moon", "page",
          "text", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "colorwheel", "retina",
          "cell", "stereo_motorcycle", "logo"]


class Embedder:
    """The exported model on the CPU, through the service's own preprocessing."""

    def __init__(self, version_dir: Path, card: dict):
        self.prep = card["contract"]["preprocessing"]
        self.args = imaging.contract_args(self.prep)
        self.predict = Predictor(version_dir / card["file"])

    def __call__(self, images: list[Image.Image], label: str) -> tuple[np.ndarray, np.ndarray]:
        logits, embeddings = [], []
        for start in tqdm(range(0, len(images), 256), desc=f"embed {label}", unit="batch", leave=False):
            x = imaging.normalise(np.stack([imaging.prepare(i, **self.args) for i in images[start:start + 256]]),
                                  self.prep["mean"], self.prep["std"])
            out = dict(zip(("logits", "embedding"), self.predict(x, outputs=["logits", "embedding"])))
            logits.append(out["logits"]), embeddings.append(out["embedding"])
        return np.concatenate(logits), np.concatenate(embeddings)


def photos(rng) -> tuple[list[Image.Image], np.ndarray]:
    """Each sample photo whole and in 40 random crops (a quarter of its side to all of it), with
    the index of the photo each came from."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array
        sources.append(Image.fromarray((array * 255).astype(np.uint8) if array.dtype == bool else array).convert("RGB"))
    sources += [Image.fromarray(a) for a in load_sample_images().images]
    sources += [Image.open(p).convert("RGB") for p in sorted(FACE_FIXTURES.glob("*.jpg"))]
    out = []
    for image in sources:
        w, h = image.size
        out.append(image)
        for _ in range(CROPS):
            side = rng.uniform(0.25, 1.0) * min(w, h)
            x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
            out.append(image.crop((int(x0), int(y0), int(x0 + side), int(y0 + side * rng.uniform(0.7, 1.4)))))
    return out, np.repeat(np.arange(len(sources)), CROPS + 1)


def noise(rng, n: int = 500) -> list[Image.Image]:
    kinds = [lambda: rng.integers(0, 256, (28, 28), dtype=np.uint8),                      # uniform
             lambda: np.clip(rng.normal(128, 60, (64, 64)), 0, 255).astype(np.uint8),    # gaussian
             lambda: np.asarray(Image.fromarray(rng.integers(0, 256, (7, 7), dtype=np.uint8))
                                .resize((64, 64), Image.Resampling.BICUBIC)),              # smooth blobs
             lambda: np.full((32, 32), rng.integers(0, 256), np.uint8)]                   # flat grey
    return [Image.fromarray(kinds[i % 4]()) for i in range(n)]


def drawings(rng, n: int = 500) -> list[Image.Image]:
    """Outlines, filled boxes, strokes and text on black or white, as a sketch pad draws them."""
    out = []
    for i in range(n):
        image = Image.new("L", (64, 64), 0 if i % 2 else 255)
        pen = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 5)):
            colour, (x0, x1), (y0, y1) = int(rng.integers(0, 256)), sorted(rng.integers(0, 64, 2)), sorted(
                rng.integers(0, 64, 2))
            shape = rng.integers(0, 4)
            if shape == 0:
                pen.ellipse((x0, y0, x1, y1), outline=colour, width=2)
            elif shape == 1:
                pen.rectangle((x0, y0, x1, y1), fill=colour)
            elif shape == 2:
                pen.line([tuple(int(v) for v in rng.integers(0, 64, 2)) for _ in range(4)], fill=colour, width=3)
            else:
                pen.text(tuple(int(v) for v in rng.integers(0, 40, 2)), "abcXYZ"[rng.integers(0, 6):], fill=colour)
        out.append(image)
    return out


def generated(n_per_version: int = 500) -> dict[str, list[Image.Image]]:
    """Each shipped generator version's images, classes in turn for a conditional one."""
    out = {}
    for card_path in sorted(GENERATORS.glob("*/model.json")):
        card = json.loads(card_path.read_text())
        contract = card["contract"]
        predict = Predictor(card_path.parent / card["file"])
        classes = contract.get("classes")
        labels = np.arange(n_per_version) % len(classes) if classes else None
        x = latents.model_inputs(latents.seed_latents(range(n_per_version), contract["latent_dim"]), labels, classes)
        images = latents.to_uint8(predict(x)[0])
        out[f"generator v{card['version']}"] = [Image.fromarray(i[:, :, 0]) for i in images]
    return out


def out_of_domain(rng) -> dict[str, tuple[str, list[Image.Image]]]:
    """The families the head never saw."""
    import skimage.data
    from sklearn.datasets import load_digits

    lfw = skimage.data.lfw_subset()
    return {
        "faces": ("scikit-image lfw_subset: 100 LFW face crops, 25x25",
                  [Image.fromarray((f * 255).astype(np.uint8)) for f in lfw[:100]]),
        "non-face patches": ("scikit-image lfw_subset: 100 patches of photos without faces, 25x25",
                             [Image.fromarray((f * 255).astype(np.uint8)) for f in lfw[100:]]),
        "digits": ("scikit-learn load_digits: 1,797 handwritten digits, 8x8",
                   [Image.fromarray((d * 255 / 16).astype(np.uint8)) for d in load_digits().images]),
        "noise": ("uniform, gaussian, smooth-blob and flat-grey noise, 500 images", noise(rng)),
        "drawings": ("outlines, boxes, strokes and text drawn with PIL, 500 images", drawings(rng)),
    }


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an in-domain image scores higher than an out-of-domain one)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(inside)), np.zeros(len(outside))], np.r_[inside, outside]))


def max_softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).max(1)


def fit(fit_emb: np.ndarray, fit_labels: np.ndarray, outliers: np.ndarray, held_emb: np.ndarray,
        seed: int, shrinkage: float = 1e-3) -> DomainCheck:
    """Class means and one shared covariance (shrunk towards a multiple of the identity, so it
    inverts) from training embeddings; the head from the same embeddings against outliers; the
    held-out embeddings as the reference of both."""
    from sklearn.linear_model import LogisticRegression

    x = fit_emb.astype(np.float64)
    classes = np.unique(fit_labels)
    means = np.stack([x[fit_labels == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, fit_labels)]
    cov = centred.T @ centred / len(x)
    cov += shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    factor = np.linalg.cholesky(np.linalg.inv(cov))
    head = LogisticRegression(C=1.0, class_weight="balanced", max_iter=3000, random_state=seed)
    head.fit(np.r_[fit_emb, outliers], np.r_[np.ones(len(fit_emb)), np.zeros(len(outliers))])
    check = DomainCheck(factor.astype(np.float32), (means @ factor).astype(np.float32),
                        head.coef_[0].astype(np.float32), float(head.intercept_[0]), np.zeros(1), np.zeros(1))
    return DomainCheck(check.factor, check.means, check.head_weights, check.head_bias,
                       np.sort(check.distances(held_emb)), np.sort(check.heads(held_emb)))


def calibrate(version_dir: Path, seed: int, flag_rate: float, command: str) -> dict:
    card_path = version_dir / "model.json"
    card = json.loads(card_path.read_text())
    embed = Embedder(version_dir, card)
    training = card["training"]
    rng = np.random.default_rng(training["seed"])  # the training command's split (training/classifier.py)
    train_images, train_labels = load_fashion_mnist("train")
    order = rng.permutation(len(train_labels))
    held, learnt = order[:training["validation_images"]], order[training["validation_images"]:]
    pick = np.random.default_rng(seed).choice(learnt, size=min(FIT_IMAGES, len(learnt)), replace=False)
    grey = lambda images, idx: [Image.fromarray(images[i, :, :, 0]) for i in idx]  # noqa: E731
    print(f"fitting on {len(pick)} training images and photo crops, reference: {len(held)} held-out training "
          "images", flush=True)
    _, fit_emb = embed(grey(train_images, pick), "training images")
    held_logits, held_emb = embed(grey(train_images, held), "held-out images")
    photo_images, photo_of = photos(np.random.default_rng(seed + 3))
    photo_logits, photo_emb = embed(photo_images, "photos")
    check = fit(fit_emb, train_labels[pick], photo_emb, held_emb, seed)
    held_scores = np.sort(check.scores(held_emb))
    threshold = float(held_scores[int(flag_rate * len(held_scores))])  # flags at most flag_rate of them
    softmax_threshold = float(np.sort(max_softmax(held_logits))[int(flag_rate * len(held_emb))])

    # The photos' row: each photo scored by a head that never saw it (two folds by photo).
    folds = np.random.default_rng(seed + 4).permutation(photo_of.max() + 1) % 2
    photo_scores = np.zeros(len(photo_emb))
    for k in (0, 1):
        unseen = folds[photo_of] == k
        fold_check = fit(fit_emb, train_labels[pick], photo_emb[~unseen], held_emb, seed)
        photo_scores[unseen] = fold_check.scores(photo_emb[unseen])

    test_images, _ = load_fashion_mnist("test")
    test = [Image.fromarray(i[:, :, 0]) for i in test_images]
    copy_rng = np.random.default_rng(seed + 1)
    inside = {"test split": ("the official 10,000 test images", test),
              "test copies": ("1,000 test images as a user sends them: shifted, rescaled, brighter or darker, "
                              "resized 2-5x, JPEG", [augmented_copy(i, copy_rng) for i in test[:1000]])}
    inside |= {name: (f"{len(images)} images of the shipped {name} (models/generator/fashion)", images)
               for name, images in generated().items()}
    photo_source = (f"scikit-image's and scikit-learn's sample photos and the face fixtures ({photo_of.max() + 1}: "
                    f"people, animals, objects, scenes, textures), each whole and in {CROPS} random crops; "
                    "cross-fitted (the head saw photos)")
    families = inside | {"photos": (photo_source, photo_images)} | out_of_domain(np.random.default_rng(seed + 2))
    report = {}
    for family, (source, images) in families.items():
        if family == "photos":
            logits, scores = photo_logits, photo_scores
        else:
            logits, emb = embed(images, family)
            scores = check.scores(emb)
        soft = max_softmax(logits)
        row = {"source": source, "images": len(images), "in_domain": family in inside,
               "flagged": round(float((scores < threshold).mean()), 4),
               "max_softmax_flagged": round(float((soft < softmax_threshold).mean()), 4)}
        if family == "test split":
            test_scores, test_soft = scores, soft
        elif family not in inside:
            row["auroc"] = round(auroc(test_scores, scores), 4)
            row["max_softmax_auroc"] = round(auroc(test_soft, soft), 4)
        report[family] = row
        print(f"{family:18} {len(images):6d} images  flagged {row['flagged']:7.2%}" +
              (f"  AUROC {row['auroc']:.4f} (max softmax {row['max_softmax_auroc']:.4f})" if "auroc" in row else ""),
              flush=True)

    data = check.to_bytes()
    (version_dir / FILE).write_bytes(data)
    card["contract"]["domain"] = {"file": FILE, "sha256": hashlib.sha256(data).hexdigest(), "score": SCORE,
                                  "threshold": threshold, "in_domain": "domain_score >= threshold"}
    card["metrics"]["domain"] = {
        "method": "the lower of two scores of the embedding, each the share of held-out training images at least "
                  "as unusual: Mahalanobis distance to the nearest class mean (one covariance shared by the "
                  f"classes, shrinkage 1e-3) and a logistic-regression outlier-exposure head, both fitted on "
                  f"{len(pick)} training images (the head against {len(photo_emb)} photo crops); the reference: "
                  f"{len(held)} held-out training images (the training command's validation split, seed "
                  f"{training['seed']}); threshold: the score flagging {flag_rate:.1%} of them",
        "baseline": f"max softmax probability, its threshold flagging the same {flag_rate:.1%} of held-out images",
        "held_out_flagged": round(float((held_scores < threshold).mean()), 4),
        "families": report, "command": command, "seed": seed}
    write_json_atomic(card_path, card)  # the sha256 is the ONNX file's: the card stays valid
    return card["metrics"]["domain"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training domain", description=__doc__.split("\n\n")[0])
    p.add_argument("version_dir", type=Path, help="an exported Fashion-MNIST classifier, e.g. models/classifier/fashion/1")
    p.add_argument("--seed", type=int, default=0, help="which training images fit the statistics, and the test sets")
    p.add_argument("--flag-rate", type=float, default=FLAG_RATE,
                   help="share of held-out training images the threshold flags (the test split's target is <= 2%%)")
    args = p.parse_args(argv)
    command = "python -m training domain " + shlex.join(argv if argv is not None else sys.argv[1:])
    calibrate(args.version_dir, args.seed, args.flag_rate, command)
    print(f"wrote {args.version_dir / FILE} and the card's contract.domain / metrics.domain")


if __name__ == "__main__":
    main()
