"""Execution-provider selection: put each model on the QNN HTP NPU when it can run there, say loudly when not.

Placement is read from ONNX Runtime itself: every session is created with
``session.record_ep_graph_assignment_info=1`` and :meth:`InferenceSession.get_provider_graph_assignment_info`
lists, per execution provider, the nodes it was given. That is the partitioner's real decision (not a
guess from op support tables), so the placement log and ``npu.require_npu`` rest on it.

QNN EPContext cache: a float/QDQ model is compiled by the HTP backend at session creation (seconds for
large graphs on a real device). With ``npu.context_cache`` the compiled graph is saved next to the model as
``<stem>_ctx.onnx`` + ``<stem>_ctx_qnn.bin`` and a ``<stem>_ctx.json`` sidecar recording the source
model's sha256 and the provider options it was compiled with; a later start loads the binary instead of
compiling, and rebuilds it when the source model or the options changed.

Setting the environment variable ``BLOCKMARKET_DISABLE_QNN=1`` behaves as if ``onnxruntime_qnn`` were
not installed (CPU only), e.g. to compare backends or to test the CPU path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import onnxruntime as ort

from blockmarket.core.config import NpuConfig
from blockmarket.core.files import atomic_target
from blockmarket.models.files import sha256_file
from blockmarket.models.placement import (
    CPU_EP,
    QNN_EP,
    Placement,
)

log = logging.getLogger(__name__)

DISABLE_QNN_ENV = "BLOCKMARKET_DISABLE_QNN"
CONTEXT_SUFFIX = "_ctx"


class ProviderError(RuntimeError):
    """A model cannot run where the configuration demands (e.g. ``npu.require_npu`` without an NPU)."""


@dataclass
class _QnnState:
    """Process-wide QNN registration result (registering the library twice raises in ORT)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    checked: bool = False
    available: bool = False
    reason: str = ""
    warned_models: set[str] = field(default_factory=set)
    cache_locks: dict[str, threading.Lock] = field(default_factory=dict)


_qnn = _QnnState()


def _qnn_devices() -> list[Any]:
    return [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]


def register_qnn() -> bool:
    """Register the QNN plugin EP once per process; False (with one WARNING) when it cannot be used."""
    with _qnn.lock:
        if _qnn.checked:
            return _qnn.available
        _qnn.checked = True
        if os.environ.get(DISABLE_QNN_ENV, "").strip() not in ("", "0"):
            _qnn.reason = f"QNN disabled by {DISABLE_QNN_ENV}"
        else:
            _qnn.reason = _register_library()
        _qnn.available = not _qnn.reason
        if not _qnn.available:
            log.warning("%s: running on CPU", _qnn.reason)
        return _qnn.available


def _register_library() -> str:
    """Import and register onnxruntime_qnn; return why it is unusable, or '' on success."""
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        return f"QNN not importable ({exc})"
    if not _qnn_devices():  # another component of this process may have registered it already
        try:
            ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # ORT raises its own Fail/RuntimeError types here
            return f"QNN EP library failed to register ({exc})"
    if not _qnn_devices():
        return "QNN EP registered but exposes no device"
    return ""


def qnn_available() -> bool:
    """True when the QNN HTP backend can be used in this process."""
    return register_qnn()


def qnn_unavailable_reason() -> str:
    """Why QNN is not used ('' when it is available)."""
    register_qnn()
    return _qnn.reason


def qnn_config_options(npu: NpuConfig) -> dict[str, str]:
    """The QNN HTP provider options ``config.npu`` sets (the keys the QNN EP documents); the one
    builder, also for the generated inference example (conversion/example.py)."""
    return {
        "htp_performance_mode": npu.performance_mode,
        "enable_htp_fp16_precision": "1" if npu.fp16_precision else "0",
        "soc_model": str(npu.soc_model),
        "htp_arch": str(npu.htp_arch),
    }


def qnn_provider_options(npu: NpuConfig) -> dict[str, str]:
    """QNN EP provider options: the installed HTP backend library, then :func:`qnn_config_options`."""
    import onnxruntime_qnn

    return {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), **qnn_config_options(npu)}


