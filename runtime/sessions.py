"""The session pool: every agent's model served with one inference call per model group per tick.

Agents sharing a model share one batched session. When the population needs more models than
``runtime.max_sessions`` allows, the distinct-weight models of one architecture are served through a
*population pack* (blockmarket.models.pack): one static-shape graph holding one weight set per model, each
evaluated on the rows of that model's agents, so all of them take one call.

What serves a tick is an immutable :class:`PoolGeneration`. Sessions are built and validated off the
event loop; a new generation replaces the old one by a single reference assignment on the loop thread,
so each tick runs entirely on one generation and a swap always falls between two ticks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from blockmarket.core.state import FloatArray, IntArray
from blockmarket.models.files import ModelInfo
from runtime.agents import AgentPopulation
from runtime.housekeeping import prune_packs, release_free_memory
from runtime.inference import InferenceUnit
from runtime.planning import UnitPlan, plan_units
from runtime.units import PACK_DIR, PackChoice, SessionFactory, UnitBuilder

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # after a swap, ticks still running on the old generation end before cleaning up


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
        self.max_sessions = max_sessions
        self.builder = UnitBuilder(factory, population.num_items, model_dir, use_npu, cpu_pack_precision)
        self.executor = ThreadPoolExecutor(max_workers=max_sessions, thread_name_prefix="inference")
        self.current = PoolGeneration(0, ())
        self.reload_failures = 0
        self.on_unit_run: Callable[[str, float], None] | None = None  # unit name, seconds (runtime.metrics)
        # model key -> why its new version failed to swap in. In a pack that may be another member's broken
        # file (a pack is rebuilt from every member's file): the reloader tries them again with later changes
        self.refused: dict[str, str] = {}
        self._swap_lock = asyncio.Lock()
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def factory(self) -> SessionFactory:
        return self.builder.factory

    async def start(self) -> PoolGeneration:
        """Build and validate every unit off the loop, then start serving with them."""
        plans = await self._plan(self.population.model_keys, self.models)
        self.current = PoolGeneration(1, tuple(await self._build(plans)))
        log.info("session pool generation 1: %s", self.current.describe())
        self._clean_up_later()
        return self.current

    async def infer(
        self, states: FloatArray, generation: PoolGeneration | None = None, rows: IntArray | None = None
    ) -> FloatArray:
        """Proposals [N, n^2] for the agents' states [N, D]: one call per unit, units concurrently, off the
        loop thread. ``rows`` (distinct; default: all): only these agents' proposals are computed, the
        others' are left undefined, and a unit with none of them is not run.

        ``generation`` (default: the current one) is what the caller reports as having served the tick.
        """
        units = (generation or self.current).units
        loop = asyncio.get_running_loop()
        if rows is not None and len(rows) == len(states):
            rows = None  # every agent
        if rows is None and len(units) == 1 and len(units[0].rows) == len(states):
            return await loop.run_in_executor(self.executor, self._run, units[0], states, None)
        wanted = _wanted(len(states), rows)
        work = [(unit, take) for unit in units if (take := _taken(unit.rows, wanted)) is None or len(take)]
        outputs = await asyncio.gather(
            *(loop.run_in_executor(self.executor, self._run, unit, _of(states, unit.rows, take), take)
              for unit, take in work)
        )  # fmt: skip
        proposals = np.empty((len(states), self.population.num_items**2), dtype=np.float32)
        for (unit, take), out in zip(work, outputs, strict=True):
            proposals[unit.rows if take is None else unit.rows[take]] = out
        return proposals

    def _run(self, unit: InferenceUnit, states: FloatArray, take: IntArray | None) -> FloatArray:
        """One unit's inference on an executor thread, timed for the metrics when they are on."""
        if self.on_unit_run is None:
            return unit.run(states, take)
        start = time.perf_counter()
        out = unit.run(states, take)
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
        if newcomers is not None:  # markets' free rows have unprintable labels: counted, not shown
            named = [a for a in newcomers.agent_ids if a.isprintable()]
            free = len(newcomers) - len(named)
            rows = ", ".join([*named, *([f"{free} free row(s) for markets"] if free else [])])
            what = f"new agents {rows} ({what})"
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
            self._clean_up_later()
            return True

    async def _plan(self, model_keys: Sequence[str], models: Mapping[str, ModelInfo]) -> list[UnitPlan]:
        """plan_units on a thread: grouping 10,000 agents by model is too long a pause for the loop."""
        return await asyncio.to_thread(plan_units, model_keys, models, self.max_sessions)

    async def _build(self, plans: Sequence[UnitPlan]) -> list[InferenceUnit]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(None, self.builder.build, p) for p in plans)))

    def _clean_up_later(self) -> None:
        """Once the old generation's last ticks are done: prune unused packs, give freed heap back."""
        task = asyncio.get_running_loop().create_task(self._clean_up())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _clean_up(self) -> None:
        await asyncio.sleep(SETTLE_S)
        serving = [unit.model_path for unit in self.current.units]
        await asyncio.to_thread(prune_packs, self.builder.model_dir / PACK_DIR, serving)
        await asyncio.to_thread(release_free_memory)

    def close(self) -> None:
        """Stop the inference threads and the pack builder (the sessions go with the last generation)."""
        for task in self._cleanups:
            task.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.builder.close()


def _wanted(count: int, rows: IntArray | None) -> npt.NDArray[np.bool_] | None:
    """A mask of the ``count`` arena rows: True where ``rows`` asks for a proposal (None: every row)."""
    if rows is None:
        return None
    wanted = np.zeros(count, dtype=bool)
    wanted[rows] = True
    return wanted


def _taken(unit_rows: IntArray, wanted: npt.NDArray[np.bool_] | None) -> IntArray | None:
    """Positions in ``unit_rows`` (ascending) of the wanted rows (None: all of them)."""
    return None if wanted is None else np.flatnonzero(wanted[unit_rows])


def _of(states: FloatArray, unit_rows: IntArray, take: IntArray | None) -> FloatArray:
    return states[unit_rows] if take is None else states[unit_rows[take]]
