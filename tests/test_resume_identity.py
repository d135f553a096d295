"""`--resume` continues only the same run: a killed run resumed with other data, model, hooks, context length or
precision is a one-line error naming the option and both values, and the checkpoint survives the refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import one_line_error, saelab

from saelab.io import partial_folder
from saelab.sae.io import load_sae
from saelab.sae.model import SAEConfig
from saelab.sae.sources import SyntheticConfig, SyntheticSource
from saelab.sae.train import CHECKPOINT_FILE, SAETrainConfig, train_saes

ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def killed_run(args: list[str], out: Path) -> Path:
    """Start `saelab sae train ARGS --out OUT` in a process and SIGKILL it after its first checkpoint."""
    victim = subprocess.Popen([sys.executable, "-m", "saelab.cli", "sae", "train", *args, "--out", str(out)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = partial_folder(out) / CHECKPOINT_FILE
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert checkpoint.exists() and not out.exists()
    return checkpoint


def test_resume_with_another_source_names_the_option(tmp_path: Path) -> None:
    def args(source: str, batch_size: int = 64) -> list[str]:
        return ["--source", source, "--architecture", "topk", "--k", "2", "--d-sae", "16", "--steps", "100000",
                "--batch-size", str(batch_size), "--checkpoint-every", "5", "--quiet"]  # fmt: skip

    out = tmp_path / "run"
    checkpoint = killed_run(args("synthetic:n_features=32,d_in=8"), out)
    before = checkpoint.read_bytes()
    status, _, stderr = saelab("sae", "train", *args("synthetic:n_features=64,d_in=8"), "--out", out, "--resume")
    one_line_error(status, stderr, "--source: checkpoint 'synthetic:n_features=32,d_in=8',",
                   "now 'synthetic:n_features=64,d_in=8'")  # fmt: skip
    status, _, stderr = saelab("sae", "train", *args("synthetic:n_features=32,d_in=8", 32), "--out", out, "--resume")
    one_line_error(status, stderr, "batch_size: checkpoint 64, now 32")
    assert checkpoint.read_bytes() == before  # a refused resume leaves the run resumable


@pytest.mark.slow
def test_resume_of_a_language_model_run_checks_model_data_and_hooks(tmp_path: Path, dataset: str) -> None:
    base = ["--hook", "blocks.0.hook_resid_post", "--architecture", "topk", "--k", "4", "--d-sae", "256",
            "--steps", "100000", "--batch-size", "64", "--checkpoint-every", "2", "--quiet"]  # fmt: skip
    out = tmp_path / "lm"
    killed_run([*base, "--context-length", "32", "--dataset", dataset], out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "text.txt").write_text("print('hello world')\n" * 500)
    for change, message in [
        (["--context-length", "16", "--dataset", dataset], "--context-length: checkpoint 32, now 16"),
        (["--context-length", "32", "--dataset", str(other)], f"--dataset: checkpoint '{Path(dataset).resolve()}'"),
        (["--context-length", "32", "--dataset", dataset, "--bf16"], "--bf16: checkpoint False, now True"),
        (["--context-length", "32", "--dataset", dataset, "--hook", "blocks.1.hook_resid_post"], "--hook"),
    ]:
        status, _, stderr = saelab("sae", "train", *base, *change, "--out", out, "--resume")
        one_line_error(status, stderr, message)


def test_the_library_checks_the_data_a_source_describes(tmp_path: Path) -> None:
    """Without command-line options, the sources' own metadata (here, the synthetic spec) is the identity."""
    sae_cfg, cfg = SAEConfig("topk", 8, 16, k=2), SAETrainConfig(steps=30, batch_size=64, checkpoint_every=5)

    class Crashing(SyntheticSource):
        left = 12

        def read(self, batch_size: int):
            self.left -= 1
            if self.left < 0:
                raise RuntimeError("killed")
            return super().read(batch_size)

    cfg.init_tokens = 64
    with pytest.raises(RuntimeError):
        train_saes(Crashing(SyntheticConfig(n_features=32, d_in=8)), sae_cfg, cfg, out=tmp_path / "r", progress=False)
    from saelab.errors import SaelabError

    with pytest.raises(SaelabError, match=r"data\.synthetic\.source: checkpoint 'synthetic:n_features=32"):
        train_saes(SyntheticSource(SyntheticConfig(n_features=48, d_in=8)), sae_cfg, cfg, out=tmp_path / "r",
                   resume=True, progress=False)  # fmt: skip
    train_saes(SyntheticSource(SyntheticConfig(n_features=32, d_in=8)), sae_cfg, cfg, out=tmp_path / "r",
               resume=True, progress=False)  # fmt: skip
    assert load_sae(tmp_path / "r").saved_info["trained_steps"] == 30
