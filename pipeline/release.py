"""The release phase (`flask --app app release`, the Procfile's `release:`): run once per deploy,
before the new processes start, so that no process needs to create what it uses."""

from __future__ import annotations

import redis
from sqlalchemy.exc import SQLAlchemyError

from pipeline.archive import Archive, ArchiveReader
from pipeline.core.errors import TransientError
from pipeline.kafka import open_admin, topics


def release(settings, timeout: float = 30.0) -> list[str]:
    """Create or check the Kafka topics, migrate the archive schema and build the Bloom filter
    of archived ids when it is missing; returns what was done, one line each.

    Raises a HeraldError (KafkaUnavailable, TopicError) that says what to fix.
    """
    admin, metadata = open_admin(settings, timeout)
    report = topics.create_or_check(settings, admin, metadata, timeout)
    archive = Archive(settings.database_url)
    try:
        archive.create_schema()
    except SQLAlchemyError as exc:
        raise TransientError(f"cannot create the archive schema at DATABASE_URL: {exc.__cause__ or exc}") from None
    report.append("archive schema: ready")
    report.append(_bloom_ready(settings, archive))
    archive.dispose()
    return report


def _bloom_ready(settings, archive) -> str:
    # Without a built filter every miss reads the archive (correct, slower):
    # a cache Redis that does not answer now does not fail the deploy.
    from pipeline.archive.cache import bloom_filter

    try:
        bloom = bloom_filter(settings)
        if bloom.built():
            return "bloom filter: ready"
        count = bloom.rebuild(ArchiveReader(archive).ids())
    except (redis.RedisError, SQLAlchemyError) as exc:
        return f"bloom filter: not built ({exc}); run `flask --app app archive rebuild-bloom`"
    return f"bloom filter: built from {count} archived ids"
