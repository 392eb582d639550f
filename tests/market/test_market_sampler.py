"""The O(agents) market step: its target draws follow exactly 1/(1+distance) over the agents in range,
and trade_step's choice of target has the distribution the rules define, sampled or enumerated."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from blockmarket.core.config import Config
from blockmarket.market import targets
from blockmarket.market.neighbours import InRangeSampler
from blockmarket.market.rules import MarketPopulation, trade_step

ENV = Config().environment
Z_1E5 = 4.265  # one-sided normal quantile for p = 1e-5


def chi_square_limit(dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at p = 1e-5 (no scipy here)."""
    c = 2.0 / (9.0 * dof)
    return float(dof * (1.0 - c + Z_1E5 * np.sqrt(c)) ** 3)


def exact_weights(positions: np.ndarray, market_size: int, distance: float) -> np.ndarray:
    """[N, N] 1/(1+d) for every other agent of the same market within ``distance`` (float32 squared
    distance, inclusive, as pairs_in_range decides), else 0."""
    pos = positions.astype(np.float32)
    dx = pos[:, None, 0] - pos[None, :, 0]
    dy = pos[:, None, 1] - pos[None, :, 1]
    d2 = dx * dx + dy * dy
    market = np.arange(len(pos)) // market_size
    ok = (
        (d2 <= np.float32(distance) ** 2)
        & (market[:, None] == market[None, :])
        & ~np.eye(len(pos), dtype=bool)
    )
    return np.where(ok, 1.0 / (1.0 + np.sqrt(d2.astype(np.float64))), 0.0)


def small_world(rng: np.random.Generator) -> np.ndarray:
    """Two markets of 20 in a 10×10 world: random agents, three on one spot, corners and edges, and a
    pair exactly at the limit (4) apart."""
    pos = rng.uniform(0.0, 10.0, size=(40, 2))
    pos[0:3] = [5.0, 5.0]  # co-located
    pos[3:7] = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]  # corners
    pos[7:9] = [[0.0, 4.0], [4.0, 4.0]]  # exactly 4 apart
    pos[20:23] = [1.0, 9.0]  # co-located in the second market
    return pos.astype(np.float32)


def test_sampler_draws_follow_one_over_one_plus_distance_exactly() -> None:
    rng = np.random.default_rng(11)
    pos, size, distance = small_world(rng), 20, 4.0
    sampler = InRangeSampler.build(pos, size, distance, np.ones(len(pos), dtype=bool))
    weights = exact_weights(pos, size, distance)
    targets, _ = sampler.draw(np.arange(sampler.ranks.size), 6000, rng)
    order = sampler.grid.order
    statistic, dof, kept_total = 0.0, 0, 0
    for row, rank in enumerate(sampler.ranks):
        me = order[rank]
        kept = order[targets[row][targets[row] >= 0]]
        w = weights[me]
        assert np.all(w[kept] > 0), f"agent {me} drew itself, another market or someone out of range"
        if w.sum() == 0:
            assert kept.size == 0
            continue
        counts = np.bincount(kept, minlength=len(pos))[w > 0]
        expected = kept.size * w[w > 0] / w.sum()
        statistic += float(((counts - expected) ** 2 / expected).sum())
        dof += int((w > 0).sum()) - 1
        kept_total += kept.size
    assert dof > 100 and kept_total > 0.3 * targets.size  # the rejection step keeps a fair share
    assert statistic < chi_square_limit(dof), (statistic, dof)


def test_sampler_with_nobody_in_range_keeps_nothing() -> None:
    rng = np.random.default_rng(0)
    alone = InRangeSampler.build(np.zeros((1, 2), np.float32), 1, 5.0, np.ones(1, bool))
    assert alone.total[0] == 0
    # in a nearby cell (so proposed) but beyond the limit: every proposal is rejected
    pos = np.array([[0.0, 0.0], [4.5, 4.5]], np.float32)
    apart = InRangeSampler.build(pos, 2, 5.0, np.ones(2, bool))
    assert (apart.total > 0).all()
    targets, _ = apart.draw(np.arange(2), 500, rng)
    assert (targets == -1).all()


def one_requester_market() -> tuple[MarketPopulation, np.ndarray]:
    """Agent 0 wants item 0 and offers item 1 at ask 1; the others want item 0 and hold only it (so
    they never ask), at distances 0 (same spot), 1, 3, 5 and 7.5 with acceptance probabilities
    0.8, 0.5, 0.25, 0.625, 0.4; one more at 2 holds nothing, one at 25 is out of range."""
    rates = np.array([1.0, 1.25, 2.0, 4.0, 1.6, 2.5, 1.0, 1.0], np.float32)
    holds = np.array([0, 1, 1, 1, 1, 1, 0, 1], bool)
    x = np.array([0.0, 0.0, 1.0, 3.0, 5.0, 7.5, 2.0, 25.0], np.float32)
    count = x.size
    matrices = np.ones((count, 2, 2), np.float32)
    matrices[:, 0, 1] = rates  # a target's price of item 0 in item 1
    inventory = np.zeros((count, 2), np.float32)
    inventory[0, 1] = 10.0
    inventory[holds, 0] = 10.0
    pop = MarketPopulation(
        agent_ids=[f"a{k}" for k in range(count)],
        desired=np.zeros(count, np.int64),
        inventory=inventory,
        matrices=matrices,
        positions=np.stack([x, np.zeros(count, np.float32)], axis=1),
    )
    # the rule's distribution: acceptance draws per candidate, then a race ∝ 1/(1+d) among acceptors
    p = np.where(holds & (x <= ENV.max_trade_distance), np.minimum(1.0, 1.0 / rates), 0.0)
    p[0] = 0.0
    w = 1.0 / (1.0 + x.astype(np.float64))
    chance = np.zeros(count + 1)  # last: no trade
    for accepted in itertools.product([False, True], repeat=count):
        mask = np.array(accepted)
        prob = float(np.prod(np.where(mask, p, 1.0 - p)))
        if prob == 0:
            continue
        if mask.any():
            chance[:count] += prob * np.where(mask, w, 0.0) / w[mask].sum()
        else:
            chance[count] += prob
    return pop, chance


