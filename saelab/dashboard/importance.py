"""Overall importance: how much loss a latent saves on average, over every firing, with intervals about the data.

Definitions (also on the pages and in the README):

- total ΔCE of a firing of latent j at position p: the change in the next-token loss summed over p and every later
  position of its context when the latent's contribution `a · W_dec[j]` is removed at p only (the rest of the
  model re-run). Positive: the latent helps. Positions count where a next-token loss is counted (input and target
  regular tokens), and so do firings.
- importance per firing: the mean total ΔCE over the latent's firings; importance per token: Σ total ΔCE over its
  firings / tokens scanned (= density × importance per firing), the loss it saves per token of text.

Every firing in the scanned tokens counts. The exact total ΔCE costs a re-run of the rest of the context, so it is
computed for every firing when the latent fires at most `exact_firings` times, and otherwise for a uniform sample
of that many firings; a cheap estimate e_i (gradient attribution, `−a · W_dec[j] · ∂L/∂x`) covers every firing,
and the exact values x_i of the sample correct it (a control variate, or difference estimator):

    Ŝ_c = Σ_{i in context c} e_i + (N / m) Σ_{i in c and in the sample} (x_i − e_i)

is an unbiased estimate of context c's sum of total ΔCE (N firings, m of them exact). With m = N it is the exact
sum. Its variance comes from x − e only, which is small when the estimate is good.

The scanned contexts are a sample of the data, so the interval describes the data, not the scanned tokens: contexts
are the sampled units and the estimates are ratios of per-context sums, R = Σ Ŝ_c / Σ n_c (n_c the firings, or the
tokens, of context c), with the usual linearised standard error over contexts,
SE = sqrt(K / (K − 1) · Σ_c (Ŝ_c − R n_c)²) / Σ_c n_c over K contexts, and a Student-t quantile with (contexts
with a firing − 1) degrees of freedom. There is no finite-population correction. The subsampling's own variance is
inside Ŝ_c, so the interval accounts for it too.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, dof: int) -> float:
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats would cost a second to import

    return float(stdtrit(dof, q))


@dataclass
class Importance:
    """Per latent [L]: both importances with their intervals, and what they were computed from."""

    per_firing: Tensor  # float64 mean total ΔCE per firing (NaN without firings)
    per_firing_half: Tensor  # half-width of its interval (NaN where undefined)
    per_token: Tensor  # Σ total ΔCE / tokens scanned
    per_token_half: Tensor
    firings: Tensor  # int64 eligible firings
    contexts: Tensor  # int64 contexts with a firing
    exact: Tensor  # int64 firings whose total ΔCE was computed exactly
    too_few: Tensor  # bool: fewer than min_firings firings or min_contexts contexts
    sampling_share: Tensor  # float64 share of the interval's variance from subsampling the exact firings (NaN: m < 2)
    confidence: float

    def method(self, j: int) -> str:
        return "exact" if self.exact[j] == self.firings[j] else "control variate"


def ratio_interval(sums: Tensor, units: Tensor, dof: Tensor, confidence: float) -> tuple[Tensor, Tensor, Tensor]:
    """Ratio Σ sums / Σ units over contexts (rows; one column per latent), the half-width of its t-interval from
    the linearised standard error over the K rows (rows are the independent sampled units), and the variance of
    Σ sums that standard error implies (SE² · (Σ units)²)."""
    sums, units = sums.double(), units.double()
    K = sums.shape[0]
    total = units.sum(0)
    ratio = sums.sum(0) / total
    z = sums - ratio * units
    variance = K / max(K - 1, 1) * z.square().sum(0)
    t = torch.tensor([t_quantile(0.5 + confidence / 2, int(d)) for d in dof.clamp(min=1).tolist()], dtype=torch.float64)
    return ratio, t * torch.sqrt(variance) / total, variance


def sampling_variance(residual: Tensor, latent: Tensor, exact: Tensor, firings: Tensor) -> Tensor:
    """[L]: the variance the subsampling adds to a latent's estimated Σ total ΔCE, N² (1 − m/N) s²_d / m, from the
    residuals d = x − e [m_total] of its exact firings (`latent` [m_total] their columns); NaN where m < 2."""
    L = len(firings)
    n = exact.double()
    sum_d = torch.zeros(L, dtype=torch.float64).index_add_(0, latent, residual.double())
    sum_d2 = torch.zeros(L, dtype=torch.float64).index_add_(0, latent, residual.double().square())
    s2 = (sum_d2 - sum_d.square() / n.clamp(min=1)) / (n - 1).clamp(min=1)
    N = firings.double()
    variance = N.square() * (1 - n / N.clamp(min=1)) * s2.clamp(min=0) / n.clamp(min=1)
    variance[n < 2] = float("nan")
    variance[n == N] = 0.0  # every firing exact: no subsampling
    return variance


def estimate_importance(
    context_estimate: Tensor,
    context_count: Tensor,
    context_tokens: Tensor,
    sample_context: Tensor,
    sample_latent: Tensor,
    sample_exact: Tensor,
    sample_estimate: Tensor,
    confidence: float = 0.95,
    min_firings: int = 20,
    min_contexts: int = 5,
) -> Importance:
    """The estimator of the module docstring. context_estimate / context_count [K, L]: per context and latent, the
    sum of the cheap estimates over the firings and their number; context_tokens [K]: tokens scanned per context;
    sample_*: [m] one entry per exactly computed firing (a uniform sample of each latent's firings, or all of
    them): its context, latent column, exact total ΔCE and cheap estimate."""
    K, L = context_count.shape
    firings = context_count.sum(0)
    exact = torch.bincount(sample_latent, minlength=L)
    scale = firings.double() / exact.clamp(min=1)  # N / m
    correction = torch.zeros(K * L, dtype=torch.float64)
    ok = sample_exact.isfinite() & sample_estimate.isfinite()
    residual = sample_exact.double() - sample_estimate.double()
    correction.index_add_(0, (sample_context * L + sample_latent)[ok], (residual * scale[sample_latent])[ok])
    sums = context_estimate.double() + correction.view(K, L)
    contexts = (context_count > 0).sum(0)
    dof = contexts - 1
    per_firing, firing_half, _ = ratio_interval(sums, context_count, dof, confidence)
    tokens = context_tokens.double()[:, None].expand(K, L)
    per_token, token_half, variance = ratio_interval(sums, tokens, dof, confidence)
    # Per token, Σ units is the same for both variances, so their ratio is the share of the interval's variance.
    computed = torch.bincount(sample_latent[ok], minlength=L)
    sampled = sampling_variance(residual[ok], sample_latent[ok], computed, firings)
    share = (sampled / variance).clamp(max=1.0)
    share[variance == 0] = 0.0
    undefined = contexts < 2
    firing_half[undefined] = float("nan")
    token_half[undefined] = float("nan")
    return Importance(
        per_firing=per_firing,
        per_firing_half=firing_half,
        per_token=per_token,
        per_token_half=token_half,
        firings=firings,
        contexts=contexts,
        exact=exact,
        too_few=(firings < min_firings) | (contexts < min_contexts),
        sampling_share=share,
        confidence=confidence,
    )


def _r(x: float, digits: int = 5) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


def importance_entry(imp: Importance, j: int) -> dict[str, Any]:
    """One latent's importance as the page shows it."""
    mean, half = imp.per_firing[j].item(), imp.per_firing_half[j].item()
    tmean, thalf = imp.per_token[j].item(), imp.per_token_half[j].item()
    return {
        "per_firing": {"mean": _r(mean), "lo": _r(mean - half), "hi": _r(mean + half)},
        "per_token": {"mean": _r(tmean), "lo": _r(tmean - thalf), "hi": _r(tmean + thalf)},
        "firings": int(imp.firings[j]),
        "contexts": int(imp.contexts[j]),
        "exact": int(imp.exact[j]),
        "method": imp.method(j),
        "sampling_share": _r(imp.sampling_share[j].item(), 3),
        "confidence": imp.confidence,
        "too_few": bool(imp.too_few[j]),
    }
