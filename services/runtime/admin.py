"""The model control API, the same on every service (the shared HTTP layer routes to it):

    POST /models/{name}/versions/{version}/load     {"min_agreement": 0.9}   verify, warm up, gate
    POST /models/{name}/serve                       {"version": "2", "force": false}   switch or roll back
    POST /models/{name}/versions/{version}/unload   free a version that is not serving
    POST /models/{name}/canary                      {"version": "2", "share": 0.1}   release it to a slice
    POST /models/{name}/canary/stop                 end a canary or shadow (canary.py)

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

from services.contracts import repository
from services.runtime.canary import ABOVE_MINIMUM, PLAN_FIELDS, Plan
from services.runtime.errors import ApiError, bad_request, shown

ROUTE = re.compile(r"^/models/(?P<name>[^/]+)/"
                   r"(?:versions/(?P<version>[^/]+)/(?P<action>load|unload)|(?P<serve>serve)"
                   r"|(?P<canary>canary)(?P<stop>/stop)?)$")
MAX_BODY = 4096
VERSION_PATTERN = "^[0-9]{1,20}$"  # repository.VERSION_NAME
FIELDS = {"load": {"min_agreement"}, "unload": set(), "serve": {"version", "force"},
          "canary": {"version", *PLAN_FIELDS}, "canary_stop": set()}
MODES = ("canary", "shadow")


def is_admin_path(path: str) -> bool:
    return path.startswith("/models/")


def route_template(path: str) -> str:
    """/models/cartpole/versions/2/load -> /models/{name}/versions/{version}/load (span names)."""
    match = ROUTE.match(path)
    if match is None:
        return "/models/(unknown route)"
    if match["version"] is not None:
        return f"/models/{{name}}/versions/{{version}}/{match['action']}"
    return "/models/{name}/serve" if match["serve"] else "/models/{name}/canary" + ("/stop" if match["stop"] else "")


def key_bytes(key: str) -> bytes:
    """A key from the environment as the bytes a client must send: UTF-8, and bytes that were not
    UTF-8 kept as they were (os.environ holds those as surrogates)."""
    return key.encode("utf-8", "surrogateescape")


def bearer_matches(authorization: str | None, key: bytes) -> bool:
    """`Authorization: Bearer <key>`, compared as bytes in constant time. The header arrives as
    latin-1 (one character per byte), so its bytes are exactly the client's; only spaces and tabs
    around the token are dropped (str.strip would also drop a no-break space, U+00A0)."""
    scheme, _, token = (authorization or "").partition(" ")
    try:
        sent = token.strip(" \t").encode("latin-1")
    except UnicodeEncodeError:  # not from an HTTP header: no byte form, no match
        return False
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, key)


def authorize(admin_key: str | None, authorization: str | None) -> None:
    if admin_key is None:
        raise ApiError(403, "admin_disabled", "the model control API is off; set ADMIN_KEY to turn it on")
    if not bearer_matches(authorization, key_bytes(admin_key)):
        raise ApiError(401, "unauthorized", "missing or wrong admin key: send 'Authorization: Bearer <ADMIN_KEY>'",
                       field="Authorization")


def version_name(value, where: str) -> str:
    """A version as named in the URL or the body: 1 to 20 ASCII digits (not "..", not "١")."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not repository.is_version_name(value):
        raise bad_request("invalid_field", f"the version in {where} must be a version folder's number, 1 to 20 "
                          f"ASCII digits (e.g. \"2\"), got {shown(value)}", "version")
    return value


