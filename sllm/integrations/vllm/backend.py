"""``sllm serve --backend vllm``: a vLLM engine behind the node server's engine interface.

The node server (``sllm/server/``) loads a model with its *loader* (``loader(path, config,
pool) -> model``), makes an *engine* for it, submits token lists and gets tokens back
through a listener, and *releases* the model on unload. :func:`load` builds a vLLM
``LLMEngine`` in this process (no engine subprocess) on the converted checkpoint with
``--load-format sllm`` (its weights through sllm's loader and the node's host memory pool)
and returns a :class:`VllmModel`; its :meth:`VllmModel.sllm_engine` is a :class:`VllmEngine`
offering what the server uses of :class:`sllm.core.engine.Engine`: ``submit(tokens, params,
request_id=, listener=)`` returning a generation (``cancel()``, ``finish_reason``, ``error``,
``tokens``), ``active()``, ``close()`` and ``max_context``.

A thread steps the vLLM engine (continuous batching, paged KV cache: vLLM's). What it does
not do: resume a generation from its token list with the same random draws (sllm's
seeded-sampling-exact migration; vLLM's seeds are its own), per-request ``prompt_len``
resumption, or per-block KV use in ``/status`` (its KV cache's size does count in the budget).
It imports vLLM when :func:`load` runs.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.errors import UsageError

#: What vLLM's CPU build needs on a node (set only where the environment does not say).
ENV_DEFAULTS = dict(
    VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
    VLLM_ENABLE_V1_MULTIPROCESSING="0",
)
_ids = itertools.count(1)
Listener = Callable[["VllmGeneration", "int | None"], None]


@dataclass(frozen=True)
class RequestState:
    """One active request, as ``/status`` shows it."""

    id: str
    prompt_tokens: int
    completion_tokens: int


class VllmGeneration:
    """One request running in vLLM: the fields the server reads of sllm's ``Generation``.

    Attributes:
        id: the request id.
        tokens: prompt + generated token ids so far (the engine thread appends).
        prompt_len: how many of ``tokens`` are the prompt.
        params: sllm's sampling parameters.
        finish_reason: None while running, else "stop", "length", "cancelled" or "error".
        error: the exception when ``finish_reason == "error"``.
    """

    def __init__(self, request_id: str, tokens: list[int], params: Any, listener: Listener | None) -> None:
        self.id = request_id
        self.tokens = tokens
        self.prompt_len = len(tokens)
        self.params = params
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._listener = listener
        self._queue: queue.SimpleQueue[int | None] | None = queue.SimpleQueue() if listener is None else None
        self._cancel = threading.Event()
        self._done = threading.Event()

    @property
    def generated(self) -> list[int]:
        """The generated token ids."""
        return self.tokens[self.prompt_len :]

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to abort this request (finish reason "cancelled")."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (True) or ``timeout`` seconds pass (False)."""
        return self._done.wait(timeout)

    def state(self) -> RequestState:
        return RequestState(self.id, self.prompt_len, len(self.tokens) - self.prompt_len)

    def _emit(self, token: int | None) -> None:
        if self._listener is not None:
            try:
                self._listener(self, token)
            except Exception:  # a listener that cannot take tokens (its loop closed): stop
                self._cancel.set()
        else:
            assert self._queue is not None
            self._queue.put(token)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._emit(None)

    def __iter__(self) -> Iterator[int]:
        if self._queue is None:
            raise TypeError("a generation with a listener is not iterable")
        while (token := self._queue.get()) is not None:
            yield token
        if self.error is not None:
            raise self.error


