"""An inference unit: one live session and the population rows it answers for (a model group's session
or a population pack), run for all its rows or only for the rows that ticked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from blockmarket.core.contract import GATHER_BELOW, MATRIX_OUTPUT, MODELS_INPUT
from blockmarket.core.state import FloatArray, IntArray
from blockmarket.models.files import ModelInfo

PackPrecision = Literal["fp32", "int8"]  # the weights a pack stores


@dataclass(frozen=True)
class InferenceUnit:
    """One live session and the population rows it answers for (a model group or a pack)."""

    name: str
    rows: IntArray  # ascending population rows, in the session's input row order
    row_keys: tuple[str, ...]  # the model key of each of those rows
    models: Mapping[str, ModelInfo]  # model key -> the version this unit was built from
    session: Any
    provider: str
    model_path: Path
    batch_size: int | None  # static batch of the session's input; None = dynamic
    slots: IntArray | None = None  # input row of each agent row in a static batch (None: the first M)
    pack_weights: PackPrecision | None = None  # a pack's stored weights (int8: runtime.cpu_pack_precision)
    pad_rows: int = 0  # zero rows after the agents' in a dynamic batch (batch-invariant serving)
    per_model: int = 0  # a selectable pack's rows per model (0: not one)
    input_name: str = field(init=False)
    output_name: str = field(init=False)
    _slots: IntArray = field(init=False, repr=False)
    _every_model: IntArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        outputs = [o.name for o in self.session.get_outputs()]
        inputs = [i.name for i in self.session.get_inputs()]
        object.__setattr__(self, "input_name", inputs[0])
        object.__setattr__(self, "output_name", MATRIX_OUTPUT if MATRIX_OUTPUT in outputs else outputs[0])
        static = self.batch_size if self.batch_size is not None else 0
        object.__setattr__(self, "_slots", np.arange(len(self.rows)) if self.slots is None else self.slots)
        selectable = MODELS_INPUT in inputs[1:] and self.per_model  # models x per_model rows
        object.__setattr__(self, "per_model", self.per_model if selectable else 0)
        every = static // self.per_model if selectable else 0
        object.__setattr__(self, "_every_model", np.arange(every, dtype=np.int64))

    def run(self, states: FloatArray, take: IntArray | None = None) -> FloatArray:
        """Proposed matrices for the states of the unit's rows (called off the loop thread): [M, n^2] for
        all M rows, or only for the rows at positions ``take`` (ascending) of ``rows``, ``states`` then
        holding just those rows' states.

        A dynamic batch runs just the given rows, plus ``pad_rows`` zero rows at the end (batch-invariant
        serving, UnitBuilder.batch_invariant). A selectable pack runs only the weight sets of the models
        whose rows are taken, while they are few enough for that to be cheaper (:data:`GATHER_BELOW`); a
        static batch runs whole, the rows not taken left zero.
        """
        if self.batch_size is None:
            if not self.pad_rows:
                return self._session_run(states)
            padded = np.concatenate([states, np.zeros((self.pad_rows, states.shape[1]), np.float32)])
            return self._session_run(padded)[: len(states)]
        slots = self._slots if take is None else self._slots[take]
        if take is None and self.slots is None and self.batch_size == len(states):
            return self._session_run(states)
        if self.per_model:
            block, place = np.divmod(slots, self.per_model)
            models = np.unique(block)
            if len(models) < GATHER_BELOW[self.pack_weights or "fp32"] * len(self._every_model):
                # only these models' blocks, side by side, each row at its place in its model's block
                rows = np.searchsorted(models, block) * self.per_model + place
                selected = np.zeros((len(models) * self.per_model, states.shape[1]), dtype=np.float32)
                selected[rows] = states
                return self._session_run(selected, models)[rows]
        padded = np.zeros((self.batch_size, states.shape[1]), dtype=np.float32)
        padded[slots] = states
        return self._session_run(padded, self._every_model)[slots]

    def _session_run(self, states: FloatArray, models: IntArray | None = None) -> FloatArray:
        feeds: dict[str, np.ndarray] = {self.input_name: states}
        if self.per_model:
            feeds[MODELS_INPUT] = models if models is not None else self._every_model
        return np.asarray(self.session.run([self.output_name], feeds)[0])
