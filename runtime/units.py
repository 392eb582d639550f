"""Building inference units (runtime.inference) from plans: sessions created, packs written by a worker
process, and each unit validated before it can serve (realistic states; a pack row by row against its
models run alone)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import platform
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from blockmarket.core.config import NpuConfig
from blockmarket.core.contract import PACK_TOLERANCE, VALIDATION_SEED, ModelContract
from blockmarket.core.files import atomic_target
from blockmarket.core.state import FloatArray, IntArray
from blockmarket.models.files import ModelInfo, sha256_file
from blockmarket.models.packcheck import ReferenceMismatch, kernel_fingerprint, references, row_errors
from blockmarket.models.providers import ProviderError, qnn_available, qnn_unavailable_reason
from runtime.housekeeping import lower_priority, touch
from runtime.inference import InferenceUnit, PackPrecision
from runtime.planning import PackPlan, PoolError, UnitPlan, model_groups, pack_slots

log = logging.getLogger(__name__)

PACK_DIR = ".packs"  # under the model directory; the reload watcher only looks at top-level files
CHECKED_SUFFIX = ".checked.json"  # beside a pack: the content and machine it passed the pack check on

# (model file, prefer the NPU) -> (an onnxruntime-like session, the EP(s) running it)
SessionFactory = Callable[[Path, bool], tuple[Any, str]]
PackChoice = Literal["auto", "fp32", "int8"]  # runtime.cpu_pack_precision: auto = int8 where it validates
_T = TypeVar("_T")


def default_session_factory(
    npu: NpuConfig, intra_op_threads: int, allow_spinning: bool = False
) -> SessionFactory:
    """Serving sessions from blockmarket.models.providers: the QNN HTP NPU when the model can run
    there, else CPU."""
    from blockmarket.models.providers import create_session

    def make(path: Path, prefer_npu: bool) -> tuple[Any, str]:
        session, placement = create_session(
            path,
            npu,
            prefer_npu=prefer_npu,
            intra_op_threads=intra_op_threads,
            allow_spinning=allow_spinning,
        )
        return session, placement.provider

    return make


def serve_on_npu(npu: NpuConfig) -> bool:
    """Whether packs and static-batch variants go to the QNN HTP backend.

    On x86_64 that backend is a CPU simulator (numerically the NPU, but ~100x slower than ONNX Runtime's
    CPU kernels), so there the runtime serves on CPU unless npu.require_npu asks for the HTP path anyway.
    """
    if npu.require_npu and not (npu.enabled and qnn_available()):
        reason = "npu.enabled is false" if not npu.enabled else qnn_unavailable_reason()
        raise ProviderError(f"npu.require_npu is true but the NPU cannot be used: {reason}")
    if not npu.enabled or not qnn_available():
        return False
    if platform.machine().lower() in ("x86_64", "amd64") and not npu.require_npu:
        log.warning(
            "the QNN HTP backend on %s is a simulator: serving on CPU (npu.require_npu: true serves on it)",
            platform.machine(),
        )
        return False
    return True


class Stopwatch:
    """Where one unit's build time went, phase by phase (logged when the unit is ready: start-up and
    reload time at 10,000 models is mostly here)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def __str__(self) -> str:
        total = sum(self.phases.values())
        return f"{total:.2f} s: " + ", ".join(f"{name} {took:.2f} s" for name, took in self.phases.items())


