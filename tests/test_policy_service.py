"""The policy service over real HTTP, against a real `bentoml serve` process."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import requests

from conftest import POLICIES, error_of, running_service


def act(server, body, **kwargs):
    return requests.post(f"{server.url}/act", json=body, timeout=30, **kwargs)


def offline(name: str, observations) -> list[np.ndarray]:
    """The same model file run in-process: what the service must answer."""
    session = ort.InferenceSession(str(POLICIES / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"observation": np.asarray(observations, np.float32)})


def rollout_observations(n: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 4)) * [1.0, 1.0, 0.1, 1.0]).tolist()


def test_one_observation(policy_server):
    r = act(policy_server, {"observations": [[0.0, 0.1, 0.02, -0.3]], "model": "cartpole"})
    assert r.status_code == 200, r.text
    body = r.json()
    action, probabilities, value = offline("cartpole", [[0.0, 0.1, 0.02, -0.3]])
    assert body["actions"] == action.tolist()
    np.testing.assert_allclose(body["probabilities"], probabilities, atol=1e-6)
    np.testing.assert_allclose(body["values"], value, rtol=1e-5)
    assert (body["model"], body["version"]) == ("cartpole", "1")


def test_many_observations_and_both_policies(policy_server):
    observations = rollout_observations(200)
    body = act(policy_server, {"observations": observations, "model": "cartpole"}).json()
    assert body["actions"] == offline("cartpole", observations)[0].tolist()
    lunar = [[0.0, 1.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.5, -0.2, -0.5, 0.1, 0.0, 1.0, 0.0]]
    body = act(policy_server, {"observations": lunar, "model": "lunarlander"}).json()
    assert body["actions"] == offline("lunarlander", lunar)[0].tolist()
    assert len(body["probabilities"][0]) == 4


def test_model_is_required_when_several_are_served(policy_server):
    error = error_of(act(policy_server, {"observations": [[0, 0, 0, 0]]}), 400)
    assert error["code"] == "model_required" and error["field"] == "model"


def test_sampled_actions_follow_the_seed(policy_server):
    body = {"observations": [[0.0, 0.0, 0.0, 0.0]] * 64, "model": "cartpole", "deterministic": False, "seed": 7}
    first, second = act(policy_server, body).json(), act(policy_server, body).json()
    assert first["actions"] == second["actions"] and first["deterministic"] is False
    assert set(first["actions"]) <= {0, 1}


def test_64_concurrent_clients_are_all_answered_correctly_and_batched(policy_server):
    def metric_sum(text, name):
        pattern = rf'^{name}_(sum|count)\{{model="cartpole",service="policy"\}} (\S+)$'
        return {m[0]: float(m[1]) for m in re.findall(pattern, text, re.M)}

    before = metric_sum(requests.get(f"{policy_server.url}/metrics").text, "model_batch_size")
    requests_ = [rollout_observations(1 + i % 4, seed=i) for i in range(64 * 8)]
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda obs: act(policy_server, {"observations": obs, "model": "cartpole"}), requests_))
    for observations, answer in zip(requests_, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["actions"] == offline("cartpole", observations)[0].tolist()
    after = metric_sum(requests.get(f"{policy_server.url}/metrics").text, "model_batch_size")
    rows = after["sum"] - before.get("sum", 0)
    batches = after["count"] - before.get("count", 0)
    assert rows == sum(len(o) for o in requests_)
    assert batches < len(requests_), "no two requests ever shared a batch"


BAD_INPUTS = [
    ({"observations": [[0, 0, 0]], "model": "cartpole"}, 400, "invalid_observation", "observations[0]"),
    ({"observations": [[0, 0, 0, "x"]], "model": "cartpole"}, 400, "invalid_observation", "observations[0]"),
    ({"observations": [], "model": "cartpole"}, 400, "invalid_observations", "observations"),
    ({"observations": [[0, 0, 0, 0]] * 257, "model": "cartpole"}, 400, "batch_too_large", "observations"),
    ({"observations": [[0, 0, 0, 0]], "model": "pong"}, 404, "model_not_found", "model"),
    ({"observations": [[0, 0, 0, 0]], "model": "cartpole", "deterministic": "often"}, 400, "invalid_request",
     "deterministic"),
    ({"observations": [[0, 0, 0, 0]], "model": "cartpole", "seed": -1}, 400, "invalid_request", "seed"),
    ({"model": "cartpole"}, 400, "observations_required", "observations"),
    ({"observations": "lots", "model": "cartpole"}, 400, "invalid_request", "observations"),
    ({"observations": [[0, 0, 0, 0]], "model": "cartpole", "determinstic": False}, 400, "unknown_field",
     "determinstic"),
]


@pytest.mark.parametrize("body, status, code, field", BAD_INPUTS)
def test_bad_input_gets_its_4xx_and_the_service_keeps_serving(policy_server, body, status, code, field):
    error = error_of(act(policy_server, body), status)
    assert (error["code"], error["field"]) == (code, field)
    if code == "batch_too_large":
        assert "256" in error["message"]
    assert act(policy_server, {"observations": [[0, 0, 0, 0]], "model": "cartpole"}).status_code == 200


def test_non_finite_and_malformed_json(policy_server):
    raw = '{"observations": [[0, 0, NaN, 0]], "model": "cartpole"}'
    r = requests.post(f"{policy_server.url}/act", data=raw, headers={"Content-Type": "application/json"})
    assert error_of(r, 400)["code"] == "non_finite_observation"
    r = requests.post(f"{policy_server.url}/act", data="{not json", headers={"Content-Type": "application/json"})
    assert error_of(r, 400)["code"] == "invalid_request"
    assert error_of(requests.get(f"{policy_server.url}/no-such-route"), 404)["code"] == "not_found"


def test_info_lists_policies_spaces_and_meanings(policy_server):
    info = requests.get(f"{policy_server.url}/info").json()
    assert info["service"] == "policy" and info["ready"] is True
    cartpole = info["policies"]["cartpole"]
    assert cartpole["observation_space"]["shape"] == [4]
    assert cartpole["action_space"] == {"type": "Discrete", "n": 2}
    assert cartpole["action_meanings"] == ["push the cart to the left", "push the cart to the right"]
    assert info["policies"]["lunarlander"]["action_space"]["n"] == 4
    card = json.loads((POLICIES / "cartpole" / "1" / "model.json").read_text())
    model = next(m for m in info["models"] if m["name"] == "cartpole")
    assert model["sha256"] == card["sha256"] and model["metrics"] == card["metrics"]
    assert model["provider"] == "CPUExecutionProvider" and model["provider_reason"]
    assert info["limits"]["max_batch_size"] == 256 and info["limits"]["max_body_bytes"] > 0
    assert info["software"]["bentoml"] == "1.4.40"


def test_metrics_show_models_versions_and_timings(policy_server):
    act(policy_server, {"observations": [[0, 0, 0, 0]], "model": "cartpole"})
    text = requests.get(f"{policy_server.url}/metrics").text
    assert re.search(r'^model_info\{.*model="cartpole".*provider="CPUExecutionProvider".*version="1".*\} 1\.0$',
                     text, re.M), text[:2000]
    assert re.search(r'^model_inference_seconds_count\{model="cartpole",provider="CPUExecutionProvider",'
                     r'service="policy",version="1"\} [1-9]', text, re.M)
    assert "bentoml_service_request_total" in text or "bentoml_api_server_request_total" in text


def test_readyz_waits_for_warm_up(tmp_path):
    with running_service("policy", tmp_path, env={"WARMUP_MIN_SECONDS": "15"}, wait=False) as server:
        seen = []
        import time
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.append(requests.get(f"{server.url}/readyz", timeout=2).status_code)
                if seen[-1] == 503:  # alive but not ready: inference is refused with a 503
                    assert requests.get(f"{server.url}/livez", timeout=2).status_code == 200
                    early = act(server, {"observations": [[0, 0, 0, 0]], "model": "cartpole"})
                    if early.status_code == 200:  # readiness came between the two requests (seen once):
                        assert requests.get(f"{server.url}/readyz", timeout=2).status_code == 200
                        continue                  # then /readyz must say so now
                    assert error_of(early, 503)["code"] == "not_ready"
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        assert 503 in seen and seen[-1] == 200, seen
        assert act(server, {"observations": [[0, 0, 0, 0]], "model": "cartpole"}).status_code == 200


def test_broken_model_keeps_the_service_unready_with_one_clear_log_line(tmp_path, models_copy):
    onnx = models_copy / "policy" / "cartpole" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])
    with running_service("policy", tmp_path, env={"MODELS_DIR": str(models_copy)}, wait=False) as server:
        import time
        deadline = time.monotonic() + 60
        while "NOT READY" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.3)
        lines = [line for line in server.log().splitlines() if "NOT READY" in line]
        assert len(lines) == 1 and "cartpole" in lines[0] and "does not match its card" in lines[0], server.log()
        assert requests.get(f"{server.url}/readyz", timeout=5).status_code == 503
        r = act(server, {"observations": [[0, 0, 0, 0]], "model": "cartpole"})
        assert "does not match" in error_of(r, 503)["message"]


def test_api_key_and_body_limit(tmp_path):
    env = {"API_KEY": "s3cret", "MAX_BODY_BYTES": "4096"}
    with running_service("policy", tmp_path, env=env) as server:
        body = {"observations": [[0, 0, 0, 0]], "model": "cartpole"}
        assert error_of(act(server, body), 401)["code"] == "unauthorized"
        wrong = act(server, body, headers={"Authorization": "Bearer nope"})
        assert error_of(wrong, 401)["field"] == "Authorization"
        good = {"Authorization": "Bearer s3cret"}
        assert act(server, body, headers=good).status_code == 200
        for open_path in ("/readyz", "/livez", "/healthz", "/metrics", "/info"):
            assert requests.get(f"{server.url}{open_path}").status_code == 200, open_path
        big = {"observations": [[0.123456789, 0.123456789, 0.123456789, 0.123456789]] * 100, "model": "cartpole"}
        error = error_of(act(server, big, headers=good), 413)
        assert error["code"] == "body_too_large" and "4096" in error["message"]
        chunked = requests.post(f"{server.url}/act", data=iter([json.dumps(big).encode()]),
                                headers={**good, "Content-Type": "application/json"})
        assert error_of(chunked, 413)["code"] == "body_too_large"
        assert act(server, body, headers=good).status_code == 200


def test_without_api_key_inference_is_open(policy_server):
    r = act(policy_server, {"observations": [[0, 0, 0, 0]], "model": "cartpole"},
            headers={"Authorization": "Bearer anything"})
    assert r.status_code == 200
