"""The fast training path against its plain-PyTorch reference: same gradients, same expected loss, same result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_helpers import one_torch_thread

from saelab.toy import ToyModel, ToyModelConfig, ToyTrainConfig, train_toy_model
from saelab.toy.analysis import feature_errors
from saelab.toy.fast import estimated_loss, loss_and_grads, sample_nonempty


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_torch_thread():
        yield


def _model(variant: str = "relu", features: str = "independent", probs: torch.Tensor | None = None) -> ToyModel:
    cfg = ToyModelConfig(n_features=6, d_hidden=3, n_instances=4, variant=variant, features=features)
    probs = torch.tensor([[0.3, 0.05, 0.6, 0.01, 1.0, 0.2]]).repeat(4, 1) if probs is None else probs
    model = ToyModel(cfg, importance=torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) + 0.1,
                     feature_probability=probs.clamp(max=0.5) if features == "anticorrelated" else probs)  # fmt: skip
    model.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.b_final.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))  # some biases positive, some not
    return model


@pytest.mark.parametrize("features", ["independent", "correlated", "anticorrelated"])
@pytest.mark.parametrize("variant", ["relu", "linear", "neurons", "abs"])
def test_hand_derived_gradients_match_autograd(variant: str, features: str) -> None:
    model = _model(variant, features)
    rows, p_any = sample_nonempty(model, 256, torch.Generator().manual_seed(3))
    reference = estimated_loss(model, rows, p_any)
    reference.sum().backward()
    loss, grads = loss_and_grads(model, rows, p_any)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-7)
    assert set(grads) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@settings(max_examples=25, deadline=None)
@given(probs=st.lists(st.floats(1e-3, 1.0), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_conditioned_rows_are_never_empty_and_stay_in_range(probs: list[float], seed: int) -> None:
    model = ToyModel(ToyModelConfig(n_features=len(probs), d_hidden=1, n_instances=1), None, torch.tensor([probs]))
    rows, p_any = sample_nonempty(model, 512, torch.Generator().manual_seed(seed))
    assert rows.shape == (1, len(probs), 512)
    assert ((rows > 0).sum(1) >= 1).all()
    assert (rows >= 0).all() and (rows <= 1).all()
    expected = 1 - torch.prod(1 - torch.tensor(probs))
    torch.testing.assert_close(p_any, expected[None], rtol=1e-5, atol=1e-6)


def test_conditioned_rows_have_the_conditional_distribution() -> None:
    """P(j | any) = p_j / p_any, P(i and j | any) = p_i p_j / p_any, and values stay uniform."""
    probs = torch.tensor([[0.3, 0.05, 0.6, 0.01, 0.2]])
    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=1), None, probs)
    rows, p_any = sample_nonempty(model, 200_000, torch.Generator().manual_seed(0))
    present = (rows[0] > 0).float()  # [feat, batch]
    torch.testing.assert_close(present.mean(1), probs[0] / p_any, atol=0.005, rtol=0)
    pairs = present @ present.T / present.shape[1]
    expected = torch.outer(probs[0], probs[0]) / p_any
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(pairs[off_diagonal], expected[off_diagonal], atol=0.004, rtol=0)
    values = rows[0][rows[0] > 0]
    assert abs(values.mean().item() - 0.5) < 0.005 and abs(values.var().item() - 1 / 12) < 0.003


@pytest.mark.parametrize("variant", ["relu", "abs"])
def test_the_estimate_has_the_expected_loss_of_plain_batches(variant: str) -> None:
    model = _model(variant, probs=torch.tensor([[0.05, 0.02, 0.1, 0.01, 0.05, 0.03]]).repeat(4, 1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fast = torch.stack([estimated_loss(model, *sample_nonempty(model, 4096, generator)) for _ in range(40)])
        plain = torch.stack([model.loss_per_instance(model.generate_batch(4096, generator)) for _ in range(40)])
    # Both are unbiased; compare within 4 standard errors of the plain (noisier) estimate.
    tolerance = 4 * (plain.std(0) ** 2 / 40 + fast.std(0) ** 2 / 40).sqrt()
    assert ((fast.mean(0) - plain.mean(0)).abs() < tolerance).all()
    assert (fast.std(0) < 0.7 * plain.std(0)).all()  # and, on sparse features, less noisy


def test_fast_and_reference_training_reach_the_same_loss() -> None:
    losses = {}
    for method in ("fast", "reference"):
        model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=8, feature_probability=0.1))
        train_toy_model(model, ToyTrainConfig(steps=600, batch_size=512, method=method), progress=False)
        losses[method] = (model.importance * feature_errors(model, n_samples=20_000)).sum(-1).mean().item()
    untrained = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=8, feature_probability=0.1))
    start = (untrained.importance * feature_errors(untrained, n_samples=20_000)).sum(-1).mean().item()
    assert losses["fast"] < 0.5 * start and losses["reference"] < 0.5 * start
    assert abs(losses["fast"] - losses["reference"]) < 0.1 * losses["reference"]
