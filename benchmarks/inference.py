"""Per-tick inference: the original per-agent loop vs one ONNX Runtime call per agent vs our vectorized tick.

For each population size N and two cases (every agent with its own weights; all agents sharing one
model) one market tick is timed along three paths, side by side in one process:

* original       the original trainer's way, re-implemented faithfully: per agent, a Python list state
                 (inventory / max, one-hot desired item, own matrix, mean of the other agents' matrices,
                 success rate), one PyTorch forward under torch.no_grad(), the update rule in numpy.
                 The sum of all matrices is taken once per tick (kind to the original: a per-agent mean
                 over the others would be O(N^2)). Above --original-agents agents, that many agents are
                 timed and the per-agent part is extrapolated linearly to N (marked "extrapolated").
* ort_per_agent  one onnxruntime session.run per agent on the converted model (CPU EP, one intra-op
                 thread per session), with the states built vectorized: this isolates the cost of
                 per-agent calls. Distinct weights: --ort-models distinct sessions (default 1000) cycled
                 over the agents (agent i -> session i mod M), so N=10000 reuses each model 10 times.
* ours           core.state.build_states for the whole population, ONE session.run (population pack,
                 matmul form, for distinct weights; the dynamic-batch model for a shared one), then
                 core.state.apply_update. "bare_run" is that session.run alone on the same input.
* ours_int8      distinct weights only: the same tick on the int8-weight pack (form matmul_int8,
                 runtime.cpu_pack_precision: int8), 4x fewer weight bytes per tick; its max abs error vs
                 the fp32 pack on realistic states is reported next to it.

Also measured in the same run: this machine's memory read bandwidth (numpy sum over a large float32
array, best of several, 1 and 2 threads), next to the pack's weight bytes per tick / tick time: for
distinct weights, every weight is read once per tick, so bandwidth is the physical limit.
"""

# size: a benchmark script: setup, every path and the report in one file to read

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from benchmarks._report import (
    add_output_argument,
    command_line,
    latency_summary,
    machine_info,
    print_table,
    time_calls,
    write_results,
)
from blockmarket.core.state import (
    MATRIX_MAX,
    MATRIX_MIN,
    apply_update,
    build_states,
    initial_inventory,
    initial_matrices,
    realistic_states,
    state_dim,
)
from blockmarket.models.pack import build_pack, save_pack
from conversion.export import convert_to_onnx
from conversion.networks import TradingNetwork

FloatArray = npt.NDArray[np.float32]
PATHS = ("original", "ort_per_agent", "ours")
CASES = ("distinct", "shared")
LAYER_KEYS = ("shared.0", "shared.2", "shared.4", "trading_matrix_head")


@dataclass
class Market:
    """The population arrays a tick reads and updates (the runtime's layout)."""

    inventory: FloatArray  # [N, n]
    desired: npt.NDArray[np.int64]  # [N]
    matrices: FloatArray  # [N, n, n]
    success_rate: FloatArray  # [N]

    @classmethod
    def random(cls, rng: np.random.Generator, count: int, num_items: int) -> Market:
        return cls(
            initial_inventory(rng, count, num_items),
            rng.integers(0, num_items, size=count),
            initial_matrices(rng, count, num_items),
            rng.uniform(0.0, 1.0, size=count).astype(np.float32),
        )

    def states(self, out: FloatArray | None = None) -> FloatArray:
        return build_states(self.inventory, self.desired, self.matrices, self.success_rate, out=out)


def _uniform(rng: np.random.Generator, bound: float, shape: tuple[int, ...]) -> FloatArray:
    """U(-bound, bound) drawn directly in float32 (10,000 agents' weights are 1.8 GB)."""
    values = rng.random(shape, dtype=np.float32)
    values *= 2 * bound
    values -= bound
    return values


