"""`tinyserve report`: every benchmark result under --results turned into plots and markdown tables.

Reads the JSON files the benchmarks write (by their "schema" field):

- tinyserve_lab.offline/1  `bench offline`: batch-size scaling, tinyserve next to transformers
- tinyserve_lab.serve/1    `bench serve` and `bench peers` (those carry a "peer" block): one file per load point
- tinyserve_lab.peers/1    `bench peers` summary: which peers ran, were skipped or failed
- tinyserve.profile/1        `profile`: the split of a decode step
- tinyserve.kv_math/1        `bench kv-math`: KV bytes per token and the engine allocation check
- tinyserve_lab.quality/1  `bench quality`: perplexity, KLD and greedy agreement vs fp32, memory, speed per mode

and writes beside them, into the results directory it read (or --out): one PNG per idea (batch scaling,
prefill, serving throughput, serving latency, latency CDFs, peers side by side, decode step split, quality
vs weight memory) and SUMMARY.md with the tables, each stating the machine, the thread count and the
dates of the data it shows. When several runs measured the same point, the newest one counts. A kind of
result that is missing skips its section, with a note. A directory named `archive` below a scanned
directory holds older runs and is skipped, so they are not mixed into current plots; name an archived
directory itself to plot it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyserve_lab.manifest import ARCHIVE_DIR

OFFLINE_SCHEMA = "tinyserve_lab.offline/1"
SERVE_SCHEMA = "tinyserve_lab.serve/1"
PEERS_SCHEMA = "tinyserve_lab.peers/1"
PROFILE_SCHEMA = "tinyserve.profile/1"
KV_SCHEMA = "tinyserve.kv_math/1"
QUALITY_SCHEMA = "tinyserve_lab.quality/1"

FIGURES = {
    "offline_decode": "offline_decode_scaling.png",
    "offline_prefill": "offline_prefill_scaling.png",
    "serving_throughput": "serving_throughput.png",
    "serving_latency": "serving_latency.png",
    "latency_cdf": "latency_cdf.png",
    "peers": "peers_side_by_side.png",
    "profile": "profile_decode_split.png",
    "quality": "quality_kld_vs_weights.png",
}
PROFILE_PARTS = ("schedule", "pack", "forward", "sample", "postprocess")
ENGINE_STYLE = {"tinyserve": "-", "hf": "--"}
DPI = 110


# -- loading -----------------------------------------------------------------------------------------
@dataclass
class Results:
    """Every readable result document, by kind; each doc gets `_path` and `_date` (a UTC datetime)."""

    offline: list[dict[str, Any]] = field(default_factory=list)
    serve: list[dict[str, Any]] = field(default_factory=list)
    peers: list[dict[str, Any]] = field(default_factory=list)
    profile: list[dict[str, Any]] = field(default_factory=list)
    kv: list[dict[str, Any]] = field(default_factory=list)
    quality: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # 'path: why'


def _parse_date(value: Any, path: Path) -> dt.datetime:
    """The document's ISO date; the peers summary's %Y%m%dT%H%M%S stamp; else the file's mtime."""
    if isinstance(value, str):
        for parse in (dt.datetime.fromisoformat, lambda s: dt.datetime.strptime(s, "%Y%m%dT%H%M%S")):
            try:
                d = parse(value)
                return d if d.tzinfo else d.replace(tzinfo=dt.UTC)
            except ValueError:
                continue
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)


def result_files(root: Path, pattern: str = "*.json") -> list[Path]:
    """Files under root matching pattern, sorted, except those inside an `archive` directory below root."""
    return [p for p in sorted(root.rglob(pattern)) if ARCHIVE_DIR not in p.relative_to(root).parts[:-1]]


def load_results(dirs: Iterable[Path | str]) -> Results:
    res = Results()
    kinds = {OFFLINE_SCHEMA: res.offline, SERVE_SCHEMA: res.serve, PEERS_SCHEMA: res.peers,
             PROFILE_SCHEMA: res.profile, KV_SCHEMA: res.kv, QUALITY_SCHEMA: res.quality}
    seen: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            res.skipped.append(f"{d}: not a directory")
            continue
        for path in result_files(d):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                res.skipped.append(f"{path}: unreadable ({type(e).__name__})")
                continue
            schema = doc.get("schema") if isinstance(doc, dict) else None
            if schema not in kinds:
                res.skipped.append(f"{path}: unknown schema {schema!r}")
                continue
            doc["_path"], doc["_date"] = str(path), _parse_date(doc.get("date"), path)
            kinds[schema].append(doc)
    return res


def newest(items: Iterable[dict[str, Any]], key: Any) -> list[dict[str, Any]]:
    """One item per key(item): the one with the latest `_date` (ties: the later file name)."""
    best: dict[Any, dict[str, Any]] = {}
    for it in items:
        k = key(it)
        cur = best.get(k)
        if cur is None or (it["_date"], it.get("_path", "")) > (cur["_date"], cur.get("_path", "")):
            best[k] = it
    return list(best.values())


