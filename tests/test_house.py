"""The house rules, checked: the engine's parts import no cycle and nothing of the lab, the CLI and the
server's flags load neither torch nor the lab, and docs/ARCHITECTURE.md names only what exists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_imports_follow_the_house_rules():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["generate", "--help"]])
def test_the_cli_loads_only_what_a_command_needs(argv):
    probe = (f"import sys\nfrom tinyserve import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
             "print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(r.stdout.splitlines()[-1].split())  # the last line: the help text comes before it
    heavy = {"torch", "transformers", "fastapi", "matplotlib", "aiohttp", "httpx", "rich"} & loaded
    lab = {m for m in loaded if m.startswith("tinyserve_lab.")} - {"tinyserve_lab.commands"}
    assert not heavy and not lab, (heavy, lab)


def test_import_tinyserve_is_light_until_used():
    probe = "import sys, tinyserve\nassert 'torch' not in sys.modules\ntinyserve.SamplingParams(n=1)\nprint('ok')"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "ok"


def _definitions(path: Path) -> dict[str, set[str]]:
    """Top-level classes and functions of a file, each with its methods."""
    tree = ast.parse(path.read_text())
    return {n.name: {m.name for m in getattr(n, "body", []) if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)}
            for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)}


def test_the_architecture_page_names_only_files_and_definitions_that_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    refs = re.findall(r"`([\w/]+\.py)(?::([\w.]+))?", text)
    assert len(refs) > 30
    sources = [p for base in (ROOT / "src", ROOT / "scripts", ROOT / "tests") for p in base.rglob("*.py")]
    for name, symbol in refs:
        if "/" in name:  # a path from a package or the repo root
            found = [p for p in sources if p.as_posix().endswith("/" + name)]
        else:  # a file named in its folder's row
            found = [p for p in sources if p.name == name]
        assert found, f"{name} does not exist"
        if symbol:
            outer, _, inner = symbol.partition(".")
            defs = _definitions(found[0])
            assert outer in defs and (not inner or inner in defs[outer]), f"{name}:{symbol} is not defined there"