def dynamic_inputs(model_path: Path) -> list[str]:
    """Inputs with a symbolic or unknown dimension: QNN HTP cannot compile those (all nodes fall to CPU)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return [
        f"{inp.name}{[d.dim_param or d.dim_value or '?' for d in inp.type.tensor_type.shape.dim]}"
        for inp in model.graph.input
        if inp.name not in initializers
        and any(d.dim_param or not d.HasField("dim_value") for d in inp.type.tensor_type.shape.dim)
    ]


class _Threads(NamedTuple):
    """ORT intra-op threading; spinning keeps a core busy between calls (a serving loop wants it off)."""

    intra_op: int = 1
    allow_spinning: bool = True


def _session_options(threads: _Threads) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads.intra_op
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if threads.allow_spinning else "0"
    )
    options.log_severity_level = 3  # QNN's per-session notices are noise; placement is logged by us
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    return options


def _placement(session: ort.InferenceSession, model: Path, **extra: Any) -> Placement:
    nodes: Counter[str] = Counter()
    cpu_ops: list[str] = []
    for subgraph in session.get_provider_graph_assignment_info():
        assigned = subgraph.get_nodes()
        nodes[subgraph.ep_name] += len(assigned)
        if subgraph.ep_name != QNN_EP:
            cpu_ops += [node.op_type for node in assigned]
    return Placement(model=model, nodes=dict(nodes), cpu_ops=tuple(cpu_ops), **extra)


def _cpu_session(model: Path, threads: _Threads, reason: str) -> tuple[ort.InferenceSession, Placement]:
    session = ort.InferenceSession(str(model), sess_options=_session_options(threads), providers=[CPU_EP])
    return session, _placement(session, model, reason=reason)


def create_session(
    model_path: str | Path,
    npu: NpuConfig,
    *,
    prefer_npu: bool = True,
    intra_op_threads: int = 1,
    allow_spinning: bool = True,
    disable_cpu_fallback: bool | None = None,
) -> tuple[ort.InferenceSession, Placement]:
    """An inference session on the QNN HTP NPU when possible, else CPU; and where its nodes landed.

    ``disable_cpu_fallback`` (default: ``npu.require_npu``) makes ORT refuse to put any node on CPU.
    With ``npu.require_npu`` every reason to run on CPU raises :class:`ProviderError` instead of warning.
    ``prefer_npu=False`` asks for CPU on purpose (e.g. the dynamic-batch fp32 model): no warning.
    ``allow_spinning=False`` lets ORT's intra-op threads sleep between calls (runtime.allow_spinning).
    """
    model = Path(model_path)
    threads = _Threads(intra_op_threads, allow_spinning)
    if not model.is_file():
        raise ProviderError(f"{model}: model file not found")
    if not (prefer_npu and npu.enabled):  # a deliberate choice: logged, not warned
        if prefer_npu and npu.require_npu:
            raise ProviderError(f"{model}: npu.require_npu is true but npu.enabled is false")
        why = "CPU requested by the caller" if not prefer_npu else "the NPU is disabled (npu.enabled: false)"
        session, placement = _cpu_session(model, threads, reason=why)
        log.info("placement %s", placement.describe())
        return session, placement
    reason = _npu_blocker(model, npu)
    if reason:
        if npu.require_npu:
            raise ProviderError(f"{model}: npu.require_npu is true but {reason}")
        _warn_once(model, f"{model.name}: running on CPU — {reason}")
        return _cpu_session(model, threads, reason=reason)
    strict = npu.require_npu if disable_cpu_fallback is None else disable_cpu_fallback
    try:
        session, placement = _qnn_session(model, npu, threads, strict)
    except Exception as exc:  # ORT raises Fail/InvalidGraph/RuntimeError subclasses for a refused graph
        if strict or npu.require_npu:
            raise ProviderError(f"{model}: QNN HTP cannot run the whole graph: {exc}") from exc
        reason = f"QNN session creation failed ({exc})"
        _warn_once(model, f"{model.name}: running on CPU — {reason}")
        return _cpu_session(model, threads, reason=reason)
    if placement.on_npu:
        log.info("placement %s", placement.describe())
        return session, placement
    if npu.require_npu:
        raise ProviderError(
            f"{model}: npu.require_npu is true but nodes fell back to CPU: {placement.describe()}"
        )
    placement = dataclasses.replace(placement, reason="ops QNN HTP does not support run on CPU")
    _warn_once(model, f"placement {placement.describe()}")
    return session, placement


def _npu_blocker(model: Path, npu: NpuConfig) -> str:
    """Why this model cannot go to the NPU at all ('' when it can try)."""
    if not register_qnn():
        return _qnn.reason
    dynamic = dynamic_inputs(model)
    if dynamic:
        return (
            f"dynamic input dimensions {', '.join(dynamic)} cannot be compiled for QNN HTP; "
            "use a static-batch NPU variant (conversion.static_batch_sizes)"
        )
    return ""


def _warn_once(model: Path, message: str) -> None:
    """One WARNING per model file and process: loud, but not once per session."""
    key = str(model.resolve())
    with _qnn.lock:
        if key in _qnn.warned_models:
            return
        _qnn.warned_models.add(key)
    log.warning(message)


def _qnn_session(
    model: Path, npu: NpuConfig, threads: _Threads, strict: bool
) -> tuple[ort.InferenceSession, Placement]:
    """Create the QNN session, through the context-binary cache when enabled."""
    provider_options = qnn_provider_options(npu)

    def open_session(path: Path, config: Mapping[str, str]) -> ort.InferenceSession:
        options = _session_options(threads)
        if strict:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        options.add_provider_for_devices(_qnn_devices(), provider_options)
        return ort.InferenceSession(str(path), sess_options=options)

    if not npu.context_cache or model.stem.endswith(CONTEXT_SUFFIX):  # a context model is already compiled
        session = open_session(model, {})
        return session, _placement(session, model)
    with _cache_lock(model):  # sessions are built in executor threads: one compile per cache at a time
        return _cached_session(model, provider_options, open_session)


def _cache_lock(model: Path) -> threading.Lock:
    with _qnn.lock:
        return _qnn.cache_locks.setdefault(str(model.resolve()), threading.Lock())


def _cached_session(
    model: Path, provider_options: Mapping[str, str], open_session: Callable[[Path, Mapping[str, str]], Any]
) -> tuple[ort.InferenceSession, Placement]:
    """Load the model's valid context binary, or compile the model and save one."""
    cache = ContextCache(model)
    fingerprint = cache.fingerprint(provider_options)
    if cache.valid(fingerprint):
        try:
            session = open_session(cache.context_model, {})
        except Exception as exc:  # a binary from another SDK/SoC: rebuild it rather than fail the start
            log.warning("%s: context binary unusable (%s); recompiling", cache.context_model, exc)
        else:
            recorded = cache.recorded()
            return session, _placement(session, model, context="loaded", source_nodes=recorded.get("nodes"))
    if not cache.writable():
        log.warning("%s: directory not writable, compiling without a context cache", model.parent)
        session = open_session(model, {})
        return session, _placement(session, model)
    cache.remove()
    session = open_session(
        model,
        {
            "ep.context_enable": "1",
            "ep.context_file_path": str(cache.context_model),
            "ep.context_embed_mode": "0",
        },
    )
    placement = _placement(session, model, context="built")
    cache.record(fingerprint, sum(placement.nodes.values()))
    return session, placement


