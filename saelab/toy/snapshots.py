"""Snapshots of a toy model's weights along training, so every analysis can run at every stage.

`ToyTrainConfig.snapshots = N` keeps the weights after N log-spaced optimiser steps (1 … steps; log spacing
because toy models change fastest early). They are written as one safetensors file, `snapshots.safetensors`:

    step      [snapshot]                              int64, optimiser steps done when the weights were taken
    W         [snapshot, instances, d_hidden, n_features]
    b_final   [snapshot, instances, n_features]
    W_out     [snapshot, instances, n_features, d_hidden]   (abs variant only)

Importance and feature probability do not change in training; they stay in `model.safetensors`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from saelab.errors import SaelabError
from saelab.io import load_tensors, save_tensors
from saelab.toy.model import ToyModel

SNAPSHOTS_FILE = "snapshots.safetensors"


def snapshot_steps(steps: int, count: int) -> list[int]:
    """`count` distinct steps from 1 to `steps`, as evenly spaced in log(step) as integers allow.

    Each step is the rounded geometric point, pushed up past its predecessor where rounding would repeat one
    (early on, where consecutive integers are already more than evenly spaced in log), and the last is `steps`.
    """
    if not 0 <= count <= steps:
        raise SaelabError(f"cannot keep {count} distinct snapshots of a {steps}-step run; give at most {steps}")
    if count == 0:
        return []
    if count == 1:
        return [steps]
    chosen: list[int] = []
    for i in range(count):
        point = round(math.exp(math.log(steps) * i / (count - 1)))
        low = chosen[-1] + 1 if chosen else 1
        high = steps - (count - 1 - i)  # leave room for the ones still to come
        chosen.append(min(max(point, low), high))
    return chosen


def parameter_names(model: ToyModel) -> list[str]:
    return [name for name, _ in model.named_parameters()]


class SnapshotRecorder:
    """An `after_step` hook for `train_toy_model` that copies the weights at the chosen steps."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = steps
        self._wanted = set(steps)
        self.weights: dict[str, list[Tensor]] = {}

    def __call__(self, steps_done: int, model: ToyModel) -> None:
        if steps_done in self._wanted:
            for name, param in model.named_parameters():
                self.weights.setdefault(name, []).append(param.detach().cpu().clone())

    def tensors(self) -> dict[str, Tensor]:
        """The file's tensors: `step` and every parameter stacked along a leading snapshot axis."""
        taken = len(next(iter(self.weights.values()), []))
        if taken != len(self.steps):
            raise SaelabError(f"recorded {taken} of {len(self.steps)} snapshots; training stopped early")
        stacked = {name: torch.stack(values) for name, values in self.weights.items()}
        return {"step": torch.tensor(self.steps, dtype=torch.int64), **stacked}


def save_snapshots(path: Path, tensors: dict[str, Tensor]) -> None:
    save_tensors(Path(path), tensors, metadata={"format": "saelab.toy_snapshots"})


def load_snapshots(directory: Path, model: ToyModel) -> dict[str, Tensor]:
    """Read `directory/snapshots.safetensors` and check it against `model` (the folder's saved model)."""
    path = Path(directory) / SNAPSHOTS_FILE
    if not path.is_file():
        raise SaelabError(f"{directory} has no {SNAPSHOTS_FILE}; train with `saelab toy train --snapshots N`")
    tensors = load_tensors(path)
    if "step" not in tensors or tensors["step"].dim() != 1:
        raise SaelabError(f"{path} lacks a 1-D 'step' tensor; it is not a saelab snapshots file")
    steps = tensors["step"]
    count = steps.shape[0]
    if count == 0 or (steps[1:] <= steps[:-1]).any() or steps[0] < 0:
        raise SaelabError(f"{path}: 'step' must be increasing non-negative steps, got {steps.tolist()}")
    for name, param in model.named_parameters():
        expected = (count, *param.shape)
        if name not in tensors:
            raise SaelabError(f"{path} lacks tensor '{name}'; the snapshots are incomplete")
        if tuple(tensors[name].shape) != expected:
            raise SaelabError(f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, the model implies {expected}")
        if not torch.isfinite(tensors[name]).all():
            raise SaelabError(f"{path}: '{name}' holds non-finite values; the run diverged, retrain with a lower lr")
    return tensors


def load_snapshot_into(model: ToyModel, tensors: dict[str, Tensor], index: int) -> ToyModel:
    """Set `model`'s weights to snapshot `index` (in place); return the model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[name][index])
    return model
