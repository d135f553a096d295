"""Development of a toy model over training: loss, local learning coefficient and k-gon at every snapshot.

`llc_over_training` estimates λ̂ (saelab.toy.llc) for every instance at every snapshot of a saved run, all on the
same dataset D_n so that changes along training are not changes of data; `write_llc_folder` writes

    llc.json              settings, and per snapshot and instance: step, loss L_n(w*), λ̂ (mean, chain spread,
                          per chain), drift between the halves of the draws, stationarity flag, k-gon
    llc_traces.safetensors  `step [snapshot]`, `loss_trace [snapshot, instance, chain, sgld_step]`
    development.png       per instance: loss and λ̂ against step (log axes), the k-gon marked where it changes
    plateaus.png          per instance: the features in 2D at the end of each k-gon stretch
    sgld_traces.png       per instance: every chain's minibatch loss at the last snapshot (the SGLD diagnostic)

Chen et al. 2023 report that a TMS model's loss falls in steps as it moves between k-gon critical points and that
λ̂ rises at each step: the loss drops, the model becomes more complex. `transitions` lists those steps per instance.
"""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from saelab.config import config_to_dict
from saelab.errors import SaelabError
from saelab.io import (
    OutputKind,
    atomic_write_bytes,
    atomic_write_json,
    check_output,
    json_format_marker,
    output_folder,
    save_tensors,
)
from saelab.toy.analysis import kgon_name
from saelab.toy.llc import LLCConfig, toy_dataset, toy_llc
from saelab.toy.model import ToyModel, load_toy_model
from saelab.toy.plots import plot_features_2d
from saelab.toy.snapshots import SNAPSHOTS_FILE, load_snapshot_into, load_snapshots

FORMAT_NAME = "saelab.toy_llc"
LLC_FOLDER = OutputKind(
    "saelab LLC folder", ("llc.json", "llc_traces.safetensors", "*.png"), json_format_marker("llc.json", FORMAT_NAME)
)


def stationary(llc_mean: float, llc_std: float, drift: float) -> bool:
    """Whether a chain's loss stopped moving: the drift between the halves of the draws is within twice the
    chain-to-chain spread or 10 % of λ̂, whichever is larger (a heuristic; look at the trace when it fails)."""
    return math.isfinite(drift) and abs(drift) <= max(2 * llc_std, 0.1 * abs(llc_mean))


def llc_over_training(directory: Path, cfg: LLCConfig, progress: bool = True) -> dict[str, Any]:
    """λ̂ with its diagnostics at every snapshot of the toy run in `directory` (its final weights when it kept
    no snapshots). Returns the JSON-ready report plus `loss_trace`, `steps` and `W` tensors for the figures."""
    cfg.validate()
    model, train_cfg = load_toy_model(directory)
    if (Path(directory) / SNAPSHOTS_FILE).is_file():
        snapshots = load_snapshots(directory, model)
    else:
        final_step = train_cfg.steps if train_cfg is not None else 0
        snapshots = {"step": torch.tensor([final_step])}
        snapshots.update({name: param.detach()[None].clone() for name, param in model.named_parameters()})
    data = toy_dataset(model, cfg.n_samples, cfg.seed)
    steps = snapshots["step"].tolist()
    rows: list[dict[str, Any]] = []
    traces = []
    for index in tqdm(range(len(steps)), disable=not progress, desc="LLC per snapshot", dynamic_ncols=True):
        load_snapshot_into(model, snapshots, index)
        estimate = toy_llc(model, cfg, data)
        traces.append(estimate.loss_trace.float())
        names = kgon_name(model.W) if model.cfg.d_hidden == 2 else [""] * model.cfg.n_instances
        instances = []
        for i in range(model.cfg.n_instances):
            mean, std, drift = (float(t[i]) for t in (estimate.llc_mean, estimate.llc_std, estimate.drift))
            diverged = bool(estimate.diverged[i])
            instances.append(
                {
                    "instance": i,
                    "loss": _round(float(estimate.init_loss[i])),
                    "llc": None if diverged else _round(mean),
                    "llc_std": None if diverged else _round(std),
                    "llc_per_chain": [None if diverged else _round(float(v)) for v in estimate.llc_per_chain[i]],
                    "drift": None if diverged else _round(drift),
                    "stationary": not diverged and stationary(mean, std, drift),
                    "diverged": diverged,
                    "distance": _round(float(estimate.distance[i].mean())),
                    "kgon": names[i],
                }
            )
        rows.append({"step": steps[index], "instances": instances})
    report = {
        "format": FORMAT_NAME,
        "source": str(directory),
        "estimator": "llc = nbeta * (mean SGLD minibatch loss after burn-in - L_n(w*)), nbeta = n / log n",
        "llc": config_to_dict(cfg),
        "nbeta": _round(cfg.nbeta),
        "n_instances": model.cfg.n_instances,
        "snapshots": rows,
        "transitions": transitions(rows),
        "_tensors": {"step": snapshots["step"], "loss_trace": torch.stack(traces), "W": snapshots["W"]},
        "_model": model,
    }
    report["development"] = development_summary(report)
    return report


