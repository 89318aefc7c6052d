"""The cluster inventory: which nodes exist, what their tiers can do, and what each holds now.

Two halves, both plain data:

- **the static inventory** (:class:`Inventory`): nodes (name, URL, the environment variable
  holding its API key, device kind/count/memory, its tiers with capacities and the
  bandwidths that ``sllm load-bench --tiers`` measured, the loader's fixed cost), the shared
  remote store, and optional model sizes. It comes from an :class:`InventorySource`; the
  first backend is :class:`TomlInventory`, a TOML file whose node entries have the shape of
  the node profile that ``load-bench --tiers`` writes (:mod:`sllm.core.profile`), so that
  :meth:`TomlInventory.add_profile` merges a profile in. A cluster manager can supply the
  same records later by implementing :class:`InventorySource`.
- **the live state** (:class:`NodeState`) of each node, parsed from its ``GET /status``
  (:func:`parse_status`), fetched for all nodes concurrently by :func:`gather_states`:
  :mod:`sllm.core.node_state`, re-exported here.

The TOML format (``man sllm-schedule-plan``)::

    [remote]                      # the shared store every node pulls from
    url = "s3://bucket/models"
    gbps = 0.5                    # default download GB/s for nodes without a measured one

    [models."opt-1.3b"]           # sizes of models no node reports (optional; without one, a
                                  # node that can pull the model reads it from the remote's manifest)
    nbytes = 2630000000
    tensors = 389                 # its tensor index's entries (optional; else as the remote's index says)

    [nodes.a]                     # one node; the keys of a node profile's [node] table
    url = "http://10.0.0.1:8343"
    api_key_env = "SLLM_KEY_A"    # the API key is read from this variable, never stored
    admin_key_env = "SLLM_ADMIN_A"  # its --admin-key, for --apply (default: the API key)
    max_memory_bytes = 40000000000  # the node's --max-memory (default: device memory)
    [nodes.a.device]
    kind = "cuda"                 # "cuda" or "cpu"
    count = 1
    memory_bytes = 80000000000
    [nodes.a.tiers.ssd]
    gbps = 3.51                   # measured cold read GB/s
    capacity_bytes = 500000000000
    load_fixed_seconds = 0.017    # a cold start from this tier on the real load path:
    load_gbps = 2.93              #   fixed + bytes / load_gbps (optional, per tier; see below)
    [nodes.a.tiers.dram]
    gbps = 7.80                   # DRAM -> device GB/s
    capacity_bytes = 64000000000
    [nodes.a.tiers.remote]
    gbps = 0.275                  # the remote pull, remote -> SSD + DRAM
    [nodes.a.loader]
    fixed_seconds = 0.008         # skeleton build + weight assignment per load
    seconds_per_tensor = 0.000018 # the load paths' part that grows with the tensor count, and
    probe_tensors = 77            #   the count of the model they were timed on (optional, see below)
    tokenizer_seconds = 0.13      # parsing a model's tokenizer, at a node's first load of it (optional)
    pipelined = true              # the tier cache pipelines a pull by chunk
    [nodes.a.engine]              # for --simulate (optional; defaults otherwise)
    prefill_a_seconds_per_token = 0.0001
    prefill_b_seconds = 0.02
    decode_seconds_per_token = 0.02

``load_fixed_seconds`` and ``load_gbps`` (any tier; written by ``load-bench --tiers``, which
times a cold start from each tier the way ``sllm serve`` does it: :mod:`sllm.core.loadpath`)
replace that tier's stage model and the loader's fixed cost in the estimate: a load from the
tier takes ``load_fixed_seconds + bytes / load_gbps`` (no ``load_gbps``: the fixed part only,
as a DRAM hit on the CPU). Profiles without them are read as before. ``loader.seconds_per_tensor``
and ``loader.probe_tensors`` (``load-bench --tiers`` writes them too) correct those fixed parts
for a model with another tensor count: ``+ seconds_per_tensor * (tensors - probe_tensors)``
(building the skeleton and its views costs per tensor; a DRAM hit on the CPU is nothing else).
The model's tensor count comes from any node that has its tensor index (a local or SSD copy:
``model_tensors`` in its ``/status``); where none has, the probe's count is assumed (no correction).
``loader.tokenizer_seconds`` (``load-bench --tiers`` writes it) is what the node pays to parse a
model's tokenizer when it holds none of that model's (its ``/status`` lists those it holds),
beside the read of a copy it holds and after a remote pull; 0 (the default): not counted.

It does not estimate or decide: :mod:`sllm.core.estimator` and :mod:`sllm.core.scheduler` do.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sllm.core.node_state import (  # noqa: F401 - re-exported: the live half of the inventory
    RESOURCE_OF,
    STATUS_TIMEOUT_SECONDS,
    LoaderJob,
    NodeState,
    PrefillFit,
    ResidentModel,
    RunningRequest,
    gather_states,
    parse_status,
)
from sllm.errors import InventoryError
from sllm.io.atomic import atomic_write_bytes

#: Tiers a node may list, fastest first ("remote" is the node's view of the shared store).
NODE_TIERS = ("dram", "ssd", "remote")


@dataclass(frozen=True)
class TierSpec:
    """One tier of one node.

    Attributes:
        tier: "dram", "ssd" or "remote".
        gbps: bandwidth the loader gets from it, GB/s (1e9 B/s): SSD cold read, DRAM to
            device, remote pull (as ``load-bench --tiers`` measures each).
        capacity_bytes: bytes the tier may hold; None: unbounded or unknown.
        write_gbps: for "ssd", the write bandwidth when measured separately (then a remote
            pull is modelled as two pipelined stages, download and write); None otherwise.
        load_fixed_seconds: the fixed cost of a cold start from this tier on the node's real
            load path (``load-bench --tiers``, :mod:`sllm.core.loadpath`), seconds; None
            (older profiles): the stage model (``gbps`` per stage + the loader's fixed cost).
        load_gbps: that path's bandwidth, GB/s; None with ``load_fixed_seconds`` set: no
            bytes move (a DRAM hit on the CPU).
    """

    tier: str
    gbps: float
    capacity_bytes: int | None = None
    write_gbps: float | None = None
    load_fixed_seconds: float | None = None
    load_gbps: float | None = None


@dataclass(frozen=True)
class NodeSpec:
    """A node of the inventory.

    Attributes:
        name: unique name.
        url: its ``sllm serve`` base URL.
        api_key_env: the environment variable holding its API key (None: no key).
        admin_key_env: the one holding its ``--admin-key`` (the cache routes ``--apply``
            uses); None: the API key.
        device_kind: "cuda" or "cpu" (on the CPU a DRAM entry is the model's memory: no copy).
        device_count: devices (GPUs) on the node.
        device_memory_bytes: memory per device, bytes (the host's memory for "cpu").
        max_memory_bytes: the node's resident-weights budget (``--max-memory``); None: the
            devices' memory. A node's ``/status`` overrides it.
        tiers: tier name -> :class:`TierSpec`.
        loader_fixed_seconds: the loader's fixed cost per load, seconds.
        load_seconds_per_tensor: the load paths' fixed parts' cost per tensor, seconds (None:
            not measured); they were measured on a model of ``load_probe_tensors`` tensors.
        load_probe_tensors: that model's tensor count.
        tokenizer_seconds: seconds to parse a model's tokenizer, paid at a load when the node
            holds no tokenizer of that model (module docstring); 0: not counted.
        pipelined: True when the node's tier cache pipelines a pull by chunk (remote -> SSD ->
            DRAM at once); False: each stage waits for the previous one.
        chunk_bytes: the pipeline's grain, bytes (its fill cost is one chunk through the stages).
        prefill: the node's prefill fit ``a * tokens + b`` (``[nodes.X.engine]``), for
            simulation; None: the node's live ``/status`` fit, else the defaults.
        decode_seconds_per_token: seconds per generated token (simulation); None: default.
    """

    name: str
    url: str
    api_key_env: str | None = None
    admin_key_env: str | None = None
    device_kind: str = "cpu"
    device_count: int = 1
    device_memory_bytes: int | None = None
    max_memory_bytes: int | None = None
    tiers: Mapping[str, TierSpec] = field(default_factory=dict)
    loader_fixed_seconds: float = 0.0
    load_seconds_per_tensor: float | None = None
    load_probe_tensors: int | None = None
    tokenizer_seconds: float = 0.0
    pipelined: bool = True
    chunk_bytes: int = 16 * 1024 * 1024
    prefill: PrefillFit | None = None
    decode_seconds_per_token: float | None = None

    @property
    def memory_budget_bytes(self) -> int | None:
        """The budget for resident weights: ``max_memory_bytes``, else all devices' memory."""
        if self.max_memory_bytes is not None:
            return self.max_memory_bytes
        if self.device_memory_bytes is not None:
            return self.device_memory_bytes * self.device_count
        return None

    def api_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The API key from ``api_key_env`` (None when unset)."""
        return environ.get(self.api_key_env) if self.api_key_env else None

    def admin_key(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The admin key from ``admin_key_env``; without one, :meth:`api_key`."""
        return environ.get(self.admin_key_env) if self.admin_key_env else self.api_key(environ)


@dataclass(frozen=True)
class Inventory:
    """The cluster: nodes by name (sorted), the remote store, known model sizes.

    Attributes:
        nodes: name -> :class:`NodeSpec`.
        remote_url: the shared store (directory, http(s)://, s3://); None: none.
        remote_gbps: default remote pull bandwidth, GB/s, for nodes that measured none.
        model_bytes: model name -> checkpoint bytes, for models no node reports.
        model_tensors: model name -> its checkpoint's tensor count, for models no node reports
            (the per-tensor part of a load's fixed cost).
        source: where it was read from (for messages).
    """

    nodes: Mapping[str, NodeSpec]
    remote_url: str | None = None
    remote_gbps: float | None = None
    model_bytes: Mapping[str, int] = field(default_factory=dict)
    source: str = "<memory>"
    model_tensors: Mapping[str, int] = field(default_factory=dict)


class InventorySource(Protocol):
    """Where the inventory comes from: the TOML file first, a cluster manager later."""

    def load(self) -> Inventory:
        """The current inventory. Raises: InventoryError."""
        ...


# ---------------------------------------------------------------------------------------
# Parsing (TOML document -> Inventory), validation with the file and key in each message
# ---------------------------------------------------------------------------------------


def _num(where: str, key: str, value: Any, *, kind: type = float, minimum: float = 0.0, positive: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or value < minimum or (positive and value <= 0):
        need = "a positive" if positive else f"a {'whole ' if kind is int else ''}number >= {minimum:g}"
        raise InventoryError(f"{where}: {key} = {value!r}: must be {need}")
    return kind(value)


def _table(where: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InventoryError(f"{where}: {key} must be a table")
    return value


def parse_node(name: str, data: Mapping[str, Any], *, where: str) -> NodeSpec:
    """One ``[nodes.NAME]`` table (or a profile's ``[node]`` table) as a :class:`NodeSpec`.

    Raises:
        InventoryError: a missing URL, a non-numeric or negative bandwidth or capacity, an
            unknown tier or device kind; the message names ``where`` and the key.
    """
    w = f"{where}: nodes.{name}"
    url = data.get("url") or data.get("address")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InventoryError(f"{w}: url = {url!r}: must be the node's http(s):// address")
    device = _table(w, "device", data.get("device", {}))
    host = data.get("host", {}) if isinstance(data.get("host"), dict) else {}
    kind = device.get("kind", "cuda" if host.get("gpus") else "cpu")
    if kind not in ("cpu", "cuda"):
        raise InventoryError(f"{w}: device.kind = {kind!r}: must be \"cpu\" or \"cuda\"")
    memory = device.get("memory_bytes", host.get("memory_bytes") if kind == "cpu" else None)
    tiers = {}
    for tier, entry in _table(w, "tiers", data.get("tiers", {})).items():
        if tier not in NODE_TIERS:
            raise InventoryError(f"{w}: tiers.{tier}: unknown tier (choose {', '.join(NODE_TIERS)})")
        entry = _table(w, f"tiers.{tier}", entry)
        cap = entry.get("capacity_bytes")
        wg, lf, lg = entry.get("write_gbps"), entry.get("load_fixed_seconds"), entry.get("load_gbps")
        tiers[tier] = TierSpec(
            tier,
            _num(w, f"tiers.{tier}.gbps", entry.get("gbps"), positive=True),
            None if cap is None else _num(w, f"tiers.{tier}.capacity_bytes", cap, kind=int),
            None if wg is None else _num(w, f"tiers.{tier}.write_gbps", wg, positive=True),
            None if lf is None else _num(w, f"tiers.{tier}.load_fixed_seconds", lf),
            None if lg is None else _num(w, f"tiers.{tier}.load_gbps", lg, positive=True),
        )
    loader = _table(w, "loader", data.get("loader", {}))
    key_env, admin_env = data.get("api_key_env"), data.get("admin_key_env")
    for k, v in (("api_key_env", key_env), ("admin_key_env", admin_env)):
        if v is not None and not (isinstance(v, str) and v):
            raise InventoryError(f"{w}: {k} = {v!r}: must name an environment variable")
    pipelined = loader.get("pipelined", True)
    if not isinstance(pipelined, bool):
        raise InventoryError(f"{w}: loader.pipelined = {pipelined!r}: must be true or false")
    mm = data.get("max_memory_bytes")
    engine = _table(w, "engine", data.get("engine", {}))
    fit = None
    if "prefill_a_seconds_per_token" in engine or "prefill_b_seconds" in engine:
        fit = PrefillFit(_num(w, "engine.prefill_a_seconds_per_token", engine.get("prefill_a_seconds_per_token", 0.0)),
                         _num(w, "engine.prefill_b_seconds", engine.get("prefill_b_seconds", 0.0)), 0)
    decode = engine.get("decode_seconds_per_token")
    spt = loader.get("seconds_per_tensor")
    return NodeSpec(
        name=name,
        url=url.rstrip("/"),
        api_key_env=key_env,
        admin_key_env=admin_env,
        device_kind=kind,
        device_count=_num(w, "device.count", device.get("count", 1), kind=int, minimum=1),
        device_memory_bytes=None if memory is None else _num(w, "device.memory_bytes", memory, kind=int),
        max_memory_bytes=None if mm is None else _num(w, "max_memory_bytes", mm, kind=int),
        tiers=dict(sorted(tiers.items(), key=lambda kv: NODE_TIERS.index(kv[0]))),
        loader_fixed_seconds=_num(w, "loader.fixed_seconds", loader.get("fixed_seconds", 0.0)),
        load_seconds_per_tensor=None if spt is None else _num(w, "loader.seconds_per_tensor", spt),
        load_probe_tensors=None if spt is None else _num(w, "loader.probe_tensors", loader.get("probe_tensors"),
                                                         kind=int, minimum=1),
        tokenizer_seconds=_num(w, "loader.tokenizer_seconds", loader.get("tokenizer_seconds", 0.0)),
        pipelined=pipelined,
        chunk_bytes=_num(w, "loader.chunk_bytes", loader.get("chunk_bytes", 16 * 1024 * 1024), kind=int, minimum=1),
        prefill=fit,
        decode_seconds_per_token=None if decode is None else _num(w, "engine.decode_seconds_per_token", decode),
    )


def parse_inventory(doc: Mapping[str, Any], *, where: str = "<inventory>") -> Inventory:
    """A parsed TOML document (module docstring) as an :class:`Inventory`.

    Raises:
        InventoryError: unknown top-level keys, bad node entries, a bad remote or model size.
    """
    unknown = set(doc) - {"remote", "models", "nodes"}
    if unknown:
        raise InventoryError(f"{where}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                             "(expected [remote], [models.NAME], [nodes.NAME])")
    remote = _table(where, "remote", doc.get("remote", {}))
    url = remote.get("url")
    if url is not None and not (isinstance(url, str) and url):
        raise InventoryError(f"{where}: remote.url = {url!r}: must be a directory or URL")
    gbps = remote.get("gbps")
    models, tensors = {}, {}
    for name, entry in _table(where, "models", doc.get("models", {})).items():
        entry = _table(where, f"models.{name}", entry)
        models[name] = _num(f"{where}: models.{name}", "nbytes", entry.get("nbytes"), kind=int, positive=True)
        if entry.get("tensors") is not None:
            tensors[name] = _num(f"{where}: models.{name}", "tensors", entry["tensors"], kind=int, positive=True)
    nodes = {name: parse_node(name, _table(where, f"nodes.{name}", entry), where=where)
             for name, entry in sorted(_table(where, "nodes", doc.get("nodes", {})).items())}
    return Inventory(nodes, url, None if gbps is None else _num(where, "remote.gbps", gbps, positive=True),
                     models, where, tensors)


def node_entry(spec: NodeSpec) -> dict[str, Any]:
    """A :class:`NodeSpec` as its ``[nodes.NAME]`` TOML table (inverse of :func:`parse_node`)."""
    out: dict[str, Any] = {"url": spec.url}
    if spec.api_key_env:
        out["api_key_env"] = spec.api_key_env
    if spec.admin_key_env:
        out["admin_key_env"] = spec.admin_key_env
    if spec.max_memory_bytes is not None:
        out["max_memory_bytes"] = spec.max_memory_bytes
    device: dict[str, Any] = {"kind": spec.device_kind, "count": spec.device_count}
    if spec.device_memory_bytes is not None:
        device["memory_bytes"] = spec.device_memory_bytes
    out["device"] = device
    out["tiers"] = {}
    for t in spec.tiers.values():
        e: dict[str, Any] = {"gbps": t.gbps}
        if t.capacity_bytes is not None:
            e["capacity_bytes"] = t.capacity_bytes
        for k in ("write_gbps", "load_fixed_seconds", "load_gbps"):
            if getattr(t, k) is not None:
                e[k] = getattr(t, k)
        out["tiers"][t.tier] = e
    out["loader"] = {"fixed_seconds": spec.loader_fixed_seconds, "pipelined": spec.pipelined,
                     "chunk_bytes": spec.chunk_bytes}
    if spec.load_seconds_per_tensor is not None:
        out["loader"].update(seconds_per_tensor=spec.load_seconds_per_tensor, probe_tensors=spec.load_probe_tensors)
    if spec.tokenizer_seconds:
        out["loader"]["tokenizer_seconds"] = spec.tokenizer_seconds
    engine: dict[str, float] = {}
    if spec.prefill is not None:
        engine.update(prefill_a_seconds_per_token=spec.prefill.a_seconds_per_token,
                      prefill_b_seconds=spec.prefill.b_seconds)
    if spec.decode_seconds_per_token is not None:
        engine["decode_seconds_per_token"] = spec.decode_seconds_per_token
    if engine:
        out["engine"] = engine
    return out


def inventory_document(inv: Inventory) -> dict[str, Any]:
    """An :class:`Inventory` as a TOML document (inverse of :func:`parse_inventory`)."""
    doc: dict[str, Any] = {}
    remote = {k: v for k, v in (("url", inv.remote_url), ("gbps", inv.remote_gbps)) if v is not None}
    if remote:
        doc["remote"] = remote
    if inv.model_bytes:
        doc["models"] = {m: {"nbytes": n, **({"tensors": inv.model_tensors[m]} if m in inv.model_tensors else {})}
                         for m, n in sorted(inv.model_bytes.items())}
    doc["nodes"] = {name: node_entry(spec) for name, spec in sorted(inv.nodes.items())}
    return doc


class TomlInventory:
    """The inventory kept in a TOML file (the first :class:`InventorySource` backend).

    Args:
        path: the file. It need not exist until :meth:`load` (then it must).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> Inventory:
        """Parse the file.

        Raises:
            InventoryError: missing, unreadable, not TOML, or invalid (the message names the file).
        """
        try:
            with open(self.path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise InventoryError(f"{self.path}: no such inventory file",
                                 hint="create one with `sllm inventory add PROFILE.toml --url URL`") from None
        except OSError as exc:
            raise InventoryError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InventoryError(f"{self.path}: not valid TOML: {exc}") from exc
        return parse_inventory(doc, where=str(self.path))

    def save(self, inv: Inventory) -> None:
        """Write ``inv`` to the file atomically (temporary name, fsync, rename)."""
        import tomli_w

        atomic_write_bytes(self.path, tomli_w.dumps(inventory_document(inv)).encode())

    def add_profile(
        self,
        profile: Mapping[str, Any],
        *,
        url: str | None = None,
        name: str | None = None,
        api_key_env: str | None = None,
        admin_key_env: str | None = None,
        max_memory_bytes: int | None = None,
        where: str = "<profile>",
    ) -> NodeSpec:
        """Merge a node profile (``load-bench --tiers``'s TOML, parsed) in as a node, replacing
        a node of the same name; creates the file when missing. Returns the node.

        Raises:
            InventoryError: the profile has no ``[node]`` table or a bad entry; the inventory is bad.
        """
        node = profile.get("node")
        if not isinstance(node, dict):
            raise InventoryError(f"{where}: not a node profile (no [node] table); write one with "
                                 "`sllm load-bench MODEL --tiers`")
        entry = dict(node)
        if url:
            entry["url"] = url
        if api_key_env:
            entry["api_key_env"] = api_key_env
        if admin_key_env:
            entry["admin_key_env"] = admin_key_env
        if max_memory_bytes is not None:
            entry["max_memory_bytes"] = max_memory_bytes
        node_name = name or node.get("name")
        if not isinstance(node_name, str) or not node_name:
            raise InventoryError(f"{where}: node.name missing; pass --name")
        spec = parse_node(node_name, entry, where=where)
        inv = self.load() if self.path.exists() else Inventory({}, source=str(self.path))
        self.save(replace(inv, nodes={**inv.nodes, spec.name: spec}))
        return spec
