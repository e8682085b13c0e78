"""Locust load test of the generator service: n from 1 to 8, random seeds, every answer checked.

    python -m loadtests.run generator         # headless, with reports and the SLO gate

Each JSON answer must hold n PNG images of the size /info announces, and the seeds used;
one in ten requests repeats a seed already seen and must get the same bytes back.
"""

from __future__ import annotations

import random

from locust import tag, task

from loadtests.checks import PNG_SIGNATURE, check_generate
from loadtests.run import service_url
from loadtests.users import ServiceUser



class GeneratorUser(ServiceUser):
    host = service_url("generator")

    def on_start(self):
        super().on_start()
        info = self.client.get("/info", name="/info").json()
        model = info["models"][0]["contract"]
        self.size = (int(model["image_size"]), int(model["image_size"]))
        self.seen: dict[int, str] = {}

    @tag("generator", "generate")
    @task(8)
    def generate(self):
        n = random.randint(1, 8)
        repeat = self.seen and random.random() < 0.1
        seed = random.choice(list(self.seen)) if repeat else random.randrange(2**32 - 8)
        with self.client.post("/generate", json={"n": n, "seed": seed, "format": "json"},
                              name=f"/generate n={n}", catch_response=True) as response:
            problem = check_generate(response, n, seed, self.size)
            if problem is None and repeat:
                first = response.json()["images"][0]
                problem = None if first == self.seen[seed] else f"seed {seed} gave different bytes"
            if problem is None:
                self.seen.setdefault(seed, response.json()["images"][0])
                response.success()
            else:
                response.failure(problem)

    @tag("generator", "interpolate")
    @task(1)
    def interpolate(self):
        steps = random.choice([4, 8])
        body = {"seed_a": random.randrange(2**32), "seed_b": random.randrange(2**32), "steps": steps,
                "method": random.choice(["slerp", "linear"]), "format": "png"}
        with self.client.post("/interpolate", json=body, name="/interpolate png", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif not response.content.startswith(PNG_SIGNATURE):
                response.failure("the answer is not a PNG")
            else:
                response.success()
