"""Plot agent-updates/s (log scale) against N for the three inference paths, from the inference results.

Reads benchmarks/results/inference.json (written by ``python -m benchmarks.inference``) and writes
docs/performance.png: one panel per weight case (distinct weights per agent; one shared model).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks._report import REPO_ROOT, RESULTS_DIR

LABELS = {
    "original": "original: per-agent Python state + PyTorch forward",
    "ort_per_agent": "one onnxruntime session.run per agent",
    "ours": "ours: vectorized state + one session.run (pack / batch)",
}
TITLES = {"distinct": "distinct weights per agent", "shared": "all agents share one model"}


class ResultsError(ValueError):
    """The inference results file is missing or not what benchmarks.inference writes."""


def load_results(path: Path) -> dict[str, Any]:
    """The ``results`` and ``machine`` sections of an inference results file."""
    try:
        document = json.loads(path.read_text())
        results, machine = document["results"], document["machine"]
        cases, bandwidth = results["cases"], results["memory_bandwidth"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(
            f"{path}: not an inference results file ({exc}); run benchmarks.inference"
        ) from None
    if not cases:
        raise ResultsError(f"{path}: holds no cases")
    return {"cases": cases, "bandwidth": bandwidth, "machine": machine}


def bandwidth_bound(case: dict[str, Any], bandwidth: dict[str, float]) -> float:
    """Updates/s if every fp32 weight is read once per tick at the measured memory read bandwidth."""
    bytes_per_agent = case["paths"]["ours"]["weight_bytes_per_tick"] / case["agents"]
    return max(bandwidth["one_thread_gb_s"], bandwidth["two_threads_gb_s"]) * 1e9 / bytes_per_agent


def plot(results: dict[str, Any], out: Path) -> Path:
    """One log-log panel per case; a point per (path, N); extrapolated points drawn hollow."""
    cases = results["cases"]
    kinds = [kind for kind in TITLES if any(c["case"] == kind for c in cases)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.0 * len(kinds), 4.6), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = sorted((c for c in cases if c["case"] == kind), key=lambda c: c["agents"])
        agents = [c["agents"] for c in rows]
        for name, label in LABELS.items():
            paths = [c["paths"][name] for c in rows]
            (line,) = ax.plot(agents, [p["updates_per_s"] for p in paths], marker="o", label=label)
            hollow = [
                (n, p["updates_per_s"]) for n, p in zip(agents, paths, strict=True) if p.get("extrapolated")
            ]
            if hollow:
                xs, ys = zip(*hollow, strict=True)
                ax.scatter(xs, ys, s=70, facecolors="white", edgecolors=line.get_color(), zorder=3)
        if kind == "distinct":
            bound = [bandwidth_bound(c, results["bandwidth"]) for c in rows]
            ax.plot(agents, bound, "k--", linewidth=1, label="limit: fp32 weights read at measured bandwidth")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(TITLES[kind])
        ax.set_xlabel("agents N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("agent updates per second (one tick = N updates)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    machine = results["machine"]
    fig.suptitle(
        f"Per-tick inference, CPU EP, {machine.get('logical_cores', '?')} cores {machine.get('cpu', '')}"
        "\n(hollow: extrapolated from a timed subset of agents)"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "inference.json", help="inference JSON")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs" / "performance.png", help="PNG to write"
    )
    args = parser.parse_args(argv)
    try:
        results = load_results(args.results)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {plot(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
