"""The programmatic API (`ONNXConverter(config)`), naming, skipping and item-list checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blockmarket.core.config import Config
from blockmarket.models.files import sha256_file
from conversion.converter import ONNXConverter
from conversion.results import format_summary
from tests.support.checkpoints import Written
from tests.support.original_format import ITEMS_5, make_network, write_original_checkpoint


def test_convert_single_model_returns_a_full_result_and_true_metadata(
    config: Config, tree: list[Written]
) -> None:
    item = tree[2]  # run1/final/agent_7_final.pth, ActorCritic n=5
    result = ONNXConverter(config).convert_single_model(item.path)

    assert result.status == "converted" and result.ok
    assert (result.name, result.architecture, result.num_items) == (item.name, "ActorCriticNetwork", 5)
    assert result.onnx_path is not None and result.onnx_path.is_file()
    assert result.max_abs_error is not None and result.max_abs_error < 1e-5
    assert result.metadata_path is not None
    meta = json.loads(result.metadata_path.read_text())
    info = meta["model_info"]
    assert info["onnx_path"] == f"{item.name}.onnx"
    assert (info["input_dim"], info["output_dim"], info["num_items"]) == (61, 25, 5)
    assert info["outputs"] == ["trading_matrix", "state_value"] and info["items_list"] == list(ITEMS_5)
    assert meta["agent_info"]["agent_id"] == "agent_7_final"
    assert meta["agent_info"]["training_history"]["length"] == 30
    conversion = meta["conversion_info"]
    assert conversion["source_sha256"] == sha256_file(item.path)
    assert conversion["onnx_sha256"] == sha256_file(result.onnx_path)
    assert conversion["opset_version"] == config.conversion.opset_version
    assert conversion["torch_version"] == torch.__version__
    assert conversion["validation"]["passed"] is True
    assert meta["npu_optimization"]["target_device"] == "Snapdragon X Elite (QNN HTP)"


def test_configured_opset_is_what_is_written(config: Config, tree: list[Written]) -> None:
    older = config.model_copy(
        update={"conversion": config.conversion.model_copy(update={"opset_version": 14})}
    )
    result = ONNXConverter(older).convert_single_model(tree[0].path)
    assert result.metadata_path is not None
    assert json.loads(result.metadata_path.read_text())["conversion_info"]["opset_version"] == 14


def test_tampered_onnx_or_changed_opset_is_converted_again(config: Config, tree: list[Written]) -> None:
    converter = ONNXConverter(config)
    first = converter.convert_single_model(tree[0].path)
    assert converter.convert_single_model(tree[0].path).status == "skipped"
    assert first.onnx_path is not None
    with first.onnx_path.open("ab") as handle:
        handle.write(b"\0")
    assert converter.convert_single_model(tree[0].path).status == "converted"
    newer = config.model_copy(
        update={"conversion": config.conversion.model_copy(update={"opset_version": 18})}
    )
    assert ONNXConverter(newer).convert_single_model(tree[0].path).status == "converted"


def test_metadata_with_windows_paths_still_describes_the_conversion(
    config: Config, tree: list[Written]
) -> None:
    """Model paths stored with backslashes and a drive letter (the original converter on Windows) are
    looked up next to the metadata, so an unchanged checkpoint is still skipped."""
    conversion = config.conversion.model_copy(
        update={"precisions": ("fp32", "fp16"), "validation_samples": 64}
    )
    converter = ONNXConverter(config.model_copy(update={"conversion": conversion}))
    first = converter.convert_single_model(tree[0].path)
    assert first.status == "converted" and [v["precision"] for v in first.variants] == ["fp16"]
    assert first.metadata_path is not None
    meta = json.loads(first.metadata_path.read_text())
    meta["model_info"]["onnx_path"] = rf"C:\models\trading_agents\onnx\{tree[0].name}.onnx"
    variant = meta["npu_optimization"]["variants"][0]
    variant_name = variant["onnx_path"]
    variant["onnx_path"] = rf"models\trading_agents\onnx\{variant_name}"
    first.metadata_path.write_text(json.dumps(meta))
    assert converter.convert_single_model(tree[0].path).status == "skipped"
    (first.metadata_path.parent / variant_name).unlink()
    assert converter.convert_single_model(tree[0].path).status == "converted"  # a variant went missing


def test_bare_state_dict_uses_the_config_items(config: Config, model_dir: Path) -> None:
    five = model_dir / "bare5.pth"
    eight = model_dir / "bare8.pth"
    model_dir.mkdir(parents=True)
    torch.save(make_network("TradingNetwork", 5).state_dict(), five)
    torch.save(make_network("TradingNetwork", 8).state_dict(), eight)
    converter = ONNXConverter(config)

    ok = converter.convert_single_model(five)
    assert ok.status == "converted" and ok.metadata_path is not None
    meta = json.loads(ok.metadata_path.read_text())
    assert meta["conversion_info"]["items_source"] == "config"
    assert meta["agent_info"]["agent_id"] == "bare5"
    bad = converter.convert_single_model(eight)
    assert bad.status == "failed" and bad.error is not None
    assert bad.error.startswith(f"{eight}: TradingNetwork weights are for 8 items")
    assert "items_list has 5" in bad.error


def test_desired_item_outside_the_inventory_is_refused(config: Config, model_dir: Path) -> None:
    path = write_original_checkpoint(
        model_dir / "odd.pth", make_network("TradingNetwork", 5), agent_id="odd", desired_item="obsidian"
    )
    result = ONNXConverter(config).convert_single_model(path)
    assert result.status == "failed" and result.error is not None and "obsidian" in result.error


def test_names_are_flat_stable_and_collisions_fail_loudly(config: Config, model_dir: Path) -> None:
    network = make_network("TradingNetwork", 5)
    one = write_original_checkpoint(model_dir / "a__b" / "x.pth", network, agent_id="one")
    two = write_original_checkpoint(model_dir / "a" / "b__x.pth", network, agent_id="two")
    top = write_original_checkpoint(model_dir / "agent_1_final.pth", network, agent_id="1")
    converter = ONNXConverter(config)
    assert converter.output_name(top) == "agent_1_final"
    assert converter.output_name(one) == converter.output_name(two) == "a__b__x"

    results = {r.source: r for r in converter.convert_all_models()}
    assert results[top].status == "converted"
    for path in (one, two):
        assert results[path].status == "failed"
        assert "claimed by 2 files" in str(results[path].error)
    assert not (converter.output_dir / "a__b__x.onnx").exists()
    assert "FAILED" in format_summary(list(results.values()))


def test_files_in_the_output_directory_are_not_converted(config: Config, tree: list[Written]) -> None:
    converter = ONNXConverter(config)
    converter.output_dir.mkdir(parents=True)
    shutil.copy(tree[0].path, converter.output_dir / "stray.pth")
    assert converter.output_dir / "stray.pth" not in converter.find_checkpoints()
    assert len(converter.find_checkpoints()) == len(tree)


def test_default_output_dir_follows_the_model_path(config: Config, tmp_path: Path) -> None:
    assert ONNXConverter(config, model_path=tmp_path).output_dir == tmp_path / "onnx"
    assert ONNXConverter(config).output_dir == Path(config.training.model_save_path) / "onnx"
    configured = config.model_copy(
        update={"conversion": config.conversion.model_copy(update={"output_dir": "x"})}
    )
    assert ONNXConverter(configured, model_path=tmp_path).output_dir == Path("x")


@pytest.mark.slow
def test_fifty_checkpoints_convert_well_under_a_minute(config: Config, model_dir: Path) -> None:
    for index in range(50):
        network = make_network("TradingNetwork", 5, seed=index)
        write_original_checkpoint(
            model_dir / f"agent_gen{index // 5}_rank{index % 5 + 1}.pth", network, agent_id=str(index)
        )
    results = ONNXConverter(config).convert_all_models()
    assert [r.status for r in results] == ["converted"] * 50
    assert sum(r.seconds for r in results) < 30.0


def test_checkpoints_written_by_save_checkpoint_convert(config: Config, model_dir: Path) -> None:
    from conversion.checkpoint import save_checkpoint

    network = make_network("ActorCriticNetwork", 5, seed=7)
    path = save_checkpoint(
        model_dir / "agent_gen2_rank1.pth",
        network_state_dict=network.state_dict(),
        optimizer_state_dict={},
        agent_id="g2r1",
        desired_item="gold",
        inventory=dict.fromkeys(ITEMS_5, 3.0),
        trading_matrix=np.ones((5, 5)),
        position=np.zeros(2),
        reward_history=[1.0, 2.0],
    )
    result = ONNXConverter(config).convert_single_model(path)
    assert result.status == "converted" and result.metadata_path is not None
    agent = json.loads(result.metadata_path.read_text())["agent_info"]
    assert agent == {
        "agent_id": "g2r1",
        "desired_item": "gold",
        "training_history": {"length": 2, "rewards": [1.0, 2.0]},
    }
