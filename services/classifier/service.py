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
    GET  /info       model, contract, limits, threshold, store

Images are decoded with explicit limits (uploads.py, through services/imaging.py, the same
code training used), so served predictions equal offline ones. Taught examples live in a
database (TEACH_STORE: SQLite by default, PostgreSQL for replicas; store.py) that every
worker and replica shares; each change is one transaction, answered only once committed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field

from services.classifier import state as taught_state
from services.classifier.limits import Limits, check_name, import_bytes, int_field
from services.classifier.matching import Matcher
from services.classifier.store import Example, StoreError, TooManyExamples, open_store
from services.classifier.uploads import ClassifyUpload, EmbedUpload, SimilarUpload, TeachUpload, decode_batch
from services.runtime import ApiError, Runtime, add_http_layer, api_errors, bad_request
from services.runtime.config import _float, service_options
from services.runtime.errors import shown

SERVICE = "classifier"
DEFAULT_STORE = "sqlite:///data/classifier/taught.db"
LEGACY_STATE = "data/classifier/taught.json"
log = logging.getLogger("services.classifier")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def embedding_dim(model) -> int:
    return int(model.card["contract"]["outputs"][1]["shape"][1])


@bentoml.service(name=SERVICE, **service_options(SERVICE))
class Classifier:
    def __init__(self) -> None:
        self.runtime = Runtime(service=SERVICE, kind="classifier")
        self.limits = Limits(self.runtime.settings.max_batch_size)
        self.store_url = os.environ.get("TEACH_STORE", "").strip() or DEFAULT_STORE
        self.pgvector = os.environ.get("TEACH_PGVECTOR", "auto").strip().lower() or "auto"
        if self.pgvector not in ("auto", "on", "hnsw", "off"):
            raise ValueError(f"TEACH_PGVECTOR={self.pgvector!r} must be auto, on, hnsw or off")
        self.legacy_state = Path(os.environ.get("TEACH_STATE_PATH", "").strip() or LEGACY_STATE)
        self.threshold_override = _float("TEACH_MATCH_THRESHOLD", float("nan"))
        self.teach_model_name = os.environ.get("TEACH_MODEL") or None
        self.store = self.matcher = None
        self.state_failure: str | None = "the taught-examples store is opening"
        self.first_attempt = threading.Event()  # set once the store was tried: opened, or said why not
        threading.Thread(target=self.open_state, name="classifier-store", daemon=True).start()
        if self.runtime.settings.workers > 1:  # as the runtime does: accept requests once the store is open
            self.first_attempt.wait()

    def __is_ready__(self) -> bool:
        return self.runtime.ready and self.store is not None

    # The store -----------------------------------------------------------------------------

    def open_state(self) -> None:
        """Open the store once the models are loaded (imported embeddings are checked against
        them), import a legacy taught.json once, then serve. An unreachable database is tried
        again every 2 s (PostgreSQL may start after us); a legacy file that cannot be read
        keeps the service not ready, and the file is left as it is."""
        try:
            self.connect_store()
        finally:
            self.first_attempt.set()

    def connect_store(self) -> None:
        if not self.runtime.wait():
            return
        said = None
        while True:
            try:
                store = open_store(self.store_url, self.pgvector)
                break
            except (StoreError, ValueError, OSError, ImportError) as exc:
                why = f"taught-examples store {self.redacted_url()} cannot be opened: {exc}"
                if why != said:
                    self.not_ready(why + " (retrying every 2 s)")
                    said = why
                self.first_attempt.set()
                if isinstance(exc, ValueError):
                    return  # a wrong TEACH_STORE: retrying will not help
                time.sleep(2)
        try:
            self.import_legacy(store)
        except (StoreError, ValueError, OSError, TooManyExamples) as exc:
            return self.not_ready(f"taught state {self.legacy_state} cannot be read: {exc}")
        try:
            matcher = Matcher(store)
            teach_model = self.runtime.get(self.teach_model_name)
            matcher.prepare(teach_model.card["sha256"], embedding_dim(teach_model))  # cache or index, before ready
        except (StoreError, ApiError) as exc:
            return self.not_ready(f"taught examples cannot be prepared for search: {getattr(exc, 'message', exc)}")
        self.matcher, self.store, self.state_failure = matcher, store, None
        log.info("classifier: taught examples in %s (%s)", self.redacted_url(), store.describe()["search"])

    def not_ready(self, why: str) -> None:
        self.state_failure = why
        log.error("classifier: NOT READY - %s", why)

    def import_legacy(self, store) -> None:
        if not self.legacy_state.exists():
            return
        examples = taught_state.read_legacy(self.legacy_state, self.dims(), self.check_name)
        added = store.import_once(f"imported {self.legacy_state.resolve()}", examples, self.limits.taught_examples)
        if added is not None:
            log.info("classifier: imported %d of %d examples from %s (the file is kept; delete it when you like)",
                     added, len(examples), self.legacy_state)

    def redacted_url(self) -> str:
        """The store's URL without its password, for logs and /info."""
        scheme, sep, rest = self.store_url.partition("://")
        credentials, at, host = rest.rpartition("@")
        user, colon, _ = credentials.partition(":")
        return f"{scheme}{sep}{user}{':***' if colon else ''}{at}{host}"

    def dims(self) -> dict[str, int]:
        return {m.card["sha256"]: embedding_dim(m) for m in self.runtime.models.values()}

    def check_name(self, name: Any, field: str = "name") -> str:
        return check_name(name, self.limits.name_length, field)

    def require_store(self):
        if self.store is None:
            raise ApiError(503, "state_unavailable", self.state_failure or "the store is opening")
        return self.store

    async def stored(self, method, *args, **kwargs):
        """Run a blocking store call in a worker thread; store problems become HTTP answers."""
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except StoreError as exc:
            raise ApiError(503, "store_unavailable", str(exc)) from None
        except TooManyExamples as exc:
            raise ApiError(409, "too_many_examples", f"the taught state would hold {exc.total} examples, over the "
                           f"limit of {exc.limit} (MAX_TAUGHT_EXAMPLES); forget some first", "state") from None

    def info(self) -> dict:
        teach = None
        if self.state_failure:
            teach = {"error": self.state_failure}
        elif self.runtime.ready:
            try:
                model = self.teach_model()
                teach = {"model": model.name, "threshold": self.threshold(model), "store": self.store.describe(),
                         "examples": self.store.count(model.card["sha256"]),
                         "calibration": model.card.get("metrics", {}).get("teach_calibration")}
            except (ApiError, StoreError) as exc:
                teach = {"error": getattr(exc, "message", str(exc))}
        return self.runtime.info(
            limits_images=self.limits.describe(), teach=teach,
            endpoints=["POST /classify", "POST /embed", "POST /teach", "POST /check", "POST /similar",
                       "POST /taught", "POST /forget", "POST /rename", "POST /state/export",
                       "POST /state/import", "GET /info"])

    # Images --------------------------------------------------------------------------------

    async def infer(self, model, files) -> dict[str, np.ndarray]:
        preprocessing = model.card["contract"]["preprocessing"]
        cancelled = threading.Event()
        try:  # decoding is CPU work: off the loop, and stopped if the request is cancelled
            batch = await asyncio.to_thread(decode_batch, files, self.limits, preprocessing, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise
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

    # Teach ---------------------------------------------------------------------------------

    def teach_model(self):
        self.require_store()
        return self.runtime.get(self.teach_model_name)

    def threshold(self, model) -> float:
        if not np.isnan(self.threshold_override):
            return self.threshold_override
        return float(model.card["contract"].get("match_threshold", 0.8))

    async def teach_embeddings(self, images, model: str | None = None):
        teach_model = self.teach_model()
        if model is not None and model != teach_model.name:
            raise bad_request("invalid_field", f"teach/check use the model {teach_model.name!r} (TEACH_MODEL)", "model")
        return teach_model, (await self.infer(teach_model, images))["embedding"]

    @bentoml.api(route="/teach", input_spec=TeachUpload)
    @api_errors
    async def teach(self, images, problem=None, name=None) -> dict:
        if problem is not None:
            raise problem
        name = self.check_name(name)
        model, embeddings = await self.teach_embeddings(images)
        taught = taught_state.now()
        examples = [Example(uuid.uuid4().hex, name, model.name, model.card["sha256"], taught_state.unit(vector, None),
                            filename[:200], taught) for (filename, _), vector in zip(images, embeddings)]
        count = await self.stored(self.store.add, examples, self.limits.taught_examples)
        return {"name": name, "ids": [e.id for e in examples], "examples": count}

    @bentoml.api(route="/check", input_spec=EmbedUpload)
    @api_errors
    async def check(self, images, problem=None, model=None) -> dict:
        if problem is not None:
            raise problem
        teach_model, embeddings = await self.teach_embeddings(images, model)
        nearest, total = await self.stored(self.matcher.nearest, teach_model.card["sha256"], embeddings, 1)
        threshold = self.threshold(teach_model)
        results = [{"name": best[0].name, "id": best[0].id, "confidence": round(best[0].similarity, 6),
                    "matched": bool(best[0].similarity >= threshold)} if best else
                   {"name": None, "id": None, "confidence": 0.0, "matched": False} for best in nearest]
        return {"results": results, "threshold": threshold, "taught_examples": total,
                "model": teach_model.name, "version": teach_model.version}

    @bentoml.api(route="/similar", input_spec=SimilarUpload)
    @api_errors
    async def similar(self, images, problem=None, limit=5) -> dict:
        if problem is not None:
            raise problem
        limit = int_field(limit, "limit", 1, self.limits.similar)
        teach_model, embeddings = await self.teach_embeddings(images)
        nearest, _ = await self.stored(self.matcher.nearest, teach_model.card["sha256"], embeddings, limit)
        answer = [[{"id": m.id, "name": m.name, "similarity": round(m.similarity, 6)} for m in matches]
                  for matches in nearest]
        return {"similar": answer, "threshold": self.threshold(teach_model), "model": teach_model.name}

    @bentoml.api(route="/taught")
    @api_errors
    async def taught(self) -> dict:
        counts = await self.stored(self.require_store().counts)
        return {"names": [{"name": n, "examples": c} for n, c in counts.items()], "total": sum(counts.values())}

    @staticmethod
    def name_or_id(name: str | None, id: str | None) -> tuple[str, str]:  # noqa: A002
        if (name is None) == (id is None):
            raise bad_request("name_or_id", "give exactly one of name or id", "name")
        return ("name", unicodedata.normalize("NFC", name)) if name is not None else ("id", id)

    async def changed(self, method, field: str, value: str, *args) -> int:
        try:
            return await self.stored(method, *args, **{field: value})
        except KeyError:
            raise ApiError(404, "not_taught", f"nothing taught under {field} {shown(value)}", field) from None

    @bentoml.api(route="/forget")
    @api_errors
    async def forget(
        self,
        name: Annotated[str | None, Field(description="forget every example of this name")] = None,
        id: Annotated[str | None, Field(description="forget one example")] = None,  # noqa: A002 - the API's word
    ) -> dict:
        store = self.require_store()
        field, value = self.name_or_id(name, id)
        return {"forgotten": await self.changed(store.forget, field, value)}

    @bentoml.api(route="/rename")
    @api_errors
    async def rename(
        self,
        new_name: Annotated[str, Field(description="the new name")],
        name: Annotated[str | None, Field(description="rename every example of this name")] = None,
        id: Annotated[str | None, Field(description="rename one example")] = None,  # noqa: A002
    ) -> dict:
        store = self.require_store()
        field, value = self.name_or_id(name, id)
        new_name = self.check_name(new_name, "new_name")
        return {"renamed": await self.changed(store.rename, field, value, new_name), "name": new_name}

    @bentoml.api(route="/state/export")
    @api_errors
    async def export_state(self) -> dict:
        examples = await self.stored(self.require_store().examples)
        return await asyncio.to_thread(taught_state.export, examples)

    @bentoml.api(route="/state/import")
    @api_errors
    async def import_state(
        self,
        state: Annotated[dict, Field(description="a state from /state/export")],
        mode: Annotated[str, Field(description="merge (keep what is taught, add new ids) or replace")] = "merge",
    ) -> dict:
        store = self.require_store()
        if mode not in ("merge", "replace"):
            raise bad_request("invalid_field", "mode must be merge or replace", "mode")
        incoming = await asyncio.to_thread(taught_state.parse, state, self.dims(), self.check_name)
        imported, total = await self.stored(store.load, incoming, mode == "replace", self.limits.taught_examples)
        return {"imported": imported, "total": total}


add_http_layer(Classifier, SERVICE, body_limits={"/state/import": import_bytes()},
               error_statuses={"409": "teach or import would exceed MAX_TAUGHT_EXAMPLES (too_many_examples)"})