class WeightBank:
    """Random TradingNetwork weights for many agents, stacked per layer in nn.Linear layout ([N, out, in])."""

    def __init__(self, rng: np.random.Generator, count: int, num_items: int, hidden: int) -> None:
        dims = [state_dim(num_items), hidden, hidden, hidden, num_items * num_items]
        self.layers: list[tuple[FloatArray, FloatArray]] = []
        for fan_in, fan_out in itertools.pairwise(dims):
            bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default nn.Linear init range
            self.layers.append(
                (_uniform(rng, bound, (count, fan_out, fan_in)), _uniform(rng, bound, (count, fan_out)))
            )
        self.num_items, self.hidden = num_items, hidden

    def agent(self, index: int) -> list[FloatArray]:
        """[W1, b1, ..., W_head, b_head] of one agent (the layout runtime.pack.build_pack takes)."""
        return [array[index] for layer in self.layers for array in layer]

    def state_dict(self, index: int) -> dict[str, FloatArray]:
        """One agent's weights under the original parameter names (also the converted ONNX initializers)."""
        state = {}
        for key, (weight, bias) in zip(LAYER_KEYS, self.layers, strict=True):
            state[f"{key}.weight"], state[f"{key}.bias"] = weight[index], bias[index]
        return state

    def network(self, index: int) -> TradingNetwork:
        net = TradingNetwork(state_dim(self.num_items), self.hidden, self.num_items)
        state = {name: torch.from_numpy(array.copy()) for name, array in self.state_dict(index).items()}
        net.load_state_dict(state, strict=True)
        return net.eval()


@dataclass
class OriginalAgent:
    """An agent as the original trainer held it: dict inventory, item name, float64 numpy matrix."""

    network: TradingNetwork
    desired_item: str
    inventory: dict[str, float]
    trading_matrix: npt.NDArray[np.float64]
    successful_trades: int
    attempted_trades: int

    def state(self, items: Sequence[str], market_mean: npt.NDArray[np.float64]) -> list[float]:
        values = [self.inventory[item] for item in items]
        peak = max(values) or 1.0
        state = [value / peak for value in values]
        state += [1.0 if item == self.desired_item else 0.0 for item in items]
        state += self.trading_matrix.flatten().tolist()
        state += market_mean.flatten().tolist()
        state.append(self.successful_trades / max(self.attempted_trades, 1))
        return state


