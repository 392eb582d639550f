"""The pack check's reference: each model's fp32 forward in numpy, checked with ONNX Runtime on a sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockmarket.core.state import realistic_states
from blockmarket.models import packcheck
from blockmarket.models.packcheck import ReferenceMismatch, alone_on_cpu, references
from tests.support.serving import ITEMS


def _models(model_dir: Path) -> list[tuple[Path, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [(path, realistic_states(rng, 4, len(ITEMS))) for path in sorted(model_dir.glob("m*.onnx"))]


def test_every_model_gets_its_own_reference_even_outside_the_runtime_sample(model_dir: Path) -> None:
    """With a sample of one model run alone in ONNX Runtime, the other models still get a reference of
    their own file's weights, equal to that model run alone (fp32 tolerance)."""
    models = _models(model_dir)
    assert len(models) == 3
    got = references(models, sample=1)
    for (path, states), reference in zip(models, got, strict=True):
        np.testing.assert_allclose(reference, alone_on_cpu(path, states), atol=1e-5, rtol=1e-4)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # distinct models, distinct references


def test_a_numpy_forward_that_disagrees_with_onnx_runtime_is_refused(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample run alone in ONNX Runtime is what catches a numpy forward gone wrong: the check then
    refuses to judge the pack, naming the model."""
    forward = packcheck.forward_fp32
    monkeypatch.setattr(packcheck, "forward_fp32", lambda weights, states: forward(weights, states) * 1.001)
    with pytest.raises(ReferenceMismatch, match=r"m0\.onnx: its numpy fp32 forward differs"):
        references(_models(model_dir), sample=1)
