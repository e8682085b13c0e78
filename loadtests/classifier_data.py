"""Real Fashion-MNIST test images as PNG and JPEG files at several sizes, with the label the
shipped classifier gives each file offline (same decoding, preprocessing and model file as the
service), for the classifier's load test and benchmark."""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from services.contracts import imaging
from services.contracts.domain import DomainCheck
from services.contracts import device, repository

ROOT = Path(__file__).resolve().parent.parent
SIZES = (28, 56, 112)


def encode(pixels: np.ndarray, size: int, fmt: str) -> bytes:
    image = Image.fromarray(pixels[..., 0]).resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@lru_cache(maxsize=1)
def model():
    entry = repository.resolve(ROOT / "models" / "classifier", "fashion", kind="classifier")
    session, _, _ = device.create_session(entry.path, "cpu", threads=1)
    return entry, session


@lru_cache(maxsize=1)
def domain_check() -> DomainCheck:
    """The out-of-domain statistics the service answers with (every /classify answer carries them)."""
    entry = model()[0]
    return DomainCheck.from_bytes((entry.path.parent / entry.card["contract"]["domain"]["file"]).read_bytes())


def preprocess(files: list[bytes]) -> np.ndarray:
    return imaging.preprocess(files, model()[0].card["contract"]["preprocessing"])


def offline_labels(files: list[bytes]) -> list[str]:
    entry, session = model()
    logits = session.run(["logits"], {session.get_inputs()[0].name: preprocess(files)})[0]
    return [entry.card["contract"]["labels"][i] for i in logits.argmax(axis=1)]


@lru_cache(maxsize=1)
def samples(count: int = 96, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(filename, file bytes, offline top-1 label), PNG and JPEG at 28, 56 and 112 px."""
    from training.datasets import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    files = []
    for k, i in enumerate(rng.choice(len(images), count, replace=False)):
        fmt, size = ("PNG", "JPEG")[k % 2], SIZES[k % len(SIZES)]
        files.append((f"test-{i}-{size}.{fmt.lower()}", encode(images[i], size, fmt)))
    labels = offline_labels([data for _, data in files])
    return [(name, data, label) for (name, data), label in zip(files, labels)]
