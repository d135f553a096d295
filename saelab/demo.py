"""The README's main job: every stage of saelab on built-in defaults, writing results under one folder.

    toy models of superposition → analysis, plots, phase diagram        out/toy/
    SAEs of every architecture on the toy model → ground-truth recovery  out/toy_sae/
    built-in language model → TopK SAE on blocks.0.hook_resid_post       out/lm_sae/
    → LM evals (CE loss recovered) → feature dashboard                   out/dashboard/
    zoo model zoo:sum → TopK SAE → task accuracy clean / spliced / ablated out/zoo_sae/
    → its dashboard (tokens are digits, losses the task's)              out/zoo_dashboard/

Each stage is the same function the CLI calls, so the demo is also the integration test of the whole chain.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.io import OutputKind, atomic_write_json, check_output, output_lock

DEMO_HOOK = "blocks.0.hook_resid_post"
DEMO_EXACT_FIRINGS = 16  # per latent on the demo dashboard (see the stage)
# The zoo stage: 4-digit addition, at the residual stream between its two layers (which layer 1 reads).
DEMO_ZOO_TASK = "sum"
DEMO_ZOO_HOOK = "blocks.0.hook_resid_post"
# The demo's folder holds one folder per stage (each written whole by its stage) and summary.json.
DEMO_FOLDER = OutputKind(
    "saelab demo folder",
    ("summary.json", "toy", "toy_sae", "lm_sae", "dashboard", "zoo_sae", "zoo_dashboard"),
    lambda folder: True,
)


@dataclass
class DemoSizes:
    """How much work each stage does; `quick` is a smoke test, the default fits in minutes on 2 CPU cores."""

    lm_sae_steps: int
    lm_batch_size: int
    lm_eval_tokens: int
    dashboard_sequences: int
    dashboard_latents: int
    zoo_sae_steps: int
    zoo_eval_sequences: int
    zoo_dashboard_sequences: int
    zoo_dashboard_latents: int

    @classmethod
    def for_mode(cls, quick: bool) -> DemoSizes:
        if quick:
            return cls(lm_sae_steps=30, lm_batch_size=1024, lm_eval_tokens=4096, dashboard_sequences=16,
                       dashboard_latents=16, zoo_sae_steps=30, zoo_eval_sequences=200, zoo_dashboard_sequences=32,
                       zoo_dashboard_latents=8)  # fmt: skip
        return cls(lm_sae_steps=600, lm_batch_size=4096, lm_eval_tokens=65536, dashboard_sequences=256,
                   dashboard_latents=256, zoo_sae_steps=120, zoo_eval_sequences=500, zoo_dashboard_sequences=64,
                   zoo_dashboard_latents=16)  # fmt: skip


STAGES = 5


def _stage(number: int, title: str) -> float:
    print(f"\n[{number}/{STAGES}] {title}", flush=True)
    return time.perf_counter()


def _done(started: float) -> float:
    seconds = time.perf_counter() - started
    print(f"      done in {seconds:.0f} s", flush=True)
    return seconds


def run_demo(out: str | Path, quick: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole chain into `out`; print what was found and where; return the summary (also summary.json).

    `out` must be new, empty or an earlier demo's folder (else `overwrite`); one demo at a time writes it.
    """
    out = check_output(out, DEMO_FOLDER, overwrite=overwrite)
    with output_lock(out):
        return _run_demo(out, quick)


