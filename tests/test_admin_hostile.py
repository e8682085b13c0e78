"""The model control API probed as an attacker would (hardening round 3).

One real `bentoml serve` of the policy service for the module, on a private copy of the
cartpole model with hostile version folders made from the shipped version 1: symlinks and card
paths that lead out of MODELS_DIR, ONNX files that keep tensors in other files (external data),
truncated files whose card matches the truncated bytes, a folder named with a digit that is not
ASCII. Then traversal in the URL, odd bearer tokens, concurrent loads, an unload while clients
use the version, and /docs.json against every status each admin operation was made to answer.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import onnx
import pytest
import requests
from onnx import helper, numpy_helper

from conftest import POLICIES, error_of, running_service
from services.runtime import admin as admin_api
from services.contracts import onnx_scan, repository
from services.runtime.errors import ApiError
from services.contracts.repository import sha256_file
from test_model_lifecycle import ADMIN, ADMIN_KEY, act, admin, info, new_version, settings

WARM_UP_S = 0.4  # WARMUP_MIN_SECONDS: each load takes at least this long, so concurrent loads overlap
OPS = {"load": "/models/cartpole/versions/{v}/load", "unload": "/models/cartpole/versions/{v}/unload",
       "serve": "/models/cartpole/serve"}
DOCUMENTED_ROUTES = {"load": "/models/{name}/versions/{version}/load",
                     "unload": "/models/{name}/versions/{version}/unload", "serve": "/models/{name}/serve"}


# Hostile version folders ---------------------------------------------------------------------

def card_of(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def write_card(folder: Path, card: dict) -> None:
    (folder / "model.json").write_text(json.dumps(card, indent=2))


def write_model(folder: Path, model_bytes: bytes) -> None:
    """model.onnx replaced, and the card's sha256 made to match it (the attacker can write both)."""
    (folder / "model.onnx").write_bytes(model_bytes)
    card = card_of(folder)
    card["sha256"] = sha256_file(folder / "model.onnx")
    write_card(folder, card)