def parse(method: str, path: str, body: bytes) -> tuple[str, str, dict]:
    """(action, model name, arguments) of an admin request; ApiError naming what is wrong."""
    match = ROUTE.match(path)
    if match is None:
        raise ApiError(404, "not_found", f"no admin route {shown(path)}; there are POST /models/{{name}}/versions/"
                       "{version}/load, .../unload, POST /models/{name}/serve, /canary and /canary/stop")
    if method != "POST":
        raise ApiError(405, "method_not_allowed", f"{path} takes POST")
    action = "serve" if match["serve"] else ("canary_stop" if match["stop"] else "canary") if match["canary"] \
        else match["action"]
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
        args["version"] = version_name(match["version"], "the path")
    if action == "load" and "min_agreement" in data:
        value = data["min_agreement"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            raise bad_request("invalid_field", f"min_agreement must be a number from 0 to 1, got {shown(value)}",
                              "min_agreement")
        args["min_agreement"] = float(value)
    if action == "serve":
        version = version_name(data.get("version"), "the body")
        force = data.get("force", False)
        if not isinstance(force, bool):
            raise bad_request("invalid_field", "force must be true or false", "force")
        args.update(version=version, force=force)
    if action == "canary":
        args["version"] = version_name(data.get("version"), "the body")
        args["fields"] = {key: plan_field(key, value) for key, value in data.items() if key != "version"}
    return action, match["name"], args


def plan_field(key: str, value):
    """One canary plan field, checked against PLAN_FIELDS (type and range)."""
    kind, low, high, meaning = PLAN_FIELDS[key]
    if kind is str:
        if value not in MODES:
            raise bad_request("invalid_field", f"mode must be one of {list(MODES)}, got {shown(value)}", key)
        return value
    if key == "min_agreement" and value is None:
        return None  # judge without agreement
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        number = False
    above = key in ABOVE_MINIMUM
    if not number or value > high or (value <= low if above else value < low):
        raise bad_request("invalid_field", f"{key} ({meaning}) must be {'an integer' if kind is int else 'a number'} "
                          f"{'above' if above else 'from'} {low:g} {'up to' if above else 'to'} {high:g}, "
                          f"got {shown(value)}", key)
    return kind(value)


async def run(runtime, action: str, name: str, args: dict) -> dict:
    """The runtime's control call, off the event loop (loading and gating take seconds)."""
    method = {"load": runtime.load_version, "unload": runtime.unload_version, "serve": runtime.serve_version,
              "canary": runtime.releases.start, "canary_stop": runtime.releases.stop}[action]
    return await asyncio.to_thread(method, name, **args)


# What each operation can answer besides 200, as /docs.json lists it (tests/test_admin_hostile.py
# provokes every one of them over HTTP).
COMMON = {
    "400": "invalid body or version name, or a Host not in ALLOWED_HOSTS: the code and field say which",
    "401": "missing or wrong admin key (ADMIN_KEY)",
    "403": "admin_disabled: ADMIN_KEY is not set; or cross_origin",
    "404": "unknown model or version",
    "408": "the body did not arrive within BODY_TIMEOUT",
    "413": "a body over 4 KiB",
    "415": "a body sent as another media type than application/json",
    "503": "not ready, or the choice cannot be recorded in MODEL_CONTROL_DIR",
    "504": "not done within REQUEST_TIMEOUT (waiting for another change, or a slow load): the change goes on "
           "and GET /info shows how it ends",
}
ERRORS = {
    "load": {**COMMON, "404": "unknown model or version folder",
             "409": "load_in_progress: another request is loading this version",
             "422": "version_refused (the folder is not what the repository allows, sha256, onnxruntime) or "
                    "gate_failed (the gate's report is in `gate`)"},
    "unload": {**COMMON, "404": "unknown model, or the version is not loaded",
               "409": "version_serving: the serving version cannot be unloaded"},
    "serve": {**COMMON, "404": "unknown model, or the version is not loaded",
              "409": "untaught_version (classifier): the version was taught nothing; force it"},
    "canary": {**COMMON, "404": "unknown model, or the version is not loaded",
               "409": "canary_of_serving (the version serves already) or canary_in_progress (stop that one first)",
               "422": "canary_unsupported: a model whose answers read taught state, or versions that prepare "
                      "inputs differently"},
    "canary_stop": {**COMMON, "404": "unknown model, or no canary running"},
}
ERRORS["unload"]["409"] += "; version_in_canary: stop its canary first"


def openapi_paths(models: list[str]) -> dict:
    """The model control API in the OpenAPI document (BentoML does not route it, so it would
    not be there otherwise)."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    done = {"description": "done", "content": {"application/json": {"schema": {"type": "object"}}}}
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": sorted(models)}}
    version = {"name": "version", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": VERSION_PATTERN, "maxLength": 20}}

    def operation(action: str, summary: str, parameters: list, body: dict | None = None) -> dict:
        answers = {"200": done, **{status: {"description": text, "content": error}
                                   for status, text in sorted(ERRORS[action].items())}}
        op = {"tags": ["Model control (ADMIN_KEY)"], "summary": summary, "parameters": parameters,
              "responses": answers}
        if body is not None:
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False, **body}}}}
        return {"post": op}

    return {
        "/models/{name}/versions/{version}/load": operation(
            "load", "Verify, warm up and gate a version beside the serving one", [name, version],
            {"properties": {"min_agreement": {"type": "number", "minimum": 0, "maximum": 1,
                                              "description": "default GATE_MIN_AGREEMENT"}}}),
        "/models/{name}/versions/{version}/unload": operation("unload", "Free a version that is not serving", [name, version]),
        "/models/{name}/canary": operation(
            "canary", "Release a loaded version to a share of traffic (or a shadow copy), judged live", [name],
            {"required": ["version"], "properties": {
                "version": {"type": "string", "pattern": VERSION_PATTERN, "maxLength": 20},
                **{key: plan_schema(key) for key in PLAN_FIELDS}}}),
        "/models/{name}/canary/stop": operation("canary_stop", "End the running canary; the serving version stays",
                                                [name]),
        "/models/{name}/serve": operation(
            "serve", "Switch to a loaded version (or roll back)", [name],
            {"required": ["version"], "properties": {
                "version": {"oneOf": [{"type": "string", "pattern": VERSION_PATTERN, "maxLength": 20},
                                      {"type": "integer", "minimum": 0, "maximum": 10 ** 20 - 1}],
                            "description": "a loaded version, e.g. \"2\""},
                "force": {"type": "boolean", "default": False,
                          "description": "classifier: switch to a version taught nothing"}}}),
    }


def plan_schema(key: str) -> dict:
    kind, low, high, meaning = PLAN_FIELDS[key]
    if kind is str:
        return {"type": "string", "enum": list(MODES), "default": "canary", "description": meaning}
    schema = {"type": "integer" if kind is int else "number", "maximum": high, "description": meaning,
              "default": Plan.__dataclass_fields__[key].default}
    schema["minimum"] = low
    if key in ABOVE_MINIMUM:
        schema["exclusiveMinimum"] = True  # OpenAPI 3.0's form
    if key == "min_agreement":
        schema.update(nullable=True, description=meaning + "; default GATE_MIN_AGREEMENT, null: not judged")
        schema.pop("default")
    return schema