def transitions(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Per instance, every change of k-gon between consecutive snapshots, with loss and λ̂ on both sides."""
    per_instance: list[list[dict[str, Any]]] = []
    for i in range(len(rows[0]["instances"])):
        changes = []
        for before, after in itertools.pairwise(rows):
            a, b = before["instances"][i], after["instances"][i]
            if a["kgon"] != b["kgon"]:
                changes.append(
                    {
                        "step": after["step"],
                        "from": a["kgon"],
                        "to": b["kgon"],
                        "loss_before": a["loss"],
                        "loss_after": b["loss"],
                        "llc_before": a["llc"],
                        "llc_after": b["llc"],
                    }
                )
        per_instance.append(changes)
    return per_instance


def plateaus(rows: list[dict[str, Any]], instance: int) -> list[dict[str, Any]]:
    """Stretches of consecutive snapshots where `instance` is one regular k-gon, each with its last snapshot's
    step, loss and λ̂ (the most settled point of the stretch). Irregular shapes between them are left out."""
    stretches: list[dict[str, Any]] = []
    for row in rows:
        cell = row["instances"][instance]
        if "irregular" in cell["kgon"]:
            continue
        point = {"kgon": cell["kgon"], "step": row["step"], "loss": cell["loss"], "llc": cell["llc"],
                 "settled": bool(cell.get("stationary", True)) and (cell["llc"] or 0) >= 0}  # fmt: skip
        if stretches and stretches[-1]["kgon"] == cell["kgon"]:
            stretches[-1].update(point)
        else:
            stretches.append({**point, "first_step": row["step"]})
    return stretches


def development_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What Chen et al. 2023 look for, over all instances (seeds):

    - `final`: per k-gon at the last snapshot, how many instances, and the mean and spread of loss and λ̂;
    - `transitions`: per change between consecutive regular k-gon plateaus (e.g. '4-gon → 5-gon'), how many,
      how many lowered the loss and how many raised λ̂, the mean changes, and how many had *settled* estimates
      at both ends (stationary chains, λ̂ ≥ 0: the snapshot sits near a critical point) with how many of those
      raised λ̂. Estimates on the slide between plateaus are negative or drifting; only settled ones test the claim.
    """
    rows = report["snapshots"]
    final: dict[str, dict[str, list[float]]] = {}
    for cell in rows[-1]["instances"]:
        entry = final.setdefault(cell["kgon"], {"loss": [], "llc": []})
        entry["loss"].append(cell["loss"])
        if cell["llc"] is not None:
            entry["llc"].append(cell["llc"])
    changes: dict[str, dict[str, Any]] = {}
    for i in range(len(rows[0]["instances"])):
        for before, after in itertools.pairwise(plateaus(rows, i)):
            if None in (before["llc"], after["llc"], before["loss"], after["loss"]):
                continue
            entry = changes.setdefault(
                f"{before['kgon']} → {after['kgon']}", {"d_loss": [], "d_llc": [], "settled": []}
            )
            entry["d_loss"].append(after["loss"] - before["loss"])
            entry["d_llc"].append(after["llc"] - before["llc"])
            entry["settled"].append(before["settled"] and after["settled"])
    return {
        "final": {
            name: {"instances": len(v["loss"]), **_mean_sd("loss", v["loss"]), **_mean_sd("llc", v["llc"])}
            for name, v in sorted(final.items(), key=lambda item: -len(item[1]["loss"]))
        },
        "transitions": {
            name: {
                "count": len(v["d_llc"]),
                "loss_fell": sum(d < 0 for d in v["d_loss"]),
                "llc_rose": sum(d > 0 for d in v["d_llc"]),
                "settled": sum(v["settled"]),
                "settled_llc_rose": sum(d > 0 for d, ok in zip(v["d_llc"], v["settled"], strict=True) if ok),
                **_mean_sd("d_loss", v["d_loss"]),
                **_mean_sd("d_llc", v["d_llc"]),
            }
            for name, v in sorted(changes.items(), key=lambda item: -len(item[1]["d_llc"]))
        },
    }


def _mean_sd(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {name: None, f"{name}_sd": None}
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {name: _round(mean), f"{name}_sd": _round(sd)}


def _round(value: float) -> float | None:
    return float(f"{value:.6g}") if math.isfinite(value) else None


def write_llc_folder(
    report: dict[str, Any],
    out: Path,
    shown: list[int] | None = None,
    inputs: tuple[Path, ...] = (),
    overwrite: bool = False,
) -> list[str]:
    """Write llc.json, llc_traces.safetensors and the figures into `out`, atomically; return the file names.
    The figures show the instances in `shown` (default: the first 16). `out` is checked and replaced as
    `saelab.io.output_folder` says (`inputs`: the toy run it was estimated on)."""
    tensors, model = report["_tensors"], report["_model"]
    json_ready = {key: value for key, value in report.items() if not key.startswith("_")}
    with output_folder(out, LLC_FOLDER, inputs, overwrite) as tmp:
        atomic_write_json(tmp / "llc.json", json_ready)
        save_tensors(tmp / "llc_traces.safetensors", {"step": tensors["step"], "loss_trace": tensors["loss_trace"]})
        names = ["llc.json", "llc_traces.safetensors"]
        shown = shown if shown is not None else list(range(min(model.cfg.n_instances, 16)))
        _save(plot_development(json_ready, shown), tmp / "development.png")
        _save(plot_sgld_traces(tensors["loss_trace"][-1], report, shown), tmp / "sgld_traces.png")
        names += ["development.png", "sgld_traces.png"]
        if model.cfg.d_hidden == 2:
            plot_plateaus(json_ready, tensors["W"], model, shown[:8], tmp / "plateaus.png")
            names.append("plateaus.png")
    return names


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def _grid(n_panels: int, width: float, height: float, cols: int = 4) -> tuple[Figure, list]:
    cols = min(cols, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows + 0.5), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]


def plot_development(report: dict[str, Any], instances: list[int]) -> Figure:
    """Loss (log) and λ̂ (± chain spread) against step (log), with a dotted line and the k-gon's name where a regular
    k-gon plateau begins. Negative λ̂ (a snapshot far from any minimum: the chains slide downhill) would dwarf the
    rest, so the λ̂ axis stops a little below 0 and such points sit on its lower edge as triangles."""
    fig, axes = _grid(len(instances), 3.6, 2.6)
    steps = [row["step"] for row in report["snapshots"]]
    for ax, i in zip(axes, instances, strict=True):
        cells = [row["instances"][i] for row in report["snapshots"]]
        loss = [c["loss"] if c["loss"] and c["loss"] > 0 else math.nan for c in cells]
        llc = [c["llc"] if c["llc"] is not None else math.nan for c in cells]
        spread = [c["llc_std"] if c["llc_std"] is not None else math.nan for c in cells]
        ax.plot(steps, loss, color="#3b6fb6", marker="o", ms=2.5, lw=1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss L_n(w)", color="#3b6fb6", fontsize=8)
        twin = ax.twinx()
        shown = [v if v >= 0 else math.nan for v in llc]
        twin.errorbar(steps, shown, yerr=spread, color="#c8413b", marker="s", ms=2.5, lw=1.2, capsize=1.5)
        top = max([v for v in shown if not math.isnan(v)], default=1.0) * 1.1 or 1.0
        bottom = -0.08 * top
        twin.set_ylim(bottom, top)
        below = [s for s, v in zip(steps, llc, strict=True) if v < 0]
        twin.scatter(below, [bottom] * len(below), marker="v", color="#c8413b", s=14, clip_on=False)
        unsettled = [(s, v) for s, v, c in zip(steps, shown, cells, strict=True) if not c["stationary"] and v >= 0]
        if unsettled:
            twin.scatter(*zip(*unsettled, strict=True), s=30, facecolors="none", edgecolors="k")
        twin.set_ylabel("LLC λ̂", color="#c8413b", fontsize=8)
        for stretch in plateaus(report["snapshots"], i):
            ax.axvline(stretch["first_step"], color="#999999", ls=":", lw=0.8)
            ax.text(stretch["first_step"], 1.0, f" {stretch['kgon']}", transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="left", fontsize=7)  # fmt: skip
        ax.tick_params(labelsize=7)
        twin.tick_params(labelsize=7)
        ax.set_title(f"instance {i}", fontsize=9)
    fig.suptitle("Loss (blue) and LLC λ̂ (red, ± chain spread; ringed: drifting; ▼: below 0) against training step; "
                 "dotted: a regular k-gon plateau begins", fontsize=9)  # fmt: skip
    return fig


def plot_sgld_traces(trace: torch.Tensor, report: dict[str, Any], instances: list[int]) -> Figure:
    """Every chain's minibatch loss along SGLD at the last snapshot, with L_n(w*) and the burn-in marked."""
    fig, axes = _grid(len(instances), 3.2, 2.2)
    burnin = report["llc"]["burnin"]
    last = report["snapshots"][-1]
    for ax, i in zip(axes, instances, strict=True):
        for chain in trace[i]:
            ax.plot(chain.numpy(), lw=0.6, alpha=0.8)
        ax.axhline(last["instances"][i]["loss"], color="k", lw=0.8, ls="--")
        ax.axvline(burnin, color="#999999", lw=0.8, ls=":")
        ax.set_title(f"instance {i}: λ̂ = {last['instances'][i]['llc']}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"SGLD minibatch loss per chain at step {last['step']} (dashed: L_n(w*); dotted: end of burn-in; "
                 f"ε = {report['llc']['step_size']}, γ = {report['llc']['localization']}, nβ = {report['nbeta']})",
                 fontsize=9)  # fmt: skip
    return fig


def plot_plateaus(report: dict[str, Any], W: torch.Tensor, model: ToyModel, instances: list[int], path: Path) -> None:
    """The features in 2D at the last snapshot of every regular k-gon plateau, and at the end, per instance."""
    rows = report["snapshots"]
    steps = [row["step"] for row in rows]
    panels, titles, importance = [], [], []
    for i in instances:
        ends = [stretch["step"] for stretch in plateaus(rows, i)]
        for step in sorted({*ends, steps[-1]}):
            index = steps.index(step)
            cell = rows[index]["instances"][i]
            llc = "n/a" if cell["llc"] is None else f"{cell['llc']:.3g}"
            panels.append(W[index, i])
            titles.append(f"#{i} step {step}\n{cell['kgon']}, λ̂ {llc}")
            importance.append(model.importance[i].detach().cpu())
    plot_features_2d(torch.stack(panels), path, torch.stack(importance), titles, max_panels=len(panels))


def llc_folder(
    directory: Path,
    cfg: LLCConfig,
    out: Path | None = None,
    progress: bool = True,
    shown: list[int] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`saelab toy llc DIR`: estimate along training and write the results to `out` (default `DIR_llc`);
    the figures show the instances in `shown` (default: the first 16)."""
    directory = Path(directory)
    out = Path(out) if out is not None else directory.with_name(directory.name + "_llc")
    check_output(out, LLC_FOLDER, (directory,), overwrite)  # before the work, not after it
    model, _ = load_toy_model(directory)
    if shown is not None and (not shown or not all(0 <= i < model.cfg.n_instances for i in shown)):
        raise SaelabError(f"--instances must list instances from 0 to {model.cfg.n_instances - 1}, got {shown}")
    report = llc_over_training(directory, cfg, progress)
    files = write_llc_folder(report, out, shown, (directory,), overwrite)
    summary = {key: value for key, value in report.items() if not key.startswith("_")}
    return {**summary, "out": str(out), "files": files}
