"""Scale-out: runtime replicas sharing the markets through MQTT 5 shared subscriptions (mqtt.shared_group).

Setup (once): --models random TradingNetwork checkpoints in the original trainer's format, converted with
``blockmarket convert``, and a repository of --distinct models derived from them (benchmarks/_harness.py).
Every run serves it with the shipped config.yaml (and the settings the table names).

Three deployments, each on fresh processes, each played at several loads by ``blockmarket simulate
--markets M --agents 20 --rate 20`` (M game servers' markets of 20 agents at 20 ticks/s, ``round_robin``
models, a fixed roster), the simulator unpinned:
1. ``1 process``: one runtime, not in replica mode (ticks carry no matrices), pinned to cores 0-1;
2. ``1 replica``: one runtime in replica mode pinned to core 0 (``taskset -c 0``), ticks carrying matrices;
3. ``2 replicas``: two runtimes in replica mode, one pinned to core 0, one to core 1.

Before each measured play, an unmeasured one of --warmup-ticks opens and closes as many markets: the
runtimes grow their session pools for them then (a market's rows stay free for the next market after
it closes), as they do when a deployment's game servers first arrive.

Reported per run: market ticks answered of those sent, game-side p50/p99, the throughput in agent
ticks per second (answered market ticks x agents per market / duration), and the runtimes' CPU (summed
over the replicas) and CPU milliseconds per answered market tick: whether replicas split the work or
repeat it. A deployment *serves* a load
when it answers >= 99 % of the ticks with p99 <= 50 ms; the largest such load is its capacity, and the
scaling ratio is the 2-replica capacity over the 1-replica one. Also: the bytes a tick costs with and
without the carried matrices (the price of replica mode on the wire). On a 2-core machine the simulator,
the broker and the replicas share the two cores: the scaling measured here is a floor, not the ratio on
machines where the game side runs elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from benchmarks._harness import (
    STATUS_LIMITS,
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
    serving_overrides,
    shipped_config,
    tail,
    unique_prefix,
    work_directory,
    write_config,
)
from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from blockmarket.core.config import Config
from blockmarket.core.state import initial_matrices
from blockmarket.wire.markets import VERSION
from blockmarket.wire.messages import MarketTick, encode_tick
from blockmarket.wire.protocol import decode_status

SERVES_ANSWERED = 0.99  # a load is served when this share of its ticks is answered ...
SERVES_P99_MS = 50.0  # ... with the game side's p99 at most this
DEFAULT_AGENTS = 4  # the v1 default market's agents (replicas do not serve it; it only holds rows)
DEPLOYMENTS = {  # name -> (replica mode, the cores of each runtime process)
    "1 process": (False, ["0-1"]),
    "1 replica": (True, ["0"]),
    "2 replicas": (True, ["0", "1"]),
}


def tick_bytes(agents: int, items: int, carry: bool) -> int:
    """The size of one market tick of ``agents`` agents, with or without their matrices."""
    rng = np.random.default_rng(0)
    tick = MarketTick(
        tick=123_456,
        sent_at=time.time(),
        agent_ids=tuple(f"bot-{k}" for k in range(agents)),
        inventory=rng.integers(0, 30, size=(agents, items)).astype(np.float32),
        successful=np.zeros(agents, np.float32),
        attempted=np.ones(agents, np.float32),
        matrices=initial_matrices(rng, agents, items) if carry else None,
    )
    return len(encode_tick(tick, VERSION))


@contextmanager
def runtimes(
    config_path: Path, cores: list[str], work: Path, label: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``blockmarket run`` once per entry of ``cores``, each pinned there (taskset); stopped with SIGINT."""
    pin = shutil.which("taskset")
    processes = []
    try:
        for k, where in enumerate(cores):
            command = [*blockmarket(), "run", "--config", str(config_path)]
            if pin is not None:
                command = [pin, "-c", where, *command]
            with (work / f"run-{label}-{k}.log").open("w") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def online(config: Config, replica: bool, count: int, timeout: float) -> None:
    """Wait until ``count`` runtimes (replicas, or the single process) say online."""
    prefix = config.mqtt.topic_prefix
    topic = f"{prefix}/runtime/replicas/+/status" if replica else f"{prefix}/runtime/status"
    seen: set[str] = set()
    deadline = time.perf_counter() + timeout
    async with aiomqtt.Client(config.mqtt.host, config.mqtt.port) as client:
        await client.subscribe(topic, qos=1)
        messages = aiter(client.messages)
        while len(seen) < count:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise HarnessError(f"{len(seen)} of {count} runtime(s) online on {topic} in {timeout:.0f} s")
            try:
                message = await asyncio.wait_for(anext(messages), timeout=min(left, 1.0))
            except TimeoutError:
                continue
            if message.payload:
                status = decode_status(bytes(message.payload), STATUS_LIMITS)
                if status.get("state") == "online":
                    seen.add(str(message.topic))


