"""The served agents: `NPUTradingAgent` views over one `AgentPopulation` of numpy arrays.

Per-agent objects exist for the edges (status, logs, tests); every per-tick computation works on the
population arrays at once: inventory [N, n], desired [N], matrices [N, n, n], success rate [N].
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from blockmarket.core.state import (
    FloatArray,
    IntArray,
    apply_update,
    build_states,
    initial_inventory,
    initial_matrices,
    refused_proposals,
)
from blockmarket.models.files import ModelInfo

Assignment = Literal["round_robin", "one_per_checkpoint"]


class RosterError(ValueError):
    """A tick names agents this runtime does not serve (or names one twice)."""


@dataclass(frozen=True)
class NPUTradingAgent:
    """One agent: a row of the population; its matrix and inventory are views, not copies."""

    population: AgentPopulation
    row: int

    @property
    def agent_id(self) -> str:
        return self.population.agent_ids[self.row]

    @property
    def desired_item(self) -> str:
        return self.population.items[int(self.population.desired[self.row])]

    @property
    def model_key(self) -> str:
        return self.population.model_keys[self.row]

    @property
    def trading_matrix(self) -> FloatArray:
        return self.population.matrices[self.row]

    @property
    def inventory(self) -> FloatArray:
        return self.population.inventory[self.row]


class AgentPopulation:
    """All served agents as arrays; the state that must survive reconnects and model swaps."""

    def __init__(
        self,
        agent_ids: Sequence[str],
        items: Sequence[str],
        desired: npt.ArrayLike,
        model_keys: Sequence[str],
        matrices: FloatArray,
        inventory: FloatArray,
    ) -> None:
        self.agent_ids = tuple(agent_ids)
        self.items = tuple(items)
        self.desired: IntArray = np.asarray(desired, dtype=np.int64)
        self.model_keys = tuple(model_keys)
        self.matrices = np.ascontiguousarray(matrices, dtype=np.float32)
        self.initial_matrices = self.matrices.copy()  # announced in the roster: answers can be recomputed
        self.inventory = np.ascontiguousarray(inventory, dtype=np.float32)
        self.success_rate = np.zeros(len(self.agent_ids), dtype=np.float32)
        count, n = len(self.agent_ids), len(self.items)
        if len(set(self.agent_ids)) != count:
            raise ValueError("agent ids must be unique")
        if (
            self.desired.shape != (count,)
            or len(self.model_keys) != count
            or self.matrices.shape != (count, n, n)
            or self.inventory.shape != (count, n)
        ):
            raise ValueError(
                f"population arrays disagree with {count} agents and {n} items: desired "
                f"{self.desired.shape}, models {len(self.model_keys)}, matrices {self.matrices.shape}, "
                f"inventory {self.inventory.shape}"
            )
        self._row_of = {agent_id: row for row, agent_id in enumerate(self.agent_ids)}
        self._cached_ids: tuple[str, ...] | None = None
        self._cached_rows: IntArray | None = None

    def __len__(self) -> int:
        return len(self.agent_ids)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def desired_items(self) -> list[str]:
        return [self.items[int(i)] for i in self.desired]

    def agent(self, row: int) -> NPUTradingAgent:
        return NPUTradingAgent(self, row)

    def agents(self) -> list[NPUTradingAgent]:
        return [NPUTradingAgent(self, row) for row in range(len(self))]

    def groups(self) -> dict[str, IntArray]:
        """Model key -> the rows of the agents it serves (ascending)."""
        return groups_of(self.model_keys)

    def rows_for(self, agent_ids: tuple[str, ...]) -> IntArray:
        """Population rows of a tick's agents, cached while the game server sends the same roster."""
        if self._cached_rows is not None and (agent_ids is self._cached_ids or agent_ids == self._cached_ids):
            return self._cached_rows
        unknown = [a for a in agent_ids if a not in self._row_of]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise RosterError(f"{len(unknown)} unknown agent id(s): {shown}")
        if len(set(agent_ids)) != len(agent_ids):
            raise RosterError("the tick names an agent twice")
        rows = np.fromiter((self._row_of[a] for a in agent_ids), dtype=np.int64, count=len(agent_ids))
        self._cached_ids, self._cached_rows = agent_ids, rows
        return rows

    def only(self, model_keys: Collection[str]) -> AgentPopulation:
        """A copy of the agents served by these models (new agents join model by model if one fails)."""
        return self.subset([row for row, key in enumerate(self.model_keys) if key in model_keys])

    def subset(self, rows: Sequence[int]) -> AgentPopulation:
        """A copy of these rows' agents, with their state."""
        part = AgentPopulation(
            [self.agent_ids[r] for r in rows],
            self.items,
            self.desired[rows],
            [self.model_keys[r] for r in rows],
            self.matrices[rows],
            self.inventory[rows],
        )
        part.success_rate[:] = self.success_rate[rows]
        return part

    def extend(self, newcomers: AgentPopulation) -> None:
        """Append agents in place (hot reload of new checkpoints); existing rows and their state stay."""
        if newcomers.items != self.items:
            raise ValueError(f"new agents trade {list(newcomers.items)}, the population {list(self.items)}")
        clash = set(newcomers.agent_ids) & set(self._row_of)
        if clash:
            raise ValueError(f"agent ids already served: {', '.join(sorted(clash))}")
        first = len(self)
        self.agent_ids += newcomers.agent_ids
        self.model_keys += newcomers.model_keys
        self.desired = np.concatenate([self.desired, newcomers.desired])
        self.matrices = np.concatenate([self.matrices, newcomers.matrices])
        self.initial_matrices = np.concatenate([self.initial_matrices, newcomers.initial_matrices])
        self.inventory = np.concatenate([self.inventory, newcomers.inventory])
        self.success_rate = np.concatenate([self.success_rate, newcomers.success_rate])
        self._row_of.update({agent_id: first + i for i, agent_id in enumerate(newcomers.agent_ids)})
        self._cached_ids = self._cached_rows = None

    def relabel(self, rows: Sequence[int] | IntArray, agent_ids: Sequence[str]) -> None:
        """Give rows new agent ids (a market's agent leases a row, or leaves it free); models stay."""
        ids = list(self.agent_ids)
        for row in rows:
            del self._row_of[ids[row]]
        for row, agent_id in zip(rows, agent_ids, strict=True):
            if agent_id in self._row_of:
                raise ValueError(f"agent id {agent_id!r} is already served")
            ids[row] = agent_id
            self._row_of[agent_id] = row
        self.agent_ids = tuple(ids)
        self._cached_ids = self._cached_rows = None

    def reset(
        self, rows: IntArray, desired: npt.ArrayLike, matrices: FloatArray, inventory: FloatArray
    ) -> None:
        """Fresh state for rows that new agents lease: their desired item, starting matrix and holdings."""
        self.desired[rows] = desired
        self.matrices[rows] = matrices
        self.initial_matrices[rows] = matrices
        self.inventory[rows] = inventory
        self.success_rate[rows] = 0.0

    def observe(
        self, rows: IntArray, inventory: npt.ArrayLike, successful: npt.ArrayLike, attempted: npt.ArrayLike
    ) -> None:
        """Take the game server's view of inventories and trade counters for the ticked agents."""
        self.inventory[rows] = inventory
        done = np.asarray(successful, dtype=np.float32)
        tried = np.maximum(np.asarray(attempted, dtype=np.float32), 1.0)
        self.success_rate[rows] = np.clip(done / tried, 0.0, 1.0)

    def states(self, market_mean: npt.ArrayLike | None = None, out: FloatArray | None = None) -> FloatArray:
        """The state matrix X [N, D] of every agent (market mean: given, or the other agents' matrices)."""
        return build_states(
            self.inventory, self.desired, self.matrices, self.success_rate, market_mean=market_mean, out=out
        )

    def update(self, rows: IntArray, proposals: FloatArray, alpha: float) -> tuple[FloatArray, IntArray]:
        """Apply the update rule to the ticked agents' matrices, behind the output guard.

        Returns their new matrices [M, n, n] and the population rows whose proposal the guard refused
        (blockmarket.core.state.refused_proposals): those agents keep their previous matrix.
        """
        whole = len(rows) == len(self) and np.array_equal(rows, np.arange(len(self)))
        ticked = proposals if whole else proposals[rows]
        current = self.matrices if whole else self.matrices[rows]
        refused = refused_proposals(ticked)
        kept = current[refused]
        with np.errstate(invalid="ignore", over="ignore"):  # refused rows are restored just below
            apply_update(current, ticked, alpha)
        current[refused] = kept
        if not whole:
            self.matrices[rows] = current
        return current, rows[refused]


