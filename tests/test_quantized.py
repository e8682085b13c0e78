"""The int8 image networks (issue 29): their cards, their gate against float, and the command.

The shipped int8 versions are each network's newest, so they serve by default; the float ones
stay pinnable. Their cards hold what `python -m training quantize` measured against float.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import requests

from conftest import MODELS, ROOT, running_service
from services.contracts import repository

INT8 = ("fashion", "face_detector", "face_animal_check", "faces")
CLASSIFIER = MODELS / "classifier"


def card(name: str, version: str) -> dict:
    return json.loads((CLASSIFIER / name / version / "model.json").read_text())


@pytest.mark.parametrize("name", INT8)
def test_each_int8_card_says_what_it_came_from_and_what_it_kept(name):
    float_card, int8 = card(name, "1"), card(name, "2")
    entry = repository.verify(name, CLASSIFIER / name / "2")  # sha256, contract files, the card's schema
    q = int8["quantization"]
    assert q["from_version"] == "1" and q["from_sha256"] == float_card["sha256"] != int8["sha256"]
    assert q["command"].startswith("python -m training quantize") and q["weights"] == "int8, per channel"
    assert q["speed"]["int8_ms"] < q["speed"]["float_ms"] and q["speed"]["speedup"] > 1
    assert int8["export"]["parity"]["passed"] and int8["contract"]["inputs"] == float_card["contract"]["inputs"]
    assert entry.path.stat().st_size < 20e6
    measured = q["measured"]
    if name == "fashion":
        assert float_card["metrics"]["test_accuracy"] - measured["int8_test_accuracy"] <= 0.003
        assert int8["metrics"]["test_accuracy"] == measured["int8_test_accuracy"] and measured["test_images"] == 10_000
        assert int8["contract"]["labels"] == float_card["contract"]["labels"]
        # the out-of-domain check and the teach threshold were fitted again on the int8 embeddings
        assert int8["contract"]["domain"]["sha256"] != float_card["contract"]["domain"]["sha256"]
        assert int8["metrics"]["domain"]["families"]["test split"]["flagged"] <= 0.02
        assert "quantize" in int8["metrics"]["teach_calibration"]["command"]
    elif name == "face_detector":
        assert measured["photos_with_another_face_count"] == {} and measured["box_iou_to_float_min"] >= 0.8
        assert measured["labelled_pair_errors_end_to_end"] == 0
    elif name == "face_animal_check":
        assert measured["decisions_changed"] == [] and measured["faces"] > 50
    else:
        assert measured["labelled_pair_errors"] == 0 and measured["distance_to_float_max"] <= 0.1
        verification = int8["metrics"]["verification"]
        assert verification["false_matches"] == verification["false_non_matches"] == 0


def test_the_int8_versions_pass_the_gate_against_float(tmp_path, monkeypatch):
    """Loaded beside the float versions (pinned) as an operator would load them: every gate check
    passes, each agreement on the stored probes."""
    from services.classifier.faces import KINDS
    from services.runtime import Runtime, Settings

    for key, value in {"MODELS_DIR": str(MODELS), "MODEL_CONTROL_DIR": str(tmp_path / "control"),
                       "MODEL_VERSIONS": ",".join(f"{n}=1" for n in INT8)}.items():
        monkeypatch.setenv(key, value)
    runtime = Runtime("classifier", KINDS, Settings.from_env("classifier"))
    assert runtime.wait(120), runtime.failure
    for name in INT8:
        assert runtime.models[name].version == "1"
        report = runtime.load_version(name, "2")["gate"]
        checks = {c["check"]: c for c in report["checks"]}
        assert report["passed"], (name, report)
        assert checks["agreement"]["agreement"] >= 0.9 and checks["agreement"]["against_version"] == "1", name


def test_a_default_service_serves_int8_and_float_stays_pinnable(tmp_path):
    faces = ROOT / "tests" / "fixtures" / "faces"
    photo = [("images", ("obama.jpg", (faces / "obama.jpg").read_bytes(), "image/jpeg"))]
    answers = {}
    for pins in ("", ",".join(f"{n}=1" for n in INT8)):
        env = {"MODEL_VERSIONS": pins, "TEACH_STORE": f"sqlite:///{tmp_path / f'taught{len(pins)}.db'}"}
        folder = tmp_path / ("pinned" if pins else "default")
        folder.mkdir()
        with running_service("classifier", folder, env=env) as server:
            info = requests.get(f"{server.url}/info", timeout=30).json()
            versions = {m["name"]: m["version"] for m in info["models"]}
            r = requests.post(f"{server.url}/check", files=photo, timeout=60)
            assert r.status_code == 200, r.text
            answers[pins or "default"] = (versions, r.json())
    served, _ = answers["default"]
    pinned, _ = answers[",".join(f"{n}=1" for n in INT8)]
    assert all(served[n] == "2" for n in INT8) and all(pinned[n] == "1" for n in INT8)
    (_, int8), (_, float_) = answers["default"], answers[",".join(f"{n}=1" for n in INT8)]
    a, b = int8["results"][0]["faces"][0], float_["results"][0]["faces"][0]
    assert int8["version"] == "2" and float_["version"] == "1"
    assert box_overlap(a["box"], b["box"]) > 0.8


def box_overlap(a, b) -> float:
    import numpy as np

    from services.contracts.face_geometry import box_iou

    return float(box_iou(np.array(a), np.array([b]))[0])


def test_the_command_quantizes_a_descriptor_and_a_dry_run_writes_nothing(tmp_path):
    """One network end to end (the descriptor: the quickest): a version 2 beside a copy of its
    float version, with a card the runtime accepts; int8 is always made from the float version."""
    models = tmp_path / "classifier"
    shutil.copytree(CLASSIFIER / "faces" / "1", models / "faces" / "1")
    run = subprocess.run([sys.executable, "-m", "training", "quantize", "--only", "faces", "--models-dir", str(models)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "faces" in run.stdout and "wrote" in run.stdout
    made = json.loads((models / "faces" / "2" / "model.json").read_text())
    repository.verify("faces", models / "faces" / "2")
    assert made["quantization"]["from_sha256"] == card("faces", "1")["sha256"]
    assert made["quantization"]["measured"]["labelled_pair_errors"] == 0
    assert not (models / "faces" / "2" / "examples.png").exists()  # the float version's picture stays with it
    # a second run quantizes version 1 again (never an int8 version) and writes version 3
    dry = subprocess.run([sys.executable, "-m", "training", "quantize", "--only", "faces", "--models-dir", str(models),
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0 and "int8 from version 1" in dry.stdout and not (models / "faces" / "3").exists()
