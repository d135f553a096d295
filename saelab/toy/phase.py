"""Phase diagrams of superposition (Elhage et al. 2022, §"The Phase Change") as one batched training run.

n features share m < n hidden dimensions. Every feature has importance 1 except the last, the "extra" feature,
whose relative importance sweeps [min_importance, max_importance]; all features share one density (feature
probability), swept over [min_density, max_density]; both axes are log-spaced. Each cell is classified by what
the extra feature ends as: not represented, given a dedicated dimension, or stored in superposition.

Every (cell, replica) pair is one instance of a single `ToyModel`, so a 20×20 sweep with 6 replicas is one run
of 2400 instances. Training sometimes stalls in a local minimum (a feature dies early), so each cell keeps its
lowest-loss replica — the same as running a few seeds and reporting the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import einops
import torch

from saelab.config import require_positive_ints
from saelab.errors import SaelabError
from saelab.toy.analysis import REPRESENTED_NORM, dimensionality, feature_errors, feature_norms
from saelab.toy.model import ToyModel, ToyModelConfig, ToyTrainConfig
from saelab.toy.train import train_toy_model

PHASES = ("not represented", "dedicated", "superposition")
DEDICATED_DIMENSIONALITY = 0.9  # the extra feature keeps ≥ 90% of a dimension to itself


@dataclass
class PhaseDiagramConfig:
    """The sweep: `grid × grid` cells, `replicas` seeds per cell.

    In one hidden dimension a feature can only change sign by passing through zero, so a seed that starts
    two features on the same side often stays stuck there; with 6 replicas a cell misses the antipodal
    optimum only when all six do.
    """

    n_features: int = 2
    d_hidden: int = 1
    grid: int = 20
    min_importance: float = 0.1
    max_importance: float = 10.0
    min_density: float = 0.01
    max_density: float = 1.0
    replicas: int = 6

    def validate(self) -> None:
        require_positive_ints(self, ("n_features", "d_hidden", "grid", "replicas"))
        if self.n_features < 2:
            raise SaelabError(f"a phase diagram needs at least 2 features (one extra), got {self.n_features}")
        if not 0 < self.min_importance <= self.max_importance < math.inf:
            raise SaelabError(
                f"importance range must satisfy 0 < min <= max, got [{self.min_importance}, {self.max_importance}]"
            )
        if not 0 < self.min_density <= self.max_density <= 1:
            raise SaelabError(
                f"density range must satisfy 0 < min <= max <= 1, got [{self.min_density}, {self.max_density}]"
            )

    def axes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(relative importances [grid], densities [grid]), both ascending and log-spaced."""

        def log_space(lo: float, hi: float) -> torch.Tensor:
            return torch.logspace(math.log10(lo), math.log10(hi), self.grid)

        return log_space(self.min_importance, self.max_importance), log_space(self.min_density, self.max_density)


def phase_train_config(seed: int = 0) -> ToyTrainConfig:
    """Training for sweeps: short, small batches of non-empty rows; replicas buy more than steps here."""
    return ToyTrainConfig(steps=1000, batch_size=64, seed=seed)


def sweep_model(cfg: PhaseDiagramConfig, replicas: int | None = None) -> ToyModel:
    """A ToyModel with one instance per (replica, density, importance), in that (row-major) order."""
    cfg.validate()
    replicas = cfg.replicas if replicas is None else replicas
    importances, densities = cfg.axes()
    relative = einops.repeat(importances, "imp -> (rep dens imp)", rep=replicas, dens=cfg.grid)
    density = einops.repeat(densities, "dens -> (rep dens imp)", rep=replicas, imp=cfg.grid)
    n_instances = replicas * cfg.grid * cfg.grid
    importance = torch.ones(n_instances, cfg.n_features)
    importance[:, -1] = relative
    model_cfg = ToyModelConfig(
        n_features=cfg.n_features,
        d_hidden=cfg.d_hidden,
        n_instances=n_instances,
        feature_probability=[round(p, 8) for p in density.tolist()],
    )
    return ToyModel(model_cfg, importance=importance, feature_probability=model_cfg.feature_probability_tensor())


def classify_extra_feature(W: torch.Tensor) -> torch.Tensor:
    """Phase index (into PHASES) of each instance's last feature: [instances]"""
    norm = feature_norms(W)[:, -1]
    dim = dimensionality(W)[:, -1]
    dedicated_or_shared = torch.where(dim >= DEDICATED_DIMENSIONALITY, 1, 2)
    return torch.where(norm < REPRESENTED_NORM, 0, dedicated_or_shared)


def run_phase_diagram(
    cfg: PhaseDiagramConfig, train_cfg: ToyTrainConfig, progress: bool = True
) -> tuple[ToyModel, list[dict[str, float]]]:
    """Train the sweep and keep each cell's lowest-loss replica.

    Returns the model of the kept replicas (`grid²` instances; cell (density d, importance r) is instance
    d·grid + r) and the training history.
    """
    cfg.validate()
    train_cfg.validate()
    sweep = sweep_model(cfg)
    history = train_toy_model(sweep, train_cfg, progress=progress)
    with torch.no_grad():
        errors = feature_errors(sweep, n_samples=2048, seed=train_cfg.seed + 2)
        loss = einops.rearrange((sweep.importance * errors).sum(-1), "(rep cell) -> rep cell", rep=cfg.replicas)
        kept = loss.argmin(0) * cfg.grid * cfg.grid + torch.arange(cfg.grid * cfg.grid)
        model = sweep_model(cfg, replicas=1)
        model.W.copy_(sweep.W[kept])
        model.b_final.copy_(sweep.b_final[kept])
    return model, history


def phase_grid(model: ToyModel, cfg: PhaseDiagramConfig, n_samples: int = 2048) -> dict[str, Any]:
    """The diagram of a swept model, JSON-ready: the axes and, per cell as [density][importance], the phase of
    the extra feature (an index into `phases`), its norm and dimensionality, and the cell's loss."""
    if model.cfg.n_instances != cfg.grid * cfg.grid:
        raise SaelabError(
            f"a {cfg.grid}x{cfg.grid} phase diagram needs {cfg.grid**2} instances, got {model.cfg.n_instances}"
        )
    W = model.W.detach()
    with torch.no_grad():
        loss = (model.importance * feature_errors(model, n_samples=n_samples)).sum(-1)

    def as_grid(values: torch.Tensor) -> list[list[float]]:
        return einops.rearrange(values, "(dens imp) -> dens imp", imp=cfg.grid).tolist()

    importances, densities = cfg.axes()
    return {
        "phases": list(PHASES),
        "relative_importance": importances.tolist(),
        "density": densities.tolist(),
        "phase": as_grid(classify_extra_feature(W)),
        "extra_norm": as_grid(feature_norms(W)[:, -1]),
        "extra_dimensionality": as_grid(dimensionality(W)[:, -1]),
        "loss": as_grid(loss),
    }
