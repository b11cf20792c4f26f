"""Helpers shared by every kind of test: free ports (:func:`free_port`) and real node
processes (:mod:`tests.support.nodeproc`). Tests may import the ops package for them
(``tidelog.ops.processes`` owns the node's command line and the spawning); the library never
does."""

from tidelog.ops.processes import free_port

__all__ = ["free_port"]
