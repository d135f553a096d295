"""Reconstruction statistics of anything that maps activations to reconstructions: SAEs, transcoders, splices.

Sums accumulate over batches in float64 (`ReconstructionStats`), so the metrics are exact sums over every token
however the data is batched; explained variance is pooled over all tokens:

    EV = 1 − Σₜ ‖xₜ − x̂ₜ‖² / Σₜ ‖xₜ − x̄‖²        (x̄ the mean over all tokens)

This module sits below both stages that report these numbers (`saelab.sae` while training and evaluating,
`saelab.models.evals` on a spliced model), so neither imports the other for them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.errors import SaelabError

DENSITY_BINS = np.linspace(-8.0, 0.0, 33)  # log10 firing frequency, 0.25-decade bins


class ReconstructionStats:
    """Running float64 sums for L0, MSE, explained variance, cosine similarity, shrinkage and latent density."""

    def __init__(self, d_sae: int) -> None:
        self.tokens = 0
        self.nonzero_tokens = 0  # tokens with x ≠ 0, over which cosine and shrinkage are averaged
        self.squared_error = 0.0
        self.squared_norm = 0.0
        self.sum_x: Tensor | None = None
        self.cosine = 0.0
        self.shrinkage = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor) -> None:
        """Add a batch: x, x_hat [tokens, d_in]; latents [tokens, d_sae]."""
        x, x_hat = x.double().reshape(-1, x.shape[-1]), x_hat.double().reshape(-1, x.shape[-1])
        latents = latents.reshape(-1, latents.shape[-1])
        self.tokens += x.shape[0]
        self.squared_error += float((x - x_hat).pow(2).sum())
        self.squared_norm += float(x.pow(2).sum())
        batch_sum = x.sum(dim=0).cpu()
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        nonzero = x_norm > 0
        self.nonzero_tokens += int(nonzero.sum())
        dots = (x * x_hat).sum(dim=-1)[nonzero]
        self.cosine += float((dots / (x_norm[nonzero] * x_hat_norm[nonzero]).clamp_min(1e-30)).sum())
        self.shrinkage += float((x_hat_norm[nonzero] / x_norm[nonzero]).sum())
        self.fire_counts += (latents != 0).sum(dim=0).double().cpu()

    def compute(self) -> dict[str, Any]:
        if self.tokens == 0:
            raise SaelabError("no tokens were evaluated; pass at least one batch")
        mean_x = self.sum_x / self.tokens
        total_variance = self.squared_norm - self.tokens * float(mean_x.pow(2).sum())
        frequencies = self.fire_counts / self.tokens
        per_token = max(self.nonzero_tokens, 1)
        return {
            "tokens": self.tokens,
            "l0": float(self.fire_counts.sum()) / self.tokens,
            "mse": self.squared_error / self.tokens,
            "explained_variance": explained_variance_from_sums(self.squared_error, total_variance),
            "cosine_similarity": self.cosine / per_token,
            "shrinkage": self.shrinkage / per_token,
            **density_metrics(frequencies),
        }


def explained_variance_from_sums(squared_error: float, total_variance: float) -> float:
    """1 − SSE / total variance; NaN when the inputs do not vary at all."""
    return 1.0 - squared_error / total_variance if total_variance > 0 else math.nan


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Pooled explained variance of x̂ for x, both [tokens, d] (float64)."""
    x, x_hat = x.double(), x_hat.double()
    return explained_variance_from_sums(float((x - x_hat).pow(2).sum()), float((x - x.mean(dim=0)).pow(2).sum()))


def density_metrics(frequencies: Tensor) -> dict[str, Any]:
    """Dead fraction, dense fractions and the log10-density histogram of per-latent firing frequencies [d_sae]."""
    frequencies = frequencies.double().cpu()
    alive = frequencies[frequencies > 0]
    counts, _ = np.histogram(np.log10(alive.numpy()), bins=DENSITY_BINS)
    return {
        "dead_fraction": float((frequencies == 0).double().mean()),
        "dense_fraction_1pct": float((frequencies > 0.01).double().mean()),
        "dense_fraction_10pct": float((frequencies > 0.1).double().mean()),
        "density_histogram": {
            "log10_bin_edges": DENSITY_BINS.tolist(),
            "counts": counts.tolist(),
            "dead": int((frequencies == 0).sum()),
        },
    }
