"""Evolutionary training on the market simulation, writing checkpoints in the original format.

Per generation every agent plays ``training.markets_per_generation`` fresh markets (new positions and
inventories; its own desired item, network and inherited matrix) for ``environment.generation_length``
steps; its fitness is the mean over those markets. The top ``survival_rate`` survive, the rest is
refilled with mutated copies of survivors (weights + N(0, mutation_rate), matrix + N(0,
matrix_mutation_std)) and ``fresh_agent_fraction`` fresh random agents. Every agent ever created gets a
new id ``<run>-g<generation>a<k>``, so no checkpoint overwrites another agent's.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from blockmarket.core.config import Config
from blockmarket.core.state import FloatArray, IntArray, apply_update, initial_matrices, state_dim
from blockmarket.market.rules import MarketPopulation
from conversion.checkpoint import save_checkpoint
from conversion.metadata import write_json_atomic
from conversion.networks import TradingNetwork
from training.episode import MarketResults, play
from training.policy import PolicyPopulation, single_threaded

logger = logging.getLogger(__name__)

SUMMARY_FILE = "training_summary.json"


@dataclass
class Lineages:
    """The population being evolved: what an agent passes on (network, matrix, desired item, history)."""

    agent_ids: list[str]
    desired: IntArray  # [P]
    matrices: FloatArray  # [P, n, n], the matrix each agent ended its last generation with
    policies: PolicyPopulation
    histories: list[list[float]]  # fitness per generation lived


@dataclass(frozen=True)
class GenerationStats:
    """One generation, as logged, shown in the progress bar and written to the summary file."""

    generation: int
    best_fitness: float
    mean_fitness: float
    best_agent: str
    trades_per_market: float
    volume_per_market: float
    success_rate: float
    seconds: float


@dataclass
class TrainingSummary:
    """What a run did and wrote (also saved as ``training_summary.json`` in the output directory)."""

    run_id: str
    seed: int
    output_dir: Path
    stop_reason: str = ""
    generations: list[GenerationStats] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    final_checkpoints: list[Path] = field(default_factory=list)
    final_fitness: dict[str, float] = field(default_factory=dict)  # agent id -> fitness, best first
    seconds: float = 0.0

    @property
    def best_fitness(self) -> float:
        return max((g.best_fitness for g in self.generations), default=float("nan"))

    @property
    def summary_path(self) -> Path:
        return self.output_dir / SUMMARY_FILE


class Evolution:
    """One training run: owns the random streams, the id counter and the current population."""

    def __init__(self, config: Config, seed: int, run_id: str) -> None:
        self.config = config
        self.env = config.environment
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.run_id = run_id
        size = self.env.population_size
        n = self.env.num_items
        self.lineages = Lineages(
            agent_ids=self._new_ids(1, size),
            desired=self.rng.integers(0, n, size=size),
            matrices=initial_matrices(self.rng, size, n),
            policies=PolicyPopulation.fresh(size, n, config.network.hidden_dim, self.generator),
            histories=[[] for _ in range(size)],
        )

    def _new_ids(self, generation: int, count: int) -> list[str]:
        return [f"{self.run_id}-g{generation}a{k}" for k in range(count)]

    def markets(self) -> MarketPopulation:
        """This generation's fresh markets (one block each), seat p holding lineage p's desired item and
        inherited matrix."""
        lin, count = self.lineages, self.config.training.markets_per_generation
        size = len(lin.agent_ids)
        market = MarketPopulation.random(
            self.rng, size * count, self.env.num_items, self.env.world_size, markets=count
        )
        market.desired = np.tile(lin.desired, count)
        market.matrices = np.tile(lin.matrices, (count, 1, 1))
        return market

    def next_generation(self, generation: int, fitness: FloatArray, market: MarketPopulation) -> None:
        """Selection, mutation and fresh agents; ``generation`` is the one the newcomers are born into."""
        lin, cfg, n = self.lineages, self.config.training, self.env.num_items
        size = len(lin.agent_ids)
        order = np.argsort(-fitness, kind="stable")
        survivors = order[: max(1, round(size * self.env.survival_rate))]
        fresh = min(round(size * cfg.fresh_agent_fraction), size - survivors.size)
        parents = survivors[np.arange(size - survivors.size - fresh) % survivors.size]
        matrices = market.matrices[:size]  # as they ended the first market
        noisy = matrices[parents] + self.rng.normal(0.0, cfg.matrix_mutation_std, (parents.size, n, n))
        # alpha = 1 makes the update rule "take the proposal, clip to [0.1, 10], diagonal 1".
        child_matrices = apply_update(noisy.astype(np.float32), noisy, alpha=1.0)
        born = parents.size + fresh
        self.lineages = Lineages(
            agent_ids=[lin.agent_ids[i] for i in survivors] + self._new_ids(generation, born),
            desired=np.concatenate(
                [lin.desired[survivors], lin.desired[parents], self.rng.integers(0, n, fresh)]
            ),
            matrices=np.concatenate(
                [matrices[survivors], child_matrices, initial_matrices(self.rng, fresh, n)]
            ),
            policies=PolicyPopulation.concat(
                [
                    lin.policies.take(survivors),
                    lin.policies.mutated(parents, self.env.mutation_rate, self.generator),
                    PolicyPopulation.fresh(fresh, n, lin.policies.hidden_dim, self.generator),
                ]
            ),
            histories=[list(lin.histories[i]) for i in survivors] + [[] for _ in range(born)],
        )

    def save(self, path: Path, index: int, market: MarketPopulation) -> Path:
        """Agent ``index`` of the current population as an original-format checkpoint (its inventory,
        matrix and position as they ended the first market)."""
        lin, items = self.lineages, self.env.items_list
        weights = lin.policies.state_dict(index)
        network = TradingNetwork(state_dim(len(items)), lin.policies.hidden_dim, len(items))
        network.load_state_dict(weights)
        optimizer = torch.optim.Adam(network.parameters(), lr=self.config.learning.learning_rate)
        return save_checkpoint(
            path,
            network_state_dict=weights,
            optimizer_state_dict=optimizer.state_dict(),
            agent_id=lin.agent_ids[index],
            desired_item=items[int(lin.desired[index])],
            inventory=dict(zip(items, market.inventory[index].tolist(), strict=True)),
            trading_matrix=market.matrices[index],
            position=market.positions[index],
            reward_history=lin.histories[index],
        )


def _stats(
    generation: int, fitness: FloatArray, ids: list[str], results: MarketResults, seconds: float
) -> GenerationStats:
    markets = results.fitness.shape[0]
    best = int(np.argmax(fitness))
    return GenerationStats(
        generation=generation,
        best_fitness=round(float(fitness[best]), 4),
        mean_fitness=round(float(fitness.mean()), 4),
        best_agent=ids[best],
        trades_per_market=results.trades / markets,
        volume_per_market=round(results.volume / markets, 4),
        success_rate=round(float(results.success_rate.mean()), 4),
        seconds=round(seconds, 4),
    )


def _summary_document(config: Config, summary: TrainingSummary) -> dict[str, Any]:
    return {
        "run_id": summary.run_id,
        "seed": summary.seed,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(summary.seconds, 3),
        "stop_reason": summary.stop_reason,
        "output_dir": str(summary.output_dir),
        "best_fitness": summary.best_fitness,
        "generations": [asdict(g) for g in summary.generations],
        "checkpoints": [p.name for p in summary.checkpoints],
        "final_agents": [
            {"agent_id": agent, "fitness": fit, "file": path.name}
            for (agent, fit), path in zip(
                summary.final_fitness.items(), summary.final_checkpoints, strict=True
            )
        ],
        "config": config.model_dump(mode="json", include={"environment", "network", "learning", "training"}),
    }


def train(
    config: Config,
    generations: int | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    on_generation: Callable[[GenerationStats], None] | None = None,
) -> TrainingSummary:
    """Run evolutionary training; write checkpoints and ``training_summary.json`` into ``output_dir``
    (default ``training.model_save_path``). Safe to call from a worker process."""
    cfg = config.training
    total = generations if generations is not None else cfg.max_generations
    if total < 1:
        raise ValueError(f"generations must be at least 1, got {total}")
    seed = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
    summary = TrainingSummary(
        run_id=secrets.token_hex(3), seed=seed, output_dir=Path(output_dir or cfg.model_save_path)
    )
    summary.output_dir.mkdir(parents=True, exist_ok=True)
    with single_threaded():
        _run(config, total, summary, progress, on_generation)
    return summary


# size: the generation loop, read top to bottom (evaluate, log, save, breed)
def _run(
    config: Config,
    total: int,
    summary: TrainingSummary,
    progress: bool,
    on_generation: Callable[[GenerationStats], None] | None,
) -> None:
    cfg, env = config.training, config.environment
    evolution = Evolution(config, summary.seed, summary.run_id)
    started = time.perf_counter()
    best_ever, stale = -np.inf, 0
    bar = tqdm(total=total, unit="gen", desc="training", disable=not progress, dynamic_ncols=True)
    with bar:
        for generation in range(1, total + 1):
            tick = time.perf_counter()
            market = evolution.markets()
            results = play(
                market,
                evolution.lineages.policies,
                env.generation_length,
                config.learning.matrix_update_rate,
                env,
                evolution.rng,
            )
            fitness = results.fitness.mean(axis=0)
            lin = evolution.lineages
            for history, value in zip(lin.histories, fitness.tolist(), strict=True):
                history.append(round(value, 4))
            stats = _stats(generation, fitness, lin.agent_ids, results, time.perf_counter() - tick)
            summary.generations.append(stats)
            bar.set_postfix(
                best=f"{stats.best_fitness:.2f}",
                avg=f"{stats.mean_fitness:.2f}",
                trades=f"{stats.trades_per_market:.0f}",
            )
            bar.update()
            if generation % cfg.log_frequency == 0:
                logger.log(
                    logging.DEBUG if progress else logging.INFO,  # the progress bar already shows it
                    "generation %d: best %.2f (%s) mean %.2f, %.0f trades/market, success %.2f",
                    generation,
                    stats.best_fitness,
                    stats.best_agent,
                    stats.mean_fitness,
                    stats.trades_per_market,
                    stats.success_rate,
                )
            if on_generation is not None:
                on_generation(stats)
            ranked = np.argsort(-fitness, kind="stable")[: cfg.top_k_saved]
            if generation % cfg.model_save_frequency == 0:
                for rank, index in enumerate(ranked, start=1):
                    path = summary.output_dir / f"agent_gen{generation}_rank{rank}.pth"
                    summary.checkpoints.append(evolution.save(path, int(index), market))
            if stats.best_fitness > best_ever:
                best_ever, stale = stats.best_fitness, 0
            else:
                stale += 1
            if stats.best_fitness >= cfg.target_fitness:
                summary.stop_reason = (
                    f"target fitness {cfg.target_fitness} reached in generation {generation}"
                )
            elif stale >= cfg.early_stopping_patience:
                summary.stop_reason = f"no improvement for {stale} generations (early stopping)"
            elif generation == total:
                summary.stop_reason = f"completed {total} generations"
            if summary.stop_reason:
                for index in ranked:
                    agent = lin.agent_ids[int(index)]
                    summary.final_fitness[agent] = round(float(fitness[index]), 4)
                    path = summary.output_dir / f"agent_{agent}_final.pth"
                    summary.final_checkpoints.append(evolution.save(path, int(index), market))
                break
            evolution.next_generation(generation + 1, fitness, market)
    summary.seconds = time.perf_counter() - started
    write_json_atomic(summary.summary_path, _summary_document(config, summary))
    logger.info(
        "training %s: %s; best fitness %.2f; %d checkpoints in %s",
        summary.run_id,
        summary.stop_reason,
        summary.best_fitness,
        len(summary.checkpoints) + len(summary.final_checkpoints),
        summary.output_dir,
    )
