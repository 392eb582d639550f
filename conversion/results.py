"""What a conversion run reports: one result per checkpoint, and the end-of-run summary table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["converted", "skipped", "validated", "failed"]


@dataclass
class ConversionResult:
    """The outcome for one checkpoint (what the summary table and the runtime read)."""

    source: Path
    name: str
    status: Status
    architecture: str | None = None
    num_items: int | None = None
    onnx_path: Path | None = None
    metadata_path: Path | None = None
    max_abs_error: float | None = None
    seconds: float = 0.0
    error: str | None = None
    variants: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def format_summary(results: list[ConversionResult]) -> str:
    """The end-of-run table: name, architecture, n, status, max abs error, time; then the failures."""
    header = ("name", "architecture", "n", "status", "max abs err", "time")
    rows = [
        (
            r.name,
            r.architecture or "-",
            str(r.num_items or "-"),
            r.status,
            "-" if r.max_abs_error is None else f"{r.max_abs_error:.2e}",
            f"{r.seconds:.2f}s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = Counter(r.status for r in results)
    total = sum(r.seconds for r in results)
    lines.append(
        ", ".join(f"{counts[s]} {s}" for s in ("converted", "skipped", "validated", "failed") if counts[s])
    )
    lines[-1] = f"{lines[-1] or 'nothing to do'} in {total:.1f} s"
    lines += [f"FAILED {r.error}" for r in results if r.error]
    return "\n".join(lines)
