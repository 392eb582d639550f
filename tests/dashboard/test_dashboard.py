"""The live web view in a real headless Chromium (Debian's package, driven by Playwright) against `demo`."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import IO

import pytest

from blockmarket.core.config import load_config
from blockmarket.simulator.game import MarketSimulator, default_roster
from blockmarket.simulator.view import encode_view, view_topic
from blockmarket.wire.transport import MqttLink
from tests.support.serving import (
    ITEMS,
    REPO,
    GameClient,
    serving_config,
    trading_weights,
    write_model,
)

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

CHROMIUM = shutil.which("chromium")
SCREENSHOT = REPO / "docs" / "dashboard.png"
UPDATE_SCREENSHOT = "BLOCKMARKET_UPDATE_SCREENSHOT"  # set: the test also writes docs/dashboard.png


def lines_of(stream: IO[str]) -> queue.Queue[str]:
    """Every line ``stream`` prints, as it prints them (a daemon thread reads it)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def first_match(lines: queue.Queue[str], pattern: str, timeout: float, seen: list[str]) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} in {timeout} s: {''.join(seen)[-3000:]}")


async def served_agents(config_path: Path) -> tuple[str, ...]:
    """The agents the runtime announces in its retained roster (read independently of the page)."""
    async with GameClient(load_config(config_path).mqtt, len(ITEMS)) as game:
        await game.online()
        return game.agent_ids


async def publish_view(config_path: Path, market: str, agents: int) -> None:
    """One market view of another market on the demo's topics, as a second simulator would send it."""
    config = load_config(config_path)
    roster = default_roster(agents, config.environment.num_items, seed=5)
    game = MarketSimulator(config, roster.agent_ids, roster.desired)
    view = encode_view(replace(game.view.view(1, game.summary()), market=market))
    link = MqttLink(config.mqtt, client_id=f"second-market-{market}", subscriptions={})
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        assert await link.publish(view_topic(config.mqtt.topic_prefix), view)
    finally:
        await link.disconnect()
        await task


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: scripts/setup installs Debian's package")
def test_the_dashboard_shows_a_live_demo_in_a_real_browser(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    from playwright.sync_api import sync_playwright

    config = serving_config(tmp_path, model_dir, prefix, num_agents=20, status_interval_s=0.5)
    command = [sys.executable, "-m", "blockmarket.cli", "demo", "--config", str(config), "--rate", "10"]
    command += ["--seconds", "180"]  # ends by itself should the test die
    with (tmp_path / "demo.log").open("wb") as log:
        demo = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=log, text=True)
    seen: list[str] = []
    try:
        assert demo.stdout is not None
        url = first_match(lines_of(demo.stdout), r"dashboard: (http://\S+)", 180, seen)[1]
        served = asyncio.run(served_agents(config))
        assert len(served) == 20
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1420, "height": 1180})
                page.goto(url)
                page.wait_for_function("window.dashboard.drawnAgents().length === 20", timeout=60_000)
                assert sorted(page.evaluate("window.dashboard.drawnAgents()")) == sorted(served)
                assert page.text_content("#agents") == "20 in the market, 20 served"

                first = int(page.text_content("#tick") or "")
                page.wait_for_function(
                    f"Number(document.getElementById('tick').textContent) > {first}", timeout=30_000
                )  # the tick counter advances

                agent = served[7]
                spot = page.evaluate(f"window.dashboard.agentPosition({agent!r})")
                box = page.locator("#grid").bounding_box()
                assert spot is not None and box is not None
                scale = box["width"] / 640  # canvas pixels -> CSS pixels
                page.mouse.click(box["x"] + spot["x"] * scale, box["y"] + spot["y"] * scale)
                page.wait_for_function(
                    f"document.getElementById('matrix').dataset.agent === {agent!r}", timeout=30_000
                )
                assert page.text_content("#matrix-agent") == agent
                header = page.eval_on_selector_all(
                    "#matrix tr:first-child th", "cells => cells.map(c => c.textContent)"
                )
                assert header[1:] == list(ITEMS)
                values = page.eval_on_selector_all(
                    "#matrix tr:not(:first-child) td", "cells => cells.map(c => Number(c.textContent))"
                )
                assert len(values) == len(ITEMS) ** 2
                diagonal = [values[i * len(ITEMS) + i] for i in range(len(ITEMS))]
                assert diagonal == [1.0] * len(ITEMS)  # the update rule: diagonal 1, entries in [0.1, 10]
                assert all(0.1 - 1e-3 <= v <= 10 + 1e-3 for v in values)

                page.wait_for_function(
                    "window.dashboard.state.markets.default.metrics !== null", timeout=30_000
                )
                assert page.text_content("#served") not in ("–", "0")
                assert "pool generation 1" in (page.text_content("#generation") or "")
                before = page.text_content("#models") or ""

                write_model(
                    model_dir, "m1", trading_weights(50), agent_id="ckpt-1"
                )  # hot reload: a new version
                page.wait_for_function(
                    "window.dashboard.state.markets.default.reloads.length >= 1", timeout=60_000
                )  # marked on the curves
                page.wait_for_function(
                    "document.getElementById('generation').textContent.includes('pool generation 2')",
                    timeout=30_000,
                )
                page.wait_for_function(f"document.getElementById('models').textContent !== {before!r}")
                page.wait_for_function(
                    "window.dashboard.state.markets.default.history.length >= 8", timeout=30_000
                )  # a few points on the curves for the picture
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

                with ThreadPoolExecutor(1) as aside:  # Playwright's sync API holds this thread's loop
                    aside.submit(
                        lambda: asyncio.run(publish_view(config, "east", 6))
                    ).result()  # a market appears
                page.wait_for_function(
                    "document.getElementById('market').options.length === 2", timeout=30_000
                )
                page.select_option("#market", "east")
                page.wait_for_function("window.dashboard.drawnAgents().length === 6", timeout=10_000)
                page.select_option("#market", "default")
                page.wait_for_function("window.dashboard.drawnAgents().length === 20", timeout=10_000)
            finally:
                browser.close()
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        if os.environ.get(UPDATE_SCREENSHOT):
            shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        code = demo.wait(60)
    assert code == 0, (tmp_path / "demo.log").read_text()[-3000:]
