"""`tinyserve report --slides`: the talk as one self-contained HTML file, built from the result files.

Every number on a slide is read from a file under docs/results at build time and every plot is drawn
from those files with matplotlib, so the deck cannot drift from the measurements. Each slide names
its machine (one per slide: mixing machines is refused), cites its result files with the command
that made them, and carries speaker notes (`<aside class="notes">`, hidden in the view).

The slide content lives in `deck_slides.py` (its `build_deck` is the entry point); this module holds the
model (Slide, Source), the file finder, the figure encoder and the HTML writer (inline CSS and JS:
nothing is fetched).
"""

from __future__ import annotations

import base64
import glob
import html
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDE_W, SLIDE_H = 1280, 720
FIG_DPI = 100
MIN_SLIDES, MAX_SLIDES = 15, 20


class DeckError(RuntimeError):
    """A slide cannot be built: a result file it needs is missing or says something unexpected."""


@dataclass(frozen=True)
class Source:
    """Result files (a path or a glob, relative to the repository root) and the command that produced them."""

    path: str
    command: str


@dataclass
class Slide:
    """One `<section>`: title, machine, body HTML, an optional PNG (data URI), sources, notes."""

    title: str
    body: str
    notes: str
    sources: list[Source] = field(default_factory=list)
    machine: str = ""
    figure: str | None = None  # data:image/png;base64,...
    figure_alt: str = ""
    wide: bool = False  # the figure under the text, not beside it


def machine_name(cpu_model: str) -> str:
    """The machine as the slides name it, from a result file's `machine.cpu_model`."""
    if "Xeon" in cpu_model:
        return "Intel Xeon VM (Sapphire Rapids, AMX), 2 cores, torch 2.13.0+cpu"
    if "EPYC" in cpu_model:
        return "AMD EPYC VM (Zen 4, AVX-512, no AMX), 2 cores, torch 2.13.0+cpu"
    return cpu_model


