"""NVIDIA Triton (through PyTriton, which bundles a real Triton server) serving the policy or the
classifier with loadtests/peers/work.py: one model instance, Triton's dynamic batching on.

    python -m loadtests.peers.triton_peer --endpoint act --port 8000

Clients speak Triton's own protocol (KServe v2): POST /v2/models/<name>/infer. /act takes
`observation` FP32 [N, 4] and answers `action`, `value`, `probabilities`; /classify takes
`images` BYTES [N, 1] (the files, sent in the binary extension as tritonclient does) and answers
`labels` BYTES [N, 5], `scores` FP64 [N, 5], `in_domain` BOOL [N, 1], `domain_score` FP64 [N, 1].
Triton merges requests along N up to max_batch_size.
"""

from __future__ import annotations

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from loadtests.peers import options, work

MODELS = {"act": "cartpole", "classify": "fashion"}


def bind_policy(triton: Triton, config: ModelConfig) -> None:
    policy = work.Policy()

    @batch
    def infer(observation: np.ndarray) -> dict:
        rows = policy.act(observation)
        return {"action": np.array([[r["action"]] for r in rows], np.int64),
                "value": np.array([[r["value"]] for r in rows], np.float32),
                "probabilities": np.array([r["probabilities"] for r in rows], np.float32)}

    triton.bind(model_name=MODELS["act"], infer_func=infer, config=config,
                inputs=[Tensor(name="observation", dtype=np.float32, shape=(4,))],
                outputs=[Tensor(name="action", dtype=np.int64, shape=(1,)),
                         Tensor(name="value", dtype=np.float32, shape=(1,)),
                         Tensor(name="probabilities", dtype=np.float32, shape=(2,))])


def bind_classifier(triton: Triton, config: ModelConfig) -> None:
    classifier = work.Classifier()

    @batch
    def infer(images: np.ndarray) -> dict:
        rows = classifier.classify([bytes(row[0]) for row in images])
        return {"labels": np.array([[p["label"].encode() for p in r["predictions"]] for r in rows], np.object_),
                "scores": np.array([[p["score"] for p in r["predictions"]] for r in rows], np.float64),
                "in_domain": np.array([[r["in_domain"]] for r in rows], np.bool_),
                "domain_score": np.array([[r["domain_score"]] for r in rows], np.float64)}

    triton.bind(model_name=MODELS["classify"], infer_func=infer, config=config,
                inputs=[Tensor(name="images", dtype=np.bytes_, shape=(1,))],
                outputs=[Tensor(name="labels", dtype=np.bytes_, shape=(5,)),
                         Tensor(name="scores", dtype=np.float64, shape=(5,)),
                         Tensor(name="in_domain", dtype=np.bool_, shape=(1,)),
                         Tensor(name="domain_score", dtype=np.float64, shape=(1,))])


if __name__ == "__main__":
    args = options.parse(__doc__)
    config = ModelConfig(max_batch_size=args.max_batch,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=round(args.wait_ms * 1000)))
    # Triton's gRPC and metrics ports: next to the HTTP one (the harness leaves them free)
    with Triton(config=TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1",
                                    grpc_port=args.port + 1, metrics_port=args.port + 2)) as triton:
        {"act": bind_policy, "classify": bind_classifier}[args.endpoint](triton, config)
        triton.serve()
