"""vLLM benchmark_serving metric arithmetic on hand-computed synthetic timings."""

import math

import pytest

from tinyserve_lab.metrics import (
    RequestRecord,
    compute_metrics,
    is_good,
    latency_stats,
    parse_goodput,
    peak_concurrency,
)


def records() -> list[RequestRecord]:
    return [
        # TPOT = (0.3 - 0.1) / 4 = 0.05
        RequestRecord(0, True, prompt_len=10, output_len=5, ttft=0.1, itl=[0.05] * 4, e2el=0.3, start_time=0.0),
        # TPOT = (0.4 - 0.2) / 2 = 0.1
        RequestRecord(1, True, prompt_len=20, output_len=3, ttft=0.2, itl=[0.1, 0.1], e2el=0.4, start_time=0.5),
        # one output token: no TPOT (but TPOT = 0 for goodput)
        RequestRecord(2, True, prompt_len=30, output_len=1, ttft=0.3, itl=[], e2el=0.3, start_time=0.6),
        # failed: its prompt does not count, nor its timings
        RequestRecord(3, False, error="HTTP 500", prompt_len=40, output_len=0, ttft=0.05, start_time=0.7),
    ]


def test_counts_and_throughputs():
    m = compute_metrics(records(), duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input, m.total_output) == (60, 9)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(34.5)
    assert m.request_goodput is None
    assert m.peak_concurrency == 2  # [0.5, 0.9] overlaps [0.6, 0.9]; [0, 0.3] is alone


def test_per_request_tpot():
    rs = records()
    assert rs[0].tpot == pytest.approx(0.05)
    assert rs[1].tpot == pytest.approx(0.1)
    assert rs[2].tpot is None and rs[3].tpot is None


def test_latency_statistics_in_ms():
    lat = compute_metrics(records(), duration_s=2.0).latency
    ttft = lat["ttft"]  # [100, 200, 300]
    assert ttft.mean == pytest.approx(200) and ttft.median == pytest.approx(200)
    assert ttft.std == pytest.approx(math.sqrt(20000 / 3))  # population std, like np.std
    assert ttft.percentiles[90.0] == pytest.approx(280)  # linear interpolation
    assert ttft.percentiles[99.0] == pytest.approx(298)
    tpot = lat["tpot"]  # [50, 100]: the 1-token request is excluded
    assert (tpot.mean, tpot.median, tpot.std) == pytest.approx((75, 75, 25))
    assert tpot.percentiles[90.0] == pytest.approx(95)
    itl = lat["itl"]  # pooled gaps [50]*4 + [100]*2
    assert itl.mean == pytest.approx(400 / 6)
    assert itl.median == pytest.approx(50)
    assert itl.std == pytest.approx(math.sqrt((4 * (50 / 3) ** 2 + 2 * (100 / 3) ** 2) / 6))
    assert itl.percentiles[99.0] == pytest.approx(100)
    e2el = lat["e2el"]  # [300, 400, 300]
    assert e2el.mean == pytest.approx(1000 / 3) and e2el.median == pytest.approx(300)


def test_configurable_percentiles_in_dict():
    d = compute_metrics(records(), duration_s=2.0, percentiles=(50, 99.9)).to_dict()
    assert d["ttft_p50_ms"] == pytest.approx(200)
    assert d["ttft_p99.9_ms"] == pytest.approx(299.8)
    assert "ttft_p90_ms" not in d
    assert d["failed"] == 1 and d["e2el_median_ms"] == pytest.approx(300)


def test_goodput():
    rs = records()
    assert compute_metrics(rs, 2.0, goodput_slos_ms={"ttft": 250}).request_goodput == pytest.approx(1.0)  # r0, r1
    # TPOT 60 ms: r0 (50) and r2 (counts as 0) pass, r1 (100) fails; with TTFT 250 only r0 is left
    assert compute_metrics(rs, 2.0, goodput_slos_ms={"tpot": 60}).request_goodput == pytest.approx(1.0)
    assert compute_metrics(rs, 2.0, goodput_slos_ms={"ttft": 250, "tpot": 60}).request_goodput == pytest.approx(0.5)
    assert compute_metrics(rs, 4.0, goodput_slos_ms={"e2el": 350}).request_goodput == pytest.approx(0.5)
    assert not is_good(rs[3], {"ttft": 1e9})  # a failure is never good, however fast


def test_all_failed_gives_zeros_not_errors():
    rs = [RequestRecord(i, False, error="boom", prompt_len=5) for i in range(3)]
    m = compute_metrics(rs, 1.0, goodput_slos_ms={"ttft": 100})
    assert (m.completed, m.failed, m.total_input, m.total_output) == (0, 3, 0, 0)
    assert m.request_goodput == 0.0 and m.latency["ttft"].mean == 0.0
    assert m.peak_concurrency == 0


def test_input_validation():
    with pytest.raises(ValueError):
        compute_metrics(records(), duration_s=0)
    with pytest.raises(ValueError):
        compute_metrics(records(), 1.0, goodput_slos_ms={"latency": 5})
    assert parse_goodput(["ttft:500", "TPOT:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["ttft:fast"], ["itl:5"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_latency_stats_and_peak_helpers():
    s = latency_stats([0.001, 0.002, 0.003, 0.004], percentiles=[25])
    assert s.percentiles[25.0] == pytest.approx(1.75) and s.median == pytest.approx(2.5)
    back_to_back = [RequestRecord(0, True, e2el=1.0, start_time=0.0), RequestRecord(1, True, e2el=1.0, start_time=1.0)]
    assert peak_concurrency(back_to_back) == 1  # one ends as the next starts


def test_record_round_trip_drops_text_by_default():
    r = RequestRecord(7, True, output_len=2, ttft=0.1, itl=[0.2], e2el=0.3, generated_text="hi", turn=1)
    assert "generated_text" not in r.to_dict()
    assert RequestRecord.from_dict(r.to_dict(include_text=True)) == r
