"""The original policy networks (parameter names match the original checkpoints) and their registry.

An architecture is recognised from a state_dict's keys; n (items) and H (hidden size) are read off the
weight shapes, so a checkpoint is never loaded into a network of another shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from blockmarket.core.contract import CONTRACTS, OUTPUT_FLOOR
from blockmarket.core.state import items_from_state_dim, state_dim


class TradingNetwork(nn.Module):
    """state [B, D] -> proposed trading matrix [B, n^2]."""

    def __init__(self, input_dim: int, hidden_dim: int, num_items: int) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.num_items = input_dim, hidden_dim, num_items
        self.shared = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.trading_matrix_head = nn.Linear(hidden_dim, num_items * num_items)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return functional.softplus(self.trading_matrix_head(self.shared(state))) + OUTPUT_FLOOR


class ValueNetwork(nn.Module):
    """state [B, D] -> state value [B, 1]."""

    def __init__(self, input_dim: int, hidden_dim: int, num_items: int) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.num_items = input_dim, hidden_dim, num_items
        self.value_network = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim // 2),
            nn.ReLU(),
            nn.Linear(hidden_dim // 2, 1),
        )

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.value_network(state)


class ActorCriticNetwork(nn.Module):
    """state [B, D] -> (trading matrix [B, n^2], state value [B, 1])."""

    def __init__(self, input_dim: int, hidden_dim: int, num_items: int) -> None:
        super().__init__()
        self.input_dim, self.hidden_dim, self.num_items = input_dim, hidden_dim, num_items
        self.shared = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU()
        )
        self.actor = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_items * num_items)
        )
        self.critic = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.ReLU(), nn.Linear(hidden_dim // 2, 1)
        )

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.shared(state)
        return functional.softplus(self.actor(features)) + OUTPUT_FLOOR, self.critic(features)


@dataclass(frozen=True)
class Architecture:
    """How to recognise, build and export one network type."""

    name: str
    network: type[nn.Module]
    input_layer: str  # key of the first Linear's weight: its shape gives (H, D)
    output_names: tuple[str, ...]

    def keys(self, hidden_dim: int, input_dim: int, num_items: int) -> set[str]:
        model = self.network(input_dim, hidden_dim, num_items)
        return set(model.state_dict())

    @property
    def produces_matrix(self) -> bool:
        return CONTRACTS[self.name].trades


def _outputs(name: str) -> tuple[str, ...]:
    return CONTRACTS[name].output_names


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("TradingNetwork", TradingNetwork, "shared.0.weight", _outputs("TradingNetwork")),
        Architecture("ValueNetwork", ValueNetwork, "value_network.0.weight", _outputs("ValueNetwork")),
        Architecture(
            "ActorCriticNetwork", ActorCriticNetwork, "shared.0.weight", _outputs("ActorCriticNetwork")
        ),
    )
}


@dataclass(frozen=True)
class NetworkSpec:
    """What a state_dict is: architecture, items n, hidden size H, state dimension D."""

    architecture: Architecture
    num_items: int
    hidden_dim: int

    @property
    def input_dim(self) -> int:
        return state_dim(self.num_items)

    @property
    def output_dim(self) -> int:
        return self.num_items * self.num_items if self.architecture.produces_matrix else 1

    def build(self) -> nn.Module:
        return self.architecture.network(self.input_dim, self.hidden_dim, self.num_items)


class ArchitectureError(ValueError):
    """A state_dict matches no known network, or not the configured item list."""


def recognise(state_dict: Mapping[str, torch.Tensor]) -> NetworkSpec:
    """Identify the architecture, n and H of a state_dict from its keys and weight shapes."""
    keys = set(state_dict)
    for arch in ARCHITECTURES.values():
        first = state_dict.get(arch.input_layer)
        if first is None or first.ndim != 2:
            continue
        hidden_dim, input_dim = (int(d) for d in first.shape)
        try:
            num_items = items_from_state_dim(input_dim)
        except ValueError:
            continue
        if arch.keys(hidden_dim, input_dim, num_items) != keys:
            continue
        spec = NetworkSpec(arch, num_items, hidden_dim)
        expected = spec.build().state_dict()
        if all(tuple(expected[k].shape) == tuple(state_dict[k].shape) for k in keys):
            return spec
    names = ", ".join(ARCHITECTURES)
    sample = ", ".join(sorted(keys)[:4])
    raise ArchitectureError(f"weights match none of {names} (keys: {sample}, ...)")


def load_network(state_dict: Mapping[str, torch.Tensor], expected_items: int | None = None) -> nn.Module:
    """Build the recognised network, load the weights strictly, return it in eval mode."""
    spec = recognise(state_dict)
    if expected_items is not None and spec.num_items != expected_items:
        raise ArchitectureError(
            f"checkpoint was trained for {spec.num_items} items (state dim {spec.input_dim}) but the "
            f"config's items_list has {expected_items}; convert it with a matching config"
        )
    model = spec.build()
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()


def spec_of(model: nn.Module) -> NetworkSpec:
    """The spec of a built network (for export and metadata)."""
    for arch in ARCHITECTURES.values():
        if type(model) is arch.network:
            return NetworkSpec(arch, int(model.num_items), int(model.hidden_dim))  # type: ignore[arg-type]
    raise ArchitectureError(f"{type(model).__name__} is not a registered architecture")
