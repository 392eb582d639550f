"""The stacked population forward is exactly P TradingNetworks, in one batched call."""

from __future__ import annotations

import math

import numpy as np
import torch

from blockmarket.core.state import realistic_states
from conversion.networks import TradingNetwork
from training.policy import PolicyPopulation


def test_batched_forward_matches_each_network_on_its_own() -> None:
    generator = torch.Generator().manual_seed(0)
    population = PolicyPopulation.fresh(6, 5, 32, generator).mutated(np.arange(6), 0.05, generator)
    states = realistic_states(np.random.default_rng(0), 6 * 7, 5).reshape(6, 7, 61)
    batched = population.forward(states)
    assert batched.shape == (6, 7, 5, 5)
    for k in range(6):
        network = TradingNetwork(61, 32, 5)
        network.load_state_dict(population.state_dict(k))
        with torch.no_grad():
            alone = network(torch.from_numpy(states[k])).numpy().reshape(7, 5, 5)
        np.testing.assert_allclose(batched[k], alone, rtol=1e-5, atol=1e-6)
    assert (batched > 0.1).all()


def test_fresh_networks_follow_the_linear_default_init_and_differ() -> None:
    population = PolicyPopulation.fresh(4, 5, 32, torch.Generator().manual_seed(1))
    first = population.params["shared.0.weight"]
    assert first.shape == (4, 32, 61)
    assert float(first.abs().max()) <= 1 / math.sqrt(61)
    assert float(population.params["trading_matrix_head.bias"].abs().max()) <= 1 / math.sqrt(32)
    assert not torch.equal(first[0], first[1])


def test_take_concat_and_state_dict_round_trip() -> None:
    generator = torch.Generator().manual_seed(2)
    a = PolicyPopulation.fresh(3, 5, 16, generator)
    b = PolicyPopulation.fresh(2, 5, 16, generator)
    both = PolicyPopulation.concat([a, b])
    assert len(both) == 5
    picked = both.take([4, 0])
    torch.testing.assert_close(picked.state_dict(0)["shared.2.weight"], b.params["shared.2.weight"][1])
    rebuilt = PolicyPopulation.from_state_dicts([a.state_dict(0), a.state_dict(2)], num_items=5)
    torch.testing.assert_close(
        rebuilt.params["trading_matrix_head.weight"][1], a.params["trading_matrix_head.weight"][2]
    )
    picked.params["shared.0.bias"] += 1.0  # copies: the source population is untouched
    torch.testing.assert_close(both.params["shared.0.bias"][4], b.params["shared.0.bias"][1])