def external(model, tensor, location: str, data_dir: Path) -> None:
    """Move `tensor`'s bytes to a file of its own, named in its external_data `location`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / Path(location).name).write_bytes(numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def biggest_initializer(model):
    return max(model.graph.initializer, key=lambda t: len(t.raw_data))


def external_initializer(location: str, data_dir: Path | None = None):
    def edit(folder: Path) -> None:
        model = onnx.load(folder / "model.onnx")
        external(model, biggest_initializer(model), location, data_dir or folder)
        write_model(folder, model.SerializeToString())
    return edit


def external_constant(folder: Path) -> None:
    """A Constant node whose value tensor (an attribute, not an initializer) lives in a file."""
    model = onnx.load(folder / "model.onnx")
    value = numpy_helper.from_array(numpy_helper.to_array(biggest_initializer(model)), "hidden")
    external(model, value, "constant.bin", folder)
    model.graph.node.append(helper.make_node("Constant", [], ["hostile_constant"], value=value))
    write_model(folder, model.SerializeToString())


def truncated(keep) -> callable:
    def edit(folder: Path) -> None:
        data = (folder / "model.onnx").read_bytes()
        write_model(folder, data[:keep(data)])
    return edit


def last_top_level_field(data: bytes) -> int:
    """Where the last top-level protobuf field of a model starts: cutting there leaves a file
    that parses (a model without its opset_import)."""
    i = last = 0
    while i < len(data):
        last = i
        key, i = onnx_scan.read_varint(data, i)
        if key & 7 == 0:
            _, i = onnx_scan.read_varint(data, i)
        elif key & 7 == 2:
            length, i = onnx_scan.read_varint(data, i)
            i += length
        else:
            i += 8 if key & 7 == 1 else 4
    return last


def card_file(path: str):
    def edit(folder: Path) -> None:
        card = card_of(folder)
        card["file"] = path
        write_card(folder, card)
    return edit


# version -> (what it is, how it is made from a copy of version 1, a word its refusal must name)
HOSTILE: dict[str, tuple[str, object, str]] = {}


def hostile_versions(models: Path, outside: Path) -> None:
    cartpole = models / "policy" / "cartpole"
    shutil.copy(cartpole / "1" / "model.onnx", outside / "model.onnx")
    shutil.copy(cartpole / "1" / "model.json", outside / "model.json")
    shutil.copytree(cartpole / "1", outside / "v14")

    def symlinked_model(folder):
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to(outside / "model.onnx")

    def symlinked_card(folder):
        (folder / "model.json").unlink()
        (folder / "model.json").symlink_to(outside / "model.json")

    HOSTILE.update({
        "4": ("model.onnx a symlink out of MODELS_DIR", symlinked_model, "outside"),
        "5": ("the card's file a relative path out of the folder", card_file("../../../../outside/model.onnx"),
              "file name"),
        "6": ("the card's file an absolute path", card_file(str(outside / "model.onnx")), "file name"),
        "7": ("model.json a symlink out of MODELS_DIR", symlinked_card, "outside"),
        "8": ("external data in a file inside the folder", external_initializer("weights.bin"), "external data"),
        "9": ("external data at ../../../../outside/weights.bin",
              external_initializer("../../../../outside/weights.bin", outside), "external data"),
        "10": ("external data at an absolute path", external_initializer(str(outside / "abs.bin"), outside),
               "external data"),
        "11": ("a Constant node's tensor in external data", external_constant, "external data"),
        "12": ("model.onnx cut in half, the card's sha256 of the half", truncated(lambda d: len(d) // 2),
               "onnx"),
        "13": ("model.onnx cut at a field boundary (it parses), sha256 matching", truncated(last_top_level_field),
               "onnx"),
        "14": ("the version folder a symlink out of MODELS_DIR", None, "outside"),
    })
    for version, (_, edit, _) in HOSTILE.items():
        if version == "14":
            (cartpole / "14").symlink_to(outside / "v14", target_is_directory=True)
            continue
        folder = new_version(models, "cartpole", version, cartpole / "1")
        edit(folder)
    # Allowed: a symlink that stays inside MODELS_DIR (a version sharing another's file).
    inside = new_version(models, "cartpole", "15", cartpole / "1")
    (inside / "model.onnx").unlink()
    (inside / "model.onnx").symlink_to(Path("..") / "1" / "model.onnx")
    # A folder named with the Arabic-Indic digit one: str.isdigit() (and int()) take it.
    new_version(models, "cartpole", "\u0661", cartpole / "1")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    models, outside = tmp / "models", tmp / "outside"
    outside.mkdir()
    for part in ("cartpole/1", "cartpole/probes.npz"):  # one model: a quicker start
        source, target = POLICIES / part, models / "policy" / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    cartpole = models / "policy" / "cartpole"
    for version in ("2", "3"):
        new_version(models, "cartpole", version, cartpole / "1")
    hostile_versions(models, outside)
    env = settings(models, tmp / "control", BODY_TIMEOUT="1", WARMUP_MIN_SECONDS=str(WARM_UP_S))
    with running_service("policy", tmp, env=env) as server:
        server.control = tmp / "control"
        yield server


class Answer:
    """The bits of an http.client answer that error_of reads."""

    def __init__(self, status: int, headers, body: bytes):
        self.status_code, self.headers, self.content = status, {k.lower(): v for k, v in headers.items()}, body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


def send(server, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> Answer:
    """A request with the path exactly as given (requests would normalise `..` and re-quote it)."""
    url = urlsplit(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **ADMIN,
                                                             **(headers or {})})
        response = connection.getresponse()
        return Answer(response.status, dict(response.headers), response.read())
    finally:
        connection.close()


def unloaded(server, version: str) -> None:
    r = admin(server, OPS["unload"].format(v=version))
    assert r.status_code in (200, 404), r.text


def loaded(server, version: str) -> None:
    r = admin(server, OPS["load"].format(v=version))
    assert r.status_code == 200, r.text


# 1. Version folders that lead elsewhere, or are not what their card says -----------------------

@pytest.mark.parametrize("version", ["4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14"])
def test_hostile_version_folders_are_refused(hostile, version):
    what, _, word = HOSTILE[version]
    error = error_of(admin(hostile, OPS["load"].format(v=version)), 422)
    assert error["code"] == "version_refused" and error["field"] == "version", (what, error)
    assert word in error["message"].lower(), (what, error["message"])
    assert version in info(hostile)["versions"]["cartpole"]["refused"]
    r = act(hostile)
    assert r.status_code == 200 and r.json()["version"] == "1"
    assert hostile.process.poll() is None


def test_a_symlink_inside_models_dir_is_allowed(hostile):
    r = admin(hostile, OPS["load"].format(v="15"))
    assert r.status_code == 200 and r.json()["gate"]["passed"], r.text
    assert act(hostile, version="15").json()["version"] == "15"
    unloaded(hostile, "15")


def test_the_refusals_leave_the_service_serving(hostile):
    body = requests.get(f"{hostile.url}/readyz", timeout=10)
    assert body.status_code == 200
    versions = info(hostile)["versions"]["cartpole"]
    assert versions["serving"] == "1" and not set(HOSTILE) & set(versions["loaded"])


# 2. Version names in the URL and the body ----------------------------------------------------

LONG = "1" * 10_000


@pytest.mark.parametrize("path, status, code", [
    ("/models/cartpole/versions/../load", 400, "invalid_field"),
    ("/models/cartpole/versions/%2e%2e/load", 400, "invalid_field"),
    ("/models/cartpole/versions/..%2F..%2F..%2Fetc/load", 404, "not_found"),
    ("/models/cartpole/versions/%2Fetc%2Fpasswd/load", 404, "not_found"),
    ("/models/cartpole/versions/%2e%2e%2f1/load", 404, "not_found"),
    ("/models/..%2Fpolicy%2Fcartpole/versions/1/load", 404, "not_found"),
    ("/models/../versions/2/load", 404, "model_not_found"),
    ("/models/%2e%2e/versions/2/load", 404, "model_not_found"),
    (f"/models/cartpole/versions/{LONG}/load", 400, "invalid_field"),
    (f"/models/cartpole/versions/{LONG}/unload", 400, "invalid_field"),
    (f"/models/{'a' * 10_000}/versions/1/load", 404, "model_not_found"),
    ("/models/cartpole/versions/%D9%A1/load", 400, "invalid_field"),     # Arabic-Indic one: its folder exists
    ("/models/cartpole/versions/%D9%A1/unload", 400, "invalid_field"),
    ("/models/cartpole/versions/%C2%B2/load", 400, "invalid_field"),     # superscript two
    ("/models/cartpole/versions/%EF%BC%92/load", 400, "invalid_field"),  # fullwidth two
    ("/models/cartpole/versions/1%00/load", 400, "invalid_field"),
    ("/models/cartpole/versions/%201/load", 400, "invalid_field"),
    ("/models/cartpole/versions/-1/load", 400, "invalid_field"),
    ("/models/cartpole/versions/0x2/load", 400, "invalid_field"),
])
def test_traversal_and_odd_version_names_in_the_path(hostile, path, status, code):
    error = error_of(send(hostile, "POST", path), status)
    assert error["code"] == code, error
    assert len(error["message"]) < 1000  # the name is not echoed back whole


@pytest.mark.parametrize("version", ["\u0661", "\u00b2", "\uff12", "1" * 4000, "../2", "/etc/passwd", "2/../1",
                                     " 1", "1\u0000", 10 ** 30, -1, 1.0, True, None, ["1"], {"v": 1}])
def test_odd_version_names_in_the_serve_body(hostile, version):
    r = requests.post(f"{hostile.url}{OPS['serve']}", json={"version": version}, headers=ADMIN, timeout=30)
    error = error_of(r, 400)
    assert error["code"] == "invalid_field" and error["field"] == "version", error
    assert len(error["message"]) < 1000


def test_an_arabic_indic_version_folder_is_not_a_version(tmp_path):
    """Folders named with digits str.isdigit() takes but int() may not ('²') are no versions:
    before, one such folder made version_dirs raise, and the whole service not start."""
    for name in ("1", "\u0661", "\u00b2", "\uff13"):
        folder = tmp_path / "cartpole" / name
        folder.mkdir(parents=True)
        (folder / "model.json").write_text("{}")
    assert [p.name for p in repository.version_dirs(tmp_path / "cartpole")] == ["1"]
    assert repository.list_models(tmp_path) == ["cartpole"]


# 3. The admin key -----------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [
    b"Bearer \xff\xfe\xfd",                          # not UTF-8 at all
    "Bearer ключ-администратора".encode(),           # UTF-8, not ASCII
    ("Bearer " + ADMIN_KEY + "\u00e9").encode("latin-1"),
    ("Bearer " + ADMIN_KEY + "\u00a0").encode("latin-1"),  # a trailing no-break space is not stripped
    b"Bearer \xc3\xa9" + ADMIN_KEY.encode(),
    b"Basic " + ADMIN_KEY.encode(),
    b"Bearer",
    b"Bearer ",
    b"",
    ("Bearer " + ADMIN_KEY[:-1]).encode(),
    ("Bearer " + ADMIN_KEY * 200).encode(),
])
def test_odd_bearer_tokens_get_401_not_500(hostile, authorization):
    url = urlsplit(hostile.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:  # http.client sends bytes header values as they are
        connection.putrequest("POST", OPS["load"].format(v="2"))
        connection.putheader("Authorization", authorization)
        connection.putheader("Content-Length", "0")
        connection.endheaders()
        response = connection.getresponse()
        answer = Answer(response.status, response.headers, response.read())
    finally:
        connection.close()
    error = error_of(answer, 401)
    assert error["code"] == "unauthorized" and answer.headers["www-authenticate"] == "Bearer"


def test_the_key_is_compared_as_bytes_in_constant_time():
    """A non-ASCII ADMIN_KEY (the environment gives it as UTF-8) matches the same key sent as
    UTF-8 (the HTTP layer reads header bytes as latin-1); one that is not UTF-8 at all (the
    environment keeps such bytes as surrogates) matches its own bytes; neither raises."""
    key = "clé-ключ"
    header = "Bearer " + key.encode().decode("latin-1")  # what http.py hands authorize()
    admin_api.authorize(key, header)
    admin_api.authorize(key, "bearer  " + key.encode().decode("latin-1") + " ")
    odd_key = b"k\xff\xfe".decode("utf-8", "surrogateescape")  # os.environ's form of those bytes
    admin_api.authorize(odd_key, "Bearer " + b"k\xff\xfe".decode("latin-1"))
    for wrong in ("Bearer " + key, "Bearer \udcff", "Bearer \u2603", None, "", "Bearer"):
        for k in (key, odd_key, "ascii-key"):
            with pytest.raises(ApiError) as refused:
                admin_api.authorize(k, wrong)
            assert refused.value.status == 401
    source = Path(admin_api.__file__).read_text()
    assert "hmac.compare_digest" in source


# 4. Concurrency -------------------------------------------------------------------------------

def concurrent_loads(server, version: str, clients: int = 4) -> list[requests.Response]:
    unloaded(server, version)
    barrier = threading.Barrier(clients)
    answers: list = [None] * clients

    def load(i):
        barrier.wait()
        answers[i] = admin(server, OPS["load"].format(v=version))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def test_concurrent_loads_of_one_version_load_it_once(hostile):
    before = hostile.log().count("loaded cartpole version 3 on")
    answers = concurrent_loads(hostile, "3")
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 409}, [r.text for r in answers]
    did_load = [r for r in answers if r.status_code == 200 and "gate" in r.json()]
    assert len(did_load) == 1, [r.text for r in answers]
    for r in answers:
        if r.status_code == 409:
            error = error_of(r, 409)
            assert error["code"] == "load_in_progress" and error["field"] == "version"
        elif r is not did_load[0]:
            assert r.json()["already_loaded"] is True
    assert statuses.count(409) >= 1  # a load takes WARMUP_MIN_SECONDS: the others arrived meanwhile
    time.sleep(0.3)
    assert hostile.log().count("loaded cartpole version 3 on") == before + 1
    assert info(hostile)["versions"]["cartpole"]["loaded"] == ["1", "3"]
    unloaded(hostile, "3")


def test_unloading_a_version_clients_are_using(hostile):
    """Clients asking for version 2 back to back while it is unloaded (three times): every answer
    is from version 2 or a 404 version_not_found, never a 500 or a dropped connection."""
    for _ in range(3):
        loaded(hostile, "2")
        stop = threading.Event()
        answers: list[list] = [[] for _ in range(4)]

        def client(out):
            with requests.Session() as session:
                while not stop.is_set():
                    r = session.post(f"{hostile.url}/act", json={"observations": [[0.01, 0.2, -0.03, -0.25]] * 64,
                                                                   "model": "cartpole", "version": "2"}, timeout=30)
                    out.append((r.status_code, r.json().get("version") if r.ok else r.json()["error"]["code"]))

        threads = [threading.Thread(target=client, args=(out,), daemon=True) for out in answers]
        for thread in threads:
            thread.start()
        time.sleep(0.4)
        r = admin(hostile, OPS["unload"].format(v="2"))
        assert r.status_code == 200 and r.json()["loaded"] == ["1"], r.text
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(30)
        for out in answers:
            assert set(out) <= {(200, "2"), (404, "version_not_found")}, sorted(set(out))
            assert out[0] == (200, "2") and out[-1] == (404, "version_not_found"), (out[:3], out[-3:])
            first_404 = out.index((404, "version_not_found"))
            assert set(out[first_404:]) == {(404, "version_not_found")}  # once gone, gone


# 5. The OpenAPI document lists every status each operation answers ------------------------------

def read_answer(sock) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(lines[0].split()[1]), headers, body)


def slow_body(server, path: str) -> Answer:
    """Headers, then part of the body and nothing more: BODY_TIMEOUT (1 s here) answers 408."""
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"version\": ".encode())
        return read_answer(sock)


@contextmanager
def unwritable_control(server):
    """MODEL_CONTROL_DIR/policy made a file for a while: no choice can be recorded (503)."""
    folder = server.control / "policy"
    folder.mkdir(parents=True, exist_ok=True)
    aside = server.control / "policy.aside"
    folder.rename(aside)
    folder.write_text("not a folder")
    try:
        yield
    finally:
        folder.unlink()
        aside.rename(folder)


def test_the_document_lists_every_status_each_admin_operation_answers(hostile):
    """Each admin operation provoked into every status it can give over HTTP; /docs.json must
    list each of them for that operation, and list nothing it cannot give (but a 500, which is
    a bug, and the classifier's 409 untaught_version on serve)."""
    seen: dict[str, set[str]] = {op: set() for op in OPS}

    def saw(op: str, r, expected: int | None = None) -> None:
        assert r.status_code != 500, (op, r.status_code, r.text)
        if r.status_code >= 400:
            error_of(r, r.status_code)
        assert expected is None or r.status_code == expected, (op, expected, r.status_code, r.text)
        seen[op].add(str(r.status_code))

    bodies = {"load": {}, "unload": {}, "serve": {"version": "1"}}
    json_type = {**ADMIN, "Content-Type": "application/json"}
    for op, route in OPS.items():
        path = route.format(v="2")
        url = f"{hostile.url}{path}"
        body = json.dumps(bodies[op])
        saw(op, requests.post(url, data=body, headers={"Authorization": "Bearer wrong"}, timeout=30), 401)
        saw(op, requests.post(url, data=body, headers={**json_type, "Origin": "http://evil.example"}, timeout=30),
            403)
        saw(op, requests.post(url, data=b"{not json", headers=json_type, timeout=30), 400)
        saw(op, requests.post(url, data=json.dumps({"canary": 1}), headers=json_type, timeout=30), 400)
        saw(op, requests.post(url, data=b"{" + b" " * 5000 + b"}", headers=json_type, timeout=30), 413)
        saw(op, requests.post(url.replace("/cartpole/", "/nope/"), data=body, headers=json_type, timeout=30), 404)
        saw(op, slow_body(hostile, path), 408)
        # Whatever these answer, it must be documented: another media type, another Host.
        saw(op, requests.post(url, data=body, headers={**ADMIN, "Content-Type": "text/plain"}, timeout=60))
        saw(op, requests.post(url, data=body, headers={**json_type, "Host": "evil.example"}, timeout=60))
        error_of(requests.get(url, headers=ADMIN, timeout=30), 405)  # GET is no operation of these paths
    for version in ("٢", "1" * 30):
        saw("load", send(hostile, "POST", OPS["load"].format(v="%D9%A2" if version == "٢" else version)), 400)
        saw("unload", send(hostile, "POST", OPS["unload"].format(v="%D9%A2" if version == "٢" else version)), 400)

    unloaded(hostile, "2")
    saw("load", admin(hostile, OPS["load"].format(v="12")), 422)
    saw("load", admin(hostile, OPS["load"].format(v="77")), 404)
    for r in concurrent_loads(hostile, "3"):
        saw("load", r)
    assert {"200", "409"} <= seen["load"]
    saw("unload", admin(hostile, OPS["unload"].format(v="1")), 409)
    saw("unload", admin(hostile, OPS["unload"].format(v="3")), 200)
    saw("unload", admin(hostile, OPS["unload"].format(v="3")), 404)
    saw("serve", admin(hostile, OPS["serve"], {"version": "9"}), 404)
    saw("serve", admin(hostile, OPS["serve"], {"version": "1"}), 200)
    loaded(hostile, "2")
    with unwritable_control(hostile):
        saw("load", admin(hostile, OPS["load"].format(v="3")), 503)
        saw("serve", admin(hostile, OPS["serve"], {"version": "2"}), 503)
        saw("unload", admin(hostile, OPS["unload"].format(v="2")), 503)
    versions = info(hostile)["versions"]["cartpole"]
    assert versions["serving"] == "1" and versions["loaded"] == ["1", "2"]  # nothing changed half-way
    unloaded(hostile, "2")

    paths = requests.get(f"{hostile.url}/docs.json", timeout=30).json()["paths"]
    for op, route in DOCUMENTED_ROUTES.items():
        assert set(paths[route]) == {"post"}
        responses = paths[route]["post"]["responses"]
        documented = set(responses)
        assert seen[op] <= documented, f"{route} answers {sorted(seen[op] - documented)}, not in /docs.json"
        unprovoked = documented - seen[op]
        # 504 is provoked by test_a_change_past_request_timeout_is_a_504_and_goes_on (a server of its own)
        assert unprovoked <= {"500", "504"} | ({"409"} if op == "serve" else set()), \
            f"{route} documents {sorted(unprovoked)}, which it never answered"
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    version = paths[DOCUMENTED_ROUTES["load"]]["post"]["parameters"][1]["schema"]
    assert version["pattern"] == "^[0-9]{1,20}$" and version["maxLength"] == 20


def test_a_change_past_request_timeout_is_a_504_and_goes_on(tmp_path):
    """A load that outlasts REQUEST_TIMEOUT (1 s; each load warms up for 3 s here) answers 504
    in the error shape, and so does a switch that waits behind it; the load ends on its own,
    a second load meanwhile is a 409, and /docs.json lists 504 for all three operations."""
    models = tmp_path / "models"
    for part in ("cartpole/1", "cartpole/probes.npz"):
        source, target = POLICIES / part, models / "policy" / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    new_version(models, "cartpole", "2", models / "policy" / "cartpole" / "1")
    env = settings(models, tmp_path / "control", REQUEST_TIMEOUT="1", WARMUP_MIN_SECONDS="3")
    with running_service("policy", tmp_path, env=env) as server:
        started = time.monotonic()
        loading = {}
        thread = threading.Thread(target=lambda: loading.update(r=admin(server, OPS["load"].format(v="2"))))
        thread.start()
        time.sleep(0.3)
        again = admin(server, OPS["load"].format(v="2"))
        assert error_of(again, 409)["code"] == "load_in_progress"
        waiting = admin(server, OPS["unload"].format(v="2"))  # waits for the load's lock
        thread.join(30)
        error = error_of(loading["r"], 504)
        assert error["code"] == "timeout" and "goes on" in error["message"]
        assert loading["r"].elapsed.total_seconds() < 2.5
        assert error_of(waiting, 504)["code"] == "timeout"
        # both went on: the load passed its gate, then the unload that waited for it ran
        while "unloaded cartpole version 2" not in server.log():
            assert time.monotonic() - started < 30, server.log()[-2000:]
            time.sleep(0.2)
        assert "cartpole version 2 passed the gate" in server.log()
        assert info(server)["versions"]["cartpole"]["loaded"] == ["1"]
        paths = requests.get(f"{server.url}/docs.json", timeout=30).json()["paths"]
        for route in DOCUMENTED_ROUTES.values():
            assert "504" in paths[route]["post"]["responses"], route
        assert "Traceback" not in server.log()


def test_no_worker_crashed_and_nothing_was_a_500(hostile):
    """Last in the module: one worker start for everything above, and no traceback in the log."""
    assert hostile.process.poll() is None
    assert requests.get(f"{hostile.url}/readyz", timeout=10).status_code == 200
    log = hostile.log()
    assert log.count("policy: ready with") == 1, log[-3000:]
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert "status=500" not in log
