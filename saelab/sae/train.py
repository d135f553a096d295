"""The SAE trainer: one loop that trains one or several SAEs on the same stream of activation batches.

    for step in range(steps):
        x = next batch from the source, scaled so E‖x‖ = √d_in (optional)
        for every SAE: forward, backward, project the decoder-norm gradient, clip, Adam, renormalise
                       update tokens-since-fired; revive dead latents on resampling steps
        log one JSONL line per SAE; checkpoint every `checkpoint_every` steps

Adam with linear learning-rate warm-up and decay to zero over the last `lr_decay` of the steps, and a linear
warm-up of the sparsity coefficient (Anthropic, April 2024). `b_dec` starts at the geometric median of a sample.
Dead latents — none fired in the last `dead_after_tokens` tokens — are revived by the AuxK loss (TopK, BatchTopK)
and, every `resample_every` steps, by Anthropic-style resampling (Bricken et al. 2023).

A checkpoint holds everything the rest of the run depends on — weights, Adam state, tokens-since-fired, the
normalisation scales, the trainer's RNG and the source's position — and is written atomically, so a run killed
at any moment and resumed gives bit-identical weights to one that was never interrupted.

Several hooks: a source serves `{hook: batch}` (`saelab.activations.ActivationSource`); `hooks[i]` names the hook
SAE i trains on (by default the source's only hook), and one forward pass of the model feeds them all.

Transcoders: `hooks_out[i]` names the hook a transcoder predicts (an MLP's output) from `hooks[i]` (its input); row
j of both batches is the same token of the same forward pass. Each hook has its own normalisation scale (E‖x‖ =
√d at every hook, input and target alike), and both are folded in at save (`SAE.fold_input_scale`).

Several processes (`torchrun`): `batch_size` is the global batch, each rank reads its own batch_size / world_size
rows, and the ranks average their gradients, fire counts and statistics (saelab.distributed), so every rank
holds the same SAEs; rank 0 writes the log, checkpoints and SAEs.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab import distributed
from saelab.config import config_to_dict, require_positive_ints
from saelab.errors import DivergedError, SaelabError
from saelab.io import OutputKind, atomic_write_bytes, resumable_output
from saelab.sae.io import CFG_FILE, WEIGHTS_FILE, save_sae
from saelab.sae.model import SAE, SAEConfig, SAEOutput, build_sae
from saelab.sae.sources import ActivationSource, as_source
from saelab.stats import explained_variance_from_sums

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_FORMAT = "saelab.sae_checkpoint"
CHECKPOINT_VERSION = 4  # 3: streams keyed by hook name; 4: the data and options in the run identity
B_DEC_INITS = ("geometric_median", "mean", "zeros")
# Settings that do not change the trained weights, so a resumed run may use different values.
RESUME_FREE_FIELDS = ("checkpoint_every", "log_every", "device")


def _is_sae_folder(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


# What `saelab sae train` writes: one SAE folder, or a sweep's folders (nested, per hook); recovery.json is the
# report `saelab.sae.recovery` adds beside a sweep.
SAE_RUN = OutputKind("saelab SAE folder", (CFG_FILE, WEIGHTS_FILE, LOG_FILE, "recovery.json"), _is_sae_folder, True)


@dataclass
class SAETrainConfig:
    """Optimisation settings shared by every SAE of a run. Fractions (`lr_warmup`, …) are of `steps`.

    `lr` None gives every SAE its architecture's `default_lr`.
    """

    steps: int = 5000
    batch_size: int = 4096
    lr: float | None = None
    lr_warmup: float = 0.0
    lr_decay: float = 0.2
    sparsity_warmup: float = 0.05
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    normalize_activations: bool = True
    b_dec_init: str = "geometric_median"
    init_tokens: int = 16384
    dead_after_tokens: int = 10_000_000
    resample_every: int = 0
    resample_tokens: int = 16384
    checkpoint_every: int = 0
    log_every: int = 1
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        require_positive_ints(
            self, ("steps", "batch_size", "init_tokens", "dead_after_tokens", "resample_tokens", "log_every")
        )
        for name in ("resample_every", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SaelabError(f"{name} must be a non-negative integer, got {value!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise SaelabError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("lr_warmup", "lr_decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                value = getattr(self, name)
                raise SaelabError(f"{name} is a fraction of the steps and must be in [0, 1], got {value!r}")
        if self.lr_warmup + self.lr_decay > 1:
            raise SaelabError(f"lr_warmup + lr_decay = {self.lr_warmup + self.lr_decay:g} exceeds the whole run (1)")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise SaelabError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not self.grad_clip >= 0:
            raise SaelabError(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip!r}")
        if self.b_dec_init not in B_DEC_INITS:
            raise SaelabError(f"unknown b_dec_init '{self.b_dec_init}'; choose one of {', '.join(B_DEC_INITS)}")

    def base_lr(self, sae: SAE) -> float:
        """The learning rate of `sae` before the schedule: `lr`, else its architecture's default."""
        return self.lr if self.lr is not None else sae.default_lr

    def lr_at(self, step: int, lr: float | None = None) -> float:
        """The scheduled learning rate at `step` for the base rate `lr` (default: this config's `lr`)."""
        lr = self.lr if lr is None else lr
        warmup, decay = round(self.lr_warmup * self.steps), round(self.lr_decay * self.steps)
        if step < warmup:
            return lr * (step + 1) / warmup
        if step >= self.steps - decay:
            return lr * (self.steps - step) / decay
        return lr

    def sparsity_scale_at(self, step: int) -> float:
        warmup = round(self.sparsity_warmup * self.steps)
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def resamples_at(self, step: int) -> bool:
        """Resample after steps that are multiples of resample_every, but not once the lr decays."""
        decay_start = self.steps - round(self.lr_decay * self.steps)
        return self.resample_every > 0 and (step + 1) % self.resample_every == 0 and step + 1 < decay_start


