"""The HTTP layer every service shares, as one ASGI middleware around BentoML's app:

- Hosts: a request whose Host header names a host the service does not answer to gets 400, so
  a DNS rebinding page (its name pointed at the service) cannot reach it by a name of its own.
  ALLOWED_HOSTS lists them; unset, a connection that arrived on a loopback address takes only
  `localhost` names, and one on another interface any. IP literals are always answered (no DNS
  name, no rebinding), and health probes are exempt.
- Cross-origin: a state-changing request (POST ...) whose Origin is not the service's own
  gets 403 unless ALLOWED_ORIGINS lists it; listed origins get CORS headers and preflight
  answers. So with default settings no web page can teach, forget or import.
- API key: when API_KEY is set, POST endpoints (inference, and any call that changes state)
  need `Authorization: Bearer <key>` (401 otherwise). GET endpoints stay open: health
  (/livez, /healthz, /readyz), /metrics, /info and the OpenAPI docs.
- Connections: request headers not complete within HEADER_TIMEOUT seconds close the
  connection (connections.py); idle kept-alive connections close after uvicorn's 5 s.
- Bodies: over MAX_BODY_BYTES (or the route's own limit) is a 413 before the service sees it;
  a body not complete within BODY_TIMEOUT seconds is a 408. JSON endpoints take only
  `application/json` (or also `application/x-npy` where they say so; 415 otherwise) and a JSON
  body that parses as an object (400 invalid_request otherwise, one debug line, no traceback).
- Access log: one line per request kept by access_log.py (errors, slow, sampled), in place of
  BentoML's line per request.
- Time: a request not answered within REQUEST_TIMEOUT seconds is a 504 in the error shape, and
  its work is cancelled; so is the work of a request whose client has gone away.
- One error shape: BentoML's own 4xx/5xx answers (request validation, unknown route, wrong
  media type) are rewritten into the shape of errors.py, naming the field.
- Admin: /models/... is the model control API (admin.py), behind ADMIN_KEY, not API_KEY.
- GET /ui: the service's web console (consoles.py); GET /info: the service's info();
  GET /: the Swagger UI page without third-party scripts;
  GET /docs.json: BentoML's OpenAPI document with the error responses made true (openapi.py).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
from urllib.parse import urlsplit

from services.runtime import admin, tracing
from services.runtime.access_log import AccessLog
from services.runtime.consoles import HEADERS as CONSOLE_HEADERS
from services.runtime.consoles import Consoles
from services.runtime.config import Settings
from services.runtime.errors import ApiError, clip, error_body, shown
from services.runtime.metrics import metrics
from services.runtime.openapi import describe_arrays, describe_errors

OPEN_METHODS = {"GET", "HEAD", "OPTIONS"}
PROBES = {"/livez", "/healthz", "/readyz", "/metrics"}
KNOWN_PATHS = PROBES | {"/", "/docs.json", "/docs-init.js", "/info"}  # besides the endpoints, /ui and /models
log = logging.getLogger("services.http")

# BentoML's own page loads Google Tag Manager; this one loads only BentoML's bundled Swagger UI,
# with the online validator off (it would send the schema's URL to a third party).
DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en"><head><meta charset="UTF-8"><title>API</title>
<link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
<link rel="stylesheet" type="text/css" href="./static_content/index.css" />
</head><body><div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
<script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
<script src="./docs-init.js" charset="UTF-8"></script>
</body></html>
"""
DOCS_INIT = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "StandaloneLayout"});
};
"""
DOCS_POLICY = b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"


class ServiceHttp:
    def __init__(self, app, service: str, settings: Settings, body_limits: dict[str, int] | None = None,
                 json_routes: dict[str, tuple[str, ...]] | None = None, error_statuses: dict[str, str] | None = None,
                 array_routes: dict[str, dict] | None = None, routes: tuple[str, ...] = ()):
        self.app, self.service, self.max_body_bytes = app, service, settings.max_body_bytes
        self.api_key = admin.key_bytes(settings.api_key) if settings.api_key else None
        self.admin_key = settings.admin_key
        self.body_limits = body_limits or {}  # route -> its own limit (the classifier's /state/import)
        self.json_routes = json_routes or {}  # route -> the media types its body may have, JSON first
        self.allowed_origins = {o.rstrip("/").lower() for o in settings.allowed_origins}
        self.allowed_hosts = {h.lower() for h in settings.allowed_hosts}
        self.request_timeout, self.body_timeout = settings.request_timeout, settings.body_timeout
        self.error_statuses = error_statuses or {}  # a service's own, beyond openapi.POST_ERRORS
        self.array_routes = array_routes or {}  # route -> its .npy request and answer, for /docs.json
        self.consoles = Consoles(service)
        self.access = AccessLog(settings.access_log, settings.access_log_sample, settings.access_log_slow_ms)
        self.routes = KNOWN_PATHS | set(routes) | set(self.json_routes)  # span names (tracing.py)
        tracing.setup(service, settings.tracing)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not tracing.enabled or scope["path"] in PROBES:
            return await self._handle(scope, receive, send)
        await tracing.traced(scope, self._route(scope["path"]), self._handle, receive, send)

    def _route(self, path: str) -> str:
        """A span name's route: the path for the service's own routes, placeholders for names."""
        path = path.rstrip("/") or "/"
        if path in self.routes or path == "/ui" or path.startswith("/ui/"):
            return path
        if admin.is_admin_path(path):
            return admin.route_template(path)
        return "(unknown route)"

    async def _handle(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        send = _with_headers(self.access.wrap(scope, send), NOSNIFF)

        if path not in PROBES and not self._host_allowed(scope):
            return await self._error(send, 400, "invalid_host", f"Host {shown(_header(scope, b'host'))} is not in "
                                     "ALLOWED_HOSTS", field="Host")
        origin = _header(scope, b"origin")
        listed = origin is not None and ("*" in self.allowed_origins or origin.rstrip("/").lower()
                                         in self.allowed_origins)
        if listed:
            send = _with_headers(send, [(b"access-control-allow-origin", origin.encode("latin-1")),
                                        (b"vary", b"Origin")])
        if method == "OPTIONS" and origin is not None and _header(scope, b"access-control-request-method"):
            if listed:
                return await _send_bytes(send, 204, b"", "text/plain", [
                    (b"access-control-allow-methods", b"GET, POST"),
                    (b"access-control-allow-headers", b"Authorization, Content-Type"),
                    (b"access-control-max-age", b"600")])
            return await self._cross_origin(send, origin)

        if method == "GET" and path == "/info":
            return await self._info(send)
        if method == "GET" and path == "/":
            return await _send_bytes(send, 200, DOCS_PAGE, "text/html; charset=utf-8",
                                     [(b"content-security-policy", DOCS_POLICY)])
        if method == "GET" and (path == "/ui" or path.startswith("/ui/")):
            found = self.consoles.get(path)
            if found is None:
                return await self._error(send, 404, "not_found", f"no console file {shown(path)}")
            return await _send_bytes(send, 200, found[0], found[1], CONSOLE_HEADERS)
        if method == "GET" and path == "/docs-init.js":
            return await _send_bytes(send, 200, DOCS_INIT, "text/javascript; charset=utf-8")
        if method == "GET" and path == "/docs.json":
            return await self.app(scope, receive, _rewriting_json(send, self._describe_errors))
        if admin.is_admin_path(path):
            return await self._admin(scope, receive, send, method, path, origin, listed)
        if self.api_key is not None and method not in OPEN_METHODS and not self._authorized(scope):
            return await self._error(send, 401, "unauthorized",
                                     "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     field="Authorization", headers=[(b"www-authenticate", b"Bearer")])
        if method in OPEN_METHODS:
            return await self.app(scope, receive, _reshaping_send(send, self._count))

        if origin is not None and not listed and not _same_origin(origin, scope):
            return await self._cross_origin(send, origin)
        accepted = self.json_routes.get(path)
        media_type = _media_type(scope)
        if accepted and media_type not in accepted:
            return await self._error(send, 415, "unsupported_media_type", f"send the body as {' or '.join(accepted)}, "
                                     f"not {shown(media_type or 'no content type')}", field="Content-Type")
        json_route = accepted and media_type == "application/json"
        limit = self.body_limits.get(path, self.max_body_bytes)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(send, limit)
        try:
            body, complete = await asyncio.wait_for(self._read_body(receive, limit), self.body_timeout)
        except asyncio.TimeoutError:
            return await self._error(send, 408, "body_timeout", f"the request body did not arrive within "
                                     f"{self.body_timeout:g} s (BODY_TIMEOUT)")
        if not complete:
            return await self._too_large(send, limit)
        if json_route and body.strip():
            problem = _json_problem(body)
            if problem:
                return await self._error(send, 400, "invalid_request", problem, field="body")
        return await self._run(scope, body, receive, send)

    async def _run(self, scope, body: bytes, receive, send):
        """The app with its body replayed, cancelled when the client goes away or the request
        takes longer than REQUEST_TIMEOUT (then a 504 in our shape, if nothing was sent yet)."""
        gone = asyncio.Event()
        sent = False

        async def replay():
            nonlocal body
            if body is not None:
                chunk, body = body, None
                return {"type": "http.request", "body": chunk, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch():  # after the body, the only message left is the client's disconnect
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        reshaping = _reshaping_send(send, self._count)

        async def tracking(message):
            nonlocal sent
            sent = True
            await reshaping(message)

        loop = asyncio.get_running_loop()
        app = loop.create_task(self.app(scope, replay, tracking))
        watcher = loop.create_task(watch())
        # The answer, the client leaving and the timeout each end the wait; plain callbacks
        # rather than asyncio.wait, which builds a waiter and two callbacks per request.
        stopped = []
        timer = loop.call_later(self.request_timeout, lambda: stopped.append("timeout") or app.cancel())
        watcher.add_done_callback(lambda _: app.done() or stopped.append("gone") or app.cancel())
        try:
            return await app
        except asyncio.CancelledError:
            if not stopped:
                raise  # this request itself was cancelled (the server is stopping)
        finally:
            timer.cancel()
            watcher.cancel()
        if stopped[0] == "gone":
            log.debug("%s %s: the client went away; its work was cancelled", scope["method"], scope["path"])
        elif not sent:
            await self._error(send, 504, "timeout", f"the request was not answered within "
                              f"{self.request_timeout:g} s (REQUEST_TIMEOUT); its work was stopped")

    async def _admin(self, scope, receive, send, method, path, origin, listed):
        """The model control API (admin.py): its own key, then the usual origin and body rules."""
        import bentoml

        try:
            admin.authorize(self.admin_key, _header(scope, b"authorization"))
            if origin is not None and not listed and not _same_origin(origin, scope):
                return await self._cross_origin(send, origin)
            try:
                body, complete = await asyncio.wait_for(self._read_body(receive, admin.MAX_BODY),
                                                        self.body_timeout)
            except asyncio.TimeoutError:
                return await self._error(send, 408, "body_timeout", f"the request body did not arrive within "
                                         f"{self.body_timeout:g} s (BODY_TIMEOUT)")
            if not complete:
                return await self._too_large(send, admin.MAX_BODY)
            media_type = _media_type(scope)
            if body.strip() and media_type not in ("application/json", ""):  # no type: JSON, as before
                raise ApiError(415, "unsupported_media_type", f"send the body as application/json, not "
                               f"{shown(media_type or 'no content type')}", field="Content-Type")
            action, name, args = admin.parse(method, path, body)
            instance = bentoml.get_current_service()
            if instance is None:
                raise ApiError(503, "not_ready", "the service is starting")
            # A load or switch runs on a thread and cannot be stopped halfway: past REQUEST_TIMEOUT
            # the client gets a 504 saying so, and the change ends on its own.
            change = asyncio.ensure_future(admin.run(instance.runtime, action, name, args))
            try:
                answer = await asyncio.wait_for(asyncio.shield(change), self.request_timeout)
            except asyncio.TimeoutError:
                change.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, not logged
                raise ApiError(504, "timeout", f"{action} of {name} was not done within {self.request_timeout:g} s "
                               "(REQUEST_TIMEOUT); it goes on, and GET /info shows how it ends") from None
        except ApiError as exc:
            headers = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else ()
            return await self._error(send, exc.status, exc.code, exc.message, exc.field, headers, **exc.extra)
        logging.getLogger("services.runtime").info("%s: admin %s %s -> %s", self.service, method, path,
                                                   {k: v for k, v in answer.items() if k != "gate"})
        await _send_json(send, 200, answer)

    def _describe_errors(self, document: dict) -> dict:
        import bentoml

        instance = bentoml.get_current_service()
        choices = getattr(instance, "model_choices", None)
        document = describe_arrays(describe_errors(document, self.error_statuses, choices() if choices else None),
                                   self.array_routes)
        runtime = getattr(instance, "runtime", None)
        document.setdefault("paths", {}).update(admin.openapi_paths(sorted(runtime.versions) if runtime else []))
        return document

    def _host_allowed(self, scope) -> bool:
        if "*" in self.allowed_hosts:
            return True
        name = _host_name(_header(scope, b"host") or "")
        if _is_ip_literal(name):
            return True
        if not self.allowed_hosts:  # unset: on loopback, only loopback names
            server = scope.get("server") or ("", 0)
            return not name or not _is_loopback(server[0]) or name == "localhost" or name.endswith(".localhost")
        return any(name == h or (h.startswith(".") and (name.endswith(h) or name == h[1:]))
                   for h in self.allowed_hosts)

    def _authorized(self, scope) -> bool:
        return admin.bearer_matches(_header(scope, b"authorization"), self.api_key)

    async def _read_body(self, receive, limit: int) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), True

    async def _too_large(self, send, limit: int):
        setting = "MAX_BODY_BYTES" if limit == self.max_body_bytes else "this route's limit"
        await self._error(send, 413, "body_too_large", f"request body is over the limit of {limit} bytes ({setting})")

    async def _cross_origin(self, send, origin: str):
        await self._error(send, 403, "cross_origin", f"requests from the web page at {shown(origin)} are refused; "
                          "list its origin in ALLOWED_ORIGINS to allow them", field="Origin")

    async def _info(self, send):
        import bentoml

        instance = bentoml.get_current_service()
        if instance is None:
            return await self._error(send, 503, "not_ready", "the service is starting")
        await _send_json(send, 200, instance.info())

    def _count(self, status: int, code: str) -> None:
        metrics()["errors"].labels(self.service, str(status), code).inc()

    async def _error(self, send, status, code, message, field=None, headers=(), **extra):
        self._count(status, code)
        log.debug("rejected: %d %s %s", status, code, message)  # one short line, never a traceback
        await _send_json(send, status, error_body(status, code, message, field, **extra), headers)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


NOSNIFF = [(b"x-content-type-options", b"nosniff")]  # a JSON answer is never run as a script or page


def _host_name(host: str) -> str:
    """The name in a Host header: "evil.example:3003" -> "evil.example", "[::1]:3000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@functools.lru_cache(maxsize=1024)
