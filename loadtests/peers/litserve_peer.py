"""LitServe serving /act or /classify with loadtests/peers/work.py: one worker, its batching on.

    python -m loadtests.peers.litserve_peer --endpoint act --port 8000
"""

from __future__ import annotations

import numpy as np
import litserve as ls

from loadtests.peers import options, work


class Act(ls.LitAPI):
    def setup(self, device):
        self.policy = work.Policy()

    def decode_request(self, request):
        return np.asarray(request["observations"], np.float32)

    def batch(self, inputs):
        return inputs  # the requests' arrays, merged by work.Policy.answers

    def predict(self, batch):
        return self.policy.answers(batch)

    def unbatch(self, output):
        return output

    def encode_response(self, answer):
        return answer


class Classify(ls.LitAPI):
    def setup(self, device):
        self.classifier = work.Classifier()

    def decode_request(self, request):
        return [upload.file.read() for upload in request.getlist("images")]

    def batch(self, inputs):
        return inputs

    def predict(self, batch):
        return self.classifier.answers(batch)

    def unbatch(self, output):
        return output

    def encode_response(self, answer):
        return answer


if __name__ == "__main__":
    args = options.parse(__doc__)
    api = {"act": Act, "classify": Classify}[args.endpoint](
        max_batch_size=args.max_batch, batch_timeout=args.wait_ms / 1000, api_path=f"/{args.endpoint}")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False)
