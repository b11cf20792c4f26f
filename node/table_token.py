"""The continuation token of a Table scan: opaque to clients, checked by the node.

A token names the scan's snapshot (a random id the node keeps the RocksDB snapshot under),
the topic (by a CRC of its name) and partition it belongs to, the applied offset its first page
read, and the last key a page returned: the next page starts right after that key. Layout,
big-endian::

    version u8 (1) | scan id 16 bytes | topic crc32 u32 | partition i32 | applied offset i64
    | last key length u32 | last key | crc32 u32 of everything before it

The checksum catches a damaged or truncated token (INVALID_TOKEN) before the node trusts a
length inside it. It is not a signature: a forged token can only name a snapshot id (128
random bits, so in practice none) and a key to start after, a read the caller could make
anyway.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

from tidelog.errors import InvalidToken

__all__ = ["SCAN_ID_BYTES", "TOKEN_VERSION", "ScanToken", "decode_token", "encode_token"]

TOKEN_VERSION: Final = 1
SCAN_ID_BYTES: Final = 16
_HEAD = struct.Struct(f">B{SCAN_ID_BYTES}sIiqI")
_CRC = struct.Struct(">I")


def topic_crc(topic: str) -> int:
    return zlib.crc32(topic.encode())


@dataclass(frozen=True, slots=True)
class ScanToken:
    scan_id: bytes
    topic: str
    partition: int
    applied_offset: int
    last_key: bytes


def encode_token(token: ScanToken) -> bytes:
    if len(token.scan_id) != SCAN_ID_BYTES:
        raise ValueError(f"a scan id is {SCAN_ID_BYTES} bytes, got {len(token.scan_id)}")
    body = (
        _HEAD.pack(
            TOKEN_VERSION,
            token.scan_id,
            topic_crc(token.topic),
            token.partition,
            token.applied_offset,
            len(token.last_key),
        )
        + token.last_key
    )
    return body + _CRC.pack(zlib.crc32(body))


def decode_token(raw: bytes, topic: str, partition: int) -> ScanToken:
    """The token of a scan of ``topic``/``partition``; InvalidToken when it is malformed, of
    another version, damaged, or of another topic or partition."""
    hint = "pass the continuation_token of the previous page unchanged, or restart the scan"
    if len(raw) < _HEAD.size + _CRC.size:
        raise InvalidToken(
            f"malformed continuation token: {len(raw)} bytes, a token has at least "
            f"{_HEAD.size + _CRC.size}; {hint}"
        )
    if raw[0] != TOKEN_VERSION:
        raise InvalidToken(
            f"malformed continuation token: version {raw[0]}, this node reads version "
            f"{TOKEN_VERSION}; {hint}"
        )
    body, (crc,) = raw[: -_CRC.size], _CRC.unpack_from(raw, len(raw) - _CRC.size)
    if zlib.crc32(body) != crc:
        raise InvalidToken(f"malformed continuation token: its checksum does not match; {hint}")
    _version, scan_id, tcrc, part, applied, key_len = _HEAD.unpack_from(body)
    if _HEAD.size + key_len != len(body):
        raise InvalidToken(f"malformed continuation token: inconsistent key length; {hint}")
    if tcrc != topic_crc(topic) or part != partition:
        raise InvalidToken(
            f"the continuation token belongs to another scan than one of {topic!r} partition "
            f"{partition} (a token continues only the scan that returned it)"
        )
    if applied < 0:
        raise InvalidToken(f"malformed continuation token: negative offset; {hint}")
    return ScanToken(scan_id, topic, part, applied, bytes(body[_HEAD.size :]))
