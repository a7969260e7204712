"""Per-request records and the serving aggregate, defined exactly as vLLM's `benchmark_serving`.

Keeping the definitions identical lets our numbers sit next to vLLM's without footnotes:

- TTFT  time from sending the request to the first streamed token chunk.
- TPOT  per request, (E2EL - TTFT) / (output_len - 1); requests with output_len <= 1 are left out
        of the TPOT statistics (but count as TPOT = 0 for goodput, as vLLM does).
- ITL   every gap between consecutive streamed chunks, pooled over all successful requests.
- E2EL  time from sending the request to the last streamed chunk.
- Throughputs divide by the whole benchmark duration (wall clock, first send to last finish).
- Goodput: successful requests per second whose every given SLO (ms) is met.
- Token totals and latency statistics use successful requests only; failures are counted apart.

Everything here is a pure function of the records, so it is tested on hand-made timings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES: tuple[float, ...] = (90.0, 99.0)


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `start_time` is relative to the benchmark start."""

    index: int
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    cached_tokens: int | None = None  # of the prompt, found in the server's prefix cache (when its usage says)
    output_len: int = 0
    expected_output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2el: float = 0.0
    start_time: float = 0.0
    conversation_id: str | None = None
    turn: int | None = None
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (out - 1), or None when it is undefined (failed, or out <= 1)."""
        if not self.success or self.output_len <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_len - 1)

    def to_dict(self, include_text: bool = False) -> dict:
        d = asdict(self)
        if not include_text:
            d.pop("generated_text")
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> RequestRecord:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class LatencyStats:
    """Summary of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        d = {f"{prefix}mean_ms": self.mean, f"{prefix}median_ms": self.median, f"{prefix}std_ms": self.std}
        for p, v in self.percentiles.items():
            d[f"{prefix}{percentile_label(p)}_ms"] = v
        return d


@dataclass
class BenchmarkMetrics:
    """The aggregate of one benchmark run (one rate / concurrency point)."""

    completed: int
    failed: int
    total_input: int
    total_output: int
    duration_s: float
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    peak_concurrency: int
    latency: dict[str, LatencyStats]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "latency"}
        for name, stats in self.latency.items():
            d.update(stats.to_dict(prefix=f"{name}_"))
        return d


def percentile_label(p: float) -> str:
    """90 -> 'p90', 99.9 -> 'p99.9'."""
    return f"p{p:g}"


def latency_stats(values_s: Sequence[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> LatencyStats:
    """mean/median/std/percentiles in ms; an empty list gives zeros (vLLM's `np.mean(x or 0)`)."""
    arr = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    return LatencyStats(
        mean=float(np.mean(arr)),
        median=float(np.median(arr)),
        std=float(np.std(arr)),
        percentiles={float(p): float(np.percentile(arr, p)) for p in percentiles},
    )


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once, from [start_time, start_time + e2el] intervals of sent requests."""
    events: list[tuple[float, int]] = []
    for r in records:
        if r.e2el > 0:
            events.append((r.start_time, 1))
            events.append((r.start_time + r.e2el, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end at the same instant frees its slot first
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def is_good(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """True when a successful request meets every SLO; TPOT counts as 0 when out <= 1 (as vLLM)."""
    if not record.success:
        return False
    observed = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2el}
    return all(observed[k] <= slo_ms / 1000.0 for k, slo_ms in slos_ms.items())


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Iterable[float] = DEFAULT_PERCENTILES,
    goodput_slos_ms: Mapping[str, float] | None = None,
) -> BenchmarkMetrics:
    """Aggregate per-request records into vLLM's benchmark_serving metrics."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    validate_slos(goodput_slos_ms or {})
    percentiles = tuple(percentiles)
    ok = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }
    goodput = None
    if goodput_slos_ms:
        goodput = sum(is_good(r, goodput_slos_ms) for r in ok) / duration_s
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        total_input=total_input,
        total_output=total_output,
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s,
        request_goodput=goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        peak_concurrency=peak_concurrency(records),
        latency={name: latency_stats(vals, percentiles) for name, vals in series.items()},
    )


def validate_slos(slos_ms: Mapping[str, float]) -> None:
    for k, v in slos_ms.items():
        if k not in SLO_METRICS:
            raise ValueError(f"unknown SLO metric {k!r}; expected one of {SLO_METRICS}")
        if v < 0:
            raise ValueError(f"SLO {k} must be >= 0 ms, got {v}")


def parse_goodput(items: Iterable[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"goodput SLO must look like 'ttft:500', got {item!r}")
        try:
            slos[key.strip().lower()] = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO value must be a number of ms, got {item!r}") from None
    validate_slos(slos)
    return slos
