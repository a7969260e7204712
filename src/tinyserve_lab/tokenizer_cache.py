"""Tokenizers for counting benchmark lengths: the engine's own loader, so a GGUF's vocabulary is
converted once and shared with the engine's cache (see models.gguf.gguf_source)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(name_or_path: str | None = None) -> Any:
    """None -> the bundled model's tokenizer; a .gguf file, an HF directory or a hub id otherwise."""
    from tinyserve.models.loader import resolve_model
    from tinyserve.tokenizer import load_tokenizer as load

    if name_or_path and Path(name_or_path).suffix != ".gguf" and not Path(name_or_path).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)  # a hub id: no model weights needed
    return load(resolve_model(name_or_path)).hf

