"""Tools and structured output, the pure parts: tool_choice rules, rendering for templates with
and without a tool format, parsing calls in each format, streaming them as deltas, and grammars
that always produce JSON matching the schema (llguidance, with SmolLM2's tokenizer)."""

import asyncio
import json

import jsonschema
import pytest
import torch
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.errors import APIError
from gateway.generation import Finished, TextDelta, Usage
from gateway.grammar import Grammars, mask_logits, response_format_grammar
from gateway.responses import OpenAIShaper
from gateway.schemas import ChatRequest
from gateway.tools import HERMES_SYSTEM, plan, render, template_format
from shared.models.loader import load_tokenizer
from shared.models.resolve import resolve_model

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
HERMES_TEMPLATE = "{% if tools %}{{ tools | tojson }}{% endif %}<tool_call>{% for m in messages %}{{ m }}{% endfor %}"
MISTRAL_TEMPLATE = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
LLAMA_TEMPLATE = "{% if tools %}{{ tools }}{% endif %}<|python_tag|>"
PLAIN_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_tool_choice_follows_openais_rules():
    assert plan(None, None, PLAIN_TEMPLATE) is None and plan([WEATHER], "none", PLAIN_TEMPLATE) is None
    auto = plan([WEATHER, TIME], None, HERMES_TEMPLATE)
    assert (auto.mode, auto.format, auto.names, auto.marker) == ("auto", "hermes", ["get_weather", "get_time"],
                                                                 "<tool_call>")
    assert auto.schemas["get_time"] == {"type": "object", "properties": {}}
    named = plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, PLAIN_TEMPLATE)
    assert named.forced and named.forced_schema() == WEATHER["function"]["parameters"]
    required = plan([WEATHER, TIME], "required", PLAIN_TEMPLATE).forced_schema()
    assert required["minItems"] == 1 and len(required["items"]["anyOf"]) == 2
    for tools, choice, param in [(None, "required", "tool_choice"), ([WEATHER], "sometimes", "tool_choice"),
                                 ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
                                 ([{"type": "function"}], "auto", "tools[0]"),
                                 ([{"type": "function", "function": {"name": "f", "parameters": 3}}], "auto",
                                  "tools[0].function.parameters")]:
        with pytest.raises(APIError) as caught:
            plan(tools, choice, PLAIN_TEMPLATE)
        assert caught.value.status == 400 and caught.value.param == param
    assert [template_format(t) for t in (HERMES_TEMPLATE, MISTRAL_TEMPLATE, LLAMA_TEMPLATE, PLAIN_TEMPLATE)] == [
        "hermes", "mistral", "llama", None]


def test_rendering_for_templates_with_and_without_tools():
    body = ChatRequest(model="m", messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"}])
    messages = [m.for_template() for m in body.messages]
    native, tools = render(messages, [WEATHER], HERMES_TEMPLATE)
    assert tools == [WEATHER] and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert native[2] == {"role": "tool", "content": "12 C", "tool_call_id": "c1"}
    plain, tools = render(messages, [WEATHER], PLAIN_TEMPLATE)
    assert tools is None and plain[0]["role"] == "system" and json.dumps(WEATHER) in plain[0]["content"]
    assert plain[0]["content"].startswith(HERMES_SYSTEM[:40])
    assert plain[2]["content"].endswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                        '</tool_call>')
    assert plain[3]["content"] == "<tool_response>\n12 C\n</tool_response>"
    with pytest.raises(Exception, match="tool_call_id"):
        ChatRequest(model="m", messages=[{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("template, text, content", [
    (HERMES_TEMPLATE, 'Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
                      '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Checking."),
    (MISTRAL_TEMPLATE, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                       '{"name": "get_time", "arguments": {}}]', None),
    (LLAMA_TEMPLATE, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                     '{"name": "get_time", "parameters": {}}', None),
])
def test_calls_are_parsed_from_each_format_whole_and_streamed(template, text, content):
    tool_plan = plan([WEATHER, TIME], "auto", template)
    pieces = [text[i:i + 5] for i in range(0, len(text), 5)]

    async def events():
        for piece in pieces:
            yield TextDelta(0, piece)
        yield Finished(0, "stop")
        yield Usage(3, len(pieces))

    def shaper():
        return OpenAIShaper("chatcmpl", "m", 1, ChatRequest(model="m", messages=[{"role": "user", "content": "x"}]),
                            tools=tool_plan)

    async def run():
        whole = await shaper().chat(events())
        chunks = [c async for c in shaper().chat_chunks(events())]
        return whole, chunks
    whole, chunks = asyncio.run(run())
    message = ChatCompletion.model_validate(whole).choices[0].message
    assert message.content == content and whole["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    chunks = [ChatCompletionChunk.model_validate(c) for c in chunks]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (content + " " if content else "")  # the text before the marker streams as it comes
    calls = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather"), (1, "get_time")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_text_without_calls_stays_content():
    tool_plan = plan([WEATHER], "auto", HERMES_TEMPLATE)

    async def events():
        yield TextDelta(0, "It is sunny <tool")
        yield TextDelta(0, "s> no call here")
        yield Finished(0, "stop")

    async def run():
        shaper = OpenAIShaper("c", "m", 1, ChatRequest(model="m", messages=[{"role": "user", "content": "x"}]),
                              tools=tool_plan)
        return [c async for c in shaper.chat_chunks(events())]
    chunks = asyncio.run(run())
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "It is sunny <tools> no call here"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def grammars():
    directory = resolve_model("smollm2")
    tokenizer = load_tokenizer(directory)
    return Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id})), tokenizer


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "tags", "n"], "additionalProperties": False}


def test_sampling_under_a_grammar_always_yields_matching_json(grammars):
    grammars, tokenizer = grammars
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
                                      grammars)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):  # random logits: the grammar alone makes the output valid
        matcher, ids = grammars.matcher(grammar), []
        while True:
            logits = mask_logits(torch.randn(1, grammars.vocab_size), [matcher], grammars.eos_ids)
            token = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=generator))
            if token in grammars.eos_ids:
                break
            matcher.consume(token)
            ids.append(token)
            assert len(ids) < 400
        jsonschema.validate(json.loads(tokenizer.decode(ids)), SCHEMA)


def test_bad_response_formats_are_400s(grammars):
    grammars, _ = grammars
    for response_format, param in [({"type": "xml"}, "response_format.type"),
                                   ({"type": "json_schema"}, "response_format.json_schema"),
                                   ({"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
                                    "response_format.json_schema.schema"),
                                   ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
                                    "response_format.json_schema.schema")]:
        with pytest.raises(APIError) as caught:
            response_format_grammar(response_format, grammars)
        assert caught.value.status == 400 and caught.value.param == param
    assert response_format_grammar({"type": "text"}, grammars) is None
    assert response_format_grammar({"type": "json_object"}, grammars) is not None
