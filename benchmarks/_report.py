"""What every benchmark shares: machine facts, latency summaries, a printed table and the JSON file.

Results are written to ``benchmarks/results/<name>.json`` so the README and the plot read figures from
files a rerun overwrites, never from numbers copied by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from blockmarket.core.files import atomic_target
from blockmarket.core.stats import percentiles
from blockmarket.models.packcheck import cpu_features

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("numpy", "onnxruntime-qnn", "onnx", "torch", "aiomqtt", "msgpack", "watchfiles")


def add_output_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out PATH`` with the committed results file as default."""
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help=f"where to write the JSON results (default: benchmarks/results/{name}.json)",
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that change which ONNX Runtime kernels run (and so speed and int8 arithmetic): x86 AVX2,
# AVX-512 and VNNI (the int8 dot product without int16 saturation); ARM64 NEON dot product and i8mm.
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`ISA_FLAGS` this CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    present = cpu_features()
    return {flag: flag in present for flag in ISA_FLAGS} if present else {}


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to judge a figure: CPU, cores, memory, load, versions, commit."""
    return {
        "cpu": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "git_commit": _git_commit(),
        "utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean/max in milliseconds of a list of durations in seconds."""
    if not seconds:
        raise ValueError("no samples to summarise")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p99 = percentiles(ms, digits=4)
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_ms": round(float(ms.mean()), 4),
        "max_ms": round(float(ms.max()), 4),
        "samples": len(ms),
    }


def time_calls(call: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    """Wall time of each of ``repeats`` calls (after ``warmup`` unmeasured ones), in seconds."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def format_number(value: object) -> str:
    """Compact human formatting for table cells (thousands separators, 3 significant decimals)."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned text table on stdout."""
    cells = [[format_number(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run (recorded next to its figures)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", f"benchmarks.{module}", *args])


def write_results(
    path: Path, benchmark: str, machine: dict[str, Any], settings: dict[str, Any], results: Any
) -> Path:
    """Write ``{benchmark, machine, settings, results}`` as JSON (atomically) and return the path.

    ``machine`` is taken when the run starts (:func:`machine_info`); the load at the end is added here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {**machine, "load_average_1m_end": round(os.getloadavg()[0], 2)}
    document = {"benchmark": benchmark, "machine": machine, "settings": settings, "results": results}
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    flags = " ".join(flag for flag, present in machine.get("cpu_flags", {}).items() if present) or "unknown"
    print(f"\nmachine: {machine['cpu']}, {machine['logical_cores']} logical cores, CPU flags: {flags}")
    print(f"wrote {path}")
    return path
