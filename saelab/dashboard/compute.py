"""Dashboard data for an SAE on a language model: what every latent does, computed exactly and in two passes.

1. One streaming pass over the token set, the model stopping at the hook, collects every statistic that needs all
   tokens (`saelab.dashboard.stats`): density, maximum, histogram and quantiles, top-activation windows, a uniform
   sample of firing positions, correlations.
2. A second pass over only the sequences that hold a shown window or a sampled position computes the loss effects
   there, exactly (`saelab.dashboard.effects.Downstream`) and by the direct path.

Definitions (also shown on the pages):

- loss effect ΔCE at a position: next-token cross-entropy with the latent's contribution `a · W_dec[j]` removed
  from the hooked activation there, minus the clean one; positive means the latent helps.
- importance: the mean ΔCE over a uniform sample of the positions where the latent fires (all of them when it fires
  fewer times than the sample size), with a t-interval (finite-population corrected, so it closes when the sample
  is the whole population); total importance = density × mean ΔCE, the expected loss increase per token.
- logit effect: the mean, over the same sample, of the exact change in logits that the latent's contribution makes
  through the model's own final norm at the actual residual, `W_U (norm(x) − norm(x − a·d))`. This is exact for
  LayerNorm and RMSNorm (the norm is evaluated, not linearised or ignored); `d` is the decoder row written into the
  residual stream (through W_O or W_out for `attn.hook_z` and `mlp.hook_post`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.dashboard.effects import downstream
from saelab.dashboard.stats import BINS_PER_DECADE, LOG10_LO, LatentStats, StatsAccumulator
from saelab.dashboard.text import token_label, token_strings
from saelab.errors import SaelabError

QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class DashboardConfig:
    """What the pages show and how much work goes into it."""

    top_windows: int = 10  # top-activation windows per latent
    quantile_intervals: int = 4  # equal-probability activation intervals ...
    windows_per_interval: int = 3  # ... with this many windows sampled from each
    context_before: int = 12  # tokens shown before a window's centre
    context_after: int = 4  # and after it
    importance_samples: int = 64  # firing positions per latent whose exact ΔCE gives the importance
    confidence: float = 0.95  # of the importance interval
    n_logits: int = 10  # promoted and suppressed tokens shown
    n_neighbours: int = 8  # nearest latents by decoder cosine, and most correlated ones
    batch_size: int = 32  # sequences per forward pass
    corr_tokens: int = 65536  # tokens whose activations are kept for correlations (a uniform subset)
    exact: str = "fast"  # "fast" single-position re-runs, or "reference": a whole forward pass per pair
    seed: int = 0

    def validate(self) -> None:
        for name in ("top_windows", "quantile_intervals", "importance_samples", "n_logits", "n_neighbours"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SaelabError(f"dashboard {name} must be a positive integer, got {value!r}")
        for name in ("windows_per_interval", "context_before", "context_after", "corr_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SaelabError(f"dashboard {name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SaelabError(f"dashboard batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0 < self.confidence < 1:
            raise SaelabError(f"dashboard confidence must be in (0, 1), got {self.confidence!r}")
        if self.exact not in ("fast", "reference"):
            raise SaelabError(f"dashboard exact must be 'fast' or 'reference', got {self.exact!r}")

    @property
    def window(self) -> int:
        return self.context_before + self.context_after + 1


@dataclass
class Dashboard:
    """JSON-ready pages: `meta` describes the run, `latents` holds one dict per latent (see `saelab.dashboard.site`)."""

    meta: dict[str, Any]
    latents: list[dict[str, Any]] = field(default_factory=list)


def select_latents(features: int | list[int] | Tensor | None, d_sae: int) -> Tensor:
    """The latent ids to describe: all (None), the first N (an int), or a list."""
    if features is None:
        return torch.arange(d_sae)
    if isinstance(features, int) and not isinstance(features, bool):
        if features < 1:
            raise SaelabError(f"--features must be a positive count or a list of ids, got {features}")
        return torch.arange(min(features, d_sae))
    ids = torch.as_tensor(list(features) if not isinstance(features, Tensor) else features, dtype=torch.long)
    if ids.ndim != 1 or len(ids) == 0:
        raise SaelabError("--features must be a count N or a non-empty list of latent ids like 0,5,17")
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if len(bad):
        raise SaelabError(f"latent id {int(bad[0])} is outside 0..{d_sae - 1}; this SAE has d_sae = {d_sae}")
    return ids.unique()


def check_tokens(tokens: Tensor, d_vocab: int) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise SaelabError(f"dashboard tokens must be [n_sequences, length >= 2] token ids, got {shape}")
    if tokens.dtype not in (torch.int32, torch.int64) or int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab:
        raise SaelabError(
            f"dashboard tokens must be integer ids in 0..{d_vocab - 1}; tokenize with the model's tokenizer"
        )
    return tokens.long().cpu()


def eligible_positions(valid: Tensor) -> Tensor:
    """[S, T] positions with a loss to change: counted themselves, and followed by a counted token."""
    out = torch.zeros_like(valid)
    out[:, :-1] = valid[:, :-1] & valid[:, 1:]
    return out


def _round(x: float, digits: int = 5) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


def _pairs(keys: list, values: list, digits: int = 5) -> list[list]:
    """[[key, value], ...] with values rounded, dropping non-finite ones (e.g. −inf for 'no such neighbour')."""
    return [[k, _round(v, digits)] for k, v in zip(keys, values, strict=True) if math.isfinite(v)]


def _rounded(values: Tensor, digits: int = 5) -> list[float | None]:
    return [_round(v, digits) for v in values.tolist()]


def sae_metadata(sae) -> dict[str, Any]:
    """The SAE's metadata (hook_name, model_name, source, …): `sae.metadata` for saelab SAEs, `sae.cfg.metadata`
    for SAELens-style objects."""
    return getattr(sae, "metadata", None) or getattr(sae.cfg, "metadata", None) or {}


def _sae_encode(sae, x: Tensor) -> Tensor:
    param = sae.W_dec
    return sae.encode(x.to(param.device, param.dtype)).float()


@torch.no_grad()
def compute_dashboard(
    lm,
    sae,
    tokens: Tensor,
    hook: str | None = None,
    features: int | list[int] | Tensor | None = None,
    cfg: DashboardConfig | None = None,
    progress: bool = False,
) -> Dashboard:
    """Dashboards for the chosen latents of `sae` at `hook` of `lm` (a `saelab.models.LanguageModel`), on
    tokens [n_sequences, T] (each starting with BOS, as `saelab.models.data.ContextStream` makes them)."""
    cfg = cfg or DashboardConfig()
    cfg.validate()
    started = time.perf_counter()
    hook = hook or sae_metadata(sae).get("hook_name")
    if not hook:
        raise SaelabError("the SAE's cfg.json names no hook (metadata.hook_name); pass --hook")
    lm.check_hook(hook)
    if lm.d_hook(hook) != sae.cfg.d_in:
        raise SaelabError(
            f"the SAE reads d_in = {sae.cfg.d_in} but {hook} of {lm.name} has width {lm.d_hook(hook)}; "
            "pick the model and hook the SAE was trained on"
        )
    tokens = check_tokens(tokens, len(lm.tokenizer))
    latents = select_latents(features, sae.cfg.d_sae)
    n_seq, T = tokens.shape
    L = len(latents)
    engine = downstream(lm, hook, fast=cfg.exact == "fast")
    generator = torch.Generator().manual_seed(cfg.seed)

    # ---- pass 1: statistics over every token ------------------------------------------------------------
    acc = StatsAccumulator(
        latents, sae.cfg.d_sae, n_seq, T, cfg.window, 2 * cfg.top_windows + 4, cfg.importance_samples,
        cfg.corr_tokens, generator,
    )  # fmt: skip
    for first in tqdm(range(0, n_seq, cfg.batch_size), desc="activations", disable=not progress, leave=False):
        batch = tokens[first : first + cfg.batch_size]
        acts = _sae_encode(sae, lm.activations(batch, [hook])[hook])
        valid = lm.regular_positions(batch).cpu()
        acc.update(acts, first, valid, eligible_positions(valid))
    stats = acc.finish(cfg.top_windows, cfg.n_neighbours)
    pass1 = time.perf_counter() - started

    # ---- which windows and positions the pages need -------------------------------------------------------
    windows = _choose_windows(stats, cfg)
    sample_r, sample_l = (stats.sample_index >= 0).nonzero(as_tuple=True)
    sample_index = stats.sample_index[sample_r, sample_l]

    # ---- pass 2: loss effects where they are shown or sampled ------------------------------------------------
    d_model = getattr(getattr(lm.model, "cfg", None), "d_model", 0)
    effects = _Effects(L, cfg, windows, stats.sample_index.shape[0], d_model)
    needed = torch.cat([windows["center"] // T, sample_index // T]).unique()
    strings: dict[int, list[str]] = {}
    W_dec = sae.W_dec.detach().float()
    for chunk in tqdm(needed.split(cfg.batch_size), desc="loss effects", disable=not progress, leave=False):
        run = engine.clean(tokens[chunk])
        valid = lm.regular_positions(tokens[chunk]).cpu()
        acts = _sae_encode(sae, run.x_hook)[..., latents.to(run.x_hook.device)].cpu() * valid[..., None]  # [S, T, L]
        effects.add_batch(engine, run, chunk, acts, eligible_positions(valid), W_dec, latents, sample_r, sample_l,
                          sample_index, T)  # fmt: skip
        for s in set((windows["center"] // T).tolist()) & set(chunk.tolist()):
            strings[s] = token_strings(lm.tokenizer, tokens[s].tolist())
    pass2 = time.perf_counter() - started - pass1

    meta = {
        "kind": "lm",
        "model": lm.name,
        "hook": hook,
        "sae": {"architecture": getattr(sae.cfg, "architecture", "?"), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae},
        "tokens": {"sequences": n_seq, "length": T, "counted": stats.n_tokens},
        "config": asdict(cfg),
        "histogram": {"log10_lo": LOG10_LO, "bins_per_decade": BINS_PER_DECADE},
        "approximation": effects.error_summary(),
        "seconds": {"statistics": round(pass1, 2), "loss_effects": round(pass2, 2)},
        "latents": latents.tolist(),
    }
    logits = _logit_effects(lm, effects, cfg.n_logits)
    neighbours = decoder_neighbours(sae.W_dec.detach().float().cpu(), latents, cfg.n_neighbours)
    pages = _assemble(stats, cfg, latents, windows, effects, strings, tokens, logits, neighbours)
    meta["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return Dashboard(meta=meta, latents=pages)


def _choose_windows(stats: LatentStats, cfg: DashboardConfig) -> dict[str, Tensor]:
    """Windows table: latent (column), centre (flat token index), kind (0 top, 1 + i for interval i), rank."""
    k, lat = (stats.top_values > 0).nonzero(as_tuple=True)
    parts = [(lat, stats.top_index[k, lat], torch.zeros_like(lat), k)]
    if cfg.windows_per_interval:
        edges = stats.quantiles([i / cfg.quantile_intervals for i in range(1, cfg.quantile_intervals)])  # [L, n-1]
        values = stats.sample_values  # [R, L] in random (key) order
        interval = (values.T[:, :, None] >= edges[:, None, :].float()).sum(-1).T  # [R, L]
        for i in range(cfg.quantile_intervals):
            inside = (interval == i) & (stats.sample_index >= 0)
            rank = inside.long().cumsum(0) - 1
            r, lat = (inside & (rank < cfg.windows_per_interval)).nonzero(as_tuple=True)
            parts.append((lat, stats.sample_index[r, lat], torch.full_like(lat, 1 + i), rank[r, lat]))
    latent, center, kind, rank = (torch.cat(x) for x in zip(*parts, strict=True))
    order = torch.argsort(latent * 10_000_000 + kind * 10_000 + rank)
    return {"latent": latent[order], "center": center[order], "kind": kind[order]}


class _Effects:
    """Pass-2 results: per-window activations and ΔCEs, per-sample ΔCEs, logit-effect sums, approximation error."""

    def __init__(self, L: int, cfg: DashboardConfig, windows: dict[str, Tensor], R: int, d_model: int) -> None:
        self.cfg = cfg
        self.windows = windows
        n_win, span = len(windows["center"]), cfg.window
        self.win_acts = torch.zeros(n_win, span)
        self.win_exact = torch.full((n_win, span), float("nan"))
        self.win_direct = torch.full((n_win, span), float("nan"))
        self.sample_exact = torch.full((R, L), float("nan"))
        self.normed_sum = torch.zeros(L, d_model, dtype=torch.float64)
        self.normed_n = torch.zeros(L, dtype=torch.int64)
        self.err_sum = torch.zeros(L, dtype=torch.float64)
        self.err_n = torch.zeros(L, dtype=torch.int64)
        self.all_exact: list[Tensor] = []
        self.all_direct: list[Tensor] = []

    def add_batch(self, engine, run, chunk, acts, eligible, W_dec, latents, sample_r, sample_l, sample_index, T):
        cfg = self.cfg
        S = len(chunk)
        local = torch.full((int(chunk.max()) + 1,), -1, dtype=torch.long)
        local[chunk] = torch.arange(S)
        # Windows of this batch: a [n, span] grid of positions around each centre.
        w_seq = self.windows["center"] // T
        w_rows = (w_seq <= chunk.max()).nonzero().squeeze(1)
        w_rows = w_rows[local[w_seq[w_rows]] >= 0]
        w_s = local[w_seq[w_rows]]
        w_l = self.windows["latent"][w_rows]
        center = self.windows["center"][w_rows] % T
        grid = center[:, None] - cfg.context_before + torch.arange(cfg.window)[None]  # [n, span]
        inside = (grid >= 0) & (grid < T)
        g = grid.clamp(0, T - 1)
        self.win_acts[w_rows] = torch.where(inside, acts[w_s[:, None], g, w_l[:, None]], 0.0)
        fires = inside & (self.win_acts[w_rows] > 0) & eligible[w_s[:, None], g]
        wr, wc = fires.nonzero(as_tuple=True)
        # Sampled positions of this batch.
        s_seq = sample_index // T
        s_rows = (s_seq <= chunk.max()).nonzero().squeeze(1)
        s_rows = s_rows[local[s_seq[s_rows]] >= 0]
        # All pairs (latent, sequence, position), each evaluated once.
        pl = torch.cat([w_l[wr], sample_l[s_rows]])
        ps = torch.cat([w_s[wr], local[s_seq[s_rows]]])
        pp = torch.cat([g[wr, wc], sample_index[s_rows] % T])
        keys, inverse = torch.unique((pl * S + ps) * T + pp, return_inverse=True)
        u_p, u_s, u_l = keys % T, (keys // T) % S, keys // (T * S)
        a = acts[u_s, u_p, u_l]
        delta = a[:, None] * W_dec[latents[u_l]].to(a.device)
        exact = engine.loss_effects(run, u_s, u_p, delta)
        direct = torch.full_like(exact, float("nan"))
        delta_res = engine.to_residual(delta.to(W_dec.device))
        is_sample = torch.zeros(len(keys), dtype=torch.bool)
        is_sample[inverse[len(wr) :]] = True
        if delta_res is not None:
            for rows in torch.arange(len(keys)).split(4096):
                d, normed = engine.direct_effects(run, u_s[rows], u_p[rows], delta_res[rows])
                direct[rows] = d
                m = is_sample[rows]
                self.normed_sum.index_add_(0, u_l[rows][m], normed[m].double())
                self.normed_n += torch.bincount(u_l[rows][m], minlength=len(self.normed_n))
            err = (exact - direct).abs().double()
            self.err_sum.index_add_(0, u_l, err)
            self.err_n += torch.bincount(u_l, minlength=len(self.err_n))
        self.all_exact.append(exact)
        self.all_direct.append(direct)
        self.win_exact[w_rows[wr], wc] = exact[inverse[: len(wr)]]
        self.win_direct[w_rows[wr], wc] = direct[inverse[: len(wr)]]
        self.sample_exact[sample_r[s_rows], sample_l[s_rows]] = exact[inverse[len(wr) :]]

    def error_summary(self) -> dict[str, Any]:
        """How far the direct-path approximation is from the exact ΔCE, over every evaluated position."""
        exact = torch.cat(self.all_exact) if self.all_exact else torch.zeros(0)
        direct = torch.cat(self.all_direct) if self.all_direct else torch.zeros(0)
        ok = direct.isfinite() & exact.isfinite()
        exact, direct = exact[ok].double(), direct[ok].double()
        if len(exact) < 2:
            return {"positions": len(exact)}
        err = direct - exact
        r = torch.corrcoef(torch.stack([exact, direct]))[0, 1].item()
        return {
            "positions": len(exact),
            "mean_abs_exact": _round(exact.abs().mean().item()),
            "mean_abs_error": _round(err.abs().mean().item()),
            "rms_error": _round(err.square().mean().sqrt().item()),
            "max_abs_error": _round(err.abs().max().item()),
            "pearson_r": _round(r),
        }


def _logit_effects(lm, effects: _Effects, n: int) -> list[dict[str, Any] | None]:
    """Per latent: the n most promoted and suppressed tokens, W_U applied to the mean normed-residual change."""
    model = lm.model
    if not hasattr(model, "W_U") or effects.normed_n.sum() == 0:
        return [None] * len(effects.normed_n)
    W_U = model.W_U.detach().float().cpu()
    out: list[dict[str, Any] | None] = []
    for start in range(0, len(effects.normed_n), 512):
        counts = effects.normed_n[start : start + 512]
        mean = (effects.normed_sum[start : start + 512] / counts.clamp(min=1)[:, None]).float()
        logits = mean @ W_U  # [chunk, d_vocab]
        top_v, top_i = logits.topk(n, dim=1)
        bot_v, bot_i = logits.topk(n, dim=1, largest=False)
        for j in range(len(counts)):
            if counts[j] == 0:
                out.append(None)
                continue
            labels = lambda ids: [_token(lm, t) for t in ids.tolist()]  # noqa: E731
            out.append({
                "top": _pairs(labels(top_i[j]), top_v[j].tolist()),
                "bottom": _pairs(labels(bot_i[j]), bot_v[j].tolist()),
                "positions": int(counts[j]),
            })  # fmt: skip
    return out


def _token(lm, token_id: int) -> str:
    return token_label(lm.tokenizer, token_id)


def decoder_neighbours(W_dec: Tensor, latents: Tensor, n: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """([L, n] ids, [L, n] cosines): the latents whose decoder rows point closest to each selected latent's."""
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    n = min(n, len(W_dec) - 1)
    ids, cos = [], []
    for part in latents.split(chunk):
        sims = unit[part] @ unit.T  # [chunk, d_sae]
        sims[torch.arange(len(part)), part] = -math.inf
        c, i = sims.topk(n, dim=1)
        ids.append(i)
        cos.append(c)
    return torch.cat(ids), torch.cat(cos)


