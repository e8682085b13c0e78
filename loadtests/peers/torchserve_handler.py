"""TorchServe's handler for loadtests/peers/torchserve_peer.py: a batch of requests in, one answer each.

TorchServe calls handle(data, context) with the requests its batching merged; each is a dict
whose "body" is the JSON (/act) or, for a multipart form, one key per field name (/classify).
"""

from __future__ import annotations

import json

import numpy as np

from loadtests.peers import work

_model = None


def _files(request: dict) -> list[bytes]:
    """The form's files in order: TorchServe keeps one value per field name, so the client names
    them image0, image1, ... (loadtests/peers/__main__.py writes such bodies for it)."""
    names = sorted((k for k in request if k.startswith("image") and k[5:].isdigit()), key=lambda k: int(k[5:]))
    return [bytes(request[k]) for k in names]


def handle(data, context):
    global _model
    endpoint = context.manifest["model"]["modelName"]
    if _model is None:
        _model = work.Policy() if endpoint == "act" else work.Classifier()
    if data is None:
        return None
    if endpoint == "act":
        return _model.answers([np.asarray(_body(r)["observations"], np.float32) for r in data])
    return _model.answers([_files(r) for r in data])


def _body(request: dict):
    body = request.get("body") or request.get("data")
    return json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body
