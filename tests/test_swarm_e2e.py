"""End to end on a real two-node Docker Swarm: deploy/stack.yml, rolled and with a node lost.

tests/swarm.py builds the cluster on this machine (two dockerds, each in its own network
namespace, joined through a bridge; a third namespace for the clients). One cluster serves every
test of this module. The image is built on node 1 from the debootstrap base and the offline
wheelhouse (tests/docker_stack.py; the base rootfs is shared with the compose test within a
session) and copied to node 2 with `docker save | docker load`. Skips, saying why, only where the
cluster cannot be built (not root, a tool missing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from classifier_helpers import fashion_png
from docker_stack import build_base_image, build_wheelhouse
from swarm import Cluster, SwarmUnavailable, log

pytestmark = pytest.mark.slow  # starts a two-node Docker Swarm: `pytest -m "not slow"` leaves it out

ROOT = Path(__file__).resolve().parent.parent
STACK = "onnx"
IMAGE = "onnx-model-serving:swarm"
IMAGE_V2 = "onnx-model-serving:swarm-v2"  # the same image under a second tag: a new spec to roll out
POSTGRES_IMAGE = "onnx-model-serving-postgres:16"
PORTS = {"policy": 3001, "generator": 3002, "classifier": 3003}
EXPECTED = {**{f"{STACK}_{name}": 2 for name in PORTS}, f"{STACK}_postgres": 1}
ENV = {"IMAGE": IMAGE, "POSTGRES_IMAGE": POSTGRES_IMAGE, "POSTGRES_PASSWORD": "swarm-e2e-secret", "API_KEY": ""}
TIMINGS: dict[str, float] = {}


def build_images(cluster: Cluster, workdir: Path) -> None:
    node1, node2 = cluster.nodes
    mark = time.monotonic()

    def step(what: str) -> None:
        nonlocal mark
        log(f"{what} in {time.monotonic() - mark:.0f}s")
        mark = time.monotonic()

    build_wheelhouse()
    step("wheelhouse ready")
    base = build_base_image(node1, workdir)  # debootstrap once a session, then an import
    step(f"base image {base} on node1")
    args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", "PIP_INDEX_OPTIONS=--no-index"]
    # --network none: the builds are offline, and these engines have no default bridge anyway.
    node1.docker("build", "--network", "none", "-q", "-t", IMAGE, *args, ".", env={"DOCKER_BUILDKIT": "0"},
                 timeout=900)
    step(f"{IMAGE} built on node1")
    node1.docker("build", "--network", "none", "-q", "-t", POSTGRES_IMAGE, "-f", "deploy/postgres/Dockerfile",
                 *args, ".", env={"DOCKER_BUILDKIT": "0"}, timeout=600)
    step(f"{POSTGRES_IMAGE} built on node1")
    cluster.copy_images(node1, node2, IMAGE)  # postgres runs on node 1 only (its label)
    for node in cluster.nodes:
        node.docker("tag", IMAGE, IMAGE_V2)
    step(f"{IMAGE} copied to node2 (docker save | docker load)")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    started = time.monotonic()
    try:
        cluster = Cluster()
    except SwarmUnavailable as why:
        pytest.skip(f"Docker Swarm end-to-end test skipped: {why}")
    try:
        cluster.start()
        TIMINGS["cluster up"] = time.monotonic() - started
        mark = time.monotonic()
        build_images(cluster, tmp_path_factory.mktemp("swarm-build"))
        TIMINGS["image build + copy"] = time.monotonic() - mark
        log(f"images built on node1 and loaded on node2 in {TIMINGS['image build + copy']:.0f}s")
        node1_id = next(i for i, name in cluster.node_ids().items() if name == "node1")
        cluster.manager.docker("node", "update", "--label-add", "postgres=true", node1_id)
        cluster.deploy(STACK, ROOT / "deploy" / "stack.yml", ENV)
        TIMINGS["converge"] = cluster.wait_converged(EXPECTED)
        log(f"stack converged in {TIMINGS['converge']:.0f}s")
        yield cluster
    finally:
        cluster.close()
        leftovers = cluster.leftovers()
        TIMINGS["whole module"] = time.monotonic() - started
        log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items()))
        assert not leftovers, f"the swarm left things behind: {leftovers}"


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # no proxies: the nodes' addresses exist only in the namespaces
    return s


def test_every_service_converges_spread_over_both_nodes(swarm):
    assert swarm.replicas() == {name: f"{n}/{n}" for name, n in EXPECTED.items()}
    for name in PORTS:
        tasks = swarm.tasks(f"{STACK}_{name}")
        assert sorted(t["node"] for t in tasks) == ["node1", "node2"], tasks
        assert all(t["state"].startswith("Running") for t in tasks), tasks
    postgres = swarm.tasks(f"{STACK}_postgres")
    assert [t["node"] for t in postgres] == ["node1"], postgres  # the labelled node
    spec = json.loads(swarm.manager.docker("service", "inspect", f"{STACK}_policy").stdout)[0]["Spec"]
    assert spec["EndpointSpec"]["Mode"] == "dnsrr"
    assert spec["UpdateConfig"]["Parallelism"] == 1 and spec["UpdateConfig"]["FailureAction"] == "rollback"
    assert spec["TaskTemplate"]["Placement"]["MaxReplicas"] == 1
    assert spec["TaskTemplate"]["Resources"]["Limits"]["MemoryBytes"] > 0


def test_every_service_answers_through_each_node(swarm):
    png = fashion_png(0)
    with swarm.client(), session() as http:
        for node in swarm.nodes:
            act = http.post(f"{swarm.url(node, 3001)}/act", timeout=30,
                            json={"observations": [[0, 0, 0.05, 0]], "model": "cartpole"})
            assert act.status_code == 200 and act.json()["actions"][0] in (0, 1), act.text
            generated = http.post(f"{swarm.url(node, 3002)}/generate", json={"n": 1, "seed": 1, "format": "json"},
                                  timeout=30)
            assert generated.status_code == 200 and len(generated.json()["images"]) == 1, generated.text
            classified = http.post(f"{swarm.url(node, 3003)}/classify", files=[("images", ("x.png", png, "image/png"))],
                                   timeout=30)
            assert classified.status_code == 200 and len(classified.json()["predictions"]) == 1, classified.text
            log(f"{node.name} ({node.address}): /act /generate /classify answered")
        first = http.post(f"{swarm.url(swarm.nodes[0], 3002)}/generate", json={"n": 1, "seed": 1, "format": "json"})
        second = http.post(f"{swarm.url(swarm.nodes[1], 3002)}/generate", json={"n": 1, "seed": 1, "format": "json"})
        assert first.json()["images"] == second.json()["images"], "two replicas drew different images for one seed"


def test_a_name_taught_on_node1_is_matched_on_node2(swarm):
    shirt = [("images", ("s.png", fashion_png(1), "image/png"))]
    fashion = {"model": "fashion"}
    one, two = (swarm.url(node, 3003) for node in swarm.nodes)
    with swarm.client(), session() as http:
        store = http.get(f"{two}/info", timeout=10).json()["teach"]["store"]
        assert (store["backend"], store["host"]) == ("postgresql", "postgres"), store
        taught = http.post(f"{one}/teach", files=shirt, data={"name": "swarm-shirt", **fashion}, timeout=30)
        assert taught.status_code == 200, taught.text
        seen = http.post(f"{two}/check", files=shirt, data=fashion, timeout=30)
        assert seen.status_code == 200, seen.text
        result = seen.json()["results"][0]
        assert (result["name"], result["matched"]) == ("swarm-shirt", True), result
        assert result["id"] == taught.json()["ids"][0]
    log("taught through node1's replica, matched by node2's")


def test_a_rolling_update_fails_no_request(swarm, tmp_path):
    """The policy service rolled to a second tag while a client sends /act the whole time.

    The client (tests/swarm.py client_main) balances over both nodes' published port like a
    health-checked load balancer: only backends whose GET /readyz answers 200 are in rotation, and
    a connection-level error retries on the other node. A failure is any request that does not end
    in HTTP 200 with a well-formed answer (see client_main). Zero failures are required.
    """
    service = f"{STACK}_policy"
    stop, out = tmp_path / "stop", tmp_path / "client.json"
    backends = ",".join(f"{node.address}:3001" for node in swarm.nodes)
    client = swarm.client_process("--backends", backends, "--stop-file", str(stop), "--out", str(out))
    try:
        time.sleep(3)
        assert client.poll() is None, "the client stopped early"
        started = time.monotonic()
        swarm.manager.docker("service", "update", "--detach", "--no-resolve-image", "--image", IMAGE_V2, service)
        state, last = "", None
        while state != "completed":
            state = swarm.manager.docker("service", "inspect", "-f",
                                         "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", service).stdout.strip()
            if state != last:
                log(f"rolling update of {service}: {state or 'starting'} after {time.monotonic() - started:.0f}s")
                last = state
            assert state not in ("paused", "rollback_started", "rollback_completed", "rollback_paused"), \
                swarm.manager.docker("service", "ps", "--no-trunc", service).stdout
            assert time.monotonic() - started < 300, f"update not completed after 300s: {state}"
            time.sleep(1)
        TIMINGS["rolling update"] = time.monotonic() - started
        time.sleep(3)
    finally:
        stop.touch()
        client.wait(60)
    stats = json.loads(out.read_text())
    log(f"client during the update: {json.dumps({k: v for k, v in stats.items() if k != 'events'})}")
    for event in stats["events"]:
        log(f"  {event}")
    assert stats["failed"] == 0, stats["failures"]
    assert stats["ok"] > 100 and all(count > 0 for count in stats["per_backend"].values()), stats
    tasks = swarm.tasks(service)
    assert sorted(t["node"] for t in tasks) == ["node1", "node2"], tasks
    assert all(t["image"].startswith(IMAGE_V2) and t["state"].startswith("Running") for t in tasks), tasks
    # both replicas really were replaced under the client: each node left rotation and came back
    for node in swarm.nodes:
        assert any(f"{node.address}:3001 out of rotation" in e for e in stats["events"]), stats["events"]


def test_losing_a_node_leaves_the_stack_serving_from_the_other(swarm):
    node1, node2 = swarm.nodes
    node2.stop()  # its dockerd: node 2's containers stop with it
    log("node2's dockerd stopped")
    png = fashion_png(1)
    with swarm.client(), session() as http:
        with pytest.raises(requests.ConnectionError):
            http.post(f"{swarm.url(node2, 3001)}/act", json={"observations": [[0, 0, 0.05, 0]], "model": "cartpole"},
                      timeout=5)
        for _ in range(5):
            act = http.post(f"{swarm.url(node1, 3001)}/act", json={"observations": [[0, 0, 0.05, 0]],
                                                                   "model": "cartpole"}, timeout=10)
            assert act.status_code == 200, act.text
        generated = http.post(f"{swarm.url(node1, 3002)}/generate", json={"n": 1, "seed": 1, "format": "json"},
                              timeout=30)
        assert generated.status_code == 200, generated.text
        checked = http.post(f"{swarm.url(node1, 3003)}/check", files=[("images", ("s.png", png, "image/png"))],
                            data={"model": "fashion"}, timeout=30)
        assert checked.status_code == 200 and checked.json()["results"][0]["name"] == "swarm-shirt", checked.text
    deadline = time.monotonic() + 60
    while (status := swarm.manager.docker("node", "ls", "--format", "{{.Status}}").stdout.split()) != ["Ready", "Down"] \
            and sorted(status) != ["Down", "Ready"]:
        assert time.monotonic() < deadline, f"the manager did not see node2 down: {status}"
        time.sleep(1)
    log("the manager sees node2 down; node1 still serves /act /generate /check")
