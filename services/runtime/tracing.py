"""Traces over OpenTelemetry's OTLP/HTTP, on when the standard OTEL_* variables ask (config.py).

    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \
    OTEL_SERVICE_NAME=policy OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1 make serve

Spans of one request:

    POST /act                      SERVER: http.route, status, model, model.version, error.code
    |-- queue                      waiting for its batch: rows
    |-- batch                      the merged batch: requests, rows; linked to every request it served
    |   `-- onnxruntime.run        provider, rows
    |-- decode / store.*           classifier: decoding uploads, the taught-state store

A merged batch serves several requests, each in its own trace: it is a child of the first
request's span and links to all of them, and each request's `queue` span links to it.
A caller's W3C `traceparent` (and `tracestate`) is joined, so its trace goes on in here.

Off (no variable set), nothing is created: `enabled` is False and every helper returns at once.
The provider is this module's own, not OpenTelemetry's global one, so BentoML's own tracing
settings are left as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from opentelemetry import trace  # the API only (BentoML's dependency); the SDK is imported when on

log = logging.getLogger("services.runtime")

enabled = False
_tracer = None
_propagator = None


def setup(service: str, exporter: str | None) -> None:
    """Start exporting in this worker process (once; BentoML calls the middleware per worker)."""
    global enabled, _tracer, _propagator
    if exporter is None or _tracer is not None:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the service's own name.
    resource = Resource.create({"service.name": service}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER[_ARG]
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # endpoint, headers: OTEL_* too
    _tracer = provider.get_tracer("services.runtime")
    _propagator = TraceContextTextMapPropagator()
    enabled = True
    log.info("%s: exporting traces over OTLP/HTTP (sampler %s)", service, type(provider.sampler).__name__)


class _Headers:
    """The W3C propagator's getter over ASGI headers."""

    @staticmethod
    def get(scope, key: str):
        name = key.encode("latin-1")
        return [v.decode("latin-1") for k, v in scope.get("headers", []) if k == name] or None

    @staticmethod
    def keys(scope):
        return [k.decode("latin-1") for k, _ in scope.get("headers", [])]


def request_span(scope, name: str):
    """The SERVER span of one request, joined to the caller's traceparent; a context manager."""
    parent = _propagator.extract(scope, getter=_Headers)
    return _tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER,
                                         attributes={"http.request.method": scope["method"],
                                                     "url.path": scope["path"]})


async def traced(scope, route: str, handle, receive, send) -> None:
    """handle(scope, receive, send) inside the request's span, which records the answer's status
    and, for an error, its code (from the one error shape, errors.py)."""
    with request_span(scope, f"{scope['method']} {route}") as span:
        answer = {"status": 0}

        async def recording(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif answer["status"] >= 400 and "code" not in answer:
                answer["code"] = _error_code(message.get("body", b""))
            await send(message)

        try:
            await handle(scope, receive, recording)
        finally:
            span.set_attribute("http.response.status_code", answer["status"])
            if answer.get("code"):
                span.set_attribute("error.code", answer["code"])
            if answer["status"] >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, answer.get("code")))


def _error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def annotate(**attributes) -> None:
    """Attributes on the current request's span (no-op when off or outside a request)."""
    if enabled:
            trace.get_current_span().set_attributes({k: v for k, v in attributes.items() if v is not None})


def span(name: str, **attributes):
    """A child span of whatever is current; a no-op context manager when off."""
    if not enabled:
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(name, attributes=attributes)


def current():
    """The current span's context, to hand across the batcher's queue (None when off)."""
    if not enabled:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def now_ns() -> int:
    return time.time_ns()


@contextlib.contextmanager
def batch_spans(queued: list[tuple], rows: int, attributes: dict):
    """Around one merged batch: `queued` holds (request span context, rows, queued at ns) per
    request. The batch span (with onnxruntime.run inside) is the first request's child, linked
    to all; each request gets its `queue` span, ending when the batch starts."""
    contexts = [c for c, _, _ in queued if c is not None]
    if not contexts:
        yield
        return
    started = now_ns()
    parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0]))
    links = [trace.Link(c) for c in contexts]
    with _tracer.start_as_current_span("batch", context=parent, links=links,
                                       attributes={**attributes, "batch.requests": len(queued),
                                                   "batch.rows": rows}) as batch:
        for context, part, at in queued:
            if context is not None:
                wait = _tracer.start_span("queue", context=trace.set_span_in_context(trace.NonRecordingSpan(context)),
                                          links=[trace.Link(batch.get_span_context())], start_time=at,
                                          attributes={"queue.rows": part, **attributes})
                wait.end(end_time=started)
        with _tracer.start_as_current_span("onnxruntime.run", attributes={**attributes, "rows": rows}):
            yield
