"""Proof that a population pack computes, for every agent slice, what that agent's own PyTorch network does.

A pack mixes N agents' weights in one graph; a wrong stacking order or a backend that mishandles the
formulation (the batched-MatMul form on HTP fp16) would hand agent i the policy of agent j or garbage.
So each agent's rows are compared with its own network, and the verdict names the agents that fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from torch import nn

from blockmarket.core.config import NpuConfig
from blockmarket.core.contract import INPUT_NAME, Tolerance
from blockmarket.models.pack import PackError, PackForm, build_pack, pack_metadata
from blockmarket.models.packcheck import row_errors
from blockmarket.models.placement import Placement
from blockmarket.models.providers import create_session
from conversion.networks import spec_of
from conversion.validation import validation_states


@dataclass(frozen=True)
class PackReport:
    """Per-agent errors of a pack against each agent's network; ``failed_agents`` are pack indices."""

    agents: int
    rows_per_agent: int
    atol: float
    rtol: float
    max_abs_error: list[float]  # per agent
    max_rel_error: list[float]  # per agent
    failed_agents: list[int]
    placement: Placement

    @property
    def passed(self) -> bool:
        return not self.failed_agents

    def summary(self) -> str:
        verdict = "passed" if self.passed else f"FAILED for agents {self.failed_agents[:10]}"
        return (
            f"pack of {self.agents} agents on {self.placement.provider}: {verdict}; worst agent max abs "
            f"error {max(self.max_abs_error):.3g}, max rel error {max(self.max_rel_error):.3g} "
            f"({self.rows_per_agent} states each, atol {self.atol:g}, rtol {self.rtol:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(passed=self.passed, placement=self.placement.as_dict())
        return data


def trading_weights(network: nn.Module) -> list[npt.NDArray[np.float32]]:
    """[W1, b1, ..., W_head, b_head] of a TradingNetwork in nn.Linear layout (the pack's input)."""
    spec = spec_of(network)
    if spec.architecture.name != "TradingNetwork":
        raise PackError(f"population packs hold TradingNetworks, not {spec.architecture.name}")
    return [t.detach().cpu().numpy().astype(np.float32) for t in network.state_dict().values()]


def pack_networks(
    networks: Sequence[nn.Module], *, form: PackForm, batch_per_agent: int = 1
) -> onnx.ModelProto:
    """A pack built straight from PyTorch networks (agent i = ``networks[i]``)."""
    return build_pack([trading_weights(n) for n in networks], form=form, batch_per_agent=batch_per_agent)


def validate_pack(
    pack_path: str | Path,
    networks: Sequence[nn.Module],
    npu: NpuConfig,
    tolerance: Tolerance,
    *,
    prefer_npu: bool = True,
    rows_per_agent: int = 16,
    seed: int = 0,
) -> PackReport:
    """Run the pack (on HTP with CPU fallback disabled when ``prefer_npu``) on realistic states and
    compare every agent's rows with its own network."""
    path = Path(pack_path)
    meta = pack_metadata(onnx.load(str(path), load_external_data=False))
    agents, batch = int(meta.get("agents", -1)), int(meta.get("batch_per_agent", -1))
    if agents != len(networks):
        raise PackError(f"{path}: pack holds {agents} agents, {len(networks)} networks given")
    session, placement = create_session(path, npu, prefer_npu=prefer_npu, disable_cpu_fallback=prefer_npu)
    num_items = spec_of(networks[0]).num_items
    rounds = -(-rows_per_agent // batch)
    # states[r, i, b]: round r, agent i, row b; every agent sees different realistic states.
    states = validation_states(num_items, rounds * agents * batch, seed).reshape(rounds, agents, batch, -1)
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    packed = np.stack(
        [
            session.run(None, {INPUT_NAME: chunk.reshape(agents * batch, -1).astype(dtype)})[0]
            for chunk in states
        ]
    )
    actual = (
        packed.reshape(rounds, agents, batch, -1).transpose(1, 0, 2, 3).reshape(agents, rounds * batch, -1)
    )
    per_agent = states.transpose(1, 0, 2, 3).reshape(agents, rounds * batch, -1)
    with torch.inference_mode():  # the reference: each network on its own rows (validation, not serving)
        reference = np.stack(
            [net.eval()(torch.from_numpy(x)).numpy() for net, x in zip(networks, per_agent, strict=True)]
        )
    diff, excesses = row_errors(actual, reference, tolerance)
    excess = excesses.max(axis=(1, 2))
    return PackReport(
        agents=agents,
        rows_per_agent=rounds * batch,
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        max_abs_error=diff.max(axis=(1, 2)).tolist(),
        max_rel_error=(diff / np.abs(reference)).max(axis=(1, 2)).tolist(),
        failed_agents=np.flatnonzero(excess > 0).tolist(),
        placement=placement,
    )
