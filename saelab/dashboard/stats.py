"""Per-latent statistics gathered in one streaming pass over a token set, batched over latents.

`StatsAccumulator.update` sees the activations `[seq, pos, d_sae]` of one batch of sequences and keeps, for every
selected latent, state of a fixed size (nothing grows with the number of tokens except the optional sparse copy
used for correlations):

- firing count, sum, sum of squares and maximum;
- a histogram of the non-zero activations on fixed log-spaced bins (`BINS_PER_DECADE` per decade), from which
  quantiles are read to within one bin, interpolated;
- top-activation candidates: the maximum of each chunk of `window` positions, so two candidates of one sequence
  are a window apart; the best `top_candidates` are kept, and `finish` drops the ones whose windows overlap a
  better one;
- a uniform sample (without replacement) of the positions where the latent fires: every token gets one random key
  and each latent keeps the `sample_size` firing positions with the smallest keys (a bottom-k sample). Keys are
  independent of activations, so the sample is unbiased; it feeds the importance estimate and the quantile windows.
- a sparse copy of the selected latents' non-zero activations (12 bytes each), so the second pass can read the
  activations around any window without running the SAE again;
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
    correlations: tuple[Tensor, Tensor] | None  # ([L, n], [L, n]) most correlated latents (ids into the SAE), r
    store_keys: Tensor  # [nnz] sorted latent · n_positions + flat token index of every non-zero activation
    store_values: Tensor  # [nnz]
    n_positions: int

    def density(self) -> Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    def quantiles(self, qs: list[float]) -> Tensor:
        """[L, len(qs)] quantiles of each latent's non-zero activations, read from the histogram (NaN if dead)."""
        edges = bin_edges().log10()
        cum = self.hist.double().cumsum(1)  # [L, B]
        total = cum[:, -1:]
        out = torch.full((self.hist.shape[0], len(qs)), float("nan"), dtype=torch.float64)
        for i, q in enumerate(qs):
            target = (q * total).clamp(min=1e-9)  # [L, 1]; q = 0 reads the first non-empty bin's lower edge
            b = torch.searchsorted(cum, target).clamp(max=N_BINS - 1)  # first bin reaching the target
            below = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
            inside = self.hist.double().gather(1, b)
            frac = ((target - below) / inside.clamp(min=1)).clamp(0, 1)
            log_value = edges[b] + frac * (edges[b + 1] - edges[b])
            out[:, i] = (10**log_value).squeeze(1)
        out = torch.minimum(out, self.max_act.double()[:, None])
        out[self.count == 0] = float("nan")
        return out

    def activation(self, latent: Tensor, index: Tensor) -> Tensor:
        """Activations at (column `latent`, flat token index) pairs (broadcast); 0 where the latent did not fire."""
        keys = latent * self.n_positions + index
        if len(self.store_keys) == 0:
            return torch.zeros(keys.shape)
        at = torch.searchsorted(self.store_keys, keys.reshape(-1)).clamp(max=len(self.store_keys) - 1)
        values = torch.where(self.store_keys[at] == keys.reshape(-1), self.store_values[at], 0.0)
        return values.reshape(keys.shape)


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
        n = n_sequences * seq_len
        self.keys = torch.rand(n, generator=generator, dtype=torch.float64)  # [n_tokens] sample keys
        corr_fraction = min(1.0, corr_tokens / max(n, 1))
        self.corr_rows = torch.rand(n, generator=generator) < corr_fraction if corr_tokens > 0 else None
        self._corr: list = []  # scipy CSR blocks [kept tokens, d_sae]
        self._n_corr = 0
        self.n_positions = n
        self._store: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def update(self, acts: Tensor, first_seq: int, valid: Tensor, eligible: Tensor) -> None:
        """acts [S, T, d_sae] of sequences first_seq.. ; valid [S, T]: positions to count (not special tokens);
        eligible [S, T]: positions that may enter the sample (valid, with a valid next token)."""
        acts = acts.float().cpu().contiguous()
        valid, eligible = valid.cpu(), eligible.cpu()
        base = first_seq * self.T
        if self.corr_rows is not None:
            self._keep_for_correlation(acts, valid, base)
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

        self._store.append((lat * self.n_positions + tok + base, values))
        self._update_top(a, base)
        ok = eligible.reshape(-1)[tok]
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

    def _keep_for_correlation(self, acts: Tensor, valid: Tensor, base: int) -> None:
        from scipy import sparse

        S, T, D = acts.shape
        rows = self.corr_rows[base : base + S * T] & valid.reshape(-1)
        index = flat_nonzero(acts)
        index = index[rows[index // D]]  # tokens left out keep an empty row, which adds nothing to the sums
        tok, lat = index // D, index % D
        indptr = F.pad(torch.bincount(tok, minlength=S * T).cumsum(0), (1, 0))
        values = acts.view(-1)[index]
        self._corr.append(sparse.csr_matrix((values.numpy(), lat.numpy(), indptr.numpy()), shape=(S * T, D)))
        self._n_corr += int(rows.sum())

    def finish(self, top_k: int, n_correlated: int) -> LatentStats:
        top_values, top_index = non_overlapping(self.top_values, self.top_index, self.T, self.window, top_k)
        keys = torch.cat([k for k, _ in self._store]) if self._store else torch.zeros(0, dtype=torch.int64)
        values = torch.cat([v for _, v in self._store]) if self._store else torch.zeros(0)
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
            correlations=self._correlations(n_correlated) if self.corr_rows is not None else None,
            store_keys=keys[order],
            store_values=values[order],
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
