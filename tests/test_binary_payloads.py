"""NumPy .npy on the wire (services/arrays.py): /act takes observations as an .npy body and
answers actions as .npy when asked (Accept); /embed answers embeddings as .npy. The binary
forms must give the same numbers as JSON, and every malformed body must be a 4xx naming it."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import requests

from conftest import MODELS, running_service
from services.arrays import answer_form
from services.runtime.errors import ApiError

NPY = "application/x-npy"


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def act(server, body: bytes, query: str = "model=cartpole", **headers) -> requests.Response:
    return requests.post(f"{server.url}/act?{query}", data=body, timeout=30,
                         headers={"Content-Type": NPY, **headers})


OBSERVATIONS = np.array([[0.01, 0.02, 0.03, 0.04], [0.1, 0.2, -0.3, 0.4], [-1, 0.5, 0.1, -0.2]], np.float32)


def test_npy_observations_give_the_json_answer(policy_server):
    by_json = requests.post(f"{policy_server.url}/act", json={"observations": OBSERVATIONS.tolist(),
                                                             "model": "cartpole"}, timeout=30).json()
    assert act(policy_server, npy(OBSERVATIONS)).json() == by_json  # JSON stays the default answer
    answer = act(policy_server, npy(OBSERVATIONS), Accept=NPY)
    assert answer.status_code == 200 and answer.headers["content-type"] == NPY
    assert answer.headers["x-model"] == "cartpole" and answer.headers["x-model-version"] == by_json["version"]
    actions = np.load(io.BytesIO(answer.content), allow_pickle=False)
    assert actions.dtype == np.int64 and actions.tolist() == by_json["actions"]
    # float64 and integer arrays are taken too (cast to float32, as JSON numbers are)
    assert act(policy_server, npy(OBSERVATIONS.astype(np.float64))).json()["actions"] == by_json["actions"]
    assert act(policy_server, npy(np.ones((1, 4), np.int32))).status_code == 200
    # a JSON request may ask for the .npy answer
    both = requests.post(f"{policy_server.url}/act", json={"observations": OBSERVATIONS.tolist(), "model": "cartpole"},
                         headers={"Accept": NPY}, timeout=30)
    assert np.load(io.BytesIO(both.content)).tolist() == by_json["actions"]


def test_query_options_of_an_npy_request(policy_server):
    still = npy(np.zeros((64, 4), np.float32))  # the policy's action probabilities there: about 0.91 and 0.09
    sampled = act(policy_server, still, "model=cartpole&deterministic=false&seed=3")
    again = act(policy_server, still, "model=cartpole&deterministic=false&seed=3")
    assert sampled.status_code == 200 and sampled.json()["deterministic"] is False
    assert sampled.json()["actions"] == again.json()["actions"] and len(set(sampled.json()["actions"])) == 2
    assert act(policy_server, npy(OBSERVATIONS), "model=cartpole&version=1").json()["version"] == "1"


def pickled_array() -> bytes:
    stream = io.BytesIO()
    np.save(stream, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return stream.getvalue()


GOOD = npy(OBSERVATIONS)


def with_header(text: str, data: bytes = OBSERVATIONS.tobytes()) -> bytes:
    """An .npy file (format 1.0) with this header text, padded as numpy pads it."""
    header = text.encode("latin-1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


MALFORMED = [
    ("not npy", b"0.1,0.2,0.3,0.4", {}, 400, "invalid_npy", "body"),
    ("empty body", b"", {}, 400, "invalid_npy", "body"),
    ("a pickle, not npy", pickle.dumps(OBSERVATIONS), {}, 400, "invalid_npy", "body"),
    ("truncated", GOOD[:-5], {}, 400, "invalid_npy", "body"),
    ("header only", GOOD[:60], {}, 400, "invalid_npy", "body"),
    ("trailing bytes", GOOD + b"\0", {}, 400, "invalid_npy", "body"),
    ("two arrays", GOOD + GOOD, {}, 400, "invalid_npy", "body"),
    ("header without shape", with_header("{'descr': '<f4', 'fortran_order': False}"), {}, 400, "invalid_npy", "body"),
    ("header not a dict", with_header("[1, 2, 3]"), {}, 400, "invalid_npy", "body"),
    ("header with code", with_header("{'descr': __import__('os').getcwd()}"), {}, 400, "invalid_npy", "body"),
    ("shape larger than the data", with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 4)}"),
     {}, 400, "invalid_npy", "body"),
    ("object array", pickled_array(), {}, 400, "invalid_npy", "body"),
    ("strings", npy(np.array([["a", "b", "c", "d"]])), {}, 400, "invalid_dtype", "body"),
    ("booleans", npy(np.ones((1, 4), bool)), {}, 400, "invalid_dtype", "body"),
    ("complex", npy(np.ones((1, 4), np.complex64)), {}, 400, "invalid_dtype", "body"),
    ("a scalar", npy(np.float32(1)), {}, 400, "invalid_shape", "body"),
    ("one observation without its batch axis", npy(OBSERVATIONS[0]), {}, 400, "invalid_shape", "body"),
    ("wrong width", npy(OBSERVATIONS[:, :3]), {}, 400, "invalid_shape", "body"),
    ("no rows", npy(np.zeros((0, 4), np.float32)), {}, 400, "invalid_shape", "body"),
    ("over MAX_BATCH_SIZE", npy(np.zeros((257, 4), np.float32)), {}, 400, "batch_too_large", "body"),
    ("NaN", npy(np.array([[0, 0, 0, 0], [0, np.nan, 0, 0]], np.float32)), {}, 400, "non_finite_observation",
     "observations[1]"),
    ("beyond float32", npy(np.array([[0, 1e300, 0, 0]])), {}, 400, "non_finite_observation", "observations[0]"),
    ("Accept nothing offered", GOOD, {"Accept": "text/csv"}, 406, "not_acceptable", "Accept"),
    ("wrong content type", GOOD, {"Content-Type": "application/octet-stream"}, 415, "unsupported_media_type",
     "Content-Type"),
]


@pytest.mark.parametrize("body, headers, status, code, field", [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_every_malformed_npy_body_is_a_4xx_naming_it(policy_server, body, headers, status, code, field):
    answer = act(policy_server, body, **headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["field"]) == (code, field), error
    assert act(policy_server, GOOD).status_code == 200  # and the service goes on serving


@pytest.mark.parametrize("query, code, field", [
    ("", "model_required", "model"),
    ("model=nope", "model_not_found", "model"),
    ("model=cartpole&deterministic=maybe", "invalid_request", "deterministic"),
    ("model=cartpole&seed=-1", "invalid_request", "seed"),
    ("model=cartpole&temperature=2", "unknown_field", "temperature"),
    ("model=cartpole&observations=1,2,3,4", "invalid_request", "observations"),
    ("model=cartpole&version=9", "version_not_found", "version"),
])
def test_bad_query_options_are_4xx(policy_server, query, code, field):
    answer = act(policy_server, GOOD, query)
    assert answer.status_code in (400, 404) and answer.json()["error"]["code"] == code, answer.text
    assert answer.json()["error"]["field"] == field


def test_pixel_policy_takes_uint8_frames_as_npy(policy_server):
    if not (MODELS / "policy" / "cartpole_pixels").is_dir():
        pytest.skip("no pixel policy in this checkout")
    with np.load(MODELS / "policy" / "cartpole_pixels" / "probes.npz") as probes:
        frames = probes["inputs"][:5]
    by_json = requests.post(f"{policy_server.url}/act", json={"observations": frames.tolist(),
                                                             "model": "cartpole_pixels"}, timeout=30).json()
    answer = act(policy_server, npy(frames), "model=cartpole_pixels", Accept=NPY)
    assert np.load(io.BytesIO(answer.content)).tolist() == by_json["actions"]
    bad = act(policy_server, npy(frames.astype(np.float32) + 0.5), "model=cartpole_pixels")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_observation"


def test_the_document_shows_the_npy_forms(policy_server):
    document = requests.get(f"{policy_server.url}/docs.json", timeout=30).json()
    operation = document["paths"]["/act"]["post"]
    assert NPY in operation["requestBody"]["content"] and "application/json" in operation["requestBody"]["content"]
    assert NPY in operation["responses"]["200"]["content"] and "406" in operation["responses"]


def test_embed_answers_npy_when_asked(tmp_path):
    from loadtests.classifier_data import samples

    files = [("images", (name, data, "image/png" if name.endswith("png") else "image/jpeg"))
             for name, data, _ in samples()[:4]]
    with running_service("classifier", tmp_path, env={"TEACH_STORE": f"sqlite:///{tmp_path / 't.db'}"}) as server:
        by_json = requests.post(f"{server.url}/embed", files=files, timeout=60).json()
        answer = requests.post(f"{server.url}/embed", files=files, headers={"Accept": NPY}, timeout=60)
        refused = requests.post(f"{server.url}/embed", files=files, headers={"Accept": "image/png"}, timeout=60)
        smuggled = requests.post(f"{server.url}/embed", files=files + [("answer", (None, NPY))], timeout=60)
    embeddings = np.load(io.BytesIO(answer.content), allow_pickle=False)
    assert answer.headers["content-type"] == NPY and answer.headers["x-model"] == by_json["model"]
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, by_json["dim"])
    assert np.array_equal(embeddings, np.array(by_json["embeddings"], np.float32))
    assert refused.status_code == 406 and refused.json()["error"]["field"] == "Accept"
    assert smuggled.status_code == 400 and smuggled.json()["error"]["code"] == "unknown_field"


@pytest.mark.parametrize("accept, chosen", [
    (None, "application/json"), ("*/*", "application/json"), (NPY, NPY),
    ("application/json;q=0.5, application/x-npy", NPY),
    ("application/x-npy;q=0.2, application/json", "application/json"),
    ("text/html, */*;q=0.8", "application/json"), ("application/*", "application/json"),
    ("application/x-npy, */*;q=0.1", NPY), ("application/json, application/x-npy", "application/json"),
])
def test_accept_negotiation(accept, chosen):
    assert answer_form(accept) == chosen


@pytest.mark.parametrize("accept", ["text/csv", "image/png, text/plain", "application/x-npy;q=0, application/json;q=0"])
def test_accept_of_nothing_offered_is_406(accept):
    with pytest.raises(ApiError) as caught:
        answer_form(accept)
    assert caught.value.status == 406
