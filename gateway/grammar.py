"""Output constrained by a grammar while sampling: `response_format` (json_object, json_schema) and
forced tool calls, with llguidance (the grammar engine behind vLLM's and llama.cpp's structured
output; chosen for its CPU speed, about 50 µs per mask for JSON schemas, its JSON Schema coverage,
and because it needs no torch.compile or GPU).

Each constrained row has its own matcher: before a token is sampled, every token the grammar
cannot take next is masked out (only an end-of-sequence token once the grammar is complete); after,
the chosen token advances the matcher. The output therefore always parses and matches the schema,
unless max_tokens cuts it short (finish_reason "length", as with OpenAI)."""

from __future__ import annotations

import json
import logging
import threading

import llguidance
import llguidance.hf
import torch

from gateway.errors import APIError

log = logging.getLogger(__name__)

# JSON as a client would write it by hand: no line breaks or runs of spaces forced or allowed
JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """The model's tokenizer as llguidance sees it (built once, on first use: about 0.3 s for a
    49k vocabulary), and compiling requests' grammars against it."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self._hf, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                if self._hf is None:
                    raise APIError(400, "this model has no tokenizer, so its output cannot be constrained",
                                   param="response_format")
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf, eos_token=self.eos_ids)
                except ValueError as exc:
                    raise APIError(400, f"structured output needs a fast tokenizer: {exc}",
                                   param="response_format") from exc
            return self._tokenizer

    def prepare(self) -> None:
        """Build the tokenizer now (at load, off the event loop), if the model can have one."""
        try:
            self.tokenizer  # noqa: B018
        except APIError as exc:
            log.info("structured output unavailable: %s", exc.message)

    def json_schema(self, schema: dict, param: str) -> str:
        """A grammar for JSON matching `schema` (400 when the schema cannot be compiled)."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise APIError(400, f"invalid JSON schema: {exc}", param=param) from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise APIError(400, f"this JSON schema cannot be enforced: {error}", param=param)
        return grammar

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(llguidance.LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size)


class Matcher:
    """One row's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._m, self.vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar takes next (an EOS only, once it is complete; the
        EOS too, if the matcher broke, so that the row ends rather than emit anything)."""
        bias = torch.frombuffer(bytearray(self._m.compute_logit_bias()), dtype=torch.uint8)
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(len(bias), self.vocab_size)
        allowed[:n] = bias[:n] > 0
        return allowed

    def consume(self, token: int) -> None:
        if not self._m.is_stopped():
            self._m.consume_token(token)

    @property
    def error(self) -> str:
        return self._m.get_error()


def mask_logits(logits: torch.Tensor, matchers: list[Matcher | None], eos_ids: list[int]) -> torch.Tensor:
    """Logits [rows, vocab] with every token a row's grammar cannot take set to -inf (rows
    without a matcher unchanged). A broken matcher leaves only the EOS tokens."""
    logits = logits.clone()
    for row, matcher in enumerate(matchers):
        if matcher is None:
            continue
        allowed = matcher.allowed()
        if matcher.error or not bool(allowed.any()):
            allowed = torch.zeros_like(allowed)
            allowed[eos_ids] = True
        logits[row].masked_fill_(~allowed, float("-inf"))
    return logits


def response_format_grammar(response_format: dict | None, grammars: Grammars) -> str | None:
    """The grammar of an OpenAI `response_format`, or None for plain text."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammars.json_schema({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(400, "response_format.json_schema needs a `name` (and a `schema`)",
                           param="response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be an object",
                           param="response_format.json_schema.schema")
        return grammars.json_schema(schema, "response_format.json_schema.schema")
    raise APIError(400, f"response_format type {json.dumps(kind)} is not one of text, json_object, json_schema",
                   param="response_format.type")
