"""The work every peer server does, once: the same model files, session options and answers as ours.

A peer hosts these in its own way (its HTTP server, its batching); what runs per item is the
same code our services run from the ground floor (services/contracts): the newest version of
each model in models/ (what our services serve by default), one onnxruntime thread, the same
image decoding and preprocessing, the same softmax, top-k and out-of-domain score, and answers
with the fields and values of ours, so the harness can check them equal before timing.

    policy = Policy()                       # models/policy/cartpole, newest version
    policy.act(np.float32 [N, 4])           # -> one {"action", "value", "probabilities"} per row
    policy.answers([array, ...])            # a peer's merged requests -> one /act answer each
    classifier = Classifier()
    classifier.classify([file bytes, ...])  # -> one {"predictions", "in_domain", "domain_score"} per file
    classifier.answers([[file bytes, ...], ...])  # -> one /classify answer each
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from services.contracts import device, imaging, repository
from services.contracts.domain import DomainCheck

ROOT = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("MODELS_DIR", ROOT / "models"))
THREADS = int(os.environ.get("INFER_THREADS", "1"))  # the same as our services' in the benchmark


def session(service: str, name: str):
    entry = repository.resolve(MODELS / service, name, kind=service)
    return entry, device.create_session(entry.path, "cpu", threads=THREADS)[0]


class Policy:
    def __init__(self, name: str = "cartpole"):
        self.entry, self.session = session("policy", name)

    def act(self, observations: np.ndarray) -> list[dict]:
        action, probabilities, value = self.session.run(None, {"observation": np.asarray(observations, np.float32)})
        return [{"action": int(a), "value": float(v), "probabilities": p.tolist()}
                for a, p, v in zip(action, probabilities, value)]

    def answers(self, requests: list[np.ndarray]) -> list[dict]:
        """A peer's merged batch of requests (observation arrays): one model call, one /act answer each."""
        rows = self.act(np.concatenate(requests))
        return [policy_answer(r) for r in split(rows, [len(array) for array in requests])]


class Classifier:
    def __init__(self, name: str = "fashion", top_k: int = 5):
        self.entry, self.session = session("classifier", name)
        contract = self.entry.card["contract"]
        self.labels, self.preprocessing, self.top_k = contract["labels"], contract["preprocessing"], top_k
        self.domain = DomainCheck.from_bytes((self.entry.path.parent / contract["domain"]["file"]).read_bytes())
        self.threshold = contract["domain"]["threshold"]
        self.input = self.session.get_inputs()[0].name

    def classify(self, files: list[bytes]) -> list[dict]:
        logits, embedding = self.session.run(["logits", "embedding"], {self.input: imaging.preprocess(files, self.preprocessing)})
        shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))  # as services/classifier
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :self.top_k]
        scores = self.domain.scores(embedding)
        return [{"predictions": [{"label": self.labels[j], "score": float(row[j])} for j in top],
                 "in_domain": bool(s >= self.threshold), "domain_score": round(float(s), 4)}
                for row, top, s in zip(probabilities, order, scores)]

    def answers(self, requests: list[list[bytes]]) -> list[dict]:
        """A peer's merged batch of requests (file lists): one model call, one /classify answer each."""
        rows = self.classify([f for files in requests for f in files])
        return [classifier_answer(r) for r in split(rows, [len(files) for files in requests])]


def split(rows: list[dict], counts: list[int]) -> list[list[dict]]:
    """A merged batch's answers back into the requests it came from (counts: items per request)."""
    out, start = [], 0
    for n in counts:
        out.append(rows[start:start + n])
        start += n
    return out


def policy_answer(rows: list[dict]) -> dict:
    """/act's answer, as our policy service writes it (services/policy.py)."""
    return {"actions": [r["action"] for r in rows], "values": [r["value"] for r in rows],
            "probabilities": [r["probabilities"] for r in rows]}


def classifier_answer(rows: list[dict]) -> dict:
    """/classify's answer, as our classifier service writes it."""
    return {"predictions": [r["predictions"] for r in rows], "in_domain": [r["in_domain"] for r in rows],
            "domain_score": [r["domain_score"] for r in rows]}


def multipart_files(body: bytes) -> list[bytes]:
    """The files of a multipart/form-data body, for a peer that hands its handler the raw body
    only (mosec): the boundary is the body's first line."""
    boundary = body[:body.index(b"\r\n")]
    files = []
    for part in body.split(boundary)[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        if b"filename=" in head:
            files.append(data[:-2])  # the CRLF before the next boundary
    return files
