"""The errors tidelog reports, shared by the node (which raises them as gRPC statuses) and the
client (which turns gRPC statuses back into these exceptions).

On the wire an error is a gRPC status code plus a ``google.rpc.ErrorInfo`` detail with
domain ``tidelog``, a machine-readable ``reason`` (the class's ``reason``) and string
metadata (for NOT_LEADER, the leader's id and address). A user sees one readable line: the
message says what failed, with which input, and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "tidelog"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class TidelogError(Exception):
    """Base of every error tidelog raises on purpose."""

    reason: ClassVar[str] = "INTERNAL"
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    #: Whether a client may retry the same request (after refreshing metadata).
    retriable: ClassVar[bool] = False

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata)

    def __str__(self) -> str:
        return self.message


class InvalidTopic(TidelogError):
    reason = "INVALID_TOPIC"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidPartitions(TidelogError):
    reason = "INVALID_PARTITIONS"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidReplicationFactor(TidelogError):
    reason = "INVALID_REPLICATION_FACTOR"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidConfig(TidelogError):
    reason = "INVALID_CONFIG"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidRequest(TidelogError):
    reason = "INVALID_REQUEST"
    code = grpc.StatusCode.INVALID_ARGUMENT


class TopicExists(TidelogError):
    reason = "TOPIC_EXISTS"
    code = grpc.StatusCode.ALREADY_EXISTS


class UnknownTopic(TidelogError):
    reason = "UNKNOWN_TOPIC"
    code = grpc.StatusCode.NOT_FOUND
    # A topic just created may not have reached this node yet.
    retriable = True


class UnknownPartition(TidelogError):
    reason = "UNKNOWN_PARTITION"
    code = grpc.StatusCode.NOT_FOUND


class OffsetOutOfRange(TidelogError):
    """The metadata carries ``log_start_offset`` and ``high_watermark``."""

    reason = "OFFSET_OUT_OF_RANGE"
    code = grpc.StatusCode.OUT_OF_RANGE


class CorruptBatch(TidelogError):
    """A record batch failed validation: bad CRC, truncated, inconsistent counts or lengths."""

    reason = "CORRUPT_BATCH"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidRecord(TidelogError):
    """A well-formed batch the node refuses as data: a control batch from a client."""

    reason = "INVALID_RECORD"
    code = grpc.StatusCode.INVALID_ARGUMENT


class KeyRequired(InvalidRecord):
    """A record without a key sent to a compacted topic (``cleanup.policy`` with
    ``compact``), whose records are kept per key: nothing of the request was stored."""

    reason = "KEY_REQUIRED"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidTimestamp(TidelogError):
    """A record's timestamp lies further from the node's clock than the topic allows
    (message.timestamp.before.max.ms / message.timestamp.after.max.ms)."""

    reason = "INVALID_TIMESTAMP"
    code = grpc.StatusCode.INVALID_ARGUMENT


class BatchTooLarge(TidelogError):
    reason = "BATCH_TOO_LARGE"
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotLeader(TidelogError):
    """The metadata carries ``leader_id`` and ``leader_address`` when a leader is known."""

    reason = "NOT_LEADER"
    code = grpc.StatusCode.FAILED_PRECONDITION
    retriable = True


class LeaderNotAvailable(TidelogError):
    reason = "LEADER_NOT_AVAILABLE"
    code = grpc.StatusCode.UNAVAILABLE
    retriable = True


class NotEnoughReplicas(TidelogError):
    reason = "NOT_ENOUGH_REPLICAS"
    code = grpc.StatusCode.UNAVAILABLE
    retriable = True


class RequestTimedOut(TidelogError):
    reason = "REQUEST_TIMED_OUT"
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retriable = True


class NodeUnavailable(TidelogError):
    """The client could not reach a node (connection refused, reset, or timed out)."""

    reason = "NODE_UNAVAILABLE"
    code = grpc.StatusCode.UNAVAILABLE
    retriable = True


class OutOfOrderSequence(TidelogError):
    """An idempotent batch's sequence does not follow the last one the partition stored for
    its producer (a gap), or a new epoch did not start at sequence 0. The metadata carries
    ``producer_id``, ``expected_sequence`` and ``received_sequence``."""

    reason = "OUT_OF_ORDER_SEQUENCE"
    code = grpc.StatusCode.FAILED_PRECONDITION


class ProducerFenced(TidelogError):
    """The batch carries an older epoch than the partition has seen for its producer id: a
    newer session of the same producer took over. The metadata carries ``producer_id``,
    ``producer_epoch`` (the one sent) and ``current_epoch``."""

    reason = "PRODUCER_FENCED"
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnknownProducerId(TidelogError):
    """The partition holds no state for the batch's producer (never seen, or expired after
    ``producer.id.expiration.ms``) and the batch does not start a session (sequence != 0).
    The producer should start a new session (bump its epoch, sequences from 0). The metadata
    carries ``producer_id``."""

    reason = "UNKNOWN_PRODUCER_ID"
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TidelogError):
    """A bound of the node (open streams, buffered bytes) would be exceeded."""

    reason = "RESOURCE_EXHAUSTED"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StorageError(TidelogError):
    reason = "STORAGE_ERROR"
    code = grpc.StatusCode.INTERNAL


class Unsupported(TidelogError):
    reason = "UNSUPPORTED"
    code = grpc.StatusCode.UNIMPLEMENTED


class NodeIdentityConflict(TidelogError):
    """A node id is registered from another data directory (a second node with the same id,
    or a forger): the registration is refused."""

    reason = "NODE_IDENTITY_CONFLICT"
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(TidelogError):
    """The node requires authentication and the caller gave none it knows."""

    reason = "UNAUTHENTICATED"
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TidelogError):
    """The caller is known but may not do this; the metadata names ``principal`` and
    ``operation``."""

    reason = "PERMISSION_DENIED"
    code = grpc.StatusCode.PERMISSION_DENIED


class NotATable(TidelogError):
    """A Table API call on a topic whose ``cleanup.policy`` does not contain ``compact``: it
    keeps no table. The metadata carries ``topic`` and ``cleanup_policy``."""

    reason = "NOT_A_TABLE"
    code = grpc.StatusCode.FAILED_PRECONDITION


class KeyTooLarge(TidelogError):
    """A Table API key longer than any key the topic can hold. The metadata carries
    ``key_bytes`` and ``key_bytes_max``."""

    reason = "KEY_TOO_LARGE"
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidToken(TidelogError):
    """A scan's continuation token is malformed (truncated, damaged, of another version) or
    belongs to another topic or partition."""

    reason = "INVALID_TOKEN"
    code = grpc.StatusCode.INVALID_ARGUMENT


class ScanExpired(TidelogError):
    """The snapshot a scan's continuation token names is gone (idle too long, evicted, or
    the partition's leader changed): restart the scan from its first page."""

    reason = "SCAN_EXPIRED"
    code = grpc.StatusCode.ABORTED


