"""`flask --app app <command>`: dev, release, token, publish, tail, dlq, rules, archive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click
from flask import current_app

from pipeline.core.messages import parse_publish
from pipeline.core.settings import Settings, load_or_exit
from pipeline.kafka import kafka_reachable
from pipeline.store.keys import split_routed
from pipeline.store.pubsub import open_link
from web.auth import mint


def _settings() -> Settings:
    return current_app.extensions["herald"].settings


@click.command("token")
@click.argument("user", default="dev")
@click.option("--publish", "publish", multiple=True, default=["*"], show_default=True, help="channel glob")
@click.option("--subscribe", "subscribe", multiple=True, default=["*"], show_default=True, help="channel glob")
@click.option("--admin", is_flag=True, help="may use the DLQ endpoints")
@click.option("--ttl", default=86400, show_default=True, help="seconds until it expires")
def token_command(user, publish, subscribe, admin, ttl):
    """Mint a token for USER."""
    click.echo(mint(_settings(), user, publish=publish, subscribe=subscribe, admin=admin, ttl=ttl))


@click.command("publish")
@click.argument("channel")
@click.argument("data")
@click.option("--type", "mtype", default="message", show_default=True)
@click.option("--id", "msg_id", default=None, help="idempotency id")
def publish_command(channel, data, mtype, msg_id):
    """Publish DATA (JSON, or plain text) to CHANNEL through Kafka."""
    from pipeline.core.errors import HeraldError

    try:
        value = json.loads(data)
    except ValueError:
        value = data
    body = {"channel": channel, "data": value, "type": mtype}
    if msg_id:
        body["id"] = msg_id
    services = current_app.extensions["herald"]
    try:
        envelope = parse_publish(body, sender="cli")
        services.publisher.warm_up()
        answer = services.ingest.publish(envelope, idempotent=msg_id is not None)
    except HeraldError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        services.publisher.close(5)
    click.echo(json.dumps(answer))


@click.command("tail")
@click.argument("channel")
def tail_command(channel):
    """Print CHANNEL's messages as they are delivered (Ctrl-C to stop)."""
    services = current_app.extensions["herald"]
    link = open_link(services.settings)
    link.send(True, [services.store.keys.message_channel(channel)])
    try:
        while True:
            item = link.get_message(timeout=1.0)
            if item is not None and item["type"] == "message":
                click.echo(split_routed(item["data"])[1])
    except KeyboardInterrupt:
        pass
    finally:
        link.close()


@click.group("dlq")
def dlq_group():
    """List and replay dead letters."""


@dlq_group.command("list")
@click.option("--limit", default=50, show_default=True)
def dlq_list_command(limit):
    """Print dead letters, newest first, one JSON object per line."""
    services = current_app.extensions["herald"]
    cursor = 0
    while cursor is not None and limit > 0:
        page = services.dead_letters.list(min(limit, 500), cursor)
        for item in page["items"]:
            click.echo(json.dumps(item))
        limit -= len(page["items"])
        cursor = page["next"]


@dlq_group.command("replay")
@click.argument("letter_id", required=False)
@click.option("--all", "replay_all", is_flag=True, help="replay every dead letter that can be replayed")
def dlq_replay_command(letter_id, replay_all):
    """Send dead letter LETTER_ID (or --all) back through the pipeline."""
    from pipeline.core.errors import HeraldError
    from pipeline.dlq import NotReplayable

    if bool(letter_id) == replay_all:
        raise click.UsageError("give one dead letter id, or --all")
    services = current_app.extensions["herald"]
    letters = services.dead_letters
    ids = [letter_id] if letter_id else [i["id"] for i in letters.list(100_000)["items"]]
    services.publisher.warm_up()
    failed = 0
    try:
        for one in ids:
            try:
                click.echo(json.dumps(letters.replay(one)))
            except NotReplayable as exc:
                failed += 1
                click.echo(f"skipped: {exc}", err=True)
            except HeraldError as exc:
                raise click.ClickException(str(exc)) from None
    finally:
        services.publisher.close(5)
    if failed and letter_id:
        sys.exit(1)


@click.group("rules")
def rules_group():
    """Load, show and test rule sets (docs/guide.md: "Rules")."""


