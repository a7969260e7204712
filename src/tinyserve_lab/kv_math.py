"""`tinyserve bench kv-math`: what the KV cache costs, exactly, and a check that the engine allocates that.

One token of context stores a K and a V vector per layer and per KV head:

    bytes/token = 2 (K, V) x layers x kv_heads x head_dim x bytes(dtype)

and a request of S tokens holds S times that; a batch of B such requests B x S times that. GQA
(kv_heads < heads) is what keeps these numbers small. Computed here for the bundled model and two
published architectures, then checked against the engine's real pool: `LLMEngine` with
`num_kv_blocks=N` must hold exactly N x block_size x bytes/token of K and V tensors.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tinyserve.config import ModelConfig, resolve_dtype

RESULT_SCHEMA = "tinyserve.kv_math/1"

# TinyLlama/TinyLlama-1.1B-Chat-v1.0, config.json: "hidden_size": 2048, "intermediate_size": 5632,
# "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4 (head_dim 2048/32 = 64),
# "max_position_embeddings": 2048, "vocab_size": 32000, "rms_norm_eps": 1e-05, "rope_theta": 10000.0.
TINYLLAMA_1_1B = ModelConfig(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
    head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
    eos_token_ids=(2,), name="TinyLlama-1.1B",
)

# meta-llama/Meta-Llama-3-8B, config.json: "hidden_size": 4096, "intermediate_size": 14336,
# "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8 (head_dim 4096/32 = 128),
# "max_position_embeddings": 8192, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0.
LLAMA_3_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
    eos_token_ids=(128001,), name="Llama-3-8B",
)

PUBLISHED = (TINYLLAMA_1_1B, LLAMA_3_8B)
DEFAULT_DTYPES = ("float32", "bfloat16")
DEFAULT_SEQ_LEN = 8192
DEFAULT_BATCH = 32


def dtype_bytes(dtype: str | torch.dtype) -> int:
    return torch.empty((), dtype=resolve_dtype(dtype, "cpu")).element_size()


def dtype_name(dtype: str | torch.dtype) -> str:
    return str(resolve_dtype(dtype, "cpu")).replace("torch.", "")


def kv_bytes_per_token(cfg: ModelConfig, dtype: str | torch.dtype) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes(dtype)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)


@dataclass
class KVRow:
    model: str
    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    dtype: str
    bytes_per_token: int
    context_len: int  # the model's own max_position_embeddings
    bytes_per_full_context: int  # one request filling that context
    seq_len: int
    batch: int
    bytes_per_request: int  # seq_len tokens
    bytes_total: int  # batch x seq_len tokens


def kv_row(cfg: ModelConfig, dtype: str | torch.dtype, seq_len: int = DEFAULT_SEQ_LEN,
           batch: int = DEFAULT_BATCH) -> KVRow:
    per_token = kv_bytes_per_token(cfg, dtype)
    return KVRow(model=cfg.name, layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, heads=cfg.num_heads,
                 head_dim=cfg.head_dim, dtype=dtype_name(dtype), bytes_per_token=per_token,
                 context_len=cfg.max_position_embeddings,
                 bytes_per_full_context=per_token * cfg.max_position_embeddings,
                 seq_len=seq_len, batch=batch, bytes_per_request=per_token * seq_len,
                 bytes_total=per_token * seq_len * batch)


def bundled_config() -> ModelConfig:
    from tinyserve.models.loader import model_config, resolve_model

    return model_config(resolve_model(None))


def default_models(model: str | None = None) -> list[ModelConfig]:
    """The served model (bundled by default; skipped with a warning if it cannot be read), then the published ones."""
    from tinyserve.models.loader import model_config, resolve_model

    try:
        ours = [model_config(resolve_model(model))]
    except (OSError, ValueError) as e:
        print(f"kv-math: cannot read the model config ({e}); published architectures only")
        ours = []
    return ours + list(PUBLISHED)


def kv_table(models: Sequence[ModelConfig], dtypes: Sequence[str] = DEFAULT_DTYPES,
             seq_len: int = DEFAULT_SEQ_LEN, batch: int = DEFAULT_BATCH) -> list[KVRow]:
    return [kv_row(m, d, seq_len, batch) for m in models for d in dtypes]


def human_bytes(n: float) -> str:
    """Binary units: 131072 -> '128 KiB', 2**35 -> '32 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if float(n).is_integer() else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_engine_allocation(engine: Any = None, num_kv_blocks: int = 64, model: str | None = None,
                            dtype: str = "float32") -> dict[str, Any]:
    """Build (or reuse) an engine and compare its KV pool to (num_blocks + the runner's one scratch block)
    x block_size x bytes/token, exactly."""
    if engine is None:
        from tinyserve.config import EngineConfig
        from tinyserve.engine.llm_engine import LLMEngine

        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, num_kv_blocks=num_kv_blocks, enforce_eager=True))
    dt = engine.config.torch_dtype
    per_token = kv_bytes_per_token(engine.model_config, dt)
    blocks, bs = engine.num_blocks, engine.config.block_size
    expected = (blocks + 1) * bs * per_token
    actual = int(engine.runner.kv_cache_bytes)
    return {"model": engine.model_name, "dtype": dtype_name(dt), "num_kv_blocks": blocks, "block_size": bs,
            "bytes_per_token": per_token, "expected_bytes": expected, "actual_bytes": actual,
            "match": expected == actual}


