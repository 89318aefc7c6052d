"""The ``--model-loader-extra-config`` JSON of ``--load-format sllm``, checked.

It imports neither vLLM nor torch; a bad option is a :class:`sllm.errors.UsageError` of one
line naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from sllm.errors import UsageError


@dataclass(frozen=True)
class LoaderOptions:
    """What ``--model-loader-extra-config`` may set (every key optional).

    Attributes:
        cache_dir: an sllm SSD-tier directory (``sllm cache``'s). With it the weights come
            from that tier's entry ``model`` and are pulled from ``remote`` into it first
            when missing (sllm's :class:`~sllm.core.cache.TierCache`: pipelined download,
            chunk checksums). Without it they are read from vLLM's ``--model`` directory.
        remote: where a missing model is pulled from (a directory, ``http(s)://`` or
            ``s3://``; default ``$SLLM_REMOTE``). Only with ``cache_dir``.
        model: the model's name in the cache (default: the last component of ``--model``).
        threads: reader threads per partition (default 4).
        direct_io: force O_DIRECT on or off (default: where the filesystem allows it).
        verify: check every chunk's SHA-256 against the manifest while reading.
        layout: load through vLLM's parameter layout where it is exact (default true;
            :mod:`sllm.integrations.vllm.layout`): the first load of a model writes its
            parameters as vLLM holds them, later loads make them views of the read buffer.
        layout_dir: where layouts are kept (default
            :func:`~sllm.integrations.vllm.layout.default_layout_dir`).
    """

    cache_dir: str | None = None
    remote: str | None = None
    model: str | None = None
    threads: int | None = None
    direct_io: bool | None = None
    verify: bool = False
    layout: bool = True
    layout_dir: str | None = None

    @classmethod
    def parse(cls, extra: Any) -> LoaderOptions:
        """Options from vLLM's ``model_loader_extra_config`` (a dict, or None/empty).

        Raises:
            UsageError: not an object, an unknown key, or a value of the wrong type.
        """
        if not extra:
            extra = {}
        if not isinstance(extra, dict):
            raise UsageError(f"--model-loader-extra-config for --load-format sllm must be a JSON object, not {extra!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise UsageError(
                f"--model-loader-extra-config: unknown key(s) {unknown} for --load-format sllm "
                f"(known: {', '.join(known)})"
            )
        kinds = {"cache_dir": str, "remote": str, "model": str, "threads": int, "direct_io": bool, "verify": bool,
                 "layout": bool, "layout_dir": str}
        for key, value in extra.items():
            ok = value is None or (isinstance(value, kinds[key]) and not (kinds[key] is int and isinstance(value, bool)))
            bad_int = key == "threads" and value is not None and value < 1
            if not ok or bad_int or (key in ("verify", "layout") and value is None):
                raise UsageError(f"--model-loader-extra-config: {key!r} must be a {kinds[key].__name__}, not {value!r}")
        opts = cls(**extra)
        if opts.remote and not opts.cache_dir:
            raise UsageError("--model-loader-extra-config: 'remote' needs 'cache_dir' (the SSD tier it pulls into)")
        return opts

    def remote_url(self) -> str | None:
        """``remote``, else ``$SLLM_REMOTE``, else None."""
        return self.remote or os.environ.get("SLLM_REMOTE") or None
