"""Image data for training: Fashion-MNIST from Debian's package, or any folder of images.

    images, labels, classes = load_images("fashion-mnist", split="train")      # uint8 [N, 28, 28, 1]
    images, labels, classes = load_images("photos/", size=64, channels=3)     # uint8 [N, 64, 64, 3]

Everything is loaded into memory as uint8 NHWC: small data sets train faster from one array
than through a DataLoader on 2 cores. to_tensor() turns a batch into float [-1, 1] NCHW.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from services.contracts import latents

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_fashion_mnist(split: str = "train", root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28, 1] and int64 labels [N]; split "train" (60,000) or "test" (10,000)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists():
        raise SystemExit(f"{images_path} is missing: install it with "
                         "`apt-get install dataset-fashion-mnist` (Debian), or pass a folder of images")
    images = np.frombuffer(gzip.open(images_path).read(), np.uint8, offset=16).reshape(-1, 28, 28, 1).copy()
    labels = np.frombuffer(gzip.open(labels_path).read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def load_image_folder(folder: Path, size: int, channels: int, limit: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image under folder, resized (shorter side to `size`) and centre-cropped.

    Class subfolders (folder/<class>/*.jpg, as torchvision's ImageFolder) give labels;
    a flat folder gives one class named after the folder. Faces (CelebA-style aligned
    crops) work the same way.
    """
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    if limit:
        files = files[:limit]
    classes = sorted({p.parent.relative_to(folder).parts[0] if p.parent != folder else folder.name for p in files})
    mode = {1: "L", 3: "RGB"}[channels]
    images = np.empty((len(files), size, size, channels), np.uint8)
    labels = np.empty(len(files), np.int64)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            images[i] = np.asarray(centre_crop(image.convert(mode), size)).reshape(size, size, channels)
        labels[i] = classes.index(path.parent.relative_to(folder).parts[0] if path.parent != folder else folder.name)
    return images, labels, classes


def centre_crop(image, size: int):
    """Resize so the shorter side is `size` (high-quality downsampling), then crop the centre."""
    from PIL import Image

    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.LANCZOS)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_images(data: str, split: str = "train", size: int | None = None, channels: int | None = None,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """"fashion-mnist" (resized to `size` when it is not 28) or a folder of images."""
    if data == "fashion-mnist":
        images, labels = load_fashion_mnist(split)
        if limit:
            images, labels = images[:limit], labels[:limit]
        if channels not in (None, 1):
            images = np.repeat(images, channels, axis=3)
        if size not in (None, 28):
            images = resize(images, size)
        return images, labels, list(FASHION_CLASSES)
    if size is None or channels is None:
        raise ValueError("an image folder needs size and channels")
    return load_image_folder(Path(data), size, channels, limit)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC at size x size (bilinear, as torchvision's Resize)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the generator's tanh range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images) -> np.ndarray:
    """float NCHW in [-1, 1] (a tensor or an array) -> uint8 NHWC, as the card's contract says."""
    return latents.to_uint8(images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images))
