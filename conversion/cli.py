"""Convert BlockMarket `.pth` checkpoints into validated ONNX models for the Snapdragon NPU.

Every checkpoint matching --pattern under --model-path (recursively; symlinked folders are not
searched, symlinks to files outside it are refused) is loaded safely (no pickled code runs, zip bombs
are refused from the archive's directory), recognised (TradingNetwork, ValueNetwork,
ActorCriticNetwork; n items and hidden size read off the weights, n checked against the config's
items_list), exported to ONNX with input `state_vector` [batch, D] and validated against PyTorch on
realistic agent states. Written to the output directory (flat; nested checkpoints are named
<folder>__<stem>):

  <name>.onnx                 fp32, dynamic batch (CPU serving)
  <name>_metadata.json        model_info, agent_info, npu_optimization, conversion_info
  <name>_<prec>_b<B>.onnx     NPU variants (--precisions fp16,int8,int16), static batch B, each
                              validated on QNN HTP with CPU fallback disabled (docs/npu.md)
  <name>_<prec>_b<B>_ctx.onnx compiled HTP context + _ctx_qnn.bin + _ctx.json (--context-cache)
  npu_inference_example.py    runs a converted model on QNN HTP, or on the CPU with a notice

A checkpoint whose source hash is unchanged since its last conversion is skipped (--force converts it
again). A file that fails gets one error line naming it; the others still convert; the exit status is
1 if any failed, 2 for a usage error (bad config, missing --model-path).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from blockmarket.core.command import given, run_command, usage_error
from blockmarket.core.config import Config, Overrides, Precision


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The original convert_models.py options, plus --output-dir and --force."""
    parser.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="directory searched recursively for checkpoints (default: training.model_save_path)",
    )
    parser.add_argument("--pattern", default="*.pth", help="file name glob to convert (default: %(default)s)")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration file (default: ./config.yaml, or built-in defaults when it does not exist)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where models, metadata and the example go (default: conversion.output_dir, "
        "else <model-path>/onnx)",
    )
    parser.add_argument(
        "--validate-only",
        action="store_true",
        help="re-validate the existing ONNX models against their checkpoints; convert nothing",
    )
    parser.add_argument(
        "--create-example",
        action="store_true",
        help="(re)write npu_inference_example.py even when nothing was converted (conversion runs write it)",
    )
    parser.add_argument(
        "--force", action="store_true", help="convert again even when the checkpoint is unchanged"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--precisions",
        type=_precisions,
        default=None,
        help="comma-separated precisions: fp32 (always built) and the NPU variants fp16, int8, int16, "
        "each validated on QNN HTP (default: conversion.precisions)",
    )
    parser.add_argument(
        "--static-batch-sizes",
        type=_batch_sizes,
        default=None,
        help="comma-separated fixed batch sizes of the NPU variants (default: conversion.static_batch_sizes)",
    )
    parser.add_argument(
        "--context-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pre-compile QNN context binaries (<variant>_ctx.onnx + .bin) so the runtime loads them in "
        "milliseconds (default: conversion.context_cache)",
    )


def _precisions(text: str) -> tuple[str, ...]:
    known = get_args(Precision)
    wanted = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in wanted if p not in known]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(known)}")
    return ("fp32", *(p for p in wanted if p != "fp32"))


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 1,64")
    return sizes


def config_overrides(args: argparse.Namespace) -> Overrides:
    """--precisions, --static-batch-sizes, --context-cache as dotted config keys (validated with the file)."""
    return given(
        {
            "conversion.precisions": args.precisions,
            "conversion.static_batch_sizes": args.static_batch_sizes,
            "conversion.context_cache": args.context_cache,
        }
    )


def main(args: argparse.Namespace) -> int:
    """Run the conversion; print the summary table; 0 ok, 1 some model failed, 2 usage error."""
    return run_command(
        "convert", args.config, lambda config: convert_command(config, args), config_overrides(args)
    )


def convert_command(config: Config, args: argparse.Namespace) -> int:
    """`blockmarket convert` with its config loaded."""
    model_path = args.model_path if args.model_path is not None else Path(config.training.model_save_path)
    if not model_path.is_dir():
        return usage_error("convert", f"--model-path {model_path}: no such directory")

    from conversion.converter import ONNXConverter  # imports torch: only when converting
    from conversion.results import format_summary

    converter = ONNXConverter(
        config, model_path=model_path, output_dir=args.output_dir, pattern=args.pattern, force=args.force
    )
    progress = not args.no_progress
    if args.validate_only:
        results = converter.validate_all_models(progress=progress)
    else:
        results = converter.convert_all_models(progress=progress)
    if args.create_example:
        converter.save_inference_example()
    if results:
        print(format_summary(results))
    return 1 if any(not r.ok for r in results) else 0
