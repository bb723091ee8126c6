"""The release phase (`flask --app app release`, the Procfile's `release:`): run once per deploy,
before the new processes start, so that no process needs to create what it uses."""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError

from pipeline import topics
from pipeline.archive import Archive
from pipeline.errors import TransientError
from pipeline.kafka import open_admin


def release(settings, timeout: float = 30.0) -> list[str]:
    """Create or check the Kafka topics and the archive schema; returns what was done, one line each.

    Raises a HeraldError (KafkaUnavailable, TopicError) that says what to fix.
    """
    admin, metadata = open_admin(settings, timeout)
    report = topics.create_or_check(settings, admin, metadata, timeout)
    try:
        Archive(settings.database_url).create_schema()
    except SQLAlchemyError as exc:
        raise TransientError(f"cannot create the archive schema at DATABASE_URL: {exc.__cause__ or exc}") from None
    report.append("archive schema: ready")
    return report