@dataclass
class TrainState:
    """Everything a run carries from one step to the next; exactly what a checkpoint stores."""

    saes: list[SAE]
    optimizers: list[torch.optim.Optimizer]
    since_fired: list[Tensor]  # per SAE, [d_sae] int64 tokens since each latent last fired
    scales: dict[str, float]  # per hook, the input normalisation factor (1 when off), folded in at save
    generator: torch.Generator  # the trainer's own randomness (resampling)
    step: int = 0  # steps completed


def train_step(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    dead: Tensor | None = None,
    sparsity_scale: float = 1.0,
    grad_clip: float = 1.0,
    fast: bool = True,
    target: Tensor | None = None,
) -> SAEOutput:
    """One optimisation step of `sae` on `x [batch, d_in]` (`fast=False`: on the plain reference path); a
    transcoder learns to output `target [batch, d_out]`."""
    optimizer.zero_grad(set_to_none=True)
    out = sae(x, dead=dead, sparsity_scale=sparsity_scale, fast=fast, target=target)
    out.loss.backward()
    distributed.average_([p.grad for p in sae.parameters() if p.grad is not None])  # data parallel: no-op alone
    sae.project_gradients()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    sae.project_parameters()
    distributed.average_(list(sae.buffers()))  # e.g. BatchTopK's threshold, tracked from each rank's own rows
    return out


