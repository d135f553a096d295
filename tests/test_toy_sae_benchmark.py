"""The toy-model SAE benchmark: hierarchical features, every reported metric against a slow reference, absorption on
hand-built SAEs whose answer is known, and a real (tiny) run through the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_helpers import invoke_cli as _invoke
from toy_helpers import one_torch_thread

from saelab.errors import SaelabError
from saelab.sae.evaluate import EVAL_SEED
from saelab.sae.metrics import cosine_matrix
from saelab.sae.model import SAEConfig, build_sae
from saelab.toy import ToyModel, ToyModelConfig, load_toy_model
from saelab.toy.sae_benchmark import (
    SAEBenchmarkConfig,
    Study,
    absorption,
    build_toy_model,
    evaluate_study,
    matched_cosines,
    plan_studies,
    summarize,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_torch_thread():
        yield


# --- hierarchical features ----------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    children=st.integers(1, 3),
    groups=st.integers(1, 3),
    parent_p=st.floats(0.05, 1.0),
    child_given_parent=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_hierarchical_children_need_their_parent_and_marginals_are_as_specified(
    children: int, groups: int, parent_p: float, child_given_parent: float, seed: int
) -> None:
    group = children + 1
    cfg = ToyModelConfig(n_features=group * groups, d_hidden=2, n_instances=2, features="hierarchical",
                         feature_probability=[parent_p, parent_p / 2], children_per_parent=children,
                         child_given_parent=child_given_parent)  # fmt: skip
    model = ToyModel(cfg)
    rows = 20_000
    present = model.generate_batch(rows, torch.Generator().manual_seed(seed)) != 0
    for g in range(groups):
        parent, kids = present[..., g * group], present[..., g * group + 1 : (g + 1) * group]
        assert not (kids & ~parent[..., None]).any()  # a child is never present without its parent
        assert (kids.sum(-1) <= 1).all()  # at most one child of a parent at a time
    for inst, p in enumerate([parent_p, parent_p / 2]):
        for feature in range(cfg.n_features):
            expected = p if feature % group == 0 else p * child_given_parent / children
            assert float(model.feature_probability[inst, feature]) == pytest.approx(expected, rel=1e-6)
            observed = float(present[:, inst, feature].double().mean())
            tolerance = 5 * math.sqrt(expected * (1 - expected) / rows) + 1e-9
            assert abs(observed - expected) <= tolerance, (inst, feature, observed, expected)


def test_hierarchical_probabilities_are_checked() -> None:
    cfg = ToyModelConfig(n_features=6, d_hidden=2, n_instances=1, features="hierarchical")
    too_likely = torch.tensor([[0.1, 0.08, 0.08, 0.1, 0.01, 0.01]])
    with pytest.raises(SaelabError, match="children's probabilities must sum to at most their parent's"):
        ToyModel(cfg, feature_probability=too_likely)
    with pytest.raises(SaelabError, match="multiple of 3"):
        ToyModelConfig(n_features=5, features="hierarchical").validate()


# --- metrics against slow references ------------------------------------------------------------------------


def _slow_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms > 0 else 0.0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), extra=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_matched_cosines_is_the_best_one_to_one_assignment(n: int, extra: int, seed: int) -> None:
    cosines = torch.rand(n, n + extra, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    best_total, best = -math.inf, None
    for latents in itertools.permutations(range(n + extra), n):  # every injection of features into latents
        total = sum(float(cosines[i, latents[i]]) for i in range(n))
        if total > best_total:
            best_total, best = total, [float(cosines[i, latents[i]]) for i in range(n)]
    assert matched_cosines(cosines).tolist() == pytest.approx(best, abs=1e-12)


def _perturbed_saes(d_in: int, d_sae: int, architectures: list[str], seed: int) -> list:
    """Real SAEs of each architecture with random (untrained) weights and biases that let latents fire."""
    saes = []
    for j, arch in enumerate(architectures):
        sae = build_sae(SAEConfig(arch, d_in, d_sae, k=2), torch.Generator().manual_seed(seed + j))
        with torch.no_grad():
            for name, param in sae.named_parameters():
                if name.startswith("b_"):
                    param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed + 100 + j))
        saes.append(sae.eval())
    return saes


def test_every_reported_metric_matches_a_slow_computation() -> None:
    cfg = SAEBenchmarkConfig(shapes=[], hierarchical_shapes=[[6, 3]], hierarchical_probabilities=[0.4, 0.2],
                             architectures=["relu", "topk"], eval_tokens=512)  # fmt: skip
    (study,) = plan_studies(cfg)
    model = build_toy_model(study, cfg)
    with torch.no_grad():
        model.W.normal_(generator=torch.Generator().manual_seed(3))
        model.W[1, :, 2] *= 0.1  # a feature the toy model barely represents
    saes = [sae for _ in study.instances for sae in _perturbed_saes(3, 8, cfg.architecture_list, seed=7)]
    pairs = [(i // 2, sae) for i, sae in enumerate(saes)]
    features, instances, absorptions = evaluate_study(study, model, pairs, cfg)
    assert len(features) == 2 * 2 * 6 and len(instances) == 4 and len(absorptions) == 4 * 2

    with torch.no_grad():
        present = model.generate_batch(cfg.eval_tokens, torch.Generator().manual_seed(EVAL_SEED))
        hidden = model.hidden(present)
    W = model.W.detach().double().tolist()  # [inst][hid][feat]
    for row in features:
        i, f = row["instance"], row["feature"]
        sae = saes[i * 2 + cfg.architecture_list.index(row["architecture"])]
        column = [W[i][h][f] for h in range(3)]
        decoder = sae.W_dec.detach().double().tolist()
        slow = [_slow_cosine(column, decoder[latent]) for latent in range(8)]
        assert row["best_cosine"] == pytest.approx(max(slow), abs=1e-9)
        assert row["best_latent"] == slow.index(max(slow))
        norm = math.sqrt(sum(v * v for v in column))
        assert row["norm"] == pytest.approx(norm, rel=1e-5)
        projections = sum((sum(column[h] * W[i][h][j] for h in range(3)) / norm) ** 2 for j in range(6))
        assert row["dimensionality"] == pytest.approx(norm**2 / projections, rel=1e-4)
        assert row["represented"] == (norm >= 0.5)
        assert row["importance"] == 1.0 and row["role"] == ("parent" if f % 3 == 0 else "child")
    for row in instances:
        i = row["instance"]
        sae = saes[i * 2 + cfg.architecture_list.index(row["architecture"])]
        x = hidden[:, i].double()
        latents = sae.encode(x.float()).detach().double()
        x_hat = latents @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
        mean = x.mean(dim=0)
        ev = 1 - sum(float((x[t] - x_hat[t]).pow(2).sum()) for t in range(len(x))) / sum(
            float((x[t] - mean).pow(2).sum()) for t in range(len(x))
        )
        assert row["explained_variance"] == pytest.approx(ev, abs=1e-5)
        assert row["l0"] == pytest.approx(sum(int((latents[t] != 0).sum()) for t in range(len(x))) / len(x))
        never = sum(all(float(latents[t, latent]) == 0 for t in range(len(x))) for latent in range(8))
        assert row["dead_fraction"] == pytest.approx(never / 8)
        kept = [r for r in features if r["instance"] == i and r["architecture"] == row["architecture"]]
        kept = [r for r in kept if r["represented"]]
        assert row["mmcs"] == pytest.approx(sum(r["best_cosine"] for r in kept) / len(kept))
        assert row["mcc"] == pytest.approx(sum(r["matched_cosine"] for r in kept) / len(kept))
    for row in absorptions:
        i = row["instance"]
        sae = saes[i * 2 + cfg.architecture_list.index(row["architecture"])]
        expected = _slow_absorption(present[:, i] != 0, sae.encode(hidden[:, i]) != 0,
                                    W[i], sae.W_dec.detach().double().tolist(), row["parent"], cfg)  # fmt: skip
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, abs=1e-12), key


def _slow_absorption(present, fires, W, decoder, parent: int, cfg: SAEBenchmarkConfig) -> dict[str, float | None]:
    """The absorption definition, one input and one latent at a time."""
    hid = len(W)
    direction = lambda f: [W[h][f] for h in range(hid)]  # noqa: E731
    cos = lambda f, latent: _slow_cosine(direction(f), decoder[latent])  # noqa: E731
    children = range(parent + 1, parent + cfg.children_per_parent + 1)
    parent_cosines = [cos(parent, latent) for latent in range(len(decoder))]
    parent_latent = parent_cosines.index(max(parent_cosines))
    tau = cfg.absorption_threshold
    child_active = absorbed = missed_child = alone = missed_alone = 0
    for t in range(present.shape[0]):
        silent = not bool(fires[t, parent_latent])
        active_children = [c for c in children if bool(present[t, c])]
        if active_children:
            child_active += 1
            missed_child += silent
            absorbing = any(
                bool(fires[t, latent])
                and latent != parent_latent
                and cos(parent, latent) >= tau
                and cos(c, latent) >= tau
                for c in active_children
                for latent in range(len(decoder))
            )
            absorbed += silent and absorbing
        elif bool(present[t, parent]):
            alone += 1
            missed_alone += silent
    return {
        "parent_latent": parent_latent,
        "child_active_inputs": child_active,
        "absorbed_inputs": absorbed,
        "parent_missed_with_child": missed_child,
        "parent_missed_alone": missed_alone,
        "absorption_rate": absorbed / child_active if child_active else None,
        "parent_miss_with_child": missed_child / child_active if child_active else None,
        "parent_miss_alone": missed_alone / alone if alone else None,
    }


# --- absorption on SAEs built by hand -----------------------------------------------------------------------


def _hand_built_relu_sae(W_enc: torch.Tensor, W_dec: torch.Tensor):
    sae = build_sae(SAEConfig("relu", W_dec.shape[1], W_dec.shape[0]))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_absorption_is_one_for_an_absorbing_sae_and_zero_for_a_faithful_one() -> None:
    """A parent e0 with children e1, e2 (orthogonal). The faithful SAE has one latent per feature; the absorbing one
    has a parent latent that switches off whenever a child is present, and child latents along parent + child."""
    model = ToyModel(ToyModelConfig(n_features=3, d_hidden=3, n_instances=1, features="hierarchical",
                                    feature_probability=0.5, child_given_parent=0.8))  # fmt: skip
    with torch.no_grad():
        model.W.copy_(torch.eye(3)[None])
    with torch.no_grad():
        present = model.generate_batch(4000, torch.Generator().manual_seed(0))[:, 0]
        x = model.hidden(present[:, None])[:, 0]
    eye = torch.eye(3)
    faithful = _hand_built_relu_sae(eye, eye)
    root_half = 1 / math.sqrt(2)
    absorbing_dec = torch.tensor([[1.0, 0, 0], [root_half, root_half, 0], [root_half, 0, root_half]])
    # W_enc[:, j] reads latent j: the parent latent reads x0 − 10⁶(x1 + x2), so any child present silences it.
    absorbing_enc = torch.tensor([[1.0, 0, 0], [-1e6, 1, 0], [-1e6, 0, 1]])
    absorbing = _hand_built_relu_sae(absorbing_enc, absorbing_dec)
    truth = eye

    (faithful_row,) = absorption(present != 0, faithful.encode(x) != 0, cosine_matrix(truth, faithful.W_dec), 2, 0.2)
    (absorbing_row,) = absorption(present != 0, absorbing.encode(x) != 0, cosine_matrix(truth, absorbing.W_dec), 2, 0.2)
    child_active = int((present[:, 1:] != 0).any(dim=1).sum())
    assert faithful_row["child_active_inputs"] == absorbing_row["child_active_inputs"] == child_active > 1000
    assert faithful_row["absorption_rate"] == 0.0 and faithful_row["parent_miss_with_child"] == 0.0
    assert absorbing_row["absorption_rate"] == 1.0 and absorbing_row["parent_miss_with_child"] == 1.0
    assert faithful_row["parent_miss_alone"] == absorbing_row["parent_miss_alone"] == 0.0
    assert absorbing_row["parent_latent"] == faithful_row["parent_latent"] == 0
    # A parent latent that is silent with a child, but no child latent carries the parent: a miss, not absorption.
    no_carrier = _hand_built_relu_sae(absorbing_enc, eye)
    (row,) = absorption(present != 0, no_carrier.encode(x) != 0, cosine_matrix(truth, no_carrier.W_dec), 2, 0.2)
    assert row["parent_miss_with_child"] == 1.0 and row["absorption_rate"] == 0.0


# --- the command --------------------------------------------------------------------------------------------


TINY = ["--shapes", "6x3", "--importance-decays", "1,0.5", "--feature-probabilities", "0.1", "--hierarchical", "3x3",
        "--architectures", "topk,relu", "--toy-steps", 60, "--sae-steps", 40, "--sae-batch-size", 128,
        "--eval-tokens", 1024, "--no-progress"]  # fmt: skip


def test_a_small_run_writes_consistent_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    printed = _invoke("toy", "sae-benchmark", "--out", out, *TINY)
    assert f"wrote {out}" in printed and "topk" in printed and "relu" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["results.json", "features.csv", "instances.csv", "absorption.csv", "recovery.png",
                            "recovery.html", "absorption.png", "absorption.html", "plotly.min.js",
                            "toy_models"])  # fmt: skip
    toy, _ = load_toy_model(out / "toy_models" / "hierarchical_n3_m3")
    assert toy.cfg.features == "hierarchical" and toy.cfg.n_instances == 1
    assert (out / "recovery.png").read_bytes().startswith(b"\x89PNG")
    assert '<script charset="utf-8" src="plotly.min.js">' in (out / "absorption.html").read_text()  # shared, offline
    results = json.loads((out / "results.json").read_text())
    assert results["architectures"] == ["topk", "relu"] and results["config"]["shapes"] == [[6, 3]]
    rows = list(csv.DictReader((out / "features.csv").open()))
    assert len(rows) == len(results["features"]) == 2 * 2 * 6 + 2 * 3  # 2 instances × 2 SAEs × 6, + 2 SAEs × 3
    for row, saved in zip(rows, results["features"], strict=True):
        assert float(row["best_cosine"]) == pytest.approx(saved["best_cosine"])
        assert float(row["matched_cosine"]) <= float(row["best_cosine"]) + 1e-9
    summary = results["summary"]["topk"]
    kept = [r for r in results["features"] if r["architecture"] == "topk" and r["role"] == "independent"]
    kept = [r for r in kept if r["represented"]]
    assert summary["recovered_fraction"] == pytest.approx(sum(r["recovered"] for r in kept) / len(kept))
    absorbing = [r for r in results["absorption"] if r["architecture"] == "topk"]
    assert summary["absorption_rate"] == pytest.approx(
        sum(r["absorbed_inputs"] for r in absorbing) / sum(r["child_active_inputs"] for r in absorbing)
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--shapes", "6by3"], "--shapes takes shapes n_features x d_hidden"),
        (["--architectures", "topk,sparse"], "unknown architecture 'sparse'"),
        (["--feature-probabilities", "0.1,2"], "probabilities must be in (0, 1]"),
        (["--hierarchical", "4x4"], "divisible by 1 parent + 2 children = 3"),
        (["--dictionary-ratio", "0.5"], "dictionary_ratio must be >= 1"),
        (["--shapes", "none", "--hierarchical", "none"], "no toy model"),
        (["--importance-decays", "1,-1"], "importance decays must be positive"),
        (["--shapes", "6x3,6x3"], "shapes repeat a shape"),
        (["--architectures", "topk,topk"], "architectures repeat a value"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path: Path, args: list[str], expected: str) -> None:
    out = tmp_path / "new" / "out"
    with pytest.raises(SaelabError) as err:
        _invoke("toy", "sae-benchmark", "--out", out, "--quick", "--no-progress", *args)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "new").exists()


def test_plan_covers_the_grid() -> None:
    cfg = SAEBenchmarkConfig(shapes=[[4, 2], [6, 3]], importance_decays=[1.0, 0.5], feature_probabilities=[0.1, 0.2],
                             replicas=2, hierarchical_shapes=[[3, 3]], hierarchical_probabilities=[0.3])  # fmt: skip
    studies = plan_studies(cfg)
    assert [s.name for s in studies] == ["n4_m2", "n6_m3", "hierarchical_n3_m3"]
    cells = {(c["importance_decay"], c["feature_probability"], c["replica"]) for c in studies[0].instances}
    assert cells == set(itertools.product([1.0, 0.5], [0.1, 0.2], [0, 1])) and len(studies[0].instances) == 8
    model = build_toy_model(studies[0], cfg)
    for inst, cell in enumerate(studies[0].instances):
        torch.testing.assert_close(model.importance[inst], cell["importance_decay"] ** torch.arange(4.0))
        assert float(model.feature_probability[inst, 0]) == pytest.approx(cell["feature_probability"])
    assert isinstance(studies[2], Study) and studies[2].hierarchical and len(studies[2].instances) == 2


def test_an_out_that_is_a_file_is_refused_before_any_training(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.write_text("mine")
    with pytest.raises(SaelabError, match=r"is a file .*choose a folder path"):
        _invoke("toy", "sae-benchmark", "--out", out, "--quick", "--no-progress")
    assert out.read_text() == "mine"


def test_the_summary_counts_what_it_says() -> None:
    """Hand-made rows whose summary is known: which features count, the bins, and pooled absorption rates."""
    cfg = SAEBenchmarkConfig(architectures=["topk"])

    def feature(
        d: float, importance: float, p: float, best: float, represented: bool = True, role: str = "independent"
    ) -> dict:
        return {"architecture": "topk", "role": role, "represented": represented, "dimensionality": d,
                "importance": importance, "probability": p, "best_cosine": best, "matched_cosine": best - 0.1,
                "recovered": best >= 0.9}  # fmt: skip

    features = [
        feature(1.0, 1.0, 0.1, 0.99),  # D >= 0.9, I >= 0.5: recovered
        feature(0.5, 0.3, 0.1, 0.80),  # 0.3 <= D < 0.9, 0.1 <= I < 0.5: lost
        feature(0.25, 0.05, 0.02, 0.95),  # D < 0.3, I < 0.1: recovered
        feature(0.25, 1.0, 0.02, 0.50),  # D < 0.3, I >= 0.5: lost
        feature(0.0, 0.01, 0.02, 0.99, represented=False),  # not represented: counted apart
        feature(1.0, 1.0, 0.2, 0.95, role="parent"),
        feature(1.0, 1.0, 0.05, 0.70, role="child"),
    ]
    instances = [{"architecture": "topk", "explained_variance": 0.5, "l0": 1.0},
                 {"architecture": "topk", "explained_variance": 0.9, "l0": 2.0}]  # fmt: skip
    absorptions = [
        {"architecture": "topk", "child_active_inputs": 100, "absorbed_inputs": 10, "parent_missed_with_child": 20,
         "parent_alone_inputs": 50, "parent_missed_alone": 5},
        {"architecture": "topk", "child_active_inputs": 300, "absorbed_inputs": 90, "parent_missed_with_child": 100,
         "parent_alone_inputs": 150, "parent_missed_alone": 5},
    ]  # fmt: skip
    entry = summarize(features, instances, absorptions, cfg)["topk"]
    assert (entry["features"], entry["represented"], entry["not_represented_by_toy"]) == (5, 4, 1)
    assert entry["recovered_fraction"] == 0.5
    assert entry["mean_best_cosine"] == pytest.approx((0.99 + 0.80 + 0.95 + 0.50) / 4)
    assert entry["mean_matched_cosine"] == pytest.approx((0.99 + 0.80 + 0.95 + 0.50) / 4 - 0.1)
    assert entry["recovered_by_dimensionality"] == {
        "D >= 0.9": {"features": 1, "recovered_fraction": 1.0},
        "0.3 <= D < 0.9": {"features": 1, "recovered_fraction": 0.0},
        "D < 0.3": {"features": 2, "recovered_fraction": 0.5},
    }
    assert entry["recovered_by_importance"] == {
        "I >= 0.5": {"features": 2, "recovered_fraction": 0.5},
        "0.1 <= I < 0.5": {"features": 1, "recovered_fraction": 0.0},
        "I < 0.1": {"features": 1, "recovered_fraction": 1.0},
    }
    assert entry["recovered_by_probability"] == {"p = 0.1": 0.5, "p = 0.02": 0.5}
    assert entry["mean_explained_variance"] == pytest.approx(0.7) and entry["mean_l0"] == 1.5
    assert entry["absorption_rate"] == 100 / 400  # pooled over inputs, not a mean of the two rates (0.1, 0.3)
    assert entry["parent_miss_with_child"] == 120 / 400 and entry["parent_miss_alone"] == 10 / 200
    assert entry["hierarchical_recovered_parents"] == 1.0 and entry["hierarchical_recovered_children"] == 0.0
