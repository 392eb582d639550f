"""What the process-level benchmarks share: checkpoints to serve, a config per run, and a live runtime.

Everything goes through the user's commands (``blockmarket convert``, ``run``, ``simulate``) in
separate processes, talking to the real broker, so the figures include what a deployment pays.
"""

# size: one harness for every process-level benchmark (soak, end_to_end, startup): kept together
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import onnx
import yaml
from onnx import numpy_helper

from benchmarks._report import REPO_ROOT
from blockmarket.core.config import Config, load_config
from blockmarket.core.files import atomic_target
from blockmarket.models.files import METADATA_SUFFIX
from blockmarket.wire.limits import Limits, ProtocolError
from blockmarket.wire.protocol import decode_status
from blockmarket.wire.topics import Topics

STATUS_LIMITS = Limits(max_payload_bytes=64 * 1024 * 1024)
# Where a run keeps its files and topics: set per run, not settings that change how it serves
PLACEMENT_KEYS = frozenset(
    {
        "training.model_save_path",
        "conversion.output_dir",
        "runtime.model_dir",
        "mqtt.topic_prefix",
        "runtime.http.port",  # 0: runs never compete for the metrics port
    }
)


class HarnessError(RuntimeError):
    """A benchmark step failed; the message names the command and the tail of its log."""


def blockmarket() -> list[str]:
    """The console script installed next to this interpreter (what a user runs)."""
    script = Path(sys.executable).with_name("blockmarket")
    if not script.is_file():
        raise HarnessError(
            f"{script}: no `blockmarket` console script; install the project (pip install -e .)"
        )
    return [str(script)]


@contextmanager
def work_directory(keep: Path | None, name: str) -> Iterator[Path]:
    """Where a run writes its files: ``keep`` (``--keep``: created and left in place), else a temporary
    directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bm-{name}-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        yield work


def unique_prefix(name: str) -> str:
    """A topic prefix no other run (or retained message) on the shared broker uses."""
    return f"bench-{name}-{uuid.uuid4().hex[:10]}"


def write_checkpoints(folder: Path, count: int, items: tuple[str, ...], hidden: int, seed: int) -> list[Path]:
    """``count`` random TradingNetwork agents in the original trainer's checkpoint format."""
    import torch

    from blockmarket.core.state import initial_matrices, state_dim
    from conversion.checkpoint import save_checkpoint
    from conversion.networks import TradingNetwork

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(items)
    paths = []
    for i in range(count):
        net = TradingNetwork(state_dim(n), hidden, n)
        paths.append(
            save_checkpoint(
                folder / f"agent_bench{i:05d}_final.pth",
                network_state_dict=net.state_dict(),
                optimizer_state_dict=torch.optim.Adam(net.parameters()).state_dict(),
                agent_id=f"bench{i:05d}",
                desired_item=items[i % n],
                inventory={item: float(v) for item, v in zip(items, rng.integers(5, 15, n), strict=True)},
                trading_matrix=initial_matrices(rng, 1, n)[0].astype(np.float64),
                position=rng.uniform(0, 100, 2),
                reward_history=[],
            )
        )
    return paths


def distinct_models(source: Path, target: Path, count: int, seed: int, noise: float = 0.01) -> Path:
    """A model directory of ``count`` distinct agents, in the converter's output format.

    The first ones are the converted models in ``source`` (copied as they are); the rest are derived
    from them as evolutionary offspring are: every weight plus N(0, ``noise``), written as the ONNX +
    metadata pair the converter writes (new agent id, new sha256). Converting 10,000 checkpoints would
    take ~12 minutes; serving does not care how the files were made.
    """
    sources = sorted(source.glob(f"*{METADATA_SUFFIX}"))
    if not sources:
        raise HarnessError(f"{source}: no converted models to derive agents from")
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    graphs: dict[Path, onnx.ModelProto] = {}
    for i in range(count):
        metadata_path = sources[i % len(sources)]
        metadata = json.loads(metadata_path.read_text())
        onnx_name = metadata["model_info"]["onnx_path"]
        if i < len(sources):
            shutil.copy2(source / onnx_name, target / onnx_name)
            shutil.copy2(metadata_path, target / metadata_path.name)
            continue
        template = graphs.setdefault(metadata_path, onnx.load(str(source / onnx_name)))
        metadata["agent_info"]["agent_id"] = f"derived{i:05d}"
        write_converted(target, f"agent_derived{i:05d}", offspring(template, rng, noise), metadata, onnx_name)
    return target