def _read_rules_file(path: str):
    """The rule set in PATH compiled and dry-run, as PUT /api/v1/rules does; exit 1 naming each fault."""
    from pipeline import rules

    with open(path, "rb") as fh:
        text = fh.read()
    try:
        return rules.compile_text(text, "application/json" if path.endswith(".json") else "application/yaml", 0,
                                  _settings().rules_timezone)
    except rules.RulesError as exc:
        for error in exc.errors:
            click.echo(f"{error['path'] or path}: {error['problem']}", err=True)
        raise click.ClickException(f"{path}: the rule set is invalid; nothing was changed") from None


@rules_group.command("load")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def rules_load_command(path):
    """Replace the rule set with the one in PATH (YAML, or JSON for *.json)."""
    from pipeline.rules.repository import RulesStore

    doc = _read_rules_file(path).doc
    services = current_app.extensions["herald"]
    click.echo(json.dumps({"version": RulesStore(services.store, services.settings).put(doc),
                           "rules": len(doc["rules"])}))


@rules_group.command("show")
def rules_show_command():
    """Print the rule set in force and its version, as JSON."""
    from pipeline.rules.repository import RulesStore

    services = current_app.extensions["herald"]
    version, doc = RulesStore(services.store, services.settings).get()
    click.echo(json.dumps({"version": version, **doc}, indent=2))


@rules_group.command("test")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("message")
def rules_test_command(path, message):
    """What the rule set in PATH decides for MESSAGE (JSON: channel, data, type, sender), with no side effects."""
    from pipeline.core.errors import Refused
    from pipeline.rules.step import dry_run

    rule_set = _read_rules_file(path)
    try:
        body = json.loads(message)
        if not isinstance(body, dict):
            raise ValueError("not an object")
        envelope = parse_publish({k: v for k, v in body.items() if k != "sender"},
                                 sender=str(body.get("sender", "cli")))
    except Refused as exc:
        for error in exc.errors:
            click.echo(f"{error['field'] or 'MESSAGE'}: {error['problem']}", err=True)
        raise click.ClickException(f"MESSAGE is not a message: {exc}") from None
    except ValueError as exc:
        raise click.ClickException(f"MESSAGE is not a message: {exc}") from None
    click.echo(json.dumps(dry_run(rule_set, envelope)))


@click.command("release")
def release_command():
    """Create or check the Kafka topics and the archive schema (the Procfile's release phase)."""
    _release_or_exit(_settings())


def _release_or_exit(settings) -> None:
    from pipeline.core.errors import HeraldError
    from pipeline.release import release

    try:
        for line in release(settings):
            click.echo(line)
    except HeraldError as exc:
        click.echo(f"herald release: {exc}", err=True)
        sys.exit(1)


@click.group("archive")
def archive_group():
    """The SQL archive: its Bloom filter and retention."""


@archive_group.command("rebuild-bloom")
def rebuild_bloom_command():
    """Rebuild the Bloom filter of archived ids from the archive (after a restore, or a lost cache Redis)."""
    import redis
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.archive import Archive, ArchiveReader
    from pipeline.archive.cache import bloom_filter

    settings = _settings()
    try:
        count = bloom_filter(settings).rebuild(ArchiveReader(Archive(settings.database_url)).ids())
    except (redis.RedisError, SQLAlchemyError) as exc:
        raise click.ClickException(f"the Bloom filter was not rebuilt: {exc}") from None
    click.echo(f"bloom filter: built from {count} archived ids")


@archive_group.command("prune")
def prune_command():
    """Delete archived messages older than HERALD_ARCHIVE_MAX_AGE now (web processes also do it periodically)."""
    import time

    from pipeline.archive import Archive
    from pipeline.core.errors import HeraldError

    settings = _settings()
    if not settings.archive_max_age:
        raise click.ClickException("HERALD_ARCHIVE_MAX_AGE is 0: the archive keeps every message")
    try:
        removed = Archive(settings.database_url).prune(settings.archive_max_age, int(time.time() * 1000))
    except HeraldError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"archive: {removed} messages older than {settings.archive_max_age} s deleted")


