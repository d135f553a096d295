"""`saelab toy ...`: train, analyse and sweep toy models of superposition."""

from __future__ import annotations

import typer

app = typer.Typer(help="Toy models of superposition: train, analyze, phase-diagram.", no_args_is_help=True)
