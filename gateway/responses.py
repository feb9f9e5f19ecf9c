"""OpenAI's response objects, built from generation events: whole (non-streaming) or as the chunks
of a server-sent event stream. One generator feeds both."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from gateway.generation import Finished, TextDelta, Usage
from gateway.schemas import SamplingFields


class OpenAIShaper:
    """Shapes generation events into OpenAI's objects, streamed (chunks) or whole."""

    def __init__(self, id_prefix: str, model: str, rows: int, body: SamplingFields):
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.n_rows = rows
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

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

    async def completion_chunks(self, events) -> AsyncIterator[dict]:
        async for e in events:
            if isinstance(e, TextDelta):
                yield self._chunk("text_completion", [{"index": e.index, "text": e.text, "logprobs": None,
                                                       "finish_reason": None}])
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
                yield self._chunk(object_, [{"index": e.index, "delta": {"content": e.text}, "logprobs": None,
                                             "finish_reason": None}])
            elif isinstance(e, Finished):
                yield self._chunk(object_, [{"index": e.index, "delta": {}, "logprobs": None,
                                             "finish_reason": e.reason}])
            elif isinstance(e, Usage) and self.include_usage:
                yield self._head(object_) | {"choices": [], "usage": self._usage(e)}

    async def _drain(self, events) -> tuple[dict[int, str], dict[int, str], Usage]:
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        usage = Usage(0, 0)
        async for e in events:
            if isinstance(e, TextDelta):
                texts[e.index] = texts.get(e.index, "") + e.text
            elif isinstance(e, Finished):
                reasons[e.index] = e.reason
            elif isinstance(e, Usage):
                usage = e
        return texts, reasons, usage

    async def completion(self, events) -> dict:
        texts, reasons, usage = await self._drain(events)
        choices = [{"index": i, "text": texts.get(i, ""), "logprobs": None, "finish_reason": reasons.get(i, "length")}
                   for i in sorted(reasons)]
        return self._head("text_completion") | {"choices": choices, "usage": self._usage(usage)}

    async def chat(self, events) -> dict:
        texts, reasons, usage = await self._drain(events)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts.get(i, ""), "refusal": None},
                    "logprobs": None, "finish_reason": reasons.get(i, "length")} for i in sorted(reasons)]
        return self._head("chat.completion") | {"choices": choices, "usage": self._usage(usage)}
