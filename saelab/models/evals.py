"""Language-model evals of an SAE: how much of the model's next-token prediction survives splicing the SAE in.

On held-out contexts, at the SAE's hook, averaging over next-token predictions t → t+1 whose input and target
are both regular tokens (not BOS/padding; those positions also keep their clean activation in every run):

    CE_clean  = mean −log p_clean(x_{t+1})            the model as it is
    CE_sae    = mean −log p_sae(x_{t+1})              the activation replaced by x̂ = decode(encode(x))
    CE_abl    = mean −log p_abl(x_{t+1})              the activation replaced by zeros
    CE loss recovered = (CE_abl − CE_sae) / (CE_abl − CE_clean)      1: as good as the model, 0: as bad as ablation
    KL_sae    = mean KL(p_clean ‖ p_sae) = mean Σ_v p_clean(v) (log p_clean(v) − log p_sae(v)), KL_abl likewise
    KL score  = (KL_abl − KL_sae) / KL_abl

plus the SAE's reconstruction metrics (explained variance, MSE, L0, …, see `saelab.stats`) on the
activations of the same regular tokens.

A transcoder (metadata `hook_name_out`) replaces an MLP instead: in the spliced run the activation at its output
hook (`hook_mlp_out`) is the transcoder's output computed from its input hook in the same pass, the ablation
zeroes the MLP's output, and the reconstruction metrics are those of its prediction of the MLP's output (EV of the
MLP output, its L0 and dead latents).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.errors import SaelabError
from saelab.models.access import (
    BUILTIN,
    LanguageModel,
    Replace,
    load_model,
    sae_replacement,
    transcoder_replacement,
    zero_ablation,
)
from saelab.models.data import documents, spread_contexts
from saelab.sae_protocol import SAELike
from saelab.stats import ReconstructionStats

DEFAULT_EVAL_TOKENS = 2**15


@dataclass(frozen=True)
class LMEvalResult:
    """What `lm_eval` measures. Scores that are undefined (the ablation changes nothing) are None, not NaN."""

    ce_loss_clean: float
    ce_loss_with_sae: float
    ce_loss_with_ablation: float
    ce_loss_recovered: float | None
    kl_div_with_sae: float
    kl_div_with_ablation: float
    kl_div_score: float | None
    predictions: int  # next-token predictions averaged over
    explained_variance: float | None
    l0: float
    mse: float
    reconstruction: dict[str, Any]  # every reconstruction metric (`ReconstructionStats.compute`), JSON-ready
    task: dict[str, Any] | None = None  # a zoo model: task, accuracy clean / with SAE / ablated, variable_latents

    def to_dict(self) -> dict[str, Any]:
        """One flat JSON-ready dict: the task's metrics (a zoo model), the LM metrics, the reconstruction metrics."""
        skip = ("reconstruction", "task")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return {**(self.task or {}), **fields, **{k: v for k, v in self.reconstruction.items() if k not in fields}}


def _defined(value: float) -> float | None:
    return value if math.isfinite(value) else None


