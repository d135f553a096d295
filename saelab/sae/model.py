"""The sparse autoencoder family: five architectures behind one encode → latents → decode contract.

Every SAE maps activations `x [..., d_in]` to latents `[..., d_sae]` and back, with SAELens's weight layout:

    x_in    = x − b_dec                  (when apply_b_dec_to_input, the SAELens default)
    latents = σ(x_in W_enc + b_enc)      W_enc [d_in, d_sae]; σ is what the architectures differ in
    x_hat   = latents W_dec + b_dec      W_dec [d_sae, d_in]

`forward` returns an `SAEOutput`: the reconstruction, the latents, and the training loss split into its parts
(reconstruction error summed over d_in and averaged over tokens, the sparsity penalty, an auxiliary term). The
code here is the plain-PyTorch reference; `saelab.sae.fast` holds the fused training paths for ReLU and TopK,
which `forward` uses while training and which the tests hold to this reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab.config import require_positive_ints
from saelab.errors import SaelabError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "gated")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Sparsity coefficients that suit activations normalised to E‖x‖ = √d_in: an L1 weight for relu and gated,
# an L0 weight for jumprelu. TopK and BatchTopK set sparsity through k instead.
DEFAULT_SPARSITY_COEFFICIENT = {"relu": 5.0, "gated": 5.0, "jumprelu": 1.0, "topk": 0.0, "batchtopk": 0.0}


@dataclass
class SAEConfig:
    """The shape and training objective of one SAE.

    `sparsity_coefficient` is the L1 weight (relu, gated) or L0 weight (jumprelu); None picks the architecture's
    default. `k` is the number of active latents per token (topk, an integer) or per token on average over a
    batch (batchtopk, may be fractional). `aux_k_coefficient` weighs the AuxK loss that revives dead TopK and
    BatchTopK latents, using the `aux_k` (default d_in // 2) highest dead pre-activations.
    """

    architecture: str = "relu"
    d_in: int = 2
    d_sae: int = 8
    k: float = 4
    sparsity_coefficient: float | None = None
    apply_b_dec_to_input: bool = True
    aux_k: int | None = None
    aux_k_coefficient: float = 1 / 32
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    batchtopk_threshold_lr: float = 0.01
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.sparsity_coefficient is None and self.architecture in DEFAULT_SPARSITY_COEFFICIENT:
            self.sparsity_coefficient = DEFAULT_SPARSITY_COEFFICIENT[self.architecture]

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SaelabError(f"unknown architecture '{self.architecture}'; choose one of {', '.join(ARCHITECTURES)}")
        require_positive_ints(self, ("d_in", "d_sae"))
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not self.k > 0:
            raise SaelabError(f"k must be a positive number, got {self.k!r}")
        if self.architecture == "topk" and self.k != int(self.k):
            raise SaelabError(f"a TopK SAE keeps a whole number of latents per token; k = {self.k} is fractional")
        if self.architecture in ("topk", "batchtopk") and self.k > self.d_sae:
            raise SaelabError(f"k = {self.k} exceeds d_sae = {self.d_sae}; choose k <= d_sae")
        if self.aux_k is not None and not 0 < self.aux_k <= self.d_sae:
            raise SaelabError(f"aux_k must be in 1..d_sae ({self.d_sae}), got {self.aux_k!r}")
        numbers = {
            "sparsity_coefficient": self.sparsity_coefficient,
            "aux_k_coefficient": self.aux_k_coefficient,
            "jumprelu_init_threshold": self.jumprelu_init_threshold,
        }
        for name, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SaelabError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("jumprelu_bandwidth", "batchtopk_threshold_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise SaelabError(f"{name} must be in (0, 1], got {value!r}")
        if self.dtype not in DTYPES:
            raise SaelabError(f"unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPES)}")

    @property
    def aux_k_latents(self) -> int:
        """How many dead latents the AuxK loss uses: `aux_k`, by default d_in // 2 (Gao et al.)."""
        return self.aux_k or max(1, self.d_in // 2)

    @property
    def name(self) -> str:
        """A short label for logs and sweep folders, e.g. `topk_k16` or `relu_c5`."""
        if self.architecture in ("topk", "batchtopk"):
            return f"{self.architecture}_k{self.k:g}"
        return f"{self.architecture}_c{self.sparsity_coefficient:g}"


@dataclass
class SAEOutput:
    """What `SAE.forward` returns for a batch `x [..., d_in]`.

    `latents` is None on the fused training paths, which never build the dense `[tokens, d_sae]` matrix (call
    `sae.encode(x)` for it); there, too, only `loss` carries gradients and the parts are detached values.
    """

    x_hat: Tensor  # [..., d_in]
    latents: Tensor | None  # [..., d_sae]
    loss: Tensor  # scalar: mse + sparsity + aux, the value to backpropagate
    mse: Tensor  # scalar: ‖x − x̂‖² summed over d_in, averaged over tokens
    sparsity: Tensor  # scalar: coefficient × penalty × warm-up scale
    aux: Tensor  # scalar: AuxK (topk, batchtopk) or the gated auxiliary reconstruction; 0 otherwise
    fired: Tensor  # [d_sae] on how many tokens of the batch each latent was non-zero


class SAE(nn.Module):
    """Parameters and contract shared by every architecture; subclasses define the activation and the losses.

    Subclasses implement `activation(pre)` (inference) and `training_terms(x)`; the base class handles shapes,
    the fused fast paths, decoder-norm constraints and folding an input scale into the weights.
    """

    architecture: ClassVar[str]
    # Whether W_dec rows are kept at unit norm (gradient projected, rows renormalised after each step). Only the
    # ReLU SAE trains a free decoder, because its L1 penalty is weighted by the row norms instead.
    unit_norm_decoder: ClassVar[bool] = True
    decoder_init_norm: ClassVar[float] = 1.0
    # Parameter and buffer names in the SAELens weight file, in the order they are saved.
    tensor_names: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")

    # Tensors that are buffers rather than parameters (state that is not trained by gradient).
    buffer_names: ClassVar[tuple[str, ...]] = ()

    W_enc: nn.Parameter  # [d_in, d_sae]
    W_dec: nn.Parameter  # [d_sae, d_in]
    b_enc: nn.Parameter  # [d_sae]
    b_dec: nn.Parameter  # [d_in]

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        cfg.validate()
        if cfg.architecture != self.architecture:
            raise SaelabError(f"{type(self).__name__} needs architecture '{self.architecture}', not {cfg.architecture}")
        self.cfg = cfg
        self.metadata: dict[str, Any] = {}  # hook_name, model_name, source, …: written to cfg.json
        self.saved_info: dict[str, Any] = {}  # the saelab block of the cfg.json it was loaded from, if any
        for name in self.tensor_names:
            tensor = torch.zeros(self.tensor_shape(name), dtype=DTYPES[cfg.dtype])
            if name in self.buffer_names:
                self.register_buffer(name, tensor)
            else:
                setattr(self, name, nn.Parameter(tensor))
        self.reset_parameters(generator)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}.get(name, (d_sae,))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows in random directions at `decoder_init_norm`, W_enc = W_decᵀ, everything else zero."""
        directions = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator, dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True) * self.decoder_init_norm
        self.W_dec.copy_(directions)
        self.W_enc.copy_(directions.T)
        for name in self.tensor_names:
            if name not in ("W_enc", "W_dec"):
                getattr(self, name).zero_()

    # --- the forward contract --------------------------------------------------------------------------------

    def pre_activations(self, x: Tensor) -> Tensor:
        """x [tokens, d_in] → x_in W_enc + b_enc [tokens, d_sae]"""
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return torch.addmm(self.b_enc, x_in, self.W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """pre-activations [tokens, d_sae] → latents [tokens, d_sae] (inference semantics)"""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """x [..., d_in] → latents [..., d_sae]"""
        flat = self._flatten_input(x)
        return self.activation(self.pre_activations(flat)).reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, latents: Tensor) -> Tensor:
        """latents [..., d_sae] → x_hat [..., d_in]"""
        return latents @ self.W_dec + self.b_dec

    def forward(
        self, x: Tensor, dead: Tensor | None = None, sparsity_scale: float = 1.0, fast: bool = True
    ) -> SAEOutput:
        """Reconstruct `x [..., d_in]` and compute the training loss.

        `dead [d_sae]` marks latents the trainer considers dead (AuxK revives them); `sparsity_scale` is the
        warm-up factor on the sparsity coefficient. While training on the CPU with gradients on, `fast` picks
        the fused path where the architecture has one.
        """
        flat = self._flatten_input(x)
        out = None
        if fast and self.training and torch.is_grad_enabled():
            from saelab.sae.fast import fused_forward  # fast.py builds on this module

            out = fused_forward(self, flat, dead, sparsity_scale)
        if out is None:
            out = self.reference_forward(flat, dead, sparsity_scale)
        out.x_hat = out.x_hat.reshape(x.shape)
        if out.latents is not None:
            out.latents = out.latents.reshape(*x.shape[:-1], self.cfg.d_sae)
        return out

    def reference_forward(self, x: Tensor, dead: Tensor | None = None, sparsity_scale: float = 1.0) -> SAEOutput:
        """The plain-autograd forward on `x [tokens, d_in]`; every fused path is tested against it."""
        latents, x_hat, sparsity, aux = self.training_terms(x, dead)
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()
        sparsity = sparsity * sparsity_scale
        fired = (latents != 0).sum(dim=0)
        return SAEOutput(x_hat, latents, mse + sparsity + aux, mse, sparsity, aux, fired)

    def training_terms(self, x: Tensor, dead: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [tokens, d_in] → (latents, x_hat, sparsity penalty × coefficient, auxiliary loss)"""
        raise NotImplementedError

    def _flatten_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SaelabError(f"SAE input has shape {shape}; expected [..., d_in] with d_in = {self.cfg.d_in}")
        if not x.is_floating_point():
            raise SaelabError(f"SAE input has dtype {x.dtype}; expected floating-point activations")
        return x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)

    # --- constraints and folding -----------------------------------------------------------------------------

    @torch.no_grad()
    def project_gradients(self) -> None:
        """Remove the part of W_dec's gradient that would change the (unit) row norms (Bricken et al. 2023)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            direction = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            grad = self.W_dec.grad
            grad -= (grad * direction).sum(dim=1, keepdim=True) * direction

    @torch.no_grad()
    def project_parameters(self) -> None:
        """Restore the constraints after an optimiser step."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on `scale · x` work on raw `x` with identical latents and x̂ / scale."""
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    def extra_repr(self) -> str:
        return f"d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}"


