"""Figures of the toy lab: features in 2D, WᵀW, dimensionality vs sparsity, loss vs importance, phase diagrams.

PNGs are drawn with matplotlib's object API (no pyplot state, no display needed); the two figures that reward
hovering (dimensionality scatter, phase diagram) also come as self-contained plotly HTML with plotly.js inlined,
so they open offline. Every file is written atomically.
"""

from __future__ import annotations

import io
import itertools
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Patch

from saelab.io import atomic_write_bytes, atomic_write_text
from saelab.toy.analysis import GEOMETRY_PLATEAUS
from saelab.toy.phase import PHASES

PHASE_COLORS = ("#d9d9d9", "#3b6fb6", "#c8413b")  # not represented, dedicated, superposition (as in the paper)


def _save_png(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


PLOTLY_JS = "plotly.min.js"


def _save_html(fig: Any, path: Path) -> Path:
    """An interactive figure that works offline: every figure of a results folder shares one copy of plotly.js
    (4.8 MB), written beside them once, instead of embedding its own."""
    import plotly.offline

    path = Path(path)
    library = path.parent / PLOTLY_JS
    if not library.is_file():
        atomic_write_text(library, plotly.offline.get_plotlyjs())
    atomic_write_text(path, fig.to_html(include_plotlyjs=PLOTLY_JS, full_html=True))
    return path


def _panel_instances(n_instances: int, max_panels: int) -> list[int]:
    """At most `max_panels` instances, evenly spread, so a 400-instance sweep still gives a readable grid."""
    if n_instances <= max_panels:
        return list(range(n_instances))
    return sorted({round(i * (n_instances - 1) / (max_panels - 1)) for i in range(max_panels)})


def _panel_grid(n_panels: int, size: float, right: float = 0.0, max_cols: int = 8) -> tuple[Figure, list]:
    """A grid of square panels `size` inches wide, 0.6 inch on top for the title, `right` inches spare."""
    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    width, height = size * cols + right, size * rows + 0.6
    fig = Figure(figsize=(width, height))
    # Fixed margins instead of a layout engine: many small panels make constrained layout the slowest step.
    fig.subplots_adjust(
        left=0.1 / width,
        right=1 - (right + 0.1) / width,
        bottom=0.1 / height,
        top=1 - 0.6 / height,
        wspace=0.15,
        hspace=0.3,
    )
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def plot_features_2d(
    W: torch.Tensor,
    path: Path,
    importance: torch.Tensor | None = None,
    titles: list[str] | None = None,
    max_panels: int = 16,
) -> Path:
    """One panel per instance: each feature's embedding W_i drawn from the origin, coloured by importance.

    `W [instances, d_hidden ≤ 2, n_features]`; a 1-dimensional hidden space is drawn on the x-axis.
    """
    W = W.detach().cpu()
    if W.shape[1] > 2:
        raise ValueError(f"features in 2D needs d_hidden <= 2, got {W.shape[1]}")
    if W.shape[1] == 1:
        W = torch.cat([W, torch.zeros_like(W)], dim=1)
    instances = _panel_instances(W.shape[0], max_panels)
    fig, axes = _panel_grid(len(instances), 2.0)
    limit = max(1.2, 1.1 * W.norm(dim=1).max().item())
    for ax, inst in zip(axes, instances, strict=True):
        relative = importance[inst] / importance[inst].max() if importance is not None else torch.ones(W.shape[-1])
        colors = colormaps["viridis"](0.9 - 0.75 * relative.cpu().numpy())  # important: dark
        points = W[inst].T.numpy()  # [feat, 2]
        ax.add_patch(Circle((0, 0), 1.0, fill=False, color="#dddddd", lw=0.6))
        ax.add_collection(LineCollection([[(0, 0), tuple(p)] for p in points], colors=colors, linewidths=1.5))
        ax.scatter(points[:, 0], points[:, 1], c=colors, s=14, zorder=3)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(titles[inst] if titles else f"instance {inst}", fontsize=8)
    fig.suptitle("Features in the hidden space (grey circle: norm 1; colour: importance, dark = high)", fontsize=10)
    return _save_png(fig, path)


def plot_wtw(W: torch.Tensor, path: Path, titles: list[str] | None = None, max_panels: int = 16) -> Path:
    """WᵀW per instance: the diagonal is each feature's squared norm, off-diagonal entries its interference."""
    W = W.detach().cpu()
    instances = _panel_instances(W.shape[0], max_panels)
    fig, axes = _panel_grid(len(instances), 1.8, right=1.0)
    gram = torch.einsum("ihf,ihg->ifg", W, W)
    image = None
    for ax, inst in zip(axes, instances, strict=True):
        image = ax.imshow(gram[inst].numpy(), cmap="RdBu", vmin=-1, vmax=1)
        ax.set_axis_off()
        ax.set_title(titles[inst] if titles else f"instance {inst}", fontsize=8)
    width, _ = fig.get_size_inches()
    fig.colorbar(image, cax=fig.add_axes((1 - 0.8 / width, 0.15, 0.12 / width, 0.6)), label="W_i · W_j")
    fig.suptitle("WᵀW (blue: positive, red: negative)", fontsize=10)
    return _save_png(fig, path)


def _dimensionality_points(analysis: dict[str, Any]) -> dict[str, list]:
    points: dict[str, list] = {"x": [], "dim": [], "instance": [], "feature": [], "geometry": [], "norm": []}
    for inst in analysis["instances"]:
        features = inst["features"]
        for i, (p, dim) in enumerate(zip(features["feature_probability"], features["dimensionality"], strict=True)):
            points["x"].append(1 / p)
            points["dim"].append(dim)
            points["instance"].append(inst["instance"])
            points["feature"].append(i)
            points["geometry"].append(inst["geometry"][i])
            points["norm"].append(features["norm"][i])
    return points


def plot_dimensionality(analysis: dict[str, Any], path: Path, html_path: Path | None = None) -> Path:
    """Each feature's dimensionality against 1/(1−S) = 1/p, with D* per instance and the geometry plateaus."""
    points = _dimensionality_points(analysis)
    dstar_x = [1 / inst["features"]["feature_probability"][0] for inst in analysis["instances"]]
    dstar = [inst["dims_per_feature"] for inst in analysis["instances"]]
    order = sorted(range(len(dstar_x)), key=dstar_x.__getitem__)

    fig = Figure(figsize=(7.5, 4.5))
    fig.subplots_adjust(left=0.09, right=0.78, bottom=0.12, top=0.92)
    ax = fig.add_subplot()
    for name, value in GEOMETRY_PLATEAUS.items():
        if value > 0:
            ax.axhline(value, color="#bbbbbb", lw=0.8, ls="--", zorder=0)
            ax.text(
                1.005,
                value,
                f"{name} ({_fraction(value)})",
                transform=ax.get_yaxis_transform(),
                fontsize=7,
                va="top" if value == GEOMETRY_PLATEAUS["square antiprism"] else "bottom",  # it sits just below 2/5
                color="#666666",
            )
    ax.scatter(points["x"], points["dim"], s=14, alpha=0.6, color="#3b6fb6", label="feature dimensionality D_i")
    ax.plot([dstar_x[i] for i in order], [dstar[i] for i in order], "k-", lw=1.2, label="D* = m / ‖W‖²_F")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.1)
    ax.set_xlabel("1 / (1 − S)  (= 1 / feature probability)")
    ax.set_ylabel("dimensions per feature")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Feature dimensionality vs sparsity", fontsize=10)
    _save_png(fig, path)
    if html_path is not None:
        _dimensionality_html(points, dstar_x, dstar, order, html_path)
    return Path(path)


