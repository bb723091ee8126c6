"""The archive's schema migrations (Alembic), applied by the release step: `pipeline.archive.migrations.upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config


def upgrade(engine) -> None:
    """Bring the archive's schema to the newest revision."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def current(engine) -> str | None:
    """The archive's schema revision, or None before the first migration."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
