"""Agent state vectors and the trading-matrix update rule, vectorized over a population.

Shapes: N agents, n items. ``inventory`` [N, n], ``desired`` [N] (item index), ``matrices`` [N, n, n],
``success_rate`` [N]. The state vector layout (the original trainer's; docs/protocol.md §6.2) is, per agent,
D = 2n^2 + 2n + 1 values:

    inventory / max(inventory)  | one-hot desired item | own matrix (row-major) |
    mean of the other agents' matrices (row-major) | success rate

Everything here is numpy only: the serving path and the training loop both use it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MATRIX_MIN = 0.1
MATRIX_MAX = 10.0
# The output guard's range for a network's proposal. A TradingNetwork proposes softplus(.) + 0.1 >= 0.1
# (quantized variants may round to just below); on the bounded states of build_states a healthy network
# proposes rates on the matrix's scale. 1000x the matrix maximum means the arithmetic ran away (fp16
# saturates at 65,504), and any proposal above MATRIX_MAX / alpha clips to MATRIX_MAX anyway.
PROPOSAL_MIN = 0.0
PROPOSAL_MAX = 1000 * MATRIX_MAX

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def state_dim(num_items: int) -> int:
    """D for n items: 2n^2 + 2n + 1 (61 for n=5, 145 for n=8)."""
    return 2 * num_items * num_items + 2 * num_items + 1


def items_from_state_dim(dim: int) -> int:
    """Invert :func:`state_dim`; raises if no integer n gives ``dim``."""
    n = round(float(np.sqrt(4 + 8 * (dim - 1)) - 2) / 4)
    if n < 1 or state_dim(n) != dim:
        raise ValueError(f"state dimension {dim} is not 2n^2 + 2n + 1 for any item count n")
    return n


def market_mean_matrices(matrices: FloatArray) -> FloatArray:
    """For every agent, the element-wise mean of the *other* agents' matrices ([N, n, n]).

    A lone agent has no market data: zeros, as in the original. Computed as (sum - own) / (N - 1) in
    float32 (relative error ~1e-6, far below what the networks resolve).
    """
    count = matrices.shape[0]
    if count < 2:
        return np.zeros_like(matrices, dtype=np.float32)
    out = np.subtract(matrices.sum(axis=0), matrices, dtype=np.float32)
    out *= np.float32(1.0 / (count - 1))
    return out


def build_states(
    inventory: npt.ArrayLike,
    desired: npt.ArrayLike,
    matrices: npt.ArrayLike,
    success_rate: npt.ArrayLike,
    market_mean: npt.ArrayLike | None = None,
    out: FloatArray | None = None,
) -> FloatArray:
    """The state matrix X [N, D] (float32) for a whole population in one pass.

    ``market_mean`` [N, n, n] or [n, n] overrides the mean of the other agents' matrices (e.g. market
    rates sent by a game server); by default it is computed from ``matrices``.
    """
    inv = np.asarray(inventory, dtype=np.float32)
    mats = np.asarray(matrices, dtype=np.float32)
    want = np.asarray(desired, dtype=np.int64)
    rate = np.asarray(success_rate, dtype=np.float32)
    count, n = inv.shape
    if mats.shape != (count, n, n) or want.shape != (count,) or rate.shape != (count,):
        raise ValueError(
            f"population arrays disagree: inventory {inv.shape}, desired {want.shape}, "
            f"matrices {mats.shape}, success_rate {rate.shape}"
        )
    if out is None:
        out = np.empty((count, state_dim(n)), dtype=np.float32)
    nn = n * n
    # Per-item column loops (n is small) beat numpy's reductions over a length-n axis by ~4x.
    peak = inv[:, 0].copy()
    for item in range(1, n):
        np.maximum(peak, inv[:, item], out=peak)
    peak[peak <= 0] = 1.0
    np.divide(inv, peak[:, None], out=out[:, :n])
    out[:, n : 2 * n] = want[:, None] == np.arange(n)
    out[:, 2 * n : 2 * n + nn] = mats.reshape(count, nn)
    market = out[:, 2 * n + nn : 2 * n + 2 * nn]
    if market_mean is None:
        market[...] = market_mean_matrices(mats).reshape(count, nn)
    else:
        mean = np.asarray(market_mean, dtype=np.float32)
        market[...] = np.broadcast_to(mean.reshape(-1, nn), (count, nn))
    out[:, -1] = rate
    return out


def apply_update(matrices: FloatArray, proposals: npt.ArrayLike, alpha: float) -> FloatArray:
    """The update rule, in place: M <- (1-a)M + a*out; diag 1; clip [0.1, 10]; diag 1. Returns M."""
    count, n, _ = matrices.shape
    prop = np.asarray(proposals, dtype=np.float32).reshape(count, n, n)
    matrices *= 1.0 - alpha
    matrices += alpha * prop
    np.clip(matrices, MATRIX_MIN, MATRIX_MAX, out=matrices)
    diag = np.arange(n)
    matrices[:, diag, diag] = 1.0
    return matrices


def refused_proposals(proposals: FloatArray) -> BoolArray:
    """The output guard: rows [M] of ``proposals`` [M, ...] with a non-finite entry or one outside
    [PROPOSAL_MIN, PROPOSAL_MAX] (NaN fails both comparisons, so two reductions decide)."""
    flat = proposals.reshape(len(proposals), -1)
    if not flat.size or (flat.min() >= PROPOSAL_MIN and flat.max() <= PROPOSAL_MAX):
        return np.zeros(len(proposals), dtype=np.bool_)
    return ~((flat.min(axis=1) >= PROPOSAL_MIN) & (flat.max(axis=1) <= PROPOSAL_MAX))


def initial_matrices(rng: np.random.Generator, count: int, num_items: int) -> FloatArray:
    """Fresh agents' matrices: uniform(0.5, 2.0) with diagonal 1."""
    mats = rng.uniform(0.5, 2.0, size=(count, num_items, num_items)).astype(np.float32)
    diag = np.arange(num_items)
    mats[:, diag, diag] = 1.0
    return mats


