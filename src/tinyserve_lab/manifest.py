"""`tinyserve report --manifest`: docs/results/MANIFEST.md and manifest.json, one entry per results directory.

Each entry answers what (title and docs/REPORT.md section), when (the date range of its runs), on which
machine (CPU model, cores, threads, GPU), from which commit(s) and by which command(s). The facts come from
the result files themselves (every lab instrument writes a `machine` block, a `git` block, a date and, since
the manifest exists, the command line: env_info.py); what they do not record comes from the checked-in index,
docs/results/index.toml. The output depends only on the files in the tree (no clock, no mtimes, no absolute
paths), so tests/test_results_tree.py can regenerate it and compare it with the committed one.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHIVE_DIR = "archive"  # older runs, kept for the record; `tinyserve report` skips it when scanning the tree
INDEX_NAME = "index.toml"
MANIFEST_MD = "MANIFEST.md"
MANIFEST_JSON = "manifest.json"
STATUSES = ("current", "archived")
DATA_SUFFIXES = (".json", ".jsonl")
_STAMP = re.compile(r"(?<!\d)(20\d{6})(?:T(\d{6}))?(?!\d)")  # 20261129 or 20261129T214633 in a file name
_HEX = re.compile(r"^[0-9a-f]{7,40}$")
_RUN_THREAD_KEYS = ("threads", "torch_threads", "engine_torch_threads", "num_threads")


@dataclass
class IndexEntry:
    """What a person wrote down for one directory: the facts no result file records."""

    title: str
    section: str
    status: str
    commands: list[str]
    notes: str = ""
    dates: list[str] | None = None  # [first, last] for files that record no date of their own


@dataclass
class DirFacts:
    """What the files of one directory record, summed over every record they hold."""

    files: Counter[str] = field(default_factory=Counter)  # by suffix
    records: int = 0
    unreadable: list[str] = field(default_factory=list)
    dates: set[str] = field(default_factory=set)  # YYYY-MM-DD
    machines: Counter[str] = field(default_factory=Counter)
    client_threads: set[int] = field(default_factory=set)
    run_threads: set[int] = field(default_factory=set)
    commits: set[str] = field(default_factory=set)
    commands: set[str] = field(default_factory=set)


# -- the tree and its index ------------------------------------------------------------------------
def result_dirs(root: Path) -> list[str]:
    """Every results directory, relative to root: each top-level directory, and each one inside archive/."""
    out = [p.name for p in root.iterdir() if p.is_dir() and p.name != ARCHIVE_DIR]
    archive = root / ARCHIVE_DIR
    if archive.is_dir():
        out += [f"{ARCHIVE_DIR}/{p.name}" for p in archive.iterdir() if p.is_dir()]
    return sorted(out)


def load_index(root: Path) -> dict[str, IndexEntry]:
    """docs/results/index.toml, validated: each table a directory, with a title, section, status, commands."""
    raw = tomllib.loads((root / INDEX_NAME).read_text())
    index: dict[str, IndexEntry] = {}
    for name, t in raw.items():
        missing = [k for k in ("title", "section", "status", "commands") if k not in t]
        if missing:
            raise ValueError(f"{INDEX_NAME} [{name!r}] lacks {', '.join(missing)}")
        if t["status"] not in STATUSES:
            raise ValueError(f"{INDEX_NAME} [{name!r}]: status {t['status']!r} is not one of {STATUSES}")
        if (t["status"] == "archived") != name.startswith(f"{ARCHIVE_DIR}/"):
            raise ValueError(f"{INDEX_NAME} [{name!r}]: archived iff under {ARCHIVE_DIR}/")
        dates = t.get("dates")
        if dates is not None and (len(dates) != 2 or not all(re.match(r"^\d{4}-\d{2}-\d{2}$", d) for d in dates)):
            raise ValueError(f"{INDEX_NAME} [{name!r}]: dates must be [first, last] as YYYY-MM-DD")
        index[name] = IndexEntry(str(t["title"]), str(t["section"]), t["status"], [str(c) for c in t["commands"]],
                                 str(t.get("notes", "")), list(dates) if dates else None)
    return index


# -- reading the files -----------------------------------------------------------------------------
def read_records(path: Path) -> list[Any]:
    """Every JSON value in a .json or .jsonl file (also several values written one after another)."""
    text, dec, i = path.read_text(), json.JSONDecoder(), 0
    out: list[Any] = []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        value, i = dec.raw_decode(text, i)
        out.extend(value if isinstance(value, list) else [value])


def _machine_text(m: dict[str, Any]) -> str:
    cpus, affinity = m.get("cpu_count"), m.get("affinity_cpus")
    text = f"{m.get('cpu_model', 'unknown CPU')}, {cpus} CPUs"
    if affinity is not None and affinity != cpus:
        text += f" ({affinity} usable)"
    return text + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")


def _add_record(facts: DirFacts, rec: dict[str, Any]) -> bool:
    """Fold one record in; True when it carried a date of its own."""
    facts.records += 1
    m = rec.get("machine")
    if isinstance(m, dict):
        facts.machines[_machine_text(m)] += 1
        if isinstance(m.get("client_torch_threads"), int):
            facts.client_threads.add(m["client_torch_threads"])
        if isinstance(m.get("command"), str):
            facts.commands.add(m["command"])
    facts.run_threads.update(rec[k] for k in _RUN_THREAD_KEYS if isinstance(rec.get(k), int))
    git: dict[str, Any] = rec["git"] if isinstance(rec.get("git"), dict) else {"commit": rec.get("commit")}
    commit = git.get("commit")
    if isinstance(commit, str) and _HEX.match(commit):
        facts.commits.add(commit[:10] + ("+dirty" if git.get("dirty") else ""))
    if isinstance(rec.get("command"), str):
        facts.commands.add(rec["command"])
    date = rec.get("date")
    if isinstance(date, str) and re.match(r"^\d{4}-\d{2}-\d{2}", date):
        facts.dates.add(date[:10])
        return True
    return False


def scan_dir(path: Path) -> DirFacts:
    """The facts of every file below path; a file whose records carry no date is dated by its name's stamp.
    Servers' logs/ folders are skipped: git ignores them, so a clean clone has none and the manifest
    must not count them."""
    facts = DirFacts()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and "logs" not in p.relative_to(path).parts):
        facts.files[f.suffix or "(none)"] += 1
        stamp = _STAMP.search(f.name)
        dated = False
        if f.suffix in DATA_SUFFIXES:
            try:
                records = read_records(f)
            except (OSError, ValueError) as e:
                facts.unreadable.append(f"{f.relative_to(path)} ({type(e).__name__})")
                records = []
            for rec in records:
                if isinstance(rec, dict):
                    dated = _add_record(facts, rec) or dated
        if not dated and stamp and f.suffix in DATA_SUFFIXES:
            d = stamp.group(1)
            facts.dates.add(f"{d[:4]}-{d[4:6]}-{d[6:]}")
    return facts


# -- the manifest ----------------------------------------------------------------------------------
def report_sections(report_md: Path) -> dict[str, str]:
    """docs/REPORT.md's `## ` headings by section id (the text before the first '. ', else the heading)."""
    out: dict[str, str] = {}
    if not report_md.is_file():
        return out
    for line in report_md.read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            sid = heading.split(". ", 1)[0] if ". " in heading.split(" (", 1)[0] else heading.split(" (", 1)[0]
            out.setdefault(sid, heading)
    return out


