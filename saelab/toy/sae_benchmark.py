"""The toy-model SAE benchmark: how well each SAE architecture recovers known features, feature by feature, across
importance, feature probability and dimensionality — and how much it absorbs hierarchical features.

    for each shape (n features in m dims), and each hierarchical shape:
        one batched ToyModel: an instance per (importance decay, feature probability, replica)
        train it (all instances at once)
        train every architecture on every instance's hidden activations h = W x, all SAEs from the same batches
        evaluate every SAE on one held-out batch of features and their hidden activations

Per true feature i of an instance, with d_i = W_i/‖W_i‖ (its direction in hidden space) and u_l = W_dec[l]/‖W_dec[l]‖:

    best cosine      max_l d_i·u_l                       (signed: latents are non-negative)
    matched cosine   d_i·u_π(i), π the one-to-one assignment of features to latents maximising Σ_i d_i·u_π(i)
                     (Hungarian; needs d_sae ≥ n)
    recovered        best cosine ≥ `recovery_threshold` (0.9)

beside the feature's importance I_i, probability p_i, dimensionality D_i = ‖W_i‖²/Σ_j (d_i·W_j)² and norm ‖W_i‖.

Hierarchical instances (`ToyModelConfig.features = "hierarchical"`: groups of a parent and its children, a child
present only with its parent, at most one child at a time) measure feature absorption (Chanin et al. 2024,
"A is for Absorption"). Per parent P, with τ = `absorption_threshold`:

    parent latent     ℓ_P = argmax_l d_P·u_l
    child-active      an input where one of P's children is present (so P is present too)
    absorbed          a child-active input, child C present, on which ℓ_P does not fire (activation 0) while some
                      other latent l ≠ ℓ_P fires with d_P·u_l ≥ τ and d_C·u_l ≥ τ: a latent that reads as the
                      child carries the parent's direction in the parent latent's place
    absorption rate   absorbed inputs / child-active inputs

reported beside the parent latent's miss rates on child-active inputs and on inputs with the parent alone: an SAE
with no parent latent at all misses both; an absorbing one misses only where a child is present. The definition
relies on parent and child directions being far apart (d_P·d_C < τ); the results record the largest d_P·d_C.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saelab.config import config_to_dict, require_positive_ints
from saelab.errors import SaelabError
from saelab.io import OutputKind, atomic_write_json, atomic_write_text, check_output, json_format_marker, output_folder
from saelab.sae.evaluate import EVAL_SEED
from saelab.sae.metrics import cosine_matrix
from saelab.sae.model import ARCHITECTURES, SAE
from saelab.sae.recovery import toy_sae_configs
from saelab.sae.train import SAETrainConfig, train_saes
from saelab.stats import explained_variance
from saelab.toy.analysis import REPRESENTED_NORM, dimensionality, feature_norms
from saelab.toy.model import ToyModel, ToyModelConfig, ToyTrainConfig, write_toy_model_files
from saelab.toy.train import train_toy_model

FORMAT_NAME = "saelab.toy_sae_benchmark"
RESULTS_FILE = "results.json"
TOY_MODELS_DIR = "toy_models"
BENCHMARK_FOLDER = OutputKind(
    "saelab SAE-benchmark folder",
    (RESULTS_FILE, TOY_MODELS_DIR, "*.csv", "*.png", "*.html", "plotly*.js"),
    json_format_marker(RESULTS_FILE, FORMAT_NAME),
)
# Bins of the summary: D_i of represented features, and importance.
DIMENSIONALITY_BINS = ((0.9, math.inf, "D >= 0.9"), (0.3, 0.9, "0.3 <= D < 0.9"), (-math.inf, 0.3, "D < 0.3"))
IMPORTANCE_BINS = ((0.5, math.inf, "I >= 0.5"), (0.1, 0.5, "0.1 <= I < 0.5"), (-math.inf, 0.1, "I < 0.1"))


@dataclass
class SAEBenchmarkConfig:
    """The grid and the training settings; every toy instance gets one SAE of each architecture.

    `shapes` are (n_features, d_hidden) pairs of independent features; each gets one toy instance per
    (importance decay, feature probability, replica). `hierarchical_shapes` get one instance per
    (hierarchical probability, replica), importance 1, and feature groups of a parent and `children_per_parent`
    children. The dictionary has d_sae = ⌈dictionary_ratio · n_features⌉ latents. `architectures` empty: all.
    """

    shapes: list[list[int]] = field(default_factory=lambda: [[20, 5], [10, 5]])
    importance_decays: list[float] = field(default_factory=lambda: [1.0, 0.7])
    feature_probabilities: list[float] = field(default_factory=lambda: [0.1, 0.02])
    hierarchical_shapes: list[list[int]] = field(default_factory=lambda: [[12, 12]])
    hierarchical_probabilities: list[float] = field(default_factory=lambda: [0.2])
    children_per_parent: int = 2
    child_given_parent: float = 0.75
    replicas: int = 1
    architectures: list[str] = field(default_factory=list)
    dictionary_ratio: float = 2.0
    toy_steps: int = 2000
    sae_steps: int = 600
    sae_batch_size: int = 512
    sae_lr: float = 3e-3
    eval_tokens: int = 16384
    recovery_threshold: float = 0.9
    absorption_threshold: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        require_positive_ints(
            self, ("children_per_parent", "replicas", "toy_steps", "sae_steps", "sae_batch_size", "eval_tokens")
        )
        if not self.shapes and not self.hierarchical_shapes:
            raise SaelabError("the benchmark has no toy model; give at least one shape or hierarchical shape")
        group = self.children_per_parent + 1
        for option, shapes in (("shapes", self.shapes), ("hierarchical shapes", self.hierarchical_shapes)):
            for shape in shapes:
                if len(shape) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
                    raise SaelabError(f"{option} are pairs of positive integers n_features x d_hidden, got {shape!r}")
            if len({tuple(shape) for shape in shapes}) < len(shapes):
                raise SaelabError(f"{option} repeat a shape ({shapes}); list each n_features x d_hidden once")
        for n, _ in self.hierarchical_shapes:
            if n % group:
                raise SaelabError(
                    f"a hierarchical shape needs n_features divisible by 1 parent + {self.children_per_parent} "
                    f"children = {group}, got {n}"
                )
        if self.shapes and not (self.importance_decays and self.feature_probabilities):
            raise SaelabError("give at least one importance decay and one feature probability")
        if self.hierarchical_shapes and not self.hierarchical_probabilities:
            raise SaelabError("give at least one hierarchical (parent) probability")
        for value in self.importance_decays:
            if not _finite(value) or value <= 0:
                raise SaelabError(f"importance decays must be positive numbers, got {value!r}")
        for value in [*self.feature_probabilities, *self.hierarchical_probabilities, self.child_given_parent]:
            if not _finite(value) or not 0 < value <= 1:
                raise SaelabError(f"probabilities must be in (0, 1], got {value!r}")
        for option, values in (
            ("importance decays", self.importance_decays),
            ("feature probabilities", self.feature_probabilities),
            ("hierarchical probabilities", self.hierarchical_probabilities),
            ("architectures", self.architectures),
        ):
            if len(set(values)) < len(values):
                raise SaelabError(f"{option} repeat a value ({values}); list each once (--replicas repeats cells)")
        unknown = [a for a in self.architectures if a not in ARCHITECTURES]
        if unknown:
            raise SaelabError(f"unknown architecture '{unknown[0]}'; choose from {', '.join(ARCHITECTURES)}")
        if not _finite(self.dictionary_ratio) or self.dictionary_ratio < 1:
            raise SaelabError(
                f"dictionary_ratio must be >= 1 (every feature needs its own latent), got {self.dictionary_ratio!r}"
            )
        if not _finite(self.sae_lr) or self.sae_lr <= 0:
            raise SaelabError(f"the SAE learning rate must be a positive number, got {self.sae_lr!r}")
        for name in ("recovery_threshold", "absorption_threshold"):
            value = getattr(self, name)
            if not _finite(value) or not 0 < value <= 1:
                raise SaelabError(f"{name} is a cosine in (0, 1], got {value!r}")

    @property
    def architecture_list(self) -> list[str]:
        return list(self.architectures) or list(ARCHITECTURES)


def quick_config() -> SAEBenchmarkConfig:
    """A smoke-test grid that runs in seconds: one small shape, two instances, short training."""
    return SAEBenchmarkConfig(
        shapes=[[6, 3]],
        importance_decays=[1.0, 0.7],
        feature_probabilities=[0.1],
        hierarchical_shapes=[[6, 6]],
        hierarchical_probabilities=[0.2],
        toy_steps=300,
        sae_steps=150,
        sae_batch_size=256,
        eval_tokens=4096,
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the metrics, on plain tensors --------------------------------------------------------------------------


def matched_cosines(cosines: Tensor) -> Tensor:
    """Per true feature, its cosine with the latent the Hungarian matching assigns it: [n_true] (0 if unmatched).

    `cosines [n_true, n_latents]`; the matching is one-to-one and maximises the sum of matched cosines.
    """
    rows, cols = linear_sum_assignment(cosines.double().cpu().numpy(), maximize=True)
    matched = torch.zeros(cosines.shape[0], dtype=torch.float64)
    matched[torch.as_tensor(rows)] = cosines.double().cpu()[torch.as_tensor(rows), torch.as_tensor(cols)]
    return matched


def absorption(
    present: Tensor, fires: Tensor, cosines: Tensor, children_per_parent: int, threshold: float
) -> list[dict[str, Any]]:
    """Feature absorption per parent (see the module docstring for the definition): one dict per parent.

    `present [tokens, n_features]` which true features are present (parents first in each group of
    1 + children_per_parent), `fires [tokens, d_sae]` which latents are non-zero, `cosines [n_features, d_sae]`
    the cosine of each true direction with each decoder row.
    """
    present, fires, cosines = present.bool(), fires.bool(), cosines.detach()
    group = children_per_parent + 1
    results = []
    for parent in range(0, present.shape[1], group):
        children = list(range(parent + 1, parent + group))
        parent_latent = int(cosines[parent].argmax())
        parent_silent = ~fires[:, parent_latent]
        child_active = present[:, children].any(dim=1)
        alone = present[:, parent] & ~child_active
        absorbed = torch.zeros_like(child_active)
        for child in children:
            absorbing = (cosines[parent] >= threshold) & (cosines[child] >= threshold)
            absorbing[parent_latent] = False
            absorbed |= present[:, child] & (fires & absorbing).any(dim=1)
        absorbed &= parent_silent
        n_child, n_alone = int(child_active.sum()), int(alone.sum())
        missed_with_child, missed_alone = int((parent_silent & child_active).sum()), int((parent_silent & alone).sum())
        results.append(
            {
                "parent": parent,
                "parent_latent": parent_latent,
                "parent_latent_cosine": float(cosines[parent, parent_latent]),
                "child_active_inputs": n_child,
                "absorbed_inputs": int(absorbed.sum()),
                "absorption_rate": _rate(int(absorbed.sum()), n_child),
                "parent_missed_with_child": missed_with_child,
                "parent_miss_with_child": _rate(missed_with_child, n_child),
                "parent_alone_inputs": n_alone,
                "parent_missed_alone": missed_alone,
                "parent_miss_alone": _rate(missed_alone, n_alone),
            }
        )
    return results


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Study:
    """One batched toy model of the grid and what each of its instances stands for."""

    n_features: int
    d_hidden: int
    hierarchical: bool
    instances: list[dict[str, Any]]  # importance_decay, feature_probability, replica

    @property
    def name(self) -> str:
        return f"{'hierarchical_' if self.hierarchical else ''}n{self.n_features}_m{self.d_hidden}"


def plan_studies(cfg: SAEBenchmarkConfig) -> list[Study]:
    """The grid as batched toy models: one per shape, an instance per (decay, probability, replica)."""
    independent = [
        {"importance_decay": decay, "feature_probability": prob, "replica": replica}
        for decay in cfg.importance_decays
        for prob in cfg.feature_probabilities
        for replica in range(cfg.replicas)
    ]
    hierarchical = [
        {"importance_decay": 1.0, "feature_probability": prob, "replica": replica}
        for prob in cfg.hierarchical_probabilities
        for replica in range(cfg.replicas)
    ]
    return [Study(n, m, False, independent) for n, m in cfg.shapes] + [
        Study(n, m, True, hierarchical) for n, m in cfg.hierarchical_shapes
    ]


def build_toy_model(study: Study, cfg: SAEBenchmarkConfig) -> ToyModel:
    """The study's untrained toy model, importance and probabilities set per instance."""
    model_cfg = ToyModelConfig(
        n_features=study.n_features,
        d_hidden=study.d_hidden,
        n_instances=len(study.instances),
        features="hierarchical" if study.hierarchical else "independent",
        feature_probability=[inst["feature_probability"] for inst in study.instances],
        children_per_parent=cfg.children_per_parent,
        child_given_parent=cfg.child_given_parent,
    )
    model_cfg.validate()
    index = torch.arange(study.n_features, dtype=torch.float32)
    importance = torch.stack([inst["importance_decay"] ** index for inst in study.instances])
    return ToyModel(model_cfg, importance=importance)


