"""Agents as population arrays: the vectorized tick math equals a per-agent reference (the original's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockmarket.models.files import discover_models
from runtime.agents import AgentPopulation, RosterError, create_population
from tests.support.serving import ITEMS


def reference_state(inventory, desired, own, others, success) -> np.ndarray:
    """One agent's state, written out the way the original built it."""
    n = len(inventory)
    peak = max(inventory)
    one_hot = [1.0 if i == desired else 0.0 for i in range(n)]
    mean = np.mean(others, axis=0) if len(others) else np.zeros((n, n))
    return np.array(
        [v / (peak if peak > 0 else 1.0) for v in inventory]
        + one_hot
        + list(own.ravel())
        + list(mean.ravel())
        + [success]
    )


def reference_update(own: np.ndarray, out: np.ndarray, alpha: float) -> np.ndarray:
    new = (1 - alpha) * own + alpha * out
    np.fill_diagonal(new, 1.0)
    new = np.clip(new, 0.1, 10.0)
    np.fill_diagonal(new, 1.0)
    return new


def population(count: int, seed: int = 0) -> AgentPopulation:
    rng = np.random.default_rng(seed)
    n = len(ITEMS)
    mats = rng.uniform(0.05, 12.0, size=(count, n, n)).astype(np.float32)
    return AgentPopulation(
        agent_ids=[f"a{i}" for i in range(count)],
        items=ITEMS,
        desired=rng.integers(0, n, size=count),
        model_keys=["m0"] * count,
        matrices=mats,
        inventory=rng.integers(0, 20, size=(count, n)).astype(np.float32),
    )


def test_vectorized_tick_matches_per_agent_reference() -> None:
    pop = population(12)
    rng = np.random.default_rng(1)
    rows = rng.permutation(12)  # a tick lists agents in its own order
    inventory = rng.integers(0, 30, size=(12, len(ITEMS))).astype(np.float32)
    inventory[3] = 0.0
    successful, attempted = rng.integers(0, 5, size=12), rng.integers(0, 8, size=12)
    pop.observe(rows, inventory, successful, attempted)
    before = pop.matrices.copy()
    states = pop.states()
    for row in range(12):
        tick_pos = int(np.flatnonzero(rows == row)[0])
        others = np.delete(before, row, axis=0)
        rate = min(successful[tick_pos] / max(attempted[tick_pos], 1), 1.0)
        want = reference_state(inventory[tick_pos], pop.desired[row], before[row], others, rate)
        np.testing.assert_allclose(states[row], want, rtol=1e-6, atol=1e-6)
    proposals = rng.uniform(0.0, 15.0, size=(12, len(ITEMS) ** 2)).astype(np.float32)
    updated, refused = pop.update(rows, proposals, alpha=0.3)
    assert len(refused) == 0
    for pos, row in enumerate(rows):
        want = reference_update(before[row], proposals[row].reshape(5, 5), 0.3)
        np.testing.assert_allclose(updated[pos], want, rtol=1e-6)
        np.testing.assert_allclose(pop.matrices[row], want, rtol=1e-6)
        assert pop.agent(int(row)).trading_matrix is not None
        np.testing.assert_array_equal(pop.agent(int(row)).trading_matrix, want.astype(np.float32))


def test_subset_tick_leaves_other_agents_untouched() -> None:
    pop = population(6)
    before = pop.matrices.copy()
    rows = pop.rows_for(("a4", "a1"))
    pop.update(rows, np.full((6, 25), 3.0, dtype=np.float32), alpha=0.5)
    untouched = [0, 2, 3, 5]
    np.testing.assert_array_equal(pop.matrices[untouched], before[untouched])
    assert not np.array_equal(pop.matrices[[4, 1]], before[[4, 1]])


