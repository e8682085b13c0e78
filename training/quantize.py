"""python -m training quantize: int8 versions of the image networks, measured against float.

    python -m training quantize                          # fashion, face_detector, face_animal_check, faces
    python -m training quantize --only face_detector     # one of them
    python -m training quantize --dry-run                # measure, write nothing

For each network, from its newest float version:
  1. calibrate: onnxruntime's static quantization (QDQ: QuantizeLinear/DequantizeLinear pairs
     that onnxruntime fuses into int8 kernels), per-channel int8 weights, uint8 activations with
     ranges from calibration inputs of the network's own kind (below): MinMax, or for the
     detector the 99.99th percentile (MinMax's wider ranges lost or added faces on 6 of 249 photos);
  2. measure what int8 changes, against the float version on the same inputs: the classifier's
     test accuracy (all 10,000 test images) and its embeddings, the detector's faces on every
     photo here, the animal check's decisions, the descriptor's distances and its labelled-pair
     errors (training/faces/evaluate.py); and the speed of one call, float and int8 alternately
     on this machine with the service's threads;
  3. write the next version (models/classifier/<name>/<N>/) only when every bound below holds
     and int8 is faster: the newest version is what a deployment serves by default, the float
     one stays pinnable (MODEL_VERSIONS=faces=1). A miss prints why and writes nothing.

Which operators are quantized was measured too (the card keeps the choice): the classifier keeps
its first convolution and its classifier head in float (everything in int8 lost 0.41 accuracy
points, this 0.12); the face networks quantize their convolutions only (with the detector's box
decoding in int8 its boxes overlapped float's by IoU 0.76 at worst), and the detector keeps its
first convolution and its 12 box and score heads in float: with them in int8 its boxes moved the
landmarks enough to turn one pair of different people (float 0.4425 apart, the threshold 0.421)
into a match.

Calibration inputs are never the measured ones where a data set allows it: the classifier
calibrates on training images and is measured on the test split. The face networks have only
the photos this machine holds; they calibrate on the face fixtures and measure on those and
every other photo (animals.photos(): 10 of people, 211 without a person) and on altered copies.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from services.contracts import face_geometry, imaging
from services.contracts.predictor import Predictor
from services.contracts.repository import resolve, version_dirs
from training.export import new_version_dir, write_card
from training.faces.evaluate import FIXTURES, detect, fixture_photos

REPOSITORY = Path(__file__).resolve().parents[1] / "models" / "classifier"
MAX_ACCURACY_DROP = 0.003   # classifier test accuracy, float minus int8 (0.3 points)
MIN_BOX_IOU = 0.8           # each float face matched by an int8 one at least this close
MAX_DESCRIPTOR_DISTANCE = 0.1   # unit-length descriptors, int8 to float (same-person pairs: 0.17-0.30)


@dataclass
class Recipe:
    """One network: how to calibrate it, what int8 must keep, and one call to time."""
    name: str
    calibration: Callable[[dict], list[np.ndarray]]          # card -> batches
    measure: Callable[[Path, Path, dict], tuple[dict, list[str]]]  # float, int8, card -> figures, misses
    timing_input: Callable[[dict], np.ndarray]
    quantize: dict = field(default_factory=dict)               # quantize_static options
    about: str = ""


# --- the clothing classifier ---------------------------------------------------------------

def fashion_batches(images: np.ndarray, card: dict) -> np.ndarray:
    prep = card["contract"]["preprocessing"]
    pixels = np.stack([imaging.prepare(Image.fromarray(i[:, :, 0]), **imaging.contract_args(prep)) for i in images])
    return imaging.normalise(pixels, prep["mean"], prep["std"])


def fashion_calibration(card: dict, images: int = 1024, seed: int = 0) -> list[np.ndarray]:
    from training.datasets import load_fashion_mnist

    train, _ = load_fashion_mnist("train")
    pick = np.random.default_rng(seed).choice(len(train), images, replace=False)
    return [fashion_batches(train[pick[i:i + 32]], card) for i in range(0, images, 32)]


def fashion_measure(float_path: Path, int8_path: Path, card: dict) -> tuple[dict, list[str]]:
    from training.datasets import load_fashion_mnist

    test, labels = load_fashion_mnist("test")
    x = fashion_batches(test, card)
    f_logits, f_emb = Predictor(float_path)(x, rows=500)
    q_logits, q_emb = Predictor(int8_path)(x, rows=500)
    f_acc, q_acc = float((f_logits.argmax(1) == labels).mean()), float((q_logits.argmax(1) == labels).mean())
    cosine = np.sum(f_emb * q_emb, axis=1)  # both unit length
    figures = {"test_images": int(len(labels)), "float_test_accuracy": f_acc, "int8_test_accuracy": q_acc,
               "accuracy_drop_points": round((f_acc - q_acc) * 100, 2),
               "same_top_label": float((f_logits.argmax(1) == q_logits.argmax(1)).mean()),
               "embedding_cosine_to_float_min": round(float(cosine.min()), 4),
               "embedding_cosine_to_float_median": round(float(np.median(cosine)), 4)}
    misses = [f"test accuracy {q_acc:.4f} is more than {MAX_ACCURACY_DROP * 100:.1f} points under float's "
              f"{f_acc:.4f}"] if f_acc - q_acc > MAX_ACCURACY_DROP else []
    return figures, misses


def fashion_exclusions(model) -> list[str]:
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return convs[:1] + [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]


# --- the face networks ---------------------------------------------------------------------

def variants(photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each photo whole, mirrored and cropped: more faces at more sizes and places."""
    out = {}
    for name, rgb in photos.items():
        h, w = rgb.shape[:2]
        out |= {name: rgb, f"{name} mirrored": np.ascontiguousarray(rgb[:, ::-1]),
                f"{name} cropped": np.ascontiguousarray(rgb[h // 5:, w // 6: w - w // 6])}
    return out


def detector_calibration(card: dict) -> list[np.ndarray]:
    return [face_geometry.detector_input(rgb)[0] for rgb in variants(fixture_photos()).values()]


def evaluation_photos() -> dict[str, np.ndarray]:
    """Every photo here (animals.photos: people and not), and altered copies of the fixtures."""
    from training.faces.animals import photos
    from training.faces.evaluate import variants as altered

    people, others = photos()
    copies = {f"{name} {kind}": rgb for name, photo in fixture_photos().items() for kind, rgb in altered(photo).items()}
    return people | others | copies


def detector_exclusions(model) -> list[str]:
    """The first convolution and the 12 heads (box offsets and scores, each followed by a reshape)."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    heads = [n.name for n in convs if {"Reshape", "Transpose"} & set(readers.get(n.output[0], []))]
    return [convs[0].name, *heads]


def detector_measure(float_path: Path, int8_path: Path, card: dict) -> tuple[dict, list[str]]:
    from training.faces.evaluate import evaluate

    f, q = Predictor(float_path), Predictor(int8_path)
    ious, score_diffs, differ = [], [], {}
    photos = evaluation_photos()
    for name, rgb in photos.items():
        a, b = detect(f, rgb), detect(q, rgb)
        if len(a) != len(b):
            differ[name] = [len(a), len(b)]
        for face in a:
            if b:
                overlaps = face_geometry.box_iou(np.array(face[:4]), np.array([o[:4] for o in b]))
                ious.append(float(overlaps.max()))
                score_diffs.append(abs(face[4] - b[int(overlaps.argmax())][4]))
            else:
                ious.append(0.0)
    figures = {"photos": len(photos), "faces_float": len(ious),
               "photos_with_another_face_count": differ, "box_iou_to_float_min": round(min(ious), 4),
               "box_iou_to_float_median": round(float(np.median(ious)), 4),
               "score_difference_max": round(max(score_diffs), 4)}
    # End to end: the float landmarks and descriptor on the int8 detector's boxes
    float_descriptor = resolve(REPOSITORY, "faces", _float_version("faces")).path
    pairs = evaluate(REPOSITORY, descriptor_path=float_descriptor, detector_path=int8_path)["verification"]
    errors = pairs["false_matches"] + pairs["false_non_matches"]
    figures |= {"labelled_pair_errors_end_to_end": errors, "different_person_min": pairs["different_person_min"],
                "same_person_max": pairs["same_person_max"]}
    misses = [f"{errors} labelled pair(s) decided wrongly on the int8 detector's faces"] if errors else []
    if differ:
        misses.append(f"int8 finds another number of faces (float, int8) in {differ}")
    if min(ious) < MIN_BOX_IOU:
        misses.append(f"a face's int8 box overlaps float's by IoU {min(ious):.3f} < {MIN_BOX_IOU}")
    return figures, misses


def face_squares(photos: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """The animal check's inputs: the square around every face the float detector finds."""
    detector = Predictor(resolve(REPOSITORY, "face_detector", _float_version("face_detector")).path)
    squares, names = [], []
    for name, rgb in photos.items():
        found = detect(detector, rgb)
        if found:
            squares.append(face_geometry.animal_input(rgb, [f[:4] for f in found]))
            names += [name] * len(found)
    return np.concatenate(squares), names


def animal_calibration(card: dict) -> list[np.ndarray]:
    import skimage.data

    photos = variants(fixture_photos() | {"chelsea": skimage.data.chelsea(), "astronaut": skimage.data.astronaut()})
    squares, _ = face_squares(photos)
    return [squares[i:i + 8] for i in range(0, len(squares), 8)]


def animal_measure(float_path: Path, int8_path: Path, card: dict) -> tuple[dict, list[str]]:
    squares, names = face_squares(evaluation_photos())
    threshold = card["contract"]["threshold"]
    f = Predictor(float_path)(squares, rows=16)[0]
    q = Predictor(int8_path)(squares, rows=16)[0]
    changed = sorted({n for n, a, b in zip(names, f, q) if (a >= threshold) != (b >= threshold)})
    figures = {"faces": int(len(squares)), "threshold": threshold,
               "decisions_changed": changed, "animal_share_difference_max": round(float(np.abs(f - q).max()), 4),
               "animal_share_difference_median": round(float(np.median(np.abs(f - q))), 4)}
    return figures, ([f"the animal decision changed on {changed}"] if changed else [])


def descriptor_calibration(card: dict) -> list[np.ndarray]:
    chips = np.load(FIXTURES / "descriptor_reference.npz")["chips"]          # 9 aligned faces
    batch = np.concatenate([chips, chips[:, :, ::-1]]).astype(np.float32)    # and mirrored
    return [batch.transpose(0, 3, 1, 2)[i:i + 6] for i in range(0, len(batch), 6)]


def descriptor_measure(float_path: Path, int8_path: Path, card: dict) -> tuple[dict, list[str]]:
    from training.faces.evaluate import evaluate

    chips = np.load(FIXTURES / "descriptor_reference.npz")["chips"].astype(np.float32).transpose(0, 3, 1, 2)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    distance = np.linalg.norm(unit(Predictor(float_path)(chips)[0]) - unit(Predictor(int8_path)(chips)[0]), axis=1)
    report = evaluate(REPOSITORY, descriptor_path=int8_path)
    errors = report["verification"]["false_matches"] + report["verification"]["false_non_matches"]
    figures = {"chips": int(len(chips)), "distance_to_float_max": round(float(distance.max()), 4),
               "distance_to_float_median": round(float(np.median(distance)), 4),
               "labelled_pair_errors": errors, "evaluation": report}
    misses = []
    if errors:
        misses.append(f"{errors} labelled pair(s) decided wrongly")
    if distance.max() > MAX_DESCRIPTOR_DISTANCE:
        misses.append(f"an int8 descriptor is {distance.max():.3f} from float's (bound {MAX_DESCRIPTOR_DISTANCE})")
    return figures, misses


RECIPES = {
    "fashion": Recipe("fashion", fashion_calibration, fashion_measure,
                      lambda card: fashion_calibration(card, images=8)[0], {"exclusions": fashion_exclusions},
                      "1,024 Fashion-MNIST training images (seeded)"),
    "face_detector": Recipe("face_detector", detector_calibration, detector_measure,
                            lambda card: face_geometry.detector_input(fixture_photos()["obama"])[0],
                            {"op_types_to_quantize": ["Conv"], "exclusions": detector_exclusions,
                             "calibrate_method": "Percentile", "extra_options": {"CalibPercentile": 99.99}},
                            "the 9 face fixtures, each whole, mirrored and cropped, as the detector sees them"),
    "face_animal_check": Recipe("face_animal_check", animal_calibration, animal_measure,
                                lambda card: animal_calibration(card)[0][:1], {"op_types_to_quantize": ["Conv"]},
                                "the squares around every face found in the fixtures, scikit-image's cat and "
                                "astronaut, each whole, mirrored and cropped"),
    "faces": Recipe("faces", descriptor_calibration, descriptor_measure,
                    lambda card: descriptor_calibration(card)[0][:1], {"op_types_to_quantize": ["Conv"]},
                    "the 9 aligned fixture chips (tests/fixtures/faces/descriptor_reference.npz) and their mirror "
                    "images"),
}


# --- quantize, time, write -----------------------------------------------------------------

def _float_version(name: str, models_dir: Path = REPOSITORY) -> str:
    """The newest version that is not itself quantized: what int8 is made from and compared with."""
    for folder in reversed(version_dirs(models_dir / name)):
        if "quantization" not in json.loads((folder / "model.json").read_text()):
            return folder.name
    raise SystemExit(f"{name}: no float version under {models_dir / name}")


def quantize(source: Path, out: Path, batches: list[np.ndarray], options: dict) -> dict:
    """Static QDQ quantization of source into out; returns what was done, for the card."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, name: str):
            self.name, self.rest = name, iter(batches)

        def get_next(self):
            batch = next(self.rest, None)
            return None if batch is None else {self.name: batch}

    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # fold, fuse, infer shapes
    model = onnx.load(str(prepared))
    options = dict(options)
    excluded = options.pop("exclusions", lambda m: [])(model)
    method = options.pop("calibrate_method", "MinMax")
    options["calibrate_method"] = getattr(CalibrationMethod, method)
    quantize_static(str(prepared), str(out), Batches(model.graph.input[0].name), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded, **options)
    prepared.unlink()
    onnx.checker.check_model(str(out))
    ranges = method + (f" {options['extra_options']['CalibPercentile']}" if method == "Percentile" else "")
    return {"method": "onnxruntime static quantization, QDQ format", "weights": "int8, per channel",
            "activations": f"uint8, ranges by {ranges}", "calibration_batches": len(batches),
            "calibration_inputs": int(sum(len(b) for b in batches)),
            "operators": options.get("op_types_to_quantize", "all onnxruntime quantizes"),
            "kept_in_float": excluded}


def median_ms(path: Path, x: np.ndarray, threads: int, runs: int) -> float:
    predict = Predictor(path, threads=threads)
    for _ in range(3):
        predict(x)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def speed(float_path: Path, int8_path: Path, x: np.ndarray, threads: int, rounds: int = 5, runs: int = 10) -> dict:
    """ms per call, float and int8 in alternating rounds (so both see the same machine)."""
    f, q = [], []
    for _ in range(rounds):
        f.append(median_ms(float_path, x, threads, runs))
        q.append(median_ms(int8_path, x, threads, runs))
    f_ms, q_ms = float(np.median(f)), float(np.median(q))
    return {"input_shape": list(x.shape), "threads": threads, "float_ms": round(f_ms, 2), "int8_ms": round(q_ms, 2),
            "speedup": round(f_ms / q_ms, 2)}


def run(recipe: Recipe, models_dir: Path, threads: int, dry_run: bool, command: str) -> dict:
    version = _float_version(recipe.name, models_dir)
    entry = resolve(models_dir, recipe.name, version)
    print(f"{recipe.name}: int8 from version {version} ({entry.path.stat().st_size / 1e6:.1f} MB)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / "model.onnx"
        batches = recipe.calibration(entry.card)
        done = quantize(entry.path, int8_path, batches, recipe.quantize) | {"calibration": recipe.about}
        figures, misses = recipe.measure(entry.path, int8_path, entry.card)
        timing = speed(entry.path, int8_path, recipe.timing_input(entry.card), threads)
        if timing["speedup"] <= 1.0:
            misses.append(f"int8 is not faster ({timing['int8_ms']} ms against float's {timing['float_ms']} ms)")
        shown = {k: v for k, v in figures.items() if k != "evaluation"}
        print(f"{recipe.name}: {json.dumps(shown)}\n{recipe.name}: speed {json.dumps(timing)}", flush=True)
        if misses:
            print(f"{recipe.name}: NOT written: " + "; ".join(misses), flush=True)
            return {"name": recipe.name, "written": None, "misses": misses, "figures": shown, "speed": timing}
        if dry_run:
            return {"name": recipe.name, "written": None, "figures": shown, "speed": timing}
        out = write_version(entry, int8_path, models_dir, done, figures, timing, command)
        print(f"{recipe.name}: wrote {out}", flush=True)
        return {"name": recipe.name, "written": str(out), "figures": shown, "speed": timing}


def write_version(entry, int8_path: Path, models_dir: Path, done: dict, figures: dict, timing: dict,
                  command: str) -> Path:
    """The next version folder: the float card with what changed, the int8 file, and the files
    the contract names (the classifier's domain statistics, re-fitted on int8 after this). The
    float version's pictures stay with it: they show the float network."""
    out = new_version_dir(models_dir, entry.name)
    shutil.copyfile(int8_path, out / "model.onnx")
    for spec in entry.card.get("contract", {}).values():  # files the contract names (and checks by sha256)
        if isinstance(spec, dict) and "file" in spec:
            shutil.copyfile(entry.path.parent / spec["file"], out / spec["file"])
    card = copy.deepcopy(entry.card)
    card["version"] = out.name
    card["description"] = f"{card['description']} - int8 (quantized from version {entry.version})"
    card["quantization"] = {"from_version": entry.version, "from_sha256": entry.card["sha256"], **done,
                            "command": command, "measured": {k: v for k, v in figures.items() if k != "evaluation"},
                            "speed": timing}
    # The gate requires an export parity record: here, int8 against the float version it came
    # from; the float version's own (against torch or face-api) is kept beside it, named as such.
    export = card.setdefault("export", {})
    float_parity = export.pop("parity", None) or card.setdefault("metrics", {}).pop("parity", None)
    export["parity"] = {"reference": f"version {entry.version} (float), same inputs", "passed": True,
                        **{k: v for k, v in figures.items() if k != "evaluation"}}
    if float_parity is not None:
        export[f"parity_of_version_{entry.version}"] = float_parity
    if entry.name == "fashion":
        card["metrics"]["test_accuracy"] = figures["int8_test_accuracy"]
        card["metrics"].pop("per_class_accuracy", None), card["metrics"].pop("confusion_matrix", None)
        card["metrics"]["measured_on_float"] = ("evidence (training/evidence.py) was measured on version "
                                                f"{entry.version}, the float network this one was quantized from")
    if entry.name == "faces":
        report = figures["evaluation"]
        card["metrics"] |= {k: report[k] for k in ("threshold", "verification", "robustness_distance_to_original",
                                                   "end_to_end_vs_dlib")}
        card["contract"]["match_distance"] = report["threshold"]["distance"]
    if entry.name == "face_animal_check":
        card["metrics"]["faces_measured_on_float"] = card["metrics"].pop("faces")
    write_card(out, card, extra_packages=["onnx"])
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m training quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=list(RECIPES), action="append", help="one network (repeatable; default: all)")
    p.add_argument("--models-dir", type=Path, default=REPOSITORY)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the speed figures (the "
                   "benchmark's servers run INFER_THREADS=1)")
    p.add_argument("--dry-run", action="store_true", help="measure only; write no version")
    args = p.parse_args(argv)
    command = "python -m training quantize " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = [run(RECIPES[name], args.models_dir, args.threads, args.dry_run, command)
               for name in (args.only or RECIPES)]
    for r in results:
        if r["written"] and r["name"] == "fashion":
            from training import domain
            from training.teach_calibration import recalibrate

            version_dir = Path(r["written"])
            card = json.loads((version_dir / "model.json").read_text())
            print("fashion: the out-of-domain check and the teach threshold, measured on the int8 embeddings")
            domain.calibrate(version_dir, card["metrics"]["domain"]["seed"], domain.FLAG_RATE, command)
            recalibrate(version_dir, card["metrics"]["teach_calibration"]["images"], card["training"]["seed"], command)
    print("\n".join(f"{r['name']:18} {r['speed']['float_ms']:7.2f} ms -> {r['speed']['int8_ms']:7.2f} ms "
                    f"(x{r['speed']['speedup']}): {'wrote ' + r['written'] if r['written'] else 'not written'}"
                    for r in results))
    return results


if __name__ == "__main__":
    main()
