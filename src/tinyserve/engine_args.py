"""EngineConfig as command-line flags and back, both generated from the dataclass's fields.

A knob is declared once, in EngineConfig (type, default, help, choices); every command that runs an
engine gets it as a `--kebab-case` flag (vLLM's spelling) from here. A knob that names a registered
implementation takes its choices and their help from the registry. Light: no torch at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Iterable
from typing import Any

from tinyserve.attention import ATTENTION_BACKENDS
from tinyserve.config import EngineConfig
from tinyserve.engine.policy import POLICIES
from tinyserve.layers import QUANTIZATION
from tinyserve.registry import Registry

# knob -> (its registry, whether "auto" is a choice: the registry's owner then picks an entry)
REGISTERED: dict[str, tuple[Registry, bool]] = {
    "attention_backend": (ATTENTION_BACKENDS, True),
    "quantization": (QUANTIZATION, True),
    "scheduling_policy": (POLICIES, False),
}


@functools.cache
def _knob_types() -> dict[str, type]:
    """Each knob's flag type, from its annotation: `int | None` -> int (None is only ever a default)."""
    hints = typing.get_type_hints(EngineConfig)
    out = {}
    for f in dataclasses.fields(EngineConfig):
        if not f.init:  # derived (torch_dtype), not a knob
            continue
        tp = hints[f.name]
        if isinstance(tp, types.UnionType):
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        out[f.name] = tp
    return out


def add_engine_args(parser: argparse.ArgumentParser, only: Iterable[str] | None = None, **defaults: Any) -> None:
    """Add the EngineConfig knobs to `parser` as flags with their help, type and choices.

    `only` keeps some knobs (an instrument that sizes the rest itself); `defaults` overrides defaults
    (the bench instruments measure float32).
    """
    types_ = _knob_types()
    names = list(types_) if only is None else list(only)
    unknown = (set(names) | defaults.keys()) - types_.keys()
    if unknown:
        raise TypeError(f"not EngineConfig knobs: {', '.join(sorted(unknown))}")
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.name not in names:
            continue
        default = defaults.get(f.name, f.default)
        extra = dict(f.metadata)
        help_ = extra.pop("help")
        if f.name in REGISTERED:
            registry, auto = REGISTERED[f.name]
            extra["choices"] = (["auto"] if auto else []) + list(registry)
            help_ += f" ({registry.help()})"
        help_ += "" if default is None else " (default: %(default)s)"
        flag = "--" + f.name.replace("_", "-")
        if types_[f.name] is bool:  # a switch, as in vLLM: --enforce-eager / --no-enforce-eager
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_, **extra)
        else:
            group.add_argument(flag, type=types_[f.name], default=default, help=help_, **extra)


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig that parsed flags describe; knobs without a flag keep their defaults, `overrides` win."""
    knobs = {name: getattr(args, name) for name in _knob_types() if hasattr(args, name)}
    return EngineConfig(**{**knobs, **overrides})
