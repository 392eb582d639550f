"""Soak: N distinct agents at R ticks/s for --minutes, ~1% hostile ticks, a hot reload every minute.

``blockmarket run`` serves the shipped config.yaml (one agent per model: --agents distinct models,
derived as benchmarks.end_to_end derives them), ``blockmarket simulate --rate R`` plays the game server,
and this process adds what a long day brings:

* hostile messages on the tick topic, --hostile-fraction of all messages sent there (one every
  1/(R*f/(1-f)) s): the seeded mix of benchmarks/hostile_ticks.py (garbage, truncated, byte flips, wrong
  types, extension types, lying lengths, deep nesting, repeated keys, other versions, unprintable ids,
  NaN/Inf, out of range, unknown agents, bad shapes, oversized), some of them published *retained*, and
  one tick left retained before the runtime subscribes (the broker replays it: counted `retained`);
* every --reload-every seconds a new version of one model (every weight + N(0, 0.01)), written as the
  converter writes (ONNX, then metadata, each through a temp file and a rename): the runtime swaps it in.

The runtime's RSS is sampled (psutil) every --sample-every seconds while the simulator runs. Reported:
RSS at the warm-up end and at the end (medians over --rss-window seconds ending there), growth %, peak
and the slope after warm-up; the tick accounting of the runtime's final status (received, every bucket,
the counting invariant, dropped by kind against what was sent of each kind, received against everything
published on the tick topic); the game side's sent / answered / missing and latency p50 / p99; the
reloads written, performed (pool generations) and applied (each new version seen in the roster).

Exit status 1 when a check fails: the invariant, every message published received and counted under its
kind, every reload applied, or RSS growth >= --max-rss-growth (default 5 %). On x86_64 the runtime
serves on the CPU EP (the QNN HTP backend is a simulator).
"""

# size: a benchmark script: the soak run, its checks and its report in one file to read

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import onnx

from benchmarks._harness import (
    STATUS_LIMITS,
    HarnessError,
    ResourceSampler,
    RuntimeProcess,
    add_run_arguments,
    add_setting_arguments,
    announce_settings,
    blockmarket,
    changed_settings,
    converted_checkpoints,
    distinct_models,
    offspring,
    running_runtime,
    serving_overrides,
    tail,
    unique_prefix,
    wait_for_status,
    work_directory,
    write_config,
    write_converted,
)
from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from benchmarks.hostile_ticks import HostilePayloads
from blockmarket.core.config import Config
from blockmarket.models.files import METADATA_SUFFIX
from blockmarket.wire.limits import Limits, ProtocolError
from blockmarket.wire.messages import MarketTick, RosterMessage, encode_tick
from blockmarket.wire.protocol import decode_matrices, decode_roster, decode_status
from blockmarket.wire.topics import Topics
from runtime.units import PACK_DIR

BUCKETS = ("ticks_served", "ticks_skipped", "ticks_unpublished", "inference_errors", "ticks_in_flight")
RETAINED_SHARE = 1 / 8  # of the hostile messages, published with the retain flag
RELOAD_NOISE = 0.01  # a new model version: every weight + N(0, RELOAD_NOISE)
LAST_RELOAD_S = 10.0  # no new model version in the game's last seconds: its answers show it served
SETTLE_S = 60.0  # after the game stops: time for the last messages to be counted, the last reload announced
TIMELINE_POINTS = 30  # RSS medians recorded in the JSON, over equal slices of the run


class HostileMix:
    """The soak's hostile messages, drawn from one seed, and how many of each kind the runtime must count."""

    def __init__(self, template: MarketTick, limits: Limits, roster: set[str], seed: int) -> None:
        self._payloads = iter(HostilePayloads(template, limits, roster, seed))
        self._rng = np.random.default_rng([seed, 1])
        self.expected: Counter[str] = Counter()  # refusal kind -> messages sent
        self.sent = 0
        self.retained = 0  # of them published with the retain flag

    def draw(self) -> tuple[bytes, str, bool]:
        """A hostile payload, the kind it must be counted under, and whether to publish it retained.

        A retained publish reaches a subscriber that is already there without the flag (MQTT 3.1.1), so
        it is counted by its content; the broker keeps it for the next subscriber.
        """
        payload, kind = next(self._payloads)
        return payload, kind, bool(self._rng.random() < RETAINED_SHARE)

    def count(self, kind: str, retained: bool) -> None:
        self.expected[kind] += 1
        self.sent += 1
        self.retained += retained