class TlsError(NodeUnavailable):
    """The TLS handshake with a node failed (wrong CA, expired or missing certificate, TLS on
    one side only); the message says why, as the TLS library reported it."""

    reason = "TLS_HANDSHAKE"


# Consumer groups (issue 13). A member's errors say what it must do next: NOT_COORDINATOR,
# find the coordinator again; UNKNOWN_MEMBER_ID and FENCED_MEMBER_EPOCH, drop every partition
# without committing and join again with epoch 0; STALE_MEMBER_EPOCH, heartbeat and retry the
# commit with the newer epoch; REVOKED, the partition is no longer the member's to commit.


class NotCoordinator(TidelogError):
    """The node does not coordinate the group (it does not lead the group's partition of
    ``__consumer_offsets``, or just lost it). The metadata carries ``group_id``."""

    reason = "NOT_COORDINATOR"
    code = grpc.StatusCode.FAILED_PRECONDITION
    retriable = True


class CoordinatorLoading(TidelogError):
    """The node just became the group's coordinator and is still rebuilding its groups."""

    reason = "COORDINATOR_LOADING"
    code = grpc.StatusCode.UNAVAILABLE
    retriable = True


class UnknownMemberId(TidelogError):
    """The member id is not (or no longer) a member of the group: it left, its session
    expired, or the group was deleted."""

    reason = "UNKNOWN_MEMBER_ID"
    code = grpc.StatusCode.FAILED_PRECONDITION


