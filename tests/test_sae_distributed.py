"""Data-parallel SAE training under torchrun: two CPU processes (gloo), each reading its own half of every batch,
train the same SAE as one process with the same global batch, and log the same whole-batch statistics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saelab.io import partial_folder
from saelab.sae.io import load_sae

SOURCE = "synthetic:n_features=64,d_in=16,mean_l0=2"


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(args: list[str], processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "saelab", *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "saelab"]
    return [sys.executable, *launcher, *args]


def saelab(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, processes), capture_output=True, text=True, env=ENV, timeout=300)


def kill_every_process_of(marker: str) -> int:
    """SIGKILL the launcher and every worker whose command line holds `marker`, as losing the machine would.

    torchrun starts its workers in sessions of their own, so killing the launcher's group would leave them running.
    """
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


def train(out: Path, architecture: str, processes: int) -> subprocess.CompletedProcess:
    args = ["sae", "train", "--source", SOURCE, "--architecture", architecture, "--out", str(out), "--quiet"]
    args += ["--d-sae", "64", "--k", "4"] if architecture == "topk" else ["--d-sae", "64"]
    args += ["--steps", "25", "--batch-size", "256", "--lr", "2e-3", "--checkpoint-every", "10"]
    result = saelab(args, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_two_processes_train_the_same_sae_as_one(tmp_path: Path, architecture: str) -> None:
    train(tmp_path / "one", architecture, processes=1)
    result = train(tmp_path / "two", architecture, processes=2)
    assert result.stdout.count("saved 1 SAE") == 1  # only rank 0 reports and writes

    one, two = load_sae(tmp_path / "one"), load_sae(tmp_path / "two")
    for name, tensor in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    assert json.loads((tmp_path / "two" / "cfg.json").read_text())["saelab"]["train"]["world_size"] == 2

    logs = [
        [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert len(logs[0]) == len(logs[1]) == 25
    for single, parallel in zip(*logs, strict=True):
        for key in ("loss", "mse", "l0", "explained_variance"):
            assert parallel[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), (parallel["step"], key)
    assert not (tmp_path / "two" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_two_processes_train_on_the_built_in_model_each_reading_its_own_contexts(tmp_path: Path) -> None:
    args = ["sae", "train", "--hook", "blocks.0.hook_resid_post", "--k", "8", "--d-sae", "256", "--steps", "3"]
    args += ["--batch-size", "512", "--context-length", "64", "--quiet", "--out", str(tmp_path / "lm")]
    result = saelab(args, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    sae = load_sae(tmp_path / "lm")
    assert sae.metadata["hook_name"] == "blocks.0.hook_resid_post" and sae.metadata["context_size"] == 64
    assert len((tmp_path / "lm" / "train_log.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    args = ["sae", "train", "--source", "synthetic:n_features=48,d_in=16", "--architecture", "topk", "--k", "3"]
    args += ["--d-sae", "64", "--steps", "600", "--batch-size", "256", "--lr", "0.003", "--checkpoint-every", "50"]
    args += ["--dead-after-tokens", "20000", "--quiet"]
    whole = saelab([*args, "--out", str(tmp_path / "whole")], processes=2)
    assert whole.returncode == 0, whole.stderr[-3000:]

    victim = subprocess.Popen(
        command([*args, "--out", str(tmp_path / "cut")], processes=2),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    checkpoint = partial_folder(tmp_path / "cut") / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert kill_every_process_of(str(tmp_path / "cut")) == 3, "the run finished before it could be killed"
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "cut").exists()

    resumed = saelab([*args, "--out", str(tmp_path / "cut"), "--resume"], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, tensor in load_sae(tmp_path / "whole").state_dict().items():
        assert torch.equal(load_sae(tmp_path / "cut").state_dict()[name], tensor), name
    logs = [(tmp_path / run / "train_log.jsonl").read_text() for run in ("whole", "cut")]
    assert logs[0] == logs[1]
    one_process = saelab([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert "no checkpoint" in one_process.stderr