@dataclass
class ReloadRecord:
    """One new model version written for hot reload, and when the runtime first served and announced it."""

    model: str
    version: str  # as the runtime names it: the start of the ONNX sha256
    written_at: float  # perf_counter, once the metadata is in place
    served_at: float | None = None  # the first answer computed with it arrived
    announced_at: float | None = None  # the first roster naming it arrived


@dataclass
class RuntimeWatch:
    """The runtime's retained status and roster as they change, and which new model versions its answers
    and its roster carry (answers are decoded only while a written version has not been served yet)."""

    client: aiomqtt.Client
    topics: Topics
    reloads: list[ReloadRecord] = field(default_factory=list)
    answer_limits: Limits = STATUS_LIMITS  # the roster's size, once it is known
    status: dict[str, Any] = field(default_factory=dict)
    roster: RosterMessage | None = None  # the newest, of the runtime whose status is online
    rosters: int = 0  # rosters received
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for topic in (self.topics.status, self.topics.roster, self.topics.matrices):
            await self.client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for message in self.client.messages:
            topic, payload, now = message.topic.value, bytes(message.payload), time.perf_counter()
            try:
                if topic == self.topics.status:
                    self.status = decode_status(payload, STATUS_LIMITS)
                elif topic == self.topics.roster:
                    self.roster = decode_roster(payload, STATUS_LIMITS)
                    self.rosters += 1
                    self._note(self.roster.model_versions, now, "announced_at")
                elif any(record.served_at is None for record in self.reloads):
                    self._note(decode_matrices(payload, self.answer_limits).model_versions, now, "served_at")
            except ProtocolError as exc:
                raise HarnessError(f"{topic}: unreadable message from the runtime ({exc})") from None
            self._changed.set()

    def _note(self, versions: Mapping[str, str], now: float, event: str) -> None:
        """Timestamp ``event`` of every written version that ``versions`` carries for the first time."""
        for record in self.reloads:
            if getattr(record, event) is None and versions.get(record.model) == record.version:
                setattr(record, event, now)

    def online(self) -> bool:
        """The status says online, and the roster of that same runtime is here."""
        return (
            self.status.get("state") == "online"
            and self.roster is not None
            and self.roster.client_id == self.status.get("client_id")
        )

    async def until(self, condition: Callable[[], bool], timeout: float, runtime: RuntimeProcess) -> bool:
        """Wait for ``condition`` (checked at each status or roster) up to ``timeout`` s; False if not met."""
        deadline = time.perf_counter() + timeout
        while not condition():
            runtime.check_alive()
            if self._task is not None and self._task.done():
                self._task.result()  # re-raises what ended the watch
                raise HarnessError(f"the MQTT connection watching {self.topics.status} ended")
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))
            except TimeoutError:
                continue
        return True

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def template_tick(roster: RosterMessage, seed: int) -> MarketTick:
    """A valid tick naming every agent of the roster: what the hostile payloads are made from."""
    rng = np.random.default_rng(seed)
    count, n = len(roster.agent_ids), len(roster.items)
    successful = rng.integers(0, 5, size=count)
    return MarketTick(
        tick=1,
        sent_at=time.time(),
        agent_ids=roster.agent_ids,
        inventory=rng.integers(0, 30, size=(count, n)).astype(np.float32),
        successful=successful.astype(np.float32),
        attempted=(successful + rng.integers(0, 6, size=count)).astype(np.float32),
    )


def stale_tick(agent_id: str, num_items: int) -> bytes:
    """A tick from the past, left retained on the tick topic before the runtime subscribes."""
    one = np.ones((1, num_items), np.float32)
    return encode_tick(MarketTick(0, time.time() - 3600, (agent_id,), one, one[:, 0] * 0, one[:, 0]))


async def set_retained_tick(config: Config, payload: bytes) -> None:
    """Leave ``payload`` retained on the tick topic (empty: delete what the broker keeps there)."""
    async with aiomqtt.Client(config.mqtt.host, config.mqtt.port) as client:
        await client.publish(Topics(config.mqtt.topic_prefix).tick, payload, qos=1, retain=True)


