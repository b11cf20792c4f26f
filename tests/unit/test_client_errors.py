"""How the client turns a failed RPC into a TidelogError, with a fake grpc.aio error."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from tidelog.errors import (
    NodeUnavailable,
    NotLeader,
    OffsetOutOfRange,
    OutOfOrderSequence,
    ProducerFenced,
    RequestTimedOut,
    TidelogError,
    TopicExists,
    UnknownProducerId,
    Unsupported,
    from_rpc_error,
    trailing_metadata,
)


def fake_rpc_error(
    err: TidelogError | None, code: grpc.StatusCode, details: str
) -> aio.AioRpcError:
    trailers = aio.Metadata(*trailing_metadata(err)) if err is not None else aio.Metadata()
    return aio.AioRpcError(code, aio.Metadata(), trailers, details=details, debug_error_string="")


def test_not_leader_keeps_the_leader_and_is_retriable() -> None:
    sent = NotLeader("node 2 leads t/0", leader_id="2", leader_address="10.0.0.2:9092")
    err = from_rpc_error(fake_rpc_error(sent, sent.code, sent.message))
    assert isinstance(err, NotLeader) and err.retriable
    assert err.metadata == {"leader_id": "2", "leader_address": "10.0.0.2:9092"}
    assert str(err) == "node 2 leads t/0"


def test_offset_out_of_range_names_the_range() -> None:
    sent = OffsetOutOfRange(
        "offset 99 is outside [0, 10)", log_start_offset="0", high_watermark="10"
    )
    err = from_rpc_error(fake_rpc_error(sent, sent.code, sent.message))
    assert isinstance(err, OffsetOutOfRange) and not err.retriable
    assert err.metadata["high_watermark"] == "10"


def test_non_retriable_admin_error() -> None:
    sent = TopicExists("topic 't' already exists")
    err = from_rpc_error(fake_rpc_error(sent, sent.code, sent.message))
    assert type(err) is TopicExists and not err.retriable


@pytest.mark.parametrize(
    ("code", "cls", "retriable"),
    [
        (grpc.StatusCode.UNAVAILABLE, NodeUnavailable, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, RequestTimedOut, True),
        (grpc.StatusCode.UNIMPLEMENTED, Unsupported, False),
        (grpc.StatusCode.INTERNAL, TidelogError, False),
    ],
)
def test_bare_transport_errors_without_error_info(
    code: grpc.StatusCode, cls: type[TidelogError], retriable: bool
) -> None:
    err = from_rpc_error(fake_rpc_error(None, code, "connection refused"))
    assert type(err) is cls
    assert err.retriable is retriable
    assert "connection refused" in str(err)


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (
            OutOfOrderSequence(
                "t/0: gap", producer_id="7", expected_sequence="5", received_sequence="9"
            ),
            "OUT_OF_ORDER_SEQUENCE",
        ),
        (
            ProducerFenced("t/0: fenced", producer_id="7", producer_epoch="0", current_epoch="1"),
            "PRODUCER_FENCED",
        ),
        (UnknownProducerId("t/0: unknown", producer_id="7"), "UNKNOWN_PRODUCER_ID"),
    ],
)
def test_idempotence_errors_round_trip(sent: TidelogError, reason: str) -> None:
    assert sent.reason == reason
    assert sent.code == grpc.StatusCode.FAILED_PRECONDITION
    err = from_rpc_error(fake_rpc_error(sent, sent.code, sent.message))
    assert type(err) is type(sent) and not err.retriable
    assert err.metadata == sent.metadata
    assert str(err) == sent.message
