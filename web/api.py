"""The HTTP API under /api/v1 (docs/guide.md: The HTTP API and its schema); each operation declares its
contract (web/openapi.py)."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, g, request

from pipeline.core.errors import Forbidden, HeraldError, InvalidInput, InvalidRuleSet, Refused, UnsupportedMedia
from pipeline.core.ids import candidates
from pipeline.core.messages import Envelope, Publish, parse_publish
from pipeline.ingest import accepted_fields, ephemeral
from web.auth import AuthError, Identity, bearer, verify
from web.authorize import PUBLISH, SUBSCRIBE
from web.openapi import STANDARD, Answer, Contract, read_body
from web.problems import ANSWERS, answer_for, error_problem, item_problem, problem
from web.schemas import (
    RULE_SET_INPUT,
    Accepted,
    Batch,
    BatchResults,
    ChannelPath,
    DeadLetterPage,
    DeadLetterPath,
    DeadLetterQuery,
    HistoryPage,
    HistoryQuery,
    Message,
    MessagePath,
    MessageQuery,
    Presence,
    PresenceQuery,
    PublishAnswer,
    PublishHeaders,
    RulesDecision,
    RuleSet,
    RulesTest,
)

log = logging.getLogger("herald.web")


def refused(exc: Exception):
    """The problem for an error web/problems.py maps; an outage is logged with its text."""
    answer = answer_for(exc)
    if answer is not None and answer.status >= 500:
        log.warning("request refused: service unavailable",
                    extra={"error": str(exc), "problem": answer.slug, "request_id": g.get("request_id")})
    return error_problem(exc)


def api_blueprint(name: str) -> Blueprint:
    """A blueprint under /api/v1 whose errors web/problems.py maps are answered as problems."""
    bp = Blueprint(name, __name__, url_prefix="/api/v1")
    for kind in ANSWERS:
        bp.register_error_handler(kind, refused)
    return bp


blueprint = api_blueprint("api")


def services():
    """The web process's Services."""
    return current_app.extensions["herald"]


def identify() -> Identity | AuthError:
    """The caller's Identity, or the AuthError its token earned (a revoked one too); verified
    once per request (the rate limiter keys by it before the view runs). Raises
    redis.RedisError when the revocations cannot be read (a 503)."""
    if "identity" not in g:
        try:
            identity = verify(bearer(request.headers.get("Authorization")), services().settings)
            services().revocations.check(identity)
            g.identity = identity
        except AuthError as exc:
            g.identity = exc
    return g.identity


def authenticate(level: str = "token") -> Identity:
    """The caller's Identity; raises AuthError for a missing or bad token, and a 403
    when `level` is "admin" and the token does not carry `admin: true`."""
    identity = identify()
    if isinstance(identity, AuthError):
        raise identity
    if level == "admin" and not identity.admin:
        raise Forbidden("This endpoint is for admin tokens only")
    return identity


contract = Contract(authenticate)



def checked_message(body: Publish, identity: Identity, idempotency_key: str | None,
                    max_bytes: int | None = None) -> tuple[Envelope, bool]:
    """The envelope of a validated message, once the caller may publish it; returns (envelope, idempotent)."""
    envelope = parse_publish(body, sender=identity.user, idempotency_key=idempotency_key, max_bytes=max_bytes)
    if not services().permissions.allows(identity, PUBLISH, envelope.channel):
        raise Forbidden(f"This token may not publish to {envelope.channel}")
    return envelope, body.id is not None or idempotency_key is not None


def _accept_answers() -> dict[int, Answer]:
    return {202: Answer("Accepted: Kafka acknowledged the record; or `sent`: an ephemeral message was published",
                        PublishAnswer),
            403: Answer("The token may not publish to this channel"),
            409: Answer("A request with this id or Idempotency-Key is still under way", headers=("Retry-After",)),
            503: Answer(STANDARD[503], headers=("Retry-After",))}


