"""SAE metrics: reconstruction quality, sparsity, latent density, and recovery of known ground-truth features.

Reconstruction metrics accumulate over batches in float64 (`ReconstructionStats`), so they are exact sums over
every token however the data is batched; explained variance is pooled over all tokens:

    EV = 1 − Σₜ ‖xₜ − x̂ₜ‖² / Σₜ ‖xₜ − x̄‖²        (x̄ the mean over all tokens)

Ground truth compares true feature directions `[n_true, d]` with decoder rows `[d_sae, d]` by cosine similarity:
MMCS (mean over true features of the best-matching latent), MCC (mean cosine after a one-to-one Hungarian
matching) and how many true features some latent matches above cosine 0.9. Cosines are signed, because latents
are non-negative: a latent pointing opposite to a feature does not represent it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
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


def cosine_matrix(true: Tensor, learned: Tensor) -> Tensor:
    """Cosine similarity of every true direction [n_true, d] with every learned direction [n_learned, d]."""
    if true.ndim != 2 or learned.ndim != 2 or true.shape[1] != learned.shape[1]:
        raise SaelabError(f"cannot compare directions of shapes {tuple(true.shape)} and {tuple(learned.shape)}")
    true = true.double() / true.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    learned = learned.double() / learned.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    return true @ learned.T


def mmcs(true: Tensor, learned: Tensor) -> float:
    """Mean over true features of the highest cosine similarity with any learned direction."""
    return float(cosine_matrix(true, learned).max(dim=1).values.mean())


def mcc(true: Tensor, learned: Tensor) -> float:
    """Mean cosine similarity of the best one-to-one matching (Hungarian) of true features to learned directions.

    With fewer learned directions than true features, unmatched true features count as 0.
    """
    cosines = cosine_matrix(true, learned).numpy()
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    return float(cosines[rows, cols].sum() / cosines.shape[0])


def ground_truth_metrics(true: Tensor, learned: Tensor, threshold: float = 0.9) -> dict[str, Any]:
    """MMCS, MCC and the number of true features recovered above `threshold`, with per-feature best cosines."""
    best = cosine_matrix(true, learned).max(dim=1).values
    return {
        "n_true_features": true.shape[0],
        "mmcs": float(best.mean()),
        "mcc": mcc(true, learned),
        "recovered": int((best >= threshold).sum()),
        "recovery_threshold": threshold,
        "best_cosine_per_feature": best.tolist(),
    }