def offspring(template: onnx.ModelProto, rng: np.random.Generator, noise: float) -> bytes:
    """The template's graph with every weight plus N(0, ``noise``), serialized: an evolutionary offspring."""
    model = onnx.ModelProto()
    model.CopyFrom(template)
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        noisy = (weights + rng.normal(0.0, noise, weights.shape)).astype(weights.dtype)
        tensor.CopyFrom(numpy_helper.from_array(noisy, tensor.name))
    return model.SerializeToString()


def write_converted(
    folder: Path, stem: str, payload: bytes, metadata: dict[str, Any], derived_from: str
) -> str:
    """Write ``stem``.onnx and its metadata as the converter does: each file whole (temp file + rename),
    the model first, so hot reload never reads half a file. Returns the model's sha256."""

    sha256 = hashlib.sha256(payload).hexdigest()
    conversion = {**metadata["conversion_info"], "onnx_sha256": sha256, "derived_from": derived_from}
    model_info = {**metadata["model_info"], "onnx_path": f"{stem}.onnx"}
    metadata = {**metadata, "model_info": model_info, "conversion_info": conversion}
    with atomic_target(folder / f"{stem}.onnx") as tmp:
        tmp.write_bytes(payload)
    with atomic_target(folder / f"{stem}{METADATA_SUFFIX}") as tmp:
        tmp.write_text(json.dumps(metadata, indent=2))
    return sha256


def shipped_config() -> dict[str, Any]:
    """The repository's config.yaml as plain data: what every benchmark serves unless told otherwise."""
    document: dict[str, Any] = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    return document


def write_config(path: Path, overrides: dict[str, dict[str, Any]]) -> Config:
    """The repository's config.yaml with per-section overrides, written to ``path`` and validated."""
    document = shipped_config()
    for section, values in overrides.items():
        document[section].update(values)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(path)


def serving_overrides(
    work: Path, args: argparse.Namespace, prefix: str | None = None
) -> dict[str, dict[str, Any]]:
    """What a benchmark's `run` sets: its files in ``work``, a broker that must be there (no embedded
    fallback), one agent per model, its topic ``prefix``, and the settings the command line asks for."""
    mqtt: dict[str, Any] = {"embedded_broker": "never"}
    if prefix is not None:
        mqtt["topic_prefix"] = prefix
    return {
        "training": {"model_save_path": str(work / "checkpoints")},
        "conversion": {"output_dir": str(work / "models")},
        "mqtt": mqtt,
        "runtime": {
            "model_dir": str(work / "models"),
            "assignment": "one_per_checkpoint",
            "http": {**shipped_config()["runtime"]["http"], "port": 0},
            **runtime_settings(args),
        },
    }


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving settings a benchmark run may change; by default it serves the shipped config.yaml."""
    parser.add_argument(
        "--threads", type=int, default=None, help="runtime.intra_op_threads (default: config.yaml's)"
    )
    parser.add_argument(
        "--cpu-pack-precision",
        choices=("auto", "fp32", "int8"),
        default=None,
        help="runtime.cpu_pack_precision (default: config.yaml's)",
    )
    parser.add_argument("--no-reload", action="store_true", help="runtime.hot_reload: false")
    parser.add_argument(
        "--no-select-models", action="store_true", help="runtime.select_models: false (the whole pack always)"
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """How a process-level benchmark runs: the wait for `run`, a kept work directory, the seed."""
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for `run`")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep logs (default: temp dir)")
    parser.add_argument("--seed", type=int, default=0)


def runtime_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `runtime` keys the command line changes (see :func:`add_setting_arguments`)."""
    settings: dict[str, Any] = {}
    if args.threads is not None:
        settings["intra_op_threads"] = args.threads
    if args.cpu_pack_precision is not None:
        settings["cpu_pack_precision"] = args.cpu_pack_precision
    if args.no_reload:
        settings["hot_reload"] = False
    if args.no_select_models:
        settings["select_models"] = False
    return settings


