"""The local learning coefficient (LLC) of every instance of a batched model, estimated by SGLD.

The estimator of Lau et al. 2023 ("Quantifying degeneracy in singular models via the learning coefficient"):

    λ̂(w*) = nβ · (E_w[L_n(w)] − L_n(w*)),      β = 1 / log n

where L_n is the average loss on a fixed dataset D_n of n rows and E_w is the expectation under the tempered,
localised posterior  p(w) ∝ exp(−nβ L_n(w) − (γ/2)‖w − w*‖²).  SGLD samples it (Welling & Teh 2011, with the
localisation term of Lau et al.; the same update as `devinterp.optim.SGLD`):

    w ← w − (ε/2) · (nβ ∇L_B(w) + γ (w − w*)) + √ε · N(0, 1)

with L_B the loss on a minibatch B of m rows drawn from D_n (with replacement). E_w[L_n(w)] is estimated by the
mean of L_B(w_t) over the chain after `burnin` steps (w_t does not depend on B_t, so each term is unbiased);
L_n(w*) is computed on all n rows.

Everything is batched: parameters carry a leading *walker* axis (instance-major, `instances × chains`), all
walkers see the same minibatch indices (as devinterp does by default) and draw their own noise. The core,
`sgld_llc`, takes any model written that way as a `loss_and_grads(indices)` function; `toy_llc` applies it to a
`ToyModel` with the fast path's hand-derived gradients. For the toy model the dataset is n rows *conditioned on at
least one active feature* (`saelab.toy.fast.sample_nonempty`): empty rows carry no information about W, and as
p → 0 these rows are exactly the one-active-feature inputs of Chen et al. 2023.

Diagnostics a user needs to trust a number: the loss trace of every chain, the chain-to-chain spread of λ̂,
and a stationarity check — the drift nβ·(mean loss over the second half of the draws − over the first half),
in LLC units; a chain still descending (w* not a local minimum, or ε too large) shows a large drift.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.config import require_positive_ints
from saelab.errors import SaelabError
from saelab.toy.fast import loss_and_grads as toy_loss_and_grads
from saelab.toy.fast import sample_nonempty
from saelab.toy.model import ToyModel

# indices [m] of the rows in a minibatch (None: all n rows) → (loss per walker [walkers], gradient per parameter)
LossAndGrads = Callable[[Tensor | None], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class LLCConfig:
    """SGLD settings. Defaults suit the toy models of superposition (n = 1000, as in Chen et al. 2023)."""

    n_samples: int = 1000  # n: rows in D_n; sets nβ = n / log n
    batch_size: int = 100  # m: rows per SGLD step
    chains: int = 4
    draws: int = 500  # SGLD steps averaged per chain, after the burn-in
    burnin: int = 100  # SGLD steps discarded first
    step_size: float = 1e-3  # ε
    localization: float = 10.0  # γ
    seed: int = 0

    def validate(self) -> None:
        require_positive_ints(self, ("n_samples", "batch_size", "chains", "draws"))
        if not isinstance(self.burnin, int) or self.burnin < 0:
            raise SaelabError(f"burnin must be a non-negative integer, got {self.burnin!r}")
        if self.n_samples < 2:
            raise SaelabError("n_samples must be at least 2 (β = 1/log n)")
        if self.draws < 2:
            raise SaelabError("draws must be at least 2 (the stationarity check compares two halves)")
        for name in ("step_size", "localization"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (name == "step_size" and value == 0)
            ):
                raise SaelabError(
                    f"{name} must be a finite {'positive' if name == 'step_size' else 'non-negative'} "
                    f"number, got {value!r}"
                )

    @property
    def nbeta(self) -> float:
        """nβ = n / log n (β = 1 / log n, the temperature at which λ̂ estimates the LLC)."""
        return self.n_samples / math.log(self.n_samples)


@dataclass
class LLCEstimate:
    """λ̂ and its diagnostics for each of `instances` models; tensors are on the CPU."""

    llc_mean: Tensor  # [instances] mean over chains
    llc_std: Tensor  # [instances] standard deviation over chains (ddof 1; 0 for one chain)
    llc_per_chain: Tensor  # [instances, chains]
    init_loss: Tensor  # [instances] L_n(w*)
    loss_trace: Tensor  # [instances, chains, burnin + draws] minibatch loss at each SGLD step
    drift: Tensor  # [instances] nβ (second-half mean − first-half mean) of the draws, averaged over chains
    distance: Tensor  # [instances, chains] ‖w − w*‖ at the end of each chain
    nbeta: float

    @property
    def diverged(self) -> Tensor:
        """[instances] bool: a chain's loss became non-finite (lower the step size)."""
        return ~torch.isfinite(self.loss_trace).all(-1).all(-1)


