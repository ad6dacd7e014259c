"""What the three services' OpenAPI documents say about the answers every route can give (issue 17, point 9).

Each route declares its own answers (a pydantic response model, its 404/422/503 with an error model); `document()`
adds what the request policy in front of every app (services/http_guard.py, services/http_protocol.py) answers
before a route runs — 400 (Host), 401/403 (API keys, with the security schemes), 413/415 (bodies), 408/431 (the
head) and 503 (the time budget) — as it is configured for this process, so /openapi.json describes the server it
comes from. Everything here runs once, when the schema is first asked for: nothing is added to a request's path.
The schema is checked against the running services by tests/test_openapi.py (schemathesis).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from common.id_rule import MAX_ID_LEN, RULE
from common.settings import Settings

# The id rule of common/id_rule.py as JSON Schema: after trimming surrounding whitespace 1..MAX_ID_LEN characters,
# no control characters, no comma. The schema is a little stricter than the rule (it counts the surrounding
# whitespace in maxLength): every id it describes is accepted.
_ID_CHAR = r"[^\x00-\x1f\x7f-\x9f,]"
_ID_CORE = r"[^\s\x00-\x1f\x7f-\x9f,]"  # at least one character that is not whitespace
ID_REGEX = f"{_ID_CHAR}*{_ID_CORE}{_ID_CHAR}*"
ID_PATTERN = f"^{ID_REGEX}$"
ID_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN, "pattern": ID_PATTERN,
                             "description": f"an id: {RULE} (surrounding whitespace is trimmed)"}
# A comma-separated list of ids in one query parameter (GET /recall's `exclude`); empty = none.
ID_LIST_PATTERN = f"^({ID_REGEX}(,{ID_REGEX})*)?$"


def id_schema(description: str | None = None) -> dict[str, Any]:
    return {**ID_SCHEMA, **({"description": f"{description}: {RULE}"} if description else {})}


def names_pattern(names: Iterable[str]) -> str | None:
    """A pattern for a comma-separated subset of `names` (whitespace around each allowed); None when a name is not
    a plain word (left unconstrained rather than escaped differently by two regex dialects)."""
    names = list(names)
    if not names or not all(re.fullmatch(r"\w+", n, re.ASCII) for n in names):
        return None
    one = r"\s*(" + "|".join(sorted(names, key=len, reverse=True)) + r")\s*"
    return f"^{one}(,{one})*$"


class Error(BaseModel):
    """Every refusal and failure: `{"detail": "<what went wrong, naming the field or setting>"}`."""

    detail: str = Field(description="what went wrong, naming the field, parameter or setting involved")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='where: ["query", "k"], ["body", "exclude"], ...')
    msg: str
    type: str


class ValidationFailure(BaseModel):
    """A bad request: `detail` names the field (a message, or FastAPI-style [{loc, msg, type}] on /recall)."""

    detail: str | list[FieldError]
    errors: list[str] | None = Field(default=None, description="POST /events and /items: the first errors, one each")


def error(description: str, model: type[BaseModel] = Error) -> dict[str, Any]:
    """A `responses=` entry answered with a JSON error body."""
    return {"model": model, "description": description}


def invalid(description: str = "a bad parameter or field, named in `detail`") -> dict[str, Any]:
    return error(description, ValidationFailure)


def text(description: str, media_type: str = "text/plain") -> dict[str, Any]:
    """A `responses=` entry whose body is not JSON (Prometheus' text format, an image)."""
    schema: dict[str, Any] = {"type": "string"}
    if not media_type.startswith("text/"):
        schema["format"] = "binary"
    return {"description": description, "content": {media_type: {"schema": schema}}}


METRICS = {200: text("Prometheus metrics in the text exposition format (`text/plain; version=0.0.4`)")}

_ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "API_READ_KEY for reads, API_WRITE_KEY for writes (the write key also reads)"},
    "Bearer": {"type": "http", "scheme": "bearer", "description": "the same key as `Authorization: Bearer <key>`"},
}


def _add(responses: dict[str, Any], status: int, description: str) -> None:
    entry = responses.get(str(status))
    if entry is None:
        responses[str(status)] = {"description": description, "content": _ERROR_REF}
    elif description not in entry.get("description", ""):
        entry["description"] = f"{entry['description']}; or {description}" if entry.get("description") else description


def document(app: FastAPI, settings: Settings, write_routes: Iterable[tuple[str, str]] = (),
             extra: Any = None) -> None:
    """Make `app.openapi()` also describe the request policy's answers as `settings` configure it (and run
    `extra(schema)` for a service's own additions first)."""
    from services.http_guard import BODY_METHODS, HttpGuard  # (http_guard imports nothing of ours back)

    guard = HttpGuard(None, settings, write_routes)
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        if extra is not None:
            extra(schema)
        secured = False
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                method = method.upper()
                responses = op["responses"]
                if guard.hosts is not None or guard.host_suffixes:
                    _add(responses, 400, "a Host header not in ALLOWED_HOSTS")
                if guard.keys_on and guard._required_keys(method, path) is not None:
                    op["security"] = [{"ApiKey": []}, {"Bearer": []}]
                    secured = True
                    write = guard.write_key_set and (method, path) in guard.write_routes
                    key = "API_WRITE_KEY" if write else "API_READ_KEY"
                    _add(responses, 401, f"no API key sent ({key})")
                    _add(responses, 403, f"an API key that is not valid here ({key})")
                if method in BODY_METHODS:
                    _add(responses, 413, f"a body over HTTP_MAX_BODY_BYTES ({settings.http_max_body_bytes} bytes)")
                    _add(responses, 415, "a body without `Content-Type: application/json`")
                _add(responses, 408, "a request head not received within HTTP_RECEIVE_TIMEOUT_S")
                _add(responses, 431, f"a request line and headers over HTTP_MAX_HEAD_BYTES "
                                     f"({settings.http_max_head_bytes} bytes)")
                _add(responses, 503, f"not answered within REQUEST_BUDGET_S ({settings.request_budget_s:g}s)")
        comps = schema.setdefault("components", {})
        comps.setdefault("schemas", {}).setdefault("Error", Error.model_json_schema())
        if secured:
            comps["securitySchemes"] = SECURITY_SCHEMES
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
