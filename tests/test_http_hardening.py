"""Defects an outside probe found in the shared HTTP layer and the services' input checks, each
kept fixed here against real `bentoml serve` processes: wrong media types and broken JSON are
4xx (not 500, not a logged traceback), cross-site pages and foreign Host names are refused,
types are strict, echoed input is cut short, slow requests get a 504 in the error shape,
each server has its own /metrics, and the docs page loads nothing from the internet."""

from __future__ import annotations

import io
import re
import socket
import time

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import error_of, running_service
from test_classifier_service import MODELS_DIR

ACT = {"observations": [[0.0, 0.0, 0.05, 0.0]], "model": "cartpole"}
CONSOLE = "http://console.example:8080"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    env = {"ALLOWED_ORIGINS": CONSOLE, "ALLOWED_HOSTS": "127.0.0.1,localhost"}
    with running_service("policy", tmp_path_factory.mktemp("policy-hardening"), env=env) as server:
        yield server


def post(server, path, **kwargs):
    return requests.post(f"{server.url}{path}", timeout=30, **kwargs)


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data; boundary=x", b'{"observations": [[0, 0, 0, 0]]}'),  # was a 500
    ("text/plain", b'{"observations": [[0, 0, 0, 0]]}'),  # a cross-site form could send this
    ("application/x-www-form-urlencoded", b"observations=1"),
])
def test_json_endpoints_take_only_json(policy, content_type, body):
    error = error_of(post(policy, "/act", data=body, headers={"Content-Type": content_type}), 415)
    assert error["code"] == "unsupported_media_type" and error["field"] == "Content-Type"


@pytest.mark.parametrize("body", [b"{not json", b'{"observations": [[0, 0, 0, 0]]', b"[1, 2]", b'"text"',
                                  b"[" * 100_000])
def test_broken_json_is_a_400_and_one_quiet_log_line(policy, body):
    before = len(policy.log())
    error = error_of(post(policy, "/act", data=body, headers={"Content-Type": "application/json"}), 400)
    assert error["code"] == "invalid_request" and error["field"] == "body"
    time.sleep(0.3)
    assert "Traceback" not in policy.log()[before:]


def test_cross_site_pages_are_refused_unless_listed(policy):
    refused = post(policy, "/act", json=ACT, headers={"Origin": "http://evil.example"})
    assert error_of(refused, 403)["code"] == "cross_origin"
    assert "access-control-allow-origin" not in refused.headers
    null = post(policy, "/act", json=ACT, headers={"Origin": "null"})  # sandboxed frames, file:// pages
    assert error_of(null, 403)["code"] == "cross_origin"
    own = post(policy, "/act", json=ACT, headers={"Origin": policy.url})  # the service's own page
    assert own.status_code == 200, own.text
    listed = post(policy, "/act", json=ACT, headers={"Origin": CONSOLE})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == CONSOLE
    preflight = requests.options(f"{policy.url}/act", headers={"Origin": CONSOLE,
                                                               "Access-Control-Request-Method": "POST"}, timeout=10)
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    denied = requests.options(f"{policy.url}/act", headers={"Origin": "http://evil.example",
                                                            "Access-Control-Request-Method": "POST"}, timeout=10)
    assert error_of(denied, 403)["code"] == "cross_origin"


def test_foreign_host_names_are_refused_but_probes_answer(policy):
    rebound = post(policy, "/act", json=ACT, headers={"Host": "attacker.example:3001"})  # DNS rebinding
    assert error_of(rebound, 400)["code"] == "invalid_host"
    assert requests.get(f"{policy.url}/info", headers={"Host": "attacker.example"}, timeout=10).status_code == 400
    assert requests.get(f"{policy.url}/readyz", headers={"Host": "attacker.example"}, timeout=10).status_code == 200
    assert post(policy, "/act", json=ACT, headers={"Host": "localhost:3001"}).status_code == 200


@pytest.mark.parametrize("field, value", [
    ("deterministic", "yes"), ("deterministic", "false"), ("deterministic", 0),
    ("seed", "7"), ("seed", 1.0), ("seed", True),
])
def test_act_types_are_strict(policy, field, value):
    error = error_of(post(policy, "/act", json={**ACT, field: value}), 400)
    assert error["field"] == field