def new_model_version(models: Path, key: str, rng: np.random.Generator) -> str:
    """Write a new version of model ``key`` (its weights + noise), as the converter writes; its version."""
    metadata = json.loads((models / f"{key}{METADATA_SUFFIX}").read_text())
    onnx_name = metadata["model_info"]["onnx_path"]
    payload = offspring(onnx.load(str(models / onnx_name)), rng, RELOAD_NOISE)
    return write_converted(models, key, payload, metadata, onnx_name)[:12]


async def publish_hostile(
    client: aiomqtt.Client, topic: str, mix: HostileMix, every_s: float, qos: int, stop: asyncio.Event
) -> None:
    """One hostile message every ``every_s`` until ``stop``."""
    while not await _stopped(stop, every_s):
        payload, kind, retain = mix.draw()
        await client.publish(topic, payload, qos=qos, retain=retain)
        mix.count(kind, retain)


async def reload_models(
    models: Path, every_s: float, until: float, seed: int, records: list[ReloadRecord], stop: asyncio.Event
) -> None:
    """A new version of one model every ``every_s`` until ``stop``, none after perf_counter ``until`` (the
    game must still be answering to show it served); each model once before any twice."""
    rng = np.random.default_rng([seed, 2])
    keys = sorted(path.name[: -len(METADATA_SUFFIX)] for path in models.glob(f"*{METADATA_SUFFIX}"))
    order = [keys[i] for i in rng.permutation(len(keys))]
    while not await _stopped(stop, every_s) and time.perf_counter() < until:
        key = order[len(records) % len(order)]
        version = await asyncio.to_thread(new_model_version, models, key, rng)
        records.append(ReloadRecord(key, version, time.perf_counter()))


async def _stopped(stop: asyncio.Event, wait_s: float) -> bool:
    """Wait ``wait_s`` seconds; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=wait_s)
    except TimeoutError:
        return False
    return True


@dataclass
class SoakRun:
    """What the soak saw while the game ran, before the runtime's final status."""

    first_generation: int  # the runtime's pool generation when the game started
    game: dict[str, Any]  # `blockmarket simulate --json`
    game_cpu_percent: float
    runtime: ResourceSampler  # the runtime's RSS while the game ran
    mix: HostileMix
    reloads: list[ReloadRecord]
    settled: bool  # before the runtime stopped: every message published counted, every reload announced

    @property
    def published(self) -> int:
        """Every message published on the tick topic: the game's, the hostile ones, the retained one."""
        return int(self.game["ticks_sent"]) + self.mix.sent + 1


@dataclass
class Soak:
    """One soak against a live runtime: the game, the hostile messages and the reloads side by side."""

    args: argparse.Namespace
    config: Config
    config_path: Path
    models: Path
    work: Path
    runtime: RuntimeProcess

    async def run(self) -> SoakRun:
        topics = Topics(self.config.mqtt.topic_prefix)
        timeout = self.args.startup_timeout
        async with aiomqtt.Client(self.config.mqtt.host, self.config.mqtt.port) as client:
            watch = RuntimeWatch(client, topics)
            await watch.start()
            try:
                if not await watch.until(watch.online, timeout, self.runtime):
                    raise HarnessError(
                        f"no online status and roster within {timeout:.0f} s:\n{tail(self.runtime.log)}"
                    )
                roster = watch.roster
                assert roster is not None
                count, n = len(roster.agent_ids), len(roster.items)
                watch.answer_limits = Limits.from_config(self.config.mqtt, num_agents=count, num_items=n)
                limits = Limits.from_announcement(watch.status["limits"], num_items=n)
                seed = self.args.seed
                mix = HostileMix(template_tick(roster, seed), limits, set(roster.agent_ids), seed)
                first_generation = int(watch.status["pool_generation"])
                game, game_cpu, usage = await self._play(client, topics.tick, mix, watch.reloads)
                run = SoakRun(first_generation, game, game_cpu, usage, mix, watch.reloads, settled=False)
                run.settled = await watch.until(lambda: _settled(watch, run), SETTLE_S, self.runtime)
            finally:
                watch.close()
        return run

    async def _play(
        self, client: aiomqtt.Client, tick_topic: str, mix: HostileMix, reloads: list[ReloadRecord]
    ) -> tuple[dict[str, Any], float, ResourceSampler]:
        """`blockmarket simulate` for the whole soak, hostile messages and reloads alongside; its summary,
        its CPU %, and the runtime's RSS over that time."""
        args, work = self.args, self.work
        ticks = round(args.minutes * 60 * args.rate)
        summary, log_path = work / "simulate.json", work / "simulate.log"
        command = [*blockmarket(), "simulate", "--config", str(self.config_path), "--ticks", str(ticks)]
        command += ["--rate", str(args.rate), "--json", str(summary), "--quiet", "--wait", "30"]
        hostile_rate = args.rate * args.hostile_fraction / (1 - args.hostile_fraction)
        stop = asyncio.Event()
        with log_path.open("w") as log:
            game = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        with (
            ResourceSampler(self.runtime.pid, args.sample_every) as usage,
            ResourceSampler(game.pid) as game_use,
        ):
            tasks = []
            if hostile_rate > 0:
                qos = self.config.mqtt.qos
                tasks.append(publish_hostile(client, tick_topic, mix, 1 / hostile_rate, qos, stop))
            if args.reload_every > 0:
                until = time.perf_counter() + ticks / args.rate - LAST_RELOAD_S
                tasks.append(reload_models(self.models, args.reload_every, until, args.seed, reloads, stop))
            running = [asyncio.create_task(task) for task in tasks]
            try:
                code = await asyncio.wait_for(
                    asyncio.to_thread(game.wait), timeout=ticks / args.rate * 3 + 120
                )
            except TimeoutError:
                game.kill()
                raise HarnessError(f"`blockmarket simulate` did not finish:\n{tail(log_path)}") from None
            finally:
                stop.set()
                await asyncio.gather(*running)
        if code != 0:
            raise HarnessError(f"`blockmarket simulate` exited {code}:\n{tail(log_path)}")
        return json.loads(summary.read_text()), round(game_use.cpu_percent, 1), usage


