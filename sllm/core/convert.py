"""Convert a Hugging Face checkpoint into the loading-optimized sllm format (version 2).

Reads ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
``pytorch_model.bin``, or sharded ``.bin`` with ``pytorch_model.bin.index.json`` (always
``torch.load(weights_only=True)``, never a full unpickle). With the source's ``config.json``
it applies transformers' own loading rules once (``sllm/core/hf_keys.py``: base-model
prefix, renamings, fused MoE experts, dropped ignorable keys, tied weights), so the stored
tensors are the model's runtime parameters, and refuses a checkpoint that
``from_pretrained`` would leave with random weights. It then plans an aligned layout split
into partitions balanced by bytes and streams one conversion group at a time (one tensor,
or the experts of one layer) into the partition files, hashing each chunk as it is written.
Peak memory stays near the largest source shard (safetensors: the largest group).
Everything is written into a temporary directory beside the destination and renamed into
place at the end, so an interrupted run leaves no destination; the temporaries of killed
runs (their pid dead) are swept from the destination's parent at the next run.

It does not load models; the layout rules are ``sllm/core/format.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sllm import __version__
from sllm.core import hf_keys
from sllm.core.format import (
    DEFAULT_ALIGNMENT,
    DEFAULT_CHUNK_BYTES,
    DTYPES,
    INDEX_FILE,
    MANIFEST_FILE,
    KeyMapping,
    Manifest,
    PartitionInfo,
    SourceFile,
    TensorEntry,
    check_tensor_name,
    contiguous_stride,
    index_json,
    manifest_json,
    partition_file,
)
from sllm.errors import (
    CheckpointError,
    NotAModelDirectory,
    TruncatedPartition,
    UnknownDtype,
    UnsafePickle,
    UsageError,
)
from sllm.io.atomic import atomic_directory, remove_stale_temporaries

ProgressCallback = Callable[[int, int], None]

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
TARGET_DTYPES = ("keep", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote.

    Attributes:
        path: the destination directory.
        nbytes: bytes of tensor data written (all partitions, with alignment padding).
        tensors: index entries (aliases of tied weights counted once per name).
        partitions: bytes per partition.
        dtype: floating dtype of the result ("mixed" if several).
        seconds: wall time of the conversion.
        model_class: the transformers class whose loading rules were applied ("" if none).
        mapped: stored tensors renamed or converted from the source's (see the manifest).
        dropped: source tensors not stored, with why (ignorable, or not a model weight).
        swept: stale temporaries of killed runs removed from the destination's parent.
    """

    path: str
    nbytes: int
    tensors: int
    partitions: list[int]
    dtype: str
    seconds: float
    model_class: str = ""
    mapped: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    swept: list[str] = field(default_factory=list)


@dataclass
class _SourceTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # source dtype name
    nbytes: int  # bytes after the target cast
    alias_of: str | None = None


