"""Generator service (port 3002): images from the GAN generators in models/ (kind "generator").

    POST /generate     {"n": 4, "seed": 7, "latents": null, "truncation": 1.0, "format": "json" | "png"}
    POST /interpolate  {"seed_a": 1, "seed_b": 2, "steps": 8, "method": "slerp" | "linear",
                        "format": "json" | "png" | "gif"}
    GET  /info         latent size, image size and channels, classes, limits, the cards' metrics

Class-conditional generators (their card lists `classes`) also take `label`: a class name or
index for every image, or a list with one per image; without it image i's class is its seed
mod the number of classes (explicit latents: i mod it). The model's input is the latent then
the class weights (one-hot; /interpolate mixes two to morph one class into another).
With `Accept: application/x-npy` /generate answers the images as uint8 [N, H, W] (.npy), no
PNG, no base64 (services/arrays.py).

A seed becomes a latent exactly as the card says (services/contracts/latents.py, which training uses
too): numpy's default_rng(seed).standard_normal(z) as float32; image i of a request with seed s
uses seed (s + i) mod 2**32. Pixels are round((x + 1) * 127.5). Inference goes through the
runtime's adaptive batcher (concurrent requests share one onnxruntime run); a row's pixels do not
depend on the batch it ran in (checked at export, recorded in the card as
parity.uint8_identical_batch_of_1_vs_64), so the same seed gives the same PNG bytes. PNG/GIF
encoding runs on a thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field
from starlette.responses import Response

from services import arrays
from services.contracts.imaging import gif_bytes, png_bytes
from services.contracts.latents import image_grid, model_inputs, seed_latent, to_uint8
from services.runtime import (VERSION_FIELD, LoadedModel, Runtime, add_http_layer, api_errors, bad_request,
                              version_of)
from services.runtime.config import service_options
from services.runtime.errors import shown

SERVICE = "generator"
MAX_IMAGES = 64                  # images per /generate request
MIN_STEPS, MAX_STEPS = 2, 64     # frames per /interpolate request
MAX_SEED = 2**32 - 1             # seeds are 0..2**32-1
MAX_ABS_LATENT = 100.0           # a latent component beyond this is a mistake (they are N(0, 1))
TRUNCATION_RANGE = (0.0, 1.0)    # latents are scaled by it: lower = closer to the average image
GENERATE_FORMATS = ("json", "png")
INTERPOLATE_FORMATS = ("json", "png", "gif")
METHODS = ("slerp", "linear")
ENCODER_THREADS = 4              # PNG/GIF encoding pool (Pillow's zlib releases the GIL)


def interpolate_latents(a: np.ndarray, b: np.ndarray, steps: int, method: str) -> np.ndarray:
    """Latents from a to b, both included exactly (t = 0 and t = 1 give a and b bit for bit)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ts = np.linspace(0.0, 1.0, steps)
    cos = np.dot(a64, b64) / (np.linalg.norm(a64) * np.linalg.norm(b64) or 1.0)
    omega = math.acos(float(np.clip(cos, -1.0, 1.0)))
    if method == "linear" or math.sin(omega) < 1e-6:  # (anti)parallel latents: slerp degenerates
        frames = [(1.0 - t) * a64 + t * b64 for t in ts]
    else:  # spherical: keeps the norm typical of N(0, I) latents, so middle frames are not washed out
        frames = [(math.sin((1.0 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega) for t in ts]
    frames[0], frames[-1] = a64, b64
    return np.stack(frames).astype(np.float32)


def check_seed(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise bad_request("seed_out_of_range", f"{field} must be an integer from 0 to {MAX_SEED}, got {shown(value)}",
                          field)
    return value


def check_truncation(truncation: float) -> np.float32:
    low, high = TRUNCATION_RANGE
    if not math.isfinite(truncation) or not low < truncation <= high:
        raise bad_request("truncation_out_of_range",
                          f"truncation must be a number in ({low:g}, {high:g}], got {shown(truncation)}", "truncation")
    return np.float32(truncation)


def check_format(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise bad_request("invalid_format", f"format must be one of {list(allowed)}, got {shown(value)}", "format")
    return value


def check_labels(label: Any, count: int, classes: list[str] | None, model: str, field: str = "label",
                 default: list[int] | None = None) -> np.ndarray | None:
    """A request's label (a class name or index, or a list of one per image) -> int [count];
    400 naming the classes otherwise. None for an unconditional model without a label."""
    if classes is None:
        if label is not None:
            raise bad_request("not_conditional", f"{model} is not class-conditional: it takes no {field}", field)
        return None
    if label is None:
        return np.asarray(default, np.int64) % len(classes)
    items = label if isinstance(label, list) else [label] * count
    if isinstance(label, list) and len(label) != count:
        raise bad_request("label_count", f"{field} has {len(label)} entries for {count} images: give one label, or "
                          "one per image", field)
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if isinstance(label, list) else field
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(classes):
            out.append(item)
        elif isinstance(item, str) and item.strip().lower() in (c.lower() for c in classes):
            out.append([c.lower() for c in classes].index(item.strip().lower()))
        else:
            raise bad_request("invalid_label", f"{shown(item)} is not a class of {model}: give a name or index "
                              f"0..{len(classes) - 1} of {classes}", where)
    return np.asarray(out, np.int64)


def classes_of(model: LoadedModel) -> list[str] | None:
    return model.spec.contract.classes


def check_latents(latents: Any, latent_dim: int) -> np.ndarray:
    """A JSON list of latents -> float32 [N, latent_dim]; 400 naming the first bad row."""
    if not isinstance(latents, list) or not latents:
        raise bad_request("invalid_latents", f"latents must be a non-empty list of lists of {latent_dim} numbers",
                          "latents")
    if len(latents) > MAX_IMAGES:
        raise bad_request("too_many_images", f"{len(latents)} latents is over the limit of {MAX_IMAGES} per request",
                          "latents")
    for i, row in enumerate(latents):
        field = f"latents[{i}]"
        if not isinstance(row, list) or len(row) != latent_dim:
            got = f"a list of {len(row)}" if isinstance(row, list) else type(row).__name__
            raise bad_request("invalid_latent", f"each latent must be a list of {latent_dim} numbers, got {got}", field)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
            raise bad_request("invalid_latent", "latent components must be numbers (no strings, booleans or null)",
                              field)
        try:
            array = np.asarray(row, np.float64)
        except OverflowError:  # an integer too large for a float
            raise bad_request("latent_out_of_range", f"latent components must lie within +/-{MAX_ABS_LATENT:g}",
                              field) from None
        if not np.isfinite(array).all():
            raise bad_request("non_finite_latent", "latent holds NaN or Infinity", field)
        if np.abs(array).max() > MAX_ABS_LATENT:
            raise bad_request("latent_out_of_range", f"latent components must lie within +/-{MAX_ABS_LATENT:g} "
                              f"(latents are standard normal)", field)
    return np.asarray(latents, np.float32)


@bentoml.service(name=SERVICE, **service_options(SERVICE))
class Generator:
    def __init__(self) -> None:
        self.runtime = Runtime(service=SERVICE, kind="generator")
        self.encoder = ThreadPoolExecutor(max_workers=ENCODER_THREADS, thread_name_prefix="encode")

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    def model_choices(self) -> dict:
        """For /docs.json: the generators each endpoint takes (model required with several)."""
        return {route: self.runtime.choices() for route in ("/generate", "/interpolate")} if self.runtime.ready else {}

    def info(self) -> dict:
        generators = {name: {key: m.card["contract"].get(key) for key in
                             ("latent_dim", "classes", "image_size", "channels", "output_range", "seed_to_latent",
                              "to_uint8")}
                      for name, m in self.runtime.models.items()}
        limits = {**self.runtime.settings.limits(), "max_images": MAX_IMAGES, "steps": [MIN_STEPS, MAX_STEPS],
                  "seed": [0, MAX_SEED], "max_abs_latent": MAX_ABS_LATENT,
                  "truncation": {"range": list(TRUNCATION_RANGE), "lower_bound_excluded": True, "default": 1.0},
                  "generate_formats": list(GENERATE_FORMATS), "interpolate_formats": list(INTERPOLATE_FORMATS),
                  "methods": list(METHODS)}
        return self.runtime.info(generators=generators, limits=limits,
                                 seeds="image i of a request with seed s uses seed (s + i) mod 2**32",
                                 labels="class-conditional generators (those listing classes): label names a class "
                                        "by name or index; without it image i's class is its seed mod the number "
                                        "of classes",
                                 endpoints=["POST /generate", "POST /interpolate", "GET /info"])

    async def _images(self, model: LoadedModel, latents: np.ndarray) -> np.ndarray:
        outputs = await model(latents)
        return to_uint8(outputs[0])

    async def _encode(self, func, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.encoder, func, *args)

    @bentoml.api(route="/generate")
    @api_errors
    async def generate(
        self,
        ctx: bentoml.Context,
        n: Annotated[int | None, Field(strict=True, description=f"images, 1..{MAX_IMAGES}; default 1, "
                                                                "or the number of latents")] = None,
        seed: Annotated[int | None, Field(strict=True, description=f"0..{MAX_SEED}; null draws one")] = None,
        latents: Annotated[list[Any] | None, Field(description="explicit latents [N, latent_dim] instead of a seed")] = None,
        truncation: Annotated[float, Field(description="scale latents by this, in (0, 1]")] = 1.0,
        format: Annotated[str, Field(description="json (base64 PNGs) or png (one image, a grid when n > 1); with "
                                                 "json, Accept: application/x-npy answers uint8 [N, H, W]")] \
            = "json",
        label: Annotated[str | int | list[str | int] | None, Field(
            description="class-conditional generators: the class (name or index, see /info) of every image, or a "
                        "list with one per image; default: image i's seed mod the number of classes")] = None,
        model: Annotated[str | None, Field(description="generator name; optional when one is loaded")] = None,
        version: Annotated[str | int | None, VERSION_FIELD] = None,
    ) -> Any:
        generator = self.runtime.get(model, version=version_of(version), canary=True)
        latent_dim, classes = generator.spec.contract.latent_dim, classes_of(generator)
        check_format(format, GENERATE_FORMATS)
        answer_form = arrays.answer_form(ctx.request.headers.get("accept")) if format == "json" else format
        scale = check_truncation(truncation)
        if latents is not None:
            if seed is not None:
                raise bad_request("seed_and_latents", "give either seed or latents, not both", "seed")
            batch = check_latents(latents, latent_dim)
            if n is not None and n != len(batch):
                raise bad_request("n_mismatch", f"n is {n} but {len(batch)} latents were given", "n")
            seeds: list[int | None] = [None] * len(batch)
        else:
            n = 1 if n is None else n
            if not 1 <= n <= MAX_IMAGES:
                raise bad_request("n_out_of_range", f"n must be from 1 to {MAX_IMAGES}, got {n}", "n")
            first = secrets.randbelow(MAX_SEED + 1) if seed is None else check_seed(seed, "seed")
            seeds = [(first + i) % (MAX_SEED + 1) for i in range(n)]
            batch = np.stack([seed_latent(s, latent_dim) for s in seeds])
        labels = check_labels(label, len(batch), classes, generator.name,
                              default=[i if s is None else s for i, s in enumerate(seeds)])
        images = await self._images(generator, model_inputs(batch * scale, labels, classes))
        headers = {"x-seeds": ",".join("null" if s is None else str(s) for s in seeds)}
        if labels is not None:
            headers["x-labels"] = ",".join(map(str, labels.tolist()))
        if answer_form == arrays.NPY:
            return self._binary(arrays.npy_bytes(images[..., 0] if images.shape[-1] == 1 else images), arrays.NPY,
                                generator, headers)
        if format == "png":
            columns = math.ceil(math.sqrt(len(images)))
            body = await self._encode(lambda: png_bytes(image_grid(images, columns) if len(images) > 1 else images[0]))
            return self._binary(body, "image/png", generator, headers)
        encoded = await self._encode(lambda: [base64.b64encode(png_bytes(image)).decode() for image in images])
        answer = {"images": encoded, "seeds": seeds, "model": generator.name, "version": generator.version,
                  "truncation": float(truncation)}
        if labels is not None:
            answer["labels"] = [classes[k] for k in labels]
        return answer

    @bentoml.api(route="/interpolate")
    @api_errors
    async def interpolate(
        self,
        seed_a: Annotated[int, Field(strict=True, description=f"first end point, 0..{MAX_SEED}")],
        seed_b: Annotated[int, Field(strict=True, description=f"last end point, 0..{MAX_SEED}")],
        steps: Annotated[int, Field(strict=True, description=f"frames, {MIN_STEPS}..{MAX_STEPS}, end points included")] = 8,
        method: Annotated[str, Field(description="slerp (spherical) or linear")] = "slerp",
        truncation: Annotated[float, Field(description="scale latents by this, in (0, 1]")] = 1.0,
        format: Annotated[str, Field(description="json (base64 PNG frames), png (a grid) or gif (animated)")] = "json",
        label_a: Annotated[str | int | None, Field(description="class-conditional generators: the first frame's "
                                                   "class (name or index); default: seed_a mod classes")] = None,
        label_b: Annotated[str | int | None, Field(description="the last frame's class; the same seeds with two "
                                                   "labels morph one class into the other")] = None,
        model: Annotated[str | None, Field(description="generator name; optional when one is loaded")] = None,
        version: Annotated[str | int | None, VERSION_FIELD] = None,
    ) -> Any:
        generator = self.runtime.get(model, version=version_of(version), canary=True)
        latent_dim, classes = generator.spec.contract.latent_dim, classes_of(generator)
        check_seed(seed_a, "seed_a")
        check_seed(seed_b, "seed_b")
        if not MIN_STEPS <= steps <= MAX_STEPS:
            raise bad_request("steps_out_of_range", f"steps must be from {MIN_STEPS} to {MAX_STEPS}, got {steps}",
                              "steps")
        if method not in METHODS:
            raise bad_request("invalid_method", f"method must be one of {list(METHODS)}, got {shown(method)}", "method")
        check_format(format, INTERPOLATE_FORMATS)
        scale = check_truncation(truncation)
        latents = interpolate_latents(seed_latent(seed_a, latent_dim) * scale, seed_latent(seed_b, latent_dim) * scale,
                              steps, method)
        ends = [check_labels(value, 1, classes, generator.name, field, default=[seed])
                for value, field, seed in ((label_a, "label_a", seed_a), (label_b, "label_b", seed_b))]
        weights = None
        if classes is not None:  # the class weights walk in a straight line from one one-hot to the other
            t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
            eye = np.eye(len(classes), dtype=np.float32)
            weights = (1 - t) * eye[ends[0][0]] + t * eye[ends[1][0]]
        frames = await self._images(generator, model_inputs(latents, None, classes, weights))
        headers = {"x-seeds": f"{seed_a},{seed_b}"}
        if classes is not None:
            headers["x-labels"] = f"{ends[0][0]},{ends[1][0]}"
        if format == "png":
            body = await self._encode(lambda: png_bytes(image_grid(frames, min(steps, 16))))
            return self._binary(body, "image/png", generator, headers)
        if format == "gif":
            return self._binary(await self._encode(gif_bytes, frames), "image/gif", generator, headers)
        encoded = await self._encode(lambda: [base64.b64encode(png_bytes(f)).decode() for f in frames])
        answer = {"frames": encoded, "seeds": [seed_a, seed_b], "steps": steps, "method": method,
                  "model": generator.name, "version": generator.version}
        if classes is not None:
            answer["labels"] = [classes[ends[0][0]], classes[ends[1][0]]]
        return answer

    @staticmethod
    def _binary(body: bytes, media_type: str, model: LoadedModel, headers: dict) -> Response:
        # BentoML passes a starlette Response through unchanged.
        return Response(body, media_type=media_type,
                        headers={**headers, "x-model": model.name, "x-model-version": model.version})


Generator.apis["generate"].input_spec.npy_answer = (
    "with format json and Accept: application/x-npy, the images as .npy, uint8 [N, H, W] (grey) or [N, H, W, 3]; "
    "seeds, labels, model and version in x-seeds, x-labels, x-model, x-model-version")
add_http_layer(Generator, SERVICE)
