"""Prometheus metrics beyond BentoML's own, exposed on the same /metrics.

Created on first use inside the worker process: BentoML sets PROMETHEUS_MULTIPROC_DIR
when the worker starts, after the service module is imported, and prometheus_client
must see it before any metric is made.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def metrics():
    import prometheus_client as prom

    return {
        "inference_seconds": prom.Histogram(
            "model_inference_seconds", "Time of one onnxruntime run (one batch)",
            ["service", "model", "version", "provider"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        ),
        "batch_size": prom.Histogram(
            "model_batch_size", "Rows per inference batch formed by adaptive batching",
            ["service", "model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        ),
        "model_info": prom.Gauge(
            "model_info", "Loaded model version (value 1), with the provider in use",
            ["service", "model", "version", "sha256", "provider"], multiprocess_mode="liveall",
        ),
        "serving": prom.Gauge(
            "model_serving", "1 for the version of each model that serves requests, 0 for the others loaded",
            ["service", "model", "version"], multiprocess_mode="liveall",
        ),
        "answers": prom.Counter(
            "model_requests", "Requests taken by each model version", ["service", "model", "version"],
        ),
        "canary_decisions": prom.Counter(
            "model_canary_decisions", "Canaries and shadows ended, by outcome (promoted, rolled_back, stopped)",
            ["service", "model", "version", "outcome"],
        ),
        "canary_active": prom.Gauge(
            "model_canary_active", "1 while the version is in a canary or shadow of the model",
            ["service", "model", "version", "mode"], multiprocess_mode="liveall",
        ),
        "errors": prom.Counter(
            "api_errors", "Error responses by code", ["service", "status", "code"],
        ),
        "model_errors": prom.Counter(
            "model_errors", "Error responses of requests that had taken a model, by its version and the code",
            ["service", "model", "version", "status", "code"],
        ),
        "ready": prom.Gauge(
            "service_ready", "1 once every model is loaded and warmed up (what /readyz says), else 0",
            ["service"], multiprocess_mode="liveall",
        ),
        "queue_rows": prom.Gauge(
            "model_queue_rows", "Rows waiting for the next batch when a batch starts", ["service", "model"],
            multiprocess_mode="liveall",
        ),
        "store_up": prom.Gauge(
            "taught_store_up", "1 while the classifier's taught-examples store answers, 0 when it does not",
            ["service"], multiprocess_mode="liveall",
        ),
        "store_seconds": prom.Histogram(
            "taught_store_seconds", "Time of one taught-examples store call", ["service", "operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        ),
    }
