"""The toy lab's acceptance criteria, each checked by really training (Elhage et al. 2022's headline results)."""

from __future__ import annotations

import pytest
import torch
from toy_helpers import cosine, one_torch_thread

from saelab.toy import PhaseDiagramConfig, ToyModel, ToyModelConfig, ToyTrainConfig, run_phase_diagram, train_toy_model
from saelab.toy.analysis import (
    REPRESENTED_NORM,
    dimensionality,
    feature_errors,
    feature_norms,
    is_regular_polygon,
    polygon_gaps,
)
from saelab.toy.phase import PHASES, phase_grid, phase_train_config


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_torch_thread():
        yield


def test_five_sparse_features_in_two_dimensions_form_regular_pentagons() -> None:
    """8 instances at p = 0.05 and 8 at p = 0.02, trained on the defaults: at least 6 of each 8 are regular
    pentagons (every norm > 0.9, adjacent angles 72° ± 5°) with dimensionality 2/5."""
    probabilities = [0.05] * 8 + [0.02] * 8
    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=16, feature_probability=probabilities))
    train_toy_model(model, ToyTrainConfig(), progress=False)
    W = model.W.detach()
    regular = is_regular_polygon(W, min_norm=0.9, tolerance_degrees=5.0)
    assert regular[:8].sum() >= 6 and regular[8:].sum() >= 6, polygon_gaps(W)
    torch.testing.assert_close(dimensionality(W)[regular], torch.full((int(regular.sum()), 5), 0.4), atol=0.02, rtol=0)


@pytest.mark.parametrize(("n_features", "d_hidden"), [(5, 2), (6, 3)])
def test_dense_features_keep_only_the_m_most_important_orthogonally(n_features: int, d_hidden: int) -> None:
    cfg = ToyModelConfig(n_features=n_features, d_hidden=d_hidden, n_instances=8, feature_probability=1.0,
                         importance_decay=0.7)  # fmt: skip
    model = ToyModel(cfg)
    # Dense features fade out slowly once dropped; a higher peak rate speeds that up (every row is non-empty).
    train_toy_model(model, ToyTrainConfig(steps=3000, batch_size=128, lr=3e-2), progress=False)
    W = model.W.detach()
    norms = feature_norms(W)
    assert (norms[:, :d_hidden] > 0.9).all(), norms  # the m most important are represented...
    assert (norms[:, d_hidden:] < REPRESENTED_NORM).all(), norms  # ...and nothing else
    gram = torch.einsum("ihf,ihg->ifg", W[:, :, :d_hidden], W[:, :, :d_hidden])
    off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    assert off_diagonal.abs().max() < 0.05  # orthogonal


def test_phase_diagram_of_two_features_in_one_dimension_has_the_three_regions() -> None:
    cfg = PhaseDiagramConfig(n_features=2, d_hidden=1, grid=8)
    model, _ = run_phase_diagram(cfg, phase_train_config(), progress=False)
    result = phase_grid(model, cfg)
    phase = torch.tensor(result["phase"])  # [density, importance], both ascending
    importance, density = torch.tensor(result["relative_importance"]), torch.tensor(result["density"])
    absent, dedicated, superposed = (PHASES.index(name) for name in ("not represented", "dedicated", "superposition"))

    dense = phase[density == 1.0][0]
    assert (dense[importance < 1] == absent).all(), phase  # high density: only the more important feature
    assert (dense[importance > 1] == dedicated).all(), phase
    sparse_similar = phase[density < 0.05][:, (importance > 0.3) & (importance < 3)]
    # Low density, similar importance: an antipodal pair. In one dimension a seed can start both features on one
    # side and stay stuck; a cell misses only if all its replicas do, which happens about once per diagram.
    assert (sparse_similar == superposed).float().mean() >= 0.85, phase
    weak = phase[density > 0.4][:, importance < 0.4]
    assert (weak == absent).all(), phase  # low relative importance: the weaker feature is dropped

    W = model.W.detach()[(phase == superposed).flatten()]
    assert (W[:, 0, 0] * W[:, 0, 1] < 0).all()  # superposition in one dimension means opposite signs


def test_anticorrelated_pairs_end_antipodal() -> None:
    """Three pairs in three dimensions, each pair firing one member at a time (p = 0.5 per feature)."""
    model = ToyModel(ToyModelConfig(n_features=6, d_hidden=3, n_instances=8, features="anticorrelated",
                                    feature_probability=0.5))  # fmt: skip
    train_toy_model(model, ToyTrainConfig(), progress=False)
    W = model.W.detach()
    pair_cosines = torch.stack([cosine(W, k, k + 1) for k in (0, 2, 4)], dim=-1)
    antipodal = (pair_cosines < -0.95).all(-1)
    assert antipodal.sum() >= 6, pair_cosines  # ~97% of seeds; the rest settle on a worse local minimum
    loss = (model.importance * feature_errors(model, n_samples=8192)).sum(-1)
    if not antipodal.all():
        assert loss[antipodal].max() < loss[~antipodal].min()  # a miss is a worse local minimum, not an optimum


def test_correlated_pairs_end_orthogonal_where_there_is_room() -> None:
    model = ToyModel(ToyModelConfig(n_features=6, d_hidden=3, n_instances=8, features="correlated",
                                    feature_probability=0.05))  # fmt: skip
    train_toy_model(model, ToyTrainConfig(), progress=False)
    W = model.W.detach()
    assert (feature_norms(W) > 0.9).all()
    pair_cosines = torch.stack([cosine(W, k, k + 1) for k in (0, 2, 4)], dim=-1)
    assert pair_cosines.abs().max() < 0.1, pair_cosines