class ToyInstances:
    """Every instance of a toy model as one hook, `instance<i>`: one feature batch feeds the SAEs of all of them."""

    def __init__(self, model: ToyModel, seed: int) -> None:
        self.model = model
        self.hooks = [f"instance{i}" for i in range(model.cfg.n_instances)]
        self.d_ins = dict.fromkeys(self.hooks, model.cfg.d_hidden)
        self.generator = torch.Generator().manual_seed(seed)

    def metadata_for(self, hook: str) -> dict[str, Any]:
        return {"model_name": "saelab-toy", "hook_name": hook}

    @torch.no_grad()
    def next_batches(self, batch_size: int) -> dict[str, Tensor]:
        hidden = self.model.hidden(self.model.generate_batch(batch_size, self.generator))
        return {hook: hidden[:, i].contiguous() for i, hook in enumerate(self.hooks)}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def run_sae_benchmark(
    cfg: SAEBenchmarkConfig,
    out: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the grid; with `out`, write the results folder atomically. Return the results (see `write_results`)."""
    cfg.validate()
    if out is not None:
        check_output(out, BENCHMARK_FOLDER, overwrite=overwrite)  # before the work, not after it
    log = log or (lambda message: None)
    start = time.perf_counter()
    features: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    absorptions: list[dict[str, Any]] = []
    toy_models: dict[str, ToyModel] = {}
    toy_train = ToyTrainConfig(steps=cfg.toy_steps, seed=cfg.seed)
    for number, study in enumerate(plan_studies(cfg), 1):
        n_saes = len(study.instances) * len(cfg.architecture_list)
        log(
            f"[{number}/{len(cfg.shapes) + len(cfg.hierarchical_shapes)}] {study.name}: toy model with "
            f"{len(study.instances)} instances, then {n_saes} SAEs"
        )
        model = toy_models[study.name] = build_toy_model(study, cfg)
        train_toy_model(model, toy_train, progress=progress)
        f, i, a = evaluate_study(study, model, _train_study_saes(model, cfg, progress), cfg)
        features += f
        instances += i
        absorptions += a
    results = {
        "format": FORMAT_NAME,
        "format_version": 1,
        "config": config_to_dict(cfg),
        "architectures": cfg.architecture_list,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summarize(features, instances, absorptions, cfg),
        "instances": instances,
        "absorption": absorptions,
        "features": features,
    }
    if out is not None:
        write_results(results, Path(out), toy_models, toy_train, overwrite)
    return results


def _train_study_saes(model: ToyModel, cfg: SAEBenchmarkConfig, progress: bool) -> list[tuple[int, SAE]]:
    """Every architecture on every instance, in one training run over shared batches: (instance, SAE) pairs."""
    n_features = model.cfg.n_features
    d_sae = math.ceil(cfg.dictionary_ratio * n_features)
    source = ToyInstances(model, cfg.seed)
    configs, instances = [], []
    for i in range(model.cfg.n_instances):
        mean_l0 = float(model.feature_probability[i].sum())
        for sae_cfg in toy_sae_configs(model.cfg.d_hidden, d_sae, mean_l0, cfg.architecture_list):
            configs.append(sae_cfg)
            instances.append(i)
    train_cfg = SAETrainConfig(
        steps=cfg.sae_steps,
        batch_size=cfg.sae_batch_size,
        lr=cfg.sae_lr,
        dead_after_tokens=200_000,
        log_every=cfg.sae_steps,
        seed=cfg.seed,
    )
    saes = train_saes(source, configs, train_cfg, progress=progress, hooks=[source.hooks[i] for i in instances])
    return list(zip(instances, saes, strict=True))


@torch.no_grad()
def evaluate_study(
    study: Study, model: ToyModel, saes: list[tuple[int, SAE]], cfg: SAEBenchmarkConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Feature rows, instance rows and absorption rows of one trained study (`saes`: (instance, SAE) pairs), on one
    held-out batch of features."""
    W = model.W.detach()
    dims, norms = dimensionality(W), feature_norms(W)
    present = model.generate_batch(cfg.eval_tokens, torch.Generator().manual_seed(EVAL_SEED))
    hidden = model.hidden(present)
    group = cfg.children_per_parent + 1
    feature_rows, instance_rows, absorption_rows = [], [], []
    for i, sae in saes:
        architecture = sae.cfg.architecture
        cell = {"study": study.name, "n_features": study.n_features, "d_hidden": study.d_hidden, "instance": i}
        cell |= study.instances[i] | {"architecture": architecture}
        x = hidden[:, i]
        latents = sae.encode(x)
        cosines = cosine_matrix(W[i].T, sae.W_dec.detach().cpu())
        best, best_latent = cosines.max(dim=1)
        matched = matched_cosines(cosines)
        represented = norms[i] >= REPRESENTED_NORM
        for feature in range(study.n_features):
            role = "independent"
            if study.hierarchical:
                role = "parent" if feature % group == 0 else "child"
            feature_rows.append(
                cell
                | {
                    "feature": feature,
                    "role": role,
                    "importance": float(model.importance[i, feature]),
                    "probability": float(model.feature_probability[i, feature]),
                    "dimensionality": float(dims[i, feature]),
                    "norm": float(norms[i, feature]),
                    "represented": bool(represented[feature]),
                    "best_cosine": float(best[feature]),
                    "best_latent": int(best_latent[feature]),
                    "matched_cosine": float(matched[feature]),
                    "recovered": bool(best[feature] >= cfg.recovery_threshold),
                }
            )
        fires = latents != 0
        instance_rows.append(
            cell
            | {
                "sae": sae.cfg.name,
                "d_sae": sae.cfg.d_sae,
                "l0": float(fires.sum(dim=1).double().mean()),
                "explained_variance": explained_variance(x, sae.decode(latents)),
                "dead_fraction": float((~fires.any(dim=0)).double().mean()),
                "mmcs": float(best[represented].mean()) if represented.any() else None,
                "mcc": float(matched[represented].mean()) if represented.any() else None,
                "represented": int(represented.sum()),
                "recovered": int((best[represented] >= cfg.recovery_threshold).sum()),
            }
        )
        if study.hierarchical:
            true_cosines = cosine_matrix(W[i].T, W[i].T)
            for row in absorption(
                present[:, i] != 0, fires, cosines, cfg.children_per_parent, cfg.absorption_threshold
            ):
                children = range(row["parent"] + 1, row["parent"] + group)
                row["max_parent_child_cosine"] = max(float(true_cosines[row["parent"], c]) for c in children)
                absorption_rows.append(cell | row)
    _check_finite(instance_rows)
    return feature_rows, instance_rows, absorption_rows


def _check_finite(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise SaelabError(
                    f"{row['architecture']} on {row['study']} instance {row['instance']} gave {key} = {value}; "
                    "training diverged — lower the SAE learning rate (--sae-lr)"
                )


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(
    features: list[dict[str, Any]],
    instances: list[dict[str, Any]],
    absorptions: list[dict[str, Any]],
    cfg: SAEBenchmarkConfig,
) -> dict[str, Any]:
    """Per architecture: recovery of the features the toy models represent (‖W_i‖ ≥ 0.5), by D_i, importance and
    probability, on the independent-feature studies; reconstruction; and absorption on the hierarchical ones."""
    summary: dict[str, Any] = {}
    for arch in cfg.architecture_list:
        rows = [r for r in features if r["architecture"] == arch and r["role"] == "independent"]
        kept = [r for r in rows if r["represented"]]
        entry: dict[str, Any] = {
            "features": len(rows),
            "represented": len(kept),
            "not_represented_by_toy": len(rows) - len(kept),
            "mean_best_cosine": _mean([r["best_cosine"] for r in kept]),
            "mean_matched_cosine": _mean([r["matched_cosine"] for r in kept]),
            "recovered_fraction": _mean([float(r["recovered"]) for r in kept]),
            "recovered_by_dimensionality": _binned(kept, "dimensionality", DIMENSIONALITY_BINS),
            "recovered_by_importance": _binned(kept, "importance", IMPORTANCE_BINS),
            "recovered_by_probability": {
                f"p = {p:g}": _mean([float(r["recovered"]) for r in kept if r["probability"] == p])
                for p in sorted({r["probability"] for r in kept}, reverse=True)
            },
        }
        arch_instances = [r for r in instances if r["architecture"] == arch]
        entry["mean_explained_variance"] = _mean([r["explained_variance"] for r in arch_instances])
        entry["mean_l0"] = _mean([r["l0"] for r in arch_instances])
        arch_absorption = [r for r in absorptions if r["architecture"] == arch]
        if arch_absorption:
            child_inputs = sum(r["child_active_inputs"] for r in arch_absorption)
            alone_inputs = sum(r["parent_alone_inputs"] for r in arch_absorption)
            entry["absorption_rate"] = _rate(sum(r["absorbed_inputs"] for r in arch_absorption), child_inputs)
            missed_with_child = sum(r["parent_missed_with_child"] for r in arch_absorption)
            entry["parent_miss_with_child"] = _rate(missed_with_child, child_inputs)
            entry["parent_miss_alone"] = _rate(sum(r["parent_missed_alone"] for r in arch_absorption), alone_inputs)
            hier = [r for r in features if r["architecture"] == arch and r["role"] != "independent"]
            entry["hierarchical_recovered_parents"] = _mean(
                [float(r["recovered"]) for r in hier if r["role"] == "parent"]
            )
            entry["hierarchical_recovered_children"] = _mean(
                [float(r["recovered"]) for r in hier if r["role"] == "child"]
            )
        summary[arch] = entry
    return summary


def _binned(rows: list[dict[str, Any]], key: str, bins: tuple[tuple[float, float, str], ...]) -> dict[str, Any]:
    """{bin label: {"features": count, "recovered_fraction": …}} for the rows whose `key` falls in each bin."""
    out = {}
    for low, high, label in bins:
        inside = [r for r in rows if low <= r[key] < high]
        out[label] = {"features": len(inside), "recovered_fraction": _mean([float(r["recovered"]) for r in inside])}
    return out


# --- the results folder -------------------------------------------------------------------------------------


def write_results(
    results: dict[str, Any],
    out: Path,
    toy_models: dict[str, ToyModel] | None = None,
    toy_train: ToyTrainConfig | None = None,
    overwrite: bool = False,
) -> list[str]:
    """results.json, features.csv, instances.csv, absorption.csv, the figures and the trained toy models (each a
    `toy_models/<study>` folder that `load_toy_model` and `saelab toy analyze` read), written into `out` as a whole."""
    from saelab.toy.benchmark_plots import plot_absorption, plot_recovery  # matplotlib/plotly load only here

    with output_folder(out, BENCHMARK_FOLDER, overwrite=overwrite) as tmp:
        atomic_write_json(tmp / RESULTS_FILE, results)
        names = [RESULTS_FILE]
        for name in ("features", "instances", "absorption"):
            if results[name]:
                atomic_write_text(tmp / f"{name}.csv", _csv(results[name]))
                names.append(f"{name}.csv")
        names += plot_recovery(results, tmp)
        if results["absorption"]:
            names += plot_absorption(results, tmp)
        for name, model in (toy_models or {}).items():
            (tmp / TOY_MODELS_DIR / name).mkdir(parents=True)
            write_toy_model_files(model, tmp / TOY_MODELS_DIR / name, toy_train)
        if toy_models:
            names.append(TOY_MODELS_DIR)
    return names


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()
