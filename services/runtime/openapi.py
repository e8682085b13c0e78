"""Make the OpenAPI document (/docs.json) true about errors.

BentoML documents `error` as a string and lists 400, 404 and 500 only; every error the
services answer has the one shape of errors.py, and the shared HTTP layer adds 401, 403,
408, 413, 415, 503 and 504. This rewrites each operation's error responses to that shape.

It also says which models an endpoint's `model` field takes, from what is loaded: their names
(an enum), and `model` required where several are loaded and none is the default (a policy
service with cartpole and lunarlander answers 400 model_required without it).
"""

from __future__ import annotations

ERROR_SCHEMA = {
    "type": "object", "title": "Error", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["status", "code", "field", "message"],
        "properties": {
            "status": {"type": "integer", "description": "the HTTP status, repeated"},
            "code": {"type": "string", "description": "what went wrong, e.g. invalid_observation, body_too_large"},
            "field": {"type": ["string", "null"], "description": "the field, file or header at fault, e.g. "
                                                                 "observations[3], images[0], Origin"},
            "message": {"type": "string", "description": "in plain words, naming the limit or setting involved"},
            "problems": {"type": "array", "description": "each invalid field, when several were",
                         "items": {"type": "object", "properties": {"field": {"type": "string"},
                                                                    "message": {"type": "string"}}}},
        }}},
}
POST_ERRORS = {
    "400": "invalid input: the code and field say which (also invalid_host with ALLOWED_HOSTS)",
    "401": "API_KEY is set and the bearer token is missing or wrong",
    "403": "cross_origin: a web page of an origin not in ALLOWED_ORIGINS",
    "404": "an unknown model (model_not_found) or taught name or id (not_taught)",
    "408": "the body did not arrive within BODY_TIMEOUT",
    "413": "a body, file or image over its limit",
    "415": "the wrong Content-Type for this endpoint",
    "500": "a bug: never the client's fault (the log has the details)",
    "503": "not ready: models loading or failed, or the taught-examples store is unavailable",
    "504": "not answered within REQUEST_TIMEOUT; the work was stopped",
}


def describe_errors(document: dict, extra: dict[str, str] | None = None,
                    models: dict[str, tuple[list[str], bool]] | None = None) -> dict:
    """The document with every operation's 4xx/5xx responses in the error shape; `models` maps
    a route to the names its `model` field takes and whether the field is required."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for stale in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(stale, None)
    schemas["Error"] = ERROR_SCHEMA
    errors = {**POST_ERRORS, **(extra or {})}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status in [s for s in responses if s[0] in "45"]:
                del responses[status]
            if models and path in models:
                _model_field(operation, *models[path])
            wanted = errors if method == "post" else ({"503": "not ready"} if path == "/readyz" else {})
            for status, description in sorted(wanted.items()):
                responses[status] = {"description": description, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return document


def _model_field(operation: dict, names: list[str], required: bool) -> None:
    for content in operation.get("requestBody", {}).get("content", {}).values():
        schema = content.get("schema", {})
        field = schema.get("properties", {}).get("model")
        if field is None or not names:
            continue
        field["enum"] = sorted(names)
        if required:
            field.pop("default", None)
            schema["required"] = sorted({*schema.get("required", []), "model"})


def describe_arrays(document: dict, routes: dict[str, dict]) -> dict:
    """Routes that also take or give NumPy .npy arrays (services/arrays.py): that request body,
    that answer, and the 406 for an Accept header that takes neither JSON nor .npy."""
    binary = lambda description: {"schema": {"type": "string", "format": "binary", "description": description}}
    for route, forms in routes.items():
        operation = document.get("paths", {}).get(route, {}).get("post")
        if operation is None:
            continue
        if forms.get("request"):
            operation.setdefault("requestBody", {}).setdefault("content", {})["application/x-npy"] = \
                binary(forms["request"])
        if forms.get("answer"):
            responses = operation.setdefault("responses", {})
            responses.setdefault("200", {"description": "OK"}).setdefault("content", {})["application/x-npy"] = \
                binary(forms["answer"])
            responses["406"] = {"description": "the Accept header takes neither application/json nor "
                                               "application/x-npy", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return document
