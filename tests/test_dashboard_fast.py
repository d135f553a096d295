"""The dashboard's performance paths against plain computations on tiny real models: token strings of a slice,
byte-level prefix decoding, numpy's non-zero scan, clean runs in parts, pass 1 in small batches, single-position
runs shared across nearby positions, and total-effect runs that take their clean losses from pass 1."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dashboard_helpers import (
    ADVERSARIAL,
    HOOK,
    PLAIN,
    TinySAE,
    make_model,
    make_tokenizer,
    make_tokens,
    one_thread,  # noqa: F401  (autouse)
)
from tokenizers import Tokenizer
from tokenizers.decoders import WordPiece
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from saelab.dashboard.compute import DashboardConfig, attribution, compute_dashboard, eligible_positions
from saelab.dashboard.effects import (
    UNDERFLOW_CE,
    Downstream,
    _pads_safely,
    loss_gradient,
    next_token_ce,
    reference_loss_effects,
    unembed_ce,
)
from saelab.dashboard.stats import flat_nonzero
from saelab.dashboard.text import _byte_level_decodes, token_strings


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_token_strings_of_a_slice_are_that_slice_of_the_whole(tok):
    for text in [*ADVERSARIAL, *PLAIN, "".join(ADVERSARIAL)]:
        ids = tok.encode(text, add_special_tokens=False)
        whole = token_strings(tok, ids)
        assert "".join(whole) == text
        for start in range(len(ids) + 1):
            for end in range(start, len(ids) + 2):
                assert token_strings(tok, ids, start, end) == whole[start:end]


def test_byte_level_prefix_decodes_equal_the_tokenizers_own(tok):
    """The one-pass byte-level decoding against the tokenizer decoding every prefix itself, on the adversarial
    strings and on random ids (invalid UTF-8 everywhere); other tokenizers take the tokenizer's way."""
    g = torch.Generator().manual_seed(0)
    sequences = [tok.encode(text, add_special_tokens=False) for text in [*ADVERSARIAL, *PLAIN]]
    sequences += (
        make_tokens(tok, n_seq=8, length=40).tolist() + torch.randint(len(tok), (100, 30), generator=g).tolist()
    )
    for ids in sequences:
        cuts = range(1, len(ids))
        fast = _byte_level_decodes(tok, ids, cuts)
        assert fast == tok.backend_tokenizer.decode_batch([ids[:k] for k in cuts] + [ids], skip_special_tokens=False)
    word = Tokenizer(WordLevel({"hello": 0, "wor": 1, "##ld": 2, "[UNK]": 3}, unk_token="[UNK]"))
    word.decoder = WordPiece()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=word)
    assert _byte_level_decodes(wrapped, [0, 1, 2], range(1, 3)) is None
    assert "".join(token_strings(wrapped, [0, 1, 2])) == word.decode([0, 1, 2]) == "hello world"


def test_flat_nonzero_finds_what_torch_finds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 70, generator=g) * (torch.rand(300, 70, generator=g) < 0.05)
    x[3, 5], x[7, 0] = -2.0, float("nan")  # negative and NaN entries are non-zero too
    assert torch.equal(flat_nonzero(x), x.flatten().nonzero()[:, 0])
    assert torch.equal(flat_nonzero(x.T), x.T.flatten().nonzero()[:, 0])  # a non-contiguous view
    assert len(flat_nonzero(torch.zeros(4, 3))) == 0


@pytest.mark.parametrize(("normalization", "positional"), [("LN", "standard"), ("RMS", "rotary")])
def test_clean_run_in_parts_equals_one_pass(tok, normalization, positional):
    lm = make_model(tok, normalization, positional)
    engine = Downstream(lm, HOOK)
    tokens = make_tokens(tok, n_seq=7, length=24)
    whole = engine.clean(tokens, per_pass=7)
    parts = engine.clean(tokens, per_pass=3)
    for name in ("tokens", "x_hook", "resid_start", "final_resid"):
        assert torch.allclose(getattr(parts, name).float(), getattr(whole, name).float(), atol=1e-5), name
    for a, b in zip(parts.keys + parts.values, whole.keys + whole.values, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    from_resid = engine.clean(tokens, whole.resid_start, per_pass=2)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(from_resid.keys, whole.keys, strict=True))


