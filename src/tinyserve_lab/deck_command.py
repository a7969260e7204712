"""`tinyserve report` with `--slides`: the report command's arguments plus the deck's flag.

The flag lives here, not in report.py, so that the deck (which draws with report's helpers) and the
report do not import each other; commands.py points the `report` command at this module.
"""

from __future__ import annotations

import argparse
from typing import Any

from tinyserve_lab import report


def add_report_args(p: argparse.ArgumentParser) -> None:
    report.add_report_args(p)
    p.add_argument("--slides", nargs="?", const="docs/slides.html", default=None, metavar="HTML",
                   help="build the talk instead (default docs/slides.html) from the result files under the first "
                        "--results directory; `make slides` renders and checks it in headless Chromium")


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    if not getattr(args, "slides", None):
        return report.run_report(args)
    from tinyserve_lab.deck import DeckError
    from tinyserve_lab.deck_slides import build_deck

    try:
        deck = build_deck(args.results[0], args.slides)
    except DeckError as e:
        raise SystemExit(f"tinyserve report --slides: {e}") from e
    print(f"wrote {deck}")
    return {"slides": str(deck)}
