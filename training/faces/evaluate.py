"""The face pipeline measured on every labelled face photo this machine has (tests/fixtures/faces:
three photos of one person and a partial face of him, one of another, two group photos of
other people): same- and different-person distances, the threshold, the errors it makes,
robustness to re-encoding, flipping, shifting and resizing, and agreement with dlib end to end.

    python -m training.faces.evaluate            # prints the figures the `faces` card records

It runs the exported ONNX files through the served pipeline itself (services/contracts/face_pipeline.py),
without the service (training never imports a service).
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from services.contracts import face_geometry, imaging
from services.contracts.face_pipeline import Face, FacePipeline, SyncNetwork
from services.contracts.predictor import Predictor
from services.contracts.repository import resolve

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "faces"
PEOPLE = {"obama": "obama", "obama2": "obama", "obama3": "obama", "obama_partial_face": "obama", "biden": "biden"}
DLIB_THRESHOLD = 0.6  # dlib's, on raw (not unit-length) descriptors


def load_photo(path: Path | str) -> np.ndarray:
    return imaging.rgb_array(imaging.decode(Path(path).read_bytes()))


def fixture_photos() -> dict[str, np.ndarray]:
    """Every labelled photo of tests/fixtures/faces by name (obama, biden, group_1, ...), RGB uint8."""
    return {p.stem: load_photo(p) for p in sorted(FIXTURES.glob("*.jpg"))}


def detect(detector: Predictor, rgb: np.ndarray) -> list[tuple]:
    """The pipeline's detection step with one detector file: (x0, y0, x1, y1, score), biggest first."""
    x, size = face_geometry.detector_input(rgb)
    boxes, scores = detector(x)[:2]
    return face_geometry.faces_found(boxes[0], scores[0], size)


