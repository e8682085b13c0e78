"""Record tests/fixtures/faces/detector_reference.npz: face-api's SsdMobilenetv1 (run in node) on the
fixture photos, for training/faces/detector.py to be checked against.

    .venv/bin/python -m training.faces.record_detector_reference

Needs node + the face-api workspace (see js/detector_reference.mjs). The net inputs are not stored:
they are detector.prepare(photo), which a test rebuilds from the committed JPEGs (decoded with PIL here
and there; face-api gets the same decoded pixels). The fixture holds, per photo:
  names [P]                             tests/fixtures/faces/{name}.jpg
  js_boxes [P, 5118, 4] float32         face-api's net + output layer on prepare(photo), before NMS,
                                        as (x0, y0, x1, y1) relative to the 512 square (face-api has
                                        them as (y0, x0, y1, x1); only reordered here)
  js_scores [P, 5118] float32           face probabilities
and face-api's end-to-end result, faceapi.detectAllFaces(photo) at its defaults (minConfidence 0.5):
  det_photo [K] int                     index into names
  det_boxes [K, 4] float64              (x0, y0, x1, y1) in photo pixels, x1 = x + width as face-api's Box
  det_scores [K] float64
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.faces.detector import ANCHORS, SIZE, prepare

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "tests/fixtures/faces"
OUT = PHOTOS / "detector_reference.npz"
JS = Path(__file__).parent / "js/detector_reference.mjs"
NAMES = ["obama", "obama2", "obama3", "biden", "obama_partial_face", "group_1", "group_2"]


def rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / f"{name}.jpg").convert("RGB"))


def main():
    photos = [rgb(n) for n in NAMES]
    inputs = [prepare(p)[0] for p in photos]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        request = {"inputs": [], "photos": []}
        for name, photo, net_input in zip(NAMES, photos, inputs):
            (tmp / f"{name}.f32").write_bytes(net_input[0].transpose(1, 2, 0).astype("<f4").tobytes())
            (tmp / f"{name}.u8").write_bytes(np.ascontiguousarray(photo).tobytes())
            request["inputs"].append(str(tmp / f"{name}.f32"))
            h, w = photo.shape[:2]
            request["photos"].append({"path": str(tmp / f"{name}.u8"), "height": h, "width": w})
        (tmp / "in.json").write_text(json.dumps(request))
        subprocess.run(["node", str(JS), str(tmp / "in.json"), str(tmp / "out.json")], check=True)
        js = json.loads((tmp / "out.json").read_text())
        # face-api's own pad + resize must match prepare(), or js_* would not be face-api's outputs on the photos
        js_inputs = [np.fromfile(tmp / f"{n}.u8.batch.f32", "<f4").reshape(SIZE, SIZE, 3) for n in NAMES]
    diff = max(np.abs(a.transpose(2, 0, 1) - b[0]).max() for a, b in zip(js_inputs, inputs))
    print(f"prepare() vs face-api toBatchTensor: max abs diff {diff:.3g}")

    js_boxes = np.array(js["boxes"], np.float32).reshape(len(NAMES), ANCHORS, 4)[..., [1, 0, 3, 2]]
    js_scores = np.array(js["scores"], np.float32).reshape(len(NAMES), ANCHORS)
    dets = [(i, d) for i, ds in enumerate(js["detections"]) for d in ds]
    xyxy = [[d["x"], d["y"], d["x"] + d["width"], d["y"] + d["height"]] for _, d in dets]
    np.savez_compressed(
        OUT,
        names=np.array(NAMES),
        js_boxes=js_boxes,
        js_scores=js_scores,
        det_photo=np.array([i for i, _ in dets], np.int64),
        det_boxes=np.array(xyxy, np.float64).reshape(-1, 4),
        det_scores=np.array([d["score"] for _, d in dets], np.float64),
    )
    counts = {n: sum(i == k for i, _ in dets) for k, n in enumerate(NAMES)}
    print(f"{OUT}: faces per photo {counts}, {OUT.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
