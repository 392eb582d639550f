"""A tick computes only what it needs: the units whose agents ticked, and in a CPU population pack only the
ticked agents' models (a selectable pack gathers their weight sets), with the rows the whole pack gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from blockmarket.core.contract import INPUT_NAME, MODELS_INPUT
from blockmarket.core.state import realistic_states
from blockmarket.models.files import discover_models
from blockmarket.models.pack import PackError, build_pack
from runtime import inference
from runtime.agents import create_population
from runtime.sessions import SessionPool
from tests.runtime.test_int8_pack import population
from tests.support.pools import CountingFactory, make_pool
from tests.support.serving import ITEMS

MODELS, PER_MODEL = 40, 3  # the last row of each model's block stays zero (batch-invariant padding)


def session_of(form: str, selectable: bool) -> ort.InferenceSession:
    model = build_pack(population(MODELS), form=form, batch_per_agent=PER_MODEL, selectable=selectable)  # type: ignore[arg-type]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("form", ["matmul", "matmul_int8"])
def test_a_selectable_pack_runs_only_the_chosen_models_with_the_whole_packs_bits(form: str) -> None:
    plain, selectable = session_of(form, False), session_of(form, True)
    rng = np.random.default_rng(5)
    states = realistic_states(rng, MODELS * PER_MODEL, len(ITEMS)).reshape(MODELS, PER_MODEL, -1)
    states[:, -1] = 0.0
    flat = states.reshape(MODELS * PER_MODEL, -1)
    whole = plain.run(None, {INPUT_NAME: flat})[0].reshape(MODELS, PER_MODEL, -1)
    every = np.arange(MODELS, dtype=np.int64)
    assert selectable.run(None, {INPUT_NAME: flat, MODELS_INPUT: every})[0].tobytes() == whole.tobytes()
    for count in (1, 2, 5, 17, MODELS - 1):
        chosen = np.sort(rng.choice(MODELS, count, replace=False)).astype(np.int64)
        feeds = {INPUT_NAME: states[chosen].reshape(count * PER_MODEL, -1), MODELS_INPUT: chosen}
        (out,) = selectable.run(None, feeds)
        assert out.shape == (count * PER_MODEL, len(ITEMS) ** 2)  # only the chosen models were computed
        agents = out.reshape(count, PER_MODEL, -1)[:, :-1]  # the padding row's bits are not an answer
        assert agents.tobytes() == whole[chosen, :-1].tobytes(), count


def test_a_selected_model_answers_with_its_own_weights() -> None:
    selectable = session_of("matmul", True)
    rows = realistic_states(np.random.default_rng(6), PER_MODEL, len(ITEMS))
    answers = [selectable.run(None, {INPUT_NAME: rows, MODELS_INPUT: np.array([m])})[0] for m in (3, 4)]
    assert not np.allclose(answers[0], answers[1])


def test_the_static_conv_pack_is_not_selectable() -> None:
    with pytest.raises(PackError, match="static shapes"):
        build_pack(population(2), form="conv", selectable=True)


async def test_a_batch_runs_only_the_units_of_its_agents(model_dir: Path) -> None:
    pool = await make_pool(model_dir, agents=10, max_sessions=8)
    factory = pool.factory
    assert isinstance(factory, CountingFactory)
    states = realistic_states(np.random.default_rng(7), 10, len(ITEMS))
    whole = await pool.infer(states)
    factory.calls.clear()
    (m1,) = [unit for unit in pool.current.units if unit.name == "m1"]
    ticked = m1.rows[:2]
    got = await pool.infer(states, rows=ticked)
    assert factory.calls == {"m1.onnx": 1}
    np.testing.assert_allclose(got[ticked], whole[ticked], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
async def test_a_pack_runs_only_the_models_of_the_ticked_agents(
    model_dir: Path, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "GATHER_BELOW", {"int8": 0.5, "fp32": 0.5})  # 1 of these 3 models
    pool = await make_pool(model_dir, agents=10, max_sessions=2, cpu_pack_precision=precision)
    (unit,) = pool.current.units
    assert unit.per_model == 4 and unit.model_path.name.startswith(
        f"pack-matmul{'_int8' * (precision == 'int8')}-3x4-sel-"
    )
    factory = pool.factory
    assert isinstance(factory, CountingFactory)
    states = realistic_states(np.random.default_rng(8), 10, len(ITEMS))
    whole = await pool.infer(states)
    factory.fed.clear()
    keys = np.asarray(pool.population.model_keys)
    ticked = np.flatnonzero(keys == "m2")[:1]
    got = await pool.infer(states, rows=ticked)
    ((_, fed),) = factory.fed
    assert fed == {INPUT_NAME: (4, 61), MODELS_INPUT: (1,)}  # one model's block of 4 rows, not all 12
    np.testing.assert_allclose(got[ticked], whole[ticked], rtol=1e-6, atol=1e-7)
    factory.fed.clear()
    await pool.infer(states, rows=np.arange(len(states)))
    assert [shapes[MODELS_INPUT] for _, shapes in factory.fed] == [(3,)]  # every model: the whole pack
    monkeypatch.setattr(inference, "GATHER_BELOW", {"int8": 0.3, "fp32": 0.3})
    factory.fed.clear()
    np.testing.assert_allclose((await pool.infer(states, rows=ticked))[ticked], whole[ticked], rtol=1e-6)
    assert [shapes[MODELS_INPUT] for _, shapes in factory.fed] == [(3,)]  # 1 of 3 is not below 0.3


async def test_select_models_off_builds_and_runs_the_whole_pack(model_dir: Path) -> None:
    models, _ = discover_models(model_dir, ITEMS)
    population = create_population(models, ITEMS, num_agents=10, assignment="round_robin", seed=3)
    factory = CountingFactory()
    pool = SessionPool(
        population, {m.key: m for m in models}, factory=factory, max_sessions=2, model_dir=model_dir,
        cpu_pack_precision="fp32",
    )  # fmt: skip
    pool.builder.select_models = False  # runtime.select_models: false
    await pool.start()
    (unit,) = pool.current.units
    assert unit.per_model == 0 and "-sel-" not in unit.model_path.name
    states = realistic_states(np.random.default_rng(9), 10, len(ITEMS))
    factory.fed.clear()
    await pool.infer(states, rows=np.flatnonzero(np.asarray(population.model_keys) == "m2")[:1])
    assert [fed for _, fed in factory.fed] == [{INPUT_NAME: (12, 61)}]  # every model's rows, no selection
