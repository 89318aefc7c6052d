"""The exceptions sllm raises, one per failure mode, and the exit codes they map to.

Every error sllm raises on purpose is an :class:`SllmError`. Low-level errors (``OSError``,
httpx's transport errors, JSON decoding errors) are translated into these at one boundary,
``sllm/io/`` for bytes and ``sllm/core/format.py`` for checkpoint metadata, chained with
``raise ... from exc``. Only the CLI (``sllm/cli.py``) turns them into one-line messages.

The tree::

    SllmError                         exit 1 unless a subclass says otherwise
    ├── UsageError                    exit 2: bad flags or arguments
    ├── CheckpointError               exit 2: a checkpoint (source or converted) is bad
    │   ├── NotAModelDirectory        no weights / manifest where a model should be
    │   ├── ManifestError             sllm.json or tensor_index.json unreadable or invalid
    │   ├── UnsafeTensorName          a tensor name with a path separator, "..", or NUL
    │   ├── UnknownDtype              a dtype name sllm does not know
    │   ├── ShapeMismatch             nbytes disagrees with shape, stride and dtype, or a
    │   │                             source tensor's shape is not the model's
    │   ├── MissingWeights            from_pretrained would leave parameters randomly initialised
    │   ├── UnsupportedCheckpoint     a source sllm cannot convert faithfully (quantized)
    │   ├── OffsetOutOfRange          offset + nbytes past the end of its partition
    │   ├── OverlappingTensors        two index entries share bytes without being aliases
    │   ├── MisalignedOffset          an offset that is not a multiple of the alignment
    │   ├── TruncatedPartition        a partition or source file shorter than recorded
    │   ├── ChecksumMismatch          a chunk or file whose digest differs from the manifest
    │   └── UnsafePickle              a .bin file that needs more than weights_only to load
    ├── DestinationExists             exit 2: DST exists and --force was not given
    ├── CacheError                    exit 1: the tier cache cannot do what was asked
    ├── RemoteError                   exit 1: a remote store failed (404, truncated, unreachable)
    ├── InventoryError                exit 2: a cluster inventory (or node profile) file is bad
    ├── SchedulingError               exit 1: no node can start the model (schedule-plan)
    ├── ServerError                   exit 1: a node's HTTP API answered with an error
    └── MigrationError                exit 1: a live migration could not complete

Exit codes (also in the man pages, EXIT STATUS): 0 success, 1 operation failed,
2 bad usage or bad input, 130 interrupted (Ctrl-C). After pip's ``status_codes.py``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class SllmError(Exception):
    """Base of every error sllm raises on purpose.

    Attributes:
        exit_code: the process exit status the CLI uses for this error.
        hint: an optional next step shown after the message (e.g. "run `sllm cache ls`").
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(SllmError):
    """Flags or arguments that cannot work together (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(SllmError):
    """A source or converted checkpoint is missing, malformed, or inconsistent (exit 2).

    The message always names the file and the problem.
    """

    exit_code = EXIT_BAD_INPUT


class NotAModelDirectory(CheckpointError):
    """The path is not a directory holding a model in a format sllm reads."""


class ManifestError(CheckpointError):
    """``sllm.json`` or ``tensor_index.json`` cannot be parsed or misses a field."""


class UnsafeTensorName(CheckpointError):
    """A tensor name that contains ``/``, ``\\``, ``..`` as a component, or NUL."""


class UnknownDtype(CheckpointError):
    """A dtype name that is not in :data:`sllm.core.format.DTYPES`."""


class ShapeMismatch(CheckpointError):
    """An index entry whose ``nbytes`` does not match its shape, stride and dtype, or a
    source tensor whose shape is not the one the model expects for it."""


class UnsupportedCheckpoint(CheckpointError):
    """A source checkpoint that loads only through machinery sllm does not run at convert
    time (a quantized checkpoint, whose weights transformers' quantizer converts on load)."""


class MissingWeights(CheckpointError):
    """A source checkpoint that lacks parameters of its model: ``from_pretrained`` would
    initialise them at random, sllm refuses to convert it (the message names them)."""


class OffsetOutOfRange(CheckpointError):
    """An index entry whose ``offset + nbytes`` lies past the end of its partition file."""


class OverlappingTensors(CheckpointError):
    """Two index entries that share bytes without being exact aliases (tied weights)."""


class MisalignedOffset(CheckpointError):
    """An offset that is not a multiple of the manifest's alignment."""


class TruncatedPartition(CheckpointError):
    """A partition or source file shorter (or longer) than its recorded size."""


class ChecksumMismatch(CheckpointError):
    """A chunk or file whose digest differs from the one in the manifest."""


class UnsafePickle(CheckpointError):
    """A PyTorch ``.bin`` file that cannot be read with ``torch.load(weights_only=True)``.

    sllm never falls back to a full unpickle: such a file may run arbitrary code.
    """


class DestinationExists(SllmError):
    """The output path exists and ``--force`` was not given (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class CacheError(SllmError):
    """The tier cache cannot do what was asked (capacity, pinned, in use, unknown model)."""


class RemoteError(SllmError):
    """A remote store failed: not found, truncated, unreachable, or a checksum mismatch."""


class InventoryError(SllmError):
    """A cluster inventory or node profile TOML file that cannot be read or is invalid (exit 2).

    The message names the file and the key at fault."""

    exit_code = EXIT_BAD_INPUT


class SchedulingError(SllmError):
    """No node of the cluster can start the model (all down, too small, or its size unknown)."""


class ServerError(SllmError):
    """A node's HTTP API answered with an error, or could not be reached."""


class MigrationError(SllmError):
    """A live migration could not complete; the source keeps the request."""
