"""The session pool: every agent's model served with one inference call per model group per tick.

Agents sharing a model share one batched session. When the population needs more models than
``runtime.max_sessions`` allows, the distinct-weight models of one architecture are served through a
*population pack* (runtime.pack): one static-shape graph holding one weight set per model, each
evaluated on the rows of that model's agents, so all of them take one call.

What serves a tick is an immutable :class:`PoolGeneration`. Sessions are built and validated off the
event loop; a new generation replaces the old one by a single reference assignment on the loop thread,
so each tick runs entirely on one generation and a swap always falls between two ticks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from runtime.agents import AgentPopulation, groups_of
from runtime.config import NpuConfig
from runtime.models import MATRIX_OUTPUT, ModelInfo, sha256_file
from runtime.state import FloatArray, IntArray, realistic_states

log = logging.getLogger(__name__)

PACK_DIR = ".packs"  # under the model directory; the reload watcher only looks at top-level files
VALIDATION_SEED = 20240601
# (atol, rtol) of a pack against its models run alone: CPU fp32, CPU int8 weights, HTP fp16 (docs/npu.md)
PACK_TOLERANCE = {"cpu": (1e-5, 1e-4), "cpu_int8": (1e-1, 5e-2), "npu": (3e-2, 2e-2)}

# (model file, prefer the NPU) -> (an onnxruntime-like session, the EP(s) running it)
SessionFactory = Callable[[Path, bool], tuple[Any, str]]
PackPrecision = Literal["fp32", "int8"]  # the weights a pack stores
PackChoice = Literal["auto", "fp32", "int8"]  # runtime.cpu_pack_precision: auto = int8 where it validates


class PoolError(RuntimeError):
    """The models cannot be served as configured (the message says which and why)."""


def default_session_factory(
    npu: NpuConfig, intra_op_threads: int, allow_spinning: bool = False
) -> SessionFactory:
    """Serving sessions from runtime.providers: the QNN HTP NPU when the model can run there, else CPU."""
    from runtime.providers import create_session

    def make(path: Path, prefer_npu: bool) -> tuple[Any, str]:
        session, placement = create_session(
            path,
            npu,
            prefer_npu=prefer_npu,
            intra_op_threads=intra_op_threads,
            allow_spinning=allow_spinning,
        )
        return session, placement.provider

    return make


@dataclass(frozen=True)
class InferenceUnit:
    """One live session and the population rows it answers for (a model group or a pack)."""

    name: str
    rows: IntArray  # ascending population rows, in the session's input row order
    row_keys: tuple[str, ...]  # the model key of each of those rows
    models: Mapping[str, ModelInfo]  # model key -> the version this unit was built from
    session: Any
    provider: str
    model_path: Path
    batch_size: int | None  # static batch of the session's input; None = dynamic
    slots: IntArray | None = None  # input row of each agent row in a static batch (None: the first M)
    pack_weights: PackPrecision | None = None  # a pack's stored weights (int8: runtime.cpu_pack_precision)
    input_name: str = field(init=False)
    output_name: str = field(init=False)

    def __post_init__(self) -> None:
        outputs = [o.name for o in self.session.get_outputs()]
        object.__setattr__(self, "input_name", self.session.get_inputs()[0].name)
        object.__setattr__(self, "output_name", MATRIX_OUTPUT if MATRIX_OUTPUT in outputs else outputs[0])

    def run(self, states: FloatArray) -> FloatArray:
        """Proposed matrices [M, n^2] for the unit's M agents' states [M, D]; called off the loop thread."""
        if self.batch_size is None or (self.slots is None and self.batch_size == len(states)):
            return np.asarray(self.session.run([self.output_name], {self.input_name: states})[0])
        slots = np.arange(len(states)) if self.slots is None else self.slots
        padded = np.zeros((self.batch_size, states.shape[1]), dtype=np.float32)
        padded[slots] = states
        return np.asarray(self.session.run([self.output_name], {self.input_name: padded})[0])[slots]


@dataclass(frozen=True)
class PoolGeneration:
    """The units serving ticks right now; replaced as a whole, never mutated."""

    number: int
    units: tuple[InferenceUnit, ...]

    @property
    def versions(self) -> dict[str, str]:
        return {key: info.version for unit in self.units for key, info in unit.models.items()}

    @property
    def providers(self) -> list[str]:
        return sorted({unit.provider for unit in self.units})

    def describe(self) -> str:
        return ", ".join(
            f"{u.name} ({len(u.rows)} agents, {u.provider}"
            + (f", {u.pack_weights} weights)" if u.pack_weights else ")")
            for u in self.units
        )


@dataclass(frozen=True)
class UnitPlan:
    """What one session will serve: its rows and the models behind them (one model, or a pack)."""

    name: str
    rows: IntArray
    row_keys: tuple[str, ...]
    models: Mapping[str, ModelInfo]

    @property
    def is_pack(self) -> bool:
        return self.name.startswith("pack:")

    def served_by(self, unit: InferenceUnit | None) -> bool:
        """True when ``unit`` already serves exactly this plan (same rows, models, versions and variants)."""
        return (
            unit is not None
            and np.array_equal(unit.rows, self.rows)
            and unit.row_keys == self.row_keys
            and {k: (m.version, m.variants) for k, m in unit.models.items()}
            == {k: (m.version, m.variants) for k, m in self.models.items()}
        )


def plan_units(
    model_keys: Sequence[str], models: Mapping[str, ModelInfo], max_sessions: int
) -> list[UnitPlan]:
    """One session per model while that fits in max_sessions, else one population pack per architecture.

    ``model_keys`` is the model of each population row.
    """
    groups = groups_of(model_keys)
    keys_of = np.asarray(model_keys)
    missing = sorted(set(groups) - set(models))
    if missing:
        raise PoolError(f"agents are assigned to unknown models: {', '.join(missing)}")
    if len(groups) <= max_sessions:
        return [UnitPlan(key, rows, (key,) * len(rows), {key: models[key]}) for key, rows in groups.items()]
    by_arch: dict[tuple[str, int, int | None, int], list[str]] = {}
    for key in groups:
        by_arch.setdefault(models[key].architecture, []).append(key)
    if len(by_arch) > max_sessions:
        raise PoolError(
            f"{len(groups)} models of {len(by_arch)} architectures need more than runtime.max_sessions="
            f"{max_sessions} sessions; raise it or assign fewer distinct models"
        )
    plans = []
    for (model_type, input_dim, *_), keys in by_arch.items():
        rows = np.sort(np.concatenate([groups[k] for k in keys]))
        name = f"pack:{model_type}-{input_dim}x{len(rows)}"
        plans.append(UnitPlan(name, rows, tuple(map(str, keys_of[rows])), {k: models[k] for k in keys}))
    return plans


class SessionPool:
    """Builds, validates, serves and atomically swaps the inference units of one population."""

    def __init__(
        self,
        population: AgentPopulation,
        models: Mapping[str, ModelInfo],
        *,
        factory: SessionFactory,
        max_sessions: int,
        model_dir: Path,
        use_npu: bool = False,
        cpu_pack_precision: PackChoice = "auto",
    ) -> None:
        self.population = population
        self.models = dict(models)
        self.factory = factory
        self.max_sessions = max_sessions
        self.model_dir = model_dir
        self.use_npu = use_npu
        self.cpu_pack_precision = cpu_pack_precision
        self.executor = ThreadPoolExecutor(max_workers=max_sessions, thread_name_prefix="inference")
        self.current = PoolGeneration(0, ())
        self.reload_failures = 0
        self.on_unit_run: Callable[[str, float], None] | None = None  # unit name, seconds (runtime.metrics)
        # model key -> why its new version failed to swap in. In a pack that may be another member's broken
        # file (a pack is rebuilt from every member's file): the reloader tries them again with later changes
        self.refused: dict[str, str] = {}
        self._swap_lock = asyncio.Lock()
        self._builder: ProcessPoolExecutor | None = None
        self._builder_lock = threading.Lock()

    async def start(self) -> PoolGeneration:
        """Build and validate every unit off the loop, then start serving with them."""
        plans = await self._plan(self.population.model_keys, self.models)
        self.current = PoolGeneration(1, tuple(await self._build(plans)))
        log.info("session pool generation 1: %s", self.current.describe())
        return self.current

    async def infer(self, states: FloatArray, generation: PoolGeneration | None = None) -> FloatArray:
        """Proposals [N, n^2] for all agents: one call per unit, units concurrently, off the loop thread.

        ``generation`` (default: the current one) is what the caller reports as having served the tick.
        """
        units = (generation or self.current).units
        loop = asyncio.get_running_loop()
        if len(units) == 1 and len(units[0].rows) == len(states):
            return await loop.run_in_executor(self.executor, self._run, units[0], states)
        outputs = await asyncio.gather(
            *(loop.run_in_executor(self.executor, self._run, unit, states[unit.rows]) for unit in units)
        )
        proposals = np.empty((len(states), outputs[0].shape[1]), dtype=np.float32)
        for unit, out in zip(units, outputs, strict=True):
            proposals[unit.rows] = out
        return proposals

    def _run(self, unit: InferenceUnit, states: FloatArray) -> FloatArray:
        """One unit's inference on an executor thread, timed for the metrics when they are on."""
        if self.on_unit_run is None:
            return unit.run(states)
        start = time.perf_counter()
        out = unit.run(states)
        self.on_unit_run(unit.name, time.perf_counter() - start)
        return out

    async def reload(self, changed: Mapping[str, ModelInfo]) -> bool:
        """Serve new versions of some models: the units using them are rebuilt, the others kept."""
        return await self._in_parts(changed, None)

    async def add_agents(self, newcomers: AgentPopulation, models: Mapping[str, ModelInfo]) -> bool:
        """Serve new agents (new checkpoints) from the next tick on; existing agents keep their state."""
        return await self._in_parts(models, newcomers)

    async def _in_parts(self, models: Mapping[str, ModelInfo], newcomers: AgentPopulation | None) -> bool:
        """Swap in all these models at once; if that fails, each model alone, so one that cannot serve
        (counted in reload_failures, logged) never holds back the others. The current generation keeps
        serving whatever fails."""
        what = ", ".join(f"{key}@{info.version}" for key, info in models.items())
        if newcomers is not None:
            what = f"new agents {', '.join(newcomers.agent_ids)} ({what})"
        try:
            swapped = await self._replan(models, newcomers, what)
        except Exception as exc:
            if len(models) == 1:
                self._refuse(models, what, exc)
                return False
            log.warning("hot reload of %s failed (%s); trying each model alone", what, exc)
        else:
            for key in models:
                self.refused.pop(key, None)
            return swapped
        parts = [
            await self._in_parts({key: info}, newcomers.only({key}) if newcomers is not None else None)
            for key, info in models.items()
        ]
        return any(parts)

    def _refuse(self, model: Mapping[str, ModelInfo], what: str, exc: Exception) -> None:
        """Count and log a model's failure once: a retry failing the same way says nothing new."""
        ((key, info),) = model.items()
        reason, before = f"{info.version}: {exc}", self.refused.get(key)
        self.refused[key] = reason
        if reason == before:
            log.debug("hot reload of %s failed again: %s", what, exc)
            return
        self.reload_failures += 1
        log.error("hot reload of %s failed, the previous version keeps serving: %s", what, exc)

    async def _replan(
        self, changed: Mapping[str, ModelInfo], newcomers: AgentPopulation | None, what: str
    ) -> bool:
        """Plan the units for this roster; build and validate the ones that differ off the loop; swap.

        Raises what building or validating raised, the current generation still serving. Roster and
        units change together with no await in between, so the swap falls between two ticks.
        """
        async with self._swap_lock:
            old = self.current
            model_keys = self.population.model_keys + (newcomers.model_keys if newcomers is not None else ())
            models = {**self.models, **changed}
            plans = await self._plan(model_keys, models)
            serving = {unit.name: unit for unit in old.units}
            todo = [plan for plan in plans if not plan.served_by(serving.get(plan.name))]
            if not todo and newcomers is None:
                self.models = models  # e.g. a new desired item in the metadata: nothing to rebuild
                return False
            fresh = {unit.name: unit for unit in await self._build(todo)}
            if newcomers is not None:
                self.population.extend(newcomers)
            self.models = models
            self.current = PoolGeneration(
                old.number + 1, tuple(fresh.get(p.name) or serving[p.name] for p in plans)
            )
            log.info(
                "hot reload: generation %d serves %s (%s)", self.current.number, what, self.current.describe()
            )
            return True

    async def _plan(self, model_keys: Sequence[str], models: Mapping[str, ModelInfo]) -> list[UnitPlan]:
        """plan_units on a thread: grouping 10,000 agents by model is too long a pause for the loop."""
        return await asyncio.to_thread(plan_units, model_keys, models, self.max_sessions)

    async def _build(self, plans: Sequence[UnitPlan]) -> list[InferenceUnit]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(None, self.build_unit, p) for p in plans)))

    def close(self) -> None:
        """Stop the inference threads and the pack builder (the sessions go with the last generation)."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        with self._builder_lock:
            if self._builder is not None:
                self._builder.shutdown(wait=True, cancel_futures=True)
                self._builder = None

    def build_unit(self, plan: UnitPlan) -> InferenceUnit:
        """Create and warm one session (blocking: run it in an executor), validated before it can serve.

        A CPU pack under ``cpu_pack_precision: auto`` is tried with int8 weights first; a pack that fails
        the per-agent check on this CPU's kernels is served with fp32 weights instead (logged).
        """
        if not plan.is_pack:
            path, prefer_npu = self._model_file(next(iter(plan.models.values())), len(plan.rows))
            return self._validated_unit(plan, path, prefer_npu, None, None)
        slots, per_model = pack_slots(plan)
        if self.use_npu:  # NPU packs: the fp32 conv form
            return self._validated_unit(plan, self._pack_file(plan, per_model, "fp32"), True, slots, "fp32")
        if self.cpu_pack_precision != "auto":
            weights = self.cpu_pack_precision
            return self._validated_unit(
                plan, self._pack_file(plan, per_model, weights), False, slots, weights
            )
        try:
            return self._validated_unit(plan, self._pack_file(plan, per_model, "int8"), False, slots, "int8")
        except PoolError as exc:
            log.warning(
                "%s; serving %s with fp32 pack weights instead (runtime.cpu_pack_precision: auto)",
                exc,
                plan.name,
            )
            return self._validated_unit(plan, self._pack_file(plan, per_model, "fp32"), False, slots, "fp32")

    def _validated_unit(
        self,
        plan: UnitPlan,
        path: Path,
        prefer_npu: bool,
        slots: IntArray | None,
        weights: PackPrecision | None,
    ) -> InferenceUnit:
        session, provider = self.factory(path, prefer_npu)
        for info in plan.models.values():
            if path == info.onnx_path:  # the session read the file: was it still this version?
                _check_version(info)
        static = _static_batch(session)
        if static is not None and static < len(plan.rows):
            raise PoolError(f"{path}: static batch {static} is smaller than its {len(plan.rows)} agents")
        unit = InferenceUnit(
            plan.name, plan.rows, plan.row_keys, plan.models, session, provider, path, static, slots, weights
        )
        states, out = validate_unit(unit, self.population.num_items)
        if plan.is_pack:
            self._check_pack(unit, states, out)
        return unit

    def _check_pack(self, unit: InferenceUnit, states: FloatArray, out: FloatArray) -> None:
        """Each agent row of a pack must match its fp32 model run alone on CPU (docs/npu.md tolerances)."""
        on_cpu = "cpu_int8" if unit.pack_weights == "int8" else "cpu"
        atol, rtol = PACK_TOLERANCE["npu" if "QNN" in unit.provider else on_cpu]
        keys = np.asarray(unit.row_keys)
        for key, info in unit.models.items():
            rows = np.flatnonzero(keys == key)
            alone = ort.InferenceSession(str(info.onnx_path), providers=["CPUExecutionProvider"])
            reference = alone.run(None, {alone.get_inputs()[0].name: states[rows]})[0]
            error = np.abs(out[rows] - reference)
            if (error > atol + rtol * np.abs(reference)).any():
                raise PoolError(
                    f"{unit.model_path}: pack rows of {info.onnx_path.name} differ from the model run alone "
                    f"(max abs error {float(error.max()):.3g} > atol {atol} + rtol {rtol})"
                )

    def _model_file(self, info: ModelInfo, agents: int) -> tuple[Path, bool]:
        """An NPU variant whose static batch holds the whole group (one call per tick), else the fp32 model.

        Without a fitting variant the fp32 model still asks for the NPU when serving there, so that
        runtime.providers explains why it lands on CPU (or refuses, with npu.require_npu).
        """
        fitting = [v for v in info.variants if v.batch_size >= agents and v.path.is_file()]
        if self.use_npu and fitting:
            best = min(fitting, key=lambda v: v.batch_size)
            return best.path, True
        return info.onnx_path, self.use_npu

    def _pack_file(self, plan: UnitPlan, per_model: int, precision: PackPrecision) -> Path:
        """Build (or reuse) the pack of the plan's models, ``per_model`` rows each, named by versions
        (content hashes, so a replaced model never reuses a pack of its old weights)."""
        from runtime.pack import PackForm, write_pack

        form: PackForm = "conv" if self.use_npu else "matmul_int8" if precision == "int8" else "matmul"
        versions = [f"{k}@{info.version}" for k, info in plan.models.items()]
        digest = hashlib.sha256("|".join([form, str(per_model), *versions]).encode()).hexdigest()[:16]
        path = self.model_dir / PACK_DIR / f"pack-{form}-{len(versions)}x{per_model}-{digest}.onnx"
        if not path.is_file():
            sources = [(info.onnx_path, info.version) for info in plan.models.values()]
            builder = self._pack_builder()
            try:
                builder.submit(write_pack, sources, path, form, per_model).result()
            except BrokenProcessPool:
                with self._builder_lock:
                    self._builder = None  # the next pack gets a new worker
                raise PoolError(f"{path}: the pack builder process died (out of memory?)") from None
        return path

    def _pack_builder(self) -> ProcessPoolExecutor:
        """The worker process that builds packs (started on first use, spawned: nothing is forked)."""
        with self._builder_lock:
            if self._builder is None:
                self._builder = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            return self._builder


def pack_slots(plan: UnitPlan) -> tuple[IntArray, int]:
    """Pack input row of each agent row: model k (in plan order) owns rows k*B .. k*B+B-1, B = largest group.

    One weight set per model, not per agent: agents sharing a model share its rows, so a pack's weights
    do not grow with the number of agents (on CPU that is what keeps it a fast GEMM, not a memory scan).
    """
    keys = np.asarray(plan.row_keys)
    groups = [np.flatnonzero(keys == key) for key in plan.models]
    per_model = max(len(g) for g in groups)
    slots = np.empty(len(keys), dtype=np.int64)
    for k, group in enumerate(groups):
        slots[group] = k * per_model + np.arange(len(group))
    return slots, per_model


def _check_version(info: ModelInfo) -> None:
    """Refuse a model file replaced since its version was read: it must not serve under that label."""
    found = sha256_file(info.onnx_path)[: len(info.version)]
    if found != info.version:
        raise PoolError(
            f"{info.onnx_path}: its content (sha256 {found}) is no longer version {info.version}; "
            "the change is reloaded as such"
        )


def _static_batch(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def validate_unit(unit: InferenceUnit, num_items: int) -> tuple[FloatArray, FloatArray]:
    """Refuse a unit whose outputs on realistic states have the wrong shape or are not finite and > 0."""
    count = len(unit.rows)
    states = realistic_states(np.random.default_rng(VALIDATION_SEED), count, num_items)
    out = unit.run(states)
    want = (count, num_items * num_items)
    if out.shape != want:
        raise PoolError(f"{unit.model_path}: output shape {out.shape}, expected {want}")
    if not np.isfinite(out).all():
        raise PoolError(f"{unit.model_path}: non-finite outputs on realistic states")
    if (out <= 0).any():
        raise PoolError(f"{unit.model_path}: non-positive exchange rates on realistic states")
    return states, out
