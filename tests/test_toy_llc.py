"""Snapshots along training and the SGLD estimate of the local learning coefficient (LLC).

The estimator is checked three ways: its SGLD chain step for step against devinterp's SGLD optimiser (with
autograd gradients through the plain model); its estimate against closed-form and quadrature values of the
same definition on models whose LLC is known (regular linear regression: d/2; y = a·b·x: 1/2); and the toy
model's batched chains against one instance at a time.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_helpers import one_torch_thread
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import SaelabError
from saelab.io import load_tensors
from saelab.toy import ToyModel, ToyModelConfig, ToyTrainConfig, load_toy_model
from saelab.toy.lab import analyze_folder, train_to_folder
from saelab.toy.llc import LLCConfig, sgld_llc, toy_dataset, toy_llc, toy_walkers
from saelab.toy.snapshots import SNAPSHOTS_FILE, load_snapshot_into, load_snapshots, snapshot_steps


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_torch_thread():
        yield


# --- snapshots -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "count"), [(2000, 10), (10, 10), (5, 3), (100_000, 40), (7, 1)])
def test_snapshot_steps_are_distinct_log_spaced_and_end_at_the_last_step(steps: int, count: int) -> None:
    chosen = snapshot_steps(steps, count)
    assert len(chosen) == count and chosen[-1] == steps and chosen[0] >= 1
    assert all(b > a for a, b in itertools.pairwise(chosen))
    ratios = [b / a for a, b in itertools.pairwise(chosen) if a >= 20]  # past the integer-crowded start
    if len(ratios) > 1:
        assert max(ratios) / min(ratios) < 1.2


def test_snapshot_steps_refuse_more_snapshots_than_steps() -> None:
    with pytest.raises(SaelabError, match="at most 5"):
        snapshot_steps(5, 6)
    with pytest.raises(SaelabError, match="snapshots must be"):
        ToyTrainConfig(steps=5, snapshots=6).validate()


def test_snapshots_reload_exactly_and_survive_reanalysis(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = ToyModelConfig(n_features=6, d_hidden=2, n_instances=3, feature_probability=0.05)
    train_to_folder(cfg, ToyTrainConfig(steps=60, batch_size=64, snapshots=6), out, progress=False)
    model, train_cfg = load_toy_model(out)
    assert train_cfg is not None and train_cfg.snapshots == 6
    tensors = load_snapshots(out, model)
    assert tensors["step"].tolist() == snapshot_steps(60, 6)
    assert tensors["W"].shape == (6, 3, 2, 6) and tensors["b_final"].shape == (6, 3, 6)
    assert torch.equal(tensors["W"][-1], model.W.detach()) and torch.equal(tensors["b_final"][-1], model.b_final)

    # Every snapshot is the weights after that many steps: replay training and take them as they go by.
    replay = ToyModel(cfg)
    seen: dict[int, torch.Tensor] = {}
    from saelab.toy.train import train_toy_model

    train_toy_model(replay, train_cfg, progress=False, after_step=lambda s, m: seen.setdefault(s, m.W.detach().clone()))
    for i, step in enumerate(tensors["step"].tolist()):
        assert torch.equal(tensors["W"][i], seen[step])
    # A snapshot loads into a model bit-exactly; re-analysing the folder keeps the file.
    assert torch.equal(load_snapshot_into(ToyModel(cfg), tensors, 2).W.detach(), seen[tensors["step"][2].item()])
    analyze_folder(out)
    assert torch.equal(load_snapshots(out, model)["W"], tensors["W"])


def test_load_snapshots_refuses_a_folder_without_them_or_with_wrong_shapes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = ToyModelConfig(n_features=4, d_hidden=2, n_instances=2)
    train_to_folder(cfg, ToyTrainConfig(steps=10, batch_size=32), out, progress=False)
    model, _ = load_toy_model(out)
    with pytest.raises(SaelabError, match="--snapshots"):
        load_snapshots(out, model)
    from saelab.io import save_tensors

    save_tensors(out / SNAPSHOTS_FILE, {"step": torch.tensor([1, 2]), "W": torch.zeros(2, 2, 2, 5)})
    with pytest.raises(SaelabError, match="'W' has shape"):
        load_snapshots(out, model)


# --- the SGLD chain against devinterp ----------------------------------------------------------------------------


def test_sgld_chain_matches_devinterp_step_for_step() -> None:
    """Same start, minibatches and noise stream: devinterp's SGLD optimiser driven by autograd through the plain
    model gives the same loss trace and end point as saelab's batched chains with hand-derived gradients."""
    devinterp_sgld = pytest.importorskip("devinterp.optim.sgld")
    torch.manual_seed(0)
    model = ToyModel(ToyModelConfig(n_features=6, d_hidden=2, n_instances=2, feature_probability=0.1))
    cfg = LLCConfig(n_samples=200, batch_size=20, chains=3, draws=60, burnin=10, step_size=1e-3, localization=30.0)
    data = toy_dataset(model, cfg.n_samples, seed=5)
    ours = toy_llc(model, cfg, data)

    walkers = toy_walkers(model, cfg.chains)
    rows_all = data.repeat_interleave(cfg.chains, 0).permute(2, 0, 1)  # [n, walkers, feat]
    optimizer = devinterp_sgld.SGLD(
        walkers.parameters(), lr=cfg.step_size, localization=cfg.localization, nbeta=cfg.nbeta
    )
    generator = torch.Generator().manual_seed(cfg.seed + 1)  # toy_llc's chain generator
    with torch.no_grad():
        init = walkers.loss_per_instance(rows_all).double().view(2, cfg.chains)[:, 0]  # L_n(w*)
    trace = []
    for _ in range(cfg.burnin + cfg.draws):
        rows = torch.randint(cfg.n_samples, (cfg.batch_size,), generator=generator)
        optimizer.zero_grad()
        loss = walkers.loss_per_instance(rows_all[rows])
        loss.sum().backward()
        trace.append(loss.detach())
        optimizer.step(noise_generator=generator)
    theirs = torch.stack(trace, -1).double().view(2, cfg.chains, -1)
    torch.testing.assert_close(ours.loss_trace, theirs, rtol=1e-4, atol=1e-6)
    expected = cfg.nbeta * (theirs[:, :, cfg.burnin :].mean(-1) - init[:, None])  # devinterp's compute_llc
    torch.testing.assert_close(ours.llc_per_chain, expected, rtol=1e-4, atol=1e-4)


