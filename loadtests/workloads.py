"""What the benchmark sends to each service, and the same work done in-process (the raw ceiling).

A workload knows (1) how to do its service's work without HTTP, on the same model file with
the same onnxruntime session options, and (2) how to make one checked HTTP request.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from loadtests.wrk import Request, multipart
from services.contracts import device, repository

ROOT = Path(__file__).resolve().parent.parent


def session_for(service: str, name: str):
    """The model's session as the server makes it: one thread, on BENCHMARK_DEVICE (cpu or cuda)."""
    entry = repository.resolve(ROOT / "models" / service, name, kind=service)
    session, _, _ = device.create_session(entry.path, os.environ.get("BENCHMARK_DEVICE", "cpu"), threads=1)
    return entry, session


def timed(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds` (after one warm-up call)."""
    fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - started)


class Workload:
    name = ""
    service = ""   # the service it calls, when not its name
    model = ""     # the model folder it needs, when not any of the service's
    unit = "items"
    per_request = 1  # items in each request
    description = ""
    server_env: dict[str, str] = {}
    floor = ""     # the bare BentoML service with the same endpoint (services/floor.py)

    def wrk_requests(self) -> list[Request]:
        """The same requests for wrk (loadtests/wrk.py): path, content type and body, prepared."""
        raise NotImplementedError

    def raw(self, batch_sizes: list[int], seconds: float) -> dict[int, float]:
        raise NotImplementedError

    def request(self, i: int) -> tuple[str, dict]:
        """The i-th request: (path, keyword arguments of aiohttp's post)."""
        raise NotImplementedError

    def answered(self, answer: dict) -> int:
        """How many items the answer holds correctly (0: a wrong answer)."""
        raise NotImplementedError

    async def call(self, session, url: str, i: int) -> tuple[bool, int]:
        path, kwargs = self.request(i)
        async with session.post(f"{url}{path}", **kwargs) as response:
            if response.status != 200:
                return False, 0
            items = self.answered(await response.json())
            return items > 0, items


class PolicyWorkload(Workload):
    name = "policy"
    unit = "observations"
    description = ("`POST /act` with one CartPole observation per request (real rollout observations); "
                   "raw: `session.run` on the same cartpole model.")

    def __init__(self):
        rollouts = json.loads((ROOT / "loadtests" / "data" / "policy_rollouts.json").read_text())
        self.observations = rollouts["cartpole"]["observations"]

    def raw(self, batch_sizes, seconds):
        _, session = session_for("policy", "cartpole")
        rows = np.asarray(self.observations, np.float32)
        out = {}
        for n in batch_sizes:
            batch = np.ascontiguousarray(rows[:n])
            out[n] = n * timed(lambda: session.run(None, {"observation": batch}), seconds)
        return out

    def request(self, i):
        return "/act", {"json": {"observations": [self.observations[i % len(self.observations)]], "model": "cartpole"}}

    def answered(self, answer):
        return int(len(answer.get("actions", [])) == 1)

    floor = "services.floor:PolicyFloor"

    def wrk_requests(self):
        return [Request(path, "application/json", json.dumps(kwargs["json"]).encode())
                for path, kwargs in map(self.request, range(256))]

    form_batches = (1, 64)
    forms = "`/act` with JSON bodies and answers, or `Content-Type` and `Accept: application/x-npy`"

    def batch_requests(self, batch: int, form: str) -> list[Request]:
        """/act with `batch` observations per request, as JSON or as .npy both ways (request and answer)."""
        from services.contracts.arrays import npy_bytes

        rows = np.asarray(self.observations, np.float32)
        batches = [rows[(k * batch) % (len(rows) - batch):][:batch] for k in range(64)]
        if form == "json":
            return [Request("/act", "application/json", json.dumps({"observations": b.tolist(),
                                                                      "model": "cartpole"}).encode()) for b in batches]
        return [Request("/act?model=cartpole", "application/x-npy", npy_bytes(b), accept="application/x-npy")
                for b in batches]


class PixelPolicyWorkload(Workload):
    name = "policy_pixels"
    service = "policy"
    model = "cartpole_pixels"
    unit = "observations"
    description = ("`POST /act` with one CartPole camera observation per request (4 frames of 32x120, uint8, as "
                   "raw bytes in `observations_b64`; real frames: the model's probe observations); raw: "
                   "`session.run` on the same cartpole_pixels model.")

    def __init__(self):
        self._observations = None

    @property
    def observations(self) -> np.ndarray:
        if self._observations is None:
            with np.load(ROOT / "models" / "policy" / self.model / "probes.npz") as probes:
                self._observations = probes["inputs"]
        return self._observations

    def raw(self, batch_sizes, seconds):
        _, session = session_for("policy", self.model)
        out = {}
        for n in batch_sizes:
            batch = np.ascontiguousarray(self.observations[:n])
            out[n] = n * timed(lambda: session.run(None, {"observation": batch}), seconds)
        return out

    def request(self, i):
        import base64

        observation = self.observations[i % len(self.observations)][None]
        return "/act", {"json": {"observations_b64": base64.b64encode(observation.tobytes()).decode(),
                                 "shape": list(observation.shape), "model": self.model}}

    def answered(self, answer):
        return int(len(answer.get("actions", [])) == 1)

    floor = "services.floor:PolicyFloor"

    def wrk_requests(self):
        return [Request(path, "application/json", json.dumps(kwargs["json"]).encode())
                for path, kwargs in map(self.request, range(64))]


class GeneratorWorkload(Workload):
    name = "generator"
    unit = "images"
    per_request = 8
    description = ("`POST /generate` with n=8 and a fresh seed per request, JSON with base64 PNGs; raw: seed to "
                   "latent, `session.run`, uint8 conversion and PNG encoding of every image, in-process.")

    def raw(self, batch_sizes, seconds, encode: bool = True):
        """Seed to latent, session.run, uint8 conversion and (encode) PNG encoding, in-process."""
        from services.contracts.imaging import png_bytes
        from services.contracts.latents import model_inputs, seed_latent, to_uint8

        entry, session = session_for("generator", "fashion")
        contract = entry.card["contract"]
        input_name = session.get_inputs()[0].name
        out = {}
        for n in batch_sizes:
            def work():
                latents = np.stack([seed_latent(s, contract["latent_dim"]) for s in range(n)])
                inputs = model_inputs(latents, np.arange(n) % 10, contract.get("classes"))
                images = to_uint8(session.run(None, {input_name: inputs})[0])
                return [png_bytes(image) for image in images] if encode else images
            out[n] = n * timed(work, seconds)
        return out

    def request(self, i):
        return "/generate", {"json": {"n": self.per_request, "seed": (i * self.per_request) % 2**31, "format": "json"}}

    def answered(self, answer):
        return self.per_request if len(answer.get("images", [])) == self.per_request else 0

    floor = "services.floor:GeneratorFloor"
    form_batches = (8, 64)
    forms = "`/generate` answering JSON with base64 PNGs, or `Accept: application/x-npy`: uint8 [N, 28, 28]"

    def raw_model(self, batch_sizes, seconds):
        """The generation alone, no PNG: what the .npy answer is measured against."""
        return self.raw(batch_sizes, seconds, encode=False)

    def batch_requests(self, batch: int, form: str) -> list[Request]:
        accept = "application/x-npy" if form == "npy" else ""
        return [Request("/generate", "application/json", json.dumps({"n": batch, "seed": k * batch}).encode(),
                        accept=accept) for k in range(64)]

    def wrk_requests(self):
        return [Request(path, "application/json", json.dumps(kwargs["json"]).encode())
                for path, kwargs in map(self.request, range(256))]


class ClassifierWorkload(Workload):
    name = "classifier"
    unit = "images"
    per_request = 8
    description = ("`POST /classify` with 8 real Fashion-MNIST test images per request (multipart; PNG and JPEG at "
                   "28 to 112 px); raw: decoding, preprocessing, `session.run` and the out-of-domain score "
                   "(services/contracts/domain.py) on the same files, in-process.")

    def raw(self, batch_sizes, seconds):
        from loadtests.classifier_data import domain_check, model, preprocess, samples

        files = [data for _, data, _ in samples()]
        _, session = model()
        check = domain_check()
        input_name = session.get_inputs()[0].name
        out = {}
        for n in batch_sizes:
            chunk = (files * (n // len(files) + 1))[:n]
            out[n] = n * timed(lambda: check.scores(session.run(None, {input_name: preprocess(chunk)})[1]), seconds)
        return out

    def request(self, i):
        from loadtests.classifier_data import samples

        pool = samples()
        return "/classify", {"data": aiohttp_form([pool[(i + k) % len(pool)] for k in range(self.per_request)])}

    def answered(self, answer):
        return self.per_request if len(answer.get("predictions", [])) == self.per_request else 0

    floor = "services.floor:ClassifierFloor"

    def wrk_requests(self):
        from loadtests.classifier_data import samples

        pool = samples()
        requests = []
        for i in range(0, len(pool), self.per_request):
            files = [(name, data, "image/png" if name.endswith("png") else "image/jpeg")
                     for name, data, _ in pool[i:i + self.per_request]]
            body, content_type = multipart(files)
            requests.append(Request("/classify", content_type, body))
        return requests


def aiohttp_form(files):
    import aiohttp

    form = aiohttp.FormData()
    for name, data, _ in files:
        form.add_field("images", data, filename=name, content_type="image/png" if name.endswith("png") else "image/jpeg")
    return form


WORKLOADS: dict[str, Workload] = {"policy": PolicyWorkload(), "policy_pixels": PixelPolicyWorkload(),
                                  "generator": GeneratorWorkload(), "classifier": ClassifierWorkload()}
