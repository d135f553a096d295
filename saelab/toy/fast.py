"""The fast training path: non-empty rows only, feature-major tensors, hand-derived gradients.

Two ideas, both checked against the plain autograd path in `tests/test_toy_fast.py`:

1. Sparse batches are mostly empty rows, and an empty row teaches the model nothing but `ReLU(b_final)`.
   So we sample rows *conditioned on at least one active feature* (probability `p_any` per instance) and add
   the empty rows' loss in closed form. `p_any · L(non-empty rows) + (1 − p_any) · L(0)` has the same
   expectation as the loss on plain batches, with far less noise per row.
2. Tiny toy models are overhead-bound, not FLOP-bound. Feature-major tensors (`[instances, features, batch]`)
   make every product a `bmm` whose long axis is the batch, and gradients written out by hand skip autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.toy.model import ToyModel


def _indicator(x: Tensor) -> Tensor:
    """1.0 where x > 0, else 0.0. Float arithmetic stays vectorised on CPU where bool masks and `where` crawl."""
    return x.sign().clamp_(min=0)


def sample_nonempty(
    model: ToyModel, batch_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Rows of features conditioned on at least one being active.

    Returns `features [instances, n_features, batch]` and `p_any [instances]`, the probability that a plain
    row has any active feature. Only independent features are conditioned; correlated and anticorrelated
    pairs fall back to plain rows with `p_any = 1`.

    One uniform per (row, feature), like plain sampling. `u₀` picks the first active feature k with
    P(k) ∝ p_k Π_{j<k}(1 − p_j). Then each feature j has a threshold: 0 before k (absent), 1 at k (present),
    p_j after k (present if u_j < p_j); its value u_j / threshold is uniform given that it is present. Only
    u₀ is spent on choosing k, so feature 0 (present only when k = 0) takes u₀ rescaled to its interval.
    """
    n_inst, n_feat = model.cfg.n_instances, model.cfg.n_features
    if model.cfg.features != "independent":
        rows = model.generate_batch(batch_size, generator)
        return rows.permute(1, 2, 0).contiguous(), torch.ones(n_inst, device=rows.device)
    prob = model.feature_probability  # [inst, feat]
    absent_upto = torch.cumprod(1 - prob, dim=-1)  # P(features 0..j all absent)
    first_active = prob * torch.cat([torch.ones_like(prob[:, :1]), absent_upto[:, :-1]], dim=-1)
    p_any = 1 - absent_upto[:, -1]
    upper_edges = torch.cumsum(first_active, dim=-1) / p_any[:, None]  # P(k <= j | any active)

    u = torch.rand(n_inst, n_feat, batch_size, generator=generator, device=prob.device, dtype=prob.dtype)
    k = _indicator(u[:, :1, :] - upper_edges[:, :-1, None]).sum(1, keepdim=True)  # [inst, 1, batch]
    u[:, 0, :].div_(upper_edges[:, :1])  # uniform on [0, 1] when k = 0, else > 1 and so dropped below
    offset = torch.arange(n_feat, device=prob.device, dtype=u.dtype)[None, :, None] - k  # j − k
    inverse_threshold = _indicator(offset) / prob[:, :, None] + _indicator(1 - offset.abs())
    features = u.mul_(inverse_threshold)  # reuses u's memory
    features.mul_(_indicator(1 - features))  # after k: present iff u_j < p_j, i.e. u_j / p_j < 1
    if model.cfg.variant == "abs":
        features = (2 * features - 1).mul_(_indicator(features))
    return features, p_any


def estimated_loss(model: ToyModel, features: Tensor, p_any: Tensor) -> Tensor:
    """Plain-autograd reference for the fast path's loss estimate: [instances].

    `features [instances, n_features, batch]` are non-empty rows; the empty rows' share is one zero row.
    """
    rows = features.permute(2, 0, 1)  # [batch, inst, feat]
    empty = torch.zeros_like(rows[:1])
    return p_any * model.loss_per_instance(rows) + (1 - p_any) * model.loss_per_instance(empty)


@torch.no_grad()
def loss_and_grads(model: ToyModel, features: Tensor, p_any: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss estimate [instances] and its gradients, derived by hand; equals autograd on `estimated_loss`.

    With pre = W_dec h + b and out = act(pre), dL/dpre = (2 p_any / batch) · I · (out − y) · act'(pre);
    the decoder gets dpre·hᵀ, the encoder gets (W_decᵀ dpre · relu'(W x))·xᵀ, and the tied W gets both.
    """
    variant = model.cfg.variant
    W, b, importance = model.W, model.b_final, model.importance
    batch = features.shape[-1]
    decoder = model.W_out if variant == "abs" else W.mT  # [inst, feat, hid]
    hidden_relu = variant in ("neurons", "abs")
    out_relu = variant != "linear"

    pre_hidden = torch.bmm(W, features)  # [inst, hid, batch]
    hidden = pre_hidden.clamp_min(0) if hidden_relu else pre_hidden
    pre = torch.bmm(decoder, hidden).add_(b[:, :, None])  # [inst, feat, batch]
    out = pre.clamp_min(0) if out_relu else pre
    error = out.sub_(features.abs() if variant == "abs" else features)  # reuses `out`

    out_empty = b.clamp_min(0) if out_relu else b  # what an empty row reconstructs: [inst, feat]
    d_pre = error * ((2 / batch) * p_any[:, None] * importance)[:, :, None]
    rows_loss = (d_pre * error).sum((1, 2)) / 2  # = p_any · Σ I (out − y)² / batch
    loss = rows_loss + (1 - p_any) * (importance * out_empty.square()).sum(-1)
    if out_relu:
        d_pre.mul_(_indicator(pre))
    d_b = d_pre.sum(-1) + 2 * (1 - p_any[:, None]) * importance * out_empty * (_indicator(b) if out_relu else 1)
    d_hidden = torch.bmm(decoder.mT, d_pre)  # [inst, hid, batch]
    if hidden_relu:
        d_hidden.mul_(_indicator(pre_hidden))
    d_W = torch.bmm(d_hidden, features.mT)  # encoder part: [inst, hid, feat]
    grads = {"b_final": d_b}
    if variant == "abs":
        grads["W_out"] = torch.bmm(d_pre, hidden.mT)
    else:
        d_W.baddbmm_(hidden, d_pre.mT)  # tied decoder part
    grads["W"] = d_W
    return loss, grads