def _settled(watch: RuntimeWatch, run: SoakRun) -> bool:
    """The runtime counted every message published, nothing waits, every new model version is announced."""
    status = watch.status
    return (
        status.get("ticks_received") == run.published
        and status.get("ticks_in_flight") == 0
        and all(record.announced_at is not None for record in run.reloads)
    )


def soak(
    args: argparse.Namespace, config: Config, config_path: Path, models: Path, work: Path
) -> tuple[SoakRun, dict[str, Any]]:
    """Leave a stale tick retained, start `run`, soak it, stop it; what the soak saw and its final status."""
    first = json.loads(next(iter(sorted(models.glob(f"*{METADATA_SUFFIX}")))).read_text())
    stale = stale_tick(first["agent_info"]["agent_id"], len(config.environment.items_list))
    asyncio.run(set_retained_tick(config, stale))
    try:
        with running_runtime(config_path, work / "run.log") as runtime:
            run = asyncio.run(Soak(args, config, config_path, models, work, runtime).run())
        final = asyncio.run(wait_for_status(config, runtime, 60, "offline"))
    finally:
        asyncio.run(set_retained_tick(config, b""))  # the broker persists retained messages: delete ours
    if "ticks_received" not in final:
        raise HarnessError(
            f"`blockmarket run` did not shut down cleanly (no final figures):\n{tail(runtime.log)}"
        )
    return run, final


def _median_between(t: np.ndarray, mb: np.ndarray, start: float, stop: float) -> float:
    """Median of the samples taken in [start, stop]; the sample nearest ``stop`` if none was."""
    inside = (t >= start) & (t <= stop)
    if not inside.any():
        inside = np.arange(len(t)) == int(np.argmin(np.abs(t - stop)))
    return float(np.median(mb[inside]))


def memory(
    samples: Sequence[tuple[float, int]], warmup_s: float, window_s: float, reloads_at: Sequence[float] = ()
) -> dict[str, Any]:
    """RSS at the warm-up end and at the end (medians over ``window_s`` ending there: a reload's transient
    peak is not taken for growth), the growth between them, the peak, the slope after warm-up, and the
    last sample before each reload (``reloads_at``, same clock as the samples): a leak raises that floor."""
    t = np.array([at for at, _ in samples])
    mb = np.array([rss for _, rss in samples]) / 2**20
    before = [mb[t < at][-1] for at in reloads_at if (t < at).any()]
    window = min(window_s, warmup_s)
    at_warmup = _median_between(t, mb, warmup_s - window, warmup_s)
    at_end = _median_between(t, mb, t[-1] - window, t[-1])
    after = t >= warmup_s
    slope = float(np.polyfit(t[after], mb[after], 1)[0]) * 3600 if after.sum() >= 2 else None
    return {
        "rss_start_mb": round(float(mb[0]), 1),
        "rss_warmup_mb": round(at_warmup, 1),
        "rss_end_mb": round(at_end, 1),
        "rss_growth_pct": round(100 * (at_end - at_warmup) / at_warmup, 2),
        "rss_peak_mb": round(float(mb.max()), 1),
        "rss_slope_mb_per_hour": None if slope is None else round(slope, 1),
        "warmup_s": round(warmup_s, 1),
        "window_s": round(window, 1),
        "sampled_s": round(float(t[-1]), 1),
        "samples": len(t),
        "rss_before_reloads_mb": [round(float(value), 1) for value in before],
        **timeline(t, mb),
    }


