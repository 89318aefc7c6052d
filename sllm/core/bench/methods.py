"""load-bench's method registry: every way of loading the model, and how each one loads.

A :class:`Method` names a loader family and a readiness level ("bytes", "state-dict",
"model"), the files it reads, and which cache states it is measured in. :data:`METHODS`
lists them in table order; :func:`select_methods` resolves ``--methods``;
:func:`method_loader` gives the function a worker times for a baseline (the sllm and raw
methods are run by :mod:`sllm.core.bench.worker` itself). Peers that are not installed
(``pip install 'sllm[bench]'``: Run:ai Model Streamer, fastsafetensors, tensorizer) fail
their rows with a one-line hint instead of the whole run. Baseline models are assembled
with the same :func:`sllm.core.skeleton.build_model` sllm uses, so model rows differ only
in how the bytes arrive. This module imports torch only inside the loader functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.errors import UsageError

COLD_WARM = ("cold", "warm")


@dataclass(frozen=True)
class Method:
    """One way of loading the model.

    Attributes:
        loader: the family name used by ``--methods`` ("sllm", "safetensors", ...).
        level: "bytes" (raw read), "state-dict" or "model".
        needs: which files it reads: "sllm" (the converted checkpoint), "safetensors",
            "bin" (``pytorch_model.bin``), "tensors" (a tensorizer file) or "hf" (the
            Hugging Face directory).
        temps: the cache states measured, in order: "cold" (files evicted from the page
            cache) and/or "warm" (see each method's description).
        description: one line for the table's legend and the man page.
    """

    loader: str
    level: str
    needs: str
    temps: tuple[str, ...]
    description: str

    @property
    def name(self) -> str:
        """``loader:level``, the row's key."""
        return f"{self.loader}:{self.level}"

    @property
    def warm(self) -> bool:
        """True when a warm load is measured."""
        return "warm" in self.temps


_PEER = "cold: page cache evicted; warm: a second load in the same process (page cache hot)"

#: Every method, in table order. ``--methods`` selects by loader or by ``loader:level``.
METHODS: tuple[Method, ...] = (
    Method("raw", "bytes", "sllm", COLD_WARM,
           "floor: cold = O_DIRECT read of the partition files into touched memory; warm = buffered read, "
           "page cache hot"),
    Method("touch", "bytes", "sllm", ("cold",),
           "first touch of fresh memory: the partitions' bytes of new memory faulted in by a fresh process, no "
           "I/O (what a fresh process pays beyond the raw read; on a VM, memory the guest gave back is slow)"),
    Method("sllm", "model", "sllm", COLD_WARM,
           "sllm.load_model, first load of a fresh process (nothing reserved); warm = reload after `del model`"),
    Method("sllm", "state-dict", "sllm", COLD_WARM,
           "sllm.load_state_dict, first load of a fresh process; warm = reload after `del`"),
    Method("sllm-reserved", "model", "sllm", COLD_WARM,
           "sllm.load_model, host memory pool reserved at start (a server with a budget); warm = after release"),
    Method("sllm-page-cache", "model", "sllm", ("warm",),
           "sllm.load_model in a fresh process whose files another process left in the page cache"),
    Method("sllm-page-cache", "state-dict", "sllm", ("warm",),
           "sllm.load_state_dict in a fresh process, files in the page cache"),
    Method("safetensors", "model", "safetensors", COLD_WARM, "safetensors.torch.load_file + build_model; " + _PEER),
    Method("safetensors", "state-dict", "safetensors", COLD_WARM, "safetensors.torch.load_file (mmap), pages touched"),
    Method("runai", "model", "safetensors", COLD_WARM, "Run:ai Model Streamer SafetensorsStreamer + build_model"),
    Method("runai", "state-dict", "safetensors", COLD_WARM, "Run:ai Model Streamer SafetensorsStreamer.get_tensors"),
    Method("fastsafetensors", "model", "safetensors", COLD_WARM,
           "fastsafetensors SafeTensorsFileLoader (nogds on CPU) + build_model"),
    Method("fastsafetensors", "state-dict", "safetensors", COLD_WARM,
           "fastsafetensors SafeTensorsFileLoader.copy_files_to_device (nogds on CPU)"),
    Method("tensorizer", "model", "tensors", COLD_WARM, "tensorizer TensorDeserializer + build_model"),
    Method("tensorizer", "state-dict", "tensors", COLD_WARM, "tensorizer TensorDeserializer, every tensor"),
    Method("torch-load", "model", "bin", COLD_WARM, "torch.load(weights_only=True) + build_model"),
    Method("torch-load", "state-dict", "bin", COLD_WARM, "torch.load(weights_only=True)"),
    Method("torch-load-mmap", "model", "bin", COLD_WARM, "torch.load(mmap=True, weights_only=True) + build_model"),
    Method("torch-load-mmap", "state-dict", "bin", COLD_WARM, "torch.load(mmap=True, weights_only=True), pages touched"),
    Method("from-pretrained", "model", "hf", COLD_WARM, "transformers AutoModelForCausalLM.from_pretrained(dtype='auto')"),
)  # fmt: skip

LOADERS: tuple[str, ...] = tuple(dict.fromkeys(m.loader for m in METHODS))
#: Loader families of other projects (the "ahead of every peer" target compares with these).
PEERS: tuple[str, ...] = ("safetensors", "runai", "fastsafetensors", "tensorizer", "torch-load", "torch-load-mmap",
                          "from-pretrained")  # fmt: skip


def select_methods(names: list[str] | None) -> list[Method]:
    """The methods named by ``--methods`` (loader names or ``loader:level``), in table order.

    None or an empty list selects every method.

    Raises:
        UsageError: an unknown name (the message lists the valid ones).
    """
    if not names:
        return list(METHODS)
    wanted = set()
    for raw in names:
        name = raw.strip()
        hits = [m for m in METHODS if name in (m.loader, m.name)]
        if not hits:
            valid = ", ".join([*LOADERS, *(m.name for m in METHODS)])
            raise UsageError(f"--methods: unknown method {name!r}; choose from {valid}")
        wanted.update(m.name for m in hits)
    return [m for m in METHODS if m.name in wanted]


def _need(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{what} is not installed", hint="pip install 'sllm[bench]'") from exc


def _state_dict_loader(loader: str, files: list[Path], device: Any, spec: dict[str, Any]) -> Callable[[], Any]:
    import torch

    if loader == "safetensors":
        from safetensors.torch import load_file

        return lambda: {k: v for f in files for k, v in load_file(str(f), device=str(device)).items()}
    if loader == "runai":
        streamer_mod = _need("runai_model_streamer", "Run:ai Model Streamer (runai-model-streamer)")

        def load_runai() -> Any:
            # get_tensors() yields views of a reused ring of buffers: each tensor is copied out
            # before the next chunk overwrites it, as its users (e.g. vLLM's weight loaders) do.
            with streamer_mod.SafetensorsStreamer() as streamer:
                streamer.stream_files([str(f) for f in files], device=str(device))
                return {name: t.clone() for name, t in streamer.get_tensors()}

        return load_runai
    if loader == "fastsafetensors":
        fst = _need("fastsafetensors", "fastsafetensors")

        def load_fst() -> Any:
            fl = fst.SafeTensorsFileLoader(fst.SingleGroup(), str(device), nogds=device.type == "cpu")
            fl.add_filenames({0: [str(f) for f in files]})
            fb = fl.copy_files_to_device()
            sd = {k: fb.get_tensor(k) for k in fb.key_to_rank_lidx}  # owning tensors: valid after close
            fb.close()
            fl.close()
            return sd

        return load_fst
    if loader == "tensorizer":
        tz = _need("tensorizer", "tensorizer")

        def load_tz() -> Any:
            sd: dict[str, Any] = {}
            for f in files:
                d = tz.TensorDeserializer(str(f), device=str(device))
                sd.update(d.items())
                d.close()
            return sd

        return load_tz
    mmap = loader == "torch-load-mmap"
    return lambda: {k: v for f in files for k, v in torch.load(f, map_location=device, weights_only=True,
                                                               mmap=mmap).items()}  # fmt: skip


def method_loader(spec: dict[str, Any], device: Any) -> Callable[[], Any]:
    """The function a worker times for baseline ``spec["loader"]`` at ``spec["level"]``:
    it returns the state dict or the model.

    Raises:
        UsageError: the peer's package is not installed (with the install hint).
    """
    from sllm.core.skeleton import build_model

    files = [Path(f) for f in spec["files"]]
    loader, level = spec["loader"], spec["level"]
    if loader == "from-pretrained":
        from transformers import AutoModelForCausalLM

        kwargs = {"device_map": str(device)} if device.type == "cuda" else {}
        return lambda: AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype="auto", **kwargs).eval()
    load_sd = _state_dict_loader(loader, files, device, spec)
    if level == "state-dict":
        return load_sd

    return lambda: build_model(spec["config_dir"], load_sd(), device)
