"""Trade mechanics: conservation, limits, one request per target, rate direction, counters."""

from __future__ import annotations

import numpy as np
import pytest

from blockmarket.core.config import Config
from blockmarket.core.state import apply_update
from blockmarket.market.rules import QUANTUM, MarketPopulation, fitness, trade_step

DIAMOND, GOLD, APPLE = 0, 1, 2
ENV = Config().environment


def dense_market(seed: int, count: int = 40) -> MarketPopulation:
    """Agents packed into a small world so that most of them are in range of each other."""
    return MarketPopulation.random(np.random.default_rng(seed), count, 5, world_size=30.0)


@pytest.mark.parametrize("seed", range(4))
def test_trades_conserve_every_item_exactly_and_never_overdraw(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pop = dense_market(seed)
    totals = pop.inventory.sum(axis=0, dtype=np.float64)
    trades = 0
    for _ in range(150):
        proposals = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=pop.matrices.shape))
        apply_update(pop.matrices, proposals, alpha=0.3)
        trades += trade_step(pop, rng, ENV).trades
        np.testing.assert_array_equal(pop.inventory.sum(axis=0, dtype=np.float64), totals)
        assert (pop.inventory >= 0).all()
    assert trades > 100  # the market really traded


def test_every_trade_respects_distance_amount_and_one_request_per_target() -> None:
    rng = np.random.default_rng(7)
    env = ENV.model_copy(update={"max_trade_distance": 8.0, "max_trade_amount": 2.5})
    pop = dense_market(7, count=60)
    for _ in range(60):
        stats = trade_step(pop, rng, env)
        pos = pop.positions.astype(np.float64)
        dist = np.hypot(*(pos[stats.requester] - pos[stats.target]).T)
        assert (dist <= env.max_trade_distance + 1e-4).all()
        assert (stats.given <= env.max_trade_amount).all() and (stats.received <= env.max_trade_amount).all()
        assert (stats.given > 0).all() and (stats.received > 0).all()
        assert np.unique(stats.target).size == stats.trades  # a target accepts at most one request
        assert np.unique(stats.requester).size == stats.trades  # a requester sends one request
        assert (stats.requester != stats.target).all()
        assert (stats.give_item != stats.want_item).all()  # no identity trades
        assert (stats.want_item == pop.desired[stats.requester]).all()
        np.testing.assert_array_equal(np.mod(stats.given, QUANTUM), 0)


def two_agents(
    ask: float, reverse_ask: float, target_rate: float, reverse_target_rate: float
) -> MarketPopulation:
    """A wants gold and holds diamonds; B holds gold, wants apples nobody has (so only A asks)."""
    matrices = np.ones((2, 5, 5), np.float32)
    matrices[0, DIAMOND, GOLD] = ask  # A asks `ask` gold per diamond it gives
    matrices[0, GOLD, DIAMOND] = reverse_ask
    matrices[1, GOLD, DIAMOND] = target_rate  # B asks `target_rate` diamonds per gold it gives
    matrices[1, DIAMOND, GOLD] = reverse_target_rate
    inventory = np.zeros((2, 5), np.float32)
    inventory[0, DIAMOND] = 10.0
    inventory[1, GOLD] = 10.0
    return MarketPopulation(
        agent_ids=["A", "B"],
        desired=np.array([GOLD, APPLE]),
        inventory=inventory,
        matrices=matrices,
        positions=np.array([[0.0, 0.0], [3.0, 4.0]], np.float32),
    )


def test_the_requester_quote_is_what_is_checked_and_what_is_executed() -> None:
    # A asks 2 gold per diamond; B would give a gold for 0.4 diamonds: 2 * 0.4 <= 1, B accepts.
    pop = two_agents(ask=2.0, reverse_ask=0.5, target_rate=0.4, reverse_target_rate=5.0)
    stats = trade_step(pop, np.random.default_rng(0), ENV)
    assert stats.trades == 1
    # B gives at most 5 gold, so A gives 2.5 diamonds for 5 gold (its own rate, not the reverse).
    np.testing.assert_array_equal(pop.inventory[0, [DIAMOND, GOLD]], [7.5, 5.0])
    np.testing.assert_array_equal(pop.inventory[1, [DIAMOND, GOLD]], [2.5, 5.0])


