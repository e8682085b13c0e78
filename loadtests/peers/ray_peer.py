"""Ray Serve serving /act or /classify with loadtests/peers/work.py: one replica, `@serve.batch` on.

    python -m loadtests.peers.ray_peer --endpoint act --port 8000

Ray's documented set-up for batching: max_ongoing_requests at least max_batch_size (its
default, 5, would cap a batch at 5), one CPU for the replica; the HTTP proxy, the controller
and Ray's own daemons are separate processes, pinned with the rest to the server's cores.
"""

from __future__ import annotations

import time

import numpy as np
import ray
from ray import serve
from starlette.requests import Request

from loadtests.peers import options, work

args = options.parse(__doc__)


@serve.deployment(num_replicas=1, max_ongoing_requests=args.max_batch, ray_actor_options={"num_cpus": 1})
class Act:
    def __init__(self):
        self.policy = work.Policy()

    @serve.batch(max_batch_size=args.max_batch, batch_wait_timeout_s=args.wait_ms / 1000)
    async def answer(self, batch: list[np.ndarray]) -> list[dict]:
        return self.policy.answers(batch)

    async def __call__(self, request: Request) -> dict:
        return await self.answer(np.asarray((await request.json())["observations"], np.float32))


@serve.deployment(num_replicas=1, max_ongoing_requests=args.max_batch, ray_actor_options={"num_cpus": 1})
class Classify:
    def __init__(self):
        self.classifier = work.Classifier()

    @serve.batch(max_batch_size=args.max_batch, batch_wait_timeout_s=args.wait_ms / 1000)
    async def answer(self, batch: list[list[bytes]]) -> list[dict]:
        return self.classifier.answers(batch)

    async def __call__(self, request: Request) -> dict:
        form = await request.form()
        return await self.answer([await upload.read() for upload in form.getlist("images")])


if __name__ == "__main__":
    ray.init(num_cpus=1, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app = {"act": Act, "classify": Classify}[args.endpoint].bind()
    serve.run(app, route_prefix=f"/{args.endpoint}", blocking=False)
    print("ready", flush=True)
    while True:
        time.sleep(3600)
