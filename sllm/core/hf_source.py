"""Reading a Hugging Face source checkpoint: its weight files, tensor metadata, and tensors.

Finds ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
``pytorch_model.bin``, or sharded ``.bin`` with ``pytorch_model.bin.index.json``; reads
every shard's metadata up front (safetensors headers; ``.bin`` through
``torch.load(weights_only=True)``, memory-mapped when a zip archive, never a full unpickle)
and finds tensors that share storage; then reads tensors one at a time by name, cast to
the dtype the conversion plans for each. Used by ``sllm/core/convert.py``; it writes nothing and
knows no architectures.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sllm.core.format import DTYPES, check_tensor_name
from sllm.errors import CheckpointError, NotAModelDirectory, TruncatedPartition, UnknownDtype, UnsafePickle

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass
class SourceTensor:
    """One source tensor: its name, shard, shape, dtype, and the name of the tensor it
    shares storage with (``.bin`` only)."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # source dtype name
    alias_of: str | None = None


# ---------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------


def natural_key(name: str) -> list[Any]:
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


class Source:
    """The source checkpoint: tensor metadata up front, tensors one at a time."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.kind, self.files = find_weight_files(src)
        self.tensors: dict[str, SourceTensor] = {}
        self._aliases: dict[str, str] = {}
        #: The first floating dtype of the first shard, in the shard's own order (what
        #: ``from_pretrained(dtype="auto")`` builds the model in when the config has no dtype).
        self.first_floating: str | None = None

    def scan(self) -> None:
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
            if path == self.files[0]:
                floating = [d for _, _, d in items if d in _FLOATING]
                self.first_floating = floating[0] if floating else None
            if self.kind == "safetensors":  # headers are not in module order; .bin dicts are
                items.sort(key=lambda item: natural_key(item[0]))
            for name, shape, dtype in items:
                check_tensor_name(name, str(path))
                if name in self.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in two shards")
                self.tensors[name] = SourceTensor(name, path, shape, dtype, self._aliases.get(name))

    def reader(self, casts: dict[str, str]) -> Reader:
        """A :class:`Reader` of this source's tensors, each cast to ``casts[name]``."""
        return Reader(self, casts)


class Reader:
    """Reads source tensors by name, each cast to its planned dtype. Keeps safetensors files open
    (memory-mapped) and the last two ``.bin`` shards loaded, so that reading in source order
    loads each shard once. Use as a context manager."""

    def __init__(self, source: Source, casts: dict[str, str]) -> None:
        self.source, self.casts = source, casts
        self._handles: dict[Path, Any] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> Reader:
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
        want = getattr(torch, self.casts.get(name, info.dtype))
        return tensor if tensor.dtype == want else tensor.to(want)


_FLOATING = ("float64", "float32", "float16", "bfloat16")


def target_dtype(src_dtype: str, target: str) -> str:
    """``target`` for a floating source dtype (unless "keep"), else ``src_dtype``: the cast
    of ``--dtype`` when no model's loading rules apply."""
    if target == "keep" or src_dtype not in _FLOATING:
        return src_dtype
    return target
