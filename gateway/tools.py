"""Tools (function calling) on chat completions: the tools rendered into the prompt, tool calls
parsed out of the model's text, and the grammars that force a call.

- The prompt: a chat template that takes `tools` (Qwen2.5/Qwen3, Llama 3.1+, Mistral, Granite …)
  renders them its own way; one that does not (SmolLM2, Gemma) gets them as a Hermes-style system
  prompt (<tools>…</tools>, answers in <tool_call>…</tool_call>), the format most open models
  were tuned on. Earlier assistant tool calls and tool results are rendered the same way.
- `tool_choice` "auto": the model may answer text or calls; calls are parsed from its text in the
  template's format: Hermes <tool_call> blocks, Mistral's [TOOL_CALLS] list, or Llama 3's bare
  JSON object. "required" and a named function: the output is forced by a JSON-schema grammar
  (gateway/grammar.py) to a list of calls, or to the named function's arguments, as vLLM does.
  "none": the tools are left out of the prompt and nothing is parsed."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from gateway.errors import APIError

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
LLAMA_MARK = "<|python_tag|>"

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\nFor each "
    "function call, return a json object with function name and arguments within <tool_call></tool_call> XML "
    "tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")

Format = Literal["hermes", "mistral", "llama"]


@dataclass
class ToolPlan:
    """What a chat request asked of its tools."""

    mode: Literal["auto", "required", "named"]
    format: Format
    names: list[str]
    named: str | None = None  # the function a named tool_choice forces
    schemas: dict[str, dict] = field(default_factory=dict)  # name -> parameters schema

    @property
    def forced(self) -> bool:
        return self.mode != "auto"

    @property
    def marker(self) -> str | None:
        """Text that starts the calls in 'auto' mode: what comes before it may stream as content."""
        if self.mode != "auto":
            return None
        return {"hermes": HERMES_OPEN, "mistral": MISTRAL_MARK, "llama": None}[self.format]

    def forced_schema(self) -> dict:
        """The JSON the output is forced to: the named function's arguments, or a list of calls."""
        if self.mode == "named":
            return self.schemas[self.named]
        calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": self.schemas[name]},
                  "required": ["name", "arguments"], "additionalProperties": False} for name in self.names]
        return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


def template_format(template: str) -> Format | None:
    """The tool-call format a chat template renders, or None when it takes no tools."""
    if "tools" not in template:
        return None
    if MISTRAL_MARK in template:
        return "mistral"
    if HERMES_OPEN in template:
        return "hermes"
    return "llama"


def plan(tools: list | None, tool_choice, template: str) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (OpenAI's rules) and say what to do; None: no tools."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise APIError(400, "`tool_choice` is only allowed when `tools` are given", param="tool_choice")
    if not tools or tool_choice == "none":
        return None
    schemas = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                           param=f"tools[{i}]")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise APIError(400, "a function's `parameters` must be a JSON schema object",
                           param=f"tools[{i}].function.parameters")
        schemas[function["name"]] = parameters
    fmt = template_format(template) or "hermes"
    names = list(schemas)
    if tool_choice in (None, "auto"):
        return ToolPlan("auto", fmt, names, schemas=schemas)
    if tool_choice == "required":
        return ToolPlan("required", fmt, names, schemas=schemas)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in schemas:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return ToolPlan("named", fmt, names, named=name, schemas=schemas)
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}", param="tool_choice")


def render(messages: list[dict], tools: list[dict] | None, template: str) -> tuple[list[dict], list[dict] | None]:
    """Messages (and tools) as the chat template takes them. OpenAI's tool-call `arguments`
    strings become objects (templates format them); a template without tools gets a Hermes
    system prompt and Hermes-formatted calls and results."""
    native = template_format(template) is not None
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            parsed = [{"id": c.get("id"), "type": "function",
                       "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"])}}
                      for c in calls]
            if native:
                m["tool_calls"] = parsed
            else:
                blocks = "".join(f"{HERMES_OPEN}\n{json.dumps(c['function'])}\n{HERMES_CLOSE}" for c in parsed)
                m["content"] = (m.get("content") or "") + blocks
        if m["role"] == "tool" and not native:
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
        out.append(m)
    if not tools:
        return out, None
    if native:
        return out, tools
    listing = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t) for t in tools))
    if out and out[0]["role"] == "system":
        out[0] = out[0] | {"content": f"{out[0]['content']}\n\n{listing}"}
    else:
        out.insert(0, {"role": "system", "content": listing})
    return out, None


def _arguments(function: dict):
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"a tool call's arguments are not JSON: {exc}", param="messages") from exc
    return arguments


def call(name: str, arguments) -> dict:
    """An OpenAI tool call (arguments as a JSON string)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def parse(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a finished answer. Text that does not parse as calls stays content."""
    if plan.mode == "named":
        return None, [call(plan.named, text)]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut short by max_tokens
        return None, [call(i["name"], i.get("arguments", {})) for i in items]
    if plan.format == "hermes":
        return _parse_hermes(text, plan)
    if plan.format == "mistral":
        head, mark, rest = text.partition(MISTRAL_MARK)
        items = _json(rest.strip()) if mark else None
        if isinstance(items, dict):
            items = [items]
        calls = _calls(items, plan) if isinstance(items, list) else []
        return (head.strip() or None, calls) if calls else (text, [])
    body = text.strip().removeprefix(LLAMA_MARK).strip()
    calls = _calls([_json(part) for part in body.split(";")], plan) if body.startswith("{") else []
    return (None, calls) if calls else (text, [])


def _parse_hermes(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    content, _, rest = text.partition(HERMES_OPEN)
    if not _:
        return text, []
    blocks, items = (HERMES_OPEN + rest).split(HERMES_OPEN)[1:], []
    for block in blocks:
        items.append(_json(block.split(HERMES_CLOSE)[0].strip()))
    calls = _calls(items, plan)
    return (content.strip() or None, calls) if calls else (text, [])


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _calls(items: list, plan: ToolPlan) -> list[dict]:
    """Calls of known functions among parsed items ({"name", "arguments" or "parameters"})."""
    out = []
    for item in items:
        if isinstance(item, dict) and item.get("name") in plan.schemas:
            out.append(call(item["name"], item.get("arguments", item.get("parameters", {}))))
    return out
