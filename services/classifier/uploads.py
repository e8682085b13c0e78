"""Multipart uploads of the classifier's endpoints, read with limits.

BentoML's own multipart handling writes every upload to a temporary file and fetches a URL
sent in place of a file. These input specs read the form themselves, with limits, keep the
raw bytes, and never raise: a problem is handed to the endpoint, which answers it as a 4xx.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import bentoml
import numpy as np
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from services import arrays
from services.contracts import imaging
from services.runtime import VERSION_FIELD, ApiError, bad_request
from services.runtime.errors import shown

log = logging.getLogger("services.runtime")  # the runtime's logger has a handler in every worker


HIDDEN = {"problem", "answer"}  # set by from_http_request, never by the client


class Upload(bentoml.IODescriptor):
    images: list[Path] = Field(description="image files (JPEG, PNG, WebP, BMP, GIF), in the field 'images'")
    problem: SkipJsonSchema[Any] = None

    @classmethod
    async def from_http_request(cls, request, serde):
        values: dict[str, Any] = {name: (None if f.is_required() else f.default) for name, f in cls.model_fields.items()}
        values.update(images=[], problem=None)
        if getattr(cls, "npy_answer", None):
            try:
                values["answer"] = arrays.answer_form(request.headers.get("accept"))
            except ApiError as exc:
                values["problem"] = exc
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            values["problem"] = ApiError(415, "unsupported_media_type",
                                         f"send multipart/form-data with image files in the field 'images', "
                                         f"not {media_type or 'no content type'}", "images")
            return cls.model_construct(**values)
        file_fields = set(cls.multipart_fields)  # BentoML marks the Path fields
        # The service's limits, read once at start; one file more than allowed lets the
        # endpoint answer too_many_images instead of starlette's generic error.
        limit = bentoml.get_current_service().limits.images_per_request
        try:
            form = await request.form(max_files=limit + 1, max_fields=16, max_part_size=64 * 1024)
        except Exception as exc:  # noqa: BLE001 - starlette's multipart errors: malformed or over its limits
            detail = getattr(exc, "detail", None) or str(exc)
            values["problem"] = bad_request("invalid_multipart", f"cannot read the multipart form: {detail}")
            return cls.model_construct(**values)
        for key in form.keys():
            if key not in cls.model_fields or key in HIDDEN:
                values["problem"] = values["problem"] or bad_request(
                    "unknown_field", f"unknown form field {shown(key)}; expected {', '.join(sorted(set(cls.model_fields) - HIDDEN))}", key)
                continue
            items = form.getlist(key)
            if key in file_fields:
                files = []
                for item in items:
                    if isinstance(item, str):
                        values["problem"] = values["problem"] or bad_request(
                            "not_a_file", f"'{key}' must be file uploads, got a text value", key)
                        continue
                    files.append((item.filename or f"{key}[{len(files)}]", await item.read()))
                values[key] = files
            else:
                value = items[-1]
                values[key] = (await value.read()).decode("utf-8", "replace") if not isinstance(value, str) else value
        return cls.model_construct(**values)


TEACH_MODEL_HELP = "faces (the default when the face networks are loaded) or fashion; see /info"
VERSION_HELP = VERSION_FIELD.description  # the same words as on the JSON endpoints
FACE_HELP = "which face of each photo, when it shows several: its index in /faces/detect's answer (biggest first)"


class ClassifyUpload(Upload):
    top_k: int = Field(5, description="labels per image, most likely first")
    model: str | None = Field(None, description="model name; optional when one classifier is loaded")
    version: str | None = Field(None, description=VERSION_HELP)


class EmbedUpload(Upload):
    model: str | None = Field(None, description="model name; optional when one classifier is loaded")
    version: str | None = Field(None, description=VERSION_HELP)
    answer: SkipJsonSchema[str] = arrays.JSON  # from the Accept header

    npy_answer: ClassVar[str] = ("with Accept: application/x-npy, the embeddings as .npy, float32 [N, dim]; model "
                                 "and version in x-model, x-model-version")


class DetectUpload(Upload):
    pass


class TeachUpload(Upload):
    name: str = Field(description="who or what the images show")
    model: str | None = Field(None, description=TEACH_MODEL_HELP)
    face: int | None = Field(None, description=FACE_HELP)
    version: str | None = Field(None, description=VERSION_HELP)


class CheckUpload(Upload):
    model: str | None = Field(None, description=TEACH_MODEL_HELP)
    version: str | None = Field(None, description=VERSION_HELP)


class SimilarUpload(Upload):
    limit: int = Field(5, description="taught examples per image, nearest first")
    model: str | None = Field(None, description=TEACH_MODEL_HELP)
    face: int | None = Field(None, description=FACE_HELP)
    version: str | None = Field(None, description=VERSION_HELP)


class Cancelled(Exception):
    """The request was cancelled (client gone, REQUEST_TIMEOUT) while its images were decoding."""


def decode_batch(files: list[tuple[str, bytes]], limits, preprocessing: dict,
                 cancelled: threading.Event | None = None) -> np.ndarray:
    """Uploads -> float32 [N, 3, S, S] by the card's contract; a 4xx naming the first bad file."""
    args = imaging.contract_args(preprocessing)
    pixels = decode_each(files, limits, lambda image: imaging.prepare(image, **args), cancelled)
    return imaging.normalise(np.stack(pixels), preprocessing["mean"], preprocessing["std"])


