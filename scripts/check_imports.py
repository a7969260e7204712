#!/usr/bin/env python3
"""The house rules of imports, checked from the source (nothing is imported or run):

1. No cycle between the parts of a package: the engine's subpackages (engine, worker, speculative,
   models, ...) and top-level modules (config, cli, ...) form a DAG, and so do the lab's. Every import
   counts: top-level, lazy (inside a function) and type-only.
2. The engine (`tinyserve`) imports nothing of the lab (`tinyserve_lab`), and no plotting, load-generating
   or HTTP-client library (the lab's optional dependencies).

    python scripts/check_imports.py            # exit 1 and the offending imports if a rule is broken
    python scripts/check_imports.py --graph    # the parts and what each imports, bottom-up
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ENGINE, LAB = "tinyserve", "tinyserve_lab"
LAB_ONLY = ("tinyserve_lab", "matplotlib", "aiohttp", "httpx", "rich")


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module `path` imports (absolute names, relative ones resolved), with its line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` may name a submodule: count pkg.sub where it is one
            subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            found += [(m, node.lineno) for m in subs or [base]]
    return found


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def part(module: str) -> str:
    """The part a module belongs to: `tinyserve.engine.llm_engine` -> `tinyserve.engine`."""
    return ".".join(module.split(".")[:2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graph", action="store_true", help="print the parts and what each imports")
    args = ap.parse_args()
    broken = []
    for package in (ENGINE, LAB):
        graph: dict[str, set[str]] = defaultdict(set)
        for path in sorted((SRC / package).rglob("*.py")):
            module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
            graph[part(module)]
            for target, line in imports(path, module):
                if package == ENGINE and target.split(".")[0] in LAB_ONLY:
                    broken.append(f"{path.relative_to(SRC)}:{line}: the engine imports {target}")
                elif target.startswith(f"{package}.") and part(target) != part(module):
                    graph[part(module)].add(part(target))
        try:
            order = list(TopologicalSorter(graph).static_order())
        except CycleError as e:
            broken.append(f"import cycle between the parts of {package}: {' -> '.join(e.args[1])}")
            order = sorted(graph)
        if args.graph:
            for p in order:
                print(f"{p:28} -> {', '.join(q.removeprefix(package + '.') for q in sorted(graph[p])) or '-'}")
        if not broken:
            print(f"ok: {package}: {len(graph)} parts, no cycle")
    for line in broken:
        print(line, file=sys.stderr)
    if not broken:
        print(f"ok: the engine imports nothing of {', '.join(LAB_ONLY)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
