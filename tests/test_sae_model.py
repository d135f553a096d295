"""The SAE architectures: the forward contract, the fused paths against the reference, the constraints."""

from __future__ import annotations

import pytest
import torch
from sae_helpers import one_thread  # noqa: F401  (autouse)

from saelab.errors import SaelabError
from saelab.sae.fast import block_rows, relu_l1_loss_and_grads, scatter_rows
from saelab.sae.model import ARCHITECTURES, SAEConfig, build_sae


def _perturbed_sae(architecture: str, dtype: str = "float32", d_in: int = 12, d_sae: int = 48, **kw):
    """An SAE whose weights are off their symmetric initialisation, so every term of the loss is non-trivial."""
    sae = build_sae(SAEConfig(architecture, d_in, d_sae, dtype=dtype, **kw), torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_contract_shapes_and_loss_parts(architecture: str) -> None:
    sae = _perturbed_sae(architecture, k=3)
    x = torch.randn(2, 5, 12)  # any leading dimensions
    out = sae(x, fast=False)
    assert out.x_hat.shape == (2, 5, 12)
    assert out.latents.shape == (2, 5, 48)
    assert out.fired.shape == (48,)
    assert torch.equal(out.fired, (out.latents != 0).reshape(-1, 48).sum(0))
    torch.testing.assert_close(out.loss, out.mse + out.sparsity + out.aux)
    torch.testing.assert_close(out.mse, (out.x_hat - x).pow(2).sum(-1).mean())
    if architecture not in ("batchtopk", "matryoshka_batchtopk"):  # their training latents depend on the batch
        torch.testing.assert_close(sae.encode(x), out.latents)
    torch.testing.assert_close(sae.decode(out.latents), out.x_hat)


def test_latents_follow_each_architecture_definition() -> None:
    x = torch.randn(64, 12)
    topk = _perturbed_sae("topk", k=3)
    latents = topk.encode(x)
    assert ((latents > 0).sum(-1) <= 3).all() and ((latents > 0).sum(-1) == 3).float().mean() > 0.5
    pre = topk.pre_activations(x)
    kept = latents > 0
    assert (pre[kept] >= pre.masked_fill(kept, -torch.inf).max(-1, keepdim=True).values.expand_as(pre)[kept]).all()

    jump = _perturbed_sae("jumprelu")
    with torch.no_grad():
        jump.threshold.fill_(0.3)
    pre, latents = jump.pre_activations(x), jump.encode(x)
    assert torch.equal(latents, torch.where(pre > 0.3, pre, 0.0))

    relu = _perturbed_sae("relu")
    assert torch.equal(relu.encode(x), torch.relu(relu.pre_activations(x)))


def test_batchtopk_keeps_k_per_token_on_average_and_becomes_a_jumprelu_in_eval() -> None:
    sae = _perturbed_sae("batchtopk", k=2.5)
    x = torch.randn(40, 12)
    out = sae(x, fast=False)
    assert int((out.latents > 0).sum()) == 100  # 2.5 × 40 over the batch, unevenly per token
    assert len(set((out.latents > 0).sum(-1).tolist())) > 1
    theta = float(sae.threshold[0])
    assert 0 < theta < float(out.latents[out.latents > 0].detach().min())  # EMA from 0 towards the smallest kept value
    sae.eval()
    pre = sae.pre_activations(x)
    assert torch.equal(sae.encode(x), torch.relu(pre) * (pre > theta))
    assert torch.equal(sae(x).latents, sae.encode(x)) and float(sae.threshold[0]) == theta  # no update in eval


def test_matryoshka_adds_the_error_of_every_nested_prefix_to_batchtopk() -> None:
    widths = (6, 20, 48)
    sae = _perturbed_sae("matryoshka_batchtopk", "float64", k=2.5, matryoshka_widths=widths)
    batchtopk = _perturbed_sae("batchtopk", "float64", k=2.5)  # the same weights: both start from seed 0 + noise
    x = torch.randn(40, 12, dtype=torch.float64)
    out, plain = sae(x, fast=False), batchtopk(x, fast=False)
    assert torch.equal(out.latents, plain.latents)  # the same batch-wide top-k over the whole dictionary
    torch.testing.assert_close(out.x_hat, plain.x_hat)
    torch.testing.assert_close(out.mse, plain.mse)
    latents, W_dec, b_dec = out.latents.detach(), sae.W_dec.detach(), sae.b_dec.detach()
    prefix_errors = [((latents[:, :w] @ W_dec[:w] + b_dec - x).pow(2).sum(-1).mean()) for w in widths[:-1]]
    torch.testing.assert_close(out.aux, sum(prefix_errors))  # no dead latents: no AuxK
    out.loss.backward()
    plain.loss.backward()
    # Latents past the last inner prefix appear only in the whole dictionary's error, as in BatchTopK; the
    # others also answer for the prefixes they belong to.
    torch.testing.assert_close(sae.W_dec.grad[20:], batchtopk.W_dec.grad[20:])
    assert not torch.allclose(sae.W_dec.grad[:20], batchtopk.W_dec.grad[:20])


def test_matryoshka_trains_on_the_loss_and_gradients_of_saelens_matryoshka() -> None:
    """SAELens 6's `MatryoshkaBatchTopKTrainingSAE.training_forward_pass` on the same weights and batch: the same
    latents, loss (its inner prefix errors plus the whole dictionary's error) and gradients. (With dead latents the
    AuxK terms differ slightly: saelab's, shared with TopK, takes the ReLU of the dead pre-activations, as
    EleutherAI's sparsify does; SAELens's takes them raw.)"""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    widths = (6, 20, 48)
    ours = _perturbed_sae("matryoshka_batchtopk", "float64", k=2.5, matryoshka_widths=widths)
    with torch.no_grad():
        ours.W_dec.div_(ours.W_dec.norm(dim=1, keepdim=True))  # unit rows: SAELens's decoder-norm rescaling is 1
    theirs = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(d_in=12, d_sae=48, k=2.5, matryoshka_widths=list(widths), dtype="float64")
    )
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(theirs, name).copy_(getattr(ours, name))
    x = torch.randn(40, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = ours(x, fast=False)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    reference = theirs.training_forward_pass(step)
    torch.testing.assert_close(out.latents, reference.feature_acts, rtol=1e-12, atol=1e-12)  # rows of norm 1 ± 1e-16
    assert torch.equal(out.latents != 0, reference.feature_acts != 0)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-12, atol=1e-12)
    assert set(reference.losses) == {
        "mse_loss",
        "auxiliary_reconstruction_loss",
        "inner_mse_loss_6",
        "inner_mse_loss_20",
    }
    out.loss.backward()
    reference.loss.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.threshold[0], theirs.topk_threshold)  # the same running threshold