def decode_photos(files: list[tuple[str, bytes]], limits, cancelled: threading.Event | None = None) -> list[np.ndarray]:
    """Uploads -> uint8 [H, W, 3] RGB arrays at their own size (the face pipeline's input)."""
    return decode_each(files, limits, imaging.rgb_array, cancelled)


def decode_each(files: list[tuple[str, bytes]], limits, convert, cancelled: threading.Event | None = None) -> list:
    """Check every file's header, then the request's pixel budget, then decode and convert
    file by file; stops between images once `cancelled` is set."""
    if not files:
        raise bad_request("no_images", "send at least one image file in the field 'images'", "images")
    if len(files) > limits.images_per_request:
        raise bad_request("too_many_images", f"{len(files)} images is over the limit of "
                          f"{limits.images_per_request} per request (MAX_IMAGES_PER_REQUEST)", "images")
    opened = []
    for i, (filename, data) in enumerate(files):  # headers only: a request's size is known before any decoding
        with named(i, filename):
            opened.append(imaging.open_image(data, limits.image))
    total = sum(image.width * image.height for image in opened)
    if total > limits.request_pixels:
        raise ApiError(413, "request_too_large", f"the images hold {total} pixels together, over the limit of "
                       f"{limits.request_pixels} per request (MAX_REQUEST_PIXELS); send fewer or smaller images",
                       "images")
    converted = []
    try:
        for i, (image, (filename, _)) in enumerate(zip(opened, files)):
            if cancelled is not None and cancelled.is_set():
                log.info("classifier: request cancelled: decoding stopped after %d of %d images", i, len(files))
                raise Cancelled(f"stopped after {i} of {len(files)} images")
            with named(i, filename):
                converted.append(convert(imaging.load(image)))
            opened[i] = None  # the decoded image can go
    finally:
        if total > RETURN_MEMORY_PIXELS:
            give_back_memory()
    return converted


@contextmanager
def named(i: int, filename: str):
    """An image's problem as a 4xx naming the file: images[3] (its file name)."""
    try:
        yield
    except imaging.ImageError as exc:
        raise ApiError(exc.status, exc.code, f"images[{i}] ({filename[:80]}): {exc.message}", f"images[{i}]") from None


RETURN_MEMORY_PIXELS = 4_000_000  # after decoding this much, hand freed memory back to the OS


def give_back_memory() -> None:
    """Large decodes leave glibc's heap grown (a worker went from 519 to 949 MB and stayed);
    malloc_trim returns the freed part to the operating system."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
