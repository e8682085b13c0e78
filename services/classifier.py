"""Image classifier service (port 3003): classes, embeddings and few-shot teach/check.

    POST /classify   multipart: images (files), top_k         -> top-k labels per image
    POST /embed      multipart: images                         -> L2-normalised embeddings
    POST /teach      multipart: name, images                   -> ids of the taught examples
    POST /check      multipart: images                         -> best taught name, confidence, matched
    POST /similar    multipart: images, limit                  -> nearest taught examples
    POST /taught     {}                                        -> names with example counts
    POST /forget     {"name": ...} or {"id": ...}
    POST /rename     {"name" or "id", "new_name"}
    POST /state/export, POST /state/import                     -> the taught state as JSON
    GET  /info       model, contract, limits, threshold

Images are decoded here with explicit limits (services/imaging.py, the same code training
used), so served predictions equal offline ones. The taught state is a JSON file
(TEACH_STATE_PATH), rewritten atomically under a lock after every change: an answered
teach survives a restart or kill -9, and concurrent teach calls lose nothing. One worker
process owns the file.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from services import imaging
from services.runtime import ApiError, Runtime, add_http_layer, api_errors, bad_request
from services.runtime.config import _float, _int
from services.runtime.repository import write_json_atomic

SERVICE = "classifier"
STATE_FORMAT = 1
NAME_PATTERN = re.compile(r"^[\w][\w .'@+-]*$")  # letters/digits (any script), space . ' @ + - _
log = logging.getLogger("services.classifier")


class Limits:
    """Every request limit, from the environment (the README's configuration table)."""

    def __init__(self, max_batch_size: int):
        self.images_per_request = min(_int("MAX_IMAGES_PER_REQUEST", 32, minimum=1), max_batch_size)
        self.image = imaging.Limits(max_file_bytes=_int("MAX_IMAGE_BYTES", 8 * 1024 * 1024, minimum=1),
                                    max_pixels=_int("MAX_IMAGE_PIXELS", 40_000_000, minimum=1),
                                    max_side=_int("MAX_IMAGE_SIDE", 20_000, minimum=1))
        self.name_length = _int("MAX_NAME_LENGTH", 64, minimum=1)
        self.taught_examples = _int("MAX_TAUGHT_EXAMPLES", 10_000, minimum=1)
        self.similar = 50

    def describe(self) -> dict:
        return {"max_images_per_request": self.images_per_request, "max_image_bytes": self.image.max_file_bytes,
                "max_image_pixels": self.image.max_pixels, "max_image_side": self.image.max_side,
                "max_name_length": self.name_length, "max_taught_examples": self.taught_examples,
                "image_formats": sorted(imaging.FORMATS)}


# Multipart input ---------------------------------------------------------------------------
# BentoML's own multipart handling writes every upload to a temporary file and fetches a URL
# sent in place of a file. These input specs read the form themselves, with limits, keep the
# raw bytes, and never raise: a problem is handed to the endpoint, which answers it as a 4xx.

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


# Helpers -----------------------------------------------------------------------------------

def int_field(value: Any, field: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise bad_request("invalid_field", f"{field} must be an integer, got {str(value)[:40]!r}", field) from None
    if not low <= number <= high:
        raise bad_request("invalid_field", f"{field} must be between {low} and {high}, got {number}", field)
    return number


def check_name(name: Any, max_length: int, field: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise bad_request("invalid_name", f"{field} is required: a non-empty string", field)
    if len(name) > max_length:
        raise bad_request("invalid_name", f"{field} has {len(name)} characters, over the limit of {max_length} "
                          "(MAX_NAME_LENGTH)", field)
    if name != name.strip() or not NAME_PATTERN.match(name):
        raise bad_request("invalid_name", f"{field} {name[:40]!r} may hold letters, digits, spaces and . ' @ + - _, "
                          "starting with a letter, digit or _, without leading or trailing spaces", field)
    return name


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def unpack(text: str, dim: int) -> np.ndarray:
    vector = np.frombuffer(base64.b64decode(text, validate=True), "<f4")
    if vector.shape != (dim,) or not np.isfinite(vector).all():
        raise ValueError(f"embedding is not {dim} finite float32 values")
    return vector


# The service -------------------------------------------------------------------------------

@bentoml.service(name=SERVICE, workers=1, traffic={"timeout": 60})
class Classifier:
    def __init__(self) -> None:
        self.runtime = Runtime(service=SERVICE, kind="classifier")
        self.limits = Limits(self.runtime.settings.max_batch_size)
        self.state_path = Path(os.environ.get("TEACH_STATE_PATH", "data/classifier/taught.json"))
        self.threshold_override = _float("TEACH_MATCH_THRESHOLD", float("nan"))
        self.teach_model_name = os.environ.get("TEACH_MODEL") or None
        self.lock = asyncio.Lock()
        self.examples: list[dict] = []      # every stored example, for any model
        self.state_failure: str | None = None
        try:
            self.load_state()
        except (OSError, ValueError, RuntimeError) as exc:
            # Not ready, and the file is left as it is: serving would overwrite it at the next teach.
            self.state_failure = f"taught state {self.state_path} cannot be read: {exc}"
            log.error("classifier: NOT READY - %s", self.state_failure)

    def __is_ready__(self) -> bool:
        return self.runtime.ready and self.state_failure is None

    def info(self) -> dict:
        teach = None
        if self.state_failure:
            teach = {"error": self.state_failure}
        elif self.runtime.ready:
            try:
                model = self.teach_model()
                teach = {"model": model.name, "threshold": self.threshold(model), "state_path": str(self.state_path),
                         "examples": len(self.usable(model)[0]), "calibration":
                             model.card.get("metrics", {}).get("teach_calibration")}
            except ApiError as exc:
                teach = {"error": exc.message}
        return self.runtime.info(
            limits_images=self.limits.describe(), teach=teach,
            endpoints=["POST /classify", "POST /embed", "POST /teach", "POST /check", "POST /similar",
                       "POST /taught", "POST /forget", "POST /rename", "POST /state/export",
                       "POST /state/import", "GET /info"])

    # Images --------------------------------------------------------------------------------

    def decode_all(self, files: list[tuple[str, bytes]], model) -> np.ndarray:
        """Uploads -> float32 [N, 3, S, S] by the card's contract; a 4xx naming the first bad file."""
        if not files:
            raise bad_request("no_images", "send at least one image file in the field 'images'", "images")
        if len(files) > self.limits.images_per_request:
            raise bad_request("too_many_images", f"{len(files)} images is over the limit of "
                              f"{self.limits.images_per_request} per request (MAX_IMAGES_PER_REQUEST)", "images")
        prep = model.card["contract"]["preprocessing"]
        args = imaging.contract_args(prep)
        pixels = []
        for i, (filename, data) in enumerate(files):
            try:
                pixels.append(imaging.prepare(imaging.decode(data, self.limits.image), **args))
            except imaging.ImageError as exc:
                raise ApiError(exc.status, exc.code, f"images[{i}] ({filename[:80]}): {exc.message}",
                               f"images[{i}]") from None
        return imaging.normalise(np.stack(pixels), prep["mean"], prep["std"])

    async def infer(self, model, files) -> dict[str, np.ndarray]:
        batch = await asyncio.to_thread(self.decode_all, files, model)  # decoding is CPU work: off the loop
        outputs = await model(batch)
        return dict(zip(model.output_names, outputs))

    # Classification ------------------------------------------------------------------------

    @bentoml.api(route="/classify", input_spec=ClassifyUpload)
    @api_errors
    async def classify(self, images, problem=None, top_k=5, model=None) -> dict:
        if problem is not None:
            raise problem
        classifier = self.runtime.get(model)
        labels = classifier.card["contract"]["labels"]
        k = int_field(top_k, "top_k", 1, len(labels))
        probabilities = softmax((await self.infer(classifier, images))["logits"])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        predictions = [[{"label": labels[j], "score": float(row[j])} for j in top] for row, top in
                       zip(probabilities, order)]
        return {"predictions": predictions, "model": classifier.name, "version": classifier.version}

    @bentoml.api(route="/embed", input_spec=EmbedUpload)
    @api_errors
    async def embed(self, images, problem=None, model=None) -> dict:
        if problem is not None:
            raise problem
        classifier = self.runtime.get(model)
        embeddings = (await self.infer(classifier, images))["embedding"]
        return {"embeddings": embeddings.tolist(), "dim": int(embeddings.shape[1]),
                "model": classifier.name, "version": classifier.version}

    # Teach state ---------------------------------------------------------------------------

    def require_state(self) -> None:
        if self.state_failure:
            raise ApiError(503, "state_unavailable", self.state_failure)

    def teach_model(self):
        self.require_state()
        return self.runtime.get(self.teach_model_name)

    def threshold(self, model) -> float:
        if not np.isnan(self.threshold_override):
            return self.threshold_override
        return float(model.card["contract"].get("match_threshold", 0.8))

    def load_state(self) -> None:
        """Read the taught state; a missing file is an empty state, a broken one raises."""
        if not self.state_path.exists():
            return
        data = self.state_path.read_text()
        state = json.loads(data)
        if state.get("format") != STATE_FORMAT or not isinstance(state.get("examples"), list):
            raise RuntimeError(f"{self.state_path} is not a taught state (format {STATE_FORMAT})")
        self.examples = state["examples"]
        log.info("classifier: %d taught examples from %s", len(self.examples), self.state_path)

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "examples": self.examples}

    async def save(self) -> None:
        """Atomic rewrite (temporary file, fsync, rename); called with the lock held."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(write_json_atomic, self.state_path, self.state())

    def usable(self, model) -> tuple[list[dict], np.ndarray]:
        """The examples taught with this model (embeddings of other models are not comparable)."""
        cached = getattr(self, "_usable", None)
        if cached is not None and cached[0] is self.examples and cached[1] == model.card["sha256"]:
            return cached[2], cached[3]  # every change replaces self.examples, so identity is freshness
        dim = model.card["contract"]["outputs"][1]["shape"][1]
        rows = [e for e in self.examples if e["model_sha256"] == model.card["sha256"]]
        matrix = np.stack([unpack(e["embedding"], dim) for e in rows]) if rows else np.zeros((0, dim), np.float32)
        self._usable = (self.examples, model.card["sha256"], rows, matrix)
        return rows, matrix

    @bentoml.api(route="/teach", input_spec=TeachUpload)
    @api_errors
    async def teach(self, images, problem=None, name=None) -> dict:
        if problem is not None:
            raise problem
        name = check_name(name, self.limits.name_length)
        model = self.teach_model()
        embeddings = (await self.infer(model, images))["embedding"]
        async with self.lock:
            if len(self.examples) + len(embeddings) > self.limits.taught_examples:
                raise ApiError(409, "too_many_examples", f"teaching {len(embeddings)} more would exceed the limit of "
                               f"{self.limits.taught_examples} taught examples (MAX_TAUGHT_EXAMPLES); forget some first")
            added = [{"id": uuid.uuid4().hex, "name": name, "source": filename[:200], "model": model.name,
                      "model_sha256": model.card["sha256"], "embedding": pack(vector),
                      "taught": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                     for (filename, _), vector in zip(images, embeddings)]
            self.examples = self.examples + added
            try:
                await self.save()
            except BaseException:
                self.examples = self.examples[:-len(added)]  # not stored: not taught
                raise
            count = sum(1 for e in self.examples if e["name"] == name)
        return {"name": name, "ids": [e["id"] for e in added], "examples": count}

    @bentoml.api(route="/check", input_spec=EmbedUpload)
    @api_errors
    async def check(self, images, problem=None, model=None) -> dict:
        if problem is not None:
            raise problem
        teach_model = self.teach_model()
        if model is not None and model != teach_model.name:
            raise bad_request("invalid_field", f"teach/check use the model {teach_model.name!r} (TEACH_MODEL)", "model")
        embeddings = (await self.infer(teach_model, images))["embedding"]
        rows, matrix = self.usable(teach_model)
        threshold = self.threshold(teach_model)
        results = []
        for vector in embeddings:
            if not rows:
                results.append({"name": None, "id": None, "confidence": 0.0, "matched": False})
                continue
            similarity = matrix @ vector
            best = int(np.argmax(similarity))
            score = float(similarity[best])
            results.append({"name": rows[best]["name"], "id": rows[best]["id"], "confidence": round(score, 6),
                            "matched": bool(score >= threshold)})
        return {"results": results, "threshold": threshold, "taught_examples": len(rows),
                "model": teach_model.name, "version": teach_model.version}

    @bentoml.api(route="/similar", input_spec=SimilarUpload)
    @api_errors
    async def similar(self, images, problem=None, limit=5) -> dict:
        if problem is not None:
            raise problem
        limit = int_field(limit, "limit", 1, self.limits.similar)
        teach_model = self.teach_model()
        embeddings = (await self.infer(teach_model, images))["embedding"]
        rows, matrix = self.usable(teach_model)
        answer = []
        for vector in embeddings:
            similarity = matrix @ vector
            order = np.argsort(-similarity, kind="stable")[:limit]
            answer.append([{"id": rows[j]["id"], "name": rows[j]["name"], "similarity": round(float(similarity[j]), 6)}
                           for j in order])
        return {"similar": answer, "threshold": self.threshold(teach_model), "model": teach_model.name}

    @bentoml.api(route="/taught")
    @api_errors
    async def taught(self) -> dict:
        self.require_state()
        counts: dict[str, int] = {}
        for example in self.examples:
            counts[example["name"]] = counts.get(example["name"], 0) + 1
        return {"names": [{"name": n, "examples": c} for n, c in sorted(counts.items())],
                "total": len(self.examples)}

    @bentoml.api(route="/forget")
    @api_errors
    async def forget(
        self,
        name: Annotated[str | None, Field(description="forget every example of this name")] = None,
        id: Annotated[str | None, Field(description="forget one example")] = None,  # noqa: A002 - the API's word
    ) -> dict:
        self.require_state()
        if (name is None) == (id is None):
            raise bad_request("name_or_id", "give exactly one of name or id", "name")
        async with self.lock:
            keep = [e for e in self.examples if not (e["name"] == name if name is not None else e["id"] == id)]
            removed = len(self.examples) - len(keep)
            if not removed:
                raise ApiError(404, "not_taught", f"nothing taught under {'name' if name is not None else 'id'} "
                               f"{(name if name is not None else id)!r}", "name" if name is not None else "id")
            previous, self.examples = self.examples, keep
            try:
                await self.save()
            except BaseException:
                self.examples = previous
                raise
        return {"forgotten": removed}

    @bentoml.api(route="/rename")
    @api_errors
    async def rename(
        self,
        new_name: Annotated[str, Field(description="the new name")],
        name: Annotated[str | None, Field(description="rename every example of this name")] = None,
        id: Annotated[str | None, Field(description="rename one example")] = None,  # noqa: A002
    ) -> dict:
        self.require_state()
        if (name is None) == (id is None):
            raise bad_request("name_or_id", "give exactly one of name or id", "name")
        new_name = check_name(new_name, self.limits.name_length, "new_name")
        async with self.lock:
            hits = [i for i, e in enumerate(self.examples) if (e["name"] == name if name is not None else e["id"] == id)]
            if not hits:
                raise ApiError(404, "not_taught", f"nothing taught under {'name' if name is not None else 'id'} "
                               f"{(name if name is not None else id)!r}", "name" if name is not None else "id")
            previous = self.examples
            self.examples = [dict(e, name=new_name) if i in set(hits) else e for i, e in enumerate(previous)]
            try:
                await self.save()
            except BaseException:
                self.examples = previous
                raise
        return {"renamed": len(hits), "name": new_name}

    @bentoml.api(route="/state/export")
    @api_errors
    async def export_state(self) -> dict:
        self.require_state()
        async with self.lock:
            return self.state()

    @bentoml.api(route="/state/import")
    @api_errors
    async def import_state(
        self,
        state: Annotated[dict, Field(description="a state from /state/export")],
        mode: Annotated[str, Field(description="merge (keep what is taught, add new ids) or replace")] = "merge",
    ) -> dict:
        self.require_state()
        if mode not in ("merge", "replace"):
            raise bad_request("invalid_field", "mode must be merge or replace", "mode")
        incoming = self.validate_state(state)
        async with self.lock:
            previous = self.examples
            if mode == "replace":
                merged = incoming
            else:
                known = {e["id"] for e in previous}
                merged = previous + [e for e in incoming if e["id"] not in known]
            if len(merged) > self.limits.taught_examples:
                raise ApiError(409, "too_many_examples", f"the result would hold {len(merged)} examples, over the "
                               f"limit of {self.limits.taught_examples} (MAX_TAUGHT_EXAMPLES)", "state")
            self.examples = merged
            try:
                await self.save()
            except BaseException:
                self.examples = previous
                raise
        return {"imported": len(merged) - (0 if mode == "replace" else len(previous)), "total": len(merged)}

    def validate_state(self, state: Any) -> list[dict]:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("examples"), list):
            raise bad_request("invalid_state", f"state must be an object from /state/export (format {STATE_FORMAT})",
                              "state")
        known_models = {m.card["sha256"]: m for m in self.runtime.models.values()}
        examples = []
        for i, e in enumerate(state["examples"]):
            field = f"state.examples[{i}]"
            if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in
                                                 ("id", "name", "model", "model_sha256", "embedding")):
                raise bad_request("invalid_state", f"{field} needs string id, name, model, model_sha256, embedding", field)
            check_name(e["name"], self.limits.name_length, f"{field}.name")
            if not re.fullmatch(r"[0-9a-f]{32}", e["id"]):
                raise bad_request("invalid_state", f"{field}.id must be 32 hex digits", f"{field}.id")
            model = known_models.get(e["model_sha256"])
            if model is not None:
                try:
                    unpack(e["embedding"], model.card["contract"]["outputs"][1]["shape"][1])
                except ValueError as exc:
                    raise bad_request("invalid_state", f"{field}.embedding: {exc}", f"{field}.embedding") from None
            examples.append({k: e[k] for k in ("id", "name", "model", "model_sha256", "embedding")} |
                            {"source": str(e.get("source", ""))[:200], "taught": str(e.get("taught", ""))[:40]})
        return examples


add_http_layer(Classifier, SERVICE)
