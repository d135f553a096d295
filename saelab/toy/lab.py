"""Results folders of the toy lab, and `run_toy_lab`, the one call the demo makes.

A results folder is a saved toy model (`cfg.json` + `model.safetensors`, loadable by `load_toy_model`) plus
`analysis.json`, `history.json` and figures. It is assembled in a temporary directory and swapped in whole, so
a failed run leaves nothing behind (and an existing folder untouched).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from saelab.config import config_from_dict, config_to_dict, load_json
from saelab.errors import SaelabError
from saelab.io import atomic_write_json, check_output, output_folder
from saelab.toy.analysis import analyze_toy_model, is_regular_polygon
from saelab.toy.model import (
    TOY_FOLDER,
    ToyModel,
    ToyModelConfig,
    ToyTrainConfig,
    load_toy_model,
    write_toy_model_files,
)
from saelab.toy.phase import PHASES, PhaseDiagramConfig, phase_grid, phase_train_config, run_phase_diagram
from saelab.toy.plots import (
    plot_dimensionality,
    plot_features_2d,
    plot_loss_vs_importance,
    plot_phase_diagram,
    plot_wtw,
)
from saelab.toy.snapshots import SNAPSHOTS_FILE, SnapshotRecorder, load_snapshots, save_snapshots, snapshot_steps
from saelab.toy.train import train_toy_model

SAVED_CFG_KEYS = ("format", "format_version", "model", "train")


def _panel_titles(model: ToyModel) -> list[str]:
    """'#i  p=…' per instance, plus the last feature's importance where it differs between instances (sweeps)."""
    titles = [f"#{i}  p={p:.3g}" for i, p in enumerate(model.feature_probability[:, 0].tolist())]
    extra = model.importance[:, -1]
    if (extra != extra[0]).any():
        titles = [f"{title}  I={imp:.2g}" for title, imp in zip(titles, extra.tolist(), strict=True)]
    return titles


def write_figures(model: ToyModel, analysis: dict[str, Any], directory: Path) -> list[str]:
    """Draw every figure that fits this model into `directory`; return the file names.

    A phase sweep gets its diagram (and a sample of its instances in 2D); other models get WᵀW, loss vs
    importance, and, when their instances differ in sparsity, dimensionality vs 1/(1−S).
    """
    directory = Path(directory)
    W, titles = model.W.detach(), _panel_titles(model)
    names = []
    if model.cfg.d_hidden <= 2:
        plot_features_2d(W, directory / "features_2d.png", model.importance, titles)
        names.append("features_2d.png")
    phase = analysis.get("phase_diagram")
    if phase is not None:
        title = f"Phase diagram: {model.cfg.n_features} features in {model.cfg.d_hidden} dimension(s)"
        plot_phase_diagram(phase, directory / "phase_diagram.png", directory / "phase_diagram.html", title)
        return [*names, "phase_diagram.png", "phase_diagram.html"]
    plot_wtw(W, directory / "wtw.png", titles)
    plot_loss_vs_importance(analysis, directory / "loss_vs_importance.png")
    names += ["wtw.png", "loss_vs_importance.png"]
    if model.feature_probability.unique().numel() > 1:
        plot_dimensionality(analysis, directory / "dimensionality.png", directory / "dimensionality.html")
        names += ["dimensionality.png", "dimensionality.html"]
    return names