def sgld_llc(
    params: dict[str, Tensor],
    loss_and_grads: LossAndGrads,
    cfg: LLCConfig,
    instances: int,
    generator: torch.Generator | None = None,
) -> LLCEstimate:
    """Run `cfg.chains` SGLD chains per instance and estimate λ̂.

    `params` are the walkers' parameters, `[instances × chains, ...]` (instance-major), all starting at w*;
    they are updated in place, and `loss_and_grads` must read them (it is called after every update).
    """
    cfg.validate()
    walkers = instances * cfg.chains
    for name, tensor in params.items():
        if tensor.shape[0] != walkers:
            raise SaelabError(
                f"parameter '{name}' has {tensor.shape[0]} walkers; expected instances × chains = {walkers}"
            )
    device = next(iter(params.values())).device
    start = {name: tensor.detach().clone() for name, tensor in params.items()}
    with torch.no_grad():
        init_loss = loss_and_grads(None)[0]  # L_n(w*) on all rows, per walker
    nbeta, eps, gamma = cfg.nbeta, cfg.step_size, cfg.localization
    trace = torch.empty(walkers, cfg.burnin + cfg.draws, dtype=torch.float64, device=device)
    with torch.no_grad():
        for t in range(cfg.burnin + cfg.draws):
            rows = torch.randint(cfg.n_samples, (cfg.batch_size,), generator=generator, device=device)
            loss, grads = loss_and_grads(rows)
            trace[:, t] = loss
            for name, w in params.items():
                drift = grads[name] * nbeta
                drift.add_(w - start[name], alpha=gamma)
                noise = torch.normal(0.0, 1.0, size=w.shape, generator=generator, device=device, dtype=w.dtype)
                w.add_(drift, alpha=-0.5 * eps)
                w.add_(noise, alpha=eps**0.5)
    trace = trace.cpu().view(instances, cfg.chains, -1)
    init = init_loss.detach().double().cpu().view(instances, cfg.chains)[:, 0]
    draws = trace[:, :, cfg.burnin :]
    per_chain = nbeta * (draws.mean(-1) - init[:, None])
    half = cfg.draws // 2
    drift = nbeta * (draws[:, :, -half:].mean(-1) - draws[:, :, :half].mean(-1)).mean(-1)
    squared = sum((w - start[name]).double().reshape(walkers, -1).square().sum(1) for name, w in params.items())
    return LLCEstimate(
        llc_mean=per_chain.mean(-1),
        llc_std=per_chain.std(-1) if cfg.chains > 1 else torch.zeros(instances, dtype=torch.float64),
        llc_per_chain=per_chain,
        init_loss=init,
        loss_trace=trace,
        drift=drift,
        distance=squared.sqrt().cpu().view(instances, cfg.chains),
        nbeta=nbeta,
    )


def toy_walkers(model: ToyModel, chains: int) -> ToyModel:
    """A ToyModel with `instances × chains` instances (instance-major), each a copy of its instance of `model`."""
    probability = model.cfg.feature_probability
    if isinstance(probability, list):
        probability = [p for p in probability for _ in range(chains)]
    cfg = dataclasses.replace(model.cfg, n_instances=model.cfg.n_instances * chains, feature_probability=probability)
    walkers = ToyModel(
        cfg,
        importance=model.importance.repeat_interleave(chains, 0),
        feature_probability=model.feature_probability.repeat_interleave(chains, 0),
    ).to(model.W.device)
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(walkers.named_parameters(), model.named_parameters(), strict=True):
            mine.copy_(theirs.detach().repeat_interleave(chains, 0))
    return walkers


def toy_dataset(model: ToyModel, n_samples: int, seed: int) -> Tensor:
    """D_n: n rows per instance, conditioned on at least one active feature: `[instances, n_features, n]`."""
    generator = torch.Generator(device=model.W.device).manual_seed(seed)
    with torch.no_grad():
        return sample_nonempty(model, n_samples, generator)[0]


def toy_llc(model: ToyModel, cfg: LLCConfig, data: Tensor | None = None) -> LLCEstimate:
    """λ̂ for every instance of `model` at its current weights (w*), on `data` (default: `toy_dataset`)."""
    cfg.validate()
    data = toy_dataset(model, cfg.n_samples, cfg.seed) if data is None else data
    walkers = toy_walkers(model, cfg.chains)
    rows_all = data.repeat_interleave(cfg.chains, 0)  # [walkers, feat, n]
    p_one = torch.ones(walkers.cfg.n_instances, device=data.device, dtype=data.dtype)

    def loss_and_grads(rows: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        batch = rows_all if rows is None else rows_all[:, :, rows]
        return toy_loss_and_grads(walkers, batch, p_one)

    params = {name: param.data for name, param in walkers.named_parameters()}
    generator = torch.Generator(device=data.device).manual_seed(cfg.seed + 1)
    return sgld_llc(params, loss_and_grads, cfg, model.cfg.n_instances, generator)
