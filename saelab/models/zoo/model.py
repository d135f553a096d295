"""Zoo models: training a task's transformer from scratch, its folder format, loading, accuracy and probes.

A zoo model folder (`saelab zoo train NAME --out DIR` writes one; the shipped ones are `weights/<name>/`):

    cfg.json           {"format": "saelab.zoo_model", "format_version": 1, "task": name, "seed": ...,
                        "architecture": ZooArchitecture, "recipe": Recipe, "results": {...}}
    model.safetensors  the HookedTransformer's parameters (TransformerLens names)

`load_zoo_model("sum")` loads the shipped model, `load_zoo_model("path/to/folder")` a trained one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saelab.config import config_from_dict, config_to_dict, load_json
from saelab.errors import SaelabError
from saelab.io import (
    OutputKind,
    atomic_write_json,
    check_output,
    json_format_marker,
    load_tensors,
    output_folder,
    save_tensors,
)
from saelab.models.zoo.tasks import IGNORE, TASKS, Recipe, Task, TaskBatch, ZooArchitecture, get_task

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT_NAME = "saelab.zoo_model"
FORMAT_VERSION = 1
EVAL_SEED = 1_000_003  # fresh samples: training draws from streams seeded with small integers
EVAL_SAMPLES = 10_000


@dataclass
class ZooModel:
    task: Task
    model: HookedTransformer
    cfg: dict[str, Any]  # the cfg.json it was loaded from or saved to


def build_model(task: Task, architecture: ZooArchitecture, seed: int = 0, device: str = "cpu") -> HookedTransformer:
    from transformer_lens import HookedTransformer

    return HookedTransformer(architecture.tl_config(task, seed=seed, device=device))


def task_loss(logits: Tensor, batch: TaskBatch) -> Tensor:
    """Mean cross-entropy over the scored positions."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten().to(logits.device))


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_task_model(
    task: Task,
    recipe: Recipe | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> HookedTransformer:
    """Train the task's transformer from scratch on fresh samples every step (the stream is seeded by `seed`)."""
    from tqdm import tqdm

    recipe = recipe or task.recipe
    model = build_model(task, task.architecture, seed, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(recipe.steps), desc=f"zoo train {task.name}", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        batch = task.generate(recipe.batch_size, generator, "train")
        loss = task_loss(model(batch.tokens.to(device)), batch)
        if not torch.isfinite(loss):
            raise SaelabError(f"training {task.name} diverged at step {step} (loss {loss.item()}); lower the lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def evaluate(
    task: Task,
    model: HookedTransformer,
    n_samples: int = EVAL_SAMPLES,
    seed: int = EVAL_SEED,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Accuracy on judged positions and mean cross-entropy on scored positions, over fresh held-out samples."""
    batch = task.sample(n_samples, seed, "heldout")
    device = next(model.parameters()).device
    loss_sum, n_scored, n_right, n_judged = 0.0, 0, 0, 0
    for start in range(0, n_samples, batch_size):
        part = TaskBatch(*(t[start : start + batch_size] for t in dataclasses.astuple(batch)))
        logits = model(part.tokens.to(device)).float().cpu()
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), part.labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        loss_sum += losses.item()
        n_scored += int(part.scored.sum())
        right = (logits.argmax(-1) == part.labels) & part.judged
        n_right += int(right.sum())
        n_judged += int(part.judged.sum())
    judged_labels = batch.labels[batch.judged]
    majority = judged_labels.bincount(minlength=len(task.outputs)).max().item() / max(1, judged_labels.numel())
    return {
        "accuracy": n_right / n_judged,
        "loss": loss_sum / n_scored,
        "majority_accuracy": majority,
        "samples": n_samples,
        "judged_positions": n_judged,
        "seed": seed,
    }


# ------------------------------------------------------------------------------------------------------- folders


ZOO_FOLDER = OutputKind(
    "saelab zoo model folder",
    ("cfg.json", "model.safetensors"),
    json_format_marker("cfg.json", FORMAT_NAME),
    replace_quietly=False,  # minutes of training: replaced only with --overwrite
)


def save_zoo_model(
    out: Path,
    task: Task,
    model: HookedTransformer,
    seed: int,
    recipe: Recipe,
    results: dict[str, Any],
    overwrite: bool = False,
) -> None:
    cfg = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "task": task.name,
        "seed": seed,
        "architecture": config_to_dict(task.architecture),
        "recipe": config_to_dict(recipe),
        "results": results,
    }
    with output_folder(out, ZOO_FOLDER, overwrite=overwrite) as tmp:
        save_tensors(tmp / "model.safetensors", dict(model.named_parameters()))
        atomic_write_json(tmp / "cfg.json", cfg)


def shipped_folder(name: str) -> Path:
    get_task(name)
    return WEIGHTS_DIR / name


def resolve_zoo(name_or_folder: str) -> Path:
    """A task name (the shipped model) or a folder written by `saelab zoo train`."""
    spec = name_or_folder.removeprefix("zoo:")
    path = Path(spec)
    if (path / "cfg.json").is_file():
        return path
    if "/" in spec or os.sep in spec or path.exists():
        raise SaelabError(f"{spec} is not a zoo model folder (no cfg.json); pass a task name or a `zoo train` folder")
    folder = shipped_folder(spec)
    if not (folder / "cfg.json").is_file():
        raise SaelabError(f"no shipped weights for zoo task {spec}; train them: `saelab zoo train {spec} --out DIR`")
    return folder


def load_zoo_model(name_or_folder: str, device: str = "cpu") -> ZooModel:
    folder = resolve_zoo(name_or_folder)
    cfg = load_json(folder / "cfg.json")
    if cfg.get("format") != FORMAT_NAME or cfg.get("format_version") != FORMAT_VERSION:
        raise SaelabError(
            f"{folder / 'cfg.json'} is not a saelab zoo model (format {cfg.get('format')!r} "
            f"version {cfg.get('format_version')!r}; this saelab reads {FORMAT_NAME} {FORMAT_VERSION})"
        )
    task = get_task(str(cfg.get("task")))
    architecture = config_from_dict(ZooArchitecture, cfg.get("architecture"), f"{folder / 'cfg.json'}:architecture")
    model = build_model(task, architecture, device=device)
    weights = load_tensors(folder / "model.safetensors")
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()))[0][0]
        raise SaelabError(f"{folder / 'model.safetensors'} does not match its cfg.json (first mismatch: {diff})")
    model.load_state_dict(weights, strict=False)
    return ZooModel(task, model.eval(), cfg)


class TaskTokenizer:
    """The task's vocabulary as a tokenizer: token labels in and out, words separated by spaces; no special tokens."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, task: Task) -> None:
        self.task = task
        self.vocab_size = len(task.vocab)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.task.encode(text).tolist()

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.task.vocab[i] for i in ids]

    def decode(self, ids: list[int] | Tensor) -> str:
        return " ".join(self.convert_ids_to_tokens([int(i) for i in ids]))


class TaskStream:
    """Fresh task sequences for the activation store, in place of a text corpus's token contexts.

    Call k draws from a generator seeded by (seed, rank, k), so the stream's state is the number of calls, and
    each rank of a data-parallel run reads its own sequences.
    """

    def __init__(self, task: Task, seed: int = 0, rank: int = 0) -> None:
        self.task = task
        self.context_length = task.n_ctx
        self.seed, self.rank, self.calls = seed, rank, 0

    def next(self, n: int) -> Tensor:
        seed = int.from_bytes(f"{self.seed}/{self.rank}/{self.calls}".encode(), "big") % (2**63)
        self.calls += 1
        return self.task.sample(n, seed).tokens

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])


