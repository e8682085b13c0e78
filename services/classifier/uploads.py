"""Multipart uploads of the classifier's endpoints, read with limits.

BentoML's own multipart handling writes every upload to a temporary file and fetches a URL
sent in place of a file. These input specs read the form themselves, with limits, keep the
raw bytes, and never raise: a problem is handed to the endpoint, which answers it as a 4xx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from services import imaging
from services.runtime import ApiError, bad_request


class Upload(bentoml.IODescriptor):
    images: list[Path] = Field(description="image files (JPEG, PNG, WebP, BMP, GIF), in the field 'images'")
    problem: SkipJsonSchema[Any] = None

    @classmethod
    async def from_http_request(cls, request, serde):
        values: dict[str, Any] = {name: (None if f.is_required() else f.default) for name, f in cls.model_fields.items()}
        values.update(images=[], problem=None)
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
            if key not in cls.model_fields or key == "problem":
                values["problem"] = values["problem"] or bad_request(
                    "unknown_field", f"unknown form field {key!r}; expected {', '.join(sorted(set(cls.model_fields) - {'problem'}))}", key)
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


class ClassifyUpload(Upload):
    top_k: int = Field(5, description="labels per image, most likely first")
    model: str | None = Field(None, description="model name; optional when one model is loaded")


class EmbedUpload(Upload):
    model: str | None = Field(None, description="model name; optional when one model is loaded")


class TeachUpload(Upload):
    name: str = Field(description="who or what the images show")


class SimilarUpload(Upload):
    limit: int = Field(5, description="taught examples per image, nearest first")


def decode_batch(files: list[tuple[str, bytes]], limits, preprocessing: dict) -> np.ndarray:
    """Uploads -> float32 [N, 3, S, S] by the card's contract; a 4xx naming the first bad file."""
    if not files:
        raise bad_request("no_images", "send at least one image file in the field 'images'", "images")
    if len(files) > limits.images_per_request:
        raise bad_request("too_many_images", f"{len(files)} images is over the limit of "
                          f"{limits.images_per_request} per request (MAX_IMAGES_PER_REQUEST)", "images")
    args = imaging.contract_args(preprocessing)
    pixels = []
    for i, (filename, data) in enumerate(files):
        try:
            pixels.append(imaging.prepare(imaging.decode(data, limits.image), **args))
        except imaging.ImageError as exc:
            raise ApiError(exc.status, exc.code, f"images[{i}] ({filename[:80]}): {exc.message}",
                           f"images[{i}]") from None
    return imaging.normalise(np.stack(pixels), preprocessing["mean"], preprocessing["std"])
