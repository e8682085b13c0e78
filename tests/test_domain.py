"""Honest answers from the clothing classifier: every answer says whether the image looks like
anything it knows (services/contracts/domain.py, fitted by `python -m training domain`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
import skimage.data
from PIL import Image

from classifier_helpers import Offline, encode, fashion_images, upload
from conftest import MODELS, ROOT, running_service
from services.contracts.domain import DomainCheck
from services.contracts import repository

VERSION_DIR = repository.version_dirs(MODELS / "classifier" / "fashion")[-1]  # the default: what serves
CARD = json.loads((VERSION_DIR / "model.json").read_text())


def strangers() -> dict[str, bytes]:
    """What the issue saw called clothing: a cat (scikit-image's chelsea), a person, noise, a digit."""
    rng = np.random.default_rng(0)
    digit = Image.fromarray(np.kron(np.eye(8, dtype=np.uint8)[::-1] * 255, np.ones((4, 4), np.uint8)))
    return {"cat.jpg": encode(Image.fromarray(skimage.data.chelsea()), "JPEG", quality=90),
            "astronaut.jpg": encode(Image.fromarray(skimage.data.astronaut()), "JPEG", quality=90),
            "obama.jpg": (ROOT / "tests" / "fixtures" / "faces" / "obama.jpg").read_bytes(),
            "noise.png": encode(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)), "PNG"),
            "stroke.png": encode(digit, "PNG")}


