"""The generator's contract, shared by training and serving (numpy only, no torch, no BentoML).

Training writes these into each generator's card and exports models that take model_inputs();
the generator service and the admin gate's probes call the same functions, so a seed gives
the same image in training's grids, in the card's parity check and over HTTP:

    latents = seed_latents([7, 8], latent_dim)               # float32 [2, latent_dim]
    x = model_inputs(latents, labels, classes)               # + one-hot class weights if conditional
    images = to_uint8(session.run(None, {name: x})[0])       # uint8 [N, H, W, C]
"""

from __future__ import annotations

import math

import numpy as np

SEED_TO_LATENT = "numpy.random.default_rng(seed).standard_normal(latent_dim).astype(numpy.float32)"
TO_UINT8 = "numpy.clip(numpy.rint((image + 1) * 127.5), 0, 255).astype(numpy.uint8)"


def seed_latent(seed: int, latent_dim: int) -> np.ndarray:
    """One seed -> one latent (SEED_TO_LATENT), reproducible by any numpy client."""
    return np.random.default_rng(int(seed)).standard_normal(latent_dim).astype(np.float32)


def seed_latents(seeds, latent_dim: int) -> np.ndarray:
    return np.stack([seed_latent(s, latent_dim) for s in seeds])


def model_inputs(latents: np.ndarray, labels: np.ndarray | None, classes: list[str] | None,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """What the model takes: the latents, then (conditional models) the class weights, one-hot
    for labels unless weights are given (morphing)."""
    if classes is None:
        return latents
    if weights is None:
        weights = np.eye(len(classes), dtype=np.float32)[labels]
    return np.concatenate([latents, weights.astype(np.float32)], axis=1)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (TO_UINT8, then channels last)."""
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, columns: int, padding: int = 2) -> np.ndarray:
    """uint8 NHWC -> one HWC image, row by row, black padding."""
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid
