"""Labelled images for the classifier: Fashion-MNIST or a folder per class, decoded and prepared
by the service's own code (services/contracts/imaging.py), split, and served in augmented batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.contracts import imaging
from training.datasets import FASHION_CLASSES, IMAGE_SUFFIXES, load_fashion_mnist


def prepare_arrays(images: np.ndarray, prep: dict) -> np.ndarray:
    """uint8 [N, h, w, 1|3] -> uint8 [N, S, S, 3] through the service's own prepare()."""
    out = np.empty((len(images), prep["size"], prep["size"], 3), np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")
        out[i] = imaging.prepare(pil, **prep)
    return out


def load_folder(folder: Path, prep: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """folder/<class>/<image>: every image decoded and prepared as the service would."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"--data {folder}: not a folder (and not 'fashion-mnist')")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise SystemExit(f"{folder} needs at least two class subfolders (folder/<class>/<image>)")
    images, labels, skipped = [], [], []
    limits = imaging.Limits(max_file_bytes=1 << 30, max_pixels=200_000_000, max_side=50_000)
    for label, name in enumerate(classes):
        for path in sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                images.append(imaging.prepare(imaging.decode(path.read_bytes(), limits), **prep))
                labels.append(label)
            except imaging.ImageError as exc:
                skipped.append(f"{path}: {exc.message}")
    for line in skipped:
        print(f"skipped {line}")
    if not images:
        raise SystemExit(f"no readable images under {folder}")
    return np.stack(images), np.asarray(labels, np.int64), classes


def stratified_split(labels: np.ndarray, fraction: float, rng, minimum: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out) with `fraction` of each class held out (at least `minimum`)."""
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = max(minimum, int(round(len(idx) * fraction))) if len(idx) > minimum else 0
        held.extend(idx[:n])
        kept.extend(idx[n:])
    return np.sort(np.asarray(kept, np.int64)), np.sort(np.asarray(held, np.int64))


def per_class_subset(labels: np.ndarray, per_class: int | None, rng) -> np.ndarray:
    """The first `per_class` images of each class in a seeded random order (all when None)."""
    if per_class is None:
        return np.arange(len(labels))
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def load_data(args, prep: dict, rng) -> dict:
    """train / val / test uint8 arrays [N, S, S, 3] with labels, and the class names."""
    if args.data == "fashion-mnist":
        train_images, train_labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")
        classes = list(FASHION_CLASSES)
        order = rng.permutation(len(train_labels))
        val_idx, train_idx = order[:args.val_size], order[args.val_size:]
        pool = {"train": (train_images[train_idx], train_labels[train_idx]),
                "val": (train_images[val_idx], train_labels[val_idx]), "test": (test_images, test_labels)}
    else:
        images, labels, classes = load_folder(Path(args.data), prep)
        rest, test_idx = stratified_split(labels, args.test_fraction, rng)
        train_idx, val_idx = stratified_split(labels[rest], args.val_fraction, rng)
        pool = {"train": (images[rest][train_idx], labels[rest][train_idx]),
                "val": (images[rest][val_idx], labels[rest][val_idx]), "test": (images[test_idx], labels[test_idx])}
    train_images, train_labels = pool["train"]
    keep = per_class_subset(train_labels, args.per_class, rng)
    pool["train"] = (train_images[keep], train_labels[keep])
    if args.test_limit:
        pool["test"] = tuple(a[:args.test_limit] for a in pool["test"])
        pool["val"] = tuple(a[:args.test_limit] for a in pool["val"])
    data = {"classes": classes}
    for split, (images, labels) in pool.items():
        if images.shape[1] != prep["size"] or images.shape[3] != 3:
            images = prepare_arrays(images, prep)
        data[split] = (images, labels)
    return data


class Batches:
    """uint8 NHWC -> normalised float NCHW (channels_last, faster on CPU), optionally augmented."""

    def __init__(self, mean, std, background: tuple, augment: bool, rng):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.background = torch.tensor(background, dtype=torch.uint8).view(1, 3, 1, 1)
        self.augment, self.rng = augment, rng

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 NCHW
        if self.augment:
            x = self._augment(x)
        x = (x.float() / 255.0 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random horizontal flip and a random shift of up to 1/8 of the side (background fill)."""
        n, _, size, _ = x.shape
        flip = torch.from_numpy(self.rng.random(n) < 0.5)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        pad = max(1, size // 8)
        padded = self.background.expand(n, 3, size + 2 * pad, size + 2 * pad).clone()
        padded[:, :, pad:pad + size, pad:pad + size] = x
        dx, dy = self.rng.integers(0, 2 * pad + 1, size=(2, n))
        return torch.stack([padded[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(n)])