def train_saes(
    source: ActivationSource | Tensor | Any,
    sae_configs: SAEConfig | list[SAEConfig],
    cfg: SAETrainConfig | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    hooks: list[str] | None = None,
    overwrite: bool = False,
    inputs: tuple[Path, ...] = (),
    options: dict[str, Any] | None = None,
    hooks_out: list[str | None] | None = None,
) -> list[SAE]:
    """Train one SAE per config on the same batches of `source`; return them folded to raw activations.

    `hooks[i]` names the hook SAE i trains on (default: the source's only hook); `hooks_out[i]`, where given, the
    hook a transcoder (config with `d_out`) learns to output from it. With `out`, the run writes a JSONL log,
    checkpoints, and finally the SAE(s): directly into `out` for one SAE, else into `out/<label>` (see
    `sae_labels`). It works in the hidden folder `.NAME.partial` beside `out`, which replaces `out` when the run
    is complete (`saelab.io.resumable_output`: `out` is checked against `inputs`, the paths the run reads, and an
    `out` that is not an SAE folder needs `overwrite`). `resume` continues from that folder's checkpoint. Inside a
    process group (torchrun), `source` must serve this rank's own rows (`RankSlice`, or a store built with rank
    and world_size). A checkpoint records the run's identity, checked on resume: every setting that changes the
    SAEs or their data (the configs, the training settings, each stream's metadata: model, hook, dataset, context
    length, source) and `options`, the command-line options that chose the data, by the names the user typed.
    """
    if out is None:
        return _train(source, sae_configs, cfg, None, resume, progress, hooks, options or {}, hooks_out)
    if cfg is not None:
        cfg.validate()  # bad settings are reported before anything is checked or written
    writer = distributed.is_main()
    with resumable_output(out, SAE_RUN, resume, CHECKPOINT_FILE, inputs, overwrite, writer) as work:
        saes = _train(source, sae_configs, cfg, work, resume, progress, hooks, options or {}, hooks_out)
    distributed.barrier()  # no rank returns before rank 0 has written the SAEs
    return saes


