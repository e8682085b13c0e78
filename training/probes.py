"""Record the probe inputs a new model version is gated on before it takes traffic.

    python -m training probes                      # every shipped model that takes probes
    python -m training probes --only cartpole      # one model

The gate (services/runtime/gate.py) runs the serving version and the candidate on the same
inputs and compares what they do. The inputs are stored once per model, shared by its
versions, at models/<service>/<name>/probes.npz:

  policy          observations from deterministic rollouts of the newest version (onnxruntime,
                  the env of its card, fixed seeds), spread evenly over the episodes (for a
                  pixel policy, its camera observations);
  classifier      held-out Fashion-MNIST test images, the same number per class, as uint8
                  pictures (each version preprocesses them by its own card);
  face_descriptor the aligned face chips of tests/fixtures/faces/descriptor_reference.npz;
  face_landmarks  the 112x112 landmark inputs of tests/fixtures/faces/landmarks_reference.npz;
  face_detector   the fixture photos as the detector sees them (512x512, stored as uint8);
  face_animal_check  the squares around the faces the shipped detector finds in the fixture
                  photos and in scikit-image's cat (224x224, stored as uint8 pixels);
  generator       none: its probes are the latents of seeds 0-63, fixed by the contract.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from services.contracts import repository
from services.contracts.predictor import Predictor

FACE_FIXTURES = Path("tests/fixtures/faces")
DETECTOR_PHOTOS = ("group_1.jpg", "group_2.jpg", "obama.jpg", "biden.jpg")
PIXEL_OBSERVATIONS = 500  # a pixel policy's probes: camera observations kept


def policy_probes(entry: repository.ModelEntry, observations: int, episodes: int, seed: int) -> dict:
    import gymnasium as gym
    predict = Predictor.of(entry)
    env_id = entry.card["contract"]["env_id"]
    camera = "camera" in entry.card["contract"]  # a pixel policy: it sees frames, 15 KB each
    if camera:
        from training.pixel_policy import make_env

        env, observations = make_env(), min(observations, PIXEL_OBSERVATIONS)
    else:
        env = gym.make(env_id)
    dtype = np.uint8 if camera else np.float32
    seen, returns = [], []
    for episode in tqdm(range(episodes), desc=f"{entry.name} rollouts", leave=False):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            seen.append(np.asarray(obs, dtype))
            action = predict(seen[-1][None], outputs=["action"])[0][0]
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
    env.close()
    picked = np.linspace(0, len(seen) - 1, min(observations, len(seen))).round().astype(int)
    return {"inputs": np.stack(seen)[picked],
            "source": f"{len(picked)} of {len(seen)} observations from {episodes} deterministic {env_id} episodes "
                      f"(seeds {seed}-{seed + episodes - 1}) of {entry.name} version {entry.version}, mean return "
                      f"{np.mean(returns):.1f}"}


def classifier_probes(entry: repository.ModelEntry, per_class: int) -> dict:
    from training.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    picked = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(int(labels.max()) + 1)])
    return {"images": images[picked], "labels": labels[picked],
            "source": f"the first {per_class} Fashion-MNIST test images of each class ({len(picked)})"}


def descriptor_probes(entry: repository.ModelEntry) -> dict:
    with np.load(FACE_FIXTURES / "descriptor_reference.npz") as data:
        return {"inputs": data["chips"].transpose(0, 3, 1, 2).copy(), "names": data["names"],
                "source": "the aligned 150x150 chips of tests/fixtures/faces/descriptor_reference.npz"}


def landmark_probes(entry: repository.ModelEntry) -> dict:
    with np.load(FACE_FIXTURES / "landmarks_reference.npz") as data:
        return {"inputs": data["inputs"], "names": data["names"],
                "source": "the 112x112 face crops of tests/fixtures/faces/landmarks_reference.npz"}


def detector_probes(entry: repository.ModelEntry) -> dict:
    from PIL import Image

    from services.contracts.face_geometry import detector_input

    inputs = [detector_input(np.asarray(Image.open(FACE_FIXTURES / name).convert("RGB")))[0][0]
              for name in DETECTOR_PHOTOS]
    return {"inputs": np.clip(np.stack(inputs).round(), 0, 255).astype(np.uint8), "names": np.array(DETECTOR_PHOTOS),
            "source": f"the photos {', '.join(DETECTOR_PHOTOS)} of tests/fixtures/faces as the detector sees them"}


def animal_check_probes(entry: repository.ModelEntry) -> dict:
    """Stored as the pixels (uint8 [N, 224, 224, 3]): the gate normalises them by the card."""
    import skimage.data

    from services.contracts import face_geometry
    from training.faces.evaluate import detect, fixture_photos

    service_repository = entry.path.parent.parent.parent
    detector = Predictor(repository.resolve(service_repository, "face_detector", "1").path)  # the float original
    photos = {f"{name}.jpg": rgb for name, rgb in fixture_photos().items()}
    photos["scikit-image chelsea (a cat)"] = skimage.data.chelsea()
    squares, names = [], []
    for name, rgb in photos.items():
        found = detect(detector, rgb)
        squares += [face_geometry.animal_pixels(rgb, f[:4]) for f in found]
        names += [name] * len(found)
    return {"pixels": np.stack(squares), "names": np.array(names),
            "source": f"the squares around the {len(squares)} faces face_detector version 1 finds in "
                      "tests/fixtures/faces and scikit-image's cat"}


def record(entry: repository.ModelEntry, args) -> Path | None:
    kind = entry.card.get("kind")
    if kind == "policy":
        probes = policy_probes(entry, args.observations, args.episodes, args.seed)
    elif kind == "classifier":
        probes = classifier_probes(entry, args.per_class)
    elif kind == "face_descriptor":
        probes = descriptor_probes(entry)
    elif kind == "face_landmarks":
        probes = landmark_probes(entry)
    elif kind == "face_detector":
        probes = detector_probes(entry)
    elif kind == "face_animal_check":
        probes = animal_check_probes(entry)
    else:
        return None  # generators: seeds are their probes
    service_repository = entry.path.parent.parent.parent  # models/<service>/<name>/<version>/model.onnx
    path = repository.probes_file(service_repository, entry.name)
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in probes.items()})
    print(json.dumps({"model": f"{service_repository.name}/{entry.name}", "file": str(path),
                      "probes": len(next(probes[k] for k in ("inputs", "images", "pixels") if k in probes)),
                      "bytes": path.stat().st_size, "source": probes["source"]}))
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training probes", description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--only", nargs="*", help="model names (default: all)")
    p.add_argument("--observations", type=int, default=1000, help="policy observations kept")
    p.add_argument("--episodes", type=int, default=5, help="policy rollouts they are drawn from")
    p.add_argument("--seed", type=int, default=3_000_000, help="first rollout seed (unlike training's and "
                   "evaluation's seeds)")
    p.add_argument("--per-class", type=int, default=50, help="classifier probe images per class")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    for service_dir in sorted(p for p in args.models_dir.iterdir() if p.is_dir()):
        for name in repository.list_models(service_dir):
            if args.only and name not in args.only:
                continue
            record(repository.resolve(service_dir, name), args)


if __name__ == "__main__":
    main()
