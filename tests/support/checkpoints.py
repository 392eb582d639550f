"""Checkpoint trees in the original trainer's format for the conversion tests, and running the converter."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from tests.support.original_format import ITEMS_5, ITEMS_8, make_network, write_original_checkpoint
from tests.support.serving import python_module

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Written:
    """One checkpoint the tests wrote, and the network it holds."""

    path: Path
    network: nn.Module
    name: str  # the converter's output name
    num_items: int


# (relative path, architecture, items): every architecture at n=5 and n=8, both original name styles,
# top-level and nested folders.
TREE = (
    ("agent_gen5_rank1.pth", "TradingNetwork", ITEMS_5),
    ("run1/agent_gen10_rank2.pth", "ValueNetwork", ITEMS_5),
    ("run1/final/agent_7_final.pth", "ActorCriticNetwork", ITEMS_5),
    ("run2/agent_gen5_rank1.pth", "TradingNetwork", ITEMS_8),
    ("run2/agent_gen5_rank2.pth", "ValueNetwork", ITEMS_8),
    ("run2/deep/agent_3_final.pth", "ActorCriticNetwork", ITEMS_8),
)


def run_module(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """`python -m conversion ...` in a fresh interpreter."""
    return python_module("conversion", *argv, cwd=cwd, timeout=120)


def one_error_line_each(stderr: str, paths: Iterable[Path]) -> dict[Path, str]:
    """Each path's one ERROR line in a run's stderr (asserting no traceback and no other error line)."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    lines = {path: [line for line in errors if str(path) in line] for path in paths}
    for path, found in lines.items():
        assert len(found) == 1, (path, errors)
    assert len(errors) == len(lines), stderr
    return {path: found[0] for path, found in lines.items()}


def write_config(path: Path, **sections: dict[str, object]) -> Path:
    """The repository's config.yaml with some keys overridden, written to ``path``."""
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


class CodeCarrier:
    """Unpickling this runs a shell command (what a malicious checkpoint does with weights_only=False)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def write_bad_files(model_dir: Path, marker: Path) -> dict[str, Path]:
    """One file per failure kind, nested among the good ones."""
    import torch

    bad = {
        "corrupt": model_dir / "broken" / "agent_gen1_rank1.pth",
        "not_checkpoint": model_dir / "broken" / "agent_gen1_rank2.pth",
        "code": model_dir / "broken" / "agent_evil_final.pth",
        "mismatch": model_dir / "broken" / "agent_gen1_rank3.pth",
    }
    bad["corrupt"].parent.mkdir(parents=True, exist_ok=True)
    good = model_dir / TREE[0][0]
    bad["corrupt"].write_bytes(good.read_bytes()[:5000])  # a truncated zip
    torch.save({"hello": [1, 2, 3], "agent": "not a network"}, bad["not_checkpoint"])
    torch.save({"network_state_dict": CodeCarrier(marker), "agent_id": "evil"}, bad["code"])
    eight_item_net = make_network("TradingNetwork", 8, seed=99)
    write_original_checkpoint(bad["mismatch"], eight_item_net, agent_id="mismatch", items=ITEMS_5)
    return bad
