"""benchmarks.soak's RSS verdict: growth between medians, so a reload's transient peak is not a leak."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.soak import memory

MB = 2**20


def samples(rss_mb: np.ndarray, every_s: float = 2.0) -> list[tuple[float, int]]:
    return [(i * every_s, int(value * MB)) for i, value in enumerate(rss_mb)]


def test_a_reload_peak_at_either_end_is_not_growth() -> None:
    rss = np.full(900, 400.0)  # 30 minutes at 2 s
    rss[89:92] = 700.0  # a pack being rebuilt right at the warm-up end (180 s)
    rss[-3:] = 700.0  # ... and in the last seconds
    figures = memory(samples(rss), warmup_s=180.0, window_s=60.0)
    assert figures["rss_warmup_mb"] == figures["rss_end_mb"] == 400.0
    assert figures["rss_growth_pct"] == 0.0
    assert figures["rss_peak_mb"] == 700.0
    assert len(figures["timeline_rss_mb"]) == 30


def test_a_steady_leak_is_growth_and_slope() -> None:
    rss = 400.0 + np.arange(900) * 2.0 * (36.0 / 3600)  # +36 MB per hour
    figures = memory(samples(rss), warmup_s=180.0, window_s=60.0, reloads_at=[61.0, 1741.0])
    assert figures["rss_before_reloads_mb"] == [400.6, 417.4]  # the samples at 60 s and 1740 s
    warmup, end = figures["rss_warmup_mb"], figures["rss_end_mb"]
    assert 401.0 < warmup < 402.0 and 417.0 < end < 418.0  # medians over the last 60 s before each point
    assert figures["rss_growth_pct"] == pytest.approx(100 * (end - warmup) / warmup, abs=0.01)
    assert figures["rss_slope_mb_per_hour"] == pytest.approx(36.0, rel=0.01)
    assert figures["timeline_rss_mb"] == sorted(figures["timeline_rss_mb"])


def test_a_run_shorter_than_the_window_uses_the_nearest_sample() -> None:
    rss = np.array([100.0, 101.0, 150.0])
    figures = memory(samples(rss, every_s=1.0), warmup_s=0.5, window_s=60.0)
    assert figures["window_s"] == 0.5  # never longer than the warm-up
    assert figures["rss_warmup_mb"] == 100.0 and figures["rss_end_mb"] == pytest.approx(150.0)
    assert figures["rss_growth_pct"] == 50.0