@pytest.mark.parametrize("value", [1e308, 3.5e38, -1e39])
def test_observations_must_be_finite_as_float32(policy, value):
    error = error_of(post(policy, "/act", json={"observations": [[0.0, value, 0.0, 0.0]], "model": "cartpole"}), 400)
    assert (error["code"], error["field"]) == ("non_finite_observation", "observations[0]")


def test_echoed_input_is_cut_short(policy):
    r = post(policy, "/act", json={**ACT, "model": "x" * 1_000_000})
    assert error_of(r, 404)["code"] == "model_not_found" and len(r.content) < 2000
    r = post(policy, "/act", json={**ACT, "x" * 100_000: 1})
    assert error_of(r, 400)["code"] == "unknown_field" and len(r.content) < 2000


def test_the_docs_page_loads_nothing_from_the_internet(policy):
    page = requests.get(f"{policy.url}/", timeout=10)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "googletagmanager" not in page.text and not re.search(r"""(src|href)=["']https?://""", page.text)
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = requests.get(f"{policy.url}/docs-init.js", timeout=10)
    assert "validatorUrl: null" in script.text and "http" not in script.text
    assert requests.get(f"{policy.url}/static_content/swagger-ui-bundle.js", timeout=10).status_code == 200


def test_generator_latent_too_large_for_a_float_is_a_400(tmp_path):
    with running_service("generator", tmp_path) as server:
        body = '{"latents": [[' + ", ".join(["0"] * 99 + ["1" + "0" * 400]) + "]]}"
        r = post(server, "/generate", data=body, headers={"Content-Type": "application/json"})
        assert error_of(r, 400)["code"] == "latent_out_of_range"


