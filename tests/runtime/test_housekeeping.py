"""Housekeeping after pool swaps: packs no generation serves are deleted, freed heap goes back to the OS."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from blockmarket.core.config import NpuConfig
from blockmarket.core.state import realistic_states
from blockmarket.models.files import discover_models, read_model
from runtime import housekeeping, sessions, units
from runtime.agents import create_population
from runtime.housekeeping import freeze_startup_heap, lower_priority, prune_packs, release_free_memory
from runtime.sessions import SessionPool
from runtime.units import UnitBuilder, default_session_factory
from tests.support.serving import ITEMS, trading_weights, write_model

HOUR = 3600.0


def pack_files(folder: Path, digest: str, *, context: bool = False, age_s: float = HOUR) -> list[Path]:
    """A pack (and its QNN context cache files), last written ``age_s`` ago."""
    stem = f"pack-matmul_int8-3x2-{digest}"
    names = [f"{stem}.onnx"] + (
        [f"{stem}_ctx.onnx", f"{stem}_ctx_qnn.bin", f"{stem}_ctx.json"] if context else []
    )
    paths = [folder / name for name in names]
    for path in paths:
        path.write_bytes(b"pack")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return paths


def test_prune_removes_old_packs_nobody_serves_with_their_context_files(tmp_path: Path) -> None:
    serving = pack_files(tmp_path, "a" * 16)
    stale = pack_files(tmp_path, "b" * 16, context=True)
    young = pack_files(tmp_path, "c" * 16, age_s=1.0)  # another process may just have written it
    leftover = tmp_path / f".pack-matmul-3x2-{'d' * 16}.onnx.tmp"  # a build that died half way
    leftover.write_bytes(b"half")
    os.utime(leftover, (time.time() - HOUR, time.time() - HOUR))
    other = tmp_path / "notes.txt"
    other.write_text("not a pack")
    os.utime(other, (time.time() - HOUR, time.time() - HOUR))

    removed = prune_packs(tmp_path, keep=serving, grace_s=60.0)

    assert sorted(removed) == sorted([*stale, leftover])
    assert all(p.exists() for p in [*serving, *young, other])


def test_a_recently_used_context_cache_keeps_its_pack(tmp_path: Path) -> None:
    files = pack_files(tmp_path, "e" * 16, context=True)
    os.utime(files[-1])  # another process compiled or loaded the context just now
    assert prune_packs(tmp_path, keep=[], grace_s=60.0) == []
    assert all(p.exists() for p in files)


def test_prune_of_a_missing_directory_does_nothing(tmp_path: Path) -> None:
    assert prune_packs(tmp_path / "absent", keep=[]) == []


async def started_pool(model_dir: Path, max_sessions: int) -> SessionPool:
    """6 agents round robin over the models, real CPU sessions (fp32 packs when packed)."""
    models, _ = discover_models(model_dir, ITEMS)
    population = create_population(models, ITEMS, num_agents=6, assignment="round_robin", seed=3)
    pool = SessionPool(
        population,
        {m.key: m for m in models},
        factory=default_session_factory(NpuConfig(), 1),
        max_sessions=max_sessions,
        model_dir=model_dir,
        cpu_pack_precision="fp32",
    )
    await pool.start()
    return pool


async def test_hot_reloads_leave_only_the_served_packs_on_disk(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "SETTLE_S", 0.0)
    monkeypatch.setattr(housekeeping, "PACK_GRACE_S", 0.0)
    pool = await started_pool(model_dir, max_sessions=1)
    try:
        for seed in (21, 22):
            write_model(model_dir, "m1", trading_weights(seed))
            assert await pool.reload({"m1": read_model(model_dir / "m1_metadata.json")})
            states = realistic_states(np.random.default_rng(seed), 6, len(ITEMS))
            assert np.isfinite(await pool.infer(states)).all()
        for _ in range(100):  # the clean-up runs after the swap, off the loop
            await asyncio.sleep(0.05)
            on_disk = sorted((model_dir / units.PACK_DIR).glob("*pack-*"))
            if len(on_disk) == 2:
                break
        (served,) = [unit.model_path for unit in pool.current.units]
        assert on_disk == sorted([served, served.with_name(served.stem + units.CHECKED_SUFFIX)])
    finally:
        pool.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_free_memory_gives_freed_heap_back_on_glibc() -> None:
    process = psutil.Process()
    blocks = [bytearray(1000) for _ in range(200_000)]  # 200 MB of small blocks: the heap, not mmap
    blocks = blocks[::100]  # 99% freed, a few live blocks spread over the heap pin it: glibc keeps it
    holding = process.memory_info().rss
    assert release_free_memory()
    released = holding - process.memory_info().rss
    assert released > 50e6, f"only {released / 1e6:.1f} MB went back to the OS"
    del blocks


def test_release_free_memory_does_nothing_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    assert not release_free_memory()


async def test_after_the_startup_heap_is_frozen_a_swapped_out_generation_is_still_freed(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server freezes its startup heap out of garbage collection; the first pool is part of it, and
    its sessions (hundreds of MB with large models) must still go when a reload replaces them."""
    monkeypatch.setattr(sessions, "SETTLE_S", 0.0)
    pool = await started_pool(model_dir, max_sessions=8)
    first = [weakref.ref(unit.session) for unit in pool.current.units if "m1" in unit.models]
    assert first
    try:
        assert freeze_startup_heap() > 10_000
        write_model(model_dir, "m1", trading_weights(21))
        assert await pool.reload({"m1": read_model(model_dir / "m1_metadata.json")})
        for _ in range(100):  # the old generation is dropped after it settles, off the loop
            await asyncio.sleep(0.02)
            if all(ref() is None for ref in first):
                break
        assert all(ref() is None for ref in first), "the replaced session is still alive"
    finally:
        gc.unfreeze()
        pool.close()


@pytest.mark.skipif(sys.platform == "win32", reason="niceness is POSIX")
def test_the_pack_builder_process_runs_below_the_serving_priority(tmp_path: Path) -> None:
    builder = UnitBuilder(default_session_factory(NpuConfig(), 1), len(ITEMS), tmp_path)
    try:
        assert builder._in_builder(os.nice, 0) == os.nice(0) + housekeeping.BACKGROUND_NICE
    finally:
        builder.close()


def test_on_windows_a_background_worker_asks_for_the_below_normal_priority_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Simulated platform: kernel32 cannot be loaded here, so a stand-in records the call."""
    calls: list[tuple[Any, int]] = []

    class Kernel32:
        def __init__(self, name: str) -> None:
            assert name == "kernel32"

        def GetCurrentProcess(self) -> str:
            return "this process"

        def SetPriorityClass(self, process: Any, priority: int) -> int:
            calls.append((process, priority))
            return 1

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "WinDLL", Kernel32, raising=False)
    assert lower_priority() == "below normal priority class"
    assert calls == [("this process", 0x4000)]
