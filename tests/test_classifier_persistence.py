"""Taught state on disk: concurrent teach loses nothing; it survives a restart and a kill -9."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from classifier_helpers import encode, fashion_images, upload
from conftest import running_service
from services import launch
from test_classifier_service import MODELS_DIR


def taught(server) -> dict:
    return {n["name"]: n["examples"] for n in requests.post(f"{server.url}/taught", json={}, timeout=30).json()["names"]}


def teach(server, name, files):
    r = requests.post(f"{server.url}/teach", files=upload(files), data={"name": name}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["ids"]


def check(server, files):
    return requests.post(f"{server.url}/check", files=upload(files), timeout=60).json()["results"]


def test_state_survives_restart_and_kill_9_and_concurrent_teach_loses_nothing(tmp_path):
    state_path = tmp_path / "state" / "taught.json"
    env = {"MODELS_DIR": str(MODELS_DIR), "TEACH_STATE_PATH": str(state_path)}
    images = [encode(i, "PNG") for i in fashion_images(25, start=1000)[0]]

    with running_service("classifier", tmp_path, env=env) as server:
        # 24 clients at once: 16 distinct names, and 8 more examples of one shared name.
        jobs = [(f"person {i}", images[i]) for i in range(16)] + [("shared", images[16 + i]) for i in range(8)]
        with ThreadPoolExecutor(24) as pool:
            ids = list(pool.map(lambda job: teach(server, job[0], [job[1]]), jobs))
        expected = {f"person {i}": 1 for i in range(16)} | {"shared": 8}
        assert taught(server) == expected
        assert len({i for group in ids for i in group}) == 24
    # A graceful restart (SIGTERM).
    with running_service("classifier", tmp_path, env=env) as server:
        assert taught(server) == expected
        result = check(server, [images[3]])[0]
        assert (result["name"], result["matched"], result["id"]) == ("person 3", True, ids[3][0])
        teach(server, "after restart", [images[24]])
        launch.crash(server.process)  # SIGKILL, workers included: no shutdown code runs
    on_disk = json.loads(state_path.read_text())  # a complete, valid file: written atomically
    assert len(on_disk["examples"]) == 25
    assert not [p for p in state_path.parent.iterdir() if p.name != state_path.name], "temporary files left behind"
    with running_service("classifier", tmp_path, env=env) as server:
        assert taught(server) == expected | {"after restart": 1}
        assert check(server, [images[24]])[0]["name"] == "after restart"


def test_a_broken_state_file_is_kept_and_the_service_says_why(tmp_path):
    state_path = tmp_path / "taught.json"
    state_path.write_text("{not json")
    env = {"MODELS_DIR": str(MODELS_DIR), "TEACH_STATE_PATH": str(state_path)}
    with running_service("classifier", tmp_path, env=env, wait=False) as server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                info = requests.get(f"{server.url}/info", timeout=2).json()
                break
            except (requests.ConnectionError, ValueError):
                time.sleep(0.5)
        assert "cannot be read" in info["teach"]["error"]
        assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 503
        r = requests.post(f"{server.url}/teach", files=upload([encode(fashion_images(1)[0][0], "PNG")]),
                          data={"name": "x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "state_unavailable"
    assert state_path.read_text() == "{not json"  # never overwritten
