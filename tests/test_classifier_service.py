"""The classifier service over real HTTP, against a real `bentoml serve` with the shipped model."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from classifier_helpers import Offline, encode, fashion_images, upload, varied_files
from conftest import MODELS, error_of, running_service
from services.contracts.repository import version_dirs

MODELS_DIR = Path(os.environ.get("CLASSIFIER_TEST_MODELS_DIR", MODELS))  # to try a candidate repository
VERSION_DIR = version_dirs(MODELS_DIR / "classifier" / "fashion")[-1]  # what the service serves by default
LIMITS = {"MAX_IMAGES_PER_REQUEST": "10", "MAX_IMAGE_BYTES": "300000", "MAX_IMAGE_PIXELS": "4000000",
          "MAX_BODY_BYTES": "3000000", "MAX_TAUGHT_EXAMPLES": "40",
          "TEACH_MODEL": "fashion"}  # teach/check clothing here; tests/test_faces.py teaches faces


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    env = {"MODELS_DIR": str(MODELS_DIR), "TEACH_STORE": f"sqlite:///{tmp / 'taught.db'}", **LIMITS}
    with running_service("classifier", tmp, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def offline():
    return Offline(VERSION_DIR)


def post(server, route, files=None, data=None, **kwargs):
    return requests.post(f"{server.url}{route}", files=files, data=data, timeout=60, **kwargs)


def post_json(server, route, body):
    return requests.post(f"{server.url}{route}", json=body, timeout=60)


def png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def augmented(image: Image.Image) -> bytes:
    """Another 'photo' of the same thing: shifted, brighter, larger, JPEG."""
    moved = image.transform(image.size, Image.Transform.AFFINE, (1, 0, 1, 0, 1, -1))
    moved = moved.point(lambda v: min(255, int(v * 1.1))).resize((112, 112), Image.Resampling.BICUBIC)
    return encode(moved.convert("RGB"), "JPEG", quality=90)


def test_served_predictions_equal_offline_for_every_format(server, offline):
    files = varied_files()
    r = post(server, "/classify", upload(files), {"top_k": "10"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"]) == ("fashion", VERSION_DIR.name)
    expected = offline.probabilities(list(files.values()))
    labels = offline.card["contract"]["labels"]
    assert len(body["predictions"]) == len(files)
    for served, probs in zip(body["predictions"], expected):  # one list per image, in upload order
        order = np.argsort(-probs, kind="stable")
        assert [p["label"] for p in served] == [labels[j] for j in order]
        np.testing.assert_allclose([p["score"] for p in served], probs[order], atol=1e-5)


def test_default_top_k_and_the_model_knows_fashion(server):
    images, labels = fashion_images(8, start=100)
    body = post(server, "/classify", upload([png(i) for i in images])).json()
    names = [p[0]["label"] for p in body["predictions"]]
    assert all(len(p) == 5 for p in body["predictions"])
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert sum(n == classes[y] for n, y in zip(names, labels)) >= 6


def test_embeddings_equal_offline_and_are_unit_length(server, offline):
    files = [png(i) for i in fashion_images(3)[0]]
    body = post(server, "/embed", upload(files)).json()
    served = np.asarray(body["embeddings"])
    np.testing.assert_allclose(served, offline.run(files)[1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert body["dim"] == served.shape[1]


def test_teach_one_image_then_check_similar_rename_forget(server):
    images, labels = fashion_images(200)
    bag = images[int(np.flatnonzero(labels == 8)[0])]
    trouser = images[int(np.flatnonzero(labels == 1)[0])]
    r = post(server, "/teach", upload([png(bag)]), {"name": "my bag"})
    assert r.status_code == 200, r.text
    taught_id = r.json()["ids"][0]
    assert r.json() == {"name": "my bag", "ids": [taught_id], "examples": 1, "model": "fashion",
                        "version": VERSION_DIR.name}

    results = post(server, "/check", upload([augmented(bag), png(trouser)])).json()
    same, unrelated = results["results"]
    assert same["matched"] is True and same["name"] == "my bag" and same["id"] == taught_id
    assert same["confidence"] >= results["threshold"] > unrelated["confidence"]
    assert unrelated["matched"] is False

    nearest = post(server, "/similar", upload([augmented(bag)]), {"limit": "3"}).json()["similar"][0]
    assert nearest[0]["id"] == taught_id and nearest[0]["name"] == "my bag"

    assert {"name": "my bag", "examples": 1} in post_json(server, "/taught", {}).json()["names"]
    assert post_json(server, "/rename", {"name": "my bag", "new_name": "old bag"}).json()["renamed"] == 1
    assert post(server, "/check", upload([augmented(bag)])).json()["results"][0]["name"] == "old bag"
    assert post_json(server, "/forget", {"id": taught_id}).json() == {"forgotten": 1}
    assert "old bag" not in [n["name"] for n in post_json(server, "/taught", {}).json()["names"]]


def test_check_with_nothing_taught_matches_nothing(server):
    names = post_json(server, "/taught", {}).json()["names"]
    for entry in names:
        post_json(server, "/forget", {"name": entry["name"]})
    result = post(server, "/check", upload([png(fashion_images(1)[0][0])])).json()["results"][0]
    assert result.pop("in_domain") is True and result.pop("domain_score") > 0.1  # a Fashion-MNIST test image
    assert result == {"name": None, "id": None, "confidence": 0.0, "matched": False}


def test_state_export_and_import(server):
    image = png(fashion_images(1, start=5)[0][0])
    post(server, "/teach", upload([image, image]), {"name": "twice"})
    state = post_json(server, "/state/export", {}).json()
    assert len([e for e in state["examples"] if e["name"] == "twice"]) == 2
    assert post_json(server, "/forget", {"name": "twice"}).json() == {"forgotten": 2}
    broken = {"format": 1, "examples": [dict(state["examples"][0], embedding="AAAA")]}
    assert error_of(post_json(server, "/state/import", {"state": broken}), 400)["code"] == "invalid_state"
    assert post_json(server, "/state/import", {"state": state, "mode": "merge"}).json()["imported"] == 2
    assert {"name": "twice", "examples": 2} in post_json(server, "/taught", {}).json()["names"]
    assert post_json(server, "/state/import", {"state": state, "mode": "merge"}).json()["imported"] == 0  # same ids
    post_json(server, "/forget", {"name": "twice"})


def test_taught_examples_limit(server):
    total = post_json(server, "/taught", {}).json()["total"]
    image = png(fashion_images(1)[0][0])
    room = 40 - total
    while room > 0:
        n = min(room, 10)
        assert post(server, "/teach", upload([image] * n), {"name": "filler"}).status_code == 200
        room -= n
    error = error_of(post(server, "/teach", upload([image]), {"name": "one too many"}), 409)
    assert error["code"] == "too_many_examples" and "40" in error["message"]
    assert post_json(server, "/forget", {"name": "filler"}).status_code == 200


BOMB = encode(Image.new("1", (5000, 5000)), "PNG")  # about 30 kB that would decode to 25 megapixels
NOISE = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)), "PNG")
GOOD = encode(Image.new("L", (28, 28), 90), "PNG")


@pytest.mark.parametrize("route, files, data, status, code, field", [
    ("/classify", upload({"empty.png": b""}), None, 400, "empty_file", "images[0]"),
    ("/classify", upload({"ok.png": GOOD, "notes.txt": b"just text"}), None, 400, "not_an_image", "images[1]"),
    ("/classify", upload({"cut.png": GOOD[:50]}), None, 400, "corrupt_image", "images[0]"),
    ("/classify", upload({"bomb.png": BOMB}), None, 413, "decompression_bomb", "images[0]"),
    ("/classify", upload({"noise.png": NOISE}), None, 413, "file_too_large", "images[0]"),
    ("/classify", upload([GOOD] * 11), None, 400, "too_many_images", "images"),
    ("/classify", upload([GOOD] * 40), None, 400, "invalid_multipart", None),
    ("/classify", None, {"top_k": "3"}, 400, "no_images", "images"),
    ("/classify", None, {"images": "http://127.0.0.1/x.png"}, 400, "not_a_file", "images"),
    ("/classify", upload([GOOD]), {"top_k": "11"}, 400, "invalid_field", "top_k"),
    ("/classify", upload([GOOD]), {"top_k": "many"}, 400, "invalid_field", "top_k"),
    ("/classify", upload([GOOD]), {"colour": "red"}, 400, "unknown_field", "colour"),
    ("/classify", upload([GOOD]), {"model": "faces"}, 404, "model_not_found", "model"),
    ("/embed", upload({"cut.png": GOOD[:50]}), None, 400, "corrupt_image", "images[0]"),
    ("/check", upload({"empty.png": b""}), None, 400, "empty_file", "images[0]"),
    ("/similar", upload([GOOD]), {"limit": "0"}, 400, "invalid_field", "limit"),
    ("/teach", upload([GOOD]), None, 400, "invalid_name", "name"),
    ("/teach", upload([GOOD]), {"name": ""}, 400, "invalid_name", "name"),
    ("/teach", upload([GOOD]), {"name": "x" * 65}, 400, "invalid_name", "name"),
    ("/teach", upload([GOOD]), {"name": "../etc/passwd"}, 400, "invalid_name", "name"),
    ("/teach", upload([GOOD]), {"name": "<script>"}, 400, "invalid_name", "name"),
    ("/teach", upload([GOOD]), {"name": " padded"}, 400, "invalid_name", "name"),
    ("/teach", upload({"ok.png": GOOD, "bad.png": b"nope"}), {"name": "half"}, 400, "not_an_image", "images[1]"),
])
def test_bad_input_gets_a_named_4xx_and_nothing_stored_is_lost(server, route, files, data, status, code, field):
    before = post_json(server, "/taught", {}).json()
    error = error_of(post(server, route, files, data), status)
    assert (error["code"], error["field"]) == (code, field)
    assert post_json(server, "/taught", {}).json() == before
    assert post(server, "/classify", upload([GOOD])).status_code == 200


def test_body_limit_and_wrong_media_type(server):
    big = [("images", (f"{i}.png", NOISE[:290_000], "image/png")) for i in range(11)]
    assert error_of(post(server, "/classify", big), 413)["code"] == "body_too_large"
    r = requests.post(f"{server.url}/classify", json={"images": ["x"]}, timeout=30)
    assert error_of(r, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("route, body, status, code", [
    ("/forget", {}, 400, "name_or_id"),
    ("/forget", {"name": "a", "id": "b"}, 400, "name_or_id"),
    ("/forget", {"name": "nobody"}, 404, "not_taught"),
    ("/rename", {"name": "nobody", "new_name": "somebody"}, 404, "not_taught"),
    ("/rename", {"new_name": "x"}, 400, "name_or_id"),
    ("/state/import", {"state": {"format": 2, "examples": []}}, 400, "invalid_state"),
    ("/state/import", {"state": {"format": 1, "examples": []}, "mode": "append"}, 400, "invalid_field"),
])
def test_bad_json_requests(server, route, body, status, code):
    assert error_of(post_json(server, route, body), status)["code"] == code


def test_rename_validates_the_new_name(server):
    post(server, "/teach", upload([GOOD]), {"name": "temp"})
    assert error_of(post_json(server, "/rename", {"name": "temp", "new_name": "a/b"}), 400)["field"] == "new_name"
    post_json(server, "/forget", {"name": "temp"})


def test_many_concurrent_clients_are_answered_correctly_and_batched(server, offline):
    def batch_metric():
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        pattern = r'^model_batch_size_(sum|count)\{model="fashion",service="classifier"\} (\S+)$'
        return {m[0]: float(m[1]) for m in re.findall(pattern, text, re.M)}

    images, _ = fashion_images(48, start=300)
    requests_ = [[png(images[(i + j) % 48]) for j in range(1 + i % 3)] for i in range(96)]
    before = batch_metric()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda files: post(server, "/classify", upload(files), {"top_k": "1"}), requests_))
    labels = offline.card["contract"]["labels"]
    for files, answer in zip(requests_, answers):
        assert answer.status_code == 200, answer.text
        expected = offline.probabilities(files)
        assert [p[0]["label"] for p in answer.json()["predictions"]] == [labels[j] for j in expected.argmax(1)]
        np.testing.assert_allclose([p[0]["score"] for p in answer.json()["predictions"]], expected.max(1), atol=1e-5)
    after = batch_metric()
    assert after["sum"] - before.get("sum", 0) == sum(len(f) for f in requests_)
    assert after["count"] - before.get("count", 0) < len(requests_), "no two requests ever shared a batch"
