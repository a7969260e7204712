"""The results tree: one index entry per directory, a manifest that is never stale, archive/ kept out of
current plots, and no link in the docs pointing at a result file that moved. Fast: no model, no server."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tinyserve_lab import env_info, manifest, report
from tinyserve_lab.env_info import run_header, save_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def test_every_results_directory_is_indexed_and_every_entry_exists() -> None:
    index = manifest.load_index(RESULTS)
    dirs = manifest.result_dirs(RESULTS)
    assert sorted(set(dirs) - set(index)) == [], "add these directories to docs/results/index.toml"
    assert sorted(set(index) - set(dirs)) == [], "index.toml names directories that do not exist"
    assert any(e.status == "archived" for e in index.values())


def test_top_level_holds_only_topic_directories_and_the_manifest() -> None:
    allowed = {manifest.INDEX_NAME, manifest.MANIFEST_MD, manifest.MANIFEST_JSON}
    loose = sorted(p.name for p in RESULTS.iterdir() if p.is_file() and p.name not in allowed)
    assert loose == [], "file these under a topic directory of docs/results (and index.toml)"


def test_index_sections_name_report_headings() -> None:
    sections = manifest.report_sections(ROOT / "docs" / "REPORT.md")
    missing = {name: e.section for name, e in manifest.load_index(RESULTS).items() if e.section not in sections}
    assert missing == {}, "index.toml sections without a `## <id>. ...` heading in docs/REPORT.md"


def test_manifest_in_repo_is_what_the_generator_writes_now() -> None:
    for name, text in manifest.render(RESULTS).items():
        assert (RESULTS / name).read_text() == text, f"{name} is stale: run `tinyserve report --manifest`"


def test_manifest_entries_carry_what_the_files_record() -> None:
    entries = {e["path"]: e for e in manifest.build_manifest(RESULTS)}
    speed2 = entries["speed2"]
    assert speed2["status"] == "current" and speed2["section_heading"].startswith("S2. ")
    assert speed2["dates"] and speed2["dates"][0] >= "2026-11-29" and speed2["commits"]
    assert all("CPUs" in m["machine"] for m in speed2["machines"])
    assert entries["archive/2026-11-22"]["status"] == "archived"
    assert entries["archive/2026-11-22"]["dates"] == ["2026-11-22", "2026-11-22"]
    text = (RESULTS / manifest.MANIFEST_MD).read_text()
    assert str(ROOT) not in text and "/work/" not in text  # the docs stand alone


def test_manifest_reads_a_synthetic_tree(tmp_path: Path) -> None:
    root = tmp_path / "results"
    save_json(run_header("tinyserve_lab.offline/1", engine_torch_threads=3), root / "topic" / "sub", "offline")
    (root / "archive" / "2026-01-01").mkdir(parents=True)
    (root / "archive" / "2026-01-01" / "old-20260101T000000.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    (root / "undocumented").mkdir()
    (root / manifest.INDEX_NAME).write_text(
        '["topic"]\ntitle = "T"\nsection = "S9"\nstatus = "current"\ncommands = ["tinyserve bench offline"]\n'
        '["archive/2026-01-01"]\ntitle = "Old"\nsection = "S0"\nstatus = "archived"\ncommands = []\n')
    entries = {e["path"]: e for e in manifest.build_manifest(root, report_md=tmp_path / "none.md")}
    assert set(entries) == {"topic", "archive/2026-01-01", "undocumented"}
    topic = entries["topic"]
    assert topic["run_threads"] == [3] and topic["records"] == 1 and topic["dates_from"] == "files"
    assert topic["commands_recorded"] == [env_info.command_line()]
    assert entries["archive/2026-01-01"]["dates"] == ["2026-01-01", "2026-01-01"]  # from the file name
    assert entries["archive/2026-01-01"]["records"] == 2
    assert entries["undocumented"]["title"] is None
    assert "**not in index.toml**" in manifest.render(root, tmp_path / "none.md")[manifest.MANIFEST_MD]


def test_index_rejects_an_archived_status_outside_archive(tmp_path: Path) -> None:
    (tmp_path / manifest.INDEX_NAME).write_text(
        '["topic"]\ntitle = "T"\nsection = "S"\nstatus = "archived"\ncommands = []\n')
    with pytest.raises(ValueError, match="archived iff"):
        manifest.load_index(tmp_path)


def test_report_scan_skips_archive(tmp_path: Path) -> None:
    root = tmp_path / "results"
    current = save_json(run_header(report.KV_SCHEMA, markdown="now"), root / "kv", "kv-math")
    archived = save_json(run_header(report.KV_SCHEMA, markdown="then"), root / "archive" / "2026-01-01", "kv-math")
    res = report.load_results([root])
    assert [d["_path"] for d in res.kv] == [str(current)]
    assert [d["_path"] for d in report.load_results([archived.parent]).kv] == [str(archived)]  # named: read
    assert not [p for p in report.result_files(RESULTS) if "archive" in p.relative_to(RESULTS).parts]
    assert [p for p in report.result_files(RESULTS / "archive" / "2026-11-22")]


def test_report_writes_into_the_results_directory_it_read(tmp_path: Path) -> None:
    root = tmp_path / "results" / "topic"
    save_json(run_header(report.KV_SCHEMA, markdown="table"), root, "kv-math")
    out = report.build_report([root])
    assert Path(out["summary"]) == root / "SUMMARY.md" and "table" in (root / "SUMMARY.md").read_text()


def _md_files() -> list[Path]:
    return sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md", *RESULTS.rglob("*.md")])


def test_links_to_results_point_at_existing_files() -> None:
    broken = []
    for md in _md_files():
        for target in LINK.findall(md.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if path.is_relative_to(RESULTS) and not path.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert broken == []


def test_no_docs_link_into_the_old_trees() -> None:
    old = ("docs/speed1/results", "docs/speed2/results", "docs/quant/", "](speed1/results", "](speed2/results",
           "](quant/")
    hits = [f"{md.relative_to(ROOT)}: {o}" for md in _md_files() for o in old if o in md.read_text()]
    assert hits == []


def test_results_record_their_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/x/.venv/bin/tinyserve", "bench", "offline", "--label", "a b"])
    monkeypatch.setattr(sys, "orig_argv", ["/x/.venv/bin/python", "/x/.venv/bin/tinyserve", "bench", "offline"])
    assert env_info.command_line() == "tinyserve bench offline --label 'a b'"
    assert run_header("s/1")["machine"]["command"] == "tinyserve bench offline --label 'a b'"
    monkeypatch.setattr(sys, "argv", ["/repo/src/tinyserve_lab/ablations/routers.py", "--json", "r.json"])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "tinyserve_lab.ablations.routers", "--json", "r.json"])
    assert env_info.command_line() == "python -m tinyserve_lab.ablations.routers --json r.json"