def write_results(
    out: Path,
    model: ToyModel,
    train_cfg: ToyTrainConfig | None,
    history: list[dict[str, float]] | None = None,
    extra: dict[str, Any] | None = None,
    n_samples: int = 4096,
    snapshots: dict[str, torch.Tensor] | None = None,
    overwrite: bool = False,
    inputs: tuple[Path, ...] = (),
    refresh: bool = False,
) -> dict[str, Any]:
    """Analyse `model` and write the whole results folder `out` atomically; return the analysis.

    `extra` goes into cfg.json; a `phase` entry there (a PhaseDiagramConfig) adds the phase diagram.
    `snapshots` (see `saelab.toy.snapshots`) are written as `snapshots.safetensors`. `out` is checked and
    replaced as `saelab.io.output_folder` says; `refresh` rewrites only saelab's files in it.
    """
    analysis = analyze_toy_model(model, n_samples=n_samples)
    if extra and "phase" in extra:
        phase_cfg = config_from_dict(PhaseDiagramConfig, extra["phase"], where="cfg.json:phase")
        analysis["phase_diagram"] = phase_grid(model, phase_cfg)
    check_finite_analysis(analysis)
    with output_folder(out, TOY_FOLDER, inputs, overwrite, refresh) as tmp:
        write_toy_model_files(model, tmp, train_cfg, extra)
        if history is not None:
            atomic_write_json(tmp / "history.json", history)
        if snapshots is not None:
            save_snapshots(tmp / SNAPSHOTS_FILE, snapshots)
        analysis["figures"] = write_figures(model, analysis, tmp)
        atomic_write_json(tmp / "analysis.json", analysis)
    return analysis


def check_finite_analysis(analysis: dict[str, Any]) -> None:
    """Refuse to write an analysis with NaN or inf in it: a diverged model is an error, not a result."""
    try:
        json.dumps(analysis, allow_nan=False)
    except ValueError:
        raise SaelabError(
            "the toy model's weights or analysis are not finite (training diverged); lower --lr and retrain"
        ) from None