class OriginalMarket:
    """The original per-agent tick over the first ``timed`` agents of a population of ``len(matrices)``."""

    def __init__(
        self, market: Market, networks: Sequence[TradingNetwork], items: Sequence[str], alpha: float
    ):
        self.items, self.alpha = list(items), alpha
        self.others = [m.astype(np.float64) for m in market.matrices]  # every agent's matrix (float64)
        rng = np.random.default_rng(0)
        self.agents = [
            OriginalAgent(
                network=net,
                desired_item=self.items[int(market.desired[i])],
                inventory=dict(zip(self.items, market.inventory[i].tolist(), strict=True)),
                trading_matrix=self.others[i],
                successful_trades=int(rng.integers(0, 10)),
                attempted_trades=int(rng.integers(0, 10)),
            )
            for i, net in enumerate(networks)
        ]

    def tick(self) -> None:
        count = len(self.others)
        total = np.sum(self.others, axis=0)
        n = len(self.items)
        for agent in self.agents:
            market_mean = (total - agent.trading_matrix) / (count - 1)
            state = torch.tensor(agent.state(self.items, market_mean), dtype=torch.float32).unsqueeze(0)
            with torch.no_grad():
                proposal = agent.network(state).squeeze(0).numpy().reshape(n, n)
            matrix = (1 - self.alpha) * agent.trading_matrix + self.alpha * proposal
            np.fill_diagonal(matrix, 1.0)
            matrix = np.clip(matrix, MATRIX_MIN, MATRIX_MAX)
            np.fill_diagonal(matrix, 1.0)
            agent.trading_matrix = matrix

    def proposals(self, states: FloatArray) -> FloatArray:
        """The timed agents' network outputs for given state rows (for the cross-check)."""
        with torch.no_grad():
            rows = [a.network(torch.from_numpy(states[i : i + 1])).numpy() for i, a in enumerate(self.agents)]
        return np.concatenate(rows)


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def cpu_session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all weights in a graph: what one call reads when nothing stays in cache."""
    return sum(
        math.prod(t.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in model.graph.initializer
    )


def memory_bandwidth(megabytes: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` read bandwidth in GB/s: numpy sum over a float32 array, on 1 and 2 threads."""
    data = np.ones(megabytes * 1024 * 1024 // 4, dtype=np.float32)
    halves = np.array_split(data, 2)
    with ThreadPoolExecutor(2) as pool:
        one = min(time_calls(data.sum, repeats, warmup=1))
        two = min(time_calls(lambda: list(pool.map(np.sum, halves)), repeats, warmup=1))
    return {
        "array_mb": megabytes,
        "one_thread_gb_s": round(data.nbytes / one / 1e9, 2),
        "two_threads_gb_s": round(data.nbytes / two / 1e9, 2),
    }


def path_result(samples: Sequence[float], agents: int, **extra: Any) -> dict[str, Any]:
    """Agent-updates/s (N / median tick) and the latency summary of per-tick samples."""
    return {
        "updates_per_s": round(agents / float(np.median(samples)), 1),
        **latency_summary(samples),
        **extra,
    }


Tick = Callable[[], object]


def interleaved(
    calls: Mapping[str, Tick], ticks: int, warmup: int = 1, primed: Sequence[str] = ()
) -> dict[str, list[float]]:
    """Each call once per round, ``ticks`` timed rounds: background load drifting hits every path alike.

    A ``primed`` call runs once untimed just before its timed run, so it is measured on warm caches
    (as back-to-back ticks are) rather than right after a path that flushed them.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_number in range(warmup + ticks):
        for name, call in calls.items():
            if name in primed:
                call()
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if round_number >= warmup:
                samples[name].append(elapsed)
    return samples


def original_market(
    market: Market, bank: WeightBank, case: str, items: Sequence[str], alpha: float, timed: int
) -> tuple[OriginalMarket, float]:
    """The original loop over the first ``timed`` agents, and the time of its once-per-tick matrix sum."""
    shared = bank.network(0)
    networks = [
        shared if case == "shared" else bank.network(i) for i in range(min(timed, len(market.desired)))
    ]
    original = OriginalMarket(market, networks, items, alpha)
    return original, min(time_calls(lambda: np.sum(original.others, axis=0), 5))


def ort_per_agent_tick(market: Market, sessions: Sequence[ort.InferenceSession], alpha: float) -> Tick:
    """One session.run per agent (agent i -> sessions[i mod M]); states and update vectorized."""
    count, n = market.inventory.shape
    states = np.empty((count, state_dim(n)), dtype=np.float32)
    proposals = np.empty((count, n * n), dtype=np.float32)
    name = sessions[0].get_inputs()[0].name

    def tick() -> None:
        market.states(out=states)
        for i in range(count):
            proposals[i] = sessions[i % len(sessions)].run(None, {name: states[i : i + 1]})[0][0]
        apply_update(market.matrices, proposals, alpha)

    return tick


def our_ticks(market: Market, session: ort.InferenceSession, alpha: float) -> tuple[Tick, Tick]:
    """Vectorized state + one session.run + vectorized update; and that session.run alone."""
    states = market.states()
    name = session.get_inputs()[0].name

    def tick() -> None:
        market.states(out=states)
        (proposals,) = session.run(None, {name: states})
        apply_update(market.matrices, proposals, alpha)

    def bare_run() -> None:
        session.run(None, {name: states})

    return tick, bare_run


def cross_check(session: ort.InferenceSession, original: OriginalMarket, market: Market) -> float:
    """Max |ours - PyTorch| over the agents the original path ran: the paths compute the same thing."""
    states = market.states()
    name = session.get_inputs()[0].name
    (ours,) = session.run(None, {name: states})
    timed = len(original.agents)
    return float(np.abs(ours[:timed] - original.proposals(states[:timed])).max())


def int8_pack_session(
    bank: WeightBank, agents: int, folder: Path, threads: int, fp32: ort.InferenceSession
) -> tuple[ort.InferenceSession, int, float]:
    """The int8 pack of the same agents: session, weight bytes, max |int8 - fp32| on realistic states."""
    pack = build_pack([bank.agent(i) for i in range(agents)], form="matmul_int8")
    weight_bytes = initializer_bytes(pack)
    path = save_pack(pack, folder / "pack_int8.onnx")
    del pack
    session = cpu_session(path, threads)
    states = realistic_states(np.random.default_rng(agents), agents, bank.num_items)
    name = session.get_inputs()[0].name
    error = np.abs(session.run(None, {name: states})[0] - fp32.run(None, {name: states})[0]).max()
    return session, weight_bytes, float(error)


def ort_sessions(bank: WeightBank, count: int, folder: Path) -> list[ort.InferenceSession]:
    """``count`` single-agent sessions of the converted graph, each with its own agent's weights.

    One model is exported as conversion does; the others are that graph with their initializers (named
    after the original parameters) replaced, which is what converting each checkpoint would give, in
    milliseconds instead of an export each. One intra-op thread: a one-row call gains nothing from a
    second one, and a thread pool per session would spin on the cores the other sessions need.
    """
    template = onnx.load(str(convert_to_onnx(bank.network(0), folder / "agent.onnx").path))
    sessions = []
    for i in range(count):
        model = onnx.ModelProto()
        model.CopyFrom(template)
        weights = bank.state_dict(i)
        for tensor in model.graph.initializer:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
        sessions.append(cpu_session(model, threads=1))
    return sessions


# size: one benchmark case, its paths timed in the order the report prints them
def run_case(
    args: argparse.Namespace, case: str, agents: int, bank: WeightBank, folder: Path, pool: list[Any]
) -> dict[str, Any]:
    items = [f"item{i}" for i in range(args.items)]
    rng = np.random.default_rng(agents)
    start = time.perf_counter()
    if case == "distinct":
        pack = build_pack([bank.agent(i) for i in range(agents)], form="matmul")
        weight_bytes = initializer_bytes(pack)
        path = save_pack(pack, folder / "pack.onnx")
        del pack  # the session reads the file: the proto's copy of the weights is not kept alive
        session, sessions = cpu_session(path, args.threads), pool[: min(agents, args.ort_models)]
    else:
        model = convert_to_onnx(bank.network(0), folder / "shared.onnx").path
        session, sessions = cpu_session(model, args.threads), pool[:1]
        weight_bytes = initializer_bytes(onnx.load(str(model)))
    setup_s = time.perf_counter() - start
    original, sum_s = original_market(
        Market.random(rng, agents, args.items), bank, case, items, args.alpha, args.original_agents
    )
    market = Market.random(rng, agents, args.items)
    error = cross_check(session, original, market)
    ours_tick, bare_run = our_ticks(market, session, args.alpha)
    calls = {
        "original": original.tick,
        "ort_per_agent": ort_per_agent_tick(Market.random(rng, agents, args.items), sessions, args.alpha),
        "ours": ours_tick,
        "bare_run": bare_run,
    }
    if case == "distinct":
        start = time.perf_counter()
        int8_session, int8_bytes, int8_error = int8_pack_session(bank, agents, folder, args.threads, session)
        int8_setup_s = time.perf_counter() - start
        calls["ours_int8"] = our_ticks(Market.random(rng, agents, args.items), int8_session, args.alpha)[0]
    samples = interleaved(calls, args.ticks, primed=("ours", "bare_run", "ours_int8"))
    timed = len(original.agents)
    # original tick(N) = the matrix sum over all N (inside each sample) + the per-agent part * N / timed
    scaled = [sum_s + (t - sum_s) * agents / timed for t in samples["original"]]
    ours = path_result(
        samples["ours"], agents, session_setup_s=round(setup_s, 3), max_abs_error_vs_pytorch=error
    )
    bare = path_result(samples["bare_run"], agents)
    for result in (ours, bare):
        result["weight_bytes_per_tick"] = weight_bytes
        if case == "distinct":  # a shared model stays in cache: bytes / time is no bandwidth figure there
            result["weight_read_gb_s"] = round(weight_bytes / (result["p50_ms"] / 1e3) / 1e9, 3)
    ours["tick_over_bare_run"] = round(ours["p50_ms"] / bare["p50_ms"], 3)
    paths = {
        "original": path_result(scaled, agents, timed_agents=timed, extrapolated=timed < agents),
        "ort_per_agent": path_result(samples["ort_per_agent"], agents, sessions_cycled=len(sessions)),
        "ours": ours,
        "bare_run": bare,
    }
    if case == "distinct":
        paths["ours_int8"] = path_result(
            samples["ours_int8"],
            agents,
            session_setup_s=round(int8_setup_s, 3),
            max_abs_error_vs_fp32_pack=int8_error,
            weight_bytes_per_tick=int8_bytes,
        )
        paths["ours_int8"]["weight_read_gb_s"] = round(
            int8_bytes / (paths["ours_int8"]["p50_ms"] / 1e3) / 1e9, 3
        )
    ratios = {
        f"{name}_vs_original": round(paths[name]["updates_per_s"] / paths["original"]["updates_per_s"], 2)
        for name in ("ort_per_agent", "ours", "ours_int8")
        if name in paths
    }
    return {"case": case, "agents": agents, "paths": paths, "ratios": ratios}


def print_results(cases: Sequence[dict[str, Any]], bandwidth: dict[str, float]) -> None:
    rows = []
    for result in cases:
        for name, path in result["paths"].items():
            note = "extrapolated" if path.get("extrapolated") else ""
            ratio = path["updates_per_s"] / result["paths"]["original"]["updates_per_s"]
            rows.append(
                [
                    result["case"],
                    result["agents"],
                    name,
                    path["updates_per_s"],
                    path["p50_ms"],
                    path["p99_ms"],
                    f"{ratio:.1f}x",
                    path.get("tick_over_bare_run", ""),
                    path.get("weight_read_gb_s", ""),
                    note,
                ]
            )
    headers = ["case", "N", "path", "updates/s", "p50 ms", "p99 ms", "vs orig", "tick/bare", "wt GB/s", ""]
    print_table("Per-tick inference (one market tick for N agents)", headers, rows)
    print(
        f"\nmemory read bandwidth: {bandwidth['one_thread_gb_s']} GB/s (1 thread), "
        f"{bandwidth['two_threads_gb_s']} GB/s (2 threads), numpy sum over {bandwidth['array_mb']} MB"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--agents", type=int, nargs="+", default=[100, 1000, 10000], help="population sizes N"
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="weight cases to run")
    parser.add_argument("--ticks", type=int, default=30, help="timed ticks per path and case (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op and torch threads")
    parser.add_argument("--items", type=int, default=5, help="items n (state dim 2n^2+2n+1)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size H")
    parser.add_argument("--alpha", type=float, default=0.04, help="matrix update rate")
    parser.add_argument(
        "--original-agents",
        type=int,
        default=1000,
        help="agents timed on the original path (rest extrapolated)",
    )
    parser.add_argument("--ort-models", type=int, default=1000, help="distinct sessions for ort_per_agent")
    parser.add_argument("--bandwidth-mb", type=int, default=1024, help="array size for the bandwidth probe")
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "inference")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    bandwidth = memory_bandwidth(args.bandwidth_mb, repeats=5)
    bank = WeightBank(rng, max(max(args.agents), args.ort_models), args.items, args.hidden)
    results = []
    with tempfile.TemporaryDirectory(prefix="bm-inference-") as tmp:
        folder = Path(tmp)
        pool = ort_sessions(bank, min(args.ort_models, max(args.agents)), folder)
        for agents in sorted(args.agents):
            for case in args.cases:
                print(f"... {case} weights, N={agents}", file=sys.stderr, flush=True)
                results.append(run_case(args, case, agents, bank, folder, pool))
    print_results(results, bandwidth)
    settings = {
        "threads": args.threads,
        "items": args.items,
        "hidden": args.hidden,
        "ticks": args.ticks,
        "original_agents_timed": args.original_agents,
        "ort_models_cycled": args.ort_models,
        "ort_per_agent_intra_op_threads": 1,
        "pack_form": "matmul",
        "int8_pack_form": "matmul_int8",
        "execution_provider": "CPUExecutionProvider",
        "command": command_line("inference", argv),
    }
    write_results(args.out, "inference", machine, settings, {"memory_bandwidth": bandwidth, "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
