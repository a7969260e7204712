"""Every lab command the CLI registers builds its parser, and the lab's standalone files keep their
import contracts (cheap: nothing here loads a model)."""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tinyserve_lab
from tinyserve.cli import Command
from tinyserve_lab import ablations, commands

LAB = Path(tinyserve_lab.__file__).parent


def leaves(name: str, cmd: Command) -> Iterator[tuple[str, Command]]:
    """The commands that run something, by their words on the command line."""
    if cmd.subcommands:
        for sub_name, sub in cmd.subcommands.items():
            yield from leaves(f"{name} {sub_name}", sub)
    else:
        yield name, cmd


LEAVES = dict(pair for name, cmd in (("bench", commands.BENCH), ("quantize", commands.QUANTIZE),
                                     ("profile", commands.PROFILE), ("report", commands.REPORT))
              for pair in leaves(name, cmd))


@pytest.mark.parametrize("words", sorted(LEAVES))
def test_command_builds_its_parser(words: str) -> None:
    cmd = LEAVES[words]
    module = importlib.import_module(cmd.module)
    parser = argparse.ArgumentParser(prog=f"tinyserve {words}")
    getattr(module, cmd.add_args)(parser)
    assert len(parser._actions) > 1, "no flags of its own"  # more than -h
    assert callable(getattr(module, cmd.run))


def test_the_new_instruments_are_registered() -> None:
    assert {"bench decode", "bench spec", "bench prefix", "bench export-check"} <= set(LEAVES)


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.iter_modules(ablations.__path__)))
def test_ablation_is_runnable_and_listed(name: str) -> None:
    module = importlib.import_module(f"tinyserve_lab.ablations.{name}")
    assert callable(module.main)
    assert f"`{name}`" in (ablations.__doc__ or ""), "listed in the package docstring"


def top_level_imports(path: Path) -> set[str]:
    """The modules a file imports outside any function (what runs when the file is loaded)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_export_check_loads_with_the_standard_library_alone() -> None:
    """Its vLLM worker runs this file by path in vLLM's venv, where neither tinyserve nor the lab imports."""
    imported = top_level_imports(LAB / "export_check.py") - {"__future__"}
    assert {m.split(".")[0] for m in imported} <= sys.stdlib_module_names


def test_decode_speed_uses_only_the_public_engine_api() -> None:
    """So an older tree's engine can be timed with this lab (PYTHONPATH=OLD/src:src)."""
    engine_imports = set()
    for node in ast.walk(ast.parse((LAB / "decode_speed.py").read_text())):
        if isinstance(node, ast.Import):
            engine_imports |= {a.name for a in node.names if a.name.startswith("tinyserve")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tinyserve"):
            engine_imports.add(node.module or "")
    assert {m for m in engine_imports if not m.startswith("tinyserve_lab")} == {"tinyserve"}
