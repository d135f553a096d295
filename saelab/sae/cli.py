"""`saelab sae ...`: train, evaluate and inspect sparse autoencoders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from saelab.errors import SaelabError
from saelab.io import json_text

if TYPE_CHECKING:
    from saelab.activations import ActivationSource

app = typer.Typer(help="Sparse autoencoders: train, eval, info.", no_args_is_help=True)


def _numbers(text: str | None, option: str) -> list[float]:
    """A comma-separated list of numbers (a sweep), e.g. `--k 8,16,32`."""
    if text is None:
        return []
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SaelabError(f"{option} takes a number or a comma-separated list of numbers, got '{text}'") from None
    if not values:
        raise SaelabError(f"{option} is empty; give a number, e.g. {option} 4")
    if not all(math.isfinite(v) for v in values):
        raise SaelabError(f"{option} takes finite numbers, got '{text}'")
    return values


def _build_source(
    spec: str | None,
    model: str | None,
    dataset: str | None,
    hooks: list[str],
    context_length: int,
    batch_size: int,
    seed: int,
    device: str,
    bf16: bool,
) -> ActivationSource:
    """A toy, synthetic or cached source from its spec, else the language-model activation store.

    Under torchrun, the store reads only this rank's contexts and any other source is wrapped in a RankSlice.
    """
    from saelab import distributed
    from saelab.sae.sources import RankSlice, parse_source

    rank, world_size = distributed.world()
    if spec is not None:
        if model is not None or dataset is not None:
            raise SaelabError("give either --source or --model/--dataset, not both")
        if bf16:
            raise SaelabError("--bf16 sets the language model's forward pass; --source activations are already made")
        if hooks and not spec.startswith("cache:"):
            raise SaelabError("--hook picks language-model or cached activations; toy and synthetic sources have none")
        source = parse_source(spec, seed, hooks or None)
        return RankSlice(source, rank, world_size) if world_size > 1 else source
    if not hooks:
        raise SaelabError(
            "language-model activations need --hook (e.g. blocks.0.hook_resid_post);"
            " or pass --source toy:DIR / synthetic / cache:DIR"
        )
    try:
        from saelab.models.store import build_lm_source
    except ImportError as err:
        reason = f"saelab.models.store failed to import ({err})"
        raise SaelabError(f"language-model activations are unavailable: {reason}") from None
    return build_lm_source(
        model, dataset, hooks, context_length, batch_size, seed, device, rank=rank, world_size=world_size, bf16=bf16
    )


def _input_paths(spec: str | None, model: str | None, dataset: str | None) -> tuple[Path, ...]:
    """The files and folders a run reads (a toy model or cache named by --source, a local model or dataset)."""
    from saelab.io import existing_paths

    path = spec.split(":", 1)[1].rsplit("#", 1)[0] if spec and spec.startswith(("toy:", "cache:")) else None
    return existing_paths(path, model, dataset)


def _data_options(
    spec: str | None, model: str | None, dataset: str | None, hooks: list[str], context_length: int, bf16: bool
) -> dict[str, Any]:
    """The options that choose a run's activations, by their command-line names (paths made absolute), so that
    `--resume` with other data names the option that differs."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    if spec is not None:
        kind, _, rest = spec.partition(":")
        if kind in ("toy", "cache"):
            path, hash_, instance = rest.rpartition("#") if "#" in rest else (rest, "", "")
            spec = f"{kind}:{absolute(path)}{hash_}{instance}"
        return {"--source": spec, "--hook": hooks}
    return {"--model": absolute(model), "--dataset": absolute(dataset), "--hook": hooks,
            "--context-length": context_length, "--bf16": bf16}  # fmt: skip


def _output_hooks(hooks: list[str], hook_out: list[str], skip: bool) -> dict[str, str]:
    """{input hook: the hook its transcoder outputs}; empty when training SAEs."""
    if not hook_out:
        if skip:
            raise SaelabError("--skip gives a transcoder its skip connection; name the hook it outputs with --hook-out")
        return {}
    if not hooks:
        raise SaelabError("a transcoder needs its input hook too: --hook-in (e.g. blocks.0.hook_resid_mid)")
    if len(hook_out) not in (1, len(hooks)):
        raise SaelabError(f"{len(hook_out)} --hook-out for {len(hooks)} --hook-in; give one, or one per --hook-in")
    return dict(zip(hooks, hook_out * len(hooks) if len(hook_out) == 1 else hook_out, strict=True))


def _transcoder_options(outputs: dict[str, str], skip: bool) -> dict[str, Any]:
    """The transcoder options in a run's identity (none for an SAE run, whose identity stays as it was)."""
    return {"--hook-out": list(outputs.values()), "--skip": skip} if outputs else {}


