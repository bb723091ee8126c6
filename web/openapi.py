"""The HTTP API's contract: each operation declares its request and response models,
which validate what clients send and also generate the OpenAPI 3.1 document served
at /api/v1/openapi.json, so the document and the code cannot drift.

A thin layer on pydantic, not a framework: Herald's errors are RFC 9457 problems
with field paths and its own statuses (400 for a bad path, query or header, 415,
413, 422 for a bad body), the publish path must stay cheap (pydantic-core
validates in Rust), and the same `Publish` model validates WebSocket publishes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, request
from pydantic import BaseModel
from pydantic import ValidationError as PydanticError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from werkzeug.routing import BaseConverter

from pipeline.core.errors import DataOutOfBounds, InvalidInput, InvalidRequest, Malformed, TooLarge, UnsupportedMedia
from pipeline.core.messages import MAX_DATA_DEPTH, field_errors, loads

REF = "#/components/schemas/{model}"
PROBLEM_MEDIA = "application/problem+json"
# What each automatic status means, for the document.
STANDARD = {
    400: "A path, query or header parameter is invalid, the body is not JSON, or a message's data breaks "
         "an ingest bound (nesting depth, integer size)",
    401: "No valid bearer token",
    403: "The token may not do this",
    413: "The body is too large",
    415: "The body is not of a media type this operation takes",
    422: "The body is invalid; `errors` lists each fault with its path",
    429: "Too many requests; retry after `Retry-After` seconds",
    503: "Kafka, Redis or the archive is unavailable; nothing was done; retry after `Retry-After` seconds",
}
HEADER_DOCS = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}},
    "WWW-Authenticate": {"description": "the scheme to authenticate with", "schema": {"type": "string"}},
    "Allow": {"description": "the methods the resource takes", "schema": {"type": "string"}},
    "X-RateLimit-Limit": {"description": "requests the refusing limit allows per window",
                          "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "requests left in the window (0)", "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"description": "when the window ends (Unix seconds)", "schema": {"type": "integer"}},
}


@dataclasses.dataclass(frozen=True)
class Answer:
    """One documented response: its description, body model (JSON) or raw schema, media type, headers."""

    description: str
    model: type[BaseModel] | None = None
    schema: dict | None = None
    media: str = "application/json"
    headers: tuple[str, ...] = ()


@dataclasses.dataclass
class Operation:
    """An HTTP operation as declared in code: what it takes, what it answers."""

    method: str
    path: str
    endpoint: str
    summary: str
    description: str | None
    auth: str  # "none", "token" or "admin"
    body: type[BaseModel] | None
    body_limit: Callable[[Any], int] | None
    request_media: dict[str, dict] | None  # documented body when the view reads it itself
    path_model: type[BaseModel] | None
    query: type[BaseModel] | None
    headers: type[BaseModel] | None
    answers: dict[int, Answer]
    tags: tuple[str, ...]
    limited: bool  # counted by HERALD_RATE_LIMITS (web/ratelimit.py)


class MessageIdConverter(BaseConverter):
    """A message id in a path, except `batch`: /api/v1/messages/batch is the batch
    endpoint alone (POST), not also the message whose id is "batch"."""

    regex = r"(?!batch(?:/|$))[^/]+"


def openapi_path(rule: str) -> str:
    """A Flask rule (`/messages/<msg_id>`) as an OpenAPI path (`/messages/{msg_id}`)."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def _validate(model: type[BaseModel], values: dict, where: str):
    try:
        return model.model_validate(values)
    except PydanticError as exc:
        raise InvalidRequest(f"The request's {where} is invalid", field_errors(exc)) from None


def read_body(limit: int) -> bytes:
    """The request's raw body, refused (413) past `limit` bytes, from its Content-Length before reading."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"The body is {request.content_length} bytes; the limit is {limit}")
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise TooLarge(f"The body is {len(raw)} bytes; the limit is {limit}")
    return raw


def read_json(limit: int):
    """The request's JSON body, after checking its media type and size (415, 413, 400)."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMedia("Send the body as application/json")
    raw = read_body(limit)
    try:
        return loads(raw)
    except ValueError as exc:
        raise Malformed(f"The body is not valid JSON: {exc}") from None
    except RecursionError:
        # The parser's own bound (about 900 levels here) lies far past the message's.
        raise DataOutOfBounds(f"The body nests too deep to parse; a message's data may nest arrays and objects "
                              f"{MAX_DATA_DEPTH} levels deep") from None


