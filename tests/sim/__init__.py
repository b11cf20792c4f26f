"""Deterministic simulation of the Raft core (``node/raft``), TigerBeetle-VOPR style.

One process runs a whole cluster over a simulated clock, network and disk, every choice drawn
from one seed, and checks the safety invariants after every step (``checkers.py``). Parts:

- ``options.py``: what a seed varies (cluster size, timeouts, flow control, fault rates),
  with the bounds as named constants;
- ``network.py``: latency, loss, duplication, reordering, partitions;
- ``disk.py``: written vs synced state; crashes lose or tear unsynced writes;
- ``sim.py``: the event loop, a driver that follows the Ready contract, clients, faults, the
  safety and liveness phases; its membership profile adds random membership changes;
- ``core_adapter.py``: the only place that builds a core;
- ``runner.py`` / ``__main__.py``: many seeds, progress bar, regression seeds;
- ``steady.py``: messages per committed entry; ``mutations.py``: deliberately broken cores.

Commands (from the repository root):

    .venv/bin/python -m tests.sim --seeds 10000
    .venv/bin/python -m tests.sim --seed 123 -v
    .venv/bin/python -m tests.sim --membership --seeds 1000
    .venv/bin/python -m tests.sim.mutations
"""