# -- flattening --------------------------------------------------------------------------------------
def offline_points(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every point of every offline sweep, newest per (model, dtype, engine, batch, input, output);
    each gets `series` (the engine, plus dtype/model when the results hold several) and `_doc`."""
    flat = []
    for doc in docs:
        cfg = doc.get("config") or {}
        for p in doc.get("points", []):
            flat.append({**p, "model": doc.get("model", "?"), "dtype": str(cfg.get("dtype", "?")),
                         "_date": doc["_date"], "_path": doc["_path"], "_doc": doc})
    pts = newest(flat, lambda p: (p["model"], p["dtype"], p["engine"], p["batch"], p["input_len"], p["output_len"]))
    many_dtypes = len({p["dtype"] for p in pts}) > 1
    many_models = len({p["model"] for p in pts}) > 1
    for p in pts:
        p["group"] = " ".join(x for x, on in ((p["model"], many_models), (p["dtype"], many_dtypes)) if on)
        p["series"] = f"{p['engine']} {p['group']}".strip()
    return sorted(pts, key=lambda p: (p["group"], p["engine"], p["batch"], p["input_len"], p["output_len"]))


def _rate(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def run_label(run: dict[str, Any]) -> str:
    peer = run.get("peer") or {}
    return str(run.get("label") or peer.get("name") or (run.get("server") or {}).get("model") or "tinyserve")


def serve_runs(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest run per (label, dataset, rate, concurrency), annotated with `_label`, `_rate`, `_conc`, `_panel`."""
    runs = []
    for doc in docs:
        cfg = doc.get("config") or {}
        if "metrics" not in doc:
            continue
        rate, conc = _rate(cfg.get("request_rate", "inf")), cfg.get("max_concurrency")
        if math.isinf(rate):
            panel = (cfg.get("dataset", "?"), "concurrency", "rate inf")
        elif conc is None:
            panel = (cfg.get("dataset", "?"), "rate", "no concurrency cap")
        else:
            panel = (cfg.get("dataset", "?"), "concurrency", f"rate {rate:g} req/s")
        runs.append({**doc, "_label": run_label(doc), "_rate": rate, "_conc": conc, "_panel": panel,
                     "_is_peer": bool(doc.get("peer"))})
    runs = newest(runs, lambda r: (r["_label"], r["_panel"][0], r["_rate"], r["_conc"]))
    return sorted(runs, key=lambda r: (r["_panel"], r["_label"], _load_x(r)))


def _load_x(run: dict[str, Any]) -> float:
    """The load coordinate in its panel: concurrency (None = unlimited = inf) or request rate."""
    if run["_panel"][1] == "concurrency":
        return math.inf if run["_conc"] is None else float(run["_conc"])
    return run["_rate"]


def _load_text(run: dict[str, Any]) -> str:
    x = _load_x(run)
    return "inf" if math.isinf(x) else f"{x:g}"


def profile_rows(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest split per (model, dtype, batch)."""
    flat = []
    for doc in docs:
        for batch, s in (doc.get("split") or {}).items():
            flat.append({**s, "batch": int(batch), "model": doc.get("model", "?"),
                         "dtype": str(doc.get("dtype", "?")).replace("torch.", ""),
                         "_date": doc["_date"], "_path": doc["_path"], "_doc": doc})
    return sorted(newest(flat, lambda r: (r["model"], r["dtype"], r["batch"])),
                  key=lambda r: (r["model"], r["dtype"], r["batch"]))


# -- provenance --------------------------------------------------------------------------------------
def _threads(doc: dict[str, Any]) -> str:
    if doc.get("engine_torch_threads") is not None:
        return f"{doc['engine_torch_threads']} engine threads"
    env = (doc.get("peer") or {}).get("env") or {}
    if env.get("OMP_NUM_THREADS"):
        return f"{env['OMP_NUM_THREADS']} server threads"
    m = doc.get("machine") or {}
    if m.get("client_torch_threads") is not None:
        if doc.get("schema") == SERVE_SCHEMA:
            return f"{m['client_torch_threads']} load-generator threads (server's not recorded)"
        return f"{m['client_torch_threads']} torch threads"
    return "threads not recorded"


def provenance(docs: Iterable[dict[str, Any]]) -> str:
    """'Machine: <cpu> (<n> CPUs), <threads>; data from <first> to <last> (UTC).' over the docs shown."""
    docs = list({id(d): d for d in docs}.values())
    if not docs:
        return ""
    machines: dict[str, set[str]] = defaultdict(set)
    for d in docs:
        m = d.get("machine") or {}
        cpus = m.get("affinity_cpus") or m.get("cpu_count")
        name = f"{m.get('cpu_model', 'unknown CPU')}" + (f" ({cpus} CPUs)" if cpus else "")
        if m.get("gpu"):
            name += f" + {m['gpu']}"
        machines[name].add(_threads(d))
    dates = sorted(d["_date"] for d in docs)
    fmt = "%Y-%m-%d %H:%M"
    when = dates[0].strftime(fmt) if dates[0] == dates[-1] else f"{dates[0].strftime(fmt)} to {dates[-1].strftime(fmt)}"
    mach = "; ".join(f"{k}, {', '.join(sorted(v))}" for k, v in sorted(machines.items()))
    return f"_Machine: {mach}. Data: {when} UTC, {len(docs)} result file(s)._\n"


def _commits(docs: Iterable[dict[str, Any]]) -> str:
    out = set()
    for d in docs:
        g = d.get("git") or {}
        if g.get("commit"):
            out.add(g["commit"][:10] + ("+dirty" if g.get("dirty") else ""))
    return ", ".join(sorted(out))


# -- formatting --------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    align = align or ["---:"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


# -- plots -------------------------------------------------------------------------------------------
def _figure(nrows: int = 1, ncols: int = 1, w: float = 6.0, h: float = 4.2) -> tuple[Any, Any]:
    """A pyplot-free Figure (Agg canvas) and a 2-D array of axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    names = sorted(names, key=lambda n: (not str(n).startswith("tinyserve"), names.index(n)))  # ours: always blue
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _log2_ticks(ax: Any, values: Iterable[float], labels: dict[float, str] | None = None) -> None:
    vals = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(vals)
    ax.set_xticklabels([(labels or {}).get(v, f"{v:g}") for v in vals])
    ax.minorticks_off()


def _auto_log_y(ax: Any, values: Iterable[float]) -> None:
    vals = [v for v in values if v and v > 0 and math.isfinite(v)]
    if vals and max(vals) / min(vals) > 30:
        ax.set_yscale("log")


def plot_offline_decode(points: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Decode tok/s vs batch, one panel per input length; color = engine, line style = output length."""
    if not points:
        return None
    input_lens = sorted({p["input_len"] for p in points})
    output_lens = sorted({p["output_len"] for p in points})
    series = sorted({p["series"] for p in points})
    colors = _colors(series)
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v"]
    ncols = min(len(input_lens), 2)
    nrows = -(-len(input_lens) // ncols)
    fig, axes = _figure(nrows, ncols, w=5.8, h=4.2)
    for ax in axes.flat[len(input_lens):]:
        ax.set_visible(False)
    for ax, il in zip(axes.flat, input_lens):
        for s in series:
            for j, ol in enumerate(output_lens):
                pts = sorted((p for p in points if p["series"] == s and p["input_len"] == il and p["output_len"] == ol),
                             key=lambda p: p["batch"])
                if pts:
                    ax.plot([p["batch"] for p in pts], [p["decode_tok_s"] for p in pts], color=colors[s],
                            linestyle=styles[j % len(styles)], marker=markers[j % len(markers)],
                            label=f"{s}, out {ol}")
        _log2_ticks(ax, [p["batch"] for p in points if p["input_len"] == il])
        ax.set_yscale("log")
        ax.set_title(f"input length {il} tokens")
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("decode throughput (tokens/s, log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Offline decode throughput vs batch size (static batch, greedy, ignore EOS)")
    return _save(fig, path)


def plot_offline_prefill(points: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Prefill tok/s vs input length, one line per (engine, batch); mean over output lengths."""
    if not points:
        return None
    agg: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for p in points:
        agg[(p["series"], p["batch"], p["input_len"])].append(p["prefill_tok_s"])
    series = sorted({k[0] for k in agg})
    batches = sorted({k[1] for k in agg})
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    bcolor = {b: cmap(i / max(len(batches) - 1, 1)) for i, b in enumerate(batches)}
    styles = ["-", "--", ":", "-."]
    fig, axes = _figure(1, 1, w=7.5, h=4.8)
    ax = axes[0, 0]
    for i, s in enumerate(series):
        for b in batches:
            xs = sorted(il for (ss, bb, il) in agg if ss == s and bb == b)
            if xs:
                ys = [sum(agg[(s, b, x)]) / len(agg[(s, b, x)]) for x in xs]
                style = ENGINE_STYLE.get(s.split()[0], styles[i % len(styles)])
                ax.plot(xs, ys, color=bcolor[b], linestyle=style, marker="o" if style == "-" else "s",
                        label=f"{s}, batch {b}")
    _log2_ticks(ax, [k[2] for k in agg])
    ax.set_xlabel("input length (tokens per sequence)")
    ax.set_ylabel("prefill throughput (prompt tokens/s)")
    _auto_log_y(ax, [v for vs in agg.values() for v in vs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Offline prefill throughput vs input length\n(color = batch size; solid = tinyserve, dashed = hf)")
    return _save(fig, path)


def _panels(runs: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        out[r["_panel"]].append(r)
    return dict(sorted(out.items()))


def _load_axis(ax: Any, panel: tuple, runs: Sequence[dict[str, Any]]) -> dict[float, float]:
    """x positions for the panel's loads; unlimited (inf) drawn one doubling past the largest."""
    xs = sorted({_load_x(r) for r in runs})
    finite = [x for x in xs if math.isfinite(x)]
    inf_at = max(finite) * 2 if finite else 1.0
    pos = {x: (x if math.isfinite(x) else inf_at) for x in xs}
    labels = {pos[x]: ("unlimited" if panel[1] == "concurrency" else "inf") for x in xs if not math.isfinite(x)}
    if all(v > 0 for v in pos.values()):
        _log2_ticks(ax, pos.values(), labels)
    ax.set_xlabel("max concurrency (requests in flight)" if panel[1] == "concurrency" else "request rate (req/s)")
    return pos


def _panel_title(panel: tuple) -> str:
    return f"{panel[0]} dataset, {panel[2]}"


def plot_serving_throughput(runs: Sequence[dict[str, Any]], path: Path) -> Path | None:
    if not runs:
        return None
    panels = _panels(runs)
    colors = _colors(sorted({r["_label"] for r in runs}))
    ncols = min(len(panels), 2)
    fig, axes = _figure(-(-len(panels) // ncols), ncols, w=6.2, h=4.4)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel, prs) in zip(axes.flat, panels.items()):
        pos = _load_axis(ax, panel, prs)
        for label in sorted({r["_label"] for r in prs}):
            lr = sorted((r for r in prs if r["_label"] == label), key=_load_x)
            ax.plot([pos[_load_x(r)] for r in lr], [r["metrics"]["output_throughput"] for r in lr], marker="o",
                    color=colors[label], label=label)
        ax.set_ylabel("output throughput (tokens/s)")
        ax.set_ylim(bottom=0)
        ax.set_title(_panel_title(panel))
        ax.grid(True, alpha=0.3)
        ax.legend(title="server", fontsize=8)
    fig.suptitle("Serving: output token throughput vs load")
    return _save(fig, path)


def plot_serving_latency(runs: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """TTFT and TPOT, p50 (solid) and p99 (dashed), vs load: one row per panel."""
    if not runs:
        return None
    panels = _panels(runs)
    colors = _colors(sorted({r["_label"] for r in runs}))
    fig, axes = _figure(len(panels), 2, w=6.0, h=4.2)
    for row, (panel, prs) in zip(axes, panels.items()):
        for ax, metric, title in ((row[0], "ttft", "TTFT"), (row[1], "tpot", "TPOT")):
            pos = _load_axis(ax, panel, prs)
            vals = []
            for label in sorted({r["_label"] for r in prs}):
                lr = sorted((r for r in prs if r["_label"] == label), key=_load_x)
                xs = [pos[_load_x(r)] for r in lr]
                for stat, style, marker in (("median", "-", "o"), ("p99", "--", "x")):
                    ys = [r["metrics"].get(f"{metric}_{stat}_ms") for r in lr]
                    if all(y is None for y in ys):
                        continue
                    ys = [math.nan if y is None else y for y in ys]
                    vals += ys
                    ax.plot(xs, ys, linestyle=style, marker=marker, color=colors[label],
                            label=f"{label} {'p50' if stat == 'median' else stat}")
            _auto_log_y(ax, vals)
            ax.set_ylabel(f"{title} (ms)")
            ax.set_title(f"{title}: {_panel_title(panel)}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Serving latency vs load (solid: p50, dashed: p99)")
    return _save(fig, path)


def choose_cdf_runs(runs: Sequence[dict[str, Any]], selectors: Sequence[str] | None = None,
                    limit: int = 8) -> list[dict[str, Any]]:
    """Runs for the CDF plot. Selectors 'LABEL' or 'LABEL@LOAD' (LOAD: a concurrency, or 'inf'; in a
    rate panel, a rate). Default: in the first panel, the highest load every label reached (else each
    label's highest)."""
    if selectors:
        return [r for r in (match_run(runs, sel) for sel in selectors) if r is not None][:limit]
    if not runs:
        return []
    panels = _panels(runs)
    panel_runs = max(panels.values(), key=lambda prs: (len({r["_label"] for r in prs}), len(prs)))
    labels = sorted({r["_label"] for r in panel_runs})
    common = set.intersection(*({_load_x(r) for r in panel_runs if r["_label"] == lb} for lb in labels))
    chosen = []
    for lb in labels:
        lr = [r for r in panel_runs if r["_label"] == lb]
        pick = [r for r in lr if _load_x(r) == max(common)] if common else []
        chosen.append(pick[0] if pick else max(lr, key=_load_x))
    return chosen[:limit]


def match_run(runs: Sequence[dict[str, Any]], selector: str) -> dict[str, Any] | None:
    """'LABEL@LOAD' -> that run; 'LABEL' -> its highest-load run; None when nothing matches."""
    label, _, load = selector.partition("@")
    cand = [r for r in runs if r["_label"] == label and (not load or _load_text(r) == load)]
    if not cand:
        return None
    return max(cand, key=_load_x) if not load else cand[0]


def plot_latency_cdf(runs: Sequence[dict[str, Any]], path: Path) -> Path | None:
    import numpy as np

    curves = []
    for r in runs:
        ok = [q for q in r.get("requests") or [] if q.get("success")]
        if ok:
            curves.append((r, np.sort([q["e2el"] * 1e3 for q in ok]), np.sort([q["ttft"] * 1e3 for q in ok])))
    if not curves:
        return None
    colors = _colors([f"{r['_label']}@{_load_text(r)}" for r, _, _ in curves])
    fig, axes = _figure(1, 2, w=6.0, h=4.4)
    for ax, idx, title in ((axes[0, 0], 1, "End-to-end latency"), (axes[0, 1], 2, "Time to first token")):
        allv = []
        for c in curves:
            r, vals = c[0], c[idx]
            allv += list(vals)
            y = np.arange(1, len(vals) + 1) / len(vals)
            key = f"{r['_label']}@{_load_text(r)}"
            load = f"conc {_load_text(r)}" if r["_panel"][1] == "concurrency" else f"rate {_load_text(r)}"
            ax.step(vals, y, where="post", color=colors[key], label=f"{r['_label']} ({load}, n={len(vals)})")
        _auto_log_x(ax, allv)
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.5, color="gray", linewidth=0.6, linestyle=":")
        ax.axhline(0.99, color="gray", linewidth=0.6, linestyle=":")
        ax.set_title(f"CDF: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    datasets = sorted({r["_panel"][0] for r, _, _ in curves})
    fig.suptitle(f"Per-request latency distributions ({', '.join(datasets)}; dotted: p50, p99)")
    return _save(fig, path)


def _auto_log_x(ax: Any, values: Sequence[float]) -> None:
    vals = [v for v in values if v > 0]
    if vals and max(vals) / min(vals) > 30:
        ax.set_xscale("log")


def peer_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs from `bench peers`; without any, every serve run when at least two servers were measured."""
    peers = [r for r in runs if r["_is_peer"]]
    if peers:
        return peers
    return list(runs) if len({r["_label"] for r in runs}) > 1 else []


def plot_peers(runs: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars at each load: output tok/s and TPOT p50 per peer."""
    runs = peer_runs(runs)
    if not runs:
        return None
    import numpy as np

    panels = _panels(runs)
    labels = sorted({r["_label"] for r in runs}, key=lambda lb: (lb != "tinyserve", lb))
    colors = _colors(labels)
    fig, axes = _figure(len(panels), 2, w=6.4, h=4.2)
    width = 0.8 / len(labels)
    for row, (panel, prs) in zip(axes, panels.items()):
        loads = sorted({_load_x(r) for r in prs})
        for ax, key, ylabel in ((row[0], "output_throughput", "output throughput (tokens/s)"),
                                (row[1], "tpot_median_ms", "TPOT p50 (ms)")):
            for i, lb in enumerate(labels):
                by_load = {_load_x(r): r for r in prs if r["_label"] == lb}
                xs = np.arange(len(loads)) + (i - (len(labels) - 1) / 2) * width
                ys = [by_load[x]["metrics"].get(key, math.nan) if x in by_load else math.nan for x in loads]
                bars = ax.bar(xs, ys, width=width, color=colors[lb], label=lb)
                ax.bar_label(bars, labels=[_f(y, ".0f") if not math.isnan(y) else "" for y in ys], fontsize=7)
            ax.set_xticks(np.arange(len(loads)))
            ax.set_xticklabels(["unlimited" if math.isinf(x) else f"{x:g}" for x in loads])
            ax.set_xlabel("max concurrency" if panel[1] == "concurrency" else "request rate (req/s)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel.split(' (')[0]}: {_panel_title(panel)}")
            top = max((r["metrics"].get(key) or 0.0 for r in prs), default=0.0)
            if top > 0:
                ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(title="peer", fontsize=8, ncol=len(labels), loc="upper right")
    fig.suptitle("Peers side by side (same workload, one server at a time)")
    return _save(fig, path)


def plot_profile(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Stacked ms per decode step by phase, one bar per (dtype, batch)."""
    if not rows:
        return None
    import numpy as np

    parts = list(PROFILE_PARTS) + ["other"]
    colors = _colors(parts)
    many_models = len({r["model"] for r in rows}) > 1
    xlabels = [f"{r['model'] + chr(10) if many_models else ''}{r['dtype']}\nbatch {r['batch']}" for r in rows]
    fig, axes = _figure(1, 1, w=max(6.0, 1.3 * len(rows) + 2), h=4.8)
    ax = axes[0, 0]
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for part in parts:
        ms = []
        for r in rows:
            shares = r.get("share_pct") or {}
            if part == "other":
                share = max(0.0, 100 - sum(shares.get(p, 0.0) for p in PROFILE_PARTS))
            else:
                share = shares.get(part, 0.0)
            ms.append(r["ms_per_step"] * share / 100)
        ax.bar(x, ms, bottom=bottom, color=colors[part], label=part, width=0.6)
        bottom += np.array(ms)
    for xi, r in zip(x, rows):
        fwd = (r.get("share_pct") or {}).get("forward", 0.0)
        ax.annotate(f"{r['ms_per_step']:.1f} ms\nforward {fwd:.0f}%\n{_f(r.get('gbs'))} GB/s",
                    (xi, r["ms_per_step"]), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                    textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels(xlabels, fontsize=8)
    ax.set_ylabel("time per decode step (ms)")
    ax.set_ylim(0, max(r["ms_per_step"] for r in rows) * 1.3)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="phase", fontsize=8, loc="upper left")
    ax.set_title("Where a decode step goes (engine step split)")
    return _save(fig, path)


def plot_quality(docs: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Mean KLD from fp32 vs weight MiB per mode (newest run): filled at the packed size, hollow as held
    (with the dense copies the engine keeps for large steps). Exact modes (KLD 0) sit on the floor."""
    if not docs:
        return None
    modes = max(docs, key=lambda d: d["_date"])["modes"]
    positive = [r["kld_mean"] for r in modes if r["kld_mean"] > 0]
    floor = min(positive) / 10 if positive else 1e-6
    colors = _colors([r["mode"] for r in modes])
    fig, axes = _figure(1, 1, w=7.5, h=4.8)
    ax = axes[0, 0]
    for r in modes:
        y = r["kld_mean"] if r["kld_mean"] > 0 else floor
        packed, held = r["weight_bytes_packed"] / 2**20, r["weight_bytes"] / 2**20
        c = colors[r["mode"]]
        ax.plot([packed, held], [y, y], color=c, linewidth=0.8, alpha=0.6)
        ax.scatter([packed], [y], color=c, s=40, zorder=3,
                   label=f"{r['mode']} (PPL {r['ppl']:.3f}, {r['ppl_delta_pct']:+.2f}%)")
        if held > packed:
            ax.scatter([held], [y], facecolors="none", edgecolors=c, s=40, zorder=3)
        ax.annotate(r["mode"] + (" (KLD 0)" if r["kld_mean"] <= 0 else ""), (packed, y), xytext=(4, 4),
                    textcoords="offset points", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("weight memory (MiB): filled = packed, hollow = as held (+ dense copies)")
    ax.set_ylabel("mean KL(P_fp32 || P_mode) per token (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Quality vs weight memory per precision mode")
    return _save(fig, path)


# -- tables ------------------------------------------------------------------------------------------
def _cell(p: dict[str, Any] | None, key: str, fmt: str = ".1f") -> str:
    return _f(p.get(key), fmt) if p else "-"


def offline_section(points: Sequence[dict[str, Any]]) -> str:
    out = ["## Offline sweep (batch-size scaling)\n"]
    docs = [p["_doc"] for p in points]
    out.append(provenance(docs))
    newest_doc = max(docs, key=lambda d: d["_date"])
    if newest_doc.get("ceilings"):
        c = newest_doc["ceilings"]
        out.append("_Ceilings (newest run): " + ", ".join(f"{k} {v}" for k, v in c.items()) + "._\n")
    for group in sorted({p["group"] for p in points}):
        gp = [p for p in points if p["group"] == group]
        if group:
            out.append(f"\n### {group}\n")
        by = {(p["engine"], p["batch"], p["input_len"], p["output_len"]): p for p in gp}
        keys = sorted({k[1:] for k in by})
        header = ["batch", "input", "output", "tinyserve prefill tok/s", "tinyserve decode tok/s", "tinyserve e2e s",
                  "tinyserve peak MB", "tinyserve decode GB/s", "hf prefill tok/s", "hf decode tok/s", "hf e2e s",
                  "hf peak MB", "decode tinyserve/hf", "e2e speedup (hf/tinyserve)"]
        rows = []
        for b, il, ol in keys:
            t, h = by.get(("tinyserve", b, il, ol)), by.get(("hf", b, il, ol))
            rows.append([b, il, ol, _cell(t, "prefill_tok_s", ".0f"), _cell(t, "decode_tok_s"),
                         _cell(t, "e2e_s", ".2f"), _cell(t, "peak_mem_mb", ".0f"), _cell(t, "decode_gbs"),
                         _cell(h, "prefill_tok_s", ".0f"),
                         _cell(h, "decode_tok_s"), _cell(h, "e2e_s", ".2f"), _cell(h, "peak_mem_mb", ".0f"),
                         _f(_ratio(t and t["decode_tok_s"], h and h["decode_tok_s"]), ".2f"),
                         _f(_ratio(h and h["e2e_s"], t and t["e2e_s"]), ".2f")])
        out.append(_md_table(header, rows))
    out.append("\nPrefill tok/s = prompt tokens / time until every sequence has its first token; decode tok/s = "
               "tokens generated after that / the rest of the time; ratios > 1 favour tinyserve.\n")
    return "\n".join(out)


def serving_section(runs: Sequence[dict[str, Any]], peers_docs: Sequence[dict[str, Any]],
                    reference: str | None) -> str:
    out = ["## Serving (online load)\n", provenance(runs)]
    has_ref = reference is not None and any(r["_label"] == reference for r in runs)
    ref = {(r["_panel"], _load_x(r)): r["metrics"]["output_throughput"]
           for r in runs if has_ref and r["_label"] == reference}
    header = ["server", "dataset", "rate (req/s)", "max conc.", "ok / failed", "req/s", "out tok/s"]
    header += [f"x {reference}"] if has_ref else []
    header += ["TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "E2E p99 ms"]
    rows = []
    for r in runs:
        m = r["metrics"]
        row = [r["_label"], r["_panel"][0], "inf" if math.isinf(r["_rate"]) else f"{r['_rate']:g}",
               "unlimited" if r["_conc"] is None else r["_conc"], f"{m.get('completed', 0)} / {m.get('failed', 0)}",
               _f(m.get("request_throughput"), ".2f"), _f(m.get("output_throughput"))]
        if has_ref:
            row.append(_f(_ratio(m.get("output_throughput"), ref.get((r["_panel"], _load_x(r)))), ".2f"))
        row += [_f(m.get("ttft_median_ms")), _f(m.get("ttft_p99_ms")), _f(m.get("tpot_median_ms")),
                _f(m.get("tpot_p99_ms")), _f(m.get("e2el_p99_ms"))]
        rows.append(row)
    out.append(_md_table(header, rows, ["---", "---"] + ["---:"] * (len(header) - 2)))
    weights = {r["_label"]: (r.get("peer") or {}).get("weights") for r in runs if (r.get("peer") or {}).get("weights")}
    if weights:
        out.append("\nWeights: " + "; ".join(f"{k}: {v}" for k, v in sorted(weights.items())) + ".\n")
    notes = []
    for doc in sorted(peers_docs, key=lambda d: d["_date"])[-1:]:  # the newest peers sweep says who did not run
        for name, o in (doc.get("peers") or {}).items():
            if o.get("status") != "ok":
                first_line = (o.get("message") or "").splitlines()[0] if o.get("message") else ""
                notes.append(f"- {name}: {o.get('status')}: {first_line}")
    if notes:
        out.append("\nPeers that did not complete in the newest `bench peers` run:\n" + "\n".join(notes) + "\n")
    out.append("\nTTFT: send to first token; TPOT: (E2E - TTFT) / (output tokens - 1), per request; latency "
               "statistics over successful requests (vLLM's definitions, tinyserve_lab/metrics.py).\n")
    return "\n".join(out)


def profile_section(rows: Sequence[dict[str, Any]]) -> str:
    docs = [r["_doc"] for r in rows]
    out = ["## Decode step split (`tinyserve profile`)\n", provenance(docs)]
    header = ["model", "dtype", "batch", "ms/step", *(f"{p} %" for p in PROFILE_PARTS), "other %", "GB/s", "GFLOP/s"]
    table = []
    for r in rows:
        s = r.get("share_pct") or {}
        other = max(0.0, 100 - sum(s.get(p, 0.0) for p in PROFILE_PARTS))
        table.append([r["model"], r["dtype"], r["batch"], _f(r["ms_per_step"]),
                      *(_f(s.get(p, 0.0)) for p in PROFILE_PARTS), _f(other), _f(r.get("gbs")),
                      _f(r.get("gflops"), ".0f")])
    out.append(_md_table(header, table, ["---", "---"] + ["---:"] * (len(header) - 2)))
    newest_doc = max(docs, key=lambda d: d["_date"])
    if newest_doc.get("ceilings"):
        ceilings = ", ".join(f"{k} {v}" for k, v in newest_doc["ceilings"].items())
        out.append(f"\n_Ceilings (newest run): {ceilings}._\n")
    return "\n".join(out)


def kv_section(kv_docs: Sequence[dict[str, Any]]) -> str:
    """The newest `bench kv-math` result; without one, the formula for the published models (no engine check)."""
    out = ["## KV cache size\n"]
    if kv_docs:
        doc = max(kv_docs, key=lambda d: d["_date"])
        out.append(provenance([doc]))
        out.append(doc.get("markdown") or "")
        return "\n".join(out)
    from tinyserve_lab import kv_math

    try:
        models = [kv_math.bundled_config()] + list(kv_math.PUBLISHED)
    except (OSError, ValueError):
        models = list(kv_math.PUBLISHED)
    out.append("_No `tinyserve bench kv-math` result found: computed from the formula now; the engine "
               "allocation check was not run._\n")
    out.append(kv_math.markdown_table(kv_math.kv_table(models)))
    return "\n".join(out)


def quality_section(docs: Sequence[dict[str, Any]]) -> str:
    """The newest `bench quality` run's table (formatted by tinyserve_lab/quality.py, as the terminal shows it)."""
    from tinyserve_lab.quality import markdown_table

    doc = max(docs, key=lambda d: d["_date"])
    return "\n".join(["## Quality per precision mode (`tinyserve bench quality`)\n", provenance([doc]),
                      markdown_table(doc)])


# -- driver ------------------------------------------------------------------------------------------
def build_report(result_dirs: Sequence[Path | str], out_dir: Path | str | None = None,
                 cdf_runs: Sequence[str] | None = None, reference: str | None = "baseline") -> dict[str, Any]:
    """Load, plot, write SUMMARY.md into out_dir (default: the first results directory, so plots sit beside
    their data). Returns {'figures': {name: path}, 'summary': path, 'notes': [...]}."""
    res = load_results(result_dirs)
    fig_dir = Path(out_dir if out_dir is not None else result_dirs[0])
    fig_dir.mkdir(parents=True, exist_ok=True)
    points = offline_points(res.offline)
    runs = serve_runs(res.serve)
    prof = profile_rows(res.profile)
    cdf = choose_cdf_runs(runs, cdf_runs)
    unmatched = [sel for sel in cdf_runs or () if match_run(runs, sel) is None]

    plotters = {
        "offline_decode": (plot_offline_decode, points, "no offline sweep results (`tinyserve bench offline`)"),
        "offline_prefill": (plot_offline_prefill, points, "no offline sweep results (`tinyserve bench offline`)"),
        "serving_throughput": (plot_serving_throughput, runs, "no serving results (`tinyserve bench serve`/`peers`)"),
        "serving_latency": (plot_serving_latency, runs, "no serving results (`tinyserve bench serve`/`peers`)"),
        "latency_cdf": (plot_latency_cdf, cdf, "no per-request records in the chosen serving runs"),
        "peers": (plot_peers, runs, "no peer results (`tinyserve bench peers`) and fewer than two servers measured"),
        "profile": (plot_profile, prof, "no profile results (`tinyserve profile`)"),
        "quality": (plot_quality, res.quality, "no quality results (`tinyserve bench quality`)"),
    }
    figures: dict[str, Path] = {}
    notes: list[str] = [f"--cdf-runs {sel!r} matched no serving run (LABEL@LOAD, e.g. tinyserve@8 or "
                        f"tinyserve@inf)." for sel in unmatched]
    for name, (fn, data, why) in plotters.items():
        path = fn(data, fig_dir / FIGURES[name])
        if path is None:
            notes.append(f"{FIGURES[name]} not drawn: {why}.")
        else:
            figures[name] = path

    def img(name: str, alt: str) -> str:
        return f"![{alt}]({FIGURES[name]})\n" if name in figures else ""

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    all_docs = res.offline + res.serve + res.profile + res.kv + res.quality
    parts = [f"# Benchmark summary\n\nGenerated by `tinyserve report` on {now} from {len(all_docs)} result file(s) "
             f"in {', '.join(str(d) for d in result_dirs)} ({ARCHIVE_DIR}/ skipped). Image paths are relative to this "
             f"file. Where several runs measured one point, the newest is shown."
             + (f" Code: {_commits(all_docs)}." if _commits(all_docs) else "") + "\n"]
    if points:
        parts.append(offline_section(points))
        parts.append(img("offline_decode", "decode tok/s vs batch")
                     + img("offline_prefill", "prefill tok/s vs input length"))
    else:
        parts.append("## Offline sweep\n\n_Skipped: no `tinyserve_lab.offline/1` results._\n")
    if runs:
        parts.append(serving_section(runs, res.peers, reference))
        parts.append(img("serving_throughput", "output tok/s vs load") + img("serving_latency", "TTFT/TPOT vs load"))
        if "latency_cdf" in figures:
            parts.append("Latency CDFs for: " + ", ".join(f"{r['_label']} at {_load_text(r)}" for r in cdf) + ".\n\n"
                         + img("latency_cdf", "latency CDFs"))
        if "peers" in figures:
            parts.append(img("peers", "peers side by side"))
    else:
        parts.append("## Serving\n\n_Skipped: no `tinyserve_lab.serve/1` results._\n")
    if prof:
        parts.append(profile_section(prof))
        parts.append(img("profile", "decode step split"))
    else:
        parts.append("## Decode step split\n\n_Skipped: no `tinyserve.profile/1` results._\n")
    parts.append(kv_section(res.kv))
    if res.quality:
        parts.append(quality_section(res.quality))
        parts.append(img("quality", "KLD vs weight memory per mode"))
    else:
        parts.append("## Quality per precision mode\n\n_Skipped: no `tinyserve_lab.quality/1` results._\n")
    if notes or res.skipped:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes + [f"ignored {s}" for s in res.skipped]) + "\n")
    summary = fig_dir / "SUMMARY.md"
    summary.write_text("\n".join(p for p in parts if p))
    return {"figures": {k: str(v) for k, v in figures.items()}, "summary": str(summary), "notes": notes,
            "skipped": res.skipped}


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", nargs="+", default=["docs/results"],
                   help="directories searched (recursively) for result JSON files")
    p.add_argument("--out", default=None,
                   help="where the plots and SUMMARY.md go (default: the first --results directory)")
    p.add_argument("--cdf-runs", nargs="+", default=None, metavar="LABEL[@LOAD]",
                   help="serving runs for the latency CDFs, e.g. tinyserve@8 llamacpp@8 "
                        "(default: each server at the highest load all of them reached)")
    p.add_argument("--reference-label", default="baseline",
                   help="server the serving table's throughput ratio column is relative to (if present)")
    p.add_argument("--manifest", action="store_true",
                   help="instead of plots: write MANIFEST.md and manifest.json for the results tree given by "
                        "--results (one entry per directory, merged with its index.toml)")


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    if args.manifest:
        from tinyserve_lab.manifest import write_manifest

        paths = write_manifest(args.results[0])
        for path in paths:
            print(f"wrote {path}")
        return {"manifest": [str(p) for p in paths]}
    out = build_report(args.results, args.out, args.cdf_runs, args.reference_label)
    for path in out["figures"].values():
        print(f"wrote {path}")
    print(f"wrote {out['summary']}")
    for n in out["notes"]:
        print(f"note: {n}")
    if out["skipped"]:
        print(f"ignored {len(out['skipped'])} file(s); see the Notes section of SUMMARY.md")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_args(parser)
    return run_report(parser.parse_args(argv))


if __name__ == "__main__":
    main()