class Contract:
    """The registry of operations, and the decorator that declares one."""

    def __init__(self, authenticate: Callable[[str], Any]):
        # authenticate(level) -> identity, raising for a missing or bad token ("token" or "admin").
        self._authenticate = authenticate
        self.operations: list[Operation] = []
        self._document: tuple | None = None

    def operation(self, blueprint: Blueprint | Any, method: str, rule: str, *, summary: str,
                  description: str | None = None, auth: str = "token", body: type[BaseModel] | None = None,
                  body_limit: Callable[[Any], int] | None = None, request_media: dict[str, dict] | None = None,
                  path: type[BaseModel] | None = None, query: type[BaseModel] | None = None,
                  headers: type[BaseModel] | None = None, answers: dict[int, Answer],
                  tags: tuple[str, ...] = (), limited: bool = True):
        """Declare and register a view. The view gets, as keywords, what was declared:
        `identity` (auth), `path`, `query`, `headers` and `body` (validated models)."""
        prefix = getattr(blueprint, "url_prefix", None) or ""

        def register(view):
            operation = Operation(method.upper(), openapi_path(prefix + rule), view.__name__, summary, description,
                                  auth, body, body_limit, request_media, path, query, headers, answers, tags,
                                  limited)
            self.operations.append(operation)

            @functools.wraps(view)
            def handler(**path_values):
                kwargs = {}
                if auth != "none":
                    kwargs["identity"] = self._authenticate(auth)
                if path is not None:
                    kwargs["path"] = _validate(path, path_values, "path")
                if query is not None:
                    # A parameter given twice reaches the model as a list, which it refuses.
                    values = {k: v[0] if len(v) == 1 else v for k, v in request.args.lists()}
                    kwargs["query"] = _validate(query, values, "query")
                if headers is not None:
                    kwargs["headers"] = _validate(headers, _header_values(headers), "headers")
                if body is not None:
                    document = read_json(body_limit(current_app.extensions["herald"].settings))
                    try:
                        kwargs["body"] = body.model_validate(document)
                    except PydanticError as exc:
                        raise InvalidInput("The body has invalid fields", field_errors(exc)) from None
                return view(**kwargs)

            blueprint.add_url_rule(rule, view_func=handler, methods=[method.upper()])
            return handler

        return register

    def document(self, *, title: str, version: str, description: str) -> dict:
        """The OpenAPI 3.1 document of every registered operation (built once per set of
        operations: they are all declared at import)."""
        key = (title, version, description, len(self.operations))
        if self._document is None or self._document[0] != key:
            self._document = (key, self._build(title, version, description))
        return self._document[1]

    def _build(self, title: str, version: str, description: str) -> dict:
        models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
        for op in self.operations:
            if op.body is not None:
                models[(op.body, "validation")] = None
            for answer in op.answers.values():
                if answer.model is not None:
                    models[(answer.model, "serialization")] = None
        from web.schemas import Problem

        models[(Problem, "serialization")] = None
        names, defs = models_json_schema(list(models), ref_template=REF)
        schemas: dict[str, dict] = {}
        paths: dict[str, dict] = {}
        for op in self.operations:
            paths.setdefault(op.path, {})[op.method.lower()] = _lift_defs(self._operation_doc(op, names), schemas)
        for name, schema in defs.get("$defs", {}).items():
            _add_schema(schemas, name, _lift_defs(schema, schemas))
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version, "description": description},
            "servers": [{"url": "/"}],
            "security": [{"bearer": []}],
            "paths": paths,
            "components": {
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (HS256)"}},
                "schemas": schemas,
            },
        }

    def _operation_doc(self, op: Operation, names: dict) -> dict:
        doc: dict[str, Any] = {"summary": op.summary, "operationId": op.endpoint}
        if op.description:
            doc["description"] = op.description
        if op.tags:
            doc["tags"] = list(op.tags)
        if op.auth == "none":
            doc["security"] = []
        parameters = []
        for model, where in ((op.path_model, "path"), (op.query, "query"), (op.headers, "header")):
            if model is not None:
                parameters += _parameters(model, where)
        if parameters:
            doc["parameters"] = parameters
        if op.body is not None:
            doc["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": names[(op.body, "validation")]}}}
        elif op.request_media:
            doc["requestBody"] = {"required": True, "content": {
                media: {"schema": schema} for media, schema in op.request_media.items()}}
        statuses: dict[int, Answer] = {}
        if op.auth != "none":
            statuses[401] = Answer(STANDARD[401], headers=("WWW-Authenticate",))
        if op.auth == "admin":
            statuses[403] = Answer(STANDARD[403])
        if op.path_model or op.query or op.headers or op.body:
            statuses[400] = Answer(STANDARD[400])
        if op.limited:
            statuses[429] = Answer(STANDARD[429], headers=("Retry-After", "X-RateLimit-Limit",
                                                           "X-RateLimit-Remaining", "X-RateLimit-Reset"))
        if op.body is not None or op.request_media:
            statuses.update({413: Answer(STANDARD[413]), 415: Answer(STANDARD[415]), 422: Answer(STANDARD[422])})
        # gunicorn refuses a request line over limit_request_line (4094 bytes) itself, in HTML.
        statuses[414] = Answer("The request line is longer than 4094 bytes (gunicorn's answer)",
                               schema={"type": "string"}, media="text/html")
        statuses.update(op.answers)
        responses = {}
        for status in sorted(statuses):
            answer = statuses[status]
            entry: dict[str, Any] = {"description": answer.description}
            if status >= 400 and answer.model is None and answer.schema is None:
                entry["content"] = {PROBLEM_MEDIA: {"schema": {"$ref": REF.format(model="Problem")}}}
            elif answer.model is not None:
                entry["content"] = {answer.media: {"schema": names[(answer.model, "serialization")]}}
            elif answer.schema is not None:
                entry["content"] = {answer.media: {"schema": answer.schema}}
            if answer.headers:
                entry["headers"] = {name: HEADER_DOCS[name] for name in answer.headers}
            responses[str(status)] = entry
        doc["responses"] = responses
        return doc


