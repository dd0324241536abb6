"""scripts/load_run.py's pure parts, on synthetic turns: bucketing, percentiles, phases, the plot."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import load_run  # noqa: E402


def rec(t, ttft_s=0.1, gaps=(0.02, 0.02), cached=10, context=20, error=None, worker="worker-0", handoff=0):
    end = t + (ttft_s or 0) + sum(gaps)
    return {"session": 0, "seq_id": "s", "t": t, "end_s": end, "ttft_s": ttft_s, "itl_s": list(gaps),
            "tokens": 0 if ttft_s is None else len(gaps) + 1, "error": error, "worker": worker,
            "prompt_tokens": 12, "cached_tokens": None if error else cached,
            "context_tokens": None if error else context, "handoff_tokens": None if error else handoff}


EVENTS = [{"t": 2.0, "kind": "scale_out_spawn", "worker": "worker-2", "label": "worker-2 spawned"},
          {"t": 3.0, "kind": "scale_out_ready", "worker": "worker-2", "label": "worker-2 on the ring"},
          {"t": 4.5, "kind": "scale_in_sigterm", "worker": "worker-2", "label": "worker-2 SIGTERM (drains)"},
          {"t": 5.0, "kind": "scale_in_exit", "worker": "worker-2", "label": "worker-2 exited (0)"}]


def records():
    out = [rec(s + 0.1 * k, ttft_s=0.05 + 0.01 * k, cached=10 * k, context=100) for s in range(6) for k in range(3)]
    out.append(rec(3.2, ttft_s=None, gaps=(), error="HTTP 503: no worker"))
    out.append(rec(3.3, ttft_s=0.5, gaps=(0.3,), worker="worker-2", handoff=40, cached=40, context=50))
    return out


def test_turn_record_from_a_streamed_turn():
    done = {"usage": {"prompt_tokens": 12, "cached_tokens": 30, "context_tokens": 42, "handoff_tokens": 5,
                      "completion_tokens": 3}}
    r = {"sent_s": 100.5, "total_s": 0.4, "ttft_s": 0.1, "ok": True, "error": None,
         "start": {"worker_id": "worker-1"}, "done": done}
    got = load_run.turn_record(r, 100.0, [100.6, 100.65, 100.75], session=3, seq_id="load-3-x")
    assert got["t"] == 0.5 and got["end_s"] == 0.9 and got["ttft_s"] == 0.1
    assert got["itl_s"] == [0.05, 0.1] and got["tokens"] == 3 and got["worker"] == "worker-1"
    assert (got["cached_tokens"], got["context_tokens"], got["handoff_tokens"]) == (30, 42, 5)
    failed = load_run.turn_record({**r, "ok": False, "error": "HTTP 503", "start": None, "done": None, "ttft_s": None},
                                  100.0, [], 0, "s")
    assert failed["error"] == "HTTP 503" and failed["worker"] is None and failed["context_tokens"] is None
    assert load_run.token_arrivals(failed) == []


def test_token_arrivals_follow_the_gaps():
    assert load_run.token_arrivals(rec(1.0, ttft_s=0.5, gaps=(0.25, 0.25))) == [(1.5, None), (1.75, 0.25), (2.0, 0.25)]


def test_stats_has_min_median_max_and_percentiles():
    s = load_run.stats([float(v) for v in range(1, 101)])
    assert (s["min"], s["max"], s["n"], s["p50"], s["p99"]) == (1, 100, 100, 50, 99)
    assert s["median"] == 50.5
    assert load_run.stats([])["p99"] is None


def test_per_second_buckets_turns_tokens_latencies_and_hit_rate():
    rows = load_run.per_second(records(), end_s=6.5, window_s=2)
    assert [row["t"] for row in rows] == list(range(7))
    first = rows[0]
    assert first["turns_started"] == 3 and first["turns_done"] == 3 and first["tokens"] == 9
    assert first["ttft_p50_ms"] == pytest.approx(60) and first["ttft_p99_ms"] == pytest.approx(70)
    assert first["itl_p50_ms"] == pytest.approx(20)
    assert first["hit_rate"] == pytest.approx(30 / 300)
    third = rows[3]  # three regular turns, a failure and the slow turn on worker-2
    assert third["turns_started"] == 5 and third["errors"] == 1 and third["ttft_p99_ms"] == pytest.approx(500)
    assert rows[4]["handoff_tokens"] == 40  # the slow turn ends at 4.1
    assert rows[4]["turns_by_worker"] == {"worker-0": 3, "worker-2": 1}
    assert rows[4]["ttft_rolling_p99_ms"] == pytest.approx(500)  # seconds 3 and 4
    assert rows[5]["ttft_rolling_p99_ms"] == pytest.approx(70)  # seconds 4 and 5
    assert rows[6]["turns_started"] == 0 and rows[6]["hit_rate"] is None and rows[6]["ttft_p50_ms"] is None
    assert sum(row["tokens"] for row in rows) == 18 * 3 + 2


def test_phases_split_at_the_scale_events():
    got = load_run.phases(records(), EVENTS, end_s=6.5)
    assert [p["phase"] for p in got] == [
        "start -> worker-2 spawned", "worker-2 spawned -> worker-2 on the ring",
        "worker-2 on the ring -> worker-2 SIGTERM (drains)", "worker-2 SIGTERM (drains) -> worker-2 exited (0)",
        "worker-2 exited (0) -> end"]
    assert [(p["from_s"], p["to_s"]) for p in got][2] == (3.0, 4.5)
    assert got[0]["turns"] == 6 and got[0]["errors"] == 0
    assert got[2]["turns"] == 8 and got[2]["errors"] == 1 and got[2]["ttft_ms"]["max"] == pytest.approx(500)
    assert load_run.phases(records(), [], end_s=6.5)[0]["phase"] == "start -> end"
    at_once = [*EVENTS[:2], {**EVENTS[2], "t": 3.001}]  # joined after the scale-in time: drained at once
    assert "worker-2 on the ring -> worker-2 SIGTERM (drains)" not in [p["phase"] for p in
                                                                      load_run.phases(records(), at_once, 6.5)]
    cut = load_run.phases(records(), EVENTS, end_s=4.8)  # the drain outlasts the load
    assert [(p["phase"], p["to_s"]) for p in cut][-1] == ("worker-2 SIGTERM (drains) -> end", 4.8)


def test_build_result_summary():
    config = load_run.LoadConfig(sessions=3, duration_s=6.0, scale_out_at_s=2.0, scale_in_at_s=4.5)
    result = load_run.build_result(config, records(), list(reversed(EVENTS)), wall_s=6.0)
    s = result["summary"]
    assert [e["t"] for e in result["events"]] == [2.0, 3.0, 4.5, 5.0]
    assert (s["turns"], s["turns_ok"], s["errors"], s["tokens"]) == (20, 19, 1, 56)
    assert s["wall_s"] == 6.0 and s["tokens_per_s"] == pytest.approx(56 / 6)
    assert s["ttft_ms"]["p99"] == pytest.approx(500) and s["ttft_ms"]["min"] == pytest.approx(50)
    assert s["itl_ms"]["max"] == pytest.approx(300)
    assert s["hit_rate"] == pytest.approx((6 * 30 + 40) / (18 * 100 + 50))
    assert (s["handoff_tokens"], s["handoff_turns"]) == (40, 1)
    assert s["turns_per_worker"] == {"worker-0": 18, "worker-2": 1}
    assert s["error_kinds"] == ["HTTP 503: no worker"]
    assert result["config"]["sessions"] == 3 and len(result["series"]) == 6
    assert "worker-2 on the ring -> worker-2 SIGTERM (drains)" in load_run.table(result)


@pytest.mark.parametrize("kwargs", [
    {"sessions": 0}, {"duration_s": 0}, {"scale_out_at_s": 60.0}, {"scale_out_at_s": 30.0, "scale_in_at_s": 20.0},
    {"scale_out_at_s": 10.0, "gateway_url": "http://gw"}, {"scale_in_at_s": 10.0, "workers": 1}])
def test_config_rejects(kwargs):
    with pytest.raises(ValueError):
        load_run.LoadConfig(**{"duration_s": 60.0, **kwargs})


@pytest.mark.parametrize("with_turns", [True, False])
def test_plot_writes_a_png(tmp_path, with_turns):
    config = load_run.LoadConfig(sessions=3, duration_s=6.0, scale_out_at_s=2.0, scale_in_at_s=4.5)
    result = load_run.build_result(config, records() if with_turns else [], EVENTS if with_turns else [], 6.0)
    path = tmp_path / "load_run.png"
    load_run.plot(result, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