def play(
    work: Path, config_path: Path, name: str, markets: int, ticks: int, carry: bool, args: argparse.Namespace
) -> dict[str, Any]:
    """One `simulate --markets` run; the game side's figures."""
    summary_path = work / f"simulate-{name}.json"
    command = [*blockmarket(), "simulate", "--config", str(config_path), "--markets", str(markets)]
    command += ["--agents", str(args.agents), "--ticks", str(ticks), "--rate", str(args.rate)]
    command += ["--churn", "0", "--json", str(summary_path), "--quiet", "--owner", name]
    if carry:
        command.append("--carry-matrices")
    usage = run_command(command, work / f"simulate-{name}.log", timeout=args.ticks / args.rate * 4 + 180)
    game = json.loads(summary_path.read_text())
    answered_share = game["answered"] / max(game["ticks_sent"], 1)
    p99 = game["latency_p99_ms"]
    return {
        "markets": markets,
        "agents_per_market": args.agents,
        "ticks_sent": game["ticks_sent"],
        "answered": game["answered"],
        "answered_share": round(answered_share, 4),
        "latency_p50_ms": game["latency_p50_ms"],
        "latency_p99_ms": p99,
        "agent_ticks_per_s": round(game["answered"] * args.agents / game["duration_s"], 1),
        "served": answered_share >= SERVES_ANSWERED and p99 is not None and p99 <= SERVES_P99_MS,
        "simulator_cpu_percent": round(usage.cpu_percent, 1),
    }


def deploy(args: argparse.Namespace, work: Path, models: Path, label: str) -> list[dict[str, Any]]:
    """One deployment: its runtime process(es) up, then every load played against them."""
    replica, cores = DEPLOYMENTS[label]
    overrides = serving_overrides(work, args, unique_prefix("scale-out"))
    overrides["runtime"].update(model_dir=str(models), assignment="round_robin", num_agents=DEFAULT_AGENTS)
    overrides["runtime"]["convert_on_startup"] = False
    overrides["runtime"]["markets"] = {**shipped_config()["runtime"]["markets"], "max_markets": 1000}
    if replica:
        overrides["mqtt"].update(shared_group="scale-out", protocol="5")
    config_path = work / f"config-{label.replace(' ', '-')}.yaml"
    config = write_config(config_path, overrides)
    changed = changed_settings(overrides)
    announce_settings(f"scale-out, {label}", changed)
    rows = []
    with runtimes(config_path, cores, work, label.replace(" ", "-")) as processes:
        try:
            asyncio.run(online(config, replica, len(processes), args.startup_timeout))
        except HarnessError as exc:
            logs = "\n".join(
                tail(work / f"run-{label.replace(' ', '-')}-{k}.log") for k in range(len(processes))
            )
            raise HarnessError(f"{exc}\n{logs}") from None
        for markets in args.loads:
            print(
                f"... {label}: {markets} markets x {args.agents} agents at {args.rate}/s",
                file=sys.stderr,
                flush=True,
            )
            name = f"{label.replace(' ', '-')}-{markets}"
            # a first, shorter play opens (and at its end closes) as many markets: the runtimes grow their
            # pools for them once, as a deployment does when its game servers first come; measured: the second
            play(work, config_path, f"{name}-warmup", markets, args.warmup_ticks, replica, args)
            with contextlib.ExitStack() as sampling:
                samplers = [sampling.enter_context(ResourceSampler(p.pid)) for p in processes]
                figures = play(work, config_path, name, markets, args.ticks, replica, args)
            cpu = sum(s.cpu_percent for s in samplers)  # taskset execs: the pid is the runtime's
            figures["runtime_cpu_percent"] = round(cpu, 1)
            answered = max(figures["answered"], 1)
            figures["runtime_cpu_ms_per_tick"] = round(cpu / 100 * samplers[0].wall_s / answered * 1e3, 3)
            rows.append({"deployment": label, "cores": cores, "overrides": changed, **figures})
    return rows


