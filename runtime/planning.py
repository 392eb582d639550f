"""Planning the inference units of a population: one session per model while that fits in
``runtime.max_sessions``, else one population pack per architecture (a :class:`PackPlan`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from blockmarket.core.state import IntArray
from blockmarket.models.files import ModelInfo
from runtime.agents import groups_of


class PoolError(RuntimeError):
    """The models cannot be served as configured (the message says which and why)."""


class Served(Protocol):
    """What a built unit tells about what it serves (runtime.units.InferenceUnit)."""

    @property
    def rows(self) -> IntArray: ...
    @property
    def row_keys(self) -> tuple[str, ...]: ...
    @property
    def models(self) -> Mapping[str, ModelInfo]: ...


@dataclass(frozen=True)
class UnitPlan:
    """What one session will serve: its rows and the models behind them (see the two kinds below)."""

    name: str
    rows: IntArray
    row_keys: tuple[str, ...]
    models: Mapping[str, ModelInfo]

    def served_by(self, unit: Served | None) -> bool:
        """True when ``unit`` already serves exactly this plan (same rows, models, versions and variants)."""
        return (
            unit is not None
            and np.array_equal(unit.rows, self.rows)
            and unit.row_keys == self.row_keys
            and {k: (m.version, m.variants) for k, m in unit.models.items()}
            == {k: (m.version, m.variants) for k, m in self.models.items()}
        )


@dataclass(frozen=True)
class SessionPlan(UnitPlan):
    """One model's agents, served by one session of that model (or of one of its NPU variants)."""


@dataclass(frozen=True)
class PackPlan(UnitPlan):
    """The agents of several models of one architecture, served by one population pack."""


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
        return [
            SessionPlan(key, rows, (key,) * len(rows), {key: models[key]}) for key, rows in groups.items()
        ]
    by_arch: dict[tuple[str, int, int | None, int], list[str]] = {}
    for key in groups:
        by_arch.setdefault(models[key].architecture, []).append(key)
    if len(by_arch) > max_sessions:
        raise PoolError(
            f"{len(groups)} models of {len(by_arch)} architectures need more than runtime.max_sessions="
            f"{max_sessions} sessions; raise it or assign fewer distinct models"
        )
    plans: list[UnitPlan] = []
    for (model_type, input_dim, *_), keys in by_arch.items():
        rows = np.sort(np.concatenate([groups[k] for k in keys]))
        name = f"pack:{model_type}-{input_dim}x{len(rows)}"
        plans.append(PackPlan(name, rows, tuple(map(str, keys_of[rows])), {k: models[k] for k in keys}))
    return plans


def pack_slots(plan: PackPlan, padded: bool = False) -> tuple[IntArray, int]:
    """Pack input row of each agent row: model k (in plan order) owns rows k*B .. k*B+B-1, B = largest group
    (``padded``: one more, so that every model has at least two slots and its last one is padding: see
    runtime.units.UnitBuilder.batch_invariant).

    One weight set per model, not per agent: agents sharing a model share its rows, so a pack's weights
    do not grow with the number of agents (on CPU that is what keeps it a fast GEMM, not a memory scan).
    """
    groups = model_groups(plan.row_keys, list(plan.models))
    per_model = max(map(len, groups)) + (1 if padded else 0)
    slots = np.empty(len(plan.row_keys), dtype=np.int64)
    for k, group in enumerate(groups):
        slots[group] = k * per_model + np.arange(len(group))
    return slots, per_model


def model_groups(row_keys: Sequence[str], keys: Sequence[str]) -> list[IntArray]:
    """For each of ``keys`` in order, the rows (ascending) whose model it is: one dict lookup and one sort
    for all rows, where comparing every key with every row took 1.2 s at 10,000 models."""
    position = {key: k for k, key in enumerate(keys)}
    index = np.fromiter((position[key] for key in row_keys), dtype=np.int64, count=len(row_keys))
    order = np.argsort(index, kind="stable")
    return np.split(order, np.cumsum(np.bincount(index, minlength=len(keys)))[:-1])
