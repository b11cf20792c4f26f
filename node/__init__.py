"""One broker process: storage, Raft, replicas, gRPC services and metrics."""