@pytest.mark.parametrize(
    ("pairs", "rounds", "per_round"),
    [
        ("sample", targets.SAMPLE_ROUNDS, targets.SAMPLE_PER_ROUND),
        ("sample", 1, 1),
        ("sample", 1, 2),
        ("grid", 0, 0),
        ("dense", 0, 0),
    ],
)
def test_the_chosen_target_has_the_distribution_of_the_rules(
    pairs: targets.Choice, rounds: int, per_round: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rounds/per_round 1: most requesters finish by enumerating the pairs they have not seen yet
    if pairs == "sample":
        monkeypatch.setattr(targets, "SAMPLE_ROUNDS", rounds)
        monkeypatch.setattr(targets, "SAMPLE_PER_ROUND", per_round)
    base, chance = one_requester_market()
    rng = np.random.default_rng(21)
    trials = 6000
    counts = np.zeros(chance.size)
    for _ in range(trials):
        pop = MarketPopulation(
            base.agent_ids, base.desired, base.inventory.copy(), base.matrices, base.positions
        )
        stats = trade_step(pop, rng, ENV, pairs=pairs)
        assert stats.requests == 1 and pop.attempted.tolist() == [1] + [0] * (base.size - 1)
        counts[stats.target[0] if stats.trades else base.size] += 1
    possible = chance > 0
    assert counts[~possible].sum() == 0
    expected = trials * chance[possible]
    statistic = float(((counts[possible] - expected) ** 2 / expected).sum())
    assert statistic < chi_square_limit(int(possible.sum()) - 1), (counts, expected)


@pytest.mark.parametrize("pairs", ["sample", "enumerate", "auto"])
def test_edge_cases_alone_apart_and_on_one_spot(pairs: targets.Choice) -> None:
    rng = np.random.default_rng(2)
    alone = MarketPopulation.random(rng, 1, 3, 10.0)
    assert trade_step(alone, rng, ENV, pairs=pairs).requests == 0 and alone.attempted[0] == 0
    far = ENV.max_trade_distance
    apart = MarketPopulation.random(rng, 2, 3, 10.0)
    apart.positions[:] = [[0.0, 0.0], [0.75 * far, 0.75 * far]]  # nearby cells, 1.06 d apart
    stats = trade_step(apart, rng, ENV, pairs=pairs)
    assert stats.requests == 0 and stats.trades == 0 and (apart.attempted == 0).all()
    spot = MarketPopulation.random(rng, 30, 3, 10.0)
    spot.positions[:] = 5.0  # everyone on one spot: all at distance 0
    before = spot.inventory.sum(axis=0)
    stats = trade_step(spot, rng, ENV, pairs=pairs)
    assert stats.trades > 0 and (stats.requester != stats.target).all()
    np.testing.assert_array_equal(spot.inventory.sum(axis=0), before)


def test_sampled_and_enumerated_markets_trade_alike() -> None:
    # different random streams, same rules: over many steps the trade counts agree closely
    trades = {}
    for pairs in ("sample", "grid"):
        rng = np.random.default_rng(8)
        pop = MarketPopulation.random(rng, 300, 5, 60.0, markets=3)
        trades[pairs] = [trade_step(pop, rng, ENV, pairs=pairs).trades for _ in range(30)]
    sampled, enumerated = np.mean(trades["sample"]), np.mean(trades["grid"])
    assert sampled > 0 and abs(sampled - enumerated) < 0.1 * enumerated


def test_auto_samples_where_many_agents_are_in_range_and_enumerates_where_few() -> None:
    rng = np.random.default_rng(4)
    crowded = MarketPopulation.random(rng, 2000, 5, 30.0)  # everyone within reach of most others
    sparse = MarketPopulation.random(rng, 2000, 5, 2000.0)
    small = MarketPopulation.random(rng, 640, 5, 30.0, markets=64)  # training-shaped
    offering = np.ones(2000, dtype=bool)
    distance = ENV.max_trade_distance
    assert targets.cheaper_choice(crowded.positions, 2000, distance, offering) == "sample"
    assert targets.cheaper_choice(sparse.positions, 2000, distance, offering) == "enumerate"
    assert targets.cheaper_choice(small.positions, 10, distance, offering[:640]) == "enumerate"
