"""What a trained toy model did with its features: norms, interference, dimensionality, capacity, geometry,
and how much each feature's importance and capacity are worth to the loss.

Notation: `W [instances, d_hidden, n_features]`; W_i is feature i's embedding (column i), Ŵ_i = W_i / ‖W_i‖.

- interference        Σ_{j≠i} (Ŵ_i·W_j)²                                     (Elhage et al. 2022)
- dimensionality D_i  ‖W_i‖² / Σ_j (Ŵ_i·W_j)²                                (Elhage et al. 2022)
- capacity C_i        (W_i·W_i)² / Σ_j (W_i·W_j)²                            (Scherlis et al. 2022)
- dims per feature    D* = m / ‖W‖_F²                                         per instance

D_i and C_i are the same number written two ways (divide C_i's numerator and denominator by ‖W_i‖²); both are
computed from their own formula so each paper's definition can be checked on its own. C_i is also the share
of feature i's variance that the best linear read-out along W_i recovers, and Σ_i C_i ≤ m.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import torch
from torch import Tensor
from torch.func import functional_call

from saelab.toy.fast import sample_nonempty
from saelab.toy.model import ToyModel

# Dimensionality of each feature in the structures the paper finds; a tight frame of n unit vectors in m
# dimensions gives every feature D = m / n.
GEOMETRY_PLATEAUS: dict[str, float] = {
    "dedicated": 1.0,
    "tetrahedron": 3 / 4,
    "triangle": 2 / 3,
    "antipodal": 1 / 2,
    "pentagon": 2 / 5,
    "square antiprism": 3 / 8,
    "not represented": 0.0,
}
REPRESENTED_NORM = 0.5  # a feature whose embedding is shorter than this is read back at under a quarter
PLATEAU_TOLERANCE = 0.05


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, with 0 where the denominator vanishes (a feature with no embedding)."""
    return torch.where(denominator > 1e-12, numerator / denominator.clamp_min(1e-12), torch.zeros_like(numerator))


def feature_norms(W: Tensor) -> Tensor:
    """‖W_i‖: [instances, features]"""
    return W.norm(dim=-2)


def _overlaps(W: Tensor) -> Tensor:
    """Gram matrix WᵀW, entry (i, j) = W_i·W_j: [instances, features, features]"""
    return einops.einsum(W, W, "inst hid i, inst hid j -> inst i j")


def interference(W: Tensor) -> Tensor:
    """Σ_{j≠i} (Ŵ_i·W_j)²: [instances, features]"""
    gram = _overlaps(W)
    squared_norm = torch.diagonal(gram, dim1=-2, dim2=-1)
    off_diagonal = gram.square().sum(-1) - squared_norm.square()
    return _safe_divide(off_diagonal, squared_norm)


def dimensionality(W: Tensor) -> Tensor:
    """D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²: [instances, features]; 0 for a feature with no embedding."""
    norms = feature_norms(W)
    W_hat = W / norms.clamp_min(1e-12)[:, None, :]
    projections = einops.einsum(W_hat, W, "inst hid i, inst hid j -> inst i j")
    return _safe_divide(norms.square(), projections.square().sum(-1))


def capacity(W: Tensor) -> Tensor:
    """C_i = (W_i·W_i)² / Σ_j (W_i·W_j)²: [instances, features]; 0 for a feature with no embedding."""
    gram = _overlaps(W)
    return _safe_divide(torch.diagonal(gram, dim1=-2, dim2=-1).square(), gram.square().sum(-1))


def dims_per_feature(W: Tensor) -> Tensor:
    """D* = m / ‖W‖_F²: [instances]"""
    return W.shape[-2] / W.square().sum((-2, -1)).clamp_min(1e-12)


def geometry_name(dim: float, norm: float) -> str:
    """The structure a feature sits in, from its dimensionality plateau; 'other' between plateaus."""
    if norm < REPRESENTED_NORM:
        return "not represented"
    name, plateau = min(GEOMETRY_PLATEAUS.items(), key=lambda item: abs(item[1] - dim))
    return name if abs(plateau - dim) <= PLATEAU_TOLERANCE else "other"