@contract.operation(blueprint, "POST", "/messages", summary="Publish a message", body=Publish,
                    body_limit=lambda settings: settings.max_message_bytes, headers=PublishHeaders,
                    description="Answers 202 only after Kafka acknowledged the record. An `id` (or "
                                "`Idempotency-Key`) is the sender's (docs/protocol.md: Message ids): the same one from "
                                "the same sender within HERALD_STATUS_TTL returns the first answer. With `ephemeral: "
                                "true`, or on a channel of HERALD_EPHEMERAL_NAMESPACES, 202 `sent` once it was "
                                "published to the subscribers: nothing is stored, nor deduplicated (docs/protocol.md: "
                                "Ephemeral messages).",
                    answers=_accept_answers(), tags=("messages",))
def publish_one(identity: Identity, headers: PublishHeaders, body: Publish):
    key = headers.idempotency_key
    envelope, idempotent = checked_message(body, identity, key, services().settings.max_message_bytes)
    g.message_id = envelope.id
    if ephemeral(services().settings, body):
        sent = services().ingest.send(envelope, idempotent=idempotent)
        g.log_fields = {"channel": envelope.channel, "status": "sent"}
        return sent, 202
    # The access line says what was accepted: one line per request, not two.
    answer = services().ingest.publish(envelope, idempotent=idempotent, request_id=g.request_id,
                                       log_accepted=False)
    g.log_fields = accepted_fields([answer])
    return answer, 202


def duplicate_ids(items: list[Publish]) -> list[dict]:
    """Field errors for each item whose `id` an earlier item of the batch has."""
    first: dict[str, int] = {}
    errors = []
    for index, item in enumerate(items):
        if item.id is None:
            continue
        if item.id in first:
            errors.append({"field": f"messages[{index}].id", "problem": f"duplicate of messages[{first[item.id]}]"})
        else:
            first[item.id] = index
    return errors


