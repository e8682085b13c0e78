"""Faces on the classifier's runtime: the shared pipeline (services/contracts/face_pipeline.py)
over the runtime's models.

    faces = await pipeline.find(rgb)                   # boxes, scores, 68 landmarks, biggest first
    descriptors = await pipeline.describe(rgb, faces, descriptor)  # unit length, float32 [len(faces), 128]

Three ONNX networks from models/classifier/ (kinds face_detector, face_landmarks and
face_descriptor), each run through the runtime's batcher, so concurrent requests share
batches; training's evaluation runs the same pipeline over the same files. A fourth, when loaded
(kind face_animal_check: an ImageNet classifier), drops detections it sees as an animal.
"""

from __future__ import annotations

import numpy as np

from services.contracts import face_pipeline
from services.contracts.face_pipeline import AnimalCheck, Face
from services.runtime import ApiError
from services.runtime.config import ClassifierSettings

FACE_KINDS = ("face_detector", "face_landmarks", "face_descriptor")
ANIMAL_KIND = "face_animal_check"  # optional: without it every detection counts
KINDS = ("classifier", *FACE_KINDS, ANIMAL_KIND)  # what the classifier's repository serves


class FaceLimits:
    """The face pipeline's settings (README: configuration)."""

    def __init__(self, settings: ClassifierSettings) -> None:
        self.min_score = settings.face_min_score  # detections below are not faces
        self.min_size = settings.face_min_size    # pixels; smaller faces are found, not used
        self.max_faces = settings.face_max_faces  # per photo, biggest first
        # A detection whose surroundings the animal check gives at least this share of ImageNet's
        # animal classes is not a face (None: the card's threshold; 1 turns the check off).
        self.animal_threshold = settings.face_animal_threshold

    def describe(self) -> dict:
        return {"face_min_score": self.min_score, "face_min_size": self.min_size, "face_max_faces": self.max_faces,
                "face_animal_threshold": self.animal_threshold}


class FacePipeline(face_pipeline.FacePipeline):
    def __init__(self, runtime, limits: FaceLimits):
        super().__init__(self.model, limits.min_score, limits.max_faces, self.animal_check)
        self.runtime, self.limits = runtime, limits

    def available(self) -> bool:
        kinds = {m.spec.kind for m in self.runtime.models.values()}
        return all(kind in kinds for kind in FACE_KINDS)

    def model(self, kind: str):
        try:
            return self.runtime.get(None, kind=kind)
        except ApiError as exc:
            if exc.status == 503:
                raise
            raise ApiError(503, "faces_unavailable", f"no {kind} model is loaded: add the face networks under "
                           f"{self.runtime.repository} (python -m training faces)", "model") from None

    def animal_check(self) -> AnimalCheck | None:
        """The loaded animal check and its threshold, or None (not loaded, or turned off)."""
        check = next((m for m in self.runtime.models.values() if m.spec.kind == ANIMAL_KIND), None)
        if check is None:
            return None
        threshold = self.limits.animal_threshold
        threshold = check.spec.contract.threshold if threshold is None else threshold
        if threshold >= 1:
            return None
        return AnimalCheck(check, check.output_names, check.spec.contract.labels, threshold)

    async def describe(self, rgb: np.ndarray, faces: list[Face], descriptor) -> np.ndarray:
        """Unit-length 128-d descriptors of the given faces of one photo (`descriptor` is the version
        of dlib's network the request took). dlib compares raw descriptors (about 1.4 long); the
        store keeps every embedding at unit length, so the card's threshold is dlib's 0.6 on that scale."""
        return face_pipeline.unit_length(await self.descriptors(rgb, faces, descriptor))
