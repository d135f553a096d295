"""saelab.sae.metrics and saelab.stats on inputs whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from sae_helpers import one_thread  # noqa: F401  (autouse)

from saelab.errors import SaelabError
from saelab.sae.metrics import ground_truth_metrics, mcc, mmcs
from saelab.stats import ReconstructionStats, density_metrics, explained_variance


def _stats(x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor, batch: int) -> dict:
    stats = ReconstructionStats(latents.shape[1])
    for start in range(0, x.shape[0], batch):
        stats.update(x[start : start + batch], x_hat[start : start + batch], latents[start : start + batch])
    return stats.compute()


def test_explained_variance_known_answers() -> None:
    x = torch.randn(500, 6, dtype=torch.float64) + 3.0  # a large mean: EV is about variance, not E x²
    assert explained_variance(x, x) == 1.0
    assert explained_variance(x, x.mean(dim=0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    noise = torch.randn(500, 6, dtype=torch.float64)
    expected = 1 - noise.double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()
    assert explained_variance(x, x + noise) == pytest.approx(float(expected), rel=1e-12)
    assert math.isnan(explained_variance(torch.ones(4, 3), torch.ones(4, 3)))  # no variance to explain


def test_accumulated_metrics_are_exact_however_the_data_is_batched() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=generator) + 1.0
    x[::10] = 0.0  # all-zero tokens: excluded from cosine and shrinkage, counted everywhere else
    x_hat = 0.5 * x
    latents = torch.zeros(300, 4)
    latents[:, 0] = 1.0  # fires on every token
    latents[:30, 1] = 2.0  # on 10 % of tokens
    latents[:2, 2] = 1.0  # on 2 / 300 < 1 %
    one_batch, many = _stats(x, x_hat, latents, 300), _stats(x, x_hat, latents, 7)
    for key in ("l0", "mse", "explained_variance", "cosine_similarity", "shrinkage", "dead_fraction"):
        assert many[key] == pytest.approx(one_batch[key], rel=1e-12)
    assert one_batch["tokens"] == 300
    assert one_batch["l0"] == pytest.approx((300 + 30 + 2) / 300)
    assert one_batch["mse"] == pytest.approx(float((0.5 * x).double().pow(2).sum(1).mean()))
    assert one_batch["cosine_similarity"] == pytest.approx(1.0)
    assert one_batch["shrinkage"] == pytest.approx(0.5)
    assert one_batch["explained_variance"] == pytest.approx(explained_variance(x, x_hat), rel=1e-12)
    assert one_batch["dead_fraction"] == 0.25
    assert one_batch["dense_fraction_1pct"] == 0.5  # latents 0 and 1
    assert one_batch["dense_fraction_10pct"] == 0.25  # latent 0 only; latent 1 fires on exactly 10 %


def test_density_histogram_counts_live_latents_by_log_frequency() -> None:
    frequencies = torch.tensor([0.0, 1e-5, 1.5e-5, 0.5, 1.0, 0.0], dtype=torch.float64)
    metrics = density_metrics(frequencies)
    histogram = metrics["density_histogram"]
    assert histogram["dead"] == 2 and sum(histogram["counts"]) == 4
    edges, counts = histogram["log10_bin_edges"], histogram["counts"]
    bin_of = lambda f: max(i for i, e in enumerate(edges[:-1]) if math.log10(f) >= e)  # noqa: E731
    assert counts[bin_of(1e-5)] == 2 and counts[bin_of(0.5)] == 1 and counts[-1] >= 1  # 1.0 sits in the last bin
    assert metrics["dead_fraction"] == pytest.approx(2 / 6)


def test_ground_truth_metrics_known_answers() -> None:
    generator = torch.Generator().manual_seed(1)
    true = torch.nn.functional.normalize(torch.randn(20, 8, generator=generator), dim=1)
    permuted = true[torch.randperm(20, generator=generator)] * 3.0  # norms do not matter
    assert mcc(true, permuted) == pytest.approx(1.0)
    assert mmcs(true, permuted) == pytest.approx(1.0)
    assert ground_truth_metrics(true, permuted)["recovered"] == 20
    assert mmcs(true[:1], -true[:1]) == pytest.approx(-1.0)  # signed: an opposite direction is no recovery

    # Two true features, two learned directions that both lie closest to the first feature: MMCS counts the
    # first feature's best match for it and the second's best for it; the matching must pair them one-to-one.
    true = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = math.cos(math.radians(30))
    learned = torch.tensor([[1.0, 0.0], [c, 0.5]])
    assert mmcs(true, learned) == pytest.approx((1.0 + 0.5) / 2)
    assert mcc(true, learned) == pytest.approx((1.0 + 0.5) / 2)
    learned = torch.tensor([[c, 0.5], [1.0, 0.0], [0.0, -1.0]])
    assert mcc(true, learned) == pytest.approx((1.0 + 0.5) / 2)  # Hungarian pairs (e1, [1,0]) and (e2, [c, .5])
    report = ground_truth_metrics(true, learned, threshold=0.9)
    assert report["recovered"] == 1 and report["best_cosine_per_feature"] == pytest.approx([1.0, 0.5])
    # fewer learned directions than features: the unmatched feature counts as zero
    assert mcc(true, torch.tensor([[0.0, 1.0]])) == pytest.approx(0.5)


def test_metric_input_errors() -> None:
    with pytest.raises(SaelabError, match="cannot compare directions"):
        mmcs(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(SaelabError, match="no tokens"):
        ReconstructionStats(4).compute()
