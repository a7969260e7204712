"""docs/walkthrough.py, the engine walked through for a discussion, runs from the repository root and
still shows what its prose says: it asserts each part's invariant itself, so a clean exit plus the
markers of every part means none of them rotted."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "walkthrough.py"
BUDGET_S = 300  # it takes well under 90 s on the 2-core CI machine; the rest is headroom for a busy one


def test_walkthrough_is_a_percent_format_notebook():
    """jupytext reads `# %%` cells; a markdown cell's lines must all be comments, or the prose would run."""
    text = SCRIPT.read_text()
    assert "format_name: percent" in text
    cells = re.split(r"^# %%", text, flags=re.M)[1:]
    markdown = [c for c in cells if c.startswith(" [markdown]")]
    assert len(markdown) >= 6 and len(cells) - len(markdown) >= 6  # an introduction and five parts, with code
    for cell in markdown:
        body = [line for line in cell.splitlines()[1:] if line.strip()]
        assert body and all(line.startswith("#") for line in body), cell[:80]


@pytest.mark.slow
def test_walkthrough_runs_and_shows_every_part():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                          text=True, timeout=BUDGET_S)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for marker in ("bytes per token, fp32", "int8 pool: dtype torch.int8",  # 1. the KV math
                   "long   prefill", "all three finished",  # 2. a scheduled step
                   "reference counts of b's blocks: [2", "every block is back in the pool",  # 3. the paged pool
                   "file Q4_1 on the int4 kernel", "int4 g32 (RTN)",  # 4. a quantized linear
                   "drafted tokens accepted", "walkthrough done in"):  # 5. a speculative step
        assert marker in out, marker
    spec = re.search(r"^speculative: (.*)$", out, re.M)
    plain = re.search(r"^plain:       (.*)$", out, re.M)
    assert spec and plain and spec.group(1) == plain.group(1)
    print(f"walkthrough: {elapsed:.1f} s")