def _lift_defs(node: Any, schemas: dict[str, dict]) -> Any:
    """`node` without the `$defs` of the schemas it holds, which go to `schemas` (the
    components): a raw schema (a rule set's, pipeline/rules/schema.py) carries its
    definitions with it, its references written for the components. `node` is not changed."""
    if isinstance(node, list):
        return [_lift_defs(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$defs":
            for name, schema in value.items():
                _add_schema(schemas, name, _lift_defs(schema, schemas))
        else:
            out[key] = _lift_defs(value, schemas)
    return out


def _add_schema(schemas: dict[str, dict], name: str, schema: dict) -> None:
    if schemas.setdefault(name, schema) != schema:
        raise ValueError(f"two different schemas are named {name}")


def _header_values(model: type[BaseModel]) -> dict:
    values = {}
    for name, field in model.model_fields.items():
        header = field.alias or name
        if header in request.headers:
            values[header] = request.headers[header]
    return values


def _parameters(model: type[BaseModel], where: str) -> list[dict]:
    schema = model.model_json_schema(ref_template=REF)
    required = set(schema.get("required", ()))
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        prop.pop("title", None)
        # An optional parameter is absent, never null: document only its value.
        branches = [b for b in prop.pop("anyOf", ()) if b != {"type": "null"}]
        if len(branches) == 1:
            prop.update(branches[0])
        if prop.get("default", 0) is None:
            del prop["default"]
        description = prop.pop("description", None)
        parameter = {"name": name, "in": where, "required": where == "path" or name in required, "schema": prop}
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters
