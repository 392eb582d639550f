"""int8 pack accuracy on this CPU: every agent of the int8-weight pack against the fp32 pack.

ONNX Runtime picks its int8 kernels by instruction set (AVX2, AVX-512, VNNI, ARM64 dot product), and
their arithmetic differs: without VNNI, x86 adds pairs of uint8 x int8 products in a saturating int16.
Run this on any machine to see the error of the int8 pack (``runtime.cpu_pack_precision: auto``) against
the tolerance the runtime enforces (``blockmarket.core.contract.PACK_TOLERANCE["cpu_int8"]``); the CPU
flags are in the printed machine line and the JSON.

Populations: ``--populations`` sets of ``--agents`` distinct networks with PyTorch's default nn.Linear
initialisation, heads scaled x1/x4/x8/x12 in turn (outputs up to ~7, like trained policies), on
``--states`` realistic states per agent (edge cases included).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from blockmarket.core.contract import INPUT_NAME, PACK_TOLERANCE
from blockmarket.core.state import realistic_states, state_dim
from blockmarket.models.pack import WEIGHT_LEVELS, build_pack

HEAD_SCALES = (1.0, 4.0, 8.0, 12.0)


def population(rng: np.random.Generator, agents: int, items: int, hidden: int) -> list[list[np.ndarray]]:
    """Distinct TradingNetwork weights (nn.Linear layout and init), heads scaled like trained policies."""
    dims = [state_dim(items), hidden, hidden, hidden, items * items]
    weight_sets = []
    for agent in range(agents):
        weights = []
        for fan_in, fan_out in itertools.pairwise(dims):
            bound = 1.0 / np.sqrt(fan_in)
            weights += [
                rng.uniform(-bound, bound, size).astype(np.float32) for size in ((fan_out, fan_in), fan_out)
            ]
        scale = HEAD_SCALES[agent % len(HEAD_SCALES)]
        weights[-2] *= scale
        weights[-1] *= scale
        weight_sets.append(weights)
    return weight_sets


def run(model: onnx.ModelProto, states: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {INPUT_NAME: states})[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--populations", type=int, default=5, help="independent populations (default 5)")
    parser.add_argument("--agents", type=int, default=64, help="agents per population (default 64)")
    parser.add_argument("--states", type=int, default=16, help="realistic states per agent (default 16)")
    parser.add_argument("--items", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "int8_accuracy")
    args = parser.parse_args(argv)
    machine = machine_info()
    atol, rtol = PACK_TOLERANCE["cpu_int8"]
    rows, results = [], []
    for index in range(args.populations):
        rng = np.random.default_rng([args.seed, index])
        weights = population(rng, args.agents, args.items, args.hidden)
        states = realistic_states(rng, args.agents * args.states, args.items)
        want = run(build_pack(weights, form="matmul", batch_per_agent=args.states), states)
        got = run(build_pack(weights, form="matmul_int8", batch_per_agent=args.states), states)
        error = np.abs(got - want)
        of_allowed = error / (atol + rtol * np.abs(want))
        per_agent = of_allowed.reshape(args.agents, -1).max(axis=1)
        result = {
            "population": index,
            "max_abs_error": float(error.max()),
            "max_rel_error": float((error / np.abs(want)).max()),
            "worst_error_of_allowed": float(of_allowed.max()),
            "agents_over_tolerance": int((per_agent > 1).sum()),
            "output_max": float(want.max()),
        }
        results.append(result)
        rows.append([index, *list(result.values())[1:5]])
    print_table(
        f"int8 pack vs fp32 pack, {args.agents} agents x {args.states} states "
        f"(tolerance atol {atol} + rtol {rtol}; weights in +-{WEIGHT_LEVELS})",
        ["population", "max abs", "max rel", "of allowed", "agents over"],
        rows,
    )
    settings = {**vars(args), "out": str(args.out), "atol": atol, "rtol": rtol}
    settings.update(weight_levels=WEIGHT_LEVELS, command=command_line("int8_accuracy", argv))
    write_results(args.out, "int8_accuracy", machine, settings, results)
    return 1 if any(r["agents_over_tolerance"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
