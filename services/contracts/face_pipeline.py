"""The face pipeline, once: detect -> not an animal? -> landmarks -> align -> describe.

    pipeline = FacePipeline(network, min_score=0.5, max_faces=20, animal_check=None)
    faces = await pipeline.find(rgb)                          # boxes, scores, 68 landmarks, biggest first
    raw = await pipeline.descriptors(rgb, faces, descriptor)  # float32 [len(faces), 128], dlib's length

`network(kind)` gives the network of a kind (face_detector, face_landmarks): an async callable
from an input batch to its outputs. The classifier service passes its runtime's models (batched
with concurrent requests, services/classifier/faces.py); training, evaluation and the benchmarks
pass Predictors (SyncNetwork; training/faces/evaluate.Pipeline). The geometry between the networks is
services/contracts/face_geometry.py. The animal check, when given, looks at the square around
each detection and drops those it sees as an animal: the detector alone takes a cat's face for
a person's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from services.contracts import face_geometry

Network = Callable[[np.ndarray], Awaitable[list[np.ndarray]]]


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


@dataclass(frozen=True)
class AnimalCheck:
    network: Network    # squares [N, 3, 224, 224] -> outputs named below
    outputs: list[str]  # the network's output names: "animal" (share [N]), "probabilities" ([N, 1000])
    labels: list[str]   # ImageNet's class names
    threshold: float    # a share at or above it is an animal, not a face


class SyncNetwork:
    """A Predictor as the pipeline's async network (offline use: no batching with others)."""

    def __init__(self, predictor):
        self.predictor = predictor

    async def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.predictor(batch)


class FacePipeline:
    def __init__(self, network: Callable[[str], Network], min_score: float = 0.5, max_faces: int | None = 20,
                 animal_check: Callable[[], AnimalCheck | None] = lambda: None):
        self.network, self.min_score, self.max_faces, self.animal_check = network, min_score, max_faces, animal_check

    async def boxes(self, rgb: np.ndarray) -> list[tuple]:
        """(x0, y0, x1, y1, score) of every detection at min_score or more, biggest first."""
        net_input, frame = await asyncio.to_thread(face_geometry.detector_input, rgb)
        boxes, scores = await self.network("face_detector")(net_input)
        return face_geometry.faces_found(boxes[0], scores[0], frame, self.min_score, self.max_faces)

    async def find(self, rgb: np.ndarray, animals: list | None = None) -> list[Face]:
        """Every face in one photo, biggest first (at most max_faces). Detections the animal
        check refuses are left out, and described in `animals` when a list is given."""
        landmarker = self.network("face_landmarks")
        found = await self.boxes(rgb)
        if found and (check := self.animal_check()) is not None:
            found = await self.not_animals(rgb, found, check, animals)
        if not found:
            return []
        # the landmark net gets the detector's box as face-api gives it (x, y, width, height)
        crops = await asyncio.to_thread(lambda: [face_geometry.landmark_input(rgb, (x0, y0, x1 - x0, y1 - y0))
                                                 for x0, y0, x1, y1, _ in found])
        relative = (await landmarker(np.concatenate([x for x, _ in crops])))[0]
        return [Face((float(x0), float(y0), float(x1), float(y1)), float(score),
                     face_geometry.landmark_points(points, crop))
                for (x0, y0, x1, y1, score), (_, crop), points in zip(found, crops, relative)]

    async def not_animals(self, rgb: np.ndarray, found: list, check: AnimalCheck, animals: list | None) -> list:
        squares = await asyncio.to_thread(face_geometry.animal_input, rgb, [f[:4] for f in found])
        named = dict(zip(check.outputs, await check.network(squares)))
        kept = []
        for face, share, p in zip(found, named["animal"], named["probabilities"]):
            if share < check.threshold:
                kept.append(face)
            elif animals is not None:
                animals.append({"box": [round(float(v), 1) for v in face[:4]], "score": round(float(face[4]), 4),
                                "animal": round(float(share), 4), "looks_like": check.labels[int(p.argmax())]})
        return kept

    async def descriptors(self, rgb: np.ndarray, faces: list[Face], descriptor: Network) -> np.ndarray:
        """dlib's raw 128-d descriptors of the given faces of one photo (about 1.4 long; dlib's
        rule is a distance of 0.6 between them), from chips aligned as dlib aligns them."""
        chips = await asyncio.to_thread(lambda: np.stack([face_geometry.align(rgb, f.landmarks) for f in faces]))
        return (await descriptor(chips.transpose(0, 3, 1, 2).astype(np.float32)))[0]


def unit_length(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