def timeline(t: np.ndarray, mb: np.ndarray, points: int = TIMELINE_POINTS) -> dict[str, list[float]]:
    """RSS over the run in at most ``points`` equal slices (the median of each): the shape of the curve."""
    edges = np.linspace(0.0, float(t[-1]), points + 1)
    slices = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, points - 1)
    kept = [k for k in range(points) if (slices == k).any()]
    return {
        "timeline_s": [round(float(edges[k + 1]), 1) for k in kept],
        "timeline_rss_mb": [round(float(np.median(mb[slices == k])), 1) for k in kept],
    }


def accounting(final: dict[str, Any], run: SoakRun) -> dict[str, Any]:
    """The runtime's final buckets, the counting invariant, and everything published against them."""
    dropped = {kind: count for kind, count in sorted(final["dropped"].items()) if count}
    expected = dict(sorted((run.mix.expected + Counter({"retained": 1})).items()))
    received = int(final["ticks_received"])
    accounted = sum(int(final[bucket]) for bucket in BUCKETS) + sum(dropped.values())
    return {
        "published": run.published,
        "published_game": int(run.game["ticks_sent"]),
        "published_hostile": run.mix.sent,
        "published_hostile_retained": run.mix.retained,
        "retained_before_start": 1,
        "hostile_share": round((run.mix.sent + 1) / max(run.published, 1), 4),
        "received": received,
        **{bucket.removeprefix("ticks_"): int(final[bucket]) for bucket in BUCKETS},
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "dropped_expected": expected,
        "accounted": accounted,
        "invariant_holds": accounted == received,
        "guarded_outputs": final.get("guarded_outputs"),
        "settled_before_stop": run.settled,
    }


def reloads(final: dict[str, Any], run: SoakRun, models: Path) -> dict[str, Any]:
    """New model versions written, served (an answer computed with them), announced (in a roster),
    swapped (pool generations); write -> first answer served with the new version."""
    latencies = [r.served_at - r.written_at for r in run.reloads if r.served_at is not None]
    packs = list((models / PACK_DIR).glob("*.onnx"))
    return {
        "written": len(run.reloads),
        "served": len(latencies),
        "announced": sum(r.announced_at is not None for r in run.reloads),
        "generations": int(final["pool_generation"]) - run.first_generation,
        "failures": int(final.get("reload_failures", 0)),
        "latency_p50_s": round(float(np.median(latencies)), 2) if latencies else None,
        "latency_max_s": round(max(latencies), 2) if latencies else None,
        "pack_cache_files": len(packs),
        "pack_cache_mb": round(sum(p.stat().st_size for p in packs) / 2**20, 1),
        "models": [r.model for r in run.reloads],
    }


def warmup_seconds(args: argparse.Namespace) -> float:
    """--warmup-minutes, by default 10% of the run but at least two reloads in (the first reloads raise
    RSS to where it then stays: two pool generations meet), at most two thirds of the run."""
    if args.warmup_minutes is not None:
        return 60 * float(args.warmup_minutes)
    run_s = 60 * args.minutes
    return min(max(run_s / 10, 2 * args.reload_every), run_s * 2 / 3)


GAME_KEYS = (
    "ticks_sent", "ticks_unsent", "answered", "missing", "tick_rate_hz", "latency_p50_ms", "latency_p99_ms",
    "latency_max_ms", "rule_violations", "unknown_agents", "dropped",
)  # fmt: skip