class UnitBuilder:
    """Builds one unit per plan (blocking: run it in an executor), validated before it can serve; packs
    are written by a spawned worker process and cached under the model directory (PACK_DIR)."""

    def __init__(
        self,
        factory: SessionFactory,
        num_items: int,
        model_dir: Path,
        use_npu: bool = False,
        cpu_pack_precision: PackChoice = "auto",
    ) -> None:
        self.factory = factory
        self.num_items = num_items
        self.model_dir = model_dir
        self.use_npu = use_npu
        self.cpu_pack_precision = cpu_pack_precision
        # An agent's answer independent of the other rows in its session run, bit for bit (replicas must
        # agree: docs/deploy.md). ORT's CPU kernels compute one row another way (a GEMV) than several, and
        # a vectorized transcendental (the Softplus head) rounds the tensor's last elements, past the last
        # full SIMD register, in scalar code. So every run ends in padding: a dynamic batch gets a zero row
        # appended, a pack one slot more per model.
        self.batch_invariant = False
        self.select_models = True  # CPU packs selectable: a run computes only the ticked agents' models
        self._builder: ProcessPoolExecutor | None = None
        self._builder_lock = threading.Lock()

    def close(self) -> None:
        """Stop the pack builder process (started on first use)."""
        with self._builder_lock:
            if self._builder is not None:
                self._builder.shutdown(wait=True, cancel_futures=True)
                self._builder = None

    def build(self, plan: UnitPlan) -> InferenceUnit:
        """Create and warm one session (blocking: run it in an executor), validated before it can serve;
        where the time went is logged.

        A CPU pack under ``cpu_pack_precision: auto`` is tried with int8 weights first; a pack that fails
        the per-agent check on this CPU's kernels is served with fp32 weights instead (logged).
        """
        watch = Stopwatch()
        unit = self._build(plan, watch)
        log.info("%s (%d agents) built and checked in %s", plan.name, len(plan.rows), watch)
        return unit

    def _build(self, plan: UnitPlan, watch: Stopwatch) -> InferenceUnit:
        if not isinstance(plan, PackPlan):
            path, prefer_npu = self._model_file(next(iter(plan.models.values())), len(plan.rows))
            return self._validated_unit(plan, path, prefer_npu, None, None, watch)
        slots, per_model = pack_slots(plan, padded=self.batch_invariant)
        if self.use_npu:  # NPU packs: the fp32 conv form
            path = self._pack_file(plan, per_model, "fp32", watch)
            return self._validated_unit(plan, path, True, slots, "fp32", watch, per_model)
        if self.cpu_pack_precision != "auto":
            weights = self.cpu_pack_precision
            path = self._pack_file(plan, per_model, weights, watch)
            return self._validated_unit(plan, path, False, slots, weights, watch, per_model)
        try:
            path = self._pack_file(plan, per_model, "int8", watch)
            return self._validated_unit(plan, path, False, slots, "int8", watch, per_model)
        except PoolError as exc:
            log.warning(
                "%s; serving %s with fp32 pack weights instead (runtime.cpu_pack_precision: auto)",
                exc,
                plan.name,
            )
            path = self._pack_file(plan, per_model, "fp32", watch)
            return self._validated_unit(plan, path, False, slots, "fp32", watch, per_model)

    def _validated_unit(
        self,
        plan: UnitPlan,
        path: Path,
        prefer_npu: bool,
        slots: IntArray | None,
        weights: PackPrecision | None,
        watch: Stopwatch,
        per_model: int = 0,
    ) -> InferenceUnit:
        """A session of ``path`` for the plan, validated (and a pack checked) before it may serve.

        ``per_model``: a pack's rows per model; a selectable pack (dynamic rows) serves models x per_model.
        """
        with watch.phase("session"):
            session, provider = self.factory(path, prefer_npu)
        for info in plan.models.values():
            if path == info.onnx_path:  # the session read the file: was it still this version?
                _check_version(info)
        static = _static_batch(session) or (len(plan.models) * per_model if per_model else None)
        if static is not None and static < len(plan.rows):
            raise PoolError(f"{path}: static batch {static} is smaller than its {len(plan.rows)} agents")
        unit = InferenceUnit(
            plan.name, plan.rows, plan.row_keys, plan.models, session, provider, path, static, slots, weights,
            pad_rows=1 if self.batch_invariant and slots is None else 0,
            per_model=per_model,
        )  # fmt: skip
        with watch.phase("validation"):
            states, out = validate_unit(unit, self.num_items)
        if isinstance(plan, PackPlan):
            with watch.phase("pack check"):
                self._check_pack_once(unit, states, out)
                check_selected(unit, states, out, exact=self.batch_invariant)
        return unit

    def _check_pack_once(self, unit: InferenceUnit, states: FloatArray, out: FloatArray) -> None:
        """The pack check, skipped for a pack file whose exact content passed it before on this machine's
        kernels and provider (a record beside the pack, CHECKED_SUFFIX: its sha256 and the fingerprint)."""
        record = unit.model_path.with_name(unit.model_path.stem + CHECKED_SUFFIX)
        checked = {
            "pack_sha256": sha256_file(unit.model_path),
            "provider": unit.provider,
            "weights": unit.pack_weights,
            "agents": len(unit.rows),
            "kernels": kernel_fingerprint(),
        }
        try:
            if json.loads(record.read_text(encoding="utf-8")) == checked:
                log.info(
                    "%s passed the pack check before on this machine: not checked again", unit.model_path.name
                )
                return
        except (OSError, ValueError):
            pass  # no record, or not one this process can trust: check
        self._check_pack(unit, states, out)
        try:
            with atomic_target(record) as tmp:
                tmp.write_text(json.dumps(checked, indent=1), encoding="utf-8")
        except OSError as exc:  # a read-only model directory: every start checks
            log.debug("pack cache: cannot record %s as checked (%s)", unit.model_path.name, exc)

    def _check_pack(self, unit: InferenceUnit, states: FloatArray, out: FloatArray) -> None:
        """Each agent row of a pack must match its model's fp32 forward (docs/npu.md tolerances), that
        reference computed by the builder process from the model files (packcheck.references)."""
        on_cpu = "cpu_int8" if unit.pack_weights == "int8" else "cpu"
        tolerance = PACK_TOLERANCE["npu" if "QNN" in unit.provider else on_cpu]
        rows_of = dict(zip(unit.models, model_groups(unit.row_keys, list(unit.models)), strict=True))
        try:
            expected = self._in_builder(
                references, [(info.onnx_path, states[rows_of[key]]) for key, info in unit.models.items()]
            )
        except ReferenceMismatch as exc:
            raise PoolError(f"{unit.model_path}: {exc}") from None
        for (key, info), reference in zip(unit.models.items(), expected, strict=True):
            rows = rows_of[key]
            error, excess = row_errors(out[rows], reference, tolerance)
            atol, rtol = tolerance
            if (excess > 0).any():
                raise PoolError(
                    f"{unit.model_path}: pack rows of {info.onnx_path.name} differ from the model's fp32 "
                    f"forward (max abs error {float(error.max()):.3g} > atol {atol} + rtol {rtol})"
                )

    def _model_file(self, info: ModelInfo, agents: int) -> tuple[Path, bool]:
        """An NPU variant whose static batch holds the whole group (one call per tick), else the fp32 model.

        Without a fitting variant the fp32 model still asks for the NPU when serving there, so that
        blockmarket.models.providers explains why it lands on CPU (or refuses, with npu.require_npu).
        """
        fitting = [v for v in info.variants if v.batch_size >= agents and v.path.is_file()]
        if self.use_npu and fitting:
            best = min(fitting, key=lambda v: v.batch_size)
            return best.path, True
        return info.onnx_path, self.use_npu

    def _pack_file(self, plan: PackPlan, per_model: int, precision: PackPrecision, watch: Stopwatch) -> Path:
        """Build (or reuse) the pack of the plan's models, ``per_model`` rows each, named by versions
        (content hashes, so a replaced model never reuses a pack of its old weights)."""
        form = "conv" if self.use_npu else "matmul_int8" if precision == "int8" else "matmul"
        selectable = self.select_models and not self.use_npu  # runs only the models that ticked
        versions = [f"{k}@{info.version}" for k, info in plan.models.items()]
        mark = "sel-" if selectable else ""
        digest = hashlib.sha256("|".join([form, mark, str(per_model), *versions]).encode()).hexdigest()[:16]
        path = self.model_dir / PACK_DIR / f"pack-{form}-{len(versions)}x{per_model}-{mark}{digest}.onnx"
        if path.is_file():
            touch(path)
            return path
        from blockmarket.models.pack import write_pack  # onnx (~1 s to import): only to write a pack

        sources = [(info.onnx_path, info.version) for info in plan.models.values()]
        with watch.phase(f"{form} pack written"):
            self._in_builder(write_pack, sources, path, form, per_model, selectable)
        return path

    def _in_builder(self, work: Callable[..., _T], *args: Any) -> _T:
        """``work(*args)`` in the pack builder process (its exceptions raised here)."""
        builder = self._pack_builder()
        try:
            return builder.submit(work, *args).result()
        except BrokenProcessPool:
            with self._builder_lock:
                self._builder = None  # the next call gets a new worker
            raise PoolError(f"the pack builder process died (out of memory?) in {work.__name__}") from None

    def _pack_builder(self) -> ProcessPoolExecutor:
        """The worker process that builds and checks packs (started on first use, spawned: nothing is
        forked), at a lower priority than serving."""
        with self._builder_lock:
            if self._builder is None:
                self._builder = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"), initializer=lower_priority
                )
            return self._builder


