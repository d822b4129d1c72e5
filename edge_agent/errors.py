"""Every error edge-resume raises, in one tree.

Callers catch the branch they can act on; nothing below leaks a bare IndexError,
KeyError, MemoryError or a third-party exception across a public API. Foreign
exceptions are translated once, at the seam where they enter (``raise ... from exc``).

    EdgeResumeError
    ├── StateError                 a value that a state may not hold
    ├── OptionError                a function called with an option it does not take
    ├── CodecError                 a payload that cannot be decoded or applied
    │   ├── PayloadTruncated       shorter than its own header says
    │   ├── PayloadCorrupt         checksum mismatch, malformed structure, bad field
    │   ├── UnsupportedVersion     a format version this build does not read
    │   ├── LimitExceeded          a size announced by a header is over a bound
    │   ├── BaseMismatch           the payload was made against another base state
    │   └── StateHashMismatch      applying it did not produce the state it names
    ├── ProtocolError              a message that breaks the agent/server protocol
    │   ├── LocalProtocolError     we were asked to do something the protocol forbids
    │   ├── RemoteProtocolError    the peer sent something the protocol forbids
    │   │   ├── MalformedMessage   not msgpack, a bad check, a field of the wrong type or bounds
    │   │   ├── UnsupportedMessage a message version or type this build does not read
    │   │   ├── InvalidTopic       a topic outside the namespace, or an invalid id in it
    │   │   ├── TopicMismatch      the message's device/job/type does not fit its topic
    │   │   └── ChunkRejected      a snapshot chunk that breaks the chunking rules
    │   │       └── TransferTooLarge   a transfer over the receiver's max_transfer
    │   └── Fenced                 stamped with an epoch older than the job's
    ├── JobError                   a job that cannot be built, run or restored
    │   ├── JobSpecError           a job file that is invalid
    │   ├── ModelMismatch          a model whose hash differs from the job's birth
    │   └── DatasetMismatch        a dataset whose hash differs from the job's birth
    ├── JournalError               the agent's local journal is unreadable or inconsistent
    ├── TransportError             the MQTT link failed (paho's return codes end here)
    │   ├── ConnectionRefused      the broker (or TLS) refused us for good: credentials, ACL
    │   └── TransportTimeout       no answer in time (connect, SUBACK, delivery)
    ├── StoreError                 the server's store is unreadable, inconsistent or misused
    │   ├── StoreCorrupt           data on disk fails its checks (hash, reference, chain)
    │   └── OutputConflict         an output position written twice with different bytes
    ├── ResumeError                the resume worker cannot take a job over (unknown job, ...)
    ├── ConfigError                a setting of the agent or the server that is invalid
    └── DemoError                  the demo (server.demo) could not complete a step

Each error carries a message saying what was wrong and, where one helps, a ``hint``
saying what the caller can do about it.
"""

from __future__ import annotations

__all__ = [
    "BaseMismatch",
    "ChunkRejected",
    "CodecError",
    "ConfigError",
    "ConnectionRefused",
    "DatasetMismatch",
    "DemoError",
    "EdgeResumeError",
    "Fenced",
    "InvalidTopic",
    "JobError",
    "JobSpecError",
    "JournalError",
    "LimitExceeded",
    "LocalProtocolError",
    "MalformedMessage",
    "ModelMismatch",
    "OptionError",
    "OutputConflict",
    "PayloadCorrupt",
    "PayloadTruncated",
    "ProtocolError",
    "RemoteProtocolError",
    "ResumeError",
    "StateError",
    "StateHashMismatch",
    "StoreCorrupt",
    "StoreError",
    "TopicMismatch",
    "TransferTooLarge",
    "TransportError",
    "TransportTimeout",
    "UnsupportedMessage",
    "UnsupportedVersion",
]


class EdgeResumeError(Exception):
    """Root of every error edge-resume raises on purpose."""

    hint: str | None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (hint: {self.hint})" if self.hint else base


class StateError(EdgeResumeError, ValueError):
    """A state holds a key or value that the state model does not allow."""


class OptionError(EdgeResumeError, ValueError):
    """A function was called with an option it does not take, or a bad option value."""


class CodecError(EdgeResumeError, ValueError):
    """A payload could not be decoded or applied; nothing was changed."""


class PayloadTruncated(CodecError):
    """The payload ends before its header says it should."""


class PayloadCorrupt(CodecError):
    """The payload's checksum, structure or a field is wrong."""


class UnsupportedVersion(CodecError):
    """The payload's format version is not one this build reads."""


class LimitExceeded(CodecError):
    """A size announced in the payload is beyond what it could honestly hold."""


class BaseMismatch(CodecError):
    """The payload was encoded against a different base state than the one given."""


class StateHashMismatch(CodecError):
    """Applying the payload produced a state whose hash differs from the one it names."""


class ProtocolError(EdgeResumeError):
    """A message breaks the agent/server protocol."""


class LocalProtocolError(ProtocolError):
    """Our side was asked to do something the protocol forbids in its current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the message changed nothing."""


class MalformedMessage(RemoteProtocolError, ValueError):
    """A message is not msgpack, fails its check, or has a field of the wrong type or bounds."""


class UnsupportedMessage(RemoteProtocolError):
    """A message's version or type is not one this build reads."""


class InvalidTopic(RemoteProtocolError, ValueError):
    """A topic is outside the namespace or names an invalid device or job id."""


class TopicMismatch(RemoteProtocolError):
    """A message's device, job or type does not fit the topic it arrived on."""


class ChunkRejected(RemoteProtocolError):
    """A snapshot chunk breaks the chunking rules (size, count, index, length, transfer)."""


class TransferTooLarge(ChunkRejected):
    """A transfer announces a size over the receiver's ``max_transfer``."""


class Fenced(ProtocolError):
    """A message or an action carries an epoch older than the job's current epoch."""


class JobError(EdgeResumeError):
    """A job could not be built, run, snapshotted or restored."""


class JobSpecError(JobError, ValueError):
    """A job file is invalid."""


class ModelMismatch(JobError):
    """The model on disk differs from the one the job was born with."""


class DatasetMismatch(JobError):
    """The dataset on disk differs from the one the job was born with."""


class JournalError(EdgeResumeError):
    """The agent's local journal is unreadable or inconsistent."""


class TransportError(EdgeResumeError):
    """The MQTT link failed; ``rc`` holds paho's reason code when there is one."""

    rc: int | None

    def __init__(self, message: str, *, rc: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.rc = rc


class ConnectionRefused(TransportError):
    """The broker refused the connection for a reason retrying will not fix (bad username
    or password, not authorized, client id rejected), or its certificate failed
    verification. ``rc`` holds the CONNACK reason code when there is one."""


class TransportTimeout(TransportError):
    """No answer within the time allowed (connection, SUBACK, delivery)."""


class StoreError(EdgeResumeError):
    """The server's store is unreadable or inconsistent, or was asked for something it refuses."""


class StoreCorrupt(StoreError):
    """Data in the store fails its own checks: a blob whose content does not hash to its name,
    a row pointing at a missing blob, a chain that does not replay to the hash it records."""


class OutputConflict(StoreError):
    """An output position already holds different bytes; outputs are written exactly once."""


class ResumeError(EdgeResumeError):
    """The resume worker refuses a request: an unknown job, or one it cannot take over."""


class ConfigError(EdgeResumeError, ValueError):
    """A setting of the agent or the server (command line, environment variable, config file)
    is invalid."""


class DemoError(EdgeResumeError):
    """The demo (``python -m server.demo``) could not complete a step: a process that would
    not start or exited early, a check that did not pass in time."""
