"""`saelab dashboard`, `saelab serve` and `saelab export`: build a dashboard site, serve it, share parts of it.

The functions here are typer commands (the root CLI registers them) over plain functions that the demo and tests
call directly: `build_dashboard` loads an SAE folder with its model and tokens and writes the site.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import typer

from saelab.dashboard.compute import DashboardConfig, Top, compute_dashboard, latent_hooks
from saelab.dashboard.site import SITE_FOLDER, ScannedTokens, read_site, write_site
from saelab.errors import SaelabError
from saelab.io import check_output, existing_paths

MAX_FEATURE_IDS = 2**24  # more latents than any SAE has; a longer list is a typo, not a request


def parse_features(text: str | None) -> int | list[int] | Top | None:
    """'64' → the first 64 latents; '0,5,17' or '10-20' (inclusive) → those ids; 'top:N' (optionally followed by
    ',ids') → the N most important latents and those ids; None → all."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    top = re.fullmatch(r"top:(\d+)\s*(?:,(.*))?", text)
    if top:
        named = parse_features(top.group(2)) if top.group(2) else []
        if not isinstance(named, list) or int(top.group(1)) < 1:
            raise SaelabError(f"--features '{text}': use top:N with N >= 1, optionally followed by ids like ,5,17")
        return Top(int(top.group(1)), named)
    ids: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise SaelabError(f"--features '{text}': use a count N, top:N, ids like 0,5,17, or ranges like 10-20")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise SaelabError(f"--features range {lo}-{hi} is empty; write the smaller id first")
        if hi - lo >= MAX_FEATURE_IDS or len(ids) + hi - lo >= MAX_FEATURE_IDS:
            raise SaelabError(f"--features lists more than {MAX_FEATURE_IDS:,} latents; give a smaller range")
        ids.extend(range(lo, hi + 1))
    return ids