def _run_demo(out: Path, quick: bool) -> dict[str, Any]:
    from saelab.dashboard.cli import build_dashboard
    from saelab.dashboard.compute import DashboardConfig, Top
    from saelab.models.evals import lm_eval
    from saelab.models.store import build_lm_source
    from saelab.sae.model import SAEConfig
    from saelab.sae.recovery import run_toy_recovery
    from saelab.sae.train import SAETrainConfig, train_saes
    from saelab.toy.lab import run_toy_lab

    sizes = DemoSizes.for_mode(quick)
    summary: dict[str, Any] = {"out": str(out), "quick": quick, "seconds": {}}

    started = _stage(1, "Toy models of superposition: 5 features in 2 dimensions, and a phase diagram")
    toy = run_toy_lab(out / "toy", quick=quick, progress=True)
    summary["toy"] = toy
    summary["seconds"]["toy"] = _done(started)
    for instance in toy["pentagon"].get("instances", []):
        print(f"      pentagon instance: {json.dumps(instance)}")

    started = _stage(2, "SAEs on the toy model's hidden layer: do they recover the true features?")
    recovery = run_toy_recovery(out / "toy" / "pentagon", out / "toy_sae", quick=quick, progress=True)
    summary["toy_sae"] = {name: {k: r[k] for k in ("mmcs", "mcc", "recovered")} for name, r in recovery["saes"].items()}
    summary["seconds"]["toy_sae"] = _done(started)
    print(f"      {'architecture':<12} {'MMCS':>6} {'MCC':>6}  recovered (cos > 0.9)")
    for name, r in recovery["saes"].items():
        print(f"      {name:<12} {r['mmcs']:6.3f} {r['mcc']:6.3f}  {r['recovered']}/{recovery['n_features']}")

    started = _stage(3, f"TopK SAE on the built-in language model at {DEMO_HOOK}")
    source = build_lm_source(None, None, DEMO_HOOK, 128, sizes.lm_batch_size, seed=0, device="cpu")
    sae_cfg = SAEConfig("topk", source.d_in, 16 * source.d_in, k=32)
    train_cfg = SAETrainConfig(steps=sizes.lm_sae_steps, batch_size=sizes.lm_batch_size, lr=4e-4, seed=0)
    (sae,) = train_saes(source, sae_cfg, train_cfg, out=out / "lm_sae", progress=True)
    lm_metrics = lm_eval(sae, out / "lm_sae", n_tokens=sizes.lm_eval_tokens, progress=True)
    summary["lm_sae"] = {"dir": str(out / "lm_sae"), "hook": DEMO_HOOK, "d_sae": sae_cfg.d_sae}
    summary["lm_sae"] |= lm_metrics.to_dict()
    summary["seconds"]["lm_sae"] = _done(started)
    for label, value in (
        ("CE loss, clean", lm_metrics.ce_loss_clean),
        ("CE loss, with SAE", lm_metrics.ce_loss_with_sae),
        ("CE loss, zero-ablated", lm_metrics.ce_loss_with_ablation),
        ("CE loss recovered", lm_metrics.ce_loss_recovered),
        ("explained variance", lm_metrics.explained_variance),
    ):
        print(f"      {label:<22} {'undefined' if value is None else f'{value:.4f}'}")

    started = _stage(4, f"Feature dashboard for the {sizes.dashboard_latents} most important latents")
    index = build_dashboard(
        out / "lm_sae",
        out / "dashboard",
        features=Top(sizes.dashboard_latents),
        n_sequences=sizes.dashboard_sequences,
        # 16 exact total-ΔCE firings per latent, not the default's 2 for 256 latents: on this trained SAE the
        # gradient is a rough estimate (r ≈ 0.95), and 2 would make sampling a large part of each interval.
        cfg=DashboardConfig(exact_firings=DEMO_EXACT_FIRINGS),
        progress=True,
    )
    summary["dashboard"] = str(index)
    summary["seconds"]["dashboard"] = _done(started)

    started = _stage(
        5, f"An algorithmic-problem model: TopK SAE on zoo:{DEMO_ZOO_TASK} at {DEMO_ZOO_HOOK}, its dashboard"
    )
    summary["zoo"] = _zoo_stage(out, sizes)
    summary["seconds"]["zoo"] = _done(started)

    atomic_write_json(out / "summary.json", summary)
    print(f"\nAll results: {out}")
    print(f"  toy-model figures:  {out / 'toy'}")
    print(f"  SAE recovery:       {out / 'toy_sae' / 'recovery.json'}")
    print(f"  dashboard:          file://{index}")
    print(f"  live prompt view:   saelab serve {out / 'dashboard'}")
    print(f"  zoo:{DEMO_ZOO_TASK} dashboard:  file://{summary['zoo']['dashboard']}")
    return summary


def _zoo_stage(out: Path, sizes: DemoSizes) -> dict[str, Any]:
    """An SAE on a shipped zoo model (fresh task sequences, no dataset), its task evals and its dashboard."""
    from saelab.dashboard.cli import build_dashboard
    from saelab.dashboard.compute import Top
    from saelab.models.evals import lm_eval
    from saelab.models.store import build_lm_source
    from saelab.models.zoo.tasks import get_task
    from saelab.sae.model import SAEConfig
    from saelab.sae.train import SAETrainConfig, train_saes

    model, task_length = f"zoo:{DEMO_ZOO_TASK}", get_task(DEMO_ZOO_TASK).n_ctx
    source = build_lm_source(model, None, DEMO_ZOO_HOOK, task_length, 1024, seed=0, device="cpu")
    sae_cfg = SAEConfig("topk", source.d_in, 4 * source.d_in, k=8)
    train_cfg = SAETrainConfig(steps=sizes.zoo_sae_steps, batch_size=1024, lr=3e-3, seed=0)
    (sae,) = train_saes(source, sae_cfg, train_cfg, out=out / "zoo_sae", progress=True)
    metrics = lm_eval(sae, out / "zoo_sae", n_tokens=sizes.zoo_eval_sequences * task_length, progress=True).to_dict()
    for label, key in (
        ("task accuracy, clean", "accuracy_clean"),
        ("with the SAE spliced in", "accuracy_with_sae"),
        ("with the hook zero-ablated", "accuracy_with_ablation"),
        ("CE loss recovered", "ce_loss_recovered"),
    ):
        value = metrics[key]
        print(f"      {label:<27} {'undefined' if value is None else f'{value:.4f}'}")
    for match in metrics["variable_latents"]:
        print(f"      best latent for {match['value']}: {match['latent']} (r = {match['correlation']:.3f})")
    index = build_dashboard(
        out / "zoo_sae",
        out / "zoo_dashboard",
        features=Top(sizes.zoo_dashboard_latents),
        n_sequences=sizes.zoo_dashboard_sequences,
        progress=True,
    )
    keys = ("task", "accuracy_clean", "accuracy_with_sae", "accuracy_with_ablation", "ce_loss_recovered",
            "explained_variance", "l0", "variable_latents")  # fmt: skip
    summary = {"dir": str(out / "zoo_sae"), "model": model, "hook": DEMO_ZOO_HOOK, "d_sae": sae_cfg.d_sae}
    return summary | {key: metrics[key] for key in keys} | {"dashboard": str(index)}