@contract.operation(blueprint, "POST", "/messages/batch", summary="Publish up to 1000 messages", body=Batch,
                    body_limit=lambda settings: settings.max_batch_bytes,
                    description="A batch with any invalid message, or that repeats an `id`, is a 422 and nothing "
                                "is accepted. Otherwise 202 with one result per message, in order: `accepted`, "
                                "or a problem for a message whose data is past the data limits (400, docs/guide.md: "
                                "The HTTP API and its schema), this token may not publish (403), one larger than "
                                "HERALD_MAX_MESSAGE_BYTES (413), one whose id is under way (409) or one Kafka "
                                "did not take (503). An ephemeral message (`ephemeral: true`, or a channel of "
                                "HERALD_EPHEMERAL_NAMESPACES) is sent at once, in its place in the batch, and its "
                                "result is `sent` (or 503).",
                    answers={202: Answer("One result per message, in order", BatchResults),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("messages",))
def publish_batch(identity: Identity, body: Batch):
    settings = services().settings
    items = body.messages
    duplicates = duplicate_ids(items)
    if duplicates:
        # Each would wait on the other's idempotency claim, then drop it.
        raise InvalidInput("A batch may not repeat a message id", duplicates)
    results: list = [None] * len(items)
    envelopes, flags, slots = [], [], []
    for index, item in enumerate(items):
        try:
            # Encodable and within HERALD_MAX_MESSAGE_BYTES from here on.
            envelope, idempotent = checked_message(item, identity, None, settings.max_message_bytes)
        except Refused as exc:
            results[index] = item_problem(exc)
            continue
        if ephemeral(settings, item):
            try:
                results[index] = services().ingest.send(envelope, idempotent=idempotent)
            except HeraldError as exc:
                results[index] = item_problem(exc)
            continue
        envelopes.append(envelope)
        flags.append(idempotent)
        slots.append(index)
    if envelopes:
        answers = services().ingest.publish_many(envelopes, idempotent=flags, request_id=g.request_id,
                                                 raise_errors=False, log_accepted=False)
    else:
        answers = []
    accepted = [answer for answer in answers if isinstance(answer, dict) and answer.get("status") == "accepted"]
    if accepted:
        g.log_fields = accepted_fields(accepted)
    for index, envelope, answer in zip(slots, envelopes, answers):
        if isinstance(answer, HeraldError):
            results[index] = item_problem(answer)
            if results[index]["status"] >= 500:
                log.warning("message refused: service unavailable",
                            extra={"error": str(answer), "request_id": g.request_id, "message_id": envelope.id})
        else:
            results[index] = answer
    return {"results": results}, 202


@blueprint.get("/openapi.json")
def openapi():
    """The OpenAPI document, generated from the operations' declarations."""
    return document()


@blueprint.get("/asyncapi.json")
def asyncapi():
    """The AsyncAPI document of the WebSocket protocol at /ws (web/hub/frames.py)."""
    from web.hub import frames

    return frames.document()


def document() -> dict:
    """The OpenAPI 3.1 document of the HTTP API (the WebSocket protocol: /api/v1/asyncapi.json)."""
    return contract.document(
        title="Herald", version="1.0.0",
        description="Real-time messaging: publish over HTTP, durable in Kafka, processed by Celery, pushed to "
                    "WebSocket subscribers of /ws (its frames: /api/v1/asyncapi.json). Errors are RFC 9457 "
                    "problems (`application/problem+json`).")


@contract.operation(blueprint, "GET", "/messages/<message_id:msg_id>", summary="A message and its status",
                    path=MessagePath, query=MessageQuery,
                    description="Its status from Redis while it lasts (HERALD_STATUS_TTL), then from the archive. "
                                "The id is `sender`'s (the caller's by default), else a global id. `data` is null "
                                "until a worker ran the message's rules, and for a blocked message. A message on "
                                "a channel the token may not read is answered 404, as unknown.",
                    answers={200: Answer("The message", Message), 404: Answer("No such message"),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("messages",))
def get_message(identity: Identity, path: MessagePath, query: MessageQuery):
    msg_id = path.msg_id
    for global_id in candidates(query.sender or identity.user, msg_id):
        message = services().cache.read(services().store, global_id)
        # A 403 would tell that the id exists (docs/guide.md: Tokens).
        if message is not None and services().permissions.allows(identity, SUBSCRIBE, message["channel"] or ""):
            return message
    return problem(404, f"No message {msg_id} is known", slug="unknown-message")


def readable_channel(identity: Identity, channel: str) -> None:
    """Check the caller's right to read a (valid) channel."""
    if not services().permissions.allows(identity, SUBSCRIBE, channel):
        raise Forbidden(f"This token may not read {channel}")


@contract.operation(blueprint, "GET", "/channels/<channel>/history", summary="A channel's retained messages, "
                    "oldest first", path=ChannelPath, query=HistoryQuery,
                    answers={200: Answer("A page", HistoryPage), 403: Answer("The token may not read this channel"),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("channels",))
def history(identity: Identity, path: ChannelPath, query: HistoryQuery):
    readable_channel(identity, path.channel)
    page = services().history(path.channel, query.since, query.limit)
    for message in page["messages"]:
        message.pop("op", None)
    return page


@contract.operation(blueprint, "GET", "/dlq", summary="Dead letters, newest first (admin token)", auth="admin",
                    query=DeadLetterQuery, answers={200: Answer("A page", DeadLetterPage),
                                                    503: Answer(STANDARD[503], headers=("Retry-After",))},
                    tags=("dead letters",))
def dlq_list(identity: Identity, query: DeadLetterQuery):
    return services().dead_letters.list(query.limit, query.cursor)


@contract.operation(blueprint, "POST", "/dlq/<letter_id>/replay", summary="Send a dead letter back through the "
                    "pipeline (admin token)", auth="admin", path=DeadLetterPath,
                    answers={202: Answer("Accepted again: Kafka acknowledged the record", Accepted),
                             404: Answer("No such dead letter"),
                             409: Answer("The dead letter was never a valid message, or is being replayed"),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("dead letters",))
def dlq_replay(identity: Identity, path: DeadLetterPath):
    return services().dead_letters.replay(path.letter_id), 202


RULE_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "application/json")


def rules_store():
    """The stored rule set (pipeline/rules/repository.py)."""
    from pipeline.rules.repository import RulesStore

    return RulesStore(services().store, services().settings)


def read_rules(text: str | bytes, media_type: str):
    """A rule set text compiled and dry-run (`rules.compile_text`, version 0), or a 422
    listing each fault with its path: a set that would fail in the workers is refused here."""
    from pipeline import rules

    try:
        return rules.compile_text(text, media_type, 0, services().settings.rules_timezone)
    except rules.RulesError as exc:
        raise invalid_rules(exc) from None


def invalid_rules(exc) -> InvalidRuleSet:
    """The refusal of a RulesError: each fault with its path."""
    return InvalidRuleSet("The rule set is invalid; nothing was changed",
                          [{"field": e["path"], "problem": e["problem"],
                            "error": f"{e['path']}: {e['problem']}" if e["path"] else e["problem"]}
                           for e in exc.errors])


def rules_body() -> tuple[bytes, str]:
    """The raw body of a rule set request and its media type (YAML or JSON)."""
    if request.mimetype not in RULE_TYPES:
        raise UnsupportedMedia("Send the rule set as application/yaml or application/json")
    return read_body(services().settings.max_batch_bytes), request.mimetype


@contract.operation(blueprint, "PUT", "/rules", summary="Replace the whole rule set (admin token)", auth="admin",
                    description="YAML or JSON: `rules: [...]` or one `rule: {...}`. Every worker applies the new "
                                "version within a second; a set with any fault is refused whole (422, each fault "
                                "with its path) and nothing changes.",
                    request_media={"application/yaml": RULE_SET_INPUT, "application/json": RULE_SET_INPUT},
                    answers={200: Answer("The new set and its version", RuleSet),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("rules",))
def rules_put(identity: Identity):
    doc = read_rules(*rules_body()).doc
    version = rules_store().put(doc)
    log.info("rules replaced", extra={"version": version, "rules": len(doc["rules"]),
                                      "request_id": g.get("request_id")})
    return {"version": version, **doc}


@contract.operation(blueprint, "GET", "/rules", summary="The rule set in force and its version (admin token)",
                    auth="admin", answers={200: Answer("The set", RuleSet),
                                           503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("rules",))
def rules_get(identity: Identity):
    version, doc = rules_store().get()
    return {"version": version, **doc}


@contract.operation(blueprint, "POST", "/rules/test", summary="What a rule set decides for a message, without side "
                    "effects (admin token)", auth="admin", body=RulesTest,
                    body_limit=lambda settings: settings.max_batch_bytes,
                    answers={200: Answer("The decision", RulesDecision),
                             409: Answer("The stored rule set cannot be compiled (docs/guide.md: Rules)"),
                             503: Answer(STANDARD[503], headers=("Retry-After",))}, tags=("rules",))
def rules_test(identity: Identity, body: RulesTest):
    """Evaluate a message against a rule set (the body's `rules`, else the stored set), without side effects."""
    from pipeline import rules
    from pipeline.rules.step import dry_run

    zone = services().settings.rules_timezone
    if body.rules is not None:
        try:
            rule_set = rules.checked(rules.validate(body.rules), 0, zone)
        except rules.RulesError as exc:
            raise invalid_rules(exc) from None
    else:
        version, doc = rules_store().get()
        try:
            rule_set = rules.checked(rules.validate(doc), version, zone)
        except rules.RulesError as exc:  # stored by an older Herald, or into Redis by hand
            return problem(409, f"The stored rule set (version {version}) cannot be compiled: {exc}",
                           slug="rules-not-compiled")
    envelope = parse_publish(body.message, sender=body.message.sender or identity.user)
    # RE2 makes every regex linear in the value, and values are cut to MATCH_LIMIT:
    # evaluating one message cannot hold this process's event loop.
    return dry_run(rule_set, envelope, services().store)


@contract.operation(blueprint, "GET", "/channels/<channel>/presence", summary="Who is subscribed to a channel now",
                    path=ChannelPath, query=PresenceQuery,
                    answers={200: Answer("A page of clients, oldest first; `next` continues it", Presence),
                                               403: Answer("The token may not read this channel"),
                                               503: Answer(STANDARD[503], headers=("Retry-After",))},
                    tags=("channels",))
def presence(identity: Identity, path: ChannelPath, query: PresenceQuery):
    readable_channel(identity, path.channel)
    return services().hub.presence.page(path.channel, query.cursor or 0)