@click.command("dev")
@click.option("--no-flower", is_flag=True, help="skip the Flower process")
def dev_command(no_flower):
    """Run web, bridge, worker and flower, with embedded Redis and Kafka when none answers."""
    # Development tooling, kept off the runtime import path (not in the package).
    from devtools import embedded

    env = dev_environment(os.environ, Path(".env"))
    # The demo page's token (GET /dev/token) and an open Flower on localhost.
    env.setdefault("HERALD_DEV", "1")
    settings = load_or_exit(env)
    run_dir = Path(".dev")
    run_dir.mkdir(exist_ok=True)
    servers = []
    redis_url = urlsplit(settings.redis_url)
    if not _redis_answers(settings):
        port = redis_url.port or 6379
        if redis_url.hostname not in ("localhost", "127.0.0.1") or embedded.port_open("127.0.0.1", port):
            port = embedded.free_port()
        servers.append(embedded.redis_server(port, str(run_dir / "redis.log"), str(run_dir / "redis")).start())
        env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        env["CELERY_BROKER_URL"] = env["REDIS_URL"]
        click.echo(f"embedded Redis on 127.0.0.1:{port}")
    if not kafka_reachable(settings, timeout=1.0):
        port = 9092 if not embedded.port_open("127.0.0.1", 9092) else embedded.free_port()
        servers.append(embedded.kafka_server(port, str(run_dir / "kafka.log")).start())
        use_embedded_kafka(env, port)
        click.echo(f"embedded Kafka-compatible broker (Tansu) on 127.0.0.1:{port}")
    # What the release phase does on a deploy: the processes only check for it.
    _release_or_exit(load_or_exit(env))
    page = "demo chat, joined to chat:lobby" if settings.dev else "demo chat: paste the token below"
    click.echo(f"web     http://localhost:{settings.port}/   ({page})")
    click.echo(f"api     http://localhost:{settings.port}/api/v1   docs: http://localhost:{settings.port}/docs")
    click.echo(f"ws      ws://localhost:{settings.port}/ws")
    if not no_flower:
        guard = ("password: FLOWER_BASIC_AUTH" if env.get("FLOWER_BASIC_AUTH")
                 else "no password, localhost only" if settings.dev else "needs FLOWER_BASIC_AUTH")
        click.echo(f"flower  http://localhost:{env.get('FLOWER_PORT', '5555')}/   ({guard})")
    if settings.auth:
        click.echo(f"token   {mint(settings, 'dev', ttl=7 * 86400)}")
    honcho = shutil.which("honcho", path=str(Path(sys.executable).parent)) or "honcho"
    # honcho would read .env again and let it override the shell (the printed
    # token would be refused): it gets `env`, already merged, and no file.
    # Every Procfile process but the one-off `release`, which ran above.
    skip = {"release"} | ({"flower"} if no_flower else set())
    argv = [honcho, "start", "-e", os.devnull, "-p", str(settings.port),
            *(name for name in _procfile_names(Path("Procfile")) if name not in skip)]
    proc = subprocess.Popen(argv, env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    finally:
        for server in reversed(servers):
            server.stop()
    sys.exit(code)


def use_embedded_kafka(env: dict, port: int) -> None:
    """Point `env` at the embedded Tansu on `port`."""
    env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{port}"
    env.pop("KAFKA_URL", None)
    # Tansu holds the bridge's first join for half the session timeout (6 s
    # by default, the least a real Kafka accepts): 1 s instead of 3 s.
    env.setdefault("HERALD_KAFKA_SESSION_TIMEOUT", "2")


def dev_environment(environ, dotenv_path: Path) -> dict:
    """The environment `flask dev` mints its token with and gives every process:
    `.env` under the shell's variables (twelve-factor; python-dotenv's default)."""
    from dotenv import dotenv_values

    values = dotenv_values(dotenv_path) if dotenv_path.is_file() else {}
    return {**{k: v for k, v in values.items() if v is not None}, **environ}


def _procfile_names(path: Path) -> list[str]:
    return [line.split(":", 1)[0].strip() for line in path.read_text().splitlines()
            if ":" in line and not line.lstrip().startswith("#")]


def _redis_answers(settings) -> bool:
    from pipeline.store import connect

    try:
        return bool(connect(settings).ping())
    except Exception:  # unreachable in any way means: start our own
        return False


def init_app(app) -> None:
    """Register the commands on the app's CLI."""
    for command in (dev_command, release_command, token_command, publish_command, tail_command, dlq_group,
                    rules_group, archive_group):
        app.cli.add_command(command)
