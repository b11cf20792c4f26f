"""tidelog: a distributed, replicated log broker (Kafka/Redpanda family) over gRPC.

Subpackages: ``tidelog.node`` (a broker process), ``tidelog.controller`` (cluster metadata),
``tidelog.client`` (Producer, Consumer, Admin), ``tidelog.v1`` (generated gRPC code), and
``tidelog.ops`` (the operator tools: the ``tidelog`` command, local cluster, chaos, bench),
which the others never import. ``records``, ``errors`` and ``config`` are the wire library
that client and node share.
"""

__version__ = "0.1.0"

#: Names ``from tidelog import ...`` offers, from tidelog.client, imported on first use (so a
#: node, or ``import tidelog`` for the version, does not load the client).
_CLIENT_NAMES = frozenset({"Row", "SyncTable", "Table", "TableChange", "TableContents"})


def __getattr__(name: str) -> object:
    if name in _CLIENT_NAMES:
        import tidelog.client

        return getattr(tidelog.client, name)
    raise AttributeError(f"module 'tidelog' has no attribute {name!r}")
