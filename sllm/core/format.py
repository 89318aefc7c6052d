"""Checkpoint format version 2: the manifest, the tensor index, and their validation.

This module is the byte-level spec of ``man/sllm-format.5`` in code. It reads and writes
``sllm.json`` and ``tensor_index.json`` and checks every sentence of the spec against the
files on disk *before* any tensor byte is read. It does not read tensor data (that is
``sllm/core/loader.py``) and knows nothing of transformers.

Layout of a converted model directory::

    sllm.json            manifest (Manifest; since version 2 with a key_mapping: KeyMapping)
    tensor_index.json    {"format_version": 2, "tensors": {name: TensorEntry}}
    partition-N.bin      raw little-endian tensor bytes; every tensor starts at a multiple
                         of ``alignment``; the file length is a multiple of ``alignment``
    config.json, tokenizer files, generation_config.json   copied from the source

Version 2 stores the model's runtime parameters (transformers' loading rules applied at
convert time, ``sllm/core/hf_keys.py``) and records in the manifest how they were made from
the source tensors. Version 1 checkpoints (source names as they were) stay readable.
Temporaries of writers in flight, or left by killed ones, are named with
:data:`TEMPORARY_PREFIX` beside their destination: :func:`is_temporary_name` tells them apart,
so nothing lists or serves them as models.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sllm.errors import (
    ManifestError,
    MisalignedOffset,
    NotAModelDirectory,
    OffsetOutOfRange,
    OverlappingTensors,
    ShapeMismatch,
    TruncatedPartition,
    UnknownDtype,
    UnsafeTensorName,
)
from sllm.io.atomic import TMP_PREFIX

FORMAT_NAME = "sllm-checkpoint"
FORMAT_VERSION = 2
#: Versions this sllm reads. 1: names as in the source checkpoint, no key_mapping.
READABLE_VERSIONS = (1, 2)
#: The prefix of every temporary file or directory sllm writes beside a destination.
TEMPORARY_PREFIX = TMP_PREFIX
MANIFEST_FILE = "sllm.json"
INDEX_FILE = "tensor_index.json"
DEFAULT_ALIGNMENT = 4096
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
CHECKSUM_ALGORITHM = "sha256"

#: dtype name in the index -> bytes per element. Names are torch's, without "torch.".
DTYPES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def is_temporary_name(name: str) -> bool:
    """True for the name of a temporary that a writer (``sllm convert``, a cache pull, any
    atomic write) uses beside its destination, in flight or left by a killed process. Such
    an entry is never a model, even when it holds a complete ``sllm.json``."""
    return name.startswith(TEMPORARY_PREFIX)


def partition_file(index: int) -> str:
    """The file name of partition ``index`` (``partition-0.bin``, ...)."""
    return f"partition-{index}.bin"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: partition, byte offset and size, shape, stride, dtype.

    Attributes:
        partition: partition number (file ``partition-N.bin``).
        offset: byte offset of the first element in the partition; multiple of alignment.
        nbytes: bytes the tensor spans: ``(1 + sum((s-1)*st)) * itemsize`` for non-empty
            shapes (equal to ``numel * itemsize`` when contiguous), 0 when any dim is 0.
        shape: sizes per dimension (``[]`` for a scalar).
        stride: strides per dimension in elements.
        dtype: a key of :data:`DTYPES`.
    """

    partition: int
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["stride"] = list(self.stride)
        return d


@dataclass(frozen=True)
class PartitionInfo:
    """One partition file: its name, size in bytes, and the sha256 of each chunk.

    Chunk ``i`` covers bytes ``[i*chunk_bytes, min((i+1)*chunk_bytes, nbytes))``.
    """

    file: str
    nbytes: int
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class SourceFile:
    """A file the checkpoint was converted from, with its size and sha256."""

    file: str
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class KeyMapping:
    """How the stored tensors were made from the source checkpoint's (manifest ``key_mapping``).

    Attributes:
        model_class: the transformers class whose loading rules were applied ("" if none).
        rules: "transformers <version>", or why no rules were applied (no config.json...).
        tensors: stored name -> ``{"sources": [source names], "operations": [transformers
            operations, e.g. "MergeModulelist(dim=0)"]}`` for every stored tensor that is not
            the source tensor of the same name unchanged (renamed, prefixed, fused).
        shared: index name -> the stored name whose bytes it shares (tied weights, and
            tensors that shared storage in the source).
        dropped: source name -> why it is not stored (ignorable or not a model weight).
        config_changes: ``config.json`` fields the converter changed -> their new value.
    """

    model_class: str = ""
    rules: str = ""
    tensors: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    config_changes: dict[str, Any] = field(default_factory=dict)

    def source_names(self, stored: str) -> list[str]:
        """The source checkpoint's names that stored tensor ``stored`` was made from."""
        entry = self.tensors.get(stored)
        return list(entry["sources"]) if entry else [stored]


