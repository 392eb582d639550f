"""How each requester of a market step finds its target (blockmarket.market.rules.trade_step, step 5
of docs/market.md): every candidate draws its acceptance, and the requester takes the winner of an
exponential race ∝ 1/(1 + distance) among those that accept.

Two exact ways to get that outcome: :func:`choose_enumerated` makes every candidate pair in range
(O(pairs in range)); :func:`choose_sampled` draws candidates one by one in the race's order and stops
at the first acceptor (O(agents)). :func:`cheaper_choice` picks one per step. They use the random
stream differently, so one seed gives different (equally distributed) markets per way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from blockmarket.core.state import FloatArray, IntArray
from blockmarket.market.neighbours import (
    DENSE_MAX_AGENTS,
    BoolArray,
    CandidatePairs,
    InRangeSampler,
    pairs_in_range,
    scanned_per_requester,
)


def race_winners(groups: IntArray, cost: FloatArray) -> IntArray:
    """Index of the cheapest member of every run of equal values in ``groups`` (runs must be
    contiguous; ties go to the first). With cost = E / w, E ~ Exp(1) i.i.d., member i of a run wins
    with probability w_i / sum(w) (an exponential race), in O(len) without sorting."""
    if groups.size == 0:
        return np.zeros(0, np.int64)
    run_start = np.ones(groups.size, dtype=bool)
    run_start[1:] = groups[1:] != groups[:-1]
    starts = np.flatnonzero(run_start)
    best = np.minimum.reduceat(cost, starts)
    hits = np.flatnonzero(cost == np.repeat(best, np.diff(starts, append=groups.size)))
    first = np.ones(hits.size, dtype=bool)
    first[1:] = groups[hits[1:]] != groups[hits[:-1]]
    return hits[first]


def race_costs(rng: np.random.Generator, squared_distance: FloatArray) -> FloatArray:
    """E * (1 + distance), E ~ Exp(1): the race that picks a pair with probability ∝ 1/(1+distance)."""
    exponential = rng.standard_exponential(squared_distance.size, dtype=np.float32)
    return (exponential * (np.float32(1.0) + np.sqrt(squared_distance))).astype(np.float32, copy=False)


Choice = Literal["auto", "sample", "enumerate", "grid", "dense"]
# nearby agents per requester up to which enumerating is cheaper (measured: 62 yes, 93 no; docs/market.md)
ENUMERATE_MAX_SCANNED = 80.0
SAMPLE_ROUNDS = 4  # rounds of proposals per requester before it falls back to enumerating its pairs
SAMPLE_PER_ROUND = 8  # proposals per requester per round (each kept one is an exact 1/(1+d) draw)


def cheaper_choice(
    positions: FloatArray, market_size: int, max_distance: float, can_offer: BoolArray
) -> Choice:
    """ "enumerate" where every requester has few agents nearby (markets of at most DENSE_MAX_AGENTS
    agents, or up to ENUMERATE_MAX_SCANNED agents in its nearby cells on average), else "sample". Both
    cost O(agents) then: at most that many candidates per requester, or a bounded number of draws."""
    if market_size <= DENSE_MAX_AGENTS:
        return "enumerate"
    scanned = scanned_per_requester(positions, market_size, max_distance, can_offer)
    return "enumerate" if scanned <= ENUMERATE_MAX_SCANNED else "sample"


def choose_enumerated(
    candidates: CandidatePairs,
    rng: np.random.Generator,
    ask: FloatArray,
    price: FloatArray,
    deal: IntArray,
    exclude: IntArray | None = None,
) -> tuple[IntArray, IntArray, FloatArray, BoolArray]:
    """Every candidate pair draws its acceptance, and each requester picks one accepting target by an
    exponential race ∝ 1/(1+distance): (requester, target, squared distance) per request, and which
    agents asked (some candidate holds what they want). ``exclude``: pairs ``r * N + t`` to leave out."""
    count = price.shape[0]
    order, req, tgt = candidates.order, candidates.requester_rank, candidates.target_rank
    squared = candidates.squared_distance
    if exclude is not None:
        keep = np.flatnonzero(~np.isin(order[req] * count + order[tgt], exclude))
        req, tgt, squared = req[keep], tgt[keep], squared[keep]
    # per-agent tables permuted into the grid order once: cheaper than K gathers through ``order``
    price_ranked = price[order].reshape(-1)
    cell = tgt * price.shape[1]  # in place below: K-sized temporaries cost page faults, not just copies
    cell += deal[order][req]
    quote = price_ranked[cell]
    asking_ranked = np.zeros(count, dtype=bool)
    asking_ranked[req[np.flatnonzero(quote < np.inf)]] = True  # flatnonzero: 3x faster than a mask
    asking = np.zeros(count, dtype=bool)
    asking[order] = asking_ranked
    # accept iff u * ask * M_t < 1: always when the quote pays t's price, else with probability f
    draw = rng.random(req.size, dtype=np.float32)
    draw *= ask[order][req]
    with np.errstate(invalid="ignore"):  # a draw of exactly 0 times a non-holder's inf quote: NaN, refused
        draw *= quote
    accepts = np.flatnonzero(draw < 1.0)
    req, tgt, squared = req[accepts], tgt[accepts], squared[accepts]
    chosen = race_winners(req, race_costs(rng, squared))  # each requester asks one accepting target
    return order[req[chosen]], order[tgt[chosen]], squared[chosen], asking


def choose_sampled(
    positions: FloatArray,
    market_size: int,
    max_distance: float,
    rng: np.random.Generator,
    can_offer: BoolArray,
    ask: FloatArray,
    price: FloatArray,
    deal: IntArray,
) -> tuple[IntArray, IntArray, FloatArray, BoolArray]:
    """The same choice as :func:`choose_enumerated`, in O(agents): draw targets ∝ 1/(1+distance) with
    replacement (InRangeSampler), skip those already seen, and stop at the first that holds the wanted
    item and accepts its acceptance draw. Skipping repeats turns draws with replacement into the order
    of the exponential race (sampling without replacement ∝ weight), so the first acceptor has exactly
    the race's distribution. Requesters still open after SAMPLE_ROUNDS rounds enumerate their remaining
    pairs (those not yet seen) and finish the race there."""
    count = price.shape[0]
    state = _Sampling.start(InRangeSampler.build(positions, market_size, max_distance, can_offer))
    for _ in range(SAMPLE_ROUNDS):
        if state.open_rows.size == 0:
            break
        state.round(rng, ask, price, deal)
    agent = state.agent
    asking = np.zeros(count, dtype=bool)
    asking[agent[state.holder_seen]] = True
    done = np.flatnonzero(state.target >= 0)
    req, tgt, d2 = agent[done], state.target[done], state.squared[done]
    if state.open_rows.size:
        rest = np.zeros(count, dtype=bool)
        rest[agent[state.open_rows]] = True
        candidates = pairs_in_range(positions, market_size, max_distance, rest)
        refused = state.seen[state.open_rows]
        exclude = np.sort((agent[state.open_rows, None] * count + refused)[refused >= 0])
        more = choose_enumerated(candidates, rng, ask, price, deal, exclude)
        req, tgt, d2 = (
            np.concatenate([req, more[0]]),
            np.concatenate([tgt, more[1]]),
            np.concatenate([d2, more[2]]),
        )
        asking |= more[3]
    return req, tgt, d2, asking


@dataclass
class _Sampling:
    """Per requester (rows of the sampler): its chosen target so far (-1: none), the targets that
    refused it, whether one of them held what it wants, and which rows are still open."""

    sampler: InRangeSampler
    agent: IntArray  # [R] requester agents
    target: IntArray  # [R] chosen target agent, -1 while open
    squared: FloatArray  # [R] its squared distance
    holder_seen: BoolArray  # [R]
    seen: IntArray  # [R, V] targets that already refused (-1: padding)
    open_rows: IntArray  # rows still looking

    @classmethod
    def start(cls, sampler: InRangeSampler) -> _Sampling:
        agent = sampler.grid.order[sampler.ranks]
        return cls(
            sampler=sampler,
            agent=agent,
            target=np.full(agent.size, -1, dtype=np.int64),
            squared=np.zeros(agent.size, dtype=np.float32),
            holder_seen=np.zeros(agent.size, dtype=bool),
            seen=np.zeros((agent.size, 0), dtype=np.int64),
            open_rows=np.flatnonzero(sampler.total > 0),  # 0: nobody else in the nearby cells
        )

    def round(self, rng: np.random.Generator, ask: FloatArray, price: FloatArray, deal: IntArray) -> None:
        """SAMPLE_PER_ROUND draws for every open row, taken in order: the first fresh one that holds
        the wanted item and accepts closes the row."""
        open_rows, order = self.open_rows, self.sampler.grid.order
        ranks, d2 = self.sampler.draw(open_rows, SAMPLE_PER_ROUND, rng)
        t = np.where(ranks >= 0, order[np.maximum(ranks, 0)], -1)
        later = np.tril(np.ones((t.shape[1], t.shape[1]), dtype=bool), k=-1)
        repeat = (t[:, :, None] == self.seen[open_rows][:, None, :]).any(axis=2)
        repeat |= ((t[:, :, None] == t[:, None, :]) & later).any(axis=2)
        fresh = (t >= 0) & ~repeat
        r = self.agent[open_rows, None]
        quote = np.where(fresh, price[np.maximum(t, 0), deal[r]], np.float32(np.inf))
        holds = quote < np.inf
        draw = rng.random(t.shape, dtype=np.float32)
        draw *= ask[r]
        with np.errstate(invalid="ignore"):  # 0 x inf (a non-holder) is NaN: never a success
            draw *= quote
        success = holds & (draw < 1.0)
        won = success.any(axis=1)
        first = success.argmax(axis=1)[won]
        self.target[open_rows[won]] = t[won, first]
        self.squared[open_rows[won]] = d2[won, first]
        self.holder_seen[open_rows] |= holds.any(axis=1)
        self.seen = np.concatenate([self.seen, np.full((self.agent.size, t.shape[1]), -1, np.int64)], axis=1)
        self.seen[open_rows[~won], -t.shape[1] :] = np.where(fresh[~won], t[~won], -1)
        self.open_rows = open_rows[~won]
