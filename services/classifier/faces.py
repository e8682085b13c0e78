"""Faces on the classifier's runtime: detect -> landmarks -> align -> describe.

    faces = await pipeline.find(rgb)                   # boxes, scores, 68 landmarks, biggest first
    descriptors = await pipeline.describe(rgb, faces)  # float32 [len(faces), 128]

Three ONNX networks from models/classifier/ (kinds face_detector, face_landmarks and
face_descriptor), each run through the runtime's batcher, so concurrent requests share
batches; the geometry between them (services/face_geometry.py) is the code training's
parity checks use.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from services import face_geometry
from services.runtime import ApiError
from services.runtime.config import _float, _int

FACE_KINDS = ("face_detector", "face_landmarks", "face_descriptor")


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

    def __init__(self) -> None:
        self.min_score = _float("FACE_MIN_SCORE", 0.5)       # detections below are not faces
        self.min_size = _int("FACE_MIN_SIZE", 40, minimum=1)  # pixels; smaller faces are found, not used
        self.max_faces = _int("FACE_MAX_FACES", 20, minimum=1)  # per photo, biggest first
        if not 0 < self.min_score < 1:
            raise ValueError(f"FACE_MIN_SCORE={self.min_score} must be between 0 and 1")

    def describe(self) -> dict:
        return {"face_min_score": self.min_score, "face_min_size": self.min_size, "face_max_faces": self.max_faces}


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

    async def find(self, rgb: np.ndarray) -> list[Face]:
        """Every face in one photo, biggest first (at most FACE_MAX_FACES)."""
        detector, landmarker = self.model("face_detector"), self.model("face_landmarks")
        net_input, frame = await asyncio.to_thread(face_geometry.detector_input, rgb)
        boxes, scores = await detector(net_input)
        found = face_geometry.faces_found(boxes[0], scores[0], frame, self.limits.min_score, self.limits.max_faces)
        if not found:
            return []
        # the landmark net gets the detector's box as face-api gives it (x, y, width, height)
        crops = await asyncio.to_thread(lambda: [face_geometry.landmark_input(rgb, (x0, y0, x1 - x0, y1 - y0))
                                                 for x0, y0, x1, y1, _ in found])
        relative = (await landmarker(np.concatenate([x for x, _ in crops])))[0]
        return [Face((float(x0), float(y0), float(x1), float(y1)), float(score),
                     face_geometry.landmark_points(points, crop))
                for (x0, y0, x1, y1, score), (_, crop), points in zip(found, crops, relative)]

    async def describe(self, rgb: np.ndarray, faces: list[Face], descriptor) -> np.ndarray:
        """Unit-length 128-d descriptors of the given faces of one photo (dlib's chips; `descriptor`
        is the version of dlib's network the request took). dlib compares raw descriptors (about
        1.4 long); the store keeps every embedding at unit length, so the card's threshold is
        dlib's 0.6 on that scale."""
        chips = await asyncio.to_thread(lambda: np.stack([face_geometry.align(rgb, f.landmarks) for f in faces]))
        raw = (await descriptor(chips.transpose(0, 3, 1, 2).astype(np.float32)))[0]
        return raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