def zoo_language_model(spec: str, device: str = "cpu", bf16: bool = False) -> Any:
    """`zoo:NAME` or `zoo:DIR` as a `LanguageModel` that carries its task (`lm.task`)."""
    from saelab.models.access import LanguageModel

    zoo = load_zoo_model(spec, device)
    name = spec if spec.removeprefix("zoo:") in TASKS else f"zoo:{resolve_zoo(spec).resolve()}"
    return LanguageModel.from_transformer_lens(zoo.model, name, bf16, tokenizer=TaskTokenizer(zoo.task), task=zoo.task)


def train_zoo(
    name: str, out: Path, seed: int = 0, steps: int | None = None, progress: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """`saelab zoo train`: train (the task's recipe, `steps` if given), evaluate on fresh samples, write the
    folder; returns its results."""
    task = get_task(name)
    recipe = task.recipe if steps is None else dataclasses.replace(task.recipe, steps=steps)
    if recipe.steps <= 0:
        raise SaelabError(f"--steps must be positive, got {recipe.steps}")
    check_output(out, ZOO_FOLDER, overwrite=overwrite)  # before the work, not after it
    # Wall time depends on what else the machine runs; the process's CPU time (1 thread: the compute) does not.
    start, cpu_start = time.perf_counter(), time.process_time()
    model = train_task_model(task, recipe, seed=seed, progress=progress)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    results = evaluate(task, model)
    results |= {
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    save_zoo_model(out, task, model, seed, recipe, results, overwrite)
    return results


def training_positions(name: str, steps: int | None = None) -> int:
    """How many sequence positions the task's recipe (with `steps` if given) trains on: its cost, up to the model's
    width. Unlike the CPU time recorded in a shipped cfg.json, it does not depend on the machine or its load."""
    task = get_task(name)
    return (task.recipe.steps if steps is None else steps) * task.recipe.batch_size * task.n_ctx


def longest_first(names: list[str], steps: int | None = None) -> list[str]:
    """The order `train_all` hands tasks out in: most positions trained on first. Each worker takes the next task
    when it is free, so the long ones run side by side early and the short ones fill in at the end."""
    return sorted(names, key=lambda name: -training_positions(name, steps))


def _train_in_worker(name: str, out: Path, seed: int, steps: int | None, overwrite: bool, threads: int) -> dict:
    torch.set_num_threads(threads)  # as `saelab zoo train NAME --threads N`: 1 thread gives the same weights
    return train_zoo(name, out, seed=seed, steps=steps, overwrite=overwrite)


def train_all(
    out: Path,
    names: list[str] | None = None,
    seed: int = 0,
    steps: int | None = None,
    overwrite: bool = False,
    workers: int = 2,
    threads: int = 1,
    report: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """`saelab zoo train --all`: train each task into `out/NAME` (all seven unless `names`), `workers` processes
    side by side, longest first; each model is what `saelab zoo train NAME` writes. Returns each task's results."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    names = longest_first(list(TASKS) if names is None else [get_task(name).name for name in names], steps)
    if steps is not None and steps <= 0:
        raise SaelabError(f"--steps must be positive, got {steps}")
    if workers < 1:
        raise SaelabError(f"--workers must be at least 1, got {workers}")
    for name in names:  # refuse before the first minute of training, not after it
        check_output(out / name, ZOO_FOLDER, overwrite=overwrite)
    report(f"training {len(names)} zoo models into {out}, {workers} at a time, longest first: {' '.join(names)}")
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    # spawn, not fork: a fresh interpreter per worker, whatever torch state this process holds.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_worker, n, out / n, seed, steps, overwrite, threads): n for n in names}
        try:
            for future in as_completed(futures):
                name = futures[future]
                results[name] = done = future.result()
                report(
                    f"[{len(results)}/{len(names)}] {name}: accuracy {done['accuracy']:.4f}, loss "
                    f"{done['loss']:.4f}; {done['train_cpu_seconds']:.0f} s of CPU; "
                    f"{time.perf_counter() - start:.0f} s since the start"
                )
        except BaseException:
            # Tasks not yet started are dropped; running ones finish and write whole folders (never half ones).
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return {name: results[name] for name in names}


# -------------------------------------------------------------------------------------------------------- probes

PROBE_RIDGE = 1e-3


def probe_hooks(model: HookedTransformer) -> list[str]:
    """Every hook with one activation per position (attention patterns and scores are per pair of positions)."""
    return [name for name in model.hook_dict if not name.endswith(("hook_pattern", "hook_attn_scores"))]


def _design(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def fit_linear_probe(x_fit: Tensor, y_fit: Tensor, x_test: Tensor, y_test: Tensor, n_classes: int) -> float:
    """Ridge regression on standardised features: held-out accuracy (argmax of one-hot targets) or R²."""
    x_fit, x_test = x_fit.double(), x_test.double()
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)
    a_fit, a_test = _design(x_fit, mean, std), _design(x_test, mean, std)
    targets = torch.nn.functional.one_hot(y_fit, n_classes).double() if n_classes else y_fit.double()[:, None]
    gram = a_fit.T @ a_fit + PROBE_RIDGE * len(a_fit) * torch.eye(a_fit.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, a_fit.T @ targets)
    predicted = a_test @ weights
    if n_classes:
        return (predicted.argmax(1) == y_test).double().mean().item()
    y = y_test.double()
    return 1 - ((predicted[:, 0] - y) ** 2).sum().item() / ((y - y.mean()) ** 2).sum().item()


@torch.no_grad()
def probe_report(task: Task, model: HookedTransformer, n_samples: int = 2000, seed: int = EVAL_SEED + 1) -> dict:
    """A linear probe for the task's intermediate variable at every hook, fitted and tested on separate samples.

    Classes: held-out accuracy beside the majority-class accuracy; a real variable: held-out R² (0 = the mean).
    """
    n_classes = len(task.probe.classes)
    halves = [task.sample(n_samples, seed + i, "heldout") for i in range(2)]
    hooks = probe_hooks(model)
    caches = []
    for half in halves:
        _, cache = model.run_with_cache(half.tokens, names_filter=lambda name: name in hooks)
        caches.append(cache)
    y_fit, y_test = (h.variable[h.variable_mask] for h in halves)
    baseline = y_test.bincount(minlength=n_classes).max().item() / len(y_test) if n_classes else 0.0
    scores = {}
    for hook in [hook for hook in hooks if hook in caches[0].cache_dict]:  # some hooks are off (hook_result, ...)
        x_fit, x_test = (c[hook].flatten(2)[h.variable_mask] for c, h in zip(caches, halves, strict=True))
        scores[hook] = fit_linear_probe(x_fit, y_fit, x_test, y_test, n_classes)
    return {
        "variable": task.probe.name,
        "description": task.probe.description,
        "metric": "accuracy" if n_classes else "r2",
        "baseline": baseline,
        "hooks": scores,
    }
