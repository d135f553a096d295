"""Dashboards on zoo models (`--model zoo:NAME`): the loss is the task's, not next-token prediction.

A zoo model's output at position p is scored against the task's label at p, and only at the positions the task's
generator marks as scored. So here:

- the loss at p is CE(logits[p], labels[p]) where p is scored (there is no loss elsewhere);
- the same-position ΔCE of a firing at p is the change of that loss (NaN where p is not scored);
- the total ΔCE of a firing at p is the change of the loss summed over every scored position q ≥ p, when the
  latent's contribution is removed at p only: a firing at an unscored position counts through later positions.

`TaskDownstream` computes these by the plain definition, one whole forward pass per (latent, position) batched
per sequence (the models and contexts are tiny); it has no direct path. It is a `LossEffectEngine`, so the
dashboard's one pipeline (`saelab.dashboard.compute`) runs unchanged on top of it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.dashboard.effects import CleanRun, later_loss_mask
from saelab.errors import SaelabError

DASHBOARD_SEED = 1_000_003  # fresh task samples for dashboards, distinct from training and the evals


def task_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """CE [...] of logits [..., n_outputs] against labels [...]; 0 where the label is IGNORE (not scored)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1).to(flat.device), reduction="none").view(labels.shape)


def with_targets(run: CleanRun, labels: Tensor | None) -> CleanRun:
    """The clean run with the task labels [S, T] of its sequences attached (LM runs: unchanged)."""
    return run if labels is None else replace(run, targets=labels.to(run.tokens.device))


class TaskDownstream:
    """Exact loss effects on a zoo model: whole forward passes with the contribution removed at one position."""

    start = 0
    start_name = None
    hook_is_start = False

    def __init__(self, lm, hook: str, per_pass: int = 256) -> None:
        if lm.task is None:
            raise SaelabError(f"{lm.name} is not a zoo model; task loss effects need a task's labels")
        self.lm = lm
        self.hook = lm.check_hook(hook)
        self.per_pass = per_pass

    @torch.no_grad()
    def clean(self, tokens: Tensor, resid_start: Tensor | None = None) -> CleanRun:
        tokens = tokens.to(self.lm.device)
        return CleanRun(tokens=tokens, x_hook=self.lm.activations(tokens, [self.hook])[self.hook].flatten(2))

    def _labels(self, run: CleanRun) -> Tensor:
        if run.targets is None:
            raise SaelabError("a zoo model's loss needs the task labels of the sequences (CleanRun.targets)")
        return run.targets

    @torch.no_grad()
    def clean_ce(self, run: CleanRun, seq: Tensor, pos: Tensor) -> Tensor:
        ce = task_ce(self.lm.logits(run.tokens), self._labels(run))
        return ce[seq.to(ce.device), pos.to(ce.device)].cpu()

    @torch.no_grad()
    def _ablated(self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor):
        """(rows, clean CE [T] of their sequence, ablated CE [rows, T]) per batch of pairs of one sequence."""
        labels = self._labels(run)
        for s in seq.unique().tolist():
            rows = (seq == s).nonzero().squeeze(1)
            tokens = run.tokens[s : s + 1]
            clean = task_ce(self.lm.logits(tokens), labels[s : s + 1])[0]
            for chunk in rows.split(self.per_pass):
                p = pos[chunk].to(self.lm.device)
                d = delta[chunk].to(self.lm.device)

                def remove(x: Tensor, p: Tensor = p, d: Tensor = d) -> Tensor:
                    x = x.clone()
                    x[torch.arange(len(p), device=x.device), p] -= d.to(x.dtype).view(len(p), *x.shape[2:])
                    return x

                logits = self.lm.logits(tokens.expand(len(chunk), -1), {self.hook: remove})
                yield chunk, clean, task_ce(logits, labels[s : s + 1].expand(len(chunk), -1))

    def loss_effects(self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor) -> tuple[Tensor, None]:
        return self.total_effects(run, seq, pos, delta, self._labels(run) != -100)[1], None

    def total_effects(
        self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor, eligible: Tensor
    ) -> tuple[Tensor, Tensor, None]:
        """Total ΔCE [n] over the scored positions from pos[i] on (`eligible` [S, T]: the scored positions), and
        the same-position ΔCE [n] (NaN where pos[i] is not scored)."""
        total = torch.empty(len(seq), dtype=torch.float64)
        same = torch.full((len(seq),), float("nan"))
        scored = self._labels(run) != -100
        for rows, clean, ablated in self._ablated(run, seq, pos, delta):
            p = pos[rows].to(ablated.device)
            change = ablated.double() - clean.double()
            mask = later_loss_mask(eligible[seq[rows]].to(p.device), p)
            total[rows] = (change * mask).sum(1).cpu()
            here = torch.arange(len(rows), device=p.device), p
            same[rows] = torch.where(scored[seq[rows].to(p.device), p], change[here], float("nan")).float().cpu()
        return total, same, None

    def to_residual(self, delta: Tensor) -> Tensor | None:
        return None  # no direct path: direct_effects is never called

    def direct_effects(self, clean, targets: Tensor, delta_res: Tensor) -> tuple[Tensor, Tensor]:
        raise SaelabError("zoo dashboards have no direct path")


@torch.no_grad()
def zoo_variable_latents(lm, sae, hook: str, data) -> list[dict]:
    """The latent whose activation correlates best with the task's probe variable, per value of it, on the task
    samples `data` (a TaskBatch): the same matcher `saelab sae eval` reports as `variable_latents`."""
    from saelab.models.evals import LatentMatcher, variable_targets

    task = lm.task
    x = lm.activations(data.tokens.to(lm.device), [hook])[hook].flatten(2).flatten(0, 1)
    param = sae.W_dec
    latents = sae.encode(x.to(param.device, param.dtype)).float().cpu()
    matcher = LatentMatcher(sae.cfg.d_sae, variable_targets(task, data.variable[:1, :1])[1])
    defined = data.variable_mask.flatten()
    targets, _ = variable_targets(task, data.variable.flatten()[defined])
    matcher.update(latents[defined], targets)
    return [{**row, "correlation": round(row["correlation"], 4)} for row in matcher.best()]
