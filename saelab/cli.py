"""The `saelab` command line: a thin typer layer over the stage subpackages.

Each stage owns its commands (`saelab/<stage>/cli.py`); this module only wires them together, in workflow order,
and turns SaelabError into a one-line message with exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from saelab.dashboard.cli import dashboard, export, serve
from saelab.errors import SaelabError
from saelab.models.cli import activations_app, lm_app
from saelab.sae.cli import app as sae_app
from saelab.toy.cli import app as toy_app

app = typer.Typer(
    name="saelab",
    help="Toy models of superposition, sparse autoencoders and feature dashboards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for every result of the demo."),
    quick: bool = typer.Option(False, help="A smoke-test run: far fewer steps and tokens."),
) -> None:
    """The main job on built-in defaults: toy models → SAE recovery, and built-in LM → SAE → dashboard."""
    from saelab.demo import run_demo

    run_demo(out, quick=quick)


app.add_typer(toy_app, name="toy")
app.add_typer(sae_app, name="sae")
app.add_typer(lm_app, name="lm")
app.add_typer(activations_app, name="activations")
app.command()(dashboard)
app.command()(serve)
app.command()(export)


def main() -> None:
    try:
        app()
    except SaelabError as err:
        print(f"saelab: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