def groups_of(model_keys: Sequence[str]) -> dict[str, IntArray]:
    """Model key -> the rows (ascending) whose agents run it, in order of first appearance.

    One sort, not one comparison of every row per model: 10,000 distinct models took 2 s that way.
    """
    if not len(model_keys):
        return {}
    keys, first, inverse = np.unique(np.asarray(model_keys), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rows = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    return {str(keys[k]): rows[k] for k in np.argsort(first)}


def assign_models(models: Sequence[ModelInfo], num_agents: int, assignment: Assignment) -> list[ModelInfo]:
    """Which model each agent runs: agent i -> model i mod K, or exactly one agent per model."""
    if not models:
        raise ValueError("no models to assign agents to")
    if assignment == "one_per_checkpoint":
        return list(models)
    return [models[i % len(models)] for i in range(num_agents)]


def agent_ids_for(assigned: Sequence[ModelInfo], assignment: Assignment) -> list[str]:
    """`agent-0000`... for drawn agents; the checkpoint's own agent id when each agent is one checkpoint."""
    if assignment == "one_per_checkpoint":
        ids = [m.agent_id or m.key for m in assigned]
        if len(set(ids)) == len(ids):
            return ids
        return [m.key for m in assigned]
    return [f"agent-{i:04d}" for i in range(len(assigned))]


def create_population(
    models: Sequence[ModelInfo],
    items: Sequence[str],
    *,
    num_agents: int,
    assignment: Assignment,
    seed: int,
) -> AgentPopulation:
    """A fresh population: agents assigned to models, desired items from the metadata, seeded state."""
    assigned = assign_models(models, num_agents, assignment)
    return new_agents(assigned, agent_ids_for(assigned, assignment), items, np.random.default_rng(seed))


def new_agents(
    assigned: Sequence[ModelInfo],
    agent_ids: Sequence[str],
    items: Sequence[str],
    rng: np.random.Generator,
    first_row: int = 0,
) -> AgentPopulation:
    """Agents for the given models: desired item from the metadata (else round-robin by row), fresh state."""
    index = {item: i for i, item in enumerate(items)}
    desired = [
        index[m.desired_item] if m.desired_item in index else (first_row + i) % len(items)
        for i, m in enumerate(assigned)
    ]
    count = len(assigned)
    return AgentPopulation(
        agent_ids=agent_ids,
        items=items,
        desired=desired,
        model_keys=[m.key for m in assigned],
        matrices=initial_matrices(rng, count, len(items)),
        inventory=initial_inventory(rng, count, len(items)),
    )