def test_swapping_the_rate_direction_changes_the_outcome() -> None:
    # The mirror image: A now asks only 0.5 gold per diamond -> 5 diamonds buy 2.5 gold.
    pop = two_agents(ask=0.5, reverse_ask=2.0, target_rate=0.4, reverse_target_rate=5.0)
    trade_step(pop, np.random.default_rng(0), ENV)
    np.testing.assert_array_equal(pop.inventory[0, [DIAMOND, GOLD]], [5.0, 2.5])
    np.testing.assert_array_equal(pop.inventory[1, [DIAMOND, GOLD]], [5.0, 7.5])


@pytest.mark.parametrize(
    ("ask", "target_rate", "paid"),
    [(2.0, 0.6, 1 / 1.2), (4.0, 2.5, 0.1)],
)
def test_a_quote_below_the_target_price_is_accepted_with_probability_of_the_paid_fraction(
    ask: float, target_rate: float, paid: float
) -> None:
    # Read the other way round (reverse entries 0.5 and 0.1) every quote would pay 20x the price.
    rng = np.random.default_rng(5)
    trials, accepted = 2000, 0
    for _ in range(trials):
        pop = two_agents(ask=ask, reverse_ask=0.5, target_rate=target_rate, reverse_target_rate=0.1)
        before = pop.inventory.copy()
        stats = trade_step(pop, rng, ENV)
        assert stats.requests == 1 and pop.attempted[0] == 1
        if stats.trades:
            accepted += 1
            assert pop.inventory[0, GOLD] == pytest.approx(stats.given[0] * ask, abs=QUANTUM)
        else:
            np.testing.assert_array_equal(pop.inventory, before)
            assert pop.success_rate()[0] == 0.0
    assert abs(accepted / trials - paid) < 0.03


def test_a_target_chooses_requests_in_proportion_to_one_over_one_plus_distance() -> None:
    # Two requesters want B's gold; B is 1 away from the first, 9 from the second: p = 0.5 / 0.6.
    matrices = np.full((3, 5, 5), 0.5, np.float32)
    inventory = np.zeros((3, 5), np.float32)
    inventory[:2, DIAMOND] = 10.0
    inventory[2, GOLD] = 10.0
    base = MarketPopulation(
        agent_ids=["near", "far", "B"],
        desired=np.array([GOLD, GOLD, APPLE]),
        inventory=inventory,
        matrices=matrices,
        positions=np.array([[1.0, 0.0], [-9.0, 0.0], [0.0, 0.0]], np.float32),
    )
    rng = np.random.default_rng(3)
    trials, near = 3000, 0
    for _ in range(trials):
        pop = MarketPopulation(base.agent_ids, base.desired, base.inventory.copy(), matrices, base.positions)
        stats = trade_step(pop, rng, ENV)
        assert stats.trades == 1 and stats.requests == 2
        near += int(stats.requester[0] == 0)
    assert abs(near / trials - 0.5 / 0.6) < 0.03


def test_success_rate_stays_in_unit_interval_and_counts_own_requests() -> None:
    rng = np.random.default_rng(11)
    pop = dense_market(11)
    for _ in range(50):
        stats = trade_step(pop, rng, ENV)
        rate = pop.success_rate()
        assert ((rate >= 0) & (rate <= 1)).all()
    assert pop.successful.sum() > 0 and (pop.successful <= pop.attempted).all()
    assert stats.requests <= pop.size


def test_fitness_is_desired_holding_plus_gain_plus_trade_bonus() -> None:
    pop = two_agents(ask=2.0, reverse_ask=0.5, target_rate=0.4, reverse_target_rate=5.0)
    start = pop.inventory.copy()
    trade_step(pop, np.random.default_rng(0), ENV)
    # A: 5 gold now, 0 before, one executed request. B: wants apples, has none.
    np.testing.assert_allclose(fitness(pop, start, trade_bonus=0.1), [5.0 + 5.0 + 0.1, 0.0])