@dataclass(frozen=True)
class Manifest:
    """The content of ``sllm.json``.

    Attributes:
        model_id: a name for the model (the source directory's name by default).
        dtype: the dtype of floating tensors ("mixed" when they differ).
        alignment: bytes; every tensor offset and every partition length is a multiple.
        chunk_bytes: bytes per checksummed chunk; a multiple of ``alignment``.
        checksum: the digest algorithm of chunk and source checksums ("sha256").
        total_bytes: sum of the partitions' sizes.
        partitions: one :class:`PartitionInfo` per partition, in order.
        sources: the source files and their digests.
        files: the non-weight files copied from the source (config, tokenizer, ...).
        created_by: "sllm <version>".
        key_mapping: how stored names relate to the source's (None in version 1, or when
            the writer recorded nothing, e.g. synthetic checkpoints).
        format_version: the version the checkpoint was written in (one of READABLE_VERSIONS).
    """

    model_id: str
    dtype: str
    alignment: int
    chunk_bytes: int
    total_bytes: int
    partitions: tuple[PartitionInfo, ...]
    sources: tuple[SourceFile, ...] = ()
    files: tuple[str, ...] = ()
    checksum: str = CHECKSUM_ALGORITHM
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    key_mapping: KeyMapping | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["key_mapping"] is None:
            del d["key_mapping"]
        return d


@dataclass(frozen=True)
class Checkpoint:
    """A validated converted checkpoint: its directory, manifest and tensor index.

    Only :func:`open_checkpoint` builds one, after every check of the spec has passed.
    """

    path: Path
    manifest: Manifest
    tensors: dict[str, TensorEntry] = field(repr=False)

    def partition_path(self, index: int) -> Path:
        return self.path / self.manifest.partitions[index].file


def check_tensor_name(name: str, where: str) -> None:
    """Raise UnsafeTensorName for a name that could act as a path or is empty.

    Names are dot-separated module paths ("transformer.h.0.attn.c_attn.weight"); ``/``,
    ``\\``, NUL and ".." components are refused because tools (and sllm's own cache) may use
    names in file paths.
    """
    if not name or "/" in name or "\\" in name or "\x00" in name or ".." in name.split("."):
        raise UnsafeTensorName(f"{where}: tensor name {name!r} contains a path separator or is empty")


