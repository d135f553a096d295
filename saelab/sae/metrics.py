"""SAE metrics: recovery of known ground-truth features, beside the reconstruction statistics of `saelab.stats`.

Ground truth compares true feature directions `[n_true, d]` with decoder rows `[d_sae, d]` by cosine similarity:
MMCS (mean over true features of the best-matching latent), MCC (mean cosine after a one-to-one Hungarian
matching) and how many true features some latent matches above cosine 0.9. Cosines are signed, because latents
are non-negative: a latent pointing opposite to a feature does not represent it.
"""

from __future__ import annotations

from typing import Any

from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saelab.errors import SaelabError


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