def changed_settings(overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The settings a run sets differently from the shipped config.yaml, as dotted keys (no paths)."""
    shipped = dict(_dotted(shipped_config()))
    return {
        key: value
        for key, value in _dotted(overrides)
        if key not in PLACEMENT_KEYS and shipped.get(key) != value
    }


def _dotted(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf: runtime.http.enabled, not the runtime.http table."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def announce_settings(what: str, changed: dict[str, Any]) -> None:
    """Say before a run which settings it changes from the shipped config.yaml (also in its JSON)."""
    listed = ", ".join(f"{key}={json.dumps(value)}" for key, value in changed.items()) or "none"
    print(f"... {what}; settings changed from config.yaml: {listed}", file=sys.stderr, flush=True)


def run_command(command: list[str], log: Path, timeout: float) -> ResourceSampler:
    """Run a command to completion with its output in ``log``; returns its wall time, CPU% and peak RSS."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    with ResourceSampler(process.pid) as usage:
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise HarnessError(
                f"`{' '.join(command)}` did not finish within {timeout:.0f} s:\n{tail(log)}"
            ) from None
    if code != 0:
        raise HarnessError(f"`{' '.join(command)}` exited {code}:\n{tail(log)}")
    return usage


def convert(checkpoints: Path, config: Path, output: Path, log: Path, timeout: float = 1800) -> float:
    """``blockmarket convert`` over a checkpoint folder; returns the wall time in seconds."""
    command = [*blockmarket(), "convert", "--model-path", str(checkpoints), "--config", str(config)]
    return run_command([*command, "--output-dir", str(output), "--no-progress"], log, timeout).wall_s


def converted_checkpoints(
    work: Path, overrides: dict[str, dict[str, Any]], count: int, seed: int
) -> tuple[Config, float]:
    """``count`` fresh checkpoints in ``work``/checkpoints, converted by `blockmarket convert` into
    ``work``/models; the config it ran with and its wall time in seconds."""
    config = work / "config-convert.yaml"
    setup = write_config(config, overrides)
    print(f"... writing and converting {count} checkpoints in {work}", file=sys.stderr, flush=True)
    write_checkpoints(work / "checkpoints", count, setup.environment.items_list, 128, seed)
    return setup, convert(work / "checkpoints", config, work / "models", work / "convert.log")


def tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({log} unreadable)"


@dataclass
class RuntimeProcess:
    """A ``blockmarket run`` child process and where its log goes."""

    process: subprocess.Popen[bytes]
    log: Path
    started_at: float  # perf_counter() just before the process was spawned

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise HarnessError(f"`blockmarket run` exited {self.process.returncode}:\n{tail(self.log)}")


@contextmanager
def running_runtime(config: Path, log: Path) -> Iterator[RuntimeProcess]:
    """``blockmarket run --config CONFIG`` for the duration of the block; stopped with SIGINT (its clean
    shutdown). Everything it serves with is in the config file."""
    command = [*blockmarket(), "run", "--config", str(config)]
    with log.open("w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    runtime = RuntimeProcess(process, log, started)
    try:
        yield runtime
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


async def wait_for_status(
    config: Config, runtime: RuntimeProcess, timeout: float, state: str
) -> dict[str, Any]:
    """The runtime's retained status once it says ``state`` (raises if the process dies first)."""
    topic = Topics(config.mqtt.topic_prefix).status
    deadline = time.perf_counter() + timeout
    async with aiomqtt.Client(config.mqtt.host, config.mqtt.port) as client:
        await client.subscribe(topic, qos=1)
        messages = aiter(client.messages)  # one iterator: a timed-out wait loses no message
        while time.perf_counter() < deadline:
            if state == "online":
                runtime.check_alive()
            try:
                message = await asyncio.wait_for(anext(messages), timeout=0.5)
            except TimeoutError:
                continue
            try:
                status = decode_status(bytes(message.payload), STATUS_LIMITS)
            except ProtocolError as exc:
                raise HarnessError(f"{topic}: unreadable runtime status ({exc})") from None
            if status["state"] == state:
                return status
    raise HarnessError(f"no {state!r} status on {topic} within {timeout:.0f} s:\n{tail(runtime.log)}")


class ResourceSampler:
    """CPU% (average over the window, 100 = one core), peak RSS and RSS over time (``samples``) of one
    process, sampled on a thread every ``interval_s``.

    A process that exits inside the window keeps the figures of its last sample.
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._gone = (psutil.NoSuchProcess, psutil.ZombieProcess)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=f"sample-{pid}", daemon=True)
        self._cpu_start = self._cpu_last = 0.0
        self.started_at = 0.0  # perf_counter() when the window opened
        self.samples: list[tuple[float, int]] = []  # (seconds since the window opened, RSS bytes)
        self.peak_rss = 0
        self.cpu_percent = 0.0
        self.wall_s = 0.0

    def _read(self) -> bool:
        """Take one sample; False once the process is gone."""
        try:
            with self._process.oneshot():
                times, rss = self._process.cpu_times(), self._process.memory_info().rss
        except self._gone:
            return False
        self._cpu_last = float(times.user + times.system)
        self.peak_rss = max(self.peak_rss, rss)
        self.samples.append((time.perf_counter() - self.started_at, rss))
        return True

    def _sample(self) -> None:
        while not self._stop.wait(self._interval) and self._read():
            pass

    def __enter__(self) -> ResourceSampler:
        self.started_at = time.perf_counter()
        self._read()
        self._cpu_start = self._cpu_last
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        self.wall_s = time.perf_counter() - self.started_at
        self.cpu_percent = 100.0 * (self._cpu_last - self._cpu_start) / max(self.wall_s, 1e-9)
