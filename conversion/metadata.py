"""`<name>_metadata.json`: the original converter's layout, filled with values that are true.

Sections: ``model_info`` (what the ONNX file computes), ``agent_info`` (whose policy it is),
``npu_optimization`` (target and the NPU variants built next to it; each variant is a dict with at
least ``onnx_path`` (file name next to the metadata), ``precision`` and ``batch_size``) and
``conversion_info`` (opset read back from the file, library versions, hashes, validation figures).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from blockmarket.core.files import atomic_target
from blockmarket.models.files import sha256_file
from conversion.checkpoint import AgentCheckpoint
from conversion.export import ExportedModel
from conversion.networks import NetworkSpec
from conversion.validation import ValidationReport

TARGET_DEVICE = "Snapdragon X Elite (QNN HTP)"
EXPECTED_TOPS = 45
LOG = logging.getLogger(__name__)
HISTORY_INLINE_MAX = 20  # reward histories up to this length are stored whole, longer ones summarised
OPTIMIZATION_HINTS = (
    "QNN HTP needs static input shapes: serve the NPU variants (fixed batch), keep this dynamic-batch "
    "model for CPU",
    "float models run on HTP with enable_htp_fp16_precision=1; QDQ variants (int8/int16) run natively",
    "batch all agents sharing these weights into one session.run per market tick",
    "enable QNN EPContext caching (ep.context_enable) so sessions load in milliseconds after the first",
)


def training_history(rewards: list[float]) -> dict[str, Any]:
    """The reward history: whole when short, else length / last / best / mean of the last ten."""
    if len(rewards) <= HISTORY_INLINE_MAX:
        return {"length": len(rewards), "rewards": rewards}
    return {
        "length": len(rewards),
        "last": rewards[-1],
        "best": max(rewards),
        "mean_last_10": sum(rewards[-10:]) / 10,
    }


def build_metadata(
    *,
    checkpoint: AgentCheckpoint,
    spec: NetworkSpec,
    exported: ExportedModel,
    items: tuple[str, ...],
    report: ValidationReport,
    source_sha256: str,
    variants: list[dict[str, Any]],
) -> dict[str, Any]:
    """All four sections for one converted checkpoint."""
    return {
        "model_info": {
            "onnx_path": exported.path.name,
            "model_type": spec.architecture.name,
            "input_dim": spec.input_dim,
            "output_dim": spec.output_dim,
            "items_list": list(items),
            "num_items": spec.num_items,
            "hidden_dim": spec.hidden_dim,
            "input_name": exported.input_name,
            "outputs": list(exported.output_names),
            "batch_size": exported.batch_size,
            "validation_passed": report.passed,
        },
        "agent_info": {
            "agent_id": checkpoint.agent_id or checkpoint.path.stem,
            "desired_item": checkpoint.desired_item,
            "training_history": training_history(checkpoint.reward_history),
        },
        "npu_optimization": {
            "target_device": TARGET_DEVICE,
            "expected_tops": EXPECTED_TOPS,
            "optimization_hints": list(OPTIMIZATION_HINTS),
            "variants": variants,
        },
        "conversion_info": {
            "opset_version": exported.opset_version,
            "torch_version": torch.__version__,
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_path": checkpoint.path.as_posix(),  # `/` reads back on every OS
            "source_sha256": source_sha256,
            "items_source": "checkpoint" if checkpoint.inventory else "config",
            "onnx_sha256": sha256_file(exported.path),
            "validation": {
                k: v for k, v in report.to_dict().items() if k not in ("per_output", "worst_output")
            },
        },
    }


def metadata_path(onnx_path: Path) -> Path:
    """`<dir>/<name>.onnx` -> `<dir>/<name>_metadata.json` (the original's naming)."""
    return onnx_path.with_name(f"{onnx_path.stem}_metadata.json")


def write_json_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON via a temp file + rename, so a reader (hot reload) never sees half a file."""
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def read_metadata(path: Path) -> dict[str, Any] | None:
    """A metadata file's content, or None when it is absent or unreadable (then: convert again)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        LOG.warning("%s: unreadable metadata (%s); the model will be converted again", path, exc)
        return None
    return data if isinstance(data, dict) else None
