"""The session pool: one call per model group per tick gives what per-agent session.run gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from blockmarket.core.state import realistic_states
from blockmarket.models.files import discover_models, read_model, sha256_file
from blockmarket.models.packcheck import kernel_fingerprint
from runtime.agents import create_population
from runtime.planning import PoolError
from runtime.sessions import SessionPool
from runtime.units import CHECKED_SUFFIX, PACK_DIR, UnitBuilder
from tests.support.pools import CountingFactory, make_pool, per_agent_reference
from tests.support.qnn import require_qnn
from tests.support.serving import ITEMS, reference_forward, trading_weights, write_model


async def test_batched_groups_match_per_agent_runs(model_dir: Path) -> None:
    pool = await make_pool(model_dir, agents=10, max_sessions=8)
    assert [u.name for u in pool.current.units] == ["m0", "m1", "m2"]
    factory = pool.factory
    assert isinstance(factory, CountingFactory)
    factory.calls.clear()
    states = realistic_states(np.random.default_rng(0), 10, len(ITEMS))
    got = await pool.infer(states)
    assert factory.calls == {"m0.onnx": 1, "m1.onnx": 1, "m2.onnx": 1}  # one call per group per tick
    want = per_agent_reference(model_dir, pool.population.model_keys, states)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


async def test_population_pack_serves_all_models_in_one_call(model_dir: Path) -> None:
    pool = await make_pool(model_dir, agents=10, max_sessions=2, cpu_pack_precision="fp32")
    (unit,) = pool.current.units
    assert unit.name.startswith("pack:") and len(pool.current.versions) == 3
    assert unit.batch_size == 12  # one weight set per model (3), 4 rows each (the largest group)
    factory = pool.factory
    assert isinstance(factory, CountingFactory)
    factory.calls.clear()
    states = realistic_states(np.random.default_rng(1), 10, len(ITEMS))
    got = await pool.infer(states)
    assert sum(factory.calls.values()) == 1
    want = per_agent_reference(model_dir, pool.population.model_keys, states)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    weights = [trading_weights(int(k[1])) for k in pool.population.model_keys]
    separate = [reference_forward(w, s[None]) for w, s in zip(weights, states, strict=True)]
    np.testing.assert_allclose(got, np.concatenate(separate), rtol=1e-4)


async def test_static_batch_variant_is_padded(tmp_path: Path) -> None:
    weights = trading_weights(7)
    write_model(tmp_path, "solo", weights, variants=[(16, weights)])
    pool = await make_pool(tmp_path, agents=5, max_sessions=1, use_npu=True)
    (unit,) = pool.current.units
    assert unit.batch_size == 16 and unit.model_path.name == "solo_fp32_b16.onnx"
    states = realistic_states(np.random.default_rng(2), 5, len(ITEMS))
    np.testing.assert_allclose(await pool.infer(states), reference_forward(weights, states), rtol=1e-4)


async def test_too_many_architectures_for_max_sessions_is_a_clear_error(tmp_path: Path) -> None:
    for i, hidden in enumerate((8, 8, 16)):
        write_model(tmp_path, f"h{i}", trading_weights(i, hidden=hidden))
    models = {m.key: m for m in discover_models(tmp_path, ITEMS)[0]}
    pop = create_population(list(models.values()), ITEMS, num_agents=6, assignment="round_robin", seed=0)
    pool = SessionPool(pop, models, factory=CountingFactory(), max_sessions=1, model_dir=tmp_path)
    with pytest.raises(PoolError, match=r"3 models of 2 architectures .*max_sessions=1"):
        await pool.start()
    pool.max_sessions = 2  # two packs (H=8 with two models, H=16 alone)
    await pool.start()
    assert sorted(len(u.rows) for u in pool.current.units) == [2, 4]


async def test_reload_swaps_a_valid_model_and_keeps_the_old_one_on_failure(model_dir: Path) -> None:
    pool = await make_pool(model_dir, agents=6, max_sessions=8)
    states = realistic_states(np.random.default_rng(4), 6, len(ITEMS))
    before = await pool.infer(states)
    old_version = pool.current.versions["m1"]

    broken = trading_weights(11)
    broken[-1][:] = np.nan
    write_model(model_dir, "m1", broken)
    assert not await pool.reload({"m1": read_model(model_dir / "m1_metadata.json")})
    assert pool.reload_failures == 1 and pool.current.number == 1
    assert pool.current.versions["m1"] == old_version
    np.testing.assert_array_equal(await pool.infer(states), before)

    fresh = trading_weights(12)
    write_model(model_dir, "m1", fresh)
    assert await pool.reload({"m1": read_model(model_dir / "m1_metadata.json")})
    assert pool.current.number == 2 and pool.current.versions["m1"] != old_version
    after = await pool.infer(states)
    m1_rows = pool.population.groups()["m1"]
    np.testing.assert_allclose(after[m1_rows], reference_forward(fresh, states[m1_rows]), rtol=1e-4)
    others = np.setdiff1d(np.arange(6), m1_rows)
    np.testing.assert_array_equal(after[others], before[others])


async def test_missing_model_for_assigned_agents_is_refused(model_dir: Path) -> None:
    models, _ = discover_models(model_dir, ITEMS)
    pop = create_population(models, ITEMS, num_agents=3, assignment="round_robin", seed=0)
    pool = SessionPool(pop, {"m0": models[0]}, factory=CountingFactory(), max_sessions=4, model_dir=model_dir)
    with pytest.raises(PoolError, match="m1"):
        await pool.start()


@pytest.mark.qnn
async def test_population_pack_runs_on_the_qnn_htp_backend(model_dir: Path) -> None:
    """The real NPU path: a grouped-Conv pack compiled for HTP (simulated here), checked per agent row."""
    require_qnn()
    from blockmarket.core.config import NpuConfig
    from runtime.units import default_session_factory

    npu = NpuConfig(context_cache=False, require_npu=True)  # any CPU-fallback node fails the test
    pool = await make_pool(
        model_dir, agents=16, max_sessions=2, use_npu=True, factory=default_session_factory(npu, 1)
    )
    (unit,) = pool.current.units
    assert unit.provider == "QNNExecutionProvider" and unit.model_path.name.startswith("pack-conv-3x6-")
    states = realistic_states(np.random.default_rng(5), 16, len(ITEMS))
    got = await pool.infer(states)
    want = per_agent_reference(model_dir, pool.population.model_keys, states)
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=2e-2)  # fp16 on HTP (docs/npu.md)


async def test_a_pack_that_disagrees_with_its_models_is_refused(model_dir: Path) -> None:
    class SkewedPacks(CountingFactory):
        def __call__(self, path: Path, prefer_npu: bool) -> tuple[Any, str]:
            session, provider = super().__call__(path, prefer_npu)
            if path.name.startswith("pack-"):
                run = session.run
                session.run = lambda *args: [run(*args)[0] * 1.001]  # a 0.1% error: beyond fp32 tolerance
            return session, provider

    with pytest.raises(PoolError, match=r"differ from the model's fp32"):
        await make_pool(model_dir, agents=6, max_sessions=1, factory=SkewedPacks(), cpu_pack_precision="fp32")


@pytest.mark.qnn
async def test_require_npu_refuses_a_group_without_a_static_variant(model_dir: Path) -> None:
    require_qnn()
    from blockmarket.core.config import NpuConfig
    from blockmarket.models.providers import ProviderError
    from runtime.units import default_session_factory

    factory = default_session_factory(NpuConfig(context_cache=False, require_npu=True), 1)
    with pytest.raises(ProviderError, match="dynamic input dimensions"):
        await make_pool(model_dir, agents=3, max_sessions=8, use_npu=True, factory=factory)


async def test_each_unit_build_logs_where_its_time_went(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Start-up at 10,000 models is mostly unit builds: the log says which phase took the time."""
    caplog.set_level("INFO", logger="runtime.units")
    pool = await make_pool(model_dir, agents=10, max_sessions=2, cpu_pack_precision="fp32")
    pool.close()
    (built,) = [r.getMessage() for r in caplog.records if "built and checked in" in r.getMessage()]
    assert built.startswith("pack:") and "(10 agents)" in built
    for phase in ("matmul pack written", "session", "validation", "pack check"):
        assert f"{phase} " in built, built
    total = float(built.split("built and checked in ")[1].split(" s:")[0])
    parts = [float(p.rsplit(" ", 2)[1]) for p in built.split(" s: ")[1].split(", ")]
    assert abs(total - sum(parts)) <= 0.005 * (len(parts) + 1) + 1e-9  # the phases add up (each rounded)
    caplog.clear()
    pool = await make_pool(model_dir, agents=10, max_sessions=2, cpu_pack_precision="fp32")
    pool.close()
    (reused,) = [r.getMessage() for r in caplog.records if "built and checked in" in r.getMessage()]
    assert "pack written" not in reused  # the cached pack file is reused, not written again