class FencedMemberEpoch(TidelogError):
    """A heartbeat carries a member epoch the coordinator does not accept (neither the
    member's current nor its previous one): the member must drop its partitions and join
    again. The metadata carries ``member_epoch`` (sent) and ``current_epoch``."""

    reason = "FENCED_MEMBER_EPOCH"
    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleMemberEpoch(TidelogError):
    """An offset commit carries a member epoch other than the member's current one. The
    metadata carries ``member_epoch`` (sent) and ``current_epoch``."""

    reason = "STALE_MEMBER_EPOCH"
    code = grpc.StatusCode.FAILED_PRECONDITION


class Revoked(TidelogError):
    """An offset commit names a partition the member does not own (any more). The metadata
    carries ``topic`` and ``partition``."""

    reason = "REVOKED"
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnreleasedInstanceId(TidelogError):
    """A member joins with a ``group_instance_id`` an active member still holds (it did not
    leave, or its session has not expired yet): retry after the session timeout."""

    reason = "UNRELEASED_INSTANCE_ID"
    code = grpc.StatusCode.FAILED_PRECONDITION
    retriable = True


class GroupNotEmpty(TidelogError):
    """The operation (delete, an admin offset commit) needs a group without members."""

    reason = "GROUP_NOT_EMPTY"
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnknownGroup(TidelogError):
    """The group has neither members nor committed offsets."""

    reason = "UNKNOWN_GROUP"
    code = grpc.StatusCode.NOT_FOUND


class InvalidSubscription(TidelogError):
    """A subscription is malformed: names and a regex at once, or a regex Python's ``re``
    does not compile."""

    reason = "INVALID_SUBSCRIPTION"
    code = grpc.StatusCode.INVALID_ARGUMENT


_BY_REASON: dict[str, type[TidelogError]] = {
    cls.reason: cls
    for cls in (
        TidelogError,
        InvalidTopic,
        InvalidPartitions,
        InvalidReplicationFactor,
        InvalidConfig,
        InvalidRequest,
        TopicExists,
        UnknownTopic,
        UnknownPartition,
        OffsetOutOfRange,
        CorruptBatch,
        InvalidRecord,
        KeyRequired,
        InvalidTimestamp,
        BatchTooLarge,
        NotLeader,
        LeaderNotAvailable,
        NotEnoughReplicas,
        RequestTimedOut,
        NodeUnavailable,
        OutOfOrderSequence,
        ProducerFenced,
        UnknownProducerId,
        ResourceExhausted,
        StorageError,
        Unsupported,
        NodeIdentityConflict,
        Unauthenticated,
        PermissionDenied,
        NotATable,
        KeyTooLarge,
        InvalidToken,
        ScanExpired,
        NotCoordinator,
        CoordinatorLoading,
        UnknownMemberId,
        FencedMemberEpoch,
        StaleMemberEpoch,
        Revoked,
        UnreleasedInstanceId,
        GroupNotEmpty,
        UnknownGroup,
        InvalidSubscription,
    )
}

# Transport-level codes that mean "try again, maybe elsewhere" when no ErrorInfo came along.
_RETRIABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


#: Characters of a client's input an error message quotes (see :func:`excerpt`).
ECHO_CHARS_MAX = 80
#: The whole message and each metadata value of an error on the wire. gRPC refuses trailers
#: beyond 8 KiB ("received metadata size exceeds hard limit") and the message travels twice
#: (grpc-message and the status details), so 2 KiB each leaves room for the rest.
MESSAGE_CHARS_MAX = 2048
METADATA_VALUE_CHARS_MAX = 256


