"""Read and write checkpoints in the original trainer's format without executing untrusted pickles.

The original wrote ``torch.save({network_state_dict, optimizer_state_dict, agent_id, desired_item,
inventory, trading_matrix (numpy n x n), position (numpy (2,)), reward_history})`` and loaded with
``weights_only=False``, which runs whatever the pickle asks for. Here the file is read by torch's
weights-only unpickler with numpy arrays (and nothing else) added to its allow-list.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from blockmarket.core.files import atomic_target
from conversion.container import UnsafeContainer, check_container

T = TypeVar("T")

ORIGINAL_KEYS = (
    "network_state_dict",
    "optimizer_state_dict",
    "agent_id",
    "desired_item",
    "inventory",
    "trading_matrix",
    "position",
    "reward_history",
)


def _numpy_allow_list() -> list[Any]:
    """The globals a pickled numpy array/scalar needs, under numpy 2 and numpy 1 module names."""
    reconstruct = np._core.multiarray._reconstruct  # type: ignore[attr-defined]
    scalar = np._core.multiarray.scalar  # type: ignore[attr-defined]
    allowed: list[Any] = [np.ndarray, np.dtype, reconstruct, scalar]
    allowed += [(reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]
    allowed += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1", "U1")]
    return allowed


# What torch.load and its unpickler raise on malformed bytes (the unpickler indexes its stack and memo
# without checks, so a text file yields IndexError or KeyError).
_MALFORMED = (
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    OSError,
    ValueError,
    LookupError,
    TypeError,
    struct.error,
)


class CheckpointError(ValueError):
    """A file cannot be used as a checkpoint; the message names the file and the reason."""


@dataclass
class AgentCheckpoint:
    """One agent as the original trainer saved it (agent fields are None for a bare state_dict)."""

    path: Path
    network_state_dict: dict[str, torch.Tensor]
    agent_id: str | None = None
    desired_item: str | None = None
    inventory: dict[str, float] | None = None
    trading_matrix: np.ndarray | None = None
    position: np.ndarray | None = None
    reward_history: list[float] = field(default_factory=list)
    optimizer_state_dict: dict[str, Any] | None = None

    @property
    def is_bare(self) -> bool:
        return self.agent_id is None


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def require_regular_file(path: Path) -> None:
    """Refuse before opening: opening a named pipe would wait for a writer, a device never ends."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")


def _unpickle(path: Path) -> object:
    """Open the file once: check its container (conversion.container), then unpickle those same bytes."""
    require_regular_file(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after torch has read it
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        try:
            check_container(handle)
            with torch.serialization.safe_globals(_numpy_allow_list()):
                return torch.load(handle, map_location="cpu", weights_only=True)
        except UnsafeContainer as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except pickle.UnpicklingError as exc:
            global_name = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if global_name:
                raise CheckpointError(
                    f"{path}: refused: the pickle asks for '{global_name.group(1)}', which is neither plain "
                    "data, a tensor nor a numpy array (it could run code); re-save it with plain types"
                ) from None
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
            reason = detail.group(1).strip() if detail else "unreadable pickle"
            raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({reason[:160]})") from None
        except _MALFORMED as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({first})") from None


def load_checkpoint(path: str | Path) -> AgentCheckpoint:
    """Load an original-format checkpoint (or a bare state_dict) safely."""
    path = Path(path)
    obj = _unpickle(path)
    if _is_state_dict(obj):
        return AgentCheckpoint(path=path, network_state_dict=dict(obj))  # type: ignore[call-overload]
    if not isinstance(obj, Mapping) or "network_state_dict" not in obj:
        kind = type(obj).__name__
        keys = ", ".join(sorted(map(str, obj))[:5]) if isinstance(obj, Mapping) else ""
        raise CheckpointError(
            f"{path}: not an agent checkpoint: holds a {kind}"
            + (f" with keys {keys}" if keys else "")
            + " and no 'network_state_dict'"
        )
    weights = obj["network_state_dict"]
    if not _is_state_dict(weights):
        raise CheckpointError(f"{path}: 'network_state_dict' is not a mapping of parameter names to tensors")
    return AgentCheckpoint(
        path=path,
        network_state_dict=dict(weights),
        agent_id=str(obj.get("agent_id", path.stem)),
        desired_item=None if obj.get("desired_item") is None else str(obj["desired_item"]),
        inventory=_field(path, obj, "inventory", _amounts),
        trading_matrix=_field(path, obj, "trading_matrix", _float_array),
        position=_field(path, obj, "position", _float_array),
        reward_history=_field(path, obj, "reward_history", lambda rewards: [float(r) for r in rewards]) or [],
        optimizer_state_dict=obj.get("optimizer_state_dict"),
    )


def _field(path: Path, obj: Mapping[str, Any], key: str, read: Callable[[Any], T]) -> T | None:
    """``read(obj[key])`` (None when absent): a value of the wrong kind is an error naming the key."""
    value = obj.get(key)
    if value is None:
        return None
    try:
        return read(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{path}: '{key}' is malformed ({str(exc)[:120]})") from None


def _amounts(inventory: object) -> dict[str, float]:
    if not isinstance(inventory, Mapping):
        raise TypeError(f"a {type(inventory).__name__}, not a mapping of item to amount")
    return {str(item): float(amount) for item, amount in inventory.items()}


def _float_array(value: object) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def save_checkpoint(
    path: str | Path,
    *,
    network_state_dict: Mapping[str, torch.Tensor],
    optimizer_state_dict: Mapping[str, Any],
    agent_id: str,
    desired_item: str,
    inventory: Mapping[str, float],
    trading_matrix: np.ndarray,
    position: np.ndarray,
    reward_history: list[float],
) -> Path:
    """Write one agent in the original format, atomically (temp file + rename): no reader ever sees
    half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "network_state_dict": {k: v.detach().clone().cpu() for k, v in network_state_dict.items()},
        "optimizer_state_dict": dict(optimizer_state_dict),
        "agent_id": str(agent_id),
        "desired_item": str(desired_item),
        "inventory": {str(k): float(v) for k, v in inventory.items()},
        "trading_matrix": np.asarray(trading_matrix, dtype=np.float64),
        "position": np.asarray(position, dtype=np.float64).reshape(2),
        "reward_history": [float(r) for r in reward_history],
    }
    with atomic_target(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return path
