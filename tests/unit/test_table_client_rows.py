"""The Table client's decoding of rows (client/table.py): a page's columns become the same
Rows a per-row decode gives, keys are normalized to bytes, malformed columns are refused."""

from __future__ import annotations

from typing import Any

import pytest

from tidelog.client.table import Row, _columns, _keys, _rows
from tidelog.errors import TidelogError
from tidelog.v1 import table_pb2 as pb


def _page(n: int) -> pb.TableRows:
    raw = pb.TableRows(
        keys=[b"k%d" % i for i in range(n)],
        values=[b"v" * i for i in range(n)],  # the empty value included
        offsets=[10 + i for i in range(n)],
        timestamps_ms=[1_700_000_000_000 + i for i in range(n)],
    ).SerializeToString()
    return pb.TableRows.FromString(raw)  # as received: parsed from the wire


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_columns_decode_the_rows_a_per_row_decode_gives(n: int) -> None:
    page = _page(n)
    want = [
        Row(k, v, o, t, 3)
        for k, v, o, t in zip(page.keys, page.values, page.offsets, page.timestamps_ms, strict=True)
    ]
    keys, rows = _columns(page, 3)
    assert rows == want and _rows(page, 3) == want
    assert keys == [r.key for r in want]
    assert all(type(r) is Row for r in rows)
    if rows:
        r = rows[-1]
        assert (r.key, r.value, r.offset, r.timestamp_ms, r.partition) == (
            b"k%d" % (n - 1),
            b"v" * (n - 1),
            10 + n - 1,
            1_700_000_000_000 + n - 1,
            3,
        )


def test_columns_of_unequal_length_are_refused() -> None:
    page = pb.TableRows(keys=[b"a", b"b"], values=[b"1"], offsets=[1, 2], timestamps_ms=[0, 0])
    with pytest.raises(TidelogError, match="malformed rows"):
        _columns(page, 0)


def test_keys_are_bytes_whatever_they_were_given_as() -> None:
    given: list[Any] = [b"a", "b", bytearray(b"c"), memoryview(b"d")]  # views too, at run time
    assert _keys(given) == [b"a", b"b", b"c", b"d"]
    assert all(type(k) is bytes for k in _keys(given))
    only_bytes = [b"x", b"y"]
    assert _keys(iter(only_bytes)) == only_bytes
    with pytest.raises(TypeError, match="bytes or str"):
        _keys([b"a", 1])  # type: ignore[list-item]  # a wrong type on purpose
