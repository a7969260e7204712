"""The deck (`tinyserve report --slides`): built from the repository's result files, 15-20 slides, every
plot an embedded PNG, every slide with notes, a machine and sources that exist; a missing file fails by
name. No browser here, but for the last test (marked `chromium`: `make slides` runs it after installing
Chromium, `make test` leaves it out), which checks that the page's own check mode catches an
overflowing slide and a broken plot."""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import struct
from pathlib import Path

import pytest

from tinyserve_lab import deck, deck_render, deck_slides
from tinyserve_lab.deck_command import run_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
SECTION = re.compile(r"<section\b.*?</section>", re.S)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("deck") / "slides.html"
    deck_slides.build_deck(RESULTS, out, repo_root=REPO)
    return out.read_text()


def _sections(page: str) -> list[str]:
    return SECTION.findall(page)


def test_deck_has_15_to_20_slides_with_one_section_each(page: str) -> None:
    sections = _sections(page)
    assert deck.MIN_SLIDES <= len(sections) <= deck.MAX_SLIDES
    assert len(sections) == len(deck_slides.SLIDES)
    assert page.count("<section") == len(sections)


def test_every_image_is_an_embedded_png(page: str) -> None:
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) >= 12  # most slides carry a plot
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", raw[16:24])  # IHDR
        assert 100 < width <= deck.SLIDE_W and 100 < height <= deck.SLIDE_H


def test_nothing_is_fetched(page: str) -> None:
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "@import" not in page


def test_every_slide_has_notes_a_machine_and_sources_that_exist(page: str) -> None:
    for i, sec in enumerate(_sections(page), 1):
        notes = re.search(r'<aside class="notes">(.*?)</aside>', sec, re.S)
        assert notes and len(notes.group(1).strip()) > 40, f"slide {i}: no notes"
        machine = re.search(r'<div class="machine">(.*?)</div>', sec)
        assert machine and ("Xeon" in machine.group(1) or "EPYC" in machine.group(1)), f"slide {i}: no machine"
        srcs = re.search(r'<div class="sources">(.*?)</div>', sec, re.S)
        assert srcs, f"slide {i}: no source line"
        cited = [html.unescape(line).split(" \u2190 ")[0] for line in srcs.group(1).split("<br>")]
        assert cited and all(c.startswith("docs/results/") for c in cited), cited
        for c in cited:
            assert list(REPO.glob(c)), f"slide {i} cites {c}, which does not exist"
        assert all("<code>" in line for line in srcs.group(1).split("<br>")), f"slide {i}: a source without command"


def test_no_unformatted_placeholders(page: str) -> None:
    """A string that lost its f prefix shows up as {name[...]:.1f} on the slide."""
    for i, sec in enumerate(_sections(page), 1):
        text = re.sub(r'src="[^"]*"', "", sec)
        assert not re.search(r"\{[A-Za-z_][A-Za-z_0-9]*[\[(:.!}]", text), f"slide {i}: {text[:200]}"


def test_numbers_come_from_the_files(page: str) -> None:
    """The headline table carries the served run's throughput, read from the newest files (section AX)."""
    folder = (RESULTS / deck_slides.SERVE_1_5B).parent
    runs = [json.loads(p.read_text()) for p in folder.glob("tinyserve-*conc1-*.json")]
    newest = max(runs, key=lambda d: d["date"])
    first = _sections(page)[0]
    assert f"{newest['metrics']['output_throughput']:.1f}" in first


def test_a_missing_result_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "kv").mkdir()
    results = deck.Results(tmp_path, repo_root=tmp_path)
    with pytest.raises(deck.DeckError, match=r"missing result file.*kv/tiers\.json"):
        deck.build_slides(results, [deck_slides.tiers])
    with pytest.raises(deck.DeckError, match="results directory not found"):
        deck_slides.build_deck(tmp_path / "nowhere", tmp_path / "out.html")


def test_a_file_moved_into_an_archive_folder_is_still_found(tmp_path: Path) -> None:
    moved = tmp_path / "archive" / "2026-11-22" / "baseline-random-rateinf-conc1-20261122T072119.json"
    moved.parent.mkdir(parents=True)
    moved.write_text("{}")
    results = deck.Results(tmp_path, repo_root=tmp_path)
    assert results.find_all("*-random-rateinf-conc*-20261122T*.json") == [moved]
    assert results.find("baseline-random-*.json") == moved


def test_a_slide_mixing_machines_is_refused(tmp_path: Path) -> None:
    for name, cpu in (("a.json", "Intel(R) Xeon(R) Processor"), ("b.json", "AMD EPYC")):
        (tmp_path / name).write_text(json.dumps({"machine": {"cpu_model": cpu}}))

    def both(r: deck.Results) -> deck.Slide:
        r.json("a.json"), r.json("b.json")
        return deck.Slide("mixed", "", "notes")

    with pytest.raises(deck.DeckError, match="mixes machines"):
        deck.build_slides(deck.Results(tmp_path, repo_root=tmp_path), [both])


def test_the_slide_count_is_enforced(tmp_path: Path) -> None:
    def empty(r: deck.Results) -> deck.Slide:
        return deck.Slide("one", "", "notes")

    with pytest.raises(deck.DeckError, match="15-20"):
        deck.build_slides(deck.Results(tmp_path, repo_root=tmp_path), [empty] * 3)


def test_report_slides_flag_writes_the_deck(tmp_path: Path) -> None:
    out = tmp_path / "talk.html"
    args = argparse.Namespace(results=[str(RESULTS)], slides=str(out), out=str(tmp_path), cdf_runs=None,
                              reference_label="baseline")
    assert run_report(args) == {"slides": str(out)}
    assert len(_sections(out.read_text())) == len(deck_slides.SLIDES)


def test_verdict_parsing() -> None:
    dom = '<body><pre id="verdict">{"slides": 2, "ok": false, "problems": [{"slide": 2, ' \
          '"problem": "overflow"}]}</pre></body>'
    assert deck_render.parse_verdict(dom)["problems"][0]["slide"] == 2
    assert deck_render.parse_verdict("<body></body>")["ok"] is False


@pytest.mark.chromium
def test_chromium_check_catches_overflow_and_broken_plots(tmp_path: Path) -> None:
    ok = deck.Slide("fits", "<p>short</p>", "notes", machine="m")
    tall = deck.Slide("too tall", "<p>line</p>" * 80, "notes", machine="m")
    broken = deck.Slide("broken plot", "<p>x</p>", "notes", machine="m", figure="data:image/png;base64,AAAA")
    page = tmp_path / "t.html"
    page.write_text(deck.render_html([ok, tall, broken]))
    verdict = deck_render.check(deck_render.find_browser(), page.resolve().as_uri())
    assert verdict["slides"] == 3 and not verdict["ok"]
    problems = {(p["slide"], p["problem"]) for p in verdict["problems"]}
    assert problems == {(2, "overflow"), (3, "missing plot")}
