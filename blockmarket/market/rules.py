"""Market mechanics for a whole population at once: who trades with whom, how much, and fitness.

Shared by training and the live simulator, so the rules exist once. Pure numpy, vectorized over agents
and over candidate pairs (no per-agent Python loop). The meaning of a trading matrix, used identically
when choosing and when executing a trade (docs/market.md has a worked example):

    M[i, j] = units of item j the owner asks in return for giving one unit of item i.

One step: every agent is a *requester* for its desired item d. It offers g = its largest non-desired
holding, at its own quote ``ask = M_r[g, d]`` (it gives x of g and asks x * ask of d). A target t in
range that holds d is paid the fraction ``f = x / ((x * ask) * M_t[d, g]) = 1 / (ask * M_t[d, g])``
of its own price for that d: it accepts when f >= 1, and with probability f otherwise. The requester
sends one request, to an accepting target drawn with probability proportional to 1/(1+distance); each
target accepts at most one of the requests it got, again drawn proportional to 1/(1+distance).
Executed amounts are exactly the quoted ones, rounded *down* to the 1/64 grid (the requester never gets
more than it asked for).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from blockmarket.core.config import EnvironmentConfig
from blockmarket.core.state import (
    FloatArray,
    IntArray,
    build_states,
    initial_inventory,
    initial_matrices,
    market_mean_matrices,
)
from blockmarket.market.neighbours import Method, pairs_in_range
from blockmarket.market.targets import (
    Choice,
    cheaper_choice,
    choose_enumerated,
    choose_sampled,
    race_costs,
    race_winners,
)

# Trade amounts are multiples of 1/64: with inventories on that grid every transfer is exact in float32
# (for holdings below 2**18), so the market conserves items bit-for-bit.
QUANTUM = 1.0 / 64.0
TRADE_BONUS = 0.1  # fitness per executed own request: a small push towards trading at all


@dataclass
class MarketPopulation:
    """The agents of a market: ids, wants, holdings, rates, places and trade counters ([N, ...]).

    With ``markets`` = E > 1 the N agents form E equal consecutive blocks that are independent markets
    (nobody trades or averages rates across blocks), stepped together in one vectorized call; training
    uses this to play many markets per generation.
    """

    agent_ids: list[str]
    desired: IntArray  # [N] index into the item list
    inventory: FloatArray  # [N, n]
    matrices: FloatArray  # [N, n, n], M[i, j] = units of j asked per unit of i given
    positions: FloatArray  # [N, 2]
    successful: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))  # own requests executed
    attempted: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))  # own requests sent
    markets: int = 1

    def __post_init__(self) -> None:
        self.desired = np.asarray(self.desired, dtype=np.int64)
        self.inventory = np.asarray(self.inventory, dtype=np.float32)
        self.matrices = np.asarray(self.matrices, dtype=np.float32)
        self.positions = np.asarray(self.positions, dtype=np.float32)
        count = len(self.agent_ids)
        # Counters default to zero (a new market); given ones are copied so callers keep theirs.
        self.successful = np.array(self.successful if len(self.successful) else np.zeros(count), np.int64)
        self.attempted = np.array(self.attempted if len(self.attempted) else np.zeros(count), np.int64)
        if count == 0:
            raise ValueError("a market needs at least one agent")
        if self.markets < 1 or count % self.markets:
            raise ValueError(f"{count} agents cannot form {self.markets} markets of equal size")
        n = self.inventory.shape[-1]
        shapes = {
            "desired": (self.desired.shape, (count,)),
            "inventory": (self.inventory.shape, (count, n)),
            "matrices": (self.matrices.shape, (count, n, n)),
            "positions": (self.positions.shape, (count, 2)),
            "successful": (self.successful.shape, (count,)),
            "attempted": (self.attempted.shape, (count,)),
        }
        wrong = [f"{name} {got} (expected {want})" for name, (got, want) in shapes.items() if got != want]
        if wrong:
            raise ValueError(f"market arrays disagree with {count} agents and {n} items: " + ", ".join(wrong))
        repeated = sorted(agent for agent, times in Counter(self.agent_ids).items() if times > 1)
        if repeated:
            raise ValueError(f"agent ids must be unique; repeated: {', '.join(repeated[:5])}")
        if self.desired.min() < 0 or self.desired.max() >= n:
            low, high = self.desired.min(), self.desired.max()
            raise ValueError(f"desired item indices must be in [0, {n}); got {low}..{high}")
        if (self.successful > self.attempted).any() or (self.successful < 0).any():
            raise ValueError("trade counters need 0 <= successful <= attempted for every agent")

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        count: int,
        num_items: int,
        world_size: float,
        id_prefix: str = "agent",
        markets: int = 1,
    ) -> MarketPopulation:
        """A fresh market (``count`` agents in all) as the original started one: random wants, 5..14 of
        each item, rates in [0.5, 2], uniform positions."""
        return cls(
            agent_ids=[f"{id_prefix}{k}" for k in range(count)],
            desired=rng.integers(0, num_items, size=count),
            inventory=initial_inventory(rng, count, num_items),
            matrices=initial_matrices(rng, count, num_items),
            positions=rng.uniform(0.0, world_size, size=(count, 2)).astype(np.float32),
            markets=markets,
        )

    @property
    def size(self) -> int:
        return len(self.agent_ids)

    @property
    def num_items(self) -> int:
        return int(self.inventory.shape[1])

    @property
    def market_size(self) -> int:
        """Agents per market (all of them unless ``markets`` > 1)."""
        return self.size // self.markets

    def success_rate(self) -> FloatArray:
        """successful / max(attempted, 1): always in [0, 1] (the original's could exceed 1)."""
        return (self.successful / np.maximum(self.attempted, 1)).astype(np.float32)

    def states(self, market_mean: npt.ArrayLike | None = None) -> FloatArray:
        """The policy input X [N, D] for every agent (blockmarket.core.state.build_states); the market
        mean of an agent is over the other agents of its own market."""
        if market_mean is None and self.markets > 1:
            n = self.num_items
            seats_first = self.matrices.reshape(self.markets, self.market_size, n, n).swapaxes(0, 1)
            market_mean = market_mean_matrices(seats_first).swapaxes(0, 1).reshape(self.matrices.shape)
        return build_states(self.inventory, self.desired, self.matrices, self.success_rate(), market_mean)

    def set_matrices(self, matrices: npt.ArrayLike) -> None:
        """Replace all agents' matrices (e.g. with the runtime's reply), refusing a wrong shape or NaN."""
        new = np.asarray(matrices, dtype=np.float32)
        if new.shape != self.matrices.shape:
            raise ValueError(f"matrices of shape {new.shape} for a market of shape {self.matrices.shape}")
        if not np.isfinite(new).all() or (new <= 0).any():
            raise ValueError("trading matrices must be finite and positive")
        self.matrices[...] = new


@dataclass(frozen=True)
class TradeStats:
    """What one market step did; the per-trade arrays are [K] for the K executed trades."""

    requests: int  # agents that asked someone (counted in ``attempted``)
    requester: IntArray  # gave ``given`` of ``give_item`` ...
    target: IntArray  # ... to this agent, which gave ``received`` of ``want_item`` back
    give_item: IntArray
    want_item: IntArray
    given: FloatArray
    received: FloatArray

    @property
    def trades(self) -> int:
        return int(self.requester.size)

    @property
    def volume(self) -> float:
        """Units moved in both directions."""
        return float(self.given.sum(dtype=np.float64) + self.received.sum(dtype=np.float64))


def _on_grid(amount: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.floor(amount / QUANTUM) * QUANTUM


# size: one market step, phase by phase in the order docs/market.md gives them
def trade_step(
    pop: MarketPopulation, rng: np.random.Generator, env: EnvironmentConfig, pairs: Choice = "auto"
) -> TradeStats:
    """Run one market step in place (inventories and counters of ``pop``) and report what happened.

    ``pairs`` picks how each requester finds its target (blockmarket.market.targets): "sample" draws
    candidates one by one (O(agents) however many pairs are in range); "enumerate" ("grid", "dense":
    blockmarket.market.neighbours, the same market for the same seed) makes every pair in range;
    "auto" (default) takes whichever is cheaper for this step. All follow the same rules, with the
    same distribution of outcomes, from different random streams."""
    count, n = pop.inventory.shape
    agents = np.arange(count)
    inv = pop.inventory
    want = pop.desired

    # What each agent offers: its largest non-desired holding (random tie-break), if it has any.
    offer = np.where(inv >= QUANTUM, inv + rng.random((count, n)) * (QUANTUM / 2), -np.inf)
    offer[agents, want] = -np.inf
    give = offer.argmax(axis=1)
    can_offer = np.isfinite(offer[agents, give])
    ask = pop.matrices[agents, give, want]  # units of `want` asked per unit of `give`

    # t's price for what r asks is M_t[d, g]; +inf where t holds no d (then t is no candidate). Per-agent
    # tables are indexed by agent here; the enumerating path permutes them into its grid order.
    price = np.where((inv >= QUANTUM)[:, :, None], pop.matrices, np.float32(np.inf)).reshape(count, n * n)
    deal = want * n + give  # where r's (d, g) sits in a flattened n×n matrix
    where = (pop.positions, pop.market_size, env.max_trade_distance)
    if pairs == "auto":
        pairs = cheaper_choice(*where, can_offer)
    if pairs == "sample":
        req, tgt, squared, asking = choose_sampled(*where, rng, can_offer, ask, price, deal)
    else:
        method: Method = "auto" if pairs == "enumerate" else pairs
        candidates = pairs_in_range(*where, can_offer, method)
        req, tgt, squared, asking = choose_enumerated(candidates, rng, ask, price, deal)
    by_target = np.argsort(tgt, kind="stable")
    accepted = by_target[race_winners(tgt[by_target], race_costs(rng, squared)[by_target])]
    req, tgt = req[accepted], tgt[accepted]  # each target accepts one request

    # An agent may give as requester and as target in one step: split a holding between the two uses.
    g, w, rate = give[req], want[req], ask[req].astype(np.float64)
    commitments = np.zeros((count, n), dtype=np.int64)
    np.add.at(commitments, (req, g), 1)
    np.add.at(commitments, (tgt, w), 1)
    share = _on_grid(inv.astype(np.float64) / np.maximum(commitments, 1))
    limit = env.max_trade_amount
    cap = float(np.floor(limit / QUANTUM) * QUANTUM)
    given = _on_grid(np.minimum(np.minimum(share[req, g], cap), np.minimum(share[tgt, w], limit) / rate))
    received = np.minimum(np.minimum(_on_grid(given * rate), share[tgt, w]), cap)
    done = (given > 0) & (received > 0)
    req, tgt, g, w, given, received = req[done], tgt[done], g[done], w[done], given[done], received[done]

    np.add.at(inv, (req, g), -given.astype(np.float32))
    np.add.at(inv, (tgt, g), given.astype(np.float32))
    np.add.at(inv, (tgt, w), -received.astype(np.float32))
    np.add.at(inv, (req, w), received.astype(np.float32))
    pop.attempted += asking
    pop.successful[req] += 1
    return TradeStats(
        requests=int(asking.sum()),
        requester=req,
        target=tgt,
        give_item=g,
        want_item=w,
        given=given.astype(np.float32),
        received=received.astype(np.float32),
    )


def desired_holdings(pop: MarketPopulation) -> FloatArray:
    """How much of its desired item every agent holds ([N])."""
    return pop.inventory[np.arange(pop.size), pop.desired]


def fitness(
    pop: MarketPopulation, start_inventory: FloatArray, trade_bonus: float = TRADE_BONUS
) -> FloatArray:
    """Per-agent fitness ([N]): desired item held + its gain since ``start_inventory`` + a small bonus per
    executed own request (the original's recipe, with the counters of this market only)."""
    held = desired_holdings(pop)
    start = start_inventory[np.arange(pop.size), pop.desired]
    return (held + (held - start) + trade_bonus * pop.successful).astype(np.float32)
