"""The model control API, the same on every service (the shared HTTP layer routes to it):

    POST /models/{name}/versions/{version}/load     {"min_agreement": 0.9}   verify, warm up, gate
    POST /models/{name}/serve                       {"version": "2", "force": false}   switch or roll back
    POST /models/{name}/versions/{version}/unload   free a version that is not serving

Admin operations: off unless ADMIN_KEY is set (403 admin_disabled), and then they take only
`Authorization: Bearer <ADMIN_KEY>` (API_KEY does not open them, nor does ADMIN_KEY open the
inference endpoints). Loading runs on a thread: requests keep being answered meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re

from services.runtime.errors import ApiError, bad_request, shown

ROUTE = re.compile(r"^/models/(?P<name>[^/]+)/"
                   r"(?:versions/(?P<version>[^/]+)/(?P<action>load|unload)|(?P<serve>serve))$")
MAX_BODY = 4096
FIELDS = {"load": {"min_agreement"}, "unload": set(), "serve": {"version", "force"}}


def is_admin_path(path: str) -> bool:
    return path.startswith("/models/")


def authorize(admin_key: str | None, authorization: str | None) -> None:
    if admin_key is None:
        raise ApiError(403, "admin_disabled", "the model control API is off; set ADMIN_KEY to turn it on")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong admin key: send 'Authorization: Bearer <ADMIN_KEY>'",
                       field="Authorization")


def parse(method: str, path: str, body: bytes) -> tuple[str, str, dict]:
    """(action, model name, arguments) of an admin request; ApiError naming what is wrong."""
    match = ROUTE.match(path)
    if match is None:
        raise ApiError(404, "not_found", f"no admin route {shown(path)}; there are POST /models/{{name}}/versions/"
                       "{version}/load, .../unload and POST /models/{name}/serve")
    if method != "POST":
        raise ApiError(405, "method_not_allowed", f"{path} takes POST")
    action = "serve" if match["serve"] else match["action"]
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise bad_request("invalid_request", f"the body is not valid JSON: {exc}", "body") from None
    if not isinstance(data, dict):
        raise bad_request("invalid_request", "the body must be a JSON object", "body")
    for key in data:
        if key not in FIELDS[action]:
            raise bad_request("unknown_field", f"unknown field {shown(key)}; {action} takes "
                              f"{sorted(FIELDS[action]) or 'no fields'}", key)
    args = {}
    if action in ("load", "unload"):
        args["version"] = match["version"]
    if action == "load" and "min_agreement" in data:
        value = data["min_agreement"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            raise bad_request("invalid_field", f"min_agreement must be a number from 0 to 1, got {shown(value)}",
                              "min_agreement")
        args["min_agreement"] = float(value)
    if action == "serve":
        version = data.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str) or not version.isdigit():
            raise bad_request("invalid_field", f"version must name a version folder, e.g. \"2\", got {shown(version)}",
                              "version")
        force = data.get("force", False)
        if not isinstance(force, bool):
            raise bad_request("invalid_field", "force must be true or false", "force")
        args.update(version=version, force=force)
    return action, match["name"], args


async def run(runtime, action: str, name: str, args: dict) -> dict:
    """The runtime's control call, off the event loop (loading and gating take seconds)."""
    method = {"load": runtime.load_version, "unload": runtime.unload_version, "serve": runtime.serve_version}[action]
    return await asyncio.to_thread(method, name, **args)


ERRORS = {
    "400": "invalid body: the code and field say which",
    "401": "missing or wrong admin key (ADMIN_KEY)",
    "403": "admin_disabled: ADMIN_KEY is not set; or cross_origin",
    "404": "unknown model, version folder, or version not loaded",
    "405": "admin routes take POST",
    "408": "the body did not arrive within BODY_TIMEOUT",
    "409": "version_serving: the serving version cannot be unloaded; untaught_version (classifier)",
    "413": "a body over 4 KiB",
    "422": "version_refused (sha256, onnxruntime) or gate_failed (the gate's report is in `gate`)",
    "503": "not ready, or the choice cannot be recorded in MODEL_CONTROL_DIR",
}


def openapi_paths(models: list[str]) -> dict:
    """The model control API in the OpenAPI document (BentoML does not route it, so it would
    not be there otherwise)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    answer = {"200": {"description": "done", "content": {"application/json": {"schema": {"type": "object"}}}},
              **{status: {"description": text, "content": error} for status, text in ERRORS.items()}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": sorted(models)}}
    version = {"name": "version", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[0-9]+$"}}

    def operation(summary: str, parameters: list, body: dict | None = None) -> dict:
        op = {"tags": ["Model control (ADMIN_KEY)"], "summary": summary, "parameters": parameters,
              "responses": answer}
        if body is not None:
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, **body}}}}
        return {"post": op}

    return {
        "/models/{name}/versions/{version}/load": operation(
            "Verify, warm up and gate a version beside the serving one", [name, version],
            {"properties": {"min_agreement": {"type": "number", "minimum": 0, "maximum": 1,
                                              "description": "default GATE_MIN_AGREEMENT"}}}),
        "/models/{name}/versions/{version}/unload": operation("Free a version that is not serving", [name, version]),
        "/models/{name}/serve": operation(
            "Switch to a loaded version (or roll back)", [name],
            {"required": ["version"], "properties": {
                "version": {"oneOf": [{"type": "string", "pattern": "^[0-9]+$"}, {"type": "integer", "minimum": 0}],
                            "description": "a loaded version, e.g. \"2\""},
                "force": {"type": "boolean", "default": False,
                          "description": "classifier: switch to a version taught nothing"}}}),
    }
