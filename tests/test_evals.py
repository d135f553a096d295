"""LM evals: CE loss recovered and KL score behave at their end points, match an independent computation with
TransformerLens's own hooks, agree between TL and Hugging Face on the same weights, and reject mismatches."""

from __future__ import annotations

import math

import pytest
import torch
from models_helpers import LinearSAE, check_splice_metrics, save_gpt2

from saelab.errors import SaelabError
from saelab.models.access import load_model
from saelab.models.data import documents, spread_contexts
from saelab.models.evals import lm_eval

HOOK = "blocks.0.hook_resid_post"
LENGTH = 32
TOKENS = 600


def evaluate(sae, lm, dataset, **kwargs):
    return lm_eval(sae, model=lm, dataset=dataset, n_tokens=TOKENS, context_length=LENGTH, **kwargs)


def test_identity_sae_recovers_everything(lm, dataset):
    metrics = evaluate(LinearSAE.identity(32, hook_name=HOOK), lm, dataset)
    assert metrics.ce_loss_with_sae == metrics.ce_loss_clean
    assert metrics.ce_loss_recovered == 1.0
    assert metrics.kl_div_with_sae == 0.0 and metrics.kl_div_score == 1.0
    assert metrics.ce_loss_with_ablation != metrics.ce_loss_clean and metrics.kl_div_with_ablation > 0
    assert metrics.explained_variance == pytest.approx(1.0, abs=1e-9) and metrics.mse == 0.0


def test_zero_sae_is_as_bad_as_ablation(lm, dataset):
    metrics = evaluate(LinearSAE.zero(32, hook_name=HOOK), lm, dataset)
    assert metrics.ce_loss_with_sae == metrics.ce_loss_with_ablation
    assert metrics.ce_loss_recovered == 0.0 and metrics.kl_div_score == 0.0


def test_metrics_match_an_independent_computation(lm, dataset):
    """Recompute every number with TransformerLens's run_with_hooks and loss_per_token, over the same contexts."""
    sae = LinearSAE.random(32, 96, hook_name=HOOK)
    metrics = evaluate(sae, lm, dataset, model_batch_size=5)

    n_contexts = math.ceil(TOKENS / (LENGTH - 1))
    tokens, _ = spread_contexts(documents(dataset, "heldout"), lm.tokenizer, LENGTH, 0, n_contexts, seed=0)
    keep = (tokens != 0)[..., None]  # BOS (id 0, also padding) keeps its clean activation
    model = lm.model
    splice = {
        "sae": lambda x, hook: torch.where(keep, sae.decode(sae.encode(x)), x),
        "abl": lambda x, hook: torch.where(keep, torch.zeros_like(x), x),
    }
    with torch.no_grad():
        clean_logits = model(tokens)
        logits = {name: model.run_with_hooks(tokens, fwd_hooks=[(HOOK, fn)]) for name, fn in splice.items()}
    check_splice_metrics(metrics, tokens, clean_logits, logits["sae"], logits["abl"])

    x = lm.activations(tokens, [HOOK])[HOOK][tokens != 0]
    x_hat = sae.decode(sae.encode(x)).detach()
    assert metrics.reconstruction["tokens"] == len(x)
    assert metrics.mse == pytest.approx((x - x_hat).pow(2).sum(-1).mean().item(), rel=1e-5)
    assert metrics.explained_variance == pytest.approx(
        1 - ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-4
    )


def test_transformer_lens_and_hugging_face_evals_agree(tokenizer, dataset, tmp_path):
    folder = save_gpt2(tmp_path / "gpt2", tokenizer)
    sae = LinearSAE.random(32, 64, seed=1, hook_name="blocks.1.hook_mlp_out")
    via_hf = evaluate(sae, load_model(str(folder)), dataset)
    via_tl = evaluate(sae, load_model(str(folder), backend="transformer_lens"), dataset)
    for key in ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_with_sae", "explained_variance"):
        assert getattr(via_hf, key) == pytest.approx(getattr(via_tl, key), rel=1e-4), key


def test_the_model_is_found_from_the_saes_metadata(tokenizer, dataset, tmp_path):
    """A relative model path recorded in the SAE's metadata resolves against the SAE's folder."""
    save_gpt2(tmp_path / "gpt2", tokenizer)
    sae = LinearSAE.identity(32, hook_name=HOOK, model_name="gpt2", dataset=dataset, context_length=LENGTH)
    metrics = lm_eval(sae, sae_dir=tmp_path, n_tokens=200)
    assert metrics.ce_loss_recovered == 1.0


def test_mismatched_saes_are_one_line_errors(lm, dataset):
    with pytest.raises(SaelabError, match="names no hook_name"):
        evaluate(LinearSAE.identity(32), lm, dataset)
    with pytest.raises(SaelabError, match=r"d_in = 16 but blocks\.0\.hook_resid_post of tiny has 32"):
        evaluate(LinearSAE.identity(16, hook_name=HOOK), lm, dataset)
    with pytest.raises(SaelabError, match="unknown hook"):
        evaluate(LinearSAE.identity(32, hook_name="blocks.9.hook_resid_post"), lm, dataset)


def test_the_built_in_model_on_held_out_files():
    """The shipped model predicts held-out standard-library code far better than unigram frequencies, and zero-
    ablating its residual stream after block 0 costs most of that."""
    from saelab.models.builtin import BUILTIN_DIR, read_lm_config

    results = read_lm_config(BUILTIN_DIR)[1]["results"]
    sae = LinearSAE.identity(128, hook_name=HOOK, model_name="builtin", dataset="builtin", context_length=128)
    metrics = lm_eval(sae, n_tokens=1024)
    assert metrics.ce_loss_clean < 0.8 * results["unigram_entropy"]
    assert metrics.ce_loss_recovered == 1.0
    assert metrics.ce_loss_with_ablation > metrics.ce_loss_clean + 1.0
