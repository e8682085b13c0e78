"""How good a class-conditional generator is, on the held-out split: FID and KID (raw and averaged
weights, floor and ceiling), per class FID and spread, and class fidelity judged by the shipped
classifier through the service's own preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training import gan_quality
from training.cgan_nets import CLASSES, Generator, generate
from training.datasets import FASHION_CLASSES, to_tensor, to_uint8


def spread(features: np.ndarray) -> float:
    """How much a set of images varies, to the extractor: the trace of its features' covariance."""
    return float(np.trace(np.cov(features, rowvar=False)))


def per_class_quality(f_gen, gen_labels, f_held, held_labels, f_train, train_labels) -> dict:
    """Per class: FID against that class's held-out images (real training images of the class give
    its floor) and the spread of generated over real images; a spread well below 1 is a generator
    that draws the class from too few variations (within-class collapse), which a pooled FID hides
    behind the spread between classes."""
    out = {}
    for c, name in enumerate(FASHION_CLASSES):
        gen, held, train = f_gen[gen_labels == c], f_held[held_labels == c], f_train[train_labels == c]
        out[name] = {"fid": gan_quality.fid(gen, held), "fid_real_floor": gan_quality.fid(train, held),
                     "spread_vs_real": spread(gen) / spread(held), "images": int(len(gen))}
    return out


def measure(sampler: Generator, raw: Generator, untrained: Generator, train_images, train_labels, held_images,
            held_labels, args) -> dict:
    extractor = gan_quality.load_extractor()
    n = args.fid_samples
    rng = np.random.default_rng(args.seed + 1)
    latents = rng.standard_normal((n, args.nz)).astype(np.float32)
    labels = np.arange(n) % CLASSES  # every class equally often
    generated = generate(sampler, latents, labels)
    f_held, p_held = gan_quality.embed(extractor, to_tensor(held_images[:n]))
    pick = rng.choice(len(train_images), min(n, len(train_images)), replace=False)
    f_train, _ = gan_quality.embed(extractor, to_tensor(train_images[pick]))
    train_labels = np.asarray(train_labels)[pick]
    f_gen, p_gen = gan_quality.embed(extractor, generated)
    f_raw, _ = gan_quality.embed(extractor, generate(raw, latents, labels))
    f_init, _ = gan_quality.embed(extractor, generate(untrained, latents, labels))
    gen = gan_quality.compare(f_gen, f_held, args.kid_subset)
    held_labels = np.asarray(held_labels[:n])
    judge = Judge(args.classifier_dir)
    return {
        "fid": gen["fid"], "kid": gen["kid"], "kid_std": gen["kid_std"],
        "fid_raw_weights": gan_quality.fid(f_raw, f_held),
        "samples": {"generated": int(n), "held_out_real": int(len(f_held)), "labels": "0..9 in turn"},
        "floor": {**gan_quality.compare(f_train, f_held, args.kid_subset),
                  "what": "real vs real: training images vs the held-out images, same sample sizes"},
        "ceiling": {**gan_quality.compare(f_init, f_held, args.kid_subset),
                    "what": "the untrained generator (its initial weights, same seed) vs held-out images"},
        "per_class": per_class_quality(f_gen, labels, f_held, held_labels, f_train, train_labels),
        "class_histogram": gan_quality.class_histogram(p_gen, FASHION_CLASSES),
        "class_histogram_held_out_real": gan_quality.class_histogram(p_held, FASHION_CLASSES),
        "class_fidelity": {**judge.fidelity(to_uint8(generated), labels),
                           "judge": f"the shipped classifier fashion v{judge.entry.version} through "
                                    "services/contracts/imaging.py (what /classify answers for these images as PNGs)"},
        "class_fidelity_real": {**judge.fidelity(held_images[:n], held_labels),
                                "what": "the same judge on real test images with their true labels: the ceiling"},
        "latents": f"numpy default_rng({args.seed + 1}).standard_normal(({n}, {args.nz})), labels i % 10",
        "kid_subsets": f"100 random subsets of {min(args.kid_subset, n)}, cubic polynomial kernel",
        "feature_extractor": gan_quality.extractor_info(),
    }


class Judge:
    """The shipped `fashion` classifier, through the service's own preprocessing (services/contracts/imaging.py):
    what the served /classify would answer for each image sent as a PNG."""

    def __init__(self, models_dir: Path = Path("models/classifier")):
        from services.contracts import repository
        from services.contracts.predictor import Predictor

        self.entry = repository.resolve(models_dir, "fashion", kind="classifier")
        self.pre = self.entry.card["contract"]["preprocessing"]
        self.predict = Predictor.of(self.entry)

    def probabilities(self, images: np.ndarray, batch: int = 250) -> np.ndarray:
        """uint8 [N, 28, 28, 1] -> softmax [N, classes]."""
        from PIL import Image

        from services.contracts import imaging

        out = []
        for i in range(0, len(images), batch):
            pixels = np.stack([imaging.prepare(Image.fromarray(im[..., 0]), **imaging.contract_args(self.pre))
                               for im in images[i:i + batch]])
            logits = self.predict(imaging.normalise(pixels, self.pre["mean"], self.pre["std"]), outputs=["logits"])[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            out.append(e / e.sum(1, keepdims=True))
        return np.concatenate(out)

    def fidelity(self, images: np.ndarray, labels: np.ndarray) -> dict:
        p = self.probabilities(images)
        agree = p.argmax(1) == labels
        return {"agreement": float(agree.mean()), "confident_share": float((p.max(1) >= gan_quality.CONFIDENT).mean()),
                "mean_top1_confidence": float(p.max(1).mean()),
                "per_class_agreement": {FASHION_CLASSES[c]: float(agree[labels == c].mean()) for c in range(CLASSES)},
                "images": int(len(images))}


def fid_now(net_g: Generator, extractor, held_features: np.ndarray, nz: int, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    features, _ = gan_quality.embed(extractor, generate(net_g, rng.standard_normal((n, nz)).astype(np.float32),
                                                        np.arange(n) % CLASSES))
    return gan_quality.fid(features, held_features)
