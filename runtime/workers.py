"""Work that needs torch (conversion, bootstrap training), run in a spawned worker process.

The serving process never imports torch: it hands the validated config to a fresh interpreter
(multiprocessing "spawn", so nothing of the serving process is forked), which imports `conversion` /
`training` inside the function and exits when done.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from blockmarket.core.config import Config
from blockmarket.core.logs import setup_logging
from blockmarket.models.files import METADATA_SUFFIX

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ConversionSummary:
    """What a conversion run did (picklable: it crosses the process boundary)."""

    converted: int
    skipped: int
    failed: tuple[str, ...]  # one error line per failed checkpoint, naming the file


def convert_checkpoints(config: Config) -> ConversionSummary:
    """(worker) Convert every new or changed checkpoint under training.model_save_path."""
    setup_logging(config.logging)
    from conversion.converter import ONNXConverter

    results = ONNXConverter(config).convert_all_models()
    return ConversionSummary(
        converted=sum(r.status == "converted" for r in results),
        skipped=sum(r.status == "skipped" for r in results),
        failed=tuple(r.error or str(r.source) for r in results if not r.ok),
    )


def bootstrap_population(config: Config, generations: int) -> None:
    """(worker) Train a small population from scratch so a fresh install has agents to serve."""
    setup_logging(config.logging)
    from training.evolution import train

    train(config, generations=generations, progress=False)


async def run_in_worker(func: Callable[..., T], *args: object) -> T:
    """Run ``func(*args)`` in a fresh spawned process without blocking the event loop."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await loop.run_in_executor(pool, func, *args)


def checkpoints(config: Config) -> list[Path]:
    """The `.pth` files under the checkpoint directory (outside the ONNX output directory)."""
    return checkpoint_files(Path(config.training.model_save_path), config.onnx_dir)


def is_checkpoint_name(name: str) -> bool:
    """`*.pth`, case-insensitively where the file system is (Windows)."""
    return os.path.normcase(name).endswith(".pth")


def checkpoint_files(root: Path, converted: Path | None = None) -> list[Path]:
    """The `.pth` files below ``root``, never descending into ``converted`` (blocking: call it off the loop).

    The conversion output usually lies inside the checkpoint directory and holds two files per model, so
    it is pruned as a directory, not listed and filtered file by file (with 10,000 models in it, 2 ms
    instead of 35 ms per call here).
    """
    skip = converted.resolve() if converted is not None else None
    if not root.is_dir() or (skip is not None and root.resolve().is_relative_to(skip)):
        return []
    found: list[Path] = []
    for folder, subdirs, names in os.walk(root):
        if skip is not None:
            subdirs[:] = [d for d in subdirs if not Path(folder, d).resolve().is_relative_to(skip)]
        found += (Path(folder, name) for name in names if is_checkpoint_name(name))
    return sorted(found)


def conversion_pending(config: Config) -> bool:
    """Cheap stat-only guess whether a conversion worker has anything to do (it decides exactly).

    True when a checkpoint is newer than every metadata file, or there are more checkpoints than
    converted models (a new file, or one that failed before and is retried).
    """
    sources = checkpoints(config)
    if not sources:
        return False
    metas = list(config.onnx_dir.glob(f"*{METADATA_SUFFIX}")) if config.onnx_dir.is_dir() else []
    if len(sources) > len(metas):
        return True
    newest_meta = max(_mtime_ns(m) for m in metas)
    return any(_mtime_ns(s) > newest_meta for s in sources)


def _mtime_ns(path: Path) -> int:
    """The file's mtime, or -1 when it cannot be read (a dangling link, a file removed meanwhile): the
    worker reports such a file by name, this guess only must not crash on it."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1
