"""Shared pieces of the SAE tests: a one-thread fixture and a trained pentagon toy model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saelab.toy import ToyModel, ToyModelConfig, ToyTrainConfig, save_toy_model, train_toy_model


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one thread: these tensors are small, and on a busy machine a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_pentagon(out: Path) -> Path:
    """A trained 5-feature, 2-dimensional toy model at feature probability 0.05: five directions in a pentagon."""
    torch.set_num_threads(1)
    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=1, feature_probability=0.05))
    train_toy_model(model, ToyTrainConfig(steps=3000, batch_size=1024, lr=1e-2, lr_schedule="cosine"), progress=False)
    norms = model.feature_directions(0).norm(dim=1)
    assert (norms > 0.5).all(), f"the toy model did not learn all five features (norms {norms.tolist()})"
    return save_toy_model(model, out)
