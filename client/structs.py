"""The small value types of the client API, named as Kafka's Python clients name them.

They are NamedTuples: hashable (a TopicPartition is a dict key everywhere), unpackable, and the
cheapest Python objects to build, which matters for the one ConsumerRecord made per record.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

__all__ = ["BatchMetadata", "ConsumerRecord", "Header", "RecordMetadata", "TopicPartition"]

#: A record header: a UTF-8 name and an optional value.
Header = tuple[str, bytes | None]


class TopicPartition(NamedTuple):
    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}"


class RecordMetadata(NamedTuple):
    """Where an acknowledged record was written. ``offset`` is -1 with ``acks=0`` (the node
    answers before it appends, so the offset is unknown)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int

    def __await__(self) -> Generator[Any, None, RecordMetadata]:
        """``await md`` is ``md``: code ported from aiokafka, where ``await producer.send()``
        gives a future to await again, gets the same metadata (Producer.send says more)."""
        return _ready(self).__await__()


async def _ready(md: RecordMetadata) -> RecordMetadata:
    return md


class BatchMetadata(NamedTuple):
    """One acknowledged slice of a :meth:`Producer.send_many` call: ``record_count`` records
    written at consecutive offsets from ``base_offset`` (-1 with ``acks=0``)."""

    topic: str
    partition: int
    base_offset: int
    record_count: int
    timestamp_ms: int
    #: From the first Produce request of the batch holding these records to its answer,
    #: retries included: the send-to-ack latency a benchmark reports.
    latency_ms: float


class ConsumerRecord(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[Header]
