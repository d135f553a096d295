"""The SAE trainer: schedules, initialisation, normalisation folding, sweeps, resampling, resume, errors."""

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
from sae_helpers import one_thread  # noqa: F401  (autouse)

from saelab.errors import SaelabError
from saelab.io import partial_folder
from saelab.sae.io import load_sae
from saelab.sae.model import SAEConfig, build_sae
from saelab.sae.sources import SyntheticConfig, SyntheticSource, TensorSource, as_source, parse_source
from saelab.sae.train import (
    CHECKPOINT_FILE,
    SAETrainConfig,
    geometric_median,
    read_log,
    resample_dead_latents,
    train_saes,
)

SMALL = SyntheticConfig(n_features=24, d_in=8, mean_l0=2.0)


def _source(seed: int = 0) -> SyntheticSource:
    return SyntheticSource(SMALL, seed=seed)


def _cfg(**overrides) -> SAETrainConfig:
    base = {"steps": 40, "batch_size": 128, "lr": 3e-3, "init_tokens": 512, "log_every": 1}
    return SAETrainConfig(**(base | overrides))


def _same_weights(a, b) -> bool:
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in a.tensor_names)


def test_schedules() -> None:
    cfg = SAETrainConfig(steps=100, lr=1.0, lr_warmup=0.1, lr_decay=0.2, sparsity_warmup=0.5, resample_every=25)
    assert [cfg.lr_at(s) for s in (0, 4, 9, 10, 79)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert [cfg.lr_at(s) for s in (80, 90, 99)] == [pytest.approx(1.0), pytest.approx(0.5), pytest.approx(0.05)]
    assert cfg.sparsity_scale_at(0) == pytest.approx(0.02) and cfg.sparsity_scale_at(49) == 1.0
    assert [s for s in range(100) if cfg.resamples_at(s)] == [24, 49, 74]  # none once the lr decays (from 80)


def test_geometric_median() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    expected = torch.tensor([1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(points), expected, atol=1e-5, rtol=0)
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 1.0]])
    torch.testing.assert_close(geometric_median(square), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    outlier = torch.cat([torch.zeros(9, 3), torch.full((1, 3), 1000.0)])  # the mean moves to 100, the median stays
    assert geometric_median(outlier).norm() < 1e-3


def test_training_reduces_loss_and_logs_every_step(tmp_path: Path) -> None:
    [sae] = train_saes(_source(), SAEConfig("topk", 8, 32, k=2), _cfg(), out=tmp_path, progress=False)
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == list(range(40))
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(records[-5:], "loss") < 0.8 * mean(records[:5], "loss")
    assert mean(records[-5:], "explained_variance") > mean(records[:5], "explained_variance") + 0.1
    assert all(r["l0"] == 2.0 for r in records)
    assert not (tmp_path / CHECKPOINT_FILE).exists()  # removed once the run is complete
    assert _same_weights(load_sae(tmp_path), sae)


def test_normalisation_is_folded_into_the_saved_weights() -> None:
    data = 50.0 * _source().next_batch(4096)
    normalised = train_saes(TensorSource(data), SAEConfig("relu", 8, 32), _cfg(), progress=False)[0]
    scale = 8**0.5 / float(data[:512].double().norm(dim=1).mean())  # E‖x‖ = √d_in on the init sample
    plain = _cfg(normalize_activations=False)
    by_hand = train_saes(TensorSource(data * scale), SAEConfig("relu", 8, 32), plain, progress=False)[0]
    x = data[:300]
    torch.testing.assert_close(normalised.encode(x), by_hand.encode(x * scale), atol=1e-4, rtol=1e-4)
    x_hat = normalised.decode(normalised.encode(x))
    torch.testing.assert_close(x_hat, by_hand(x * scale).x_hat / scale, atol=1e-3, rtol=1e-4)


def test_a_sweep_trains_each_sae_exactly_as_a_run_of_its_own(tmp_path: Path) -> None:
    configs = [SAEConfig("topk", 8, 32, k=1), SAEConfig("topk", 8, 32, k=3)]
    sweep = train_saes(_source(), configs, _cfg(steps=15), out=tmp_path, progress=False)
    for sae_cfg, swept in zip(configs, sweep, strict=True):
        alone = train_saes(_source(), sae_cfg, _cfg(steps=15), progress=False)[0]
        assert _same_weights(swept, alone)
        assert _same_weights(load_sae(tmp_path / sae_cfg.name), swept)
    assert {r["sae"] for r in read_log(tmp_path)} == {"topk_k1", "topk_k3"}


def test_without_an_lr_each_architecture_trains_at_its_own_default(tmp_path: Path) -> None:
    configs = [SAEConfig("topk", 8, 32, k=2), SAEConfig("relu", 8, 32)]
    train_saes(_source(), configs, _cfg(lr=None, steps=10, lr_decay=0.5), out=tmp_path, progress=False)
    first = {r["sae"]: r["lr"] for r in read_log(tmp_path) if r["step"] == 0}
    assert first == {"topk_k2": 2e-3, "relu_c5": 4e-4}  # TopKSAE.default_lr and the base SAE's
    last = {r["sae"]: r["lr"] for r in read_log(tmp_path) if r["step"] == 9}
    assert last == {"topk_k2": pytest.approx(2e-3 / 5), "relu_c5": pytest.approx(4e-4 / 5)}  # one schedule for both
    assert load_sae(tmp_path / "topk_k2").saved_info["train"]["lr"] == 2e-3


class _CrashingSource:
    """A source that dies (like a killed process) after `batches` batches."""

    def __init__(self, source, batches: int) -> None:
        self.source, self.left = source, batches
        self.hooks, self.d_ins, self.metadata_for = source.hooks, source.d_ins, source.metadata_for

    def next_batches(self, batch_size: int) -> dict[str, torch.Tensor]:
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("killed")
        return self.source.next_batches(batch_size)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


@pytest.mark.parametrize("architecture", ["relu", "batchtopk", "jumprelu", "matryoshka_batchtopk"])
def test_resume_after_a_crash_is_bit_identical(tmp_path: Path, architecture: str) -> None:
    # Resampling, AuxK (dead latents after 1024 tokens), warm-ups and lr decay all act during the resumed part.
    sae_cfg = SAEConfig(architecture, 8, 32, k=2, sparsity_coefficient=3.0)
    cfg = _cfg(checkpoint_every=10, resample_every=15, resample_tokens=256, dead_after_tokens=1024, sparsity_warmup=0.5)
    reference = train_saes(_source(), sae_cfg, cfg, out=tmp_path / "whole", progress=False)[0]
    with pytest.raises(RuntimeError, match="killed"):
        train_saes(_CrashingSource(_source(), 30), sae_cfg, cfg, out=tmp_path / "cut", progress=False)
    assert (partial_folder(tmp_path / "cut") / CHECKPOINT_FILE).exists()
    assert not (tmp_path / "cut").exists()  # the folder appears only when the run is complete
    with pytest.raises(SaelabError, match="pass --resume"):
        train_saes(_source(), sae_cfg, cfg, out=tmp_path / "cut", progress=False)
    resumed = train_saes(_source(), sae_cfg, cfg, out=tmp_path / "cut", resume=True, progress=False)[0]
    assert _same_weights(resumed, reference)
    assert read_log(tmp_path / "cut") == read_log(tmp_path / "whole")  # one line per step, the same values


def test_resume_checks_the_settings(tmp_path: Path) -> None:
    sae_cfg = SAEConfig("relu", 8, 32)
    with pytest.raises(RuntimeError):
        train_saes(_CrashingSource(_source(), 25), sae_cfg, _cfg(checkpoint_every=10), out=tmp_path, progress=False)
    with pytest.raises(SaelabError, match=r"other settings \(train_config.lr: checkpoint 0.003, now 0.01\)"):
        train_saes(_source(), sae_cfg, _cfg(checkpoint_every=10, lr=0.01), out=tmp_path, resume=True)
    with pytest.raises(SaelabError, match=r"sae_configs\[0\].d_sae"):
        train_saes(_source(), SAEConfig("relu", 8, 16), _cfg(checkpoint_every=10), out=tmp_path, resume=True)
    with pytest.raises(SaelabError, match="no checkpoint"):
        train_saes(_source(), sae_cfg, _cfg(), out=tmp_path / "fresh", resume=True)
    (partial_folder(tmp_path) / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(SaelabError, match="not a readable checkpoint"):
        train_saes(_source(), sae_cfg, _cfg(checkpoint_every=10), out=tmp_path, resume=True)


def test_resampling_points_dead_latents_at_badly_reconstructed_inputs() -> None:
    sae = build_sae(SAEConfig("relu", 8, 16), torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters())
    inputs = _source().next_batch(256)
    sae(inputs).loss.backward()
    optimizer.step()  # Adam now has state to reset
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    with torch.no_grad():
        sae.b_enc[dead] = -100.0  # these never fire
    assert not sae.encode(inputs)[:, dead].any()
    assert resample_dead_latents(sae, optimizer, dead, inputs, torch.Generator().manual_seed(0)) == 3
    assert sae.encode(inputs)[:, dead].any(dim=0).all()  # revived
    assert (sae.b_enc[dead] == 0).all()
    rows = sae.W_dec[dead] / sae.W_dec[dead].norm(dim=1, keepdim=True)
    centred = (inputs - sae.b_dec) / (inputs - sae.b_dec).norm(dim=1, keepdim=True)
    assert (rows @ centred.T).max(dim=1).values.min() > 0.999  # each row is some input's direction
    state = optimizer.state[sae.W_dec]
    assert not state["exp_avg"][dead].any() and state["exp_avg"][~dead].any()
    assert not optimizer.state[sae.W_enc]["exp_avg_sq"][:, dead].any()


def test_bad_settings_and_data_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SaelabError, match="lr_warmup \\+ lr_decay"):
        train_saes(_source(), SAEConfig("relu", 8, 32), _cfg(lr_warmup=0.5, lr_decay=0.6))
    with pytest.raises(SaelabError, match="unknown b_dec_init 'median'"):
        train_saes(_source(), SAEConfig("relu", 8, 32), _cfg(b_dec_init="median"))
    with pytest.raises(SaelabError, match="d_in = 4, but the activations have d_in = 8"):
        train_saes(_source(), SAEConfig("relu", 4, 32), _cfg())
    with pytest.raises(SaelabError, match="share a name"):
        train_saes(_source(), [SAEConfig("topk", 8, 32, k=2)] * 2, _cfg())
    with pytest.raises(SaelabError, match="device 'nonsense'"):
        train_saes(_source(), SAEConfig("relu", 8, 32), _cfg(device="nonsense"))
    data = torch.randn(1000, 8)
    data[700] = float("nan")
    with pytest.raises(SaelabError, match="NaN or inf"):
        train_saes(TensorSource(data), SAEConfig("relu", 8, 32), _cfg(), progress=False)
    with pytest.raises(SaelabError, match="diverged"):
        train_saes(_source(), SAEConfig("relu", 8, 32), _cfg(lr=1e12, grad_clip=0.0), progress=False)
    batches = (torch.randn(100, 8) for _ in range(1000))
    source = as_source(batches)
    with pytest.raises(SaelabError, match="cannot resume"):
        source.load_state_dict(source.state_dict())
    for spec, message in [
        ("mystery", "unknown activation source 'mystery'"),
        ("synthetic:n_feature=3", "did you mean 'n_features'"),
        ("synthetic:d_in=x", "d_in must be a number"),
        ("toy:/nowhere#a", "must be a number"),
    ]:
        with pytest.raises(SaelabError, match=message):
            parse_source(spec)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """A real `kill -9` of the CLI in the middle of training; the resumed run ends bit-identical."""
    args = [sys.executable, "-m", "saelab.cli", "sae", "train", "--source", "synthetic:n_features=48,d_in=16"]
    args += ["--architecture", "topk", "--k", "3", "--d-sae", "64", "--steps", "1500", "--batch-size", "256"]
    args += ["--lr", "0.003", "--checkpoint-every", "100", "--dead-after-tokens", "20000", "--quiet"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)

    victim = subprocess.Popen([*args, "--out", str(tmp_path / "cut")], env=env, stderr=subprocess.DEVNULL)
    checkpoint = partial_folder(tmp_path / "cut") / CHECKPOINT_FILE
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # let it run on past the checkpoint, possibly into the next one's write
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "cut").exists()

    subprocess.run([*args, "--out", str(tmp_path / "cut"), "--resume"], check=True, env=env, capture_output=True)
    whole, resumed = load_sae(tmp_path / "whole"), load_sae(tmp_path / "cut")
    assert _same_weights(whole, resumed)
    assert read_log(tmp_path / "cut") == read_log(tmp_path / "whole")
    assert json.loads((tmp_path / "cut" / "cfg.json").read_text())["saelab"]["trained_steps"] == 1500
