"""The Python client: Producer, Consumer, Admin and Table (async first, with sync facades).

    from tidelog.client import Producer, Consumer, TopicPartition

    async with Producer("127.0.0.1:9092", acks="all") as producer:
        md = await producer.send("orders", b"{...}", key=b"customer-42")

    async with Consumer("127.0.0.1:9092") as consumer:
        consumer.assign([TopicPartition("orders", 0)])
        await consumer.seek_to_beginning()
        for record in await consumer.poll(timeout_ms=1000):
            ...

    async with Consumer("127.0.0.1:9092", group_id="billing") as consumer:
        consumer.subscribe(["orders"])  # the group's coordinator assigns the partitions
        async for record in consumer:
            ...  # offsets are committed every 5 s and on close (enable_auto_commit)

    async with Table("127.0.0.1:9092", "rates") as rates:   # a compacted topic's table
        row = await rates.get(b"EUR/USD")

SyncProducer, SyncConsumer, SyncAdmin and SyncTable offer the same without asyncio.
"""

from tidelog.client.admin import (
    Admin,
    ClusterView,
    GroupDescription,
    GroupListing,
    PartitionDescription,
    TopicDescription,
)
from tidelog.client.consumer import Consumer, FetchedBatch, NoOffset
from tidelog.client.errors import OutcomeUnknown, PartitionRevoked
from tidelog.client.producer import BatchesFuture, BufferFull, Producer, RecordFuture
from tidelog.client.structs import (
    BatchMetadata,
    ConsumerRecord,
    Header,
    RecordMetadata,
    TopicPartition,
)
from tidelog.client.sync import SyncAdmin, SyncConsumer, SyncProducer, SyncTable, SyncTableWatch
from tidelog.client.table import Row, ScanPage, Table, TableChange, TableContents, TableWatch

__all__ = [
    "Admin",
    "BatchMetadata",
    "BatchesFuture",
    "BufferFull",
    "ClusterView",
    "Consumer",
    "ConsumerRecord",
    "FetchedBatch",
    "GroupDescription",
    "GroupListing",
    "Header",
    "NoOffset",
    "OutcomeUnknown",
    "PartitionDescription",
    "PartitionRevoked",
    "Producer",
    "RecordFuture",
    "RecordMetadata",
    "Row",
    "ScanPage",
    "SyncAdmin",
    "SyncConsumer",
    "SyncProducer",
    "SyncTable",
    "SyncTableWatch",
    "Table",
    "TableChange",
    "TableContents",
    "TableWatch",
    "TopicDescription",
    "TopicPartition",
]