def polygon_gaps(W: Tensor) -> Tensor:
    """Angles in degrees between angularly adjacent features of a 2-D embedding: [instances, features]"""
    if W.shape[-2] != 2:
        raise ValueError(f"polygon gaps need a 2-dimensional hidden space, got d_hidden = {W.shape[-2]}")
    angles = torch.atan2(W[:, 1], W[:, 0]).sort(dim=-1).values
    wrapped = torch.cat([angles, angles[:, :1] + 2 * math.pi], dim=-1)
    return torch.rad2deg(wrapped.diff(dim=-1))


def is_regular_polygon(W: Tensor, min_norm: float = 0.9, tolerance_degrees: float = 5.0) -> Tensor:
    """Whether each instance's features all have norm > `min_norm` and sit 360°/n apart: [instances] bool"""
    gaps = polygon_gaps(W)
    regular = (gaps - 360 / W.shape[-1]).abs().amax(-1) <= tolerance_degrees
    return regular & (feature_norms(W).amin(-1) > min_norm)


def feature_errors(
    model: ToyModel,
    n_samples: int = 4096,
    seed: int = 0,
    W: Tensor | None = None,
) -> Tensor:
    """E[(y_i − x'_i)²] per feature, unweighted: [instances, features].

    Estimated from `n_samples` non-empty rows plus the exact share of empty rows (see `saelab.toy.fast`), with
    a fixed seed so two calls agree. `W` overrides the model's weights (differentiably) for the derivatives below.
    """
    generator = torch.Generator(device=model.W.device).manual_seed(seed)
    with torch.no_grad():
        features, p_any = sample_nonempty(model, n_samples, generator)
    rows = torch.cat([features.permute(2, 0, 1), torch.zeros_like(features[None, :, :, 0])])  # last row empty
    params = {} if W is None else {"W": W}
    error = (model.target(rows) - functional_call(model, params, (rows,))).square()  # [batch + 1, inst, feat]
    p_any = p_any[:, None]
    return p_any * error[:-1].mean(0) + (1 - p_any) * error[-1]


def marginal_loss(model: ToyModel, n_samples: int = 4096, seed: int = 0) -> dict[str, Tensor]:
    """How the loss L = Σ_i I_i · E[(y_i − x'_i)²] responds to each feature's importance and capacity.

    - `dloss_dimportance [instances, features]` = ∂L/∂I_i at the trained weights, by autograd: the feature's
      unweighted error. Because ∂L/∂W = 0 at a trained optimum, this is also (envelope theorem) how fast the
      loss of the *retrained* model rises with I_i — importance is worth exactly the error left on the feature.
    - `dloss_dcapacity [instances, features]` = d(I_i·E[(y_i − x'_i)²]) / dC_i along the one knob that gives
      feature i more capacity while keeping its direction: lengthening its embedding, W_i → s·W_i at s = 1
      (both derivatives by autograd; dC_i/ds = 2C_i(1 − C_i)). Any derivative of the *total* loss is 0 at a
      trained optimum, so this is the feature's *own* loss per unit of capacity — negative when capacity helps
      it, with −value the marginal benefit of Scherlis et al. — which the interference that lengthening costs
      the other features balances. Lengthening also raises the feature's own read-out gain, so a feature
      whose norm already overshoots can show a positive value. NaN where capacity is pinned at 0 or 1
      (dC_i/ds ≈ 0): absent and dedicated features.
    """
    importance = model.importance.detach().clone().requires_grad_(True)
    scale = torch.ones_like(importance, requires_grad=True)
    W = model.W.detach() * scale[:, None, :]
    errors = feature_errors(model, n_samples, seed, W=W)
    (dloss_dimportance,) = torch.autograd.grad((importance * errors).sum(), importance, retain_graph=True)

    own_loss = importance.detach() * errors  # [inst, feat]
    caps = capacity(W)
    n_feat = own_loss.shape[-1]
    dloss_ds = torch.empty_like(own_loss)
    dcap_ds = torch.empty_like(own_loss)
    for i in range(n_feat):  # instances are independent, so one backward per feature gives the diagonal
        dloss_ds[:, i] = torch.autograd.grad(own_loss[:, i].sum(), scale, retain_graph=True)[0][:, i]
        dcap_ds[:, i] = torch.autograd.grad(caps[:, i].sum(), scale, retain_graph=i < n_feat - 1)[0][:, i]
    dloss_dcapacity = torch.where(dcap_ds > 1e-2, dloss_ds / dcap_ds, torch.full_like(dloss_ds, math.nan))
    return {
        "feature_loss": own_loss.detach(),
        "dloss_dimportance": dloss_dimportance.detach(),
        "dloss_dcapacity": dloss_dcapacity.detach(),
    }


