"""Analysis measures on fixed matrices with hand-computed values, their invariants, and the marginal loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_helpers import one_torch_thread, unit_vectors_2d

from saelab.toy import ToyModel, ToyModelConfig, analyze_toy_model
from saelab.toy.analysis import (
    GEOMETRY_PLATEAUS,
    capacity,
    dimensionality,
    dims_per_feature,
    feature_errors,
    feature_norms,
    geometry_name,
    interference,
    is_regular_polygon,
    marginal_loss,
    polygon_gaps,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_torch_thread():
        yield


def test_hand_computed_values_on_a_fixed_matrix() -> None:
    # W_1 = (1, 0), W_2 = (1, 1), W_3 = (0, 2): Gram entries 1, 1, 0 / 2, 2 / 4.
    W = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(feature_norms(W), torch.tensor([[1.0, math.sqrt(2), 2.0]], dtype=torch.float64))
    # C_i = (W_i·W_i)² / Σ_j (W_i·W_j)²: 1/(1+1+0), 4/(1+4+4), 16/(0+4+16)
    expected = torch.tensor([[1 / 2, 4 / 9, 4 / 5]], dtype=torch.float64)
    torch.testing.assert_close(capacity(W), expected)
    # D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²: 1/(1+1+0), 2/((1/√2)²+2+(2/√2)²) = 2/4.5, 4/(0+1+4)
    torch.testing.assert_close(dimensionality(W), expected)
    # Σ_{j≠i} (Ŵ_i·W_j)²: 1+0, 1/2+2, 0+1
    torch.testing.assert_close(interference(W), torch.tensor([[1.0, 2.5, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(dims_per_feature(W), torch.tensor([2 / 7], dtype=torch.float64))  # m / ‖W‖²_F


def test_an_unembedded_feature_has_zero_dimensionality_not_nan() -> None:
    W = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    for measure in (dimensionality, capacity, interference):
        assert not measure(W).isnan().any()
    torch.testing.assert_close(dimensionality(W), torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(interference(W), torch.zeros(1, 3))


def _tetrahedron() -> torch.Tensor:
    return (torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64).T / math.sqrt(3))[
        None
    ]


def _square_antiprism() -> torch.Tensor:
    # Two squares at heights ±h, turned 45° apart; h² = 1/3 makes the 8 vectors a tight frame.
    h, r = 1 / math.sqrt(3), math.sqrt(2 / 3)
    angles = [k * math.pi / 2 + (math.pi / 4 if top else 0.0) for top in (False, True) for k in range(4)]
    heights = [h if top else -h for top in (False, True) for _ in range(4)]
    return torch.tensor([[r * math.cos(a), r * math.sin(a), z] for a, z in zip(angles, heights, strict=True)]).T[None]


@pytest.mark.parametrize(
    ("W", "name"),
    [
        (torch.eye(3, dtype=torch.float64)[None], "dedicated"),
        (_tetrahedron(), "tetrahedron"),
        (unit_vectors_2d(3), "triangle"),
        (unit_vectors_2d(2), "antipodal"),
        (unit_vectors_2d(5, phase=0.3), "pentagon"),
        (_square_antiprism(), "square antiprism"),
    ],
)
def test_each_geometry_sits_on_its_dimensionality_plateau(W: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(dimensionality(W), torch.full(W.shape[::2], GEOMETRY_PLATEAUS[name], dtype=W.dtype))
    assert all(geometry_name(d, n) == name for d, n in zip(dimensionality(W)[0], feature_norms(W)[0], strict=True))


def test_geometry_names_between_and_below_plateaus() -> None:
    assert geometry_name(0.41, 1.0) == "pentagon"
    assert geometry_name(0.38, 1.0) == "square antiprism"
    assert geometry_name(0.2, 1.0) == "other"
    assert geometry_name(0.9, 0.2) == "not represented"


def test_regular_polygon_check_and_gaps() -> None:
    pentagon = unit_vectors_2d(5, phase=1.0)
    torch.testing.assert_close(polygon_gaps(pentagon), torch.full((1, 5), 72.0, dtype=torch.float64))
    assert is_regular_polygon(pentagon).all()
    skewed = pentagon.clone()
    skewed[0, :, 0] = torch.tensor([math.cos(1.2), math.sin(1.2)])  # one feature 11° off
    assert not is_regular_polygon(skewed).any()
    assert not is_regular_polygon(0.8 * pentagon).any()  # too short


matrices = st.integers(1, 4).flatmap(
    lambda m: st.integers(1, 7).flatmap(
        lambda n: st.lists(st.floats(-2, 2, allow_nan=False), min_size=m * n, max_size=m * n).map(
            lambda values: torch.tensor(values, dtype=torch.float64).reshape(1, m, n)
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(W=matrices)
def test_capacity_equals_dimensionality_and_sums_to_at_most_m(W: torch.Tensor) -> None:
    W = torch.where(W.abs() < 1e-3, torch.zeros_like(W), W)  # exact zeros or clearly non-zero entries
    caps = capacity(W)
    torch.testing.assert_close(caps, dimensionality(W))
    assert ((caps >= 0) & (caps <= 1 + 1e-9)).all()
    assert caps.sum() <= W.shape[1] + 1e-9  # Scherlis et al.: total capacity ≤ number of dimensions


def _trained_like_model() -> ToyModel:
    """A pentagon with a slightly negative bias (what training finds), plus a dense instance, in float64."""
    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=2, feature_probability=[0.05, 1.0]))
    model = model.double()
    with torch.no_grad():
        model.W.copy_(torch.cat([unit_vectors_2d(5), unit_vectors_2d(5, phase=0.2) * torch.tensor([1, 1, 0, 0, 0.3])]))
        model.b_final.fill_(-0.1)
        model.importance.copy_(torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6]]).repeat(2, 1))
    return model


def test_dloss_dimportance_is_the_error_left_on_each_feature() -> None:
    model = _trained_like_model()
    marginal = marginal_loss(model, n_samples=2048, seed=5)
    errors = feature_errors(model, n_samples=2048, seed=5)
    torch.testing.assert_close(marginal["dloss_dimportance"], errors.detach())
    torch.testing.assert_close(marginal["feature_loss"], (model.importance * errors).detach())


def test_dloss_dcapacity_matches_finite_differences_along_the_embedding_length() -> None:
    model = _trained_like_model()
    marginal = marginal_loss(model, n_samples=2048, seed=5)
    eps = 1e-4
    for i in range(5):
        scaled = {}
        for sign in (1, -1):
            W = model.W.detach().clone()
            W[:, :, i] *= 1 + sign * eps
            own = (model.importance * feature_errors(model, n_samples=2048, seed=5, W=W))[:, i]
            scaled[sign] = (own, capacity(W)[:, i])
        slope = (scaled[1][0] - scaled[-1][0]) / (scaled[1][1] - scaled[-1][1])
        # Instance 0 (pentagon) is in superposition; instance 1 has two dedicated features and one absent.
        torch.testing.assert_close(marginal["dloss_dcapacity"][0, i], slope[0].detach(), rtol=1e-4, atol=1e-9)
    assert marginal["dloss_dcapacity"][1, 2:4].isnan().all()  # capacity pinned at 0: undefined
    assert (marginal["dloss_dcapacity"][0] < 0).all()  # more capacity, less loss on the feature itself


def test_analysis_dict_is_json_and_describes_every_feature() -> None:
    analysis = analyze_toy_model(_trained_like_model().float(), n_samples=1024)
    text = json.dumps(analysis, allow_nan=False)
    assert json.loads(text) == analysis
    pentagon, dense = analysis["instances"]
    assert pentagon["geometry"] == ["pentagon"] * 5 and pentagon["n_represented"] == 5
    assert pentagon["dims_per_feature"] == pytest.approx(0.4) and pentagon["total_capacity"] == pytest.approx(2.0)
    assert dense["geometry"][2:4] == ["not represented", "not represented"]
    assert dense["features"]["dloss_dcapacity"][2] is None
    assert set(pentagon["features"]) >= {"norm", "interference", "dimensionality", "capacity", "dloss_dimportance"}