@pytest.mark.parametrize("whole", [True, False], ids=["whole roster", "subset"])
def test_output_guard_keeps_the_matrix_of_agents_with_a_runaway_proposal(whole: bool) -> None:
    pop = population(6)
    rows = np.arange(6) if whole else pop.rows_for(("a5", "a0", "a3", "a1"))
    before = pop.matrices.copy()
    proposals = np.full((6, 25), 2.0, dtype=np.float32)
    proposals[5, 3] = np.nan
    proposals[0, 0] = np.inf
    proposals[3, 7] = 1.0e4 + 16  # above PROPOSAL_MAX (the next float32 above 1e4 is 1e4 + 0.001)
    proposals[1, 2] = -0.5  # below PROPOSAL_MIN
    proposals[2, 2] = 3.4e38  # finite, far beyond: refused too (only in the whole-roster case ticked)
    matrices, refused = pop.update(rows, proposals, alpha=0.5)
    expected_refused = {5, 0, 3, 1} | ({2} if whole else set())
    assert set(refused.tolist()) == expected_refused
    for pos, row in enumerate(rows):
        if row in expected_refused:
            np.testing.assert_array_equal(pop.matrices[row], before[row])  # kept exactly
        else:
            np.testing.assert_allclose(
                pop.matrices[row], reference_update(before[row], proposals[row].reshape(5, 5), 0.5), rtol=1e-6
            )
        np.testing.assert_array_equal(matrices[pos], pop.matrices[row])
    assert np.isfinite(pop.matrices).all()


def test_row_mapping_is_cached_and_refuses_unknown_or_repeated_agents() -> None:
    pop = population(4)
    ids = ("a3", "a0", "a2", "a1")
    rows = pop.rows_for(ids)
    np.testing.assert_array_equal(rows, [3, 0, 2, 1])
    assert pop.rows_for(tuple(ids)) is rows  # equal roster: no per-agent Python on the hot path
    with pytest.raises(RosterError, match="zz"):
        pop.rows_for(("a0", "zz"))
    with pytest.raises(RosterError, match="twice"):
        pop.rows_for(("a0", "a0"))


def test_agents_are_views_of_the_population_arrays() -> None:
    pop = population(3)
    agent = pop.agent(2)
    pop.matrices[2, 0, 1] = 7.5
    pop.inventory[2, 4] = 11.0
    assert agent.trading_matrix[0, 1] == pytest.approx(7.5)
    assert agent.inventory[4] == 11.0
    assert agent.agent_id == "a2" and agent.model_key == "m0"
    assert agent.desired_item == ITEMS[int(pop.desired[2])]
    assert [a.agent_id for a in pop.agents()] == list(pop.agent_ids)
    assert [a.desired_item for a in pop.agents()] == pop.desired_items


def test_round_robin_assignment_and_desired_items(model_dir: Path) -> None:
    models, problems = discover_models(model_dir, ITEMS)
    assert problems == [] and [m.key for m in models] == ["m0", "m1", "m2"]
    pop = create_population(models, ITEMS, num_agents=7, assignment="round_robin", seed=0)
    assert pop.model_keys == ("m0", "m1", "m2", "m0", "m1", "m2", "m0")
    assert pop.agent_ids[0] == "agent-0000" and len(pop) == 7
    # m0 wants gold, m2 apple (metadata); m1 has none: round-robin over items by agent row
    assert pop.desired_items == ["gold", ITEMS[1], "apple", "gold", ITEMS[4], "apple", "gold"]
    assert (np.diagonal(pop.matrices, axis1=1, axis2=2) == 1.0).all()
    again = create_population(models, ITEMS, num_agents=7, assignment="round_robin", seed=0)
    np.testing.assert_array_equal(again.matrices, pop.matrices)  # seeded: offline recomputation works


def test_one_agent_per_checkpoint_uses_checkpoint_ids(model_dir: Path) -> None:
    models, _ = discover_models(model_dir, ITEMS)
    pop = create_population(models, ITEMS, num_agents=128, assignment="one_per_checkpoint", seed=0)
    assert pop.agent_ids == ("ckpt-0", "ckpt-1", "ckpt-2")
    assert pop.model_keys == ("m0", "m1", "m2")


def test_models_for_other_items_are_skipped_with_a_reason(model_dir: Path) -> None:
    models, problems = discover_models(model_dir, ("gold", "diamond"))
    assert models == [] and len(problems) == 3 and "items" in problems[0]
