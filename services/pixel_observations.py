"""Image observations for pixel policies (uint8 frames [N, frames, H, W]) in the three forms
POST /act takes, each checked against the model's contract:

    "observations": [[[[255, 255, ...], ...], ...]]      nested numbers, integers 0..255
    "frames_png": [["iVBORw0...", ...4 PNGs...], ...]    each frame a greyscale PNG, oldest first
    "observations_b64": "...", "shape": [N, 4, 32, 120]  the raw uint8 bytes, row-major, base64

The compact forms are what a camera client sends: a 4-frame CartPole observation is 15,360
bytes raw (20 KB as base64, about 1.5 KB as PNGs), against about 60 KB as JSON numbers.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np

from services.runtime import bad_request

MAX_PNG_CHARS = 64 * 1024  # base64 characters of one frame's PNG (a 32x120 frame is about 500)


def check_uint8(batch: np.ndarray, field: str = "observations") -> np.ndarray:
    """Nested numbers -> uint8, refusing anything but integers 0..255."""
    if batch.dtype.kind == "f":
        integral = np.isfinite(batch) & (batch == np.round(batch))
        if not integral.all():
            i = int(np.argmin(integral.reshape(len(batch), -1).all(axis=1)))
            raise bad_request("invalid_observation", "image observations are uint8: integers from 0 to 255",
                              f"{field}[{i}]")
    outside = ((batch < 0) | (batch > 255)).reshape(len(batch), -1).any(axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        raise bad_request("invalid_observation", "image observations are uint8: integers from 0 to 255, "
                          f"got {batch[i].min()}..{batch[i].max()}", f"{field}[{i}]")
    return batch.astype(np.uint8)


def from_png_frames(frames: Any, obs_shape: list[int], max_batch: int) -> np.ndarray:
    """[[base64 PNG, ...], ...] -> uint8 [N, *obs_shape]; each PNG one greyscale frame."""
    from PIL import Image

    stacked, height, width = obs_shape[0], obs_shape[1], obs_shape[2]
    if not isinstance(frames, list) or not frames:
        raise bad_request("invalid_observations", "frames_png must be a non-empty list, one entry per observation",
                          "frames_png")
    _check_batch(len(frames), max_batch, "frames_png")
    batch = np.empty((len(frames), *obs_shape), np.uint8)
    for i, observation in enumerate(frames):
        if not isinstance(observation, list) or len(observation) != stacked:
            raise bad_request("invalid_observation", f"each observation is a list of {stacked} PNG frames, oldest "
                              "first", f"frames_png[{i}]")
        for j, encoded in enumerate(observation):
            field = f"frames_png[{i}][{j}]"
            if not isinstance(encoded, str) or len(encoded) > MAX_PNG_CHARS:
                raise bad_request("invalid_frame", f"a frame is a base64 PNG string of at most {MAX_PNG_CHARS} "
                                  "characters", field)
            try:
                with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)), formats=["PNG"]) as image:
                    if image.size != (width, height):  # read from the header, before any decoding
                        raise bad_request("invalid_frame", f"a frame is {width}x{height} pixels, got "
                                          f"{image.size[0]}x{image.size[1]}", field)
                    if image.mode != "L":
                        raise bad_request("invalid_frame", f"a frame is an 8-bit greyscale PNG (mode L), got mode "
                                          f"{image.mode}", field)
                    batch[i, j] = np.asarray(image)
            except (binascii.Error, ValueError, OSError, SyntaxError) as exc:
                raise bad_request("invalid_frame", f"not a readable base64 PNG: {type(exc).__name__}", field) from None
    return batch


def from_raw(encoded: Any, shape: Any, obs_shape: list[int], max_batch: int) -> np.ndarray:
    """base64 of the raw bytes + their shape [N, *obs_shape] -> uint8 [N, *obs_shape]."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad_request("invalid_shape", f"shape must be the batch's shape, [N, {', '.join(map(str, obs_shape))}]",
                          "shape")
    if len(shape) != len(obs_shape) + 1 or list(shape[1:]) != list(obs_shape) or shape[0] < 1:
        raise bad_request("invalid_shape", f"this model takes shape [N, {', '.join(map(str, obs_shape))}] with N >= 1, "
                          f"got {shape}", "shape")
    _check_batch(shape[0], max_batch, "shape")
    if not isinstance(encoded, str):
        raise bad_request("invalid_observations", "observations_b64 must be a base64 string", "observations_b64")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("invalid_observations", "observations_b64 is not valid base64", "observations_b64") from None
    expected = int(np.prod(shape))
    if len(raw) != expected:
        raise bad_request("invalid_observations", f"shape {shape} needs {expected} bytes, observations_b64 holds "
                          f"{len(raw)}", "observations_b64")
    return np.frombuffer(raw, np.uint8).reshape(shape)


def _check_batch(n: int, max_batch: int, field: str) -> None:
    if n > max_batch:
        raise bad_request("batch_too_large", f"{n} observations is over the limit of {max_batch} per request "
                          "(MAX_REQUEST_ITEMS)", field)
