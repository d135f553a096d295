"""Sparse autoencoders: architectures, one trainer, metrics and the SAELens-compatible saved format."""

from saelab.sae.evaluate import evaluate_sae, evaluate_saved
from saelab.sae.io import load_sae, save_sae
from saelab.sae.model import ARCHITECTURES, SAE, SAEConfig, SAEOutput, build_sae
from saelab.sae.recovery import run_toy_recovery
from saelab.sae.sources import ActivationSource, SyntheticConfig, SyntheticSource, ToySource, parse_source
from saelab.sae.train import SAETrainConfig, train_saes, train_step

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "ActivationSource",
    "SAEConfig",
    "SAEOutput",
    "SAETrainConfig",
    "SyntheticConfig",
    "SyntheticSource",
    "ToySource",
    "build_sae",
    "evaluate_sae",
    "evaluate_saved",
    "load_sae",
    "parse_source",
    "run_toy_recovery",
    "save_sae",
    "train_saes",
    "train_step",
]
