"""The tensors of a loaded sllm checkpoint under the names vLLM's models expect.

vLLM's ``model.load_weights(weights)`` takes ``(name, tensor)`` pairs named as in the
*source* checkpoint (the hub's safetensors), and does its own renaming, fusing (QKV,
gate/up) and tensor-parallel slicing. An sllm checkpoint of format version 2 stores the
transformers runtime state dict instead, and records in the manifest's ``key_mapping`` how
each stored tensor was made from the source's (sllm-format(5), KEY MAPPING). This module
undoes that mapping without copying: a renamed tensor is handed under its source name, a
tensor that stacks per-expert source tensors (``MergeModulelist(dim=0)``, optionally then
``Concatenate``: fused MoE ``gate_up_proj``) is handed as one view per source. Other
conversions (a bare concatenation, whose split sizes the manifest does not record) are
refused with one line.

Version-1 checkpoints and checkpoints without a ``key_mapping`` hold the source's names
already and are handed as they are. It imports neither vLLM nor anything outside
``sllm.core``; it reads no bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from sllm.core.format import Checkpoint
from sllm.errors import CheckpointError

_MERGE_DIM0 = re.compile(r"^MergeModulelist\(dim=0\)$")
_CONCAT = re.compile(r"^Concatenate\(dim=(\d+)\)$")


def _unmerge(tensor: torch.Tensor, sources: list[str], ops: list[str]) -> list[tuple[str, torch.Tensor]] | None:
    """Views of ``tensor`` per source for the conversions that can be undone as views, else None.

    ``MergeModulelist(dim=0)``: E sources stacked on a new dim 0 (``tensor.shape[0] == E``).
    ``MergeModulelist(dim=0)`` then ``Concatenate(dim=d)``: G groups of E experts (sources in
    group order, E per group: transformers' ``gate_up_proj`` of w1s then w3s), stacked, then the
    G stacks concatenated along ``d``; the groups are taken as equal slices of ``d`` (the stacks
    of one conversion have one shape each, and fused expert groups are of one size).
    """
    if not ops or not _MERGE_DIM0.match(ops[0]) or tensor.dim() < 1 or tensor.shape[0] == 0:
        return None
    experts = tensor.shape[0]
    if len(ops) == 1:
        if len(sources) != experts:
            return None
        return [(src, tensor.select(0, i)) for i, src in enumerate(sources)]
    m = _CONCAT.match(ops[1]) if len(ops) == 2 else None
    if m is None or len(sources) % experts:
        return None
    dim, groups = int(m.group(1)), len(sources) // experts
    if not 1 <= dim < tensor.dim() or tensor.shape[dim] % groups:
        return None
    size = tensor.shape[dim] // groups
    return [
        (sources[g * experts + i], tensor.select(0, i).narrow(dim - 1, g * size, size))
        for g in range(groups) for i in range(experts)
    ]


def source_weights(
    ckpt: Checkpoint, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(source name, tensor view)`` for every tensor of the source checkpoint kept in ``ckpt``.

    Args:
        ckpt: the validated checkpoint metadata (its manifest's ``key_mapping`` is read).
        state_dict: stored name -> tensor, as :func:`sllm.core.loader.load_checkpoint` gives
            it (views of the partition buffers; any device, any dtype), or ``(stored name,
            tensor)`` pairs as they come (:class:`~sllm.integrations.vllm.stream.StreamedLoad`).

    Yields:
        One pair per source tensor, in the order of ``state_dict``; tied names (manifest ``shared``) are
        yielded too, as the same tensor object, so a model that ties its weights and skips
        one half finds the other. No tensor is copied: each is ``state_dict``'s tensor or a
        ``select`` view of it.

    Raises:
        CheckpointError: a stored tensor was made by a conversion this cannot undo as views
        (the message names the checkpoint, the tensor and the operations).
    """
    mapping = ckpt.manifest.key_mapping
    seen: set[str] = set()
    pairs_in = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    for name, tensor in pairs_in:
        entry = mapping.tensors.get(name) if mapping is not None else None
        if entry is None:
            pairs = [(name, tensor)]
        else:
            sources, ops = list(entry["sources"]), list(entry["operations"])
            if not ops and len(sources) == 1:
                pairs = [(sources[0], tensor)]
            else:
                pairs = _unmerge(tensor, sources, ops)
            if pairs is None:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {name!r} was made from {sources[:3]}{'...' if len(sources) > 3 else ''} "
                    f"by {ops}, which vLLM's loader cannot take apart as views; serve this model with sllm's own engine"
                )
        for src, t in pairs:
            if src not in seen:
                seen.add(src)
                yield src, t
