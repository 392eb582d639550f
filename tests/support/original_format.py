"""Checkpoints written exactly as the original trainer wrote them (shared test helper).

A plain ``torch.save`` of the eight-key dict of ORIGIN.md: the network's state_dict, an Adam
optimizer_state_dict (after one step, so it carries per-parameter state), numpy float64 trading
matrix and position, a Python inventory dict and reward list. Import it from any test area.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from blockmarket.core.state import state_dim
from conversion.networks import ARCHITECTURES, spec_of

ITEMS_5 = ("diamond", "gold", "apple", "emerald", "redstone")
ITEMS_8 = (*ITEMS_5, "iron", "coal", "lapis")


def make_network(architecture: str, num_items: int, hidden_dim: int = 128, seed: int = 0) -> nn.Module:
    """A freshly initialised registered network (deterministic for a seed), in eval mode."""
    torch.manual_seed(seed)
    network = ARCHITECTURES[architecture].network(state_dim(num_items), hidden_dim, num_items)
    return network.eval()


def adam_state(network: nn.Module, learning_rate: float = 0.0005) -> dict[str, object]:
    """An Adam optimizer_state_dict after one step, as the original saved it."""
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    spec = spec_of(network)
    out = network(torch.zeros(2, spec.input_dim))
    loss = torch.stack([o.sum() for o in out]).sum() if isinstance(out, tuple) else out.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer.state_dict()


def write_original_checkpoint(
    path: Path,
    network: nn.Module,
    *,
    agent_id: str,
    items: tuple[str, ...] = ITEMS_5,
    desired_item: str | None = None,
    reward_history: list[float] | None = None,
    seed: int = 0,
) -> Path:
    """`torch.save` of the original's dict (the network's weights are saved as they are now)."""
    rng = np.random.default_rng(seed)
    n = len(items)
    matrix = rng.uniform(0.5, 2.0, size=(n, n))
    np.fill_diagonal(matrix, 1.0)
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    payload = {
        "network_state_dict": weights,
        "optimizer_state_dict": adam_state(network),
        "agent_id": agent_id,
        "desired_item": desired_item or items[int(rng.integers(n))],
        "inventory": {item: int(rng.integers(5, 15)) for item in items},
        "trading_matrix": matrix,
        "position": rng.uniform(0, 100, size=2),
        "reward_history": list(rng.normal(10, 3, size=30)) if reward_history is None else reward_history,
    }
    network.load_state_dict(weights)  # the optimizer step must not change what the test compares against
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path
