"""Dashboard data for an SAE on a language model: what every latent does, computed exactly and in two passes.

1. One streaming pass over the token set, a forward and a backward pass of the model per batch, collects every
   statistic that needs all tokens (`saelab.dashboard.stats`): density, maximum, histogram and quantiles,
   top-activation windows, a uniform sample of firing positions, correlations, and for every firing the cheap
   estimate of its total ΔCE (gradient attribution), summed per context.
2. A second pass over only the sequences that hold a shown window or a sampled firing computes the loss effects
   there, exactly (`saelab.dashboard.effects.Downstream`) and by the direct path: the same-position ΔCE at every
   firing inside a shown window, and the total ΔCE of the sampled firings (all firings of a latent that fires at
   most `exact_firings` times).

Definitions (also shown on the pages):

- same-position ΔCE at a position: next-token cross-entropy there with the latent's contribution `a · W_dec[j]`
  removed from the hooked activation there, minus the clean one; positive means the latent helps. The per-token
  views show it, beside the direct-path approximation and the gradient attribution.
- total ΔCE, importance per firing and per token: see `saelab.dashboard.importance`.
- logit effect: the mean, over the same sample, of the exact change in logits that the latent's contribution makes
  through the model's own final norm at the actual residual, `W_U (norm(x) − norm(x − a·d))`. This is exact for
  LayerNorm and RMSNorm (the norm is evaluated, not linearised or ignored); `d` is the decoder row written into the
  residual stream (through W_O or W_out for `attn.hook_z` and `mlp.hook_post`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.dashboard.effects import Clean, CleanRun, LossEffectEngine, downstream, loss_gradient
from saelab.dashboard.importance import Importance, estimate_importance
from saelab.dashboard.pages import PageParts, build_pages
from saelab.dashboard.pages import pairs as _pairs
from saelab.dashboard.pages import round_float as _round
from saelab.dashboard.stats import BINS_PER_DECADE, LOG10_LO, LatentStats, StatsAccumulator, flat_nonzero
from saelab.dashboard.text import token_label, token_strings
from saelab.dashboard.zoo import with_targets
from saelab.errors import SaelabError
from saelab.models.zoo.tasks import IGNORE
from saelab.sae_protocol import SAELike

ENCODE_FLOATS = 4 * 2**20  # latent activations encoded at once (16 MB)
EXACT_TOTAL = 512  # exact total-ΔCE firings for all latents together, by default
KEPT_BYTES = 2**30  # pass 1's firings (16 bytes each) and SAE inputs kept for the statistics after ranking (top:N)
LOGIT_SAMPLE = 64  # uniformly sampled firings per latent for logit effects and quantile windows (the exact ones first)
MORE_BEFORE, MORE_AFTER = 24, 12  # tokens of extra context a window shows when clicked


@dataclass
class DashboardConfig:
    """What the pages show and how much work goes into it."""

    top_windows: int = 10  # top-activation windows per latent
    quantile_intervals: int = 4  # equal-probability activation intervals ...
    windows_per_interval: int = 3  # ... with this many windows sampled from each
    context_before: int = 12  # tokens shown before a window's centre
    context_after: int = 4  # and after it
    # Firings per latent whose total ΔCE is computed exactly (a uniform sample if it fires more often); None: 512 in
    # all, spread over the latents (16 for 32 latents or fewer, 8 for 64, at least 2). The gradient attribution is
    # close (r ≈ 0.97–0.99 on the demo SAE), so the exact correction adds little variance beyond the data's own.
    exact_firings: int | None = None
    confidence: float = 0.95  # of the importance intervals
    min_firings: int = 20  # below this many firings, or firing contexts, importance shows "too few firings"
    min_contexts: int = 5
    n_logits: int = 10  # promoted and suppressed tokens shown
    n_neighbours: int = 8  # nearest latents by decoder cosine, and most correlated ones
    batch_size: int = 32  # sequences per forward pass (fewer for wide SAEs, see ENCODE_FLOATS)
    corr_tokens: int = 65536  # tokens whose activations are kept for correlations (a uniform subset)
    exact: str = "fast"  # "fast" single-position re-runs, or "reference": a whole forward pass per pair
    resid_cache_mb: int = 1024  # keep the residuals at the hooked block for pass 2 when they fit in this
    seed: int = 0

    def validate(self) -> None:
        for name in ("top_windows", "quantile_intervals", "n_logits", "n_neighbours", "min_firings", "min_contexts",
                     *(("exact_firings",) if self.exact_firings is not None else ())):  # fmt: skip
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

    def exact_budget(self, n_latents: int) -> int:
        return self.exact_firings or min(16, max(2, EXACT_TOTAL // max(n_latents, 1)))


@dataclass
class Dashboard:
    """JSON-ready pages: `meta` describes the run, `latents` holds one dict per latent (see `saelab.dashboard.site`)."""

    meta: dict[str, Any]
    latents: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Top:
    """`--features top:N`: the N latents with the largest cheap estimate of importance per token (among those with
    at least `min_firings` firings), and the `also` named ones."""

    n: int
    also: list[int] = field(default_factory=list)


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


def firing_positions(lm, valid: Tensor) -> Tensor:
    """[S, T] positions where a firing has a loss effect: with a next-token loss from there on (`eligible_positions`)
    for a language model; every position of a zoo model, whose scored positions may all lie later."""
    return valid if lm.task is not None else eligible_positions(valid)


def _rounded(values: Tensor, digits: int = 5) -> list[float | None]:
    """`_round` for a whole tensor at once (vectorised: pages hold millions of numbers); NaN becomes None."""
    a = values.double().numpy()
    finite = np.isfinite(a) & (a != 0)
    exponent = np.floor(np.log10(np.abs(a), where=finite, out=np.zeros_like(a)))
    scale = 10.0 ** (digits - 1 - exponent)
    out = np.where(finite, np.round(a * scale) / scale, a).tolist()
    return [None if v != v or v in (math.inf, -math.inf) else v for v in out]


def latent_hooks(lm, sae: SAELike, hook: str | None = None) -> tuple[str, str]:
    """(the hook the latents read, the hook their decoder rows write into) for `sae` on `lm`, checked.

    An SAE reads and writes one hook: `hook`, by default its metadata's. A transcoder reads its input hook and writes
    the hook whose activation (the MLP's output) it replaces, `hook_name_out`: there a latent's contribution
    a · W_dec[j] is removed to measure its loss effects, while its activation comes from the input hook. `hook`, if
    given, must be one of the two."""
    metadata = sae.metadata
    hook_in = hook or metadata.get("hook_name")
    if not hook_in:
        raise SaelabError("the SAE's cfg.json names no hook (metadata.hook_name); pass --hook")
    hook_out = hook_in
    if sae.cfg.transcoder:
        hook_in, hook_out = metadata.get("hook_name"), metadata.get("hook_name_out")
        if not hook_in or not hook_out:
            raise SaelabError("the transcoder's metadata lacks hook_name or hook_name_out; dashboards need both")
        if hook not in (None, hook_in, hook_out):
            raise SaelabError(f"this transcoder reads {hook_in} and writes {hook_out}; --hook {hook} is neither")
    for name, width in ((hook_in, sae.cfg.d_in), (hook_out, sae.cfg.d_target)):
        lm.check_hook(name)
        if lm.d_hook(name) != width:
            raise SaelabError(
                f"the SAE {'reads' if name == hook_in else 'writes'} width {width} but {name} of {lm.name} has width "
                f"{lm.d_hook(name)}; pick the model and hook the SAE was trained on"
            )
    return hook_in, hook_out


def _sae_encode(sae, x: Tensor) -> Tensor:
    param = sae.W_dec
    return sae.encode(x.to(param.device, param.dtype)).float()


@torch.no_grad()
def compute_dashboard(
    lm,
    sae: SAELike,
    tokens: Tensor,
    hook: str | None = None,
    features: int | list[int] | Tensor | Top | None = None,
    cfg: DashboardConfig | None = None,
    progress: bool = False,
    labels: Tensor | None = None,
) -> Dashboard:
    """Dashboards for the chosen latents of `sae` at `hook` of `lm` (a `saelab.models.LanguageModel`), on
    tokens [n_sequences, T] (each starting with BOS, as `saelab.models.data.ContextStream` makes them).

    A zoo model (`lm.task`) needs its task's `labels` [n_sequences, T] (IGNORE where not scored): the losses are
    the task's (`saelab.dashboard.zoo`), a firing counts at every position, and each window is a whole sequence."""
    cfg = cfg or DashboardConfig()
    cfg.validate()
    if (lm.task is None) != (labels is None):
        raise SaelabError("a zoo model's dashboard needs its task labels, and only a zoo model's takes them")
    started = time.perf_counter()
    hook_in, hook = latent_hooks(lm, sae, hook)  # a transcoder's latents read hook_in and write into hook
    tokens = check_tokens(tokens, len(lm.tokenizer))
    n_seq, T = tokens.shape
    if labels is not None:
        from saelab.dashboard.zoo import TaskDownstream

        if labels.shape != tokens.shape:
            raise SaelabError(f"task labels {tuple(labels.shape)} do not match the tokens {tuple(tokens.shape)}")
        labels = labels.long().cpu()
        cfg = replace(cfg, context_before=T - 1, context_after=T - 1)  # windows: whole (short) task sequences
        engine: LossEffectEngine = TaskDownstream(lm, hook)
    else:
        engine = downstream(lm, hook, fast=cfg.exact == "fast")
    chosen = "top:" + ",".join(map(str, [features.n, *features.also])) if isinstance(features, Top) else None
    # The second pass starts at the hooked block from residuals kept in pass 1, when they fit in memory, and takes
    # the clean losses and final residuals (which its runs start from) from pass 1 too, instead of clean re-runs.
    d_model = getattr(getattr(lm.model, "cfg", None), "d_model", 0)
    keep = engine.start_name is not None and 2 * n_seq * T * d_model * 4 <= cfg.resid_cache_mb * 2**20
    read = ((engine.start_name,) if not engine.hook_is_start else ()) + (engine.final_name,) if keep else ()
    batch_size = _batch_size(lm, sae, T, cfg)
    _recycle_large_blocks()
    kept: list[_KeptBatch] | None = None
    if isinstance(features, Top):  # rank first; pass 1 then replays the firings kept here, if they fit
        batches = _attributed_batches(lm, sae, tokens, hook, batch_size, read, progress, labels)
        ranking, kept = _rank(lm, sae.cfg.d_sae, batches, KEPT_BYTES)
        eligible = torch.tensor(ranking["firings"]) >= cfg.min_firings
        score = torch.tensor([x if x is not None else -math.inf for x in ranking["per_token"]], dtype=torch.float64)
        score[~eligible] = -math.inf
        best = score.argsort(descending=True)[: features.n]
        best = best[score[best] > -math.inf]
        features = torch.cat([best, select_latents(features.also, sae.cfg.d_sae) if features.also else best[:0]])
    latents = select_latents(features, sae.cfg.d_sae)
    generator = torch.Generator().manual_seed(cfg.seed)

    # ---- pass 1: statistics over every token ------------------------------------------------------------
    acc = StatsAccumulator(
        latents, sae.cfg.d_sae, n_seq, T, cfg.window, 2 * cfg.top_windows + 4,
        max(cfg.exact_budget(len(latents)), LOGIT_SAMPLE),
        cfg.corr_tokens, generator,
    )  # fmt: skip
    pass1_run = None
    if keep:  # what pass 1 leaves for pass 2, for every sequence
        pass1_run = CleanRun(tokens, resid_start=torch.empty(n_seq, T, d_model),
                             final_resid=torch.empty(n_seq, T, d_model), ce=torch.empty(n_seq, T))  # fmt: skip
    W_dec = sae.W_dec.detach()
    if kept is not None:
        batches = (batch.replay() for batch in kept)
    else:
        batches = _attributed_batches(lm, sae, tokens, hook, batch_size, read, progress, labels)
    for first, batch, found, acts, (nonzero, estimate) in batches:
        if pass1_run is not None:
            rows = slice(first, first + len(batch))
            start = "x" if engine.hook_is_start else engine.start_name
            pass1_run.resid_start[rows] = found[start].view(len(batch), T, d_model).cpu()
            pass1_run.final_resid[rows] = found[engine.final_name].cpu()
            pass1_run.ce[rows] = found["ce"].cpu()
        valid = lm.regular_positions(batch).cpu()
        acc.update(acts, first, valid, firing_positions(lm, valid), estimate, nonzero)
    stats = acc.finish(cfg.top_windows, cfg.n_neighbours)
    pass1 = time.perf_counter() - started

    # ---- pass 2: loss effects where they are shown or sampled ------------------------------------------------
    windows = _choose_windows(stats, cfg)
    valid = lm.regular_positions(tokens).cpu()
    eligible = firing_positions(lm, valid)
    effects = _Effects(stats, cfg, windows, eligible, d_model)
    scored = eligible if labels is None else labels != IGNORE  # where a loss is counted
    W_U = lm.model.W_U.detach().float().cpu() if isinstance(getattr(lm.model, "W_U", None), Tensor) else None
    per_run = _seqs_per_run(lm, engine, T)
    effects.evaluate(engine, tokens, pass1_run, W_dec.float(), W_U, latents, scored, per_run, progress, labels)
    importance = effects.importance(stats, cfg)
    scores: dict[tuple[int, int], str | None] | None = None  # a zoo task: the label each position's loss scores
    if lm.task is None:
        strings = _window_strings(lm.tokenizer, tokens, windows["center"], cfg)
    else:  # each token is a label of the task's vocabulary
        shown = (windows["center"] // T).unique().tolist()
        strings = {(seq, p): lm.task.vocab[t] for seq in shown for p, t in enumerate(tokens[seq].tolist())}
        scores = {(seq, p): None if y == IGNORE else lm.task.outputs[y]
                  for seq in shown for p, y in enumerate(labels[seq].tolist())}  # fmt: skip
    pass2 = time.perf_counter() - started - pass1

    meta = {
        "kind": "lm",
        "model": lm.name,
        "hook": hook,
        **({"hook_in": hook_in} if hook_in != hook else {}),
        "sae": {"architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae},
        "tokens": {"sequences": n_seq, "length": T, "counted": stats.n_tokens},
        "config": asdict(cfg),
        "histogram": {"log10_lo": LOG10_LO, "bins_per_decade": BINS_PER_DECADE},
        "approximation": {"direct_path": effects.error_summary(), "gradient": effects.gradient_summary()},
        "ranking": _ranking(stats),
        "seconds": {"statistics": round(pass1, 2), "loss_effects": round(pass2, 2)},
        "latents": latents.tolist(),
        "chosen_by": chosen,
    }
    logits = _logit_effects(lm, effects, cfg.n_logits)
    neighbours = decoder_neighbours(sae.W_dec.detach().float().cpu(), latents, cfg.n_neighbours)
    pages = _assemble(stats, cfg, latents, windows, effects, importance, strings, scores, tokens, logits, neighbours)
    meta["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return Dashboard(meta=meta, latents=pages)


def attribution(acts: Tensor, grad: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """(flat indices [nnz] of the non-zero activations of acts [S, T, d_sae], row-major and ascending as
    `flat_nonzero` finds them; −a_j · W_dec[j] · grad there [nnz]) for gradients grad [S, T, d_in].

    Only where a latent fires (a few dozen latents per token, not d_sae): the entries of grad @ W_decᵀ at the
    firing (token, latent) pairs, a sampled dense-dense product on their sparse pattern, whose cost follows the
    firings."""
    d_sae = acts.shape[-1]
    flat = flat_nonzero(acts.cpu()).to(acts.device) if acts.device.type == "cpu" else acts.flatten().nonzero()[:, 0]
    token, latent = flat // d_sae, flat % d_sae
    g = grad.reshape(-1, grad.shape[-1]).float()
    rows = torch.nn.functional.pad(torch.bincount(token, minlength=len(g)).cumsum(0), (1, 0))
    with warnings.catch_warnings():  # sparse CSR tensors are a "beta" feature of torch, and say so once
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(rows, latent, torch.ones(len(flat), device=g.device), (len(g), d_sae),
                                          check_invariants=False)  # fmt: skip
        dots = torch.sparse.sampled_addmm(pattern, g, W_dec.float().T.to(g.device), beta=0.0).values()
    return flat, -(acts.reshape(-1)[flat].float() * dots)


def _batch_size(lm, sae, T: int, cfg: DashboardConfig) -> int:
    """Few sequences per batch: the latent activations [batch, T, d_sae] and logits [batch, T, d_vocab] stay under
    ENCODE_FLOATS, so they are reused from the heap and stay in cache, where larger blocks would be freshly mapped
    (and page-faulted) memory each time."""
    return max(1, min(cfg.batch_size, ENCODE_FLOATS // (T * max(sae.cfg.d_sae, len(lm.tokenizer)))))


def _attributed_batches(
    lm, sae, tokens: Tensor, hook: str, batch_size: int, read: tuple[str, ...], progress: bool, labels: Tensor | None
):
    """Per batch of sequences: (first sequence, tokens, what `loss_gradient` found, latent activations [S, T, d_sae],
    and (flat indices of their non-zeros, gradient attributions −a_j · W_dec[j] · ∂L/∂x there): the first-order
    change of the loss summed from each position on when latent j's contribution is removed there)."""
    W_dec = sae.W_dec.detach()
    hook_in = latent_hooks(lm, sae, hook)[0]  # a transcoder's latents read its input hook; the gradient is at `hook`
    read = read if hook_in == hook else (*read, hook_in)
    for first in tqdm(range(0, len(tokens), batch_size), desc="activations", disable=not progress, leave=False):
        batch = tokens[first : first + batch_size]
        eligible = eligible_positions(lm.regular_positions(batch).cpu())
        targets = None if labels is None else labels[first : first + batch_size]
        found = loss_gradient(lm, hook, batch, eligible, read, targets)
        acts = _sae_encode(sae, found["x"] if hook_in == hook else found[hook_in])
        yield first, batch, found, acts, attribution(acts, found["grad"], W_dec)


@dataclass
class _KeptBatch:
    """One batch of pass 1 kept sparse (`top:N` ranks every latent before the statistics of the chosen ones), so
    that the statistics need no second forward and backward pass: the same tuple `_attributed_batches` yields."""

    first: int
    tokens: Tensor
    found: dict[str, Tensor]  # what `loss_gradient` found, but the gradient
    shape: tuple[int, ...]  # of the latent activations [S, T, d_sae]
    nonzero: Tensor  # flat indices of their non-zeros
    values: Tensor  # ... their values
    estimate: Tensor  # ... and gradient attributions

    def replay(self) -> tuple[int, Tensor, dict[str, Tensor], Tensor, tuple[Tensor, Tensor]]:
        acts = torch.zeros(self.shape)
        acts.view(-1)[self.nonzero] = self.values
        return self.first, self.tokens, self.found, acts, (self.nonzero, self.estimate)

    def nbytes(self) -> int:
        tensors = (*self.found.values(), self.nonzero, self.values, self.estimate)
        return sum(t.numel() * t.element_size() for t in tensors)


def _rank(lm, d_sae: int, batches, keep_bytes: int = 0) -> tuple[dict[str, list], list[_KeptBatch] | None]:
    """The ranking of `rank_latents` from pass-1 batches, and the batches kept sparse while they fit in
    `keep_bytes` (None where they did not)."""
    estimate = torch.zeros(d_sae, dtype=torch.float64)
    firings = torch.zeros(d_sae, dtype=torch.int64)
    n_tokens, size = 0, 0
    kept: list[_KeptBatch] | None = [] if keep_bytes > 0 else None
    for first, batch, found, acts, (nonzero, est) in batches:
        valid = lm.regular_positions(batch).cpu()
        nonzero, est = nonzero.cpu(), est.cpu()
        values = acts.reshape(-1)[nonzero.to(acts.device)].float().cpu()
        token, latent = nonzero // d_sae, nonzero % d_sae
        firing = (values > 0) & firing_positions(lm, valid).reshape(-1)[token]
        estimate.index_add_(0, latent[firing], est[firing].double())
        firings += torch.bincount(latent[firing], minlength=d_sae)
        n_tokens += int(valid.sum())
        if kept is not None:
            rest = {name: value.cpu() for name, value in found.items() if name != "grad"}
            kept.append(_KeptBatch(first, batch, rest, tuple(acts.shape), nonzero, values, est))
            size += kept[-1].nbytes()
            kept = kept if size <= keep_bytes else None
    return {"per_token": _rounded(estimate / max(n_tokens, 1), 4), "firings": firings.tolist()}, kept


@torch.no_grad()
def rank_latents(
    lm, sae, tokens: Tensor, hook: str, cfg: DashboardConfig, progress: bool = False, labels: Tensor | None = None
) -> dict[str, list]:
    """Every latent of the SAE by the cheap estimate of its importance per token (see `_ranking`), from one forward
    and backward pass over the tokens; what `Top` chooses by."""
    batch_size = _batch_size(lm, sae, tokens.shape[1], cfg)
    return _rank(lm, sae.cfg.d_sae, _attributed_batches(lm, sae, tokens, hook, batch_size, (), progress, labels))[0]


def _recycle_large_blocks() -> None:
    """Have the C allocator recycle pass 1's blocks of up to 32 MB rather than map fresh, page-faulting memory for
    each: glibc keeps blocks on its heap once one of that size has been freed (its mmap threshold adapts upwards).
    Freeing one such block, never touched, costs nothing; other allocators ignore it."""
    torch.empty(2**23 - 2**12)


def _choose_windows(stats: LatentStats, cfg: DashboardConfig) -> dict[str, Tensor]:
    """Windows table: latent (column), centre (flat token index), kind (0 top, 1 + i for interval i), rank. A sampled
    window that would overlap one of the latent's top windows is left out, so each window shows once per latent."""
    k, lat = (stats.top_values > 0).nonzero(as_tuple=True)
    parts = [(lat, stats.top_index[k, lat], torch.zeros_like(lat), k)]
    if cfg.windows_per_interval:
        edges = stats.quantiles([i / cfg.quantile_intervals for i in range(1, cfg.quantile_intervals)])  # [L, n-1]
        values = stats.sample_values  # [R, L] in random (key) order
        interval = (values.T[:, :, None] >= edges[:, None, :].float()).sum(-1).T  # [R, L]
        T = stats.n_positions // max(len(stats.context_tokens), 1)
        top = torch.where(stats.top_values > 0, stats.top_index, -(10**12))  # [K, L]
        same_seq = (stats.sample_index[:, None] // T) == (top[None] // T)  # [R, K, L]
        near = (stats.sample_index[:, None] - top[None]).abs() < cfg.window
        overlaps = (same_seq & near).any(1)  # [R, L]
        for i in range(cfg.quantile_intervals):
            inside = (interval == i) & (stats.sample_index >= 0) & ~overlaps
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
        first, end = max(0, pos - cfg.context_before - MORE_BEFORE), min(T, pos + cfg.context_after + 1 + MORE_AFTER)
        if runs and runs[-1][0] == seq and first <= runs[-1][2]:
            runs[-1][2] = end
        else:
            runs.append([seq, first, end])
    out: dict[tuple[int, int], str] = {}
    for seq, first, end in runs:
        text = token_strings(tokenizer, tokens[seq].tolist(), first, end)
        out.update(zip([(seq, pos) for pos in range(first, end)], text, strict=True))
    return out


def _seqs_per_run(lm, engine: LossEffectEngine, T: int, budget: int = 512 * 2**20) -> int:
    """Sequences per clean run such that its cached residuals and keys/values stay within `budget` bytes."""
    cfg = getattr(lm.model, "cfg", None)
    if cfg is None:
        return 8
    blocks = cfg.n_layers - engine.start
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
        self.win_grad = torch.where(inside, stats.estimate(windows["latent"][:, None], flat), float("nan"))
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
        self.estimate = stats.estimate(self.latent, self.flat)
        self.is_sample = torch.zeros(len(keys), dtype=torch.bool)
        self.is_sample[self.inverse[len(self.win_rows) :]] = True
        # The sample is in key order, so its first `budget` rows are themselves a uniform sample: those get the
        # exact total ΔCE, the rest the same-position one (for logit effects and windows).
        self.is_exact = torch.zeros(len(keys), dtype=torch.bool)
        budget = cfg.exact_budget(L)
        self.is_exact[self.inverse[len(self.win_rows) :][self.sample_r < budget]] = True
        self.exact = torch.full((len(keys),), float("nan"))
        self.direct = torch.full((len(keys),), float("nan"))
        self.next_logit = torch.full((len(keys),), float("nan"))
        self.normed_sum = torch.zeros(L, d_model, dtype=torch.float64)
        self.normed_n = torch.zeros(L, dtype=torch.int64)
        self.win_exact = torch.full(self.win_acts.shape, float("nan"))
        self.win_direct = torch.full(self.win_acts.shape, float("nan"))
        self.sample_exact = torch.full(stats.sample_index.shape, float("nan"))
        self.T, self.n_positions = T, n_positions
        self.eligible_flat = eligible.reshape(-1)
        self._err: dict[str, tuple[Tensor, Tensor]] | None = None

    def evaluate(
        self, engine, tokens, pass1: CleanRun | None, W_dec, W_U, latents, eligible, per_run: int, progress: bool,
        labels=None,
    ) -> None:  # fmt: skip
        """Run the model once over each chunk of the sequences holding pairs (from the residuals at the hooked
        block that pass 1 kept, `pass1`, with its clean losses and final residuals, when given), then every pair of
        the chunk: the total ΔCE (and with it the same-position one) for sampled pairs, the same-position ΔCE alone
        for the others."""
        seq = self.flat // self.T
        needed = seq.unique()
        self.total = torch.full((len(self.flat),), float("nan"), dtype=torch.float64)
        for chunk in tqdm(needed.split(per_run), desc="loss effects", disable=not progress, leave=False):
            if pass1 is None:
                run = engine.clean(tokens[chunk])
            else:
                run = engine.clean(tokens[chunk], pass1.resid_start[chunk])
                device = run.resid_start.device
                run = replace(run, final_resid=pass1.final_resid[chunk].to(device), ce=pass1.ce[chunk].to(device))
            run = with_targets(run, None if labels is None else labels[chunk])
            rows = ((seq >= chunk[0]) & (seq <= chunk[-1])).nonzero().squeeze(1)  # seq is sorted, chunk contiguous
            local = torch.searchsorted(chunk, seq[rows])
            pos = self.flat[rows] % self.T
            delta = self.act[rows, None] * W_dec[latents[self.latent[rows]]].cpu()
            exact = self.is_exact[rows]
            s, w = exact.nonzero().squeeze(1), (~exact).nonzero().squeeze(1)
            self.total[rows[s]], self.exact[rows[s]], clean_s = engine.total_effects(
                run, local[s], pos[s], delta[s], eligible[chunk]
            )
            self.exact[rows[w]], clean_w = engine.loss_effects(run, local[w], pos[w], delta[w])
            delta_res = engine.to_residual(delta.to(W_dec.device))
            if delta_res is None:
                continue
            clean = Clean(torch.empty(len(rows), clean_w.final.shape[1]), torch.empty(len(rows)))
            for part, c in ((s, clean_s), (w, clean_w)):
                clean.final[part], clean.ce[part] = c.final.cpu(), c.ce.cpu()
            # What the loss at a position scores: the next token, or a zoo model's task label (IGNORE: unscored).
            targets = tokens[chunk][local, pos + 1] if labels is None else labels[chunk][local, pos]
            for part in torch.arange(len(rows)).split(1024):  # logits [1024, d_vocab] at a time: reused memory
                direct, normed = engine.direct_effects(clean[part], targets[part], delta_res[part])
                self.direct[rows[part]] = direct
                if W_U is not None:  # the logit change the latent makes for the actual next token (or label)
                    t = targets[part]
                    logit = (normed * W_U[:, t.clamp(min=0)].T).sum(-1)
                    self.next_logit[rows[part]] = torch.where(t != IGNORE, logit, float("nan"))
                sampled = self.is_sample[rows[part]]
                lat = self.latent[rows[part]][sampled]
                self.normed_sum.index_add_(0, lat, normed[sampled].double())
                self.normed_n += torch.bincount(lat, minlength=len(self.normed_n))
        n_win = len(self.win_rows)
        self.win_exact[self.win_rows, self.win_cols] = self.exact[self.inverse[:n_win]]
        self.win_direct[self.win_rows, self.win_cols] = self.direct[self.inverse[:n_win]]
        self.win_logit = torch.full(self.win_acts.shape, float("nan"))
        self.win_logit[self.win_rows, self.win_cols] = self.next_logit[self.inverse[:n_win]]
        self.sample_exact[self.sample_r, self.sample_l] = self.exact[self.inverse[n_win:]]
        # The exactly computed firings, one entry each: context, latent column, total ΔCE, cheap estimate.
        pairs = self.is_exact.nonzero().squeeze(1)
        self.sample_context, self.sample_latent = self.flat[pairs] // self.T, self.latent[pairs]
        self.sample_total = self.total[pairs]
        self.sample_estimate = self.estimate[pairs].double()
        self.sample_same = self.exact[pairs].double()
        self.sample_act = self.act[pairs]

    def importance(self, stats: LatentStats, cfg: DashboardConfig) -> Importance:
        return estimate_importance(
            stats.context_estimate, stats.context_count, stats.context_tokens, self.sample_context,
            self.sample_latent, self.sample_total, self.sample_estimate, cfg.confidence, cfg.min_firings,
            cfg.min_contexts,
        )  # fmt: skip

    def gradient_summary(self) -> dict[str, Any]:
        """How far the gradient attribution is from the exact total ΔCE, over every exactly computed firing."""
        return _error_summary(self.sample_total, self.sample_estimate)

    def latent_errors(self, j: int) -> dict[str, Any]:
        """Latent j's mean |direct − exact same-position ΔCE| over its evaluated positions, and mean |gradient
        attribution − exact total ΔCE| over its exactly computed firings."""
        if self._err is None:
            L = len(self.normed_n)
            self._err = {}
            for name, exact, approx, lat in (("direct_path", self.exact, self.direct, self.latent),
                                             ("gradient", self.sample_total, self.sample_estimate,
                                              self.sample_latent)):  # fmt: skip
                err = (approx.double() - exact.double()).abs()
                ok = err.isfinite()
                total = torch.zeros(L, dtype=torch.float64).index_add_(0, lat[ok], err[ok])
                self._err[name] = (total, torch.bincount(lat[ok], minlength=L))
        return {name: _round(total[j].item() / n[j].item()) if n[j] else None for name, (total, n) in self._err.items()}

    def error_summary(self) -> dict[str, Any]:
        """How far the direct-path approximation is from the exact same-position ΔCE, over every evaluated
        position."""
        return _error_summary(self.exact, self.direct)


def _error_summary(exact: Tensor, approx: Tensor) -> dict[str, Any]:
    """Pearson r, mean |error| and friends of an approximation against exact values, over the finite pairs."""
    ok = approx.isfinite() & exact.isfinite()
    exact, approx = exact[ok].double(), approx[ok].double()
    if len(exact) < 2:
        return {"positions": len(exact)}
    err = approx - exact
    r = torch.corrcoef(torch.stack([exact, approx]))[0, 1].item()
    return {
        "positions": len(exact),
        "mean_abs_exact": _round(exact.abs().mean().item()),
        "mean_abs_error": _round(err.abs().mean().item()),
        "rms_error": _round(err.square().mean().sqrt().item()),
        "max_abs_error": _round(err.abs().max().item()),
        "pearson_r": _round(r),
    }


def _ranking(stats: LatentStats) -> dict[str, list]:
    """Every latent of the SAE by the cheap estimate of its importance per token (gradient attribution summed over
    its firings / tokens scanned), with its firings: what `--features top:N` ranks by."""
    per_token = stats.rank_estimate / max(stats.n_tokens, 1)
    return {"per_token": _rounded(per_token, 4), "firings": stats.rank_count.tolist()}


def _logit_effects(lm, effects: _Effects, n: int) -> list[dict[str, Any] | None]:
    """Per latent: the n most promoted and suppressed tokens, W_U applied to the mean normed-residual change. A zoo
    model's logits are its task's outputs (labelled by `task.outputs`): with few of them, what fits, each output
    listed once (the top half promoted, the bottom half suppressed)."""
    model = lm.model
    if not hasattr(model, "W_U") or effects.normed_n.sum() == 0:
        return [None] * len(effects.normed_n)
    W_U = model.W_U.detach().float().cpu()
    n_top, n_bottom = min(n, (W_U.shape[1] + 1) // 2), min(n, W_U.shape[1] // 2)
    out: list[dict[str, Any] | None] = []
    seen: dict[int, str] = {}

    def label(token_id: int) -> str:  # the same tokens recur across latents: decode each once
        if token_id not in seen:
            seen[token_id] = token_label(lm.tokenizer, token_id) if lm.task is None else lm.task.outputs[token_id]
        return seen[token_id]

    for start in range(0, len(effects.normed_n), 512):
        counts = effects.normed_n[start : start + 512]
        mean = (effects.normed_sum[start : start + 512] / counts.clamp(min=1)[:, None]).float()
        logits = mean @ W_U  # [chunk, d_vocab]
        top_v, top_i = logits.topk(n_top, dim=1)
        bot_v, bot_i = logits.scatter(1, top_i, math.inf).topk(n_bottom, dim=1, largest=False)  # none listed twice
        for j in range(len(counts)):
            if counts[j] == 0:
                out.append(None)
                continue
            labels = lambda ids: [label(t) for t in ids.tolist()]  # noqa: E731
            out.append({
                "top": _pairs(labels(top_i[j]), top_v[j].tolist()),
                # The next token among the most promoted (`_helps`): a zoo model's outputs are not next tokens.
                "ids": top_i[j].tolist() if lm.task is None else [],
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


def _assemble(
    stats, cfg, latents, windows, effects, importance, strings, scores, tokens, logits, neighbours
) -> list[dict]:
    T = tokens.shape[1]
    edges = stats.quantiles([i / cfg.quantile_intervals for i in range(cfg.quantile_intervals + 1)])
    span = cfg.window
    grid: dict[str, list] = {"center": windows["center"].tolist(), "kind": windows["kind"].tolist()}
    for name, values in (("acts", effects.win_acts), ("loss", effects.win_exact), ("direct", effects.win_direct),
                         ("grad", effects.win_grad), ("logit", effects.win_logit)):  # fmt: skip
        flat = _rounded(values.flatten())
        grid[name] = [flat[i : i + span] for i in range(0, len(flat), span)]
    by_latent = [[] for _ in range(len(latents))]
    for row, l in enumerate(windows["latent"].tolist()):
        by_latent[l].append(row)
    helps = _helps(stats, cfg, effects, importance, tokens, logits, edges)
    parts = PageParts(
        errors=[effects.latent_errors(j) for j in range(len(latents))],
        helps=helps,
        logits=[None if lg is None else {k: v for k, v in lg.items() if k != "ids"} for lg in logits],
        windows=[
            _latent_windows(by_latent[j], grid, strings, scores, cfg, T, edges[j].tolist()) for j in range(len(latents))
        ],
    )
    return build_pages(stats, importance, latents, neighbours, parts)


def _helps(stats, cfg, effects, importance: Importance, tokens: Tensor, logits, edges: Tensor) -> list[dict]:
    """When each latent helps: the mean total ΔCE of its firings in each activation quantile interval (the same
    control-variate estimator as the importance, within the interval), the fraction of exactly computed firings
    where removing it raises the loss, and how often the actual next token is among its most promoted tokens."""
    L, n = len(stats.count), cfg.quantile_intervals
    latent = stats.store_keys // stats.n_positions
    flat = stats.store_keys % stats.n_positions
    eligible = effects.eligible_flat[flat]
    inner = edges[:, 1:-1].float()  # [L, n − 1]
    interval = (stats.store_values[:, None] >= inner[latent]).sum(1)
    key = latent * n + interval
    est = torch.where(eligible, stats.store_estimate.double(), 0.0)
    est_sum = torch.zeros(L * n, dtype=torch.float64).index_add_(0, key, est)
    count = torch.zeros(L * n, dtype=torch.int64).index_add_(0, key, eligible.long())
    scale = importance.firings.double() / importance.exact.clamp(min=1)
    s_lat = effects.sample_latent
    s_int = (effects.sample_act[:, None] >= inner[s_lat]).sum(1)
    residual = (effects.sample_total - effects.sample_estimate) * scale[s_lat]
    ok = residual.isfinite()
    est_sum.index_add_(0, (s_lat * n + s_int)[ok], residual[ok])
    mean = (est_sum / count.clamp(min=1)).view(L, n)
    count = count.view(L, n)
    raises = torch.zeros(L).index_add_(0, s_lat[ok], (effects.sample_total[ok] > 0).float())
    exact_n = torch.bincount(s_lat[ok], minlength=L)
    # The actual next token among the latent's 10 most promoted tokens, over every eligible firing.
    hits = torch.full((L,), float("nan"))
    top_ids = torch.full((L, 10), -1, dtype=torch.long)
    for j, lg in enumerate(logits):
        if lg is not None:
            top_ids[j, : len(lg["ids"][:10])] = torch.tensor(lg["ids"][:10])
    next_token = tokens.reshape(-1)[(flat + 1).clamp(max=tokens.numel() - 1)]
    hit = (top_ids[latent] == next_token[:, None]).any(1) & eligible
    hit_sum = torch.zeros(L).index_add_(0, latent, hit.float())
    elig_n = torch.zeros(L).index_add_(0, latent, eligible.float())
    has = top_ids[:, 0] >= 0
    hits[has] = hit_sum[has] / elig_n[has].clamp(min=1)
    out = []
    for j in range(L):
        out.append({
            "intervals": [
                {"q": [i / n, (i + 1) / n], "lo": _round(edges[j, i].item()), "hi": _round(edges[j, i + 1].item()),
                 "firings": int(count[j, i]), "mean_total": _round(mean[j, i].item()) if count[j, i] else None}
                for i in range(n)
            ],
            "raises_loss": _round(raises[j].item() / exact_n[j].item(), 4) if exact_n[j] else None,
            "raises_loss_n": int(exact_n[j]),
            "next_token_in_top10": _round(hits[j].item(), 4),
        })  # fmt: skip
    return out


def _latent_windows(rows, grid, strings, scores, cfg, T, edges) -> dict[str, Any]:
    """Top windows, then for each equal-probability interval [q_i, q_i+1] of the non-zero activations its
    sampled windows. `grid` holds, per window row, its centre, kind and rounded per-position values; `scores`
    (a zoo task's) the label each position's loss scores (None where unscored)."""
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
        window |= {name: grid[name][row][lo:hi] for name in ("acts", "loss", "direct", "grad", "logit")}
        if scores is not None:  # the page shows the task's label at each position instead of the next token
            window["labels"] = [scores[seq, p] for p in range(start, end)]
        # More context, shown when the window is clicked, and the token after it (the last one's next token).
        window["before"] = [strings[seq, p] for p in range(max(0, start - MORE_BEFORE), start)]
        window["after"] = [strings[seq, p] for p in range(end, min(T, end + MORE_AFTER))]
        kind = grid["kind"][row]
        (top if kind == 0 else intervals[kind - 1]["windows"]).append(window)
    return {"top": top, "intervals": intervals}