def _train(
    source: ActivationSource | Tensor | Any,
    sae_configs: SAEConfig | list[SAEConfig],
    cfg: SAETrainConfig | None,
    out: Path | None,
    resume: bool,
    progress: bool,
    hooks: list[str] | None,
    options: dict[str, Any],
    hooks_out: list[str | None] | None = None,
) -> list[SAE]:
    """`train_saes` in the work folder `out` (None: write nothing)."""
    source = as_source(source)
    cfg = cfg or SAETrainConfig()
    cfg.validate()
    sae_configs = [sae_configs] if isinstance(sae_configs, SAEConfig) else list(sae_configs)
    streams = _streams(source, sae_configs, hooks)
    targets = _targets(source, sae_configs, hooks_out)
    if cfg.resample_every and any(targets):
        raise SaelabError(
            "resampling points dead latents at badly reconstructed inputs, which has no transcoder form here;"
            " transcoders revive dead latents with AuxK (topk family): leave resample_every at 0"
        )
    read = streams + [t for t in targets if t is not None]  # every hook the run reads, inputs and targets
    labels = sae_labels(sae_configs, streams)
    rank, world_size = distributed.world()
    if cfg.batch_size % world_size:
        raise SaelabError(f"batch size {cfg.batch_size} does not split over {world_size} processes; make it a multiple")
    local_batch = cfg.batch_size // world_size
    out = Path(out) if out is not None else None
    if resume and out is None:
        raise SaelabError("resuming needs the run's output folder (--out)")
    device = _device(cfg.device)

    if resume:
        state = load_checkpoint(out, source, sae_configs, cfg, device, streams, options, targets)
    else:
        state = _fresh_state(source, sae_configs, cfg, device, streams, targets)
    log = _open_log(out, state.step) if out is not None and rank == 0 else None

    names = ", ".join(labels[:3]) + (", …" if len(labels) > 3 else "")
    what = f"training {len(state.saes)} SAE{'s' if len(state.saes) > 1 else ''} ({names})"
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress or rank > 0, desc=what, dynamic_ncols=True)
    try:
        for step in range(state.step, cfg.steps):
            sparsity_scale = cfg.sparsity_scale_at(step)
            inputs = _scaled(_read(source, read, local_batch, step), state.scales, device)
            resample_inputs = None
            if cfg.resamples_at(step):
                drawn = _draw(source, streams, cfg.resample_tokens // world_size, local_batch)
                resample_inputs = _scaled(drawn, state.scales, device)
            for i, sae in enumerate(state.saes):
                x = inputs[streams[i]]
                y = inputs[targets[i]] if targets[i] is not None else None
                lr = cfg.lr_at(step, cfg.base_lr(sae))
                for group in state.optimizers[i].param_groups:
                    group["lr"] = lr
                dead = state.since_fired[i] >= cfg.dead_after_tokens
                output = train_step(sae, state.optimizers[i], x, dead, sparsity_scale, cfg.grad_clip, target=y)
                fired = distributed.sum_(output.fired.clone())
                state.since_fired[i] += cfg.batch_size
                state.since_fired[i][fired > 0] = 0
                if resample_inputs is not None:
                    dead = state.since_fired[i] >= cfg.dead_after_tokens
                    resample_dead_latents(sae, state.optimizers[i], dead, resample_inputs[streams[i]], state.generator)
                    state.since_fired[i][dead] = 0  # a resampled latent gets a fresh window to fire in
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    goal = x if y is None else y
                    record = _step_record(step, labels[i], lr, sparsity_scale, goal, output, state.since_fired[i], cfg)
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                    if i == 0:
                        bar.set_postfix(
                            loss=f"{record['loss']:.4g}",
                            L0=f"{record['l0']:.1f}",
                            EV=f"{record['explained_variance']:.3f}",
                            dead=f"{record['dead_fraction']:.2f}",
                            refresh=False,
                        )
            state.step = step + 1
            bar.update(1)
            if log is not None:
                log.flush()
            if out is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(out, state, source, sae_configs, cfg, streams, options, targets)
    finally:
        bar.close()
        if log is not None:
            log.close()

    for sae, label in zip(state.saes, labels, strict=True):
        if not all(torch.isfinite(p).all() for p in sae.parameters()):
            raise DivergedError(
                f"training diverged (SAE {label} has NaN or inf weights); nothing was saved; lower --lr"
            )
    for sae, stream, target, label in zip(state.saes, streams, targets, labels, strict=True):
        sae.fold_input_scale(state.scales[stream], state.scales[target or stream])
        sae.eval()
        sae.metadata = dict(source.metadata_for(stream))
        if target is not None:  # SAELens's (reserved) name for a transcoder's output hook
            sae.metadata["hook_name_out"] = target
        if out is not None and rank == 0:
            extra = {
                "train": config_to_dict(cfg),
                "normalization_scale": state.scales[stream],
                "trained_steps": state.step,
            }
            if target is not None:
                extra["normalization_scale_out"] = state.scales[target]
            extra["train"]["world_size"] = world_size
            extra["train"]["lr"] = cfg.base_lr(sae)  # the rate it trained at, also where the architecture chose it
            save_sae(sae, out if len(state.saes) == 1 else out / label, extra)
    if out is None:
        distributed.barrier()
    return state.saes


def sae_labels(sae_configs: list[SAEConfig], hooks: list[str] | None = None) -> list[str]:
    """Each SAE's name in logs and its folder in a multi-SAE run: `topk_k32`, or `<hook>/topk_k32` across hooks."""
    if hooks is None or len(set(hooks)) == 1:
        return [c.name for c in sae_configs]
    return [f"{hook}/{c.name}" for hook, c in zip(hooks, sae_configs, strict=True)]


def _streams(source: ActivationSource, sae_configs: list[SAEConfig], hooks: list[str] | None) -> list[str]:
    """The hook each SAE reads, checked against the configs and the source."""
    if not sae_configs:
        raise SaelabError("no SAE to train; give at least one SAE config")
    if hooks is None:
        if len(source.hooks) != 1:
            raise SaelabError("this source serves several hooks; name the hook of each SAE (hooks=[...])")
        hooks = source.hooks * len(sae_configs)
    if len(hooks) != len(sae_configs):
        raise SaelabError(f"{len(hooks)} hooks for {len(sae_configs)} SAEs; name one hook per SAE")
    missing = [hook for hook in hooks if hook not in source.hooks]
    if missing:
        raise SaelabError(f"the source does not read hook {missing[0]}; it reads {', '.join(source.hooks)}")
    several = len(source.hooks) > 1
    for sae_cfg, hook in zip(sae_configs, hooks, strict=True):
        sae_cfg.validate()
        d_in = source.d_ins[hook]
        if sae_cfg.d_in != d_in:
            at = f" at {hook}" if several else ""
            raise SaelabError(
                f"SAE {sae_cfg.name} has d_in = {sae_cfg.d_in}, but the activations{at} have d_in = {d_in}"
            )
    labels = sae_labels(sae_configs, hooks)
    if len(set(labels)) != len(labels):
        raise SaelabError(f"two SAEs of the sweep share a name ({', '.join(labels)}); give each different settings")
    return list(hooks)


def _targets(
    source: ActivationSource, sae_configs: list[SAEConfig], hooks_out: list[str | None] | None
) -> list[str | None]:
    """The hook each transcoder outputs (None for an SAE), checked against the configs and the source."""
    targets = list(hooks_out) if hooks_out is not None else [None] * len(sae_configs)
    if len(targets) != len(sae_configs):
        raise SaelabError(f"{len(targets)} output hooks for {len(sae_configs)} SAEs; name one per SAE (or None)")
    for sae_cfg, target in zip(sae_configs, targets, strict=True):
        if target is None:
            if sae_cfg.transcoder:
                raise SaelabError(f"transcoder {sae_cfg.name} (d_out = {sae_cfg.d_out}) needs the hook it outputs")
            continue
        if target not in source.hooks:
            raise SaelabError(f"the source does not read hook {target}; it reads {', '.join(source.hooks)}")
        if sae_cfg.d_out != source.d_ins[target]:
            raise SaelabError(
                f"SAE {sae_cfg.name} has d_out = {sae_cfg.d_out}, but the activations at {target} have"
                f" d = {source.d_ins[target]}"
            )
    return targets


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).splitlines()[0]
        raise SaelabError(f"device '{name}' is not usable here ({reason}); try --device cpu") from None
    return device


