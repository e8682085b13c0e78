"""The framework's floor: bare BentoML services with the same endpoints as ours that do the minimum.

Each parses the same request the same way BentoML would (the same typed fields for JSON, the
multipart form read into memory for uploads) and returns a fixed answer: the JSON file named
by FLOOR_ANSWER, which the benchmark fills with a real answer of our service to the same
request, so the floor serialises an answer of the same size. No model, no checks, none of our
HTTP layer. Served like ours (`bentoml serve`, the same WORKERS and traffic timeout), it is
what any BentoML service costs per request on this machine; served / floor is our share.

FLOOR_FIXES=on gives the floor the same fixes to BentoML our services run with (pauses.py,
hot_path.py): against that floor, served / floor is the cost of our own code alone.

    FLOOR_ANSWER=answer.json bentoml serve services.floor:PolicyFloor
"""

from __future__ import annotations

import json
from typing import Any

import bentoml

from services.runtime.patches import hot_path, pauses
from services.runtime.config import floor_settings, service_options

FIXES, ANSWER = floor_settings()
if FIXES:
    pauses.install_timeout_fix()
    hot_path.install_lean_middlewares()
    hot_path.cache_bound_methods()


def fixed_answer() -> Any:
    pauses.freeze_long_lived("floor", FIXES)
    return json.loads(open(ANSWER).read()) if ANSWER else {}


@bentoml.service(name="policy_floor", **service_options("policy"))
class PolicyFloor:
    def __init__(self) -> None:
        self.answer = fixed_answer()

    @bentoml.api(route="/act")
    async def act(self, observations: list[Any] | None = None, frames_png: list[list[str]] | None = None,
                  observations_b64: str | None = None, shape: list[int] | None = None, model: str | None = None,
                  deterministic: bool = True, seed: int | None = None, version: str | int | None = None) -> dict:
        return self.answer


@bentoml.service(name="generator_floor", **service_options("generator"))
class GeneratorFloor:
    def __init__(self) -> None:
        self.answer = fixed_answer()

    @bentoml.api(route="/generate")
    async def generate(self, n: int | None = None, seed: int | None = None, latents: list[Any] | None = None,
                       truncation: float = 1.0, format: str = "json", model: str | None = None,
                       version: str | int | None = None) -> dict:
        return self.answer


class FormUpload(bentoml.IODescriptor):
    """The multipart form read into memory, each file's bytes kept: the least any service
    that looks at its uploads must do."""
    images: list[Any] = []
    top_k: int = 5

    @classmethod
    async def from_http_request(cls, request, serde):
        form = await request.form()
        files = [await item.read() for item in form.getlist("images") if not isinstance(item, str)]
        return cls.model_construct(images=files)


@bentoml.service(name="classifier_floor", **service_options("classifier"))
class ClassifierFloor:
    def __init__(self) -> None:
        self.answer = fixed_answer()

    @bentoml.api(route="/classify", input_spec=FormUpload)
    async def classify(self, images, top_k=5) -> dict:
        return self.answer


if FIXES:
    for floor in (PolicyFloor, GeneratorFloor, ClassifierFloor):
        hot_path.cache_media_types(floor)
