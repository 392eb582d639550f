"""The dashboard's summary of /metrics and its handling of untrusted MQTT messages (no browser)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import generate_latest

from blockmarket.core.config import Config
from blockmarket.dashboard.feed import DashboardFeed, quantile_ms, summarize
from blockmarket.simulator.view import encode_view
from runtime.metrics import RuntimeMetrics
from tests.support.simulation import simulator


def test_quantiles_follow_prometheus_histogram_quantile() -> None:
    buckets = [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert quantile_ms(buckets, 0.5) == pytest.approx(1.0)  # the 50th of 100 at the first bound
    assert quantile_ms(buckets, 0.7) == pytest.approx(1.0 + 9.0 * 0.5)  # halfway through (1, 10] ms
    assert quantile_ms(buckets, 0.99) == pytest.approx(10.0 + 90.0 * 0.9)
    assert quantile_ms([(0.001, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_the_summary_reads_a_runtime_registry_and_takes_recent_ticks() -> None:
    metrics = RuntimeMetrics("m1", process=False)
    for _ in range(10):
        metrics.served(0.0, [0.0, 0.0, 0.0, 0.0, 0.0, 0.002])  # 2 ms ticks
    previous: dict[str, list[tuple[float, float]]] = {}
    first = summarize(generate_latest(metrics.registry).decode(), previous)
    assert set(first) == {"m1"} and 1.0 <= first["m1"]["tick_p50_ms"] <= 2.5
    for _ in range(10):
        metrics.served(0.0, [0.0, 0.0, 0.0, 0.0, 0.0, 0.2])  # then 200 ms ticks
    recent = summarize(generate_latest(metrics.registry).decode(), previous)
    assert 100.0 <= recent["m1"]["tick_p50_ms"] <= 250.0  # only the ticks since the last scrape


def test_a_refused_message_is_counted_and_changes_nothing() -> None:
    feed = DashboardFeed(Config(), metrics_url=None)
    receive = feed.link._subscriptions[feed.view_topic]
    receive(b"\xc1", 0.0, False)
    receive(b"\x82\xa1v\x01\xa4type\xa4tick", 0.0, False)
    assert feed.drops.counts == {"malformed": 1, "schema": 1}
    assert feed.snapshot()["markets"] == {}


def test_every_market_seen_is_listed_and_gets_its_own_figures() -> None:
    """One market today; the markets work adds more: views and metrics name theirs."""
    feed = DashboardFeed(Config(), metrics_url=None)
    events = feed.hub.subscribe()
    for name in ("default", "east"):
        sim = simulator(6)
        view = sim.view.view(4, sim.summary())
        feed.on_view(encode_view(replace(view, market=name)))
    markets = feed.snapshot()["markets"]
    assert sorted(markets) == ["default", "east"]
    assert all(m["view"]["agent_ids"] == [f"agent-{i:04d}" for i in range(6)] for m in markets.values())
    assert [m["history"][0]["tick"] for m in markets.values()] == [4, 4]
    assert events.qsize() == 2  # one event per view, to every open page
    metrics = RuntimeMetrics("east", process=False)
    metrics.served(0.0, [0.0, 0.0, 0.0, 0.0, 0.0, 0.003])
    for name, summary in summarize(generate_latest(metrics.registry).decode(), {}).items():
        assert name == "east" and summary["tick_p50_ms"] is not None
