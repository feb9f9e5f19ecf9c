"""OpenAI's response objects, built from generation events: whole (non-streaming) or as the chunks
of a server-sent event stream. One generator feeds both."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.generation import Finished, TextDelta, TokenLogprob, Usage
from gateway.schemas import SamplingFields


@dataclass
class _Drained:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reason: str = "length"
    cumulative: float = 0.0


class OpenAIShaper:
    """Shapes generation events into OpenAI's objects, streamed (chunks) or whole.

    `scored`: the client asked for log-probabilities (else `logprobs` is null); `token_text` turns
    a token id into the text OpenAI reports for it; `best_of` rows per prompt were generated of
    which `n` are returned, the most likely (by cumulative log-probability, as vLLM ranks them)."""

    def __init__(self, id_prefix: str, model: str, rows: int, body: SamplingFields, scored: bool = False,
                 token_text: Callable[[int], str] = str, n: int = 1, best_of: int | None = None):
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.n_rows = rows
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.scored, self.token_text = scored, token_text
        self.n, self.best_of = n, best_of
        self._offsets: dict[int, int] = {}  # characters sent so far per choice (completions' text_offset)

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @staticmethod
    def _usage(u: Usage) -> dict:
        return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens}

    def _chunk(self, object_: str, choices: list[dict]) -> dict:
        chunk = self._head(object_) | {"choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def completion_logprobs(self, index: int, entries: list[TokenLogprob], text: str) -> dict | None:
        """The legacy completions shape: parallel lists, with each token's offset in the text."""
        if not self.scored:
            return None
        shaped = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self._offsets.get(index, 0)
        for e in entries:
            token = self.token_text(e.token)
            shaped["tokens"].append(token)
            shaped["token_logprobs"].append(e.logprob)
            shaped["top_logprobs"].append(None if e.logprob is None else
                                          {self.token_text(t): lp for t, lp in e.top})
            shaped["text_offset"].append(offset)
            offset += len(token)
        self._offsets[index] = self._offsets.get(index, 0) + len(text)
        return shaped

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.scored:
            return None

        def one(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    async def completion_chunks(self, events) -> AsyncIterator[dict]:
        async for e in events:
            if isinstance(e, TextDelta):
                yield self._chunk("text_completion", [{"index": e.index, "text": e.text, "finish_reason": None,
                                                       "logprobs": self.completion_logprobs(e.index, e.logprobs,
                                                                                            e.text)}])
            elif isinstance(e, Finished):
                yield self._chunk("text_completion", [{"index": e.index, "text": "", "logprobs": None,
                                                       "finish_reason": e.reason}])
            elif isinstance(e, Usage) and self.include_usage:
                yield self._head("text_completion") | {"choices": [], "usage": self._usage(e)}

    async def chat_chunks(self, events) -> AsyncIterator[dict]:
        object_ = "chat.completion.chunk"
        started = False
        async for e in events:
            if not started:  # the assistant role comes first, in every choice
                started = True
                for i in range(self.n_rows):
                    yield self._chunk(object_, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])
            if isinstance(e, TextDelta):
                yield self._chunk(object_, [{"index": e.index, "delta": {"content": e.text},
                                             "logprobs": self.chat_logprobs(e.logprobs), "finish_reason": None}])
            elif isinstance(e, Finished):
                yield self._chunk(object_, [{"index": e.index, "delta": {}, "logprobs": None,
                                             "finish_reason": e.reason}])
            elif isinstance(e, Usage) and self.include_usage:
                yield self._head(object_) | {"choices": [], "usage": self._usage(e)}

    async def _drain(self, events) -> tuple[list[tuple[int, _Drained]], Usage]:
        """Every choice whole, in index order; with best_of, only the n most likely of each prompt's
        rows, renumbered."""
        choices: dict[int, _Drained] = {}
        usage = Usage(0, 0)
        async for e in events:
            if isinstance(e, TextDelta):
                c = choices.setdefault(e.index, _Drained())
                c.text += e.text
                c.logprobs += e.logprobs
            elif isinstance(e, Finished):
                c = choices.setdefault(e.index, _Drained())
                c.reason, c.cumulative = e.reason, e.cumulative_logprob
            elif isinstance(e, Usage):
                usage = e
        if self.best_of is None:
            return sorted(choices.items()), usage
        kept = []
        for first in range(0, self.n_rows, self.best_of):
            rows = [choices.get(i, _Drained()) for i in range(first, first + self.best_of)]
            rows.sort(key=lambda c: c.cumulative, reverse=True)
            kept += rows[:self.n]
        return list(enumerate(kept)), usage

    async def completion(self, events) -> dict:
        drained, usage = await self._drain(events)
        choices = [{"index": i, "text": c.text, "logprobs": self.completion_logprobs(i, c.logprobs, c.text),
                    "finish_reason": c.reason} for i, c in drained]
        return self._head("text_completion") | {"choices": choices, "usage": self._usage(usage)}

    async def chat(self, events) -> dict:
        drained, usage = await self._drain(events)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": self.chat_logprobs(c.logprobs), "finish_reason": c.reason} for i, c in drained]
        return self._head("chat.completion") | {"choices": choices, "usage": self._usage(usage)}
