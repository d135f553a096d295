"""`saelab sae ...`: train, evaluate and inspect sparse autoencoders."""

from __future__ import annotations

import typer

app = typer.Typer(help="Sparse autoencoders: train, eval, info.", no_args_is_help=True)
