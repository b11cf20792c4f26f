"""The Python client: Producer, Consumer and Admin (async first, with sync facades).

    from tidelog.client import Producer, Consumer, TopicPartition

    async with Producer("127.0.0.1:9092", acks="all") as producer:
        md = await producer.send("orders", b"{...}", key=b"customer-42")

    async with Consumer("127.0.0.1:9092") as consumer:
        consumer.assign([TopicPartition("orders", 0)])
        await consumer.seek_to_beginning()
        for record in await consumer.poll(timeout_ms=1000):
            ...

SyncProducer, SyncConsumer and SyncAdmin offer the same without asyncio.
"""

from tidelog.client.admin import Admin, ClusterView, PartitionDescription, TopicDescription
from tidelog.client.consumer import Consumer, FetchedBatch, NoOffset
from tidelog.client.errors import OutcomeUnknown
from tidelog.client.producer import BatchesFuture, BufferFull, Producer, RecordFuture
from tidelog.client.structs import (
    BatchMetadata,
    ConsumerRecord,
    Header,
    RecordMetadata,
    TopicPartition,
)
from tidelog.client.sync import SyncAdmin, SyncConsumer, SyncProducer

__all__ = [
    "Admin",
    "BatchMetadata",
    "BatchesFuture",
    "BufferFull",
    "ClusterView",
    "Consumer",
    "ConsumerRecord",
    "FetchedBatch",
    "Header",
    "NoOffset",
    "OutcomeUnknown",
    "PartitionDescription",
    "Producer",
    "RecordFuture",
    "RecordMetadata",
    "SyncAdmin",
    "SyncConsumer",
    "SyncProducer",
    "TopicDescription",
    "TopicPartition",
]