def test_matryoshka_widths_default_and_validation() -> None:
    assert build_sae(SAEConfig("matryoshka_batchtopk", 4, 2048, k=4)).prefix_widths == (32, 128, 512, 2048)
    assert build_sae(SAEConfig("matryoshka_batchtopk", 4, 16, k=4)).prefix_widths == (1, 4, 16)
    with pytest.raises(SaelabError, match="end at d_sae = 48"):
        build_sae(SAEConfig("matryoshka_batchtopk", 4, 48, matryoshka_widths=(8, 24)))
    with pytest.raises(SaelabError, match="increase strictly"):
        build_sae(SAEConfig("matryoshka_batchtopk", 4, 48, matryoshka_widths=(24, 8, 48)))
    with pytest.raises(SaelabError, match="positive whole numbers"):
        build_sae(SAEConfig("matryoshka_batchtopk", 4, 48, matryoshka_widths=(0, 48)))
    with pytest.raises(SaelabError, match="applies to matryoshka_batchtopk, not topk"):
        build_sae(SAEConfig("topk", 4, 48, matryoshka_widths=(8, 48)))


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_fused_path_matches_reference_loss_and_gradients(architecture: str, dtype: str, with_dead: bool) -> None:
    sae = _perturbed_sae(architecture, dtype, k=5, sparsity_coefficient=0.7)
    x = torch.randn(300, 12, dtype=sae.W_enc.dtype)  # several row blocks of the fused loop
    dead = torch.rand(48, generator=torch.Generator().manual_seed(2)) < (0.5 if with_dead else 0.0)
    results = []
    for fast in (False, True):
        sae.zero_grad()
        out = sae(x, dead=dead, sparsity_scale=0.6, fast=fast)
        out.loss.backward()
        results.append((out, {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (ref, ref_grads), (fast, fast_grads) = results
    assert fast.latents is None  # the fused paths never build [tokens, d_sae]
    if with_dead and architecture == "topk":
        assert ref.aux > 0
    for name in ("loss", "mse", "sparsity", "aux", "x_hat"):
        torch.testing.assert_close(getattr(fast, name).detach(), getattr(ref, name).detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.fired, ref.fired)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_relu_runs_sparse_blocks_with_the_reference_loss_and_gradients(dtype: str) -> None:
    """A trained ReLU SAE fires few latents: those row blocks run sparse, and must still match the reference."""
    d_sae = 2048
    sae = _perturbed_sae("relu", dtype, d_in=16, d_sae=d_sae, sparsity_coefficient=0.7)
    rows = block_rows(d_sae)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2 * rows + 100, 16, generator=generator, dtype=sae.W_enc.dtype)
    with torch.no_grad():  # each latent fires on ~2 % of tokens, as in a trained SAE
        sae.b_enc -= sae.pre_activations(x).quantile(0.98, dim=0)
    x[:rows] *= 10  # but the first block is dense (~40 % active), so both kinds of block meet in one batch
    ref = sae.reference_forward(x)
    ref.loss.backward()
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    terms, grads = relu_l1_loss_and_grads(x, *(p.detach() for p in params), 0.7, apply_b_dec=True)

    assert terms["sparse_blocks"] == 2  # of 3
    latents = sae.encode(x).detach()
    assert 0.01 < (latents[rows:] > 0).float().mean() < 0.03
    assert torch.equal(terms["fired"], (latents > 0).sum(dim=0)) and torch.equal(terms["fired"], ref.fired)
    l1 = 0.7 * (latents * sae.W_dec.detach().norm(dim=1)).sum(dim=-1).mean()  # the norm-weighted L1, by hand
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == "float32" else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(terms["sparsity"], l1, **tolerance)
    torch.testing.assert_close(terms["sparsity"], ref.sparsity.detach(), **tolerance)
    torch.testing.assert_close(terms["mse"], ref.mse.detach(), **tolerance)
    torch.testing.assert_close(terms["x_hat"], ref.x_hat.detach(), **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, getattr(sae, name).grad, **tolerance, msg=f"gradient of {name}")


def test_aux_k_loss_trains_only_the_dead_latents() -> None:
    sae = _perturbed_sae("topk", k=3)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:10] = True
    out = sae(torch.randn(64, 12), dead=dead, fast=False)
    out.aux.backward()
    assert sae.W_dec.grad[:10].abs().sum() > 0 and not sae.W_dec.grad[10:].any()
    assert sae.W_enc.grad[:, :10].abs().sum() > 0 and not sae.W_enc.grad[:, 10:].any()


def test_fused_paths_are_used_only_while_training_with_gradients() -> None:
    sae = _perturbed_sae("relu")
    x = torch.randn(20, 12)
    assert sae(x).latents is None
    with torch.no_grad():
        assert sae(x).latents is not None
    sae.eval()
    assert sae(x).latents is not None


def test_sparse_helpers_match_dense_computations() -> None:
    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 20, (30, 4), generator=generator)
    weights, rows = torch.randn(30, 4, generator=generator), torch.randn(30, 7, generator=generator)
    dense = torch.zeros(30, 20).scatter_add_(1, indices, weights)  # repeated indices add up
    torch.testing.assert_close(scatter_rows(indices, weights, rows, 20), dense.T @ rows)

    sae = _perturbed_sae("topk", k=4)
    x = torch.randn(50, 12)
    values, indices = sae.sparse_encode(x)
    torch.testing.assert_close(torch.zeros(50, 48).scatter(1, indices, values), sae.encode(x))


