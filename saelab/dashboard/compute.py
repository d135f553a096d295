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

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.dashboard.effects import downstream
from saelab.dashboard.stats import BINS_PER_DECADE, LOG10_LO, LatentStats, StatsAccumulator
from saelab.dashboard.text import token_label, token_strings
from saelab.errors import SaelabError

QUANTILES = (0.5, 0.9, 0.99)
ENCODE_FLOATS = 4 * 2**20  # latent activations encoded at once (16 MB)


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
    batch_size: int = 32  # sequences per forward pass (fewer for wide SAEs, see ENCODE_FLOATS)
    corr_tokens: int = 65536  # tokens whose activations are kept for correlations (a uniform subset)
    exact: str = "fast"  # "fast" single-position re-runs, or "reference": a whole forward pass per pair
    resid_cache_mb: int = 1024  # keep the residuals at the hooked block for pass 2 when they fit in this
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
    """`_round` for a whole tensor at once (vectorised: pages hold millions of numbers); NaN becomes None."""
    a = values.double().numpy()
    finite = np.isfinite(a) & (a != 0)
    exponent = np.floor(np.log10(np.abs(a), where=finite, out=np.zeros_like(a)))
    scale = 10.0 ** (digits - 1 - exponent)
    out = np.where(finite, np.round(a * scale) / scale, a).tolist()
    return [None if v != v or v in (math.inf, -math.inf) else v for v in out]


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
    engine = downstream(lm, hook, fast=cfg.exact == "fast")
    generator = torch.Generator().manual_seed(cfg.seed)

    # ---- pass 1: statistics over every token ------------------------------------------------------------
    acc = StatsAccumulator(
        latents, sae.cfg.d_sae, n_seq, T, cfg.window, 2 * cfg.top_windows + 4, cfg.importance_samples,
        cfg.corr_tokens, generator,
    )  # fmt: skip
    # The second pass starts at the hooked block from residuals kept here, when they fit in memory.
    d_model = getattr(getattr(lm.model, "cfg", None), "d_model", 0)
    keep = hasattr(engine, "start_name") and n_seq * T * d_model * 4 <= cfg.resid_cache_mb * 2**20
    resid = torch.empty(n_seq, T, d_model) if keep else None
    # Few sequences per batch: the latent activations [batch, T, d_sae] stay under ENCODE_FLOATS, so they are reused
    # from the heap and stay in cache, where larger blocks would be freshly mapped (and page-faulted) memory each time.
    batch_size = max(1, min(cfg.batch_size, ENCODE_FLOATS // (T * sae.cfg.d_sae)))
    _recycle_large_blocks()
    for first in tqdm(range(0, n_seq, batch_size), desc="activations", disable=not progress, leave=False):
        batch = tokens[first : first + batch_size]
        names = [hook] if not keep or engine.hook_is_start else [hook, engine.start_name]
        found = lm.activations(batch, names)
        if keep:
            resid[first : first + len(batch)] = found[names[-1]].view(len(batch), T, d_model).cpu()
        acts = _sae_encode(sae, found[hook])
        valid = lm.regular_positions(batch).cpu()
        acc.update(acts, first, valid, eligible_positions(valid))
    stats = acc.finish(cfg.top_windows, cfg.n_neighbours)
    pass1 = time.perf_counter() - started

    # ---- pass 2: loss effects where they are shown or sampled ------------------------------------------------
    windows = _choose_windows(stats, cfg)
    eligible = eligible_positions(lm.regular_positions(tokens).cpu())
    effects = _Effects(stats, cfg, windows, eligible, d_model)
    W_dec = sae.W_dec.detach().float()
    effects.evaluate(engine, tokens, resid, W_dec, latents, _seqs_per_run(lm, engine, T), progress)
    strings = _window_strings(lm.tokenizer, tokens, windows["center"], cfg)
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


def _recycle_large_blocks() -> None:
    """Have the C allocator recycle pass 1's blocks of up to 32 MB rather than map fresh, page-faulting memory for
    each: glibc keeps blocks on its heap once one of that size has been freed (its mmap threshold adapts upwards).
    Freeing one such block, never touched, costs nothing; other allocators ignore it."""
    torch.empty(2**23 - 2**12)


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


def _window_strings(tokenizer, tokens: Tensor, center: Tensor, cfg: DashboardConfig) -> dict[tuple[int, int], str]:
    """{(sequence, position): token string} over every window; overlapping windows are decoded together, once."""
    T = tokens.shape[1]
    runs: list[list[int]] = []  # [sequence, first, end] of merged windows
    for c in center.unique().tolist():  # sorted: by sequence, then position
        seq, pos = divmod(c, T)
        first, end = max(0, pos - cfg.context_before), min(T, pos + cfg.context_after + 1)
        if runs and runs[-1][0] == seq and first <= runs[-1][2]:
            runs[-1][2] = end
        else:
            runs.append([seq, first, end])
    out: dict[tuple[int, int], str] = {}
    for seq, first, end in runs:
        text = token_strings(tokenizer, tokens[seq].tolist(), first, end)
        out.update(zip([(seq, pos) for pos in range(first, end)], text, strict=True))
    return out


def _seqs_per_run(lm, engine, T: int, budget: int = 512 * 2**20) -> int:
    """Sequences per clean run such that its cached residuals and keys/values stay within `budget` bytes."""
    cfg = getattr(lm.model, "cfg", None)
    if cfg is None:
        return 8
    blocks = cfg.n_layers - getattr(engine, "start", 0)
    per_sequence = T * cfg.d_model * 4 * (3 + 2 * blocks)
    return max(1, budget // per_sequence)


class _Effects:
    """Pass 2: every (latent, position) pair the pages need — firing, eligible positions inside shown windows, and
    the importance sample — evaluated once, exactly and by the direct path; results are scattered back to windows
    and samples, and the normed-residual changes of sampled pairs are summed for the logit effects."""

    def __init__(self, stats: LatentStats, cfg: DashboardConfig, windows: dict[str, Tensor], eligible: Tensor,
                 d_model: int) -> None:  # fmt: skip
        T = eligible.shape[1]
        L = stats.count.shape[0]
        self.cfg = cfg
        # Windows: a [n_windows, span] grid of positions around each centre, activations read from the store.
        center = windows["center"]
        grid = (center % T)[:, None] - cfg.context_before + torch.arange(cfg.window)[None]
        inside = (grid >= 0) & (grid < T)
        flat = (center // T * T)[:, None] + grid.clamp(0, T - 1)
        self.win_acts = torch.where(inside, stats.activation(windows["latent"][:, None], flat), 0.0)
        fires = inside & (self.win_acts > 0) & eligible.reshape(-1)[flat]
        self.win_rows, self.win_cols = fires.nonzero(as_tuple=True)
        # Sampled positions.
        self.sample_r, self.sample_l = (stats.sample_index >= 0).nonzero(as_tuple=True)
        sample_flat = stats.sample_index[self.sample_r, self.sample_l]
        # Unique pairs, as (latent column, flat token index), sorted by sequence.
        pair_l = torch.cat([windows["latent"][self.win_rows], self.sample_l])
        pair_flat = torch.cat([flat[self.win_rows, self.win_cols], sample_flat])
        n_positions = eligible.numel()
        keys, self.inverse = torch.unique(pair_flat * L + pair_l, return_inverse=True)
        self.flat, self.latent = keys // L, keys % L
        self.act = stats.activation(self.latent, self.flat)
        self.is_sample = torch.zeros(len(keys), dtype=torch.bool)
        self.is_sample[self.inverse[len(self.win_rows) :]] = True
        self.exact = torch.full((len(keys),), float("nan"))
        self.direct = torch.full((len(keys),), float("nan"))
        self.normed_sum = torch.zeros(L, d_model, dtype=torch.float64)
        self.normed_n = torch.zeros(L, dtype=torch.int64)
        self.win_exact = torch.full(self.win_acts.shape, float("nan"))
        self.win_direct = torch.full(self.win_acts.shape, float("nan"))
        self.sample_exact = torch.full(stats.sample_index.shape, float("nan"))
        self.T, self.n_positions = T, n_positions

    def evaluate(self, engine, tokens, resid, W_dec, latents, per_run: int, progress: bool) -> None:
        """Run the model once over each chunk of the sequences holding pairs (from the cached residuals at the
        hooked block when `resid` [n_seq, T, d_model] is given), then every pair of the chunk."""
        seq = self.flat // self.T
        needed = seq.unique()
        for chunk in tqdm(needed.split(per_run), desc="loss effects", disable=not progress, leave=False):
            run = engine.clean(tokens[chunk], None if resid is None else resid[chunk])
            rows = ((seq >= chunk[0]) & (seq <= chunk[-1])).nonzero().squeeze(1)  # seq is sorted, chunk contiguous
            local = torch.searchsorted(chunk, seq[rows])
            pos = self.flat[rows] % self.T
            delta = self.act[rows, None] * W_dec[latents[self.latent[rows]]].cpu()
            self.exact[rows], clean = engine.loss_effects(run, local, pos, delta)
            delta_res = engine.to_residual(delta.to(W_dec.device))
            if delta_res is None:
                continue
            targets = tokens[chunk][local, pos + 1]
            for part in torch.arange(len(rows)).split(1024):  # logits [1024, d_vocab] at a time: reused memory
                direct, normed = engine.direct_effects(clean[part], targets[part], delta_res[part])
                self.direct[rows[part]] = direct
                sampled = self.is_sample[rows[part]]
                lat = self.latent[rows[part]][sampled]
                self.normed_sum.index_add_(0, lat, normed[sampled].double())
                self.normed_n += torch.bincount(lat, minlength=len(self.normed_n))
        n_win = len(self.win_rows)
        self.win_exact[self.win_rows, self.win_cols] = self.exact[self.inverse[:n_win]]
        self.win_direct[self.win_rows, self.win_cols] = self.direct[self.inverse[:n_win]]
        self.sample_exact[self.sample_r, self.sample_l] = self.exact[self.inverse[n_win:]]

    def latent_error(self, j: int) -> float | None:
        """Mean |direct − exact| over latent j's evaluated positions."""
        if not hasattr(self, "_err_sum"):
            err = (self.direct - self.exact).abs().double()
            ok = err.isfinite()
            L = len(self.normed_n)
            self._err_sum = torch.zeros(L, dtype=torch.float64).index_add_(0, self.latent[ok], err[ok])
            self._err_n = torch.bincount(self.latent[ok], minlength=L)
        return _round(self._err_sum[j].item() / self._err_n[j].item()) if self._err_n[j] else None

    def error_summary(self) -> dict[str, Any]:
        """How far the direct-path approximation is from the exact ΔCE, over every evaluated position."""
        ok = self.direct.isfinite() & self.exact.isfinite()
        exact, direct = self.exact[ok].double(), self.direct[ok].double()
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
    seen: dict[int, str] = {}

    def label(token_id: int) -> str:  # the same tokens recur across latents: decode each once
        if token_id not in seen:
            seen[token_id] = token_label(lm.tokenizer, token_id)
        return seen[token_id]

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
            labels = lambda ids: [label(t) for t in ids.tolist()]  # noqa: E731
            out.append({
                "top": _pairs(labels(top_i[j]), top_v[j].tolist()),
                "bottom": _pairs(labels(bot_i[j]), bot_v[j].tolist()),
                "positions": int(counts[j]),
            })  # fmt: skip
    return out


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


@functools.lru_cache(maxsize=4096)
def _t_quantile(q: float, dof: int) -> float:
    from scipy.special import stdtrit  # Student's t quantile; scipy.stats would cost a second to import

    return float(stdtrit(dof, q))


def importance_interval(values: Tensor, pool: int, confidence: float) -> dict[str, Any]:
    """Mean of a uniform sample of ΔCEs drawn without replacement from `pool` firing positions, with a
    t-interval whose finite-population correction makes it exact (zero width) when the sample is the pool."""
    values = values[values.isfinite()].double()
    n = len(values)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "pool": int(pool)}
    mean = values.mean().item()
    if n == 1:
        return {"mean": _round(mean), "lo": None, "hi": None, "n": 1, "pool": int(pool)}
    fpc = max(0.0, 1 - n / pool) if pool > 0 else 1.0
    half = _t_quantile(0.5 + confidence / 2, n - 1) * values.std().item() / math.sqrt(n) * math.sqrt(fpc)
    return {"mean": _round(mean), "lo": _round(mean - half), "hi": _round(mean + half), "n": n, "pool": int(pool)}


def _assemble(stats, cfg, latents, windows, effects, strings, tokens, logits, neighbours) -> list[dict[str, Any]]:
    T = tokens.shape[1]
    density = stats.density()
    quantiles = stats.quantiles(list(QUANTILES))
    edges = stats.quantiles([i / cfg.quantile_intervals for i in range(cfg.quantile_intervals + 1)])
    corr = stats.correlations
    span = cfg.window
    grid: dict[str, list] = {"center": windows["center"].tolist(), "kind": windows["kind"].tolist()}
    for name, values in (("acts", effects.win_acts), ("loss", effects.win_exact), ("direct", effects.win_direct)):
        flat = _rounded(values.flatten())
        grid[name] = [flat[i : i + span] for i in range(0, len(flat), span)]
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
            "approx_error": effects.latent_error(j),
            "logits": logits[j],
            "neighbours": _pairs(neighbours[0][j].tolist(), neighbours[1][j].tolist(), 4),
            "correlated": [] if corr is None else _pairs(corr[0][j].tolist(), corr[1][j].tolist(), 4),
            "windows": _latent_windows(by_latent[j], grid, strings, cfg, T, edges[j].tolist()),
        }  # fmt: skip
        pages.append(page)
    return pages


def _latent_windows(rows, grid, strings, cfg, T, edges) -> dict[str, Any]:
    """Top windows, then for each equal-probability interval [q_i, q_i+1] of the non-zero activations its
    sampled windows. `grid` holds, per window row, its centre, kind and rounded per-position values."""
    top: list[dict] = []
    n = cfg.quantile_intervals
    intervals = [
        {"q": [i / n, (i + 1) / n], "lo": _round(edges[i]), "hi": _round(edges[i + 1]), "windows": []} for i in range(n)
    ]
    for row in rows:
        seq, pos = divmod(grid["center"][row], T)
        start = max(0, pos - cfg.context_before)
        end = min(T, pos + cfg.context_after + 1)
        lo, hi = start - (pos - cfg.context_before), end - (pos - cfg.context_before)
        tokens = [strings[seq, p] for p in range(start, end)]
        window = {"seq": seq, "start": start, "center": pos - start, "tokens": tokens}
        window |= {name: grid[name][row][lo:hi] for name in ("acts", "loss", "direct")}
        kind = grid["kind"][row]
        (top if kind == 0 else intervals[kind - 1]["windows"]).append(window)
    return {"top": top, "intervals": intervals}
