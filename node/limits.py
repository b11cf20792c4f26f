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

# Produce: the work a request may cause beyond its size. A few KiB of zstd can declare
# millions of empty records (12 bytes each once expanded); checking them costs about 25 ns
# per record of column work (sum/min over array columns) and 1 ms per 10 MiB of expansion.
# At 2^20 records a batch costs ~25 ms to check, off the event loop (below), and each C call
# of it holds the GIL for at most that long.
batch_records_max: Final = 1 << 20
# The compressed batches of one request may expand to this many times the topic's
# max.message.bytes together, and never beyond produce_request_bytes_max: a compressed
# request makes the node read no more than an uncompressed one could. At the default 8 MiB
# that is 64 MiB, the client's largest batch (BATCH_BYTES_LIMIT, measured uncompressed).
expansion_ratio_max: Final = 8
# Requests whose records (decompressed) stay below this are checked on the event loop:
# ~20k records, about 1 ms. Larger ones are checked in a worker thread, one partition's
# requests in arrival order, at most produce_check_threads at a time on the node (each
# holds up to produce_request_bytes_max of expanded records: 128 MiB in all).
produce_inline_check_bytes_max: Final = 256 * KIB
produce_check_threads: Final = 2


def produce_expanded_bytes_max(max_message_bytes: int) -> int:
    """What the compressed batches of one produce request may expand to, together."""
    return min(expansion_ratio_max * max_message_bytes, produce_request_bytes_max)


produce_timeout_default_ms: Final = 30_000
produce_timeout_max_ms: Final = 15 * 60_000
#: How long a linearizable ListOffsets waits for a majority to confirm the leader.
read_barrier_timeout_ms: Final = 5_000

fetch_bytes_default: Final = 1 * MIB
# A Fetch response holds at least one whole batch, so it may exceed max_bytes by one batch.
fetch_bytes_max: Final = 32 * MIB
fetch_wait_default_ms: Final = 500
fetch_wait_max_ms: Final = 60_000

# Fetch streams. A stream reads its next response only once gRPC took the previous one, so
# one whose client stops reading holds at most one response (node/fetch_quota.py). A
# consumer keeps one stream per partition it reads from this node, over one connection.
fetch_streams_per_peer_max: Final = 1024
fetch_streams_per_node_max: Final = 8192
# Bytes of responses being written, per connection and per node: at the default 1 MiB per
# response, 64 responses of one connection and 512 of the node are in flight at once; more
# wait until clients read. A response holds at least one batch, so the sum may exceed the
# bound by one batch (max.message.bytes) per stream reading at that moment.
fetch_buffered_bytes_per_peer_max: Final = 64 * MIB
fetch_buffered_bytes_per_node_max: Final = 512 * MIB
fetch_grant_bytes_min: Final = 64 * KIB

# Table API (node/table_service.py). A key is also bounded by the topic's max.message.bytes
# (no longer key fits in one of its batches).
table_key_bytes_max: Final = 1 * MIB
table_get_many_keys_max: Final = 10_000
# A GetMany answer larger than this is refused: ask for fewer keys per request.
table_get_many_bytes_max: Final = 64 * MIB
table_page_rows_default: Final = 1_000
table_page_rows_max: Final = 10_000
# A scan page or watch event stops at the first row past this many bytes of keys and values.
table_page_bytes_max: Final = 4 * MIB
# min_offset waits: 0 picks the default.
table_wait_default_ms: Final = 10_000
table_wait_max_ms: Final = 60_000
# Open scan snapshots per node, and how long one lives without a page asked of it.
table_scans_max: Final = 256
table_scan_idle_ms: Final = 60_000
table_watch_streams_max: Final = 1024
# Log bytes a watch reads (and decodes) per event once past its snapshot.
table_watch_read_bytes: Final = 1 * MIB
table_watch_keepalive_ms: Final = 5_000
# The rows the tables of a node keep in memory for point reads (node/table.py's row cache),
# counted as key + value + ~200 bytes of objects per row.
table_row_cache_bytes: Final = 128 * MIB

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
assert fetch_streams_per_peer_max <= fetch_streams_per_node_max
assert 2 * fetch_bytes_max <= fetch_buffered_bytes_per_peer_max <= fetch_buffered_bytes_per_node_max
assert fetch_grant_bytes_min <= fetch_bytes_default
assert produce_expanded_bytes_max(8 * MIB) == produce_request_bytes_max
assert 12 * batch_records_max <= produce_request_bytes_max
assert 0 < produce_inline_check_bytes_max < produce_request_bytes_max
assert produce_check_threads >= 1
assert table_page_rows_default <= table_page_rows_max
assert table_page_bytes_max + 1 * MIB <= grpc_message_bytes_max
assert table_get_many_bytes_max + 1 * MIB <= grpc_message_bytes_max
assert 0 < table_wait_default_ms <= table_wait_max_ms
