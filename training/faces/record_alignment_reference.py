"""Record dlib's own alignment on the fixture photos, for services/contracts/face_geometry.align to be checked
against: dlib's 68 landmarks (HOG detector, shape_predictor_68_face_landmarks) and the chip
dlib.get_face_chip(photo, shape, 150, 0.25) cuts from them.

    REF_PYTHON=/path/to/venv/bin/python python -m training.faces.record_alignment_reference

REF_PYTHON is a Python with `dlib-bin` and `face_recognition_models` installed (pip install
dlib-bin face_recognition_models): dlib stays out of the project's own environments.
Writes tests/fixtures/faces/alignment_reference.npz (names, dlib_points [K, 68, 2], dlib_chips
[K, 150, 150, 3] uint8).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "faces"
PHOTOS = ["obama", "obama2", "obama3", "biden"]

RECORD = r"""
import sys, numpy as np, dlib, face_recognition_models as frm
from PIL import Image
fixtures, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
detect = dlib.get_frontal_face_detector()
predict = dlib.shape_predictor(frm.pose_predictor_model_location())
points, chips = [], []
for name in names:
    image = np.asarray(Image.open(f"{fixtures}/{name}.jpg").convert("RGB"))
    shape = predict(image, detect(image, 1)[0])
    points.append([[p.x, p.y] for p in shape.parts()])
    chips.append(np.asarray(dlib.get_face_chip(image, shape, 150, 0.25)))
np.savez_compressed(out, names=np.array(names), dlib_points=np.array(points, np.float32), dlib_chips=np.stack(chips))
"""


def main() -> None:
    python = os.environ.get("REF_PYTHON", "python3")
    out = FIXTURES / "alignment_reference.npz"
    subprocess.run([python, "-c", RECORD, str(FIXTURES), str(out), *PHOTOS], check=True)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
