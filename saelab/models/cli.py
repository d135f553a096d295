"""`saelab lm ...` and `saelab activations ...`: the built-in language model and activation caches."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.errors import SaelabError

lm_app = typer.Typer(help="The built-in language model: train it, sample from it.", no_args_is_help=True)
activations_app = typer.Typer(help="Activation caches on disk.", no_args_is_help=True)


@activations_app.command("cache")
def cache(
    out: str = typer.Option(..., help="Folder for the cache: manifest.json and one .npy shard per hook and shard."),
    hook: list[str] = typer.Option(..., help="Hook name, e.g. blocks.0.hook_resid_post; repeat for several hooks."),
    tokens: int = typer.Option(..., help="Activations (tokens) to write for each hook."),
    model: str | None = typer.Option(None, help="TransformerLens name, Hugging Face name or local folder [built-in]."),
    dataset: str | None = typer.Option(
        None, help="A .txt/.jsonl file or folder, a save_to_disk folder or an HF hub name [built-in corpus]."
    ),
    context_length: int = typer.Option(128, help="Tokens per context, BOS included."),
    batch_size: int = typer.Option(4096, help="The SAE batch size the cache is for: it sizes the mixing buffer."),
    buffer_tokens: int | None = typer.Option(None, help="Tokens per mixing buffer [max(2^17, 16 x batch size)]."),
    seed: int = typer.Option(0, help="Seed of the shuffle."),
    device: str = typer.Option("cpu", help="Device for the model forward pass, e.g. cuda."),
    bf16: bool = typer.Option(False, help="Run the model under bfloat16 autocast."),
    backend: str = typer.Option("auto", help="auto, transformer_lens or hf (how a local folder is loaded)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that is not an activation cache."),
) -> None:
    """Run a model over a dataset and write shuffled activations at one or more hooks to disk.

    Rows come out exactly as `saelab sae train` would read them live with the same model, dataset, hooks,
    context length, batch size and seed.
    """
    from saelab.io import check_output, existing_paths
    from saelab.models.access import load_model
    from saelab.models.cache import CACHE_FOLDER, write_activation_cache
    from saelab.models.store import build_lm_source

    inputs = existing_paths(model, dataset)
    check_output(out, CACHE_FOLDER, inputs, overwrite)  # before loading anything
    lm = load_model(model, device, backend=backend, bf16=bf16)
    store = build_lm_source(lm, dataset, hook, context_length, batch_size, seed, device, buffer_tokens=buffer_tokens)
    write_activation_cache(store, tokens, out, overwrite=overwrite, progress=True, inputs=inputs)
    typer.echo(f"wrote {tokens} activations at {', '.join(store.hooks)} to {out}")


@lm_app.command("train")
def lm_train(
    out: str = typer.Option(..., help="Folder to write: cfg.json, model.safetensors, tokenizer.json."),
    tokens: int | None = typer.Option(None, help="Training tokens [6,000,000: about 30 minutes on 2 CPU cores]."),
    minutes: float | None = typer.Option(None, help="Train for this many minutes instead of a token budget."),
    seed: int = typer.Option(0, help="Seed of the initialisation and of the document order."),
    n_layers: int | None = typer.Option(None, help="Transformer blocks [2]."),
    d_model: int | None = typer.Option(None, help="Residual stream width; the MLP is 4x wider [128]."),
    n_heads: int | None = typer.Option(None, help="Attention heads per block [4]."),
    n_ctx: int | None = typer.Option(None, help="Context length, BOS included [128]."),
    batch_size: int | None = typer.Option(None, help="Contexts per step [32]."),
    device: str = typer.Option("cpu", help="Device to train on, e.g. cuda."),
    checkpoint_every: int = typer.Option(0, help="Save the run state every N steps for --resume (0: never)."),
    resume: bool = typer.Option(False, help="Continue the killed run of the same command from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out that is not a saelab model folder."),
) -> None:
    """Train saelab's built-in language model from scratch on this Python's standard library.

    Trains a 4096-token byte-level BPE on the standard library's source, then a small transformer on the source
    files in a seeded random order (reshuffled every epoch), and prints its loss on held-out files next to the
    unigram baseline and a few greedy samples.
    """
    import sys

    from saelab.models.builtin import LMConfig
    from saelab.models.lm_train import LMTrainConfig, train_lm

    if tokens is not None and minutes is not None:
        raise SaelabError("give a budget in --tokens or in --minutes, not both")
    sizes = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "n_ctx": n_ctx}
    model = LMConfig(**{name: value for name, value in sizes.items() if value is not None})
    model.d_mlp = 4 * model.d_model
    budget = {"tokens": tokens, "minutes": minutes, "batch_size": batch_size}
    cfg = LMTrainConfig(
        model=model,
        seed=seed,
        checkpoint_every=checkpoint_every,
        **{name: value for name, value in budget.items() if value is not None},
    )
    command = "saelab lm " + " ".join(sys.argv[sys.argv.index("train") :] if "train" in sys.argv else ["train"])
    results = train_lm(
        cfg, Path(out), log=typer.echo, device=device, command=command, overwrite=overwrite, resume=resume
    )
    typer.echo(
        f"held-out loss {results['heldout_loss']:.3f} nats/token vs unigram entropy {results['unigram_entropy']:.3f} "
        f"({results['tokens_trained']:,} tokens in {results['train_seconds'] / 60:.1f} min, "
        f"{results['tokens_per_second']:,} tokens/s)"
    )
    for text in results["samples"].values():
        typer.echo("--- greedy sample ---\n" + text)
    typer.echo(f"wrote {out}")


@lm_app.command("sample")
def lm_sample(
    prompt: str = typer.Option("def ", help="Text to continue."),
    model: str | None = typer.Option(None, help="A folder written by `saelab lm train` [the built-in model]."),
    tokens: int = typer.Option(100, help="Most tokens to generate (stops early at <|endoftext|>)."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding, else sample at this temperature."),
    seed: int = typer.Option(0, help="Seed of the sampling."),
) -> None:
    """Continue a prompt with the built-in model (or a folder written by `saelab lm train`)."""
    from saelab.models.builtin import BUILTIN_DIR, load_lm
    from saelab.models.lm_train import generate

    if temperature < 0:
        raise SaelabError(f"--temperature must be >= 0, got {temperature}")
    if tokens < 0:
        raise SaelabError(f"--tokens must be >= 0, got {tokens}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise SaelabError("--prompt is not valid text (it holds a lone surrogate or undecodable bytes)") from None
    lm = load_lm(Path(model) if model else BUILTIN_DIR)
    prompt_tokens = lm.to_tokens(prompt, prepend_bos=True)[0].tolist()
    out = generate(lm, prompt_tokens, lm.cfg.n_ctx, tokens, temperature, seed)
    typer.echo(lm.tokenizer.decode(out[1:]))
