"""Hot reload: changes are noticed off the event loop (OS notifications or polling on a thread), the
changed models rebuilt off the loop and swapped between two ticks, or refused."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from blockmarket.core.config import load_config
from blockmarket.core.state import realistic_states
from blockmarket.models.files import METADATA_SUFFIX, discover_models, read_model, sha256_file
from runtime.agents import create_population
from runtime.reload import ModelReloader
from runtime.server import RuntimeServer
from runtime.sessions import SessionPool
from runtime.watchers import (
    Changes,
    ModelWatcher,
    NotifyWatcher,
    PollingWatcher,
    Stamps,
    WatchedFiles,
    model_watcher,
)
from tests.support.pools import CountingFactory, make_pool
from tests.support.serving import (
    BIG_HIDDEN,
    ITEMS,
    CpuPressure,
    GameClient,
    Weights,
    check_matrices,
    model_metadata,
    reference_forward,
    runtime_process,
    serving_config,
    stop_process,
    trading_model,
    trading_weights,
    write_model,
)
from tests.support.wire import wait_until

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
    """What the converter does (blockmarket/core/files.py): a temp file next to the target, then a rename."""
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


async def ticker(keep_going: Callable[[], bool]) -> list[float]:
    """When a coroutine sleeping 1 ms at a time got the loop back, for as long as ``keep_going()``."""
    wakeups = [time.perf_counter()]
    while keep_going():
        await asyncio.sleep(0.001)
        wakeups.append(time.perf_counter())
    return wakeups


def for_seconds(seconds: float) -> Callable[[], bool]:
    end = time.perf_counter() + seconds
    return lambda: time.perf_counter() < end


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
        wakeups = np.asarray(await ticker(for_seconds(3.0)))
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


async def checkpoint_pool(model_dir: Path, max_sessions: int) -> SessionPool:
    """A started pool serving one agent per model (`one_per_checkpoint`)."""
    models, _ = discover_models(model_dir, ITEMS)
    pop = create_population(models, ITEMS, num_agents=0, assignment="one_per_checkpoint", seed=0)
    pool = SessionPool(
        pop,
        {m.key: m for m in models},
        factory=CountingFactory(),
        max_sessions=max_sessions,
        model_dir=model_dir,
        cpu_pack_precision="fp32",  # compared with the models run alone at fp32 tolerance
    )
    await pool.start()
    return pool


async def test_new_checkpoints_become_new_agents_when_each_agent_is_a_checkpoint(model_dir: Path) -> None:
    pool = await checkpoint_pool(model_dir, max_sessions=4)
    pop = pool.population
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
                *(sys.executable, "-m", "blockmarket.cli", "simulate", "--config", str(config_path)),
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


def simulate_command(config_path: Path, summary_path: Path, ticks: int = TICKS) -> list[str]:
    """`blockmarket simulate` at RATE_HZ for ``ticks`` ticks, its summary written to ``summary_path``."""
    return [
        *(sys.executable, "-m", "blockmarket.cli", "simulate", "--config", str(config_path)),
        *("--ticks", str(ticks), "--rate", str(RATE_HZ), "--json", str(summary_path), "--quiet"),
    ]


BIG_TICKS = 400  # 20 s: building and checking a pack of the big model takes several
STALL_BOUND_MS = 150  # the longest loop stall allowed on a machine not short of CPU (see the test)


@pytest.mark.mqtt
@pytest.mark.slow
@pytest.mark.parametrize("max_sessions", [8, 2], ids=["own-session", "packed"])
async def test_a_big_model_dropped_while_serving_stalls_no_tick(
    tmp_path: Path, model_dir: Path, prefix: str, big_model: Path, max_sessions: int
) -> None:
    """Issue 10: a 1.5 GB model whose metadata had no sha256 was hashed on the event loop (2.5-4.1 s
    stalls, 43-76 of 120 ticks missed). Here a 200 MB one replaces m1 in a runtime serving in this
    process while a `blockmarket simulate` process ticks at 20/s; a coroutine of that loop measures how
    long the loop was ever kept from it. With max_sessions 2 the three models are served as packs, which
    are built from the models' weights."""
    config_path = serving_config(
        tmp_path, model_dir, prefix, assignment="one_per_checkpoint", max_sessions=max_sessions
    )
    config = load_config(config_path)
    staged_onnx, staged_meta = model_dir / ".m1.onnx.staged", model_dir / ".m1_metadata.staged"
    shutil.copyfile(big_model, staged_onnx)  # the drop itself is two renames, as the converter does
    staged_meta.write_text(json.dumps(model_metadata("m1", BIG_HIDDEN, agent_id="ckpt-1")))  # no sha256
    big_version = sha256_file(big_model)[:12]
    summary_path = tmp_path / "simulation.json"
    server = RuntimeServer(config, handle_signals=False)
    serving = asyncio.create_task(server.serve())
    try:
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            await game.online()
            with CpuPressure() as pressure:
                simulator = await asyncio.create_subprocess_exec(
                    *simulate_command(config_path, summary_path, BIG_TICKS),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                await wait_until(lambda: len(game.answers) >= 20, 20, "20 answered ticks")
                loop_watch = asyncio.create_task(ticker(lambda: simulator.returncode is None))
                os.replace(staged_onnx, model_dir / "m1.onnx")
                os.replace(staged_meta, model_dir / f"m1{METADATA_SUFFIX}")
                output, _ = await asyncio.wait_for(simulator.communicate(), 60)
                wakeups = np.asarray(await loop_watch)
            assert simulator.returncode == 0, output.decode()[-3000:]
    finally:
        server.stop()
        assert await asyncio.wait_for(serving, 30) == 0
    versions = [game.answers[t].model_versions["m1"] for t in sorted(game.answers)]
    assert versions[0] != big_version and versions[-1] == big_version
    served_big = versions.count(big_version)
    assert served_big >= 10, f"the big model served only the last {served_big} ticks"
    gaps = np.diff(wakeups) * 1e3
    summary = json.loads(summary_path.read_text())
    seen = (
        f"loop stalls max {gaps.max():.1f} ms, p99 {np.percentile(gaps, 99):.1f} ms; {summary['missing']} "
        f"of {BIG_TICKS} ticks unanswered; {pressure}"
    )
    # What this guards against: hashing and loading on the loop stalled it for seconds (2.5-4.1 s with a
    # 1.5 GB model), and any work a worker thread does while holding the GIL. Stalls of 50-190 ms seen in CI
    # had two such causes, both removed: full garbage collections of this process's heap (31-63 ms each;
    # the server now freezes its startup heap) and the pack check's reference sessions, created in this
    # process (now in the niced builder process). What remains on a 2-vCPU VM are wakeups the OS or the
    # hypervisor delays while the builder works (up to 136 ms seen, with every thread of this process idle
    # in faulthandler dumps): the bound is 3 ticks at 20/s, and a stall that long coalesces at most the 2
    # ticks before the newest (latest-wins, counted as skipped: docs/runtime.md).
    assert gaps.max() < (300 if pressure.overloaded else STALL_BOUND_MS), seen
    allowed = BIG_TICKS // 10 if pressure.overloaded else STALL_BOUND_MS // (1000 // RATE_HZ) - 1
    assert summary["missing"] <= allowed, seen
    print(seen)


def replace_model_file(model_dir: Path, key: str, weights: Weights) -> str:
    """Replace `<key>.onnx` atomically (as the converter does), its metadata left alone; the new version."""
    staged = model_dir / f".{key}.onnx.tmp"
    onnx.save_model(trading_model(weights), str(staged))
    os.replace(staged, model_dir / f"{key}.onnx")
    return hashlib.sha256((model_dir / f"{key}.onnx").read_bytes()).hexdigest()[:12]


@contextlib.asynccontextmanager
async def reloading(reloader: ModelReloader) -> AsyncIterator[asyncio.Task[None]]:
    """The reload loop as a task, watching once this yields; cancelled afterwards."""
    task = asyncio.create_task(reloader.run())
    try:
        await asyncio.wait_for(reloader.watching.wait(), 5)
        yield task
    finally:
        task.cancel()


async def test_a_replaced_model_file_serves_under_its_content_hash_once_its_metadata_follows(
    model_dir: Path, make_watcher: WatcherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10: replacing `m1.onnx` and leaving `m1_metadata.json` alone kept the old weights serving
    under the old version label, with nothing logged. The converter replaces the model file first and
    writes the metadata seconds later: in between the model is not served; once the metadata follows,
    the new weights serve under their content hash."""
    pool = await make_pool(model_dir, agents=6, max_sessions=8)
    states = realistic_states(np.random.default_rng(5), 6, len(ITEMS))
    rows = pool.population.groups()["m1"]
    old_version = pool.current.versions["m1"]
    reloader = ModelReloader(pool, make_watcher(WatchedFiles(model_dir)), metadata_grace_s=30)
    async with reloading(reloader) as task:
        fresh = trading_weights(61)
        with caplog.at_level(logging.INFO):
            version = replace_model_file(model_dir, "m1", fresh)
            await wait_until(lambda: "m1.onnx changed but its metadata" in caplog.text, 5, "the wait")
        assert pool.current.versions["m1"] == old_version and pool.reload_failures == 0
        write_model(model_dir, "m1", fresh)  # the converter's metadata, for the same file content
        await wait_until(lambda: pool.current.versions["m1"] == version, 10, "the new version")
        assert pool.reload_failures == 0 and not task.done()
    np.testing.assert_allclose(
        (await pool.infer(states))[rows], reference_forward(fresh, states[rows]), rtol=1e-4
    )


async def test_a_model_file_whose_metadata_does_not_follow_is_refused_naming_both_hashes(
    model_dir: Path, make_watcher: WatcherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(model_dir, agents=6, max_sessions=8)
    old_version = pool.current.versions["m1"]
    reloader = ModelReloader(pool, make_watcher(WatchedFiles(model_dir)), metadata_grace_s=0.5)
    async with reloading(reloader):
        with caplog.at_level(logging.INFO):
            version = replace_model_file(model_dir, "m1", trading_weights(62))
            await wait_until(lambda: pool.reload_failures == 1, 5, "the refusal")
            await asyncio.sleep(1.0)  # refused once, not again at every poll
    assert pool.reload_failures == 1 and pool.current.number == 1
    assert pool.current.versions["m1"] == old_version  # the old weights, under their own hash
    (refusal,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"m1.onnx: its content has sha256 {version}, but m1_metadata.json declares {old_version}" in (
        refusal.getMessage()
    )
    write_model(model_dir, "m1", trading_weights(62))  # converted again: served after all
    await reloader.apply(Changes(frozenset({"m1"})))
    assert pool.current.versions["m1"] == version


def make_bad_entry(model_dir: Path, kind: str) -> str:
    """One entry of the model directory that cannot be served; returns the name its error must give."""
    meta = model_dir / f"bad{METADATA_SUFFIX}"
    if kind == "symlink loop":
        meta.symlink_to(meta.name)
    elif kind == "dangling symlink":
        meta.symlink_to("deleted_metadata.json")
    elif kind == "fifo":
        os.mkfifo(meta)
    else:
        meta.write_text("{not json" if kind == "invalid json" else json.dumps(model_metadata("bad", 16)))
        if kind == "directory":
            (model_dir / "bad.onnx").mkdir()
            return "bad.onnx"
    return meta.name


BAD_ENTRIES = ["symlink loop", "dangling symlink", "fifo", "directory", "invalid json", "missing model file"]


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and symlinks made by a test need POSIX")
@pytest.mark.parametrize("kind", BAD_ENTRIES)
async def test_a_bad_entry_is_skipped_counted_and_logged_once_and_blocks_no_reload(
    model_dir: Path, make_watcher: WatcherFactory, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """Issue 10: a symlink loop named `loop_metadata.json` made every poll raise with a full traceback
    and blocked every reload. A bad entry and a valid change arriving together: the change is served,
    the bad entry counted once and logged once in one line, and later polls say nothing more."""
    pool = await make_pool(model_dir, agents=6, max_sessions=8)
    reloader = ModelReloader(pool, make_watcher(WatchedFiles(model_dir)))
    async with reloading(reloader) as task:
        with caplog.at_level(logging.INFO):
            name = make_bad_entry(model_dir, kind)
            fresh = trading_weights(63)
            write_model(model_dir, "m1", fresh)
            await wait_until(lambda: pool.current.number == 2, 10, "m1's new version")
            await wait_until(lambda: pool.reload_failures == 1, 5, "the bad entry to be counted")
            await asyncio.sleep(1.0)  # some fifty polls of the polling watcher
        assert not task.done()
    assert pool.reload_failures == 1 and pool.current.number == 2
    (error,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert name in error.getMessage() and error.exc_info is None and "Traceback" not in caplog.text
    states = realistic_states(np.random.default_rng(6), 6, len(ITEMS))
    rows = pool.population.groups()["m1"]
    np.testing.assert_allclose(
        (await pool.infer(states))[rows], reference_forward(fresh, states[rows]), rtol=1e-4
    )


@pytest.mark.parametrize("max_sessions", [8, 2], ids=["own-sessions", "packed"])
async def test_a_model_that_fails_to_load_does_not_hold_back_the_others_changed_with_it(
    model_dir: Path, caplog: pytest.LogCaptureFixture, max_sessions: int
) -> None:
    """Two models change in one batch, one of them into a file ONNX Runtime cannot load. In sessions of
    their own the other is served at once. A pack is rebuilt from every member's file, so while one is
    broken the pack keeps serving the versions it has (the old weights under their own labels, never
    the broken file's) and both changes are tried again with the next one."""
    pool = await make_pool(model_dir, agents=6, max_sessions=max_sessions, cpu_pack_precision="fp32")
    reloader = ModelReloader(pool, PollingWatcher(WatchedFiles(model_dir), 0.02))
    before = pool.current.versions
    fresh = trading_weights(64)
    new_m1 = read_model(write_model(model_dir, "m1", fresh)).version
    (model_dir / "m2.onnx").write_bytes(b"\x08\x0a truncated by a full disk")
    (model_dir / f"m2{METADATA_SUFFIX}").write_text(
        json.dumps(model_metadata("m2", 16, onnx_sha256=sha256_file(model_dir / "m2.onnx")))
    )
    with caplog.at_level(logging.ERROR):
        await reloader.apply(Changes(frozenset({"m1", "m2"})))
    want = {f"m{i}": trading_weights(i) for i in range(3)}
    if max_sessions == 8:
        assert pool.reload_failures == 1 and pool.current.versions == {**before, "m1": new_m1}
        want["m1"] = fresh
    else:
        assert (
            pool.reload_failures == 2
            and pool.current.versions == before
            and set(pool.refused) == {"m1", "m2"}
        )
        refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert f"hot reload of m1@{new_m1} failed" in refusals[0] and "m2.onnx" in refusals[0]
    await assert_serves(pool, want)

    repaired = trading_weights(65)
    new_m2 = read_model(write_model(model_dir, "m2", repaired)).version
    await reloader.apply(Changes(frozenset({"m2"})))
    assert pool.current.versions == {"m0": before["m0"], "m1": new_m1, "m2": new_m2} and not pool.refused
    await assert_serves(pool, {**want, "m1": fresh, "m2": repaired})


async def assert_serves(pool: SessionPool, weights: dict[str, Weights]) -> None:
    """Each agent's proposals are its model's, for the weights given per model key."""
    states = realistic_states(np.random.default_rng(7), len(pool.population), len(ITEMS))
    got = await pool.infer(states)
    for key, rows in pool.population.groups().items():
        np.testing.assert_allclose(got[rows], reference_forward(weights[key], states[rows]), rtol=1e-4)


async def test_a_new_model_that_fails_to_load_does_not_keep_the_others_from_joining(model_dir: Path) -> None:
    pool = await checkpoint_pool(model_dir, max_sessions=8)
    reloader = ModelReloader(pool, PollingWatcher(WatchedFiles(model_dir), 0.02), add_new_agents=True)
    write_model(model_dir, "m3", trading_weights(3), agent_id="good")
    broken = trading_weights(4)
    broken[-1][:] = np.nan  # every proposal NaN: refused by validation
    write_model(model_dir, "m4", broken, agent_id="broken")
    await reloader.apply(Changes(frozenset({"m3", "m4"})))
    assert pool.population.agent_ids == ("ckpt-0", "ckpt-1", "ckpt-2", "good") and pool.reload_failures == 1
    assert sorted(pool.current.versions) == ["m0", "m1", "m2", "m3"]
