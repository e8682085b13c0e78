"""Image files and offline predictions shared by the classifier tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from services.contracts import imaging
from training.datasets import load_fashion_mnist


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def fashion_images(n: int, start: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    images, labels = load_fashion_mnist("test")
    return [Image.fromarray(images[i, :, :, 0], "L") for i in range(start, start + n)], labels[start:start + n]


def varied_files(seed: int = 0) -> dict[str, bytes]:
    """Every supported format and mode, odd sizes included."""
    rng = np.random.default_rng(seed)
    (grey, shoe), _ = fashion_images(2)
    big = shoe.resize((1500, 900), Image.Resampling.BICUBIC).convert("RGB")
    rgba = Image.fromarray(rng.integers(0, 255, (40, 70, 4), dtype=np.uint8), "RGBA")
    palette = grey.convert("P")
    palette.info["transparency"] = 0
    frames = [grey.convert("P"), shoe.convert("P")]
    sixteen = Image.fromarray(np.asarray(grey, np.uint16) * 257)
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "grey.png": encode(grey, "PNG"),
        "rgb.jpg": encode(big, "JPEG", quality=90),
        "rgba.png": encode(rgba, "PNG"),
        "palette_transparent.png": encode(palette, "PNG"),
        "grey16.png": encode(sixteen, "PNG"),
        "shoe.webp": encode(shoe.convert("RGB"), "WEBP", quality=80),
        "shoe.bmp": encode(shoe.convert("RGB"), "BMP"),
        "animated.gif": gif.getvalue(),
        "tiny.png": encode(shoe.resize((3, 7)), "PNG"),
    }


class Offline:
    """The served model file run in-process through the same preprocessing: what the service must answer."""

    def __init__(self, version_dir: Path):
        self.card = json.loads((version_dir / "model.json").read_text())
        self.session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.prep = self.card["contract"]["preprocessing"]

    def run(self, files: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self.session.run(None, {"image": imaging.preprocess(files, self.prep)})
        return logits, embedding

    def probabilities(self, files: list[bytes]) -> np.ndarray:
        logits = self.run(files)[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def upload(files: dict[str, bytes] | list[bytes], field: str = "images") -> list:
    items = files.items() if isinstance(files, dict) else ((f"image{i}.png", f) for i, f in enumerate(files))
    return [(field, (name, data, "application/octet-stream")) for name, data in items]


def fashion_png(index: int) -> bytes:
    """Fashion-MNIST test image `index` as a 56-pixel PNG (what the deployment tests send)."""
    from loadtests.classifier_data import encode as encode_image
    from training.datasets import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return encode_image(images[index], 56, "PNG")