def _json_floats(values: Tensor) -> list:
    """Nested lists of floats rounded to 6 significant digits; NaN becomes None (JSON has no NaN)."""
    return [
        _json_floats(v) if v.dim() else (None if math.isnan(v.item()) else float(f"{v.item():.6g}")) for v in values
    ]


def analyze_toy_model(model: ToyModel, n_samples: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Every per-feature and per-instance measure above, as a JSON-ready dict (one entry per instance)."""
    W = model.W.detach()
    per_feature = {
        "importance": model.importance,
        "feature_probability": model.feature_probability,
        "norm": feature_norms(W),
        "interference": interference(W),
        "dimensionality": dimensionality(W),
        "capacity": capacity(W),
        **marginal_loss(model, n_samples, seed),
    }
    per_feature = {name: values.detach().cpu() for name, values in per_feature.items()}
    dstar = dims_per_feature(W).cpu()
    instances = []
    for inst in range(model.cfg.n_instances):
        features = {name: _json_floats(values[inst]) for name, values in per_feature.items()}
        norms, dims = per_feature["norm"][inst].tolist(), per_feature["dimensionality"][inst].tolist()
        geometry = [geometry_name(d, n) for d, n in zip(dims, norms, strict=True)]
        instances.append(
            {
                "instance": inst,
                "loss": float(f"{per_feature['feature_loss'][inst].sum().item():.6g}"),
                "dims_per_feature": float(f"{dstar[inst].item():.6g}"),
                "total_capacity": float(f"{per_feature['capacity'][inst].sum().item():.6g}"),
                "n_represented": sum(n >= REPRESENTED_NORM for n in norms),
                "geometry": geometry,
                "features": features,
            }
        )
    return {
        "model": {
            "n_features": model.cfg.n_features,
            "d_hidden": model.cfg.d_hidden,
            "n_instances": model.cfg.n_instances,
            "variant": model.cfg.variant,
            "features": model.cfg.features,
        },
        "definitions": {
            "interference": "sum_{j!=i} (W_i_hat . W_j)^2",
            "dimensionality": "|W_i|^2 / sum_j (W_i_hat . W_j)^2",
            "capacity": "(W_i . W_i)^2 / sum_j (W_i . W_j)^2",
            "dims_per_feature": "d_hidden / |W|_F^2",
            "feature_loss": "I_i * E[(y_i - x'_i)^2]",
            "dloss_dimportance": "dL/dI_i at the trained weights = E[(y_i - x'_i)^2]",
            "dloss_dcapacity": "d(feature_loss_i)/dC_i as W_i -> s W_i; null where C_i is pinned at 0 or 1",
        },
        "geometry_plateaus": GEOMETRY_PLATEAUS,
        "n_samples": n_samples,
        "instances": instances,
    }


def kgon_name(W: Tensor, tolerance_degrees: float = 10.0) -> list[str]:
    """The k-gon each instance of a 2-D embedding forms (Chen et al. 2023): '5-gon' when its k represented
    features (norm ≥ REPRESENTED_NORM) sit 360°/k apart within `tolerance_degrees`, '5-gon, irregular' when
    they do not; '0-gon' when nothing is represented. `W [instances, 2, n_features]` → one name per instance."""
    if W.shape[-2] != 2:
        raise ValueError(f"k-gons need a 2-dimensional hidden space, got d_hidden = {W.shape[-2]}")
    names = []
    for inst in W.detach().cpu():
        kept = inst[:, inst.norm(dim=0) >= REPRESENTED_NORM]
        k = kept.shape[1]
        if k < 2:
            names.append(f"{k}-gon")
            continue
        gaps = polygon_gaps(kept[None])[0]
        regular = bool((gaps - 360 / k).abs().max() <= tolerance_degrees)
        names.append(f"{k}-gon" if regular else f"{k}-gon, irregular")
    return names