@pytest.mark.parametrize(
    ("normalization", "positional", "hook"),
    [("LN", "standard", HOOK), ("RMS", "rotary", HOOK), ("RMS", "rotary", "blocks.0.attn.hook_z")],
)
def test_runs_shared_by_many_positions_match_the_reference(tok, normalization, positional, hook):
    """Every position of a sequence, several latents each: the runs that mix positions (shorter caches padded and
    masked) give the plain whole-forward-pass ΔCE."""
    lm = make_model(tok, normalization, positional)
    sae = TinySAE(lm.d_hook(hook), 8, hook, bias=0.5)  # fires almost everywhere
    tokens = make_tokens(tok, n_seq=3, length=24)
    engine = Downstream(lm, hook)
    run = engine.clean(tokens)
    acts = sae.encode(run.x_hook)
    seq, pos, lat = (acts[:, :-1, :3] > 0).nonzero(as_tuple=True)
    delta = acts[seq, pos, lat][:, None] * sae.W_dec[lat]
    fast, clean = engine.loss_effects(run, seq, pos, delta)
    reference = reference_loss_effects(lm, hook, tokens, seq, pos, delta)
    assert len(pos.unique()) >= 20 and fast.abs().max() > 1e-3
    assert torch.allclose(fast, reference, atol=2e-5, rtol=1e-4)
    assert torch.allclose(clean.final, run.final_resid[seq, pos], atol=1e-5)
    engine.positions_per_run = 1  # what models that read positions off the cache length get
    assert torch.allclose(engine.loss_effects(run, seq, pos, delta)[0], fast, atol=2e-5, rtol=1e-4)  # float32 regrouped


def test_only_models_with_mask_counted_positions_share_runs(tok):
    assert Downstream(make_model(tok, "LN", "rotary"), HOOK).positions_per_run > 1
    cfg = make_model(tok).model.cfg
    for change in ({"positional_embedding_type": "alibi"}, {"use_logn_attn": True}, {"attn_types": ["local"]}):
        assert not _pads_safely(type(cfg)(**{**cfg.to_dict(), **change}))
    assert _pads_safely(cfg)


def test_small_batches_give_the_same_dashboard(tok):
    """Pass 1 streams batches of sequences; splitting the tokens differently changes nothing shown."""
    lm = make_model(tok)
    sae = TinySAE(32, 12, HOOK)
    tokens = make_tokens(tok, n_seq=12, length=24)
    boards = [
        compute_dashboard(lm, sae, tokens, HOOK, cfg=DashboardConfig(batch_size=size, exact_firings=8))
        for size in (12, 5)
    ]
    for one, other in zip(boards[0].latents, boards[1].latents, strict=True):
        assert one["count"] == other["count"] and one["hist"] == other["hist"]
        assert [i for i, _ in one["correlated"]] == [i for i, _ in other["correlated"]]
        assert _close(one["importance"], other["importance"]) and _close(one["windows"], other["windows"])


