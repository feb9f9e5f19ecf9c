"""OpenAI's response objects, built from generation events: whole (non-streaming) or as the chunks
of a server-sent event stream. One generator feeds both."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.generation import Finished, TextDelta, TokenLogprob, Usage
from gateway.schemas import SamplingFields
from gateway.stops import releasable
from gateway.tools import ToolPlan, parse


@dataclass
class _Calls:
    """Tool calls parsed from a choice's text, to be sent as deltas."""

    index: int
    calls: list[dict]
    logprobs: list[TokenLogprob]


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
                 token_text: Callable[[int], str] = str, n: int = 1, best_of: int | None = None,
                 tools: ToolPlan | None = None):
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.n_rows = rows
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.scored, self.token_text = scored, token_text
        self.n, self.best_of = n, best_of
        self.tools = tools
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
        if self.tools is not None:
            events = self._tool_deltas(events)
        object_ = "chat.completion.chunk"
        started = False
        async for e in events:
            if not started:  # the assistant role comes first, in every choice
                started = True
                for i in range(self.n_rows):
                    yield self._chunk(object_, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])
            if isinstance(e, _Calls):
                deltas = [{"index": k} | c for k, c in enumerate(e.calls)]
                yield self._chunk(object_, [{"index": e.index, "delta": {"tool_calls": deltas},
                                             "logprobs": self.chat_logprobs(e.logprobs), "finish_reason": None}])
            elif isinstance(e, TextDelta):
                yield self._chunk(object_, [{"index": e.index, "delta": {"content": e.text},
                                             "logprobs": self.chat_logprobs(e.logprobs), "finish_reason": None}])
            elif isinstance(e, Finished):
                yield self._chunk(object_, [{"index": e.index, "delta": {}, "logprobs": None,
                                             "finish_reason": e.reason}])
            elif isinstance(e, Usage) and self.include_usage:
                yield self._head(object_) | {"choices": [], "usage": self._usage(e)}

    async def _tool_deltas(self, events) -> AsyncIterator[object]:
        """Generation events with tool calls taken out of the text: content streams until the
        format's call marker (held back while it may be starting); what follows, or the whole
        output of a forced call, is parsed when the choice ends and sent as tool-call deltas."""
        plan, marker = self.tools, self.tools.marker
        text: dict[int, str] = {}
        sent: dict[int, int] = {}
        pending: dict[int, list[TokenLogprob]] = {}
        async for e in events:
            if isinstance(e, TextDelta):
                full = text[e.index] = text.get(e.index, "") + e.text
                pending.setdefault(e.index, []).extend(e.logprobs)
                if marker is None:
                    continue  # a forced call, or a format without a marker: parsed whole at the end
                end, found = releasable(full, [marker])
                if end > sent.get(e.index, 0):
                    yield TextDelta(e.index, full[sent.get(e.index, 0):end], pending.pop(e.index, []))
                    sent[e.index] = end
            elif isinstance(e, Finished):
                full, done = text.get(e.index, ""), sent.get(e.index, 0)
                content, calls = parse(full, plan)
                if calls:
                    yield _Calls(e.index, calls, pending.pop(e.index, []))
                    e = Finished(e.index, self._tool_reason(e.reason), e.cumulative_logprob)
                elif len(full) > done:
                    yield TextDelta(e.index, full[done:], pending.pop(e.index, []))
                yield e
            else:
                yield e

    def _tool_reason(self, reason: str) -> str:
        """OpenAI's finish_reason for an answer that called tools: a named tool_choice ends 'stop'."""
        return "stop" if self.tools.mode == "named" else "tool_calls"

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
        choices = []
        for i, c in drained:
            message, reason = {"role": "assistant", "content": c.text, "refusal": None}, c.reason
            if self.tools is not None:
                content, calls = parse(c.text, self.tools)
                if calls:
                    message |= {"content": content, "tool_calls": calls}
                    reason = self._tool_reason(reason)
            choices.append({"index": i, "message": message, "logprobs": self.chat_logprobs(c.logprobs),
                            "finish_reason": reason})
        return self._head("chat.completion") | {"choices": choices, "usage": self._usage(usage)}