# ---------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders ``h.2`` before ``h.10`` (layer order)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_weight_files(src: Path) -> tuple[str, list[Path]]:
    """The source format ("safetensors" or "bin") and its weight files, in shard order.

    Raises:
        NotAModelDirectory: no weights sllm can read.
        CheckpointError: an index file that is unreadable or names missing shards.
    """
    if not src.is_dir():
        raise NotAModelDirectory(f"{src}: not a directory")
    for kind, index_name, single in (
        ("safetensors", SAFETENSORS_INDEX, "model.safetensors"),
        ("bin", BIN_INDEX, "pytorch_model.bin"),
    ):
        index_path = src / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid shard index ({exc})") from exc
            paths = []
            for f in files:
                if not isinstance(f, str) or "/" in f or "\\" in f:
                    raise CheckpointError(f"{index_path}: shard name {f!r} is not a plain file name")
                if not (src / f).is_file():
                    raise CheckpointError(f"{index_path}: names shard {f}, which is missing")
                paths.append(src / f)
            return kind, paths
        if (src / single).is_file():
            return kind, [src / single]
    raise NotAModelDirectory(
        f"{src}: no model.safetensors, pytorch_model.bin or shard index found (not a Hugging Face model directory)"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UnknownDtype(f"dtype {name} is not supported by the sllm format")
    return name


def _safetensors_meta(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = []
            for name in f.keys():
                sl = f.get_slice(name)
                out.append((name, tuple(sl.get_shape()), _safetensors_dtype(sl.get_dtype(), path, name)))
            return out
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise TruncatedPartition(f"{path}: not a valid safetensors file ({exc})") from exc


_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip


def _safetensors_dtype(code: str, path: Path, name: str) -> str:
    if code not in _ST_DTYPES:
        raise UnknownDtype(f"{path}: tensor {name!r} has dtype {code}, which the sllm format does not support")
    return _ST_DTYPES[code]


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True`` (mmap when the file is a zip archive)."""
    import pickle
    import zipfile

    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafePickle(
            f"{path}: refused to unpickle: the file holds more than tensors ({first[:200]})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TruncatedPartition(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:200]})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


class _Source:
    """The source checkpoint: tensor metadata up front, tensors one at a time."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.kind, self.files = find_weight_files(src)
        self.tensors: dict[str, _SourceTensor] = {}
        self._aliases: dict[str, str] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None

    def scan(self, target: str) -> None:
        """Read every shard's metadata (safetensors header / mmap'd .bin) and find aliases."""
        for path in self.files:
            if self.kind == "safetensors":
                items = _safetensors_meta(path)
            else:
                sd = _load_bin(path)
                items = []
                seen: dict[tuple, str] = {}
                for name, t in sd.items():
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                    if t.numel() and key in seen:
                        self._aliases[name] = seen[key]
                    else:
                        seen[key] = name
                    items.append((name, tuple(t.shape), _dtype_name(t.dtype)))
                del sd
            if self.kind == "safetensors":  # headers are not in module order; .bin dicts are
                items.sort(key=lambda item: _natural_key(item[0]))
            for name, shape, dtype in items:
                check_tensor_name(name, str(path))
                if name in self.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in two shards")
                out_dtype = _target_dtype(dtype, target)
                nbytes = math.prod(shape) * DTYPES[out_dtype]
                self.tensors[name] = _SourceTensor(name, path, shape, dtype, nbytes, self._aliases.get(name))

    def reader(self, target: str) -> _Reader:
        """A :class:`_Reader` of this source's tensors, cast for ``target``."""
        return _Reader(self, target)


class _Reader:
    """Reads source tensors by name, cast to the target dtype. Keeps safetensors files open
    (memory-mapped) and the last two ``.bin`` shards loaded, so that reading in source order
    loads each shard once. Use as a context manager."""

    def __init__(self, source: _Source, target: str) -> None:
        self.source, self.target = source, target
        self._handles: dict[Path, Any] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()
        self._bins.clear()

    def __call__(self, name: str) -> torch.Tensor:
        info = self.source.tensors[name]
        path = info.file
        if self.source.kind == "safetensors":
            from safetensors import safe_open

            try:
                if path not in self._handles:
                    self._handles[path] = safe_open(str(path), framework="pt").__enter__()
                tensor = self._handles[path].get_tensor(name)
            except CheckpointError:
                raise
            except Exception as exc:
                raise TruncatedPartition(f"{path}: cannot read tensor data ({exc})") from exc
        else:
            if path not in self._bins:
                if len(self._bins) >= 2:
                    del self._bins[next(iter(self._bins))]
                self._bins[path] = _load_bin(path)
            tensor = self._bins[path][name]
        if tuple(tensor.shape) != info.shape:
            raise CheckpointError(f"{path}: tensor {name!r} changed shape while reading")
        want = getattr(torch, _target_dtype(info.dtype, self.target))
        return tensor if tensor.dtype == want else tensor.to(want)


def _target_dtype(src_dtype: str, target: str) -> str:
    if target == "keep" or src_dtype not in ("float64", "float32", "float16", "bfloat16"):
        return src_dtype
    return target


# ---------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def split_balanced(sizes: list[int], parts: int) -> list[int]:
    """Assign consecutive items to ``parts`` groups so group byte totals are near equal.

    Walks the items in order and cuts where the running total is closest to each
    ``k * total / parts``; order is kept (layer order), no group is empty when there are at
    least ``parts`` items. Returns the group number of each item.
    """
    total = sum(sizes)
    groups = [0] * len(sizes)
    group, acc = 0, 0
    for i, size in enumerate(sizes):
        remaining_items = len(sizes) - i
        remaining_groups = parts - group - 1
        boundary = (group + 1) * total / parts
        if group < parts - 1 and acc > 0 and (
            abs(acc - boundary) <= abs(acc + size - boundary) or remaining_items <= remaining_groups
        ):
            group += 1
        groups[i] = group
        acc += size
    return groups


def plan_layout(
    tensors: dict[str, tuple[tuple[int, ...], str]], aliases: dict[str, str], partitions: int, alignment: int
) -> tuple[list[str], dict[str, TensorEntry], list[int]]:
    """Split tensors, in the given order (source order: shard by shard, layer order within
    a shard, so each source file is read once and each partition written sequentially),
    into partitions and assign aligned offsets.

    Args:
        tensors: stored name -> (shape, dtype name), in write order.
        aliases: extra index names -> the stored name whose entry they repeat (tied weights).

    Returns: (write order of stored names, index entries for every name, partition sizes).
    """
    primaries = list(tensors)
    if partitions > max(1, len(primaries)):
        raise UsageError(f"--partitions {partitions} is more than the {len(primaries)} tensors of the checkpoint")
    nbytes = {n: math.prod(shape) * DTYPES[dt] for n, (shape, dt) in tensors.items()}
    sizes = [_align(nbytes[n], alignment) for n in primaries]
    groups = split_balanced(sizes, partitions)
    offsets = [0] * partitions
    entries: dict[str, TensorEntry] = {}
    for name, size, part in zip(primaries, sizes, groups):
        shape, dtype = tensors[name]
        entries[name] = TensorEntry(part, offsets[part], nbytes[name], shape, contiguous_stride(shape), dtype)
        offsets[part] += size
    for name, primary in aliases.items():
        entries[name] = entries[primary]
    ordered = {n: entries[n] for n in sorted(entries, key=_natural_key)}
    return primaries, ordered, offsets


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


class _ChunkedWriter:
    """Writes a partition sequentially and computes the sha256 of every chunk as it goes."""

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.chunk_bytes = chunk_bytes
        self.pos = 0
        self.digests: list[str] = []
        self._hash = hashlib.sha256()

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            room = self.chunk_bytes - (self.pos % self.chunk_bytes)
            piece = view[:room]
            self.f.write(piece)
            self._hash.update(piece)
            self.pos += len(piece)
            view = view[len(piece) :]
            if self.pos % self.chunk_bytes == 0:
                self.digests.append(self._hash.hexdigest())
                self._hash = hashlib.sha256()

    def pad_to(self, offset: int) -> None:
        if offset < self.pos:
            raise RuntimeError(f"layout bug: offset {offset} is behind the write position {self.pos}")
        if offset > self.pos:
            self.write(bytes(offset - self.pos))

    def close(self) -> list[str]:
        if self.pos % self.chunk_bytes or not self.digests:
            self.digests.append(self._hash.hexdigest())
        self.f.close()
        return self.digests


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def sha256_file(path: Path, block: int = 8 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in ``block``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "keep",
    partitions: int = 1,
    alignment: int = DEFAULT_ALIGNMENT,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    force: bool = False,
    model_id: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert the Hugging Face checkpoint in ``src`` into an sllm checkpoint at ``dst``.

    Args:
        src: a model directory (safetensors or .bin, single or sharded with an index).
        dst: the output directory; must not exist unless ``force``.
        dtype: "keep" or a floating dtype ("float16", "bfloat16", "float32") to cast
            floating tensors to; integer and bool tensors are never cast.
        partitions: number of partition files (one per target device), balanced by bytes
            in layer order.
        alignment: bytes; a power of two >= 8. Offsets are multiples of it (4096 lets the
            loader use O_DIRECT).
        chunk_bytes: bytes per checksummed chunk; a multiple of ``alignment``.
        force: replace an existing ``dst`` (atomically).
        model_id: recorded in the manifest (default: ``src``'s directory name).
        on_progress: ``on_progress(done_bytes, total_bytes)`` after each tensor.

    Raises:
        UsageError: bad options. DestinationExists: ``dst`` exists without ``force``.
        NotAModelDirectory, CheckpointError subclasses: a bad source (the message names
        the file). Nothing is left at ``dst`` when anything fails.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dtype not in TARGET_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(TARGET_DTYPES)}")
    if alignment < 8 or alignment & (alignment - 1):
        raise UsageError(f"--alignment {alignment}: must be a power of two >= 8")
    if chunk_bytes < alignment or chunk_bytes % alignment:
        raise UsageError(f"chunk size {chunk_bytes}: must be a positive multiple of the alignment {alignment}")
    if partitions < 1:
        raise UsageError(f"--partitions {partitions}: must be >= 1")
    source = _Source(src)
    if dst.exists() and not force:
        from sllm.errors import DestinationExists

        raise DestinationExists(f"{dst}: already exists (use --force to replace it)")
    if dst.resolve() == src.resolve():
        raise UsageError(f"{dst}: the destination must differ from the source")
    source.scan(dtype)
    plan = plan_tensors(source, src, dtype)
    with source.reader(dtype) as read:
        untie = plan.resolve_ties(read)
    primaries, entries, sizes = plan_layout(plan.tensors, plan.aliases, partitions, alignment)
    total = sum(sizes)
    written = 0
    swept = [p.name for p in remove_stale_temporaries(dst.parent)]
    with atomic_directory(dst, force=force) as tmp:
        writers = [_ChunkedWriter(tmp / partition_file(i), chunk_bytes) for i in range(partitions)]
        try:
            with source.reader(dtype) as read:
                for group in plan.groups:
                    outputs = plan.run_group(group, read)
                    for name in group.outputs:
                        entry = entries[name]
                        tensor = outputs.pop(name)
                        if tuple(tensor.shape) != entry.shape or str(tensor.dtype).removeprefix("torch.") != entry.dtype:
                            raise CheckpointError(
                                f"{src}: tensor {name!r} is not the planned {entry.dtype} {list(entry.shape)}"
                            )
                        w = writers[entry.partition]
                        w.pad_to(entry.offset)
                        w.write(_tensor_bytes(tensor))
                        written += _align(entry.nbytes, alignment)
                        if on_progress:
                            on_progress(written, total)
            digests = []
            for i, w in enumerate(writers):
                w.pad_to(sizes[i])
                digests.append(w.close())
        finally:
            for w in writers:
                if not w.f.closed:
                    w.f.close()
        copied = _copy_side_files(src, tmp)
        config_changes = _untie_config(tmp) if untie else {}
        float_dtypes = {e.dtype for e in entries.values() if e.dtype in ("float64", "float32", "float16", "bfloat16")}
        manifest = Manifest(
            model_id=model_id or src.resolve().name,
            dtype=float_dtypes.pop() if len(float_dtypes) == 1 else "mixed",
            alignment=alignment,
            chunk_bytes=chunk_bytes,
            total_bytes=total,
            partitions=tuple(
                PartitionInfo(partition_file(i), sizes[i], tuple(digests[i])) for i in range(partitions)
            ),
            sources=tuple(SourceFile(p.name, p.stat().st_size, sha256_file(p)) for p in source.files),
            files=tuple(copied),
            created_by=f"sllm {__version__}",
            key_mapping=KeyMapping(
                model_class=plan.model_class,
                rules=plan.rules,
                tensors=plan.mapped(),
                shared=dict(sorted(plan.aliases.items())),
                dropped=dict(sorted(plan.dropped.items())),
                config_changes=config_changes,
            ),
        )
        (tmp / INDEX_FILE).write_bytes(index_json(entries))
        (tmp / MANIFEST_FILE).write_bytes(manifest_json(manifest))
    return ConvertResult(
        path=str(dst),
        nbytes=total,
        tensors=len(entries),
        partitions=sizes,
        dtype=manifest.dtype,
        seconds=time.perf_counter() - started,
        model_class=plan.model_class,
        mapped=len(manifest.key_mapping.tensors),
        dropped=dict(plan.dropped),
        swept=swept,
    )


def plan_tensors(source: _Source, src: Path, target: str) -> hf_keys.KeyPlan:
    """The stored tensors of ``source``: transformers' loading rules for the model of
    ``src/config.json`` (:func:`sllm.core.hf_keys.plan_keys`), or the source's names as they
    are when there is no config transformers can read, or transformers is older than 5.

    Raises:
        MissingWeights, ShapeMismatch, CheckpointError: see ``plan_keys``.
    """
    metas = {n: (t.shape, _target_dtype(t.dtype, target)) for n, t in source.tensors.items()}
    source_aliases = {n: t.alias_of for n, t in source.tensors.items() if t.alias_of is not None}
    config = hf_keys.load_config(src)
    if config is None:
        return hf_keys.identity_plan(metas, source_aliases, "none: no config.json that transformers can read")
    try:
        import transformers.core_model_loading  # noqa: F401 - transformers >= 5
    except ImportError:
        return hf_keys.identity_plan(metas, source_aliases, "none: transformers < 5 has no conversion rules")
    try:
        hf_keys.model_class(config)
    except CheckpointError as exc:
        return hf_keys.identity_plan(metas, source_aliases, f"none: {exc}")
    return hf_keys.plan_keys(config, metas, source_aliases, str(src))


def _untie_config(tmp: Path) -> dict[str, Any]:
    """A tied pair is stored with different values: from_pretrained does not tie them, so
    turn tying off in the copied ``config.json`` (the loader ties by the config). Returns the
    changes made."""
    config_path = tmp / "config.json"
    if not config_path.is_file():
        return {}
    config_json = json.loads(config_path.read_text())
    changes = hf_keys.untie_config(config_json)
    config_path.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    return changes


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and generation files (every regular top-level non-weight file)."""
    copied = []
    skip = {SAFETENSORS_INDEX, BIN_INDEX, MANIFEST_FILE, INDEX_FILE}
    for entry in sorted(src.iterdir()):
        if not entry.is_file() or entry.name in skip or entry.name.startswith("."):
            continue
        if entry.name.endswith(WEIGHT_SUFFIXES) or re.fullmatch(r"partition-\d+\.bin", entry.name):
            continue
        shutil.copyfile(entry, dst / entry.name)
        copied.append(entry.name)
    return copied
