"""One latent's page: the typed record both kinds of dashboard (language model and toy model) fill in, and the one
builder that turns statistics, importance and each kind's own parts into pages.

A kind of dashboard adds what only it knows through `PageParts` (token windows and logit effects for a language
model, the matched ground-truth feature for a toy model); a new column (a probe match, a transcoder's output
side) is a new optional field here and in `PageParts`, and nothing else needs to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from saelab.dashboard.importance import Importance, importance_entry
from saelab.dashboard.stats import LatentStats

QUANTILES = (0.5, 0.9, 0.99)


def round_float(x: float | None, digits: int = 5) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


def pairs(keys: list, values: list, digits: int = 5) -> list[list]:
    """[[key, value], ...] with values rounded, dropping non-finite ones (e.g. −inf for 'no such neighbour')."""
    return [[k, round_float(v, digits)] for k, v in zip(keys, values, strict=True) if math.isfinite(v)]


@dataclass
class LatentPage:
    """Everything one latent's page shows (serialised as the JSON of `data/latents/<id>.js`)."""

    id: int
    density: float | None  # firings / tokens scanned
    count: int  # firings
    max: float | None
    mean: float | None  # mean non-zero activation
    quantiles: list[list[float | None]]  # [[q, activation quantile], ...] of the non-zero activations
    hist: dict[str, Any] | None  # {"first": bin, "counts": [...]} on the log-spaced bins of meta.histogram
    importance: dict[str, Any]  # `saelab.dashboard.importance.importance_entry`
    neighbours: list[list]  # [[latent, decoder cosine], ...]
    correlated: list[list]  # [[latent, Pearson r], ...]
    errors: dict[str, Any] = field(default_factory=dict)  # this latent's approximation errors
    helps: dict[str, Any] | None = None  # when the latent helps (language models)
    logits: dict[str, Any] | None = None  # promoted and suppressed tokens (language models; a zoo task: outputs)
    windows: dict[str, Any] | None = None  # top and quantile-interval token windows (language models)
    ground_truth: dict[str, Any] | None = None  # the matched true feature (toy models)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: the parts are JSON-ready already


@dataclass
class PageParts:
    """Per-latent parts (lists as long as the latents, or None) that a kind of dashboard adds to every page."""

    errors: list[dict[str, Any]] | None = None
    helps: list[dict[str, Any] | None] | None = None
    logits: list[dict[str, Any] | None] | None = None
    windows: list[dict[str, Any] | None] | None = None
    ground_truth: list[dict[str, Any] | None] | None = None


def build_pages(
    stats: LatentStats,
    importance: Importance,
    latents: Tensor,
    neighbours: tuple[Tensor, Tensor],
    parts: PageParts,
) -> list[dict[str, Any]]:
    """One page per latent column of `stats`, as JSON-ready dicts."""
    density = stats.density()
    quantiles = stats.quantiles(list(QUANTILES))
    corr = stats.correlations
    pages = []
    for j, latent in enumerate(latents.tolist()):
        count = int(stats.count[j])
        hist = stats.hist[j]
        nz = hist.nonzero().squeeze(1)
        page = LatentPage(
            id=latent,
            density=round_float(density[j].item()),
            count=count,
            max=round_float(stats.max_act[j].item()),
            mean=round_float(stats.act_sum[j].item() / count) if count else None,
            quantiles=[[q, round_float(v)] for q, v in zip(QUANTILES, quantiles[j].tolist(), strict=True)],
            hist={"first": int(nz[0]), "counts": hist[nz[0] : nz[-1] + 1].tolist()} if len(nz) else None,
            importance=importance_entry(importance, j),
            neighbours=pairs(neighbours[0][j].tolist(), neighbours[1][j].tolist(), 4),
            correlated=[] if corr is None else pairs(corr[0][j].tolist(), corr[1][j].tolist(), 4),
            errors=parts.errors[j] if parts.errors else {},
            helps=parts.helps[j] if parts.helps else None,
            logits=parts.logits[j] if parts.logits else None,
            windows=parts.windows[j] if parts.windows else None,
            ground_truth=parts.ground_truth[j] if parts.ground_truth else None,
        )
        pages.append(page.to_json())
    return pages