def capacity(rows: list[dict[str, Any]], label: str) -> int:
    """The most markets a deployment served (0: none of the loads)."""
    return max((r["markets"] for r in rows if r["deployment"] == label and r["served"]), default=0)


COLUMNS = (
    ("deployment", "deployment"),
    ("markets", "markets"),
    ("answered", "answered"),
    ("ticks", "ticks_sent"),
    ("p50 ms", "latency_p50_ms"),
    ("p99 ms", "latency_p99_ms"),
    ("agent ticks/s", "agent_ticks_per_s"),
    ("served", "served"),
    ("runtime CPU %", "runtime_cpu_percent"),
    ("CPU ms/tick", "runtime_cpu_ms_per_tick"),
    ("sim CPU %", "simulator_cpu_percent"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_out",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--loads", default="10,20,30,40", help="markets per play, comma-separated (default 10,20,30,40)"
    )
    parser.add_argument("--agents", type=int, default=20, help="agents per market (default 20)")
    parser.add_argument(
        "--ticks", type=int, default=300, help="ticks per market per play (default 300: 15 s)"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second per market (default 20)")
    parser.add_argument(
        "--warmup-ticks", type=int, default=40,
        help="ticks of the unmeasured play before each load, whose markets make the pools grow (default 40)",
    )  # fmt: skip
    parser.add_argument("--models", type=int, default=8, help="checkpoints converted for real (default 8)")
    parser.add_argument("--distinct", type=int, default=200, help="distinct models served (default 200)")
    parser.add_argument(
        "--deployments",
        default=",".join(DEPLOYMENTS),
        help=f"which of {', '.join(DEPLOYMENTS)} (default all)",
    )
    add_setting_arguments(parser)
    add_run_arguments(parser)
    add_output_argument(parser, "scale_out")
    args = parser.parse_args(argv)
    args.loads = [int(m) for m in args.loads.split(",")]
    args.deployments = [d.strip() for d in args.deployments.split(",")]
    if unknown := set(args.deployments) - set(DEPLOYMENTS):
        parser.error(f"unknown deployments {sorted(unknown)}: choose from {', '.join(DEPLOYMENTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    with work_directory(args.keep, "scale_out") as work:
        overrides = serving_overrides(work, args)
        setup, convert_s = converted_checkpoints(work, overrides, args.models, args.seed)
        models = distinct_models(work / "models", work / "models-scale-out", args.distinct, args.seed)
        rows = []
        for label in args.deployments:
            rows += deploy(args, work, models, label)
    print_table(
        f"Scale-out (game side; a load is served at >= {SERVES_ANSWERED:.0%} answered and p99 <= "
        f"{SERVES_P99_MS:g} ms)",
        [header for header, _ in COLUMNS],
        [[row.get(key) for _, key in COLUMNS] for row in rows],
    )
    items = setup.environment.num_items
    wire = {
        "tick_bytes": tick_bytes(args.agents, items, False),
        "tick_bytes_carried": tick_bytes(args.agents, items, True),
    }
    wire["extra_bytes_per_tick"] = wire["tick_bytes_carried"] - wire["tick_bytes"]
    capacities = {label: capacity(rows, label) for label in args.deployments}
    one, two = capacities.get("1 replica", 0), capacities.get("2 replicas", 0)
    summary = {
        "capacity_markets": capacities,
        "scaling_ratio": round(two / one, 2) if one and two else None,
        "wire": wire,
    }
    print(
        f"capacity (markets of {args.agents} agents at {args.rate:g} Hz): {capacities}; "
        f"scaling 2 replicas / 1 replica: {summary['scaling_ratio']}; a tick of {args.agents} agents is "
        f"{wire['tick_bytes']} bytes, {wire['tick_bytes_carried']} with its matrices "
        f"(+{wire['extra_bytes_per_tick']} bytes)"
    )
    settings = {
        "models": args.distinct,
        "rate_hz": args.rate,
        "ticks_per_market": args.ticks,
        "loads": args.loads,
        "pinned": shutil.which("taskset") is not None,
        "runtime": setup.runtime.model_dump(mode="json", exclude={"model_dir"}),
        "conversion_s": round(convert_s, 2),
        "command": command_line("scale_out", argv),
    }
    write_results(args.out, "scale_out", machine, settings, {"runs": rows, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
