"""One completion request's life on a node, in the order it happens (DESIGN.md "One
request's life"):

1. **admit**: the limits (:class:`~sllm.server.state.RequestLimits`) before any work: prompt
   size, message count, stop strings (the body size and the keys are checked earlier, by
   :mod:`sllm.server.gate`); and no new work while the node drains.
1b. **route**, on a front door (``sllm serve --inventory``): a request that was not forwarded
   already goes to the node the scheduler places it on, and its answer is relayed back
   (:mod:`sllm.server.frontdoor`); otherwise, or when that node is unreachable, it goes on here.
2. **lease** the model: :meth:`ModelManager.acquire` (a cold model loads here; unknown
   names are a 404, a failed load or pull a 503, a drain a 503).
3. **tokenize**, in the node's text threads (never on the event loop): the prompt or the
   chat template, the context check, the sampling parameters.
4. **generate**: submit to the model's engine; tokens come back from the engine thread.
5. **stream** the text (SSE chunks, or one JSON body); a client that goes away, streaming or
   not, cancels its generation.
6. **release** the lease when the engine ends the generation, whichever way it ends.

:class:`Requests` is the node's request service (the text threads, the requests in flight,
the drain on shutdown); :class:`Completion` is one request. Routes (``app.py``) only call
:meth:`Requests.complete`. The tokenizer comes with the model, so tokenizing follows the
lease: a prompt that is too long for the context is refused after a cold load, not before.

It knows nothing of loading (``models.py``) or of text details (``text.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sllm.core.engine import SamplingParams
from sllm.errors import CacheError, ServerError, UsageError
from sllm.server import schemas
from sllm.server.frontdoor import ESTIMATE_HEADER, FORWARDED_HEADER, SERVED_BY_HEADER, FrontDoor
from sllm.server.gate import LOAD_HEADER
from sllm.server.models import Lease, ModelLoadFailed, ModelManager
from sllm.server.state import RequestLimits, ShuttingDown
from sllm.server.text import TextStream, chat_ids, encode

log = logging.getLogger("sllm.server")

#: After the drain deadline, how long ended streams get to send their last event, seconds.
END_GRACE_SECONDS = 5.0


class Requests:
    """The node's completion requests (see the module docstring).

    Args:
        manager: the node's model manager.
        limits: what one request may ask.
    """

    def __init__(self, manager: ModelManager, limits: RequestLimits, *, front_door: FrontDoor | None = None) -> None:
        self.manager = manager
        self.limits = limits
        self.front_door = front_door
        self.inflight: set[Completion] = set()
        self._text_threads = ThreadPoolExecutor(2, thread_name_prefix="sllm-text")

    async def complete(self, body: Any, request: Request, *, chat: bool) -> Any:
        """Serve one ``/v1/completions`` or ``/v1/chat/completions`` request, steps 1-6.

        Raises:
            UsageError (400), ModelNotFound (404): for the app's error handlers.
        """
        admit(body, chat, self.limits)
        routed, extra = await self._route(body, request)
        if routed is not None:
            return routed
        t0 = time.monotonic()
        try:
            lease = await self.manager.acquire(body.model)
        except (ModelLoadFailed, ShuttingDown) as exc:
            return unavailable(exc, time.monotonic() - t0)
        run = Completion(self, lease, body, chat)
        try:
            await run.start()
        except BaseException:
            self.manager.release(lease)
            raise
        headers = {LOAD_HEADER: f"{lease.load_seconds:.6f}", **extra}
        if body.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers=headers)
        return await run.respond(request, headers)

    async def _route(self, body: Any, request: Request) -> tuple[StreamingResponse | None, dict[str, str]]:
        """Step 1b on a front door: (the relayed answer of the node the scheduler places the
        request on, or None to serve it here; headers for the answer). A model resident here,
        a request forwarded already (never twice) or an unreachable node is served here."""
        if self.front_door is None:
            return None, {}
        extra = {SERVED_BY_HEADER: self.front_door.name}
        here = self.manager.entries.get(body.model)
        if here is not None and here.resident is not None:
            extra[ESTIMATE_HEADER] = "0.000000"  # resident here: nothing is sooner
            return None, extra
        if FORWARDED_HEADER in request.headers:
            return None, extra
        route = await self.front_door.route(body.model, await self.manager.status())
        extra[ESTIMATE_HEADER] = f"{route.estimate_seconds:.6f}"
        if route.url is None:
            return None, extra
        try:
            status, headers, stream = await self.front_door.forward(route, request.url.path, await request.body(),
                                                                    request.headers)
        except ServerError as exc:
            log.warning("%s; serving %s here", exc, body.model)
            return None, extra
        return StreamingResponse(stream, status_code=status, headers=headers), extra

    async def in_text_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._text_threads, fn, *args)

    async def drain(self, seconds: float) -> None:
        """Shut down gracefully: take no new work (requests waiting for a load get a 503),
        let generations in flight finish for up to ``seconds``, then end the rest with an
        error event ("the server is shutting down") and wait briefly for their streams."""
        self.manager.closing.set()
        deadline = time.monotonic() + seconds
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning("shutting down: ending %d generation(s) still running after %.0f s",
                        len(self.inflight), seconds)  # fmt: skip
            for run in list(self.inflight):
                run.end("the server is shutting down; retry on another node")
            deadline = time.monotonic() + END_GRACE_SECONDS
            while self.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    def close(self) -> None:
        self._text_threads.shutdown(wait=False, cancel_futures=True)


def admit(body: Any, chat: bool, limits: RequestLimits) -> None:
    """Step 1: refuse what is over a limit, before any work.

    Raises:
        UsageError: a limit, named, with the request's figure.
    """
    if chat:
        if len(body.messages) > limits.max_messages:
            raise UsageError(f"messages: {len(body.messages)} messages; at most {limits.max_messages}")
        chars = sum(len(m.text()) for m in body.messages)
    else:
        chars = len(body.prompt) if isinstance(body.prompt, str) else 0
        if isinstance(body.prompt, list) and len(body.prompt) > limits.max_prompt_chars:
            raise UsageError(f"prompt: {len(body.prompt)} token ids; at most {limits.max_prompt_chars}")
    if chars > limits.max_prompt_chars:
        raise UsageError(f"prompt: {chars} characters; at most {limits.max_prompt_chars}")
    stops = body.stop or []
    if len(stops) > limits.max_stop_sequences:
        raise UsageError(f"stop: {len(stops)} sequences; at most {limits.max_stop_sequences}")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise UsageError(f"stop: sequences of at most {limits.max_stop_chars} characters")


def unavailable(exc: ModelLoadFailed | ShuttingDown, waited: float) -> JSONResponse:
    """A 503 for a load that failed, a pull that failed, or a node that drains."""
    if isinstance(exc, ShuttingDown):
        code = "shutting_down"
    elif exc.phase == "pull":
        code = "model_pull_failed"
    else:
        code = "insufficient_memory" if isinstance(exc.__cause__, CacheError) else "model_load_failed"
    headers = {LOAD_HEADER: f"{waited:.6f}", "x-should-retry": "true" if code == "shutting_down" else "false"}
    body = schemas.error_body(str(exc), "server_error", param="model", code=code)
    return JSONResponse(body, status_code=503, headers=headers)


class Completion:
    """One request's generation: prompt ids in, text deltas out, usage at the end.

    :meth:`start` tokenizes (in a text thread) and submits to the model's engine; tokens come
    back from the engine thread through an asyncio queue. The lease is given back when the
    engine ends the generation, whether or not anyone still reads the stream.
    """

    def __init__(self, requests: Requests, lease: Lease, body: Any, chat: bool) -> None:
        self.requests, self.manager, self.lease, self.body = requests, requests.manager, lease, body
        self.chat, self.model = chat, body.model
        self.id = schemas.new_id("chatcmpl" if chat else "cmpl")
        self.created = schemas.now()
        self.include_usage = body.include_usage
        self.finish: str | None = None
        self.ended: str | None = None  # why the node ended it (shutdown), for the error event
        self.gone = False  # the client went away
        self.prompt_tokens = 0
        self.gen: Any = None  # what generates the tokens: the local engine's Generation, or after a
        # migration's handover a RemoteGeneration (migration_out.py)
        self.tokens: list[int] = []  # prompt + every token passed to the stream: positions decide
        self.params: SamplingParams | None = None  # with the seed resolved (what a resume continues)
        self.migrating: str | None = None  # the id of the migration moving it now
        self.handover_gap: float | None = None  # seconds between the last token here and the first relayed
        self._lease: Lease | None = lease
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._submitted = 0.0
        self._first_at: float | None = None
        self._last_at: float | None = None
        self._handed_at: float | None = None

    # -- 3. tokenize, 4. generate ---------------------------------------------------------

    async def start(self) -> None:
        """Tokenize and submit.

        Raises:
            UsageError: an empty or too long prompt, a token id outside the vocabulary, a
                chat template that refuses the messages.
        """
        res, body = self.lease.resident, self.body
        prompt = await self.requests.in_text_thread(_prompt_ids, res.tokenizer, res.model.config, body, self.chat)
        context = res.engine.max_context
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = schemas.DEFAULT_COMPLETION_MAX_TOKENS if not self.chat else (context or 0) - len(prompt)
        if context is not None and len(prompt) + max_tokens > context:
            raise UsageError(
                f"this model's context is {context} tokens; the request asks for {len(prompt) + max_tokens} "
                f"({len(prompt)} in the prompt, {max_tokens} to generate): shorten the prompt or lower max_tokens"
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_token_ids=_eos_ids(res.tokenizer, res.model),
        )
        self.text = TextStream(res.tokenizer, body.stop)
        self.prompt_tokens = len(prompt)
        self.tokens = list(prompt)
        self.requests.inflight.add(self)
        self._submitted = time.monotonic()
        try:
            self._submit_local(res.engine, params)
        except BaseException:
            self.requests.inflight.discard(self)
            raise
        self.params = self.gen.params

    def _submit_local(self, engine: Any, params: SamplingParams) -> None:
        """Submit ``self.tokens`` to this node's engine (a new request, or a resumed one)."""
        loop = asyncio.get_running_loop()

        def listener(gen: Any, token: int | None) -> None:  # engine thread
            pos = len(gen.tokens) - 1
            loop.call_soon_threadsafe(self.deliver, gen, pos, token)

        self.gen = engine.submit(self.tokens, params, prompt_len=self.prompt_tokens, request_id=self.id,
                                 listener=listener)

    def deliver(self, source: Any, pos: int | None, token: int | None) -> None:  # event loop
        """Take token ``token`` at position ``pos`` of the token list (None, None: the end)
        from ``source``. Only the current source is heard, and only at the next position:
        a token already passed on is dropped, so each token reaches the client once."""
        if source is not self.gen:
            return  # a source this request left (the local copy after a handover)
        now = time.monotonic()
        if token is not None:
            if pos != len(self.tokens):
                if pos is not None and pos < len(self.tokens):
                    return
                log.error("request %s: token at position %s, expected %d; ending it", self.id, pos, len(self.tokens))
                self.fail(f"a token was lost in a migration (position {pos}, expected {len(self.tokens)})")
                return
            self.tokens.append(token)
            if self._first_at is None:  # prefill done: a sample of the node's prefill fit
                self._first_at = now
                self.manager.timings.record_prefill(self.model, self.prompt_tokens, now - self._submitted)
            if self._handed_at is not None and self.handover_gap is None:
                self.handover_gap = now - (self._last_at or self._handed_at)
            self._last_at = now
        self._queue.put_nowait(token)
        if token is None:  # 6. release
            if self._first_at is not None and self._handed_at is None:
                self.manager.timings.record_completion(len(self.tokens) - self.prompt_tokens, now - self._first_at)
            self._release_lease()
            self.requests.inflight.discard(self)

    def _release_lease(self) -> None:
        if self._lease is not None:
            self.manager.release(self._lease)
            self._lease = None

    # -- live migration (migration_out.py drives these) -----------------------------------

    @property
    def migratable(self) -> bool:
        """Decoding on this node's engine and not being migrated already."""
        return (self.gen is not None and self._lease is not None and self._handed_at is None
                and self.migrating is None and not self.gen.done)

    @property
    def finished(self) -> bool:
        return self.gen is None or self.gen.done

    @property
    def engine(self) -> Any:
        """The local engine running it (None after the handover)."""
        return self._lease.resident.engine if self._lease is not None else None

    def hand_over(self, remote: Any) -> None:
        """The handover: ``remote`` generates from now on; the local copy is dropped (KV
        freed) and the lease given back. Tokens the local copy streamed and that are still
        queued keep their places: the remote's start at the next position."""
        local = self.gen
        for token in local.tokens[len(self.tokens):]:  # appended before the hold, their callbacks not run yet
            self.deliver(local, len(self.tokens), token)
        self.gen = remote
        self._handed_at = time.monotonic()
        gone = local.done  # cancelled while paused (the client left)
        local.cancel()
        self._release_lease()
        if gone:
            remote.cancel()
            self.deliver(remote, None, None)
            return
        remote.attach(self)

    async def resume_local(self) -> None:
        """After the handover, the destination failed: lease the model here again (loading
        it if it went) and continue from the token list.

        Raises:
            ModelLoadFailed, ShuttingDown, UsageError: it cannot run here.
        """
        lease = await self.manager.acquire(self.model)
        self._lease = lease
        self._handed_at = None
        log.info("request %s: resuming here from %d tokens", self.id, len(self.tokens))
        assert self.params is not None
        self._submit_local(lease.resident.engine, self.params)

    def fail(self, why: str) -> None:
        """End the stream with ``why`` as its error."""
        self.ended = why
        gen, self.gen = self.gen, None
        if gen is not None:
            gen.cancel()
        self._queue.put_nowait(None)
        self._release_lease()
        self.requests.inflight.discard(self)

    # -- 5. stream ------------------------------------------------------------------------

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas as tokens arrive; sets :attr:`finish`.

        Raises:
            ServerError: the generation failed, or the node ended it (shutdown, unload).
        """
        first = True
        while (token := await self._queue.get()) is not None:
            if first:
                self.manager.first_token(self.lease)
                first = False
            delta = self.text.push(token)
            if self.text.stopped:
                self.gen.cancel()
                self.finish = "stop"
                yield delta
                return
            yield delta
        if self.gen is None:  # failed (fail())
            raise ServerError(self.ended or "generation failed")
        if self.gen.finish_reason == "error":
            raise ServerError(f"generation failed: {type(self.gen.error).__name__}: {self.gen.error}")
        if self.gen.finish_reason == "cancelled" and not self.gone:
            raise ServerError(self.ended or "generation cancelled: the model was unloaded (server shutting down)")
        self.finish = self.gen.finish_reason
        yield self.text.flush()

    async def sse(self) -> AsyncIterator[str]:
        """The SSE body: a chunk per text delta, a last chunk with the finish reason, usage
        when asked (``stream_options.include_usage``), then ``data: [DONE]``. A failure
        after the stream started is an ``error`` event, then ``[DONE]``. A client that
        disconnects cancels the generation (Starlette stops the stream)."""

        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        chunk = lambda text, finish=None, first=False: schemas.completion_body(  # noqa: E731
            self.id, self.model, self.created, text=text, finish=finish, chat=self.chat, first=first
        )
        try:
            if self.chat:
                yield event(chunk("", first=True))
            async for delta in self.deltas():
                if delta:
                    yield event(chunk(delta))
            yield event(chunk(None if self.chat else "", finish=self.finish))
            if self.include_usage:
                yield event({**chunk(None), "choices": [], "usage": self.usage()})
        except ServerError as exc:
            yield event(schemas.error_body(str(exc), "server_error"))
        except Exception as exc:  # a bug: logged once, the client still gets an end
            log.exception("internal error in the stream of %s", self.id)
            yield event(schemas.error_body(f"internal error: {type(exc).__name__}", "server_error"))
        except asyncio.CancelledError:
            self.gone = True
            raise
        finally:
            self.cancel()
        yield "data: [DONE]\n\n"

    async def respond(self, request: Request, headers: dict[str, str]) -> JSONResponse:
        """The whole (non-streamed) answer; a client that disconnects meanwhile cancels it."""
        watcher = asyncio.ensure_future(self._watch_disconnect(request))
        try:
            text = "".join([d async for d in self.deltas()])
        except ServerError as exc:
            return JSONResponse(schemas.error_body(str(exc), "server_error"), status_code=503, headers=headers)
        finally:
            watcher.cancel()
            self.cancel()
        if self.chat:
            out = schemas.chat_body(self.id, self.model, self.created, text, self.finish)
        else:
            out = schemas.completion_body(self.id, self.model, self.created, text=text, finish=self.finish, chat=False)
        out["usage"] = self.usage()
        return JSONResponse(out, headers=headers)

    async def _watch_disconnect(self, request: Request) -> None:
        """Cancel the generation when the client disconnects (the body is already read, so
        the next ASGI message is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self.cancel()
                return

    def usage(self) -> dict[str, int]:
        return schemas.usage(self.prompt_tokens, len(self.text.ids))

    def end(self, why: str) -> None:
        """End the generation now (drain deadline); the client gets ``why`` as an error."""
        self.ended = why
        self.cancel()

    def cancel(self) -> None:
        if self.gen is not None:
            self.gen.cancel()


def _prompt_ids(tokenizer: Any, config: Any, body: Any, chat: bool) -> list[int]:
    """Text thread. Raises: UsageError: empty prompt, a token id outside the vocabulary, a
    chat template that refuses the messages."""
    if chat:
        ids = chat_ids(tokenizer, [(m.role, m.text()) for m in body.messages])
    elif isinstance(body.prompt, list):
        ids = list(body.prompt)
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and any(t >= vocab for t in ids):
            raise UsageError(f"prompt: token ids must be < the vocabulary size {vocab}")
    else:
        ids = encode(tokenizer, body.prompt)
    if not ids:
        raise UsageError("prompt: empty (this tokenizer has no BOS token to start from)")
    return ids


def _eos_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return tuple(sorted(ids))