@app.command()
def train(
    out: Path = typer.Option(..., help="Folder for the SAE(s), the JSONL log and checkpoints."),
    source: str = typer.Option(None, help="Activations: toy:DIR[#instance], synthetic[:key=value,...] or cache:DIR."),
    model: str = typer.Option(None, help="Language model (name or folder; default: the built-in one)."),
    dataset: str = typer.Option(None, help="Text dataset for --model (default: the built-in corpus)."),
    hook: list[str] = typer.Option(
        None,
        "--hook",
        "--hook-in",
        help="TransformerLens hook name, e.g. blocks.0.hook_resid_post; repeat to train SAEs on several hooks.",
    ),
    hook_out: list[str] = typer.Option(
        None,
        help="Train transcoders: the hook to predict from --hook, e.g. blocks.0.hook_mlp_out from "
        "blocks.0.hook_resid_mid (one for every --hook, or one per --hook).",
    ),
    skip: bool = typer.Option(False, help="Give each transcoder a linear skip connection (skip transcoder)."),
    context_length: int = typer.Option(128, help="Tokens per context for language-model activations."),
    bf16: bool = typer.Option(False, help="Run the language model's forward pass under bfloat16 autocast."),
    architecture: str = typer.Option("topk", help="SAE architecture: topk, relu, … (an unknown name lists them all)."),
    d_sae: int = typer.Option(None, help="Number of latents (default 8 × d_in)."),
    k: str = typer.Option(None, help="Active latents per token for topk/batchtopk; a comma list sweeps."),
    sparsity_coefficient: str = typer.Option(
        None, "--sparsity-coefficient", "--l1", help="L1 (relu, gated) or L0 (jumprelu) weight; a comma list sweeps."
    ),
    matryoshka_widths: str = typer.Option(
        None, help="Nested prefix sizes of a matryoshka_batchtopk SAE, ending at d_sae, e.g. 64,256,1024."
    ),
    steps: int = typer.Option(5000, help="Training steps."),
    batch_size: int = typer.Option(4096, help="Activations per step (under torchrun: over all processes)."),
    lr: float = typer.Option(
        None, help="Adam learning rate (default: the architecture's; topk family 2e-3, else 4e-4)."
    ),
    seed: int = typer.Option(0, help="Seed for initialisation and the data stream."),
    normalize: bool = typer.Option(True, help="Scale inputs to E‖x‖ = √d_in while training (folded in at save)."),
    b_dec_init: str = typer.Option("geometric_median", help="geometric_median | mean | zeros."),
    dead_after_tokens: int = typer.Option(10_000_000, help="A latent silent this many tokens counts as dead."),
    resample_every: int = typer.Option(0, help="Resample dead latents every N steps (0: never)."),
    checkpoint_every: int = typer.Option(500, help="Checkpoint every N steps (0: never)."),
    log_every: int = typer.Option(1, help="Write a JSONL log line every N steps."),
    device: str = typer.Option("cpu", help="cpu, cuda, mps, ... (under torchrun, cuda means each rank's own GPU)."),
    resume: bool = typer.Option(False, help="Continue the interrupted run in --out (same options)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that is not an SAE folder."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train an SAE (or a sweep over --k / --sparsity-coefficient and --hook, all from the same batches).

    With --hook-out, train transcoders instead: from --hook-in (an MLP's input, e.g. blocks.0.hook_resid_mid or
    blocks.0.ln2.hook_normalized) to --hook-out (its output, blocks.0.hook_mlp_out), both read from one forward pass.

    Under `torchrun --nproc_per_node N`, N processes train data-parallel (gloo on CPU, NCCL on GPU).
    """
    from saelab import distributed
    from saelab.sae.model import SAE_CLASSES, SAEConfig
    from saelab.sae.train import SAETrainConfig, sae_labels, train_saes

    if architecture not in SAE_CLASSES:
        raise SaelabError(f"unknown --architecture '{architecture}'; choose one of {', '.join(SAE_CLASSES)}")
    by_k = SAE_CLASSES[architecture].sparsity_by_k
    ks, coefficients = _numbers(k, "--k"), _numbers(sparsity_coefficient, "--sparsity-coefficient")
    if ks and coefficients:
        raise SaelabError("sweep over --k or over --sparsity-coefficient, not both at once")
    if ks and not by_k:
        k_architectures = ", ".join(name for name, cls in SAE_CLASSES.items() if cls.sparsity_by_k)
        raise SaelabError(f"--k applies to {k_architectures}, not {architecture}; use --sparsity-coefficient")
    if coefficients and by_k:
        raise SaelabError(f"{architecture} sets sparsity with --k, not --sparsity-coefficient")
    hooks = list(dict.fromkeys(hook or []))
    outputs = _output_hooks(hooks, hook_out or [], skip)
    if distributed.launched_by_torchrun():
        device = distributed.init_from_env(device)
    try:
        read = list(dict.fromkeys(hooks + [h for h in outputs.values() if h is not None]))
        activations = _build_source(source, model, dataset, read, context_length, batch_size, seed, device, bf16)
        configs, sae_hooks, sae_outputs = [], [], []
        for stream in hooks if outputs else activations.hooks:
            d_in = activations.d_ins[stream]
            width = 8 * d_in if d_sae is None else d_sae
            base: dict[str, Any] = {"architecture": architecture, "d_in": d_in, "d_sae": width}
            if outputs:
                base |= {"d_out": activations.d_ins[outputs[stream]], "skip": skip}
            if matryoshka_widths is not None:
                widths = _numbers(matryoshka_widths, "--matryoshka-widths")
                if not all(w.is_integer() for w in widths):
                    raise SaelabError(f"--matryoshka-widths takes whole numbers, got '{matryoshka_widths}'")
                base["matryoshka_widths"] = tuple(int(w) for w in widths)
            if ks:
                configs += [SAEConfig(**base, k=int(v) if v.is_integer() else v) for v in ks]
            elif coefficients:
                configs += [SAEConfig(**base, sparsity_coefficient=v) for v in coefficients]
            else:
                configs.append(SAEConfig(**base))
            sae_outputs += [outputs.get(stream)] * (len(configs) - len(sae_hooks))
            sae_hooks += [stream] * (len(configs) - len(sae_hooks))
        train_cfg = SAETrainConfig(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            normalize_activations=normalize,
            b_dec_init=b_dec_init,
            dead_after_tokens=dead_after_tokens,
            resample_every=resample_every,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            seed=seed,
            device=device,
        )
        saes = train_saes(
            activations,
            configs,
            train_cfg,
            out,
            resume,
            progress=not quiet,
            hooks=sae_hooks,
            overwrite=overwrite,
            inputs=_input_paths(source, model, dataset),
            options=_data_options(source, model, dataset, hooks, context_length, bf16)
            | _transcoder_options(outputs, skip),
            hooks_out=sae_outputs,
        )
        if distributed.is_main():
            labels = sae_labels(configs, sae_hooks)
            where = out if len(saes) == 1 else ", ".join(str(out / label) for label in labels)
            kind = "transcoder" if outputs else "SAE"
            typer.echo(f"saved {len(saes)} {kind}{'s' if len(saes) > 1 else ''}: {where}")
    finally:
        distributed.close()


@app.command("eval")
def eval_(
    sae_dir: Path = typer.Argument(..., help="A saved SAE folder (saelab or SAELens)."),
    source: str = typer.Option(None, help="Evaluate on this source instead of the one the SAE was trained on."),
    tokens: int = typer.Option(65536, help="Activations to evaluate on."),
    batch_size: int = typer.Option(4096, help="Activations per batch."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """Reconstruction, sparsity and density metrics, and ground-truth recovery where the features are known."""
    from saelab.sae.evaluate import evaluate_saved

    report = evaluate_saved(sae_dir, source, tokens, batch_size, device)
    if as_json:
        typer.echo(json_text(report))
        return
    for key, value in report.items():
        if key == "density_histogram":
            continue
        if key == "ground_truth" and isinstance(value, dict):
            truth = value
            typer.echo(
                f"ground truth: MMCS {truth['mmcs']:.4f}  MCC {truth['mcc']:.4f}  "
                f"recovered {truth['recovered']}/{truth['n_true_features']} (cos ≥ {truth['recovery_threshold']})"
            )
        elif key == "variable_latents":  # a zoo model: the latent that tracks the task's intermediate variable
            for match in value:
                typer.echo(f"best latent for {match['value']}: {match['latent']} (r = {match['correlation']:.3f})")
        elif isinstance(value, float):
            typer.echo(f"{key}: {value:.6g}" if math.isfinite(value) else f"{key}: undefined")
        elif not isinstance(value, (dict, list)):
            typer.echo(f"{key}: {value}")


@app.command()
def info(
    sae_dir: Path = typer.Argument(..., help="A saved SAE folder (saelab or SAELens)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """What an SAE is: architecture, sizes, what it was trained on, and its decoder norms."""
    from saelab.sae.io import load_sae

    sae = load_sae(sae_dir)
    norms = sae.W_dec.detach().norm(dim=1)
    summary: dict[str, Any] = {
        "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        **({"d_out": sae.cfg.d_out, "skip": sae.cfg.skip} if sae.cfg.transcoder else {}),
        "dtype": sae.cfg.dtype,
        "parameters": sum(p.numel() for p in sae.parameters()),
        "decoder_norm_min": float(norms.min()),
        "decoder_norm_max": float(norms.max()),
    }
    if sae.sparsity_by_k:
        summary["k"] = sae.cfg.k
    elif sae.saved_info:  # a coefficient SAELens does not record is not known
        summary["sparsity_coefficient"] = sae.cfg.sparsity_coefficient
    for key in ("model_name", "hook_name", "hook_name_out", "source"):
        if sae.metadata.get(key):
            summary[key] = sae.metadata[key]
    for key in ("trained_steps", "normalization_scale", "normalization_scale_out"):
        if key in sae.saved_info:
            summary[key] = sae.saved_info[key]
    if as_json:
        typer.echo(json_text(summary))
        return
    for key, value in summary.items():
        typer.echo(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
