"""GGUF files served straight from the file: the tensors read through the cached index are the ones
the `gguf` package reads, its metadata is parsed once per file, and the HF export peers need is a
plain directory made on request."""

from __future__ import annotations

import os
import shutil

import gguf
import numpy as np
import pytest
import torch

from tinyserve.layers.formats import GGUFTensor
from tinyserve.models import gguf as gguf_file
from tinyserve.models.loader import bundled_gguf_path, dense_weights, hf_weights, resolve_model


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_torch_dequantize_is_ggufs_bit_for_bit(qtype):
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32) * 3
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    got = GGUFTensor(qtype, torch.from_numpy(raw), (48, 96)).dequantize()
    assert torch.equal(got, torch.from_numpy(ref))


@pytest.mark.parametrize("qtype,block_bytes,fp16_at", [("Q4_K", 144, (0, 2)), ("Q6_K", 210, (208,))])
def test_torch_dequantize_of_k_quants_is_ggufs_bit_for_bit(qtype, block_bytes, fp16_at):
    """Random super-blocks (gguf-py quantizes no K-quant) with finite fp16 scale fields: every bit
    pattern of the codes, scales and mins."""
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (32, 4 * block_bytes), dtype=np.uint8)  # 32 rows of 4 x 256 weights
    blocks = raw.reshape(32, 4, block_bytes)
    for at in fp16_at:
        blocks[..., at : at + 2] = rng.uniform(-0.1, 0.1, (32, 4)).astype(np.float16)[..., None].view(np.uint8)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    got = GGUFTensor(qtype, torch.from_numpy(raw), (32, 1024)).dequantize()
    assert torch.equal(got, torch.from_numpy(ref))


def test_weights_from_the_file_are_the_gguf_readers():
    """Every tensor of the bundled model, mapped out of the file by the index and dequantized, equals
    what gguf's own reader dequantizes (Q/K rows unpermuted into HF's order)."""
    src = resolve_model(None)
    assert src.stored_form == "gguf" and src.gguf_file == bundled_gguf_path()
    reader = gguf.GGUFReader(str(src.gguf_file))
    cfg = gguf_file.gguf_config(reader, "bundled")
    ours = dict(dense_weights(src))
    assert len(ours) == len(reader.tensors)
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = gguf_file.unpermute_qk(w, cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads)
        assert torch.equal(ours[gguf_file._gguf_hf_name(t.name)], torch.from_numpy(np.array(w))), t.name


def test_the_metadata_is_parsed_once_per_file(tmp_path, monkeypatch):
    """A second start reads the cached index, parsing nothing; a half-made directory (no index) is
    made again; weights of a file changed since its index was made are refused, not misread."""
    model = tmp_path / "m.gguf"
    shutil.copy(bundled_gguf_path(), model)
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path / "cache"))
    first = resolve_model(str(model))
    assert {p.name for p in first.path.iterdir()} >= {"config.json", "tokenizer.json", gguf_file.GGUF_INDEX}

    def no_parsing(*_a, **_k):
        raise AssertionError("parsed the GGUF again")

    with monkeypatch.context() as m:
        m.setattr(gguf, "GGUFReader", no_parsing)
        assert resolve_model(str(model)).path == first.path
    (first.path / gguf_file.GGUF_INDEX).unlink()  # as a start killed midway would leave it (never renamed, in fact)
    assert resolve_model(str(model)).path == first.path and (first.path / gguf_file.GGUF_INDEX).is_file()
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="changed since"):
        next(gguf_file.gguf_weights(first.path))


def test_the_export_for_peers_is_a_plain_hf_directory():
    """vLLM and transformers load every top-level *.safetensors of a directory as weights: the export
    holds the fp32 weights, config and tokenizer, and nothing of our index."""
    src = resolve_model(None)
    hf = src.hf_directory()
    assert [p.name for p in hf.glob("*.safetensors")] == ["model.safetensors"]
    assert (hf / "config.json").is_file() and not (hf / gguf_file.GGUF_INDEX).exists()
    exported = dict(hf_weights(hf))
    for name, w in dense_weights(src):
        assert torch.equal(exported[name], w), name
