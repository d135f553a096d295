"""The static dashboard site: a folder that opens from disk (file://) or through `saelab serve`, with no network.

    SITE/index.html              the page shell (no inline script, so a strict CSP holds)
    SITE/static/dashboard.js     the hand-written renderer, and style.css
    SITE/data/index.js           the table of all latents and the run's metadata
    SITE/data/latents/<id>.js    one latent's page data, loaded only when that page opens
    SITE/site.json               what `saelab serve` needs to run the live view (SAE folder, model, hook), and the
                                 documents the scanned contexts come from
    SITE/tokens.safetensors      the scanned token contexts, `tokens` [n_sequences, T] int32 (language models)

Data files are JavaScript that call `SAELAB.receive(key, data)`: a script tag can load them from file://, where
Chromium refuses fetch(). `data` is JSON with every `<`, `>`, `&`, U+2028 and U+2029 escaped, so no token text
can end a script element or break the JavaScript grammar, whatever the file is embedded in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from saelab.config import load_json
from saelab.dashboard.compute import Dashboard
from saelab.errors import SaelabError
from saelab.io import OutputKind, atomic_write_json, json_format_marker, output_folder, save_tensors

TOKENS_FILE = "tokens.safetensors"
FORMAT_NAME = "saelab.dashboard"
FORMAT_VERSION = 1
STATIC_FILES = ("dashboard.js", "style.css")
SITE_FILE = "site.json"
SITE_FOLDER = OutputKind(
    "saelab dashboard site",
    ("index.html", "static", "data", SITE_FILE, TOKENS_FILE),
    json_format_marker(SITE_FILE, FORMAT_NAME),
)


def static_text(name: str) -> str:
    """A file shipped in `saelab/dashboard/static/`."""
    return resources.files("saelab.dashboard").joinpath("static", name).read_text(encoding="utf-8")


def safe_json(data: Any) -> str:
    """JSON that is also safe inside HTML script elements and JavaScript source: ASCII only, and `<`, `>`, `&`
    written as \\u escapes (they can only occur inside strings, where the escape means the same character)."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def data_script(key: str, data: Any) -> str:
    return f"SAELAB.receive({safe_json(key)},{safe_json(data)});\n"


def read_data_script(path: Path) -> tuple[str, Any]:
    """Inverse of `data_script`, for exports that re-read a site."""
    text = path.read_text(encoding="ascii")
    prefix = "SAELAB.receive("
    if not text.startswith(prefix) or not text.rstrip().endswith(");"):
        raise SaelabError(f"{path} is not a saelab dashboard data file; rebuild the site with saelab dashboard")
    key, _, rest = text[len(prefix) : text.rstrip().rindex(");")].partition(",")
    return json.loads(key), json.loads(rest)


def index_table(dashboard: Dashboard) -> dict[str, Any]:
    """The index page's data: metadata and one column per table field (columns keep 16k latents compact)."""
    pages = dashboard.latents
    columns: dict[str, list] = {
        "id": [p["id"] for p in pages],
        "density": [p["density"] for p in pages],
        "max": [p["max"] for p in pages],
        "importance": [p["importance"]["per_firing"]["mean"] for p in pages],
        "importance_lo": [p["importance"]["per_firing"]["lo"] for p in pages],
        "importance_hi": [p["importance"]["per_firing"]["hi"] for p in pages],
        "total": [p["importance"]["per_token"]["mean"] for p in pages],
        "total_lo": [p["importance"]["per_token"]["lo"] for p in pages],
        "total_hi": [p["importance"]["per_token"]["hi"] for p in pages],
        "too_few": [p["importance"]["too_few"] for p in pages],
        "firings": [p["importance"]["firings"] for p in pages],
        "contexts": [p["importance"]["contexts"] for p in pages],
        "raises_loss": [_ranked_helps(p) for p in pages],
        "next_token_top10": [(p.get("helps") or {}).get("next_token_in_top10") for p in pages],
        "fires_on": [_fires_on(p) for p in pages],
        "promotes": [[t for t, _ in p["logits"]["top"][:3]] if p.get("logits") else [] for p in pages],
    }
    if dashboard.meta.get("kind") == "toy":
        columns["ground_truth"] = [[p["ground_truth"]["feature"], p["ground_truth"]["cosine"]] for p in pages]
    return {"meta": dashboard.meta, "columns": columns}


# The index ranks "Helps" only where enough firings were computed exactly: with a few, as when a large --features
# shares the exact-firing budget, the fraction is mostly noise. The latent's page still shows it with its count.
MIN_HELPS_FIRINGS = 10


def _ranked_helps(page: dict[str, Any]) -> float | None:
    helps = page.get("helps") or {}
    return helps.get("raises_loss") if helps.get("raises_loss_n", 0) >= MIN_HELPS_FIRINGS else None


def _fires_on(page: dict[str, Any], n: int = 3) -> list[str]:
    """Distinct tokens at the centres of the top windows, best first."""
    out: list[str] = []
    for window in (page.get("windows") or {}).get("top", []):
        token = window["tokens"][window["center"]]
        if token not in out:
            out.append(token)
    return out[:n]


@dataclass
class ScannedTokens:
    """The token contexts a dashboard scanned, kept with the site so that every figure on it can be reproduced."""

    tokens: Any  # [n_sequences, T] token ids
    documents: list[str]  # where they come from (file names, file:line for JSON lines)
    context_documents: list[list[int]]  # per context, indices into `documents`


def write_site(
    dashboard: Dashboard,
    out: Path | str,
    source: dict[str, Any] | None = None,
    inputs: tuple[Path | str, ...] = (),
    overwrite: bool = False,
    scanned: ScannedTokens | None = None,
) -> Path:
    """Write the site folder atomically; `source` ({sae_dir, model, hook, dataset}) is kept for `saelab serve`,
    `scanned` as tokens.safetensors and the documents in site.json.

    `out` is checked and replaced as `saelab.io.output_folder` says (`inputs`: what the site was built from).
    """
    out = Path(out)
    with output_folder(out, SITE_FOLDER, inputs, overwrite) as tmp:
        (tmp / "static").mkdir()
        for name in STATIC_FILES:
            (tmp / "static" / name).write_text(static_text(name), encoding="utf-8")
        (tmp / "index.html").write_text(static_text("index.html"), encoding="utf-8")
        (tmp / "data" / "latents").mkdir(parents=True)
        (tmp / "data" / "index.js").write_text(data_script("index", index_table(dashboard)), encoding="ascii")
        for page in dashboard.latents:
            path = tmp / "data" / "latents" / f"{int(page['id'])}.js"
            path.write_text(data_script(f"latent:{int(page['id'])}", page), encoding="ascii")
        info = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **(source or {})}
        if scanned is not None:
            save_tensors(tmp / TOKENS_FILE, {"tokens": scanned.tokens.int().contiguous()})
            info |= {"tokens": TOKENS_FILE, "documents": scanned.documents,
                     "context_documents": scanned.context_documents}  # fmt: skip
        atomic_write_json(tmp / SITE_FILE, info)
    return out


def read_site(site: Path | str) -> dict[str, Any]:
    """The site's `site.json`, checked; a folder that is not a dashboard is a one-line error."""
    site = Path(site)
    if not (site / "index.html").is_file() or not (site / "data" / "index.js").is_file():
        raise SaelabError(
            f"{site} is not a saelab dashboard folder (no index.html and data/); build one with saelab dashboard"
        )
    info = load_json(site / SITE_FILE)
    if info.get("format") != FORMAT_NAME:
        raise SaelabError(f"{site / SITE_FILE} is not a saelab dashboard description (format {info.get('format')!r})")
    return info