def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _media_type(scope) -> str:
    return (_header(scope, b"content-type") or "").split(";")[0].strip().lower()


def _same_origin(origin: str, scope) -> bool:
    """The page's origin names the host the request was sent to (scheme aside: TLS may end at a proxy)."""
    try:
        return urlsplit(origin).netloc.lower() == (_header(scope, b"host") or "").lower()
    except ValueError:
        return False


def _json_problem(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return f"the body is not valid JSON: {clip(str(exc), 120)}"
    if not isinstance(data, dict):
        return f"the body must be a JSON object, not {type(data).__name__}"
    return None


def _rewriting_json(send, rewrite):
    """Pass a 200 JSON response through `rewrite` (anything else passes untouched)."""
    return _buffered(send, lambda status: status == 200, lambda status, body: rewrite(json.loads(body)))


def _with_headers(send, headers: list):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await send(message)

    return wrapped


async def _send_bytes(send, status: int, payload: bytes, content_type: str, headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


async def _send_json(send, status: int, data, headers=()):
    await _send_bytes(send, status, json.dumps(data).encode(), "application/json", headers)


def _reshaping_send(send, count):
    """Pass responses through; rewrite 4xx/5xx bodies that are not yet in our error shape."""
    def reshape(status: int, body: bytes) -> dict:
        shaped = _as_error_shape(status, body)
        count(status, shaped["error"]["code"])
        return shaped

    return _buffered(send, lambda status: status >= 400, reshape)


def _buffered(send, wanted, rewrite):
    """Hold back a response whose status is `wanted`, and send rewrite(status, body) as JSON instead."""
    state = {"start": None, "chunks": []}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            if not wanted(message["status"]):
                return await send(message)
            state["start"] = message
            return None
        if state["start"] is None:
            return await send(message)
        state["chunks"].append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        start = state["start"]
        payload = json.dumps(rewrite(start["status"], b"".join(state["chunks"]))).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return wrapped


GENERIC_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "body_too_large", 415: "unsupported_media_type", 422: "invalid_request",
                 500: "internal_error", 503: "not_ready", 504: "timeout"}


def _as_error_shape(status: int, body: bytes) -> dict:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "code" in data["error"]:
        return data  # already ours
    if isinstance(data, list) and len(data) == 1:  # BentoML wraps some errors in a 1-tuple
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"]:
        # pydantic validation errors: name each field, e.g. "deterministic: Input should be a valid boolean"
        problems = [{"field": _loc(d.get("loc", ())),
                     "message": "unknown field" if d.get("type") == "extra_forbidden" else d.get("msg", "invalid")}
                    for d in data["detail"]]
        first = problems[0]
        message = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        code = "unknown_field" if first["message"] == "unknown field" else "invalid_request"
        return error_body(status, code, clip(message), first["field"], problems=problems[:20])
    if isinstance(data, dict) and isinstance(data.get("error") or data.get("detail"), str):
        message = data.get("error") or data.get("detail")
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    if status >= 500:
        message = "internal error; see the service log"
    return error_body(status, GENERIC_CODES.get(status, "error"), clip(message))


def _loc(loc) -> str:
    """("observations", 3, 1) -> "observations[3][1]"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return clip(text or "body", 200)