def span_nbytes(shape: tuple[int, ...], stride: tuple[int, ...], itemsize: int) -> int:
    """Bytes spanned by a strided tensor: ``(1 + sum((s-1)*st)) * itemsize``; 0 if empty."""
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(shape, stride))) * itemsize


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (elements) for ``shape``."""
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _int(value: Any, what: str, where: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ManifestError(f"{where}: {what} must be an integer >= {minimum}, got {value!r}")
    return value


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise NotAModelDirectory(f"{path.parent}: not an sllm checkpoint ({path.name} is missing)") from exc
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot parse JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    return data


def parse_manifest(data: dict[str, Any], where: str) -> Manifest:
    """Build a Manifest from ``sllm.json``'s JSON, checking types and invariants.

    Raises:
        ManifestError: a missing field, a wrong type, an unsupported format version.
        MisalignedOffset: chunk_bytes or a partition size not a multiple of alignment.
    """
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not an sllm manifest (format is {data.get('format')!r})")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ManifestError(
            f"{where}: format_version {version!r} is not supported (this sllm reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; reconvert the model with `sllm convert`)"
        )
    try:
        alignment = _int(data["alignment"], "alignment", where, minimum=1)
        chunk_bytes = _int(data["chunk_bytes"], "chunk_bytes", where, minimum=1)
        total = _int(data["total_bytes"], "total_bytes", where)
        parts_raw = data["partitions"]
        if not isinstance(parts_raw, list) or not parts_raw:
            raise ManifestError(f"{where}: partitions must be a non-empty list")
        partitions = []
        for i, p in enumerate(parts_raw):
            if not isinstance(p, dict):
                raise ManifestError(f"{where}: partitions[{i}] must be an object")
            if p.get("file") != partition_file(i):
                raise ManifestError(f"{where}: partitions[{i}].file must be {partition_file(i)!r}")
            nbytes = _int(p["nbytes"], f"partitions[{i}].nbytes", where)
            chunks = p["chunks"]
            if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
                raise ManifestError(f"{where}: partitions[{i}].chunks must be a list of hex digests")
            if len(chunks) != max(1, math.ceil(nbytes / chunk_bytes)):
                raise ManifestError(f"{where}: partitions[{i}] has {len(chunks)} chunk digests for {nbytes} bytes")
            partitions.append(PartitionInfo(p["file"], nbytes, tuple(chunks)))
        sources = tuple(
            SourceFile(str(s["file"]), int(s["nbytes"]), str(s["sha256"])) for s in data.get("sources", [])
        )
        files = tuple(str(f) for f in data.get("files", []))
        manifest = Manifest(
            model_id=str(data.get("model_id", "")),
            dtype=str(data["dtype"]),
            alignment=alignment,
            chunk_bytes=chunk_bytes,
            total_bytes=total,
            partitions=tuple(partitions),
            sources=sources,
            files=files,
            checksum=str(data.get("checksum", CHECKSUM_ALGORITHM)),
            created_by=str(data.get("created_by", "")),
            format_version=version,
            key_mapping=_parse_key_mapping(data["key_mapping"], where) if "key_mapping" in data else None,
        )
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{where}: missing or malformed field {exc}") from exc
    if manifest.checksum != CHECKSUM_ALGORITHM:
        raise ManifestError(f"{where}: checksum algorithm {manifest.checksum!r} is not supported")
    if chunk_bytes % alignment:
        raise MisalignedOffset(f"{where}: chunk_bytes {chunk_bytes} is not a multiple of alignment {alignment}")
    for p in partitions:
        if p.nbytes % alignment:
            raise MisalignedOffset(f"{where}: {p.file} size {p.nbytes} is not a multiple of alignment {alignment}")
    for f in files:
        if "/" in f or "\\" in f or f in ("", ".", ".."):
            raise ManifestError(f"{where}: copied file name {f!r} is not a plain file name")
    if sum(p.nbytes for p in partitions) != total:
        raise ManifestError(f"{where}: total_bytes {total} is not the sum of the partition sizes")
    return manifest


def _str_dict(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ManifestError(f"{where}: key_mapping.{what} must be an object")
    return value


def _parse_key_mapping(data: Any, where: str) -> KeyMapping:
    """Check ``key_mapping``'s types: names are strings, each mapped tensor has a list of
    source names and a list of operations."""
    km = _str_dict(data, "", where)
    tensors = _str_dict(km.get("tensors", {}), "tensors", where)
    for name, entry in tensors.items():
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), list) and all(isinstance(x, str) for x in entry[k]) for k in ("sources", "operations")
        )
        if not ok:
            raise ManifestError(f"{where}: key_mapping.tensors[{name!r}] needs lists 'sources' and 'operations'")
    shared = _str_dict(km.get("shared", {}), "shared", where)
    dropped = _str_dict(km.get("dropped", {}), "dropped", where)
    if not all(isinstance(v, str) for v in [*shared.values(), *dropped.values()]):
        raise ManifestError(f"{where}: key_mapping.shared and .dropped map names to strings")
    return KeyMapping(
        model_class=str(km.get("model_class", "")),
        rules=str(km.get("rules", "")),
        tensors=tensors,
        shared=shared,
        dropped=dropped,
        config_changes=_str_dict(km.get("config_changes", {}), "config_changes", where),
    )


def reconvert_hint(manifest: Manifest) -> str:
    """A sentence to append to a load error of a checkpoint written before key mapping
    (format 1), whose names may not be the model's; "" for newer checkpoints."""
    if manifest.format_version >= 2:
        return ""
    return (" (this checkpoint was converted by an older sllm, format 1, which kept the source's names: "
            "reconvert it with `sllm convert` to apply transformers' loading rules)")


