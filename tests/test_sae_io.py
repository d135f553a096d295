"""The saved SAE folder: round trips, SAELens interop in both directions, and one-line errors for bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_helpers import one_thread  # noqa: F401  (autouse)
from safetensors.torch import load_file, save_file

from saelab.errors import SaelabError
from saelab.sae.io import load_sae, save_sae
from saelab.sae.model import ARCHITECTURES, SAEConfig, build_sae
from saelab.toy import ToyModel, ToyModelConfig, save_toy_model


def _random_sae(architecture: str, seed: int = 0):
    """An SAE with every tensor random (thresholds positive), in eval mode."""
    sae = build_sae(SAEConfig(architecture, 10, 40, k=4), torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in sae.tensor_names:
            tensor = getattr(sae, name)
            tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
            if name == "threshold":
                tensor.abs_()
        if architecture in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.2)  # one θ for all latents
    sae.metadata = {"model_name": "toy", "hook_name": "hidden", "source": "synthetic"}
    return sae.eval()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_keeps_weights_config_and_metadata(tmp_path: Path, architecture: str) -> None:
    sae = _random_sae(architecture)
    save_sae(sae, tmp_path / "sae", extra={"trained_steps": 7})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert set(weights) == set(sae.tensor_names)
    assert weights["W_enc"].shape == (10, 40) and weights["W_dec"].shape == (40, 10)
    assert {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations"} <= set(cfg)
    assert cfg["metadata"]["hook_name"] == "hidden" and cfg["metadata"]["model_name"] == "toy"

    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and not loaded.training
    assert loaded.metadata["source"] == "synthetic" and loaded.saved_info["trained_steps"] == 7
    for name in sae.tensor_names:
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    x = torch.randn(20, 10)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_saelens_names_for_relu_and_batchtopk(tmp_path: Path) -> None:
    save_sae(_random_sae("relu"), tmp_path / "relu")
    assert json.loads((tmp_path / "relu" / "cfg.json").read_text())["architecture"] == "standard"
    save_sae(_random_sae("batchtopk"), tmp_path / "btk")
    cfg = json.loads((tmp_path / "btk" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["training_architecture"] == "batchtopk"
    assert torch.equal(load_file(tmp_path / "btk" / "sae_weights.safetensors")["threshold"], torch.full((40,), 0.2))


SAELENS_CLASSES = {
    "relu": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "matryoshka_batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "gated": "GatedSAE",
}


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelab_saved_sae_loads_in_saelens_with_the_same_latents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sae_lens, architecture: str
) -> None:
    monkeypatch.chdir(tmp_path)  # SAELens may write output/ and checkpoints/ into the working directory
    sae = _random_sae(architecture)
    save_sae(sae, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert type(theirs).__name__ == SAELENS_CLASSES[architecture]
    x = torch.randn(64, 10)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(theirs.decode(sae.encode(x)), sae.decode(sae.encode(x)), atol=1e-6, rtol=1e-6)


def _saelens_sae(sae_lens, architecture: str):
    """A SAELens inference SAE with random weights (positive thresholds)."""
    d = {"d_in": 10, "d_sae": 40}
    configs = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig(**d)),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig(**d, k=4, rescale_acts_by_decoder_norm=True)),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig(**d)),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig(**d)),
    }
    cls, cfg = configs[architecture]
    sae = cls(cfg)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
            if name == "threshold":
                param.abs_()
        sae.W_dec.mul_(torch.rand(40, 1, generator=generator) + 0.5)  # rows of varying norm
    return sae


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_saved_sae_loads_in_saelab_with_the_same_latents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sae_lens, architecture: str
) -> None:
    monkeypatch.chdir(tmp_path)
    theirs = _saelens_sae(sae_lens, architecture)
    theirs.save_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    assert ours.cfg.architecture == {"standard": "relu"}.get(architecture, architecture)
    x = torch.randn(64, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours(x).x_hat, theirs(x), atol=1e-6, rtol=1e-6)


def test_saelens_batchtopk_inference_file_loads_as_jumprelu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sae_lens
) -> None:
    monkeypatch.chdir(tmp_path)
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    trained = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=10, d_sae=40, k=3))
    trained.topk_threshold = torch.tensor(0.25, dtype=torch.float64)
    trained.save_inference_model(tmp_path / "btk")
    ours = load_sae(tmp_path / "btk")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "btk")
    assert ours.cfg.architecture == "jumprelu" and ours.metadata["training_architecture"] == "batchtopk"
    x = torch.randn(64, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-6, rtol=1e-6)


def _error(path: Path) -> str:
    with pytest.raises(SaelabError) as info:
        load_sae(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_foreign_and_corrupt_folders_give_one_line_errors(tmp_path: Path) -> None:
    assert "is not a directory" in _error(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "has no cfg.json" in _error(tmp_path / "empty")

    save_toy_model(ToyModel(ToyModelConfig(n_instances=1)), tmp_path / "toy")
    assert "saelab.toy_model" in _error(tmp_path / "toy") and "not an SAE" in _error(tmp_path / "toy")

    good = tmp_path / "good"
    save_sae(_random_sae("topk"), good)
    cfg = json.loads((good / "cfg.json").read_text())

    def variant(name: str, cfg_text: str | None = None, weights: dict | None = None, drop_weights: bool = False):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_text(cfg_text if cfg_text is not None else json.dumps(cfg))
        if not drop_weights:
            tensors = weights if weights is not None else load_file(good / "sae_weights.safetensors")
            save_file(tensors, folder / "sae_weights.safetensors")
        return folder

    assert "not valid JSON" in _error(variant("badjson", "{not json"))
    foreign = {k: v for k, v in cfg.items() if k not in ("saelab", "d_sae")}
    assert "lacks 'd_sae'" in _error(variant("nodsae", json.dumps(foreign)))
    unknown = foreign | {"d_sae": 40, "architecture": "temporal"}
    assert "'temporal' is not supported" in _error(variant("arch", json.dumps(unknown)))
    transcoder = foreign | {"d_sae": 40, "architecture": "transcoder"}
    assert "a transcoder needs d_out" in _error(variant("nodout", json.dumps(transcoder)))
    assert "lacks sae_weights.safetensors" in _error(variant("noweights", drop_weights=True))
    weights = load_file(good / "sae_weights.safetensors")
    no_b_enc = {k: v for k, v in weights.items() if k != "b_enc"}
    assert "lacks tensor 'b_enc'" in _error(variant("notensor", weights=no_b_enc))
    assert "'W_dec' has shape (40, 9)" in _error(variant("shape", weights=weights | {"W_dec": torch.zeros(40, 9)}))
    truncated = variant("truncated")
    data = (truncated / "sae_weights.safetensors").read_bytes()
    (truncated / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _error(truncated)
    typo = json.loads(json.dumps(cfg))
    typo["saelab"]["sae"]["d_sea"] = typo["saelab"]["sae"].pop("d_sae")
    assert "did you mean 'd_sae'" in _error(variant("typo", json.dumps(typo)))

    sweep = tmp_path / "sweep"
    save_sae(_random_sae("relu"), sweep / "relu_c5")
    save_sae(_random_sae("relu", seed=3), sweep / "relu_c9")
    assert "holds several SAEs (relu_c5, relu_c9)" in _error(sweep)
