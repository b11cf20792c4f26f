"""A pure, deterministic Raft core in the manner of etcd raft: no I/O, clock or randomness."""
