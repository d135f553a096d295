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
normalisation scale, the trainer's RNG and the source's position — and is written atomically, so a run killed
at any moment and resumed gives bit-identical weights to one that was never interrupted.
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

from saelab.config import config_to_dict, require_positive_ints
from saelab.errors import SaelabError
from saelab.io import atomic_write_bytes
from saelab.sae.io import CFG_FILE, save_sae
from saelab.sae.metrics import explained_variance
from saelab.sae.model import SAE, SAEConfig, SAEOutput, build_sae
from saelab.sae.sources import ActivationSource, as_source

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_FORMAT = "saelab.sae_checkpoint"
B_DEC_INITS = ("geometric_median", "mean", "zeros")
# Settings that do not change the trained weights, so a resumed run may use different values.
RESUME_FREE_FIELDS = ("checkpoint_every", "log_every")


@dataclass
class SAETrainConfig:
    """Optimisation settings shared by every SAE of a run. Fractions (`lr_warmup`, …) are of `steps`."""

    steps: int = 5000
    batch_size: int = 4096
    lr: float = 4e-4
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
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
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

    def lr_at(self, step: int) -> float:
        warmup, decay = round(self.lr_warmup * self.steps), round(self.lr_decay * self.steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if step >= self.steps - decay:
            return self.lr * (self.steps - step) / decay
        return self.lr

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
    scale: float  # input normalisation factor (1 when off), folded into the weights at save
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
) -> SAEOutput:
    """One optimisation step of `sae` on `x [batch, d_in]` (`fast=False`: on the plain reference path)."""
    optimizer.zero_grad(set_to_none=True)
    out = sae(x, dead=dead, sparsity_scale=sparsity_scale, fast=fast)
    out.loss.backward()
    sae.project_gradients()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    sae.project_parameters()
    return out


def train_saes(
    source: ActivationSource | Tensor | Any,
    sae_configs: SAEConfig | list[SAEConfig],
    cfg: SAETrainConfig | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[SAE]:
    """Train one SAE per config on the same batches of `source`; return them folded to raw activations.

    With `out`, the run writes a JSONL log, checkpoints, and finally the SAE(s): directly into `out` for one SAE,
    into `out/<name>` for several. `resume` continues from `out`'s checkpoint.
    """
    source = as_source(source)
    cfg = cfg or SAETrainConfig()
    cfg.validate()
    sae_configs = [sae_configs] if isinstance(sae_configs, SAEConfig) else list(sae_configs)
    _check_configs(sae_configs, source.d_in)
    out = Path(out) if out is not None else None
    if resume and out is None:
        raise SaelabError("resuming needs the run's output folder (--out)")
    device = _device(cfg.device)

    if resume:
        state = load_checkpoint(out, source, sae_configs, cfg, device)
    else:
        if out is not None:
            _clear_run_files(out, [c.name for c in sae_configs])
        state = _fresh_state(source, sae_configs, cfg, device)
    log = _open_log(out, state.step) if out is not None else None

    names = [c.name for c in sae_configs]
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, desc="sae", dynamic_ncols=True)
    try:
        for step in range(state.step, cfg.steps):
            lr, sparsity_scale = cfg.lr_at(step), cfg.sparsity_scale_at(step)
            x = _next_batch(source, cfg.batch_size, step).to(device) * state.scale
            resample_inputs = None
            if cfg.resamples_at(step):
                resample_inputs = _draw(source, cfg.resample_tokens, cfg.batch_size).to(device) * state.scale
            for i, sae in enumerate(state.saes):
                for group in state.optimizers[i].param_groups:
                    group["lr"] = lr
                dead = state.since_fired[i] >= cfg.dead_after_tokens
                output = train_step(sae, state.optimizers[i], x, dead, sparsity_scale, cfg.grad_clip)
                state.since_fired[i] += x.shape[0]
                state.since_fired[i][output.fired > 0] = 0
                if resample_inputs is not None:
                    dead = state.since_fired[i] >= cfg.dead_after_tokens
                    resample_dead_latents(sae, state.optimizers[i], dead, resample_inputs, state.generator)
                    state.since_fired[i][dead] = 0  # a resampled latent gets a fresh window to fire in
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    record = _step_record(step, names[i], lr, sparsity_scale, x, output, state.since_fired[i], cfg)
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
                save_checkpoint(out, state, source, sae_configs, cfg)
    finally:
        bar.close()
        if log is not None:
            log.close()

    for sae, sae_cfg in zip(state.saes, sae_configs, strict=True):
        sae.fold_input_scale(state.scale)
        sae.eval()
        sae.metadata = dict(source.metadata)
        if out is not None:
            extra = {"train": config_to_dict(cfg), "normalization_scale": state.scale, "trained_steps": state.step}
            save_sae(sae, out if len(state.saes) == 1 else out / sae_cfg.name, extra)
    if out is not None:
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return state.saes


def _check_configs(sae_configs: list[SAEConfig], d_in: int) -> None:
    if not sae_configs:
        raise SaelabError("no SAE to train; give at least one SAE config")
    for sae_cfg in sae_configs:
        sae_cfg.validate()
        if sae_cfg.d_in != d_in:
            raise SaelabError(f"SAE {sae_cfg.name} has d_in = {sae_cfg.d_in}, but the activations have d_in = {d_in}")
    names = [c.name for c in sae_configs]
    if len(set(names)) != len(names):
        raise SaelabError(f"two SAEs of the sweep share a name ({', '.join(names)}); give each different settings")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).splitlines()[0]
        raise SaelabError(f"device '{name}' is not usable here ({reason}); try --device cpu") from None
    return device


