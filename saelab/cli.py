"""The `saelab` command line: a thin typer layer over the stage subpackages.

Each stage owns its sub-command group (`saelab/<stage>/cli.py`); this module only wires them together and
turns SaelabError into a one-line message with exit status 2.
"""

from __future__ import annotations

import sys

import typer

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
app.add_typer(toy_app, name="toy")
app.add_typer(sae_app, name="sae")
app.add_typer(lm_app, name="lm")
app.add_typer(activations_app, name="activations")


@app.command()
def demo(
    out: str = typer.Option("demo_out", help="Folder for every result of the demo."),
    quick: bool = typer.Option(False, help="Fewer training steps (for a smoke test)."),
) -> None:
    """The main job on built-in defaults: toy models → analysis → plots (SAE and dashboards follow)."""
    from saelab.demo import run_demo

    run_demo(out, quick=quick)


def main() -> None:
    try:
        app()
    except SaelabError as err:
        print(f"saelab: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
