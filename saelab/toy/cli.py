"""`saelab toy ...`: train, analyse and sweep toy models of superposition.

Each command writes one results folder atomically (nothing is written when an input is bad) and prints where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from saelab.errors import SaelabError
from saelab.toy.llc import LLCConfig
from saelab.toy.model import ToyModelConfig, ToyTrainConfig
from saelab.toy.phase import PhaseDiagramConfig, phase_train_config
from saelab.toy.sae_benchmark import SAEBenchmarkConfig

app = typer.Typer(help="Toy models of superposition: train, analyze, phase-diagram, llc.", no_args_is_help=True)


def parse_floats(text: str, option: str) -> list[float]:
    """'0.05' or '0.1,0.05,0.02' → floats; anything else is a one-line error naming the option."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise SaelabError(f"{option} takes a number or a comma-separated list of numbers, got '{text}'") from None
    if not values:
        raise SaelabError(f"{option} is empty; give a number or a comma-separated list")
    return values


def parse_shapes(text: str, option: str) -> list[list[int]]:
    """'20x5,8x3' → [[20, 5], [8, 3]] (n_features x d_hidden); '' or 'none' → []."""
    if text.strip().lower() in ("", "none"):
        return []
    shapes = []
    for part in text.split(","):
        n, sep, m = part.strip().partition("x")
        if not (sep and n.isdigit() and m.isdigit()):
            raise SaelabError(f"{option} takes shapes n_features x d_hidden like 20x5,8x3 (or none), got '{text}'")
        shapes.append([int(n), int(m)])
    return shapes