def summarise(args: argparse.Namespace, run: SoakRun, final: dict[str, Any], models: Path) -> dict[str, Any]:
    """Every figure of the run, and the checks that decide the exit status."""
    mem = memory(
        run.runtime.samples,
        warmup_seconds(args),
        args.rss_window,
        [record.written_at - run.runtime.started_at for record in run.reloads],
    )
    ticks = accounting(final, run)
    reload = reloads(final, run, models)
    checks = {
        "counting_invariant": ticks["invariant_holds"],
        "every_message_received": ticks["received"] == ticks["published"],
        "dropped_by_kind_as_sent": ticks["dropped"] == ticks["dropped_expected"],
        "every_reload_served": reload["failures"] == 0
        and reload["written"] == reload["served"] == reload["announced"] == reload["generations"],
        f"rss_growth_below_{args.max_rss_growth:g}_pct": mem["rss_growth_pct"] < args.max_rss_growth,
    }
    return {
        "agents": args.agents,
        "duration_s": round(float(run.game["duration_s"]), 1),
        "memory": mem,
        "ticks": ticks,
        "game": {key: run.game[key] for key in GAME_KEYS},
        "runtime": {
            "receive_to_publish_p50_ms": final.get("latency_p50_ms"),  # over the runtime's recent ticks
            "receive_to_publish_p99_ms": final.get("latency_p99_ms"),
            "cpu_percent": round(run.runtime.cpu_percent, 1),
            "simulator_cpu_percent": run.game_cpu_percent,
            "eps": final.get("eps"),
        },
        "reloads": reload,
        "checks": checks,
        "passed": all(checks.values()),
    }


Columns = tuple[tuple[str, str], ...]  # (header, key)
RSS_COLUMNS: Columns = (
    ("start", "rss_start_mb"), ("warm-up end", "rss_warmup_mb"), ("end", "rss_end_mb"),
    ("growth %", "rss_growth_pct"), ("peak", "rss_peak_mb"), ("slope MB/h", "rss_slope_mb_per_hour"),
)  # fmt: skip
TICK_COLUMNS: Columns = (
    ("published", "published"), ("received", "received"), ("served", "served"), ("skipped", "skipped"),
    ("unpubl.", "unpublished"), ("inf. err", "inference_errors"), ("in flight", "in_flight"),
    ("dropped", "dropped_total"), ("invariant", "invariant_holds"),
)  # fmt: skip
GAME_COLUMNS: Columns = (
    ("sent", "ticks_sent"), ("answered", "answered"), ("missing", "missing"), ("ticks/s", "tick_rate_hz"),
    ("p50 ms", "latency_p50_ms"), ("p99 ms", "latency_p99_ms"), ("max ms", "latency_max_ms"),
)  # fmt: skip
RUNTIME_COLUMNS: Columns = (
    ("rt p50", "receive_to_publish_p50_ms"), ("rt p99", "receive_to_publish_p99_ms"),
    ("CPU %", "cpu_percent"), ("sim CPU %", "simulator_cpu_percent"),
)  # fmt: skip
RELOAD_COLUMNS: Columns = (
    ("written", "written"), ("served", "served"), ("announced", "announced"), ("generations", "generations"),
    ("failures", "failures"),
    ("p50 s", "latency_p50_s"), ("max s", "latency_max_s"), ("pack files", "pack_cache_files"),
    ("pack MB", "pack_cache_mb"),
)  # fmt: skip


def print_row(title: str, columns: Columns, figures: dict[str, Any]) -> None:
    """A table of one row: the figures under ``columns``."""
    print_table(title, [header for header, _ in columns], [[figures[key] for _, key in columns]])


