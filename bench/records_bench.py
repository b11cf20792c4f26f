"""Cost per record of the record batch format, per codec.

Prints microseconds per record (best of several rounds, so other load on the machine
inflates the figures less) for encode_batch, validate_batch (what the broker does on
produce), decode_records and decode_values (what a consumer does).

    .venv/bin/python bench/records_bench.py [--records 1000] [--value-bytes 100] [--keys]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from tidelog.records import (
    Codec,
    decode_records,
    decode_values,
    encode_batch,
    validate_batch,
)

ROUND_SECONDS = 0.2
ROUNDS = 5


def make_values(n: int, size: int, seed: int = 1) -> list[bytes]:
    """JSON-ish payloads: realistic compressibility rather than all-zero or all-random."""
    rng = random.Random(seed)
    words = ["order", "customer", "price", "EUR", "USD", "status", "shipped", "pending"]
    out = []
    for i in range(n):
        doc = {"id": i, "w": rng.choice(words), "amount": rng.randint(0, 10**6), "pad": ""}
        raw = json.dumps(doc).encode()
        filler = bytes(rng.choice(b"abcdefghij0123456789") for _ in range(max(0, size - len(raw))))
        out.append((raw + filler)[:size])
    return out


def per_record_us(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        calls = 0
        start = time.perf_counter()
        deadline = start + ROUND_SECONDS
        while True:
            fn()
            calls += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        best = min(best, (now - start) / calls)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000, help="records per batch")
    parser.add_argument("--value-bytes", type=int, default=100, help="bytes per value")
    parser.add_argument("--keys", action="store_true", help="give every record a 16-byte key")
    args = parser.parse_args()

    n = args.records
    values = make_values(n, args.value_bytes)
    keys = [b"key-%012d" % i for i in range(n)] if args.keys else None
    print(
        f"{n} records x {args.value_bytes} B values, keys={'16 B' if keys else 'none'}; "
        "us/record, best of rounds"
    )
    print(f"{'codec':<6} {'batch B':>9} {'encode':>8} {'validate':>9} {'decode':>8} {'values':>8}")
    for codec in Codec:
        batch = encode_batch(values, keys, timestamps_ms=1_700_000_000_000, codec=codec)
        assert decode_values(batch) == values
        enc = per_record_us(lambda c=codec: encode_batch(values, keys, codec=c), n)  # type: ignore[misc]
        val = per_record_us(lambda b=batch: validate_batch(b), n)  # type: ignore[misc]
        dec = per_record_us(lambda b=batch: decode_records(b), n)  # type: ignore[misc]
        dval = per_record_us(lambda b=batch: decode_values(b), n)  # type: ignore[misc]
        print(
            f"{codec.name.lower():<6} {len(batch):>9} {enc:>8.3f} {val:>9.3f} {dec:>8.3f} {dval:>8.3f}"
        )


if __name__ == "__main__":
    main()
