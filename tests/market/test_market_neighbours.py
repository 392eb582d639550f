"""Candidate pairs: the grid and the dense mask both give exactly the brute-force in-range pairs."""

from __future__ import annotations

import numpy as np
import pytest

from blockmarket.core.config import Config
from blockmarket.market.neighbours import CandidatePairs, Method, pairs_in_range
from blockmarket.market.rules import MarketPopulation, trade_step


def brute_force(
    positions: np.ndarray, market_size: int, distance: float, active: np.ndarray
) -> set[tuple[int, int]]:
    """Every ordered pair of one market within ``distance``, by the definition (float32, inclusive)."""
    pos = positions.astype(np.float32)
    dx = pos[:, None, 0] - pos[None, :, 0]
    dy = pos[:, None, 1] - pos[None, :, 1]
    in_range = dx * dx + dy * dy <= np.float32(distance) ** 2
    market = np.arange(len(pos)) // market_size
    in_range &= market[:, None] == market[None, :]
    in_range &= ~np.eye(len(pos), dtype=bool)
    in_range &= active[:, None]
    return set(zip(*(a.tolist() for a in np.nonzero(in_range)), strict=True))


def as_set(pairs: CandidatePairs) -> set[tuple[int, int]]:
    found = list(zip(pairs.requester.tolist(), pairs.target.tolist(), strict=True))
    assert len(found) == len(set(found)), "a pair was produced twice"
    return set(found)


def edge_population(rng: np.random.Generator, count: int, world: float, distance: float) -> np.ndarray:
    """Random positions plus agents on the world's edges and corners, and pairs exactly ``distance``
    apart along an axis (the limit is inclusive) and along a 3-4-5 diagonal."""
    pos = rng.uniform(0.0, world, size=(count, 2))
    corners = np.array([[0.0, 0.0], [world, 0.0], [0.0, world], [world, world]])
    edge_x = np.stack([rng.uniform(0, world, 8), np.zeros(8)], axis=1)
    exact = np.array([[0.0, 50.0], [distance, 50.0], [world, world - distance], [world, world]])
    unit = distance / 5.0
    diagonal = np.array([[10.0, 10.0], [10.0 + 3 * unit, 10.0 + 4 * unit]])
    return np.concatenate([pos, corners, edge_x, exact, diagonal]).astype(np.float32)


@pytest.mark.parametrize("method", ["grid", "dense", "auto"])
@pytest.mark.parametrize("seed", range(3))
def test_candidate_pairs_are_exactly_the_in_range_pairs(method: Method, seed: int) -> None:
    rng = np.random.default_rng(seed)
    distance = 20.0
    pos = edge_population(rng, 180, 100.0, distance)
    active = rng.random(len(pos)) < 0.8
    active[-6:] = True
    pairs = pairs_in_range(pos, len(pos), distance, active, method=method)
    found = as_set(pairs)
    assert found == brute_force(pos, len(pos), distance, active)
    last = len(pos) - 1  # the last three pairs are exactly `distance` apart (x axis, y axis, 3-4-5)
    assert {(last - 5, last - 4), (last - 3, last - 2), (last - 1, last), (last, last - 1)} <= found
    assert pairs.squared_distance.max() <= np.float32(distance) ** 2


def test_agents_exactly_at_the_limit_pair_in_both_directions() -> None:
    pos = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [12.0, 16.0], [20.0, 20.001]], np.float32)
    for method in ("grid", "dense"):
        found = as_set(pairs_in_range(pos, 5, 20.0, method=method))
        assert {(0, 1), (1, 0), (0, 2), (2, 0), (0, 3), (3, 0)} <= found
        assert (0, 4) not in found and (4, 0) not in found  # just beyond the limit
        assert found == brute_force(pos, 5, 20.0, np.ones(5, bool))


@pytest.mark.parametrize("seed", range(4))
def test_grid_and_dense_give_identical_arrays_across_markets_and_spreads(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    markets, size = int(rng.integers(1, 6)), int(rng.integers(2, 150))
    spread = [5.0, 100.0, 1000.0, 1e7][seed]  # all in one cell .. far beyond the per-axis cell cap
    distance = float(rng.uniform(0.5, 30.0))
    pos = rng.uniform(-spread, spread, size=(markets * size, 2)).astype(np.float32)
    pos[rng.random(len(pos)) < 0.1] = pos[0]  # co-located agents are in range (distance 0)
    active = rng.random(len(pos)) < 0.7
    grid = pairs_in_range(pos, size, distance, active, method="grid")
    dense = pairs_in_range(pos, size, distance, active, method="dense")
    for name in ("requester", "target", "squared_distance"):
        np.testing.assert_array_equal(getattr(grid, name), getattr(dense, name))
    assert as_set(grid) == brute_force(pos, size, distance, active)
    assert (grid.requester // size == grid.target // size).all()  # never across markets
    run_heads = grid.requester[np.flatnonzero(np.diff(grid.requester, prepend=-1))]
    assert np.unique(run_heads).size == run_heads.size  # requester-major: one run per requester


def test_no_active_requester_and_single_agent_give_no_pairs() -> None:
    pos = np.zeros((6, 2), np.float32)
    for method in ("grid", "dense"):
        assert pairs_in_range(pos, 3, 1.0, np.zeros(6, bool), method=method).requester.size == 0
        assert pairs_in_range(pos[:1], 1, 1.0, method=method).requester.size == 0


def test_bad_input_is_refused_with_a_reason() -> None:
    pos = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="markets of 3"):
        pairs_in_range(pos, 3, 1.0)
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        pairs_in_range(np.where(np.arange(4)[:, None] == 2, np.nan, pos), 4, 1.0)
    with pytest.raises(ValueError, match="shape"):
        pairs_in_range(np.zeros((4, 3), np.float32), 4, 1.0)


def test_trade_step_is_the_same_market_whichever_method_finds_the_pairs() -> None:
    env = Config().environment
    outcomes = []
    for method in ("grid", "dense"):
        rng = np.random.default_rng(9)
        pop = MarketPopulation.random(rng, 120, 5, world_size=60.0, markets=2)
        trades = [trade_step(pop, rng, env, pairs=method).trades for _ in range(20)]
        outcomes.append((trades, pop.inventory.copy(), pop.successful.copy(), pop.attempted.copy()))
    (trades_grid, *arrays_grid), (trades_dense, *arrays_dense) = outcomes
    assert trades_grid == trades_dense and sum(trades_grid) > 0
    for a, b in zip(arrays_grid, arrays_dense, strict=True):
        np.testing.assert_array_equal(a, b)