def markdown_table(rows: Sequence[KVRow]) -> str:
    if not rows:
        return "_no models_\n"
    lines = [("| model | layers | KV heads / heads | head dim | dtype | bytes/token | full context (tokens: size) "
              "| one request | batch total |"),
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.layers} | {r.kv_heads} / {r.heads} | {r.head_dim} | {r.dtype} "
            f"| {r.bytes_per_token:,} ({human_bytes(r.bytes_per_token)}) "
            f"| {r.context_len:,}: {human_bytes(r.bytes_per_full_context)} "
            f"| {human_bytes(r.bytes_per_request)}{' *' if r.seq_len > r.context_len else ''} "
            f"| {human_bytes(r.bytes_total)} |")
    seq, batch = rows[0].seq_len, rows[0].batch
    lines.append("")
    lines.append(f"bytes/token = 2 (K, V) x layers x KV heads x head dim x bytes(dtype); \"one request\" = "
                 f"{seq:,} tokens, \"batch total\" = {batch} x {seq:,} tokens. fp16 costs the same as bf16.")
    if any(r.seq_len > r.context_len for r in rows):
        lines.append("")
        lines.append(f"\\* {seq:,} tokens is beyond that model's context; the size is the formula's, for comparison.")
    return "\n".join(lines) + "\n"


def check_markdown(check: dict[str, Any] | None) -> str:
    if not check:
        return ""
    verdict = "exact match" if check["match"] else "MISMATCH"
    return (f"Engine check ({check['model']}, {check['dtype']}): {check['num_kv_blocks']} blocks x "
            f"{check['block_size']} tokens x {check['bytes_per_token']:,} B/token = {check['expected_bytes']:,} B "
            f"expected; `runner.kv_cache_bytes` = {check['actual_bytes']:,} B: **{verdict}**.\n")


def kv_math_result(rows: Sequence[KVRow], check: dict[str, Any] | None) -> dict[str, Any]:
    from tinyserve_lab.env_info import run_header

    return run_header(RESULT_SCHEMA, rows=[asdict(r) for r in rows], engine_check=check,
                      markdown=markdown_table(rows) + ("\n" + check_markdown(check) if check else ""))


def add_kv_math_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model whose config heads the table (default: bundled)")
    p.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES), help="e.g. float32 bfloat16 float16")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per request")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="requests held at once")
    p.add_argument("--num-kv-blocks", type=int, default=64, help="pool size of the engine allocation check")
    p.add_argument("--check-dtype", default="float32", help="dtype of the engine allocation check")
    p.add_argument("--no-engine-check", action="store_true", help="skip building an engine")
    p.add_argument("--result-dir", default="docs/results", help="where to write the JSON ('' = none)")


def run_kv_math(args: argparse.Namespace) -> dict[str, Any]:
    rows = kv_table(default_models(args.model), args.dtypes, args.seq_len, args.batch)
    check = None if args.no_engine_check else check_engine_allocation(
        num_kv_blocks=args.num_kv_blocks, model=args.model, dtype=args.check_dtype)
    result = kv_math_result(rows, check)
    print(result["markdown"])
    if args.result_dir:
        from tinyserve_lab.env_info import save_json

        print(f"wrote {save_json(result, Path(args.result_dir), 'kv-math')}")
    if check is not None and not check["match"]:
        raise SystemExit("kv-math: the engine's KV pool does not match the formula")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kv_math_args(parser)
    return run_kv_math(parser.parse_args(argv))


if __name__ == "__main__":
    main()
