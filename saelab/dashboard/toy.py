"""Dashboards for SAEs trained on a toy model's hidden layer, where the true features are known.

Instead of token windows each latent shows the ground-truth feature its decoder row matches (cosine with the
columns of the toy model's W) and which input features are present when it fires. Its loss effect is the change in
the toy model's own importance-weighted reconstruction loss when the latent's contribution is removed from the
hidden state, computed exactly for every firing sample (a toy forward pass costs nothing).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from saelab.dashboard.compute import (
    QUANTILES,
    Dashboard,
    DashboardConfig,
    _pairs,
    _round,
    decoder_neighbours,
    importance_interval,
    select_latents,
)
from saelab.dashboard.stats import BINS_PER_DECADE, LOG10_LO, StatsAccumulator
from saelab.errors import SaelabError


def parse_toy_source(source: str) -> tuple[Path, int]:
    """'toy:DIR' or 'toy:DIR#i' (as SAEs trained on a toy model record it) → (DIR, instance)."""
    if not source.startswith("toy:"):
        raise SaelabError(f"'{source}' is not a toy-model source; expected toy:DIR or toy:DIR#i")
    path, _, instance = source[4:].partition("#")
    try:
        return Path(path), int(instance or 0)
    except ValueError:
        raise SaelabError(f"'{source}': the instance after # must be an integer") from None


def toy_output(model, hidden: Tensor, instance: int) -> Tensor:
    """The toy model's output [batch, n_features] for hidden states [batch, d_hidden] of one instance (the second
    half of `ToyModel.forward`, which starts from features)."""
    W = model.W_out[instance] if model.cfg.variant == "abs" else model.W[instance].T  # [feat, hid]
    out = hidden @ W.T + model.b_final[instance]
    return out if model.cfg.variant == "linear" else torch.relu(out)


def toy_loss(model, features: Tensor, hidden: Tensor, instance: int) -> Tensor:
    """Importance-weighted squared error per sample [batch] of one instance."""
    error = model.target(features)[:, instance] - toy_output(model, hidden, instance)
    return (model.importance[instance] * error**2).sum(-1)


@torch.no_grad()
def compute_toy_dashboard(
    model,
    instance: int,
    sae,
    n_samples: int = 65536,
    features: int | list[int] | None = None,
    cfg: DashboardConfig | None = None,
    source: str = "toy",
) -> Dashboard:
    """Dashboards for an SAE on instance `instance` of a toy model, from `n_samples` fresh toy inputs."""
    cfg = cfg or DashboardConfig()
    cfg.validate()
    started = time.perf_counter()
    if sae.cfg.d_in != model.cfg.d_hidden:
        raise SaelabError(f"the SAE reads d_in = {sae.cfg.d_in} but the toy model has d_hidden = {model.cfg.d_hidden}")
    latents = select_latents(features, sae.cfg.d_sae)
    generator = torch.Generator().manual_seed(cfg.seed)
    x = model.generate_batch(n_samples, generator)  # [n, instances, n_features]
    h = model.hidden(x)[:, instance]  # [n, d_hidden]
    acts = sae.encode(h.to(sae.W_dec.dtype)).float()  # [n, d_sae]
    # Each sample is a "sequence" of length one: all positions count and may enter the sample.
    acc = StatsAccumulator(latents, sae.cfg.d_sae, n_samples, 1, 1, 1, 1, cfg.corr_tokens, generator)
    ones = torch.ones(n_samples, 1, dtype=torch.bool)
    acc.update(acts[:, None], 0, ones, ones)
    stats = acc.finish(1, cfg.n_neighbours)

    a = acts[:, latents]  # [n, L]
    sample, lat = (a > 0).nonzero(as_tuple=True)
    W_dec = sae.W_dec.detach().float()[latents]
    clean = toy_loss(model, x, h, instance)
    delta_loss = torch.cat([
        toy_loss(model, x[s], h[s] - a[s, l, None] * W_dec[l], instance) - clean[s]
        for s, l in zip(sample.split(65536), lat.split(65536), strict=True)
    ]) if len(sample) else torch.zeros(0)  # fmt: skip

    true = model.feature_directions(instance).float()  # [n_features, d_hidden]
    unit = lambda m: m / m.norm(dim=1, keepdim=True).clamp(min=1e-12)  # noqa: E731
    cos = unit(W_dec) @ unit(true).T  # [L, n_features]
    neighbours = decoder_neighbours(sae.W_dec.detach().float(), latents, cfg.n_neighbours)
    quantiles = stats.quantiles(list(QUANTILES))
    density = stats.density()
    corr = stats.correlations
    fired_inputs = (a > 0).float().T @ x[:, instance] / (a > 0).sum(0).clamp(min=1)[:, None]  # [L, n_features]
    pages = []
    for j, latent in enumerate(latents.tolist()):
        rows = lat == j
        imp = importance_interval(delta_loss[rows], int(rows.sum()), cfg.confidence)
        total = {k: _round(density[j].item() * imp[k]) if imp[k] is not None else None for k in ("mean", "lo", "hi")}
        order = cos[j].argsort(descending=True)
        inputs = fired_inputs[j].argsort(descending=True)
        hist = stats.hist[j]
        nz = hist.nonzero().squeeze(1)
        pages.append({
            "id": latent,
            "density": _round(density[j].item()),
            "count": int(stats.count[j]),
            "max": _round(stats.max_act[j].item()),
            "mean": _round(stats.act_sum[j].item() / int(stats.count[j])) if stats.count[j] else None,
            "quantiles": [[q, _round(v)] for q, v in zip(QUANTILES, quantiles[j].tolist(), strict=True)],
            "hist": {"first": int(nz[0]), "counts": hist[nz[0] : nz[-1] + 1].tolist()} if len(nz) else None,
            "importance": imp,
            "total_importance": total,
            "approx_error": None,
            "logits": None,
            "neighbours": _pairs(neighbours[0][j].tolist(), neighbours[1][j].tolist(), 4),
            "correlated": [] if corr is None else _pairs(corr[0][j].tolist(), corr[1][j].tolist(), 4),
            "ground_truth": {
                "feature": int(order[0]),
                "cosine": _round(cos[j, order[0]].item(), 4),
                "top": _pairs(order[:5].tolist(), cos[j, order[:5]].tolist(), 4),
                "inputs": _pairs(inputs[:5].tolist(), fired_inputs[j, inputs[:5]].tolist(), 4),
            },
            "windows": None,
        })  # fmt: skip
    best = (unit(true) @ unit(sae.W_dec.detach().float()).T).max(dim=1).values  # [n_features] over all latents
    meta = {
        "kind": "toy",
        "model": source,
        "hook": "hidden",
        "sae": {"architecture": getattr(sae.cfg, "architecture", "?"), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae},
        "tokens": {"sequences": n_samples, "length": 1, "counted": stats.n_tokens},
        "config": asdict(cfg),
        "histogram": {"log10_lo": LOG10_LO, "bins_per_decade": BINS_PER_DECADE},
        "ground_truth": {
            "n_features": int(true.shape[0]),
            "recovered": int((best >= 0.9).sum()),
            "mmcs": _round(best.mean().item(), 4),
        },
        "approximation": {},
        "seconds": {"total": round(time.perf_counter() - started, 2)},
        "latents": latents.tolist(),
    }
    return Dashboard(meta=meta, latents=pages)
