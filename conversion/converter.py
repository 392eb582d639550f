"""`ONNXConverter`: a directory of `.pth` checkpoints -> validated ONNX models + metadata + example.

One bad file never stops a run: it becomes a failed `ConversionResult` with a one-line reason naming
the file (whatever it raised; refused symlinks too: `conversion.discovery`), and the rest still
convert. A model is only put in place after it validated, and its metadata JSON is written last, so
a reader that waits for the metadata never sees a failed model.

Output names: a checkpoint directly under the model path keeps the original's ``<stem>``; a nested
one is prefixed with its relative folder path joined by ``__`` (``gen5/agent_3_final.pth`` ->
``gen5__agent_3_final``). The name depends only on the file's own path, so it stays stable when other
checkpoints appear, and the output directory stays flat.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from blockmarket.core.config import Config
from blockmarket.core.files import replace_file
from blockmarket.models.files import VARIANT_KEY, ModelError, model_file, sha256_file
from conversion.checkpoint import AgentCheckpoint, CheckpointError, load_checkpoint, require_regular_file
from conversion.discovery import discover
from conversion.example import write_inference_example
from conversion.export import DynamicAxes, ExportedModel, convert_to_onnx
from conversion.metadata import build_metadata, metadata_path, read_metadata, write_json_atomic
from conversion.networks import ArchitectureError, NetworkSpec, load_network, spec_of
from conversion.results import ConversionResult
from conversion.validation import ValidationError, ValidationReport, validate_onnx

LOG = logging.getLogger(__name__)

USER_ERRORS = (CheckpointError, ArchitectureError, ValidationError)


def _first_line(source: Path, exc: Exception) -> str:
    """One line naming the file (CheckpointError and ValidationError messages already start with it)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if text.startswith(str(source)) else f"{source}: {text}"


