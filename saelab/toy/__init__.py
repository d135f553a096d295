"""Toy models of superposition (Elhage et al. 2022) and their capacity analysis (Scherlis et al. 2022)."""

from saelab.toy.model import (
    FEATURE_GENERATORS,
    VARIANTS,
    ToyModel,
    ToyModelConfig,
    ToyTrainConfig,
    load_toy_model,
    save_toy_model,
)
from saelab.toy.train import train_toy_model

__all__ = [
    "FEATURE_GENERATORS",
    "VARIANTS",
    "ToyModel",
    "ToyModelConfig",
    "ToyTrainConfig",
    "load_toy_model",
    "save_toy_model",
    "train_toy_model",
]