def test_jumprelu_threshold_learns_through_the_straight_through_estimator() -> None:
    sae = _perturbed_sae("jumprelu", jumprelu_bandwidth=0.5, sparsity_coefficient=1.0)
    x = torch.randn(256, 12)
    out = sae(x)
    out.sparsity.backward()
    # the L0 penalty can only be lowered by raising thresholds, and reaches nothing else
    assert (sae.threshold.grad <= 0).all() and (sae.threshold.grad < 0).any()
    assert sae.W_enc.grad is None or not sae.W_enc.grad.any()


def test_gated_auxiliary_loss_leaves_the_decoder_alone() -> None:
    sae = _perturbed_sae("gated", apply_b_dec_to_input=False)  # else b_dec reaches the gate through x − b_dec
    out = sae(torch.randn(64, 12))
    assert out.aux > 0
    out.aux.backward()
    assert sae.W_dec.grad is None and sae.b_dec.grad is None
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_decoder_constraint_and_input_scale_folding(architecture: str) -> None:
    sae = _perturbed_sae(architecture, k=3)
    sae.eval()
    x = torch.randn(32, 12)
    sae(x, fast=False).loss.backward()
    sae.project_gradients()
    if sae.unit_norm_decoder:
        sae.project_parameters()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
        radial = (sae.W_dec.grad * sae.W_dec).sum(dim=1)  # after projection, no gradient along the rows
        torch.testing.assert_close(radial, torch.zeros(48), atol=1e-5, rtol=0)
    latents, x_hat = sae.encode(3.0 * x), sae.decode(sae.encode(3.0 * x))
    sae.fold_input_scale(3.0)
    torch.testing.assert_close(sae.encode(x), latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat / 3.0, atol=1e-5, rtol=1e-5)


def test_bad_configs_and_inputs_are_one_line_errors() -> None:
    with pytest.raises(SaelabError, match="unknown architecture 'vanilla'"):
        build_sae(SAEConfig("vanilla", 4, 8))
    with pytest.raises(SaelabError, match="fractional"):
        build_sae(SAEConfig("topk", 4, 8, k=2.5))
    with pytest.raises(SaelabError, match="exceeds d_sae"):
        build_sae(SAEConfig("topk", 4, 8, k=9))
    with pytest.raises(SaelabError, match="d_sae must be a positive integer"):
        build_sae(SAEConfig("relu", 4, 0))
    sae = build_sae(SAEConfig("relu", 4, 8))
    with pytest.raises(SaelabError, match=r"shape \(3, 5\).*d_in = 4"):
        sae(torch.randn(3, 5))
    with pytest.raises(SaelabError, match="floating-point"):
        sae.encode(torch.ones(3, 4, dtype=torch.long))
