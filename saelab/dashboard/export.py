"""Exports of a dashboard site: one self-contained HTML file for a handful of latents, and Neuronpedia-style JSON.

The single file inlines the stylesheet and the renderer, and embeds the data as JSON in
`<script type="application/json">` (with `<`, `>`, `&`, U+2028, U+2029 escaped, so nothing in it can close the
element or open a comment). A Content-Security-Policy meta tag allows exactly the inline script and style shipped
with saelab, by hash, so injected markup could not run even if escaping failed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

from saelab.dashboard.site import read_data_script, read_site, safe_json, static_text
from saelab.dashboard.stats import BINS_PER_DECADE, LOG10_LO
from saelab.errors import SaelabError
from saelab.io import atomic_write_text, check_output_file, file_starts_with

MAX_EXPORT_LATENTS = 64
GENERATOR_TAG = '<meta name="generator" content="saelab export">'


def _is_export(path: Path) -> bool:
    return file_starts_with(path, GENERATOR_TAG.encode())


def _is_neuronpedia_batch(path: Path) -> bool:
    return file_starts_with(path, b'{"model_id": ', within=16)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _load(site: Path, latents: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    read_site(site)
    _, index = read_data_script(site / "data" / "index.js")
    pages = {}
    for latent in latents:
        path = site / "data" / "latents" / f"{int(latent)}.js"
        if not path.is_file():
            raise SaelabError(f"latent {latent} is not in the dashboard {site}; pick ids from its index")
        pages[str(int(latent))] = read_data_script(path)[1]
    return index, pages


def _subset_index(index: dict[str, Any], latents: list[int]) -> dict[str, Any]:
    """The index restricted to the exported latents (same columns, fewer rows)."""
    rows = [index["columns"]["id"].index(latent) for latent in latents]
    columns = {name: [values[i] for i in rows] for name, values in index["columns"].items()}
    return {"meta": {**index["meta"], "latents": list(latents)}, "columns": columns}


def export_html(site: Path | str, latents: list[int], out: Path | str, overwrite: bool = False) -> Path:
    """One HTML file that shows `latents` of the dashboard in `site`, offline, with no other file.

    An existing `out` is replaced only if it is an earlier export, or with `overwrite`; never a file of the site.
    """
    site = Path(site)
    out = check_output_file(out, _is_export, [site], overwrite, what="HTML export")
    latents = list(dict.fromkeys(int(x) for x in latents))
    if not 0 < len(latents) <= MAX_EXPORT_LATENTS:
        raise SaelabError(
            f"export between 1 and {MAX_EXPORT_LATENTS} latents (got {len(latents)}); share a site for more"
        )
    index, pages = _load(site, latents)
    script, style = static_text("dashboard.js"), static_text("style.css")
    for name, text in (("dashboard.js", script), ("style.css", style)):
        if re.search(r"</(script|style)|<!--", text, re.IGNORECASE):
            raise SaelabError(f"saelab's {name} cannot be inlined (it contains a closing tag); reinstall saelab")
    data = safe_json({"index": _subset_index(index, latents), "latents": pages})
    csp = f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; img-src data:"
    title = f"saelab latents {', '.join(map(str, latents[:8]))}" + (" …" if len(latents) > 8 else "")
    body = static_text("index.html")
    shell = body[body.index("<body>") + len("<body>") : body.index("</body>")]
    page = (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{html.escape(csp, quote=False)}\">\n"
        f"{GENERATOR_TAG}\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{style}</style>\n</head>\n<body>{shell}"
        f"<script type=\"application/json\" id=\"saelab-data\">{data}</script>\n"
        f"<script>{script}</script>\n</body>\n</html>\n"
    )  # fmt: skip
    atomic_write_text(out, page)
    return out


def neuronpedia_feature(page: dict[str, Any], bins: int = 40) -> dict[str, Any]:
    """One latent in the JSON layout SAEDashboard writes for Neuronpedia, plus saelab's own fields under `saelab`."""
    logits = page.get("logits") or {"top": [], "bottom": []}
    heights, values = _linear_histogram(page.get("hist"), page.get("max") or 0.0, bins)
    activations = []
    windows = page.get("windows") or {"top": [], "intervals": []}
    for window in windows["top"]:
        activations.append(_np_window(window, -1.0, -1.0, -1.0))
    for interval in windows["intervals"]:
        for window in interval["windows"]:
            share = interval["q"][1] - interval["q"][0]
            activations.append(_np_window(window, interval["lo"], interval["hi"], share))
    return {
        "feature_index": page["id"],
        "pos_str": [t for t, _ in logits["top"]],
        "pos_values": [v for _, v in logits["top"]],
        "neg_str": [t for t, _ in logits["bottom"]],
        "neg_values": [v for _, v in logits["bottom"]],
        "frac_nonzero": page["density"],
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": values,
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "activations": activations,
        "topkCosSimIndices": [i for i, _ in page.get("neighbours", [])],
        "topkCosSimValues": [c for _, c in page.get("neighbours", [])],
        "correlated_features_indices": [i for i, _ in page.get("correlated", [])],
        "correlated_features_pearson": [r for _, r in page.get("correlated", [])],
        "saelab": {k: page.get(k) for k in ("importance", "helps", "errors", "quantiles", "ground_truth")},
    }


def _np_window(window: dict[str, Any], lo: float, hi: float, share: float) -> dict[str, Any]:
    return {
        "bin_min": lo,
        "bin_max": hi,
        "bin_contains": share,
        "tokens": window["tokens"],
        "values": [a or 0.0 for a in window["acts"]],
        "qualifying_token_index": window["center"],
        "loss_values": window["loss"],
    }


def _linear_histogram(hist: dict[str, Any] | None, top: float, bins: int) -> tuple[list[int], list[float]]:
    """Re-bin the fine log-spaced histogram onto `bins` equal-width bins from 0 to the maximum (bar centres)."""
    if not hist or top <= 0:
        return [], []
    heights = [0] * bins
    for i, count in enumerate(hist["counts"]):
        centre = 10 ** (LOG10_LO + (hist["first"] + i + 0.5) / BINS_PER_DECADE)
        heights[min(bins - 1, int(centre / top * bins))] += count
    return heights, [round((b + 0.5) * top / bins, 6) for b in range(bins)]


def export_neuronpedia(
    site: Path | str, out: Path | str, latents: list[int] | None = None, overwrite: bool = False
) -> Path:
    """A Neuronpedia-style batch file of the site's latents (all of them unless listed)."""
    site = Path(site)
    out = check_output_file(out, _is_neuronpedia_batch, [site], overwrite, "--neuronpedia", "Neuronpedia JSON file")
    info = read_site(site)
    _, index = read_data_script(site / "data" / "index.js")
    ids = [int(x) for x in (latents if latents is not None else index["columns"]["id"])]
    _, pages = _load(site, ids)
    meta = index["meta"]
    layer = re.match(r"blocks\.(\d+)\.", meta["hook"])
    batch = {
        "model_id": meta["model"],
        "layer": int(layer.group(1)) if layer else None,
        "sae_set": info.get("sae_dir", ""),
        "hook_name": meta["hook"],
        "features": [neuronpedia_feature(pages[str(i)]) for i in ids],
    }
    atomic_write_text(out, json.dumps(batch, ensure_ascii=False, allow_nan=False) + "\n")
    return out