def initial_inventory(rng: np.random.Generator, count: int, num_items: int) -> FloatArray:
    """Fresh agents' inventories: 5..14 of each item."""
    return rng.integers(5, 15, size=(count, num_items)).astype(np.float32)


def realistic_states(rng: np.random.Generator, count: int, num_items: int) -> FloatArray:
    """States drawn like real agent states, plus edge cases, for validation and calibration.

    Rows: normalised inventories (some with zeros), one-hot desired items, own matrices in
    [0.1, 10] (log-uniform, diagonal 1), market means of a sampled market, success rates in [0, 1].
    The first rows are edge cases: zero inventory, all-max matrices, all-min matrices, no market data.
    """
    n = num_items
    inventory = rng.integers(0, 40, size=(count, n)).astype(np.float32)
    inventory[rng.random((count, n)) < 0.1] = 0.0
    desired = rng.integers(0, n, size=count)
    mats = np.exp(rng.uniform(np.log(MATRIX_MIN), np.log(MATRIX_MAX), size=(count, n, n))).astype(np.float32)
    diag = np.arange(n)
    mats[:, diag, diag] = 1.0
    market = np.exp(rng.uniform(np.log(0.3), np.log(5.0), size=(count, n, n))).astype(np.float32)
    market[:, diag, diag] = 1.0
    success = rng.uniform(0.0, 1.0, size=count).astype(np.float32)
    edge = min(count, 4)
    inventory[:edge][0] = 0.0
    if edge > 1:
        mats[1] = MATRIX_MAX
        mats[1, diag, diag] = 1.0
        success[1] = 1.0
    if edge > 2:
        mats[2] = MATRIX_MIN
        mats[2, diag, diag] = 1.0
        success[2] = 0.0
    if edge > 3:
        market[3] = 0.0
    return build_states(inventory, desired, mats, success, market_mean=market)