class Results:
    """Finds and reads result files under a root (docs/results); remembers what it read per slide.

    Files are found by a glob relative to the root, then anywhere below it by name, so a file moved into
    an archive folder is still found. A missing file raises DeckError naming the pattern."""

    def __init__(self, root: Path | str, repo_root: Path | str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DeckError(f"results directory not found: {self.root}")
        self.repo_root = Path(repo_root) if repo_root else self.root.resolve().parent.parent
        self.machines: set[str] = set()

    def find(self, pattern: str) -> Path:
        """The newest file (by name) matching `pattern` under the root."""
        hits = sorted(self.root.glob(pattern)) or sorted(self.root.rglob(Path(pattern).name))
        hits = [h for h in hits if h.is_file()]
        if not hits:
            raise DeckError(f"missing result file: no {pattern!r} under {self.root}")
        return hits[-1]

    def find_all(self, pattern: str) -> list[Path]:
        """Every file matching `pattern` under the root; by name anywhere below it when none matches there."""
        hits = sorted(h for h in self.root.glob(pattern) if h.is_file())
        hits = hits or sorted(h for h in self.root.rglob(Path(pattern).name) if h.is_file())
        if not hits:
            raise DeckError(f"missing result files: no {pattern!r} under {self.root}")
        return hits

    def rel(self, path: Path) -> str:
        """The path as the slide cites it: relative to the repository root when below it."""
        try:
            return str(path.resolve().relative_to(self.repo_root.resolve()))
        except ValueError:
            return str(path)

    def json(self, pattern: str | Path) -> dict[str, Any]:
        path = pattern if isinstance(pattern, Path) else self.find(pattern)
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            raise DeckError(f"unreadable result file {path}: {e}") from e
        self._note_machine(doc)
        doc["_path"] = str(path)
        return doc

    def jsonl(self, pattern: str) -> list[dict[str, Any]]:
        path = self.find(pattern)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for r in rows:
            self._note_machine(r)
        return rows

    def _note_machine(self, doc: Any) -> None:
        m = doc.get("machine") if isinstance(doc, dict) else None
        if isinstance(m, dict) and m.get("cpu_model"):
            self.machines.add(machine_name(m["cpu_model"]))
        elif isinstance(m, str):
            self.machines.add(machine_name(m))


SlideBuilder = Callable[[Results], Slide]


# -- figures -----------------------------------------------------------------------------------------
def figure(w: float = 7.2, h: float = 4.6, ncols: int = 1) -> tuple[Any, Any]:
    """A pyplot-free figure sized for the slide's plot area (w x h inches at FIG_DPI)."""
    from tinyserve_lab.report import _figure

    fig, axes = _figure(1, ncols, w / ncols, h)
    return fig, axes[0] if ncols > 1 else axes[0][0]


def png_uri(fig: Any) -> str:
    """The figure as a base64 PNG data URI (embedded: the deck fetches nothing)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bar_labels(ax: Any, bars: Any, fmt: str = "{:.1f}") -> None:
    for b in bars:
        ax.annotate(fmt.format(b.get_height()), (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")


# -- html --------------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: bool = False) -> str:
    """A small HTML table (cells are escaped; pass numbers already formatted); `left`: text columns."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    cls = " class='left'" if left else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CODE = re.compile(r"`([^`]+)`")


def bullets(items: Sequence[str]) -> str:
    """A bullet list; items are HTML (escape user text yourself), `code` in backticks becomes <code>."""
    return "<ul>" + "".join("<li>" + CODE.sub(r"<code>\1</code>", i) + "</li>" for i in items) + "</ul>"


CSS = f"""
* {{ box-sizing: border-box; }}
html, body {{ margin: 0; background: #222; font-family: "DejaVu Sans", Arial, sans-serif; }}
section {{ position: relative; width: {SLIDE_W}px; height: {SLIDE_H}px; overflow: hidden; background: #fff;
  color: #1b1b1b; padding: 28px 44px 0 44px; display: none; flex-direction: column; margin: 0 auto; }}
section.active, body.all section {{ display: flex; }}
body.all section {{ margin-bottom: 16px; }}
h1 {{ font-size: 44px; margin: 60px 0 12px 0; color: #0b4f8a; }}
h2 {{ font-size: 30px; margin: 0 0 6px 0; color: #0b4f8a; }}
.machine {{ font-size: 14px; color: #555; margin-bottom: 12px; }}
.content {{ display: flex; gap: 24px; flex: 1; min-height: 0; }}
.text {{ flex: 1; font-size: 19px; line-height: 1.35; min-width: 0; }}
.text ul {{ margin: 0; padding-left: 22px; }} .text li {{ margin-bottom: 8px; }}
.content.wide {{ flex-direction: column; gap: 8px; }}
.fig {{ flex: 0 0 auto; }} .fig img {{ max-width: 720px; max-height: 470px; display: block; }}
table {{ border-collapse: collapse; font-size: 16px; margin-top: 8px; }}
th, td {{ border-bottom: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child, table.left td, table.left th {{ text-align: left; }} th {{ background: #eef3f8; }}
.sources {{ font-size: 11px; color: #555; border-top: 1px solid #ddd; padding: 6px 0 8px 0; margin-top: 6px;
  font-family: "DejaVu Sans Mono", monospace; word-break: break-all; }}
.text code {{ font-size: 0.85em; background: #f3f3f3; padding: 0 3px; }}
.num {{ position: absolute; right: 16px; bottom: 6px; font-size: 12px; color: #999; }}
aside.notes {{ display: none; }}
body.shownotes section.active aside.notes {{ display: block; position: fixed; left: 0; right: 0;
  top: {SLIDE_H + 8}px; margin: 0 auto; width: {SLIDE_W}px; padding: 10px 16px; background: #fffbe6; color: #222;
  font-size: 18px; line-height: 1.4; }}
@page {{ size: {SLIDE_W}px {SLIDE_H}px; margin: 0; }}
@media print {{ html, body {{ background: #fff; }} section {{ display: flex !important; margin: 0;
  page-break-after: always; break-after: page; }} }}
"""

# ?slide=N: that slide alone (screenshots); ?check=1: every slide shown and measured, the verdict as
# JSON in <pre id="verdict">; otherwise arrows / space / PageUp/Down / Home / End and #N in the URL,
# and `n` shows the speaker notes under the slide (?notes=1 at load).
JS = """
(function () {
  var s = Array.prototype.slice.call(document.querySelectorAll('section'));
  var q = new URLSearchParams(location.search);
  function show(i) {
    i = Math.max(0, Math.min(s.length - 1, i));
    s.forEach(function (e, j) { e.classList.toggle('active', j === i); });
    if (!q.has('slide')) history.replaceState(null, '', '#' + (i + 1));
    cur = i;
  }
  var cur = 0;
  if (q.has('check')) {
    document.body.classList.add('all');
    function verdict() {
      var bad = [];
      s.forEach(function (e, j) {
        var over = e.scrollHeight > e.clientHeight + 1 || e.scrollWidth > e.clientWidth + 1;
        var parts = e.querySelectorAll('.text, .fig, h2, .sources');
        parts.forEach(function (p) {
          var r = p.getBoundingClientRect(), b = e.getBoundingClientRect();
          if (r.bottom > b.bottom + 1 || r.right > b.right + 1) over = true;
        });
        var t = e.querySelector('.text');
        if (t && t.scrollHeight > t.clientHeight + 1) over = true;
        var broken = Array.prototype.filter.call(e.querySelectorAll('img'), function (im) {
          return !im.complete || im.naturalWidth === 0; }).length;
        if (over) bad.push({slide: j + 1, problem: 'overflow'});
        if (broken) bad.push({slide: j + 1, problem: 'missing plot', images: broken});
        if (!e.querySelector('aside.notes')) bad.push({slide: j + 1, problem: 'no notes'});
      });
      var pre = document.createElement('pre');
      pre.id = 'verdict';
      pre.textContent = JSON.stringify({slides: s.length, ok: bad.length === 0, problems: bad});
      document.body.appendChild(pre);
    }
    window.addEventListener('load', verdict);
    return;
  }
  var start = q.has('slide') ? parseInt(q.get('slide'), 10) - 1 : (parseInt(location.hash.slice(1), 10) || 1) - 1;
  show(start);
  if (q.has('notes')) document.body.classList.add('shownotes');
  document.addEventListener('keydown', function (ev) {
    if (['ArrowRight', 'ArrowDown', 'PageDown', ' '].indexOf(ev.key) >= 0) show(cur + 1);
    else if (['ArrowLeft', 'ArrowUp', 'PageUp'].indexOf(ev.key) >= 0) show(cur - 1);
    else if (ev.key === 'Home') show(0);
    else if (ev.key === 'End') show(s.length - 1);
    else if (ev.key === 'n') document.body.classList.toggle('shownotes');
  });
  window.addEventListener('hashchange', function () { show((parseInt(location.hash.slice(1), 10) || 1) - 1); });
})();
"""


def section_html(slide: Slide, number: int, total: int) -> str:
    srcs = "<br>".join(f"{html.escape(s.path)} &larr; <code>{html.escape(s.command)}</code>" for s in slide.sources)
    fig = (f'<div class="fig"><img alt="{html.escape(slide.figure_alt)}" src="{slide.figure}"></div>'
           if slide.figure else "")
    heading = f"<h1>{html.escape(slide.title)}</h1>" if number == 1 else f"<h2>{html.escape(slide.title)}</h2>"
    machine = f'<div class="machine">{html.escape(slide.machine)}</div>' if slide.machine else ""
    return (f'<section id="s{number}">{heading}{machine}'
            f'<div class="content{" wide" if slide.wide else ""}"><div class="text">{slide.body}</div>{fig}</div>'
            f'<div class="sources">{srcs}</div><div class="num">{number} / {total}</div>'
            f'<aside class="notes">{html.escape(slide.notes)}</aside></section>')


def render_html(slides: Sequence[Slide], title: str = "tinyserve") -> str:
    total = len(slides)
    body = "\n".join(section_html(s, i + 1, total) for i, s in enumerate(slides))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n<script>{JS}</script></body></html>\n")


def build_slides(results: Results, builders: Sequence[SlideBuilder]) -> list[Slide]:
    """Each builder run on its own record of machines; a slide that read files from two machines fails."""
    slides = []
    for build in builders:
        results.machines = set()
        slide = build(results)
        if len(results.machines) > 1:
            raise DeckError(f"slide {slide.title!r} mixes machines: {sorted(results.machines)}")
        if not slide.machine and results.machines:
            slide.machine = next(iter(results.machines))
        for src in slide.sources:
            if not glob.glob(str(results.repo_root / src.path)):  # absolute paths too (results outside the repo)
                raise DeckError(f"slide {slide.title!r} cites a missing file: {src.path}")
        slides.append(slide)
    if not MIN_SLIDES <= len(slides) <= MAX_SLIDES:
        raise DeckError(f"{len(slides)} slides: the talk wants {MIN_SLIDES}-{MAX_SLIDES}")
    return slides


def write_deck(results: Results, builders: Sequence[SlideBuilder], out: Path | str) -> Path:
    """Build the slides and write the HTML page; returns its path. DeckError when a result file is missing."""
    slides = build_slides(results, builders)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(slides, "tinyserve: what we built, what it bought, what failed"))
    return out
