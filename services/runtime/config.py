"""Settings: the one module of the services that reads the environment, once per process
(settings_for), checked at start. The README's configuration table lists every variable; a
bad value stops the service with the variable's name and what it accepts."""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("services.runtime")

DEVICES = ("auto", "cpu", "cuda")
ACCESS_LOG_MODES = ("sampled", "all", "off")


# Old names still read, with a deprecation line in the log: new name -> old name.
RENAMED = {"MAX_REQUEST_ITEMS": "MAX_BATCH_SIZE", "MAX_MERGED_ROWS": "BATCH_MAX_ROWS"}


def _raw(name: str) -> str:
    raw = os.environ.get(name, "").strip()
    old = RENAMED.get(name)
    if not raw and old and os.environ.get(old, "").strip():
        log.warning("%s is deprecated: it is now called %s (the old name still works)", old, name)
        return os.environ[old].strip()
    return raw


def _int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = _raw(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        accepted = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name}={value} must be {accepted}")
    return value


def _float(name: str, default: float) -> float:
    raw = _raw(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if raw and math.isnan(value):
        raise ValueError(f"{name}={raw!r} is not a number")
    return value


def _optional_fraction(name: str, low_open: bool = False) -> float | None:
    """An override in [0, 1] ((0, 1] with low_open), or None when unset (the card's figure applies)."""
    if not _raw(name):
        return None
    value = _float(name, 0.0)
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{name}={value} must be a number from {'above ' if low_open else ''}0 to 1")
    return value


def _text(name: str, default: str = "") -> str:
    return os.environ.get(name, "").strip() or default


def _positive(name: str, default: float, unit: str = "seconds") -> float:
    value = _float(name, default)
    if not value > 0:
        raise ValueError(f"{name}={value} must be a positive number of {unit}")
    return value


def floor_settings() -> tuple[bool, str | None]:
    """The benchmark's bare floor service (services/floor.py): FLOOR_FIXES=on|off, FLOOR_ANSWER=<json file>."""
    return _switch("FLOOR_FIXES", "off"), _text("FLOOR_ANSWER") or None


@functools.cache
def settings_for(service: str | None) -> "Settings":
    """This process's settings for a service, read from the environment the first time only."""
    return Settings.from_env(service)


def service_options(service: str) -> dict:
    """@bentoml.service options read from the environment when the service module is imported
    (BentoML takes them from the decorator): WORKERS, and BentoML's own traffic timeout set
    past REQUEST_TIMEOUT, so the shared HTTP layer answers a slow request first, in our shape."""
    settings = settings_for(service)
    return {"workers": settings.workers, "traffic": {"timeout": settings.request_timeout + 10}}


def _switch(name: str, default: str = "on") -> bool:
    raw = _raw(name).lower() or default
    if raw not in ("on", "off", "1", "0", "true", "false"):
        raise ValueError(f"{name}={raw!r} must be on or off")
    return raw in ("on", "1", "true")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _raw(name).lower() or default
    if raw not in choices:
        raise ValueError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _at_least_zero(name: str, default: float, unit: str = "seconds") -> float:
    value = _float(name, default)
    if not value >= 0:
        raise ValueError(f"{name}={value} must be zero or a positive number of {unit}")
    return value


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
    "generator": {"max_merged_rows": 32},
}


