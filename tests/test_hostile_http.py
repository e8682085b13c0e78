"""The shared HTTP layer probed as an attacker would (hardening round 3), over real servers
with default settings: DNS rebinding, headers browsers rely on, metric series an attacker
could multiply, idle sockets, hostile .npy bodies and camera frames of extreme shape.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from classifier_helpers import encode, fashion_images, upload
from conftest import ROOT, error_of, running_service
from services.contracts.pixels import FRAME_SHAPE, FRAMES

NPY = "application/x-npy"
OBSERVATIONS = np.array([[0.01, 0.02, 0.03, 0.04], [0.1, 0.2, -0.3, 0.4], [-1, 0.5, 0.1, -0.2]], np.float32)


def port_of(server) -> int:
    return urlsplit(server.url).port


# DNS rebinding ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rebinding")
    with running_service("classifier", tmp, env={"TEACH_STORE": f"sqlite:///{tmp / 'taught.db'}"}) as server:
        yield server


def taught(server) -> dict:
    r = requests.post(f"{server.url}/taught", json={"model": "fashion"}, timeout=30)
    return {n["name"]: n["examples"] for n in r.json()["names"]}


def test_a_rebound_page_cannot_replace_taught_state_by_default(classifier):
    """What a page at http://evil.example:PORT sends once evil.example resolves to 127.0.0.1:
    its own name as Host and as Origin (so the same-origin check alone would pass it)."""
    images, _ = fashion_images(1)
    r = requests.post(f"{classifier.url}/teach", files=upload([encode(images[0], "PNG")]),
                      data={"name": "ankle boot", "model": "fashion"}, timeout=60)
    assert r.status_code == 200, r.text
    port = port_of(classifier)
    empty = {"state": {"format": 1, "examples": []}, "mode": "replace"}
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}", f"127.0.0.1.nip.io:{port}"):
        rebound = requests.post(f"{classifier.url}/state/import", json=empty, timeout=30,
                                headers={"Host": host, "Origin": f"http://{host}"})
        error = error_of(rebound, 400)
        assert (error["code"], error["field"]) == ("invalid_host", "Host"), host
        assert "ALLOWED_HOSTS" in error["message"]
    assert taught(classifier) == {"ankle boot": 1}  # nothing replaced
    # Loopback names and IP literals (no DNS, so no rebinding) are served as before.
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"console.localhost:{port}"):
        r = requests.post(f"{classifier.url}/taught", json={}, headers={"Host": host}, timeout=30)
        assert r.status_code == 200, (host, r.text)
    assert requests.get(f"{classifier.url}/readyz", headers={"Host": "evil.example"}, timeout=10).status_code == 200


def test_an_allowed_hosts_list_still_decides(tmp_path):
    env = {"ALLOWED_HOSTS": "serving.example,.internal"}
    with running_service("policy", tmp_path, env=env) as server:
        act = {"observations": OBSERVATIONS.tolist(), "model": "cartpole"}
        for host, status in (("serving.example", 200), ("a.b.internal:80", 200), ("localhost", 400),
                             ("evil.example", 400), ("127.0.0.1", 200)):
            r = requests.post(f"{server.url}/act", json=act, headers={"Host": host}, timeout=30)
            assert r.status_code == status, (host, r.text)


def test_the_deployments_name_the_hosts_they_serve():
    """Containers see the host's browser arrive from the Docker network, not from loopback: the
    unset default would take any name there, so each deployment lists the names it answers to."""
    compose = (ROOT / "docker-compose.yml").read_text() + (ROOT / "docker-compose.postgres.yml").read_text()
    stack = (ROOT / "deploy" / "stack.yml").read_text()
    for text in (compose, stack):
        defaults = re.findall(r"ALLOWED_HOSTS: \$\{ALLOWED_HOSTS:-([^}]*)\}", text)
        assert defaults and all({"localhost", "policy", "generator", "classifier"} <= set(d.split(","))
                                for d in defaults), defaults
    settings = (ROOT / "deploy" / "kubernetes" / "base" / "settings.env").read_text()
    hosts = re.search(r"^ALLOWED_HOSTS=(.*)$", settings, re.M).group(1).split(",")
    assert {"localhost", "policy", "generator", "classifier", ".svc.cluster.local"} <= set(hosts)


# Headers browsers rely on ----------------------------------------------------------------------

def test_json_answers_say_nosniff_and_every_page_has_a_csp(policy_server):
    url = policy_server.url
    answers = {
        "act": requests.post(f"{url}/act", json={"observations": OBSERVATIONS.tolist(), "model": "cartpole"},
                             timeout=30),
        "act error": requests.post(f"{url}/act", json={"observations": "x"}, timeout=30),
        "unknown path": requests.get(f"{url}/nope", timeout=30),
        "info": requests.get(f"{url}/info", timeout=30),
        "docs.json": requests.get(f"{url}/docs.json", timeout=30),
        "readyz": requests.get(f"{url}/readyz", timeout=30),
        "admin off": requests.post(f"{url}/models/cartpole/serve", json={"version": "1"}, timeout=30),
        "wrong host": requests.get(f"{url}/info", headers={"Host": "evil.example"}, timeout=30),
    }
    for what, r in answers.items():
        assert r.headers.get("x-content-type-options") == "nosniff", (what, r.status_code, dict(r.headers))
    pages = 0
    for path in ("/", "/ui", "/ui/", "/docs", "/ui/nope.html", "/static_content/index.css"):
        r = requests.get(f"{url}{path}", timeout=30)
        if r.headers.get("content-type", "").startswith("text/html"):
            pages += 1
            policy = r.headers.get("content-security-policy", "")
            assert "default-src" in policy, (path, dict(r.headers))
    assert pages >= 2  # the docs page and the console at least


def test_console_scripts_never_write_data_as_html():
    """The consoles put every answer on the page with textContent and DOM nodes; a name or a
    file name holding markup is shown as text. (Taught names cannot hold < > anyway.)"""
    for script in (ROOT / "services" / "consoles").glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in source, (script.name, sink)


def test_a_name_holding_markup_is_refused(classifier):
    images, _ = fashion_images(1)
    r = requests.post(f"{classifier.url}/teach", files=upload([encode(images[0], "PNG")]),
                      data={"name": "<img src=x onerror=alert(1)>", "model": "fashion"}, timeout=60)
    assert error_of(r, 400)["code"] == "invalid_name"


# Metric series ---------------------------------------------------------------------------------

def series(server) -> set[str]:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def hostile_requests(server, i: int) -> None:
    url = server.url
    act = {"observations": OBSERVATIONS.tolist()}
    requests.post(f"{url}/act", json={**act, "model": f"model-{i}"}, timeout=30)
    requests.post(f"{url}/act", json={**act, "model": "cartpole", "version": str(900 + i)}, timeout=30)
    requests.post(f"{url}/act?model=m{i}&version={i}", data=b"x", headers={"Content-Type": NPY}, timeout=30)
    requests.get(f"{url}/nope-{i}", timeout=30)
    requests.post(f"{url}/nope/{i}", json={}, timeout=30)
    requests.request("PATCH", f"{url}/act-{i}", timeout=30)
    requests.post(f"{url}/models/m{i}/versions/{i}/load", timeout=30)
    requests.get(f"{url}/info?x={i}", headers={"Host": f"h{i}.example"}, timeout=30)


def test_unknown_models_versions_and_paths_make_no_new_series(policy_server):
    hostile_requests(policy_server, 0)  # each kind of refusal once: its error series exists now
    before = series(policy_server)
    for i in range(1, 40):
        hostile_requests(policy_server, i)
    after = series(policy_server)
    assert after == before, sorted(after - before)[:20]
    assert not any("model-1" in s or "nope-1" in s or "h1.example" in s for s in after)


# Idle connections ------------------------------------------------------------------------------

def test_300_idle_sockets_do_not_stop_a_fresh_client(policy_server):
    url = urlsplit(policy_server.url)
    idle = []
    try:
        for i in range(300):
            sock = socket.create_connection((url.hostname, url.port), timeout=10)
            if i % 2:  # half of them start a request and stop (slowloris), half say nothing
                sock.sendall(b"POST /act HTTP/1.1\r\nHost: localhost\r\nContent-Le")
            idle.append(sock)
        time.sleep(0.5)
        for _ in range(3):
            started = time.monotonic()
            r = requests.post(f"{policy_server.url}/act", json={"observations": OBSERVATIONS.tolist(),
                                                               "model": "cartpole"}, timeout=10)
            took = time.monotonic() - started
            assert r.status_code == 200 and took < 1.0, (r.status_code, took)
    finally:
        for sock in idle:
            sock.close()


# .npy bodies -----------------------------------------------------------------------------------

def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def npy_header(header: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy file with this header text, padded as numpy pads it."""
    text = header.encode("latin-1") + b" "
    text += b" " * ((-(10 + len(text) + 1)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def npy_act(server, body: bytes) -> requests.Response:
    return requests.post(f"{server.url}/act?model=cartpole", data=body, headers={"Content-Type": NPY}, timeout=30)


def test_npy_in_any_byte_order_layout_and_float_width(policy_server):
    expected = npy_act(policy_server, npy(OBSERVATIONS)).json()["actions"]
    for array in (np.asfortranarray(OBSERVATIONS), OBSERVATIONS.astype(">f4"), OBSERVATIONS.astype(">f8"),
                  np.asfortranarray(OBSERVATIONS.astype(">f8"))):
        r = npy_act(policy_server, npy(array))
        assert r.status_code == 200 and r.json()["actions"] == expected, (array.dtype, r.text)
    halves = OBSERVATIONS.astype(np.float16)
    r = npy_act(policy_server, npy(halves))
    assert r.status_code == 200
    assert r.json()["actions"] == npy_act(policy_server, npy(halves.astype(np.float32))).json()["actions"]


@pytest.mark.parametrize("what, body, code", [
    ("structured", npy(np.zeros(3, dtype=[("x", "<f4", (4,))])), "invalid_dtype"),
    ("sub-array dtype", npy_header("{'descr': ('<f4', (4,)), 'fortran_order': False, 'shape': (3,), }",
                                   bytes(48)), "invalid_dtype"),
    ("0-d", npy(np.float32(1.0)), "invalid_shape"),
    ("huge header", npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4), " + " " * 20_000 + "}",
                               bytes(16)), "invalid_npy"),
    ("a billion rows declared", npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 4), }",
                                           bytes(16)), "invalid_npy"),
    ("10**30 rows declared", npy_header("{'descr': '<f8', 'fortran_order': False, 'shape': (10**30, 4), }",
                                        bytes(16)), "invalid_npy"),
    ("negative shape", npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 4), }", bytes(16)),
     "invalid_npy"),
    ("version 3", npy(OBSERVATIONS)[:6] + b"\x03\x00" + npy(OBSERVATIONS)[8:], "invalid_npy"),
])
def test_hostile_npy_bodies_are_refused_without_allocating(policy_server, what, body, code):
    started = time.monotonic()
    error = error_of(npy_act(policy_server, body), 400)
    assert error["code"] == code and error["field"] == "body", (what, error)
    assert time.monotonic() - started < 1.0, what
    assert npy_act(policy_server, npy(OBSERVATIONS)).status_code == 200  # the worker is still there


# Camera frames of extreme shape ------------------------------------------------------------------

def png_b64(image: Image.Image) -> str:
    return base64.b64encode(encode(image, "PNG")).decode()


def test_a_frame_of_extreme_shape_is_refused_before_decoding(policy_server):
    good = png_b64(Image.new("L", FRAME_SHAPE[::-1]))
    for size in ((20000, 1), (1, 20000)):
        frames = [good] * (FRAMES - 1) + [png_b64(Image.new("L", size))]
        started = time.monotonic()
        r = requests.post(f"{policy_server.url}/act", json={"model": "cartpole_pixels", "frames_png": [frames] * 16},
                          timeout=30)
        error = error_of(r, 400)
        assert error["code"] == "invalid_frame" and error["field"] == f"frames_png[0][{FRAMES - 1}]", error
        assert time.monotonic() - started < 1.0, size

