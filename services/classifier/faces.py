"""Faces on the classifier's runtime: detect -> not an animal? -> landmarks -> align -> describe.

    faces = await pipeline.find(rgb)                   # boxes, scores, 68 landmarks, biggest first
    descriptors = await pipeline.describe(rgb, faces)  # float32 [len(faces), 128]

Three ONNX networks from models/classifier/ (kinds face_detector, face_landmarks and
face_descriptor), each run through the runtime's batcher, so concurrent requests share
batches; the geometry between them (services/contracts/face_geometry.py) is the code training's
parity checks use. A fourth, when loaded (kind face_animal_check: an ImageNet classifier),
looks at the square around each detected face and drops those it sees as an animal: the
detector alone takes a cat's face for a person's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from services.contracts import face_geometry
from services.runtime import ApiError
from services.runtime.config import ClassifierSettings

FACE_KINDS = ("face_detector", "face_landmarks", "face_descriptor")
ANIMAL_KIND = "face_animal_check"  # optional: without it every detection counts
KINDS = ("classifier", *FACE_KINDS, ANIMAL_KIND)  # what the classifier's repository serves


@dataclass(frozen=True, eq=False)  # compared by identity
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the photo's pixels
    score: float                            # the detector's confidence
    landmarks: np.ndarray                   # [68, 2] x, y in the photo's pixels (dlib's 68-point scheme)

    @property
    def size(self) -> float:
        """The shorter side of the box, in pixels."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])

    def describe(self, landmarks: bool = False) -> dict:
        out = {"box": [round(float(v), 1) for v in self.box], "score": round(float(self.score), 4)}
        if landmarks:
            out["landmarks"] = np.round(self.landmarks, 1).tolist()
        return out


class FaceLimits:
    """The face pipeline's settings (README: configuration)."""

    def __init__(self, settings: ClassifierSettings) -> None:
        self.min_score = settings.face_min_score  # detections below are not faces
        self.min_size = settings.face_min_size    # pixels; smaller faces are found, not used
        self.max_faces = settings.face_max_faces  # per photo, biggest first
        # A detection whose surroundings the animal check gives at least this share of ImageNet's
        # animal classes is not a face (NaN: the card's threshold; 1 turns the check off).
        self.animal_threshold = (float("nan") if settings.face_animal_threshold is None
                                 else settings.face_animal_threshold)

    def describe(self) -> dict:
        return {"face_min_score": self.min_score, "face_min_size": self.min_size, "face_max_faces": self.max_faces,
                "face_animal_threshold": None if np.isnan(self.animal_threshold) else self.animal_threshold}


class FacePipeline:
    def __init__(self, runtime, limits: FaceLimits):
        self.runtime, self.limits = runtime, limits

    def available(self) -> bool:
        kinds = {m.card.get("kind") for m in self.runtime.models.values()}
        return all(kind in kinds for kind in FACE_KINDS)

    def model(self, kind: str):
        try:
            return self.runtime.get(None, kind=kind)
        except ApiError as exc:
            if exc.status == 503:
                raise
            raise ApiError(503, "faces_unavailable", f"no {kind} model is loaded: add the face networks under "
                           f"{self.runtime.repository} (python -m training faces)", "model") from None

    def animal_check(self):
        """The loaded animal check and its threshold, or None (not loaded, or turned off)."""
        check = next((m for m in self.runtime.models.values() if m.card.get("kind") == ANIMAL_KIND), None)
        if check is None:
            return None
        threshold = self.limits.animal_threshold
        threshold = check.spec.contract.threshold if np.isnan(threshold) else threshold
        return None if threshold >= 1 else (check, threshold)

    async def find(self, rgb: np.ndarray, animals: list | None = None) -> list[Face]:
        """Every face in one photo, biggest first (at most FACE_MAX_FACES). Detections the animal
        check refuses are left out, and described in `animals` when a list is given."""
        detector, landmarker = self.model("face_detector"), self.model("face_landmarks")
        net_input, frame = await asyncio.to_thread(face_geometry.detector_input, rgb)
        boxes, scores = await detector(net_input)
        found = face_geometry.faces_found(boxes[0], scores[0], frame, self.limits.min_score, self.limits.max_faces)
        if found and (animal_check := self.animal_check()) is not None:
            found = await self.not_animals(rgb, found, *animal_check, animals)
        if not found:
            return []
        # the landmark net gets the detector's box as face-api gives it (x, y, width, height)
        crops = await asyncio.to_thread(lambda: [face_geometry.landmark_input(rgb, (x0, y0, x1 - x0, y1 - y0))
                                                 for x0, y0, x1, y1, _ in found])
        relative = (await landmarker(np.concatenate([x for x, _ in crops])))[0]
        return [Face((float(x0), float(y0), float(x1), float(y1)), float(score),
                     face_geometry.landmark_points(points, crop))
                for (x0, y0, x1, y1, score), (_, crop), points in zip(found, crops, relative)]

    async def not_animals(self, rgb: np.ndarray, found: list, check, threshold: float, animals: list | None) -> list:
        squares = await asyncio.to_thread(face_geometry.animal_input, rgb, [f[:4] for f in found])
        outputs = dict(zip(check.output_names, await check(squares)))
        labels = check.spec.contract.labels
        kept = []
        for face, share, probabilities in zip(found, outputs["animal"], outputs["probabilities"]):
            if share < threshold:
                kept.append(face)
            elif animals is not None:
                animals.append({"box": [round(float(v), 1) for v in face[:4]], "score": round(float(face[4]), 4),
                                "animal": round(float(share), 4), "looks_like": labels[int(probabilities.argmax())]})
        return kept

    async def describe(self, rgb: np.ndarray, faces: list[Face], descriptor) -> np.ndarray:
        """Unit-length 128-d descriptors of the given faces of one photo (dlib's chips; `descriptor`
        is the version of dlib's network the request took). dlib compares raw descriptors (about
        1.4 long); the store keeps every embedding at unit length, so the card's threshold is
        dlib's 0.6 on that scale."""
        chips = await asyncio.to_thread(lambda: np.stack([face_geometry.align(rgb, f.landmarks) for f in faces]))
        raw = (await descriptor(chips.transpose(0, 3, 1, 2).astype(np.float32)))[0]
        return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
