"""The serving process's cheap guess whether conversion has work: never crashes on odd files."""

from __future__ import annotations

from pathlib import Path

from blockmarket.core.config import load_config
from runtime.workers import conversion_pending


def test_a_dangling_checkpoint_link_is_pending_work_not_a_crash(tmp_path: Path) -> None:
    checkpoints, onnx = tmp_path / "agents", tmp_path / "agents" / "onnx"
    onnx.mkdir(parents=True)
    (onnx / "a_metadata.json").write_text("{}")
    (checkpoints / "gone.pth").symlink_to(tmp_path / "missing.pth")
    config = load_config(None, {"training.model_save_path": str(checkpoints)})

    assert conversion_pending(config) is False  # as many sources as models, none readable as newer

    (checkpoints / "new.pth").write_bytes(b"")
    assert conversion_pending(config) is True
