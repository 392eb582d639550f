"""Who is in trading range of whom: the candidate pairs of a market step, at a cost that follows the
number of pairs in range rather than N².

A uniform grid (cell side = max distance / CELLS_PER_DISTANCE) sorts agents by (market, row, column);
each requester's possible targets then lie in 2k+1 contiguous runs of that order (one per nearby row,
k = CELLS_PER_DISTANCE), which are expanded into pairs with repeat/cumsum and filtered by exact
distance. Markets of at most DENSE_MAX_AGENTS agents use the dense per-market mask instead (cheaper
there). Both produce the *same* arrays in the same order, so the method never changes a seeded market.

:class:`InRangeSampler` uses the same grid the other way round: instead of every pair, exact draws of
one target ∝ 1/(1 + distance) per requester, at a cost per draw independent of the agents in range
(the market step's O(agents) path, blockmarket.market.targets.choose_sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import numpy.typing as npt

from blockmarket.core.state import FloatArray, IntArray

BoolArray = npt.NDArray[np.bool_]
FloatArray64 = npt.NDArray[np.float64]
Method = Literal["auto", "grid", "dense"]

CELLS_PER_DISTANCE = 3  # k: cells of side d/k, runs of 2k+1 cells: scans ((2k+1)/k)² d² around each agent
SAMPLER_CELLS_PER_DISTANCE = 2  # the sampler's k: (2k+1)² cells of proposal mass per requester (25, not 49)
DENSE_MAX_AGENTS = 96  # per market, at or below which the dense mask is faster (benchmarks/market_step.py)
_MAX_CELLS_PER_AXIS = 1 << 20  # keeps the (market, row, column) key far inside int64 for any spread
_CELL_SLACK = 1.0 + 1e-4  # cells a hair wider than d/k: float32 distance rounding never skips a cell
# a grid of at most 8 cells per agent (or 65,536 cells) gets a table of each cell's first rank
_TABLE_CELLS_PER_AGENT = 8
_TABLE_MIN_CELLS = 1 << 16


@dataclass(frozen=True)
class CandidatePairs:
    """Ordered pairs (r, t) of distinct agents of one market within the distance limit, as *ranks*:
    positions in the grid order (market, row, column, index), ``order[rank]`` being the agent.

    Requester-major: all pairs of one requester are consecutive; requester ranks ascend, and so do
    target ranks within a requester. Ranks, not agent indices, because the per-pair work downstream is
    cheaper on tables permuted once into grid order (N rows) than on K gathers through ``order``.
    """

    order: IntArray  # [N] agent at each rank
    requester_rank: IntArray  # [K]
    target_rank: IntArray  # [K]
    squared_distance: FloatArray  # [K] float32, as compared with the limit

    @property
    def requester(self) -> IntArray:
        """Requester agent indices [K]."""
        return self.order[self.requester_rank]

    @property
    def target(self) -> IntArray:
        """Target agent indices [K]."""
        return self.order[self.target_rank]


def pairs_in_range(
    positions: FloatArray,
    market_size: int,
    max_distance: float,
    requesters: BoolArray | None = None,
    method: Method = "auto",
) -> CandidatePairs:
    """Every pair (r, t), r != t, of the same market (consecutive blocks of ``market_size``) with
    |p_r - p_t| <= ``max_distance`` (float32, inclusive), for the requesters r where ``requesters``
    is True (default: all)."""
    pos = np.asarray(positions, dtype=np.float32)
    count = pos.shape[0]
    if pos.shape != (count, 2) or count == 0:
        raise ValueError(f"positions must have shape [N, 2] with N >= 1; got {pos.shape}")
    if market_size < 1 or count % market_size:
        raise ValueError(f"{count} agents do not split into markets of {market_size}")
    if not np.isfinite(pos).all():
        bad = np.flatnonzero(~np.isfinite(pos).all(axis=1))
        raise ValueError(f"agent positions must be finite; rows {bad[:5].tolist()} are not")
    if not max_distance > 0:
        raise ValueError(f"max_distance must be positive; got {max_distance}")
    active = np.ones(count, dtype=bool) if requesters is None else np.asarray(requesters, dtype=bool)
    if active.shape != (count,):
        raise ValueError(f"requesters mask of shape {active.shape} for {count} agents")
    grid = _Grid.build(pos, market_size, max_distance)
    use_dense = method == "dense" or (method == "auto" and market_size <= DENSE_MAX_AGENTS)
    ranks_r, ranks_t, itself = (grid.dense_pairs if use_dense else grid.run_pairs)(active[grid.order])
    sx, sy = grid.sorted_xy
    d2 = sx[ranks_t]  # in place from here: fresh K-sized arrays cost page faults, not just copies
    d2 -= sx[ranks_r]
    d2 *= d2
    dy = sy[ranks_t]
    dy -= sy[ranks_r]
    dy *= dy
    d2 += dy
    d2[itself] = np.inf  # O(requesters), not a comparison per candidate
    keep = np.flatnonzero(d2 <= grid.limit2)
    return CandidatePairs(grid.order, ranks_r[keep], ranks_t[keep], d2[keep])


def scanned_per_requester(
    positions: FloatArray, market_size: int, max_distance: float, requesters: BoolArray
) -> float:
    """Mean number of agents in the nearby cells of a requester: what enumerating its pairs costs
    (about 1.7x the pairs in range), counted in O(N log N) without making a pair."""
    active = np.asarray(requesters, dtype=bool)
    if not active.any():
        return 0.0
    grid = _Grid.build(np.asarray(positions, dtype=np.float32), market_size, max_distance)
    return float(grid.runs(np.flatnonzero(active[grid.order]))[1].sum() / active.sum())


@dataclass(frozen=True)
class _Grid:
    """Agents sorted by (market, row, column): ``order[rank]`` = agent, ``keys`` ascending.

    Cell keys count a border of ``reach`` empty cells around each market's grid, so the cells near a
    requester always have keys (those off the grid hold nobody) and no lookup needs a mask.
    """

    order: IntArray  # [N] agent at each rank
    keys: IntArray  # [N] sorted cell keys
    row: IntArray  # [N] cell row per rank, counting the border (0 .. rows + 2 reach)
    column: IntArray  # [N] cell column per rank, counting the border
    market: IntArray  # [N] market per rank
    rows: int  # cell rows of a market, with the border
    columns: int  # cell columns, with the border
    reach: int  # cells to scan on each side
    market_size: int
    sorted_xy: tuple[FloatArray, FloatArray]  # float32 x, y per rank
    limit2: np.float32
    low: tuple[float, float]  # world corner of cell (0, 0) (the border's corner)
    side: float  # cell side
    cells: int  # cell keys in all: markets x rows x columns

    @classmethod
    def build(
        cls, pos: FloatArray, market_size: int, max_distance: float, per_distance: int = CELLS_PER_DISTANCE
    ) -> _Grid:
        side = max(
            max_distance / per_distance * _CELL_SLACK,
            float(np.ptp(pos, axis=0).max()) / _MAX_CELLS_PER_AXIS,
        )
        reach = int(np.ceil(max_distance / side))
        low = pos.min(axis=0).astype(np.float64) - reach * side
        cells = np.floor((pos - low) / side).astype(np.int64)
        columns, rows = int(cells[:, 0].max()) + 1 + reach, int(cells[:, 1].max()) + 1 + reach
        market = np.arange(pos.shape[0], dtype=np.int64) // market_size
        key = (market * rows + cells[:, 1]) * columns + cells[:, 0]
        order = np.argsort(key, kind="stable")
        spos = pos[order]
        sorted_keys = key[order]
        return cls(
            order=order,
            keys=sorted_keys,
            row=cells[order, 1],
            column=cells[order, 0],
            market=market[order],
            rows=rows,
            columns=columns,
            reach=reach,
            market_size=market_size,
            sorted_xy=(np.ascontiguousarray(spos[:, 0]), np.ascontiguousarray(spos[:, 1])),
            limit2=np.float32(max_distance) ** 2,
            low=(float(low[0]), float(low[1])),
            side=side,
            cells=(int(market[-1]) + 1) * rows * columns,
        )

    def starts(self, keys: IntArray) -> IntArray:
        """First rank of the cells with these keys (one past the end for the key after the last cell): a
        gather from the cell table where there is one, else a binary search."""
        if self.first is None:
            return np.searchsorted(self.keys, keys, side="left")
        return self.first[keys]

    @cached_property
    def first(self) -> IntArray | None:
        """[cells + 1] first rank of every cell key, made on first use (None: too many cells for a table)."""
        if self.cells > _TABLE_CELLS_PER_AGENT * self.keys.size + _TABLE_MIN_CELLS:
            return None
        return np.searchsorted(self.keys, np.arange(self.cells + 1), side="left")

    def runs(self, ranks: IntArray) -> tuple[IntArray, IntArray]:
        """[R, 2k+1] first rank and length of the run of ranks in each nearby row of requesters ``ranks``."""
        offsets = np.arange(-self.reach, self.reach + 1)
        base = (self.market[ranks, None] * self.rows + self.row[ranks, None] + offsets) * self.columns
        first = base + (self.column[ranks] - self.reach)[:, None]
        start = self.starts(first)
        return start, self.starts(first + 2 * self.reach + 1) - start

    def run_pairs(self, active: BoolArray) -> tuple[IntArray, IntArray, IntArray]:
        """(requester rank, target rank) of every agent in the (2k+1)² cells around each active
        requester (one contiguous run of ranks per nearby row, expanded without a Python loop), and
        where each requester meets itself."""
        ranks = np.flatnonzero(active)
        start, length = self.runs(ranks)
        ends = np.cumsum(length.ravel())
        # target rank = start of its run + its position within the run (int64 throughout: numpy
        # converts any other index type to intp on every gather, which costs more than it saves)
        shift = np.repeat(start.ravel() - (ends - length.ravel()), length.ravel())
        targets = np.arange(shift.size) + shift
        requesters = np.repeat(ranks, length.sum(axis=1))
        own_run = (ends - length.ravel()).reshape(length.shape)[:, self.reach]
        return requesters, targets, own_run + (ranks - start[:, self.reach])

    def dense_pairs(self, active: BoolArray) -> tuple[IntArray, IntArray, IntArray]:
        """(requester rank, target rank) of every pair within a market, for active requesters (the
        N²/E mask, in the same order as :meth:`run_pairs` after the distance filter), and where each
        requester meets itself."""
        size = self.market_size
        mask = np.broadcast_to(active.reshape(-1, size, 1), (active.size // size, size, size))
        block, seat_r, seat_t = np.nonzero(mask)
        seat = np.flatnonzero(active) % size
        return block * size + seat_r, block * size + seat_t, np.arange(seat.size) * size + seat


_BOUND_SLACK = 1e-5  # nearest-distance bounds shrunk by this (relative, and x cell side): float32 safety


def _gap(position: npt.NDArray[np.floating], low: npt.NDArray[np.floating], side: float) -> FloatArray64:
    """Distance along one axis from ``position`` [R, 1] to the cells starting at ``low`` [R, S] (0 inside)."""
    return np.maximum(np.maximum(low - position, position - (low + side)), 0.0)


@dataclass(frozen=True)
class InRangeSampler:
    """Exact draws of a target t != r in range of requester r with probability ∝ 1/(1 + |p_r - p_t|),
    at a cost per draw that does not depend on how many agents are in range.

    For each requester, the (2k+1)² grid cells around its own one get a proposal mass
    ``agents in the cell × 1/(1 + nearest distance from r to the cell)`` (r itself left out of its own
    cell; cells entirely beyond the limit get none). A draw picks a cell by that mass, a uniform agent in
    it, and keeps it with probability ``w(t) / bound(cell)`` when t is in range (float32, inclusive, as
    :func:`pairs_in_range` decides it), else rejects it. Proposal × acceptance is then ∝ w(t) for every
    agent in range and 0 for any other: the kept draws follow the exact weights (rejection sampling).
    ``w(t) = 1 / (1 + sqrt(d²))`` with d² the float32 squared distance of :func:`pairs_in_range`.
    """

    grid: _Grid
    ranks: IntArray  # [R] requester ranks
    cell_start: IntArray  # [R, C] first rank of each nearby cell
    cell_count: IntArray  # [R, C] agents in it (without the requester itself)
    bound: npt.NDArray[np.float64]  # [R, C] 1/(1 + nearest distance): >= w of any agent in the cell
    cumulative: npt.NDArray[np.float64]  # [R, C] proposal mass summed over all cells of rows 0..r up to c
    before: npt.NDArray[np.float64]  # [R] the sum before row r's first cell
    total: npt.NDArray[np.float64]  # [R] proposal mass; 0: nobody else within the nearby cells
    own_cell: int  # column of the requester's own cell in the [R, C] tables

    @classmethod
    def build(
        cls, positions: FloatArray, market_size: int, max_distance: float, requesters: BoolArray
    ) -> InRangeSampler:
        """The sampler for the requesters where ``requesters`` (per agent) is True."""
        pos = np.asarray(positions, dtype=np.float32)
        grid = _Grid.build(pos, market_size, max_distance, SAMPLER_CELLS_PER_DISTANCE)
        ranks = np.flatnonzero(np.asarray(requesters, dtype=bool)[grid.order])
        steps = np.arange(-grid.reach, grid.reach + 1)  # cell c = (row step, column step) row-major: [S²]
        row, col = grid.row[ranks, None] + steps, grid.column[ranks, None] + steps  # [R, S] each
        # a row's S cells have consecutive keys: S + 1 table entries give their starts and ends
        row_key = (grid.market[ranks, None] * grid.rows + row) * grid.columns + col[:, :1]
        keys = row_key[:, :, None] + np.arange(steps.size + 1)  # [R, S, S + 1]
        edges = grid.starts(keys)
        start = edges[:, :, :-1].reshape(ranks.size, -1)
        count = (edges[:, :, 1:] - edges[:, :, :-1]).reshape(ranks.size, -1)
        own_cell = int(grid.reach * steps.size + grid.reach)
        count[:, own_cell] -= 1  # the requester is in its own cell and never its own target
        # nearest distance to each cell: separable, from the gaps along each axis ([R, S] each)
        sx, sy = (grid.sorted_xy[axis][ranks, None].astype(np.float64) for axis in (0, 1))
        gap_x = _gap(sx, grid.low[0] + col * grid.side, grid.side)
        gap_y = _gap(sy, grid.low[1] + row * grid.side, grid.side)
        nearest = np.sqrt((gap_y * gap_y)[:, :, None] + (gap_x * gap_x)[:, None, :]).reshape(ranks.size, -1)
        nearest *= 1.0 - _BOUND_SLACK
        nearest -= _BOUND_SLACK * grid.side
        np.maximum(nearest, 0.0, out=nearest)
        bound = 1.0 / (1.0 + nearest)
        mass = count * bound
        mass[nearest > max_distance] = 0.0
        # one running sum over all rows (rows stacked in ascending order: one search draws for all rows)
        cumulative = np.cumsum(mass.ravel()).reshape(mass.shape)
        before = np.concatenate([[0.0], cumulative[:-1, -1]])
        total = cumulative[:, -1] - before
        return cls(grid, ranks, start, count, bound, cumulative, before, total, own_cell)

    def draw(self, rows: IntArray, per_row: int, rng: np.random.Generator) -> tuple[IntArray, FloatArray]:
        """``per_row`` independent proposals for each requester ``rows`` (indices into ``ranks``):
        (target rank, float32 squared distance), target -1 where the proposal was rejected. Kept targets
        are exact draws ∝ 1/(1 + distance) over the agents in range (rows of total 0 never keep one)."""
        rows = np.repeat(rows, per_row)
        cells = self.cumulative.shape[1]
        # the cell of row r whose running sum first passes before[r] + u * total[r], found for all rows by
        # one search (float64 rounding can move a pick across a cell edge: ~1e-16 of the sum, far below
        # any cell's mass)
        pick = rng.random(rows.size) * self.total[rows] + self.before[rows]
        cell = np.searchsorted(self.cumulative.ravel(), pick, side="right") - rows * cells
        cell = np.clip(cell, 0, cells - 1)
        count = self.cell_count[rows, cell]
        seat = np.floor(rng.random(rows.size) * count).astype(np.int64)
        me = self.ranks[rows]
        target = self.cell_start[rows, cell] + seat
        target += (cell == self.own_cell) & (target >= me)  # skip the requester in its own cell
        target = np.where(count > 0, target, me)  # an empty cell (rounding at the edge): rejected below
        sx, sy = self.grid.sorted_xy
        d2 = sx[target] - sx[me]  # the same float32 operations as pairs_in_range
        d2 *= d2
        dy = sy[target] - sy[me]
        dy *= dy
        d2 += dy
        weight = 1.0 / (1.0 + np.sqrt(d2.astype(np.float64)))
        keep = (
            (count > 0) & (d2 <= self.grid.limit2) & (rng.random(rows.size) * self.bound[rows, cell] < weight)
        )
        return np.where(keep, target, -1).reshape(-1, per_row), d2.reshape(-1, per_row)
