"""``replica.recovery.bytes.per.second`` at run time: the cluster setting, when set, is the
rate of every catch-up on the node (copies in progress included: the limiter reads it at
every chunk and message); unset, the node's ``--replica-recovery-bytes-per-second``."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.node_fakes import Client
from tidelog.controller.settings import RECOVERY_BYTES_PER_SECOND, RECOVERY_LAG_BYTES
from tidelog.node.catchup import RECOVERY_LAG_BYTES_DEFAULT, LogThrottle
from tidelog.node.server import Node
from tidelog.v1 import admin_pb2

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


async def settle(node: Node, key: str, present: bool) -> None:
    async with asyncio.timeout(10):
        while (key in node.controller.state.settings) != present:
            await asyncio.sleep(0.02)


async def test_the_cluster_setting_overrides_the_node_flag_at_run_time(
    node: Node, client: Client
) -> None:
    assert node.recovery_rate() == node.recovery_bytes_per_second == 40 * MIB
    assert node.recovery_lag_bytes() == RECOVERY_LAG_BYTES_DEFAULT
    await client.create("t", partitions=1)
    part = next(iter(node.registry.partitions()))
    assert part.group is not None
    throttle = part.group.raw.catchup
    assert isinstance(throttle, LogThrottle)
    await client.admin.SetClusterConfig(
        admin_pb2.SetClusterConfigRequest(
            set={RECOVERY_BYTES_PER_SECOND: str(3 * MIB), RECOVERY_LAG_BYTES: str(MIB)}
        )
    )
    await settle(node, RECOVERY_BYTES_PER_SECOND, True)
    assert node.recovery_rate() == 3 * MIB
    assert node.recovery_lag_bytes() == MIB
    # The limiter the copies and the APPEND throttle share reads the node's current rate.
    assert node._catchup is not None and node._catchup.rate() == 3 * MIB
    assert (
        node.metrics.registry.get_sample_value("tidelog_replica_recovery_rate_bytes_per_second")
        == 3 * MIB
    )
    # 0 in the cluster setting is unlimited, and still wins over the flag.
    await client.admin.SetClusterConfig(
        admin_pb2.SetClusterConfigRequest(set={RECOVERY_BYTES_PER_SECOND: "0"})
    )
    async with asyncio.timeout(10):
        while node.recovery_rate() != 0:
            await asyncio.sleep(0.02)
    # Unset: the node's flag again.
    node.recovery_bytes_per_second = 7 * MIB
    await client.admin.SetClusterConfig(
        admin_pb2.SetClusterConfigRequest(delete=[RECOVERY_BYTES_PER_SECOND, RECOVERY_LAG_BYTES])
    )
    await settle(node, RECOVERY_BYTES_PER_SECOND, False)
    assert node.recovery_rate() == 7 * MIB
    assert node.recovery_lag_bytes() == RECOVERY_LAG_BYTES_DEFAULT
    sent = node.metrics.registry.get_sample_value(
        "tidelog_replica_recovery_sent_bytes_total", {"path": "append"}
    )
    assert sent == 0  # a one-node cluster has nobody to catch up


def test_the_lag_setting_is_at_least_one_mib() -> None:
    from tidelog.controller.settings import validate_cluster_settings
    from tidelog.errors import InvalidConfig

    assert validate_cluster_settings({RECOVERY_LAG_BYTES: str(MIB)}) == {
        RECOVERY_LAG_BYTES: str(MIB)
    }
    for bad in ("0", str(MIB - 1), "-5", "1MiB"):
        with pytest.raises(InvalidConfig, match=r"replica\.recovery\.lag\.bytes"):
            validate_cluster_settings({RECOVERY_LAG_BYTES: bad})
    assert validate_cluster_settings({RECOVERY_BYTES_PER_SECOND: "0"})  # 0: unlimited
