"""Session pools for the tests: counted CPU sessions, a started pool, the per-agent reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from blockmarket.models.files import discover_models
from runtime.agents import create_population
from runtime.sessions import SessionPool
from tests.support.serving import ITEMS


class CountingFactory:
    """Plain CPU sessions whose run() calls are counted per model file."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.created: list[Path] = []
        self.fed: list[tuple[str, dict[str, tuple[int, ...]]]] = []  # (file, input -> shape) per run

    def __call__(self, path: Path, prefer_npu: bool) -> tuple[Any, str]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.created.append(path)
        counts, fed, name = self.calls, self.fed, path.name

        class Counted:
            def get_inputs(self) -> Any:
                return session.get_inputs()

            def get_outputs(self) -> Any:
                return session.get_outputs()

            def run(self, *args: Any) -> Any:
                counts[name] = counts.get(name, 0) + 1
                fed.append((name, {k: np.shape(v) for k, v in args[1].items()}))
                return session.run(*args)

        return Counted(), "CPUExecutionProvider"


def per_agent_reference(model_dir: Path, keys: tuple[str, ...], states: np.ndarray) -> np.ndarray:
    """What the original did: one session.run per agent on its own model."""
    sessions = {k: ort.InferenceSession(str(model_dir / f"{k}.onnx")) for k in set(keys)}
    return np.concatenate(
        [sessions[k].run(None, {"state_vector": states[i : i + 1]})[0] for i, k in enumerate(keys)]
    )


async def make_pool(model_dir: Path, agents: int, max_sessions: int, **kwargs: Any) -> SessionPool:
    models, _ = discover_models(model_dir, ITEMS)
    pop = create_population(models, ITEMS, num_agents=agents, assignment="round_robin", seed=3)
    factory = kwargs.pop("factory", CountingFactory())
    pool = SessionPool(
        pop,
        {m.key: m for m in models},
        factory=factory,
        max_sessions=max_sessions,
        model_dir=model_dir,
        **kwargs,
    )
    await pool.start()
    return pool
