"""Dashboards on zoo models (`--model zoo:NAME`): the loss is the task's, not next-token prediction.

A zoo model's output at position p is scored against the task's label at p, and only at the positions the task's
generator marks as scored. So here:

- the loss at p is CE(logits[p], labels[p]) where p is scored (there is no loss elsewhere);
- the same-position ΔCE of a firing at p is the change of that loss (NaN where p is not scored);
- the total ΔCE of a firing at p is the change of the loss summed over every scored position q ≥ p, when the
  latent's contribution is removed at p only: a firing at an unscored position counts through later positions.

`TaskDownstream` computes these by the plain definition, one whole forward pass per (latent, position) batched
per sequence (the models and contexts are tiny). Its direct path is the language model's with the task's label for
the next token: the contribution removed from the final residual at p only, through the model's own final norm and
unembedding, scored against labels[p] (NaN where p is not scored); the same pass gives the exact change of the
normed final residual, whose mean times W_U is a latent's effect on the task's output logits. It is a
`LossEffectEngine`, so the dashboard's one pipeline (`saelab.dashboard.compute`) runs unchanged on top of it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.dashboard.effects import _BLOCK_HOOK, Clean, CleanRun, Downstream, later_loss_mask
from saelab.errors import SaelabError
from saelab.models.zoo.tasks import IGNORE

DASHBOARD_SEED = 1_000_003  # fresh task samples for dashboards, distinct from training and the evals


def task_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """CE [...] of logits [..., n_outputs] against labels [...]; 0 where the label is IGNORE (not scored)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1).to(flat.device), reduction="none").view(labels.shape)


def with_targets(run: CleanRun, labels: Tensor | None) -> CleanRun:
    """The clean run with the task labels [S, T] of its sequences attached (LM runs: unchanged)."""
    return run if labels is None else replace(run, targets=labels.to(run.tokens.device))


class TaskDownstream:
    """Exact and direct-path loss effects on a zoo model: whole forward passes with the contribution removed at one
    position, and the final-residual-only removal for the direct path."""

    start = 0
    start_name = None
    hook_is_start = False

    def __init__(self, lm, hook: str, per_pass: int = 256) -> None:
        if lm.task is None:
            raise SaelabError(f"{lm.name} is not a zoo model; task loss effects need a task's labels")
        self.lm = lm
        self.hook = lm.check_hook(hook)
        self.per_pass = per_pass
        # The residual-stream write of a hook inside a block and the final norm are the language model's engine's
        # (a zoo model is a HookedTransformer); other hooks (embeddings) have no direct path, as on LM pages.
        self.residual = Downstream(lm, self.hook) if _BLOCK_HOOK.match(self.hook) else None
        self.final_name = f"blocks.{lm.model.cfg.n_layers - 1}.hook_resid_post"

    @torch.no_grad()
    def clean(self, tokens: Tensor, resid_start: Tensor | None = None) -> CleanRun:
        tokens = tokens.to(self.lm.device)
        found = self.lm.activations(tokens, [self.hook, self.final_name])
        return CleanRun(tokens=tokens, x_hook=found[self.hook].flatten(2), final_resid=found[self.final_name])

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

    def loss_effects(self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor) -> tuple[Tensor, Clean]:
        _, same, clean = self.total_effects(run, seq, pos, delta, self._labels(run) != IGNORE)
        return same, clean

    def total_effects(
        self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor, eligible: Tensor
    ) -> tuple[Tensor, Tensor, Clean]:
        """Total ΔCE [n] over the scored positions from pos[i] on (`eligible` [S, T]: the scored positions), the
        same-position ΔCE [n] (NaN where pos[i] is not scored), and the clean final residual and task CE at pos[i]
        (0 where not scored), which the direct path starts from."""
        total = torch.empty(len(seq), dtype=torch.float64)
        same = torch.full((len(seq),), float("nan"))
        clean_ce = torch.empty(len(seq))
        scored = self._labels(run) != IGNORE
        for rows, clean, ablated in self._ablated(run, seq, pos, delta):
            p = pos[rows].to(ablated.device)
            change = ablated.double() - clean.double()
            mask = later_loss_mask(eligible[seq[rows]].to(p.device), p)
            total[rows] = (change * mask).sum(1).cpu()
            here = torch.arange(len(rows), device=p.device), p
            same[rows] = torch.where(scored[seq[rows].to(p.device), p], change[here], float("nan")).float().cpu()
            clean_ce[rows] = clean[p].float().cpu()
        final = run.final_resid[seq.to(run.final_resid.device), pos.to(run.final_resid.device)]
        return total, same, Clean(final.float().cpu(), clean_ce)

    def to_residual(self, delta: Tensor) -> Tensor | None:
        return None if self.residual is None else self.residual.to_residual(delta)

    @torch.no_grad()
    def direct_effects(self, clean: Clean, targets: Tensor, delta_res: Tensor) -> tuple[Tensor, Tensor]:
        """Direct-path ΔCE [n] of the task loss (NaN where targets [n], the labels at the re-run positions, are
        IGNORE) and the exact change to the normed final residual [n, d_model] of removing delta_res [n, d_model]
        from the clean final residuals. The clean loss comes from the same unembedding as the ablated one."""
        model = self.lm.model
        x = clean.final.to(self.lm.device)
        ablated = x - delta_res.to(x.device, x.dtype)
        normed_clean, normed_ablated = self.residual.final_norm(x), self.residual.final_norm(ablated)
        targets = targets.to(x.device)
        dce = task_ce(model.unembed(normed_ablated), targets) - task_ce(model.unembed(normed_clean), targets)
        dce = torch.where(targets != IGNORE, dce, float("nan"))
        return dce.cpu(), (normed_clean - normed_ablated).float().cpu()


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
