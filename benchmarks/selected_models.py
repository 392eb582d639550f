"""Selected models: a population pack run for only the models whose agents ticked, against the whole pack.

A CPU pack is built *selectable* (blockmarket.models.pack): its ``models`` input names the weight sets to
run. With all N it runs the whole pack; with K < N it gathers those K weight sets first, so a tick of a
few markets reads and multiplies only their models' weights. Gathering copies the weights it picks, so
past some K running the whole pack is cheaper: the runtime switches at ``GATHER_BELOW`` x N
(blockmarket.core.contract), and this script measures where the switch should be.

For each form (fp32 ``matmul``, ``matmul_int8``) one selectable pack of ``--models`` random TradingNetworks
(n = 5, H = ``--hidden``, ``--rows`` rows per model, the last one padding as the runtime's batch-invariant
packs have) is timed on one intra-op thread: the whole pack (all N models) and a selected run of K models
for each fraction in ``--fractions``, the two interleaved call by call (``--repeats`` pairs, median).
Reported: ms per call, the ratio selected / whole, where a selected run costs at most half the whole pack
and where it stops being faster (the crossover), beside the runtime's threshold.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from benchmarks.int8_accuracy import population
from blockmarket.core.contract import GATHER_BELOW, INPUT_NAME, MODELS_INPUT
from blockmarket.core.state import realistic_states
from blockmarket.models.pack import PackForm, build_pack

ITEMS = 5
FORMS: dict[str, PackForm] = {"fp32": "matmul", "int8": "matmul_int8"}
HEADERS = ["weights", "models", "K", "fraction", "whole ms", "selected ms", "selected / whole"]


def interleaved(first: Any, second: Any, repeats: int) -> tuple[float, float]:
    """Median seconds of each of two calls, timed alternately (after one unmeasured call each)."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        first()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        second()
        b.append(time.perf_counter() - start)
    return float(np.median(a)), float(np.median(b))


def time_form(weights: str, sets: Sequence[Sequence[np.ndarray]], args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    models, rows = len(sets), args.rows
    pack = build_pack(sets, form=FORMS[weights], batch_per_agent=rows, selectable=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(pack.SerializeToString(), options, providers=["CPUExecutionProvider"])
    states = realistic_states(rng, models * rows, ITEMS).reshape(models, rows, -1)
    states[:, -1] = 0.0  # the padding row of each model's block
    every = np.arange(models, dtype=np.int64)
    whole_feeds = {INPUT_NAME: states.reshape(models * rows, -1), MODELS_INPUT: every}
    results = []
    for fraction in args.fractions:
        count = max(1, round(fraction * models))
        chosen = np.sort(rng.choice(models, count, replace=False)).astype(np.int64)
        feeds = {INPUT_NAME: states[chosen].reshape(count * rows, -1), MODELS_INPUT: chosen}
        whole_s, selected_s = interleaved(
            partial(session.run, None, whole_feeds), partial(session.run, None, feeds), args.repeats
        )
        results.append(
            {
                "weights": weights,
                "models": models,
                "selected": count,
                "fraction": count / models,
                "whole_ms": whole_s * 1e3,
                "selected_ms": selected_s * 1e3,
                "ratio": selected_s / whole_s,
            }
        )
    return results


def half_cost(rows: Sequence[dict]) -> float | None:
    """The largest fraction measured at which a selected run costs at most half the whole pack."""
    cheap = [r["fraction"] for r in rows if r["ratio"] <= 0.5]
    return max(cheap) if cheap else None


def crossover(rows: Sequence[dict]) -> float | None:
    """The smallest fraction measured (below all N) at which a selected run is no faster than the whole."""
    slower = [r["fraction"] for r in rows if r["ratio"] >= 1.0 and r["selected"] < r["models"]]
    return min(slower) if slower else None


def _fraction(value: float | None) -> str:
    return "none of the fractions run" if value is None else f"{value:g}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.selected_models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", type=int, default=1020, help="weight sets in the pack (default 1020)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size H (default 128)")
    parser.add_argument("--rows", type=int, default=2, help="rows per model, the last padding (default 2)")
    parser.add_argument(
        "--fractions",
        type=lambda text: [float(f) for f in text.split(",")],
        default=[0.002, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.6, 0.7, 0.85],
        help="fractions of the models selected, comma-separated",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed call pairs per fraction (default 15)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "selected_models")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    sets = population(np.random.default_rng(args.seed), args.models, ITEMS, args.hidden)
    rows: list[dict] = []
    summary = {}
    for weights in FORMS:
        print(f"... {weights} pack of {args.models} models", file=sys.stderr, flush=True)
        measured = time_form(weights, sets, args)
        rows += measured
        summary[weights] = {
            "half_cost_fraction": half_cost(measured),
            "crossover_fraction": crossover(measured),
            "gather_below": GATHER_BELOW[weights],
        }
    print_table(
        "one session.run on one thread: the whole pack vs the K selected models (median)",
        HEADERS,
        [[r["weights"], r["models"], r["selected"], r["fraction"], r["whole_ms"], r["selected_ms"],
          r["ratio"]] for r in rows],
    )  # fmt: skip
    for weights, found in summary.items():
        half, where = found["half_cost_fraction"], found["crossover_fraction"]
        print(
            f"{weights}: selecting costs at most half the whole pack up to {_fraction(half)} of the models "
            f"and stops paying at {_fraction(where)}; the runtime selects below {found['gather_below']:g}"
        )
    settings = {
        "items": ITEMS,
        "hidden": args.hidden,
        "rows_per_model": args.rows,
        "repeats": args.repeats,
        "summary": summary,
        "command": command_line("selected_models", argv),
    }
    write_results(args.out, "selected_models", machine, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
