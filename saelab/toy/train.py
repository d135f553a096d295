"""The toy-model training loop: Adam over all instances at once, seeded, with a progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from saelab.errors import DivergedError
from saelab.toy.fast import loss_and_grads, sample_nonempty
from saelab.toy.model import ToyModel, ToyTrainConfig


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier on the base learning rate at `step` of `total`."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - step / total
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_toy_model(
    model: ToyModel,
    cfg: ToyTrainConfig | None = None,
    progress: bool = True,
    after_step: Callable[[int, ToyModel], None] | None = None,
) -> list[dict[str, float]]:
    """Train every instance of `model` in place; return the logged history (step, lr, mean loss per instance).

    Reproducible: parameters are re-initialised from `cfg.seed` and batches come from a generator seeded with
    it, so the same config gives the same weights. Both methods minimise the same expected loss; `fast`
    estimates it from non-empty rows with hand-written gradients and fused Adam, `reference` from plain
    batches with autograd. `after_step(steps_done, model)` runs after every optimiser step (snapshots).
    """
    cfg = cfg or ToyTrainConfig()
    cfg.validate()
    device = model.W.device
    init_generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    model.cpu().reset_parameters(init_generator)
    if cfg.init_scale != 1.0:
        with torch.no_grad():
            model.W.mul_(cfg.init_scale)
    model.to(device)
    data_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    fast = cfg.method == "fast"
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True if fast else None)
    history: list[dict[str, float]] = []
    what = f"toy models ({model.cfg.n_instances} × {model.cfg.n_features} features in {model.cfg.d_hidden} dims)"
    bar = tqdm(range(cfg.steps), disable=not progress, desc=what, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step, cfg.steps)
        if fast:
            loss_per_instance, grads = loss_and_grads(model, *sample_nonempty(model, cfg.batch_size, data_generator))
            for name, param in model.named_parameters():
                param.grad = grads[name]
        else:
            loss_per_instance = model.loss_per_instance(model.generate_batch(cfg.batch_size, data_generator))
            optimizer.zero_grad(set_to_none=True)
            loss_per_instance.sum().backward()
        optimizer.step()
        if after_step is not None:
            after_step(step + 1, model)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            mean_loss = loss_per_instance.detach().mean().item()
            if not math.isfinite(mean_loss):
                bar.close()
                raise DivergedError(
                    f"toy training diverged at step {step} (loss {mean_loss}); nothing was written. Lower --lr"
                    " (and check --importance) and run again"
                )
            history.append({"step": step, "lr": optimizer.param_groups[0]["lr"], "loss": mean_loss})
            bar.set_postfix(loss=f"{mean_loss:.4g}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise DivergedError("toy training diverged (the weights are not finite); nothing was written. Lower --lr")
    return history