class VllmEngine:
    """Requests of one model in one vLLM ``LLMEngine``, stepped by a thread of its own.

    Args:
        llm_engine: a ``vllm.v1.engine.llm_engine.LLMEngine``.
        name: a label for the thread.
        max_context: the longest token list (vLLM's ``max_model_len``).
    """

    def __init__(self, llm_engine: Any, *, name: str, max_context: int) -> None:
        self.llm_engine = llm_engine
        self.name = name
        self.max_context = max_context
        self._active: dict[str, tuple[VllmGeneration, str]] = {}  # our id -> (generation, vLLM's id)
        self._new: list[VllmGeneration] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"sllm-vllm-{name}", daemon=True)
        self._thread.start()

    def submit(self, tokens: Sequence[int], params: Any, *, request_id: str | None = None,
               listener: Listener | None = None, prompt_len: int | None = None) -> VllmGeneration:
        """Start a generation from prompt ``tokens`` with sllm's ``SamplingParams``.

        Raises:
            UsageError: empty ``tokens``, a token list that fills the context, bad params,
                resumption (``prompt_len`` other than the whole list), or a closed engine.
        """
        params.check()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise UsageError("0 tokens: need a prompt")
        if prompt_len is not None and prompt_len != len(tokens):
            raise UsageError("the vLLM backend cannot resume a generation from its token list")
        if len(tokens) >= self.max_context:
            raise UsageError(f"{len(tokens)} tokens: the model's context is {self.max_context} tokens")
        gen = VllmGeneration(request_id or f"vllm-{next(_ids)}", tokens, params, listener)
        with self._cond:
            if self._closed:
                raise UsageError(f"engine {self.name!r} is closed")
            self._new.append(gen)
            self._cond.notify()
        return gen

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of vLLM's KV cache blocks (what the node's memory budget counts beside the weights)."""
        cache = self.llm_engine.vllm_config.cache_config
        return int(cache.num_gpu_blocks or 0) * self._bytes_per_block()

    def _bytes_per_block(self) -> int:
        mc = self.llm_engine.model_config
        cache = self.llm_engine.vllm_config.cache_config
        layers = mc.get_num_layers(self.llm_engine.vllm_config.parallel_config)
        heads = mc.get_num_kv_heads(self.llm_engine.vllm_config.parallel_config)
        itemsize = mc.dtype.itemsize if hasattr(mc.dtype, "itemsize") else 4
        return 2 * layers * heads * mc.get_head_size() * int(cache.block_size) * itemsize

    def kv_stats(self) -> Any:
        """``/status``'s KV figures: vLLM's block count and size; vLLM does not expose per-block
        use here, so used_blocks counts nothing and running/waiting are this engine's requests."""
        from sllm.core.engine.kv import KVStats

        cache = self.llm_engine.vllm_config.cache_config
        per, total = self._bytes_per_block(), int(cache.num_gpu_blocks or 0)
        with self._cond:
            running, waiting = len(self._active), len(self._new)
        return KVStats(block_size=int(cache.block_size), total_blocks=total, used_blocks=0, bytes_per_block=per,
                       total_bytes=total * per, used_bytes=0, free_bytes=total * per, running=running,
                       waiting=waiting, preemptions=0)

    def active(self) -> list[RequestState]:
        """Snapshots of the unfinished requests."""
        with self._cond:
            return [g.state() for g in self._new] + [g.state() for g, _ in self._active.values()]

    def close(self) -> None:
        """Stop the thread; unfinished requests end "cancelled". Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        for gen, _ in list(self._active.values()):
            gen._finish("cancelled")
        for gen in self._new:
            gen._finish("cancelled")
        self._active.clear()
        self._new = []

    def _vllm_params(self, params: Any) -> Any:
        from vllm import SamplingParams

        greedy = params.temperature == 0
        return SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
            seed=None if greedy else params.seed, stop_token_ids=list(params.stop_token_ids), ignore_eos=True,
            skip_special_tokens=False, detokenize=False,
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._new and not self._active and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                new, self._new = self._new, []
            for gen in new:
                try:
                    vid = self.llm_engine.add_request(gen.id, {"prompt_token_ids": gen.tokens},
                                                      self._vllm_params(gen.params))
                except Exception as exc:  # noqa: BLE001 - ends only this request
                    gen._finish("error", exc)
                    continue
                self._active[gen.id] = (gen, vid)
            cancelled = [k for k, (g, _) in self._active.items() if g._cancel.is_set()]
            if cancelled:
                self.llm_engine.abort_request([self._active[k][1] for k in cancelled])
                for k in cancelled:
                    self._active.pop(k)[0]._finish("cancelled")
            if not self._active:
                continue
            try:
                outputs = self.llm_engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step ends the requests in it
                for gen, _ in self._active.values():
                    gen._finish("error", exc)
                self._active.clear()
                continue
            # vLLM's outputs carry the id we gave or the internal one add_request returned.
            by_id = {k: gen for gen, vid in self._active.values() for k in (gen.id, vid)}
            for out in outputs:
                gen = by_id.get(out.request_id)
                if gen is None:
                    continue
                done = out.outputs[0]
                stop = set(gen.params.stop_token_ids)
                ended_by_stop = False
                for token in list(done.token_ids)[len(gen.tokens) - gen.prompt_len:]:
                    if token in stop:  # like sllm's engine: the stop token is not appended
                        ended_by_stop = True
                        break
                    gen.tokens.append(int(token))
                    gen._emit(int(token))
                if out.finished or ended_by_stop:
                    self._active.pop(gen.id, None)
                    reason = "stop" if ended_by_stop or done.finish_reason == "stop" else \
                        "length" if done.finish_reason == "length" else "cancelled"
                    gen._finish(reason)


class VllmModel:
    """One model loaded into a vLLM engine in this process (what :func:`load` returns).

    Attributes:
        config: the model's transformers config (the server reads ``vocab_size``).
        generation_config: its generation config, or None.
        llm_engine: the vLLM ``LLMEngine``.
        sllm_report: the sllm load's :class:`~sllm.core.loader.LoadReport`.
    """

    def __init__(self, path: Path, llm_engine: Any, max_context: int) -> None:
        from transformers import AutoConfig, GenerationConfig

        self.path = path
        self.config = AutoConfig.from_pretrained(path)
        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            self.generation_config = None
        self.llm_engine = llm_engine
        self.max_context = max_context
        from sllm.integrations.vllm.loader import SllmModelLoader

        self.sllm_report = SllmModelLoader.last_report
        self._engine: VllmEngine | None = None

    def sllm_engine(self, name: str) -> VllmEngine:
        """The engine the server submits to (made once)."""
        if self._engine is None:
            self._engine = VllmEngine(self.llm_engine, name=name, max_context=self.max_context)
        return self._engine

    def close(self) -> None:
        """Stop the engine and drop vLLM's engine (its weights and KV cache go with it)."""
        if self._engine is not None:
            self._engine.close()
        self.llm_engine = None
        import gc

        gc.collect()


