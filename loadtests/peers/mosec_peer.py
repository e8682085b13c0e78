"""Mosec serving /act or /classify with loadtests/peers/work.py: one worker, its dynamic batching on.

    python -m loadtests.peers.mosec_peer --endpoint act --port 8000

Mosec hands a worker the request body only (no headers), so the multipart body of /classify
is split here by its first line, the boundary. Its smallest batch wait is 1 ms (0 means its
default, 10 ms).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from mosec import Server, Worker

from loadtests.peers import options, work


class Act(Worker):
    def __init__(self):
        super().__init__()
        self.policy = work.Policy()

    def deserialize(self, data: bytes) -> np.ndarray:
        return np.asarray(json.loads(data)["observations"], np.float32)

    def forward(self, batch: list[np.ndarray]) -> list[dict]:
        return self.policy.answers(batch)

    def serialize(self, answer: dict) -> bytes:
        return json.dumps(answer).encode()


class Classify(Worker):
    def __init__(self):
        super().__init__()
        self.classifier = work.Classifier()

    def deserialize(self, data: bytes) -> list[bytes]:
        return work.multipart_files(data)

    def forward(self, batch: list[list[bytes]]) -> list[dict]:
        return self.classifier.answers(batch)

    def serialize(self, answer: dict) -> bytes:
        return json.dumps(answer).encode()


if __name__ == "__main__":
    args = options.parse(__doc__)
    sys.argv = [sys.argv[0], "--address", "127.0.0.1", "--port", str(args.port)]  # mosec reads its own
    server = Server()
    server.append_worker({"act": Act, "classify": Classify}[args.endpoint], num=1, max_batch_size=args.max_batch,
                         max_wait_time=max(1, round(args.wait_ms)), route=f"/{args.endpoint}")
    server.run()
