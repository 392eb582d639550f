"""Where an int8 population pack's time goes: ONNX Runtime's own profile of one pack, op by op, against the
memory limit for reading its weights.

One pack of ``--models`` random TradingNetworks (n = 5, H = ``--hidden``, ``--rows`` rows per model: 1 as
the runtime serves by default, 2 as its batch-invariant packs in replica mode, the last row padding;
``matmul_int8`` as the runtime builds it, selectable)
is run whole on one intra-op thread, ``--repeats`` times, with ORT's profiler on. Reported per op type:
ms per run and share of the run; for the int8 MatMuls the GB/s at which they read the weights. The
memory limit is measured in the same run: one MatMulInteger of the same int8 bytes as a single 2-D matrix
times one row (a GEMV, which ORT packs once at load, so it only streams the weights), whose GB/s is what
reading those bytes costs on this machine. ``matmul ÷ limit`` is the ratio of the two speeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks._report import (
    add_output_argument,
    command_line,
    machine_info,
    print_table,
    time_calls,
    write_results,
)
from benchmarks.int8_accuracy import population
from blockmarket.core.contract import INPUT_NAME, MODELS_INPUT
from blockmarket.core.state import realistic_states
from blockmarket.models.pack import build_pack

ITEMS = 5


def session(model: bytes, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = profile
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def median_ms(run: Any, repeats: int) -> float:
    """Median ms of ``repeats`` calls after one unmeasured call (``repeats`` + 1 runs in all)."""
    return float(np.median(time_calls(run, repeats, warmup=1))) * 1e3


def op_times(profile: Path, runs: int) -> dict[str, float]:
    """ms per run by op type, from ORT's profile (kernel time of every node, the If's branch included)."""
    spent: Counter[str] = Counter()
    for event in json.loads(profile.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    return {op: us / runs / 1e3 for op, us in spent.most_common() if op != "If"}


def streaming_limit(weight_bytes: int, repeats: int) -> float:
    """GB/s of one MatMulInteger of ``weight_bytes`` int8 weights as a 2-D [128, bytes / 128] matrix
    times one uint8 row: the weights streamed once, after ORT packed them at load."""
    rng = np.random.default_rng(1)
    weight = rng.integers(-63, 64, size=(128, weight_bytes // 128), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "stream",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    run = session(model.SerializeToString())
    row = rng.integers(0, 256, size=(1, 128), dtype=np.uint8)
    return weight.nbytes / median_ms(lambda: run.run(None, {"a": row}), repeats) / 1e6


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sets = population(np.random.default_rng(args.seed), args.models, ITEMS, args.hidden)
    pack = build_pack(sets, form="matmul_int8", batch_per_agent=args.rows, selectable=True)
    weight_bytes = sum(
        init.dims[0] * init.dims[1] * init.dims[2]
        for init in pack.graph.initializer
        if init.data_type == onnx.TensorProto.INT8
    )
    del sets
    states = realistic_states(np.random.default_rng(args.seed), args.models * args.rows, ITEMS)
    if args.rows > 1:
        states[args.rows - 1 :: args.rows] = 0.0  # each model's padding row
    feeds = {INPUT_NAME: states, MODELS_INPUT: np.arange(args.models, dtype=np.int64)}
    profiled = session(pack.SerializeToString(), profile=True)
    run_ms = median_ms(lambda: profiled.run(None, feeds), args.repeats)
    profile = Path(profiled.end_profiling())
    ops = op_times(profile, args.repeats + 1)
    profile.unlink()
    limit = streaming_limit(weight_bytes, args.repeats)
    matmul_gbs = weight_bytes / ops["MatMulInteger"] / 1e6
    return {
        "models": args.models,
        "hidden": args.hidden,
        "weight_mb": round(weight_bytes / 1e6, 1),
        "run_ms": round(run_ms, 2),
        "ops_ms": {op: round(ms, 3) for op, ms in ops.items()},
        "matmul_gb_per_s": round(matmul_gbs, 1),
        "whole_run_gb_per_s": round(weight_bytes / run_ms / 1e6, 1),
        "streaming_limit_gb_per_s": round(limit, 1),
        "matmul_to_limit": round(matmul_gbs / limit, 2),
        "run_to_limit": round(weight_bytes / run_ms / 1e6 / limit, 2),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pack_ops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", type=int, default=10000, help="weight sets in the pack (default 10000)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size H (default 128)")
    parser.add_argument("--rows", type=int, default=1, help="rows per model (default 1; 2: replica mode)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "pack_ops")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    print(f"... int8 pack of {args.models} models (H = {args.hidden})", file=sys.stderr, flush=True)
    result = measure(args)
    run_ms, megabytes = result["run_ms"], result["weight_mb"]
    print_table(
        f"one session.run of the int8 pack, one thread: {run_ms} ms ({megabytes} MB of int8 weights)",
        ["op", "ms per run", "share of the run"],
        [[op, ms, f"{ms / run_ms:.0%}"] for op, ms in result["ops_ms"].items()],
    )
    print(
        f"\nMatMulInteger reads the weights at {result['matmul_gb_per_s']} GB/s, the whole run at "
        f"{result['whole_run_gb_per_s']} GB/s; streaming the same bytes (2-D GEMV): "
        f"{result['streaming_limit_gb_per_s']} GB/s. matmul / limit {result['matmul_to_limit']}, "
        f"run / limit {result['run_to_limit']}"
    )
    settings = {**vars(args), "command": command_line("pack_ops", argv)}
    settings.pop("out", None)
    write_results(args.out, "pack_ops", machine, settings, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
