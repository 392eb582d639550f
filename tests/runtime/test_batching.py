"""A batch of markets' states in one pass equals each market's states built alone."""

from __future__ import annotations

import numpy as np

from blockmarket.core.state import build_states, initial_matrices
from runtime.batching import market_inputs


def test_each_agents_market_input_is_its_own_markets_other_agents_mean() -> None:
    rng = np.random.default_rng(3)
    sizes = np.array([3, 1, 5, 2])
    matrices = initial_matrices(rng, int(sizes.sum()), 5)
    rates = rng.uniform(0.2, 5.0, size=(5, 5)).astype(np.float32)
    given = [None, None, None, rates]  # the last market's tick sent its own rates
    together = market_inputs(matrices, sizes, given)
    start = 0
    for size, market_mean in zip(sizes, given, strict=True):
        block = slice(start, start + size)
        inventory = rng.integers(0, 20, size=(size, 5)).astype(np.float32)
        desired, rate = np.arange(size) % 5, np.full(size, 0.5, np.float32)
        alone = build_states(inventory, desired, matrices[block], rate, market_mean=market_mean)
        batched = build_states(inventory, desired, matrices[block], rate, market_mean=together[block])
        np.testing.assert_allclose(batched, alone, rtol=1e-6, atol=1e-7)
        start += size
    assert not together[3].any()  # the lone agent of the second market: no market data