def big_jpeg(seed: int, side: int = 4000) -> bytes:
    """16 megapixels in a few hundred kB: slow to decode, quick to send."""
    x = np.linspace(0, 255, side, dtype=np.float32)
    pixels = ((x[None, :] + x[:, None] * (seed + 1)) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def test_slow_requests_get_a_504_in_the_error_shape_and_budgets_hold(tmp_path):
    env = {"MODELS_DIR": str(MODELS_DIR), "TEACH_STORE": f"sqlite:///{tmp_path / 't.db'}", "REQUEST_TIMEOUT": "0.3"}
    files = [("images", (f"{i}.jpg", big_jpeg(i), "image/jpeg")) for i in range(6)]  # 96 MP: over a second
    with running_service("classifier", tmp_path, env=env) as server:
        slow = post(server, "/classify", files=files)
        error = error_of(slow, 504)
        assert error["code"] == "timeout" and "REQUEST_TIMEOUT" in error["message"]
        over = post(server, "/classify", files=files + files[:1])  # 112 MP > MAX_REQUEST_PIXELS (100 MP)
        assert error_of(over, 413)["code"] == "request_too_large"
        small = [("images", ("s.jpg", big_jpeg(9, side=64), "image/jpeg"))]
        assert post(server, "/classify", files=small).status_code == 200  # the worker is free again
        deadline = time.monotonic() + 10  # the decoding thread stops at its next image
        while not re.search(r"cancelled: decoding stopped after [1-5] of 6 images", server.log()):
            assert time.monotonic() < deadline, "the timed-out request's decoding went on to the end"
            time.sleep(0.2)


def metric_services(url: str) -> set[str]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return set(re.findall(r'service="(\w+)"', text)) | set(re.findall(r'service_name="(\w+)"', text))


def test_each_server_has_its_own_metrics(tmp_path):
    """Servers started on one host used to share (and wipe) one Prometheus folder."""
    with running_service("policy", tmp_path) as policy, running_service("generator", tmp_path) as generator:
        assert post(policy, "/act", json=ACT).status_code == 200
        assert post(generator, "/generate", json={"n": 1, "seed": 1}).status_code == 200
        assert "policy" in metric_services(policy.url) and "generator" not in metric_services(policy.url)
        assert "generator" in metric_services(generator.url) and "policy" not in metric_services(generator.url)
        # A third server starting must not break or wipe the first ones' /metrics.
        with running_service("policy", tmp_path, wait=False) as third:
            for _ in range(20):
                r = requests.get(f"{policy.url}/metrics", timeout=10)
                assert r.status_code == 200 and 'service="policy"' in r.text
                time.sleep(0.2)
            assert third.process.poll() is None


def test_idle_connections_are_closed(policy):
    """A kept-alive connection that sends nothing more is closed (uvicorn's keep-alive timeout)."""
    with connect(policy) as connection:
        connection.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_within(connection, 15)


def connect(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def closed_within(connection: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """True if the server closes the connection within `seconds` (sending `trickle` a byte a second)."""
    deadline = time.monotonic() + seconds
    connection.settimeout(1)
    for byte in [trickle[i:i + 1] for i in range(len(trickle))] + [b""] * int(seconds + 1):
        try:
            if byte:
                connection.sendall(byte)
            data = connection.recv(4096)
            if data == b"" or data.startswith(b"HTTP/1.1 408"):
                return time.monotonic() < deadline
        except socket.timeout:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() < deadline
        if time.monotonic() > deadline:
            return False
    return False


@pytest.fixture(scope="module")
def impatient(tmp_path_factory):
    env = {"HEADER_TIMEOUT": "2", "BODY_TIMEOUT": "2"}
    with running_service("policy", tmp_path_factory.mktemp("policy-timeouts"), env=env) as server:
        yield server


def test_a_connection_that_never_sends_a_request_is_closed(impatient):
    with connect(impatient) as connection:
        assert closed_within(connection, 6)


def test_headers_sent_a_byte_at_a_time_are_cut_off(impatient):
    with connect(impatient) as connection:  # slowloris: the headers never end
        assert closed_within(connection, 6, trickle=b"POST /act HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 30)


def test_a_body_that_trickles_in_gets_408_and_the_connection_closes(impatient):
    with connect(impatient) as connection:
        connection.sendall(b"POST /act HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{")
        assert closed_within(connection, 6, trickle=b" " * 30)
    r = requests.post(f"{impatient.url}/act", json=ACT, timeout=10)  # others are served meanwhile and after
    assert r.status_code == 200


def test_the_openapi_document_describes_the_errors_really_answered(policy):
    import jsonschema

    document = requests.get(f"{policy.url}/docs.json", timeout=10).json()
    error_schema = document["components"]["schemas"]["Error"]
    responses = document["paths"]["/act"]["post"]["responses"]
    assert {"400", "401", "403", "404", "408", "413", "415", "503", "504"} <= set(responses)
    assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
               for status, r in responses.items() if status[0] in "45")
    answers = [post(policy, "/act", json={"observations": [[0.0] * 3], "model": "cartpole"}),
               post(policy, "/act", json={**ACT, "model": "nope"}),
               post(policy, "/act", json={**ACT, "deterministic": "yes"}),
               post(policy, "/act", data=b"x", headers={"Content-Type": "text/plain"}),
               post(policy, "/act", json=ACT, headers={"Origin": "http://evil.example"})]
    for answer in answers:
        assert str(answer.status_code) in responses
        jsonschema.validate(answer.json(), error_schema)  # the body is what the document says


def test_memory_taken_by_large_decodes_is_given_back(tmp_path):
    """A worker that decoded 96 megapixels three times is back near its size before (the probe saw
    519 -> 949 MB stay; MAX_REQUEST_PIXELS bounds a request, malloc_trim returns freed memory)."""
    from services.contracts import processes

    def worker_rss_mb(server) -> int:
        sizes = []
        for pid in processes.descendants(server.process.pid):
            status = open(f"/proc/{pid}/status").read()
            sizes.append(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) // 1024)
        return max(sizes)

    env = {"MODELS_DIR": str(MODELS_DIR), "TEACH_STORE": f"sqlite:///{tmp_path / 't.db'}", "REQUEST_TIMEOUT": "120"}
    files = [("images", (f"{i}.jpg", big_jpeg(i), "image/jpeg")) for i in range(6)]
    with running_service("classifier", tmp_path, env=env) as server:
        assert post(server, "/classify", files=[("images", ("s.jpg", big_jpeg(0, side=64), "image/jpeg"))]).ok
        before = worker_rss_mb(server)
        for _ in range(3):
            assert requests.post(f"{server.url}/classify", files=files, timeout=120).status_code == 200
        after = worker_rss_mb(server)
    assert after - before < 50, f"worker grew from {before} to {after} MB"
