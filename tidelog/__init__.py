"""tidelog: a distributed, replicated log broker (Kafka/Redpanda family) over gRPC.

Subpackages: ``tidelog.node`` (a broker process), ``tidelog.controller`` (cluster metadata),
``tidelog.client`` (Producer, Consumer, Admin), ``tidelog.v1`` (generated gRPC code).
"""

__version__ = "0.1.0"
