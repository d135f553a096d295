"""Figures of the toy-model SAE benchmark (`saelab.toy.sae_benchmark`): recovery per feature, and absorption.

Each figure is a PNG (matplotlib's object API) and a self-contained plotly HTML page with plotly.js inlined, so it
opens offline; hovering a point there names its study, instance and feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from saelab.toy.plots import _save_html, _save_png

# x-axes of the recovery figure: the row key, its label, and whether the axis is logarithmic.
RECOVERY_AXES = (
    ("importance", "importance I_i", True),
    ("dimensionality", "dimensionality D_i in the toy model", False),
    ("probability", "feature probability p_i", True),
)
ABSORPTION_BARS = (
    ("absorption_rate", "absorption rate"),
    ("parent_miss_with_child", "parent latent silent, child present"),
    ("parent_miss_alone", "parent latent silent, parent alone"),
)


def plot_recovery(results: dict[str, Any], directory: Path) -> list[str]:
    """recovery.png/.html: per true feature of the independent studies, best (dot) and matched (cross) decoder
    cosine against importance, D_i and probability; one row per architecture, one colour per toy shape."""
    rows = [r for r in results["features"] if r["role"] == "independent"]
    if not rows:
        return []
    architectures = results["architectures"]
    studies = sorted({r["study"] for r in rows})
    colors = {s: colormaps["tab10"](i % 10) for i, s in enumerate(studies)}
    threshold = results["config"]["recovery_threshold"]

    fig = Figure(figsize=(12, 2.4 * len(architectures) + 0.8), layout="constrained")
    axes = fig.subplots(len(architectures), len(RECOVERY_AXES), squeeze=False, sharey=True)
    for row_axes, arch in zip(axes, architectures, strict=True):
        arch_rows = [r for r in rows if r["architecture"] == arch]
        for ax, (key, label, log) in zip(row_axes, RECOVERY_AXES, strict=True):
            for study in studies:
                points = [r for r in arch_rows if r["study"] == study]
                x = [r[key] for r in points]
                faded = ["none" if not r["represented"] else colors[study] for r in points]
                ax.scatter(x, [r["best_cosine"] for r in points], s=14, c=faded, edgecolors=[colors[study]],
                           linewidths=0.6, label=study)  # fmt: skip
                ax.scatter(x, [r["matched_cosine"] for r in points], s=10, marker="x", color=colors[study],
                           alpha=0.35, linewidths=0.6)  # fmt: skip
            ax.axhline(threshold, color="#999999", linestyle="--", linewidth=0.8)
            if log:
                ax.set_xscale("log")
            ax.set_ylim(-0.25, 1.05)
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
        row_axes[0].set_ylabel(f"{arch}\ncosine", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Recovery per true feature: best decoder cosine (dot; hollow: the toy model does not represent it) "
        "and Hungarian-matched cosine (cross)",
        fontsize=10,
    )
    _save_png(fig, directory / "recovery.png")
    _recovery_html(rows, architectures, studies, threshold, directory / "recovery.html")
    return ["recovery.png", "recovery.html"]


def _recovery_html(
    rows: list[dict[str, Any]], architectures: list[str], studies: list[str], threshold: float, path: Path
) -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=len(architectures),
        cols=len(RECOVERY_AXES),
        shared_yaxes=True,
        row_titles=architectures,
        column_titles=[label for _, label, _ in RECOVERY_AXES],
        vertical_spacing=0.04,
    )
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for r, arch in enumerate(architectures, 1):
        for c, (key, _, log) in enumerate(RECOVERY_AXES, 1):
            for s, study in enumerate(studies):
                points = [p for p in rows if p["architecture"] == arch and p["study"] == study]
                hover = [
                    f"{study} #{p['instance']} feature {p['feature']}<br>I = {p['importance']:.3g}, "
                    f"p = {p['probability']:.3g}, D = {p['dimensionality']:.3f}, ‖W‖ = {p['norm']:.2f}<br>"
                    f"best {p['best_cosine']:.3f}, matched {p['matched_cosine']:.3f}"
                    for p in points
                ]
                fig.add_trace(
                    go.Scatter(
                        x=[p[key] for p in points],
                        y=[p["best_cosine"] for p in points],
                        mode="markers",
                        name=study,
                        legendgroup=study,
                        showlegend=r == 1 and c == 1,
                        text=hover,
                        hoverinfo="text",
                        marker={"size": 6, "opacity": 0.7, "color": palette[s % len(palette)]},
                    ),
                    row=r,
                    col=c,
                )
            if log:
                fig.update_xaxes(type="log", row=r, col=c)
            fig.add_hline(y=threshold, line_dash="dash", line_color="#bbbbbb", row=r, col=c)
    fig.update_layout(
        title="Best decoder cosine per true feature (hover for the matched cosine)",
        template="plotly_white",
        height=260 * len(architectures) + 120,
    )
    return _save_html(fig, path)


def plot_absorption(results: dict[str, Any], directory: Path) -> list[str]:
    """absorption.png/.html: per architecture, the absorption rate and the parent latent's miss rates."""
    summary = results["summary"]
    architectures = [a for a in results["architectures"] if summary[a].get("absorption_rate") is not None]
    if not architectures:
        return []
    fig = Figure(figsize=(1.6 * len(architectures) + 2.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(ABSORPTION_BARS)
    for b, (key, label) in enumerate(ABSORPTION_BARS):
        values = [summary[a].get(key) or 0.0 for a in architectures]
        positions = [i + (b - (len(ABSORPTION_BARS) - 1) / 2) * width for i in range(len(architectures))]
        ax.bar(positions, values, width, label=label, color=colormaps["Set2"](b))
    ax.set_xticks(range(len(architectures)), architectures)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of inputs")
    ax.legend(fontsize=8)
    threshold = results["config"]["absorption_threshold"]
    ax.set_title(f"Feature absorption on hierarchical toy features (τ = {threshold:g})", fontsize=10)
    _save_png(fig, directory / "absorption.png")

    import plotly.graph_objects as go

    page = go.Figure(
        [
            go.Bar(name=label, x=architectures, y=[summary[a].get(key) for a in architectures])
            for key, label in ABSORPTION_BARS
        ]
    )
    page.update_layout(
        barmode="group",
        template="plotly_white",
        title=f"Feature absorption on hierarchical toy features (τ = {threshold:g})",
        yaxis={"range": [0, 1], "title": "fraction of inputs"},
    )
    _save_html(page, directory / "absorption.html")
    return ["absorption.png", "absorption.html"]
