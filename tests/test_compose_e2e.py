"""End to end with real containers: build the image, bring the compose stack up, use it.

Builds from a local base image and an offline wheelhouse (tests/docker_stack.py), starts
docker-compose.yml on free loopback ports, waits for every container to be healthy, calls
the services, runs a short Locust run against them, restarts containers, and brings the
stack down with its volumes. Skips, saying why, only where Docker cannot be had.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from classifier_helpers import fashion_png
from conftest import ROOT, free_port
from docker_stack import Engine, DockerUnavailable, build_base_image, build_wheelhouse
from services.contracts.processes import SERVICES

pytestmark = pytest.mark.slow  # starts Docker engines and a compose stack: `pytest -m "not slow"` leaves it out

PROJECT = "onnxserving-e2e"
ADMIN = {"Authorization": "Bearer e2e-admin-key"}
# The services present in this checkout (each needs its module and its models).
NAMES = [s.name for s in SERVICES if s.module_file.exists() and (ROOT / "models" / s.name).is_dir()]


class Stack:
    def __init__(self, engine: Engine, ports: dict[str, int], project: str = PROJECT, files: tuple[str, ...] = (),
                 env: dict | None = None):
        self.engine, self.ports, self.project = engine, ports, project
        self.files = [arg for f in files for arg in ("-f", f)]
        self.env = {"BASE_IMAGE": "local/python:3.11", "PIP_INDEX_OPTIONS": "--no-index",
                    "IMAGE": "onnx-model-serving:e2e",
                    **{f"{name.upper().replace('-', '_')}_PORT": str(port) for name, port in ports.items()},
                    **(env or {})}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return self.engine.run("docker-compose", "-p", self.project, *self.files, *args, env=self.env, check=check,
                               timeout=timeout)

    def container(self, name: str) -> str:
        return self.compose("ps", "-q", name).stdout.strip()

    def inspect(self, name: str, template: str) -> str:
        return self.engine.run("docker", "inspect", "-f", template, self.container(name)).stdout.strip()

    def wait_healthy(self, names: list[str], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        status = {}
        while time.monotonic() < deadline:
            status = {name: self.inspect(name, "{{.State.Health.Status}}") for name in names}
            if all(s == "healthy" for s in status.values()):
                return
            time.sleep(2)
        logs = self.compose("logs", "--tail", "40", check=False).stdout
        raise AssertionError(f"not healthy after {timeout}s: {status}\n{logs[-4000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("docker")
    try:
        engine = Engine(workdir)
    except DockerUnavailable as why:
        pytest.skip(f"Docker end-to-end test skipped: {why}")
    stack = Stack(engine, {name: free_port() for name in ("policy", "generator", "classifier")},
                  env={"ADMIN_KEY": ADMIN["Authorization"].split()[1]})
    try:
        build_base_image(engine, workdir)
        build_wheelhouse()
        stack.compose("build", *NAMES)
        stack.compose("up", "-d", *NAMES)
        stack.wait_healthy(NAMES)
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)
        engine.stop()


def test_every_container_is_healthy_non_root_and_limited(stack):
    ps = stack.compose("ps").stdout
    for name in NAMES:
        assert stack.inspect(name, "{{.State.Health.Status}}") == "healthy"
        assert stack.inspect(name, "{{.Config.User}}") == "10001:10001"
        assert int(stack.inspect(name, "{{.HostConfig.Memory}}")) > 0, f"{name} has no memory limit"
        assert f"{PROJECT}_{name}_1" in ps
    image_packages = stack.engine.run("docker", "run", "--rm", "--entrypoint", "python3", "onnx-model-serving:e2e",
                                      "-m", "pip", "list", "--format=freeze").stdout
    assert "onnxruntime==1.31.1" in image_packages and "torch" not in image_packages


def test_policy_endpoints(stack):
    url = stack.url("policy")
    r = requests.post(f"{url}/act", json={"observations": [[0.0, 0.0, 0.05, 0.0]] * 3, "model": "cartpole"})
    assert r.status_code == 200 and len(r.json()["actions"]) == 3
    r = requests.post(f"{url}/act", json={"observations": [[0.0] * 8], "model": "lunarlander"})
    assert r.status_code == 200 and r.json()["actions"][0] in range(4)
    bad = requests.post(f"{url}/act", json={"observations": [[0.0] * 3], "model": "cartpole"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "observations[0]"
    info = requests.get(f"{url}/info").json()
    assert set(info["policies"]) >= {"cartpole", "lunarlander"}
    assert info["models"][0]["provider"] == "CPUExecutionProvider"
    assert "model_batch_size" in requests.get(f"{url}/metrics").text
    assert requests.get(f"{url}/readyz").status_code == 200


def test_a_new_policy_version_is_loaded_switched_and_kept_over_a_restart(stack):
    url, container = stack.url("policy"), stack.container("policy")
    # A new version folder arrives in the running container (in real use: a mounted repository).
    stack.engine.docker("cp", str(ROOT / "models" / "policy" / "cartpole" / "1"),
                        f"{container}:/app/models/policy/cartpole/2")
    r = requests.post(f"{url}/models/cartpole/versions/2/load", json={}, headers=ADMIN, timeout=120)
    assert r.status_code == 200 and r.json()["gate"]["passed"], r.text
    assert requests.post(f"{url}/models/cartpole/serve", json={"version": "2"}, headers=ADMIN,
                         timeout=30).json()["serving"] == "2"
    observation = {"observations": [[0.0, 0.0, 0.05, 0.0]], "model": "cartpole"}
    assert requests.post(f"{url}/act", json=observation, timeout=30).json()["version"] == "2"
    # The choice is recorded on /data (non-root can write it) and survives a restart.
    record = json.loads(stack.engine.docker("exec", container, "cat", "/data/model-control/policy/serving.json").stdout)
    assert record["models"]["cartpole"]["serving"] == "2"
    stack.compose("restart", "policy")
    stack.wait_healthy(["policy"])
    assert requests.post(f"{url}/act", json=observation, timeout=30).json()["version"] == "2"
    back = requests.post(f"{url}/models/cartpole/serve", json={"version": "1"}, headers=ADMIN, timeout=30)
    assert back.status_code == 200 and back.json()["serving"] == "1", back.text
    assert requests.post(f"{url}/act", json=observation, timeout=30).json()["version"] == "1"


def test_the_consoles_work_in_the_containers(stack, browser):
    from browser import text, wait_for

    browser.get(f"{stack.url('policy')}/ui")
    wait_for(browser, lambda d: d.find_elements("css selector", "#model option"), what="the policy console")
    browser.find_element("css selector", "#speed option[value='0']").click()
    browser.find_element("id", "run").click()
    wait_for(browser, lambda d: "limit" in text(d, "state") or "fell" in text(d, "state"), 120, "an episode")
    assert int(text(browser, "return")) >= 475
    if "generator" in NAMES:
        browser.get(f"{stack.url('generator')}/ui")
        wait_for(browser, lambda d: len(d.find_elements("css selector", "#grid img")) == 16, what="the generator grid")
    if "classifier" in NAMES:
        browser.get(f"{stack.url('classifier')}/ui")
        wait_for(browser, lambda d: d.find_elements("css selector", "#taught tr"), what="the classifier's taught list")
        assert text(browser, "status") == ""


def needs(name):
    return pytest.mark.skipif(name not in NAMES, reason=f"no {name} service or models in this checkout")


@needs("generator")
def test_generator_endpoints(stack):
    url = stack.url("generator")
    first = requests.post(f"{url}/generate", json={"n": 3, "seed": 42, "format": "json"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert len(body["images"]) == 3 and body["seeds"] == [42, 43, 44]
    grid = requests.post(f"{url}/generate", json={"n": 4, "seed": 42, "format": "png"})
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    assert grid.content.startswith(b"\x89PNG")
    frames = requests.post(f"{url}/interpolate", json={"seed_a": 1, "seed_b": 2, "steps": 5, "format": "json"})
    assert frames.status_code == 200 and len(frames.json()["frames"]) == 5
    bad = requests.post(f"{url}/generate", json={"n": 65})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "n"
    info = requests.get(f"{url}/info").json()
    assert info["models"][0]["name"] == "fashion" and info["limits"]["max_images"] == 64
    stack.compose("restart", "generator")
    stack.wait_healthy(["generator"])
    again = requests.post(f"{url}/generate", json={"n": 3, "seed": 42, "format": "json"}).json()
    assert again["images"] == body["images"], "the same seed gave other bytes after a restart"


FACES = Path(__file__).parent / "fixtures" / "faces"


@needs("classifier")
def test_classifier_endpoints_and_taught_state_survives_a_restart(stack):
    url = stack.url("classifier")
    shirt, boot = fashion_png(1), fashion_png(0)
    upload = [("images", ("a.png", shirt, "image/png")), ("images", ("b.png", boot, "image/png"))]
    r = requests.post(f"{url}/classify", files=upload, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    assert [len(p) for p in r.json()["predictions"]] == [2, 2]
    r = requests.post(f"{url}/embed", files=upload)
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 2
    fashion = {"model": "fashion"}
    taught = requests.post(f"{url}/teach", files=[("images", ("s.png", shirt, "image/png"))],
                           data={"name": "my-shirt", **fashion})
    assert taught.status_code == 200, taught.text
    check = requests.post(f"{url}/check", files=upload, data=fashion).json()["results"]
    assert check[0]["name"] == "my-shirt" and check[0]["matched"] is True
    assert requests.post(f"{url}/similar", files=[("images", ("s.png", shirt, "image/png"))],
                         data=fashion).status_code == 200
    bad = requests.post(f"{url}/classify", files=[("images", ("x.png", b"not an image", "image/png"))])
    assert 400 <= bad.status_code < 500 and bad.json()["error"]["field"]
    # faces, the default teach model: one photo taught, the person recognised in another
    face = requests.post(f"{url}/teach", files=[("images", ("o.jpg", FACES.joinpath("obama.jpg").read_bytes()))],
                         data={"name": "obama"})
    assert face.status_code == 200, face.text
    seen = requests.post(f"{url}/check", files=[("images", ("o2.jpg", FACES.joinpath("obama2.jpg").read_bytes()))])
    assert seen.json()["results"][0]["faces"][0]["name"] == "obama", seen.text

    stack.compose("restart", "classifier")
    stack.wait_healthy(["classifier"])
    names = requests.post(f"{url}/taught", json=fashion).json()["names"]
    assert {"name": "my-shirt", "examples": 1} in names, names
    assert {"name": "obama", "examples": 1} in requests.post(f"{url}/taught", json={}).json()["names"]
    assert requests.post(f"{url}/rename", json={"name": "my-shirt", "new_name": "shirt-1", **fashion}).status_code == 200
    exported = requests.post(f"{url}/state/export", json={})
    assert exported.status_code == 200 and "shirt-1" in json.dumps(exported.json())
    assert requests.post(f"{url}/forget", json={"name": "shirt-1", **fashion}).json()["forgotten"] == 1


@needs("classifier")
def test_postgres_variant_two_classifier_replicas_share_what_is_taught(stack):
    """docker-compose.postgres.yml: PostgreSQL with pgvector in its own container, two classifier
    replicas on it; teach through one, check through the other; both survive a database restart."""
    pg = Stack(stack.engine, {"classifier": free_port(), "classifier-2": free_port()}, project=f"{PROJECT}-pg",
               files=("docker-compose.yml", "docker-compose.postgres.yml"), env={"POSTGRES_PASSWORD": "e2e-secret"})
    names = ["postgres", "classifier", "classifier-2"]
    try:
        pg.compose("build", "postgres")
        pg.compose("up", "-d", *names)
        pg.wait_healthy(names)
        one, two = pg.url("classifier"), pg.url("classifier-2")
        store = requests.get(f"{two}/info").json()["teach"]["store"]
        assert (store["backend"], store["host"], store["search"]) == ("postgresql", "postgres",
                                                                      "pgvector exact (in the database)")
        shirt, fashion = [("images", ("s.png", fashion_png(1), "image/png"))], {"model": "fashion"}
        taught = requests.post(f"{one}/teach", files=shirt, data={"name": "shared-shirt", **fashion})
        assert taught.status_code == 200, taught.text
        seen = requests.post(f"{two}/check", files=shirt, data=fashion).json()["results"][0]  # the other replica, next request
        assert (seen["name"], seen["id"], seen["matched"]) == ("shared-shirt", taught.json()["ids"][0], True)

        pg.compose("restart", "postgres")  # the replicas reconnect by themselves
        pg.wait_healthy(["postgres"])
        deadline = time.monotonic() + 60
        while (r := requests.post(f"{two}/taught", json=fashion)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert {"name": "shared-shirt", "examples": 1} in r.json()["names"], r.text
        assert requests.post(f"{two}/forget", json={"name": "shared-shirt", **fashion}).json() == {"forgotten": 1}
        assert requests.post(f"{one}/check", files=shirt, data=fashion).json()["results"][0]["name"] is None
    finally:
        pg.compose("down", "-v", "--remove-orphans", check=False)


def test_short_locust_run_against_the_containers(stack, tmp_path):
    """The scenario runner with its SLO gate, against the containers: every service present."""
    scenario = "mixed" if len(NAMES) == 3 else "policy"
    urls = [arg for name in NAMES for arg in (f"--{name}-url", stack.url(name))]
    result = subprocess.run([sys.executable, "-m", "loadtests.run", scenario, "--users", "16", "--spawn-rate", "16",
                             "--duration", "8s", "--out", str(tmp_path), *urls],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / f"{scenario}_stats.csv"))}
    assert int(rows["Aggregated"]["Request Count"]) > 50 and int(rows["Aggregated"]["Failure Count"]) == 0
    for name, prefix in (("policy", "/act"), ("generator", "/generate"), ("classifier", "/classify")):
        if scenario == "mixed" and name in NAMES:
            assert any(row.startswith(prefix) for row in rows), f"no {prefix} requests in the run"


def test_a_restarted_container_comes_back_healthy(stack):
    stack.compose("restart", "policy")
    stack.wait_healthy(["policy"])
    r = requests.post(f"{stack.url('policy')}/act", json={"observations": [[0.0] * 4], "model": "cartpole"})
    assert r.status_code == 200


def test_the_gpu_override_is_valid_compose():
    """No NVIDIA runtime here: check the GPU variant's configuration, as the notes advise."""
    result = subprocess.run(["docker-compose", "-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml", "config"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "GENERATOR_GPU": "1"})
    if result.returncode != 0 and "not found" in result.stderr:
        pytest.skip("docker-compose is not installed")
    assert result.returncode == 0, result.stderr
    config = result.stdout
    assert config.count("driver: nvidia") == 3 and "onnxruntime-gpu[cuda,cudnn]==1.31.1" in config
    assert "- '1'" in config and "INFER_DEVICE: cuda" in config