def _next_batch(source: ActivationSource, batch_size: int, step: int) -> Tensor:
    x = source.next_batch(batch_size)
    if x.ndim != 2 or x.shape[1] != source.d_in:
        shape = tuple(x.shape)
        raise SaelabError(f"the source gave a batch of shape {shape} at step {step}; expected [batch, {source.d_in}]")
    if not torch.isfinite(x).all():
        raise SaelabError(f"the activations at step {step} contain NaN or inf; check the source's data")
    return x.float() if not x.is_floating_point() else x


def _draw(source: ActivationSource, tokens: int, batch_size: int) -> Tensor:
    """`tokens` rows from the source, read in batches of the training batch size."""
    batches = [_next_batch(source, batch_size, -1) for _ in range(math.ceil(tokens / batch_size))]
    return torch.cat(batches)[:tokens]


def _fresh_state(
    source: ActivationSource, sae_configs: list[SAEConfig], cfg: SAETrainConfig, device: torch.device
) -> TrainState:
    # Every SAE starts from a generator seeded alike, so SAEs of one shape in a sweep start from the same weights
    # (and each equals the SAE a run of its own would train).
    saes = [build_sae(sae_cfg, torch.Generator().manual_seed(cfg.seed)).to(device) for sae_cfg in sae_configs]
    generator = torch.Generator().manual_seed(cfg.seed)
    sample = _draw(source, cfg.init_tokens, cfg.batch_size).double()
    scale = 1.0
    if cfg.normalize_activations:
        mean_norm = float(sample.norm(dim=1).mean())
        if mean_norm == 0:
            raise SaelabError("every activation in the first batches is zero; the source has no signal to learn")
        scale = math.sqrt(source.d_in) / mean_norm
    b_dec = initial_b_dec(sample * scale, cfg.b_dec_init)
    optimizers = []
    for sae in saes:
        with torch.no_grad():
            sae.b_dec.copy_(b_dec)
        optimizers.append(_adam(sae, cfg))
    since_fired = [torch.zeros(c.d_sae, dtype=torch.long, device=device) for c in sae_configs]
    return TrainState(saes, optimizers, since_fired, scale, generator)


def _adam(sae: SAE, cfg: SAETrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)


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
    record = {
        "step": step,
        "sae": name,
        "loss": float(output.loss.detach()),
        "mse": float(output.mse.detach()),
        "sparsity": float(output.sparsity.detach()),
        "aux": float(output.aux.detach()),
        "l0": float(output.fired.sum()) / x.shape[0],
        "explained_variance": explained_variance(x, output.x_hat.detach()),
        "dead_fraction": float((since_fired >= cfg.dead_after_tokens).double().mean()),
        "lr": lr,
        "sparsity_scale": sparsity_scale,
    }
    if not math.isfinite(record["loss"]):
        raise SaelabError(
            f"training diverged at step {step} (SAE {name}: loss {record['loss']});"
            " lower --lr or the sparsity coefficient"
        )
    return record


# --- checkpoints -----------------------------------------------------------------------------------------------


def _run_identity(sae_configs: list[SAEConfig], cfg: SAETrainConfig) -> dict[str, Any]:
    train = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE_FIELDS}
    train["adam_betas"] = list(train["adam_betas"])
    return {"sae_configs": [config_to_dict(c) for c in sae_configs], "train_config": train}


def save_checkpoint(
    out: Path, state: TrainState, source: ActivationSource, sae_configs: list[SAEConfig], cfg: SAETrainConfig
) -> None:
    """Write the whole run state to `out/checkpoint.pt` atomically."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "step": state.step,
        **_run_identity(sae_configs, cfg),
        "saes": [sae.state_dict() for sae in state.saes],
        "optimizers": [optimizer.state_dict() for optimizer in state.optimizers],
        "since_fired": state.since_fired,
        "scale": state.scale,
        "generator": state.generator.get_state(),
        "source": source.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(out / CHECKPOINT_FILE, buffer.getvalue())


def load_checkpoint(
    out: Path, source: ActivationSource, sae_configs: list[SAEConfig], cfg: SAETrainConfig, device: torch.device
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
    identity = _run_identity(sae_configs, cfg)
    for key, expected in identity.items():
        saved = checkpoint[key]
        if saved != expected:
            differing = _first_difference(saved, expected, key)
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
    source.load_state_dict(checkpoint["source"])
    since_fired = [t.to(device) for t in checkpoint["since_fired"]]
    return TrainState(saes, optimizers, since_fired, float(checkpoint["scale"]), generator, int(checkpoint["step"]))


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


def _clear_run_files(out: Path, names: list[str]) -> None:
    """Start afresh in `out`: drop the log, and the cfg.json of any SAE an earlier run left where ours will go."""
    if out.exists() and not out.is_dir():
        raise SaelabError(f"{out} exists and is not a directory; choose another --out")
    if (out / CHECKPOINT_FILE).exists():
        raise SaelabError(f"{out} holds an unfinished run; pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FILE).unlink(missing_ok=True)
    for folder in [out] if len(names) == 1 else [out / name for name in names]:
        (folder / CFG_FILE).unlink(missing_ok=True)  # until this run saves, no stale SAE can be loaded from here


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
