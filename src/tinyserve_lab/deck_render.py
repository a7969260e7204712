"""Check the deck the way a person sees it: headless Chromium renders docs/slides.html.

`python -m tinyserve_lab.deck_render [--html docs/slides.html]` (what `make slides` runs):
1. loads the page in check mode (`?check=1`), whose script measures every slide and writes a JSON
   verdict into the DOM; the verdict is read with `--dump-dom`. An overflowing slide (content wider or
   taller than 1280x720), a plot that did not decode (naturalWidth 0) or a slide without notes fails;
2. screenshots each slide (`?slide=N`) into docs/slides/NN.png;
3. prints the deck to docs/slides.pdf, one slide per page (the page's print CSS; a slide that spills
   onto a second page fails the check).
Exit status 1 when the check fails (the screenshots are still taken, to look at what is wrong).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinyserve_lab.deck import SLIDE_H, SLIDE_W

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VERDICT = re.compile(r'<pre id="verdict">(.*?)</pre>', re.S)


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: `apt-get install -y chromium` (make slides does it)")


def _run(browser: str, args: Sequence[str], url: str, timeout: float = 120) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", f"--window-size={SLIDE_W},{SLIDE_H}", *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def parse_verdict(dom: str) -> dict[str, Any]:
    """The check mode's JSON verdict from a dumped DOM; a page that wrote none fails."""
    m = VERDICT.search(dom)
    if not m:
        return {"ok": False, "slides": 0, "problems": [{"problem": "the page wrote no verdict (script failed?)"}]}
    return dict(json.loads(html.unescape(m.group(1))))


def check(browser: str, url: str) -> dict[str, Any]:
    return parse_verdict(_run(browser, ["--virtual-time-budget=15000", "--dump-dom"], url + "?check=1"))


def screenshots(browser: str, url: str, count: int, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    paths = []
    for n in range(1, count + 1):
        path = out_dir / f"{n:02d}.png"
        _run(browser, ["--virtual-time-budget=5000", f"--screenshot={path.resolve()}"], f"{url}?slide={n}")
        shrink_png(path)
        paths.append(path)
    return paths


def shrink_png(path: Path) -> None:
    """A 256-colour palette: slides are flat colours and text, and the screenshots are committed
    (about 40% of Chromium's size, the same look)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256)
    small.save(path, "PNG", optimize=True)


def pdf(browser: str, url: str, out: Path) -> Path:
    _run(browser, ["--virtual-time-budget=10000", "--no-pdf-header-footer", f"--print-to-pdf={out.resolve()}"], url)
    return out


def pdf_pages(path: Path) -> int:
    """Pages in a PDF Chromium printed (its page objects are not compressed)."""
    return len(re.findall(rb"/Type\s*/Page[^s]", path.read_bytes()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--html", default="docs/slides.html")
    p.add_argument("--shots", default="docs/slides", help="folder for NN.png screenshots")
    p.add_argument("--pdf", default="docs/slides.pdf")
    args = p.parse_args(argv)
    page = Path(args.html)
    if not page.is_file():
        raise SystemExit(f"{page} not found: build it with `tinyserve report --slides`")
    browser, url = find_browser(), page.resolve().as_uri()
    verdict = check(browser, url)
    shots = screenshots(browser, url, int(verdict.get("slides") or 0), Path(args.shots))
    print(f"wrote {len(shots)} screenshots into {args.shots}/")
    printed = pdf(browser, url, Path(args.pdf))
    pages = pdf_pages(printed)
    print(f"wrote {printed} ({pages} pages)")
    if pages != verdict.get("slides"):
        verdict["ok"] = False
        verdict.setdefault("problems", []).append({"problem": f"the PDF has {pages} pages, not one per slide"})
    for prob in verdict.get("problems", []):
        print(f"slide {prob.get('slide', '?')}: {prob['problem']}", file=sys.stderr)
    print(f"check: {verdict.get('slides')} slides, {'ok' if verdict.get('ok') else 'FAILED'}")
    return 0 if verdict.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
