"""The gate a new model version passes before it may take traffic.

    report = gate.check(candidate, serving, repository, min_agreement=0.9, quality_tolerance=0.05)
    report["passed"]   # and report["checks"]: each check's name, result and figures

Checks, in order (the first failure stops the rest only where they could not run):
  1. contract: the same kind, inputs and outputs (names, element types, fixed sizes) as the
     serving version, and the kind's own contract fields (a policy's observation and action
     spaces, a generator's latent size and image shape, a classifier's labels ...): clients
     written against the serving version must keep working;
  2. parity: the card's record of its export check (ONNX against the framework it came from)
     exists and passed;
  3. outputs: finite on the probe inputs (and within the card's output range, for generators);
  4. agreement with the serving version on the stored probe inputs, at least min_agreement:
     policies take the same deterministic action, classifiers the same top label, face
     descriptors make the same same/different decisions on every pair, the detector finds the
     same faces, landmarks land within 2% of the crop, the animal check makes the same
     animal-or-not decisions (generators, whose point is to differ,
     have no agreement check);
  5. quality: the figure the card measured (a policy's mean return, a classifier's test
     accuracy, a generator's FID) not worse than the serving version's by more than
     quality_tolerance, a fraction of it.

Agreement says whether behaviour changed, not whether it got worse: a CartPole policy retrained
with another seed balances the pole as well but its own way, and agrees with the shipped one on
about half of the probe actions. Loading such a version is a decision the admin makes by
lowering min_agreement for that call; the quality check still applies.

Probe inputs are stored per model, shared by its versions: models/<service>/<name>/probes.npz
(`python -m training probes` records them; see repository.probes_file()). The sha256 of model.onnx was
checked against the card before any of this, when the version was loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from services.contracts import latents
from services.contracts.repository import load_probes, probes_file

GENERATOR_PROBE_SEEDS = range(64)   # generators need no file: seeds give latents by contract
LANDMARK_TOLERANCE = 0.02           # of the landmark crop's side
DETECTOR_MIN_SCORE, DETECTOR_IOU = 0.5, 0.5

# Contract fields a client depends on, by kind; a new version must keep them.
CONTRACT_FIELDS = {
    "policy": ("observation_space", "action_space", "action_meanings", "action_squashing"),
    "generator": ("latent_dim", "classes", "image_size", "channels", "output_range", "seed_to_latent", "to_uint8"),
    "classifier": ("labels",),
}


def check(candidate, serving, repository: Path, min_agreement: float, quality_tolerance: float = 0.05) -> dict:
    """Run every check of `candidate` (a loaded model) against `serving` (or None for a model
    that serves no version yet); returns {"passed": bool, "checks": [...], "reason": str|None}."""
    checks: list[dict] = []

    def record(name: str, passed: bool, **figures) -> bool:
        checks.append({"check": name, "passed": bool(passed), **figures})
        return passed

    if serving is not None:
        problems = contract_problems(candidate, serving)
        record("contract", not problems, problems=problems, against_version=serving.version)
    parity = parity_record(candidate.card)
    record("parity", parity[0], record=parity[1])
    kind = candidate.card.get("kind")
    inputs = probe_inputs(candidate, repository)
    if inputs is None:
        record("probes", False, problem=f"no probe inputs at {probes_file(repository, candidate.name)} "
               "(record them with `python -m training probes`)")
    elif all(c["passed"] for c in checks):  # comparing against an incompatible version means nothing
        outputs = run(candidate, inputs)
        finite = all(np.isfinite(o).all() for o in outputs)
        low_high = candidate.card.get("contract", {}).get("output_range")
        in_range = not low_high or (float(outputs[0].min()) >= low_high[0] - 1e-3 and
                                    float(outputs[0].max()) <= low_high[1] + 1e-3)
        record("outputs", finite and in_range, probes=int(len(inputs)), finite=bool(finite),
               **({"within_output_range": bool(in_range)} if low_high else {}))
        if kind in AGREEMENT and serving is not None and finite:  # generators: differing is their point
            agreement, what = AGREEMENT[kind](run(serving, inputs), outputs, candidate, serving)
            record("agreement", agreement >= min_agreement, agreement=round(agreement, 4),
                   min_agreement=min_agreement, measure=what, probes=int(len(inputs)),
                   against_version=serving.version)
        if kind in QUALITY:
            passed, figures = quality_check(candidate, serving, quality_tolerance)
            record("quality", passed, **figures)
    failed = [c for c in checks if not c["passed"]]
    return {"passed": not failed, "checks": checks, "reason": describe_failure(failed[0]) if failed else None}


def describe_failure(check: dict) -> str:
    if check.get("problems"):
        return f"{check['check']} check failed: " + "; ".join(check["problems"])
    figures = ", ".join(f"{k} {v}" for k, v in check.items() if k not in ("check", "passed"))
    return f"{check['check']} check failed: {figures}"


def contract_problems(candidate, serving) -> list[str]:
    problems = []
    new, old = candidate.card, serving.card
    if new.get("kind") != old.get("kind"):
        problems.append(f"kind {new.get('kind')!r} is not the serving version's {old.get('kind')!r}")
    for side in ("inputs", "outputs"):
        ours = [(t.name, t.type, fixed(t.shape)) for t in getattr(candidate.session, f"get_{side}")()]
        theirs = [(t.name, t.type, fixed(t.shape)) for t in getattr(serving.session, f"get_{side}")()]
        if side == "inputs" and ours[:1] != theirs[:1] or side == "outputs" and ours[:len(theirs)] != theirs:
            problems.append(f"{side} {ours} differ from the serving version's {theirs}")
    for field in CONTRACT_FIELDS.get(new.get("kind"), ()):
        a, b = new.get("contract", {}).get(field), old.get("contract", {}).get(field)
        if a != b:
            problems.append(f"contract.{field} {str(a)[:120]} differs from the serving version's {str(b)[:120]}")
    if new.get("kind") in ("classifier", "face_descriptor"):
        if embedding_size(new) != embedding_size(old):
            problems.append(f"embedding size {embedding_size(new)} differs from {embedding_size(old)}")
    return problems


def fixed(shape) -> list:
    """An ONNX shape with its named (dynamic) sizes as None."""
    return [d if isinstance(d, int) else None for d in shape]


def embedding_size(card: dict):
    for output in card.get("contract", {}).get("outputs", []):
        if output.get("name") in ("embedding", "descriptor"):
            return output.get("shape", [None, None])[-1]
    return None


def parity_record(card: dict) -> tuple[bool, dict | None]:
    """The card's export check: export.parity.passed (trained models), or metrics.parity with
    every max_abs_diff within 1e-4 (ported models, checked against the original code)."""
    parity = (card.get("export") or {}).get("parity")
    if parity is not None:
        return parity.get("passed") is True, {k: v for k, v in parity.items() if not isinstance(v, (dict, list))}
    parity = (card.get("metrics") or {}).get("parity")
    if parity is not None:
        diffs = {k: v for k, v in parity.items() if k.startswith("max_abs_diff")}
        return bool(diffs) and all(isinstance(v, (int, float)) and v <= 1e-4 for v in diffs.values()), diffs
    return False, None


def probe_inputs(model, repository: Path) -> np.ndarray | None:
    """The probe batch in the model's own input form."""
    contract = model.card.get("contract", {})
    if model.card.get("kind") == "generator":
        dim = int(contract["latent_dim"])
        classes = contract.get("classes")  # class-conditional: each seed's default class, seed mod classes
        return latents.model_inputs(latents.seed_latents(GENERATOR_PROBE_SEEDS, dim),
                                    np.asarray(GENERATOR_PROBE_SEEDS) % len(classes) if classes else None, classes)
    probes = load_probes(repository, model.name)
    if probes is None:
        return None
    if "images" in probes:  # classifier probes are pictures: each version preprocesses them its own way
        from PIL import Image

        from services.contracts import imaging

        preprocessing = contract["preprocessing"]
        args = imaging.contract_args(preprocessing)
        pixels = np.stack([imaging.prepare(Image.fromarray(image.squeeze()), **args) for image in probes["images"]])
        return imaging.normalise(pixels, preprocessing["mean"], preprocessing["std"])
    if "pixels" in probes:  # the animal check's squares, kept as pictures
        from services.contracts.face_geometry import animal_normalise

        return animal_normalise(probes["pixels"])
    return probes["inputs"]


