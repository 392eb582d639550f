"""Model files are found next to their metadata, whatever path (and OS) the metadata was written with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.models import ModelError, discover_models, model_file, read_model
from tests.runtime.runtime_helpers import ITEMS, trading_weights, write_model

# How the original converter and a Windows machine stored `onnx_path`, and a path on another machine.
STORED = {
    "windows absolute": r"C:\Users\trader\models\trading_agents\onnx\{}",
    "windows relative": r"models\trading_agents\onnx\{}",
    "windows UNC": r"\\fileserver\models\onnx\{}",
    "posix elsewhere": "/srv/old-host/models/onnx/{}",
    "posix relative": "models/trading_agents/onnx/{}",
    "name only": "{}",
}


def rewrite(metadata: Path, pattern: str) -> None:
    """Store every model path of ``metadata`` the way ``pattern`` does."""
    data = json.loads(metadata.read_text())
    data["model_info"]["onnx_path"] = pattern.format(data["model_info"]["onnx_path"])
    for variant in data["npu_optimization"]["variants"]:
        variant["onnx_path"] = pattern.format(variant["onnx_path"])
    metadata.write_text(json.dumps(data))


@pytest.mark.parametrize("pattern", STORED.values(), ids=STORED.keys())
def test_stored_paths_resolve_next_to_the_metadata(tmp_path: Path, pattern: str) -> None:
    model_dir = tmp_path / "copied here"
    metadata = write_model(model_dir, "m0", trading_weights(0), variants=[(4, trading_weights(0))])
    rewrite(metadata, pattern)
    info = read_model(metadata)
    assert info.onnx_path == model_dir / "m0.onnx"
    assert [v.path for v in info.variants] == [model_dir / "m0_fp32_b4.onnx"]


@pytest.mark.parametrize("stored", ["", "..", r"C:\models\..", "C:\\", None, 7])
def test_a_stored_value_that_names_no_file_is_a_clear_error(tmp_path: Path, stored: object) -> None:
    metadata = tmp_path / "m0_metadata.json"
    with pytest.raises(
        ModelError, match=r"m0_metadata\.json: model_info\.onnx_path .* does not name a model"
    ):
        model_file(metadata, stored)


def test_a_bad_variant_path_skips_that_model_with_a_line_naming_it(tmp_path: Path) -> None:
    model_dir = tmp_path / "onnx"
    write_model(model_dir, "m0", trading_weights(0))
    metadata = write_model(model_dir, "m1", trading_weights(1), variants=[(4, trading_weights(1))])
    data = json.loads(metadata.read_text())
    del data["npu_optimization"]["variants"][0]["onnx_path"]
    metadata.write_text(json.dumps(data))
    models, problems = discover_models(model_dir, ITEMS)
    assert [m.key for m in models] == ["m0"]
    assert (
        len(problems) == 1 and "m1_metadata.json: npu_optimization.variants[].onnx_path None" in problems[0]
    )
