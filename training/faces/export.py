"""python -m training faces: face-api's three face networks, ported to PyTorch, exported to ONNX,
checked against face-api's own JavaScript outputs (and dlib's), and carded.

    python -m training faces --version 1     # writes models/classifier/{face_detector,face_landmarks,faces}/1/

1. The npm package @vladmandic/face-api@1.7.15 (MIT) is fetched with `npm pack` into
   data/face-api/ (its sha256 is pinned), unless --face-api points at an unpacked copy.
2. Each network (detector.py, landmarks.py, descriptor.py) is built from the package's TF.js
   weights, exported to ONNX (opset 17, dynamic batch) and its quantised weights stored as one
   byte each (compact.py: the same float32 values, bit for bit).
3. Parity: each ONNX file on the inputs recorded in tests/fixtures/faces/*_reference.npz
   against face-api's own outputs there (record_*_reference.py re-records them with node), and
   the descriptor also against dlib's on the same aligned chips.
4. The whole pipeline is measured on the labelled photos (evaluate.py); the figures go into
   the `faces` card. No training happens: the weights are the originals, so no seed applies.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from services.contracts.predictor import Predictor
from training.export import export_onnx, new_version_dir, write_card
from training.faces import compact, descriptor, detector, landmarks

PACKAGE, PACKAGE_VERSION = "@vladmandic/face-api", "1.7.15"
PACKAGE_SHA256 = "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031"
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "faces"
SOURCE = {"package": f"{PACKAGE}@{PACKAGE_VERSION}", "package_sha256": PACKAGE_SHA256,
          "package_licence": "MIT (Vladimir Mandic; face-api.js by Vincent Muehler)"}


def fetch_face_api(cache: Path) -> Path:
    """The unpacked npm package, fetched once with `npm pack` and checked against its pinned sha256."""
    unpacked = cache / PACKAGE_VERSION / "package"
    if (unpacked / "model").is_dir():
        return unpacked
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"vladmandic-face-api-{PACKAGE_VERSION}.tgz"  # npm pack's name for it
    if not tarball.exists():  # a tarball put there by hand serves offline sites
        print(f"fetching {PACKAGE}@{PACKAGE_VERSION} with npm pack ...", flush=True)
        subprocess.run(["npm", "pack", "--silent", f"{PACKAGE}@{PACKAGE_VERSION}"], cwd=cache, check=True,
                       capture_output=True, text=True)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != PACKAGE_SHA256:
        raise SystemExit(f"{tarball}: sha256 {digest} is not the pinned {PACKAGE_SHA256}")
    with tarfile.open(tarball) as archive:
        archive.extractall(cache / PACKAGE_VERSION, filter="data")
    return unpacked


def export(net: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names: list[str]) -> None:
    export_onnx(net, example, path, [input_name], output_names)
    before, after = compact.compact(path)
    print(f"  {path}: {before / 1e6:.1f} MB as float32, {after / 1e6:.1f} MB with one-byte weights")


def run_onnx(path: Path, inputs: np.ndarray) -> list[np.ndarray]:
    return Predictor(path)(inputs)


def parity_detector(path: Path) -> dict:
    from services.contracts.face_geometry import detections, detector_input
    from training.faces.evaluate import load_photo

    ref = np.load(FIXTURES / "detector_reference.npz")
    worst_box = worst_score = worst_final = 0.0
    for i, name in enumerate(ref["names"]):
        net_input, size = detector_input(load_photo(FIXTURES / f"{name}.jpg"))
        boxes, scores = run_onnx(path, net_input)
        worst_box = max(worst_box, float(np.abs(boxes[0] - ref["js_boxes"][i]).max()))
        worst_score = max(worst_score, float(np.abs(scores[0] - ref["js_scores"][i]).max()))
        ours = np.array([f[:4] for f in detections(boxes[0], scores[0], size)])
        theirs = ref["det_boxes"][ref["det_photo"] == i]
        if ours.shape != theirs.shape:
            raise SystemExit(f"detector: {name}: {len(ours)} faces, face-api finds {len(theirs)}")
        worst_final = max(worst_final, float(np.abs(ours - theirs).max()) if len(ours) else 0.0)
    return {"reference": "face-api's own JavaScript (tfjs 4.22 CPU) on the fixture photos, "
                         "tests/fixtures/faces/detector_reference.npz",
            "photos": int(len(ref["names"])), "max_abs_diff_boxes": worst_box, "max_abs_diff_scores": worst_score,
            "max_abs_diff_final_boxes_px": worst_final, "same_faces_as_face_api": True}


def parity_landmarks(path: Path) -> dict:
    ref = np.load(FIXTURES / "landmarks_reference.npz")
    ours = run_onnx(path, ref["inputs"].astype(np.float32))[0]
    js = ref["js_landmarks"].reshape(len(ours), 68, 2)
    dlib_error = np.linalg.norm(ref["js_points"] - ref["dlib_points"], axis=2).mean(axis=1)
    eyes = np.linalg.norm(ref["dlib_points"][:, 36:42].mean(1) - ref["dlib_points"][:, 42:48].mean(1), axis=1)
    return {"reference": "face-api's own JavaScript on the recorded 112x112 inputs, "
                         "tests/fixtures/faces/landmarks_reference.npz",
            "faces": int(len(ours)), "max_abs_diff_relative": float(np.abs(ours - js).max()),
            "vs_dlib_68_points_mean_px": float(dlib_error.mean()),
            "vs_dlib_68_points_mean_interocular": float((dlib_error / eyes).mean())}


def parity_descriptor(path: Path) -> dict:
    ref = np.load(FIXTURES / "descriptor_reference.npz")
    ours = run_onnx(path, ref["chips"].transpose(0, 3, 1, 2))[0]
    to_dlib = np.linalg.norm(ours - ref["dlib"], axis=1)
    return {"reference": "face-api's own JavaScript and dlib 20.0 (dlib_face_recognition_resnet_model_v1) on the "
                         "same aligned chips, tests/fixtures/faces/descriptor_reference.npz",
            "chips": int(len(ours)), "max_abs_diff_vs_face_api": float(np.abs(ours - ref["js"]).max()),
            "euclidean_to_dlib_max": float(to_dlib.max()), "euclidean_to_dlib_mean": float(to_dlib.mean()),
            "why_not_zero": "face-api stores dlib's weights quantised to 8 bits per tensor (and divides "
                            "pixels by 255 where dlib divides by 256)"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training faces", description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--models-dir", type=Path, default=Path("models/classifier"))
    parser.add_argument("--face-api", type=Path, default=None, help="an unpacked @vladmandic/face-api package")
    parser.add_argument("--cache", type=Path, default=Path("data/face-api"))
    args = parser.parse_args(argv)
    started = time.time()
    face_api = args.face_api or fetch_face_api(args.cache)
    command = "python -m training faces" + (f" --version {args.version}" if args.version else "")
    common = {"training": {"command": command, "seed": None, "trained": False,
                           "note": "a port of pretrained weights: nothing is trained, the result is deterministic"}}

    print("face_detector: SSD MobileNetV1 (face-api ssd_mobilenetv1_model)", flush=True)
    out = new_version_dir(args.models_dir, "face_detector", args.version)
    export(detector.load(face_api), torch.zeros(1, 3, 512, 512), out / "model.onnx", "image", ["boxes", "scores"])
    write_card(out, {
        "name": "face_detector", "version": out.name, "kind": "face_detector",
        "description": "SSD MobileNetV1 face detector (face-api's ssd_mobilenetv1_model, WIDER FACE), ported to ONNX",
        "source": SOURCE | {"file": "model/ssd_mobilenetv1_model.bin", "port": "training/faces/detector.py"},
        "licence": {"weights": "MIT, as shipped in the package; face-api.js's author trained them on WIDER FACE "
                               "(its README), whose annotations are for non-commercial research"},
        **common,
        "contract": {"inputs": [{"name": "image", "shape": ["batch", 3, 512, 512], "dtype": "float32",
                                 "description": "RGB 0..255, the photo padded at the bottom/right to a square "
                                                "and resized to 512 (services/contracts/face_geometry.detector_input)"}],
                     "outputs": [{"name": "boxes", "shape": ["batch", detector.ANCHORS, 4],
                                  "description": "x0, y0, x1, y1 relative to the 512 square, every anchor"},
                                 {"name": "scores", "shape": ["batch", detector.ANCHORS],
                                  "description": "face probability per anchor (NMS: face_geometry.detections)"}],
                     "max_batch_rows": 2},  # a batch of 8 held 520 MB more in onnxruntime's arena
        "metrics": {"parity": parity_detector(out / "model.onnx")}}, ["torch"])

    print("face_landmarks: 68-point landmark net (face-api face_landmark_68_model)", flush=True)
    out = new_version_dir(args.models_dir, "face_landmarks", args.version)
    export(landmarks.load(face_api), torch.zeros(1, 3, 112, 112), out / "model.onnx", "face", ["landmarks"])
    write_card(out, {
        "name": "face_landmarks", "version": out.name, "kind": "face_landmarks",
        "description": "68 face landmarks (iBUG 300-W order) from a face crop: face-api's face_landmark_68_model",
        "source": SOURCE | {"file": "model/face_landmark_68_model.bin", "port": "training/faces/landmarks.py"},
        "licence": {"weights": "MIT, as shipped in the package. Its author trained them on about 35,000 faces: "
                               "the iBUG 300-W challenge data (non-commercial research terms) and a private set "
                               "(face-api.js issues #471, #139). Check those terms before commercial use."},
        **common,
        "contract": {"inputs": [{"name": "face", "shape": ["batch", 3, 112, 112], "dtype": "float32",
                                 "description": "RGB 0..255, the detector's box padded to a square (centred) "
                                                "and resized to 112 (services/contracts/face_geometry.landmark_input)"}],
                     "outputs": [{"name": "landmarks", "shape": ["batch", 68, 2],
                                  "description": "x, y relative to the 112 input (face_geometry.landmark_points)"}],
                     "max_batch_rows": 64},
        "metrics": {"parity": parity_landmarks(out / "model.onnx")}}, ["torch"])

    print("faces: dlib's ResNet face descriptor (face-api face_recognition_model)", flush=True)
    from training.faces.evaluate import draw_examples, evaluate

    out = new_version_dir(args.models_dir, "faces", args.version)
    export(descriptor.load(face_api), torch.zeros(1, 3, 150, 150), out / "model.onnx", "chip", ["descriptor"])
    evaluation = evaluate(args.models_dir, descriptor_path=out / "model.onnx")
    draw_examples(args.models_dir, out / "examples.png", descriptor_path=out / "model.onnx")
    write_card(out, {
        "name": "faces", "version": out.name, "kind": "face_descriptor",
        "description": "dlib's ResNet face descriptor (128-d), as ported to TF.js by face-api; with the "
                       "face_detector and face_landmarks models it is the service's `faces` teach model",
        "source": SOURCE | {"file": "model/face_recognition_model.bin", "port": "training/faces/descriptor.py",
                            "original": "dlib_face_recognition_resnet_model_v1 by Davis King (dlib 19.x)"},
        "licence": {"weights": "MIT as shipped in the package; dlib's original model is CC0 (public domain)"},
        **common,
        "contract": {"inputs": [{"name": "chip", "shape": ["batch", 3, 150, 150], "dtype": "float32",
                                 "description": "RGB 0..255 face chip aligned as dlib's get_face_chip(shape, 150, "
                                                "0.25) does (services/contracts/face_geometry.align)"}],
                     "outputs": [{"name": "descriptor", "shape": ["batch", 128], "dtype": "float32",
                                  "description": "face descriptor; the service stores it at unit length"}],
                     "match_distance": evaluation["threshold"]["distance"],
                     "match_rule": "same person when the Euclidean distance between unit-length descriptors is "
                                   "at most match_distance",
                     "max_batch_rows": 64},
        "metrics": {"parity": parity_descriptor(out / "model.onnx"), **evaluation},
        "original_published": {"lfw_accuracy": 0.9938, "note": "dlib's own figure for its model (dlib.net, "
                               "dnn_face_recognition_ex), the original's claim, not measured here"}}, ["torch"])
    print(f"done in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
