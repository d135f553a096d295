"""`saelab zoo ...`: list the algorithmic-task models, train one (or all seven) from scratch, measure one."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="The algorithmic-problem model zoo: tiny transformers on tasks with known algorithms.", no_args_is_help=True
)


@app.command("list")
def list_tasks() -> None:
    """Each task with its model and the shipped weights' measured accuracy."""
    from saelab.config import load_json
    from saelab.models.zoo.model import shipped_folder
    from saelab.models.zoo.tasks import TASKS

    typer.echo(f"{'task':<12} {'model':<30} {'accuracy':>8} {'loss':>7}  what it computes")
    for name, task in TASKS.items():
        arch = task.architecture
        shape = f"{arch.n_layers}L x {arch.n_heads}H d{arch.d_model}" + (f" mlp{arch.d_mlp}" if arch.d_mlp else "")
        cfg_path = shipped_folder(name) / "cfg.json"
        if cfg_path.is_file():
            results = load_json(cfg_path)["results"]
            measured = f"{results['accuracy']:>8.4f} {results['loss']:>7.4f}"
        else:
            measured = f"{'-':>8} {'-':>7}"
        typer.echo(f"{name:<12} {shape:<30} {measured}  {task.summary}")


@app.command("train")
def train(
    name: str = typer.Argument(None, help="Task name (see `saelab zoo list`); or --all."),
    all_tasks: bool = typer.Option(False, "--all", help="Train all seven tasks, --workers at a time, into --out/NAME."),
    out: Path = typer.Option(
        None,
        "--out",
        help="Folder to write: cfg.json and model.safetensors (default zoo_runs/NAME); with --all, their parent.",
    ),
    seed: int = typer.Option(0, help="Seed of the initialisation and the training stream."),
    steps: int | None = typer.Option(None, help="Training steps instead of the recipe's (a quick, weaker model)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
    threads: int = typer.Option(1, min=1, help="Torch CPU threads; with 1 the same seed gives the same weights."),
    workers: int = typer.Option(2, min=1, help="With --all: tasks trained side by side, each in its own process."),
) -> None:
    """Train a task's transformer from scratch with its recipe, evaluate it on 10k fresh samples, save it."""
    import torch

    from saelab.errors import SaelabError
    from saelab.models.zoo.model import train_all, train_zoo

    if all_tasks and name is not None:
        raise SaelabError(f"pass a task name ({name}) or --all, not both")
    if not all_tasks and name is None:
        raise SaelabError("name the task to train (see `saelab zoo list`), or pass --all to train all seven")
    if all_tasks:
        train_all(out or Path("zoo_runs"), seed=seed, steps=steps, overwrite=overwrite, workers=workers,
                  threads=threads, report=typer.echo)  # fmt: skip
        return
    # The models are tiny: a second thread barely helps, and one thread makes the run reproducible bit for bit.
    torch.set_num_threads(threads)
    out = out or Path("zoo_runs") / name
    results = train_zoo(name, out, seed=seed, steps=steps, progress=True, overwrite=overwrite)
    typer.echo(
        f"{name}: accuracy {results['accuracy']:.4f}, loss {results['loss']:.4f} on {results['samples']} fresh "
        f"samples; trained in {results['train_seconds']:.0f} s ({results['train_cpu_seconds']:.0f} s of CPU, "
        f"{results['torch_threads']} torch threads); wrote {out}"
    )


@app.command("eval")
def evaluate(
    name: str = typer.Argument(..., help="Task name (its shipped model) or a folder written by `saelab zoo train`."),
    samples: int = typer.Option(10_000, help="Fresh samples to measure accuracy and loss on."),
    seed: int = typer.Option(1_000_003, help="Seed of the fresh samples."),
    probes: bool = typer.Option(True, help="Fit a linear probe for the task's intermediate variable at every hook."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Accuracy and loss on fresh samples, and where in the model the task's intermediate variable is linear."""
    from saelab.models.zoo.model import evaluate as evaluate_model
    from saelab.models.zoo.model import load_zoo_model, probe_report

    zoo = load_zoo_model(name)
    report = evaluate_model(zoo.task, zoo.model, samples, seed)
    report = {"task": zoo.task.name, **report}
    if probes:
        report["probes"] = probe_report(zoo.task, zoo.model)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"{zoo.task.name}: accuracy {report['accuracy']:.4f} (always guessing the commonest answer: "
        f"{report['majority_accuracy']:.4f}), loss {report['loss']:.4f}, {samples} fresh samples"
    )
    if probes:
        probe = report["probes"]
        typer.echo(
            f"linear probe for {probe['variable']} ({probe['description']}): held-out {probe['metric']}, "
            f"baseline {probe['baseline']:.3f}"
        )
        for hook, score in probe["hooks"].items():
            typer.echo(f"  {hook:<32} {score:.3f}")
