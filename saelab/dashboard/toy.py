"""Dashboards for SAEs trained on a toy model's hidden layer, where the true features are known.

Instead of token windows each latent shows the ground-truth feature its decoder row matches (cosine with the
columns of the toy model's W) and which input features are present when it fires. Its loss effect is the change in
the toy model's own importance-weighted reconstruction loss when the latent's contribution is removed from the
hidden state, computed exactly for every firing sample (a toy forward pass costs nothing). Each toy sample is a
context of one token, so importance per token is importance per sample.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from saelab.dashboard.compute import Dashboard, DashboardConfig, decoder_neighbours, select_latents
from saelab.dashboard.importance import estimate_importance
from saelab.dashboard.pages import PageParts, build_pages, pairs, round_float
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
    fired_inputs = (a > 0).float().T @ x[:, instance] / (a > 0).sum(0).clamp(min=1)[:, None]  # [L, n_features]
    # Every firing is computed exactly: the estimator's cheap part is zero and its correction is the exact value.
    L = len(latents)
    counts = (a > 0).long()  # [n, L]: each sample is its own context
    importance = estimate_importance(
        torch.zeros(n_samples, L, dtype=torch.float64), counts, torch.ones(n_samples, dtype=torch.long), sample, lat,
        delta_loss.double(), torch.zeros(len(sample), dtype=torch.float64), cfg.confidence, cfg.min_firings,
        cfg.min_contexts,
    )  # fmt: skip
    ground_truth = []
    for j in range(L):
        order = cos[j].argsort(descending=True)
        inputs = fired_inputs[j].argsort(descending=True)
        ground_truth.append({
            "feature": int(order[0]),
            "cosine": round_float(cos[j, order[0]].item(), 4),
            "top": pairs(order[:5].tolist(), cos[j, order[:5]].tolist(), 4),
            "inputs": pairs(inputs[:5].tolist(), fired_inputs[j, inputs[:5]].tolist(), 4),
        })  # fmt: skip
    pages = build_pages(stats, importance, latents, neighbours, PageParts(ground_truth=ground_truth))
    best = (unit(true) @ unit(sae.W_dec.detach().float()).T).max(dim=1).values  # [n_features] over all latents
    meta = {
        "kind": "toy",
        "model": source,
        "hook": "hidden",
        "sae": {"architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae},
        "tokens": {"sequences": n_samples, "length": 1, "counted": stats.n_tokens},
        "config": asdict(cfg),
        "histogram": {"log10_lo": LOG10_LO, "bins_per_decade": BINS_PER_DECADE},
        "ground_truth": {
            "n_features": int(true.shape[0]),
            "recovered": int((best >= 0.9).sum()),
            "mmcs": round_float(best.mean().item(), 4),
        },
        "approximation": {},
        "seconds": {"total": round(time.perf_counter() - started, 2)},
        "latents": latents.tolist(),
    }
    return Dashboard(meta=meta, latents=pages)
