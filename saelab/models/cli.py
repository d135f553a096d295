"""`saelab lm ...` and `saelab activations ...`: the built-in language model and activation caches."""

from __future__ import annotations

import typer

lm_app = typer.Typer(help="The built-in language model: train it, sample from it.", no_args_is_help=True)
activations_app = typer.Typer(help="Activation caches on disk.", no_args_is_help=True)
