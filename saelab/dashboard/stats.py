"""Per-latent statistics gathered in one streaming pass over a token set, batched over latents.

`StatsAccumulator.update` sees the activations `[seq, pos, d_sae]` of one batch of sequences and keeps, for every
selected latent, state of a fixed size (nothing grows with the number of tokens except the optional sparse copy
used for correlations):

- firing count, sum, sum of squares and maximum;
- a histogram of the non-zero activations on fixed log-spaced bins (`BINS_PER_DECADE` per decade), for the page's
  plot (quantiles are read from the activations themselves, kept in the sparse copy below);
- per context (sequence), the eligible firings and the sum of their cheap total-ΔCE estimates (gradient
  attribution), which the importance estimator corrects with exact values (`saelab.dashboard.importance`); and
  the same sums over every latent of the SAE, which rank the whole SAE;
- top-activation candidates: the maximum of each chunk of `window` positions, so two candidates of one sequence
  are a window apart; the best `top_candidates` are kept, and `finish` drops the ones whose windows overlap a
  better one;
- a uniform sample (without replacement) of the positions where the latent fires: every token gets one random key
  and each latent keeps the `sample_size` firing positions with the smallest keys (a bottom-k sample). Keys are
  independent of activations, so the sample is unbiased; it feeds the importance estimate and the quantile windows.
- a sparse copy of the selected latents' non-zero activations and their attributions (16 bytes each), so the
  second pass can read them around any window without running the SAE again;
- for correlations, a sparse copy of all latents' activations on a random subset of tokens.

Positions are addressed by a flat token index `seq · T + pos` into the token set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LOG10_LO, LOG10_HI = -5, 5  # histogram range of activation magnitudes; values outside land in the end bins
BINS_PER_DECADE = 50
N_BINS = (LOG10_HI - LOG10_LO) * BINS_PER_DECADE


def bin_edges() -> Tensor:
    """[N_BINS + 1] edges of the log-spaced activation histogram."""
    return torch.logspace(LOG10_LO, LOG10_HI, N_BINS + 1, dtype=torch.float64)


@dataclass
class LatentStats:
    """Everything the streaming pass learned; tensors are [n_latents] or [k, n_latents] (one column per latent)."""

    n_tokens: int  # positions counted (special tokens excluded)
    count: Tensor  # [L] int64 positions where the latent fires
    act_sum: Tensor  # [L] float64
    max_act: Tensor  # [L]
    hist: Tensor  # [L, N_BINS] int64
    top_values: Tensor  # [K, L] best non-overlapping windows' centre activations, descending; 0 where none
    top_index: Tensor  # [K, L] their flat token indices
    sample_values: Tensor  # [R, L] uniform sample of firing positions; NaN where the latent fired fewer times
    sample_index: Tensor  # [R, L] flat token indices, -1 where empty
    sample_pool: Tensor  # [L] how many positions the sample was drawn from (eligible firing positions)
    context_estimate: Tensor  # [S, L] float64 per context: sum of the cheap total-ΔCE estimate over eligible firings
    context_count: Tensor  # [S, L] int64 per context: eligible firings
    context_tokens: Tensor  # [S] int64 per context: counted tokens
    rank_estimate: Tensor  # [d_sae] float64 every latent of the SAE: sum of the cheap estimate over eligible firings
    rank_count: Tensor  # [d_sae] int64 ... and how many there were
    correlations: tuple[Tensor, Tensor] | None  # ([L, n], [L, n]) most correlated latents (ids into the SAE), r
    store_keys: Tensor  # [nnz] sorted latent · n_positions + flat token index of every non-zero activation
    store_values: Tensor  # [nnz]
    store_estimate: Tensor  # [nnz] cheap total-ΔCE estimate at each of them (NaN when none was computed)
    n_positions: int

    def density(self) -> Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    def quantiles(self, qs: list[float]) -> Tensor:
        """[L, len(qs)] quantiles of each latent's non-zero activations: the ⌈q·n⌉-th smallest of its n firings
        (the smallest for q = 0), read from the activations themselves; NaN where the latent never fired."""
        latent = self.store_keys // self.n_positions
        order = torch.sort(self.store_values, stable=True).indices
        order = order[torch.sort(latent[order], stable=True).indices]  # by latent, then by value
        values = self.store_values[order].double()
        count = torch.bincount(latent, minlength=len(self.count))
        start = count.cumsum(0) - count
        q = torch.tensor(qs, dtype=torch.float64)
        rank = (torch.ceil(q[None] * count[:, None]) - 1).clamp(min=0).long()  # [L, len(qs)]
        rank = torch.minimum(rank, (count[:, None] - 1).clamp(min=0))
        at = (start[:, None] + rank).clamp(max=max(len(values) - 1, 0))
        out = values[at] if len(values) else torch.zeros(len(count), len(qs), dtype=torch.float64)
        out[count == 0] = float("nan")
        return out

    def _lookup(self, latent: Tensor, index: Tensor, table: Tensor, missing: float) -> Tensor:
        keys = latent * self.n_positions + index
        if len(self.store_keys) == 0:
            return torch.full(keys.shape, missing)
        at = torch.searchsorted(self.store_keys, keys.reshape(-1)).clamp(max=len(self.store_keys) - 1)
        values = torch.where(self.store_keys[at] == keys.reshape(-1), table[at], missing)
        return values.reshape(keys.shape)

    def estimate(self, latent: Tensor, index: Tensor) -> Tensor:
        """Cheap total-ΔCE estimates at (column `latent`, flat token index) pairs; NaN where the latent did not
        fire."""
        return self._lookup(latent, index, self.store_estimate, float("nan"))

    def activation(self, latent: Tensor, index: Tensor) -> Tensor:
        """Activations at (column `latent`, flat token index) pairs (broadcast); 0 where the latent did not fire."""
        return self._lookup(latent, index, self.store_values, 0.0)


class StatsAccumulator:
    """Streams batches of latent activations into `LatentStats` (see the module docstring)."""

    def __init__(
        self,
        latents: Tensor,
        d_sae: int,
        n_sequences: int,
        seq_len: int,
        window: int,
        top_candidates: int,
        sample_size: int,
        corr_tokens: int,
        generator: torch.Generator,
    ) -> None:
        self.latents = latents  # [L] ids of the latents to describe
        self.d_sae = d_sae
        self.T = seq_len
        self.window = window
        L = len(latents)
        self.n_tokens = 0
        self.count = torch.zeros(L, dtype=torch.int64)
        self.act_sum = torch.zeros(L, dtype=torch.float64)
        self.max_act = torch.zeros(L)
        self.hist = torch.zeros(L, N_BINS, dtype=torch.int64)
        self.top_values = torch.zeros(top_candidates, L)
        self.top_index = torch.full((top_candidates, L), -1, dtype=torch.int64)
        self.sample_keys = torch.full((sample_size, L), math.inf, dtype=torch.float64)
        self.sample_values = torch.full((sample_size, L), float("nan"))
        self.sample_index = torch.full((sample_size, L), -1, dtype=torch.int64)
        self.sample_pool = torch.zeros(L, dtype=torch.int64)
        self.context_estimate = torch.zeros(n_sequences, L, dtype=torch.float64)
        self.context_count = torch.zeros(n_sequences, L, dtype=torch.int64)
        self.context_tokens = torch.zeros(n_sequences, dtype=torch.int64)
        self.rank_estimate = torch.zeros(d_sae, dtype=torch.float64)
        self.rank_count = torch.zeros(d_sae, dtype=torch.int64)
        n = n_sequences * seq_len
        self.keys = torch.rand(n, generator=generator, dtype=torch.float64)  # [n_tokens] sample keys
        corr_fraction = min(1.0, corr_tokens / max(n, 1))
        self.corr_rows = torch.rand(n, generator=generator) < corr_fraction if corr_tokens > 0 else None
        self._corr: list = []  # scipy CSR blocks [kept tokens, d_sae]
        self._n_corr = 0
        self.n_positions = n
        self._store: list[tuple[Tensor, Tensor, Tensor]] = []

    @torch.no_grad()
    def update(
        self,
        acts: Tensor,
        first_seq: int,
        valid: Tensor,
        eligible: Tensor,
        estimate: Tensor | None = None,
        nonzero: Tensor | None = None,
    ) -> None:
        """acts [S, T, d_sae] of sequences first_seq.. ; valid [S, T]: positions to count (not special tokens);
        eligible [S, T]: positions that may enter the sample (valid, with a valid next token); estimate [nnz]: a
        cheap estimate of the latent's total ΔCE at each non-zero activation (None: not computed), whose flat
        indices into acts (row-major, ascending, as `flat_nonzero` finds them) are `nonzero` (None: found here)."""
        acts = acts.float().cpu().contiguous()
        valid, eligible = valid.cpu(), eligible.cpu()
        base = first_seq * self.T
        S, D = acts.shape[0], acts.shape[-1]
        self.context_tokens[first_seq : first_seq + S] = valid.sum(1)
        nonzero = flat_nonzero(acts) if nonzero is None else nonzero.cpu()
        if estimate is not None:
            estimate = estimate.float().cpu()
            at_token, at_latent = nonzero // D, nonzero % D
            firing = (acts.view(-1)[nonzero] > 0) & eligible.reshape(-1)[at_token]
            self.rank_estimate.index_add_(0, at_latent[firing], estimate[firing].double())
            self.rank_count += torch.bincount(at_latent[firing], minlength=D)
        if self.corr_rows is not None:
            self._keep_for_correlation(acts, valid, base, nonzero)
        a = acts[..., self.latents] * valid[..., None]  # [S, T, L]; special tokens count as not firing
        self.n_tokens += int(valid.sum())
        fires = a > 0
        self.count += fires.sum((0, 1))
        self.act_sum += a.sum((0, 1), dtype=torch.float64)
        self.max_act = torch.maximum(self.max_act, a.amax((0, 1)))

        L = len(self.latents)
        index = flat_nonzero(a)  # into [S · T, L]
        tok, lat = index // L, index % L
        values = a.view(-1)[index]
        bins = ((values.double().log10() - LOG10_LO) * BINS_PER_DECADE).floor().long().clamp(0, N_BINS - 1)
        self.hist.view(-1).index_add_(0, lat * N_BINS + bins, torch.ones_like(bins))

        if estimate is not None:  # the selected latents' firings are among the non-zeros: find each one's estimate
            est = estimate[torch.searchsorted(nonzero, tok * D + self.latents[lat])]
        else:
            est = torch.full_like(values, float("nan"))
        self._store.append((lat * self.n_positions + tok + base, values, est))
        self._update_top(a, base)
        ok = eligible.reshape(-1)[tok]
        context = first_seq + tok[ok] // self.T
        self.context_count.view(-1).index_add_(0, context * L + lat[ok], torch.ones_like(context))
        self.context_estimate.view(-1).index_add_(0, context * L + lat[ok], est[ok].double())
        self._update_sample(tok[ok] + base, lat[ok], values[ok])

    def _update_top(self, a: Tensor, base: int) -> None:
        S, T, L = a.shape
        c = self.window
        padded = F.pad(a, (0, 0, 0, (-T) % c))  # [S, T', L]
        chunk_max, arg = padded.view(S, -1, c, L).max(dim=2)  # [S, n_chunks, L]
        starts = torch.arange(S)[:, None, None] * self.T + torch.arange(chunk_max.shape[1])[None, :, None] * c
        index = (base + starts + arg).reshape(-1, L)
        values = torch.cat([self.top_values, chunk_max.reshape(-1, L)])
        indices = torch.cat([self.top_index, index])
        best, order = values.topk(self.top_values.shape[0], dim=0)
        self.top_values, self.top_index = best, indices.gather(0, order)

    def _update_sample(self, index: Tensor, lat: Tensor, values: Tensor) -> None:
        """Merge this batch's firing positions into each latent's bottom-k-keys sample."""
        R, L = self.sample_keys.shape
        self.sample_pool += torch.bincount(lat, minlength=L)
        keys = self.keys[index]
        order = (lat.double() * 2 + keys).argsort()  # by latent, then key
        index, lat, keys, values = index[order], lat[order], keys[order], values[order]
        counts = torch.bincount(lat, minlength=L)
        rank = torch.arange(len(lat)) - (counts.cumsum(0) - counts)[lat]
        keep = rank < R
        new_keys = torch.full((R, L), math.inf, dtype=torch.float64)
        new_index = torch.full((R, L), -1, dtype=torch.int64)
        new_values = torch.full((R, L), float("nan"))
        new_keys[rank[keep], lat[keep]] = keys[keep]
        new_index[rank[keep], lat[keep]] = index[keep]
        new_values[rank[keep], lat[keep]] = values[keep]
        all_keys = torch.cat([self.sample_keys, new_keys])
        self.sample_keys, order = all_keys.topk(R, dim=0, largest=False)
        self.sample_index = torch.cat([self.sample_index, new_index]).gather(0, order)
        self.sample_values = torch.cat([self.sample_values, new_values]).gather(0, order)

    def _keep_for_correlation(self, acts: Tensor, valid: Tensor, base: int, nonzero: Tensor) -> None:
        from scipy import sparse

        S, T, D = acts.shape
        rows = self.corr_rows[base : base + S * T] & valid.reshape(-1)
        index = nonzero[rows[nonzero // D]]  # tokens left out keep an empty row, which adds nothing to the sums
        tok, lat = index // D, index % D
        indptr = F.pad(torch.bincount(tok, minlength=S * T).cumsum(0), (1, 0))
        values = acts.view(-1)[index]
        self._corr.append(sparse.csr_matrix((values.numpy(), lat.numpy(), indptr.numpy()), shape=(S * T, D)))
        self._n_corr += int(rows.sum())

    def finish(self, top_k: int, n_correlated: int) -> LatentStats:
        top_values, top_index = non_overlapping(self.top_values, self.top_index, self.T, self.window, top_k)
        keys = torch.cat([k for k, _, _ in self._store]) if self._store else torch.zeros(0, dtype=torch.int64)
        values = torch.cat([v for _, v, _ in self._store]) if self._store else torch.zeros(0)
        estimate = torch.cat([e for _, _, e in self._store]) if self._store else torch.zeros(0)
        order = keys.argsort()
        return LatentStats(
            n_tokens=self.n_tokens,
            count=self.count,
            act_sum=self.act_sum,
            max_act=self.max_act,
            hist=self.hist,
            top_values=top_values,
            top_index=top_index,
            sample_values=self.sample_values,
            sample_index=self.sample_index,
            sample_pool=self.sample_pool,
            context_estimate=self.context_estimate,
            context_count=self.context_count,
            context_tokens=self.context_tokens,
            rank_estimate=self.rank_estimate,
            rank_count=self.rank_count,
            correlations=self._correlations(n_correlated) if self.corr_rows is not None else None,
            store_keys=keys[order],
            store_values=values[order],
            store_estimate=estimate[order],
            n_positions=self.n_positions,
        )

    def _correlations(self, n: int, chunk: int = 256) -> tuple[Tensor, Tensor]:
        """Pearson correlation of each selected latent with every latent of the SAE over the kept tokens, and the
        n most correlated others: a sparse product X_selᵀ X, so the cost follows the non-zeros, not d_sae²."""
        from scipy import sparse

        N = max(self._n_corr, 1)
        # Stacking CSR blocks is a concatenation; converting the whole once is cheaper than stacking into CSC.
        X = sparse.vstack(self._corr, format="csr").tocsc() if self._corr else sparse.csc_matrix((N, self.d_sae))
        X = X.astype(np.float64)
        mean = np.asarray(X.sum(0)).ravel() / N
        std = np.sqrt(np.maximum(np.asarray(X.power(2).sum(0)).ravel() / N - mean**2, 0))
        ids, rs = [], []
        sel = self.latents.numpy()
        for start in range(0, len(sel), chunk):
            part = sel[start : start + chunk]
            gram = (X[:, part].T @ X).toarray() / N  # [chunk, d_sae]
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = (gram - mean[part, None] * mean[None]) / (std[part, None] * std[None])
            corr[np.arange(len(part)), part] = np.nan  # not itself
            corr = torch.from_numpy(np.nan_to_num(corr, nan=-np.inf))
            r, i = corr.topk(min(n, self.d_sae - 1), dim=1)
            ids.append(i)
            rs.append(r.float())
        return torch.cat(ids), torch.cat(rs)


def flat_nonzero(x: Tensor) -> Tensor:
    """Row-major flat indices of the non-zero entries of x, as `x.flatten().nonzero()[:, 0]` gives them; numpy finds
    the few non-zeros of a sparse block several times faster than torch does."""
    return torch.from_numpy(np.flatnonzero(x.contiguous().numpy() != 0))


def non_overlapping(values: Tensor, index: Tensor, T: int, window: int, k: int) -> tuple[Tensor, Tensor]:
    """From candidates sorted by value ([M, L], descending), keep the first k per latent whose windows (centres less
    than `window` positions apart in one sequence) do not overlap a better kept one; empty slots get value 0."""
    M, L = values.shape
    seq, pos = index // T, index % T
    clash = (seq[:, None] == seq[None]) & ((pos[:, None] - pos[None]).abs() < window)  # [M, M, L]
    keep = torch.zeros(M, L, dtype=torch.bool)
    for m in range(M):
        keep[m] = (values[m] > 0) & ~(clash[m, :m] & keep[:m]).any(0)
    rank = keep.long().cumsum(0) - 1
    out_values = torch.zeros(k, L)
    out_index = torch.full((k, L), -1, dtype=torch.int64)
    take = keep & (rank < k)
    m, lat = take.nonzero(as_tuple=True)
    out_values[rank[m, lat], lat] = values[m, lat]
    out_index[rank[m, lat], lat] = index[m, lat]
    return out_values, out_index
