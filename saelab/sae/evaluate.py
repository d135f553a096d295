"""Evaluating an SAE: reconstruction and density metrics over fresh activations, plus ground-truth recovery.

`evaluate_sae` runs an SAE over a source and adds MMCS/MCC against the source's true features when it has them.
`evaluate_saved` does the same for a saved folder, rebuilding the source its cfg.json records; an SAE trained on a
language model is handed to `saelab.models.evals.lm_eval`, which also measures the model with the SAE spliced in.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from saelab.activations import KnownFeatures
from saelab.errors import SaelabError
from saelab.sae.io import load_sae
from saelab.sae.metrics import ground_truth_metrics
from saelab.sae.model import SAE
from saelab.sae.sources import ActivationSource, parse_source
from saelab.stats import ReconstructionStats

# The data-stream seed of evaluation sources, kept apart from the small seeds training runs use.
EVAL_SEED = 1_000_003


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    source: ActivationSource,
    tokens: int = 65536,
    batch_size: int = 4096,
    hook: str | None = None,
    hook_out: str | None = None,
) -> dict[str, Any]:
    """Metrics of `sae` on `tokens` fresh activations from `source` at `hook` (default: its only hook); a
    transcoder's are those of its prediction of the activations at `hook_out` from those at `hook`."""
    if hook is None:
        if len(source.hooks) != 1:
            raise SaelabError(f"the source reads {len(source.hooks)} hooks; name the one to evaluate on")
        hook = source.hooks[0]
    d_in = source.d_ins[hook]
    if d_in != sae.cfg.d_in:
        raise SaelabError(f"the SAE reads d_in = {sae.cfg.d_in}, but the source gives d_in = {d_in}")
    if sae.cfg.transcoder and (hook_out not in source.hooks or source.d_ins[hook_out] != sae.cfg.d_out):
        raise SaelabError(f"the transcoder outputs d_out = {sae.cfg.d_out}; the source has no such hook {hook_out}")
    if tokens <= 0 or batch_size <= 0:
        raise SaelabError(f"tokens and batch size must be positive, got {tokens} and {batch_size}")
    was_training = sae.training
    sae.eval()
    device = sae.W_dec.device
    stats = ReconstructionStats(sae.cfg.d_sae)
    for start in range(0, tokens, batch_size):
        batches = source.next_batches(min(batch_size, tokens - start))
        x = batches[hook].to(device)
        latents = sae.encode(x)
        target = batches[hook_out].to(device) if sae.cfg.transcoder else x
        stats.update(target, sae.output(x, latents), latents)
    sae.train(was_training)
    report = stats.compute()
    if isinstance(source, KnownFeatures):
        report["ground_truth"] = ground_truth_metrics(source.true_directions, sae.W_dec.detach().cpu())
    return report


def evaluate_saved(
    sae_dir: str | Path,
    source: str | None = None,
    tokens: int = 65536,
    batch_size: int = 4096,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate the SAE saved in `sae_dir` on the source its cfg.json names (or `source`, a spec)."""
    sae = load_sae(sae_dir, device)
    metadata = sae.metadata
    spec = source or metadata.get("source")
    if spec is None and metadata.get("model_name") and metadata.get("hook_name"):
        return _lm_eval(sae, Path(sae_dir), n_tokens=tokens, device=device)
    if spec is None:
        raise SaelabError(f"{sae_dir} records no activation source; pass --source (e.g. synthetic or toy:DIR)")
    activations = parse_source(spec, seed=EVAL_SEED)
    hook = metadata.get("hook_name")
    hook = hook if hook in activations.hooks else None
    report = evaluate_sae(sae, activations, tokens, batch_size, hook, metadata.get("hook_name_out"))
    return {"sae": str(sae_dir), "architecture": sae.cfg.architecture, "source": spec, **report}


def _lm_eval(sae: SAE, sae_dir: Path, **options: Any) -> dict[str, Any]:
    try:
        from saelab.models.evals import lm_eval
    except ImportError as err:
        raise SaelabError(
            f"{sae_dir} was trained on a language model, and evaluating it needs saelab.models.evals ({err})"
        ) from None
    accepted = inspect.signature(lm_eval).parameters
    return lm_eval(sae, sae_dir, **{k: v for k, v in options.items() if k in accepted}).to_dict()
