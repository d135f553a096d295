"""Fused training kernels for the ReLU and TopK SAEs, on plain tensors; `tests/test_sae_model.py` holds the
architectures' fused paths built from them (`saelab.sae.model`) to the reference.

ReLU + L1: the loss and all four gradients are computed in one sweep over row blocks of the batch, so the
`[tokens, d_sae]` latents never exist as a whole (each block stays in cache) and the work is the five dense
matrix products of the step — encoder, decoder, the decoder's transpose, and the two weight gradients — with
no elementwise pass repeated by autograd. A block whose latents are sparse (a trained SAE fires a few percent)
runs all but the encoder product on the active latents only, at O(active) cost per token instead of O(d_sae).
The gradients are attached to the loss for `loss.backward()`.

TopK: the encoder runs block by block with top-k taken on each block (a fused top-k encoder), keeping only
`[tokens, k]` values and indices. The decoder is sparse (`embedding_bag`), and the encoder's backward touches
only the k selected columns of W_enc per token, so past the one dense encoder product the step costs O(k) per
token instead of O(d_sae).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per block: a [rows, d_sae] float32 block of 8 MiB stays in L3 cache (measured: 2 to 8 MiB all do well).
BLOCK_ELEMENTS = 1 << 21


# A ReLU row block whose latents are at most this fraction non-zero runs sparse. Measured at d_in 256, d_sae 4096,
# the sparse block costs as much as the dense one at ≈ 14 % active on one thread and ≈ 9 % on two (dense products
# use both cores better); a trained SAE sits at 1–3 % and a fresh one at ~50 %, far on either side.
SPARSE_BELOW = 0.1


def block_rows(d_sae: int) -> int:
    return max(16, BLOCK_ELEMENTS // d_sae)


def fused_paths_apply(x: Tensor) -> bool:
    """Whether the fused paths suit a batch `x`; elsewhere the plain reference runs."""
    if x.device.type != "cpu":
        return False  # CPU paths: on an H100 the plain whole-batch products ran 2-3x faster than these
    return x.dtype in (torch.float32, torch.float64)  # block-wise sums in half precision would drift


class _AttachGradients(torch.autograd.Function):
    """Return `loss` unchanged; its backward hands out gradients that were computed in the forward pass."""

    @staticmethod
    def forward(ctx: Any, loss: Tensor, grads: tuple[Tensor, ...], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Any, ...]:
        return (None, None, *(grad * grad_loss for grad in ctx.grads))


def attach_gradients(loss: Tensor, grads: tuple[Tensor, ...], params: tuple[Tensor, ...]) -> Tensor:
    """`loss`, whose backward gives each of `params` its precomputed gradient from `grads`."""
    return _AttachGradients.apply(loss, grads, *params)


# --- ReLU + L1 -------------------------------------------------------------------------------------------------


@torch.no_grad()
def relu_l1_loss_and_grads(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    coefficient: float,
    apply_b_dec: bool,
    target: Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Loss terms, x̂, fire counts and gradients of ReluSAE's training loss on `x [tokens, d_in]`.

    The error is measured against `target [tokens, d_out]` (default x): a transcoder's target is another activation.

    loss = (1/T) Σₜ ‖x̂ₜ − xₜ‖² + (λ/T) Σₜ Σᵢ fₜᵢ nᵢ with f = ReLU(x_in W_enc + b_enc), nᵢ = ‖W_dec,ᵢ‖. Per block:
        g_x̂ = (2/T)(x̂ − x)                  ∂loss/∂x̂           [rows, d_in]
        g_pre = 1[f > 0] ⊙ (g_x̂ W_decᵀ + (λ/T) n)                  [rows, d_sae]
        ∇W_dec += fᵀ g_x̂,  ∇W_enc += x_inᵀ g_pre,  ∇b_enc += Σ g_pre,  ∇b_dec += Σ g_x̂
    then ∇b_dec −= W_enc ∇b_enc (b_dec is subtracted from the input) and ∇W_dec gains the L1's (λ/T)(Σₜ fₜᵢ) W_dec,ᵢ/nᵢ.

    Only the encoder product needs every latent. A block where few latents fire (a trained SAE fires a few
    percent) does the rest on the non-zero entries of f alone — x̂, ∇W_dec and ∇W_enc as sparse × dense products,
    g_pre only where f > 0 (a sampled dense-dense product, SDDMM) — so they cost O(active) instead of O(d_sae).
    """
    tokens, d_sae = x.shape[0], W_enc.shape[1]
    norms = W_dec.norm(dim=1)
    l1_grad = norms * (coefficient / tokens)  # ∂(L1 term)/∂f, the same for every token
    sums = {name: torch.zeros_like(p) for name, p in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec))}
    sums["b_dec"] = torch.zeros_like(b_dec)
    sums["W_enc_t"] = torch.zeros_like(W_enc.t())  # sparse blocks' ∇W_enc comes out transposed, [d_sae, d_in]
    sums["latents"] = x.new_zeros(d_sae, dtype=torch.float64)  # Σₜ fₜᵢ
    sums["fired"] = x.new_zeros(d_sae, dtype=torch.float64)
    squared_error = x.new_zeros((), dtype=torch.float64)
    target = x if target is None else target
    x_hat = torch.empty_like(target)
    sparse_blocks = 0
    rows = block_rows(d_sae)
    for start in range(0, tokens, rows):
        xs, x_hat_block = x[start : start + rows], x_hat[start : start + rows]
        x_in = xs - b_dec if apply_b_dec else xs
        latents = torch.addmm(b_enc, x_in, W_enc).relu_()
        sparse = bool(torch.count_nonzero(latents) <= SPARSE_BELOW * latents.numel())
        if sparse:
            by_token, by_latent, latent = nonzero_both_ways(latents)
            torch.add(sparse_decode(by_token, W_dec), b_dec, out=x_hat_block)
        else:
            torch.addmm(b_dec, latents, W_dec, out=x_hat_block)
        error = x_hat_block - target[start : start + rows]
        squared_error += error.pow(2).sum()
        grad_x_hat = error.mul_(2 / tokens)
        sums["b_dec"] += grad_x_hat.sum(dim=0)
        if sparse:
            relu_l1_sparse_backward(by_latent, latent, x_in, grad_x_hat, W_dec, l1_grad, sums)
        else:
            relu_l1_dense_backward(latents, x_in, grad_x_hat, W_dec, l1_grad, sums)
        sparse_blocks += sparse
    grads = {name: sums[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sparse_blocks:
        grads["W_enc"] += sums["W_enc_t"].t()
    if apply_b_dec:
        grads["b_dec"] -= W_enc @ grads["b_enc"]
    latent_sums = sums["latents"].to(x.dtype)
    grads["W_dec"] += W_dec * (latent_sums * (coefficient / tokens) / norms.clamp_min(1e-12))[:, None]
    terms = {
        "mse": (squared_error / tokens).to(x.dtype),
        "sparsity": coefficient * (latent_sums @ norms) / tokens,
        "x_hat": x_hat,
        "fired": sums["fired"].long(),
        "sparse_blocks": sparse_blocks,
    }
    return terms, grads


def relu_l1_dense_backward(
    latents: Tensor, x_in: Tensor, grad_x_hat: Tensor, W_dec: Tensor, l1_grad: Tensor, sums: dict[str, Tensor]
) -> None:
    """Add one block's gradients and statistics into `sums`, from dense `latents [rows, d_sae]` and g_x̂."""
    sums["W_dec"].addmm_(latents.t(), grad_x_hat)
    # ReLU's backward (zero the gradient where the latent is 0), fused into one pass
    grad_pre = torch.ops.aten.threshold_backward(torch.addmm(l1_grad, grad_x_hat, W_dec.t()), latents, 0.0)
    sums["W_enc"].addmm_(x_in.t(), grad_pre)
    sums["b_enc"] += grad_pre.sum(dim=0)
    # Column sums in the working dtype, running totals in float64. sign() of a ReLU output marks where it
    # fired; it is one vectorised pass, where building a boolean mask costs several times more.
    sums["latents"] += latents.sum(dim=0)
    sums["fired"] += latents.sign().sum(dim=0)


def sparse_decode(by_token: Tensor, W_dec: Tensor) -> Tensor:
    """f W_dec `[rows, d_in]` for CSR f `[rows, d_sae]`: per token, the sum of its active W_dec rows, weighted.

    `embedding_bag` does exactly this and measured faster than the CSR × dense product of MKL.
    """
    latents, bags, weights = by_token.col_indices(), by_token.crow_indices(), by_token.values()
    return F.embedding_bag(latents, W_dec, bags, mode="sum", per_sample_weights=weights, include_last_offset=True)


def relu_l1_sparse_backward(
    by_latent: Tensor,
    latent: Tensor,
    x_in: Tensor,
    grad_x_hat: Tensor,
    W_dec: Tensor,
    l1_grad: Tensor,
    sums: dict[str, Tensor],
) -> None:
    """The same from fᵀ as CSR `by_latent [d_sae, rows]`, with `latent [active]` the latent of each of its entries.

    Working on fᵀ keeps each product in the layout its kernel is fast in: fᵀ g_x̂ and g_preᵀ x_in are CSR × dense
    (MKL), and the SDDMM takes whole rows of W_dec.
    """
    sums["W_dec"].addmm_(by_latent, grad_x_hat)
    grad_pre_t = torch.sparse.sampled_addmm(by_latent, W_dec, grad_x_hat.t(), beta=0.0)  # (g_x̂ W_decᵀ)ᵀ where f > 0
    grad_pre_t.values().add_(l1_grad[latent])
    sums["W_enc_t"].addmm_(grad_pre_t, x_in)
    sums["b_enc"].index_add_(0, latent, grad_pre_t.values())
    sums["latents"].index_add_(0, latent, by_latent.values().double())
    sums["fired"] += by_latent.crow_indices().diff()


def nonzero_both_ways(latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The non-zero entries of `latents [rows, d_sae]` as CSR by token `[rows, d_sae]` and by latent `[d_sae, rows]`.

    Also returns the latent of each by-latent entry, `[active]`. One `nonzero` pass over the block and a sort of
    the active entries build both; `Tensor.to_sparse_csr` measured several times slower.
    """
    rows, d_sae = latents.shape
    token, latent = torch.nonzero(latents, as_tuple=True)  # in token order
    values = latents[token, latent]
    by_token = csr_tensor(offsets(token, rows), latent, values, (rows, d_sae))
    latent, order = torch.sort(latent, stable=True)  # stable: each latent's tokens stay in order
    by_latent = csr_tensor(offsets(latent, d_sae), token[order], values[order], (d_sae, rows))
    return by_token, by_latent, latent


def offsets(sorted_index: Tensor, n: int) -> Tensor:
    """CSR row offsets `[n + 1]` of entries whose row indices `sorted_index` ascend."""
    return torch.searchsorted(sorted_index, torch.arange(n + 1, device=sorted_index.device))


def csr_tensor(row_offsets: Tensor, columns: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # the kernels used here are stable; torch flags the whole CSR layout as beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(row_offsets, columns, values, size, check_invariants=False)


# --- TopK ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def topk_encode(
    x_in: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead: Tensor | None = None, aux_k: int = 0
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-k pre-activations of each token, block by block: values and indices `[tokens, k]`.

    With a `dead [d_sae]` mask and `aux_k` > 0, also the top `aux_k` pre-activations among dead latents (AuxK).
    Values are pre-activations (not yet ReLU'd), as the straight-through encoder gradient needs them.
    """
    tokens = x_in.shape[0]
    values = x_in.new_empty(tokens, k)
    indices = torch.empty(tokens, k, dtype=torch.long, device=x_in.device)
    aux = aux_k > 0 and dead is not None
    aux_values = x_in.new_empty(tokens, aux_k) if aux else None
    aux_indices = torch.empty(tokens, aux_k, dtype=torch.long, device=x_in.device) if aux else None
    rows = block_rows(W_enc.shape[1])
    for start in range(0, tokens, rows):
        block = slice(start, start + rows)
        pre = torch.addmm(b_enc, x_in[block], W_enc)
        torch.topk(pre, k, dim=1, sorted=False, out=(values[block], indices[block]))
        if aux:
            pre.masked_fill_(~dead, -torch.inf)
            torch.topk(pre, aux_k, dim=1, sorted=False, out=(aux_values[block], aux_indices[block]))
    return values, indices, aux_values, aux_indices


def scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, n: int) -> Tensor:
    """out [n, d] with out[indices[t, j]] += weights[t, j] · rows[t], without building a [tokens, k, d] tensor."""
    tokens, k = indices.shape
    token_of = torch.arange(tokens, device=rows.device).repeat_interleave(k)
    coords = torch.stack([indices.flatten(), token_of])
    matrix = torch.sparse_coo_tensor(coords, weights.flatten(), (n, tokens), check_invariants=False)
    return torch.sparse.mm(matrix, rows)


class _SparseEncoderGrad(torch.autograd.Function):
    """Selected pre-activations `[tokens, k]` (computed without a graph) with the encoder's sparse backward.

    pre[t, j] = x_in[t] · W_enc[:, idx[t, j]] + b_enc[idx[t, j]], so its gradient reaches only the k selected
    columns of W_enc per token, instead of a dense [tokens, d_sae] matrix times x_in.
    """

    @staticmethod
    def forward(ctx: Any, values: Tensor, x_in: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(x_in, W_enc, indices)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        x_in, W_enc, indices = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_W_enc = scatter_rows(indices, grad, x_in, d_sae).T if ctx.needs_input_grad[2] else None
        grad_b_enc = grad.new_zeros(d_sae).index_add_(0, indices.flatten(), grad.flatten())
        grad_x_in = None
        if ctx.needs_input_grad[1]:
            grad_x_in = F.embedding_bag(indices, W_enc.T.contiguous(), per_sample_weights=grad, mode="sum")
        return None, grad_x_in, grad_W_enc, grad_b_enc, None


def topk_train_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    apply_b_dec: bool,
    dead: Tensor | None = None,
    aux_k: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """A TopK SAE's training forward on `x [tokens, d_in]`, with gradients reaching only the selected latents.

    Returns x̂ `[tokens, d_in]`, the kept latents as values and indices `[tokens, k]`, and, with `aux_k` > 0 and a
    `dead [d_sae]` mask, the decoded top-`aux_k` dead latents `[tokens, d_in]` (no b_dec) for the AuxK loss.
    """
    x_in = x - b_dec if apply_b_dec else x
    pre, indices, aux_pre, aux_indices = topk_encode(x_in.detach(), W_enc, b_enc, k, dead, aux_k)
    values = _SparseEncoderGrad.apply(pre, x_in, W_enc, b_enc, indices).relu()
    x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
    aux_x_hat = None
    if aux_pre is not None and aux_k > 0:
        aux_values = _SparseEncoderGrad.apply(aux_pre, x_in, W_enc, b_enc, aux_indices).relu()
        aux_x_hat = F.embedding_bag(aux_indices, W_dec, per_sample_weights=aux_values, mode="sum")
    return x_hat, values, indices, aux_x_hat
