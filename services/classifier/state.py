"""The taught state as JSON: what /state/export writes and /state/import (and the migration of
a legacy taught.json) reads. The format is the one the JSON-file store wrote, unchanged:

    {"format": 1, "saved": "2026-11-25T08:00:00Z",
     "examples": [{"id": "<32 hex>", "name": "...", "model": "fashion", "model_sha256": "<sha256>",
                   "embedding": "<base64 of float32 little-endian>", "source": "shoe.jpg",
                   "taught": "2026-11-25T07:59:58Z"}, ...]}

Every embedding that enters the store, taught or imported, goes through unit(): finite, of the
model's dimension, not zero, and scaled to unit length, so no example can dominate every check
(an imported 1280 x 1e30 would otherwise match every image) and no NaN reaches the ranking.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from services.classifier.store import Example
from services.runtime import bad_request

FORMAT = 1
ID = re.compile(r"[0-9a-f]{32}")
MAX_DIM = 4096  # embeddings of models this service does not have loaded: a sanity bound


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def unit(vector: np.ndarray, dim: int | None) -> np.ndarray:
    """A stored embedding: float32, unit length; ValueError saying what is wrong otherwise."""
    vector = np.asarray(vector, np.float64).ravel()
    if dim is not None and vector.shape != (dim,):
        raise ValueError(f"has {vector.size} values, the model's embedding has {dim}")
    if not 0 < vector.size <= MAX_DIM:
        raise ValueError(f"has {vector.size} values (1 to {MAX_DIM} allowed)")
    if not np.isfinite(vector).all():
        raise ValueError("has values that are not finite")
    norm = float(np.linalg.norm(vector))  # float64: no finite float32 input can overflow it
    if norm < 1e-12:
        raise ValueError("is zero (no direction to compare)")
    if abs(norm - 1.0) < 1e-5:  # already unit length (every export): keep the bits, so export -> import is exact
        return vector.astype(np.float32)
    return (vector / norm).astype(np.float32)


def pack(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def export(examples: list[Example]) -> dict:
    return {"format": FORMAT, "saved": now(), "examples": [
        {"id": e.id, "name": e.name, "model": e.model, "model_sha256": e.model_sha256, "embedding": pack(e.embedding),
         "source": e.source, "taught": e.taught} for e in examples]}


def parse(state: Any, dims: dict[str, int], check_name: Callable[[Any, str], str]) -> list[Example]:
    """A state from /state/export -> examples, every one validated; a 400 naming the first problem.
    dims: embedding size by model sha256 for the models loaded now (others: checked, not sized)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("examples"), list):
        raise bad_request("invalid_state", f"state must be an object from /state/export (format {FORMAT})", "state")
    examples, seen = [], set()
    for i, e in enumerate(state["examples"]):
        field = f"state.examples[{i}]"
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in
                                             ("id", "name", "model", "model_sha256", "embedding")):
            raise bad_request("invalid_state", f"{field} needs string id, name, model, model_sha256, embedding", field)
        name = check_name(e["name"], f"{field}.name")
        if not ID.fullmatch(e["id"]):
            raise bad_request("invalid_state", f"{field}.id must be 32 hex digits", f"{field}.id")
        if e["id"] in seen:
            raise bad_request("invalid_state", f"{field}.id {e['id']} appears twice", f"{field}.id")
        seen.add(e["id"])
        if not re.fullmatch(r"[0-9a-f]{64}", e["model_sha256"]) or not 0 < len(e["model"]) <= 200:
            raise bad_request("invalid_state", f"{field} needs a model name and a 64-hex-digit model_sha256", field)
        try:
            raw = np.frombuffer(base64.b64decode(e["embedding"], validate=True), "<f4")
            vector = unit(raw, dims.get(e["model_sha256"]))
        except (binascii.Error, ValueError) as exc:
            raise bad_request("invalid_state", f"{field}.embedding {exc}", f"{field}.embedding") from None
        examples.append(Example(e["id"], name, e["model"], e["model_sha256"], vector,
                                str(e.get("source", ""))[:200], str(e.get("taught", ""))[:40]))
    return examples


def read_legacy(path: Path, dims: dict[str, int], check_name: Callable[[Any, str], str]) -> list[Example]:
    """A taught.json written by the JSON-file store (the same format); raises ValueError if unusable."""
    try:
        return parse(json.loads(path.read_text()), dims, check_name)
    except Exception as exc:  # noqa: BLE001 - the ApiError of parse, or broken JSON: say which file
        raise ValueError(f"{path} is not a taught state: {getattr(exc, 'message', exc)}") from None
