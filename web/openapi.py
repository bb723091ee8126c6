"""The OpenAPI 3.1 document of the HTTP API, served at /api/v1/openapi.json and read at /docs."""

from __future__ import annotations

PROBLEM = {"$ref": "#/components/responses/Problem"}


def _json(schema_ref: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}}


def document(settings) -> dict:
    """Build the document (limits come from the settings)."""
    errors = {str(code): PROBLEM for code in (400, 401, 403, 413, 415, 422, 429, 503)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Herald",
            "version": "1.0.0",
            "description": "Real-time messaging: publish over HTTP, durable in Kafka, processed by Celery, "
                           "pushed to WebSocket subscribers of /ws.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/messages": {"post": {
                "summary": "Publish a message",
                "description": "Answers 202 only after Kafka acknowledged the record. The same `id` (or "
                               "`Idempotency-Key`) within 24 h returns the first answer.",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": _json("Publish")},
                "responses": {"202": {"description": "Accepted", "content": _json("Accepted")}, **errors},
            }},
            "/api/v1/messages/batch": {"post": {
                "summary": "Publish up to 1000 messages",
                "description": f"The body is at most {settings.max_batch_bytes} bytes (413 beyond). A batch "
                               "that repeats an `id`, or whose every message is invalid, is a 422 and nothing "
                               "is accepted; otherwise 202 with one result per message.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["messages"], "additionalProperties": False,
                    "properties": {"messages": {"type": "array", "minItems": 1, "maxItems": 1000,
                                                "items": {"$ref": "#/components/schemas/Publish"}}}}}}},
                "responses": {"202": {"description": "One result per message, in order", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {"results": {
                        "type": "array", "items": {"oneOf": [{"$ref": "#/components/schemas/Accepted"},
                                                             {"$ref": "#/components/schemas/Problem"}]}}}}}}},
                              **errors},
            }},
            "/api/v1/messages/{id}": {"get": {
                "summary": "A message and its status",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The message", "content": _json("Message")}, "404": PROBLEM,
                              "401": PROBLEM},
            }},
            "/api/v1/channels/{channel}/history": {"get": {
                "summary": "A channel's retained messages, oldest first",
                "parameters": [
                    {"name": "channel", "in": "path", "required": True, "schema": {"$ref": "#/components/schemas/Channel"}},
                    {"name": "since", "in": "query", "schema": {"type": "string"},
                     "description": "offset of the last message seen (exclusive)"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ],
                "responses": {"200": {"description": "A page", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
                        "next": {"type": ["string", "null"]}, "recovered": {"type": "boolean"}}}}}},
                    "400": PROBLEM, "401": PROBLEM, "403": PROBLEM, "422": PROBLEM},
            }},
            "/api/v1/channels/{channel}/presence": {"get": {
                "summary": "Who is subscribed to a channel now",
                "parameters": [{"name": "channel", "in": "path", "required": True,
                                "schema": {"$ref": "#/components/schemas/Channel"}}],
                "responses": {"200": {"description": "Clients", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"clients": {"type": "array", "items": {
                        "type": "object", "properties": {"client": {"type": "string"}, "user": {"type": "string"},
                                                         "since": {"type": "integer"}}}}}}}}},
                    "401": PROBLEM, "403": PROBLEM},
            }},
            "/api/v1/rules": {
                "get": {"summary": "The rule set in force and its version (admin token)",
                        "responses": {"200": {"description": "The set", "content": _json("RuleSet")},
                                      "401": PROBLEM, "403": PROBLEM}},
                "put": {"summary": "Replace the whole rule set (admin token)",
                        "description": "YAML or JSON: `rules: [...]` or one `rule: {...}`. Every worker applies "
                                       "the new version within a second; a set with any fault is refused whole "
                                       "(422, each fault with its path) and nothing changes.",
                        "requestBody": {"required": True, "content": {
                            "application/yaml": {"schema": {"type": "string"}},
                            "application/json": {"schema": {"type": "object"}}}},
                        "responses": {"200": {"description": "The new set and its version",
                                              "content": _json("RuleSet")},
                                      **{code: PROBLEM for code in ("401", "403", "413", "415", "422", "503")}}},
            },
            "/api/v1/rules/test": {"post": {
                "summary": "What a rule set decides for a message, without side effects (admin token)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["message"], "properties": {
                        "message": {"$ref": "#/components/schemas/Publish"},
                        "rules": {"type": "object", "description": "a rule set; the stored one when absent"}}}}}},
                "responses": {"200": {"description": "The decision", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "version": {"type": "integer"}, "matched": {"type": "array"},
                        "blocked": {"type": ["string", "null"]}, "alerts": {"type": "array"},
                        "routes": {"type": "array"}, "tags": {"type": "array"}, "data": {}}}}}},
                              **{code: PROBLEM for code in ("400", "401", "403", "415", "422")}},
            }},
            "/healthz": {"get": {"summary": "Liveness", "security": [],
                                 "responses": {"200": {"description": "The process lives"}}}},
            "/readyz": {"get": {"summary": "Readiness (Kafka and Redis answer)", "security": [],
                                "responses": {"200": {"description": "Ready"}, "503": PROBLEM}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": {"200": {"description": "Prometheus text format"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (HS256)"}},
            "responses": {"Problem": {"description": "RFC 9457 problem details", "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}},
            "schemas": {
                "Channel": {"type": "string", "pattern": "^[A-Za-z0-9_:.@-]{1,200}$"},
                "Publish": {
                    "type": "object", "required": ["channel", "data"], "additionalProperties": False,
                    "properties": {
                        "channel": {"$ref": "#/components/schemas/Channel"},
                        "data": {"description": f"any JSON value; the body is at most "
                                                f"{settings.max_message_bytes} bytes"},
                        "type": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$", "default": "message"},
                        "id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"},
                    },
                },
                "Accepted": {"type": "object", "properties": {
                    "id": {"type": "string"}, "channel": {"type": "string"}, "status": {"const": "accepted"},
                    "partition": {"type": "integer"}, "offset": {"type": "integer"}}},
                "Message": {"type": "object", "properties": {
                    "id": {"type": "string"}, "channel": {"type": "string"}, "type": {"type": "string"},
                    "data": {}, "sender": {"type": "string"}, "ts": {"type": "integer"},
                    "status": {"enum": ["accepted", "processing", "delivered", "failed", "rejected"]},
                    "attempts": {"type": "integer"}, "error": {"type": ["string", "null"]},
                    "offset": {"type": ["integer", "string", "null"]}}},
                "RuleSet": {"type": "object", "required": ["version", "rules"], "properties": {
                    "version": {"type": "integer"}, "rules": {"type": "array", "items": {
                        "type": "object", "required": ["id", "condition", "action"], "properties": {
                            "id": {"type": "string"}, "description": {"type": "string"},
                            "enabled": {"type": "boolean"}, "priority": {"type": "integer"},
                            "condition": {"type": "object"}, "action": {}}}}}},
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "detail": {"type": "string"}, "errors": {"type": "array", "items": {"type": "object"}}}},
            },
        },
    }
