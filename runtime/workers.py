"""Work that needs torch (conversion, bootstrap training), run in a spawned worker process.

The serving process never imports torch: it hands the validated config to a fresh interpreter
(multiprocessing "spawn", so nothing of the serving process is forked), which imports `conversion` /
`training` inside the function and exits when done.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from runtime.config import Config
from runtime.logs import setup_logging
from runtime.models import METADATA_SUFFIX

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
    root = Path(config.training.model_save_path)
    if not root.is_dir():
        return []
    onnx_dir = config.onnx_dir.resolve()
    return sorted(p for p in root.rglob("*.pth") if not p.resolve().is_relative_to(onnx_dir))


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
    newest_meta = max(m.stat().st_mtime_ns for m in metas)
    return any(s.stat().st_mtime_ns > newest_meta for s in sources)
