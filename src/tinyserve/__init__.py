"""tinyserve: a fast, hackable LLM inference engine. `LLM` and the types it speaks are imported on first
use, so `import tinyserve` alone costs no torch import (the CLI and tools that only read results stay fast)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinyserve.config import EngineConfig
    from tinyserve.llm import LLM
    from tinyserve.outputs import CompletionOutput, RequestOutput
    from tinyserve.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "__version__"]
_HOMES = {"LLM": "tinyserve.llm", "SamplingParams": "tinyserve.sampling", "RequestOutput": "tinyserve.outputs",
          "CompletionOutput": "tinyserve.outputs", "EngineConfig": "tinyserve.config"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tinyserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
