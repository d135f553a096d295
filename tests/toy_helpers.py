"""Shared pieces of the toy-model tests."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run toy training single-threaded: its tensors are tiny, and on a shared 2-core machine a second
    intra-op thread mostly waits for a busy core (steps get ~10× slower). Restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cosine(W: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """cos(W_i, W_j) per instance for W [instances, d_hidden, n_features]: [instances]"""
    a, b = W[:, :, i], W[:, :, j]
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def unit_vectors_2d(n: int, phase: float = 0.0) -> torch.Tensor:
    """n unit vectors at equal angles, as W [1, 2, n] (a regular n-gon)."""
    angles = torch.tensor([phase + 2 * math.pi * k / n for k in range(n)], dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()])[None]


def invoke_cli(*args: object) -> str:
    """Run `saelab ARGS` in-process; raise what it raised (a SaelabError for bad input), else return its output."""
    from typer.testing import CliRunner

    from saelab.cli import app  # the whole CLI loads only for the tests that run it

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output
