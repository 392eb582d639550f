"""Property: no sequence of accepted ticks puts a value outside [0.1, 10] into an answer or the state.

Ticks are drawn with extreme finite values (±3.4e38, 1e38, 1e-45, the bounds and just past them),
NaN and infinities, encoded, and decoded as the runtime does; every accepted one runs the serving
path's state -> inference (real ONNX Runtime sessions) -> output guard and update rule. One of the two
models overflows to inf on accepted market rates above 8, so the output guard is part of the property.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from blockmarket.core.config import RuntimeConfig
from blockmarket.core.state import MATRIX_MAX, MATRIX_MIN
from blockmarket.wire.limits import Limits, ProtocolError
from blockmarket.wire.messages import MarketTick, encode_tick
from blockmarket.wire.protocol import decode_tick
from tests.support.serving import ITEMS, OfflineMarket, runaway_weights, trading_weights, write_model

AGENTS = 6
N = len(ITEMS)
ALPHA = 0.5  # a large step: a bad proposal would show at once
LIMITS = Limits(num_items=N)
EXTREMES = (0.0, 1e-45, 1.0, 5.0, 9.99, 10.0, 10.01, 0.1, 0.0999, 1e9, 1.1e9, 1e38, 3.4e38, -1.0, -3.4e38)
ODD = (float("nan"), float("inf"), float("-inf"))


def values(low: float, high: float) -> st.SearchStrategy[float]:
    """Finite float32 values in [low, high], extremes, NaN and infinities (weighted towards the first)."""
    low32, high32 = float(np.nextafter(np.float32(low), np.float32(high))), float(np.float32(high))
    return st.one_of(
        st.floats(low32, high32, width=32),
        st.floats(low32, high32, width=32),
        st.sampled_from(EXTREMES),
        st.sampled_from(ODD),
    )


@st.composite
def ticks(draw: st.DrawFn, agent_ids: tuple[str, ...]) -> bytes:
    ids = tuple(draw(st.permutations(agent_ids))[: draw(st.integers(1, len(agent_ids)))])
    count = len(ids)
    attempted = draw(arrays(np.float32, count, elements=values(0, 1e9)))
    share = draw(arrays(np.float32, count, elements=st.floats(0, 1, width=32)))
    with np.errstate(invalid="ignore"):  # inf * 0: NaN, refused on decode
        successful = attempted * share
    market = draw(
        st.one_of(
            st.none(),
            st.just(np.zeros((N, N), np.float32)),
            arrays(np.float32, (N, N), elements=values(MATRIX_MIN, MATRIX_MAX)),
            arrays(np.float32, (N, N), elements=st.sampled_from((8.5, 9.5, MATRIX_MAX))),  # trips the runaway
        )
    )
    tick = MarketTick(
        tick=draw(st.integers(0, 2**53 - 1)),
        sent_at=1.7e9,
        agent_ids=ids,
        inventory=draw(arrays(np.float32, (count, N), elements=values(0, 1e9))),
        successful=successful,
        attempted=attempted,
        market_mean=market,
    )
    return encode_tick(tick)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> OfflineMarket:
    model_dir: Path = tmp_path_factory.mktemp("onnx")
    write_model(model_dir, "m0", trading_weights(0))
    write_model(model_dir, "m9", runaway_weights(trigger=8.0))
    return OfflineMarket(model_dir, RuntimeConfig(num_agents=AGENTS), ITEMS, ALPHA)


def within_rule(matrices: np.ndarray) -> bool:
    diagonal = np.diagonal(matrices, axis1=-2, axis2=-1)
    return bool(
        np.isfinite(matrices).all()
        and matrices.min() >= MATRIX_MIN
        and matrices.max() <= MATRIX_MAX
        and (diagonal == 1.0).all()
    )


AGENT_IDS = tuple(f"agent-{i:04d}" for i in range(AGENTS))


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples in every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(payloads=st.lists(ticks(AGENT_IDS), min_size=1, max_size=6))
def test_accepted_ticks_keep_every_matrix_in_range(market: OfflineMarket, payloads: list[bytes]) -> None:
    market.restart()
    for payload in payloads:
        try:
            tick = decode_tick(payload, LIMITS)
        except ProtocolError as exc:
            event(f"refused: {exc.kind}")
            continue
        answer = market.step(tick)
        event("accepted" + (", output guard refused some" if len(market.refused) else ""))
        assert within_rule(answer), f"answer to tick {tick.tick} breaks the rule"
        assert within_rule(market.population.matrices), f"state after tick {tick.tick} breaks the rule"