def test_population_rejects_duplicate_ids_and_mismatched_arrays() -> None:
    pop = two_agents(1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="repeated: A"):
        MarketPopulation(["A", "A"], pop.desired, pop.inventory, pop.matrices, pop.positions)
    with pytest.raises(ValueError, match="positions"):
        MarketPopulation(["A", "B"], pop.desired, pop.inventory, pop.matrices, pop.positions[:1])
    with pytest.raises(ValueError, match="desired item"):
        MarketPopulation(["A", "B"], np.array([0, 7]), pop.inventory, pop.matrices, pop.positions)
    with pytest.raises(ValueError, match="shape"):
        pop.set_matrices(np.ones((3, 5, 5)))
    with pytest.raises(ValueError, match="finite"):
        pop.set_matrices(np.full((2, 5, 5), np.nan))


def test_random_market_has_unique_ids_and_original_initial_ranges() -> None:
    pop = MarketPopulation.random(np.random.default_rng(0), 50, 5, 100.0, id_prefix="sim-")
    assert len(set(pop.agent_ids)) == 50 and pop.agent_ids[0] == "sim-0"
    assert pop.inventory.min() >= 5 and pop.inventory.max() <= 14
    assert ((pop.positions >= 0) & (pop.positions <= 100)).all()
    assert pop.states().shape == (50, 61)


def test_markets_stepped_together_stay_independent() -> None:
    # Two markets of 20 agents at the same places: no trade and no market-mean rate crosses them.
    rng = np.random.default_rng(2)
    one = MarketPopulation.random(rng, 20, 5, world_size=30.0)
    pop = MarketPopulation(
        agent_ids=[f"m{e}a{k}" for e in range(2) for k in range(20)],
        desired=np.tile(one.desired, 2),
        inventory=np.tile(one.inventory, (2, 1)),
        matrices=np.concatenate([one.matrices, one.matrices * 2.0]),
        positions=np.tile(one.positions, (2, 1)),
        markets=2,
    )
    states = pop.states()
    np.testing.assert_allclose(states[:20], one.states(), rtol=1e-6)
    np.testing.assert_allclose(
        states[20:, 2 * 5 + 25 : -1], 2.0 * one.states()[:, 2 * 5 + 25 : -1], rtol=1e-6
    )
    totals = pop.inventory.reshape(2, 20, 5).sum(axis=1, dtype=np.float64)
    for _ in range(40):
        stats = trade_step(pop, rng, ENV)
        assert (stats.requester // 20 == stats.target // 20).all()
    np.testing.assert_array_equal(pop.inventory.reshape(2, 20, 5).sum(axis=1, dtype=np.float64), totals)
    with pytest.raises(ValueError, match="3 markets"):
        MarketPopulation.random(rng, 20, 5, 30.0, markets=3)


def test_a_requester_chooses_among_accepting_targets_in_proportion_to_one_over_one_plus_distance() -> None:
    # A wants gold; two gold holders (wanting apples nobody has) at distance 1 and 9 both accept.
    matrices = np.full((3, 5, 5), 0.5, np.float32)
    inventory = np.zeros((3, 5), np.float32)
    inventory[0, DIAMOND] = 10.0
    inventory[1:, GOLD] = 10.0
    base = MarketPopulation(
        agent_ids=["A", "near", "far"],
        desired=np.array([GOLD, APPLE, APPLE]),
        inventory=inventory,
        matrices=matrices,
        positions=np.array([[0.0, 0.0], [0.0, 1.0], [9.0, 0.0]], np.float32),
    )
    rng = np.random.default_rng(4)
    trials, near = 3000, 0
    for _ in range(trials):
        pop = MarketPopulation(base.agent_ids, base.desired, base.inventory.copy(), matrices, base.positions)
        stats = trade_step(pop, rng, ENV)
        assert stats.trades == 1 and stats.requests == 1
        near += int(stats.target[0] == 1)
    assert abs(near / trials - 0.5 / 0.6) < 0.03
