"""The HTTP API under /api/v1 (SPEC: HTTP API)."""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, current_app, g, request

from pipeline.archive import ArchiveUnavailable
from pipeline.dlq import NotReplayable
from pipeline.errors import HeraldError, KafkaUnavailable, ValidationError
from pipeline.ingest import IdempotencyConflict, accepted_fields
from pipeline.messages import ID_RE, Envelope, dumps, loads, parse_publish, valid_channel
from pipeline.store import valid_stream_id
from web.auth import AuthError, Identity, bearer, verify
from web.openapi import document
from web.problems import from_validation, problem, problem_body

log = logging.getLogger("herald.web")
blueprint = Blueprint("api", __name__, url_prefix="/api/v1")
MAX_BATCH = 1000
# The text of a Kafka or Redis error names internal hosts and ports: it is
# logged, and clients get this (README: WebSocket close codes and errors).
NOT_ACCEPTED = "Kafka or Redis is unavailable; nothing was accepted, retry later"


def services():
    """The web process's Services."""
    return current_app.extensions["herald"]


def identify() -> Identity | AuthError:
    """The caller's Identity, or the AuthError its token earned; verified once per
    request (the rate limiter keys by it before the view runs)."""
    if "identity" not in g:
        try:
            g.identity = verify(bearer(request.headers.get("Authorization")), services().settings)
        except AuthError as exc:
            g.identity = exc
    return g.identity


def authenticate() -> Identity:
    """The caller's Identity; raises AuthError for a missing or bad token."""
    identity = identify()
    if isinstance(identity, AuthError):
        raise identity
    return identity


