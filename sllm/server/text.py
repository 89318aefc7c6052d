"""Text on the server side of the engine: prompts to token ids, token ids to streamed text.

The engine (``sllm/core/engine.py``) knows only token ids; this module is where a
tokenizer is used. :func:`chat_prompt` renders chat messages with the tokenizer's chat
template, or a plain ``role: content`` transcript when it has none. :class:`TextStream`
turns generated ids into text deltas as they arrive, holding back what is not final yet:
an incomplete UTF-8 sequence (shown as U+FFFD by the decoder) and any tail that could
still grow into a stop sequence, so a stop string is never half-sent.

It does not load tokenizers (``models.py``) or speak HTTP (``app.py``).
"""

from __future__ import annotations

from typing import Any

from sllm.errors import UsageError

REPLACEMENT = "\ufffd"


def chat_prompt(tokenizer: Any, messages: list[tuple[str, str]]) -> str:
    """The prompt text for ``messages`` (``(role, content)`` pairs), ready for the reply.

    Uses ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` when the
    tokenizer has a template; otherwise a transcript, one ``role: content`` line per
    message, ending with ``assistant:``.

    Raises:
        UsageError: the template refuses the messages (templates raise on roles or orders
            they do not allow, e.g. "Conversation roles must alternate").
    """
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": r, "content": c} for r, c in messages]
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2's TemplateError and raise_exception(), and template bugs
            raise UsageError(f"messages: this model's chat template refuses them: {exc}") from exc
    return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"


def chat_ids(tokenizer: Any, messages: list[tuple[str, str]]) -> list[int]:
    """Token ids of :func:`chat_prompt`. A template's text is encoded without adding special
    tokens again (the template writes its own BOS); the plain transcript with them."""
    text = chat_prompt(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return encode(tokenizer, text)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's usual special tokens; an empty text is
    the BOS token alone when the tokenizer has one, else an empty list."""
    ids = list(tokenizer.encode(text)) if text else []
    if not ids and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [tokenizer.bos_token_id]
    return ids


class TextStream:
    """Incremental detokenization with stop sequences.

    Args:
        tokenizer: a transformers tokenizer (``decode``).
        stop: stop sequences; the output ends *before* the first one found.

    Feed ids with :meth:`push`, which returns the new final text (possibly ""); call
    :meth:`flush` at the end for what was held back. :attr:`stopped` turns True when a stop
    sequence appeared; push nothing more after that.

    Each push decodes a short window (from the token before the last committed one), not
    the whole output, so a long generation costs O(1) decoding per token; the window's
    previous text is subtracted, which keeps byte-level merges and leading spaces exact.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = []
        self.text = ""  # final text so far (may end with a held-back stop prefix)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False
        self._prefix = 0  # decode window start (ids)
        self._read = 0  # ids whose text is in self.text

    def push(self, token: int) -> str:
        self.ids.append(token)
        new = self._pending()
        if new and not new.endswith(REPLACEMENT):  # complete characters: commit them
            self.text += new
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """Everything not yet returned (at the end of the generation)."""
        if not self.stopped and self._read < len(self.ids):
            self.text += self._pending()
            self._prefix = self._read = len(self.ids)
        delta = self._release()
        if not self.stopped:
            delta += self._take(len(self.text))
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _pending(self) -> str:
        """Text of the ids after ``_read`` (may end in U+FFFD while a character is incomplete)."""
        before = self._decode(self.ids[self._prefix : self._read])
        return self._decode(self.ids[self._prefix :])[len(before) :]

    def _release(self) -> str:
        """Cut at a stop sequence, or return what no stop sequence can still claim."""
        if self.stopped:
            return ""
        cut = self._find_stop(self.text)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._stop_prefix_len(self.text))

    def _take(self, upto: int) -> str:
        delta, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return delta

    def _find_stop(self, text: str) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.sent - max(map(len, self.stop)))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
