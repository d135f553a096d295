"""Dashboards of a transcoder: a latent's activation is read at the MLP's input, and its loss effects are those of
removing its contribution a · W_dec[j] from the MLP's output, checked against brute-force forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dashboard_helpers import (
    brute_acts,
    brute_dce,
    brute_joint_total,
    brute_losses,
    close,
    counted,
    make_model,
    make_tokenizer,
    make_tokens,
    one_thread,  # noqa: F401  (autouse)
)

from saelab.dashboard.compute import DashboardConfig, compute_dashboard, eligible_positions
from saelab.dashboard.live import PromptAnalyzer
from saelab.errors import SaelabError
from saelab.sae.model import SAEConfig, build_sae

HOOK_IN, HOOK_OUT = "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return make_model(tok)


@pytest.fixture(scope="module")
def tokens(tok):
    return make_tokens(tok, n_seq=10, length=24)


@pytest.fixture(scope="module")
def transcoder():
    """A skip transcoder from the layer-0 MLP's input to its output, its latents firing on some tokens each."""
    tc = build_sae(SAEConfig("relu", 32, 12, d_out=32, skip=True), torch.Generator().manual_seed(0)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in tc.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
        tc.W_dec.mul_(3.0)  # contributions large enough that their loss effects are far from rounding
    tc.metadata = {"hook_name": HOOK_IN, "hook_name_out": HOOK_OUT}
    return tc


@pytest.fixture(scope="module")
def board(lm, transcoder, tokens):
    cfg = DashboardConfig(exact_firings=10_000, top_windows=3, windows_per_interval=1, context_before=5)
    return compute_dashboard(lm, transcoder, tokens, features=[0, 1, 2, 3], cfg=cfg)


def test_transcoder_pages_read_the_mlp_input_and_remove_contributions_from_its_output(board, lm, transcoder, tokens):
    assert board.meta["hook"] == HOOK_OUT and board.meta["hook_in"] == HOOK_IN
    elig = eligible_positions(tokens != lm.bos_token_id)
    all_acts = torch.stack([brute_acts(lm, transcoder, row, HOOK_IN) for row in tokens])
    checked = 0
    for page in board.latents:
        j = page["id"]
        for window in page["windows"]["top"][:2]:
            row = tokens[window["seq"]]
            for i, (a, loss) in enumerate(zip(window["acts"], window["loss"], strict=True)):
                p = window["start"] + i
                assert close(a, all_acts[window["seq"], p, j].item(), 1e-4)
                if loss is not None:  # same-position ΔCE of removing a · W_dec[j] from the MLP output there
                    assert close(loss, brute_dce(lm, transcoder, row, p, j, HOOK_OUT, a=all_acts[window["seq"], p, j]))
                    checked += 1
        acts = all_acts[..., j]  # importance: the mean exact total ΔCE over every firing
        s, p = ((acts > 0) & elig).nonzero(as_tuple=True)
        totals = [
            brute_joint_total(lm, tokens[a], [int(b)], [acts[a, b] * transcoder.W_dec[j].detach()], HOOK_OUT)
            for a, b in zip(s, p, strict=True)
        ]
        assert page["importance"]["firings"] == len(totals) > 0
        assert close(page["importance"]["per_firing"]["mean"], float(np.mean(totals)), 1e-4)
    assert checked >= 8


def test_transcoder_gradient_attribution_is_the_derivative_along_the_decoder_row_at_the_mlp_output(
    board, lm, transcoder, tokens
):
    """The pages' estimate −a · W_dec[j] · ∂L/∂y at the MLP output y, against plain autograd of the next-token loss
    summed over the sequence's counted positions (float32 finite differences are too noisy here to resolve 1e-3)."""
    checked = 0
    for page in board.latents:
        j = page["id"]
        for window in page["windows"]["top"][:2]:
            row, p = tokens[window["seq"]], window["start"] + window["center"]
            grad, a = window["grad"][window["center"]], window["acts"][window["center"]]
            if grad is None or not counted(lm, row)[p]:
                continue
            found = {}

            def leaf(y, hook, found=found):
                found["y"] = y.detach().requires_grad_(True)
                return found["y"]

            with torch.enable_grad():
                (brute_losses(lm, row, [(HOOK_OUT, leaf)]) * counted(lm, row)).sum().backward()
            expected = -a * float(found["y"].grad[0, p].double() @ transcoder.W_dec[j].detach().double())
            assert abs(grad - expected) <= 2e-4 * max(1.0, abs(expected))
            checked += 1
    assert checked >= 3


def test_live_view_of_a_transcoder_matches_the_reference(lm, transcoder):
    analyzer = PromptAnalyzer(lm, transcoder, HOOK_OUT, max_latents=4)  # the site records the hook it writes
    result = analyzer.analyze("for i in range(10):\n    print(i)")
    ids = torch.tensor(result["ids"])
    pairs = [(p, f) for p, fs in enumerate(result["firing"]) for f in fs if f[2] is not None]
    assert len(pairs) > 5
    acts = brute_acts(lm, transcoder, ids, HOOK_IN)
    for p, (latent, a, dce, _) in pairs[:: max(1, len(pairs) // 5)]:
        assert close(a, acts[p, latent].item(), 1e-4)
        assert close(dce, brute_dce(lm, transcoder, ids, p, latent, HOOK_OUT, a=acts[p, latent]), 1e-3)
    with pytest.raises(SaelabError, match="is neither"):
        PromptAnalyzer(lm, transcoder, "blocks.1.hook_resid_post")
