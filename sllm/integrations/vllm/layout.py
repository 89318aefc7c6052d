"""vLLM's parameter layout: a model's weights as vLLM holds them, loaded as views (no copy).

vLLM's per-model weight loaders turn a checkpoint's tensors into its parameters: they fuse
q/k/v and gate/up projections, transpose GPT-2's Conv1D weights, slice for tensor
parallelism, and copy each tensor into a parameter vLLM allocated. On CPU that copy, into
fresh memory and partly strided, cost more than reading the bytes (1.1-1.5 s against about
0.8 s for the O_DIRECT read of a 1.42 GB GPT-2-medium on a 2-core VM). The *layout* is the
model's parameters and buffers right after those loaders ran (before vLLM's
``process_weights_after_loading``), written as an sllm checkpoint whose tensor names are
vLLM's own (:func:`sllm.core.convert.write_tensors`). A later load reads it with the same
streamed O_DIRECT reads and makes every parameter a view of the read buffer
(``param.data = view``): no weight loader runs and no byte is copied.

A layout is a cache, keyed by everything that shapes it (:func:`layout_key`): the source
checkpoint's manifest, vLLM's version, the tensor- and pipeline-parallel rank and degree,
and the model's parameter and buffer names, shapes and dtypes. A TP degree or a vLLM
upgrade gets a new key and is never handed a wrong layout (ServerlessLLM's vLLM checkpoints
are saved for one TP degree: its issues #156/#157); the first load of a key goes the
name-mapped way and writes the layout then, under a temporary name renamed into place.
Layouts live in :func:`default_layout_dir` (or the loader's ``layout_dir``), a second copy
of the weights per key; deleting them any time only costs the next load its speed.

Used only where it is exact: unquantized models whose parameters all live in host memory
(vLLM's CPU build). On GPUs the parameters are device memory, so the name-mapped path
(views handed to vLLM's loaders, which copy them to the device) stays.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sllm.core.format import DTYPES, MANIFEST_FILE, Checkpoint, open_checkpoint
from sllm.errors import CheckpointError
from sllm.io.hostmem import HostBuffer, _madvise

#: ``madvise(2)`` advice that drops a private mapping's pages (they read as zeros after).
MADV_DONTNEED = 4
PAGE = 4096


def default_layout_dir() -> Path:
    """``$SLLM_VLLM_LAYOUT_DIR``, else ``$XDG_CACHE_HOME/sllm/vllm-layouts`` (``~/.cache`` by default)."""
    if env := os.environ.get("SLLM_VLLM_LAYOUT_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sllm" / "vllm-layouts"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by name (tied ones once, under their first name)."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters())
    out.update(model.named_buffers())
    return out


def unusable(tensors: dict[str, torch.Tensor], quantization: str | None) -> str | None:
    """Why a layout cannot stand for these tensors (None: it can)."""
    if quantization is not None:
        return f"quantization {quantization!r} processes weights while they load"
    for name, t in tensors.items():
        if t.device.type != "cpu":
            return f"{name} is on {t.device} (a layout aliases host memory)"
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            return f"{name} has dtype {t.dtype}"
    return None


def layout_key(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], *, vllm_version: str,
               tp: tuple[int, int] = (0, 1), pp: tuple[int, int] = (0, 1)) -> str:
    """A hex key (32 digits) naming the layout of ``ckpt`` for this model and rank.

    Args:
        ckpt: the source sllm checkpoint (its ``sllm.json`` bytes identify its content: the
            manifest carries every chunk's sha256).
        tensors: :func:`model_tensors` of the model vLLM built (names, shapes, dtypes).
        vllm_version: ``vllm.__version__``.
        tp, pp: (rank, degree) of tensor and pipeline parallelism.
    """
    h = hashlib.sha256()
    h.update((ckpt.path / MANIFEST_FILE).read_bytes())
    shapes = [[n, list(t.shape), str(t.dtype)] for n, t in tensors.items()]
    h.update(json.dumps({"vllm": vllm_version, "tp": list(tp), "pp": list(pp), "tensors": shapes}).encode())
    return h.hexdigest()[:32]


def open_layout(path: Path, tensors: dict[str, torch.Tensor]) -> Checkpoint | None:
    """The layout at ``path`` when it holds exactly ``tensors``' names, shapes and dtypes
    (contiguous); None when there is none.

    Raises:
        CheckpointError: a layout is there but malformed or not the model's (the message
            names the directory and the first difference).
    """
    if not (path / MANIFEST_FILE).exists():
        return None
    ckpt = open_checkpoint(path)
    if set(ckpt.tensors) != set(tensors):
        extra = sorted(set(ckpt.tensors) ^ set(tensors))[:3]
        raise CheckpointError(f"{path}: the layout's tensors are not the model's ({', '.join(extra)})")
    for name, t in tensors.items():
        e = ckpt.tensors[name]
        if e.shape != tuple(t.shape) or e.dtype != str(t.dtype).removeprefix("torch.") or e.nbytes != t.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} is {e.dtype} {list(e.shape)} in the layout, "
                                  f"{t.dtype} {list(t.shape)} in the model")
    return ckpt


def alias(tensors: dict[str, torch.Tensor], views: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Make each named parameter or buffer a view: ``tensors[name].data = view``.

    Returns the number of tensors aliased. Raises CheckpointError when a view's shape or
    dtype differs from its tensor's (:func:`open_layout` checked the index already).
    """
    n = 0
    for name, view in views:
        t = tensors[name]
        if view.shape != t.shape or view.dtype != t.dtype:
            raise CheckpointError(f"tensor {name!r}: the layout's view is {view.dtype} {list(view.shape)}, "
                                  f"the model's {t.dtype} {list(t.shape)}")
        t.data = view
        n += 1
    return n