def _close(a, b) -> bool:
    """Equal structures whose numbers agree to float rounding."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(b))
    return a == b


def test_attribution_at_firing_latents_equals_the_dense_product():
    """The sparse attribution (only where a latent fires) against the plain dense −a · (grad @ W_decᵀ)."""
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(4, 16, 300, generator=g) - 1.5)
    grad, W_dec = torch.randn(4, 16, 32, generator=g), torch.randn(300, 32, generator=g)
    dense = -acts * (grad @ W_dec.T)
    assert (acts > 0).any() and (acts == 0).any()
    index, estimate = attribution(acts, grad, W_dec)
    assert torch.equal(index, acts.flatten().nonzero()[:, 0])
    assert torch.allclose(estimate, dense.flatten()[index], atol=1e-5)
    empty_index, empty = attribution(torch.zeros(2, 3, 300), grad[:2, :3], W_dec)
    assert len(empty_index) == len(empty) == 0


def test_the_reference_engine_gives_the_same_importance(tok):
    """exact="reference" (whole forward passes per firing, what models other than TransformerLens get) against the
    fast re-runs from the hooked block: the same total ΔCE, so the same importance and intervals."""
    lm = make_model(tok)
    sae = TinySAE(32, 6, HOOK)
    tokens = make_tokens(tok, n_seq=6, length=20)
    boards = [
        compute_dashboard(lm, sae, tokens, HOOK, cfg=DashboardConfig(exact=exact, exact_firings=10_000, corr_tokens=0))
        for exact in ("fast", "reference")
    ]
    for fast, reference in zip(boards[0].latents, boards[1].latents, strict=True):
        assert fast["importance"]["method"] == "exact" and fast["importance"]["firings"] > 0
        assert _close(fast["importance"], reference["importance"])


@pytest.mark.parametrize("soft_cap", [0.0, 3.0])
def test_unembedded_loss_and_its_closed_form_gradient_equal_autograd_of_the_logits(tok, soft_cap):
    """`unembed_ce` (logits a few rows at a time, the gradient written out) against the model's own final norm,
    logits, CE and autograd, with and without a logit soft cap, in chunks smaller than the rows."""
    lm = make_model(tok)
    model = lm.model
    model.cfg.output_logits_soft_cap = soft_cap
    try:
        g = torch.Generator().manual_seed(0)
        resid = torch.randn(37, model.cfg.d_model, generator=g, requires_grad=True)
        targets = torch.randint(len(tok), (37,), generator=g)
        weights = (torch.rand(37, generator=g) < 0.7).float()
        with torch.enable_grad():
            logits = model(resid[:, None], start_at_layer=model.cfg.n_layers)[:, 0]
            expected = next_token_ce(logits, targets)
            (expected_grad,) = torch.autograd.grad(expected @ weights, resid)
            normed = model.ln_final(resid)
            ce = unembed_ce(model, normed.detach(), targets, rows=8)[0]
            ce_with_grad, normed_grad = unembed_ce(model, normed.detach(), targets, weights, rows=8)
            (grad,) = torch.autograd.grad(normed, resid, normed_grad)
        assert torch.allclose(ce, expected.detach(), atol=1e-5)
        assert torch.equal(ce_with_grad, ce)  # the same computation, with or without the gradient
        assert torch.allclose(grad, expected_grad, atol=1e-5)
    finally:
        model.cfg.output_logits_soft_cap = 0.0


def test_unembedded_loss_of_a_vanishing_probability_is_log_softmaxs(tok):
    """Where the target's probability underflows (−log of it would lose precision or be infinite), the CE is
    log_softmax's: residuals scaled up until some CEs exceed UNDERFLOW_CE and some are infinite as −log p."""
    model = make_model(tok).model
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 8, 16)[:, None]  # CE from a few nats to a few hundred
    normed = scale * model.ln_final(torch.randn(16, model.cfg.d_model, generator=g))
    targets = torch.randint(len(tok), (16,), generator=g)
    with torch.no_grad():
        logits = model.unembed(normed[:, None])[:, 0]
        expected = next_token_ce(logits, targets)
        naive = -torch.softmax(logits, 1).gather(1, targets[:, None])[:, 0].log()
        ce = unembed_ce(model, normed, targets, rows=4)[0]
    assert (expected > UNDERFLOW_CE).sum() >= 2 and (expected < UNDERFLOW_CE).sum() >= 2 and naive.isinf().any()
    assert torch.allclose(ce, expected, rtol=1e-5) and ce.isfinite().all()


@pytest.mark.parametrize(("normalization", "positional", "hook"), [
    ("LN", "standard", HOOK), ("RMS", "rotary", "blocks.1.attn.hook_z"), (None, "standard", "blocks.0.mlp.hook_post"),
])  # fmt: skip
def test_fused_loss_gradient_equals_autograd_of_the_full_logits(tok, normalization, positional, hook):
    lm = make_model(tok, normalization, positional)
    tokens = make_tokens(tok, n_seq=5, length=24)
    eligible = eligible_positions(lm.regular_positions(tokens))
    read = ("blocks.1.hook_resid_pre",)
    fast = loss_gradient(lm, hook, tokens, eligible, read, fast=True)
    reference = loss_gradient(lm, hook, tokens, eligible, read, fast=False)
    assert fast.keys() == reference.keys()
    for name in fast:
        assert torch.allclose(fast[name], reference[name], atol=1e-5, equal_nan=True), name
    assert fast["grad"].abs().max() > 1e-2  # not vacuous
    assert all(p.requires_grad for p in lm.model.parameters())  # the weights are given back their gradients