def excerpt(value: str, max_chars: int = ECHO_CHARS_MAX) -> str:
    """``repr(value)``, cut to about ``max_chars`` with its length said: an error that quotes
    a hostile 100,000-character input must still fit in a gRPC trailer."""
    if len(value) <= max_chars:
        return repr(value)
    return f"{value[:max_chars]!r}... ({len(value)} characters)"


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: max_chars - 30] + f"... ({len(text)} characters in all)"


def to_status_details(err: TidelogError) -> tuple[grpc.StatusCode, str, bytes]:
    """The (code, message, grpc-status-details-bin) triple a server aborts with. Message and
    metadata are cut to MESSAGE_CHARS_MAX / METADATA_VALUE_CHARS_MAX, whatever they quote."""
    message = _clip(err.message, MESSAGE_CHARS_MAX)
    metadata = {
        _clip(k, METADATA_VALUE_CHARS_MAX): _clip(v, METADATA_VALUE_CHARS_MAX)
        for k, v in err.metadata.items()
    }
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=err.code.value[0], message=message, details=[detail])
    return err.code, message, status.SerializeToString()


def trailing_metadata(err: TidelogError) -> tuple[tuple[str, bytes], ...]:
    _, _, details = to_status_details(err)
    return ((STATUS_DETAILS_KEY, details),)


def from_rpc_error(exc: grpc.RpcError) -> TidelogError:
    """Turn a gRPC error (sync or aio) into the matching TidelogError."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    message: str = exc.details() or code.name  # type: ignore[attr-defined]
    trailers: Any = exc.trailing_metadata()  # type: ignore[attr-defined]
    info = _error_info(trailers)
    if info is not None and info.domain == DOMAIN:
        cls = _BY_REASON.get(info.reason, TidelogError)
        err = cls(message, **dict(info.metadata))
        return err
    if code in _RETRIABLE_CODES:
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RequestTimedOut(f"request timed out: {message}")
        tls = _tls_failure(message)
        if tls is not None:
            return TlsError(tls)
        return NodeUnavailable(f"node unavailable: {message}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(f"not authenticated: {message}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"permission denied: {message}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Unsupported(f"not supported by this node: {message}")
    return TidelogError(f"{code.name}: {message}")


def _tls_failure(message: str) -> str | None:
    """A readable line for a gRPC transport error that is a failed TLS handshake, or None.

    gRPC reports it as UNAVAILABLE "... Tls handshake failed (TSI_PROTOCOL_FAILURE): ...
    OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired: OK"; the reason is
    the part after the last ``OPENSSL_internal:``."""
    lowered = message.lower()
    if "handshake" not in lowered and "ssl" not in lowered:
        return None
    detail = message.rsplit("OPENSSL_internal:", 1)[-1] if "OPENSSL_internal:" in message else ""
    detail = detail.removesuffix(": OK").strip() or message
    hint = "check the CA the client trusts (ca= / --tls-ca) and the node's certificate"
    if "WRONG_VERSION_NUMBER" in detail or "wrong version" in lowered:
        hint = "the node does not speak TLS on this port: drop tls= / --tls or use its TLS port"
    elif "PEER_DID_NOT_RETURN_A_CERTIFICATE" in message or "CERTIFICATE_REQUIRED" in message:
        hint = "the node requires a client certificate: give client_cert= and client_key="
    return f"TLS handshake with the node failed: {detail} ({hint})"


def _error_info(trailers: Any) -> error_details_pb2.ErrorInfo | None:
    if not trailers:
        return None
    items: list[tuple[str, Any]]
    if isinstance(trailers, Mapping):
        items = list(trailers.items())
    else:
        items = [(k, v) for k, v in trailers]
    for key, value in items:
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value if isinstance(value, bytes) else bytes(value))
        except Exception:
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info
    return None
