"""Herald's Kafka topics: made by the release phase, checked by every process that uses them.

Only `flask --app app release` creates topics (docs/operations.md: "Release phase"), with the
partitions and replication the settings ask for; web and bridge refuse to start
without them rather than create them with whatever defaults they have.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from pipeline.core.errors import KafkaUnavailable, TopicError

log = logging.getLogger("herald.topics")

RELEASE_COMMAND = "flask --app app release"


def require_topics(settings, metadata) -> None:
    """Raise TopicError, naming the release command, when a topic Herald uses is missing."""
    missing = [name for name in (settings.topic, settings.dlq_topic) if name not in metadata.topics]
    if missing:
        raise TopicError(f"Kafka has no topic {' or '.join(missing)}: run `{RELEASE_COMMAND}` "
                         "(the Procfile's release phase) first")


def replication_for(settings, brokers: int) -> int:
    """HERALD_TOPIC_REPLICATION, else min(3, brokers); never more than the brokers there are."""
    replication = settings.topic_replication or min(3, brokers)
    if replication > brokers:
        raise TopicError(f"HERALD_TOPIC_REPLICATION={replication} but the cluster has {brokers} broker(s)")
    return replication


def create_or_check(settings, admin, metadata, timeout: float = 30.0) -> list[str]:
    """Create the main and dead-letter topics when missing, check them otherwise.

    Returns one line per topic saying what was done. An existing topic with
    fewer partitions or replicas than asked is a TopicError: adding partitions
    would move channels to other partitions (and break their order), and
    Kafka cannot take partitions away, so an operator decides.
    """
    replication = replication_for(settings, len(metadata.brokers))
    # acks=all then survives the loss of one replica without accepting records held by one alone.
    config = {"min.insync.replicas": str(max(1, replication - 1))}
    report, wanted = [], []
    for name in (settings.topic, settings.dlq_topic):
        existing = metadata.topics.get(name)
        if existing is None:
            wanted.append(NewTopic(name, settings.topic_partitions, replication, config=config))
            continue
        partitions = len(existing.partitions)
        replicas = min((len(p.replicas) for p in existing.partitions.values()), default=0)
        if partitions < settings.topic_partitions:
            raise TopicError(f"topic {name} has {partitions} partitions, fewer than HERALD_TOPIC_PARTITIONS="
                             f"{settings.topic_partitions}: lower the setting, or add partitions yourself "
                             "knowing that channels move to other partitions")
        if replicas < replication:
            raise TopicError(f"topic {name} has {replicas} replica(s), fewer than {replication} "
                             "(HERALD_TOPIC_REPLICATION): reassign its partitions with your Kafka's tools")
        report.append(f"topic {name}: exists ({partitions} partitions, {replicas} replicas)")
    if wanted:
        for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
            try:
                future.result(timeout)
            except KafkaException as exc:
                # Another release running at once made it: it is there, as asked.
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise KafkaUnavailable(f"cannot create topic {name}: {exc.args[0].str()}") from None
            log.info("topic created", extra={"topic": name})
            report.append(f"topic {name}: created ({settings.topic_partitions} partitions, "
                          f"replication {replication}, min.insync.replicas {config['min.insync.replicas']})")
    return report