def build_manifest(root: Path, report_md: Path | None = None) -> list[dict[str, Any]]:
    """One entry per directory in the index and in the tree, index facts merged with the files' facts."""
    index = load_index(root)
    sections = report_sections(report_md if report_md is not None else root.parent / "REPORT.md")
    entries = []
    for name in sorted(set(index) | set(result_dirs(root))):
        ix, facts = index.get(name), scan_dir(root / name) if (root / name).is_dir() else DirFacts()
        dates = sorted(facts.dates)
        dates_from = "files" if dates else ("index.toml" if ix and ix.dates else None)
        if not dates and ix and ix.dates:
            dates = ix.dates
        entries.append({
            "path": name,
            "title": ix.title if ix else None,
            "section": ix.section if ix else None,
            "section_heading": sections.get(ix.section) if ix else None,
            "status": ix.status if ix else None,
            "exists": (root / name).is_dir(),
            "files": dict(sorted(facts.files.items())),
            "records": facts.records,
            "unreadable": facts.unreadable,
            "dates": [dates[0], dates[-1]] if dates else None,
            "dates_from": dates_from,
            "machines": [{"machine": k, "records": v} for k, v in sorted(facts.machines.items())],
            "client_torch_threads": sorted(facts.client_threads),
            "run_threads": sorted(facts.run_threads),
            "commits": sorted(facts.commits),
            "commands_recorded": sorted(facts.commands),
            "commands_index": ix.commands if ix else [],
            "notes": ix.notes if ix else "",
        })
    return entries


