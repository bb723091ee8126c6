"""Herald's pipeline: settings, the Kafka producer and the bridge, the Redis store, processing, archive and dead letters."""
