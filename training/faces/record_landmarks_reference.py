"""Record tests/fixtures/faces/landmarks_reference.npz: face-api's landmark net (run in node) and dlib's
68-point shape predictor on the same faces, for training/faces/landmarks.py to be checked against.

    .venv/bin/python -m training.faces.record_landmarks_reference

Needs node + the face-api workspace (see js/landmarks_reference.mjs) and a Python with dlib and
face_recognition_models (REF_PYTHON, default /work/faces-assets/ref/bin/python), run as a subprocess
because dlib is not a dependency of this project.

The fixture holds, per face (boxes from dlib's HOG detector, upsampled once):
  names, boxes [N, 4] (x, y, w, h)      photo and box the face came from
  inputs [N, 3, 112, 112] uint8         crop() of the box, rounded to integers so that they are exact
  js_landmarks [N, 68, 2]               face-api's raw net output on `inputs` (relative to the 112 input)
  js_points [N, 68, 2]                  face-api end to end (its own pad + resize + postProcess) on the
                                        unrounded crop, in image pixels
  dlib_points [N, 68, 2], dlib5_points [N, 5, 2]   dlib's shape predictors on the same box, image pixels
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.faces.landmarks import crop, to_image_points

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "tests/fixtures/faces"
OUT = PHOTOS / "landmarks_reference.npz"
JS = Path(__file__).parent / "js/landmarks_reference.mjs"
REF_PYTHON = os.environ.get("REF_PYTHON", "python3")
NAMES = ["obama", "obama2", "obama3", "biden", "group_1"]

DLIB = """
import json, sys
import dlib, face_recognition_models as frm, numpy as np
from PIL import Image
detect = dlib.get_frontal_face_detector()
predict68 = dlib.shape_predictor(frm.pose_predictor_model_location())
predict5 = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
faces = []
for name, path in json.loads(sys.argv[1]):
    rgb = np.asarray(Image.open(path).convert("RGB"))
    for r in sorted(detect(rgb, 1), key=lambda r: (r.left(), r.top())):
        points = lambda p: [[q.x, q.y] for q in p(rgb, r).parts()]
        faces.append({"name": name, "box": [r.left(), r.top(), r.width(), r.height()],
                      "dlib68": points(predict68), "dlib5": points(predict5)})
print(json.dumps(faces))
"""


def rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(PHOTOS / f"{name}.jpg").convert("RGB"))


def main():
    photos = [[n, str(PHOTOS / f"{n}.jpg")] for n in NAMES]
    dlib = subprocess.run([REF_PYTHON, "-c", DLIB, json.dumps(photos)], check=True, capture_output=True, text=True)
    faces = json.loads(dlib.stdout)

    inputs, crops, transforms = [], [], []
    for face in faces:
        image = rgb(face["name"])
        x, y, w, h = face["box"]
        face_input, t = crop(image, (x, y, w, h))
        inputs.append(np.clip(np.rint(face_input[0]), 0, 255).astype(np.uint8))
        region = image[t.y : t.y + t.height, t.x : t.x + t.width]
        crops.append({"height": t.height, "width": t.width, "data": region.ravel().tolist()})
        transforms.append((face_input, t))

    with tempfile.TemporaryDirectory() as tmp:
        request, response = Path(tmp) / "in.json", Path(tmp) / "out.json"
        hwc = [i.transpose(1, 2, 0).ravel().tolist() for i in inputs]
        request.write_text(json.dumps({"inputs": hwc, "crops": crops}))
        subprocess.run(["node", str(JS), str(request), str(response)], check=True)
        js = json.loads(response.read_text())

    # face-api's own pad + resize must match crop() (both float64 arithmetic stored as float32)
    js_crop = np.array(js["crop_inputs"], np.float32).reshape(-1, 112, 112, 3).transpose(0, 3, 1, 2)
    ours = np.concatenate([f for f, _ in transforms])
    print(f"crop() vs face-api toBatchTensor: max abs diff {np.abs(js_crop - ours).max():.3g}")

    # face-api's crop points are relative to the crop corner; it shifts them by the (here integer) box
    corners = np.array([[t.x, t.y] for _, t in transforms])[:, None]
    js_points = np.array(js["crop_points"]).reshape(-1, 68, 2) + corners
    js_landmarks = np.array(js["landmarks"], np.float32).reshape(-1, 68, 2)
    ours = np.stack([to_image_points(rel, t) for rel, (_, t) in zip(js_landmarks, transforms)])
    print(f"to_image_points vs face-api end to end: max {np.abs(ours - js_points).max():.3g} px (rounded inputs)")

    np.savez_compressed(
        OUT,
        names=np.array([f["name"] for f in faces]),
        boxes=np.array([f["box"] for f in faces], np.int32),
        inputs=np.stack(inputs),
        js_landmarks=js_landmarks,
        js_points=js_points.astype(np.float32),
        dlib_points=np.array([f["dlib68"] for f in faces], np.float32),
        dlib5_points=np.array([f["dlib5"] for f in faces], np.float32),
    )
    print(f"{OUT}: {len(faces)} faces, {OUT.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
