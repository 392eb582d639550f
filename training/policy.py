"""A population of TradingNetworks held as stacked weights, so one batched forward serves every agent.

The weights keep the original parameter names (``shared.0.weight`` ... ``trading_matrix_head.bias``) with a
leading population axis, so agent k's ``state_dict`` is a slice and loads into ``TradingNetwork`` as is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional

from blockmarket.core.contract import OUTPUT_FLOOR
from blockmarket.core.state import state_dim
from conversion.networks import TradingNetwork

# TradingNetwork's Linear layers in forward order: ReLU after all but the head, softplus + floor after it.
HIDDEN_LAYERS = ("shared.0", "shared.2", "shared.4")
HEAD = "trading_matrix_head"


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one thread: the per-step tensors are tiny, and two threads were ~6x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _template(num_items: int, hidden_dim: int) -> dict[str, torch.Size]:
    """Parameter names and shapes of one TradingNetwork (the single source of the architecture)."""
    with torch.device("meta"):
        model = TradingNetwork(state_dim(num_items), hidden_dim, num_items)
    return {name: param.shape for name, param in model.state_dict().items()}


@dataclass
class PolicyPopulation:
    """P TradingNetworks of one shape: ``params[name]`` is [P, *shape of that parameter]."""

    params: dict[str, torch.Tensor]
    num_items: int
    hidden_dim: int

    def __len__(self) -> int:
        return int(self.params[f"{HEAD}.bias"].shape[0])

    @classmethod
    def fresh(
        cls, count: int, num_items: int, hidden_dim: int, generator: torch.Generator
    ) -> PolicyPopulation:
        """``count`` untrained networks drawn like ``nn.Linear``'s default init: U(-1/sqrt(fan_in), +)."""
        template = _template(num_items, hidden_dim)
        params = {}
        for name, shape in template.items():
            fan_in = template[f"{name.rsplit('.', 1)[0]}.weight"][1]
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = (torch.rand((count, *shape), generator=generator) * 2.0 - 1.0) * bound
        return cls(params, num_items, hidden_dim)

    @classmethod
    def from_state_dicts(
        cls, state_dicts: Sequence[dict[str, torch.Tensor]], num_items: int
    ) -> PolicyPopulation:
        """Stack trained networks (all TradingNetworks with the same n and H)."""
        hidden_dim = int(state_dicts[0][f"{HEAD}.weight"].shape[1])
        names = _template(num_items, hidden_dim)
        params = {name: torch.stack([sd[name].float() for sd in state_dicts]) for name in names}
        return cls(params, num_items, hidden_dim)

    @staticmethod
    def concat(parts: Sequence[PolicyPopulation]) -> PolicyPopulation:
        first = parts[0]
        params = {name: torch.cat([p.params[name] for p in parts]) for name in first.params}
        return PolicyPopulation(params, first.num_items, first.hidden_dim)

    def take(self, indices: npt.ArrayLike) -> PolicyPopulation:
        """The networks at ``indices`` (copies), e.g. the survivors of a generation."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return PolicyPopulation(
            {name: t.index_select(0, index) for name, t in self.params.items()},
            self.num_items,
            self.hidden_dim,
        )

    def mutated(self, indices: npt.ArrayLike, std: float, generator: torch.Generator) -> PolicyPopulation:
        """Copies of the networks at ``indices`` with N(0, std) noise on every weight and bias."""
        children = self.take(indices)
        for tensor in children.params.values():
            tensor += torch.randn(tensor.shape, generator=generator) * std
        return children

    def state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Agent ``index`` as a plain TradingNetwork state_dict."""
        return {name: tensor[index].clone() for name, tensor in self.params.items()}

    @torch.inference_mode()
    def forward(self, states: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """states [P, B, D] (B states per network) -> proposed matrices [P, B, n, n], one bmm per layer."""
        hidden = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))
        for layer in HIDDEN_LAYERS:
            hidden = functional.relu(self._linear(layer, hidden))
        out = functional.softplus(self._linear(HEAD, hidden)) + OUTPUT_FLOOR
        count, batch = states.shape[:2]
        return out.numpy().reshape(count, batch, self.num_items, self.num_items)

    def _linear(self, layer: str, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.params[f"{layer}.weight"], self.params[f"{layer}.bias"]
        return torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2))
