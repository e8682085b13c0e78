"""Work BentoML 1.4 does on every request that these services do not use, removed.

Found by profiling a policy worker under load (py-spy; docs/flamegraphs/), each measured in
BENCHMARKS.md against a bare BentoML service:

1. The answer's media type. For every response BentoML builds a pydantic TypeAdapter and a JSON
   schema of the endpoint's return type just to learn that it is "application/json" (12% of
   the event loop's time at one client). cache_media_types() works it out once per endpoint.
2. Tracing. Every request runs through OpenTelemetry's ASGI middleware, which opens a span,
   collects its attributes and wraps every message, even when no exporter is configured and
   the sample rate is 0, so nothing is ever recorded. Kept when BentoML's tracing is
   configured (`tracing.exporter_type`), left out otherwise.
3. The access log. BentoML formats and writes one line per request on the event loop. Ours
   (access_log.py) replaces it: every error and slow request, one in ACCESS_LOG_SAMPLE of the
   rest, or every request with ACCESS_LOG=all.
4. The endpoint method. BentoML looks its service method up per request through a descriptor
   that calls inspect.signature() each time (8%); the bound method is the same every time, so
   cache_bound_methods() keeps it on the instance after the first lookup.

Not a cost but a bound: BentoML's request metrics label each request with its raw path, so
BoundedPathMetrics gives them the route's name instead (unknown paths share one label).
"""

from __future__ import annotations

import logging

from services.runtime import admin
from services.runtime.http import KNOWN_PATHS

log = logging.getLogger("services.runtime")


def cache_media_types(service) -> None:
    """Each endpoint's answer media type, computed once the way BentoML computes it per answer."""
    for api in service.apis.values():
        spec = api.output_spec
        if spec.media_type is None:
            spec.media_type = spec.mime_type()


def tracing_configured() -> bool:
    from bentoml._internal.configuration.containers import BentoMLContainer

    return BentoMLContainer.tracing.exporter_type.get() is not None


def install_lean_middlewares() -> None:
    """BentoML's middleware stack without its access log, and without tracing unless configured."""
    from _bentoml_impl.server.app import ServiceAppFactory

    if getattr(ServiceAppFactory, "lean_middlewares", False):
        return
    full = ServiceAppFactory.middlewares.fget

    def middlewares(self):
        from starlette.middleware import Middleware

        dropped = {"AccessLogMiddleware"} | (set() if tracing_configured() else {"OpenTelemetryMiddleware"})
        kept = [m for m in full(self) if getattr(m.cls, "__name__", "") not in dropped]
        routes = frozenset(api.route for api in self.service.apis.values())
        kept = [Middleware(BoundedPathMetrics, metrics=m.cls, routes=routes, **m.kwargs)
                if getattr(m.cls, "__name__", "") == "RunnerTrafficMetricsMiddleware" else m for m in kept]
        log.debug("BentoML middlewares: %s", [getattr(m.cls, "__name__", m.cls) for m in kept])
        return kept

    ServiceAppFactory.middlewares = property(middlewares)
    ServiceAppFactory.lean_middlewares = True


ORIGINAL_PATH = "services.original_path"


def path_label(path: str, routes: frozenset[str]) -> str:
    """The `endpoint` label of a request's metrics: its route, never a path a client made up."""
    stripped = path.rstrip("/") or "/"
    if stripped in routes or stripped in KNOWN_PATHS:
        return stripped
    if stripped == "/ui" or stripped.startswith("/ui/"):
        return "/ui"
    if stripped.startswith("/static_content/"):
        return "/static_content"
    match = admin.ROUTE.match(stripped)
    if match:
        return "/models/{name}/serve" if match["serve"] else f"/models/{{name}}/versions/{{version}}/{match['action']}"
    return "/{unknown}"


class BoundedPathMetrics:
    """BentoML's request metrics (outermost middleware) label every request with its path, so a
    client inventing paths (/nope-1, /nope-2, ... or /models/<anything>/...) would add series
    without end. They see the route's label here; the app inside still sees the real path."""

    def __init__(self, app, metrics, routes: frozenset[str], **options):
        self.metrics, self.routes = metrics(_RealPath(app), **options), routes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            label = path_label(scope["path"], self.routes)
            if label != scope["path"]:
                scope = {**scope, "path": label, ORIGINAL_PATH: scope["path"]}
        await self.metrics(scope, receive, send)


class _RealPath:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if ORIGINAL_PATH in scope:
            scope = {key: value for key, value in scope.items() if key != ORIGINAL_PATH} | {"path": scope[ORIGINAL_PATH]}
        await self.app(scope, receive, send)


def cache_bound_methods() -> None:
    """BentoML's API method descriptor, remembering what it returns for each service instance."""
    from _bentoml_sdk.method import APIMethod

    if getattr(APIMethod, "caches_bound_methods", False):
        return
    bind = APIMethod.__get__

    def get(self, instance, owner):
        if instance is None:
            return self
        bound = instance.__dict__.setdefault("_bentoml_bound_apis", {})
        if self.name not in bound:
            bound[self.name] = bind(self, instance, owner)
        return bound[self.name]

    APIMethod.__get__ = get
    APIMethod.caches_bound_methods = True