def _read(source: ActivationSource, streams: list[str], batch_size: int, step: int) -> dict[str, Tensor]:
    """The next batch of every hook the SAEs read: {hook: [batch_size, d_in]}, checked."""
    served = source.next_batches(batch_size)
    batches = {hook: served[hook] for hook in dict.fromkeys(streams)}
    for hook, x in batches.items():
        d_in = source.d_ins[hook]
        if x.ndim != 2 or x.shape != (batch_size, d_in):
            shape = tuple(x.shape)
            raise SaelabError(
                f"the source gave a batch of shape {shape} at step {step}; expected [{batch_size}, {d_in}]"
            )
        if not torch.isfinite(x).all():
            at = f" at {hook}" if len(source.hooks) > 1 else ""
            raise SaelabError(f"the activations{at} at step {step} contain NaN or inf; check the source's data")
        if not x.is_floating_point():
            batches[hook] = x.float()
    return batches


def _scaled(batches: dict[str, Tensor], scales: dict[str, float], device: torch.device) -> dict[str, Tensor]:
    return {hook: x.to(device) * scales[hook] for hook, x in batches.items()}


def _draw(source: ActivationSource, streams: list[str], tokens: int, batch_size: int) -> dict[str, Tensor]:
    """`tokens` rows of every stream, read in batches of the training batch size, gathered over all ranks."""
    reads = [_read(source, streams, batch_size, -1) for _ in range(math.ceil(tokens / batch_size))]
    return {hook: distributed.gather_rows(torch.cat([r[hook] for r in reads])[:tokens]) for hook in reads[0]}