async def test_a_pack_checked_before_on_this_machine_is_not_checked_again(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record beside a pack names its content and this machine's kernels: a restart reuses the
    check; other content or another fingerprint is checked again (and recorded anew)."""
    checks: list[str] = []
    check = UnitBuilder._check_pack

    def counted(self: UnitBuilder, unit: Any, states: Any, out: Any) -> None:
        checks.append(unit.model_path.name)
        check(self, unit, states, out)

    monkeypatch.setattr(UnitBuilder, "_check_pack", counted)

    async def start() -> Path:
        pool = await make_pool(model_dir, agents=6, max_sessions=1, cpu_pack_precision="fp32")
        pool.close()
        (unit,) = pool.current.units
        return unit.model_path

    pack = await start()
    record = pack.with_name(pack.stem + CHECKED_SUFFIX)
    assert len(checks) == 1 and json.loads(record.read_text())["pack_sha256"] == sha256_file(pack)
    assert await start() == pack and len(checks) == 1  # the same content on the same kernels
    stored = json.loads(record.read_text())
    stored["kernels"]["cpu_flags"] += " vnni"  # as if written on another CPU
    record.write_text(json.dumps(stored))
    await start()
    assert len(checks) == 2 and json.loads(record.read_text())["kernels"] == kernel_fingerprint()
    model = onnx.load(str(pack))
    model.doc_string = "the same weights, other bytes"
    onnx.save(model, str(pack))  # other content under the same name
    await start()
    assert len(checks) == 3


async def test_no_record_is_written_for_a_pack_that_fails_its_check(model_dir: Path) -> None:
    class SkewedPacks(CountingFactory):
        def __call__(self, path: Path, prefer_npu: bool) -> tuple[Any, str]:
            session, provider = super().__call__(path, prefer_npu)
            run = session.run
            session.run = lambda *args: [run(*args)[0] * 1.001]
            return session, provider

    with pytest.raises(PoolError, match=r"differ from the model's fp32"):
        await make_pool(model_dir, agents=6, max_sessions=1, factory=SkewedPacks(), cpu_pack_precision="fp32")
    assert not list((model_dir / PACK_DIR).glob(f"*{CHECKED_SUFFIX}"))


async def test_a_pack_wrong_for_one_model_only_is_refused_naming_it(model_dir: Path) -> None:
    """Every model's rows are compared with its own reference, not a sample: a pack off for m1 alone (a
    0.1% error on its rows only) is refused, and the message names m1."""

    class OneModelSkewed(CountingFactory):
        def __call__(self, path: Path, prefer_npu: bool) -> tuple[Any, str]:
            session, provider = super().__call__(path, prefer_npu)
            if path.name.startswith("pack-"):
                run = session.run

                def skewed(*args: Any) -> list[np.ndarray]:
                    out = run(*args)[0].copy()
                    if len(out) == 6:  # the whole pack: 2 slots per model, m1's are rows 2 and 3
                        out[2:4] *= 1.001
                    return [out]

                session.run = skewed
            return session, provider

    with pytest.raises(PoolError, match=r"pack rows of m1\.onnx differ from the model's fp32 forward"):
        await make_pool(
            model_dir, agents=6, max_sessions=1, factory=OneModelSkewed(), cpu_pack_precision="fp32"
        )
