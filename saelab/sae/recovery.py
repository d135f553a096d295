"""Ground-truth recovery on a toy model: train every SAE architecture on its hidden layer, compare with W.

The toy model's true features are known (its columns of W, mapped to hidden space), so this is the one setting
where "did the SAE find the features?" has an exact answer: MMCS, MCC and the number of features matched above
cosine 0.9, for each architecture, all trained from the same batches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from saelab.io import atomic_write_json
from saelab.sae.evaluate import EVAL_SEED, evaluate_sae
from saelab.sae.model import ARCHITECTURES, SAE_CLASSES, SAEConfig
from saelab.sae.sources import ToySource
from saelab.sae.train import SAETrainConfig, train_saes

REPORT_FILE = "recovery.json"


def toy_recovery_configs(source: ToySource) -> list[SAEConfig]:
    """One SAE per architecture, sized for the toy model: d_sae ≥ 3 × n_features, k from the true mean L0."""
    n_features = source.model.cfg.n_features
    mean_l0 = float(source.model.feature_probability[source.instance].sum())
    return toy_sae_configs(source.d_in, max(16, 3 * n_features), mean_l0)


def toy_sae_configs(
    d_in: int, d_sae: int, mean_l0: float, architectures: tuple[str, ...] | list[str] = ARCHITECTURES
) -> list[SAEConfig]:
    """One SAE per architecture for toy activations whose true features fire `mean_l0` at a time on average.

    k is the true mean L0 (rounded up where k must be whole); other settings are each architecture's defaults and
    its declared `toy_settings`.
    """
    configs = []
    for name in architectures:
        cls = SAE_CLASSES[name]
        k = max(1, math.ceil(mean_l0)) if cls.whole_k else round(mean_l0, 4)
        configs.append(SAEConfig(name, d_in, d_sae, **({"k": k} if cls.sparsity_by_k else {}), **cls.toy_settings))
    return configs


def run_toy_recovery(
    toy_dir: str | Path,
    out_dir: str | Path,
    quick: bool = False,
    instance: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the five architectures on instance `instance` of the toy model in `toy_dir`; report recovery.

    Writes each SAE to `out_dir/<name>` and the report to `out_dir/recovery.json`, and returns the report.
    """
    out_dir = Path(out_dir)
    source = ToySource(toy_dir, instance, seed)
    configs = toy_recovery_configs(source)
    train_cfg = SAETrainConfig(
        steps=1000 if quick else 3000, batch_size=1024, lr=3e-3, dead_after_tokens=200_000, seed=seed
    )
    saes = train_saes(source, configs, train_cfg, out=out_dir, progress=progress, inputs=(Path(toy_dir),))
    results = {}
    for sae_cfg, sae in zip(configs, saes, strict=True):
        metrics = evaluate_sae(sae, ToySource(toy_dir, instance, EVAL_SEED), tokens=32768)
        truth = metrics["ground_truth"]
        results[sae_cfg.name] = {
            "architecture": sae_cfg.architecture,
            "mmcs": truth["mmcs"],
            "mcc": truth["mcc"],
            "recovered": truth["recovered"],
            "best_cosine_per_feature": truth["best_cosine_per_feature"],
            "l0": metrics["l0"],
            "explained_variance": metrics["explained_variance"],
            "dead_fraction": metrics["dead_fraction"],
        }
    report = {
        "toy_model": str(Path(toy_dir).resolve()),
        "instance": instance,
        "n_features": source.model.cfg.n_features,
        "d_hidden": source.d_in,
        "steps": train_cfg.steps,
        "saes": results,
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    return report