def _fraction(value: float) -> str:
    return str(Fraction(value).limit_denominator(10))


def _dimensionality_html(points: dict[str, list], dstar_x: list, dstar: list, order: list, path: Path) -> Path:
    import plotly.graph_objects as go

    hover = [
        f"instance {i}, feature {f}<br>D = {d:.3f}, ‖W‖ = {n:.2f}<br>{g}"
        for i, f, d, n, g in zip(
            points["instance"], points["feature"], points["dim"], points["norm"], points["geometry"], strict=True
        )
    ]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=points["x"],
            y=points["dim"],
            mode="markers",
            name="feature dimensionality",
            text=hover,
            hoverinfo="text",
            marker={"size": 6, "opacity": 0.6},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[dstar_x[i] for i in order],
            y=[dstar[i] for i in order],
            mode="lines+markers",
            name="D* = m / ‖W‖²_F",
            line={"color": "black"},
        )
    )
    for name, value in GEOMETRY_PLATEAUS.items():
        if value > 0:
            fig.add_hline(y=value, line_dash="dash", line_color="#bbbbbb", annotation_text=name)
    fig.update_layout(
        title="Feature dimensionality vs sparsity",
        xaxis_type="log",
        template="plotly_white",
        xaxis_title="1 / (1 − S)",
        yaxis_title="dimensions per feature",
    )
    return _save_html(fig, path)