def importance_interval(values: Tensor, pool: int, confidence: float) -> dict[str, Any]:
    """Mean of a uniform sample of ΔCEs drawn without replacement from `pool` firing positions, with a
    t-interval whose finite-population correction makes it exact (zero width) when the sample is the pool."""
    from scipy.stats import t

    values = values[values.isfinite()].double()
    n = len(values)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "pool": int(pool)}
    mean = values.mean().item()
    if n == 1:
        return {"mean": _round(mean), "lo": None, "hi": None, "n": 1, "pool": int(pool)}
    fpc = max(0.0, 1 - n / pool) if pool > 0 else 1.0
    half = t.ppf(0.5 + confidence / 2, n - 1) * values.std().item() / math.sqrt(n) * math.sqrt(fpc)
    return {"mean": _round(mean), "lo": _round(mean - half), "hi": _round(mean + half), "n": n, "pool": int(pool)}


def _assemble(stats, cfg, latents, windows, effects, strings, tokens, logits, neighbours) -> list[dict[str, Any]]:
    T = tokens.shape[1]
    density = stats.density()
    quantiles = stats.quantiles(list(QUANTILES))
    edges = stats.quantiles([i / cfg.quantile_intervals for i in range(cfg.quantile_intervals + 1)])
    corr = stats.correlations
    by_latent = [[] for _ in range(len(latents))]
    for row, l in enumerate(windows["latent"].tolist()):
        by_latent[l].append(row)
    pages = []
    for j, latent in enumerate(latents.tolist()):
        count = int(stats.count[j])
        hist = stats.hist[j]
        nz = hist.nonzero().squeeze(1)
        imp = importance_interval(effects.sample_exact[:, j], int(stats.sample_pool[j]), cfg.confidence)
        total = {k: _round(density[j].item() * imp[k]) if imp[k] is not None else None for k in ("mean", "lo", "hi")}
        page: dict[str, Any] = {
            "id": latent,
            "density": _round(density[j].item()),
            "count": count,
            "max": _round(stats.max_act[j].item()),
            "mean": _round(stats.act_sum[j].item() / count) if count else None,
            "quantiles": [[q, _round(v)] for q, v in zip(QUANTILES, quantiles[j].tolist(), strict=True)],
            "hist": {"first": int(nz[0]), "counts": hist[nz[0] : nz[-1] + 1].tolist()} if len(nz) else None,
            "importance": imp,
            "total_importance": total,
            "approx_error": _round(effects.err_sum[j].item() / effects.err_n[j].item()) if effects.err_n[j] else None,
            "logits": logits[j],
            "neighbours": _pairs(neighbours[0][j].tolist(), neighbours[1][j].tolist(), 4),
            "correlated": [] if corr is None else _pairs(corr[0][j].tolist(), corr[1][j].tolist(), 4),
            "windows": _latent_windows(by_latent[j], windows, effects, strings, cfg, T, edges[j].tolist()),
        }  # fmt: skip
        pages.append(page)
    return pages


def _latent_windows(rows, windows, effects, strings, cfg, T, edges) -> dict[str, Any]:
    """Top windows, then for each equal-probability interval [q_i, q_i+1] of the non-zero activations its
    sampled windows."""
    top: list[dict] = []
    n = cfg.quantile_intervals
    intervals = [
        {"q": [i / n, (i + 1) / n], "lo": _round(edges[i]), "hi": _round(edges[i + 1]), "windows": []} for i in range(n)
    ]
    for row in rows:
        center = int(windows["center"][row])
        seq, pos = divmod(center, T)
        start = max(0, pos - cfg.context_before)
        end = min(T, pos + cfg.context_after + 1)
        lo, hi = start - (pos - cfg.context_before), end - (pos - cfg.context_before)
        window = {
            "seq": seq,
            "start": start,
            "center": pos - start,
            "tokens": strings[seq][start:end],
            "acts": _rounded(effects.win_acts[row, lo:hi]),
            "loss": _rounded(effects.win_exact[row, lo:hi]),
            "direct": _rounded(effects.win_direct[row, lo:hi]),
        }
        kind = int(windows["kind"][row])
        (top if kind == 0 else intervals[kind - 1]["windows"]).append(window)
    return {"top": top, "intervals": intervals}
