"""tidelog: a distributed, replicated log broker (Kafka/Redpanda family) over gRPC.

Subpackages: ``tidelog.node`` (a broker process), ``tidelog.controller`` (cluster metadata),
``tidelog.client`` (Producer, Consumer, Admin), ``tidelog.v1`` (generated gRPC code), and
``tidelog.ops`` (the operator tools: the ``tidelog`` command, local cluster, chaos, bench),
which the others never import. ``records``, ``errors`` and ``config`` are the wire library
that client and node share.
"""

__version__ = "0.1.0"