def plot_loss_vs_importance(analysis: dict[str, Any], path: Path) -> Path:
    """Per feature against its importance: the capacity it got, ∂L/∂I (the error left on it), and −dL_i/dC_i
    (the marginal benefit of capacity). Lines join the features of one instance; colour is its density."""
    panels = [
        ("capacity", "capacity C_i", 1.0, "linear"),
        ("dloss_dimportance", "∂L/∂I_i  (= error left on the feature)", 1.0, "log"),
        ("dloss_dcapacity", "−dL_i/dC_i  (marginal benefit of capacity)", -1.0, "symlog"),
    ]
    densities = [inst["features"]["feature_probability"][0] for inst in analysis["instances"]]
    importances = [i for inst in analysis["instances"] for i in inst["features"]["importance"] if i > 0]
    importance_spread = max(importances) / min(importances) if importances else 1.0
    norm = LogNorm(min(densities), max(densities)) if min(densities) < max(densities) else None
    cmap = colormaps["plasma"]
    fig = Figure(figsize=(12, 3.6))
    fig.subplots_adjust(left=0.05, right=0.88, bottom=0.15, top=0.84, wspace=0.3)
    for k, (key, label, sign, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for inst, density in zip(analysis["instances"], densities, strict=True):
            features = inst["features"]
            points = [
                (i, sign * v) for i, v in zip(features["importance"], features[key], strict=True) if v is not None
            ]
            if points:
                color = cmap(0.85 * norm(density)) if norm else cmap(0.4)
                ax.plot(*zip(*sorted(points), strict=True), "o-", ms=3, lw=0.7, alpha=0.8, color=color)
        ax.set_xlabel("importance I_i")
        if importance_spread > 20:
            ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        if scale == "log":
            ax.set_yscale("log")
        elif scale == "symlog":
            ax.set_yscale("symlog", linthresh=1e-4)
    if norm is not None:
        scalar_map = ScalarMappable(norm=norm, cmap=ListedColormap(cmap(torch.linspace(0, 0.85, 64).numpy())))
        fig.colorbar(scalar_map, cax=fig.add_axes((0.91, 0.15, 0.012, 0.69)), label="feature probability")
    fig.suptitle("Loss vs importance per feature", fontsize=10)
    return _save_png(fig, path)


def plot_phase_diagram(result: dict[str, Any], path: Path, html_path: Path | None = None, title: str = "") -> Path:
    """Phase of the extra feature per (relative importance, density) cell, log axes, as in Elhage et al."""
    importance, density, phase = result["relative_importance"], result["density"], result["phase"]
    fig = Figure(figsize=(5.2, 4.6))
    fig.subplots_adjust(left=0.15, right=0.95, bottom=0.22, top=0.92)
    ax = fig.add_subplot()
    ax.pcolormesh(
        _log_edges(importance),
        _log_edges(density),
        phase,
        cmap=ListedColormap(PHASE_COLORS),
        vmin=-0.5,
        vmax=len(PHASES) - 0.5,
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("relative importance of the extra feature")
    ax.set_ylabel("feature density (1 − S)")
    ax.set_title(title or "Phase diagram", fontsize=10)
    handles = [Patch(color=color, label=name) for color, name in zip(PHASE_COLORS, PHASES, strict=True)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8, frameon=False)
    _save_png(fig, path)
    if html_path is not None:
        _phase_html(result, html_path, title)
    return Path(path)


def _log_edges(centres: list[float]) -> list[float]:
    """Cell edges for log-spaced centres (geometric midpoints, extended by half a step at both ends)."""
    if len(centres) == 1:
        return [centres[0] / 1.5, centres[0] * 1.5]
    logs = [math.log(c) for c in centres]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(logs)]
    return [math.exp(v) for v in [2 * logs[0] - mids[0], *mids, 2 * logs[-1] - mids[-1]]]


def _phase_html(result: dict[str, Any], path: Path, title: str) -> Path:
    import plotly.graph_objects as go

    hover = [
        [
            f"importance {imp:.3g}, density {dens:.3g}<br>{PHASES[ph]}<br>‖W_extra‖ = {norm:.2f}, D = {dim:.2f}"
            for imp, ph, norm, dim in zip(result["relative_importance"], phases, norms, dims, strict=True)
        ]
        for dens, phases, norms, dims in zip(
            result["density"], result["phase"], result["extra_norm"], result["extra_dimensionality"], strict=True
        )
    ]
    n = len(PHASES)
    colorscale = [[edge / n, color] for i, color in enumerate(PHASE_COLORS) for edge in (i, i + 1)]
    fig = go.Figure(
        go.Heatmap(
            x=result["relative_importance"],
            y=result["density"],
            z=result["phase"],
            text=hover,
            hoverinfo="text",
            zmin=-0.5,
            zmax=n - 0.5,
            colorscale=colorscale,
            colorbar={"tickvals": list(range(n)), "ticktext": list(PHASES)},
        )
    )
    fig.update_layout(
        title=title or "Phase diagram",
        xaxis_type="log",
        yaxis_type="log",
        template="plotly_white",
        xaxis_title="relative importance of the extra feature",
        yaxis_title="feature density",
    )
    return _save_html(fig, path)
