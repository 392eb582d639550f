"""End to end over the real MQTT broker: simulator -> runtime -> simulator, in separate processes.

Setup (once): --models random TradingNetwork checkpoints in the original trainer's format, converted
with ``blockmarket convert``. For each population size N, a model directory of N *distinct* agents:
the converted ones plus offspring derived from them (every weight + N(0, 0.01), written as the
converter's ONNX + metadata pair; converting 10,000 checkpoints would take ~12 min). Then
``blockmarket run`` serves them (one agent per model: N distinct weight sets, one population pack)
and ``blockmarket simulate --ticks T --rate R`` plays the game server against it on a fresh prefix.

Reported per N: game-side latency (tick publish -> matrices received) p50/p99, ticks/s sustained,
ticks unanswered (simulator) and skipped (runtime: a newer tick arrived before it was served), the
runtime's own receive -> publish p50/p99, its CPU% (100 = one core) and peak RSS while serving.
The --stretch-agents row (default 10,000) shows how far the product is from that goal.

The runtime runs on the CPU EP (npu.enabled false): the QNN HTP backend here is a CPU simulation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    HarnessError,
    ResourceSampler,
    blockmarket,
    convert,
    distinct_models,
    run_command,
    running_runtime,
    unique_prefix,
    wait_for_status,
    write_checkpoints,
    write_config,
)
from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results

TARGETS = {100: {"p99_ms": 10.0}, 1000: {"p99_ms": 30.0, "skipped": 0, "rss_mb": 1536.0}}


def base_overrides(work: Path, threads: int) -> dict[str, dict[str, Any]]:
    """Config shared by every run: models in ``work``, CPU EP, the real broker, no conversion/reload."""
    return {
        "training": {"model_save_path": str(work / "checkpoints")},
        "conversion": {"output_dir": str(work / "models")},
        "npu": {"enabled": False},
        "mqtt": {"embedded_broker": "never"},
        "runtime": {
            "model_dir": str(work / "models"),
            "convert_on_startup": False,
            "hot_reload": False,
            "assignment": "one_per_checkpoint",
            "intra_op_threads": threads,
            "status_interval_s": 1.0,
        },
    }


def serve_and_simulate(args: argparse.Namespace, work: Path, agents: int, ticks: int) -> dict[str, Any]:
    """One `run` + one `simulate` on a fresh prefix; the simulator's and the runtime's figures merged."""
    overrides = base_overrides(work, args.threads)
    overrides["runtime"]["cpu_pack_precision"] = args.cpu_pack_precision
    overrides["mqtt"]["topic_prefix"] = unique_prefix(f"e2e{agents}")
    overrides["runtime"]["num_agents"] = agents
    overrides["runtime"]["model_dir"] = str(
        distinct_models(work / "models", work / f"models-{agents}", agents, args.seed)
    )
    overrides["simulator"] = {"num_agents": agents, "tick_rate_hz": args.rate}
    config_path = work / f"config-{agents}.yaml"
    config = write_config(config_path, overrides)
    summary_path = work / f"simulate-{agents}.json"
    simulate = [*blockmarket(), "simulate", "--config", str(config_path), "--ticks", str(ticks)]
    simulate += ["--rate", str(args.rate), "--json", str(summary_path), "--quiet", "--wait", "30"]
    with running_runtime(config_path, work / f"run-{agents}.log") as runtime:
        online = asyncio.run(wait_for_status(config, runtime, args.startup_timeout, "online"))
        ready_s = time.perf_counter() - runtime.started_at
        with ResourceSampler(runtime.pid) as usage:
            game_usage = run_command(
                simulate, work / f"simulate-{agents}.log", timeout=ticks / args.rate * 3 + 120
            )
    final = asyncio.run(wait_for_status(config, runtime, 15, "offline"))
    game = json.loads(summary_path.read_text())
    return {
        "agents": agents,
        "ticks": ticks,
        "rate_hz": args.rate,
        "ticks_sent": game["ticks_sent"],
        "answered": game["answered"],
        "missing": game["missing"],
        "sustained_ticks_per_s": game["tick_rate_hz"],
        "latency_p50_ms": game["latency_p50_ms"],
        "latency_p99_ms": game["latency_p99_ms"],
        "latency_max_ms": game["latency_max_ms"],
        "rule_violations": game["rule_violations"],
        "runtime_ticks_served": final.get("ticks_served"),
        "runtime_ticks_skipped": final.get("ticks_skipped"),
        "runtime_latency_p50_ms": final.get("latency_p50_ms"),
        "runtime_latency_p99_ms": final.get("latency_p99_ms"),
        "runtime_cpu_percent": round(usage.cpu_percent, 1),
        "runtime_peak_rss_mb": round(usage.peak_rss / 2**20, 1),
        "runtime_ready_s": round(ready_s, 2),
        "simulator_cpu_percent": round(game_usage.cpu_percent, 1),
        "sessions": online.get("eps"),
        "targets": TARGETS.get(agents),
    }


COLUMNS = (
    ("N", "agents"),
    ("ticks", "ticks_sent"),
    ("answered", "answered"),
    ("skipped", "runtime_ticks_skipped"),
    ("ticks/s", "sustained_ticks_per_s"),
    ("p50 ms", "latency_p50_ms"),
    ("p99 ms", "latency_p99_ms"),
    ("rt p50", "runtime_latency_p50_ms"),
    ("rt p99", "runtime_latency_p99_ms"),
    ("CPU %", "runtime_cpu_percent"),
    ("RSS MB", "runtime_peak_rss_mb"),
    ("ready s", "runtime_ready_s"),
    ("sim CPU %", "simulator_cpu_percent"),
)


def print_rows(rows: Sequence[dict[str, Any]]) -> None:
    print_table(
        "End to end over MQTT (p50/p99: game side, publish -> matrices received; rt: inside the runtime)",
        [title for title, _ in COLUMNS],
        [[row.get(key) for _, key in COLUMNS] for row in rows],
    )
    for row in rows:
        if "error" in row:
            print(f"\nN={row['agents']} failed: {row['error']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.end_to_end",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[100, 1000], help="population sizes N")
    parser.add_argument("--stretch-agents", type=int, default=10000, help="the stretch row's N (0: skip it)")
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second the simulator sends")
    parser.add_argument("--ticks", type=int, default=300, help="ticks per run (default 300 = 15 s at 20/s)")
    parser.add_argument("--stretch-ticks", type=int, default=100, help="ticks for the stretch row")
    parser.add_argument(
        "--models", type=int, default=100, help="checkpoints converted (the rest are derived)"
    )
    parser.add_argument("--threads", type=int, default=2, help="runtime.intra_op_threads")
    parser.add_argument(
        "--cpu-pack-precision", choices=("fp32", "int8"), default="fp32", help="runtime.cpu_pack_precision"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for `run`")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep logs (default: temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "end_to_end")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bm-e2e-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        setup = write_config(work / "config-convert.yaml", base_overrides(work, args.threads))
        print(f"... writing and converting {args.models} checkpoints in {work}", file=sys.stderr, flush=True)
        write_checkpoints(work / "checkpoints", args.models, setup.environment.items_list, 128, args.seed)
        convert_s = convert(
            work / "checkpoints", work / "config-convert.yaml", work / "models", work / "convert.log"
        )
        runs = [(n, args.ticks, False) for n in args.agents]
        if args.stretch_agents:
            runs.append((args.stretch_agents, args.stretch_ticks, True))
        rows = []
        for agents, ticks, stretch in runs:
            print(f"... {agents} agents, {ticks} ticks at {args.rate}/s", file=sys.stderr, flush=True)
            try:
                row = serve_and_simulate(args, work, agents, ticks)
            except HarnessError as exc:  # a run that fails is a result too (e.g. the stretch row)
                print(f"... {agents} agents FAILED: {exc}", file=sys.stderr, flush=True)
                row = {"agents": agents, "ticks": ticks, "error": str(exc)}
            rows.append({**row, "stretch": stretch})
    print_rows(rows)
    settings = {
        "models": args.models,
        "assignment": "one_per_checkpoint: N distinct models (--models converted, the rest derived)",
        "rate_hz": args.rate,
        "runtime_intra_op_threads": args.threads,
        "runtime_cpu_pack_precision": args.cpu_pack_precision,
        "execution_provider": "CPUExecutionProvider (npu.enabled: false)",
        "broker": f"{setup.mqtt.host}:{setup.mqtt.port}",
        "conversion_s": round(convert_s, 2),
        "command": command_line("end_to_end", argv),
    }
    write_results(args.out, "end_to_end", machine, settings, {"runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
