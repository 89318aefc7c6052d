"""OpenAI-compatible request bodies (validated) and response bodies (built as dicts).

Requests follow OpenAI's ``/v1/completions`` and ``/v1/chat/completions``: the fields
sllm acts on are declared with their ranges, unknown fields are accepted and ignored (as
clients send many), and fields sllm cannot honour (``n > 1``, ``echo``, ``logprobs``,
``best_of > 1``, tools) are rejected with a 400 naming them rather than silently dropped.
The declared types and bounds are what the node enforces, so the OpenAPI schema built from
them tells a schema-driven client the truth.

Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
This module holds no logic beyond shapes and ranges; the routes are ``app.py``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: OpenAI's default ``max_tokens`` for completions; chat defaults to the rest of the context.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Stop strings: at most this many (as OpenAI), each at most MAX_STOP_CHARS characters
#: (``RequestLimits`` enforces the node's values; these are the schema's).
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
#: The schema's bound on a model name (the node refuses names over 200 UTF-8 bytes with a 400).
MAX_MODEL_NAME_CHARS = 200
#: The schema's bounds on prompts (``RequestLimits`` defaults).
MAX_PROMPT_CHARS = 1_000_000
MAX_MESSAGES = 512


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: (Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                       Field(max_length=MAX_STOP_SEQUENCES)]
           | None) = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    logprobs: Literal[False] | None = Field(None, description="not supported: null or false")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        return [] if v is None else [v] if isinstance(v, str) else list(v)

    # Before-validators: the schema states each constraint; these word its message.
    @field_validator("n", mode="before")
    @classmethod
    def _only_n_1(cls, v: Any) -> Any:
        if v != 1 or isinstance(v, bool):
            raise ValueError("only n=1 is supported")
        return 1

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        return _unsupported(v, (None, False), "logprobs are not supported")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _unsupported(v: Any, allowed: tuple[Any, ...], message: str) -> Any:
    if any(v is a or (type(v) is type(a) and v == a) for a in allowed):
        return v
    raise ValueError(message)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
             | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
             | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=1)])
    echo: Literal[False] = Field(False, description="not supported: false only")
    best_of: Literal[1] | None = Field(None, description="not supported: 1 or null only")
    suffix: Literal[""] | None = Field(None, description="not supported: empty or null only")

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt_only(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 1 and all(isinstance(x, str) for x in v):
            raise ValueError("one prompt per request (a list of several prompts is not supported)")
        return v

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            return v[0]
        return v

    @field_validator("echo", mode="before")
    @classmethod
    def _no_echo(cls, v: Any) -> Any:
        return _unsupported(v, (False, None), "echo is not supported")

    @field_validator("best_of", mode="before")
    @classmethod
    def _no_best_of(cls, v: Any) -> Any:
        return _unsupported(v, (1, None), "best_of > 1 is not supported")

    @field_validator("suffix", mode="before")
    @classmethod
    def _no_suffix(cls, v: Any) -> Any:
        return _unsupported(v, ("", None), "suffix is not supported")


class TextPart(BaseModel):
    """A content part of a chat message: text only."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        for part in v if isinstance(v, list) else ():
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"content part of type {kind!r} is not supported (text only)")
        return v

    def text(self) -> str:
        """The message's text (its text parts joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Annotated[list[Any], Field(max_length=0)] | None = Field(None, description="not supported: empty or null")

    @field_validator("tools", mode="before")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("tools are not supported")
        return v

    @model_validator(mode="after")
    def _max_completion_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


# ---------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape (the schema of every 4xx and 5xx)."""

    error: ErrorDetail


def error_body(
    message: str, type_: str = "invalid_request_error", *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    rid: str, model: str, created: int, *, text: str | None, finish: str | None, chat: bool, first: bool = False
) -> dict[str, Any]:
    """One completion or one streamed chunk (``text`` the delta) without usage.

    Chat chunks carry ``delta`` (the first one with the role), full chat responses
    ``message``; completions carry ``text``.
    """
    if not chat:
        choice: dict[str, Any] = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": _delta(text, first), "logprobs": None, "finish_reason": finish}],
    }


def _delta(text: str | None, first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    return delta


def chat_body(rid: str, model: str, created: int, text: str, finish: str | None) -> dict[str, Any]:
    """A whole (non-streamed) chat completion, without usage."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
    }


def model_card(model_id: str, created: float, **extra: Any) -> dict[str, Any]:
    """One entry of ``GET /v1/models``; sllm's fields (resident, nbytes, error) are extra keys."""
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": "sllm", **extra}


def now() -> int:
    """Unix seconds, OpenAI's ``created``."""
    return int(time.time())