def test_batched_instances_match_one_instance_at_a_time() -> None:
    """Instances never interact: without noise (a deterministic chain) each instance of a batch follows exactly
    the path it follows alone."""
    torch.manual_seed(1)
    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=3, feature_probability=0.05))
    cfg = LLCConfig(n_samples=100, batch_size=100, chains=2, draws=20, burnin=0, step_size=1e-3)
    data = toy_dataset(model, cfg.n_samples, seed=0)
    walkers = toy_walkers(model, cfg.chains)
    from saelab.toy.fast import loss_and_grads

    def no_noise_trace(m: ToyModel, rows: torch.Tensor) -> torch.Tensor:
        params = {name: p.data for name, p in m.named_parameters()}
        start = {name: p.clone() for name, p in params.items()}
        out = []
        for _ in range(cfg.draws):
            loss, grads = loss_and_grads(m, rows, torch.ones(rows.shape[0]))
            out.append(loss)
            for name, w in params.items():
                w.add_(grads[name] * cfg.nbeta + cfg.localization * (w - start[name]), alpha=-cfg.step_size / 2)
        return torch.stack(out, -1)

    batched = no_noise_trace(walkers, data.repeat_interleave(cfg.chains, 0))
    for i in range(3):
        single = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=1, feature_probability=0.05))
        with torch.no_grad():
            for (_, mine), (_, theirs) in zip(single.named_parameters(), model.named_parameters(), strict=True):
                mine.copy_(theirs[i : i + 1])
        alone = no_noise_trace(single, data[i : i + 1])
        torch.testing.assert_close(batched[i * cfg.chains], alone[0], rtol=1e-5, atol=1e-7)


# --- models whose LLC is known -------------------------------------------------------------------------------------