def print_report(results: dict[str, Any]) -> None:
    mem, ticks = results["memory"], results["ticks"]
    print_row(
        f"Runtime RSS, MB ({results['agents']} agents, {results['duration_s']:.0f} s; warm-up end at "
        f"{mem['warmup_s']:.0f} s; warm-up end and end: medians over {mem['window_s']:.0f} s)",
        RSS_COLUMNS,
        mem,
    )
    before = ", ".join(f"{value:.0f}" for value in mem["rss_before_reloads_mb"]) or "no reload"
    print(f"RSS just before each reload, MB: {before}")
    print_row(
        "Tick topic: published, and the runtime's final status (invariant: received = served + skipped + "
        "unpublished + inference errors + in flight + dropped)",
        TICK_COLUMNS,
        ticks,
    )
    kinds = sorted(set(ticks["dropped"]) | set(ticks["dropped_expected"]))
    print_table(
        "Dropped by kind: sent by the hostile publisher, counted by the runtime",
        ["kind", "sent", "counted"],
        [[kind, ticks["dropped_expected"].get(kind, 0), ticks["dropped"].get(kind, 0)] for kind in kinds],
    )
    print_row(
        "Game side (`blockmarket simulate`: publish -> matrices received); rt: runtime's receive -> publish",
        GAME_COLUMNS + RUNTIME_COLUMNS,
        results["game"] | results["runtime"],
    )
    print_row(
        "Hot reload: new model versions written, served (in an answer), announced (roster), pool swaps;"
        " write -> first answer",
        RELOAD_COLUMNS,
        results["reloads"],
    )
    print_table(
        "Checks",
        ["check", "result"],
        [[name, "ok" if ok else "FAILED"] for name, ok in results["checks"].items()],
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the game plays (default 30)")
    parser.add_argument("--agents", type=int, default=1000, help="distinct agents (one model each)")
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second the simulator sends")
    parser.add_argument(
        "--hostile-fraction", type=float, default=0.01, help="share of tick-topic messages that are hostile"
    )
    parser.add_argument(
        "--reload-every", type=float, default=60.0, help="seconds between two new model versions (0: none)"
    )
    parser.add_argument(
        "--models", type=int, default=100, help="checkpoints converted (the rest are derived)"
    )
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between two RSS samples")
    parser.add_argument(
        "--warmup-minutes",
        type=float,
        default=None,
        help="RSS growth is counted from here (default: 10%% of the run, at least two reloads, at most 2/3)",
    )
    parser.add_argument(
        "--rss-window", type=float, default=60.0, help="seconds of samples whose median is the RSS at a point"
    )
    parser.add_argument(
        "--max-rss-growth", type=float, default=5.0, help="fail at this RSS growth in %% or more (default 5)"
    )
    add_setting_arguments(parser)
    add_run_arguments(parser)
    add_output_argument(parser, "soak")
    args = parser.parse_args(argv)
    if not 0 <= args.hostile_fraction < 1:
        parser.error("--hostile-fraction must be in [0, 1)")
    if args.minutes <= 0 or args.rate <= 0 or args.sample_every <= 0:
        parser.error("--minutes, --rate and --sample-every must be positive")
    if args.no_reload and args.reload_every > 0:
        parser.error("--no-reload turns hot reload off: add --reload-every 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with work_directory(args.keep, "soak") as work:
        machine = machine_info()  # the load average before the run starts
        overrides = serving_overrides(work, args, unique_prefix("soak"))
        convert_s = converted_checkpoints(work, overrides, args.models, args.seed)[1]
        models = distinct_models(work / "models", work / f"models-{args.agents}", args.agents, args.seed)
        overrides["runtime"]["model_dir"] = str(models)
        config_path = work / "config-soak.yaml"
        config = write_config(config_path, overrides)
        changed = changed_settings(overrides)
        announce_settings(
            f"soak: {args.agents} agents at {args.rate:g}/s for {args.minutes:g} min, "
            f"{100 * args.hostile_fraction:g}% hostile, a new model version every {args.reload_every:g} s",
            changed,
        )
        run, final = soak(args, config, config_path, models, work)
        results = summarise(args, run, final, models)
    print_report(results)
    settings = {
        "agents": args.agents,
        "minutes": args.minutes,
        "rate_hz": args.rate,
        "hostile_fraction": args.hostile_fraction,
        "hostile_retained_share": RETAINED_SHARE,
        "reload_every_s": args.reload_every,
        "reload_noise": RELOAD_NOISE,
        "models": args.models,
        "assignment": "one_per_checkpoint: N distinct models (--models converted, the rest derived)",
        "sample_every_s": args.sample_every,
        "rss_window_s": args.rss_window,
        "max_rss_growth_pct": args.max_rss_growth,
        "overrides": changed,  # of config.yaml
        "runtime": config.runtime.model_dump(mode="json", exclude={"model_dir"}),  # shipped values too
        "broker": f"{config.mqtt.host}:{config.mqtt.port}",
        "conversion_s": round(convert_s, 2),
        "seed": args.seed,
        "command": command_line("soak", argv),
    }
    write_results(args.out, "soak", machine, settings, results)
    if not results["passed"]:
        failed = ", ".join(name for name, ok in results["checks"].items() if not ok)
        print(f"soak FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