@torch.no_grad()
def lm_eval(
    sae: SAELike,
    sae_dir: str | Path | None = None,
    model: str | LanguageModel | None = None,
    dataset: str | None = None,
    n_tokens: int = DEFAULT_EVAL_TOKENS,
    device: str = "cpu",
    model_batch_size: int = 8,
    context_length: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> LMEvalResult:
    """CE loss clean / with the SAE / zero-ablated, CE loss recovered, KL score and reconstruction metrics.

    The hook comes from the SAE's metadata (`hook_name`), and so do, unless given, the model (`model_name`; a
    relative local path is tried against `sae_dir` too), the context length and the dataset. The built-in corpus is
    read from its held-out files; a local dataset has no split, so pass held-out text as `dataset`. About
    `n_tokens` tokens are evaluated, in contexts spread at random (seeded by `seed`) over the whole split,
    `model_batch_size` contexts per forward pass; the SAE moves to the model's device.
    """
    metadata = sae.metadata
    hook = metadata.get("hook_name")
    if not hook:
        raise SaelabError("the SAE's metadata names no hook_name; LM evals need the model and hook it was trained on")
    hook_out = _output_hook(sae, metadata)
    if not isinstance(model, LanguageModel):
        model = load_model(_model_name(model or metadata.get("model_name"), sae_dir), device)
    sae = sae.to(model.device)
    for name, width in ((hook, sae.cfg.d_in), (hook_out, sae.cfg.d_out)):
        if name is not None and model.d_hook(model.check_hook(name)) != width:
            what = "reads d_in" if name == hook else "outputs d_out"
            raise SaelabError(f"the SAE {what} = {width} but {name} of {model.name} has {model.d_hook(name)}")
    if model.task is not None:
        return task_eval(sae, model, hook, n_tokens, model_batch_size * 64, hook_out)
    length = context_length or metadata.get("context_length") or metadata.get("context_size") or 128
    if model.n_ctx is not None:
        length = min(length, model.n_ctx)
    dataset = dataset if dataset is not None else metadata.get("dataset", BUILTIN)
    n_contexts = max(1, math.ceil(n_tokens / (length - 1)))
    # A seeded random spread of contexts over the whole held-out split (all of it when n_tokens covers it).
    contexts, _ = spread_contexts(documents(dataset, "heldout"), model.tokenizer, length, model.bos_token_id,
                                  n_contexts, seed)  # fmt: skip

    sums = {"clean": 0.0, "sae": 0.0, "abl": 0.0, "kl_sae": 0.0, "kl_abl": 0.0}
    predictions = 0
    stats = ReconstructionStats(sae.cfg.d_sae)

    batches = range(0, len(contexts), model_batch_size)
    for start in tqdm(batches, desc="LM evals", unit="batch", disable=not progress, dynamic_ncols=True):
        tokens = contexts[start : start + model_batch_size].to(model.device)
        regular = model.regular_positions(tokens)  # [batch, pos]
        counted = regular[:, :-1] & regular[:, 1:]  # [batch, pos − 1]: the predictions that count
        targets = tokens[:, 1:]
        captured, read = _capture(hook, hook_out)
        clean = _log_probs(model.logits(tokens, read))
        _update_stats(stats, sae, captured, hook, hook_out, regular)
        sums["clean"] += _nll(clean, targets)[counted].sum().item()
        for name, replace in _splices(sae, hook, hook_out, regular).items():
            spliced = _log_probs(model.logits(tokens, replace))
            sums[name] += _nll(spliced, targets)[counted].sum().item()
            sums[f"kl_{name}"] += (clean.exp() * (clean - spliced)).sum(-1)[counted].sum().item()
        predictions += int(counted.sum())
    if predictions == 0:
        raise SaelabError("the eval contexts hold no regular tokens to predict; pass a dataset with text")

    ce = {name: sums[name] / predictions for name in ("clean", "sae", "abl")}
    kl_sae, kl_abl = sums["kl_sae"] / predictions, sums["kl_abl"] / predictions
    return _result(ce, kl_sae, kl_abl, predictions, stats, "the eval contexts")


ZOO_EVAL_SEED = 2_000_003  # fresh task samples, distinct from training and from `saelab zoo eval`


def _output_hook(sae: SAELike, metadata: dict[str, Any]) -> str | None:
    """The hook a transcoder writes (its metadata's `hook_name_out`); None for an SAE."""
    if not sae.cfg.transcoder:
        return None
    hook_out = metadata.get("hook_name_out")
    if not hook_out:
        raise SaelabError("the transcoder's metadata names no hook_name_out; LM evals need the hook it replaces")
    return hook_out


def _capture(hook: str, hook_out: str | None) -> tuple[dict[str, Tensor], dict[str, Replace]]:
    """A dict the clean run fills with the activations at `hook` (and `hook_out`), and the hooks that fill it."""
    captured: dict[str, Tensor] = {}

    def reader(name: str) -> Replace:
        def read(x: Tensor) -> Tensor:
            captured[name] = x
            return x

        return read

    return captured, {name: reader(name) for name in (hook, hook_out) if name is not None}


def _update_stats(
    stats: ReconstructionStats, sae: SAELike, captured: dict[str, Tensor], hook: str, hook_out: str | None,
    positions: Tensor | None,
) -> Tensor:  # fmt: skip
    """Add the SAE's reconstruction (a transcoder: its prediction of `hook_out`) of the clean activations at
    `positions` [batch, pos] (all where None) to `stats`; return the latents [tokens, d_sae]."""
    dtype = next((p.dtype for p in sae.parameters()), captured[hook].dtype)

    def rows(x: Tensor) -> Tensor:
        return (x.flatten(0, 1) if positions is None else x[positions]).to(dtype)

    x = rows(captured[hook])
    latents = sae.encode(x)
    if hook_out is None:
        stats.update(x, sae.decode(latents), latents)
    else:
        stats.update(rows(captured[hook_out]), sae.output(x, latents), latents)
    return latents


def _splices(sae: SAELike, hook: str, hook_out: str | None, positions: Tensor | None) -> dict[str, dict[str, Replace]]:
    """The evals' two interventions as {run: hooks}: "sae" splices the SAE in at its hook (a transcoder: its output
    replaces the MLP's at `hook_out`), "abl" zero-ablates what it replaces."""
    if hook_out is None:
        return {"sae": {hook: sae_replacement(sae, positions)}, "abl": {hook: zero_ablation(positions)}}
    return {"sae": transcoder_replacement(sae, hook, hook_out, positions), "abl": {hook_out: zero_ablation(positions)}}


@torch.no_grad()
def task_eval(
    sae: SAELike, model: LanguageModel, hook: str, n_tokens: int, batch_size: int = 512, hook_out: str | None = None
) -> LMEvalResult:
    """The LM evals on a zoo model: its task's labels at the scored positions stand in for the next token.

    On fresh task samples (about `n_tokens` positions): CE clean / with the SAE / zero-ablated and CE loss
    recovered, mean KL(p_clean ‖ p_spliced) and the KL score, all over the scored positions; the task's accuracy
    on its judged positions in each of the three runs; the reconstruction metrics over every position (the SAE
    splices in at every position, as it was trained); and, for the task's intermediate variable, the latent whose
    activation correlates best with it where it is defined (`variable_latents`).
    """

    task = model.task
    n_sequences = max(1, math.ceil(n_tokens / task.n_ctx))
    data = task.sample(n_sequences, ZOO_EVAL_SEED, "heldout")
    sums = {"clean": 0.0, "sae": 0.0, "abl": 0.0, "kl_sae": 0.0, "kl_abl": 0.0}
    right = {"clean": 0, "sae": 0, "abl": 0}
    n_scored = n_judged = 0
    stats = ReconstructionStats(sae.cfg.d_sae)
    matcher = LatentMatcher(sae.cfg.d_sae, variable_targets(task, data.variable[:1, :1])[1])

    for start in range(0, n_sequences, batch_size):
        tokens = data.tokens[start : start + batch_size].to(model.device)
        labels = data.labels[start : start + batch_size].to(model.device)
        scored = data.scored[start : start + batch_size].to(model.device)
        judged = data.judged[start : start + batch_size].to(model.device)
        captured, read = _capture(hook, hook_out)
        clean = torch.log_softmax(model.logits(tokens, read), -1)
        latents = _update_stats(stats, sae, captured, hook, hook_out, None)
        defined = data.variable_mask[start : start + batch_size].flatten()
        targets, _ = variable_targets(task, data.variable[start : start + batch_size].flatten()[defined])
        matcher.update(latents.cpu()[defined], targets)
        runs = {"clean": clean}
        for name, replace in _splices(sae, hook, hook_out, None).items():
            runs[name] = torch.log_softmax(model.logits(tokens, replace), -1)
        safe_labels = labels.clamp_min(0)[..., None]
        for name, log_probs in runs.items():
            sums[name] += -log_probs.gather(-1, safe_labels)[..., 0][scored].sum().item()
            right[name] += int(((log_probs.argmax(-1) == labels) & judged).sum())
            if name != "clean":
                sums[f"kl_{name}"] += (clean.exp() * (clean - log_probs)).sum(-1)[scored].sum().item()
        n_scored += int(scored.sum())
        n_judged += int(judged.sum())
    ce = {name: sums[name] / n_scored for name in ("clean", "sae", "abl")}
    kl_sae, kl_abl = sums["kl_sae"] / n_scored, sums["kl_abl"] / n_scored
    task_result = {
        "task": task.name,
        "accuracy_clean": right["clean"] / n_judged,
        "accuracy_with_sae": right["sae"] / n_judged,
        "accuracy_with_ablation": right["abl"] / n_judged,
        "variable": task.probe.name,
        "variable_latents": matcher.best(),
    }
    return _result(ce, kl_sae, kl_abl, n_scored, stats, "the task samples", task_result)


def _result(
    ce: dict[str, float], kl_sae: float, kl_abl: float, predictions: int, stats, where: str,
    task: dict[str, Any] | None = None,
) -> LMEvalResult:  # fmt: skip
    """The one place CE loss recovered and the KL score are defined from the three runs' losses."""
    if not all(math.isfinite(v) for v in (*ce.values(), kl_sae, kl_abl)):
        raise SaelabError(f"the model's loss is not finite on {where}; check the model's and SAE's weights")
    reconstruction = stats.compute()
    return LMEvalResult(
        ce_loss_clean=ce["clean"],
        ce_loss_with_sae=ce["sae"],
        ce_loss_with_ablation=ce["abl"],
        ce_loss_recovered=(ce["abl"] - ce["sae"]) / (ce["abl"] - ce["clean"]) if ce["abl"] != ce["clean"] else None,
        kl_div_with_sae=kl_sae,
        kl_div_with_ablation=kl_abl,
        kl_div_score=(kl_abl - kl_sae) / kl_abl if kl_abl > 0 else None,
        predictions=predictions,
        explained_variance=_defined(reconstruction["explained_variance"]),
        l0=reconstruction["l0"],
        mse=reconstruction["mse"],
        reconstruction=reconstruction,
        task=task,
    )


def variable_targets(task, variable: Tensor) -> tuple[Tensor, list[str]]:
    """The task's probe variable as columns to correlate latents with: the value itself (a real variable), the
    indicator of the second class (two classes), or one indicator per class."""
    classes = task.probe.classes
    if not classes:
        return variable.double()[:, None], [task.probe.name]
    if len(classes) == 2:
        return (variable == 1).double()[:, None], [classes[1]]
    return torch.nn.functional.one_hot(variable.long(), len(classes)).double(), list(classes)


class LatentMatcher:
    """Streaming Pearson correlation of every latent with every target column; `best()` names the top latent."""

    def __init__(self, d_sae: int, names: list[str]) -> None:
        self.names = names
        self.n = 0
        k = len(names)
        self.sum_a, self.sum_aa = torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64)
        self.sum_y, self.sum_yy = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        self.sum_ay = torch.zeros(d_sae, k, dtype=torch.float64)

    def update(self, latents: Tensor, targets: Tensor) -> None:
        a = latents.double()
        self.n += len(a)
        self.sum_a += a.sum(0)
        self.sum_aa += (a * a).sum(0)
        self.sum_y += targets.sum(0)
        self.sum_yy += (targets * targets).sum(0)
        self.sum_ay += a.T @ targets

    def correlations(self) -> Tensor:
        """[d_sae, k]; 0 where a latent or a target never varies."""
        n = self.n
        cov = self.sum_ay - self.sum_a[:, None] * self.sum_y[None, :] / n
        var_a = (self.sum_aa - self.sum_a**2 / n).clamp_min(0)
        var_y = (self.sum_yy - self.sum_y**2 / n).clamp_min(0)
        denominator = (var_a[:, None] * var_y[None, :]).sqrt()
        return torch.where(denominator > 0, cov / denominator.clamp_min(1e-300), 0.0)

    def best(self) -> list[dict]:
        corr = self.correlations()
        latent = corr.argmax(0)
        return [
            {"value": name, "latent": int(latent[j]), "correlation": float(corr[latent[j], j])}
            for j, name in enumerate(self.names)
        ]


def _model_name(name: str | None, sae_dir: str | Path | None) -> str | None:
    """A relative local model path recorded in an SAE folder may be relative to that folder."""
    if name and sae_dir is not None and not Path(name).is_absolute() and not Path(name).exists():
        candidate = Path(sae_dir) / name
        if candidate.exists():
            return str(candidate)
    return name


def _log_probs(logits: Tensor) -> Tensor:
    """[batch, pos, d_vocab] logits → [batch, pos − 1, d_vocab] log-probabilities of the next token."""
    return torch.log_softmax(logits[:, :-1], dim=-1)


def _nll(log_probs: Tensor, targets: Tensor) -> Tensor:
    """[batch, pos − 1]: −log p(target)."""
    return -log_probs.gather(-1, targets[..., None].to(log_probs.device)).squeeze(-1)