def clothes(n: int = 8) -> dict[str, bytes]:
    images, _ = fashion_images(n, start=100)
    return {f"test{100 + i}.png": encode(image, "PNG") for i, image in enumerate(images)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("domain")
    with running_service("classifier", tmp, env={"TEACH_STORE": f"sqlite:///{tmp / 't.db'}"}) as s:
        yield s


def test_the_card_records_the_measured_targets():
    domain, families = CARD["contract"]["domain"], CARD["metrics"]["domain"]["families"]
    assert domain["file"] == "domain.npz" and 0 < domain["threshold"] < 0.05
    assert families["test split"]["flagged"] <= 0.02
    outside = [f for f, row in families.items() if not row["in_domain"]]
    assert {"photos", "faces", "digits", "noise", "drawings"} <= set(outside)
    for family in outside:
        assert families[family]["flagged"] >= 0.95 and families[family]["auroc"] >= 0.99, family
    served = max(f for f in families if f.startswith("generator v"))
    assert families[served]["flagged"] <= 0.05  # the served generator's images count as clothing


def test_the_shipped_statistics_give_the_cards_figure_on_the_test_split():
    """Not typed in: the file the card names, run here on the test split, flags what the card says."""
    check = DomainCheck.from_bytes((VERSION_DIR / "domain.npz").read_bytes())
    images, _ = fashion_images(2000)
    _, embeddings = Offline(VERSION_DIR).run([encode(i, "PNG") for i in images])
    flagged = float((check.scores(embeddings) < CARD["contract"]["domain"]["threshold"]).mean())
    assert abs(flagged - CARD["metrics"]["domain"]["families"]["test split"]["flagged"]) < 0.01
    held = check.scores(np.zeros((1, embeddings.shape[1]), np.float32))
    assert held.shape == (1,) and 0 <= held[0] <= 1


def test_classify_says_not_clothing_for_a_cat_a_person_and_noise(server):
    files = clothes() | strangers()
    r = requests.post(f"{server.url}/classify", files=upload(files), data={"top_k": "1"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["in_domain"]) == len(body["domain_score"]) == len(body["predictions"]) == len(files)
    verdict = dict(zip(files, body["in_domain"]))
    assert not any(verdict[name] for name in strangers()), verdict
    assert sum(verdict[name] for name in clothes()) >= 7, verdict
    assert body["domain_threshold"] == CARD["contract"]["domain"]["threshold"]
    # The service's scores are the shipped statistics' scores of the served embedding.
    _, embeddings = Offline(VERSION_DIR).run(list(files.values()))
    expected = DomainCheck.from_bytes((VERSION_DIR / "domain.npz").read_bytes()).scores(embeddings)
    np.testing.assert_allclose(body["domain_score"], expected, atol=2e-4)


def flagged_share(server, images: list) -> float:
    files = [encode(i if i.mode in ("L", "RGB") else i.convert("RGB"), "PNG") for i in images]
    r = requests.post(f"{server.url}/classify", files=upload(files), data={"top_k": "1"}, timeout=120)
    assert r.status_code == 200, r.text
    return 1 - float(np.mean(r.json()["in_domain"]))


def test_each_family_through_the_served_classifier_is_flagged_as_the_card_says(server):
    """32 images of each family the card measured (the training command's own sets), served."""
    from training import domain

    seed = CARD["metrics"]["domain"]["seed"]
    families = {name: images for name, (_, images) in domain.out_of_domain(np.random.default_rng(seed + 2)).items()}
    photos, _ = domain.photos(np.random.default_rng(seed + 3))
    families["photos"] = photos[::40]
    card = CARD["metrics"]["domain"]["families"]
    for name, images in families.items():
        share = flagged_share(server, images[:32])
        assert share >= min(0.9, card[name]["flagged"] - 0.1), (name, share, card[name]["flagged"])
    test_images, _ = fashion_images(96, start=500)
    assert sum(flagged_share(server, test_images[i:i + 32]) for i in (0, 32, 64)) / 3 <= 0.06
    generator = domain.generated(32)
    served = max(generator, key=lambda name: int(name.split("v")[-1]))
    assert flagged_share(server, generator[served]) <= 0.1


def test_domain_threshold_overrides_the_card(tmp_path):
    env = {"TEACH_STORE": f"sqlite:///{tmp_path / 't.db'}", "DOMAIN_THRESHOLD": "1"}
    with running_service("classifier", tmp_path, env=env) as s:
        body = requests.post(f"{s.url}/classify", files=upload(clothes(2)), timeout=60).json()
        info = requests.get(f"{s.url}/info", timeout=30).json()
    assert body["in_domain"] == [False, False] and body["domain_threshold"] == 1.0
    assert info["limits_images"]["domain_threshold"] == 1.0
    fashion = next(m for m in info["models"] if m["name"] == "fashion")
    assert fashion["contract"]["domain"]["threshold"] == CARD["contract"]["domain"]["threshold"]
    assert fashion["metrics"]["domain"]["families"]["photos"]["flagged"] >= 0.95


def test_check_and_similar_say_it_too(server):
    shoe = clothes(1)
    r = requests.post(f"{server.url}/teach", files=upload(shoe), data={"name": "boot", "model": "fashion"}, timeout=60)
    assert r.status_code == 200, r.text
    cat = {"cat.jpg": strangers()["cat.jpg"]}
    r = requests.post(f"{server.url}/check", files=upload(shoe | cat), data={"model": "fashion"}, timeout=60)
    assert [(x["name"], x["in_domain"]) for x in r.json()["results"]] == [("boot", True), ("boot", False)], r.text
    r = requests.post(f"{server.url}/similar", files=upload(cat), data={"model": "fashion"}, timeout=60)
    assert r.json()["in_domain"] == [False] and r.json()["domain_score"][0] < r.json()["domain_threshold"]


def test_a_version_whose_statistics_do_not_match_their_sha256_is_refused(tmp_path):
    version = tmp_path / "classifier" / "fashion" / "1"
    shutil.copytree(VERSION_DIR, version)
    repository.verify("fashion", version)  # as shipped: fine
    data = bytearray((version / "domain.npz").read_bytes())
    data[-100] ^= 1
    (version / "domain.npz").write_bytes(bytes(data))
    with pytest.raises(repository.ModelLoadError, match="contract.domain.sha256"):
        repository.verify("fashion", version)
    card = json.loads((version / "model.json").read_text())
    card["contract"]["domain"]["file"] = "../../fashion/1/domain.npz"
    (version / "model.json").write_text(json.dumps(card))
    with pytest.raises(repository.ModelLoadError, match="not a path"):
        repository.verify("fashion", version)


def test_a_runtime_with_tampered_statistics_is_not_ready(tmp_path):
    from services.classifier.faces import KINDS
    from services.runtime import Runtime
    from services.runtime.config import Settings

    shutil.copytree(VERSION_DIR, tmp_path / "classifier" / "fashion" / "1")
    statistics = tmp_path / "classifier" / "fashion" / "1" / "domain.npz"
    statistics.write_bytes(statistics.read_bytes()[:-10])
    runtime = Runtime("classifier", KINDS, Settings(models_dir=tmp_path))
    assert runtime.wait(120) is False
    assert "contract.domain" in str(runtime.failure), runtime.failure


@pytest.mark.slow
def test_the_training_command_reproduces_the_shipped_check(tmp_path):
    version = tmp_path / "fashion" / "1"
    version.mkdir(parents=True)
    for name in ("model.onnx", "model.json"):
        shutil.copy(VERSION_DIR / name, version / name)
    seed = str(CARD["metrics"]["domain"]["seed"])
    run = subprocess.run([sys.executable, "-m", "training", "domain", str(version), "--seed", seed], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = json.loads((version / "model.json").read_text())
    assert ours["contract"]["domain"]["threshold"] == pytest.approx(CARD["contract"]["domain"]["threshold"], abs=0.002)
    for family, row in CARD["metrics"]["domain"]["families"].items():
        assert ours["metrics"]["domain"]["families"][family]["flagged"] == pytest.approx(row["flagged"], abs=0.01)
