"""`saelab demo --quick`, end to end in its own process: every stage runs (the zoo model's SAE among them), prints
its figures (the ablated CE loss among them) and writes the folders it names; a second run into the same folder
replaces its own results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saelab.sae.io import load_sae
from saelab.toy import load_toy_model


@pytest.mark.slow
def test_the_quick_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "saelab.cli", "demo", "--quick", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    lm = summary["lm_sae"]
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("CE loss")]
    printed = {line.split("  ")[0]: line.split()[-1] for line in lines}
    assert float(printed["CE loss, zero-ablated"]) == pytest.approx(lm["ce_loss_with_ablation"], abs=1e-4)
    assert lm["ce_loss_with_ablation"] > lm["ce_loss_with_sae"] > lm["ce_loss_clean"] > 0
    assert 0 < lm["ce_loss_recovered"] <= 1
    assert len(summary["toy_sae"]) >= 5 and all(0 < r["mmcs"] <= 1 for r in summary["toy_sae"].values())
    load_toy_model(out / "toy" / "pentagon")
    load_sae(out / "lm_sae")
    assert (out / "dashboard" / "index.html").is_file()
    zoo = summary["zoo"]  # the zoo stage: an SAE on zoo:sum, its task accuracies and its dashboard
    assert zoo["task"] == "sum" and zoo["accuracy_clean"] > 0.99
    assert zoo["accuracy_with_ablation"] < zoo["accuracy_clean"] - 0.3
    printed_zoo = [line.split()[-1] for line in result.stdout.splitlines() if "task accuracy, clean" in line]
    assert printed_zoo and float(printed_zoo[0]) == pytest.approx(zoo["accuracy_clean"], abs=1e-4)
    assert load_sae(out / "zoo_sae").metadata["model_name"] == "zoo:sum"
    assert (out / "zoo_dashboard" / "index.html").is_file()
    assert "it/s" in result.stderr or "s/it" in result.stderr  # the stages showed progress bars
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]  # an earlier demo's folder is replaced, not refused