@dataclass
class Trim:
    """What :func:`trim` did to one buffer: bytes still viewed, bytes given back, or why not."""

    nbytes: int
    live_bytes: int
    freed_bytes: int
    skipped: str = ""


def _spans(base: int, size: int, tensors: Iterable[torch.Tensor]) -> Iterator[tuple[int, int]]:
    for t in tensors:
        if t.numel() == 0:
            continue
        start = t.data_ptr() - base
        span = (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()
        yield max(0, start), min(size, start + span)


def trim(buffers: Iterable[HostBuffer], model: torch.nn.Module) -> list[Trim]:
    """Give back the pages of ``buffers`` that no tensor of ``model`` views any more.

    After ``process_weights_after_loading`` vLLM's CPU build keeps most linear weights
    repacked in oneDNN's own memory and drops the parameter, so most of an aliased buffer is
    dead while the embeddings, norms and biases still view it. Each dead page-aligned range
    is dropped with ``madvise(MADV_DONTNEED)``. Only where every view of a buffer is known:
    when its torch storage is used by more tensors than the model's own parameters and
    buffers (a kernel keeping a weight of its own), it is left whole.

    Returns one :class:`Trim` per buffer. Not for pooled buffers another load may reuse
    (their bytes would be gone): only a one-load pool's.
    """
    known = [t for _, t in model.named_parameters(remove_duplicate=True)]
    known += [t for _, t in model.named_buffers(remove_duplicate=True)]
    counter = getattr(torch._C, "_storage_Use_Count", None)
    out = []
    for buf in buffers:
        if buf.file_backed:
            out.append(Trim(buf.nbytes, buf.nbytes, 0, "file-backed"))
            continue
        storage = buf.tensor.untyped_storage()
        mine = [t for t in known if t.untyped_storage().data_ptr() == storage.data_ptr() and t.numel()]
        uses = None if counter is None or buf._base_uses is None else counter(storage._cdata)
        # every view holds one use of the storage; the buffer's own tensor holds its base uses
        if uses is None or uses - buf._base_uses > len({id(t) for t in mine}):
            out.append(Trim(buf.nbytes, buf.nbytes, 0, "viewed by tensors outside the model"))
            continue
        base = buf.tensor.data_ptr()
        live = sorted(_spans(base, buf.nbytes, mine))
        freed, pos, live_bytes = 0, 0, 0
        for start, end in [*live, (buf.nbytes, buf.nbytes)]:
            lo, hi = -(-pos // PAGE) * PAGE, start // PAGE * PAGE
            if hi > lo and _madvise(base + lo, hi - lo, MADV_DONTNEED):
                freed += hi - lo
            live_bytes += max(0, end - max(start, pos))
            pos = max(pos, end)
        out.append(Trim(buf.nbytes, live_bytes, freed))
    return out
