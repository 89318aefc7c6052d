"""transformers' own loading rules, applied once at convert time to a checkpoint's names.

``from_pretrained`` does not load a checkpoint's tensors as they are named: it adds or
strips the base-model prefix (``transformer.``, ``model.``, ``bert.``), applies the
renamings and weight conversions registered for the model class in
``transformers.conversion_mapping`` (legacy ``LayerNorm.gamma``/``beta``, per-expert MoE
weights fused into one tensor per layer, ...), drops keys the class declares ignorable
(``_keys_to_ignore_on_load_unexpected``, old ``position_ids`` / ``rotary_emb.inv_freq``
buffers) and keys the model has no slot for, and ties weights (``all_tied_weights_keys``)
symmetrically: whichever of a tied pair the checkpoint holds is used for both. Parameters
left without a tensor are randomly initialised.

:func:`plan_keys` runs those rules, by calling transformers' functions on a model built on
the meta device, and returns a :class:`KeyPlan`: which source tensors make each stored
tensor, through which transformers operations, which source tensors are dropped and why,
and which tied names share a stored tensor. The converter then writes the model's runtime
parameters, so that a load is views of one buffer with nothing renamed or fused. Shapes
come from a dry run of each conversion on meta tensors, so no byte is read to plan.
:meth:`KeyPlan.run_group` runs one conversion on real tensors.

It refuses a checkpoint that ``from_pretrained`` would load with parameters missing
(randomly initialised) or of another shape. It does not read files, write the format or
build runnable models (that is ``sllm/core/convert.py`` and ``sllm/core/loader.py``).
Needs transformers >= 5 (``transformers.core_model_loading``); with an older one, or a
source without a usable ``config.json``, names are kept as they are (:func:`identity_plan`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from sllm.errors import CheckpointError, MissingWeights, ShapeMismatch

#: One source tensor's metadata: (shape, dtype name in the source).
SourceMeta = tuple[tuple[int, ...], str]


@dataclass
class Group:
    """One unit of conversion: the source tensors that make one or more stored tensors.

    Attributes:
        key: transformers' name for the group (the first target's name).
        template: a pristine ``WeightRenaming``/``WeightConverter`` (copied for each run),
            or None for an identity group (no transformers rules applied).
        members: ``(target_key, source_name, source_pattern)`` in transformers' order (the
            order tensors are stacked in).
        outputs: the stored names the group produces, in write order.
        operations: ``repr`` of each transformers operation (empty for a rename).
    """

    key: str
    template: Any
    members: list[tuple[str, str, str]]
    outputs: list[str] = field(default_factory=list)
    operations: tuple[str, ...] = ()

    @property
    def sources(self) -> list[str]:
        """Source names, grouped by the converter's source pattern (in its order) and in
        transformers' order within one (the order they are stacked in)."""
        patterns = list(getattr(self.template, "source_patterns", None) or [])
        rank = {p: i for i, p in enumerate(patterns)}
        members = sorted(enumerate(self.members), key=lambda im: (rank.get(im[1][2], len(rank)), im[0]))
        return list(dict.fromkeys(m[1] for _, m in members))


