"""`saelab lm ...` and `saelab activations ...`: the built-in language model and activation caches."""

from __future__ import annotations

import typer

lm_app = typer.Typer(help="The built-in language model: train it, sample from it.", no_args_is_help=True)
activations_app = typer.Typer(help="Activation caches on disk.", no_args_is_help=True)


@activations_app.command("cache")
def cache(
    out: str = typer.Option(..., help="Folder for the cache: manifest.json and one .npy shard per hook and shard."),
    hook: list[str] = typer.Option(..., help="Hook name, e.g. blocks.0.hook_resid_post; repeat for several hooks."),
    tokens: int = typer.Option(..., help="Activations (tokens) to write for each hook."),
    model: str | None = typer.Option(None, help="TransformerLens name, Hugging Face name or local folder [built-in]."),
    dataset: str | None = typer.Option(None, help="A .txt/.jsonl file or folder, or an HF dataset [built-in corpus]."),
    context_length: int = typer.Option(128, help="Tokens per context, BOS included."),
    batch_size: int = typer.Option(4096, help="The SAE batch size the cache is for: it sizes the mixing buffer."),
    buffer_tokens: int | None = typer.Option(None, help="Tokens per mixing buffer [max(2^17, 16 x batch size)]."),
    seed: int = typer.Option(0, help="Seed of the shuffle."),
    device: str = typer.Option("cpu", help="Device for the model forward pass, e.g. cuda."),
    bf16: bool = typer.Option(False, help="Run the model under bfloat16 autocast."),
    backend: str = typer.Option("auto", help="auto, transformer_lens or hf (how a local folder is loaded)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
) -> None:
    """Run a model over a dataset and write shuffled activations at one or more hooks to disk.

    Rows come out exactly as `saelab sae train` would read them live with the same model, dataset, hooks,
    context length, batch size and seed.
    """
    from saelab.models.access import load_model
    from saelab.models.cache import write_activation_cache
    from saelab.models.store import build_lm_source

    lm = load_model(model, device, backend=backend, bf16=bf16)
    store = build_lm_source(lm, dataset, hook, context_length, batch_size, seed, device, buffer_tokens=buffer_tokens)
    write_activation_cache(store, tokens, out, overwrite=overwrite, progress=True)
    typer.echo(f"wrote {tokens} activations at {', '.join(store.hooks)} to {out}")