@pytest.mark.parametrize(("normalization", "positional"), [("LN", "standard"), ("RMS", "rotary")])
def test_total_effects_with_the_first_pass_clean_losses_equal_those_with_clean_rows(tok, normalization, positional):
    """Pass 2 takes the clean CE and final residuals from pass 1 (`loss_gradient`) instead of running a clean row
    beside the ablated ones. Both are the same float32 computations of the same numbers (the final residual row by
    row, the CE by `unembed_ce`), so the total and same-position ΔCE agree to float32 rounding of the summed CEs
    (measured: bit for bit). A sequence ends in BOS tokens, which a full clean run's TransformerLens cache would
    mask as padding unless told not to."""
    lm = make_model(tok, normalization, positional)
    tokens = make_tokens(tok, n_seq=3, length=24)
    tokens[1, -3:] = tok.bos_token_id
    engine = Downstream(lm, HOOK)
    eligible = eligible_positions(lm.regular_positions(tokens))
    found = loss_gradient(lm, HOOK, tokens, eligible, (engine.start_name, engine.final_name))
    full = engine.clean(tokens)
    assert torch.allclose(found[engine.final_name], full.final_resid, atol=1e-6)
    ce = found["ce"]
    assert ce[:, -1].isnan().all()
    assert torch.allclose(ce[:, :-1], lm.loss_per_token(tokens), atol=1e-5)
    run = engine.clean(tokens, found[engine.start_name])
    given = replace(run, ce=ce, final_resid=found[engine.final_name])
    g = torch.Generator().manual_seed(1)
    seq, pos = torch.tensor([0, 0, 1, 2, 2, 1, 0]), torch.tensor([1, 17, 5, 22, 0, 16, 3])
    delta = torch.randn(7, 32, generator=g)
    total, same, clean = engine.total_effects(run, seq, pos, delta, eligible)
    total_given, same_given, clean_given = engine.total_effects(given, seq, pos, delta, eligible)
    # At most 23 positions of CE ≈ 5 (float32 ulp 4.8e-7) enter a total.
    assert torch.allclose(total_given, total, atol=1e-5, rtol=0)
    assert torch.allclose(same_given, same, atol=1e-6, rtol=0)
    assert torch.allclose(clean_given.final, clean.final, atol=1e-6) and torch.allclose(clean_given.ce, clean.ce)
    assert total.abs().max() > 1e-2  # not vacuous


def test_top_n_replaying_the_ranking_pass_equals_running_pass_1_again(tok, monkeypatch):
    """`top:N` keeps the ranking pass's firings sparse and replays them for the statistics; with nothing kept (too
    large to keep), pass 1 runs the model again: the same dashboard."""
    import saelab.dashboard.compute as compute

    lm = make_model(tok)
    sae = TinySAE(32, 24, HOOK, seed=1)
    tokens = make_tokens(tok, n_seq=10, length=24)
    cfg = DashboardConfig(exact_firings=6, top_windows=2, min_firings=3, corr_tokens=1000, batch_size=3)
    kept = compute_dashboard(lm, sae, tokens, HOOK, features=compute.Top(4, [2]), cfg=cfg)
    monkeypatch.setattr(compute, "KEPT_BYTES", 0)
    again = compute_dashboard(lm, sae, tokens, HOOK, features=compute.Top(4, [2]), cfg=cfg)
    assert len(kept.latents) == 5
    assert kept.latents == again.latents
    assert {k: v for k, v in kept.meta.items() if k != "seconds"} == {
        k: v for k, v in again.meta.items() if k != "seconds"
    }
