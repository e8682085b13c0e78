"""Traces over OTLP/HTTP (issue 30): real services export to a real OTLP/HTTP receiver started
here (loadtests/otlp_receiver.py), which decodes what arrives with opentelemetry-proto (the
collector's own message types).
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from classifier_helpers import fashion_png
from conftest import running_service
from loadtests.otlp_receiver import Receiver, tree

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def otel_env(receiver: Receiver, name: str) -> dict:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": name, "OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def by_name(spans: list[dict], name: str) -> dict:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, [s["name"] for s in spans]
    return found[0]


def test_a_policy_request_is_one_span_tree_joined_to_the_callers_trace(receiver, tmp_path):
    with running_service("policy", tmp_path, env=otel_env(receiver, "policy-under-test")) as server:
        traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
        r = requests.post(f"{server.url}/act", json={"observations": [[0.01, 0.2, -0.03, -0.25]],
                                                     "model": "cartpole"},
                          headers={"traceparent": traceparent}, timeout=10)
        assert r.status_code == 200
        spans = receiver.trace(TRACE_ID, {"POST /act", "queue", "batch", "onnxruntime.run"})
        request = by_name(spans, "POST /act")
        assert request["parent"] == CALLER_SPAN and request["service"] == "policy-under-test"
        assert request["attributes"]["http.response.status_code"] == 200
        assert request["attributes"]["model"] == "cartpole" and request["attributes"]["model.version"] == "1"
        queue, batch, run = by_name(spans, "queue"), by_name(spans, "batch"), by_name(spans, "onnxruntime.run")
        assert queue["parent"] == request["span_id"] and batch["parent"] == request["span_id"]
        assert run["parent"] == batch["span_id"] and run["attributes"]["onnxruntime.provider"] == "CPUExecutionProvider"
        assert batch["attributes"]["batch.rows"] >= 1 and (TRACE_ID, request["span_id"]) in batch["links"]
        assert queue["end"] <= run["start"] and request["start"] <= queue["start"] and run["end"] <= request["end"]
        print(tree(spans))  # what the README shows
        assert tree(spans).splitlines()[1].startswith("  POST /act")

        # A bad request: its span names the status and the error code; probes are not traced.
        bad_trace = "0af7651916cd43dd8448eb211c80319c"
        r = requests.post(f"{server.url}/act", json={"observations": [[1, 2]], "model": "cartpole"},
                          headers={"traceparent": f"00-{bad_trace}-{CALLER_SPAN}-01"}, timeout=10)
        assert r.status_code == 400
        failed = by_name(receiver.trace(bad_trace, {"POST /act"}), "POST /act")
        assert failed["attributes"]["http.response.status_code"] == 400
        assert failed["attributes"]["error.code"] == "invalid_observation"
        requests.get(f"{server.url}/readyz", timeout=10)

        # Many requests at once: merged batches link to every request they served.
        def one(i):
            requests.post(f"{server.url}/act", json={"observations": [[0.01 * i, 0.2, -0.03, -0.25]],
                                                     "model": "cartpole"}, timeout=10)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1.0)
        batches = [s for s in receiver.spans if s["name"] == "batch"]
        requests_seen = {s["span_id"] for s in receiver.spans if s["name"] == "POST /act"}
        assert all({span for _, span in b["links"]} <= requests_seen for b in batches)
        assert all(len(b["links"]) == b["attributes"]["batch.requests"] for b in batches)
        assert not [s for s in receiver.spans if s["name"].endswith("/readyz")]


def test_the_classifier_traces_decoding_and_the_store(receiver, tmp_path):
    env = {**otel_env(receiver, "classifier"), "TEACH_STORE": f"sqlite:///{tmp_path / 'taught.db'}"}
    with running_service("classifier", tmp_path, env=env) as server:
        trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
        r = requests.post(f"{server.url}/classify", files=[("images", ("shirt.png", fashion_png(0), "image/png"))],
                          headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"}, timeout=30)
        assert r.status_code == 200, r.text
        spans = receiver.trace(trace_id, {"POST /classify", "decode", "batch", "onnxruntime.run"})
        request = by_name(spans, "POST /classify")
        assert by_name(spans, "decode")["parent"] == request["span_id"]
        assert by_name(spans, "decode")["attributes"]["images"] == 1
        trace_id = "6bf92f3577b34da6a3ce929d0e0e4738"
        r = requests.post(f"{server.url}/taught", json={}, headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"},
                          timeout=30)
        assert r.status_code == 200, r.text
        spans = receiver.trace(trace_id, {"POST /taught"})
        store = [s for s in spans if s["name"].startswith("store.")]
        assert store and store[0]["attributes"]["db.system"] == "sqlite"
        assert store[0]["parent"] == by_name(spans, "POST /taught")["span_id"]


def test_no_variable_no_tracing(tmp_path):
    with running_service("policy", tmp_path) as server:
        r = requests.post(f"{server.url}/act", json={"observations": [[0.01, 0.2, -0.03, -0.25]], "model": "cartpole"},
                          timeout=10)
        assert r.status_code == 200
        assert requests.get(f"{server.url}/info", timeout=10).json()["tracing"] == "off"
        assert "exporting traces" not in server.log()