def build_dashboard(
    sae_dir: Path | str,
    out: Path | str,
    model: str | None = None,
    dataset: str | None = None,
    features: int | list[int] | Top | None = None,
    n_sequences: int = 512,
    context: int = 128,
    hook: str | None = None,
    device: str = "cpu",
    cfg: DashboardConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Compute the dashboard of a saved SAE and write the site folder `out`; returns the path of its index.html.

    The model and hook default to the ones in the SAE's cfg.json, the tokens to `n_sequences` contexts of
    `context` tokens from the held-out files of the built-in corpus. An SAE trained on a toy model (metadata
    `source` = toy:DIR#i) gets the ground-truth dashboard instead, on fresh toy samples.
    """
    from saelab.sae.io import load_sae

    if not isinstance(n_sequences, int) or n_sequences < 1 or not isinstance(context, int) or context < 2:
        raise SaelabError(f"need n_sequences >= 1 and context >= 2, got {n_sequences} and {context}")
    sae_dir = Path(sae_dir).resolve()
    inputs = existing_paths(sae_dir, model, dataset)
    check_output(out, SITE_FOLDER, inputs, overwrite)  # before the work, not after it
    sae = load_sae(sae_dir, device)
    metadata = sae.metadata
    source = str(metadata.get("source") or "")
    scanned = None  # toy dashboards draw fresh samples: no token contexts to keep
    if source.startswith("toy:"):
        from saelab.dashboard.toy import compute_toy_dashboard, parse_toy_source
        from saelab.toy.model import load_toy_model

        toy_dir, instance = parse_toy_source(source)
        inputs += existing_paths(toy_dir)
        toy_model, _ = load_toy_model(toy_dir)
        board = compute_toy_dashboard(toy_model, instance, sae, n_sequences * context, features, cfg, source)
        info = {"kind": "toy", "sae_dir": str(sae_dir), "model": source, "hook": "hidden"}
    else:
        from saelab.models.access import load_model
        from saelab.models.data import Documents, documents, spread_contexts

        model_name = model or metadata.get("model_name") or "builtin"
        lm = load_model(model_name, device)
        hook = hook or metadata.get("hook_name")
        if lm.task is not None:
            if dataset is not None:
                raise SaelabError(f"{model_name} reads its task's generator, not a dataset; drop --dataset")
            board = compute_zoo_dashboard(lm, sae, hook, features, cfg, n_sequences, progress)
            info = {"kind": "lm", "sae_dir": str(sae_dir), "model": model_name, "hook": board.meta["hook"],
                    "device": device}  # fmt: skip
            write_site(board, out, info, inputs, overwrite, None)
            return Path(out) / "index.html"
        length = min(context, lm.n_ctx) if lm.n_ctx else context
        docs = documents(dataset, "heldout")
        seed = cfg.seed if cfg else 0
        tokens, sources = spread_contexts(docs, lm.tokenizer, length, lm.bos_token_id, n_sequences, seed)
        board = compute_dashboard(lm, sae, tokens, hook, features, cfg, progress)
        used = sorted({d for docs in sources for d in docs if d >= 0})
        names = [docs.name(d) if isinstance(docs, Documents) else f"document {d}" for d in used]
        board.meta["tokens"] |= {"split": "heldout", "seed": seed, "documents": len(used)}
        info = {"kind": "lm", "sae_dir": str(sae_dir), "model": model_name, "hook": board.meta["hook"],
                "dataset": dataset, "device": device}  # fmt: skip
        scanned = ScannedTokens(tokens, names, [[used.index(d) for d in ds if d >= 0] for ds in sources])
    write_site(board, out, info, inputs, overwrite, scanned)
    return Path(out) / "index.html"


def compute_zoo_dashboard(lm, sae, hook, features, cfg: DashboardConfig | None, n_sequences: int, progress: bool):
    """The dashboard of an SAE on a zoo model, on `n_sequences` fresh task sequences (seeded by cfg.seed), with the
    best-matching latent per value of the task's probe variable in its meta (shown on the index page; `top:N`
    builds their pages too)."""
    from saelab.dashboard.zoo import DASHBOARD_SEED, zoo_variable_latents

    seed = cfg.seed if cfg else 0
    data = lm.task.sample(n_sequences, DASHBOARD_SEED + seed, "heldout")
    matches = zoo_variable_latents(lm, sae, latent_hooks(lm, sae, hook)[0], data)
    if isinstance(features, Top):  # the index links each best-matching latent: give it a page
        features = Top(features.n, [*features.also, *(m["latent"] for m in matches)])
    board = compute_dashboard(lm, sae, data.tokens, hook, features, cfg, progress, data.labels)
    board.meta["tokens"] |= {"source": f"task generator ({lm.task.name}, heldout split)", "seed": DASHBOARD_SEED + seed,
                             "scored": int(data.scored.sum())}  # fmt: skip
    board.meta["task"] = {
        "name": lm.task.name,
        "summary": lm.task.summary,
        "variable": lm.task.probe.name,
        "variable_description": lm.task.probe.description,
        "variable_latents": matches,
        "example": lm.tokenizer.decode(data.tokens[0]),  # the live view's first input
    }
    return board


def dashboard(
    sae_dir: Path = typer.Argument(..., help="Saved SAE folder (cfg.json + sae_weights.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the site into (a previous site there is replaced)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that is not a dashboard site."),
    model: str = typer.Option(None, help="Model name or folder; default: the model in the SAE's cfg.json."),
    dataset: str = typer.Option(None, help="Text files/folder or dataset name; default: built-in held-out corpus."),
    features: str = typer.Option(
        None,
        help="Latents: top:N (the N most important by the cheap estimate, plus any ids after it: top:50,3,17), a "
        "count N (the first N), ids 0,5,17 or ranges 10-20; default all.",
    ),
    hook: str = typer.Option(None, help="Hook name; default: the SAE's metadata.hook_name."),
    sequences: int = typer.Option(512, help="Number of token sequences to scan."),
    context: int = typer.Option(128, help="Tokens per sequence (BOS included)."),
    exact_firings: int = typer.Option(
        None,
        help="Firings per latent whose total ΔCE is computed exactly (a uniform sample corrects the estimate); "
        "default 512 in all, spread over the latents (8 each for 64, at least 2).",
    ),
    top_windows: int = typer.Option(10, help="Top-activation windows per latent."),
    device: str = typer.Option("cpu", help="cpu, cuda, …"),
    seed: int = typer.Option(0, help="Seed for the position samples."),
) -> None:
    """Build a dashboard site for an SAE: statistics, token windows, exact loss effects and importance."""
    cfg = DashboardConfig(exact_firings=exact_firings, top_windows=top_windows, seed=seed)
    index = build_dashboard(
        sae_dir, out, model, dataset, parse_features(features), sequences, context, hook, device, cfg, True, overwrite
    )
    typer.echo(f"dashboard written: {index.resolve()}")
    typer.echo(f"open it in a browser, or run `saelab serve {out}` for the live prompt view")


def site_analyzer(info: dict) -> Callable[[], object] | None:
    """A function that loads the model and SAE a site was built from and returns the live view's analyzer (called
    on the first prompt, since loading takes a while); None for toy-model sites, which have no prompts."""
    if info.get("kind") != "lm":
        return None
    for key in ("model", "sae_dir", "hook"):
        if not isinstance(info.get(key), str) or not info[key]:
            raise SaelabError(f"the site's site.json lacks '{key}', which the live view needs; rebuild the site")

    def load() -> object:
        from saelab.dashboard.live import PromptAnalyzer
        from saelab.models.access import load_model
        from saelab.sae.io import load_sae

        device = info.get("device") or "cpu"
        return PromptAnalyzer(load_model(info["model"], device), load_sae(info["sae_dir"], device), info["hook"])

    return load


def serve(
    site: Path = typer.Argument(..., help="A dashboard folder written by saelab dashboard."),
    port: int = typer.Option(8000, help="Port on 127.0.0.1 (0 picks a free one)."),
) -> None:
    """Serve a dashboard on 127.0.0.1 with the live prompt view (the model loads on the first prompt)."""
    from saelab.dashboard.server import make_server

    server = make_server(site, port, site_analyzer(read_site(site)))
    typer.echo(f"serving {Path(site).resolve()} at {server.url} (Ctrl+C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def export(
    site: Path = typer.Argument(..., help="A dashboard folder written by saelab dashboard."),
    latents: str = typer.Option(..., help="Latent ids to include, e.g. 3,17,42 (at most 64)."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write."),
    neuronpedia: Path = typer.Option(None, help="Also write these latents as Neuronpedia-style JSON here."),
    overwrite: bool = typer.Option(False, help="Replace existing files that saelab did not write."),
) -> None:
    """Write a single self-contained HTML file with a few latents of a dashboard (and optionally Neuronpedia JSON)."""
    from saelab.dashboard.export import export_html, export_neuronpedia

    ids = parse_features(latents)
    ids = [ids] if isinstance(ids, int) else ids
    if not ids:
        raise SaelabError("--latents must list at least one latent id")
    typer.echo(f"wrote {export_html(site, ids, out, overwrite)}")
    if neuronpedia is not None:
        typer.echo(f"wrote {export_neuronpedia(site, neuronpedia, ids, overwrite)}")
