"""Record tests/fixtures/faces/descriptor_reference.npz, the reference for training/faces/descriptor.py.

Needs dlib (not a project dependency): run it, from the repo root, with a Python that has
`pip install dlib-bin face_recognition_models numpy pillow`, and node with
`npm install --prefix training/faces/js` done:

    python training/faces/record_descriptor_reference.py \
        [--photos tests/fixtures/faces] [--models .../face_recognition_models/models] [--out ...npz]

For each face found (dlib's HOG detector, upsampled once) it takes the 150x150 chip dlib itself aligns
(5-point landmarks, dlib.get_face_chip(size=150, padding=0.25), as compute_face_descriptor(img, shape) does)
and stores:
    chips  uint8   [K, 150, 150, 3]  RGB
    names  str     [K]               photo name, "#i" for the i-th largest face of a group photo
    js     float32 [K, 128]          face-api's FaceRecognitionNet on the chip (js/descriptor_reference.mjs, node)
    dlib   float32 [K, 128]          dlib's compute_face_descriptor(chip), no jitter, no re-alignment
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import dlib
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
def _models() -> Path:
    try:
        import face_recognition_models

        return Path(face_recognition_models.__file__).parent / "models"
    except ImportError:
        return Path("face_recognition_models/models")


MODELS = _models()
# photo -> how many faces to keep, largest first (HOG finds 3 in group_1, 1 in group_2)
PHOTOS = {"obama": 1, "obama2": 1, "obama3": 1, "biden": 1, "obama_partial_face": 1, "group_1": 3, "group_2": 1}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=REPO / "tests/fixtures/faces")
    parser.add_argument("--models", type=Path, default=MODELS, help="face_recognition_models' models/ folder")
    parser.add_argument("--out", type=Path, default=REPO / "tests/fixtures/faces/descriptor_reference.npz")
    args = parser.parse_args()

    detect = dlib.get_frontal_face_detector()
    shape_5 = dlib.shape_predictor(str(args.models / "shape_predictor_5_face_landmarks.dat"))
    encoder = dlib.face_recognition_model_v1(str(args.models / "dlib_face_recognition_resnet_model_v1.dat"))

    chips, names = [], []
    for photo, keep in PHOTOS.items():
        rgb = np.asarray(Image.open(args.photos / f"{photo}.jpg").convert("RGB"))
        faces = sorted(detect(rgb, 1), key=lambda r: -r.area())[:keep]
        if len(faces) < keep:
            raise SystemExit(f"{photo}: found {len(faces)} faces, expected {keep}")
        for i, face in enumerate(faces):
            chips.append(dlib.get_face_chip(rgb, shape_5(rgb, face), size=150, padding=0.25))
            names.append(photo if keep == 1 else f"{photo}#{i}")
    chips = np.stack(chips)

    # The 150x150 overload runs the net on the chip as given (num_jitters=0: no random crops).
    dlib_descriptors = np.array([encoder.compute_face_descriptor(c, num_jitters=0) for c in chips], np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/chips.npy", chips)
        script = HERE / "js/descriptor_reference.mjs"
        subprocess.run(["node", str(script), f"{tmp}/chips.npy", f"{tmp}/js.npy"], check=True)
        js = np.load(f"{tmp}/js.npy")

    np.savez_compressed(args.out, chips=chips, names=np.array(names), js=js, dlib=dlib_descriptors)
    distance = np.linalg.norm(js - dlib_descriptors, axis=1)
    print(f"{args.out}: {len(names)} chips {names}; |js - dlib| max {distance.max():.4f} mean {distance.mean():.4f}")


if __name__ == "__main__":
    main()