class ReluSAE(SAE):
    """ReLU SAE with an L1 penalty weighted by decoder-row norms.

    latents = ReLU(x_in W_enc + b_enc); penalty = λ Σᵢ latentᵢ ‖W_dec,ᵢ‖. Bricken et al. 2023, "Towards
    Monosemanticity", with Anthropic's April 2024 training update (Conerly et al., "Update on how we train
    SAEs"): the decoder is unconstrained and the norm-weighted L1 stops the model from shrinking latents by growing
    decoder rows; decoder rows start at norm 0.1 with W_enc = W_decᵀ.
    """

    architecture = "relu"
    unit_norm_decoder = False
    decoder_init_norm = 0.1

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_terms(self, x: Tensor, dead: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        latents = torch.relu(self.pre_activations(x))
        x_hat = self.decode(latents)
        l1 = (latents * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return latents, x_hat, self.cfg.sparsity_coefficient * l1, x.new_zeros(())


class TopKSAE(SAE):
    """TopK SAE: keep the k largest pre-activations of each token, ReLU them, zero the rest.

    Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (OpenAI). Sparsity is set by k, so there is no
    penalty; the unit-norm decoder keeps latent magnitudes comparable. Dead latents are revived by the AuxK loss:
    the top `aux_k` dead pre-activations reconstruct the residual x − x̂, weighted by `aux_k_coefficient`.
    """

    architecture = "topk"

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(int(self.cfg.k), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def training_terms(self, x: Tensor, dead: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        latents = self.activation(pre)
        x_hat = self.decode(latents)
        return latents, x_hat, x.new_zeros(()), self.aux_k_loss(x, x_hat, pre, dead)

    def aux_k_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor | None) -> Tensor:
        """‖(x − x̂) − TopK_aux(dead pre-activations) W_dec‖², scaled down while few latents are dead."""
        n_dead = 0 if dead is None else int(dead.sum())
        if n_dead == 0 or self.cfg.aux_k_coefficient == 0:
            return x.new_zeros(())
        aux_k = self.cfg.aux_k_latents
        scale = min(n_dead / aux_k, 1.0)
        aux_k = min(aux_k, n_dead)
        dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        values, indices = dead_pre.topk(aux_k, dim=-1, sorted=False)
        aux_latents = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        residual = (x - x_hat).detach()
        error = (aux_latents @ self.W_dec - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_k_coefficient * scale * error


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: keep the k·tokens largest activations of the whole batch, so k holds only on average.

    Bussmann et al. 2024, "BatchTopK Sparse Autoencoders". Training tracks a threshold θ, a running average of the
    smallest activation kept; at inference (eval mode, and in the saved file) the SAE is a JumpReLU with that
    single θ for every latent, so a token's latents no longer depend on the rest of its batch.
    """

    architecture = "batchtopk"
    tensor_names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    buffer_names = ("threshold",)
    threshold: Tensor  # [d_sae], every entry θ

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def training_terms(self, x: Tensor, dead: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        if self.training:
            acts = torch.relu(pre).flatten()
            values, indices = acts.topk(min(round(self.cfg.k * x.shape[0]), acts.numel()), sorted=False)
            latents = torch.zeros_like(acts).scatter(-1, indices, values).reshape(pre.shape)
            self.update_threshold(latents)
        else:
            latents = self.activation(pre)
        x_hat = self.decode(latents)
        return latents, x_hat, x.new_zeros(()), self.aux_k_loss(x, x_hat, pre, dead)

    @torch.no_grad()
    def update_threshold(self, latents: Tensor) -> None:
        positive = latents[latents > 0]
        if positive.numel():
            lr = self.cfg.batchtopk_threshold_lr
            self.threshold.mul_(1 - lr).add_(lr * positive.min())


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """ReLU(pre) · H(pre − θ); the gradient to θ uses a rectangle-kernel straight-through estimator of width ε.

    ReLU(pre) rather than pre: the same for θ ≥ 0, and what SAELens computes at inference for any θ.
    """

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return torch.relu(pre) * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return ((pre > threshold) & (pre > 0)) * grad, grad_threshold.sum(dim=0), None


class _Step(torch.autograd.Function):
    """H(pre − θ), with the same straight-through estimator: only θ receives a gradient."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, grad_threshold.sum(dim=0), None


class JumpReLUSAE(SAE):
    """JumpReLU SAE: a latent passes its pre-activation only above its own learned threshold θᵢ.

    Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse
    Autoencoders" (Google DeepMind). The penalty is λ·L0 = λ Σᵢ H(preᵢ − θᵢ); the step function has no useful
    gradient, so θ learns through a straight-through estimator with a rectangle kernel of width
    `jumprelu_bandwidth`. θ is a plain parameter kept non-negative (as in SAELens 6) and the decoder unit-norm.
    """

    architecture = "jumprelu"
    tensor_names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    threshold: nn.Parameter  # [d_sae]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        self.threshold.fill_(self.cfg.jumprelu_init_threshold)

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def training_terms(self, x: Tensor, dead: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        eps = self.cfg.jumprelu_bandwidth
        latents = _JumpReLU.apply(pre, self.threshold, eps)
        x_hat = self.decode(latents)
        l0 = _Step.apply(pre, self.threshold, eps).sum(dim=-1).mean()
        return latents, x_hat, self.cfg.sparsity_coefficient * l0, x.new_zeros(())

    @torch.no_grad()
    def project_parameters(self) -> None:
        super().project_parameters()
        self.threshold.clamp_(min=0.0)


class GatedSAE(SAE):
    """Gated SAE: one path decides which latents fire, a second, weight-tied path how strongly.

    Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders" (Google DeepMind).
    gate = H(x_in W_enc + b_gate), magnitude = ReLU(x_in (W_enc ⊙ exp(r_mag)) + b_mag), latents = gate ·
    magnitude. The L1 penalty acts on ReLU of the gate pre-activations only, so it cannot shrink the magnitudes;
    an auxiliary loss makes the gate path reconstruct x through a frozen copy of the decoder.
    """

    architecture = "gated"
    tensor_names = ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")
    b_gate: nn.Parameter  # [d_sae]
    b_mag: nn.Parameter  # [d_sae]
    r_mag: nn.Parameter  # [d_sae]

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [tokens, d_in] → gate and magnitude pre-activations, each [tokens, d_sae]"""
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        pi_gate = torch.addmm(self.b_gate, x_in, self.W_enc)
        pi_mag = torch.addmm(self.b_mag, x_in, self.W_enc * self.r_mag.exp())
        return pi_gate, pi_mag

    def pre_activations(self, x: Tensor) -> Tensor:
        return self.gate_and_magnitude(x)[1]

    def encode(self, x: Tensor) -> Tensor:
        flat = self._flatten_input(x)
        pi_gate, pi_mag = self.gate_and_magnitude(flat)
        return ((pi_gate > 0) * torch.relu(pi_mag)).reshape(*x.shape[:-1], self.cfg.d_sae)

    def training_terms(self, x: Tensor, dead: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        latents = (pi_gate > 0) * torch.relu(pi_mag)
        x_hat = self.decode(latents)
        gate_acts = torch.relu(pi_gate)
        l1 = gate_acts.sum(dim=-1).mean()
        via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = (via_gate - x).pow(2).sum(dim=-1).mean()
        return latents, x_hat, self.cfg.sparsity_coefficient * l1, aux


SAE_CLASSES: dict[str, type[SAE]] = {
    cls.architecture: cls for cls in (ReluSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE)
}


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SAE:
    """The SAE of `cfg.architecture`, initialised from `generator`."""
    cfg.validate()
    return SAE_CLASSES[cfg.architecture](cfg, generator)