def load(path: Path, config: Any, pool: Any) -> VllmModel:
    """The node server's loader for ``--backend vllm``: a vLLM engine on ``path``.

    Args:
        path: a converted checkpoint directory (config, tokenizer and partitions).
        config: the server's ``ServeConfig`` (``device``, ``loader_threads``, ``direct_io``).
        pool: the node's host memory pool (the partition buffers are leased from it, so a
            reload soon after an unload reads nothing: the DRAM tier).

    Raises:
        CheckpointError and other SllmError subclasses from the load; vLLM's own errors
        (an architecture it does not support, too little memory) as they are.
    """
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if str(config.device) == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    from sllm.core.format import open_checkpoint
    from sllm.integrations.vllm import register
    from sllm.integrations.vllm.loader import SllmModelLoader

    register()
    SllmModelLoader.pool = pool
    extra = {k: v for k, v in (("threads", config.loader_threads), ("direct_io", config.direct_io)) if v is not None}
    # The checkpoint's dtype, as sllm's engine runs it ("auto" lets vLLM's CPU build pick bfloat16 for float32).
    stored = open_checkpoint(path).manifest.dtype
    dtype = stored if stored in ("float32", "float16", "bfloat16") else "auto"
    args = EngineArgs(model=str(path), load_format="sllm", model_loader_extra_config=extra, enforce_eager=True,
                      dtype=dtype, seed=0, disable_log_stats=True)
    llm_engine = LLMEngine.from_engine_args(args)
    return VllmModel(Path(path), llm_engine, int(llm_engine.model_config.max_model_len))


def release(model: Any) -> None:
    """The node server's release for ``--backend vllm``."""
    model.close()
