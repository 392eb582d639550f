"""Helpers for the serving tests: converted-looking models, configs, a runtime process, a game client.

Models are small TradingNetwork-shaped ONNX graphs written with onnx.helper.

The models have the converter's layout (Gemm/Relu layers, head -> Softplus + 0.1, input `state_vector`,
output `trading_matrix`) and a `<key>_metadata.json` next to them, so the runtime serves them exactly as
converted checkpoints, without torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper

from blockmarket.core.config import MqttConfig, RuntimeConfig, dump_default_config, load_config
from blockmarket.core.state import state_dim
from blockmarket.models.files import discover_models
from blockmarket.simulator.roster import same_runtime
from blockmarket.wire.limits import Limits
from blockmarket.wire.messages import MarketTick, MatricesMessage, RosterMessage, encode_tick
from blockmarket.wire.protocol import decode_matrices, decode_roster, decode_status, decode_tick
from blockmarket.wire.topics import Topics
from blockmarket.wire.transport import MqttLink
from runtime.agents import AgentPopulation, create_population
from tests.support.broker import SHARED_HOST, SHARED_PORT
from tests.support.wire import LinkedClient, wait_until

ITEMS = ("diamond", "gold", "apple", "emerald", "redstone")
REPO = Path(__file__).resolve().parents[2]
Weights = list[npt.NDArray[np.float32]]
BIG_HIDDEN = 7000  # the `big_model` fixture's width: 61x7000 + 7000x7000 + 7000x25 fp32 weights, 197 MB


def trading_weights(seed: int, num_items: int = len(ITEMS), hidden: int = 16, layers: int = 3) -> Weights:
    """[W, b] per layer in nn.Linear layout (W [out, in]); the head gives n^2 outputs."""
    rng = np.random.default_rng(seed)
    dims = [state_dim(num_items), *([hidden] * layers), num_items * num_items]
    weights: Weights = []
    for fan_in, fan_out in itertools.pairwise(dims):
        weights.append((rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32))
        weights.append((0.1 * rng.standard_normal(fan_out)).astype(np.float32))
    return weights


def reference_forward(weights: Weights, states: np.ndarray) -> np.ndarray:
    """The TradingNetwork forward pass in float64 numpy: ReLU MLP, softplus(head) + 0.1."""
    hidden = states.astype(np.float64)
    for layer in range(0, len(weights), 2):
        hidden = hidden @ weights[layer].T.astype(np.float64) + weights[layer + 1]
        if layer + 2 < len(weights):
            hidden = np.maximum(hidden, 0.0)
    return np.logaddexp(0.0, hidden) + 0.1


def runaway_weights(trigger: float) -> Weights:
    """A TradingNetwork that is tame on every validation state but overflows to inf when the market rate
    of (diamond -> gold) exceeds ``trigger``: a model the output guard must catch at serving time."""
    weights = trading_weights(7)
    market_entry = 2 * len(ITEMS) + len(ITEMS) ** 2 + 1
    w0, b0, w1, b1, w2, b2, head, _ = weights
    w0[0], b0[0] = 0.0, -trigger
    w0[0, market_entry] = 1.0  # unit 0 = relu(rate - trigger): 0 on every realistic state (rates <= 5)
    w1[0], w1[:, 0], b1[0] = 0.0, 0.0, 0.0
    w1[0, 0] = 1e30
    w2[0], w2[:, 0], b2[0] = 0.0, 0.0, 0.0
    w2[0, 0] = 1e30  # overflows float32
    head[:, 0] = 1.0
    return weights


def trading_model(weights: Weights, batch: int | str = "batch") -> onnx.ModelProto:
    """The ONNX graph the converter exports for a TradingNetwork (dynamic or static batch)."""
    nodes, inits = [], []
    value = "state_vector"
    layers = len(weights) // 2
    for layer in range(layers):
        w, b = f"w{layer}", f"b{layer}"
        inits += [
            numpy_helper.from_array(weights[2 * layer], w),
            numpy_helper.from_array(weights[2 * layer + 1], b),
        ]
        nodes.append(helper.make_node("Gemm", [value, w, b], [f"gemm{layer}"], transB=1))
        value = f"gemm{layer}"
        if layer < layers - 1:
            nodes.append(helper.make_node("Relu", [value], [f"relu{layer}"]))
            value = f"relu{layer}"
    inits.append(numpy_helper.from_array(np.array(0.1, dtype=np.float32), "floor"))
    nodes.append(helper.make_node("Softplus", [value], ["softplus"]))
    nodes.append(helper.make_node("Add", ["softplus", "floor"], ["trading_matrix"]))
    graph = helper.make_graph(
        nodes,
        "trading_network",
        [helper.make_tensor_value_info("state_vector", TensorProto.FLOAT, [batch, weights[0].shape[1]])],
        [helper.make_tensor_value_info("trading_matrix", TensorProto.FLOAT, [batch, weights[-1].shape[0]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def write_model(
    model_dir: Path,
    key: str,
    weights: Weights,
    *,
    items: tuple[str, ...] = ITEMS,
    desired_item: str | None = None,
    agent_id: str | None = None,
    variants: Sequence[tuple[int, Weights]] = (),
) -> Path:
    """`<key>.onnx` + `<key>_metadata.json` as the converter writes them; returns the metadata path."""
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / f"{key}.onnx"
    onnx.save_model(trading_model(weights), str(onnx_path))
    variant_info = []
    for batch, variant_weights in variants:
        name = f"{key}_fp32_b{batch}.onnx"
        onnx.save_model(trading_model(variant_weights, batch=batch), str(model_dir / name))
        variant_info.append({"onnx_path": name, "precision": "fp32", "batch_size": batch, "passed": True})
    meta = model_metadata(
        key,
        int(weights[0].shape[0]),
        items=items,
        agent_id=agent_id,
        desired_item=desired_item,
        variants=variant_info,
        onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    )
    path = model_dir / f"{key}_metadata.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


def model_metadata(
    key: str,
    hidden_dim: int,
    *,
    items: tuple[str, ...] = ITEMS,
    agent_id: str | None = None,
    desired_item: str | None = None,
    variants: Sequence[dict[str, object]] = (),
    onnx_sha256: str | None = None,
) -> dict[str, Any]:
    """The converter's `<key>_metadata.json` content for `<key>.onnx` (no `conversion_info` without a
    sha256: what the original converter wrote)."""
    n = len(items)
    meta: dict[str, Any] = {
        "model_info": {
            "onnx_path": f"{key}.onnx",
            "model_type": "TradingNetwork",
            "input_dim": state_dim(n),
            "output_dim": n * n,
            "items_list": list(items),
            "hidden_dim": hidden_dim,
        },
        "agent_info": {"agent_id": agent_id, "desired_item": desired_item},
        "npu_optimization": {"variants": list(variants)},
    }
    if onnx_sha256 is not None:
        meta["conversion_info"] = {"onnx_sha256": onnx_sha256}
    return meta


def write_config(path: Path, **sections: Mapping[str, object]) -> Path:
    """A complete config file: the built-in defaults with some keys of some sections replaced."""
    data = dump_default_config()
    data["mqtt"].update(host=SHARED_HOST, port=SHARED_PORT)  # the shared test broker unless replaced
    data["runtime"]["http"]["port"] = 0  # tests run side by side: an ephemeral port each, unless given
    data["dashboard"]["port"] = 0
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def python_module(
    module: str, *argv: str, cwd: Path = REPO, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> ...` in a fresh interpreter importing this checkout, run in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def serving_config(
    tmp_path: Path, model_dir: Path, prefix: str, mqtt: dict[str, object] | None = None, **runtime: object
) -> Path:
    """`tmp_path/config.yaml` for a `blockmarket run` process serving ``model_dir`` on the CPU EP under a
    test's own topic prefix, converting nothing; ``runtime`` and ``mqtt`` keys replace the defaults."""
    defaults = {
        "model_dir": str(model_dir),
        "convert_on_startup": False,
        "status_interval_s": 0.5,
        "cpu_pack_precision": "fp32",  # answers equal an fp32 recomputation (OfflineMarket.check)
    }
    return write_config(
        tmp_path / "config.yaml",
        runtime={**defaults, **runtime},
        training={"model_save_path": str(tmp_path / "no-checkpoints")},
        mqtt={"topic_prefix": prefix, **(mqtt or {})},
        npu={"enabled": False},
    )


