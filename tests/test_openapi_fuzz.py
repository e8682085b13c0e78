"""Schemathesis on each service's OpenAPI document: generated requests (valid and invalid, a
fixed seed, a bounded number per operation) against a real server; no answer may be a 5xx, and
every answer must match the document (status, content type, headers, body schema)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import MODELS, running_service

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
         "response_headers_conformance"


@pytest.mark.parametrize("name, admin", [("policy", False), ("generator", False), ("classifier", False),
                                         ("policy", True)])
def test_generated_requests_get_no_5xx_and_match_the_document(name, admin, tmp_path):
    """With admin=True the model control API is on and the generated requests carry its key."""
    if not (MODELS / name).is_dir():
        pytest.skip(f"no {name} models in this checkout")
    env = {"TEACH_STORE": f"sqlite:///{tmp_path / 'taught.db'}"} if name == "classifier" else {}
    key = ["-H", "Authorization: Bearer fuzz-admin-key"] if admin else []
    with running_service(name, tmp_path, env={**env, **({"ADMIN_KEY": "fuzz-admin-key",
                                                         "MODEL_CONTROL_DIR": str(tmp_path / "control")}
                                                        if admin else {})}) as server:
        result = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/docs.json",
                                 "--checks", CHECKS, "--max-examples", "60", "--seed", "1", *key,
                                 "--request-timeout", "30"], cwd=tmp_path,  # its cache folder goes there
                                capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "generated" in result.stdout


def test_the_document_names_the_models_each_endpoint_takes(tmp_path):
    """Three policies are served, so /act's `model` is required and lists them; the classifier's
    /classify takes its one classifier, and teach its two teachable models with a default."""
    import requests

    with running_service("policy", tmp_path) as server:
        schema = request_schema(requests.get(f"{server.url}/docs.json", timeout=30).json(), "/act")
        assert "model" in schema["required"] and schema["properties"]["model"]["enum"] == \
            ["ant", "cartpole", "cartpole_pixels", "halfcheetah", "lunarlander"]
        assert requests.post(f"{server.url}/act", json={"observations": [[0, 0, 0, 0]]}, timeout=30).status_code == 400
    with running_service("classifier", tmp_path, env={"TEACH_STORE": f"sqlite:///{tmp_path / 't.db'}"}) as server:
        document = requests.get(f"{server.url}/docs.json", timeout=30).json()
    classify, teach = request_schema(document, "/classify"), request_schema(document, "/teach")
    assert classify["properties"]["model"]["enum"] == ["fashion"] and "model" not in classify.get("required", [])
    assert teach["properties"]["model"]["enum"] == ["faces", "fashion"] and "model" not in teach["required"]


def request_schema(document: dict, route: str) -> dict:
    content = document["paths"][route]["post"]["requestBody"]["content"]
    return next(iter(content.values()))["schema"]
