"""Locust load test of the classifier: real Fashion-MNIST test images (PNG and JPEG, 28 to 112 px).

    python -m loadtests.run classifier        # headless, with reports and the SLO gate

Every answer is checked: one prediction list per image in upload order, and each top-1 label
equal to the shipped model's offline label for that file (loadtests/classifier_data.py);
embeddings must be unit vectors.
"""

from __future__ import annotations

import math
import random

from locust import tag, task

from loadtests.classifier_data import samples
from loadtests.run import service_url
from loadtests.users import ServiceUser

SAMPLES = samples()


class ClassifierUser(ServiceUser):
    host = service_url("classifier")

    def _files(self, count: int):
        chosen = random.sample(SAMPLES, count)
        files = [("images", (name, data, "image/png" if name.endswith("png") else "image/jpeg"))
                 for name, data, _ in chosen]
        return chosen, files

    @tag("classifier", "classify")
    @task(6)
    def classify(self):
        count = random.choice([1, 1, 2, 4, 8])
        chosen, files = self._files(count)
        with self.client.post("/classify", files=files, data={"top_k": "3"}, name=f"/classify x{count}",
                              catch_response=True) as response:
            if response.status_code != 200:
                return response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            predictions = response.json().get("predictions", [])
            if len(predictions) != count or any(len(p) != 3 for p in predictions):
                return response.failure(f"expected {count} lists of 3 predictions")
            for (name, _, expected), top in zip(chosen, predictions):
                if top[0]["label"] != expected:
                    return response.failure(f"{name}: served {top[0]['label']!r}, offline {expected!r}")
            response.success()

    @tag("classifier", "embed")
    @task(2)
    def embed(self):
        chosen, files = self._files(2)
        with self.client.post("/embed", files=files, name="/embed x2", catch_response=True) as response:
            if response.status_code != 200:
                return response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            embeddings = response.json().get("embeddings", [])
            norms = [math.sqrt(sum(v * v for v in e)) for e in embeddings]
            if len(embeddings) != 2 or any(abs(n - 1) > 1e-3 for n in norms):
                return response.failure(f"expected 2 unit embeddings, got norms {norms}")
            response.success()
