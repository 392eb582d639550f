"""Hot reload: changed model files are noticed by stat, rebuilt off the loop and swapped, or refused."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from runtime.agents import create_population
from runtime.models import discover_models
from runtime.reload import ModelReloader, ModelWatcher
from runtime.sessions import SessionPool
from runtime.state import realistic_states
from tests.runtime.runtime_helpers import ITEMS, reference_forward, trading_weights, write_model
from tests.runtime.test_sessions import CountingFactory, make_pool


def touch_later(path: Path) -> None:
    """Make a rewrite visible to mtime even on a coarse clock."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_watcher_reports_changed_models_and_new_checkpoints(tmp_path: Path, model_dir: Path) -> None:
    checkpoints: list[Path] = []
    watcher = ModelWatcher(model_dir, lambda: checkpoints)
    assert watcher.poll().models == frozenset() and not watcher.poll().checkpoints
    write_model(model_dir, "m1", trading_weights(50))
    touch_later(model_dir / "m1.onnx")
    write_model(model_dir, "m7", trading_weights(7))
    assert watcher.poll().models == {"m1", "m7"}
    assert watcher.poll().models == frozenset()  # reported once
    (model_dir / "m1_ctx.onnx").write_bytes(b"QNN context cache written next to the model")
    assert watcher.poll().models == frozenset()  # no metadata of its own: not a model
    (tmp_path / "new.pth").write_bytes(b"x")
    checkpoints.append(tmp_path / "new.pth")
    assert watcher.poll().checkpoints and not watcher.poll().checkpoints


async def test_reloader_swaps_changed_models_and_refuses_broken_ones(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(model_dir, agents=6, max_sessions=8)
    reloader = ModelReloader(pool, ModelWatcher(model_dir, list), poll_s=0.01)
    states = realistic_states(np.random.default_rng(0), 6, len(ITEMS))
    m1_rows = pool.population.groups()["m1"]

    fresh = trading_weights(77)
    write_model(model_dir, "m1", fresh)
    touch_later(model_dir / "m1.onnx")
    await reloader.check()
    assert pool.current.number == 2 and reloader.reloads == 1
    np.testing.assert_allclose(
        (await pool.infer(states))[m1_rows], reference_forward(fresh, states[m1_rows]), rtol=1e-4
    )

    broken = trading_weights(78)
    broken[0][:] = np.inf
    write_model(model_dir, "m1", broken)
    touch_later(model_dir / "m1.onnx")
    with caplog.at_level(logging.ERROR):
        await reloader.check()
    assert pool.current.number == 2 and pool.reload_failures == 1
    assert "previous version keeps serving" in caplog.text
    np.testing.assert_allclose(
        (await pool.infer(states))[m1_rows], reference_forward(fresh, states[m1_rows]), rtol=1e-4
    )

    (model_dir / "m2_metadata.json").write_text("{not json")
    await reloader.check()
    assert pool.reload_failures == 2 and pool.current.number == 2

    with caplog.at_level(logging.WARNING):
        write_model(model_dir, "m9", trading_weights(9))
        await reloader.check()
    assert "m9" in caplog.text and "not assigned" in caplog.text and pool.current.number == 2


async def test_new_checkpoint_is_converted_then_reloaded(tmp_path: Path, model_dir: Path) -> None:
    pool = await make_pool(model_dir, agents=3, max_sessions=8)
    checkpoints: list[Path] = []
    converted = trading_weights(31)

    async def convert() -> None:  # stands in for the worker-process conversion
        write_model(model_dir, "m0", converted)
        touch_later(model_dir / "m0.onnx")

    reloader = ModelReloader(pool, ModelWatcher(model_dir, lambda: checkpoints), poll_s=0.01, convert=convert)
    (tmp_path / "m0.pth").write_bytes(b"retrained")
    checkpoints.append(tmp_path / "m0.pth")
    await reloader.check()
    assert pool.current.number == 2
    states = realistic_states(np.random.default_rng(1), 3, len(ITEMS))
    rows = pool.population.groups()["m0"]
    np.testing.assert_allclose(
        (await pool.infer(states))[rows], reference_forward(converted, states[rows]), rtol=1e-4
    )


async def test_new_checkpoints_become_new_agents_when_each_agent_is_a_checkpoint(model_dir: Path) -> None:
    models, _ = discover_models(model_dir, ITEMS)
    pop = create_population(models, ITEMS, num_agents=0, assignment="one_per_checkpoint", seed=0)
    pool = SessionPool(
        pop, {m.key: m for m in models}, factory=CountingFactory(), max_sessions=4, model_dir=model_dir
    )
    await pool.start()
    before = pop.matrices.copy()
    reloader = ModelReloader(pool, ModelWatcher(model_dir, list), poll_s=0.01, add_new_agents=True)
    for i in (3, 4):  # five models with max_sessions 4: the grown roster is served through one pack
        write_model(model_dir, f"m{i}", trading_weights(i), agent_id="ckpt-1" if i == 3 else "ckpt-4")
    await reloader.check()
    assert pool.population is pop and pop.agent_ids == ("ckpt-0", "ckpt-1", "ckpt-2", "m3", "ckpt-4")
    np.testing.assert_array_equal(pop.matrices[:3], before)  # existing agents keep their state
    (unit,) = pool.current.units
    assert unit.name == "pack:TradingNetwork-61x5" and pool.current.number == 2
    states = realistic_states(np.random.default_rng(2), 5, len(ITEMS))
    want = np.concatenate([reference_forward(trading_weights(i), states[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(await pool.infer(states), want, rtol=1e-4)


async def test_a_failing_conversion_does_not_stop_the_reload_loop(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await make_pool(model_dir, agents=3, max_sessions=8)
    checkpoints: list[Path] = []

    async def convert() -> None:
        raise RuntimeError("worker process died")

    reloader = ModelReloader(pool, ModelWatcher(model_dir, lambda: checkpoints), poll_s=0.01, convert=convert)
    loop = asyncio.create_task(reloader.run())
    try:
        (tmp_path / "bad.pth").write_bytes(b"x")
        checkpoints.append(tmp_path / "bad.pth")
        with caplog.at_level(logging.ERROR):
            await asyncio.sleep(0.1)
        assert not loop.done() and pool.reload_failures == 1 and "worker process died" in caplog.text
        write_model(model_dir, "m2", trading_weights(222))  # the loop still reloads afterwards
        touch_later(model_dir / "m2.onnx")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pool.current.number == 2:
                break
        assert pool.current.number == 2
    finally:
        loop.cancel()
