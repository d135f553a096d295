"""Toy models of superposition (Elhage et al. 2022) and their capacity analysis (Scherlis et al. 2022).

`model` (the batched ToyModel and its saved format) → `train` (Adam over all instances; `fast` holds the
quick path) → `analysis` (norms, interference, dimensionality, capacity, geometry, marginal loss) → `phase`
(phase diagrams as one batched sweep) → `plots` → `lab` (results folders, `run_toy_lab`) → `cli`.
"""

from saelab.toy.analysis import analyze_toy_model, capacity, dimensionality, dims_per_feature, interference
from saelab.toy.model import (
    FEATURE_GENERATORS,
    VARIANTS,
    ToyModel,
    ToyModelConfig,
    ToyTrainConfig,
    load_toy_model,
    save_toy_model,
)
from saelab.toy.phase import PhaseDiagramConfig, run_phase_diagram
from saelab.toy.train import train_toy_model

__all__ = [
    "FEATURE_GENERATORS",
    "VARIANTS",
    "PhaseDiagramConfig",
    "ToyModel",
    "ToyModelConfig",
    "ToyTrainConfig",
    "analyze_toy_model",
    "capacity",
    "dimensionality",
    "dims_per_feature",
    "interference",
    "load_toy_model",
    "run_phase_diagram",
    "run_toy_lab",
    "save_toy_model",
    "train_toy_model",
]


def run_toy_lab(out_dir: str, quick: bool = False, progress: bool = False) -> dict:
    """Train, analyse and plot the toy lab's default experiments under `out_dir`; see `saelab.toy.lab`."""
    from saelab.toy.lab import run_toy_lab as run  # matplotlib and plotly load only when plotting

    return run(out_dir, quick=quick, progress=progress)
