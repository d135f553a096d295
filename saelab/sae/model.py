"""The sparse autoencoder family: five architectures behind one encode → latents → decode contract.

Every SAE maps activations `x [..., d_in]` to latents `[..., d_sae]` and back, with SAELens's weight layout:

    x_in    = x − b_dec                  (when apply_b_dec_to_input, the SAELens default)
    latents = σ(x_in W_enc + b_enc)      W_enc [d_in, d_sae]; σ is what the architectures differ in
    x_hat   = latents W_dec + b_dec      W_dec [d_sae, d_in]

A transcoder is the same architecture with another target: `SAEConfig.d_out` set, it reads x [d_in] (an MLP's
input) and predicts y [d_out] (the MLP's output), trained on ‖ŷ − y‖² instead of ‖x̂ − x‖²; b_dec is then [d_out]
and never subtracted from x, and with `skip` a linear skip connection is added (SAELens's layout):

    y_hat   = latents W_dec + b_dec + x W_skipᵀ      W_dec [d_sae, d_out], W_skip [d_out, d_in] (starts at zero)

The skip term is trained by handing the dictionary the target y − x W_skipᵀ (with gradient to W_skip), so every
architecture's loss, AuxK residual and Matryoshka prefix errors apply to the transcoder unchanged.

`forward` returns an `SAEOutput`: the reconstruction, the latents, and the training loss split into its parts
(reconstruction error summed over d_in and averaged over tokens, the sparsity penalty, an auxiliary term). The
code here is the plain-PyTorch reference; an architecture with a fused training path (ReLU, TopK) builds it from
the tensor kernels of `saelab.sae.fast`, and the tests hold it to this reference.

Each architecture is one subclass of `SAE` that declares what it is on itself — its name, the SAELens architecture
it is saved as, whether k or a sparsity coefficient sets its sparsity (and the coefficient's default), its fused
path — and registers itself by being defined; `ARCHITECTURES`, the defaults, the saved-format names and the CLI's
checks are read from those declarations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab.config import require_positive_ints
from saelab.errors import SaelabError
from saelab.sae import fast as kernels

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Every architecture by name, in the order they are defined below; filled in by `SAE.__init_subclass__`.
SAE_CLASSES: dict[str, type[SAE]] = {}


@dataclass
class SAEConfig:
    """The shape and training objective of one SAE.

    `sparsity_coefficient` is the L1 weight (relu, gated) or L0 weight (jumprelu); None picks the architecture's
    default. `k` is the number of active latents per token (topk, an integer) or per token on average over a
    batch (batchtopk, may be fractional); an architecture declares which of the two it uses.
    `aux_k_coefficient` weighs the AuxK loss that revives dead TopK and BatchTopK latents, using the `aux_k`
    (default d_in // 2) highest dead pre-activations. `matryoshka_widths` are the nested prefix sizes of a
    Matryoshka SAE, the last equal to d_sae (empty: its default).
    `d_out` makes it a transcoder that predicts another activation of width d_out from x (None: an SAE, which
    reconstructs x); `skip` adds the transcoder's linear skip connection. `apply_b_dec_to_input` None means True for
    an SAE and False for a transcoder (whose b_dec lives in the output space).
    """

    architecture: str = "relu"
    d_in: int = 2
    d_sae: int = 8
    k: float = 4
    sparsity_coefficient: float | None = None
    apply_b_dec_to_input: bool | None = None
    aux_k: int | None = None
    aux_k_coefficient: float = 1 / 32
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    batchtopk_threshold_lr: float = 0.01
    matryoshka_widths: tuple[int, ...] = ()
    dtype: str = "float32"
    d_out: int | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if self.sparsity_coefficient is None and self.architecture in SAE_CLASSES:
            self.sparsity_coefficient = SAE_CLASSES[self.architecture].default_sparsity_coefficient
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.d_out is None

    @property
    def transcoder(self) -> bool:
        """Whether it predicts another activation (`d_out` set) rather than reconstructing its input."""
        return self.d_out is not None

    @property
    def d_target(self) -> int:
        """The width of what it is trained to output: d_out for a transcoder, else d_in."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def sae_class(self) -> type[SAE]:
        """The architecture's class (a one-line error for an unknown name)."""
        if self.architecture not in SAE_CLASSES:
            raise SaelabError(f"unknown architecture '{self.architecture}'; choose one of {', '.join(SAE_CLASSES)}")
        return SAE_CLASSES[self.architecture]

    def validate(self) -> None:
        sae_class = self.sae_class
        require_positive_ints(self, ("d_in", "d_sae") + (("d_out",) if self.transcoder else ()))
        if self.skip and not self.transcoder:
            raise SaelabError("skip (a linear skip connection) applies to transcoders; set d_out (--hook-out)")
        if self.transcoder and self.apply_b_dec_to_input:
            raise SaelabError("a transcoder's b_dec is in the output space; apply_b_dec_to_input must be False")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not 0 < self.k < math.inf:
            raise SaelabError(f"k must be a finite positive number, got {self.k!r}")
        if sae_class.whole_k and self.k != int(self.k):
            raise SaelabError(
                f"a {self.architecture} SAE keeps a whole number of latents per token; k = {self.k} is fractional"
            )
        if sae_class.sparsity_by_k and self.k > self.d_sae:
            raise SaelabError(f"k = {self.k} exceeds d_sae = {self.d_sae}; choose k <= d_sae")
        if self.aux_k is not None and not 0 < self.aux_k <= self.d_sae:
            raise SaelabError(f"aux_k must be in 1..d_sae ({self.d_sae}), got {self.aux_k!r}")
        numbers = {
            "sparsity_coefficient": self.sparsity_coefficient,
            "aux_k_coefficient": self.aux_k_coefficient,
            "jumprelu_init_threshold": self.jumprelu_init_threshold,
        }
        for name in ("skip", "apply_b_dec_to_input"):
            if not isinstance(getattr(self, name), bool):
                raise SaelabError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SaelabError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("jumprelu_bandwidth", "batchtopk_threshold_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise SaelabError(f"{name} must be in (0, 1], got {value!r}")
        if self.dtype not in DTYPES:
            raise SaelabError(f"unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPES)}")
        sae_class.check_config(self)

    @property
    def aux_k_latents(self) -> int:
        """How many dead latents the AuxK loss uses: `aux_k`, by default d_in // 2 (Gao et al.)."""
        return self.aux_k or max(1, self.d_in // 2)

    @property
    def name(self) -> str:
        """A short label for logs and sweep folders, e.g. `topk_k16` or `relu_c5`."""
        if self.sae_class.sparsity_by_k:
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
    aux: Tensor  # scalar: AuxK (+ Matryoshka's prefix errors), the gated auxiliary reconstruction, or 0
    fired: Tensor  # [d_sae] on how many tokens of the batch each latent was non-zero


class SAE(nn.Module):
    """Parameters and contract shared by every architecture; subclasses define the activation and the losses.

    Subclasses implement `activation(pre)` (inference) and `training_terms(x, dead, target)`; the base class handles
    shapes, the fused fast paths, decoder-norm constraints and folding an input scale into the weights.
    """

    # --- what an architecture declares ------------------------------------------------------------------------
    architecture: ClassVar[str]  # its name: `--architecture`, cfg.json's saelab block, sweep labels
    saelens_architecture: ClassVar[str]  # the `architecture` SAELens 6 loads the saved SAE as
    # Whether a SAELens SAE of `saelens_architecture` loads as this class; False where the saved form is another
    # architecture's inference form (a BatchTopK SAE is saved as the JumpReLU it is at inference).
    loads_from_saelens: ClassVar[bool] = True
    # The SAELens 6 architecture a transcoder of this kind is saved as (its skip form is the `skip_` variant), or
    # None where SAELens has no such transcoder: it is then saved in saelab's own layout (`SAE.saved_architecture`).
    saelens_transcoder: ClassVar[str | None] = None
    sparsity_by_k: ClassVar[bool] = False  # sparsity set by k active latents, else by `sparsity_coefficient`
    whole_k: ClassVar[bool] = False  # k must be a whole number (a per-token top-k)
    # The sparsity coefficient that suits activations normalised to E‖x‖ = √d_in (unused where k sets sparsity).
    default_sparsity_coefficient: ClassVar[float] = 0.0
    # The Adam learning rate a run uses unless it sets one (`SAETrainConfig.lr` None), for activations normalised to
    # E‖x‖ = √d_in and the default schedule (`benchmarks/lm_train.py` measures it against SAELens).
    default_lr: ClassVar[float] = 4e-4
    # SAEConfig settings that differ from the defaults on a toy model's few hidden dimensions (`saelab.sae.recovery`).
    toy_settings: ClassVar[dict[str, float]] = {}
    # Whether W_dec rows are kept at unit norm (gradient projected, rows renormalised after each step). Only the
    # ReLU SAE trains a free decoder, because its L1 penalty is weighted by the row norms instead.
    unit_norm_decoder: ClassVar[bool] = True
    decoder_init_norm: ClassVar[float] = 1.0
    # Parameter and buffer names in the SAELens weight file, in the order they are saved.
    tensor_names: ClassVar[tuple[str, ...]] = ("W_enc", "W_dec", "b_enc", "b_dec")

    # Tensors that are buffers rather than parameters (state that is not trained by gradient).
    buffer_names: ClassVar[tuple[str, ...]] = ()

    W_enc: nn.Parameter  # [d_in, d_sae]
    W_dec: nn.Parameter  # [d_sae, d_out]
    b_enc: nn.Parameter  # [d_sae]
    b_dec: nn.Parameter  # [d_out]
    W_skip: nn.Parameter  # [d_out, d_in], a skip transcoder only

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:  # a concrete architecture, not a shared base
            SAE_CLASSES[cls.architecture] = cls

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        cfg.validate()
        if cfg.architecture != self.architecture:
            raise SaelabError(f"{type(self).__name__} needs architecture '{self.architecture}', not {cfg.architecture}")
        self.cfg = cfg
        self.metadata: dict[str, Any] = {}  # hook_name, model_name, source, …: written to cfg.json
        self.saved_info: dict[str, Any] = {}  # the saelab block of the cfg.json it was loaded from, if any
        for name in self.weight_names:
            tensor = torch.zeros(self.tensor_shape(name), dtype=DTYPES[cfg.dtype])
            if name in self.buffer_names:
                self.register_buffer(name, tensor)
            else:
                setattr(self, name, nn.Parameter(tensor))
        self.reset_parameters(generator)

    @property
    def weight_names(self) -> tuple[str, ...]:
        """This SAE's tensors in the saved file: its architecture's `tensor_names`, plus W_skip for a skip
        transcoder."""
        return self.tensor_names + (("W_skip",) if self.cfg.skip else ())

    @property
    def saved_architecture(self) -> str:
        """The `architecture` its cfg.json names: SAELens's name for it where SAELens has one (a transcoder:
        `transcoder`, `skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`), else saelab's own
        `<architecture>[_skip]_transcoder`, which SAELens does not load."""
        return self.transcoder_architecture(self.cfg.skip) if self.cfg.transcoder else self.saelens_architecture

    @classmethod
    def transcoder_architecture(cls, skip: bool) -> str:
        """The cfg.json `architecture` of a transcoder of this kind, with or without the skip connection."""
        name = cls.saelens_transcoder or f"{cls.architecture}_transcoder"
        return name.replace("transcoder", "skip_transcoder") if skip else name

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        d_in, d_sae, d_out = self.cfg.d_in, self.cfg.d_sae, self.cfg.d_target
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
        return shapes.get(name, (d_sae,))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows in random directions at `decoder_init_norm`, W_enc = W_decᵀ, everything else zero.

        A transcoder's input and output are different spaces, so its encoder columns are drawn separately (at the
        same norm); its skip connection starts at zero, as in SAELens.
        """
        cfg = self.cfg
        directions = torch.randn(cfg.d_sae, cfg.d_target, generator=generator, dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True) * self.decoder_init_norm
        self.W_dec.copy_(directions)
        if cfg.transcoder:
            directions = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float64)
            directions = directions / directions.norm(dim=1, keepdim=True) * self.decoder_init_norm
        self.W_enc.copy_(directions.T)
        for name in self.weight_names:
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
        """latents [..., d_sae] → x_hat [..., d_out] (an SAE: d_in), without a transcoder's skip term"""
        return latents @ self.W_dec + self.b_dec

    def output(self, x: Tensor, latents: Tensor) -> Tensor:
        """What it outputs for `x [..., d_in]` with `latents [..., d_sae]`: decode(latents), plus x W_skipᵀ for a
        skip transcoder. For an SAE this is the reconstruction x̂, for a transcoder the predicted target ŷ."""
        out = self.decode(latents)
        return out + x.to(out.dtype) @ self.W_skip.T if self.cfg.skip else out

    def forward(
        self,
        x: Tensor,
        dead: Tensor | None = None,
        sparsity_scale: float = 1.0,
        fast: bool = True,
        target: Tensor | None = None,
    ) -> SAEOutput:
        """Reconstruct `x [..., d_in]` (a transcoder: predict `target [..., d_out]`) and compute the training loss.

        `dead [d_sae]` marks latents the trainer considers dead (AuxK revives them); `sparsity_scale` is the
        warm-up factor on the sparsity coefficient. While training on the CPU with gradients on, `fast` picks
        the fused path where the architecture has one. `x_hat` of the result is the whole output (skip included).
        """
        flat = self._flatten_input(x)
        if self.cfg.transcoder and target is None:
            raise SaelabError("a transcoder trains towards a target (the MLP's output); pass target=")
        goal = flat if target is None else self._flatten(target, self.cfg.d_target, "target")
        skip_out = flat @ self.W_skip.T if self.cfg.skip else None
        if skip_out is not None:  # the dictionary learns what the skip connection leaves (gradient reaches W_skip)
            goal = goal - skip_out
        out = None
        if fast and self.training and torch.is_grad_enabled() and kernels.fused_paths_apply(flat):
            out = self.fused_forward(flat, dead, sparsity_scale, goal)
        if out is None:
            out = self.reference_forward(flat, dead, sparsity_scale, goal)
        if skip_out is not None:
            out.x_hat = out.x_hat + skip_out
        out.x_hat = out.x_hat.reshape(*x.shape[:-1], self.cfg.d_target)
        if out.latents is not None:
            out.latents = out.latents.reshape(*x.shape[:-1], self.cfg.d_sae)
        return out

    def reference_forward(
        self, x: Tensor, dead: Tensor | None = None, sparsity_scale: float = 1.0, target: Tensor | None = None
    ) -> SAEOutput:
        """The plain-autograd forward on `x [tokens, d_in]` towards `target` (default x); every fused path is tested
        against it."""
        target = x if target is None else target
        latents, x_hat, sparsity, aux = self.training_terms(x, dead, target)
        mse = (x_hat - target).pow(2).sum(dim=-1).mean()
        sparsity = sparsity * sparsity_scale
        fired = (latents != 0).sum(dim=0)
        return SAEOutput(x_hat, latents, mse + sparsity + aux, mse, sparsity, aux, fired)

    def training_terms(self, x: Tensor, dead: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [tokens, d_in], target [tokens, d_out] (an SAE: x) → (latents, x_hat, sparsity penalty × coefficient,
        auxiliary loss)"""
        raise NotImplementedError

    def fused_forward(self, x: Tensor, dead: Tensor | None, sparsity_scale: float, target: Tensor) -> SAEOutput | None:
        """The fused training forward on `x [tokens, d_in]` towards `target`, or None where there is none."""
        return None

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Refuse settings that this architecture does not use or accept (called by `SAEConfig.validate`)."""
        if cfg.matryoshka_widths:
            raise SaelabError(f"matryoshka_widths applies to matryoshka_batchtopk, not {cfg.architecture}")

    def saelens_fields(self) -> dict[str, Any]:
        """Fields of SAELens's cfg.json beyond the common ones that this architecture's saved form needs."""
        return {}

    def _flatten_input(self, x: Tensor) -> Tensor:
        return self._flatten(x, self.cfg.d_in, "input")

    def _flatten(self, x: Tensor, width: int, what: str) -> Tensor:
        name = "d_in" if what == "input" else "d_out"
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != width:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SaelabError(f"SAE {what} has shape {shape}; expected [..., {name}] with {name} = {width}")
        if not x.is_floating_point():
            raise SaelabError(f"SAE {what} has dtype {x.dtype}; expected floating-point activations")
        return x.reshape(-1, width).to(self.W_enc.dtype)

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
    def fold_input_scale(self, scale: float, out_scale: float | None = None) -> None:
        """Make an SAE trained on `scale · x` work on raw `x` with identical latents and x̂ / scale.

        A transcoder trained from `scale · x` to `out_scale · y` becomes one from x to y: identical latents, output
        divided by out_scale (W_skip · scale / out_scale).
        """
        out_scale = scale if out_scale is None else out_scale
        self.W_enc *= scale
        self.W_dec /= out_scale
        self.b_dec /= out_scale
        if self.cfg.skip:
            self.W_skip *= scale / out_scale

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
    saelens_architecture = "standard"
    saelens_transcoder = "transcoder"
    default_sparsity_coefficient = 5.0  # L1 weight
    unit_norm_decoder = False
    decoder_init_norm = 0.1

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_terms(self, x: Tensor, dead: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        latents = torch.relu(self.pre_activations(x))
        x_hat = self.decode(latents)
        l1 = (latents * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return latents, x_hat, self.cfg.sparsity_coefficient * l1, x.new_zeros(())

    def fused_forward(self, x: Tensor, dead: Tensor | None, sparsity_scale: float, target: Tensor) -> SAEOutput:
        """Loss and all four gradients in one blocked sweep (`kernels.relu_l1_loss_and_grads`)."""
        params = (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        coefficient = self.cfg.sparsity_coefficient * sparsity_scale
        terms, grads = kernels.relu_l1_loss_and_grads(
            x, *params, coefficient, self.cfg.apply_b_dec_to_input, target.detach()
        )
        grads, params = tuple(grads.values()), params
        if target.requires_grad:  # a skip transcoder's target y − x W_skipᵀ: ∂loss/∂target = −(2/T)(ŷ − target)
            grads, params = (*grads, (target.detach() - terms["x_hat"]) * (2 / x.shape[0])), (*params, target)
        loss = kernels.attach_gradients(terms["mse"] + terms["sparsity"], grads, params)
        zero = x.new_zeros(())
        return SAEOutput(terms["x_hat"], None, loss, terms["mse"], terms["sparsity"], zero, terms["fired"])


class TopKSAE(SAE):
    """TopK SAE: keep the k largest pre-activations of each token, ReLU them, zero the rest.

    Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (OpenAI). Sparsity is set by k, so there is no
    penalty; the unit-norm decoder keeps latent magnitudes comparable. Dead latents are revived by the AuxK loss:
    the top `aux_k` dead pre-activations reconstruct the residual x − x̂, weighted by `aux_k_coefficient`.
    """

    architecture = "topk"
    saelens_architecture = "topk"
    sparsity_by_k = True
    whole_k = True
    # Adam moves each weight by about lr per step, so a unit-norm decoder row turns by about lr·√d_in radians: at
    # 4e-4 the directions barely move in a short run. On the built-in model at 2^19 tokens, 2e-3 reaches explained
    # variance 0.835 where 4e-4 reached 0.652 (SAELens at its default 3e-4: 0.674).
    default_lr = 2e-3

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(int(self.cfg.k), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def training_terms(self, x: Tensor, dead: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        latents = self.activation(pre)
        x_hat = self.decode(latents)
        return latents, x_hat, x.new_zeros(()), self.dense_aux_k_loss(target, x_hat, pre, dead)

    def fused_forward(self, x: Tensor, dead: Tensor | None, sparsity_scale: float, target: Tensor) -> SAEOutput:
        """Block-wise top-k encoder, sparse decoder and sparse encoder backward (`kernels.topk_train_forward`)."""
        n_dead = self.dead_count(dead)
        x_hat, values, indices, aux_x_hat = kernels.topk_train_forward(
            x,
            self.W_enc,
            self.b_enc,
            self.W_dec,
            self.b_dec,
            int(self.cfg.k),
            self.cfg.apply_b_dec_to_input,
            dead,
            min(self.cfg.aux_k_latents, n_dead),
        )
        mse = (x_hat - target).pow(2).sum(dim=-1).mean()
        residual = (target - x_hat).detach()
        aux = x.new_zeros(()) if aux_x_hat is None else self.aux_k_loss(aux_x_hat, residual, n_dead)
        fired = torch.bincount(indices[values > 0], minlength=self.cfg.d_sae)
        zero = x.new_zeros(())
        return SAEOutput(x_hat, None, mse + aux, mse.detach(), zero, aux.detach(), fired)

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": int(self.cfg.k), "rescale_acts_by_decoder_norm": False}

    @torch.no_grad()
    def sparse_encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Latents of `x [tokens, d_in]` as (values, indices) `[tokens, k]`, never densified."""
        x_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        values, indices, _, _ = kernels.topk_encode(x_in, self.W_enc, self.b_enc, int(self.cfg.k))
        return values.relu_(), indices

    # --- AuxK (Gao et al. 2024), shared by every architecture that keeps the top activations ---------------------

    def dead_count(self, dead: Tensor | None) -> int:
        """How many latents the AuxK loss may revive (0 when it is off)."""
        return 0 if dead is None or self.cfg.aux_k_coefficient == 0 else int(dead.sum())

    def aux_k_loss(self, aux_x_hat: Tensor, residual: Tensor, n_dead: int) -> Tensor:
        """‖(x − x̂) − TopK_aux(dead pre-activations) W_dec‖², scaled down while fewer than `aux_k` latents are dead.

        `aux_x_hat [tokens, d_in]` is the decoded top-`aux_k` dead latents (no b_dec), `residual` the detached x − x̂.
        """
        scale = min(n_dead / self.cfg.aux_k_latents, 1.0)
        return self.cfg.aux_k_coefficient * scale * (aux_x_hat - residual).pow(2).sum(dim=-1).mean()

    def dense_aux_k_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor | None) -> Tensor:
        """The AuxK loss from dense pre-activations `[tokens, d_sae]` (the reference path); `x` is the target."""
        n_dead = self.dead_count(dead)
        if n_dead == 0:
            return x.new_zeros(())
        dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        values, indices = dead_pre.topk(min(self.cfg.aux_k_latents, n_dead), dim=-1, sorted=False)
        aux_latents = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return self.aux_k_loss(aux_latents @ self.W_dec, (x - x_hat).detach(), n_dead)


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: keep the k·tokens largest activations of the whole batch, so k holds only on average.

    Bussmann et al. 2024, "BatchTopK Sparse Autoencoders". Training tracks a threshold θ, a running average of the
    smallest activation kept; at inference (eval mode, and in the saved file) the SAE is a JumpReLU with that
    single θ for every latent, so a token's latents no longer depend on the rest of its batch.
    """

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"
    saelens_transcoder = "jumprelu_transcoder"
    loads_from_saelens = False
    whole_k = False
    tensor_names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    buffer_names = ("threshold",)
    threshold: Tensor  # [d_sae], every entry θ

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def training_terms(self, x: Tensor, dead: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        latents = self.batch_latents(pre)
        x_hat = self.decode(latents)
        return latents, x_hat, x.new_zeros(()), self.dense_aux_k_loss(target, x_hat, pre, dead)

    def batch_latents(self, pre: Tensor) -> Tensor:
        """Latents `[tokens, d_sae]` of pre-activations: in training the k·tokens largest of the batch (θ follows
        them), in eval the JumpReLU with θ."""
        if not self.training:
            return self.activation(pre)
        acts = torch.relu(pre).flatten()
        values, indices = acts.topk(min(round(self.cfg.k * pre.shape[0]), acts.numel()), sorted=False)
        latents = torch.zeros_like(acts).scatter(-1, indices, values).reshape(pre.shape)
        self.update_threshold(latents)
        return latents

    def fused_forward(self, x: Tensor, dead: Tensor | None, sparsity_scale: float, target: Tensor) -> None:
        return None  # the batch-wide top-k has no fused path (TopK's is per token)

    def saelens_fields(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def update_threshold(self, latents: Tensor) -> None:
        positive = latents[latents > 0]
        if positive.numel():
            lr = self.cfg.batchtopk_threshold_lr
            self.threshold.mul_(1 - lr).add_(lr * positive.min())


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: nested prefixes of the dictionary, each trained to reconstruct x on its own.

    Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with Matryoshka Sparse
    Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders". Latents are chosen as in BatchTopK over the
    whole dictionary; then for each prefix width w of `prefix_widths` the first w latents alone reconstruct x, and
    the loss adds every prefix's squared error to the whole dictionary's. The early latents must work without the
    later ones, so they learn general features and the later ones specialise, instead of a parent feature being
    absorbed into its children's latents. The prefix errors are reported in `aux`, with AuxK. At inference it is
    BatchTopK's JumpReLU, and it is saved as one (as SAELens saves its `matryoshka_batchtopk`).
    """

    architecture = "matryoshka_batchtopk"

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        widths = cfg.matryoshka_widths
        if not widths:
            return
        if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise SaelabError(f"matryoshka_widths must be positive whole numbers, got {list(widths)}")
        if any(b <= a for a, b in itertools.pairwise(widths)) or widths[-1] != cfg.d_sae:
            raise SaelabError(
                f"matryoshka_widths must increase strictly and end at d_sae = {cfg.d_sae}, got {list(widths)}"
            )

    @property
    def prefix_widths(self) -> tuple[int, ...]:
        """The nested dictionary sizes, the whole d_sae last: `matryoshka_widths`, by default d_sae / 4^j for
        j = 3, 2, 1, 0 (2048 latents: 32, 128, 512, 2048)."""
        d_sae = self.cfg.d_sae
        return tuple(self.cfg.matryoshka_widths) or tuple(sorted({max(1, d_sae // 4**j) for j in range(4)}))

    def training_terms(self, x: Tensor, dead: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = self.pre_activations(x)
        latents = self.batch_latents(pre)
        x_hat, prefix_error, start = self.b_dec.expand_as(target), x.new_zeros(()), 0
        for width in self.prefix_widths:  # x̂ of each prefix is the previous one plus the next slice's decode
            x_hat = x_hat + latents[:, start:width] @ self.W_dec[start:width]
            if width < self.cfg.d_sae:
                prefix_error = prefix_error + (x_hat - target).pow(2).sum(dim=-1).mean()
            start = width
        return latents, x_hat, x.new_zeros(()), prefix_error + self.dense_aux_k_loss(target, x_hat, pre, dead)


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
    saelens_architecture = "jumprelu"
    saelens_transcoder = "jumprelu_transcoder"
    default_sparsity_coefficient = 1.0  # L0 weight
    # On a toy model the threshold starts at 2 (in units where E‖x‖ = √d_in): started near zero, its latents first
    # fire on pairs of neighbouring features and settle there, since the L0 penalty gives the encoder no gradient.
    toy_settings: ClassVar[dict[str, float]] = {"sparsity_coefficient": 2.0, "jumprelu_init_threshold": 2.0}
    tensor_names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    threshold: nn.Parameter  # [d_sae]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        self.threshold.fill_(self.cfg.jumprelu_init_threshold)

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def training_terms(self, x: Tensor, dead: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
    saelens_architecture = "gated"
    default_sparsity_coefficient = 5.0  # L1 weight
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

    def training_terms(self, x: Tensor, dead: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        latents = (pi_gate > 0) * torch.relu(pi_mag)
        x_hat = self.decode(latents)
        gate_acts = torch.relu(pi_gate)
        l1 = gate_acts.sum(dim=-1).mean()
        via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = (via_gate - target).pow(2).sum(dim=-1).mean()
        return latents, x_hat, self.cfg.sparsity_coefficient * l1, aux


ARCHITECTURES = tuple(SAE_CLASSES)


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SAE:
    """The SAE of `cfg.architecture`, initialised from `generator`."""
    cfg.validate()
    return cfg.sae_class(cfg, generator)
