"""Helpers for the NPU tests: seeded TradingNetworks of the size the NPU tests use."""

from __future__ import annotations

import torch

from blockmarket.core.state import state_dim
from conversion.networks import TradingNetwork

NUM_ITEMS = 5
HIDDEN = 128


def trading_network(seed: int, head_scale: float = 1.0) -> TradingNetwork:
    """A seeded TradingNetwork; ``head_scale`` widens its outputs like a trained policy's (0.1 .. ~6)."""
    torch.manual_seed(seed)
    network = TradingNetwork(state_dim(NUM_ITEMS), HIDDEN, NUM_ITEMS).eval()
    with torch.no_grad():
        network.trading_matrix_head.weight.mul_(head_scale)
        network.trading_matrix_head.bias.mul_(head_scale)
    return network