@blueprint.errorhandler(AuthError)
def unauthorized(exc: AuthError):
    return problem(401, str(exc), slug="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="herald"'})


@blueprint.errorhandler(ValidationError)
def invalid(exc: ValidationError):
    return from_validation(exc)


@blueprint.errorhandler(IdempotencyConflict)
def conflict(exc: IdempotencyConflict):
    return problem(409, str(exc), slug="idempotency-conflict", headers={"Retry-After": "1"})


@blueprint.errorhandler(KafkaUnavailable)
def kafka_down(exc: KafkaUnavailable):
    log.warning("request refused: service unavailable", extra={"error": str(exc), "request_id": g.get("request_id")})
    return problem(503, NOT_ACCEPTED, slug="kafka-unavailable", headers={"Retry-After": "5"})


@blueprint.errorhandler(redis.RedisError)
def redis_down(exc: redis.RedisError):
    log.warning("request refused: Redis unavailable", extra={"error": str(exc), "request_id": g.get("request_id")})
    return problem(503, "Redis is unreachable; retry later", slug="redis-unavailable", headers={"Retry-After": "5"})


def read_json(limit: int):
    """The request's JSON body, after checking its type and size."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ValidationError("Send the message as application/json", status=415,
                              title="Unsupported media type")
    if request.content_length is not None and request.content_length > limit:
        raise ValidationError(f"The body is {request.content_length} bytes; the limit is {limit}",
                              status=413, title="Payload too large")
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise ValidationError(f"The body is {len(raw)} bytes; the limit is {limit}", status=413,
                              title="Payload too large")
    try:
        return loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"The body is not valid JSON: {exc}", status=400, title="Malformed JSON") from None


def checked_message(body, identity: Identity, idempotency_key: str | None) -> tuple[Envelope, bool]:
    """Validate one message and the caller's right to publish it; returns (envelope, idempotent)."""
    envelope = parse_publish(body, sender=identity.user, idempotency_key=idempotency_key)
    if not identity.may_publish(envelope.channel):
        raise ValidationError(f"This token may not publish to {envelope.channel}", status=403,
                              title="Forbidden")
    return envelope, "id" in body or idempotency_key is not None


@blueprint.post("/messages")
def publish_one():
    identity = authenticate()
    settings = services().settings
    key = request.headers.get("Idempotency-Key")
    if key is not None and not ID_RE.fullmatch(key):
        raise ValidationError("Idempotency-Key must match [A-Za-z0-9_.:-]{1,128}", status=400,
                              title="Bad Idempotency-Key")
    envelope, idempotent = checked_message(read_json(settings.max_message_bytes), identity, key)
    g.message_id = envelope.id
    # The access line says what was accepted: one line per request, not two.
    answer = services().ingest.publish(envelope, idempotent=idempotent, request_id=g.request_id,
                                       log_accepted=False)
    g.log_fields = accepted_fields([answer])
    return answer, 202


def duplicate_ids(items: list) -> list[dict]:
    """Field errors for each item whose `id` an earlier item of the batch has."""
    first: dict[str, int] = {}
    errors = []
    for index, item in enumerate(items):
        msg_id = item.get("id") if isinstance(item, dict) else None
        if not isinstance(msg_id, str):
            continue
        if msg_id in first:
            errors.append({"field": f"messages[{index}].id", "problem": f"duplicate of messages[{first[msg_id]}]"})
        else:
            first[msg_id] = index
    return errors


@blueprint.post("/messages/batch")
def publish_batch():
    identity = authenticate()
    settings = services().settings
    body = read_json(settings.max_batch_bytes)
    if not isinstance(body, dict) or set(body) != {"messages"} or not isinstance(body["messages"], list):
        raise ValidationError('The body is {"messages": [...]}', [{"field": "messages", "problem": "required list"}])
    items = body["messages"]
    if not 1 <= len(items) <= MAX_BATCH:
        raise ValidationError(f"A batch holds 1 to {MAX_BATCH} messages", [{"field": "messages",
                                                                              "problem": "1..1000 items"}])
    duplicates = duplicate_ids(items)
    if duplicates:
        # Each would wait on the other's idempotency claim, then drop it.
        raise ValidationError("A batch may not repeat a message id", duplicates)
    results: list = [None] * len(items)
    envelopes, flags, slots = [], [], []
    for index, item in enumerate(items):
        try:
            envelope, idempotent = checked_message(item, identity, None)  # encodable from here on
            if len(dumps(item).encode()) > settings.max_message_bytes:
                raise ValidationError("The message is larger than HERALD_MAX_MESSAGE_BYTES", status=413,
                                      title="Payload too large")
        except ValidationError as exc:
            results[index] = problem_body(exc.status, exc.detail, title=exc.title, errors=exc.errors)
            continue
        envelopes.append(envelope)
        flags.append(idempotent)
        slots.append(index)
    if not envelopes:
        raise ValidationError("No message of the batch is valid; nothing was accepted", [
            {"field": f"messages[{index}]", "problem": result["detail"], "status": result["status"]}
            for index, result in enumerate(results)])
    answers = services().ingest.publish_many(envelopes, idempotent=flags, request_id=g.request_id,
                                             raise_errors=False, log_accepted=False)
    accepted = [answer for answer in answers if isinstance(answer, dict) and answer.get("status") == "accepted"]
    if accepted:
        g.log_fields = accepted_fields(accepted)
    for index, envelope, answer in zip(slots, envelopes, answers):
        if isinstance(answer, ValidationError):
            results[index] = problem_body(answer.status, answer.detail, title=answer.title, errors=answer.errors)
        elif isinstance(answer, IdempotencyConflict):
            results[index] = problem_body(409, str(answer), title="Not accepted")
        elif isinstance(answer, HeraldError):
            log.warning("message refused: service unavailable",
                        extra={"error": str(answer), "request_id": g.request_id, "message_id": envelope.id})
            results[index] = problem_body(503, NOT_ACCEPTED, title="Not accepted")
        else:
            results[index] = answer
    return {"results": results}, 202


@blueprint.get("/openapi.json")
def openapi():
    return document(services().settings)


@blueprint.errorhandler(ArchiveUnavailable)
def archive_down(exc: ArchiveUnavailable):
    log.warning("request refused: archive unavailable", extra={"error": str(exc), "request_id": g.get("request_id")})
    return problem(503, "The message archive is unreachable; retry later", slug="archive-unavailable",
                   headers={"Retry-After": "5"})


@blueprint.get("/messages/<msg_id>")
def get_message(msg_id: str):
    identity = authenticate()
    if not ID_RE.fullmatch(msg_id):
        raise ValidationError("A message id matches [A-Za-z0-9_.:-]{1,128}",
                              [{"field": "id", "problem": "bad message id"}], status=400, title="Bad message id")
    # Its status in Redis while it lasts (HERALD_STATUS_TTL), then the archive.
    message = services().cache.read(services().store, msg_id)
    # A message the token may not read is answered as unknown: a 403 would
    # tell that the id exists (README: Tokens).
    if message is None or not identity.may_subscribe(message["channel"] or ""):
        return problem(404, f"No message {msg_id} is known", slug="unknown-message")
    return message


def readable_channel(channel: str) -> None:
    """Check the channel's name and the caller's right to read it."""
    identity = authenticate()
    if not valid_channel(channel):
        raise ValidationError("Bad channel name", [{"field": "channel", "problem": "must match [A-Za-z0-9_:.@-]{1,200}"}])
    if not identity.may_subscribe(channel):
        raise ValidationError(f"This token may not read {channel}", status=403, title="Forbidden")


@blueprint.get("/channels/<channel>/history")
def history(channel: str):
    readable_channel(channel)
    since = request.args.get("since") or None
    if since is not None and not valid_stream_id(since):
        raise ValidationError("since is an offset from a message frame", [{"field": "since", "problem": "bad offset"}],
                              status=400, title="Bad query")
    try:
        limit = int(request.args.get("limit", "100"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 1000:
        raise ValidationError("limit is 1..1000", [{"field": "limit", "problem": "1..1000"}], status=400,
                              title="Bad query")
    page = services().history(channel, since, limit)
    for message in page["messages"]:
        message.pop("op", None)
    return page


def authenticate_admin() -> Identity:
    """The caller's Identity, which must carry `admin: true`."""
    identity = authenticate()
    if not identity.admin:
        raise ValidationError("This endpoint is for admin tokens only", status=403, title="Forbidden")
    return identity


@blueprint.get("/dlq")
def dlq_list():
    authenticate_admin()
    try:
        limit = int(request.args.get("limit", "50"))
        cursor = int(request.args.get("cursor", "0"))
    except ValueError:
        limit = cursor = -1
    if not 1 <= limit <= 500 or not 0 <= cursor < 1 << 53:  # Redis refuses an index past 2**63
        raise ValidationError("limit is 1..500 and cursor a cursor from a previous page", status=400,
                              title="Bad query")
    return services().dead_letters.list(limit, cursor)


@blueprint.post("/dlq/<letter_id>/replay")
def dlq_replay(letter_id: str):
    authenticate_admin()
    if not ID_RE.fullmatch(letter_id):
        return problem(404, f"No dead letter {letter_id}", slug="unknown-dead-letter")
    try:
        return services().dead_letters.replay(letter_id), 202
    except NotReplayable as exc:
        status = 404 if services().dead_letters.get(letter_id) is None else 409
        return problem(status, str(exc), slug="not-replayable")


RULE_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "application/json")


def rules_store():
    """The stored rule set (pipeline/rules_store.py)."""
    from pipeline.rules_store import RulesStore

    return RulesStore(services().store, services().settings)


def read_rules(text: str | bytes, media_type: str) -> dict:
    """A rule set text in normal form, or a 422 listing each fault with its path."""
    from pipeline import rules

    try:
        return rules.load(text, media_type)
    except rules.RulesError as exc:
        raise ValidationError("The rule set is invalid; nothing was changed",
                              [{"field": e["path"], "problem": e["problem"],
                                "error": f"{e['path']}: {e['problem']}" if e["path"] else e["problem"]}
                               for e in exc.errors], status=422, title="Invalid rule set") from None


def rules_body(limit: int = 1024 * 1024) -> tuple[bytes, str]:
    """The raw body of a rule set request and its media type (YAML or JSON)."""
    if request.mimetype not in RULE_TYPES:
        raise ValidationError("Send the rule set as application/yaml or application/json", status=415,
                              title="Unsupported media type")
    raw = request.get_data(cache=False)
    if len(raw) > limit:
        raise ValidationError(f"The body is {len(raw)} bytes; the limit is {limit}", status=413,
                              title="Payload too large")
    return raw, request.mimetype


@blueprint.put("/rules")
def rules_put():
    authenticate_admin()
    doc = read_rules(*rules_body())
    version = rules_store().put(doc)
    log.info("rules replaced", extra={"version": version, "rules": len(doc["rules"]),
                                      "request_id": g.get("request_id")})
    return {"version": version, **doc}


@blueprint.get("/rules")
def rules_get():
    authenticate_admin()
    version, doc = rules_store().get()
    return {"version": version, **doc}


@blueprint.post("/rules/test")
def rules_test():
    """Evaluate a message against a rule set (the body's `rules`, else the stored set), without side effects."""
    from pipeline import rules
    from pipeline.rules_store import dry_run

    identity = authenticate_admin()
    body = read_json(services().settings.max_batch_bytes)
    if not isinstance(body, dict) or "message" not in body or set(body) - {"message", "rules"}:
        raise ValidationError('The body is {"message": {...}, "rules": optional rule set}',
                              [{"field": "message", "problem": "required"}])
    if "rules" in body:
        version, doc = 0, read_rules(dumps(body["rules"]), "application/json")
    else:
        version, doc = rules_store().get()
    message = body["message"]
    envelope = parse_publish({k: v for k, v in message.items() if k != "sender"} if isinstance(message, dict)
                             else message, sender=str(message.get("sender", identity.user))
                             if isinstance(message, dict) else identity.user)
    rule_set = rules.compile_set(doc, version, services().settings.rules_timezone)
    return dry_run(rule_set, envelope, services().store)


@blueprint.get("/channels/<channel>/presence")
def presence(channel: str):
    readable_channel(channel)
    return {"clients": services().hub.presence.members(channel)}
