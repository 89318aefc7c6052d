"""Convert a Hugging Face checkpoint into the loading-optimized sllm format (version 2).

Reads ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
``pytorch_model.bin``, or sharded ``.bin`` with ``pytorch_model.bin.index.json`` (always
``torch.load(weights_only=True)``, never a full unpickle; ``sllm/core/hf_source.py``). With the source's ``config.json``
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
import queue
import re
import shutil
import threading
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
from sllm.core.hf_source import BIN_INDEX, SAFETENSORS_INDEX, Source, natural_key
from sllm.core.hf_source import find_weight_files as find_weight_files  # re-exported (sllm/core/bench.py)
from sllm.errors import CheckpointError, UnsupportedCheckpoint, UsageError
from sllm.io.atomic import atomic_directory, remove_stale_temporaries

ProgressCallback = Callable[[int, int], None]

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
    ordered = {n: entries[n] for n in sorted(entries, key=natural_key)}
    return primaries, ordered, offsets


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


class _ChunkedWriter:
    """Writes a partition sequentially and computes the sha256 of every chunk as it goes.

    The hashing runs in a thread of its own, in write order, while the next pieces are
    written (both release the GIL): a partition costs about max(write, hash) instead of
    their sum. A piece stays referenced until it is hashed (at most 16 pieces of at most a
    chunk wait), so the caller may drop its tensor, but not change it, once :meth:`write`
    returns. :meth:`close` (or :meth:`abort`) ends the thread.
    """

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.chunk_bytes = chunk_bytes
        self.pos = 0
        self.digests: list[str] = []
        # bounded: a writer faster than the hash waits, instead of holding every piece not yet hashed
        self._pieces: queue.Queue[tuple[memoryview, bool] | None] = queue.Queue(maxsize=16)
        self._last = hashlib.sha256()
        self._hasher = threading.Thread(target=self._hash, name="sllm-chunk-hash", daemon=True)
        self._hasher.start()

    def _hash(self) -> None:
        h = hashlib.sha256()
        while (item := self._pieces.get()) is not None:
            piece, ends_chunk = item
            h.update(piece)
            if ends_chunk:
                self.digests.append(h.hexdigest())
                h = hashlib.sha256()
        self._last = h

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            room = self.chunk_bytes - (self.pos % self.chunk_bytes)
            piece = view[:room]
            self.f.write(piece)
            self.pos += len(piece)
            self._pieces.put((piece, self.pos % self.chunk_bytes == 0))
            view = view[len(piece) :]

    def pad_to(self, offset: int) -> None:
        if offset < self.pos:
            raise RuntimeError(f"layout bug: offset {offset} is behind the write position {self.pos}")
        if offset > self.pos:
            self.write(bytes(offset - self.pos))

    def close(self) -> list[str]:
        self.abort()
        if self.pos % self.chunk_bytes or not self.digests:
            self.digests.append(self._last.hexdigest())
        return self.digests

    def abort(self) -> None:
        """Stop the hashing thread and close the file (idempotent)."""
        if self._hasher.is_alive():
            self._pieces.put(None)
            self._hasher.join()
        if not self.f.closed:
            self.f.close()


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
        dtype: "keep" or a floating dtype ("float16", "bfloat16", "float32"). With a model
            config, each tensor gets the dtype ``from_pretrained(dtype=...)`` would give it
            ("keep" is its default, ``dtype="auto"``: the config's dtype, else the first
            shard's first floating dtype; parameters the class keeps in another dtype keep
            it). Without one, floating tensors are cast to ``dtype`` unless "keep"; integer
            and bool tensors are never cast.
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
    source = Source(src)
    if dst.exists() and not force:
        from sllm.errors import DestinationExists

        raise DestinationExists(f"{dst}: already exists (use --force to replace it)")
    if dst.resolve() == src.resolve():
        raise UsageError(f"{dst}: the destination must differ from the source")
    source.scan()
    plan = plan_tensors(source, src, dtype)
    with source.reader(plan.casts) as read:
        untie = plan.resolve_ties(read)
    primaries, entries, sizes = plan_layout(plan.tensors, plan.aliases, partitions, alignment)
    total = sum(sizes)
    written = 0
    swept = [p.name for p in remove_stale_temporaries(dst.parent)]
    with atomic_directory(dst, force=force) as tmp:
        writers = [_ChunkedWriter(tmp / partition_file(i), chunk_bytes) for i in range(partitions)]
        try:
            with source.reader(plan.casts) as read:
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
                w.abort()
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


def write_tensors(
    tensors: dict[str, torch.Tensor],
    dst: str | Path,
    *,
    model_id: str,
    alignment: int = DEFAULT_ALIGNMENT,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    force: bool = False,
    on_written: Callable[[], None] | None = None,
) -> Manifest:
    """Write ``tensors`` as a one-partition sllm checkpoint at ``dst`` (no source, no side files).

    For tensors that are not a Hugging Face checkpoint (e.g. a vLLM model's parameters,
    :mod:`sllm.integrations.vllm.layout`): stored under the given names, in the given order,
    each contiguous at an ``alignment``-aligned offset, chunks checksummed as ``convert``'s.

    Args:
        tensors: name -> tensor (any device and layout; written contiguous, dtype kept).
        dst: the output directory, written under a temporary name and renamed into place.
        model_id: recorded in the manifest.
        on_written: called once every byte is written (in the page cache), before the files
            are flushed to storage and renamed into place: the tensors may change from then.
            Temporaries of dead writers beside ``dst`` are the caller's to sweep
            (:func:`~sllm.io.atomic.remove_stale_temporaries`).

    Raises:
        UsageError: a tensor's dtype has no name in the format (:data:`DTYPES`).
        UnsafeTensorName: a name that could act as a path. DestinationExists: ``dst``
        exists without ``force``. SllmError: ``dst``'s parent cannot be written. Nothing is
        left at ``dst`` when anything fails.
    """
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, t in tensors.items():
        check_tensor_name(name, str(dst))
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise UsageError(f"{dst}: tensor {name!r} has dtype {dtype}, which the sllm format cannot store")
        specs[name] = (tuple(t.shape), dtype)
    _, entries, sizes = plan_layout(specs, {}, 1, alignment)
    dst = Path(dst)
    with atomic_directory(dst, force=force) as tmp:
        w = _ChunkedWriter(tmp / partition_file(0), chunk_bytes)
        try:
            for name, t in tensors.items():
                w.pad_to(entries[name].offset)
                w.write(_tensor_bytes(t.cpu()))
            w.pad_to(sizes[0])
            digests = w.close()
        finally:
            w.abort()
        floats = {e.dtype for e in entries.values() if e.dtype in ("float64", "float32", "float16", "bfloat16")}
        manifest = Manifest(
            model_id=model_id, dtype=floats.pop() if len(floats) == 1 else "mixed", alignment=alignment,
            chunk_bytes=chunk_bytes, total_bytes=sizes[0],
            partitions=(PartitionInfo(partition_file(0), sizes[0], tuple(digests)),),
            created_by=f"sllm {__version__}",
        )
        (tmp / INDEX_FILE).write_bytes(index_json(entries))
        (tmp / MANIFEST_FILE).write_bytes(manifest_json(manifest))
        if on_written is not None:
            on_written()
    return manifest


def plan_tensors(source: Source, src: Path, target: str) -> hf_keys.KeyPlan:
    """The stored tensors of ``source``: transformers' loading rules for the model of
    ``src/config.json`` (:func:`sllm.core.hf_keys.plan_keys`), or the source's names as they
    are when there is no config transformers can read, or transformers is older than 5.

    Raises:
        UnsupportedCheckpoint: a quantized checkpoint (``quantization_config``).
        MissingWeights, ShapeMismatch, CheckpointError: see ``plan_keys``.
    """
    metas = {n: (t.shape, t.dtype) for n, t in source.tensors.items()}
    source_aliases = {n: t.alias_of for n, t in source.tensors.items() if t.alias_of is not None}
    config = hf_keys.load_config(src)
    if config is None:
        return hf_keys.identity_plan(metas, source_aliases, "none: no config.json that transformers can read", target)
    try:
        import transformers.core_model_loading  # noqa: F401 - transformers >= 5
    except ImportError:
        return hf_keys.identity_plan(metas, source_aliases, "none: transformers < 5 has no conversion rules", target)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise UnsupportedCheckpoint(
            f"{src / 'config.json'}: a quantized checkpoint (quant_method {method!r}): its weights are converted by "
            "transformers' quantizer at load time, which sllm convert does not run"
        )
    try:
        hf_keys.model_class(config)
    except CheckpointError as exc:
        return hf_keys.identity_plan(metas, source_aliases, f"none: {exc}", target)
    return hf_keys.plan_keys(
        config, metas, source_aliases, str(src), target=target, first_floating=source.first_floating
    )


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