def _quadrature_llc(nbeta: float, scale: float, gamma: float, truth: float, start: float) -> float:
    """E[nβ K] under p(a, b) ∝ exp(−nβ K − γ/2 ‖(a, b) − w*‖²), K = scale/2 (ab − truth)², on a fine 2-D grid."""
    grid = torch.linspace(-8, 8, 3201, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    K = 0.5 * scale * (a * b - truth) ** 2
    weights = torch.softmax((-nbeta * K - gamma / 2 * ((a - start) ** 2 + (b - start) ** 2)).flatten(), 0)
    return float((weights * nbeta * K.flatten()).sum())


def test_llc_of_linear_regression_is_half_the_parameter_count() -> None:
    """Regular model: y = w·x, d = 4 parameters, noiseless data, loss ½(y − w·x)². The localised posterior is
    Gaussian, so E[nβ(L_n(w) − L_n(w*))] = ½ Σ_i nβh_i / (nβh_i + γ) exactly (h_i: eigenvalues of XᵀX/n);
    with γ = 1 that is within 1 % of the LLC d/2 = 2. Tolerance 8 %: ≈ 3 standard errors of 64 chains."""
    d, n, chains = 4, 1000, 64
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=generator, dtype=torch.float64)
    w_true = torch.randn(d, generator=generator, dtype=torch.float64)
    y = X @ w_true
    cfg = LLCConfig(
        n_samples=n, batch_size=100, chains=chains, draws=3000, burnin=300, step_size=3e-4, localization=1.0
    )
    w = w_true.repeat(chains, 1)

    def loss_and_grads(rows: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, target = (X, y) if rows is None else (X[rows], y[rows])
        residual = w @ x.T - target  # [walkers, batch]
        return 0.5 * residual.square().mean(1), {"w": residual @ x / x.shape[0]}

    estimate = sgld_llc({"w": w}, loss_and_grads, cfg, 1, torch.Generator().manual_seed(1))
    h = torch.linalg.eigvalsh(X.T @ X / n)
    exact = float(0.5 * (cfg.nbeta * h / (cfg.nbeta * h + cfg.localization)).sum())
    assert abs(exact - d / 2) < 0.01 * d / 2
    assert abs(estimate.llc_mean.item() - exact) < 0.08 * exact, (estimate.llc_mean.item(), exact)
    assert abs(estimate.drift.item()) < 0.15 * exact  # stationary


@pytest.mark.parametrize(("truth", "gamma", "theory"), [(1.0, 1.0, 0.5), (0.0, 10.0, None)])
def test_llc_of_a_product_model_matches_quadrature(truth: float, gamma: float, theory: float | None) -> None:
    """Singular model: y = a·b·x with 2 parameters. For a true product ab = 1 the zero set is a curve and the LLC
    is 1/2, half what a regular 2-parameter model has; at the origin (truth 0, where the estimator's finite-n value
    sits well below the asymptotic 1/2) we check the definition against 2-D quadrature. Tolerance 12 %."""
    n, chains = 1000, 32
    x = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    y = truth * x
    start = math.sqrt(truth)
    a, b = torch.full((chains,), start, dtype=torch.float64), torch.full((chains,), start, dtype=torch.float64)
    cfg = LLCConfig(n_samples=n, batch_size=100, chains=chains, draws=4000, burnin=500, step_size=3e-4,
                    localization=gamma)  # fmt: skip

    def loss_and_grads(rows: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xs, ys = (x, y) if rows is None else (x[rows], y[rows])
        residual = (a * b)[:, None] * xs - ys
        slope = (residual * xs).mean(1)
        return 0.5 * residual.square().mean(1), {"a": slope * b, "b": slope * a}

    estimate = sgld_llc({"a": a, "b": b}, loss_and_grads, cfg, 1, torch.Generator().manual_seed(2)).llc_mean.item()
    reference = _quadrature_llc(cfg.nbeta, float(x.square().mean()), gamma, truth, start)
    assert abs(estimate - reference) < 0.12 * reference, (estimate, reference)
    if theory is not None:
        assert abs(reference - theory) < 0.02 and abs(estimate - theory) < 0.12 * theory


# --- the toy model ---------------------------------------------------------------------------------------------------


def test_toy_llc_reports_spread_trace_and_is_reproducible() -> None:
    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=2, feature_probability=0.05))
    from saelab.toy.train import train_toy_model

    train_toy_model(model, ToyTrainConfig(steps=300, batch_size=256), progress=False)
    cfg = LLCConfig(chains=3, draws=200, burnin=50)
    first, second = toy_llc(model, cfg), toy_llc(model, cfg)
    assert torch.equal(first.llc_per_chain, second.llc_per_chain)
    assert first.loss_trace.shape == (2, 3, 250) and first.llc_std.shape == (2,)
    assert torch.isfinite(first.llc_mean).all() and (first.llc_mean > 0).all()
    torch.testing.assert_close(first.llc_std, first.llc_per_chain.std(-1))
    assert not first.diverged.any()