@dataclass
class KeyPlan:
    """What :func:`plan_keys` decided (see the module docstring).

    Attributes:
        model_class: the transformers class the rules came from ("" for an identity plan).
        rules: where the rules came from ("transformers 5.x.y"), or why none were applied.
        groups: conversion groups in write order (source order).
        tensors: stored name -> (shape, dtype name), for every group output, in write order.
        aliases: extra index names -> the stored name whose bytes they share (tied weights
            and tensors that share storage in a ``.bin`` source).
        dropped: source name -> why it is not stored.
        untie: tied pairs (target, source) that the checkpoint holds both of, to settle with
            :meth:`resolve_ties` (``from_pretrained`` ties them only when their values are equal).
        casts: source name -> the dtype it is cast to before any conversion (from_pretrained's
            rule: the model dtype, or the parameter's own dtype where the class keeps it).
    """

    model_class: str
    rules: str
    groups: list[Group]
    tensors: dict[str, tuple[tuple[int, ...], str]]
    aliases: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    untie: list[tuple[str, str]] = field(default_factory=list)
    casts: dict[str, str] = field(default_factory=dict)
    _model: Any = field(default=None, repr=False)

    def run_group(self, group: Group, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stored tensors of ``group``, from source tensors ``read(name)`` returns (already
        cast to the target dtype), through transformers' own ``convert`` of the group.

        Raises:
            CheckpointError: the conversion fails or yields another shape than planned.
        """
        if not group.operations:  # a rename (or no rules): the source tensor itself
            (name,) = group.outputs
            return {name: read(group.members[0][1])}
        out = _run(group, self._model, lambda name: (lambda: read(name)))
        for name, t in out.items():
            if tuple(t.shape) != self.tensors[name][0]:
                raise ShapeMismatch(f"conversion of {group.sources} gave {name!r} shape {list(t.shape)}, "
                                    f"planned {list(self.tensors[name][0])}")
        return out

    def resolve_ties(self, read: Callable[[str], torch.Tensor]) -> bool:
        """Settle the tied pairs the checkpoint holds both halves of, as
        ``PreTrainedModel.tie_weights(missing_keys=...)`` does: equal values are tied (the
        target becomes an alias, stored once); different values are not. Returns True when
        some pair differs (the caller then turns tying off in the config)."""
        differ = False
        for target, source in self.untie:
            producers = {name: g for g in self.groups for name in g.outputs}
            if target not in producers or source not in producers:
                continue  # already one tensor (an alias of the other)
            a = self.run_group(producers[target], read)[target]
            b = self.run_group(producers[source], read)[source]
            if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b):
                g = producers[target]
                g.outputs.remove(target)
                if not g.outputs:
                    self.groups.remove(g)
                del self.tensors[target]
                self.aliases[target] = source
                for name, primary in self.aliases.items():
                    if primary == target:
                        self.aliases[name] = source
            else:
                differ = True
        self.untie = []
        return differ

    def mapped(self) -> dict[str, dict[str, list[str]]]:
        """Stored name -> ``{"sources": [...], "operations": [...]}`` for every stored tensor
        that is not simply the source tensor of the same name (for the manifest)."""
        out = {}
        for g in self.groups:
            for name in g.outputs:
                if g.operations or g.sources != [name]:
                    out[name] = {"sources": g.sources, "operations": list(g.operations)}
        return out


def identity_plan(
    sources: dict[str, SourceMeta], source_aliases: dict[str, str], rules: str, target: str = "keep"
) -> KeyPlan:
    """Every source tensor stored under its own name (no transformers rules), floating
    tensors cast to ``target`` unless it is "keep"."""
    from sllm.core.hf_source import target_dtype

    groups, tensors, aliases = [], {}, {}
    casts = {name: target_dtype(dtype, target) for name, (_, dtype) in sources.items()}
    for name, (shape, _) in sources.items():
        if name in source_aliases:
            aliases[name] = source_aliases[name]
            continue
        groups.append(Group(name, None, [(name, name, name)], [name]))
        tensors[name] = (shape, casts[name])
    return KeyPlan("", rules, groups, tensors, aliases, casts=casts)


def model_class(config: Any) -> type:
    """The concrete transformers class sllm builds for ``config``: the first of
    ``config.architectures`` that transformers has, else AutoModelForCausalLM's class for
    the config (the loader's rule, ``sllm/core/loader.py``).

    Raises:
        CheckpointError: transformers has no class for the config.
    """
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "_from_config"):
            return cls
    try:
        return transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"transformers has no causal-LM class for model_type {config.model_type!r}") from exc


def meta_model(config: Any, dtype: torch.dtype) -> Any:
    """The model of ``config`` built as ``from_pretrained`` builds it (its init contexts:
    meta device, no weight tying), with every parameter and buffer on the meta device."""
    from transformers.utils.generic import ContextManagers

    cls = model_class(config)
    config = copy.deepcopy(config)
    with ContextManagers(cls.get_init_context(dtype, False, False, None)):
        return cls(config)


def _run(group: Group, model: Any, make: Callable[[str], Callable[[], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """transformers' ``mapping.convert`` on a fresh copy of the group's template; ``make(name)``
    gives the callable that materialises source tensor ``name``."""
    mapping = copy.deepcopy(group.template)
    for target_key, source_name, pattern in group.members:
        mapping.add_tensor(target_key, source_name, pattern, make(source_name))
    try:
        out = mapping.convert(group.key, model=model, config=model.config)
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises ValueError/RuntimeError/IndexError from its ops
        raise CheckpointError(f"transformers' conversion of {group.sources[:3]} into {group.key!r} failed ({exc})") from exc
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def model_dtype(config: Any, target: str, first_floating: str | None) -> torch.dtype:
    """The dtype ``from_pretrained`` builds the model in: ``target`` when given (not
    "keep"), else (``dtype="auto"``) the config's ``dtype``, else the first floating dtype of
    the first shard, else torch's default (``modeling_utils._get_dtype``)."""
    if target != "keep":
        return getattr(torch, target)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, first_floating) if first_floating else torch.get_default_dtype()


def load_config(src: Path) -> Any | None:
    """``src/config.json`` as a transformers config, or None when there is none or
    transformers cannot read it (then no rules apply)."""
    if not (src / "config.json").is_file():
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(src)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_keys(
    config: Any,
    sources: dict[str, SourceMeta],
    source_aliases: dict[str, str],
    where: str,
    *,
    target: str = "keep",
    first_floating: str | None = None,
) -> KeyPlan:
    """Plan the stored tensors of a checkpoint with transformers' loading rules.

    Args:
        config: the checkpoint's transformers config.
        sources: source name -> (shape, dtype name), in source order.
        source_aliases: source name -> the source name it shares storage with (``.bin``).
        where: the source directory, for messages.
        target: "keep" (the dtypes ``from_pretrained`` gives by default) or the dtype name
            given as ``from_pretrained(dtype=...)`` would be; see :func:`model_dtype`.
        first_floating: the first floating dtype of the first shard, in its order.

    Returns: the plan; ``plan.groups`` in source order.

    Raises:
        MissingWeights: parameters would be left randomly initialised (one line naming them).
        ShapeMismatch: a tensor whose shape is not the model's (``from_pretrained`` refuses it).
        CheckpointError: the model cannot be built, or a conversion fails on the planned shapes.
    """
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        build_glob_alternation,
        dot_natural_key,
        rename_source_key,
    )

    dtype = model_dtype(config, target, first_floating)
    try:
        model = meta_model(config, dtype)
    except CheckpointError:
        raise
    except Exception as exc:  # a config transformers cannot instantiate
        raise CheckpointError(f"{where}: config.json: transformers cannot build the model ({exc})") from exc
    cls_name = type(model).__name__
    expected = model.state_dict()  # persistent parameters and buffers (on meta), tied names included
    weight_mapping = get_model_conversion_mapping(model)
    renamings = [t for t in weight_mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in weight_mapping if isinstance(t, WeightConverter)]
    pattern_to_converter = {k: c for c in converters for k in c.source_patterns}
    prefix = model.base_model_prefix
    dtype_plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if dtype_plan:
        plan_alt, plan_group, _ = build_glob_alternation(list(dtype_plan))

    def cast_for(target_key: str) -> str:
        """from_pretrained's dtype for a tensor loaded into ``target_key`` (step 3 of
        convert_and_load_state_dict_in_model)."""
        cast = dtype
        if dtype_plan and (m := plan_alt.search(target_key)) is not None:
            cast = dtype_plan[plan_group[m.lastgroup]]
        elif expected[target_key].dtype != cast:
            cast = expected[target_key].dtype
        return str(cast).removeprefix("torch.")

    # transformers' renaming pass (core_model_loading.convert_and_load_state_dict_in_model, step 1-2).
    groups: dict[str, Group] = {}
    casts: dict[str, str] = {}  # source name -> dtype it is cast to when read
    unexpected: dict[str, str] = {}  # renamed key -> source name
    for original in sorted(sources, key=dot_natural_key):
        renamed, pattern = rename_source_key(original, renamings, converters, prefix, expected)
        if renamed not in expected and original in expected:
            renamed, pattern = rename_source_key(original, [], [], base_model_prefix=prefix, meta_state_dict=expected)
        if renamed in expected:
            if pattern is not None:
                group = groups.setdefault(renamed, Group(renamed, copy.deepcopy(pattern_to_converter[pattern]), []))
            else:
                group = groups.setdefault(renamed, Group(renamed, WeightRenaming(original, renamed), []))
                pattern = original
            group.members.append((renamed, original, pattern))
            casts[original] = cast_for(renamed)
        elif pattern is not None:
            for k in pattern_to_converter[pattern].target_patterns:
                unexpected[renamed.replace(pattern_to_converter[pattern].target_patterns[0], k)] = original
        else:
            unexpected[renamed] = original

    # Shapes of every output: transformers' conversions on meta tensors.
    order = {name: i for i, name in enumerate(sources)}
    ordered = sorted(groups.values(), key=lambda g: min(order[s] for s in g.sources))
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    dropped: dict[str, str] = {}
    kept: list[Group] = []
    for g in ordered:
        if not isinstance(g.template, WeightConverter):
            src_name = g.members[0][1]
            outs = {g.key: torch.empty(sources[src_name][0], dtype=getattr(torch, casts[src_name]), device="meta")}
            for _, other, _ in g.members[1:]:
                dropped[other] = f"{g.key!r} is already made from {src_name!r} (from_pretrained keeps the first)"
        else:
            g.operations = tuple(repr(op) for op in g.template.operations)
            outs = _run(
                g, model,
                lambda name: (lambda: torch.empty(sources[name][0], dtype=getattr(torch, casts[name]), device="meta")),
            )
        for name, t in outs.items():
            if name not in expected:
                for s in g.sources:
                    dropped.setdefault(s, f"converted to {name!r}, which is not a weight of {cls_name}")
                continue
            want = tuple(expected[name].shape)
            if tuple(t.shape) != want:
                raise ShapeMismatch(
                    f"{where}: tensor {g.sources[0]!r} gives {name!r} shape {list(t.shape)}, "
                    f"{cls_name} expects {list(want)} (from_pretrained refuses it too)"
                )
            g.outputs.append(name)
            tensors[name] = (want, str(t.dtype).removeprefix("torch."))
        if g.outputs:
            kept.append(g)

    # Unexpected keys: dropped, as from_pretrained drops them; say whether the class declares them ignorable.
    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(unexpected))
    if hasattr(model, "_adjust_missing_and_unexpected_keys"):
        model._adjust_missing_and_unexpected_keys(info)
    for renamed, original in unexpected.items():
        if renamed in info.unexpected_keys:
            dropped[original] = f"not a weight of {cls_name} (from_pretrained drops it with a warning)"
        else:
            dropped[original] = f"ignored by {cls_name} (declared ignorable on load)"

    # Tensors that share storage in the source and are only renamed: store once.
    aliases: dict[str, str] = {}
    plain = {g.members[0][1]: g for g in kept if not g.operations}
    for name, primary in source_aliases.items():
        if name in plain and primary in plain and plain[name] is not plain[primary]:
            out, prim_out = plain[name].outputs[0], plain[primary].outputs[0]
            if tensors.get(out) == tensors.get(prim_out) and out != prim_out:
                aliases[out] = prim_out
                del tensors[out]
                kept.remove(plain[name])

    # Tied weights, symmetric as in PreTrainedModel.tie_weights(missing_keys=...).
    untie: list[tuple[str, str]] = []
    tied = list(getattr(model, "all_tied_weights_keys", {}).items())
    have = lambda n: n in tensors or n in aliases  # noqa: E731

    def root(n: str) -> str:
        return aliases.get(n, n)

    for i, (target, source) in enumerate(tied):
        if have(source) and have(target):
            if root(source) != root(target):
                untie.append((target, source))
        elif have(target):
            aliases[source] = root(target)
        elif have(source):
            aliases[target] = root(source)
        else:
            backup = next((t for t, s in tied[i + 1 :] if s == source and have(t)), None)
            if backup is not None:
                aliases[source] = aliases[target] = root(backup)

    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    missing = [n for n in params if not have(n)]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise MissingWeights(
            f"{where}: from_pretrained would leave {len(missing)} weight(s) of {cls_name} randomly initialised: {shown}"
        )
    plan = KeyPlan(cls_name, f"transformers {transformers.__version__}", kept, tensors, aliases, dropped, untie, casts)
    plan._model = model
    return plan


def untie_config(config_json: dict[str, Any]) -> dict[str, Any]:
    """Set ``tie_word_embeddings`` to false in a parsed ``config.json`` (top level and any
    sub-config that ties); returns the changes made, e.g. ``{"tie_word_embeddings": False}``."""
    changes: dict[str, Any] = {}
    if config_json.get("tie_word_embeddings", True) is not False:
        config_json["tie_word_embeddings"] = False
        changes["tie_word_embeddings"] = False
    for key, sub in config_json.items():
        if isinstance(sub, dict) and sub.get("tie_word_embeddings") is True:
            sub["tie_word_embeddings"] = False
            changes[f"{key}.tie_word_embeddings"] = False
    return changes