class ONNXConverter:
    """Convert (or re-validate) the checkpoints under a model path into one flat output directory."""

    def __init__(
        self,
        config: Config,
        *,
        model_path: str | Path | None = None,
        output_dir: str | Path | None = None,
        pattern: str = "*.pth",
        force: bool = False,
    ) -> None:
        self.config = config
        self.model_path = Path(model_path if model_path is not None else config.training.model_save_path)
        if output_dir is None:
            output_dir = config.conversion.output_dir or self.model_path / "onnx"
        self.output_dir = Path(output_dir)
        self.pattern = pattern
        self.force = force

    # ---- discovery and naming -------------------------------------------------------------------

    def find_checkpoints(self) -> list[Path]:
        """Files matching the pattern anywhere under the model path, outside the output directory
        (symlinks only to files inside the model path: `conversion.discovery`)."""
        return discover(self.model_path, self.pattern, self.output_dir).found

    def output_name(self, source: Path) -> str:
        """``<stem>``, prefixed with the folder path relative to the model path for nested files (a
        symlink is named for where it is, not for its target)."""
        try:
            folders = source.parent.resolve().relative_to(self.model_path.resolve()).parts
        except ValueError:
            folders = ()
        return "__".join((*folders, source.stem))

    def onnx_path_for(self, source: Path) -> Path:
        return self.output_dir / f"{self.output_name(source)}.onnx"

    # ---- batch runs -----------------------------------------------------------------------------

    def convert_all_models(self, progress: bool = False) -> list[ConversionResult]:
        """Convert every checkpoint that changed since its last conversion (all with ``force``)."""
        results = self._run_all(self.convert_single_model, "converting", progress)
        if any(r.ok for r in results):
            self.save_inference_example()
        return results

    def validate_all_models(self, progress: bool = False) -> list[ConversionResult]:
        """Re-validate every existing ONNX model against its checkpoint; converts nothing."""
        return self._run_all(self.validate_single_model, "validating", progress)

    def _run_all(
        self, action: Callable[[Path], ConversionResult], verb: str, progress: bool
    ) -> list[ConversionResult]:
        discovery = discover(self.model_path, self.pattern, self.output_dir)
        for line in discovery.not_searched:
            LOG.warning("%s", line)
        sources = sorted([*discovery.found, *discovery.refused])
        if not sources:
            LOG.warning("no files matching '%s' under %s", self.pattern, self.model_path)
            return []
        claimed = Counter(self.output_name(s) for s in discovery.found)
        results = []
        with logging_redirect_tqdm():
            bar = tqdm(sources, desc=verb, unit="model", file=sys.stderr, disable=None if progress else True)
            for source in bar:
                name = self.output_name(source)
                refusal = discovery.refused.get(source)
                if refusal is None and claimed[name] > 1:
                    refusal = (
                        f"{source}: output name '{name}' is claimed by {claimed[name]} files; rename one"
                    )
                if refusal is not None:
                    LOG.error("%s", refusal)
                    results.append(ConversionResult(source, name, "failed", error=refusal))
                    continue
                results.append(action(source))
        return results

    # ---- one model ------------------------------------------------------------------------------

    def convert_single_model(self, path: str | Path) -> ConversionResult:
        """Load, export, validate and describe one checkpoint; skip it when nothing changed."""
        return self._guarded(Path(path), self._convert)

    def validate_single_model(self, path: str | Path) -> ConversionResult:
        """Validate the existing ONNX model of one checkpoint against it."""
        return self._guarded(Path(path), self._validate)

    def _guarded(self, source: Path, step: Callable[[Path, float], ConversionResult]) -> ConversionResult:
        """Run one model's step; any failure becomes a one-line error naming the file, so one bad file
        never stops a run. An unexpected exception type also logs its traceback at DEBUG level."""
        start = time.perf_counter()
        try:
            result = step(source, start)
        except USER_ERRORS as exc:
            message = _first_line(source, exc)
        except Exception as exc:  # the boundary between one file and the rest of the run
            LOG.debug("%s: unexpected failure", source, exc_info=True)
            kind = type(exc).__name__
            message = f"{_first_line(source, exc)} (unexpected {kind}: traceback at logging.level DEBUG)"
        else:
            LOG.debug("%s: %s in %.2f s", source, result.status, result.seconds)
            return result
        LOG.error("%s", message)
        return ConversionResult(
            source, self.output_name(source), "failed", seconds=time.perf_counter() - start, error=message
        )

    def _load(self, source: Path) -> tuple[AgentCheckpoint, nn.Module, NetworkSpec, tuple[str, ...]]:
        """The checkpoint, its network, and the items it was trained on (its own inventory's items when
        it records them, else the config's), with the weights' n checked against those items."""
        checkpoint = load_checkpoint(source)
        model = load_network(checkpoint.network_state_dict)
        spec = spec_of(model)
        items = self._items_of(checkpoint)
        if spec.num_items != len(items):
            origin = "its inventory" if checkpoint.inventory else "the config's items_list"
            raise ArchitectureError(
                f"{spec.architecture.name} weights are for {spec.num_items} items "
                f"(state dim {spec.input_dim}) but {origin} has {len(items)} ({', '.join(items)}); "
                "convert it with a matching config"
            )
        return checkpoint, model, spec, items

    def _items_of(self, checkpoint: AgentCheckpoint) -> tuple[str, ...]:
        configured = self.config.environment.items_list
        if not checkpoint.inventory:
            return configured
        own = tuple(checkpoint.inventory)
        if checkpoint.desired_item is not None and checkpoint.desired_item not in own:
            raise CheckpointError(
                f"{checkpoint.path}: desired item '{checkpoint.desired_item}' is not among its "
                f"inventory's items {list(own)}"
            )
        if own != configured:
            LOG.warning(
                "%s: trained on items %s, the config has %s: the metadata records the checkpoint's items",
                checkpoint.path,
                list(own),
                list(configured),
            )
        return own

    def _convert(self, source: Path, start: float) -> ConversionResult:
        name = self.output_name(source)
        onnx_path = self.onnx_path_for(source)
        require_regular_file(source)
        try:
            source_sha = sha256_file(source)
        except ModelError as exc:  # sha256_file's OSError, named
            raise CheckpointError(str(exc)) from None
        previous = self._current_metadata(onnx_path, source_sha)
        if previous is not None:
            info = previous["model_info"]
            return ConversionResult(
                source,
                name,
                "skipped",
                architecture=info["model_type"],
                num_items=info["num_items"],
                onnx_path=onnx_path,
                metadata_path=metadata_path(onnx_path),
                max_abs_error=previous["conversion_info"]["validation"]["max_abs_error"],
                seconds=time.perf_counter() - start,
                variants=previous["npu_optimization"]["variants"],
            )
        checkpoint, model, spec, items = self._load(source)
        exported, report = self._export_validated(model, onnx_path)
        variants = self._build_variants(model, spec, onnx_path, name)
        meta = build_metadata(
            checkpoint=checkpoint,
            spec=spec,
            exported=exported,
            items=items,
            report=report,
            source_sha256=source_sha,
            variants=variants,
        )
        meta_file = write_json_atomic(metadata_path(onnx_path), meta)
        LOG.info("%s -> %s (%s)", source, onnx_path, report.summary())
        failed = [v["onnx_path"] for v in variants if not v.get("passed")]
        if failed:  # recorded in the metadata (the runtime skips them), and a failed conversion
            raise ValidationError(f"{source}: NPU variants failed validation: {', '.join(failed)}")
        return ConversionResult(
            source,
            name,
            "converted",
            architecture=spec.architecture.name,
            num_items=spec.num_items,
            onnx_path=onnx_path,
            metadata_path=meta_file,
            max_abs_error=report.max_abs_error,
            seconds=time.perf_counter() - start,
            variants=variants,
        )

    def _export_validated(self, model: nn.Module, onnx_path: Path) -> tuple[ExportedModel, ValidationReport]:
        """Export next to the target, validate, and only then move it into place."""
        staging = onnx_path.with_name(f".{onnx_path.name}.{os.getpid()}.partial")  # per process: no clashes
        try:
            exported = self.convert_to_onnx(model, staging)
            report = validate_onnx(model, staging, self.config.conversion)
            if not report.passed:
                raise ValidationError(f"{onnx_path}: ONNX Runtime disagrees with PyTorch: {report.summary()}")
            replace_file(staging, onnx_path)
        finally:
            staging.unlink(missing_ok=True)
        return dataclasses.replace(exported, path=onnx_path), report

    def _validate(self, source: Path, start: float) -> ConversionResult:
        onnx_path = self.onnx_path_for(source)
        if not onnx_path.is_file():
            raise ValidationError(f"{source}: no ONNX model at {onnx_path}; convert it first")
        _, model, spec, _ = self._load(source)
        report = validate_onnx(model, onnx_path, self.config.conversion)
        if not report.passed:
            raise ValidationError(
                f"{source}: {onnx_path.name} disagrees with the checkpoint: {report.summary()}"
            )
        LOG.info("%s: %s %s", source, onnx_path.name, report.summary())
        return ConversionResult(
            source,
            self.output_name(source),
            "validated",
            architecture=spec.architecture.name,
            num_items=spec.num_items,
            onnx_path=onnx_path,
            metadata_path=metadata_path(onnx_path),
            max_abs_error=report.max_abs_error,
            seconds=time.perf_counter() - start,
        )

    def _current_metadata(self, onnx_path: Path, source_sha: str) -> dict[str, Any] | None:
        """The previous conversion's metadata when it still describes this source and settings."""
        if self.force or not onnx_path.is_file():
            return None
        meta_file = metadata_path(onnx_path)
        meta = read_metadata(meta_file)
        if meta is None:
            return None
        configured = self.config.environment.items_list
        try:
            info, model_info = meta["conversion_info"], meta["model_info"]
            variants = meta["npu_optimization"]["variants"]
            current = (
                info["source_sha256"] == source_sha
                and info["opset_version"] == self.config.conversion.opset_version
                and model_info["validation_passed"] is True
                and (info["items_source"] == "checkpoint" or model_info["items_list"] == list(configured))
                and all(
                    model_file(meta_file, v["onnx_path"], VARIANT_KEY).is_file() and v["passed"]
                    for v in variants
                )
                and set(self.config.conversion.precisions) - {"fp32"} <= {v["precision"] for v in variants}
                and info["onnx_sha256"] == sha256_file(onnx_path)
            )
        except (KeyError, TypeError) as exc:
            LOG.warning("%s: metadata lacks %s; converting again", meta_file, exc)
            return None
        except ModelError as exc:
            LOG.warning("%s; converting again", exc)
            return None
        return meta if current else None

    # ---- extension points -----------------------------------------------------------------------

    def convert_to_onnx(
        self,
        model: nn.Module,
        path: str | Path,
        opset_version: int | None = None,
        dynamic_axes: DynamicAxes | bool = True,
    ) -> ExportedModel:
        """The original's method: export with the configured opset unless one is given."""
        opset = self.config.conversion.opset_version if opset_version is None else opset_version
        return convert_to_onnx(model, path, opset_version=opset, dynamic_axes=dynamic_axes)

    def _build_variants(
        self, model: nn.Module, spec: NetworkSpec, onnx_path: Path, name: str
    ) -> list[dict[str, Any]]:
        """NPU variants (static batch; fp16 / QDQ) next to the fp32 model, from `conversion.variants`
        (issue 4). Each is a metadata dict with at least onnx_path, precision and batch_size."""
        if importlib.util.find_spec("conversion.variants") is None:
            wanted = sorted(set(self.config.conversion.precisions) - {"fp32"})
            if wanted:
                LOG.warning(
                    "%s: NPU variants %s are configured but conversion.variants is not available",
                    name,
                    wanted,
                )
            return []
        variants = importlib.import_module("conversion.variants")
        built: list[dict[str, Any]] = variants.build_variants(
            model, spec, onnx_path.parent, name, self.config
        )
        return built

    def save_inference_example(self) -> Path:
        """Write `npu_inference_example.py` into the output directory."""
        path = write_inference_example(self.output_dir, self.config.npu)
        LOG.info("inference example: %s", path)
        return path
