"""`saelab toy train | analyze | phase-diagram` and `run_toy_lab`: real (short) runs into real folders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_helpers import invoke_cli as _invoke
from toy_helpers import one_torch_thread

from saelab.errors import SaelabError
from saelab.toy import load_toy_model, run_toy_lab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_torch_thread():
        yield


def _assert_figures(directory: Path, names: list[str]) -> None:
    for name in names:
        data = (directory / name).read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        else:  # offline: the one script it loads is the folder's own shared copy of plotly.js, no CDN
            text = data.decode()
            assert re.findall(r"<script[^>]*\bsrc=\"([^\"]*)\"", text) == ["plotly.min.js"], name
            assert len(text) < 100_000, name  # the library is not embedded in every figure
            library = (directory / "plotly.min.js").read_text()
            assert len(library) > 1_000_000 and "plotly" in library[:2000].lower()


def test_train_then_analyze(tmp_path: Path) -> None:
    out = tmp_path / "run"
    printed = _invoke("toy", "train", "--out", out, "--feature-probability", "0.1,0.05,0.02", "--steps", 200,
                      "--batch-size", 128, "--importance-decay", 0.9, "--seed", 3, "--no-progress")  # fmt: skip
    assert f"wrote {out}" in printed and printed.count(" p=") == 3
    figures = ["features_2d.png", "wtw.png", "loss_vs_importance.png", "dimensionality.png", "dimensionality.html"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cfg.json", "model.safetensors", "analysis.json", "history.json", "plotly.min.js", *figures]
    )
    _assert_figures(out, figures)
    model, train_cfg = load_toy_model(out)
    assert model.cfg.n_instances == 3 and model.cfg.feature_probability == [0.1, 0.05, 0.02]
    assert train_cfg is not None and train_cfg.steps == 200 and train_cfg.seed == 3
    torch.testing.assert_close(model.importance[0], 0.9 ** torch.arange(5.0))
    analysis = json.loads((out / "analysis.json").read_text())
    assert len(analysis["instances"]) == 3 and analysis["figures"] == figures

    _invoke("toy", "analyze", out, "--out", tmp_path / "again")
    assert json.loads((tmp_path / "again" / "analysis.json").read_text()) == analysis  # deterministic
    _invoke("toy", "analyze", out)  # refresh in place: the model survives the rebuild
    reloaded, _ = load_toy_model(out)
    assert torch.equal(reloaded.W, model.W) and (out / "history.json").is_file()


def test_phase_diagram_command(tmp_path: Path) -> None:
    out = tmp_path / "phase"
    printed = _invoke("toy", "phase-diagram", "--out", out, "--grid", 3, "--replicas", 2, "--steps", 60,
                      "--n-features", 3, "--d-hidden", 2, "--no-progress")  # fmt: skip
    assert "cells: not represented" in printed
    _assert_figures(out, ["phase_diagram.png", "phase_diagram.html", "features_2d.png"])
    model, _ = load_toy_model(out)
    assert model.cfg.n_instances == 9
    phase = json.loads((out / "analysis.json").read_text())["phase_diagram"]
    assert len(phase["phase"]) == 3 and all(len(row) == 3 for row in phase["phase"])
    assert phase["density"][-1] == pytest.approx(1.0) and phase["relative_importance"][0] == pytest.approx(0.1)
    # The extra feature is the last one; its importance sweeps the columns.
    torch.testing.assert_close(model.importance[:3, -1], torch.tensor(phase["relative_importance"]))
    _invoke("toy", "analyze", out)  # a saved sweep re-renders its diagram
    assert json.loads((out / "analysis.json").read_text())["phase_diagram"]["phase"] == phase["phase"]


BAD_INPUTS = [
    (["train", "--n-features", "0"], "n_features must be a positive integer"),
    (["train", "--d-hidden", "-1"], "d_hidden must be a positive integer"),
    (["train", "--feature-probability", "0"], "feature probability must be in (0, 1]"),
    (["train", "--feature-probability", "1.5"], "feature probability must be in (0, 1]"),
    (["train", "--feature-probability", "0.1,x"], "--feature-probability takes a number"),
    (["train", "--feature-probability", "0.1,0.2", "--n-instances", "3"], "one per instance (3)"),
    (["train", "--importance", "1,0.5"], "importance lists 2 values but n_features is 5"),
    (["train", "--variant", "gelu"], "unknown variant 'gelu'"),
    (["train", "--lr-schedule", "step"], "unknown lr_schedule 'step'"),
    (["train", "--steps", "0"], "steps must be a positive integer"),
    (["phase-diagram", "--grid", "0"], "grid must be a positive integer"),
    (["phase-diagram", "--min-density", "0"], "density range must satisfy"),
    (["phase-diagram", "--n-features", "1"], "at least 2 features"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUTS)
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path: Path, args: list[str], expected: str) -> None:
    out = tmp_path / "new" / "out"
    with pytest.raises(SaelabError) as err:
        _invoke("toy", *args, "--out", out, "--no-progress")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "new").exists()


def test_analyzing_a_foreign_folder_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    foreign = tmp_path / "sae"
    foreign.mkdir()
    (foreign / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 4, "d_sae": 8}))
    with pytest.raises(SaelabError, match="'standard', not a saelab toy model"):
        _invoke("toy", "analyze", foreign, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in foreign.iterdir()) == ["cfg.json"]


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["toy", "train", "--variant", "gelu", "--out", str(out)]
    result = subprocess.run([sys.executable, "-m", "saelab.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("saelab: error: unknown variant 'gelu'") and result.stderr.count("\n") == 1
    assert not out.exists()


def test_run_toy_lab_quick(tmp_path: Path) -> None:
    summary = run_toy_lab(tmp_path / "lab", quick=True)
    experiments = ["pentagon", "importance", "dimensionality", "phase_n2_m1", "phase_n3_m2"]
    assert json.loads((tmp_path / "lab" / "summary.json").read_text()) == summary
    for name in experiments:
        folder = tmp_path / "lab" / name
        assert summary[name]["out"] == str(folder)
        load_toy_model(folder)
        _assert_figures(folder, summary[name]["figures"])
    assert "phase_diagram.png" in summary["phase_n2_m1"]["figures"]
    assert sum(summary["phase_n2_m1"]["phase_counts"].values()) == 36
    assert len(summary["pentagon"]["instances"]) == 8 and 0 <= summary["pentagon"]["regular_polygons"] <= 8
