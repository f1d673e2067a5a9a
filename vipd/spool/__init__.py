"""The durable failover queue: messages that cannot go to a backend now wait here, safely."""
