"""SAEs trained on language-model activations with saelab's trainer: from the disk cache exactly as from the live
store, resumed bit-exactly after an interruption, and evaluated with the LM evals."""

from __future__ import annotations

import pytest
import torch

from saelab.models.cache import CachedActivations, write_activation_cache
from saelab.models.data import ContextStream, iter_texts
from saelab.models.evals import lm_eval
from saelab.models.store import ActivationStore
from saelab.sae.io import load_sae, save_sae
from saelab.sae.model import SAEConfig, build_sae
from saelab.sae.train import SAETrainConfig, train_saes

HOOK = "blocks.0.hook_resid_post"
LENGTH = 32
SAE_CFG = SAEConfig(architecture="topk", d_in=32, d_sae=64, k=4)
TRAIN = SAETrainConfig(steps=16, batch_size=64, init_tokens=128, lr=3e-3, log_every=100)


def make_store(lm, dataset) -> ActivationStore:
    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id)
    return ActivationStore(lm, contexts, [HOOK], buffer_tokens=8 * LENGTH, model_batch_size=4, dataset=dataset)


def assert_same_weights(a, b) -> None:
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


class DiesAfter:
    """A source that fails after `n` batches, as a run killed mid-training would."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n = source, n
        self.hooks, self.d_ins, self.metadata_for = source.hooks, source.d_ins, source.metadata_for

    def next_batches(self, batch_size: int) -> dict[str, torch.Tensor]:
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.source.next_batches(batch_size)

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state) -> None:
        self.source.load_state_dict(state)


def test_training_from_the_cache_equals_training_from_the_model(lm, dataset, tmp_path):
    tokens = TRAIN.init_tokens + TRAIN.steps * TRAIN.batch_size
    cache = write_activation_cache(make_store(lm, dataset), tokens, tmp_path / "cache", shard_tokens=300)
    live = train_saes(make_store(lm, dataset), SAE_CFG, TRAIN, progress=False)[0]
    cached = train_saes(CachedActivations(cache), SAE_CFG, TRAIN, progress=False)[0]
    assert_same_weights(live, cached)
    assert cached.metadata["hook_name"] == live.metadata["hook_name"] == HOOK


def test_resume_after_an_interruption_gives_the_same_weights(lm, dataset, tmp_path):
    cfg = SAETrainConfig(**{**TRAIN.__dict__, "checkpoint_every": 5})
    with pytest.raises(KeyboardInterrupt):  # dies in step 12 (2 batches initialise), after the step-10 checkpoint
        train_saes(DiesAfter(make_store(lm, dataset), 2 + 12), SAE_CFG, cfg, out=tmp_path / "run", progress=False)
    resumed = train_saes(make_store(lm, dataset), SAE_CFG, cfg, out=tmp_path / "run", resume=True, progress=False)[0]
    uninterrupted = train_saes(make_store(lm, dataset), SAE_CFG, cfg, progress=False)[0]
    assert_same_weights(resumed, uninterrupted)


def test_lm_eval_of_a_trained_and_saved_sae(lm, dataset, tmp_path):
    trained = train_saes(make_store(lm, dataset), SAE_CFG, TRAIN, progress=False)[0]
    save_sae(trained, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.metadata["hook_name"] == HOOK and loaded.metadata["context_length"] == LENGTH
    metrics = lm_eval(loaded, sae_dir=tmp_path / "sae", model=lm, n_tokens=400)  # dataset from the metadata
    untrained = build_sae(SAE_CFG)
    untrained.metadata = dict(loaded.metadata)
    baseline = lm_eval(untrained, model=lm, n_tokens=400)
    assert 0 < metrics.l0 <= SAE_CFG.k
    assert metrics.explained_variance > baseline.explained_variance + 0.2
    assert metrics.kl_div_with_sae < baseline.kl_div_with_sae
    assert metrics.ce_loss_clean == baseline.ce_loss_clean


def test_saes_on_two_hooks_train_from_one_pass_as_each_would_alone(lm, dataset):
    hooks = [HOOK, "blocks.1.hook_resid_post"]
    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id)
    store = ActivationStore(lm, contexts, hooks, buffer_tokens=8 * LENGTH, model_batch_size=4, dataset=dataset)
    both = train_saes(store, [SAE_CFG, SAE_CFG], TRAIN, progress=False, hooks=hooks)
    for hook, sae in zip(hooks, both, strict=True):
        alone_store = ActivationStore(
            lm, ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id), [hook],
            buffer_tokens=8 * LENGTH, model_batch_size=4, dataset=dataset,
        )  # fmt: skip
        assert_same_weights(train_saes(alone_store, SAE_CFG, TRAIN, progress=False)[0], sae)
        assert sae.metadata["hook_name"] == hook


def test_sae_train_command_reads_a_cache_with_several_hooks(lm, dataset, tmp_path):
    from typer.testing import CliRunner

    from saelab.cli import app

    hooks = [HOOK, "blocks.1.hook_resid_post"]
    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id)
    store = ActivationStore(lm, contexts, hooks, buffer_tokens=8 * LENGTH, model_batch_size=4, dataset=dataset)
    cache = write_activation_cache(store, 16384 + 4 * 64, tmp_path / "cache")  # init sample + 4 steps
    args = ["sae", "train", "--source", f"cache:{cache}", "--k", "2,4", "--d-sae", "64", "--steps", "4"]
    args += ["--batch-size", "64", "--quiet", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert "saved 4 SAEs" in result.output
    for hook in hooks:
        for k in (2, 4):
            sae = load_sae(tmp_path / "run" / hook / f"topk_k{k}")
            assert sae.metadata["hook_name"] == hook and sae.cfg.k == k and sae.metadata["model_name"] == "tiny"
    one = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "one"), "--hook", hooks[1]], catch_exceptions=False)
    assert "saved 2 SAEs" in one.output and (tmp_path / "one" / "topk_k2" / "cfg.json").is_file()
    typo = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "typo"), "--hook", "blocks.1.hook_resid_pots"])
    assert "did you mean 'blocks.1.hook_resid_post'" in str(typo.exception)
