"""End to end over the real MQTT broker: simulator -> runtime -> simulator, in separate processes.

Setup (once): --models random TradingNetwork checkpoints in the original trainer's format, converted
with ``blockmarket convert``. For each population size N, a model directory of N *distinct* agents:
the converted ones plus offspring derived from them (every weight + N(0, 0.01), written as the
converter's ONNX + metadata pair; converting 10,000 checkpoints would take ~12 min). Then
``blockmarket run`` serves them (one agent per model: N distinct weight sets, one population pack)
and ``blockmarket simulate --ticks T --rate R`` plays the game server against it on a fresh prefix.

Reported per N: game-side latency (tick publish -> matrices received) p50/p99, ticks/s sustained,
ticks unanswered (simulator) and skipped (runtime: a newer tick arrived before it was served), the
runtime's own receive -> publish p50/p99, its CPU% (100 = one core) and peak RSS while serving, and how
long `run` took to be online: ``ready s`` the first start after conversion (it writes and checks the
pack), ``restart s`` a second start of the same config (pack and check cached).
The --stretch-agents row (default 10,000) shows how far the product is from that goal.

The runtime serves the shipped config.yaml: only its files, its topic prefix, one agent per model and
a broker that must already run are set per run, plus what the command line asks for (--threads,
--cpu-pack-precision, --no-reload). Every changed setting is printed before its run and recorded in the
JSON. --compare-reload serves each N with hot reload on and off and reports the ratio of the p99s
(target <= 1.2). --compare-metrics serves each N with the metrics on and off (runtime.http.enabled: with
it off no tick stage is timed) and prints p50 and p99, game side and in the runtime, with the on/off
ratios: the metrics' overhead should be within noise. On x86_64 the QNN HTP backend is a simulator, so
the runtime serves on the CPU EP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._harness import (
    HarnessError,
    ResourceSampler,
    add_run_arguments,
    add_setting_arguments,
    announce_settings,
    blockmarket,
    changed_settings,
    converted_checkpoints,
    distinct_models,
    run_command,
    running_runtime,
    serving_overrides,
    unique_prefix,
    wait_for_status,
    work_directory,
    write_config,
)
from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from blockmarket.core.config import Config

TARGETS = {100: {"p99_ms": 10.0}, 1000: {"p99_ms": 30.0, "skipped": 0, "rss_mb": 1536.0}}
RELOAD_RATIO_TARGET = 1.2  # p99 with hot reload on / off, at 1000 and at 10,000 agents
# A compared setting: (row key, what it switches, run-name label), served on and off for each N.
Variant = tuple[str, bool]
COMPARED = {"hot_reload": "reload", "metrics": "metrics"}


def serve_and_simulate(
    args: argparse.Namespace, work: Path, models: Path, agents: int, ticks: int, variant: Variant | None
) -> dict[str, Any]:
    """One `run` of the ``agents`` models in ``models`` + one `simulate` on a fresh prefix; both sides'
    figures. ``variant`` switches hot reload or the metrics on or off; None serves what the command
    line says (config.yaml's unless --no-reload).
    """
    overrides, name = run_overrides(args, work, models, agents, variant)
    config_path = work / f"config-{name}.yaml"
    config = write_config(config_path, overrides)
    changed = changed_settings(overrides)
    announce_settings(f"{agents} agents, {ticks} ticks at {args.rate}/s", changed)
    summary_path = work / f"simulate-{name}.json"
    simulate = [*blockmarket(), "simulate", "--config", str(config_path), "--ticks", str(ticks)]
    simulate += ["--rate", str(args.rate), "--json", str(summary_path), "--quiet", "--wait", "30"]
    with running_runtime(config_path, work / f"run-{name}.log") as runtime:
        online = asyncio.run(wait_for_status(config, runtime, args.startup_timeout, "online"))
        ready_s = time.perf_counter() - runtime.started_at
        with ResourceSampler(runtime.pid) as usage:
            game_usage = run_command(
                simulate, work / f"simulate-{name}.log", timeout=ticks / args.rate * 3 + 120
            )
    final = asyncio.run(wait_for_status(config, runtime, 15, "offline"))
    game = json.loads(summary_path.read_text())
    ready_again_s = None
    if variant is None or variant[1]:  # a restart: the models converted, the pack and its check cached
        ready_again_s = time_to_online(config_path, config, work / f"run-{name}-restart.log", args)
    return {
        "agents": agents,
        "compared": None if variant is None else variant[0],
        "hot_reload": config.runtime.hot_reload,
        "metrics": config.runtime.http.enabled,
        "overrides": changed,
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
        "runtime_ready_again_s": ready_again_s,
        "simulator_cpu_percent": round(game_usage.cpu_percent, 1),
        "sessions": online.get("eps"),
        "targets": TARGETS.get(agents),
    }


def run_overrides(
    args: argparse.Namespace, work: Path, models: Path, agents: int, variant: Variant | None
) -> tuple[dict[str, dict[str, Any]], str]:
    """The settings a run changes from config.yaml, and the run's name."""
    overrides = serving_overrides(work, args)
    if variant is not None and variant[0] == "hot_reload":
        overrides["runtime"]["hot_reload"] = variant[1]
    if variant is not None and variant[0] == "metrics":
        overrides["runtime"]["http"]["enabled"] = variant[1]
    overrides["mqtt"]["topic_prefix"] = unique_prefix(f"e2e{agents}")
    overrides["runtime"]["model_dir"] = str(models)
    name = f"{agents}"
    if variant is not None:
        name += f"-{COMPARED[variant[0]]}-{'on' if variant[1] else 'off'}"
    return overrides, name


def time_to_online(config_path: Path, config: Config, log: Path, args: argparse.Namespace) -> float:
    """Seconds from spawning `blockmarket run` to its retained status saying online; then stopped."""
    with running_runtime(config_path, log) as runtime:
        asyncio.run(wait_for_status(config, runtime, args.startup_timeout, "online"))
        return round(time.perf_counter() - runtime.started_at, 2)


COLUMNS = (
    ("N", "agents"),
    ("reload", "hot_reload"),
    ("metrics", "metrics"),
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
    ("restart s", "runtime_ready_again_s"),
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


def comparison(rows: Sequence[dict[str, Any]], key: str, title: str) -> list[dict[str, Any]]:
    """Per N served with ``key`` (hot_reload, metrics) on and off: p50 and p99, game side and in the
    runtime, and the on/off ratios."""
    label, result = COMPARED[key], []
    for agents in dict.fromkeys(row["agents"] for row in rows):
        pair = {
            row[key]: row
            for row in rows
            if row["agents"] == agents and row.get("compared") == key and "error" not in row
        }
        if set(pair) != {True, False}:
            continue
        on, off = pair[True], pair[False]
        entry: dict[str, Any] = {"agents": agents}
        for q in ("p50", "p99"):
            entry[f"{q}_ms_{label}_off"] = off[f"latency_{q}_ms"]
            entry[f"{q}_ms_{label}_on"] = on[f"latency_{q}_ms"]
            entry[f"{q}_ratio"] = _ratio(on[f"latency_{q}_ms"], off[f"latency_{q}_ms"])
            entry[f"rt_{q}_ratio"] = _ratio(on[f"runtime_latency_{q}_ms"], off[f"runtime_latency_{q}_ms"])
        result.append(entry)
    shown = ["agents", f"p50_ms_{label}_off", f"p50_ms_{label}_on", "p50_ratio"]
    shown += [f"p99_ms_{label}_off", f"p99_ms_{label}_on", "p99_ratio", "rt_p50_ratio", "rt_p99_ratio"]
    headers = [
        "N",
        "p50 off",
        "p50 on",
        "on/off",
        "p99 off",
        "p99 on",
        "on/off",
        "rt p50 on/off",
        "rt p99 on/off",
    ]
    print_table(title, headers, [[c[k] for k in shown] for c in result])
    return result


def _ratio(on: float | None, off: float | None) -> float | None:
    return round(on / off, 3) if on is not None and off else None


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
    add_setting_arguments(parser)
    parser.add_argument(
        "--compare-reload",
        action="store_true",
        help="serve each N with hot reload on and with it off, and report the ratio of the p99s",
    )
    parser.add_argument(
        "--compare-metrics",
        action="store_true",
        help="serve each N with the metrics on and off (runtime.http.enabled); print p50/p99 and the ratios",
    )
    add_run_arguments(parser)
    add_output_argument(parser, "end_to_end")
    args = parser.parse_args(argv)
    if args.compare_reload and args.no_reload:
        parser.error("--compare-reload serves with hot reload on and off: drop --no-reload")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    with work_directory(args.keep, "e2e") as work:
        overrides = serving_overrides(work, args)
        setup, convert_s = converted_checkpoints(work, overrides, args.models, args.seed)
        runs = [(n, args.ticks, False) for n in args.agents]
        if args.stretch_agents:
            runs.append((args.stretch_agents, args.stretch_ticks, True))
        compared = [key for key, wanted in (("hot_reload", args.compare_reload),
                                            ("metrics", args.compare_metrics)) if wanted]  # fmt: skip
        variants: list[Variant | None] = [(key, on) for key in compared for on in (True, False)] or [None]
        rows = []
        for agents, ticks, stretch in runs:
            models = distinct_models(work / "models", work / f"models-{agents}", agents, args.seed)
            for variant in variants:
                try:
                    row = serve_and_simulate(args, work, models, agents, ticks, variant)
                except HarnessError as exc:  # a run that fails is a result too (e.g. the stretch row)
                    print(f"... {agents} agents FAILED: {exc}", file=sys.stderr, flush=True)
                    row = {"agents": agents, "ticks": ticks, "error": str(exc)}
                    if variant is not None:
                        row.update({"compared": variant[0], variant[0]: variant[1]})
                rows.append({**row, "stretch": stretch})
    print_rows(rows)
    results: dict[str, Any] = {"runs": rows}
    if args.compare_reload:
        title = (
            f"Hot reload on / off (game side and in the runtime; target p99 on/off <= {RELOAD_RATIO_TARGET})"
        )
        results["reload_comparison"] = comparison(rows, "hot_reload", title)
    if args.compare_metrics:
        title = "Metrics on / off (runtime.http.enabled; game side and in the runtime; within noise expected)"
        results["metrics_comparison"] = comparison(rows, "metrics", title)
    settings = {
        "models": args.models,
        "assignment": "one_per_checkpoint: N distinct models (--models converted, the rest derived)",
        "rate_hz": args.rate,
        "overrides": changed_settings(overrides),  # of config.yaml, in every run (each row: its own)
        "runtime": setup.runtime.model_dump(mode="json", exclude={"model_dir"}),  # shipped values too
        "broker": f"{setup.mqtt.host}:{setup.mqtt.port}",
        "conversion_s": round(convert_s, 2),
        "command": command_line("end_to_end", argv),
    }
    write_results(args.out, "end_to_end", machine, settings, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