def _fresh_state(
    source: ActivationSource,
    sae_configs: list[SAEConfig],
    cfg: SAETrainConfig,
    device: torch.device,
    streams: list[str],
    targets: list[str | None] | None = None,
) -> TrainState:
    # Every SAE starts from a generator seeded alike, so SAEs of one shape in a sweep start from the same weights
    # (and each equals the SAE a run of its own would train).
    saes = [build_sae(sae_cfg, torch.Generator().manual_seed(cfg.seed)).to(device) for sae_cfg in sae_configs]
    generator = torch.Generator().manual_seed(cfg.seed)
    world_size = distributed.world()[1]
    targets = targets or [None] * len(streams)
    read = streams + [t for t in targets if t is not None]
    samples = _draw(source, read, cfg.init_tokens // world_size, cfg.batch_size // world_size)
    scales, b_decs = {}, {}
    for hook, sample in samples.items():
        sample = sample.double().cpu()
        scales[hook] = 1.0
        if cfg.normalize_activations:
            mean_norm = float(sample.norm(dim=1).mean())
            if mean_norm == 0:
                at = f" at {hook}" if len(source.hooks) > 1 else ""
                raise SaelabError(f"every activation{at} in the first batches is zero; there is no signal to learn")
            scales[hook] = math.sqrt(sample.shape[1]) / mean_norm
        b_decs[hook] = initial_b_dec(sample * scales[hook], cfg.b_dec_init)
    optimizers = []
    for sae, stream, target in zip(saes, streams, targets, strict=True):
        with torch.no_grad():  # b_dec lives where the output does: a transcoder's at its target hook
            sae.b_dec.copy_(b_decs[target or stream])
        optimizers.append(_adam(sae, cfg))
    since_fired = [torch.zeros(c.d_sae, dtype=torch.long, device=device) for c in sae_configs]
    return TrainState(saes, optimizers, since_fired, scales, generator)


def _adam(sae: SAE, cfg: SAETrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(sae.parameters(), lr=cfg.base_lr(sae), betas=cfg.adam_betas)


def initial_b_dec(sample: Tensor, method: str) -> Tensor:
    """The decoder bias to start from: the geometric median, mean or zero of `sample [tokens, d_in]`."""
    if method == "zeros":
        return torch.zeros(sample.shape[1], dtype=sample.dtype)
    if method == "mean":
        return sample.mean(dim=0)
    return geometric_median(sample)


def geometric_median(points: Tensor, iterations: int = 100, tol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to `points [n, d]` (Weiszfeld's algorithm, float64)."""
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = float((new - median).norm())
        median = new
        if shift <= tol * max(float(median.norm()), 1.0):
            break
    return median


@torch.no_grad()
def resample_dead_latents(
    sae: SAE, optimizer: torch.optim.Optimizer, dead: Tensor, inputs: Tensor, generator: torch.Generator
) -> int:
    """Anthropic's resampling: point each dead latent at an input the SAE reconstructs badly; return how many.

    Inputs are drawn with probability ∝ (squared reconstruction error)²; a dead latent's decoder row becomes the
    input's (centred) direction, its encoder column that direction at 0.2 × the mean live encoder norm, its biases
    zero, and the Adam state of everything changed is reset (Bricken et al. 2023, "Towards Monosemanticity").
    """
    dead_ids = dead.nonzero().squeeze(1)
    if dead_ids.numel() == 0:
        return 0
    x_hat = sae.decode(sae.encode(inputs))
    weights = (inputs - x_hat).pow(2).sum(dim=1).double().pow(2).cpu()
    if not weights.sum() > 0:
        weights = torch.ones_like(weights)
    n = dead_ids.numel()
    chosen = torch.multinomial(weights, n, replacement=n > weights.numel(), generator=generator)
    centred = inputs[chosen.to(inputs.device)] - (sae.b_dec if sae.cfg.apply_b_dec_to_input else 0)
    directions = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    encoder_norm = float(sae.W_enc[:, alive].norm(dim=0).mean()) if alive.any() else 1.0
    decoder_norm = 1.0 if sae.unit_norm_decoder or not alive.any() else float(sae.W_dec[alive].norm(dim=1).mean())
    sae.W_dec[dead_ids] = directions.to(sae.W_dec.dtype) * decoder_norm
    sae.W_enc[:, dead_ids] = directions.T.to(sae.W_enc.dtype) * (0.2 * encoder_norm)
    for name, param in sae.named_parameters():
        if name not in ("W_enc", "W_dec", "b_dec"):
            param[dead_ids] = sae.cfg.jumprelu_init_threshold if name == "threshold" else 0.0
    for name, param in sae.named_parameters():
        for moment in optimizer.state.get(param, {}).values():
            if isinstance(moment, Tensor) and moment.shape == param.shape:
                if name == "W_enc":
                    moment[:, dead_ids] = 0
                elif name != "b_dec":
                    moment[dead_ids] = 0
    return n


def _step_record(
    step: int,
    name: str,
    lr: float,
    sparsity_scale: float,
    x: Tensor,
    output: SAEOutput,
    since_fired: Tensor,
    cfg: SAETrainConfig,
) -> dict[str, Any]:
    """One log line. Across ranks the losses and L0 are averaged and the explained variance pooled over all rows."""
    x, x_hat = x.double(), output.x_hat.detach().double()
    terms = (output.loss, output.mse, output.sparsity, output.aux, output.fired.sum() / x.shape[0])
    # Means over this rank's rows; every rank has as many rows, so their average is the mean over the batch.
    means = torch.stack([*(t.detach().double().reshape(()) for t in terms), (x - x_hat).pow(2).sum(1).mean()])
    means = torch.cat([means, x.pow(2).sum(1).mean()[None], x.mean(dim=0)])
    distributed.average_([means])
    loss, mse, sparsity, aux, l0, squared_error, squared_norm = means[:7].tolist()
    total_variance = squared_norm - float(means[7:].pow(2).sum())
    record = {
        "step": step,
        "sae": name,
        "loss": loss,
        "mse": mse,
        "sparsity": sparsity,
        "aux": aux,
        "l0": l0,
        "explained_variance": explained_variance_from_sums(squared_error, total_variance),
        "dead_fraction": float((since_fired >= cfg.dead_after_tokens).double().mean()),
        "lr": lr,
        "sparsity_scale": sparsity_scale,
    }
    if not math.isfinite(record["loss"]):
        raise DivergedError(
            f"training diverged at step {step} (SAE {name}: loss {record['loss']}); nothing was saved."
            " Lower --lr or the sparsity coefficient and run again"
        )
    return record


# --- checkpoints -----------------------------------------------------------------------------------------------


def _run_identity(
    sae_configs: list[SAEConfig],
    cfg: SAETrainConfig,
    streams: list[str],
    source: ActivationSource,
    options: dict[str, Any] | None = None,
    targets: list[str | None] | None = None,
) -> dict[str, Any]:
    """Everything that must match for a resumed run to continue the same run (JSON-plain values).

    The user's own option names come first, so a mismatch is reported as the option they changed.
    """
    train = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE_FIELDS}
    train["hooks"] = streams
    targets = targets or [None] * len(streams)
    if any(targets):
        train["hooks_out"] = targets
    train["world_size"] = distributed.world()[1]
    data = {stream: source.metadata_for(stream) for stream in streams + [t for t in targets if t is not None]}
    identity = {
        "options": options or {},
        "data": data,
        "sae_configs": [config_to_dict(c) for c in sae_configs],
        "train_config": train,
    }
    return json.loads(json.dumps(identity, default=str))


def save_checkpoint(
    out: Path,
    state: TrainState,
    source: ActivationSource,
    sae_configs: list[SAEConfig],
    cfg: SAETrainConfig,
    streams: list[str],
    options: dict[str, Any] | None = None,
    targets: list[str | None] | None = None,
) -> None:
    """Write the whole run state to `out/checkpoint.pt` atomically (rank 0; every rank must call it)."""
    sources = distributed.gather_objects(source.state_dict())  # each rank's own position in its stream
    if not distributed.is_main():
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": state.step,
        **_run_identity(sae_configs, cfg, streams, source, options, targets),
        "saes": [sae.state_dict() for sae in state.saes],
        "optimizers": [optimizer.state_dict() for optimizer in state.optimizers],
        "since_fired": state.since_fired,
        "scales": state.scales,
        "generator": state.generator.get_state(),
        "sources": sources,
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(out / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(
    out: Path,
    source: ActivationSource,
    sae_configs: list[SAEConfig],
    cfg: SAETrainConfig,
    device: torch.device,
    streams: list[str],
    options: dict[str, Any] | None = None,
    targets: list[str | None] | None = None,
) -> TrainState:
    """The run state saved in `out`, checked against the settings of the run that resumes it."""
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise SaelabError(f"no checkpoint in {out} to resume from; run without --resume to start afresh")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        kind = type(err).__name__
        raise SaelabError(f"{path} is not a readable checkpoint ({kind}); delete it to start afresh") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise SaelabError(f"{path} is not a saelab SAE checkpoint")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise SaelabError(f"{path} was written by another saelab version; delete it to start afresh")
    identity = _run_identity(sae_configs, cfg, streams, source, options, targets)
    for key, expected in identity.items():
        saved = checkpoint.get(key)
        if saved != expected:
            differing = _first_difference(saved, expected, "" if key == "options" else key)
            raise SaelabError(
                f"the checkpoint in {out} was written with other settings ({differing});"
                " rerun the same command with --resume"
            )
    generator = torch.Generator()
    generator.set_state(checkpoint["generator"])
    saes, optimizers = [], []
    for i, sae_cfg in enumerate(sae_configs):
        sae = build_sae(sae_cfg).to(device)
        sae.load_state_dict(checkpoint["saes"][i])
        optimizer = _adam(sae, cfg)
        optimizer.load_state_dict(checkpoint["optimizers"][i])
        saes.append(sae)
        optimizers.append(optimizer)
    source.load_state_dict(checkpoint["sources"][distributed.world()[0]])
    since_fired = [t.to(device) for t in checkpoint["since_fired"]]
    scales = {hook: float(scale) for hook, scale in checkpoint["scales"].items()}
    return TrainState(saes, optimizers, since_fired, scales, generator, int(checkpoint["step"]))


def _first_difference(saved: Any, expected: Any, path: str = "") -> str:
    if isinstance(saved, dict) and isinstance(expected, dict):
        for key in sorted(set(saved) | set(expected)):
            if saved.get(key) != expected.get(key):
                return _first_difference(saved.get(key), expected.get(key), f"{path}.{key}" if path else key)
    if isinstance(saved, list) and isinstance(expected, list) and len(saved) == len(expected):
        for i, (a, b) in enumerate(zip(saved, expected, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{path}[{i}]")
    return f"{path or 'settings'}: checkpoint {saved!r}, now {expected!r}"


def _open_log(out: Path, step: int) -> io.TextIOWrapper:
    """The JSONL log, cut back to the records before `step` (those after it are about to be redone)."""
    path = out / LOG_FILE
    kept = []
    if step > 0 and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut short by the kill: everything after it is redone
    path.write_text("".join(kept))
    return path.open("a")


def read_log(out: str | Path) -> list[dict[str, Any]]:
    """The records of a run's JSONL log."""
    path = Path(out) / LOG_FILE
    if not path.is_file():
        raise SaelabError(f"{path} not found; is {out} a training run's folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
