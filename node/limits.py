"""Every bound of the node's request handling, in one place, with units last.

The relations between them are asserted at import time, so a change that breaks one (a
produce request that gRPC would reject before the node could explain why) fails at once.
"""

from __future__ import annotations

from typing import Final

from tidelog.config import TOPIC_CONFIG_KEYS

KIB: Final = 1024
MIB: Final = 1024 * KIB

# Produce: the sum of the batches in one request. A single batch is bounded by the topic's
# max.message.bytes, whose largest allowed value is this same figure.
produce_request_bytes_max: Final = 64 * MIB
# gRPC's own message bound sits above ours, so an oversized request gets our readable error
# (with the limit named) rather than a bare RESOURCE_EXHAUSTED from the transport.
grpc_message_bytes_max: Final = produce_request_bytes_max + 8 * MIB

produce_timeout_default_ms: Final = 30_000
produce_timeout_max_ms: Final = 15 * 60_000
#: How long a linearizable ListOffsets waits for a majority to confirm the leader.
read_barrier_timeout_ms: Final = 5_000

fetch_bytes_default: Final = 1 * MIB
# A Fetch response holds at least one whole batch, so it may exceed max_bytes by one batch.
fetch_bytes_max: Final = 32 * MIB
fetch_wait_default_ms: Final = 500
fetch_wait_max_ms: Final = 60_000

# Admin requests: how many topics one request may name.
topics_per_request_max: Final = 10_000
# Every partition holds a few open files (segment, indexes); main raises RLIMIT_NOFILE.
partitions_per_node_max: Final = 20_000

# Background work.
retention_interval_ms: Final = 5_000
flush_threads: Final = 4
# SIGTERM/SIGINT: in-flight requests get this long to finish before they are cancelled.
drain_timeout_ms: Final = 10_000

_max_message_bytes_ceiling = 64 * MIB
assert (
    TOPIC_CONFIG_KEYS["max.message.bytes"].parse(
        "max.message.bytes", str(_max_message_bytes_ceiling)
    )
    == _max_message_bytes_ceiling
)
assert _max_message_bytes_ceiling <= produce_request_bytes_max < grpc_message_bytes_max
assert fetch_bytes_default <= fetch_bytes_max
assert fetch_bytes_max + 1 * MIB <= grpc_message_bytes_max
assert 0 < fetch_wait_default_ms <= fetch_wait_max_ms
assert 0 < produce_timeout_default_ms <= produce_timeout_max_ms
assert flush_threads >= 1
