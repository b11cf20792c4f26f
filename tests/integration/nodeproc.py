"""Real node processes for the integration tests: free ports on 127.0.0.1, a temporary data
directory, readiness by gRPC health check, and a kill at the end. Shared by every test that
starts ``python -m tidelog.node`` (or ``python -m tidelog node start``)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Node:
    data_dir: Path
    log_path: Path
    node_id: int = 1
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    #: ``--controller-voters``; None: the node is a one-node cluster on its own.
    voters: str | None = None
    #: Start through the CLI (``python -m tidelog node start``) instead of ``-m tidelog.node``.
    via_cli: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        args = ["--id", str(self.node_id), "--listen", self.address]
        args += ["--data-dir", str(self.data_dir), "--metrics-port", str(self.metrics_port)]
        if self.voters is not None:
            args += ["--controller-voters", self.voters]
        if self.via_cli:
            return [sys.executable, "-m", "tidelog", "node", "start", *args]
        return [sys.executable, "-m", "tidelog.node", *args]

    def spawn(self) -> None:
        """Start the process without waiting (cluster members wait for each other)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited early:\n{self.log_path.read_text()}")
                try:
                    resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"node not serving after {timeout_s} s")
                time.sleep(0.05)

    def start(self) -> None:
        self.spawn()
        self.wait_serving()

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after a grace period); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL, resuming it first in case it was paused with SIGSTOP."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stop(signal.SIGKILL)
