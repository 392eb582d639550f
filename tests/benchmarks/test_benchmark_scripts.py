"""Smoke tests: each benchmark script runs end to end at tiny sizes and writes results a reader can use.

No timing is asserted (figures on a shared 2-core machine are noise); the structure and the sanity of
the numbers are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.<module> ARGS`` from the repository root; fails the test on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"benchmarks.{module} failed:\n{done.stdout}\n{done.stderr}"
    return done


def read_results(path: Path, benchmark: str) -> Any:
    document = json.loads(path.read_text())
    assert document["benchmark"] == benchmark
    assert document["machine"]["logical_cores"] >= 1
    return document["results"]


@pytest.mark.parametrize(
    "module",
    [
        "inference",
        "plot",
        "end_to_end",
        "startup",
        "soak",
        "markets",
        "scale_out",
        "selected_models",
        "pack_ops",
    ],
)
def test_help_describes_the_script(module: str) -> None:
    out = run_script(module, "--help").stdout
    assert "usage: python -m benchmarks." + module in out
    assert "--out" in out


@pytest.fixture(scope="module")
def inference_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inference") / "inference.json"
    run_script(
        "inference",
        *("--agents", "8", "24", "--ticks", "3", "--original-agents", "6", "--ort-models", "3"),
        *("--bandwidth-mb", "16", "--out", str(out)),
    )
    return out


def test_inference_measures_every_path_and_case(inference_results: Path) -> None:
    results = read_results(inference_results, "inference")
    assert results["memory_bandwidth"]["one_thread_gb_s"] > 0
    cases = {(c["case"], c["agents"]): c for c in results["cases"]}
    assert set(cases) == {(case, n) for case in ("distinct", "shared") for n in (8, 24)}
    for case in cases.values():
        paths = case["paths"]
        int8 = {"ours_int8"} if case["case"] == "distinct" else set()  # the int8 pack: distinct weights
        assert set(paths) == {"original", "ort_per_agent", "ours", "bare_run", *int8}
        for path in paths.values():
            assert path["updates_per_s"] > 0
            assert 0 < path["p50_ms"] <= path["p99_ms"]
        # Our path computes what the original PyTorch networks compute.
        assert paths["ours"]["max_abs_error_vs_pytorch"] < 1e-4
        assert paths["ours"]["tick_over_bare_run"] > 0
    big = cases[("distinct", 24)]["paths"]
    assert big["original"]["extrapolated"] is True and big["original"]["timed_agents"] == 6
    # Distinct weights: the pack holds every agent's weights, so bytes per tick scale with N.
    small = cases[("distinct", 8)]["paths"]["ours"]["weight_bytes_per_tick"]
    assert big["ours"]["weight_bytes_per_tick"] == pytest.approx(3 * small, rel=1e-3)
    # The int8 pack reads about a quarter of the bytes and stays within its pack tolerance.
    assert big["ours_int8"]["weight_bytes_per_tick"] < 0.3 * big["ours"]["weight_bytes_per_tick"]
    assert 0 < big["ours_int8"]["max_abs_error_vs_fp32_pack"] < 0.1


def test_plot_writes_a_png(inference_results: Path, tmp_path: Path) -> None:
    png = tmp_path / "performance.png"
    run_script("plot", "--results", str(inference_results), "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_bad_results_file(tmp_path: Path) -> None:
    bad = tmp_path / "nope.json"
    bad.write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plot", "--results", str(bad), "--out", str(tmp_path / "x.png")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert str(bad) in done.stderr


SCENARIO = {"mqtt.embedded_broker": "never", "runtime.assignment": "one_per_checkpoint"}


@pytest.mark.mqtt
@pytest.mark.slow
def test_end_to_end_serves_every_tick_over_the_broker(tmp_path: Path) -> None:
    """Twice per N (--compare-reload): the shipped config with hot reload on, and with it off."""
    out = tmp_path / "end_to_end.json"
    done = run_script(
        "end_to_end",
        *("--agents", "12", "--stretch-agents", "0", "--ticks", "20", "--models", "3"),
        *("--compare-reload", "--threads", "2", "--keep", str(tmp_path / "work"), "--out", str(out)),
    )
    document = json.loads(out.read_text())
    results = document["results"]
    on, off = results["runs"]
    assert (on["hot_reload"], off["hot_reload"]) == (True, False)
    for row in (on, off):
        assert row["agents"] == 12 and row["ticks_sent"] == 20
        assert row["answered"] + row["missing"] == row["ticks_sent"]
        assert row["answered"] > 0 and row["rule_violations"] == 0
        assert row["runtime_ticks_served"] >= row["answered"]
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert row["runtime_peak_rss_mb"] > 0 and row["runtime_cpu_percent"] > 0
    assert on["runtime_ready_again_s"] > 0 and off["runtime_ready_again_s"] is None  # restarted once per N
    # every setting changed from config.yaml is printed before the run and recorded with it
    assert document["settings"]["overrides"] == {**SCENARIO, "runtime.intra_op_threads": 2}
    assert on["overrides"] == document["settings"]["overrides"]
    assert off["overrides"] == {**on["overrides"], "runtime.hot_reload": False}
    assert "runtime.hot_reload=false" in done.stderr and "runtime.intra_op_threads=2" in done.stderr
    assert document["settings"]["runtime"]["intra_op_threads"] == 2
    (comparison,) = results["reload_comparison"]
    assert comparison["p99_ratio"] == round(on["latency_p99_ms"] / off["latency_p99_ms"], 3)
    assert "Hot reload on / off" in done.stdout
    # the runtime served the shipped hot reload settings: OS notifications on the model directory
    assert "(OS notifications)" in (tmp_path / "work" / "run-12-reload-on.log").read_text()


@pytest.mark.mqtt
@pytest.mark.slow
def test_end_to_end_compares_metrics_on_and_off(tmp_path: Path) -> None:
    """--compare-metrics: the same N served with runtime.http on and off, p50 and p99 with their ratios."""
    out = tmp_path / "end_to_end.json"
    done = run_script(
        "end_to_end",
        *("--agents", "6", "--stretch-agents", "0", "--ticks", "10", "--models", "2"),
        *("--compare-metrics", "--keep", str(tmp_path / "work"), "--out", str(out)),
    )
    results = json.loads(out.read_text())["results"]
    on, off = results["runs"]
    assert (on["metrics"], off["metrics"]) == (True, False) and on["compared"] == off["compared"] == "metrics"
    assert on["answered"] > 0 and off["answered"] > 0
    assert off["overrides"] == {**on["overrides"], "runtime.http.enabled": False}
    (comparison,) = results["metrics_comparison"]
    for q in ("p50", "p99"):
        assert comparison[f"{q}_ratio"] == round(on[f"latency_{q}_ms"] / off[f"latency_{q}_ms"], 3)
        assert comparison[f"{q}_ms_metrics_on"] == on[f"latency_{q}_ms"]
    assert "Metrics on / off" in done.stdout and "runtime.http.enabled=false" in done.stderr
    # with them on the runtime said where its endpoints were; off, it served none
    assert "metrics and health: http://127.0.0.1:" in (tmp_path / "work" / "run-6-metrics-on.log").read_text()
    assert "metrics and health" not in (tmp_path / "work" / "run-6-metrics-off.log").read_text()


@pytest.mark.mqtt
@pytest.mark.slow
def test_startup_times_conversion_and_the_first_served_tick(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    done = run_script("startup", "--checkpoints", "3", "--starts", "1", "--out", str(out))
    assert json.loads(out.read_text())["settings"]["overrides"] == SCENARIO  # the shipped config otherwise
    assert 'runtime.assignment="one_per_checkpoint"' in done.stderr
    results = read_results(out, "startup")
    assert results["conversion"]["checkpoints"] == 3
    assert results["conversion"]["batch_s"] > 0 and results["conversion"]["single_s"] > 0
    (start,) = results["starts"]
    assert 0 < start["online_s"] <= start["first_tick_s"]


@pytest.mark.mqtt
@pytest.mark.slow
def test_soak_accounts_for_every_message_and_every_reload(tmp_path: Path) -> None:
    """A short soak: 50 agents, 10% hostile messages, a new model version every 5 s (no RSS verdict: a
    24-second run says nothing about leaks, so its limit is set out of reach)."""
    out = tmp_path / "soak.json"
    done = run_script(
        "soak",
        *("--minutes", "0.4", "--agents", "50", "--models", "3", "--reload-every", "5"),
        *(
            "--hostile-fraction",
            "0.1",
            "--sample-every",
            "0.5",
            "--max-rss-growth",
            "1000",
            "--out",
            str(out),
        ),
    )
    document = json.loads(out.read_text())
    assert document["settings"]["overrides"] == SCENARIO  # the shipped config otherwise
    results = read_results(out, "soak")
    ticks, game, reloads, memory = results["ticks"], results["game"], results["reloads"], results["memory"]
    # the counting invariant, from the runtime's final status
    buckets = ("served", "skipped", "unpublished", "inference_errors", "in_flight")
    assert sum(ticks[b] for b in buckets) + sum(ticks["dropped"].values()) == ticks["received"]
    assert ticks["invariant_holds"] and ticks["accounted"] == ticks["received"]
    # ... and everything published on the tick topic was received, each hostile kind counted as sent
    assert game["ticks_sent"] == ticks["published_game"] == 480
    assert ticks["published"] == ticks["published_game"] + ticks["published_hostile"] + 1 == ticks["received"]
    assert ticks["published_hostile"] > 20 and ticks["published_hostile_retained"] > 0
    assert ticks["dropped"] == ticks["dropped_expected"] and ticks["dropped"]["retained"] == 1
    assert len(ticks["dropped"]) >= 5  # a mix of kinds, not one
    assert ticks["served"] + ticks["skipped"] == ticks["published_game"]  # no hostile message was served
    assert game["answered"] + game["missing"] == game["ticks_sent"] and game["rule_violations"] == 0
    assert 0 < game["latency_p50_ms"] <= game["latency_p99_ms"]
    # every new model version written was served, announced in the roster and swapped in
    assert reloads["written"] >= 2 and reloads["failures"] == 0
    assert reloads["written"] == reloads["served"] == reloads["announced"] == reloads["generations"]
    assert 0 < reloads["latency_p50_s"] <= reloads["latency_max_s"] < 30
    assert reloads["pack_cache_files"] >= reloads["written"] + 1  # a pack per generation
    # memory: sampled over the whole run
    assert memory["samples"] > 20 and 0 < len(memory["timeline_rss_mb"]) <= 30
    assert (
        0 < memory["rss_warmup_mb"] <= memory["rss_peak_mb"] and memory["rss_end_mb"] <= memory["rss_peak_mb"]
    )
    growth = 100 * (memory["rss_end_mb"] - memory["rss_warmup_mb"]) / memory["rss_warmup_mb"]
    assert memory["rss_growth_pct"] == pytest.approx(growth, abs=0.1)
    assert results["passed"] and all(results["checks"].values())
    assert "Dropped by kind" in done.stdout and "FAILED" not in done.stdout


@pytest.mark.mqtt
@pytest.mark.slow
def test_markets_plays_many_markets_and_one_big_one_with_and_without_batching(tmp_path: Path) -> None:
    out = tmp_path / "markets.json"
    done = run_script(
        "markets",
        *("--markets", "3", "--agents", "4", "--ticks", "20", "--models", "2", "--windows", "0"),
        *("--keep", str(tmp_path / "work"), "--out", str(out)),
        timeout=400,
    )
    results = read_results(out, "markets")
    rows = results["runs"]
    assert [(r["batching"], r["markets"], r["agents_per_market"]) for r in rows] == [
        (True, 3, 4),
        (True, 1, 12),
        (False, 3, 4),
        (False, 1, 12),
    ]
    for row in rows:
        assert (
            row["ticks_sent"] == 20 * row["markets"] and row["answered"] + row["missing"] == row["ticks_sent"]
        )
        assert row["answered"] > 0 and row["rule_violations"] == 0 and row["inferences"] > 0
        assert row["session_runs_per_s"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert rows[2]["market_ticks_per_inference"] == 1.0  # batching off: one inference per market tick
    assert rows[2]["overrides"] == {**rows[0]["overrides"], "runtime.markets.cross_market_batching": False}
    assert "session.run/s" in done.stdout and "cpu_flags" in out.read_text()


@pytest.mark.mqtt
@pytest.mark.slow
def test_scale_out_plays_every_deployment_and_prices_the_carried_matrices(tmp_path: Path) -> None:
    out = tmp_path / "scale_out.json"
    done = run_script(
        "scale_out",
        *("--loads", "2", "--agents", "4", "--ticks", "20", "--warmup-ticks", "5", "--models", "2"),
        *("--distinct", "12", "--keep", str(tmp_path / "work"), "--out", str(out)),
        timeout=400,
    )
    results = read_results(out, "scale_out")
    rows = results["runs"]
    assert [(r["deployment"], r["markets"]) for r in rows] == [
        ("1 process", 2),
        ("1 replica", 2),
        ("2 replicas", 2),
    ]
    assert [r["cores"] for r in rows] == [["0-1"], ["0"], ["0", "1"]]
    for row in rows:
        assert row["ticks_sent"] == 40 and 0 < row["answered"] <= 40 and row["agent_ticks_per_s"] > 0
        assert row["served"] == (row["answered_share"] >= 0.99 and row["latency_p99_ms"] <= 50)
        assert row["runtime_cpu_percent"] > 0 and row["runtime_cpu_ms_per_tick"] > 0
    assert rows[1]["overrides"]["mqtt.shared_group"] == "scale-out"
    assert "mqtt.shared_group" not in rows[0]["overrides"]
    wire = results["wire"]  # 4 agents x 5 x 5 float32 more, plus the key and array header
    assert 400 < wire["extra_bytes_per_tick"] == wire["tick_bytes_carried"] - wire["tick_bytes"] < 450
    assert "capacity" in done.stdout and "cpu_flags" in out.read_text()


def test_selected_models_times_the_whole_pack_against_a_few_models(tmp_path: Path) -> None:
    out = tmp_path / "selected.json"
    run_script(
        "selected_models", "--models", "40", "--fractions", "0.05,0.5", "--repeats", "2", "--out", str(out)
    )
    rows = read_results(out, "selected_models")
    assert [(r["weights"], r["selected"]) for r in rows] == [
        ("fp32", 2),
        ("fp32", 20),
        ("int8", 2),
        ("int8", 20),
    ]
    assert all(r["whole_ms"] > 0 and r["selected_ms"] > 0 for r in rows)
    assert all(r["ratio"] == pytest.approx(r["selected_ms"] / r["whole_ms"]) for r in rows)


def test_pack_ops_splits_an_int8_pack_run_by_op_against_the_streaming_limit(tmp_path: Path) -> None:
    out = tmp_path / "pack_ops.json"
    done = run_script("pack_ops", "--models", "60", "--hidden", "32", "--repeats", "2", "--out", str(out))
    result = read_results(out, "pack_ops")
    assert result["models"] == 60 and result["weight_mb"] > 0
    assert (
        "MatMulInteger" in result["ops_ms"] and "If" not in result["ops_ms"]
    )  # the branch's ops, not the If
    assert sum(result["ops_ms"].values()) <= result["run_ms"] * 1.5  # kernel times within the run's time
    assert result["streaming_limit_gb_per_s"] > 0
    assert result["matmul_to_limit"] == pytest.approx(
        result["matmul_gb_per_s"] / result["streaming_limit_gb_per_s"], rel=0.05
    )
    assert "MatMulInteger reads the weights at" in done.stdout