def _tracing() -> str | None:
    """OpenTelemetry's standard variables: traces go out over OTLP when OTEL_TRACES_EXPORTER
    says otlp, or an OTLP endpoint is set and OTEL_TRACES_EXPORTER does not say none. Only the
    http/protobuf protocol is installed; the exporter reads the endpoint, headers, timeout and
    the sampler (OTEL_TRACES_SAMPLER[_ARG]) itself."""
    if _raw("OTEL_SDK_DISABLED").lower() == "true":
        return None
    exporter = _raw("OTEL_TRACES_EXPORTER").lower()
    endpoint = _raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _raw("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter in ("", "none") and not (exporter == "" and endpoint):
        return None
    if exporter not in ("", "otlp"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: this service exports traces with otlp (or none)")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = _raw(name)
        if protocol and protocol != "http/protobuf":
            raise ValueError(f"{name}={protocol!r}: only http/protobuf is installed (no gRPC exporter)")
        if protocol:
            break
    return "otlp"


def _list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = _raw(name)
    return tuple(item.strip() for item in raw.split(",") if item.strip()) if raw else default


@dataclass(frozen=True)
class ClassifierSettings:
    """The classifier's own settings (docs/classifier.md: configuration)."""
    images_per_request: int = 32       # files per request (at most max_request_items)
    image_bytes: int = 8 * 1024 * 1024  # one file
    image_pixels: int = 40_000_000     # one decoded image
    image_side: int = 20_000           # one side of one image
    request_pixels: int = 100_000_000  # all decoded images of one request together
    name_length: int = 64
    taught_examples: int = 10_000
    import_bytes: int = 10_000 * 12 * 1024  # /state/import body: room for an export at taught_examples
    teach_store: str = "sqlite:///data/classifier/taught.db"
    teach_pgvector: str = "auto"
    teach_state_path: Path = Path("data/classifier/taught.json")  # a JSON state of older versions, imported once
    teach_model: str | None = None
    teach_match_threshold: float | None = None  # None: the card's
    face_match_distance: float | None = None    # None: the card's
    face_min_score: float = 0.5        # detections below are not faces
    face_min_size: int = 40            # pixels; smaller faces are found, not used
    face_max_faces: int = 20           # per photo, biggest first
    face_animal_threshold: float | None = None  # None: the card's; 1 turns the animal check off
    domain_threshold: float | None = None       # None: the card's

    BYTES_PER_IMPORTED_EXAMPLE = 12 * 1024  # a 1,536-d embedding in base64 plus its fields, with room

    @classmethod
    def from_env(cls, max_request_items: int) -> "ClassifierSettings":
        taught = _int("MAX_TAUGHT_EXAMPLES", cls.taught_examples, minimum=1)
        score = _float("FACE_MIN_SCORE", cls.face_min_score)
        if not 0 < score < 1:
            raise ValueError(f"FACE_MIN_SCORE={score} must be a number between 0 and 1")
        distance = _float("FACE_MATCH_DISTANCE", 0.0) if _raw("FACE_MATCH_DISTANCE") else None
        if distance is not None and not 0 < distance <= 2:
            raise ValueError(f"FACE_MATCH_DISTANCE={distance} must be a number above 0 and at most 2 "
                             "(distances between unit descriptors)")
        threshold = _float("TEACH_MATCH_THRESHOLD", 0.0) if _raw("TEACH_MATCH_THRESHOLD") else None
        if threshold is not None and not -1 <= threshold <= 1:
            raise ValueError(f"TEACH_MATCH_THRESHOLD={threshold} must be a number from -1 to 1 (a cosine similarity)")
        return cls(
            images_per_request=min(_int("MAX_IMAGES_PER_REQUEST", cls.images_per_request, minimum=1),
                                   max_request_items),
            image_bytes=_int("MAX_IMAGE_BYTES", cls.image_bytes, minimum=1),
            image_pixels=_int("MAX_IMAGE_PIXELS", cls.image_pixels, minimum=1),
            image_side=_int("MAX_IMAGE_SIDE", cls.image_side, minimum=1),
            request_pixels=_int("MAX_REQUEST_PIXELS", cls.request_pixels, minimum=1),
            name_length=_int("MAX_NAME_LENGTH", cls.name_length, minimum=1),
            taught_examples=taught,
            import_bytes=_int("MAX_IMPORT_BYTES", taught * cls.BYTES_PER_IMPORTED_EXAMPLE, minimum=1),
            teach_store=_text("TEACH_STORE", cls.teach_store),
            teach_pgvector=_choice("TEACH_PGVECTOR", cls.teach_pgvector, ("auto", "on", "hnsw", "off")),
            teach_state_path=Path(_text("TEACH_STATE_PATH", str(cls.teach_state_path))),
            teach_model=_text("TEACH_MODEL") or None,
            teach_match_threshold=threshold,
            face_match_distance=distance,
            face_min_score=score,
            face_min_size=_int("FACE_MIN_SIZE", cls.face_min_size, minimum=1),
            face_max_faces=_int("FACE_MAX_FACES", cls.face_max_faces, minimum=1),
            face_animal_threshold=_optional_fraction("FACE_ANIMAL_THRESHOLD", low_open=True),
            domain_threshold=_optional_fraction("DOMAIN_THRESHOLD"),
        )


@dataclass(frozen=True)
class Settings:
    models_dir: Path = Path("models")
    device: str = "auto"
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_request_items: int = 256       # items (observations, images) in one request
    batching: bool = True              # merge concurrent requests into one inference batch
    max_merged_rows: int = 512         # rows in one merged inference batch
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
    tracing: str | None = None         # "otlp" when the OTEL_* variables ask for traces (tracing.py); None: off
    classifier: ClassifierSettings | None = None  # the classifier's own (built for it only)

    @classmethod
    def from_env(cls, service: str | None = None) -> "Settings":
        device = _choice("INFER_DEVICE", "auto", DEVICES)
        batching = _switch("ADAPTIVE_BATCHING")

        def default(key: str):  # this service's own default (SERVICE_DEFAULTS), else the class's
            return SERVICE_DEFAULTS.get(service, {}).get(key, getattr(cls, key))

        return cls(
            models_dir=Path(_text("MODELS_DIR", "models")),
            device=device,
            api_key=os.environ.get("API_KEY") or None,  # not stripped: a key is compared byte for byte
            max_body_bytes=_int("MAX_BODY_BYTES", default("max_body_bytes"), minimum=1),
            max_request_items=(items := _int("MAX_REQUEST_ITEMS", cls.max_request_items, minimum=1)),
            batching=batching,
            max_merged_rows=_int("MAX_MERGED_ROWS", default("max_merged_rows"), minimum=1),
            batch_wait_ms=_at_least_zero("BATCH_WAIT_MS", cls.batch_wait_ms, "milliseconds"),
            inline_infer_ms=_at_least_zero("INLINE_INFER_MS", cls.inline_infer_ms, "milliseconds"),
            infer_threads=_int("INFER_THREADS", cls.infer_threads, maximum=1024),
            warmup_min_seconds=_at_least_zero("WARMUP_MIN_SECONDS", cls.warmup_min_seconds),
            model_versions=_pins(_raw("MODEL_VERSIONS")),
            workers=_int("WORKERS", 1, minimum=1, maximum=256),
            request_timeout=_positive("REQUEST_TIMEOUT", default("request_timeout")),
            body_timeout=_positive("BODY_TIMEOUT", cls.body_timeout),
            header_timeout=_positive("HEADER_TIMEOUT", cls.header_timeout),
            allowed_origins=_list("ALLOWED_ORIGINS", ()),
            allowed_hosts=_list("ALLOWED_HOSTS", ()),
            admin_key=os.environ.get("ADMIN_KEY") or None,
            gate_min_agreement=_fraction("GATE_MIN_AGREEMENT", cls.gate_min_agreement),
            gate_quality_tolerance=_fraction("GATE_QUALITY_TOLERANCE", cls.gate_quality_tolerance, maximum=10.0),
            control_dir=Path(_text("MODEL_CONTROL_DIR", "data")),
            control_poll=_positive("MODEL_CONTROL_POLL", cls.control_poll),
            rollout_log_seconds=_positive("ROLLOUT_LOG_SECONDS", cls.rollout_log_seconds),
            gc_freeze=_switch("GC_FREEZE"),
            access_log=_choice("ACCESS_LOG", cls.access_log, ACCESS_LOG_MODES),
            access_log_sample=_int("ACCESS_LOG_SAMPLE", cls.access_log_sample),
            access_log_slow_ms=_positive("ACCESS_LOG_SLOW_MS", cls.access_log_slow_ms, "milliseconds"),
            tracing=_tracing(),
            classifier=ClassifierSettings.from_env(items) if service == "classifier" else None,
        )

    def limits(self) -> dict:
        return {
            "request_timeout_s": self.request_timeout,
            "body_timeout_s": self.body_timeout,
            "header_timeout_s": self.header_timeout,
            "max_body_bytes": self.max_body_bytes,
            "max_request_items": self.max_request_items,
            "max_batch_size": self.max_request_items,  # its name before MAX_REQUEST_ITEMS, kept for clients
            "adaptive_batching": self.batching,
            "max_merged_rows": self.max_merged_rows,
            "batch_max_rows": self.max_merged_rows,  # its name before MAX_MERGED_ROWS
            "batch_wait_ms": self.batch_wait_ms,
            "inline_infer_ms": self.inline_infer_ms,
        }
