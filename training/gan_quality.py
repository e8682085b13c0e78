"""Offline quality of generated images: FID, KID and the class histogram, with our own features.

No Inception weights can be downloaded here, so the feature extractor is the project's own
small CNN (FashionCNN below), trained once on Fashion-MNIST's 60,000 training images with
seed 0 and kept fixed in training/assets/fashion_cnn.pt, its test accuracy measured in
fashion_cnn.json beside it. Every measurement loads that file, so numbers stay comparable
across runs. Recreate it (it then changes, and old numbers are no longer comparable):

    python -m training.gan_quality --epochs 6 --seed 0

Features are the 128 activations before the classifier's last layer (as FID uses Inception's
pool3). Images of another size or colour are converted to 28x28 greyscale first, so figures
for other data sets are computed but mean less: the extractor only knows clothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from training.datasets import FASHION_CLASSES, load_fashion_mnist, to_tensor

ASSETS = Path(__file__).resolve().parent / "assets"
EXTRACTOR = ASSETS / "fashion_cnn.pt"
EXTRACTOR_CARD = ASSETS / "fashion_cnn.json"
CONFIDENT = 0.9  # a generated image is "confidently classified" when the top softmax is at least this


class FashionCNN(nn.Module):
    """Two conv blocks and a 128-unit layer: ~92% on Fashion-MNIST, 0.4 M parameters, fast on a CPU."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_extractor(path: Path = EXTRACTOR) -> FashionCNN:
    if not Path(path).exists():
        raise SystemExit(f"{path} is missing: recreate it with `python -m training.gan_quality`")
    model = FashionCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def extractor_info(path: Path = EXTRACTOR) -> dict:
    info = json.loads(EXTRACTOR_CARD.read_text()) if EXTRACTOR_CARD.exists() else {}
    info["file"] = str(Path(path).relative_to(ASSETS.parent.parent)) if Path(path).is_relative_to(ASSETS.parent.parent) else str(path)
    info["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return info


def as_extractor_input(images: torch.Tensor) -> torch.Tensor:
    """float NCHW in [-1, 1], any size or channel count -> [N, 1, 28, 28] in [-1, 1]."""
    if images.shape[1] == 3:
        images = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if images.shape[-1] != 28 or images.shape[-2] != 28:
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return images


@torch.no_grad()
def embed(model: FashionCNN, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, 128] (float64) and class probabilities [N, 10] of float NCHW images in [-1, 1]."""
    feats, probs = [], []
    for start in range(0, len(images), batch):
        x = as_extractor_input(images[start:start + batch].float())
        f = model.features(x)
        feats.append(f.double().numpy())
        probs.append(torch.softmax(model.head(f), dim=1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017).

    Tr(sqrt(S_a S_b)) is computed as the sum of square roots of the eigenvalues of the
    symmetric matrix sqrt(S_a) S_b sqrt(S_a): numpy eigh only, no scipy.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018): unbiased MMD^2 with the cubic
    polynomial kernel (x.y/d + 1)^3, averaged over random subsets; returns (mean, std)."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
        values.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def class_histogram(probs: np.ndarray, classes: list[str]) -> dict:
    """How the classifier labels a set of images: counts per class, and the confident share."""
    top = probs.argmax(1)
    counts = np.bincount(top, minlength=len(classes))
    share = counts / max(len(top), 1)
    return {
        "counts": {c: int(n) for c, n in zip(classes, counts)},
        "max_class_share": float(share.max()),
        "min_class_share": float(share.min()),
        # 1.0 means all ten classes equally often; lower means a skew (mode collapse shows here).
        "normalised_entropy": float(-(share[share > 0] * np.log(share[share > 0])).sum() / np.log(len(classes))),
        "confident_share": float((probs.max(1) >= CONFIDENT).mean()),
        "confidence_threshold": CONFIDENT,
        "images": int(len(top)),
    }


def compare(features_a: np.ndarray, features_b: np.ndarray, kid_subset: int) -> dict:
    k_mean, k_std = kid(features_a, features_b, subset_size=kid_subset)
    return {"fid": fid(features_a, features_b), "kid": k_mean, "kid_std": k_std,
            "samples": [int(len(features_a)), int(len(features_b))]}


# Training the extractor (once) ------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.gan_quality",
                                description="Train the fixed feature extractor for FID/KID (Fashion-MNIST CNN)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=EXTRACTOR)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = "python -m training.gan_quality " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    x, y = to_tensor(train_x), torch.from_numpy(train_y)
    model = FashionCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.epochs)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        bar = tqdm(range(0, len(x), args.batch_size), desc=f"epoch {epoch}/{args.epochs}", leave=False)
        for start in bar:
            idx = order[start:start + args.batch_size]
            batch = x[idx]
            # Random horizontal flips: clothing is left-right symmetric enough, and it regularises.
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(3), batch)
            loss = F.cross_entropy(model(batch), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        schedule.step()
        accuracy = evaluate(model, test_x, test_y)
        print(f"epoch {epoch}/{args.epochs}: test accuracy {accuracy:.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    info = {
        "model": "FashionCNN (training/gan_quality.py): conv32-conv64-fc128-fc10, BatchNorm, max-pooling",
        "purpose": "fixed feature extractor for FID/KID and the class histogram of generated images",
        "data": "Fashion-MNIST train split (60,000 images, Debian package dataset-fashion-mnist)",
        "command": command,
        "seed": args.seed,
        "epochs": args.epochs,
        "test_accuracy": round(accuracy, 4),
        "test_images": int(len(test_y)),
        "features": "the 128 ReLU activations before the last linear layer",
        "classes": FASHION_CLASSES,
        "torch": torch.__version__,
        "duration_s": round(time.time() - started, 1),
    }
    (args.out.with_suffix(".json")).write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): test accuracy {accuracy:.4f}")


@torch.no_grad()
def evaluate(model: FashionCNN, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    _, probs = embed(model, to_tensor(images))
    return float((probs.argmax(1) == labels).mean())


if __name__ == "__main__":
    main()
