"""benchmarks.market_step at tiny sizes: it runs, both methods trade, and the JSON says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_market_step_benchmark_writes_one_row_per_size(tmp_path: Path) -> None:
    out = tmp_path / "market_step.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.market_step", "--agents", "30", "200",
         "--steps", "3", "--enumerate-max", "100", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ms per trade_step" in done.stdout
    document = json.loads(out.read_text())
    assert document["benchmark"] == "market_step"
    rows = document["results"]
    assert [r["agents"] for r in rows] == [30, 200]
    assert all(
        r["sample_p50_ms"] > 0 and r["auto_p50_ms"] > 0 and r["sample_trades_per_step"] > 0 for r in rows
    )
    assert rows[0]["enumerate_p50_ms"] > 0 and rows[0]["pairs_in_range"] > 0
    assert rows[0]["enumerate_trades_per_step"] > 0 and rows[0]["trades_ratio"] > 0
    assert rows[1]["enumerate_p50_ms"] is None and rows[1]["speedup"] is None  # above --enumerate-max
