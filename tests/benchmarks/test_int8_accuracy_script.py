"""benchmarks.int8_accuracy at a tiny size: every agent within tolerance, CPU flags recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_int8_accuracy_reports_every_population_and_the_cpu_flags(tmp_path: Path) -> None:
    out = tmp_path / "int8_accuracy.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.int8_accuracy", "--populations", "2", "--agents", "8",
         "--states", "4", "--hidden", "32", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CPU flags:" in done.stdout
    document = json.loads(out.read_text())
    assert "avx2" in document["machine"]["cpu_flags"] and "asimddp" in document["machine"]["cpu_flags"]
    rows = document["results"]
    assert [r["population"] for r in rows] == [0, 1]
    assert all(r["agents_over_tolerance"] == 0 and 0 < r["worst_error_of_allowed"] < 1 for r in rows)
