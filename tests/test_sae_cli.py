"""`saelab sae train | eval | info` end to end on real (small) runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sae_helpers import one_thread  # noqa: F401  (autouse)
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import SaelabError
from saelab.sae.io import load_sae
from saelab.sae.train import read_log
from saelab.toy import ToyModel, ToyModelConfig, save_toy_model

SYNTHETIC = "synthetic:n_features=24,d_in=8,mean_l0=2"
FAST = ["--steps", "30", "--batch-size", "128", "--lr", "0.003", "--quiet"]


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _error(*args: str) -> str:
    with pytest.raises(SaelabError) as info:
        CliRunner().invoke(app, list(args), catch_exceptions=False)
    return str(info.value)


def test_train_eval_info_on_a_synthetic_source(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run("sae", "train", "--source", SYNTHETIC, "--architecture", "topk", "--k", "2", "--d-sae", "32",
         "--out", str(out), *FAST)  # fmt: skip
    sae = load_sae(out)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 2 and sae.cfg.d_sae == 32
    assert len(read_log(out)) == 30

    report = json.loads(_run("sae", "eval", str(out), "--json", "--tokens", "2048"))
    assert report["tokens"] == 2048 and report["l0"] <= 2.0
    assert report["source"].startswith("synthetic:n_features=24")
    assert report["ground_truth"]["n_true_features"] == 24 and 0 < report["ground_truth"]["mmcs"] <= 1
    text = _run("sae", "eval", str(out), "--tokens", "2048")
    assert "explained_variance:" in text and "ground truth: MMCS" in text

    info = json.loads(_run("sae", "info", str(out), "--json"))
    assert info | {"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 2, "trained_steps": 30} == info
    assert info["hook_name"] == "synthetic"
    assert "decoder_norm_max" in _run("sae", "info", str(out))


def test_a_sweep_over_k_on_a_toy_model_instance(tmp_path: Path) -> None:
    save_toy_model(ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=3)), tmp_path / "toy")
    out = tmp_path / "sweep"
    source = f"toy:{tmp_path / 'toy'}#2"
    _run("sae", "train", "--source", source, "--architecture", "batchtopk", "--k", "0.5,1", "--d-sae", "8",
         "--out", str(out), *FAST)  # fmt: skip
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["batchtopk_k0.5", "batchtopk_k1"]
    sae = load_sae(out / "batchtopk_k1")
    assert sae.metadata["source"].endswith("toy#2") and sae.cfg.d_in == 2
    assert "holds several SAEs" in _error("sae", "eval", str(out))
    report = json.loads(_run("sae", "eval", str(out / "batchtopk_k0.5"), "--json", "--tokens", "1024"))
    assert report["ground_truth"]["n_true_features"] == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", SYNTHETIC, "--architecture", "vanilla"], "unknown --architecture 'vanilla'"),
        (["--source", SYNTHETIC, "--architecture", "relu", "--k", "4"], "--k applies to topk, batchtopk"),
        (["--source", SYNTHETIC, "--architecture", "topk", "--l1", "2"], "sets sparsity with --k"),
        (["--source", SYNTHETIC, "--k", "x"], "--k takes a number"),
        (["--source", SYNTHETIC, "--hook", "blocks.0.hook_resid_post"], "toy and synthetic sources have none"),
        (["--source", SYNTHETIC, "--model", "gpt2"], "either --source or --model/--dataset"),
        (["--source", "cache:/nonexistent"], "is not an activation cache"),
        (["--source", SYNTHETIC, "--bf16"], "--bf16 sets the language model's forward pass"),
        ([], "need --hook"),
        (["--source", "toy:/no/such/toy"], "/no/such/toy"),
    ],
)
def test_bad_train_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    error = _error("sae", "train", "--out", str(tmp_path / "x"), *args)
    assert message in error and "\n" not in error


def test_errors_reach_the_shell_as_one_line_and_status_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saelab.cli", "sae", "info", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("saelab: error: ")
    assert "is not a directory" in result.stderr
