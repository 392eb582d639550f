"""`npu_inference_example.py`: a standalone script, written next to the models, that really runs one.

The original's example loaded a file training never wrote and fed a 1-D input the model rejects; this
one finds a converted model in its own directory (or takes a path), builds [1, D] and [B, D] states in
the real layout, and runs them on the QNN HTP backend when it can, on the CPU (saying so) when not.
"""

from __future__ import annotations

from pathlib import Path

from blockmarket.core.config import NpuConfig
from blockmarket.core.files import atomic_target
from blockmarket.models.providers import qnn_config_options

EXAMPLE_NAME = "npu_inference_example.py"

_TEMPLATE = '''#!/usr/bin/env python3
"""Run a converted BlockMarket trading agent on the Snapdragon NPU (QNN HTP), or on the CPU.

Written by `blockmarket convert`. Needs numpy and onnxruntime; onnxruntime-qnn for the NPU.
    python npu_inference_example.py              # the first converted model next to this script
    python npu_inference_example.py MODEL.onnx   # a given model
"""

import json
import sys
import time
from pathlib import Path, PureWindowsPath

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
QNN_OPTIONS = __QNN_OPTIONS__
DYNAMIC_BATCH = 8  # agents per call when the model accepts any batch size


def named_file(directory, stored):
    """A file the metadata names, looked up in `directory`: only its name counts, whichever separator
    it was written with, so metadata written on another machine or OS finds the models next to it."""
    return directory / PureWindowsPath(stored).name


def metadata_of(model):
    path = model.with_name(model.stem + "_metadata.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def pick_model(argv):
    if len(argv) > 1:
        model = Path(argv[1])
        if not model.is_file():
            sys.exit(f"{model}: no such model file")
        return model
    for meta_path in sorted(HERE.glob("*_metadata.json")):
        model = named_file(HERE, json.loads(meta_path.read_text(encoding="utf-8"))["model_info"]["onnx_path"])
        if model.is_file():
            return model
    sys.exit(f"{HERE}: no converted model here; run `blockmarket convert` first")


def items_for(state_dim):
    """n from D = 2n^2 + 2n + 1."""
    n = int(round((-2 + (4 + 8 * (state_dim - 1)) ** 0.5) / 4))
    if 2 * n * n + 2 * n + 1 != state_dim:
        sys.exit(f"input dimension {state_dim} is not a BlockMarket state (2n^2 + 2n + 1)")
    return n


def agent_states(rng, count, n):
    """[count, D] states in the trained layout: inventory/max, one-hot desired item, own matrix,
    mean of the other agents' matrices, success rate."""
    inventory = rng.integers(5, 15, size=(count, n)).astype(np.float32)
    desired = np.eye(n, dtype=np.float32)[rng.integers(0, n, size=count)]
    matrices = rng.uniform(0.5, 2.0, size=(count, n, n)).astype(np.float32)
    matrices[:, np.arange(n), np.arange(n)] = 1.0
    others = (matrices.sum(axis=0) - matrices) / max(count - 1, 1)
    success = rng.uniform(0.0, 1.0, size=(count, 1)).astype(np.float32)
    parts = [inventory / inventory.max(axis=1, keepdims=True), desired,
             matrices.reshape(count, -1), others.reshape(count, -1), success]
    return np.concatenate(parts, axis=1).astype(np.float32)


def qnn_target(model, meta):
    """The model to give QNN: this one if its batch is static, else a static NPU variant next to it."""
    if meta.get("model_info", {}).get("batch_size") is not None:
        return model
    for variant in meta.get("npu_optimization", {}).get("variants", []):
        path = named_file(model.parent, variant["onnx_path"])
        if variant.get("batch_size") is not None and variant.get("passed", True) and path.is_file():
            return path
    return None


def qnn_session(model):
    import onnxruntime_qnn

    if not any(d.ep_name == "QNNExecutionProvider" for d in ort.get_ep_devices()):
        ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # QNN's informational warnings about this host
    backend = onnxruntime_qnn.get_qnn_htp_path()
    options.add_provider_for_devices(devices, dict(QNN_OPTIONS, backend_path=backend))
    return ort.InferenceSession(str(model), options)


def open_session(model, meta):
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        print("NOTICE: onnxruntime-qnn is not installed: running on the CPU (pip install onnxruntime-qnn)")
        return model, ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    target = qnn_target(model, meta)
    if target is None:
        print(f"NOTICE: QNN needs static input shapes; {model.name} has a dynamic batch axis and no static "
              "NPU variant next to it: running on the CPU")
        return model, ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    try:
        return target, qnn_session(target)
    except Exception as exc:  # any QNN failure: say so and show the model on the CPU instead
        print(f"NOTICE: the QNN HTP backend refused {target.name} ({exc}): running on the CPU")
        return model, ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def print_matrix(matrix, items):
    width = max(len(item) for item in items) + 2
    print("proposed trading matrix of agent 0 (row i: how much of item j it asks for one unit of item i):")
    print(" " * width + "".join(f"{item:>{width}}" for item in items))
    for item, row in zip(items, matrix):
        print(f"{item:<{width}}" + "".join(f"{value:>{width}.3f}" for value in row))


def main(argv):
    model = pick_model(argv)
    meta = metadata_of(model)
    target, session = open_session(model, meta)
    feed_name = session.get_inputs()[0].name
    shape = session.get_inputs()[0].shape
    n = items_for(int(shape[1]))
    items = meta.get("model_info", {}).get("items_list") or [f"item{i}" for i in range(n)]
    static = isinstance(shape[0], int)
    batch = shape[0] if static else DYNAMIC_BATCH
    print(f"model {target.name} on {session.get_providers()[0]}: {n} items, state dim {shape[1]}, "
          f"{'static batch' if static else 'dynamic batch, running'} {batch}")

    states = agent_states(np.random.default_rng(0), batch, n)
    names = [o.name for o in session.get_outputs()]
    if not static:
        one = session.run(names, {feed_name: states[:1]})  # one agent: a [1, D] state
        print("one agent:", {name: value.shape for name, value in zip(names, one)})
    session.run(names, {feed_name: states})  # warm-up: the first call prepares the graph
    start = time.perf_counter()
    outputs = dict(zip(names, session.run(names, {feed_name: states})))
    print(f"{batch} agents in one call: {(time.perf_counter() - start) * 1e3:.2f} ms")
    if "trading_matrix" in outputs:
        print_matrix(outputs["trading_matrix"][0].reshape(n, n), items)
    if "state_value" in outputs:
        print("state values:", " ".join(f"{v:.4f}" for v in outputs["state_value"][:, 0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''


def render_example(npu: NpuConfig) -> str:
    """The script's text for this configuration."""
    # the runtime's options (backend_path is added by the script where QNN is installed)
    return _TEMPLATE.replace("__QNN_OPTIONS__", repr(qnn_config_options(npu)))


def write_inference_example(output_dir: Path, npu: NpuConfig) -> Path:
    """Write `npu_inference_example.py` into ``output_dir`` (atomically, executable)."""
    path = output_dir / EXAMPLE_NAME
    with atomic_target(path, mode=0o755) as tmp:
        tmp.write_text(render_example(npu), encoding="utf-8")
    return path
