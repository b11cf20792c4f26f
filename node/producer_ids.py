"""Producer ids for InitProducerId, served from blocks the controller hands out.

A node takes a block of :data:`BLOCK_SIZE` ids with one ``AllocateProducerIds`` controller
command (forwarded to the active controller like any metadata change) and answers
InitProducerId from it until it is used up. The controller's replicated state records the
next free id, so no id is handed out twice, also across controller failovers and node
restarts (the unused rest of a block is simply never used).

A request that names an existing id and epoch gets the same id with the epoch bumped by one:
the new session's first batch (sequence 0, higher epoch) fences the old one on every
partition it reaches. The bump is stateless: two concurrent bumps from the same epoch both
get epoch + 1 (stable transactional ids, which would need a coordinator, are out of scope).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from tidelog.controller.commands import AllocateProducerIds, Command
from tidelog.controller.state import ClusterState
from tidelog.errors import InvalidRequest, LeaderNotAvailable
from tidelog.node.producer_state import EPOCH_MAX

#: Ids per block taken from the controller.
BLOCK_SIZE = 1000
_ALLOCATE_TIMEOUT_S = 10.0


class ControllerLike(Protocol):
    @property
    def state(self) -> ClusterState: ...
    async def submit(self, command: Command, timeout_s: float = ...) -> int: ...
    async def wait_applied(self, index: int, timeout_s: float) -> None: ...


class ProducerIdAllocator:
    def __init__(self, controller: ControllerLike, node_id: int, block_size: int = BLOCK_SIZE):
        self._controller = controller
        self._node_id = node_id
        self._block_size = block_size
        self._next = 0
        self._end = 0
        self._lock = asyncio.Lock()
        #: Blocks taken since start (for tests and metrics).
        self.blocks_taken = 0

    async def new_id(self) -> int:
        async with self._lock:
            if self._next >= self._end:
                await self._take_block()
            pid = self._next
            self._next += 1
            return pid

    async def init(self, producer_id: int | None, epoch: int) -> tuple[int, int]:
        """(id, epoch) for a new session: a new id at epoch 0, or ``producer_id`` with the
        epoch bumped (a new id once the epoch cannot grow)."""
        if producer_id is None:
            return await self.new_id(), 0
        if producer_id < 0 or not 0 <= epoch <= EPOCH_MAX:
            raise InvalidRequest(
                f"producer_id must be >= 0 and producer_epoch in 0..{EPOCH_MAX}, got "
                f"{producer_id} and {epoch}"
            )
        if producer_id >= self._controller.state.next_producer_id:
            raise InvalidRequest(f"producer id {producer_id} was never handed out")
        if epoch == EPOCH_MAX:
            return await self.new_id(), 0
        return producer_id, epoch + 1

    async def _take_block(self) -> None:
        controller = self._controller
        if self._node_id not in controller.state.nodes:
            raise LeaderNotAvailable(
                f"node {self._node_id} is not registered with the controller yet; retry"
            )
        index = await controller.submit(
            AllocateProducerIds(self._node_id, self._block_size), _ALLOCATE_TIMEOUT_S
        )
        await controller.wait_applied(index, _ALLOCATE_TIMEOUT_S)
        block = controller.state.producer_id_block(self._node_id)
        if block is None or block.index < index:
            raise LeaderNotAvailable("the controller did not record the producer id block; retry")
        self._next, self._end = block.start, block.start + block.count
        self.blocks_taken += 1
