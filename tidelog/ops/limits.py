"""Layout, ports and timeouts of the local cluster (``tidelog cluster``), each with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Final

CLUSTER_DIR_DEFAULT: Final = Path(".tidelog") / "cluster"
CLUSTER_FILE: Final = "cluster.json"
CLUSTER_FILE_VERSION: Final = 1
LOCK_FILE: Final = ".lock"
HOST: Final = "127.0.0.1"
BASE_PORT_DEFAULT: Final = 9092
#: Metrics ports start this far above the base port, so up to 100 nodes get contiguous,
#: non-overlapping gRPC and metrics ranges (9092.. and 9192.. by default).
METRICS_PORT_OFFSET: Final = 100
#: Internal (node-to-node) ports start this far above the base port (9292.. by default).
INTERNAL_PORT_OFFSET: Final = 200
#: Where ``cluster up`` keeps the CA and node certificates, and the secret of ``--no-tls``.
CERTS_DIR: Final = "certs"
SECRET_FILE: Final = "cluster.secret"
PORT_MAX: Final = 65535
#: Ports for tests and benchmarks (``free_port``) start here, above the well-known and the
#: local cluster's default ports, and end below the kernel's ephemeral range.
FREE_PORT_FLOOR: Final = 20000
#: The least room between the floor and the ephemeral range worth walking; with less (an
#: unusual ip_local_port_range) free_port takes the kernel's pick.
FREE_PORT_MIN_SPAN: Final = 2000
#: Where each process starts in that range: pid times a prime, so parallel workers (pids
#: close together) start thousands of ports apart.
FREE_PORT_PID_STRIDE: Final = 1543
#: Linux's default first ephemeral port, where /proc does not say.
EPHEMERAL_LOW_DEFAULT: Final = 32768
NODES_MAX: Final = 100
#: The controller (Raft group 0) runs on the first nodes; more voters only slow it down.
CONTROLLER_VOTERS_MAX: Final = 3

#: How long ``up`` waits for a controller leader and every node registered.
READY_TIMEOUT_S: Final = 60.0
#: How long ``start`` waits for a restarted node to serve and see itself registered alive.
NODE_READY_TIMEOUT_S: Final = 60.0
#: How long ``down`` waits after SIGTERM before SIGKILL (the node drains for up to 10 s).
STOP_TIMEOUT_S: Final = 15.0
#: How long to wait for a SIGKILLed process to disappear.
KILL_WAIT_S: Final = 5.0
#: How long a command waits for another one holding the cluster directory's lock.
LOCK_WAIT_S: Final = 120.0
POLL_INTERVAL_S: Final = 0.1
#: Deadline of one Metadata RPC of these commands; a node that does not answer is skipped.
METADATA_TIMEOUT_S: Final = 2.0
#: Lines of a node's log quoted in an error about that node.
LOG_TAIL_LINES: Final = 5
LOG_TAIL_BYTES: Final = 8192
#: Reads of an empty /proc/PID/cmdline (a process being exec'd) before giving up on it.
CMDLINE_READS_MAX: Final = 100
CMDLINE_RETRY_S: Final = 0.01

assert 0 < CONTROLLER_VOTERS_MAX <= NODES_MAX <= METRICS_PORT_OFFSET
assert INTERNAL_PORT_OFFSET >= METRICS_PORT_OFFSET + NODES_MAX
assert STOP_TIMEOUT_S > 10.0, "must exceed the node's drain timeout (node/limits.py)"