def parse_index(data: dict[str, Any], manifest: Manifest, where: str) -> dict[str, TensorEntry]:
    """Build and check the tensor index against the manifest.

    Each entry must: have a safe name, a known dtype, a shape and stride of equal rank with
    non-negative ints, ``nbytes`` equal to the span of shape/stride/dtype, an offset that is a
    multiple of the alignment, and ``offset + nbytes`` inside its partition. Entries may not
    overlap unless they are exact aliases (same partition, offset, nbytes, dtype, shape and
    stride: tied weights stored once).

    Raises:
        ManifestError, UnsafeTensorName, UnknownDtype, ShapeMismatch, MisalignedOffset,
        OffsetOutOfRange, OverlappingTensors.
    """
    if data.get("format_version") not in READABLE_VERSIONS or isinstance(data.get("format_version"), bool):
        raise ManifestError(f"{where}: format_version {data.get('format_version')!r} is not supported")
    raw = data.get("tensors")
    if not isinstance(raw, dict) or not raw:
        raise ManifestError(f"{where}: 'tensors' must be a non-empty object")
    tensors: dict[str, TensorEntry] = {}
    for name, e in raw.items():
        check_tensor_name(name, where)
        if not isinstance(e, dict):
            raise ManifestError(f"{where}: entry {name!r} must be an object")
        try:
            part = _int(e["partition"], f"{name}.partition", where)
            offset = _int(e["offset"], f"{name}.offset", where)
            nbytes = _int(e["nbytes"], f"{name}.nbytes", where)
            shape = tuple(_int(s, f"{name}.shape", where) for s in e["shape"])
            stride = tuple(_int(s, f"{name}.stride", where) for s in e["stride"])
            dtype = e["dtype"]
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: entry {name!r} misses or mistypes field {exc}") from exc
        if dtype not in DTYPES:
            raise UnknownDtype(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
        if len(shape) != len(stride):
            raise ShapeMismatch(f"{where}: tensor {name!r} has shape {list(shape)} but stride {list(stride)}")
        expected = span_nbytes(shape, stride, DTYPES[dtype])
        if nbytes != expected:
            raise ShapeMismatch(
                f"{where}: tensor {name!r} records nbytes {nbytes} but shape {list(shape)} of {dtype} spans {expected}"
            )
        if part >= len(manifest.partitions):
            raise OffsetOutOfRange(f"{where}: tensor {name!r} names partition {part}, which does not exist")
        if offset % manifest.alignment:
            raise MisalignedOffset(f"{where}: tensor {name!r} offset {offset} is not a multiple of {manifest.alignment}")
        if offset + nbytes > manifest.partitions[part].nbytes:
            raise OffsetOutOfRange(
                f"{where}: tensor {name!r} ends at byte {offset + nbytes}, past the end of "
                f"{manifest.partitions[part].file} ({manifest.partitions[part].nbytes} bytes)"
            )
        tensors[name] = TensorEntry(part, offset, nbytes, shape, stride, dtype)
    _check_overlaps(tensors, where)
    return tensors


def _check_overlaps(tensors: dict[str, TensorEntry], where: str) -> None:
    by_start: dict[tuple[int, int], tuple[str, TensorEntry]] = {}
    for name, e in tensors.items():
        if e.nbytes == 0:
            continue
        key = (e.partition, e.offset)
        if key in by_start:
            other_name, other = by_start[key]
            if other != e:
                raise OverlappingTensors(f"{where}: tensors {other_name!r} and {name!r} overlap")
            continue
        by_start[key] = (name, e)
    ordered = sorted(by_start.values(), key=lambda item: (item[1].partition, item[1].offset))
    for (a_name, a), (b_name, b) in zip(ordered, ordered[1:]):
        if a.partition == b.partition and a.offset + a.nbytes > b.offset:
            raise OverlappingTensors(f"{where}: tensors {a_name!r} and {b_name!r} overlap")


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate a converted checkpoint's metadata; read no tensor bytes.

    Checks the manifest, the index, and that each partition file exists with exactly the
    recorded size (so no later read can run past its end).

    Raises:
        NotAModelDirectory: ``path`` is not a directory or has no ``sllm.json``.
        TruncatedPartition: a partition file is missing or of the wrong size.
        CheckpointError subclasses from :func:`parse_manifest` / :func:`parse_index`.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotAModelDirectory(f"{root}: not a directory")
    manifest = parse_manifest(_load_json(root / MANIFEST_FILE), str(root / MANIFEST_FILE))
    tensors = parse_index(_load_json(root / INDEX_FILE), manifest, str(root / INDEX_FILE))
    for p in manifest.partitions:
        fp = root / p.file
        try:
            size = fp.stat().st_size
        except OSError as exc:
            raise TruncatedPartition(f"{fp}: partition file is missing ({exc.strerror})") from exc
        if size != p.nbytes:
            raise TruncatedPartition(f"{fp}: partition file is {size} bytes, the manifest records {p.nbytes}")
    return Checkpoint(root, manifest, tensors)


def manifest_json(manifest: Manifest) -> bytes:
    """Serialise a manifest as ``sllm.json`` bytes (indented, sorted keys)."""
    return (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode()


def index_json(tensors: dict[str, TensorEntry]) -> bytes:
    """Serialise the tensor index as ``tensor_index.json`` bytes, in the given order."""
    doc = {"format_version": FORMAT_VERSION, "tensors": {n: e.to_json() for n, e in tensors.items()}}
    return (json.dumps(doc, indent=1) + "\n").encode()
