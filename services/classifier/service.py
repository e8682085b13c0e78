"""Image classifier service (port 3003): classes, embeddings, faces and few-shot teach/check.

    POST /classify      multipart: images (files), top_k      -> top-k labels per image (fashion)
    POST /embed         multipart: images                      -> L2-normalised embeddings
    POST /faces/detect  multipart: images                      -> faces: box, score, 68 landmarks
    POST /teach         multipart: name, images [, model, face] -> ids of the taught examples
    POST /check         multipart: images [, model]            -> best taught name per image or face
    POST /similar       multipart: images, limit [, model]     -> nearest taught examples
    POST /taught        {"model"?}                             -> names with example counts
    POST /forget        {"name": ...} or {"id": ...}
    POST /rename        {"name" or "id", "new_name"}
    POST /state/export, POST /state/import                     -> the taught state as JSON
    GET  /info          models, contracts, limits, thresholds, store

Teach/check work on one model's embedding at a time (`model`): `faces` (detect, align and
describe each face, dlib's network; the default when the face networks are loaded) or
`fashion` (the classifier's embedding of the whole image). Taught faces and taught clothing
never mix: examples are stored with the model (and its sha256) that made them.

Images are decoded with explicit limits (uploads.py, through services/contracts/imaging.py, the same
code training used), so served predictions equal offline ones. Taught examples live in a
database (TEACH_STORE: SQLite by default, PostgreSQL for replicas; store.py) that every
worker and replica shares; each change is one transaction, answered only once committed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import unicodedata
import uuid
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field

from services import arrays
from services.classifier import state as taught_state
from services.classifier.domains import Domains
from services.classifier.limits import Limits, check_name, int_field
from services.classifier.faces import KINDS, FaceLimits, FacePipeline
from services.classifier import taught as taught_examples
from services.classifier.store import Example, StoreError
from services.classifier.taught import TEACHABLE, TaughtState, embedding_dim, is_faces
from services.classifier.uploads import (CheckUpload, ClassifyUpload, DetectUpload, EmbedUpload, SimilarUpload,
                                         TeachUpload, decode_batch, decode_photos)
from services.contracts.face_pipeline import Face
from services.runtime import (VERSION_FIELD, ApiError, Runtime, add_http_layer, api_errors, bad_request, tracing,
                              version_of)
from services.runtime.config import service_options, settings_for
from services.runtime.errors import shown

SERVICE = "classifier"
log = logging.getLogger("services.classifier")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def face_distance(similarity: float) -> float:
    """Euclidean distance between two unit vectors with this cosine similarity."""
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * similarity)))


@bentoml.service(name=SERVICE, **service_options(SERVICE))
class Classifier:
    def __init__(self) -> None:
        self.runtime = Runtime(service=SERVICE, kind=KINDS)
        self.runtime.canary_kinds = ("classifier",)  # /classify, /embed; the face networks feed taught state
        self.runtime.on_load.append(self.prepare_search)
        settings = self.runtime.settings.classifier
        self.domains = Domains(settings.domain_threshold)
        self.runtime.on_load.append(self.domains.check)  # read a version's out-of-domain statistics before it serves
        self.runtime.serve_checks.append(self.taught_carries_over)
        self.limits = Limits(settings)
        self.faces = FacePipeline(self.runtime, FaceLimits(settings))
        self.threshold_override = settings.teach_match_threshold  # None: the card's
        self.face_distance_override = settings.face_match_distance
        self.teach_model_name = settings.teach_model
        self.taught_state = TaughtState(self.runtime, settings, self.domains, self.check_name)
        self.taught_state.open(wait=self.runtime.settings.workers > 1)  # as the runtime does: ready once it is open

    def __is_ready__(self) -> bool:
        return self.runtime.ready and self.taught_state.store is not None

    @bentoml.on_shutdown
    def close_store(self) -> None:
        """A graceful stop closes the store: SQLite then folds its -wal file back into the
        database and removes it, PostgreSQL sees its connection end."""
        self.taught_state.close()

    def model_choices(self) -> dict:
        """For /docs.json: the classifiers /classify and /embed take, the models teach and its
        kin take (model optional where there is a default)."""
        if not self.runtime.ready:
            return {}
        classifiers = self.runtime.choices(kind="classifier")
        teachable = (sorted(m.name for m in self.teachable()), self.default_teach_model() is None)
        return {"/classify": classifiers, "/embed": classifiers} | {
            route: teachable for route in ("/teach", "/check", "/similar", "/taught", "/forget", "/rename")}

    def teachable(self) -> list:
        return taught_examples.teachable(self.runtime)

    def prepare_search(self, model) -> None:
        """A version loaded live: build its taught-example cache or index before it can serve."""
        if self.taught_state.matcher is not None and model.card.get("kind") in TEACHABLE:
            self.taught_state.matcher.prepare(model.card["sha256"], embedding_dim(model))

    def taught_carries_over(self, candidate, serving, force: bool) -> None:
        """Taught examples belong to the version whose embedding made them: a switch to a version
        taught nothing would forget everyone at once. Refused (409) unless forced."""
        store = self.taught_state.store
        if force or candidate.card.get("kind") not in TEACHABLE or store is None:
            return
        before, after = store.count(serving.card["sha256"]), store.count(candidate.card["sha256"])
        if before and not after:
            raise ApiError(409, "untaught_version", f"{candidate.name} version {candidate.version} has no taught "
                           f"examples and the serving version {serving.version} has {before}: teach them to it first "
                           f"(POST /teach with version={candidate.version}, while {serving.version} serves), or "
                           "switch with \"force\": true to start it with none", field="version")

    def check_name(self, name: Any, field: str = "name") -> str:
        return check_name(name, self.limits.name_length, field)

    def info(self) -> dict:
        teach = None
        if self.taught_state.failure:
            teach = {"error": self.taught_state.failure}
        elif self.runtime.ready:
            try:
                store = self.taught_state.store
                teach = {"default_model": self.default_teach_model(), "store": store.describe(), "models": [
                    {"model": m.name, **self.match_rule(m), "examples": store.count(m.card["sha256"]),
                     "calibration": m.card.get("metrics", {}).get("teach_calibration")} for m in self.teachable()]}
            except (ApiError, StoreError) as exc:
                teach = {"error": getattr(exc, "message", str(exc))}
        return self.runtime.info(
            limits_images=self.limits.describe() | self.faces.limits.describe() | {
                "domain_threshold": self.domains.override},
            teach=teach,
            endpoints=["POST /classify", "POST /embed", "POST /faces/detect", "POST /teach", "POST /check",
                       "POST /similar", "POST /taught", "POST /forget", "POST /rename", "POST /state/export",
                       "POST /state/import", "GET /info"])

    # Images --------------------------------------------------------------------------------

    async def infer(self, model, files) -> dict[str, np.ndarray]:
        preprocessing = model.card["contract"]["preprocessing"]
        cancelled = threading.Event()
        try:  # decoding is CPU work: off the loop, and stopped if the request is cancelled
            with tracing.span("decode", images=len(files)):
                batch = await asyncio.to_thread(decode_batch, files, self.limits, preprocessing, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        outputs = await model(batch)
        return dict(zip(model.output_names, outputs))

    async def photos(self, files) -> list[np.ndarray]:
        cancelled = threading.Event()
        try:
            with tracing.span("decode", images=len(files)):
                return await asyncio.to_thread(decode_photos, files, self.limits, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    # Faces ---------------------------------------------------------------------------------

    @bentoml.api(route="/faces/detect", input_spec=DetectUpload)
    @api_errors
    async def detect_faces(self, images, problem=None) -> dict:
        if problem is not None:
            raise problem
        detector = self.faces.model("face_detector")
        found, animals = [], []  # per photo: its faces, and the detections the animal check refused
        for rgb in await self.photos(images):
            animals.append([])
            found.append(await self.faces.find(rgb, animals[-1]))
        return {"faces": [[dict(f.describe(landmarks=True), usable=bool(f.size >= self.faces.limits.min_size))
                           for f in faces] for faces in found], "animals": animals,
                "min_size": self.faces.limits.min_size, "model": detector.name, "version": detector.version}

    def choose_face(self, i: int, faces: list[Face], face: int | None, animals: list | None = None) -> Face:
        """The one face of photo i that teach/similar use; a 422 saying why there is none."""
        where = f"images[{i}]"
        if not faces and animals:
            seen = ", ".join(f"{a['looks_like']} ({a['animal']:.2f})" for a in animals[:3])
            raise ApiError(422, "no_face", f"{where}: no human face found: the face the detector found looks like an "
                           f"animal's to the animal check ({seen}; FACE_ANIMAL_THRESHOLD)", where)
        if face is not None:
            if face >= len(faces):
                raise ApiError(422, "no_such_face", f"{where} has {len(faces)} face(s); face={face} is not one of "
                               "them (POST /faces/detect lists them, biggest first)", "face")
            chosen = faces[face]
        else:
            if not faces:
                raise ApiError(422, "no_face", f"{where}: no face found (a face is found when it looks at the "
                               "camera or is turned moderately, and the detector scores it at least "
                               f"{self.faces.limits.min_score} (FACE_MIN_SCORE))", where)
            usable = [f for f in faces if f.size >= self.faces.limits.min_size]
            if len(usable) > 1:
                boxes = "; ".join(f"{n}: {f.describe()['box']}" for n, f in enumerate(faces[:10]))
                raise ApiError(422, "several_faces", f"{where} shows {len(usable)} faces; say which with the field "
                               f"'face' (its index, biggest first: {boxes})", "face")
            chosen = usable[0] if usable else faces[0]
        if chosen.size < self.faces.limits.min_size:
            raise ApiError(422, "face_too_small", f"{where}: the face is {chosen.size:.0f} pixels, under the minimum "
                           f"of {self.faces.limits.min_size} (FACE_MIN_SIZE); send a larger or closer photo", where)
        return chosen

    async def face_descriptors(self, images, face: int | None, descriptor) -> np.ndarray:
        """One descriptor per photo: its only face, or the one `face` names."""
        vectors = []
        for i, rgb in enumerate(await self.photos(images)):
            animals = []
            chosen = self.choose_face(i, await self.faces.find(rgb, animals), face, animals)
            vectors.append((await self.faces.describe(rgb, [chosen], descriptor))[0])
        return np.stack(vectors)

    # Classification ------------------------------------------------------------------------

    @bentoml.api(route="/classify", input_spec=ClassifyUpload)
    @api_errors
    async def classify(self, images, problem=None, top_k=5, model=None, version=None) -> dict:
        if problem is not None:
            raise problem
        classifier = self.runtime.get(model, kind="classifier", version=version, canary=True)
        labels = classifier.spec.contract.labels
        k = int_field(top_k, "top_k", 1, len(labels))
        outputs = await self.infer(classifier, images)
        probabilities = softmax(outputs["logits"])
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        predictions = [[{"label": labels[j], "score": float(row[j])} for j in top] for row, top in
                       zip(probabilities, order)]
        return {"predictions": predictions, **self.domains.answer(classifier, outputs.get("embedding")),
                "model": classifier.name, "version": classifier.version}

    @bentoml.api(route="/embed", input_spec=EmbedUpload)
    @api_errors
    async def embed(self, images, problem=None, model=None, version=None, answer=arrays.JSON) -> dict:
        if problem is not None:
            raise problem
        classifier = self.runtime.get(model, kind="classifier", version=version, canary=True)
        embeddings = (await self.infer(classifier, images))["embedding"]
        if answer == arrays.NPY:
            return arrays.npy_response(embeddings.astype(np.float32), model=classifier.name,
                                       model_version=classifier.version)
        return {"embeddings": embeddings.tolist(), "dim": int(embeddings.shape[1]),
                "model": classifier.name, "version": classifier.version}

    # Teach ---------------------------------------------------------------------------------

    def default_teach_model(self) -> str | None:
        """TEACH_MODEL, else the face descriptor when loaded, else the only classifier."""
        if self.teach_model_name:
            return self.teach_model_name
        names = sorted(m.name for m in self.teachable() if is_faces(m)) or sorted(m.name for m in self.teachable())
        return names[0] if len(names) == 1 else None

    def teach_model(self, name: str | None = None, version: str | int | None = None):
        self.taught_state.require()
        model = self.runtime.get(name if name is not None else self.default_teach_model(), version=version_of(version))
        if model.card.get("kind") not in TEACHABLE:
            raise bad_request("invalid_field", f"model {model.name!r} cannot be taught; teach one of "
                              f"{sorted(m.name for m in self.teachable())}", "model")
        return model

    def match_rule(self, model) -> dict:
        """How /check decides `matched`: a Euclidean distance for faces (dlib's rule), a cosine
        similarity for the classifier's embedding; each from the card unless overridden."""
        if is_faces(model):
            override = self.face_distance_override
            return {"metric": "euclidean distance", "threshold": override if override is not None else
                    model.spec.contract.match_distance}
        override = self.threshold_override
        return {"metric": "cosine similarity", "threshold": override if override is not None else
                (model.spec.contract.match_threshold or 0.8)}

    def threshold(self, model) -> float:
        return self.match_rule(model)["threshold"]

    async def embeddings(self, model, images, face: Any = None) -> np.ndarray:
        """One embedding per image; for faces, of its only face or of the one `face` names."""
        if is_faces(model):
            index = None if face is None else int_field(face, "face", 0, self.faces.limits.max_faces - 1)
            return await self.face_descriptors(images, index, model)
        if face is not None:
            raise bad_request("invalid_field", "face applies to the faces model only", "face")
        return (await self.infer(model, images))["embedding"]

    @bentoml.api(route="/teach", input_spec=TeachUpload)
    @api_errors
    async def teach(self, images, problem=None, name=None, model=None, face=None, version=None) -> dict:
        if problem is not None:
            raise problem
        name = self.check_name(name)
        model = self.teach_model(model, version)
        embeddings = await self.embeddings(model, images, face)
        when = taught_state.now()
        examples = [Example(uuid.uuid4().hex, name, model.name, model.card["sha256"], taught_state.unit(vector, None),
                            filename[:200], when) for (filename, _), vector in zip(images, embeddings)]
        count = await self.taught_state.call(self.taught_state.store.add, examples, self.limits.taught_examples)
        return {"name": name, "ids": [e.id for e in examples], "examples": count, "model": model.name,
                "version": model.version}

    def result(self, best, model) -> dict:
        """One /check answer from the nearest taught example (or none)."""
        rule = self.match_rule(model)
        if not best:
            return {"name": None, "id": None, "confidence": 0.0, "matched": False} | (
                {"distance": None} if is_faces(model) else {})
        m = best[0]
        if is_faces(model):
            distance = face_distance(m.similarity)
            return {"name": m.name, "id": m.id, "distance": round(distance, 6), "confidence": round(m.similarity, 6),
                    "matched": bool(distance <= rule["threshold"])}
        return {"name": m.name, "id": m.id, "confidence": round(m.similarity, 6),
                "matched": bool(m.similarity >= rule["threshold"])}

    async def check_faces(self, rgb: np.ndarray, model) -> list[dict]:
        """Every face of one photo with its nearest taught face; too small ones unnamed."""
        faces = await self.faces.find(rgb)
        usable = [f for f in faces if f.size >= self.faces.limits.min_size]
        nearest = []
        if usable:
            vectors = await self.faces.describe(rgb, usable, model)
            nearest, _ = await self.taught_state.nearest(model.card["sha256"], vectors, 1)
        answers = dict(zip(map(id, usable), nearest))
        return [f.describe() | (self.result(answers[id(f)], model) if id(f) in answers else
                                {"name": None, "id": None, "matched": False, "too_small": True}) for f in faces]

    @bentoml.api(route="/check", input_spec=CheckUpload)
    @api_errors
    async def check(self, images, problem=None, model=None, version=None) -> dict:
        if problem is not None:
            raise problem
        teach_model = self.teach_model(model, version)
        sha = teach_model.card["sha256"]
        if is_faces(teach_model):
            results = [{"faces": await self.check_faces(rgb, teach_model)} for rgb in await self.photos(images)]
            total = await self.taught_state.call(self.taught_state.store.count, sha)
        else:
            embeddings = await self.embeddings(teach_model, images)
            nearest, total = await self.taught_state.nearest(sha, embeddings, 1)
            domain = self.domains.answer(teach_model, embeddings)
            results = [self.result(best, teach_model) | (
                {"in_domain": domain["in_domain"][i], "domain_score": domain["domain_score"][i]}
                if domain["in_domain"] is not None else {}) for i, best in enumerate(nearest)]
        return {"results": results, **self.match_rule(teach_model), "taught_examples": total,
                "model": teach_model.name, "version": teach_model.version}

    @bentoml.api(route="/similar", input_spec=SimilarUpload)
    @api_errors
    async def similar(self, images, problem=None, limit=5, model=None, face=None, version=None) -> dict:
        if problem is not None:
            raise problem
        limit = int_field(limit, "limit", 1, self.limits.similar)
        teach_model = self.teach_model(model, version)
        embeddings = await self.embeddings(teach_model, images, face)
        nearest, _ = await self.taught_state.nearest(teach_model.card["sha256"], embeddings, limit)
        faces = is_faces(teach_model)
        answer = [[{"id": m.id, "name": m.name, "similarity": round(m.similarity, 6)} |
                   ({"distance": round(face_distance(m.similarity), 6)} if faces else {}) for m in matches]
                  for matches in nearest]
        return {"similar": answer, **({} if faces else self.domains.answer(teach_model, embeddings)),
                **self.match_rule(teach_model), "model": teach_model.name, "version": teach_model.version}

    @bentoml.api(route="/taught")
    @api_errors
    async def taught(
        self,
        model: Annotated[str | None, Field(description="whose taught names (default: the teach model, see /info)")]
        = None,
        version: Annotated[str | int | None, VERSION_FIELD] = None,
    ) -> dict:
        teach_model = self.teach_model(model, version)
        counts = await self.taught_state.call(self.taught_state.store.counts, teach_model.card["sha256"])
        return {"names": [{"name": n, "examples": c} for n, c in counts.items()], "total": sum(counts.values()),
                "model": teach_model.name, "version": teach_model.version}

    @staticmethod
    def name_or_id(name: str | None, id: str | None) -> tuple[str, str]:  # noqa: A002
        if (name is None) == (id is None):
            raise bad_request("name_or_id", "give exactly one of name or id", "name")
        return ("name", unicodedata.normalize("NFC", name)) if name is not None else ("id", id)

    async def changed(self, method, field: str, value: str, model: str | None, version, *args) -> int:
        # A name is looked up within one model version (a face and a jacket may share it); an id is unique.
        scope = {"model_sha256": self.teach_model(model, version).card["sha256"]} if field == "name" else {}
        try:
            return await self.taught_state.call(method, *args, **{field: value}, **scope)
        except KeyError:
            raise ApiError(404, "not_taught", f"nothing taught under {field} {shown(value)}", field) from None

    @bentoml.api(route="/forget")
    @api_errors
    async def forget(
        self,
        name: Annotated[str | None, Field(description="forget every example of this name")] = None,
        id: Annotated[str | None, Field(description="forget one example")] = None,  # noqa: A002 - the API's word
        model: Annotated[str | None, Field(description="the model a name belongs to (default: the teach model)")]
        = None,
        version: Annotated[str | int | None, VERSION_FIELD] = None,
    ) -> dict:
        store = self.taught_state.require()
        field, value = self.name_or_id(name, id)
        return {"forgotten": await self.changed(store.forget, field, value, model, version)}

    @bentoml.api(route="/rename")
    @api_errors
    async def rename(
        self,
        new_name: Annotated[str, Field(description="the new name")],
        name: Annotated[str | None, Field(description="rename every example of this name")] = None,
        id: Annotated[str | None, Field(description="rename one example")] = None,  # noqa: A002
        model: Annotated[str | None, Field(description="the model a name belongs to (default: the teach model)")]
        = None,
        version: Annotated[str | int | None, VERSION_FIELD] = None,
    ) -> dict:
        store = self.taught_state.require()
        field, value = self.name_or_id(name, id)
        new_name = self.check_name(new_name, "new_name")
        return {"renamed": await self.changed(store.rename, field, value, model, version, new_name), "name": new_name}

    @bentoml.api(route="/state/export")
    @api_errors
    async def export_state(self) -> dict:
        examples = await self.taught_state.call(self.taught_state.require().examples)
        return await asyncio.to_thread(taught_state.export, examples)

    @bentoml.api(route="/state/import")
    @api_errors
    async def import_state(
        self,
        state: Annotated[dict, Field(description="a state from /state/export")],
        mode: Annotated[str, Field(description="merge (keep what is taught, add new ids) or replace")] = "merge",
    ) -> dict:
        store = self.taught_state.require()
        if mode not in ("merge", "replace"):
            raise bad_request("invalid_field", "mode must be merge or replace", "mode")
        dims = taught_examples.dims(self.runtime)
        incoming = await asyncio.to_thread(taught_state.parse, state, dims, self.check_name)
        imported, total = await self.taught_state.call(store.load, incoming, mode == "replace",
                                                       self.limits.taught_examples)
        return {"imported": imported, "total": total}


add_http_layer(Classifier, SERVICE, body_limits={"/state/import": settings_for(SERVICE).classifier.import_bytes},
               error_statuses={"409": "teach or import would exceed MAX_TAUGHT_EXAMPLES (too_many_examples)",
                               "422": "faces: a photo has no face, several and no face index, or one under "
                                      "FACE_MIN_SIZE pixels (no_face, several_faces, no_such_face, face_too_small)"})
