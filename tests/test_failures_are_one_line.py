"""Bad numbers, bad inputs and operating-system failures (a full file-size quota, an unwritable place, running out
of memory) end a command with one `saelab: error:` line and exit status 2, never a traceback, and leave nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, saelab

from saelab.io import json_text
from saelab.sae.io import load_sae, save_sae

TOY = ["toy", "train", "--n-features", "5", "--d-hidden", "2", "--n-instances", "1", "--steps", "5", "--no-progress"]
SAE = ["sae", "train", "--source", "synthetic:n_features=16,d_in=4", "--steps", "3", "--batch-size", "32", "--quiet"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*TOY, "--lr", "inf"], "lr must be a finite positive number"),
        ([*TOY, "--lr", "1e30"], "diverged"),
        ([*TOY, "--importance-decay", "inf"], "importance_decay must be a finite positive number"),
        ([*TOY, "--importance", "nan,1,1,1,1"], "importance values must be finite non-negative numbers"),
        ([*TOY, "--feature-probability", "0"], "feature probability must be in (0, 1]"),
        ([*TOY, "--feature-probability", "nan"], "feature probability must be in (0, 1]"),
        ([*TOY, "--batch-size", "0"], "batch_size must be a positive integer"),
        ([*SAE, "--d-sae", "0"], "d_sae must be a positive integer"),
        ([*SAE, "--k", "inf"], "--k takes finite numbers"),
        ([*SAE, "--k", "0"], "k must be a finite positive number"),
        ([*SAE, "--lr", "nan"], "lr must be a positive number"),
        (["lm", "sample", "--prompt", "a\udc80b"], "--prompt is not valid text"),
    ],
)
def test_bad_numbers_and_text_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "out")] if args[0] != "lm" else []
    status, _, stderr = saelab(*args, *out)
    one_line_error(status, stderr, message)
    assert list(tmp_path.iterdir()) == []


def test_pickled_model_weights_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
    status, _, stderr = saelab("sae", "train", "--model", folder, "--hook", "blocks.0.hook_resid_post",
                               "--out", tmp_path / "out")  # fmt: skip
    one_line_error(status, stderr, "no .safetensors weights (pytorch_model.bin)", "only safetensors")


def test_non_finite_weights_and_undefined_numbers(tmp_path: Path) -> None:
    status, _, stderr = saelab(*SAE, "--out", tmp_path / "sae")
    assert status == 0, stderr
    report = json.loads(saelab("sae", "eval", tmp_path / "sae", "--json", "--tokens", "256")[1])  # valid JSON
    assert report["l0"] >= 0
    sae = load_sae(tmp_path / "sae")
    with torch.no_grad():
        sae.b_dec[0] = math.inf
    save_sae(sae, tmp_path / "broken")
    status, _, stderr = saelab("sae", "eval", tmp_path / "broken")
    one_line_error(status, stderr, "'b_dec' holds NaN or inf")
    assert json.loads(json_text({"ev": math.nan, "xs": [1.0, -math.inf]})) == {"ev": None, "xs": [1.0, None]}


def _limited(args: list[str], limit: str, value: int) -> subprocess.CompletedProcess:
    """Run `saelab ARGS` in a process under an operating-system limit (RLIMIT_FSIZE or RLIMIT_AS)."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then an oversized write fails with EFBIG\n"
        f"resource.setrlimit(resource.{limit}, ({value}, {value}))\n"
        "from saelab.cli import main\n"
        f"sys.argv = ['saelab', *{[str(a) for a in args]!r}]\n"
        "main()\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_a_write_the_system_refuses_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "run"
    result = _limited([*TOY, "--out", str(out)], "RLIMIT_FSIZE", 4096)  # figures are larger than 4 KB
    one_line_error(result.returncode, result.stderr, "larger than this system allows")
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_is_one_line(tmp_path: Path) -> None:
    args = ["toy", "train", "--n-features", "100000", "--d-hidden", "100000", "--n-instances", "1", "--steps", "1",
            "--no-progress", "--out", str(tmp_path / "huge")]  # fmt: skip
    result = _limited(args, "RLIMIT_AS", 8 * 2**30)  # 40 GB of weights against an 8 GB address space
    one_line_error(result.returncode, result.stderr, "out of memory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; the unwritable place below covers it")
def test_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        status, _, stderr = saelab(*TOY, "--out", tmp_path / "run")
        one_line_error(status, stderr, "permission denied")
    finally:
        tmp_path.chmod(0o700)


def test_a_place_nothing_can_be_written_is_one_line() -> None:
    status, _, stderr = saelab(*TOY, "--out", "/proc/saelab_probe")  # not writable, even by root
    one_line_error(status, stderr, "/proc")
    assert not Path("/proc/saelab_probe").exists()