def _check_version(info: ModelInfo) -> None:
    """Refuse a model file replaced since its version was read: it must not serve under that label."""
    found = sha256_file(info.onnx_path)[: len(info.version)]
    if found != info.version:
        raise PoolError(
            f"{info.onnx_path}: its content (sha256 {found}) is no longer version {info.version}; "
            "the change is reloaded as such"
        )


def _static_batch(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def validate_unit(unit: InferenceUnit, num_items: int) -> tuple[FloatArray, FloatArray]:
    """Refuse a unit whose outputs on realistic states have the wrong shape or are not finite and > 0."""
    count = len(unit.rows)
    states = ModelContract.states(count, num_items, VALIDATION_SEED)
    out = unit.run(states)
    want = (count, num_items * num_items)
    if out.shape != want:
        raise PoolError(f"{unit.model_path}: output shape {out.shape}, expected {want}")
    if not np.isfinite(out).all():
        raise PoolError(f"{unit.model_path}: non-finite outputs on realistic states")
    if (out <= 0).any():
        raise PoolError(f"{unit.model_path}: non-positive exchange rates on realistic states")
    return states, out


def check_selected(unit: InferenceUnit, states: FloatArray, out: FloatArray, exact: bool) -> None:
    """A selectable pack's runs of a few models (the gathering branch) must give those rows what the
    checked run of the whole pack gave: each model alone, then every seventh model together.

    ``exact`` (batch-invariant serving, whose padding ends every run): bit for bit. Otherwise a row
    computed last in the tensor may round its last elements in scalar code (UnitBuilder.batch_invariant),
    so within float32 rounding.
    """
    if not unit.per_model:
        return
    models = unit.slots // unit.per_model if unit.slots is not None else np.zeros(0, np.int64)
    for chosen in ([0], [len(unit.models) - 1], range(0, len(unit.models), 7)):
        take = np.flatnonzero(np.isin(models, list(chosen)))
        got = unit.run(states[take], take)
        same = np.array_equal(got, out[take]) if exact else np.allclose(got, out[take], rtol=1e-5, atol=1e-6)
        if not same:
            raise PoolError(
                f"{unit.model_path}: models {list(chosen)[:5]} run alone in the pack gave other values "
                "than in the whole pack"
            )
