"""Prometheus metrics for `/metrics`, in a registry of their own (not the process-global one), so
two servers in one process (tests) never collide and nothing else leaks into our exposition.

Latencies follow vLLM's definitions: TTFT = first token - arrival; E2E = finish - arrival;
TPOT = (E2E - TTFT) / (completion tokens - 1), observed per sequence that produced >= 2 tokens.
Arrival is when the HTTP handler submitted the request, so queueing time is included.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tinyserve.engine.async_engine import EngineStats
from tinyserve.engine.sequence import Sequence
from tinyserve.kv.tiers import TIER_DIRECTIONS

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        self.running = Gauge("tinyserve_requests_running", "Requests with a sequence in the running batch.",
                             labels, registry=r).labels(model_name)
        self.waiting = Gauge("tinyserve_requests_waiting", "Requests waiting to be scheduled.",
                             labels, registry=r).labels(model_name)
        self.kv_usage = Gauge("tinyserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0-1).",
                              labels, registry=r).labels(model_name)
        self.compiled_ready = Gauge("tinyserve_compiled_step_ready", "1 once the compiled decode step serves "
                                    "(0: eager, while it is built in the background, or off).",
                                    labels, registry=r).labels(model_name)
        self.prompt_tokens = Counter("tinyserve_prompt_tokens", "Prompt tokens admitted.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("tinyserve_generation_tokens", "Tokens generated.",
                                         labels, registry=r).labels(model_name)
        # Counters that follow the engine's running totals (EngineStats fields of the same name), in
        # vLLM's shape: prefix-cache hit rate = hits / queries; speculative acceptance rate = accepted /
        # draft tokens, mean accepted length = 1 + accepted / drafts.
        totals = {
            "prefix_cache_queries": "Prompt tokens looked up in the prefix cache (first admissions).",
            "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
            "spec_decode_num_drafts": "Speculative verifications (one per speculating sequence and step).",
            "spec_decode_num_draft_tokens": "Tokens drafted for speculative verification.",
            "spec_decode_num_accepted_tokens": "Drafted tokens the target accepted.",
        }
        self._totals = {name: Counter(f"tinyserve_{name}", doc, labels, registry=r).labels(model_name)
                        for name, doc in totals.items()}
        self._seen = dict.fromkeys(totals, 0)
        # The KV tiers below the pool (kv/tiers.py), by tier (swap, disk) and direction (out of the pool, in).
        tier_labels = labels + ["tier", "direction"]
        self._tier = {
            "blocks": Counter("tinyserve_kv_tier_blocks", "KV blocks moved between the pool and a tier.",
                              tier_labels, registry=r),
            "bytes": Counter("tinyserve_kv_tier_bytes", "Bytes of KV moved between the pool and a tier.",
                             tier_labels, registry=r),
            "seconds": Counter("tinyserve_kv_tier_seconds", "Step-loop time spent moving KV between the pool "
                               "and a tier (the disk's file writes run on their own thread, not counted).",
                               tier_labels, registry=r),
        }
        self._tier_seen: dict[tuple[str, str, str], float] = {}
        for tier, way in TIER_DIRECTIONS:  # visible at 0 from the start
            for counter in self._tier.values():
                counter.labels(model_name, tier, way)
        self.swap_fallbacks = Gauge("tinyserve_kv_swap_fallbacks", "Preemptions recomputed because the swap "
                                    "space was full, since start.", labels, registry=r).labels(model_name)
        self.swap_declined = Gauge("tinyserve_kv_swap_declined", "Preemptions recomputed because recomputing "
                                   "measured cheaper than the swap copies, since start.", labels,
                                   registry=r).labels(model_name)
        self.offload_corrupt = Gauge("tinyserve_kv_offload_corrupt_files", "Disk-tier files found torn or "
                                     "corrupt (skipped and removed), since start.", labels,
                                     registry=r).labels(model_name)
        self.spec_acceptance = Gauge("tinyserve_spec_decode_acceptance_rate", "Drafted tokens accepted / drafted, "
                                     "since start (0 until something is drafted).", labels,
                                     registry=r).labels(model_name)
        self.spec_mean_length = Gauge("tinyserve_spec_decode_mean_accepted_length", "Tokens emitted per speculative "
                                      "verification (accepted drafts + 1), since start.", labels,
                                      registry=r).labels(model_name)
        self._finished = Counter("tinyserve_requests_finished", "Finished sequences by finish reason "
                                 "(stop, length, abort, error); one per choice when n > 1.",
                                 labels + ["finished_reason"], registry=r)
        self._rejected = Counter("tinyserve_requests_rejected", "Requests refused before reaching the engine.",
                                 labels + ["reason"], registry=r)
        self.ttft = Histogram("tinyserve_time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("tinyserve_time_per_output_token_seconds", "Mean time per output token after the first.",
                              labels, buckets=_TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("tinyserve_e2e_request_latency_seconds", "End-to-end request latency.",
                             labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        for reason in ("stop", "length", "abort", "error"):  # visible at 0 from the start
            self._finished.labels(model_name, reason)
        for reason in ("invalid", "queue_full"):
            self._rejected.labels(model_name, reason)

    # Callbacks from the engine thread (prometheus_client is thread-safe).
    def watch_compiled_step(self, status: Callable[[], str]) -> None:
        """Read `status()` (off | building | ready | failed) at every scrape: the build ends on its own thread."""
        self.compiled_ready.set_function(lambda: float(status() == "ready"))

    def on_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        for name, counter in self._totals.items():
            value = getattr(stats, name)
            counter.inc(value - self._seen[name])
            self._seen[name] = value
        for tier, way, *values in stats.kv_tier_traffic:
            for (kind, counter), value in zip(self._tier.items(), values):
                key = (kind, tier, way)
                counter.labels(self.model_name, tier, way).inc(value - self._tier_seen.get(key, 0))
                self._tier_seen[key] = value
        self.swap_fallbacks.set(stats.kv_swap_fallbacks)
        self.swap_declined.set(stats.kv_swap_declined)
        self.offload_corrupt.set(stats.kv_offload_corrupt)
        if stats.spec_decode_num_drafts:
            self.spec_acceptance.set(stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens)
            self.spec_mean_length.set(1 + stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_drafts)

    def on_step(self, new_tokens: int) -> None:
        if new_tokens:
            self.generation_tokens.inc(new_tokens)

    def on_finish(self, request_id: str, seqs: list[Sequence], arrival: float) -> None:
        """Per request: TTFT (first token of any choice) and E2E (last choice done); per choice: TPOT
        and the finish reason. Aborted and failed requests count by reason but not in latencies."""
        done = [s for s in seqs if s.finish_reason in ("stop", "length")]
        for seq in seqs:
            self._finished.labels(self.model_name, seq.finish_reason or "abort").inc()
        firsts = [s.first_token_time for s in done if s.first_token_time is not None]
        ends = [s.finish_time for s in done if s.finish_time is not None]
        if not firsts or not ends:
            return
        self.ttft.observe(max(0.0, min(firsts) - arrival))
        self.e2e.observe(max(0.0, max(ends) - arrival))
        for seq in done:
            n = len(seq.output_token_ids)
            if n > 1 and seq.first_token_time is not None and seq.finish_time is not None:
                self.tpot.observe((seq.finish_time - seq.first_token_time) / (n - 1))

    def on_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
