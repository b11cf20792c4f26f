"""The scan continuation token (node/table_token.py): what the node encodes it decodes, and
anything else (truncated, damaged, another version, another scan's topic or partition) is
INVALID_TOKEN, never an exception of another kind or a wrong key."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidelog.errors import InvalidToken
from tidelog.node.table_token import (
    SCAN_ID_BYTES,
    TOKEN_VERSION,
    ScanToken,
    decode_token,
    encode_token,
)


def _token(last_key: bytes = b"k-17", topic: str = "rates", partition: int = 2) -> ScanToken:
    return ScanToken(os.urandom(SCAN_ID_BYTES), topic, partition, 1234, last_key)


@given(
    last_key=st.binary(max_size=300),
    partition=st.integers(0, 2**31 - 1),
    applied=st.integers(0, 2**63 - 1),
    topic=st.text(min_size=1, max_size=40),
)
def test_round_trip(last_key: bytes, partition: int, applied: int, topic: str) -> None:
    t = ScanToken(os.urandom(SCAN_ID_BYTES), topic, partition, applied, last_key)
    assert decode_token(encode_token(t), topic, partition) == t


def test_every_truncation_is_invalid() -> None:
    raw = encode_token(_token())
    for n in range(len(raw)):
        with pytest.raises(InvalidToken, match="malformed continuation token"):
            decode_token(raw[:n], "rates", 2)


def test_every_flipped_bit_is_invalid() -> None:
    raw = encode_token(_token(b"abc"))
    for i in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            with pytest.raises(InvalidToken):
                decode_token(bytes(bad), "rates", 2)


def test_another_version_is_invalid_even_with_a_good_checksum() -> None:
    raw = bytearray(encode_token(_token())[:-4])
    raw[0] = TOKEN_VERSION + 1
    forged = bytes(raw) + struct.pack(">I", zlib.crc32(bytes(raw)))
    with pytest.raises(InvalidToken, match=f"version {TOKEN_VERSION + 1}"):
        decode_token(forged, "rates", 2)


def test_a_key_length_that_disagrees_with_the_size_is_invalid() -> None:
    raw = bytearray(encode_token(_token(b"abcd"))[:-4])
    struct.pack_into(">I", raw, 1 + SCAN_ID_BYTES + 4 + 4 + 8, 3)  # claims 3 key bytes of 4
    forged = bytes(raw) + struct.pack(">I", zlib.crc32(bytes(raw)))
    with pytest.raises(InvalidToken, match="key length"):
        decode_token(forged, "rates", 2)


def test_a_token_of_another_topic_or_partition_is_invalid() -> None:
    raw = encode_token(_token())
    with pytest.raises(InvalidToken, match="another scan"):
        decode_token(raw, "other", 2)
    with pytest.raises(InvalidToken, match="another scan"):
        decode_token(raw, "rates", 3)


def test_garbage_is_invalid() -> None:
    for raw in (b"", b"\x00", b"hello world, not a token at all", os.urandom(64)):
        with pytest.raises(InvalidToken):
            decode_token(raw, "rates", 0)


def test_encode_refuses_a_scan_id_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="scan id"):
        encode_token(ScanToken(b"short", "t", 0, 0, b""))