def train_to_folder(
    model_cfg: ToyModelConfig, train_cfg: ToyTrainConfig, out: Path, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train a batch of toy models and write its results folder; return a short summary."""
    model_cfg.validate()
    train_cfg.validate()
    check_output(out, TOY_FOLDER, overwrite=overwrite)  # before training, not after it
    model = ToyModel(model_cfg)
    recorder = SnapshotRecorder(snapshot_steps(train_cfg.steps, train_cfg.snapshots)) if train_cfg.snapshots else None
    start = time.perf_counter()
    history = train_toy_model(model, train_cfg, progress=progress, after_step=recorder)
    seconds = time.perf_counter() - start
    snapshots = recorder.tensors() if recorder is not None else None
    extra = {"train_seconds": round(seconds, 2)}
    analysis = write_results(out, model, train_cfg, history, extra, snapshots=snapshots, overwrite=overwrite)
    return summarize(model, analysis, out, seconds)


def analyze_folder(directory: Path, out: Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Re-analyse a saved toy model; the results go to `out` (default: refresh saelab's files in `directory`)."""
    directory = Path(directory)
    if out is not None:
        check_output(out, TOY_FOLDER, (directory,), overwrite)
    model, train_cfg = load_toy_model(directory)
    raw = load_json(directory / "cfg.json")
    extra = {key: value for key, value in raw.items() if key not in SAVED_CFG_KEYS}
    history_path = directory / "history.json"
    history = load_json_list(history_path) if history_path.is_file() else None
    snapshots = load_snapshots(directory, model) if (directory / SNAPSHOTS_FILE).is_file() else None
    if out is None:
        analysis = write_results(directory, model, train_cfg, history, extra, snapshots=snapshots, refresh=True)
        return summarize(model, analysis, directory)
    analysis = write_results(
        out, model, train_cfg, history, extra, snapshots=snapshots, inputs=(directory,), overwrite=overwrite
    )
    return summarize(model, analysis, out)


def load_json_list(path: Path) -> list:
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SaelabError(f"{path} is not valid JSON ({err}); delete it or re-run training") from None
    if not isinstance(data, list):
        raise SaelabError(f"{path} must hold a JSON list of training-log entries")
    return data


def phase_diagram_to_folder(
    cfg: PhaseDiagramConfig, train_cfg: ToyTrainConfig, out: Path, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Run one batched phase-diagram sweep and write its results folder; return a short summary."""
    cfg.validate()
    train_cfg.validate()
    check_output(out, TOY_FOLDER, overwrite=overwrite)
    start = time.perf_counter()
    model, history = run_phase_diagram(cfg, train_cfg, progress=progress)
    seconds = time.perf_counter() - start
    extra = {"phase": config_to_dict(cfg), "train_seconds": round(seconds, 2)}
    analysis = write_results(out, model, train_cfg, history, extra, n_samples=1024, overwrite=overwrite)
    summary = summarize(model, analysis, out, seconds)
    cells = [phase for row in analysis["phase_diagram"]["phase"] for phase in row]
    summary["phase_counts"] = {name: cells.count(i) for i, name in enumerate(PHASES)}
    del summary["instances"]
    return summary


def summarize(model: ToyModel, analysis: dict[str, Any], out: Path, seconds: float | None = None) -> dict[str, Any]:
    """What the CLI prints and the demo reports: where the folder is, and per instance what formed."""
    summary: dict[str, Any] = {"out": str(out), "figures": analysis["figures"]}
    if seconds is not None:
        summary["train_seconds"] = round(seconds, 2)
    if model.cfg.d_hidden == 2:
        summary["regular_polygons"] = int(is_regular_polygon(model.W.detach()).sum())
    summary["instances"] = [
        {
            "instance": inst["instance"],
            "feature_probability": inst["features"]["feature_probability"][0],
            "loss": inst["loss"],
            "n_represented": inst["n_represented"],
            "dims_per_feature": inst["dims_per_feature"],
            "geometry": inst["geometry"],
        }
        for inst in analysis["instances"]
    ]
    return summary


def run_toy_lab(out_dir: str | Path, quick: bool = False, progress: bool = False) -> dict[str, Any]:
    """The toy lab on built-in defaults, one results folder per experiment under `out_dir`:

    - `pentagon/`: 5 features in 2 dimensions at feature probability 0.05, 8 instances;
    - `importance/`: 20 features in 5 dimensions, importance 0.7^i, feature probability 1 … 0.003;
    - `dimensionality/`: 30 features in 6 dimensions, equal importance, the same densities;
    - `phase_n2_m1/`, `phase_n3_m2/`: phase diagrams of the extra feature (20×20, or 6×6 when `quick`).

    Returns (and writes as `summary.json`) what each produced. `quick` shrinks steps and grids for smoke tests.
    """
    out_dir = Path(out_dir)
    train = ToyTrainConfig(steps=300, batch_size=256) if quick else ToyTrainConfig()
    start = time.perf_counter()
    summary: dict[str, Any] = {"out": str(out_dir), "quick": quick}
    summary["pentagon"] = train_to_folder(
        ToyModelConfig(n_features=5, d_hidden=2, n_instances=8, feature_probability=0.05),
        train,
        out_dir / "pentagon",
        progress,
    )
    densities = [round(p, 6) for p in torch.logspace(0, -2.5, 6 if quick else 11).tolist()]
    summary["importance"] = train_to_folder(  # the paper's opening figure: WᵀW as sparsity grows
        ToyModelConfig(
            n_features=20, d_hidden=5, n_instances=len(densities), feature_probability=densities, importance_decay=0.7
        ),
        train,
        out_dir / "importance",
        progress,
    )
    summary["dimensionality"] = train_to_folder(  # equal importance, so features settle on geometry plateaus
        ToyModelConfig(n_features=30, d_hidden=6, n_instances=len(densities), feature_probability=densities),
        train,
        out_dir / "dimensionality",
        progress,
    )
    phase_train = phase_train_config()
    if quick:
        phase_train.steps = 200
    for n, m, replicas in ((2, 1, 6), (3, 2, 4)):  # two dimensions have no sign trap (see PhaseDiagramConfig)
        cfg = PhaseDiagramConfig(n_features=n, d_hidden=m, grid=6 if quick else 20, replicas=2 if quick else replicas)
        summary[f"phase_n{n}_m{m}"] = phase_diagram_to_folder(cfg, phase_train, out_dir / f"phase_n{n}_m{m}", progress)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
