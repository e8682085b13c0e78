"""Settings, read once from the environment. The README's configuration table lists them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")
ACCESS_LOG_MODES = ("sampled", "all", "off")


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _positive(name: str, default: float, unit: str = "seconds") -> float:
    value = _float(name, default)
    if not value > 0:
        raise ValueError(f"{name}={value} must be a positive number of {unit}")
    return value


def service_options(service: str) -> dict:
    """@bentoml.service options read from the environment when the service module is imported
    (BentoML takes them from the decorator): WORKERS, and BentoML's own traffic timeout set
    past REQUEST_TIMEOUT, so the shared HTTP layer answers a slow request first, in our shape."""
    settings = Settings.from_env(service)
    return {"workers": settings.workers, "traffic": {"timeout": settings.request_timeout + 10}}


def _switch(name: str, default: str = "on") -> bool:
    raw = (os.environ.get(name, default).strip().lower() or default)
    if raw not in ("on", "off", "1", "0", "true", "false"):
        raise ValueError(f"{name}={raw!r} must be on or off")
    return raw in ("on", "1", "true")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ValueError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _fraction(name: str, default: float, maximum: float = 1.0) -> float:
    value = _float(name, default)
    if not 0 <= value <= maximum:  # NaN fails too
        raise ValueError(f"{name}={value} must be a number from 0 to {maximum:g}")
    return value


def _pins(raw: str) -> dict[str, str]:
    """MODEL_VERSIONS="cartpole=1,lunarlander=3" pins versions; unpinned models take the newest."""
    pins = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, version = item.partition("=")
        if not sep or not version.strip().isdigit():
            raise ValueError(f"MODEL_VERSIONS entry {item!r} is not name=<integer version>")
        pins[name.strip()] = version.strip()
    return pins


# Defaults that differ by service; the environment still overrides them.
SERVICE_DEFAULTS = {
    "policy": {"request_timeout": 30.0},
    "classifier": {"max_body_bytes": 64 * 1024 * 1024},  # several full-size photos in one upload
    # 64 requests of 8 images merged into 512 rows ran 5% slower per image than batches of 32:
    # a big batch's activations leave the cache (benchmarks/settings-generator.md)
    "generator": {"batch_max_rows": 32},
}


def _list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name, "").strip()
    return tuple(item.strip() for item in raw.split(",") if item.strip()) if raw else default


@dataclass(frozen=True)
class Settings:
    models_dir: Path = Path("models")
    device: str = "auto"
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_size: int = 256          # items (observations, images) in one request
    batching: bool = True              # merge concurrent requests into one inference batch
    batch_max_rows: int = 512          # rows in one merged inference batch
    batch_wait_ms: float = 0.0         # extra wait for more requests once one is queued
    inline_infer_ms: float = 0.1       # batches expected to run faster than this run on the event loop
    infer_threads: int = 0             # onnxruntime intra-op threads; 0 lets onnxruntime choose
    warmup_min_seconds: float = 0.0    # keep warming up at least this long before ready
    model_versions: dict[str, str] = field(default_factory=dict)
    workers: int = 1                   # worker processes
    request_timeout: float = 60.0      # seconds until a request is answered 504 and its work stopped
    body_timeout: float = 60.0         # seconds to receive a request body (408 after)
    header_timeout: float = 10.0       # seconds to receive a request's headers (the connection closes after)
    allowed_origins: tuple[str, ...] = ()     # web pages allowed to call POST endpoints (CORS); "*": any
    allowed_hosts: tuple[str, ...] = ()       # Host names served; "*": any; (): localhost names on loopback
    admin_key: str | None = None       # bearer key of the model control endpoints; unset: they are off
    gate_min_agreement: float = 0.9    # a new version must agree this much with the serving one
    gate_quality_tolerance: float = 0.05  # a new version's card figure may be this much worse (a fraction)
    control_dir: Path = Path("data")   # <dir>/<service>/serving.json: the versions chosen over the admin API
    control_poll: float = 1.0          # seconds between a worker's looks at that file
    rollout_log_seconds: float = 60.0  # while several versions are loaded: a log line of answers per version
    gc_freeze: bool = True             # exempt what is alive after warm-up from garbage collection (pauses.py)
    access_log: str = "sampled"        # sampled (errors, slow requests, 1 in access_log_sample), all or off
    access_log_sample: int = 100       # log one in this many fast successful requests; 0: none of them
    access_log_slow_ms: float = 1000.0  # requests slower than this are always logged

    @classmethod
    def from_env(cls, service: str | None = None) -> "Settings":
        device = os.environ.get("INFER_DEVICE", "auto").strip().lower() or "auto"
        if device not in DEVICES:
            raise ValueError(f"INFER_DEVICE={device!r} must be one of {', '.join(DEVICES)}")
        batching = _switch("ADAPTIVE_BATCHING")

        def default(key: str):  # this service's own default (SERVICE_DEFAULTS), else the class's
            return SERVICE_DEFAULTS.get(service, {}).get(key, getattr(cls, key))

        return cls(
            models_dir=Path(os.environ.get("MODELS_DIR", "models")),
            device=device,
            api_key=os.environ.get("API_KEY") or None,
            max_body_bytes=_int("MAX_BODY_BYTES", default("max_body_bytes"), minimum=1),
            max_batch_size=_int("MAX_BATCH_SIZE", cls.max_batch_size, minimum=1),
            batching=batching,
            batch_max_rows=_int("BATCH_MAX_ROWS", default("batch_max_rows"), minimum=1),
            batch_wait_ms=_float("BATCH_WAIT_MS", cls.batch_wait_ms),
            inline_infer_ms=_float("INLINE_INFER_MS", cls.inline_infer_ms),
            infer_threads=_int("INFER_THREADS", cls.infer_threads),
            warmup_min_seconds=_float("WARMUP_MIN_SECONDS", cls.warmup_min_seconds),
            model_versions=_pins(os.environ.get("MODEL_VERSIONS", "")),
            workers=_int("WORKERS", 1, minimum=1),
            request_timeout=_positive("REQUEST_TIMEOUT", default("request_timeout")),
            body_timeout=_positive("BODY_TIMEOUT", cls.body_timeout),
            header_timeout=_positive("HEADER_TIMEOUT", cls.header_timeout),
            allowed_origins=_list("ALLOWED_ORIGINS", ()),
            allowed_hosts=_list("ALLOWED_HOSTS", ()),
            admin_key=os.environ.get("ADMIN_KEY") or None,
            gate_min_agreement=_fraction("GATE_MIN_AGREEMENT", cls.gate_min_agreement),
            gate_quality_tolerance=_fraction("GATE_QUALITY_TOLERANCE", cls.gate_quality_tolerance, maximum=10.0),
            control_dir=Path(os.environ.get("MODEL_CONTROL_DIR", "").strip() or "data"),
            control_poll=_positive("MODEL_CONTROL_POLL", cls.control_poll),
            rollout_log_seconds=_positive("ROLLOUT_LOG_SECONDS", cls.rollout_log_seconds),
            gc_freeze=_switch("GC_FREEZE"),
            access_log=_choice("ACCESS_LOG", cls.access_log, ACCESS_LOG_MODES),
            access_log_sample=_int("ACCESS_LOG_SAMPLE", cls.access_log_sample),
            access_log_slow_ms=_positive("ACCESS_LOG_SLOW_MS", cls.access_log_slow_ms, "milliseconds"),
        )

    def limits(self) -> dict:
        return {
            "request_timeout_s": self.request_timeout,
            "body_timeout_s": self.body_timeout,
            "header_timeout_s": self.header_timeout,
            "max_body_bytes": self.max_body_bytes,
            "max_batch_size": self.max_batch_size,
            "adaptive_batching": self.batching,
            "batch_max_rows": self.batch_max_rows,
            "batch_wait_ms": self.batch_wait_ms,
            "inline_infer_ms": self.inline_infer_ms,
        }