def _cell(items: list[str] | list[int]) -> str:
    return "<br>".join(str(x) for x in items) if items else "not recorded"


def _dates(e: dict[str, Any]) -> str:
    if not e["dates"]:
        return "not recorded"
    text = " to ".join(dict.fromkeys(e["dates"]))
    return text + (" (index.toml)" if e["dates_from"] == "index.toml" else "")


def manifest_markdown(entries: list[dict[str, Any]]) -> str:
    """MANIFEST.md: a table to scan, then per directory its machine(s), commits and commands."""
    out = ["# Results manifest\n",
           "Generated by `tinyserve report --manifest` from the result files and `index.toml` (edit that, then "
           "regenerate; `tests/test_results_tree.py` fails when this file is stale). Machine, threads, dates and "
           f"commits are what the files record; titles, sections and commands come from the index. `{ARCHIVE_DIR}/` "
           "holds older runs: `tinyserve report` skips it when it scans the tree.\n",
           "| directory | what | REPORT.md section | status | runs (UTC dates) | files | machine(s) |",
           "|---|---|---|---|---|---:|---|"]
    for e in entries:
        dates = _dates(e)
        machines = "<br>".join(m["machine"] for m in e["machines"]) or "not recorded"
        out.append(f"| [{e['path']}]({e['path']}) | {e['title'] or '**not in index.toml**'} | "
                   f"{e['section_heading'] or e['section'] or '-'} | {e['status'] or '-'} | {dates} | "
                   f"{sum(e['files'].values())} | {machines} |")
    for e in entries:
        out += [f"\n## {e['path']}\n", f"{e['title'] or '**not in index.toml**'} ({e['status'] or 'no status'}; "
                f"REPORT.md: {e['section_heading'] or e['section'] or '-'}).\n"]
        if e["notes"]:
            out.append(f"{e['notes']}\n")
        files = ", ".join(f"{n} {s}" for s, n in e["files"].items()) or "none"
        out += [f"- Files: {files}; {e['records']} record(s) read.",
                f"- Runs: {_dates(e)}.",
                "- Machine(s): " + ("; ".join(f"{m['machine']} ({m['records']} records)" for m in e["machines"])
                                    or "not recorded") + ".",
                f"- Torch threads: client process {_cell(e['client_torch_threads']).replace('<br>', ', ')}; "
                f"run config {_cell(e['run_threads']).replace('<br>', ', ')}.",
                f"- Commits: {', '.join(e['commits']) or 'not recorded'}."]
        if e["unreadable"]:
            out.append(f"- Not parsed: {', '.join(e['unreadable'])}.")
        if e["commands_recorded"]:
            out.append("- Commands recorded in the files:\n" + "\n".join(f"  - `{c}`" for c in e["commands_recorded"]))
        if e["commands_index"]:
            out.append("- Commands (index.toml):\n" + "\n".join(f"  - `{c}`" for c in e["commands_index"]))
    return "\n".join(out) + "\n"


def render(root: Path, report_md: Path | None = None) -> dict[str, str]:
    """{file name: content} of both manifests, without writing them (the staleness test compares these)."""
    entries = build_manifest(root, report_md)
    return {MANIFEST_MD: manifest_markdown(entries),
            MANIFEST_JSON: json.dumps({"schema": "tinyserve_lab.manifest/1", "entries": entries}, indent=1) + "\n"}


def write_manifest(root: Path | str) -> list[Path]:
    """Write MANIFEST.md and manifest.json into root; returns their paths."""
    root = Path(root)
    paths = []
    for name, text in render(root).items():
        (root / name).write_text(text)
        paths.append(root / name)
    return paths