def run(model, inputs: np.ndarray, rows: int = 16) -> list[np.ndarray]:
    """The model's outputs on the probes, straight through its session (not its batcher: the
    gate must not queue behind, or in front of, requests)."""
    parts = [model.session.run(model.output_names, {model.input_name: np.ascontiguousarray(
        inputs[i:i + rows], dtype=model.input_dtype)}) for i in range(0, len(inputs), rows)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def quality_check(candidate, serving, tolerance: float) -> tuple[bool, dict]:
    """The card's measured quality (QUALITY: a policy's mean return, a classifier's test accuracy,
    a generator's FID): present, and not worse than the serving version's by more than
    `tolerance` (a fraction of the serving figure); a generator's FID also below its card's
    ceiling (the untrained generator)."""
    key, higher_is_better = QUALITY[candidate.card.get("kind")]
    figure = (candidate.card.get("metrics") or {}).get(key)
    if not isinstance(figure, (int, float)) or not math.isfinite(figure):
        return False, {"problem": f"the card has no measured metrics.{key}"}
    figures = {"metric": key, "value": round(figure, 4)}
    passed = True
    ceiling = ((candidate.card.get("metrics") or {}).get("ceiling") or {}).get(key)
    if isinstance(ceiling, (int, float)):
        figures["ceiling"] = round(ceiling, 4)
        passed = figure < ceiling
    theirs = (serving.card.get("metrics") or {}).get(key) if serving is not None else None
    if isinstance(theirs, (int, float)) and math.isfinite(theirs):
        limit = theirs - tolerance * abs(theirs) if higher_is_better else theirs + tolerance * abs(theirs)
        figures.update(serving_value=round(theirs, 4), **{"min_value" if higher_is_better else "max_value":
                                                          round(limit, 4)}, tolerance=tolerance)
        passed = passed and (figure >= limit if higher_is_better else figure <= limit)
    return passed, figures


# The card figure each kind is judged by, and whether higher is better. The face networks are
# ports of published ones whose cards record parity, not a quality figure of their own.
QUALITY = {"policy": ("mean_return", True), "classifier": ("test_accuracy", True), "generator": ("fid", False)}


# Agreement measures: (serving outputs, candidate outputs, candidate, serving) -> (fraction, what)

def policy_agreement(old, new, candidate, serving):
    space = candidate.spec.contract.action_space
    if space.type == "Discrete":
        return float(np.mean(old[0] == new[0])), "same deterministic action"
    span = np.array([h - lo if h is not None and lo is not None else 2.0
                     for lo, h in zip(space.low, space.high)], np.float32)
    close = np.abs(old[0] - new[0]).reshape(len(old[0]), -1) <= 0.05 * span.reshape(1, -1)
    return float(np.mean(close.all(axis=1))), "deterministic action within 5% of the action range"


def classifier_agreement(old, new, candidate, serving):
    return float(np.mean(old[0].argmax(axis=1) == new[0].argmax(axis=1))), "same top label"


def descriptor_agreement(old, new, candidate, serving):
    def decisions(descriptors, card):
        unit = descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
        distance = np.linalg.norm(unit[:, None] - unit[None], axis=2)
        upper = np.triu_indices(len(unit), 1)
        return distance[upper] <= float(card["contract"]["match_distance"])

    same = decisions(old[0], serving.card) == decisions(new[0], candidate.card)
    return float(np.mean(same)), "same same-person decision on every pair of probe faces"


def detector_agreement(old, new, candidate, serving):
    from services.contracts.face_geometry import Size, faces_found

    size = Size(512, 512)
    agree = []
    for boxes_a, scores_a, boxes_b, scores_b in zip(old[0], old[1], new[0], new[1]):
        a = np.array([f[:4] for f in faces_found(boxes_a, scores_a, size, DETECTOR_MIN_SCORE)]).reshape(-1, 4)
        b = np.array([f[:4] for f in faces_found(boxes_b, scores_b, size, DETECTOR_MIN_SCORE)]).reshape(-1, 4)
        agree.append(len(a) == len(b) and all(best_iou(box, b) >= DETECTOR_IOU for box in a))
    return float(np.mean(agree)), "same faces found (same count, each box IoU >= 0.5) per probe photo"


def best_iou(box: np.ndarray, boxes: np.ndarray) -> float:
    from services.contracts.face_geometry import box_iou

    return float(box_iou(box, boxes).max()) if len(boxes) else 0.0


def landmark_agreement(old, new, candidate, serving):
    moved = np.abs(old[0] - new[0]).reshape(len(old[0]), -1).mean(axis=1)
    return float(np.mean(moved <= LANDMARK_TOLERANCE)), \
        f"mean landmark shift within {LANDMARK_TOLERANCE:.0%} of the crop"


def animal_agreement(old, new, candidate, serving):
    said = lambda shares, card: shares >= float(card["contract"]["threshold"])  # noqa: E731
    return float(np.mean(said(old[0], serving.card) == said(new[0], candidate.card))), \
        "same animal-or-not decision on every probe face"


AGREEMENT = {"policy": policy_agreement, "classifier": classifier_agreement, "face_descriptor": descriptor_agreement,
             "face_detector": detector_agreement, "face_landmarks": landmark_agreement,
             "face_animal_check": animal_agreement}
