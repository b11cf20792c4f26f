"""Exchange rates as a table: a rates service publishes the latest rate per currency pair to a
compacted topic; a payments service reads all current rates in one call, keeps its copy
current with a watch, and converts payments with it.

Run it against the local cluster (``bash scripts/demo.sh`` or ``tidelog cluster up``) from
the repository root:

    .venv/bin/python examples/exchange_rates.py             # or --bootstrap HOST:PORT

It creates the topic ``exchange-rates`` (cleanup.policy=compact, 3 partitions, 3 replicas) if it is
missing, publishes a few rounds of rates (and delists one pair with a tombstone), converts a
few payments along the way, and at the end checks that the payments service's local copy
equals the table on the nodes. Exit status 0 when it does.

Inspect the table afterwards with ``tidelog table dump exchange-rates`` or ``tidelog table watch exchange-rates``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from decimal import Decimal
from pathlib import Path

from tidelog.client import Admin, Producer, Row, Table, TableChange
from tidelog.errors import TopicExists

TOPIC = "exchange-rates"
#: Starting rates: units of the quote currency per unit of the base currency.
PAIRS: dict[str, float] = {
    "EUR/USD": 1.0850,
    "GBP/USD": 1.2710,
    "USD/JPY": 151.20,
    "USD/CHF": 0.9030,
    "AUD/USD": 0.6560,
    "USD/CAD": 1.3590,
    "NZD/USD": 0.6010,
    "USD/SEK": 10.480,
}
#: The pair the rates service stops quoting halfway (a tombstone deletes it from the table).
DELISTED = "USD/SEK"


def default_bootstrap() -> str:
    if env := os.environ.get("TIDELOG_BOOTSTRAP", "").strip():
        return env
    try:  # the local cluster of `tidelog cluster up`, as the tidelog command finds it
        from tidelog.ops.localcluster import discover_bootstrap_in

        found = discover_bootstrap_in(
            Path(os.environ.get("TIDELOG_CLUSTER_DIR") or ".tidelog/cluster")
        )
    except ImportError:  # a client-only install: no tidelog.ops
        found = None
    return found or "127.0.0.1:9092"


# -- the rates service ---------------------------------------------------------------------------


async def publish_rates(bootstrap: str, rounds: int, interval_s: float) -> dict[int, int]:
    """Publish ``rounds`` updates of every pair (a small random walk); delist DELISTED
    halfway. Returns, per partition, the offset of the last record written: a reader that
    waits for these (min_offsets) reads these writes."""
    rng = random.Random(7)
    rates = dict(PAIRS)
    last: dict[int, int] = {}
    async with Producer(bootstrap, acks="all", linger_ms=2) as producer:
        for n in range(rounds):
            sends = []
            for pair in list(rates):
                if pair == DELISTED and n == rounds // 2:
                    sends.append(producer.send(TOPIC, None, key=pair.encode()))  # tombstone
                    del rates[pair]
                    print(f"rates:    {pair} delisted")
                    continue
                rates[pair] *= 1 + rng.uniform(-0.002, 0.002)
                sends.append(producer.send(TOPIC, f"{rates[pair]:.6f}".encode(), key=pair.encode()))
            for md in await asyncio.gather(*sends):
                last[md.partition] = max(last.get(md.partition, -1), md.offset)
            print(f"rates:    round {n + 1}/{rounds} published ({len(rates)} pairs)")
            await asyncio.sleep(interval_s)
    return last


# -- the payments service ------------------------------------------------------------------------


class RateBook:
    """The payments service's local copy of the rates table, kept current by a watch."""

    def __init__(self) -> None:
        self.rates: dict[str, Decimal] = {}
        self.offsets: dict[int, int] = {}
        self.changes = 0

    def load(self, rows: dict[bytes, Row], offsets: dict[int, int]) -> None:
        self.rates = {k.decode(): Decimal(r.value.decode()) for k, r in rows.items()}
        self.offsets = dict(offsets)

    def apply(self, c: TableChange) -> None:
        pair = c.key.decode()
        if c.value is None:
            self.rates.pop(pair, None)
        else:
            self.rates[pair] = Decimal(c.value.decode())
        self.offsets[c.partition] = c.offset + 1
        self.changes += 1

    def to_usd(self, amount: Decimal, currency: str) -> Decimal:
        if currency == "USD":
            return amount
        if (rate := self.rates.get(f"{currency}/USD")) is not None:
            return amount * rate
        if (rate := self.rates.get(f"USD/{currency}")) is not None:
            return amount / rate
        raise KeyError(f"no rate for {currency}")


async def payments_service(
    table: Table, book: RateBook, stop: asyncio.Event, ready: asyncio.Event
) -> None:
    # All current rates in one call, with the offset of each partition they reflect ...
    contents = await table.read_all()
    book.load(contents.rows, contents.offsets)
    print(f"payments: loaded {len(book.rates)} rates at offsets {contents.offsets}")
    ready.set()
    # ... then every change after exactly those offsets: no gap, no duplicate.
    async with table.watch(from_offsets=contents.offsets) as changes:
        while not stop.is_set():
            try:
                async with asyncio.timeout(0.2):
                    change = await anext(changes)
            except TimeoutError:
                continue
            book.apply(change)


async def convert_payments(book: RateBook, count: int, interval_s: float) -> None:
    rng = random.Random(11)
    currencies = ["EUR", "GBP", "JPY", "CHF", "AUD", "CAD", "NZD", "SEK"]
    for _ in range(count):
        amount = Decimal(rng.randrange(100, 100_000)) / 100
        currency = rng.choice(currencies)
        try:
            usd = book.to_usd(amount, currency)
        except KeyError as exc:
            print(f"payments: {amount} {currency} refused: {exc.args[0]} (pair delisted)")
        else:
            print(f"payments: {amount:>9} {currency} = {usd:>12.2f} USD")
        await asyncio.sleep(interval_s)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", "-b", default=None, help="host:port of a node")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of rate updates")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between rounds")
    ns = parser.parse_args()
    bootstrap = ns.bootstrap or default_bootstrap()

    async with Admin(bootstrap) as admin:
        try:
            await admin.create_topics(
                TOPIC, partitions=3, replication_factor=3, configs={"cleanup.policy": "compact"}
            )
            print(f"created the compacted topic {TOPIC!r}")
        except TopicExists:
            pass

    async with Table(bootstrap, TOPIC) as table:
        book = RateBook()
        stop, ready = asyncio.Event(), asyncio.Event()
        payments = asyncio.create_task(payments_service(table, book, stop, ready))
        await ready.wait()
        publisher = asyncio.create_task(publish_rates(bootstrap, ns.rounds, ns.interval))
        await asyncio.sleep(ns.interval / 2)
        await convert_payments(book, ns.rounds, ns.interval)
        written = await publisher

        # The rates service's last writes are in the table (read your own writes) ...
        current = await table.get_many(list(PAIRS), min_offsets=written)
        # ... and the watch brings the local copy there too.
        async with asyncio.timeout(10):
            while any(book.offsets.get(p, 0) <= o for p, o in written.items()):
                await asyncio.sleep(0.05)
        stop.set()
        await payments
        expected = {k.decode(): Decimal(r.value.decode()) for k, r in current.items()}
        ok = book.rates == expected and DELISTED not in book.rates
        print(
            f"payments: {book.changes} changes watched; local copy "
            f"{'matches' if ok else 'DIFFERS FROM'} the table ({len(expected)} pairs, "
            f"{DELISTED} delisted)"
        )
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