def runtime_process(
    config: Path, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`blockmarket run --config CONFIG` in its own process (stdout/stderr to ``log_path``)."""
    command = [sys.executable, "-m", "blockmarket.cli", "run", "--config", str(config)]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM (what an operator's supervisor sends), then the exit code; SIGKILL only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    return int(process.returncode)


@contextmanager
def running(config: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`blockmarket run` for the block; it must stop cleanly (exit 0) on SIGTERM afterwards."""
    process = runtime_process(config, tmp_path / "run.log")
    try:
        yield process
    finally:
        code = stop_process(process)
        assert code == 0, (tmp_path / "run.log").read_text()[-3000:]


class TickingClient(LinkedClient):
    """A game server in a test: sends ticks on ``topics.tick`` (protocol ``version``), records them and
    waits for their answers."""

    version = 1
    topics: Any
    sent: dict[int, MarketTick]
    answers: dict[int, MatricesMessage]

    async def send(self, tick: MarketTick) -> None:
        self.sent[tick.tick] = tick
        payload = encode_tick(tick, self.version)
        assert await self.link.publish(self.topics.tick, payload), "tick not published"

    async def send_raw(self, payload: bytes) -> None:
        assert await self.link.publish(self.topics.tick, payload)

    async def answer(self, number: int, timeout: float = 10.0) -> MatricesMessage:
        await wait_until(lambda: number in self.answers, timeout, f"the answer to tick {number}")
        return self.answers[number]


class GameClient(TickingClient):
    """The game-server side in a test: publishes ticks, records them and the runtime's answers, status and
    roster."""

    def __init__(self, mqtt: MqttConfig, num_items: int, record_ticks: bool = False) -> None:
        self.topics = Topics(mqtt.topic_prefix)
        self.limits = Limits.from_config(mqtt, num_agents=None, num_items=num_items)  # any roster
        self.sent: dict[int, MarketTick] = {}
        self.answers: dict[int, MatricesMessage] = {}
        self.status: dict[str, Any] = {}
        self.roster: RosterMessage | None = None
        subscriptions = {
            self.topics.matrices: self._on_matrices,
            self.topics.status: self._on_status,
            self.topics.roster: self._on_roster,
        }
        if record_ticks:  # another process (the simulator) plays the game: record what it sends
            subscriptions[self.topics.tick] = self._on_tick
        self.link = MqttLink(mqtt, client_id=f"test-game-{uuid.uuid4().hex[:8]}", subscriptions=subscriptions)

    def _on_matrices(self, payload: bytes, *_: object) -> None:
        msg = decode_matrices(payload, self.limits)
        self.answers[msg.tick] = msg

    def _on_tick(self, payload: bytes, *_: object) -> None:
        tick = decode_tick(payload, self.limits)
        self.sent[tick.tick] = tick

    def _on_status(self, payload: bytes, *_: object) -> None:
        self.status = decode_status(payload, self.limits)

    def _on_roster(self, payload: bytes, *_: object) -> None:
        self.roster = decode_roster(payload, self.limits) if payload else None

    async def online(self, timeout: float = 60.0) -> dict[str, Any]:
        """The retained status once the runtime is online and its roster (the agent ids) has arrived."""
        await wait_until(self._online, timeout, "the runtime's online status and roster")
        return self.status

    def _online(self) -> bool:
        roster, status = self.roster, self.status
        return status.get("state") == "online" and roster is not None and same_runtime(roster, status)

    @property
    def agent_ids(self) -> tuple[str, ...]:
        assert self.roster is not None, "no roster yet: await online() first"
        return self.roster.agent_ids

    def tick(self, number: int, seed: int = 0, market_mean: bool = False) -> MarketTick:
        ids = self.agent_ids
        rng = np.random.default_rng(seed * 100_003 + number)
        n = len(self.status["items"])
        successful = rng.integers(0, 5, size=len(ids))
        return MarketTick(
            tick=number,
            sent_at=time.time(),
            agent_ids=ids,
            inventory=rng.integers(0, 30, size=(len(ids), n)).astype(np.float32),
            successful=successful.astype(np.float32),
            attempted=(successful + rng.integers(0, 6, size=len(ids))).astype(np.float32),
            market_mean=rng.uniform(0.2, 5.0, size=(n, n)).astype(np.float32) if market_mean else None,
        )


class OfflineMarket:
    """Recomputes the runtime's answers from the recorded ticks with plain CPU sessions, per model group."""

    @classmethod
    def check(cls, config_path: Path, game: GameClient) -> int:
        """Replay the answered ticks in order; every answer must equal the recomputation. Returns how many."""
        config = load_config(config_path)
        market = cls(
            config.model_dir,
            config.runtime,
            config.environment.items_list,
            config.learning.matrix_update_rate,
        )
        for number in sorted(game.answers):  # a tick the runtime skipped never touched its state
            answer = game.answers[number]
            expected = market.step(game.sent[number])
            assert answer.agent_ids == game.sent[number].agent_ids
            np.testing.assert_allclose(
                answer.matrices, expected, rtol=1e-4, atol=1e-5, err_msg=f"tick {number}"
            )
        return len(game.answers)

    @classmethod
    def check_int8(cls, config_path: Path, game: GameClient, tolerance: tuple[float, float]) -> int:
        """Each answer against one fp32 step from the runtime's previous answer: an int8 pack's output may
        differ by (atol, rtol), which the update rule scales by alpha. Returns how many were checked."""
        config = load_config(config_path)
        market = cls(
            config.model_dir,
            config.runtime,
            config.environment.items_list,
            config.learning.matrix_update_rate,
        )
        atol, rtol = tolerance
        for number in sorted(game.answers):
            answer, tick = game.answers[number], game.sent[number]
            rows = market.population.rows_for(tick.agent_ids)
            expected = market.step(tick)
            allowed = market.alpha * (atol + rtol * market.proposals[rows].reshape(expected.shape)) + 1e-5
            assert (np.abs(answer.matrices - expected) <= allowed).all(), f"tick {number}"
            market.population.matrices[rows] = answer.matrices  # the next step starts where the runtime is
        return len(game.answers)

    def __init__(self, model_dir: Path, runtime: RuntimeConfig, items: tuple[str, ...], alpha: float) -> None:
        self.models, _ = discover_models(model_dir, items)
        self.runtime, self.items = runtime, items
        self.restart()
        self.sessions = {m.key: ort.InferenceSession(str(m.onnx_path)) for m in self.models}
        self.groups = self.population.groups()
        self.alpha = alpha

    def restart(self) -> None:
        """The agents as the runtime starts them (seeded), sessions kept."""
        runtime = self.runtime
        self.population = create_population(
            self.models,
            self.items,
            num_agents=runtime.num_agents,
            assignment=runtime.assignment,
            seed=runtime.seed,
        )

    def step(self, tick: MarketTick) -> np.ndarray:
        matrices, self.proposals, self.refused = offline_step(
            self.population, self.sessions, tick, self.alpha, self.groups
        )  # refused: the output guard's rows
        return matrices


def offline_step(
    pop: AgentPopulation,
    sessions: Mapping[str, ort.InferenceSession],
    tick: MarketTick,
    alpha: float,
    groups: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One tick recomputed with plain CPU sessions, one per model group: the ticked agents' new matrices
    (a copy), every agent's proposals and the rows the output guard refused."""
    rows = pop.rows_for(tick.agent_ids)
    pop.observe(rows, tick.inventory, tick.successful, tick.attempted)
    states = pop.states(tick.market_mean)
    proposals = np.empty((len(pop), pop.num_items**2), dtype=np.float32)
    for key, group in (pop.groups() if groups is None else groups).items():
        proposals[group] = sessions[key].run(None, {"state_vector": states[group]})[0]
    matrices, refused = pop.update(rows, proposals, alpha)
    return matrices.copy(), proposals, refused


class CpuPressure:
    """Whether the machine was short of CPU while the block ran (tasks kept waiting for a core).

    Linux PSI (/proc/pressure/cpu, "some"): the share of wall time at least one task waited for a CPU.
    Without PSI, a 1-minute load average above the core count counts as overloaded.
    """

    PSI = Path("/proc/pressure/cpu")
    OVERLOADED = 0.05  # an idle machine running a test measures ~2% here, two busy loops on two cores ~14%

    def __init__(self) -> None:
        self.fraction: float | None = None
        self._start = (0.0, 0.0)

    def _stalled_s(self) -> float:
        some = self.PSI.read_text().splitlines()[0]  # "some avg10=.. avg60=.. avg300=.. total=<us>"
        return int(some.rsplit("total=", 1)[1]) / 1e6

    def __enter__(self) -> CpuPressure:
        if self.PSI.exists():
            self._start = (self._stalled_s(), time.monotonic())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.PSI.exists():
            stalled, started = self._start
            self.fraction = (self._stalled_s() - stalled) / (time.monotonic() - started)

    @property
    def overloaded(self) -> bool:
        if self.fraction is None:
            return os.getloadavg()[0] > (os.cpu_count() or 1)
        return self.fraction > self.OVERLOADED

    def __str__(self) -> str:
        if self.fraction is None:
            return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        return f"tasks waited for a CPU {self.fraction:.1%} of the time"


def check_matrices(matrices: np.ndarray, count: int, num_items: int) -> None:
    """What every answer must satisfy: shape, finite, diagonal 1, within [0.1, 10]."""
    assert matrices.shape == (count, num_items, num_items)
    assert np.isfinite(matrices).all()
    assert (np.diagonal(matrices, axis1=1, axis2=2) == 1.0).all()
    assert matrices.min() >= 0.1 - 1e-7 and matrices.max() <= 10.0 + 1e-6


class RecordingPublisher:
    """The outbound half of a transport that keeps what it is given (a TickScheduler's publisher)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.agent_messages: list[tuple[str, bytes]] = []
        self.market_messages: list[tuple[str, bytes]] = []

    async def publish_matrices(self, payload: bytes) -> bool:
        self.messages.append(payload)
        return True

    async def publish_agent_matrix(self, agent_id: str, payload: bytes) -> bool:
        self.agent_messages.append((agent_id, payload))
        return True

    async def publish_answer(self, topic: str, payload: bytes, reply_to: tuple[str, bytes] | None) -> bool:
        self.market_messages.append((topic, payload))
        return True

    def decoded(self) -> list[MatricesMessage]:
        limits = Limits(max_payload_bytes=64 * 1024, num_items=len(ITEMS))
        return [decode_matrices(p, limits) for p in self.messages]