def _shown(field: str) -> str:
    """The default of a benchmark setting as the option takes it: '20x5,10x5', '1,0.7', '600'."""
    value = getattr(SAEBenchmarkConfig(), field)
    if isinstance(value, list):
        return ",".join("x".join(map(str, v)) if isinstance(v, list) else f"{v:g}" for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _print_summary(summary: dict[str, Any]) -> None:
    typer.echo(f"wrote {summary['out']}  (cfg.json, model.safetensors, analysis.json, {', '.join(summary['figures'])})")
    if "regular_polygons" in summary:
        typer.echo(f"regular polygons: {summary['regular_polygons']} of {len(summary.get('instances', []))}")
    for inst in summary.get("instances", [])[:16]:
        shapes = ", ".join(f"{n}×{g}" for g, n in _counts(inst["geometry"]).items())
        typer.echo(
            f"  #{inst['instance']:<3} p={inst['feature_probability']:<8.3g} loss={inst['loss']:<10.4g} "
            f"represented={inst['n_represented']:<3} D*={inst['dims_per_feature']:.3f}  {shapes}"
        )
    if "phase_counts" in summary:
        typer.echo("cells: " + ", ".join(f"{name} {count}" for name, count in summary["phase_counts"].items()))


def _counts(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


@app.command()
def train(
    out: Path = typer.Option(Path("toy_model"), help="Results folder (replaced atomically when done)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that is not a saelab toy-model folder."),
    n_features: int = typer.Option(5, help="Features per model."),
    d_hidden: int = typer.Option(2, help="Hidden dimensions per model."),
    n_instances: int | None = typer.Option(None, help="Models trained at once [default: 8, or one per probability]."),
    feature_probability: str = typer.Option(
        "0.05", help="Probability a feature is present; a list gives one per instance."
    ),
    importance_decay: float = typer.Option(1.0, help="Importance of feature i is decay**i."),
    importance: str | None = typer.Option(None, help="Comma-separated importance per feature (overrides the decay)."),
    variant: str = typer.Option("relu", help="relu | linear | neurons | abs."),
    features: str = typer.Option("independent", help="independent | correlated | anticorrelated | hierarchical."),
    steps: int = typer.Option(ToyTrainConfig.steps, help="Optimiser steps."),
    batch_size: int = typer.Option(ToyTrainConfig.batch_size, help="Rows per step."),
    lr: float = typer.Option(ToyTrainConfig.lr, help="Peak learning rate (Adam)."),
    lr_schedule: str = typer.Option(ToyTrainConfig.lr_schedule, help="constant | linear | cosine."),
    optimizer: str = typer.Option(ToyTrainConfig.optimizer, help="adam | sgd (plain SGD)."),
    init_scale: float = typer.Option(ToyTrainConfig.init_scale, help="Scale of the initial embedding W."),
    method: str = typer.Option(ToyTrainConfig.method, help="fast | reference (plain batches and autograd)."),
    seed: int = typer.Option(0, help="Seed for initialisation and data."),
    snapshots: int = typer.Option(0, help="Keep this many log-spaced weight snapshots (for `saelab toy llc`)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a batch of toy models, analyse them, and write cfg.json, weights, analysis.json and figures."""
    from saelab.toy.lab import train_to_folder  # plotting libraries load only for commands that plot

    probabilities = parse_floats(feature_probability, "--feature-probability")
    model_cfg = ToyModelConfig(
        n_features=n_features,
        d_hidden=d_hidden,
        n_instances=n_instances if n_instances is not None else (len(probabilities) if len(probabilities) > 1 else 8),
        variant=variant,
        features=features,
        feature_probability=probabilities if len(probabilities) > 1 else probabilities[0],
        importance_decay=importance_decay,
        importance=parse_floats(importance, "--importance") if importance is not None else None,
    )
    train_cfg = ToyTrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        seed=seed,
        method=method,
        snapshots=snapshots,
        optimizer=optimizer,
        init_scale=init_scale,
    )
    _print_summary(train_to_folder(model_cfg, train_cfg, out, progress=progress, overwrite=overwrite))


@app.command()
def analyze(
    directory: Path = typer.Argument(..., help="A folder written by `saelab toy train` or `phase-diagram`."),
    out: Path | None = typer.Option(None, help="Write the results here instead of refreshing DIRECTORY."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that is not a saelab toy-model folder."),
) -> None:
    """Recompute analysis.json and the figures of a saved toy model (in place, only saelab's files, or into --out)."""
    from saelab.toy.lab import analyze_folder

    _print_summary(analyze_folder(directory, out, overwrite))


@app.command("phase-diagram")
def phase_diagram(
    out: Path = typer.Option(Path("toy_phase"), help="Results folder (replaced atomically when done)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that is not a saelab toy-model folder."),
    n_features: int = typer.Option(2, help="Features; the last one is the extra feature whose importance varies."),
    d_hidden: int = typer.Option(1, help="Hidden dimensions."),
    grid: int = typer.Option(20, help="Cells per axis."),
    replicas: int = typer.Option(PhaseDiagramConfig.replicas, help="Seeds per cell; the lowest loss is kept."),
    min_importance: float = typer.Option(0.1, help="Smallest relative importance of the extra feature."),
    max_importance: float = typer.Option(10.0, help="Largest relative importance of the extra feature."),
    min_density: float = typer.Option(0.01, help="Smallest feature density (probability)."),
    max_density: float = typer.Option(1.0, help="Largest feature density (probability)."),
    steps: int = typer.Option(phase_train_config().steps, help="Optimiser steps."),
    batch_size: int = typer.Option(phase_train_config().batch_size, help="Non-empty rows per step."),
    lr: float = typer.Option(phase_train_config().lr, help="Peak learning rate (Adam, cosine decay)."),
    seed: int = typer.Option(0, help="Seed for initialisation and data."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Sweep relative importance × density of an extra feature in one batched run; classify every cell."""
    from saelab.toy.lab import phase_diagram_to_folder

    cfg = PhaseDiagramConfig(
        n_features=n_features,
        d_hidden=d_hidden,
        grid=grid,
        min_importance=min_importance,
        max_importance=max_importance,
        min_density=min_density,
        max_density=max_density,
        replicas=replicas,
    )
    train_cfg = phase_train_config(seed)
    train_cfg.steps, train_cfg.batch_size, train_cfg.lr = steps, batch_size, lr
    _print_summary(phase_diagram_to_folder(cfg, train_cfg, out, progress=progress, overwrite=overwrite))


@app.command()
def llc(
    directory: Path = typer.Argument(
        ..., help="A folder written by `saelab toy train` (with --snapshots N to follow training)."
    ),
    out: Path | None = typer.Option(None, help="Results folder (default: DIRECTORY_llc beside it)."),
    samples: int = typer.Option(LLCConfig.n_samples, help="n: rows in the dataset D_n (nβ = n / log n)."),
    batch_size: int = typer.Option(LLCConfig.batch_size, help="m: rows per SGLD step."),
    chains: int = typer.Option(LLCConfig.chains, help="SGLD chains per instance."),
    draws: int = typer.Option(LLCConfig.draws, help="SGLD steps averaged per chain, after the burn-in."),
    burnin: int = typer.Option(LLCConfig.burnin, help="SGLD steps discarded first."),
    step_size: float = typer.Option(LLCConfig.step_size, help="SGLD step size ε."),
    localization: float = typer.Option(LLCConfig.localization, help="Pull γ towards the snapshot's weights."),
    seed: int = typer.Option(0, help="Seed for D_n and the chains."),
    instances: str | None = typer.Option(None, help="Comma-separated instances to draw (default: the first 16)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that saelab did not write."),
) -> None:
    """Estimate the local learning coefficient of every instance at every snapshot (SGLD, Lau et al. 2023)."""
    from saelab.toy.development import llc_folder  # plotting libraries load only for commands that plot

    cfg = LLCConfig(
        n_samples=samples,
        batch_size=batch_size,
        chains=chains,
        draws=draws,
        burnin=burnin,
        step_size=step_size,
        localization=localization,
        seed=seed,
    )
    shown = [int(v) for v in parse_floats(instances, "--instances")] if instances is not None else None
    report = llc_folder(directory, cfg, out, progress=progress, shown=shown, overwrite=overwrite)
    typer.echo(f"wrote {report['out']}  ({', '.join(report['files'])})")
    last = report["snapshots"][-1]
    flagged = sum(not cell["stationary"] for row in report["snapshots"] for cell in row["instances"])
    typer.echo(f"nβ = {report['nbeta']}; at step {last['step']}:")
    for cell, changes in list(zip(last["instances"], report["transitions"], strict=True))[:16]:
        path = " → ".join([changes[0]["from"], *(c["to"] for c in changes)]) if changes else cell["kgon"]
        llc_text = "diverged" if cell["diverged"] else f"{cell['llc']:.3g} ± {cell['llc_std']:.2g}"
        typer.echo(f"  #{cell['instance']:<3} loss={cell['loss']:<10.4g} llc={llc_text:<16} {path}")
    development = report["development"]
    typer.echo("final k-gon: instances, loss, llc (mean ± sd over instances)")
    for name, row in development["final"].items():
        typer.echo(f"  {name or '-':<18} {row['instances']:>4}  {row['loss']:<10.4g} ± {row['loss_sd']:<9.2g} "
                   f"{_maybe(row['llc'])} ± {_maybe(row['llc_sd'])}")  # fmt: skip
    if development["transitions"]:
        typer.echo(
            "transitions between k-gon plateaus: count, loss fell, llc rose; both ends settled, of those llc rose"
        )
        for name, row in development["transitions"].items():
            typer.echo(f"  {name:<18} {row['count']:>4}  {row['loss_fell']:>4}  {row['llc_rose']:>4}   "
                       f"{row['settled']:>4}  {row['settled_llc_rose']:>4}")  # fmt: skip
    if flagged:
        typer.echo(f"{flagged} estimate(s) drifted (see llc.json 'stationary'); try more draws or a smaller step size")


@app.command("sae-benchmark")
def sae_benchmark(
    out: Path = typer.Option(Path("toy_sae_benchmark"), help="Results folder (replaced atomically when done)."),
    shapes: str | None = typer.Option(None, help=f"Toy shapes n_features x d_hidden (default {_shown('shapes')})."),
    importance_decays: str | None = typer.Option(
        None, help=f"Decays of importance (default {_shown('importance_decays')})."
    ),
    feature_probabilities: str | None = typer.Option(
        None, help=f"Feature probabilities (default {_shown('feature_probabilities')})."
    ),
    hierarchical: str | None = typer.Option(
        None, help=f"Hierarchical shapes or none (default {_shown('hierarchical_shapes')})."
    ),
    hierarchical_probabilities: str | None = typer.Option(
        None, help=f"Parent probabilities (default {_shown('hierarchical_probabilities')})."
    ),
    children_per_parent: int | None = typer.Option(
        None, help=f"Children per parent (default {_shown('children_per_parent')})."
    ),
    child_given_parent: float | None = typer.Option(
        None, help=f"P(a child | its parent) (default {_shown('child_given_parent')})."
    ),
    replicas: int | None = typer.Option(None, help=f"Toy instances per grid cell (default {_shown('replicas')})."),
    architectures: str | None = typer.Option(None, help="Comma-separated SAE architectures (default: all)."),
    dictionary_ratio: float | None = typer.Option(
        None, help=f"d_sae / n_features (default {_shown('dictionary_ratio')})."
    ),
    toy_steps: int | None = typer.Option(None, help=f"Toy-model training steps (default {_shown('toy_steps')})."),
    sae_steps: int | None = typer.Option(None, help=f"SAE training steps (default {_shown('sae_steps')})."),
    sae_batch_size: int | None = typer.Option(None, help=f"SAE batch size (default {_shown('sae_batch_size')})."),
    sae_lr: float | None = typer.Option(None, help=f"SAE learning rate (default {_shown('sae_lr')})."),
    eval_tokens: int | None = typer.Option(
        None, help=f"Held-out inputs per instance (default {_shown('eval_tokens')})."
    ),
    absorption_threshold: float | None = typer.Option(
        None, help=f"Cosine τ of an absorbing latent (default {_shown('absorption_threshold')})."
    ),
    seed: int | None = typer.Option(None, help=f"Seed of toy models, SAEs and data (default {_shown('seed')})."),
    quick: bool = typer.Option(False, help="A smoke-test grid (seconds); other options still apply on top."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that saelab did not write."),
) -> None:
    """Train toy models over a grid, every SAE architecture on each, and report recovery per true feature against
    importance, probability and dimensionality, and feature absorption on hierarchical features."""
    from saelab.toy.sae_benchmark import quick_config, run_sae_benchmark

    cfg = quick_config() if quick else SAEBenchmarkConfig()
    given = {
        "shapes": parse_shapes(shapes, "--shapes") if shapes is not None else None,
        "importance_decays": parse_floats(importance_decays, "--importance-decays") if importance_decays else None,
        "feature_probabilities": (
            parse_floats(feature_probabilities, "--feature-probabilities") if feature_probabilities else None
        ),
        "hierarchical_shapes": parse_shapes(hierarchical, "--hierarchical") if hierarchical is not None else None,
        "hierarchical_probabilities": (
            parse_floats(hierarchical_probabilities, "--hierarchical-probabilities")
            if hierarchical_probabilities
            else None
        ),
        "children_per_parent": children_per_parent,
        "child_given_parent": child_given_parent,
        "replicas": replicas,
        "architectures": [a.strip() for a in architectures.split(",")] if architectures else None,
        "dictionary_ratio": dictionary_ratio,
        "toy_steps": toy_steps,
        "sae_steps": sae_steps,
        "sae_batch_size": sae_batch_size,
        "sae_lr": sae_lr,
        "eval_tokens": eval_tokens,
        "absorption_threshold": absorption_threshold,
        "seed": seed,
    }
    for name, value in given.items():
        if value is not None:
            setattr(cfg, name, value)
    results = run_sae_benchmark(cfg, out, progress=progress, log=typer.echo, overwrite=overwrite)
    typer.echo(f"wrote {out}  (results.json, features.csv, instances.csv, figures) in {results['seconds']:.0f} s")
    width = max(len("architecture"), *map(len, results["summary"]))
    columns = {"recovered": "recovered_fraction", "best cos": "mean_best_cosine", "matched": "mean_matched_cosine",
               "EV": "mean_explained_variance", "absorption": "absorption_rate"}  # fmt: skip
    typer.echo(f"{'architecture':<{width}} " + " ".join(f"{name:>10}" for name in columns))
    for arch, entry in results["summary"].items():
        shown = ["—" if entry.get(key) is None else f"{entry[key]:.3f}" for key in columns.values()]
        typer.echo(f"{arch:<{width}} " + " ".join(f"{value:>10}" for value in shown))


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
