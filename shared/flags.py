"""Command-line flags generated from a pydantic-settings class, so that each setting's help text,
type, choices and default live in one place: its `Field(description=...)`.

A field `step_timeout_s` becomes `--step-timeout SECONDS`; `json_schema_extra={"flag": ...}`
names a flag explicitly (`--blocks` for `blocks`, `--gateway` for `gateways`). Booleans that
default to true become `--no-NAME`. Flags left out fall back to the environment (the class's
env prefix) and then the default."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

UNITS = {"_s": "SECONDS", "_gib": "GIB", "_mib": "MIB", "_tokens": "TOKENS", "_bytes": "BYTES"}


def add_flags(parser: argparse.ArgumentParser, settings: type[BaseSettings], skip: tuple[str, ...] = ()) -> None:
    prefix = settings.model_config.get("env_prefix", "")
    for name, field in settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if name in skip or extra.get("flag") is False:
            continue
        flag, metavar = _flag_name(name, extra)
        help_text = (field.description or "") + _default_note(field) + f" [env {prefix}{name.upper()}]"
        kind = _unwrap(field.annotation)
        if kind is bool:
            if field.default is True:
                parser.add_argument(f"--no-{flag}", dest=name, action="store_false", default=None, help=help_text)
            else:
                parser.add_argument(f"--{flag}", dest=name, action="store_true", default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(f"--{flag}", dest=name, action="append", metavar=metavar or "VALUE",
                                help=help_text + " (repeat for several)")
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(f"--{flag}", dest=name, choices=typing.get_args(kind), help=help_text)
        else:
            parser.add_argument(f"--{flag}", dest=name, type=kind if kind in (int, float) else str,
                                metavar=metavar, help=help_text)


def settings_from_args(settings: type[BaseSettings], args: argparse.Namespace, **overrides: Any):
    """The settings object: given flags, then COROLLA_* environment variables, then defaults."""
    given = {k: v for k, v in vars(args).items() if k in settings.model_fields and v is not None}
    return settings(**given, **overrides)


def _flag_name(name: str, extra: dict) -> tuple[str, str | None]:
    metavar = extra.get("metavar")
    if "flag" in extra:
        return extra["flag"], metavar
    for suffix, unit in UNITS.items():
        if name.endswith(suffix) and suffix not in ("_tokens", "_bytes"):
            return name[: -len(suffix)].replace("_", "-"), metavar or unit
    return name.replace("_", "-"), metavar


def _unwrap(annotation):
    """`int | None` -> int; `Literal[...] | None` -> the Literal."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _default_note(field: FieldInfo) -> str:
    if any(field.default is v for v in (None, True, False, PydanticUndefined)) or isinstance(field.default, (list, dict)):
        return ""
    return f" (default {field.default})"
