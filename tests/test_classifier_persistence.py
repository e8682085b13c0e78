"""Taught state in a real database, through real `bentoml serve` processes: concurrent teach
loses nothing; an answered teach survives a restart and kill -9 of every process (SQLite, and
PostgreSQL with the database server killed too); two servers on one database see each other's
changes in their very next request; a legacy taught.json is imported once; whatever is
exported at the documented maximum imports back."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np
import pytest
import requests

from classifier_helpers import encode, fashion_images, upload
from conftest import running_service
from services.contracts import processes
from services.classifier import state
from test_classifier_service import MODELS_DIR, VERSION_DIR

IMAGES = [encode(i, "PNG") for i in fashion_images(26, start=1000)[0]]


def taught(server) -> dict:
    r = requests.post(f"{server.url}/taught", json={}, timeout=30)
    assert r.status_code == 200, r.text
    return {n["name"]: n["examples"] for n in r.json()["names"]}


def teach(server, name, files):
    r = requests.post(f"{server.url}/teach", files=upload(files), data={"name": name}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["ids"]


def check(server, files):
    r = requests.post(f"{server.url}/check", files=upload(files), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def env_for(store: str, **extra) -> dict:
    return {"MODELS_DIR": str(MODELS_DIR), "TEACH_STORE": store, "TEACH_MODEL": "fashion", **extra}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, postgres):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'taught.db'}"
    return postgres.create_database(f"t{uuid.uuid4().hex[:12]}")


def test_concurrent_teach_restart_and_kill_9_of_every_process(store, tmp_path, postgres):
    env = env_for(store, WORKERS="2")  # two worker processes share the database
    with running_service("classifier", tmp_path, env=env) as server:
        # 24 clients at once: 16 distinct names, and 8 more examples of one shared name.
        jobs = [(f"person {i}", IMAGES[i]) for i in range(16)] + [("shared", IMAGES[16 + i]) for i in range(8)]
        with ThreadPoolExecutor(24) as pool:
            ids = list(pool.map(lambda job: teach(server, job[0], [job[1]]), jobs))
        expected = {f"person {i}": 1 for i in range(16)} | {"shared": 8}
        assert taught(server) == expected
        assert len({i for group in ids for i in group}) == 24
    with running_service("classifier", tmp_path, env=env) as server:  # a graceful restart (SIGTERM)
        assert taught(server) == expected
        result = check(server, [IMAGES[3]])[0]
        assert (result["name"], result["matched"], result["id"]) == ("person 3", True, ids[3][0])
        teach(server, "after restart", [IMAGES[24]])  # answered: committed
        processes.crash(server.process)  # SIGKILL, workers included: no shutdown code runs
        if store.startswith("postgresql"):
            postgres.crash()  # the database server too, every backend with it
            postgres.start()
    with running_service("classifier", tmp_path, env=env) as server:
        assert taught(server) == expected | {"after restart": 1}
        assert check(server, [IMAGES[24]])[0]["name"] == "after restart"
    if store.startswith("sqlite"):
        leftovers = {p.name for p in (tmp_path / "state").iterdir()} - {"taught.db", "taught.db-wal", "taught.db-shm"}
        assert not leftovers, leftovers


@pytest.mark.parametrize("backend", ["sqlite", "postgresql-pgvector", "postgresql-numpy"])
def test_two_servers_on_one_database_see_each_others_changes_at_once(backend, tmp_path, postgres):
    if backend == "sqlite":
        store, search = f"sqlite:///{tmp_path / 'shared.db'}", "auto"
    else:
        store = postgres.create_database(f"t{uuid.uuid4().hex[:12]}")
        search = "auto" if backend.endswith("pgvector") else "off"
    env = env_for(store, TEACH_PGVECTOR=search)
    with ExitStack() as stack:
        a = stack.enter_context(running_service("classifier", tmp_path, env=env))
        b = stack.enter_context(running_service("classifier", tmp_path, env=env))
        expected = "pgvector" if store.startswith("postgresql") and search == "auto" else "numpy"
        assert requests.get(f"{b.url}/info", timeout=10).json()["teach"]["store"]["search"].startswith(expected)
        assert check(b, [IMAGES[0]])[0]["name"] is None  # b has searched (and cached) an empty state
        for round_ in range(3):
            name = f"replica {round_}"
            [taught_id] = teach(a, name, [IMAGES[round_]])
            seen = check(b, [IMAGES[round_]])[0]  # the very next request, on the other server
            assert (seen["name"], seen["id"], seen["matched"]) == (name, taught_id, True)
            assert taught(b)[name] == 1
            similar = requests.post(f"{b.url}/similar", files=upload([IMAGES[round_]]), timeout=30).json()
            assert similar["similar"][0][0]["id"] == taught_id
        assert requests.post(f"{b.url}/forget", json={"name": "replica 1"}, timeout=30).json() == {"forgotten": 1}
        assert check(a, [IMAGES[1]])[0]["name"] != "replica 1"
        assert requests.post(f"{a.url}/rename", json={"name": "replica 2", "new_name": "renamed"},
                             timeout=30).json()["renamed"] == 1
        assert check(b, [IMAGES[2]])[0]["name"] == "renamed"


def test_a_legacy_taught_json_is_imported_once_and_kept(tmp_path):
    """A taught.json written by the JSON-file store of the previous release."""
    with running_service("classifier", tmp_path, env=env_for(f"sqlite:///{tmp_path / 'first.db'}")) as server:
        ids = teach(server, "legacy shoe", [IMAGES[5], IMAGES[6]])
        exported = requests.post(f"{server.url}/state/export", json={}, timeout=30).json()
    legacy = tmp_path / "taught.json"
    legacy.write_text(json.dumps(exported))
    env = env_for(f"sqlite:///{tmp_path / 'new.db'}", TEACH_STATE_PATH=str(legacy))
    with running_service("classifier", tmp_path, env=env) as server:
        assert taught(server) == {"legacy shoe": 2}
        assert check(server, [IMAGES[5]])[0]["id"] == ids[0]
        requests.post(f"{server.url}/forget", json={"name": "legacy shoe"}, timeout=30)
    with running_service("classifier", tmp_path, env=env) as server:
        assert taught(server) == {}  # imported once: a forget is not undone by the next start
    assert json.loads(legacy.read_text()) == exported  # the file is left as it was


def test_a_broken_legacy_file_is_kept_and_the_service_says_why(tmp_path):
    legacy = tmp_path / "taught.json"
    legacy.write_text("{not json")
    env = env_for(f"sqlite:///{tmp_path / 'taught.db'}", TEACH_STATE_PATH=str(legacy))
    with running_service("classifier", tmp_path, env=env, wait=False) as server:
        deadline, info = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            try:
                info = requests.get(f"{server.url}/info", timeout=2).json()
                if info.get("teach") and "cannot be read" in info["teach"].get("error", ""):
                    break
            except (requests.ConnectionError, ValueError):
                pass
            time.sleep(0.5)
        assert "cannot be read" in info["teach"]["error"]
        assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 503
        r = requests.post(f"{server.url}/teach", files=upload([IMAGES[0]]), data={"name": "x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "state_unavailable"
    assert legacy.read_text() == "{not json"  # never overwritten


def test_an_unreachable_database_keeps_the_service_not_ready_until_it_is_there(tmp_path, postgres):
    name = f"t{uuid.uuid4().hex[:12]}"
    env = env_for(postgres.url(name))  # the database does not exist yet
    with running_service("classifier", tmp_path, env=env, wait=False) as server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                error = (requests.get(f"{server.url}/info", timeout=2).json().get("teach") or {}).get("error", "")
                if "cannot be opened" in error:
                    break
            except (requests.ConnectionError, ValueError):
                pass
            time.sleep(0.5)
        assert "cannot be opened" in error and "postgres" in error
        assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 503
        postgres.create_database(name)
        assert processes.wait_ready(server.url, server.process, 30)
        teach(server, "late", [IMAGES[0]])


def test_export_at_the_maximum_imports_back(tmp_path):
    """MAX_TAUGHT_EXAMPLES (default 10,000) examples of the shipped 1280-d model: the export
    fits the import limit, and imports back (replace) to the same state."""
    card = json.loads((VERSION_DIR / "model.json").read_text())
    dim = card["contract"]["outputs"][1]["shape"][1]
    vectors = np.random.default_rng(0).standard_normal((10_000, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    examples = [{"id": uuid.uuid4().hex, "name": f"item {i % 500}", "model": "fashion", "model_sha256": card["sha256"],
                 "embedding": state.pack(v), "source": f"photo-{i}.jpg", "taught": state.now()}
                for i, v in enumerate(vectors)]
    with running_service("classifier", tmp_path, env=env_for(f"sqlite:///{tmp_path / 'max.db'}")) as server:
        r = requests.post(f"{server.url}/state/import", json={"state": {"format": 1, "examples": examples}},
                          timeout=300)
        assert r.json() == {"imported": 10_000, "total": 10_000}
        exported = requests.post(f"{server.url}/state/export", json={}, timeout=300)
        body = json.dumps({"state": exported.json(), "mode": "replace"})
        limit = requests.get(f"{server.url}/info", timeout=10).json()["limits_images"]["max_import_bytes"]
        assert len(exported.content) > 64 * 1024 * 1024 and len(body) < limit  # over the upload limit, under import's
        r = requests.post(f"{server.url}/state/import", data=body, headers={"Content-Type": "application/json"},
                          timeout=300)
        assert r.json() == {"imported": 10_000, "total": 10_000}
        again = requests.post(f"{server.url}/state/export", json={}, timeout=300).json()
        assert again["examples"] == exported.json()["examples"]
        one_more = {"format": 1, "examples": [dict(examples[0], id=uuid.uuid4().hex)]}
        r = requests.post(f"{server.url}/state/import", json={"state": one_more}, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_examples"


def test_a_graceful_stop_closes_the_sqlite_store(tmp_path):
    """Stopped the usual way (SIGTERM / Ctrl-C), the classifier closes its store: the -wal and
    -shm files are folded back into the database and removed, and what was taught is kept."""
    folder = tmp_path / "state"
    env = env_for(f"sqlite:///{folder / 'taught.db'}")
    with running_service("classifier", tmp_path, env=env) as server:
        teach(server, "kept", [IMAGES[0]])
        assert (folder / "taught.db-wal").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["taught.db"]
    with running_service("classifier", tmp_path, env=env) as server:
        assert taught(server) == {"kept": 1}
