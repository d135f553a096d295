"""The batched toy model: config validation, feature generators, saved format, foreign folders, seeding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from toy_helpers import one_torch_thread

from saelab.errors import SaelabError
from saelab.toy import ToyModel, ToyModelConfig, ToyTrainConfig, load_toy_model, save_toy_model, train_toy_model


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_torch_thread():
        yield


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n_features": 0}, "n_features must be a positive integer"),
        ({"d_hidden": -2}, "d_hidden must be a positive integer"),
        ({"n_instances": 0}, "n_instances must be a positive integer"),
        ({"feature_probability": 0.0}, "feature probability must be in (0, 1]"),
        ({"feature_probability": 1.5}, "feature probability must be in (0, 1]"),
        ({"feature_probability": [0.1, 0.2], "n_instances": 3}, "one per instance (3)"),
        ({"variant": "gelu"}, "unknown variant 'gelu'"),
        ({"features": "clustered"}, "unknown feature generator 'clustered'"),
        ({"importance": [1.0, 0.5]}, "importance lists 2 values but n_features is 5"),
        ({"importance_decay": 0.0}, "importance_decay must be a finite positive number"),
        ({"importance_decay": float("inf")}, "importance_decay must be a finite positive number"),
        ({"importance": [1.0, float("nan"), 1.0, 1.0, 1.0]}, "importance values must be finite non-negative numbers"),
        ({"features": "correlated", "n_features": 5}, "n_features must be even"),
        ({"features": "anticorrelated", "n_features": 4, "feature_probability": 0.6}, "<= 0.5"),
    ],
)
def test_bad_model_config_is_a_one_line_error(kwargs: dict, expected: str) -> None:
    with pytest.raises(SaelabError) as err:
        ToyModel(ToyModelConfig(**kwargs))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"batch_size": -1}, "batch_size must be a positive integer"),
        ({"lr": 0.0}, "lr must be a finite positive number"),
        ({"lr": float("inf")}, "lr must be a finite positive number"),
        ({"lr_schedule": "step"}, "unknown lr_schedule 'step'"),
        ({"method": "magic"}, "unknown training method 'magic'"),
    ],
)
def test_bad_train_config_is_a_one_line_error(kwargs: dict, expected: str) -> None:
    with pytest.raises(SaelabError, match=expected):
        train_toy_model(ToyModel(ToyModelConfig()), ToyTrainConfig(**kwargs), progress=False)


def test_importance_of_the_wrong_shape_is_rejected() -> None:
    with pytest.raises(SaelabError, match=r"importance has shape \(8, 4\) but must be \[instances, features\]"):
        ToyModel(ToyModelConfig(), importance=torch.ones(8, 4))


def test_independent_features_fire_with_their_probability() -> None:
    model = ToyModel(ToyModelConfig(n_features=3, n_instances=2, feature_probability=[0.1, 0.5]))
    x = model.generate_batch(40_000, torch.Generator().manual_seed(0))  # [batch, inst, feat]
    rate = (x > 0).float().mean(0)
    assert torch.allclose(rate, torch.tensor([[0.1] * 3, [0.5] * 3]), atol=0.01)
    assert abs(x[x > 0].mean().item() - 0.5) < 0.01  # values uniform in [0, 1]
    assert x.max() <= 1


def test_correlated_pairs_fire_together_and_anticorrelated_never() -> None:
    generator = torch.Generator().manual_seed(0)
    correlated = ToyModel(ToyModelConfig(n_features=4, n_instances=1, features="correlated", feature_probability=0.2))
    x = correlated.generate_batch(20_000, generator)[:, 0] > 0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 2], x[:, 3])
    assert abs(x.float().mean().item() - 0.2) < 0.01
    assert 0 < (x[:, 0] & ~x[:, 2]).float().mean() < 0.2  # different pairs are independent

    anti = ToyModel(ToyModelConfig(n_features=4, n_instances=1, features="anticorrelated", feature_probability=0.2))
    x = anti.generate_batch(20_000, generator)[:, 0] > 0
    assert not (x[:, 0] & x[:, 1]).any() and not (x[:, 2] & x[:, 3]).any()
    assert torch.allclose(x.float().mean(0), torch.full((4,), 0.2), atol=0.01)


def test_abs_variant_reads_signed_inputs_and_targets_their_absolute_value() -> None:
    model = ToyModel(ToyModelConfig(variant="abs", feature_probability=0.5))
    x = model.generate_batch(10_000, torch.Generator().manual_seed(0))
    assert x.min() < -0.9 and x.max() > 0.9 and abs(x[x != 0].mean().item()) < 0.02
    assert torch.equal(model.target(x), x.abs())
    assert (model.hidden(x) >= 0).all()  # ReLU hidden layer


def _random_model(variant: str = "relu") -> ToyModel:
    cfg = ToyModelConfig(n_features=6, d_hidden=3, n_instances=3, variant=variant, feature_probability=[0.5, 0.1, 1.0])
    model = ToyModel(cfg, importance=torch.rand(3, 6) + 0.1)
    generator = torch.Generator().manual_seed(1)
    model.reset_parameters(generator)
    with torch.no_grad():
        model.b_final.normal_(0, 0.1, generator=generator)
    return model


@pytest.mark.parametrize("variant", ["relu", "abs"])
def test_save_load_round_trip(tmp_path: Path, variant: str) -> None:
    model = _random_model(variant)
    train_cfg = ToyTrainConfig(steps=7, lr_schedule="linear", seed=3)
    save_toy_model(model, tmp_path / "toy", train_cfg)
    loaded, loaded_train = load_toy_model(tmp_path / "toy")
    assert loaded.cfg == model.cfg and loaded_train == train_cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = model.generate_batch(16, torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), model(x))
    cfg = json.loads((tmp_path / "toy" / "cfg.json").read_text())
    assert cfg["format"] == "saelab.toy_model" and cfg["model"]["feature_probability"] == [0.5, 0.1, 1.0]


def _replace(name: str, content: str | bytes):
    def corrupt(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return directory

    return corrupt


def _delete(name: str):
    def corrupt(directory: Path) -> Path:
        (directory / name).unlink()
        return directory

    return corrupt


def _edit_model_cfg(**changes):
    def corrupt(directory: Path) -> Path:
        cfg = json.loads((directory / "cfg.json").read_text())
        cfg["model"].update(changes)
        (directory / "cfg.json").write_text(json.dumps(cfg))
        return directory

    return corrupt


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda directory: directory / "cfg.json", "is not a directory"),
        (_delete("cfg.json"), "has no cfg.json"),
        (_replace("cfg.json", '{"architecture": "jumprelu", "d_in": 3}'), "'jumprelu', not a saelab toy model"),
        (_replace("cfg.json", "{not json"), "is not valid JSON"),
        (_edit_model_cfg(n_feature=6), "did you mean 'n_features'"),
        (_edit_model_cfg(n_features=7), "'W' has shape (3, 3, 6), cfg.json implies (3, 3, 7)"),
        (_replace("model.safetensors", b"\x00\x01garbage"), "not a readable safetensors file"),
        (_delete("model.safetensors"), "model.safetensors not found"),
    ],
)
def test_a_folder_that_is_not_a_saved_toy_model_is_rejected(tmp_path: Path, corrupt, expected: str) -> None:
    target = corrupt(save_toy_model(_random_model(), tmp_path / "toy"))
    with pytest.raises(SaelabError) as err:
        load_toy_model(target)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_training_is_reproducible_from_the_seed(method: str) -> None:
    def train(seed: int) -> torch.Tensor:
        model = ToyModel(ToyModelConfig(n_instances=2))
        train_toy_model(model, ToyTrainConfig(steps=30, batch_size=64, seed=seed, method=method), progress=False)
        return model.W.detach().clone()

    assert torch.equal(train(0), train(0))
    assert not torch.allclose(train(0), train(1))