class ContextCache:
    """``<stem>_ctx.onnx`` + ``_ctx_qnn.bin`` + ``_ctx.json``: a model's cached HTP compilation."""

    def __init__(self, model: Path) -> None:
        self.model = model
        stem = model.with_suffix("").name
        self.context_model = model.with_name(f"{stem}{CONTEXT_SUFFIX}.onnx")
        self.sidecar = model.with_name(f"{stem}{CONTEXT_SUFFIX}.json")

    @property
    def binary(self) -> Path:
        """The QNN EP names the binary after the context model: ``<ctx stem>_qnn.bin``."""
        return self.context_model.with_name(f"{self.context_model.stem}_qnn.bin")

    def fingerprint(self, provider_options: Mapping[str, str]) -> dict[str, Any]:
        """What the compiled binary depends on: the source bytes, the options, the runtime versions."""
        from onnxruntime_qnn import build_and_package_info

        options = {k: v for k, v in provider_options.items() if k != "backend_path"}
        return {
            "source": self.model.name,
            "source_sha256": sha256_file(self.model),
            "provider_options": options,
            "onnxruntime": ort.__version__,
            "qnn_sdk": build_and_package_info.qnn_version,
        }

    def recorded(self) -> dict[str, Any]:
        try:
            data = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable context sidecar (%s); it will be rebuilt", self.sidecar, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def valid(self, fingerprint: Mapping[str, Any]) -> bool:
        """The cache exists and was compiled from exactly this model with these options."""
        if not (self.context_model.is_file() and self.binary.is_file()):
            return False
        recorded = self.recorded()
        current = {k: recorded.get(k) for k in fingerprint}
        if current != dict(fingerprint):
            if recorded:
                log.info(
                    "%s: model or options changed since compilation; rebuilding", self.context_model.name
                )
            return False
        return True

    def writable(self) -> bool:
        return os.access(self.model.parent, os.W_OK)

    def remove(self) -> None:
        """ORT refuses to overwrite an existing context model: clear a stale cache first."""
        for path in (self.context_model, self.binary, self.sidecar):
            path.unlink(missing_ok=True)

    def record(self, fingerprint: Mapping[str, Any], nodes: int) -> None:
        """Write the sidecar last (atomically): a cache without it is never trusted."""
        with atomic_target(self.sidecar) as tmp:
            tmp.write_text(json.dumps({**fingerprint, "nodes": nodes}, indent=2) + "\n", encoding="utf-8")