def test_llc_config_refuses_bad_settings() -> None:
    for bad in ({"step_size": 0.0}, {"localization": -1.0}, {"n_samples": 1}, {"draws": 1}, {"chains": 0},
                {"burnin": -1}, {"step_size": math.nan}):  # fmt: skip
        with pytest.raises(SaelabError):
            LLCConfig(**bad).validate()


# --- `saelab toy llc` --------------------------------------------------------------------------------------------


def _invoke(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llc") / "run"
    with one_torch_thread():
        _invoke("toy", "train", "--out", out, "--n-features", 6, "--n-instances", 2, "--steps", 200,
                "--batch-size", 128, "--snapshots", 5, "--no-progress")  # fmt: skip
    return out


def test_llc_command_writes_the_estimate_at_every_snapshot(snapshot_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "llc"
    printed = _invoke("toy", "llc", snapshot_run, "--out", out, "--chains", 2, "--draws", 100, "--burnin", 20,
                      "--no-progress")  # fmt: skip
    assert f"wrote {out}" in printed and printed.count("loss=") == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["llc.json", "llc_traces.safetensors", "development.png", "sgld_traces.png", "plateaus.png"]
    )
    report = json.loads((out / "llc.json").read_text())
    assert [row["step"] for row in report["snapshots"]] == snapshot_steps(200, 5)
    # The folder's numbers are the estimator's: recompute snapshot 2 directly.
    model, _ = load_toy_model(snapshot_run)
    load_snapshot_into(model, load_snapshots(snapshot_run, model), 2)
    cfg = LLCConfig(chains=2, draws=100, burnin=20)
    direct = toy_llc(model, cfg)
    for i, cell in enumerate(report["snapshots"][2]["instances"]):
        assert cell["llc"] == pytest.approx(direct.llc_mean[i].item(), rel=1e-5)
        assert cell["llc_std"] == pytest.approx(direct.llc_std[i].item(), rel=1e-4)
        assert cell["loss"] == pytest.approx(direct.init_loss[i].item(), rel=1e-5)
    traces = load_tensors(out / "llc_traces.safetensors")
    assert traces["loss_trace"].shape == (5, 2, 2, 120)
    assert (out / "development.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--step-size", "0"], "step_size must be a finite positive number"),
        (["--chains", "0"], "chains"),
        (["--draws", "1"], "draws must be at least 2"),
    ],
)
def test_llc_bad_settings_are_one_line_errors_and_write_nothing(
    snapshot_run: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    out = tmp_path / "llc"
    with pytest.raises(SaelabError) as err:
        _invoke("toy", "llc", snapshot_run, "--out", out, *args, "--no-progress")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_llc_refuses_to_write_into_its_input(snapshot_run: Path) -> None:
    before = sorted(p.name for p in snapshot_run.iterdir())
    with pytest.raises(SaelabError, match=r"sits inside .*, an input of this run"):
        _invoke("toy", "llc", snapshot_run, "--out", snapshot_run / "llc", "--no-progress")
    assert sorted(p.name for p in snapshot_run.iterdir()) == before


def test_the_installed_llc_command_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "saelab.cli", "toy", "llc", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("saelab: error: ") and result.stderr.count("\n") == 1
    assert "missing is not a directory" in result.stderr


def test_plain_sgd_is_an_optimizer_choice_and_trains() -> None:
    with pytest.raises(SaelabError, match="unknown optimizer 'rmsprop'"):
        ToyTrainConfig(optimizer="rmsprop").validate()
    with pytest.raises(SaelabError, match="init_scale must be a positive number"):
        ToyTrainConfig(init_scale=0.0).validate()
    from saelab.toy.train import train_toy_model

    model = ToyModel(ToyModelConfig(n_features=6, d_hidden=2, n_instances=4, feature_probability=0.05))
    history = train_toy_model(
        model, ToyTrainConfig(steps=400, lr=0.05, lr_schedule="constant", optimizer="sgd"), progress=False
    )
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    small = ToyModel(ToyModelConfig(n_features=6, d_hidden=2, n_instances=4))
    train_toy_model(small, ToyTrainConfig(steps=1, lr=1e-12, init_scale=0.1), progress=False)
    torch.testing.assert_close(small.W.detach(), 0.1 * _initial_W(small.cfg, seed=0))


def _initial_W(cfg: ToyModelConfig, seed: int) -> torch.Tensor:
    fresh = ToyModel(cfg)
    fresh.reset_parameters(torch.Generator().manual_seed(seed))
    return fresh.W.detach()


def test_development_summary_counts_plateau_transitions() -> None:
    """Hand-made report: instance 0 goes 4-gon → (irregular) → 5-gon with the loss falling and λ̂ rising;
    instance 1 stays a 5-gon."""
    from saelab.toy.development import development_summary

    def cell(kgon: str, loss: float, llc: float) -> dict:
        return {"kgon": kgon, "loss": loss, "llc": llc}

    rows = [
        {"step": 1, "instances": [cell("4-gon", 0.3, 2.0), cell("5-gon", 0.2, 4.0)]},
        {"step": 2, "instances": [cell("4-gon", 0.28, 2.5), cell("5-gon", 0.2, 4.2)]},
        {"step": 4, "instances": [cell("5-gon, irregular", 0.25, 1.0), cell("5-gon", 0.19, 4.4)]},
        {"step": 8, "instances": [cell("5-gon", 0.2, 4.0), cell("5-gon", 0.18, 4.6)]},
    ]
    summary = development_summary({"snapshots": rows})
    assert summary["final"]["5-gon"]["instances"] == 2
    assert summary["final"]["5-gon"]["llc"] == pytest.approx(4.3)
    assert summary["transitions"] == {
        "4-gon → 5-gon": {
            "count": 1,
            "loss_fell": 1,
            "llc_rose": 1,
            "settled": 1,
            "settled_llc_rose": 1,
            "d_loss": pytest.approx(-0.08),
            "d_loss_sd": 0.0,
            "d_llc": pytest.approx(1.5),
            "d_llc_sd": 0.0,
        }
    }


def test_a_snapshot_far_from_a_minimum_is_flagged() -> None:
    """At initialisation the chains slide downhill: λ̂ is negative, the loss still falls after the burn-in, and the
    development summary does not count the point as settled; at a trained optimum λ̂ > 0 and the drift between the
    halves of 1000 draws is small beside it."""
    from saelab.toy.development import plateaus
    from saelab.toy.train import train_toy_model

    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=3, feature_probability=0.05))
    model.reset_parameters(torch.Generator().manual_seed(0))
    cfg = LLCConfig(chains=3, draws=300, burnin=50)
    start = toy_llc(model, cfg)
    assert (start.llc_mean < 0).all() and (start.drift < 0).all()
    cell = {"kgon": "5-gon", "loss": 0.1, "llc": float(start.llc_mean[0]), "stationary": True}
    assert not plateaus([{"step": 1, "instances": [cell]}], 0)[0]["settled"]
    train_toy_model(model, ToyTrainConfig(steps=1000, batch_size=256), progress=False)
    end = toy_llc(model, LLCConfig(chains=3, draws=1000, burnin=100))
    assert (end.llc_mean > 0).all() and (end.drift.abs() < 0.2 * end.llc_mean).all()