class Pipeline:
    """The served face pipeline (services/contracts/face_pipeline.py) over the exported files,
    synchronously on onnxruntime's CPU provider, at the service's default settings."""

    def __init__(self, models_dir: Path, descriptor_path: Path | None = None, detector_path: Path | None = None,
                 threads: int = 0):
        self.detector = Predictor(detector_path or resolve(models_dir, "face_detector").path, threads=threads)
        self.landmarks = Predictor(resolve(models_dir, "face_landmarks").path, threads=threads)
        self.descriptor = Predictor(descriptor_path or resolve(models_dir, "faces").path, threads=threads)
        networks = {"face_detector": SyncNetwork(self.detector), "face_landmarks": SyncNetwork(self.landmarks)}
        self.pipeline = FacePipeline(networks.__getitem__, max_faces=None)

    def boxes(self, rgb: np.ndarray) -> list[tuple]:
        """(x0, y0, x1, y1, score) of every detection, biggest first (FACE_MIN_SCORE's default 0.5)."""
        return asyncio.run(self.pipeline.boxes(rgb))

    def faces(self, rgb: np.ndarray) -> list[Face]:
        """Every face with its 68 landmarks, biggest first."""
        return asyncio.run(self.pipeline.find(rgb))

    def describe(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """dlib's raw descriptor of one face (not unit length: the threshold is derived from its length)."""
        return asyncio.run(self.pipeline.descriptors(rgb, [face], SyncNetwork(self.descriptor)))[0]

    def biggest(self, rgb: np.ndarray) -> np.ndarray:
        return self.describe(rgb, self.faces(rgb)[0])


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def variants(rgb: np.ndarray) -> dict[str, np.ndarray]:
    image = Image.fromarray(rgb)
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=50)
    w, h = image.size
    shifted = Image.new("RGB", (w, h))
    shifted.paste(image.crop((0, 0, w - w // 10, h - h // 10)), (w // 10, h // 10))
    return {"jpeg_quality_50": np.asarray(Image.open(jpeg).convert("RGB")), "flipped": rgb[:, ::-1].copy(),
            "shifted_10_percent": np.asarray(shifted),
            "half_size": np.asarray(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS))}


def evaluate(models_dir: Path, descriptor_path: Path | None = None, detector_path: Path | None = None) -> dict:
    pipeline = Pipeline(Path(models_dir), descriptor_path, detector_path)
    raw = {name: pipeline.biggest(load_photo(FIXTURES / f"{name}.jpg")) for name in PEOPLE}
    others = {}  # every face of the group photos: people who are neither of the two, unnamed
    for group in ("group_1", "group_2"):
        rgb = load_photo(FIXTURES / f"{group}.jpg")
        others |= {f"{group}#{i}": pipeline.describe(rgb, p) for i, p in enumerate(pipeline.faces(rgb))}
    norms = [float(np.linalg.norm(v)) for v in [*raw.values(), *others.values()]]
    # dlib's 0.6 holds for its raw descriptors; the service stores unit-length ones, so the same
    # rule there is 0.6 divided by the descriptors' typical length.
    threshold = round(DLIB_THRESHOLD / float(np.mean(norms)), 3)
    vectors = {name: unit(v) for name, v in (raw | others).items()}
    same, different = [], []
    for a, b in combinations(vectors, 2):
        distance = (a, b, round(float(np.linalg.norm(vectors[a] - vectors[b])), 4))
        if a in PEOPLE and b in PEOPLE:
            (same if PEOPLE[a] == PEOPLE[b] else different).append(distance)
        elif a in PEOPLE or a.split("#")[0] == b.split("#")[0]:  # a named person and a stranger, or two
            different.append(distance)                            # people in one photo: different people
        # two strangers from different group photos: nobody knows, so the pair is not counted
    original = load_photo(FIXTURES / "obama.jpg")
    robustness = {kind: round(float(np.linalg.norm(unit(pipeline.biggest(rgb)) - vectors["obama"])), 4)
                  for kind, rgb in variants(original).items()}
    dlib = np.load(FIXTURES / "descriptor_reference.npz")
    dlib_names = list(dlib["names"])
    end_to_end = {name: round(float(np.linalg.norm(unit(raw[name]) - unit(dlib["dlib"][dlib_names.index(name)]))), 4)
                  for name in PEOPLE}
    return {
        "threshold": {"distance": threshold, "from": f"dlib's {DLIB_THRESHOLD} on raw descriptors / their mean "
                      f"length {np.mean(norms):.3f} over {len(norms)} faces", "metric": "euclidean, unit-length"},
        "verification": {
            "photos": "tests/fixtures/faces: 4 photos of Obama (one a partial face), 1 of Biden, 6 faces of other "
                      "people in 2 group photos (face_recognition 1.3.0's and face-api's test and demo images); "
                      "pairs of strangers from different group photos are not counted (their identity is unknown)",
            "same_person": same, "different_person_pairs": len(different),
            "different_person_min": min(different, key=lambda d: d[2]),
            "same_person_max": max(same, key=lambda d: d[2]),
            "false_non_matches": sum(d[2] > threshold for d in same),
            "false_matches": sum(d[2] <= threshold for d in different)},
        "robustness_distance_to_original": robustness,
        "end_to_end_vs_dlib": {"distance_unit_length": end_to_end,
                               "note": "our detector, landmarks and alignment against dlib's HOG detector, 5-point "
                                       "landmarks and chip, each then described (ours by the ONNX port)"},
    }


def draw_examples(models_dir: Path, out: Path, descriptor_path: Path | None = None) -> None:
    """A picture of the pipeline's work: each fixture photo with its boxes and 68 landmarks, and
    under it the aligned chips the descriptor sees."""
    from PIL import ImageDraw

    pipeline = Pipeline(Path(models_dir), descriptor_path)
    tiles = []
    for name in ("obama", "obama2", "biden", "group_1"):
        rgb = load_photo(FIXTURES / f"{name}.jpg")
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image)
        all_points = [face.landmarks for face in pipeline.faces(rgb)]
        for points in all_points:
            x0, y0 = points.min(0)
            x1, y1 = points.max(0)
            draw.rectangle([x0 - 4, y0 - 4, x1 + 4, y1 + 4], outline=(255, 210, 0), width=3)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(0, 255, 120))
        image.thumbnail((360, 360))
        chips = [Image.fromarray(face_geometry.align(rgb, p)).resize((110, 110)) for p in all_points]
        tile = Image.new("RGB", (360, 360 + 120), (255, 255, 255))
        tile.paste(image, ((360 - image.width) // 2, 0))
        for i, chip in enumerate(chips[:3]):
            tile.paste(chip, (5 + i * 118, 365))
        tiles.append(tile)
    sheet = Image.new("RGB", (len(tiles) * 365, 480), (255, 255, 255))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * 365, 0))
    sheet.save(out)


if __name__ == "__main__":
    print(json.dumps(evaluate(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("models/classifier")), indent=2))
