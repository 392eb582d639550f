"""Hot reload: changes are noticed off the event loop (OS notifications or polling on a thread), the
changed models rebuilt off the loop and swapped between two ticks, or refused."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.agents import create_population
from runtime.config import load_config
from runtime.models import METADATA_SUFFIX, discover_models
from runtime.reload import (
    Changes,
    ModelReloader,
    ModelWatcher,
    NotifyWatcher,
    PollingWatcher,
    Stamps,
    WatchedFiles,
    model_watcher,
)
from runtime.sessions import SessionPool
from runtime.state import realistic_states
from tests.runtime.runtime_helpers import (
    ITEMS,
    CpuPressure,
    GameClient,
    check_matrices,
    reference_forward,
    runtime_process,
    serving_config,
    stop_process,
    trading_weights,
    write_model,
)
from tests.runtime.test_sessions import CountingFactory, make_pool
from tests.wire.wire_helpers import wait_until

QUIET_S = 0.8  # no batch for this long after the last one: the watcher has reported everything

WatcherFactory = Callable[[WatchedFiles], ModelWatcher]


@pytest.fixture(params=["poll", "notify"])
def make_watcher(request: pytest.FixtureRequest) -> WatcherFactory:
    """Each watcher kind, polling every 20 ms (a notify watcher polls only if notifications fail)."""
    if request.param == "poll":
        return lambda files: PollingWatcher(files, interval_s=0.02)

    def notify(files: WatchedFiles) -> ModelWatcher:
        watcher = NotifyWatcher(files, fallback_poll_s=0.02)
        request.addfinalizer(lambda: assert_notifying(watcher))
        return watcher

    return notify


def assert_notifying(watcher: NotifyWatcher) -> None:
    """A notify test that passed by falling back to polling tested the wrong thing."""
    assert watcher.polling is None, "OS notifications failed; the watcher polled instead"


def touch_later(path: Path) -> None:
    """Make a rewrite visible to mtime even on a coarse clock."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def replace_atomically(path: Path, data: bytes) -> None:
    """What the converter does (conversion/files.py): a temp file next to the target, then a rename."""
    tmp = path.with_name(f".{path.name}.1234.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def collect(watcher: ModelWatcher, first_within: float = 5.0) -> Changes:
    """Every batch the watcher reports until it has been quiet for QUIET_S (nothing within first_within:
    no changes)."""
    changes, timeout = Changes(), first_within
    while True:
        try:
            changes |= await asyncio.wait_for(watcher.next_changes(), timeout)
        except TimeoutError:
            return changes
        timeout = QUIET_S


async def test_watchers_report_changed_models_and_new_checkpoints(
    tmp_path: Path, model_dir: Path, make_watcher: WatcherFactory
) -> None:
    checkpoint_dir = tmp_path  # the default layout: the model directory inside the checkpoint directory
    watcher = make_watcher(WatchedFiles(model_dir, checkpoint_dir, converted_dir=model_dir))
    await watcher.start()
    try:
        write_model(model_dir, "m1", trading_weights(50))
        touch_later(model_dir / "m1.onnx")
        write_model(model_dir, "m7", trading_weights(7))
        assert await collect(watcher) == Changes(frozenset({"m1", "m7"}))  # reported once
        (model_dir / "m1_ctx.onnx").write_bytes(b"QNN context cache written next to the model")
        (model_dir / "stray.pth").write_bytes(b"in the conversion output: not a checkpoint")
        (model_dir / ".packs").mkdir()
        (model_dir / ".packs" / "pack-x_metadata.json").write_text("{}")  # below the top level
        assert await collect(watcher, first_within=QUIET_S) == Changes()
        (checkpoint_dir / "gen5").mkdir()
        (checkpoint_dir / "gen5" / "agent_gen5_rank1.pth").write_bytes(b"x")
        assert await collect(watcher) == Changes(checkpoints=True)
        metadata = model_dir / f"m2{METADATA_SUFFIX}"
        replace_atomically(metadata, metadata.read_bytes() + b"\n")
        assert await collect(watcher) == Changes(frozenset({"m2"}))
    finally:
        watcher.close()


async def test_a_notify_watcher_without_its_directory_polls_instead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    later = tmp_path / "not-yet"
    watcher = NotifyWatcher(WatchedFiles(later), fallback_poll_s=0.02)
    with caplog.at_level(logging.INFO):
        await watcher.start()
    assert isinstance(watcher.polling, PollingWatcher)
    assert (
        f"OS file notifications for {later} failed" in caplog.text and "polling every 0.02 s" in caplog.text
    )
    write_model(later, "m0", trading_weights(0))  # the directory appears: polling sees it
    assert await collect(watcher) == Changes(frozenset({"m0"}))
    watcher.close()


async def test_a_missing_checkpoint_directory_is_not_watched_and_said_so(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A serving-only deployment has no checkpoint directory: the models are still watched by the OS."""
    missing = tmp_path / "no-checkpoints"
    watcher = NotifyWatcher(WatchedFiles(model_dir, missing, model_dir), fallback_poll_s=0.02)
    with caplog.at_level(logging.WARNING):
        await watcher.start()
    try:
        assert watcher.polling is None
        assert f"checkpoint directory {missing} does not exist" in caplog.text
        write_model(model_dir, "m5", trading_weights(5))
        assert await collect(watcher) == Changes(frozenset({"m5"}))
    finally:
        watcher.close()


def test_auto_takes_os_notifications_when_watchfiles_is_installed(model_dir: Path) -> None:
    files = WatchedFiles(model_dir)
    assert isinstance(model_watcher(files, "auto", 2.0), NotifyWatcher)
    poller = model_watcher(files, "poll", 3.0)
    assert isinstance(poller, PollingWatcher) and poller.interval_s == 3.0


class TimedPoller(PollingWatcher):
    """Records when each of its polls ran on its thread (perf_counter start and end)."""

    def __init__(self, files: WatchedFiles, interval_s: float) -> None:
        super().__init__(files, interval_s)
        self.polls: list[tuple[float, float]] = []

    def _diff(self, before: Stamps) -> tuple[Stamps, Changes]:
        start = time.perf_counter()
        try:
            return super()._diff(before)
        finally:
            self.polls.append((start, time.perf_counter()))


async def ticker(seconds: float) -> list[float]:
    """When a coroutine sleeping 1 ms at a time got the loop back, over ``seconds``."""
    wakeups = [time.perf_counter()]
    while wakeups[-1] < wakeups[0] + seconds:
        await asyncio.sleep(0.001)
        wakeups.append(time.perf_counter())
    return wakeups


@pytest.mark.slow
async def test_polling_10000_models_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """The old watcher listed and stat-ed on the loop: no coroutine ran while a poll lasted (~0.1-1.3 s
    with 10,000 models, ticks waited that long). Now the loop keeps running through every poll."""
    checkpoint_dir = tmp_path / "trading_agents"
    model_dir = checkpoint_dir / "onnx"  # the default layout: the models inside the checkpoint directory
    model_dir.mkdir(parents=True)
    for i in range(10_000):  # 20,000 model files (stat-only: their content does not matter)
        (model_dir / f"agent_{i:05d}.onnx").write_bytes(b"onnx")
        (model_dir / f"agent_{i:05d}{METADATA_SUFFIX}").write_text("{}")
    for i in range(20):
        (checkpoint_dir / f"agent_gen{i}_rank1.pth").write_bytes(b"pth")
    poller = TimedPoller(WatchedFiles(model_dir, checkpoint_dir, model_dir), interval_s=0.02)
    await poller.start()
    watching = asyncio.create_task(poller.next_changes())
    try:
        wakeups = np.asarray(await ticker(3.0))
        assert not watching.done()
        (model_dir / "agent_00007.onnx").write_bytes(b"new version")  # the polls still see changes
        assert await asyncio.wait_for(watching, 5) == Changes(frozenset({"agent_00007"}))
    finally:
        watching.cancel()
    polls = [(start, end) for start, end in poller.polls if end < wakeups[-1]]
    during = [int(np.count_nonzero((wakeups > start) & (wakeups < end))) for start, end in polls]
    gaps = np.diff(wakeups) * 1e3
    stats = f"ticker runs per poll {during}, gaps p50 {np.median(gaps):.1f} ms, max {gaps.max():.1f} ms"
    assert len(polls) >= 10, stats
    assert min(during) >= 3, stats  # a poll on the loop thread: 0
    assert np.median(gaps) < 5, stats  # sleep(0.001) mostly comes back on time


async def test_reloader_swaps_changed_models_and_refuses_broken_ones(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(model_dir, agents=6, max_sessions=8)
    reloader = ModelReloader(pool, PollingWatcher(WatchedFiles(model_dir), 0.02))
    states = realistic_states(np.random.default_rng(0), 6, len(ITEMS))
    m1_rows = pool.population.groups()["m1"]

    fresh = trading_weights(77)
    write_model(model_dir, "m1", fresh)
    await reloader.apply(Changes(frozenset({"m1"})))
    assert pool.current.number == 2 and reloader.reloads == 1
    np.testing.assert_allclose(
        (await pool.infer(states))[m1_rows], reference_forward(fresh, states[m1_rows]), rtol=1e-4
    )
    await reloader.apply(Changes(frozenset({"m1"})))  # the same version again: nothing to do
    assert pool.current.number == 2 and reloader.reloads == 1

    broken = trading_weights(78)
    broken[0][:] = np.inf
    write_model(model_dir, "m1", broken)
    with caplog.at_level(logging.ERROR):
        await reloader.apply(Changes(frozenset({"m1"})))
    assert pool.current.number == 2 and pool.reload_failures == 1
    assert "previous version keeps serving" in caplog.text
    np.testing.assert_allclose(
        (await pool.infer(states))[m1_rows], reference_forward(fresh, states[m1_rows]), rtol=1e-4
    )

    (model_dir / "m2_metadata.json").write_text("{not json")
    await reloader.apply(Changes(frozenset({"m2"})))
    assert pool.reload_failures == 2 and pool.current.number == 2

    with caplog.at_level(logging.WARNING):
        write_model(model_dir, "m9", trading_weights(9))
        await reloader.apply(Changes(frozenset({"m9"})))
    assert "m9" in caplog.text and "not assigned" in caplog.text and pool.current.number == 2


async def test_a_new_checkpoint_is_converted_then_reloaded(
    tmp_path: Path, model_dir: Path, make_watcher: WatcherFactory
) -> None:
    pool = await make_pool(model_dir, agents=3, max_sessions=8)
    converted = trading_weights(31)
    conversions: list[float] = []

    async def convert() -> None:  # stands in for the worker-process conversion
        conversions.append(time.perf_counter())
        write_model(model_dir, "m0", converted)
        touch_later(model_dir / "m0.onnx")

    files = WatchedFiles(model_dir, tmp_path, converted_dir=model_dir)
    reloader = ModelReloader(pool, make_watcher(files), convert=convert)
    task = asyncio.create_task(reloader.run())
    try:
        await asyncio.wait_for(reloader.watching.wait(), 5)
        (tmp_path / "m0.pth").write_bytes(b"retrained")
        await wait_until(lambda: pool.current.number == 2, 10, "the converted model to be served")
    finally:
        task.cancel()
    assert len(conversions) == 1
    states = realistic_states(np.random.default_rng(1), 3, len(ITEMS))
    rows = pool.population.groups()["m0"]
    np.testing.assert_allclose(
        (await pool.infer(states))[rows], reference_forward(converted, states[rows]), rtol=1e-4
    )


async def test_new_checkpoints_become_new_agents_when_each_agent_is_a_checkpoint(model_dir: Path) -> None:
    models, _ = discover_models(model_dir, ITEMS)
    pop = create_population(models, ITEMS, num_agents=0, assignment="one_per_checkpoint", seed=0)
    pool = SessionPool(
        pop,
        {m.key: m for m in models},
        factory=CountingFactory(),
        max_sessions=4,
        model_dir=model_dir,
        cpu_pack_precision="fp32",  # compared with the models run alone at fp32 tolerance below
    )
    await pool.start()
    before = pop.matrices.copy()
    reloader = ModelReloader(pool, PollingWatcher(WatchedFiles(model_dir), 0.02), add_new_agents=True)
    for i in (3, 4):  # five models with max_sessions 4: the grown roster is served through one pack
        write_model(model_dir, f"m{i}", trading_weights(i), agent_id="ckpt-1" if i == 3 else "ckpt-4")
    await reloader.apply(Changes(frozenset({"m3", "m4"})))
    assert pool.population is pop and pop.agent_ids == ("ckpt-0", "ckpt-1", "ckpt-2", "m3", "ckpt-4")
    np.testing.assert_array_equal(pop.matrices[:3], before)  # existing agents keep their state
    (unit,) = pool.current.units
    assert unit.name == "pack:TradingNetwork-61x5" and pool.current.number == 2
    states = realistic_states(np.random.default_rng(2), 5, len(ITEMS))
    want = np.concatenate([reference_forward(trading_weights(i), states[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(await pool.infer(states), want, rtol=1e-4)


async def test_a_failing_conversion_does_not_stop_the_reload_loop(
    tmp_path: Path, model_dir: Path, make_watcher: WatcherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(model_dir, agents=3, max_sessions=8)

    async def convert() -> None:
        raise RuntimeError("worker process died")

    files = WatchedFiles(model_dir, tmp_path, converted_dir=model_dir)
    reloader = ModelReloader(pool, make_watcher(files), convert=convert)
    loop = asyncio.create_task(reloader.run())
    try:
        await asyncio.wait_for(reloader.watching.wait(), 5)
        with caplog.at_level(logging.ERROR):
            (tmp_path / "bad.pth").write_bytes(b"x")
            await wait_until(lambda: pool.reload_failures == 1, 5, "the failed conversion to be counted")
        assert not loop.done() and "worker process died" in caplog.text
        write_model(model_dir, "m2", trading_weights(222))  # the loop still reloads afterwards
        await wait_until(lambda: pool.current.number == 2, 5, "m2 to be reloaded")
    finally:
        loop.cancel()


TICKS = 120
RATE_HZ = 20


@pytest.mark.mqtt
@pytest.mark.slow
async def test_a_reload_during_simulated_ticks_misses_no_tick(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    """`blockmarket run` with the shipped reload settings and `blockmarket simulate` at 20 ticks/s, as
    separate processes; mid-run a model gets a new version and a new model file (no checkpoint) arrives."""
    config_path = serving_config(tmp_path, model_dir, prefix, assignment="one_per_checkpoint")
    config = load_config(config_path)
    assert config.runtime.hot_reload and config.runtime.reload_watcher == "auto"
    summary_path, log_path = tmp_path / "simulation.json", tmp_path / "run.log"
    runtime = runtime_process(config_path, log_path)
    try:
        async with GameClient(config.mqtt, len(ITEMS), record_ticks=True) as game:
            await game.online()
            assert game.roster is not None
            old = game.roster.model_versions["m1"]
            await wait_until(lambda: "(OS notifications)" in log_path.read_text(), 10, "the watcher to start")
            simulate = [
                *(sys.executable, "-m", "runtime.cli", "simulate", "--config", str(config_path)),
                *("--ticks", str(TICKS), "--rate", str(RATE_HZ), "--json", str(summary_path), "--quiet"),
            ]
            with CpuPressure() as pressure:
                simulator = await asyncio.create_subprocess_exec(
                    *simulate, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
                )
                await wait_until(lambda: len(game.answers) >= 30, 20, "30 answered ticks")
                write_model(model_dir, "m1", trading_weights(99), agent_id="ckpt-1")
                write_model(model_dir, "m3", trading_weights(3), agent_id="newcomer", desired_item="emerald")
                output, _ = await asyncio.wait_for(simulator.communicate(), 60)
            assert simulator.returncode == 0, output.decode()[-3000:]
            await wait_until(lambda: "newcomer" in game.agent_ids, 10, "the new agent in the roster")
    finally:
        assert stop_process(runtime) == 0, log_path.read_text()[-3000:]
    summary = json.loads(summary_path.read_text())
    log = log_path.read_text()
    assert "hot reload: generation 2 serves m1@" in log and "new agents newcomer" in log
    versions = [game.answers[t].model_versions["m1"] for t in sorted(game.answers)]
    assert versions[0] == old != versions[-1]  # the new version took over while ticks were being served
    for answer in game.answers.values():
        check_matrices(answer.matrices, 3, len(ITEMS))
    assert summary["ticks_sent"] == TICKS and summary["rule_violations"] == 0
    allowed = TICKS // 10 if pressure.overloaded else 0  # a starved runtime coalesces ticks (docs/runtime.md)
    assert summary["missing"] <= allowed, f"{summary['missing']} ticks unanswered while {pressure}"
    assert summary["answered"] + summary["missing"] == TICKS
