"""How each server is called and what it answers, reduced to one form the harness compares.

Ours, LitServe, Ray Serve and Mosec take the same bodies (the peers copy our API): /act with
{"observations": [[...]]}, /classify with a multipart form of `images` files. TorchServe takes
them under /predictions/<name>, with the files named image0, image1, ... (it keeps one value per
field name). Triton takes its own protocol (KServe v2): JSON tensors, and the files as a BYTES
tensor in its binary extension, as `tritonclient` sends them.

Every answer becomes rows, one per observation or file:
  act:      {"action": int, "value": float, "probabilities": [float, ...]}
  classify: {"labels": [str x 5], "scores": [float x 5], "in_domain": bool, "domain_score": float}
"""

from __future__ import annotations

import json
import math
import struct
import urllib.request

from loadtests.wrk import Request, multipart

TRITON_MODELS = {"act": "cartpole", "classify": "fashion"}
TRITON_OUTPUTS = {"act": ("action", "value", "probabilities"),
                  "classify": ("labels", "scores", "in_domain", "domain_score")}


def content_type(name: str) -> str:
    return "image/png" if name.endswith("png") else "image/jpeg"


def requests(wire: str, endpoint: str, items: list) -> list[Request]:
    """The prepared requests of one wire format: items are observation rows (act) or (name, bytes)
    files (classify), one entry per request."""
    if wire == "triton":
        return [triton_request(endpoint, item) for item in items]
    prefix = "/predictions" if wire == "torchserve" else ""
    if endpoint == "act":
        return [Request(f"{prefix}/act", "application/json",
                        json.dumps({"observations": rows, "model": "cartpole"}).encode()) for rows in items]
    out = []
    for files in items:
        fields = [f"image{k}" for k in range(len(files))] if wire == "torchserve" else "images"
        body, kind = multipart([(name, data, content_type(name)) for name, data in files], field=fields)
        out.append(Request(f"{prefix}/classify", kind, body))
    return out


def triton_request(endpoint: str, item: list) -> Request:
    outputs = [{"name": n, "parameters": {"binary_data": False}} for n in TRITON_OUTPUTS[endpoint]]
    if endpoint == "act":
        head = {"inputs": [{"name": "observation", "shape": [len(item), len(item[0])], "datatype": "FP32",
                            "data": [v for row in item for v in row]}], "outputs": outputs}
        return Request(f"/v2/models/{TRITON_MODELS[endpoint]}/infer", "application/json", json.dumps(head).encode())
    binary = b"".join(struct.pack("<I", len(data)) + data for _, data in item)
    head = json.dumps({"inputs": [{"name": "images", "shape": [len(item), 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(binary)}}], "outputs": outputs}).encode()
    return Request(f"/v2/models/{TRITON_MODELS[endpoint]}/infer", "application/octet-stream", head + binary,
                   headers={"Inference-Header-Content-Length": str(len(head))})


def canonical_rows(endpoint: str, rows: list[dict]) -> list[dict]:
    """work.py's rows in the compared form."""
    if endpoint == "act":
        return rows
    return [{"labels": [p["label"] for p in r["predictions"]], "scores": [p["score"] for p in r["predictions"]],
             "in_domain": r["in_domain"], "domain_score": r["domain_score"]} for r in rows]


def parse(wire: str, endpoint: str, body: bytes) -> list[dict]:
    answer = json.loads(body)
    if wire == "triton":
        tensors = {o["name"]: o for o in answer["outputs"]}

        def rows(name):
            t = tensors[name]
            width = t["shape"][1] if len(t["shape"]) > 1 else 1
            return [t["data"][i:i + width] for i in range(0, len(t["data"]), width)]

        if endpoint == "act":
            return [{"action": a[0], "value": v[0], "probabilities": p}
                    for a, v, p in zip(rows("action"), rows("value"), rows("probabilities"))]
        return [{"labels": l, "scores": s, "in_domain": d[0], "domain_score": ds[0]} for l, s, d, ds in
                zip(rows("labels"), rows("scores"), rows("in_domain"), rows("domain_score"))]
    if endpoint == "act":
        return [{"action": a, "value": v, "probabilities": p}
                for a, v, p in zip(answer["actions"], answer["values"], answer["probabilities"])]
    return [{"labels": [p["label"] for p in preds], "scores": [p["score"] for p in preds], "in_domain": d,
             "domain_score": ds} for preds, d, ds in zip(answer["predictions"], answer["in_domain"],
                                                         answer["domain_score"])]


def differs(expected: list[dict], got: list[dict]) -> str | None:
    """What first differs (None: equal). Integers, strings and booleans exactly; numbers to 1e-4
    absolute plus 1e-5 relative (JSON round trips, float32 on one wire and float64 on another, the
    out-of-domain score rounded to 4 places)."""
    if len(expected) != len(got):
        return f"{len(got)} answers for {len(expected)} inputs"
    for i, (want, have) in enumerate(zip(expected, got)):
        for key, value in want.items():
            if not same(value, have.get(key)):
                return f"row {i} {key}: {have.get(key)!r}, onnxruntime gives {value!r}"
    return None


def same(want, have) -> bool:
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(same, want, have))
    if isinstance(want, bool) or isinstance(want, (int, str)) and not isinstance(want, float):
        return type(have) is type(want) and have == want
    return isinstance(have, (int, float)) and not isinstance(have, bool) and \
        math.isclose(want, have, rel_tol=1e-5, abs_tol=1e-4)


def triton_version(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v2", timeout=10) as response:
        return json.loads(response.read())["version"]
