"""Startup: cold conversion time per checkpoint, and `blockmarket run` start -> first served tick.

1. Conversion: --checkpoints fresh random TradingNetwork checkpoints (original format) converted by one
   ``blockmarket convert`` (fp32 export + validation on realistic states + metadata), and one more fresh
   checkpoint converted alone. Per checkpoint: the marginal cost (T_K - T_1) / (K - 1), and the
   average T_K / K, which includes the command's fixed start-up (interpreter, torch import).
2. Serving: ``blockmarket run`` with those agents already converted (one agent per checkpoint, so N
   distinct models served as one population pack). Timed from spawning the process to (a) its retained
   status saying "online" and (b) the first matrices message answering a tick published as soon as
   the roster is known. The first start builds the pack file (cold); later starts reuse it (warm).

The runtime serves the shipped config.yaml: only its files, its topic prefix, one agent per checkpoint and
a broker that must already run are set, plus what the command line asks for (--threads,
--cpu-pack-precision, --no-reload); every changed setting is printed and recorded in the JSON. On x86_64
the QNN HTP backend is a simulator, so the runtime serves on the CPU EP.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from benchmarks._harness import (
    HarnessError,
    RuntimeProcess,
    add_setting_arguments,
    announce_settings,
    changed_settings,
    convert,
    running_runtime,
    serving_overrides,
    unique_prefix,
    wait_for_status,
    work_directory,
    write_checkpoints,
    write_config,
)
from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from blockmarket.core.config import Config
from blockmarket.simulator.roster import discover_roster
from blockmarket.wire.limits import Limits
from blockmarket.wire.messages import MarketTick, encode_tick
from blockmarket.wire.protocol import decode_matrices
from blockmarket.wire.topics import Topics

TARGET_FIRST_TICK_S = 5.0
RETRY_TICK_S = 0.05  # republish the first tick this often until it is answered (subscription races)


def conversion_times(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cold conversion of ``--checkpoints`` fresh checkpoints in one command, and of one alone."""
    config, count, seed = work / "config-convert.yaml", args.checkpoints, args.seed
    items = write_config(config, serving_overrides(work, args)).environment.items_list
    write_checkpoints(work / "checkpoints", count, items, 128, seed)
    write_checkpoints(work / "single", 1, items, 128, seed + 1)
    batch_s = convert(work / "checkpoints", config, work / "models", work / "convert.log")
    single_s = convert(work / "single", config, work / "single-models", work / "convert-single.log")
    marginal = (batch_s - single_s) / (count - 1) if count > 1 else batch_s
    return {
        "checkpoints": count,
        "batch_s": round(batch_s, 3),
        "single_s": round(single_s, 3),
        "marginal_per_checkpoint_s": round(marginal, 4),
        "average_per_checkpoint_s": round(batch_s / count, 4),
    }


async def first_served_tick(config: Config, runtime: RuntimeProcess, timeout: float) -> tuple[float, float]:
    """Seconds from spawning `run` to its online status, and to the first matrices answering a tick."""
    status = await wait_for_status(config, runtime, timeout, "online")
    online_s = time.perf_counter() - runtime.started_at
    topics = Topics(config.mqtt.topic_prefix)
    roster = await discover_roster(config, timeout)  # retained: here as soon as the status says online
    if roster is None:
        raise HarnessError(f"no roster on {topics.roster} from the online runtime")
    ids = roster.agent_ids
    rng = np.random.default_rng(0)
    tick = MarketTick(
        tick=1,
        sent_at=time.time(),
        agent_ids=ids,
        inventory=rng.integers(5, 15, size=(len(ids), len(status["items"]))).astype(np.float32),
        successful=np.zeros(len(ids), dtype=np.float32),
        attempted=np.zeros(len(ids), dtype=np.float32),
    )
    limits = Limits(max_payload_bytes=64 * 1024 * 1024)
    deadline = time.perf_counter() + timeout
    async with aiomqtt.Client(config.mqtt.host, config.mqtt.port) as client:
        await client.subscribe(topics.matrices)
        messages = aiter(client.messages)
        while time.perf_counter() < deadline:
            runtime.check_alive()
            await client.publish(topics.tick, encode_tick(tick))
            try:
                message = await asyncio.wait_for(anext(messages), timeout=RETRY_TICK_S)
            except TimeoutError:
                continue
            answer = decode_matrices(bytes(message.payload), limits)
            if answer.tick == tick.tick and answer.matrices.shape[0] == len(ids):
                return online_s, time.perf_counter() - runtime.started_at
    raise HarnessError(f"no answer on {topics.matrices} within {timeout:.0f} s")


def serving_times(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """``--starts`` consecutive starts of `run` on the converted agents (the first builds the pack)."""
    starts = []
    for attempt in range(args.starts):
        path = work / f"config-run-{attempt}.yaml"
        config = write_config(path, serving_overrides(work, args, unique_prefix("startup")))
        with running_runtime(path, work / f"run-{attempt}.log") as runtime:
            online_s, first_tick_s = asyncio.run(first_served_tick(config, runtime, args.timeout))
        starts.append(
            {
                "start": attempt + 1,
                "pack": "built" if attempt == 0 else "cached",
                "online_s": round(online_s, 3),
                "first_tick_s": round(first_tick_s, 3),
            }
        )
    return starts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.startup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoints", type=int, default=100, help="fresh checkpoints = agents served")
    parser.add_argument("--starts", type=int, default=3, help="consecutive `run` starts to time")
    add_setting_arguments(parser)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a start")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep logs (default: temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "startup")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    with work_directory(args.keep, "startup") as work:
        changed = changed_settings(serving_overrides(work, args))
        announce_settings(f"{args.checkpoints} agents, {args.starts} starts", changed)
        print(f"... converting {args.checkpoints} fresh checkpoints in {work}", file=sys.stderr, flush=True)
        conversion = conversion_times(work, args)
        print(f"... {args.starts} starts of `blockmarket run`", file=sys.stderr, flush=True)
        starts = serving_times(args, work)
    print_table(
        f"Cold conversion ({args.checkpoints} checkpoints in one `blockmarket convert`, and 1 alone)",
        ["K", "T_K s", "T_1 s", "marginal s/ckpt", "average s/ckpt"],
        [list(conversion.values())],
    )
    print_table(
        f"`blockmarket run` -> first served tick, {args.checkpoints} converted agents "
        f"(target <= {TARGET_FIRST_TICK_S} s)",
        ["start", "pack", "online s", "first tick s"],
        [list(s.values()) for s in starts],
    )
    first = [s["first_tick_s"] for s in starts]
    results = {
        "conversion": conversion,
        "starts": starts,
        "first_tick_s": {"cold": first[0], "median": float(np.median(first)), "max": max(first)},
        "target_first_tick_s": TARGET_FIRST_TICK_S,
    }
    settings = {
        "agents": args.checkpoints,
        "assignment": "one_per_checkpoint (distinct models, one population pack)",
        "overrides": changed,  # of config.yaml
        "command": command_line("startup", argv),
    }
    write_results(args.out, "startup", machine, settings, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
