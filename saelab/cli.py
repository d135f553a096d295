"""The `saelab` command line: a thin typer layer over the stage subpackages.

Each stage owns its commands (`saelab/<stage>/cli.py`); this module only wires them together, in workflow order,
and turns every failure a user can cause or meet (SaelabError, a bad option, an operating-system error such as
a full disk or a read-only folder, running out of memory) into a one-line message with exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click
import typer

from saelab.dashboard.cli import dashboard, export, serve
from saelab.errors import SaelabError
from saelab.io import describe_os_error
from saelab.models.cli import activations_app, lm_app
from saelab.models.zoo.cli import app as zoo_app
from saelab.sae.cli import app as sae_app
from saelab.toy.cli import app as toy_app

# Recent typer vendors click as typer._click; older typer raises click's own exceptions. Catch both.
USAGE_ERRORS: tuple[type[Exception], ...] = (click.UsageError,)
with contextlib.suppress(ImportError):
    from typer._click.exceptions import UsageError as _TyperUsageError

    USAGE_ERRORS = (click.UsageError, _TyperUsageError)

OUT_OF_MEMORY = (
    "out of memory; use smaller sizes (--batch-size, --tokens, --d-sae, --n-features, ...) or a machine with more"
)

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
    overwrite: bool = typer.Option(False, help="Write into a non-empty --out that is not a saelab demo folder."),
) -> None:
    """The main job on built-in defaults: toy models → SAE recovery, and built-in LM → SAE → dashboard."""
    from saelab.demo import run_demo

    run_demo(out, quick=quick, overwrite=overwrite)


app.add_typer(toy_app, name="toy")
app.add_typer(sae_app, name="sae")
app.add_typer(lm_app, name="lm")
app.add_typer(activations_app, name="activations")
app.add_typer(zoo_app, name="zoo")
app.command()(dashboard)
app.command()(serve)
app.command()(export)


def main() -> None:
    try:
        status = app(standalone_mode=False)
    except SaelabError as err:
        print(f"saelab: error: {err}", file=sys.stderr)
        sys.exit(2)
    except USAGE_ERRORS as err:  # a typo'd option or an unparseable value: one line, like our own errors
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        command = ctx.command_path if ctx is not None else "saelab"
        print(f"saelab: error: {err.format_message()} (see `{command} --help`)", file=sys.stderr)
        sys.exit(2)
    except (click.Abort, KeyboardInterrupt):
        print("saelab: aborted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # a full disk, a read-only folder, a path under a file, a port in use, ...
        if os.environ.get("SAELAB_DEBUG"):
            raise
        print(f"saelab: error: {describe_os_error(err)}", file=sys.stderr)
        sys.exit(2)
    except MemoryError:
        print(f"saelab: error: {OUT_OF_MEMORY}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:  # torch reports a failed allocation as a RuntimeError
        signs = ("can't allocate memory", "out of memory", "not enough memory")
        if os.environ.get("SAELAB_DEBUG") or not any(sign in str(err) for sign in signs):
            raise
        print(f"saelab: error: {OUT_OF_MEMORY} ({str(err).splitlines()[0][:160]})", file=sys.stderr)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
