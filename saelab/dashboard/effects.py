"""Loss effects of single latents at single positions: exact (re-running the model after the hook) and direct-path.

The loss effect of latent j at position p is the change in the next-token cross-entropy at p when the latent's
contribution `a_jp · W_dec[j]` is removed from the hooked activation at p, everything else (the SAE error term
included) left as it is:

    ΔCE = CE(tokens[p+1] | activation at p − a_jp W_dec[j]) − CE(tokens[p+1] | clean)

Positive means the latent helps predict the next token. Two ways to compute it:

- `reference_loss_effects`: the plain definition, one forward pass of the whole model per (latent, position),
  batched over the pairs of a sequence. Works for any `LanguageModel` (TransformerLens or Hugging Face).
- `Downstream.loss_effects`: the same numbers, fast, for TransformerLens models. Removing the contribution at p
  cannot change anything at positions before p (attention is causal), so the keys and values of positions < p are
  the clean ones. We cache them once per sequence and re-run *only position p*, and only the blocks from the hooked
  one on: each pair costs one position of the downstream blocks instead of a whole forward pass. Pairs at nearby
  positions share one batched run (each row's cache padded to the longest and the padding masked out), so a
  dashboard needs a few dozen runs rather than one per position.

`Downstream.direct_effects` is the cheap approximation: remove the contribution from the final residual stream only
(skipping the blocks after the hook), then apply the model's own final norm and unembedding. The same pass gives the
exact change the latent makes to the normed final residual, `norm(x) − norm(x − a·d)`, whose mean over positions,
multiplied by W_U, is the latent's logit effect (see `saelab.dashboard.compute`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.errors import SaelabError

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_NOT_PER_POSITION = ("hook_attn_scores", "hook_pattern")
CLEAN_FLOATS = 2**21  # attention scores computed at once by a clean run (8 MB)
POSITIONS_PER_RUN = 16  # nearby positions share a single-position run (fewer, larger runs)
RUN_FLOATS = 2**20  # cached keys gathered for one single-position run, per block (4 MB)
TOTAL_POSITIONS = 8192  # positions re-run at once by a total-effect run
CE_ROWS = 1024  # positions whose CE one call computes in the total-effect runs
UNDERFLOW_CE = 80.0  # a CE above this is taken from log_softmax (the target's probability is below 1e-35)
UNEMBED_ROWS = 256  # positions unembedded at once (logits [UNEMBED_ROWS, d_vocab], 4 MB for 4096 tokens: in cache)


def next_token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy [...] of logits [..., d_vocab] against target ids [...], in float32."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1).to(flat.device), reduction="none").view(targets.shape)


@torch.no_grad()
def reference_loss_effects(lm, hook: str, tokens: Tensor, seq: Tensor, pos: Tensor, delta: Tensor) -> Tensor:
    """ΔCE [n] for removing `delta [n, d_in]` from the activation at `hook`, position `pos[i]` of `tokens[seq[i]]`.

    The plain definition: the whole sequence runs once per pair (pairs of one sequence share a batch).
    `tokens` is [n_seq, T]; every `pos` must be < T − 1 so that a next token exists.
    """
    out = torch.empty(len(seq), dtype=torch.float32)
    for rows, p, clean, ablated in _ablated_losses(lm, hook, tokens, seq, pos, delta):
        out[rows] = (ablated[torch.arange(len(rows)), p] - clean[p]).float().cpu()
    return out


def _ablated_losses(
    lm, hook: str, tokens: Tensor, seq: Tensor, pos: Tensor, delta: Tensor, per_pass: int = 64
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(rows, pos [n], clean CE [T − 1], ablated CE [n, T − 1]) for batches of pairs of one sequence: whole forward
    passes, row i removing delta[rows[i]] at pos[rows[i]] of tokens[seq[rows[i]]] only."""
    for s in seq.unique().tolist():
        rows = (seq == s).nonzero().squeeze(1)
        seq_tokens = tokens[s : s + 1].to(lm.device)
        clean = lm.loss_per_token(seq_tokens)[0]  # [T − 1]
        for chunk in rows.split(per_pass):
            p = pos[chunk].to(lm.device)
            d = delta[chunk].to(lm.device)

            def remove(x: Tensor, p: Tensor = p, d: Tensor = d) -> Tensor:
                x = x.clone()
                x[torch.arange(len(p), device=x.device), p] -= d.to(x.dtype)
                return x

            yield chunk, p, clean, lm.loss_per_token(seq_tokens.expand(len(chunk), -1), {hook: remove})


def later_loss_mask(eligible: Tensor, pos: Tensor) -> Tensor:
    """[n, T] positions whose next-token loss enters the total effect of an ablation at pos[i]: pos[i] itself and
    every later position of the context, where the loss is counted (`eligible`, [n, T], per row)."""
    return eligible & (torch.arange(eligible.shape[1], device=eligible.device)[None] >= pos[:, None])


@torch.no_grad()
def reference_total_effects(
    lm, hook: str, tokens: Tensor, seq: Tensor, pos: Tensor, delta: Tensor, eligible: Tensor
) -> Tensor:
    """Total ΔCE [n]: the change of the next-token loss summed over position pos[i] and every later eligible
    position of tokens[seq[i]] (`eligible` [n_seq, T]), when delta [n, d_in] is removed at pos[i] only.

    The plain definition: one whole forward pass per pair (pairs of one sequence share a batch)."""
    out = torch.empty(len(seq), dtype=torch.float64)
    for rows, p, clean, ablated in _ablated_losses(lm, hook, tokens, seq, pos, delta):
        mask = later_loss_mask(eligible[seq[rows]].to(p.device), p)[:, :-1]
        out[rows] = ((ablated.double() - clean.double()) * mask).sum(1).cpu()
    return out


def unembed_ce(
    model, normed: Tensor, targets: Tensor, weights: Tensor | None = None, rows: int = UNEMBED_ROWS
) -> tuple[Tensor, Tensor | None]:
    """(Next-token CE [n] (float32) of targets [n] from normed final residuals [n, d_model] through a TransformerLens
    model's unembedding and logit soft cap; given `weights` [n], also the gradient of Σ weights · CE w.r.t. the
    normed residuals [n, d_model], in closed form: (softmax − onehot), through the soft cap, @ W_Uᵀ · weight.)

    The same numbers as `next_token_ce` of the model's logits and its autograd backward, but the logits are made
    `rows` positions at a time and never kept: a block that stays in cache, reused for the softmax and its
    gradient, where autograd would keep the whole batch's logits and write the softmax's gradient beside them.
    The CE is −log of the target's softmax probability (log_softmax's to float32 rounding, and free beside the
    gradient's softmax), log_softmax's where that probability underflows. Every loss of a dashboard comes from
    here, so a clean loss from one call and an ablated one from another are the same computation."""
    W_U, b_U, cap = model.W_U, model.b_U, model.cfg.output_logits_soft_cap

    def capped_logits(h: Tensor) -> Tensor:
        logits = torch.addmm(b_U, h.to(W_U.dtype), W_U).float()
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    ce = torch.empty(len(normed), dtype=torch.float32, device=normed.device)
    grad = None if weights is None else torch.empty(normed.shape, dtype=torch.float32, device=normed.device)
    for i in range(0, len(normed), rows):
        t = targets[i : i + rows].to(normed.device)
        logits = capped_logits(normed[i : i + rows])
        probs = torch.softmax(logits, 1)
        ce[i : i + rows] = -probs.gather(1, t[:, None])[:, 0].log()
        if weights is None:
            continue
        probs[torch.arange(len(t), device=t.device), t] -= 1
        if cap > 0:
            probs *= 1 - (logits / cap).square()  # d(cap · tanh(z / cap)) / dz
        grad[i : i + rows] = (probs.to(W_U.dtype) @ W_U.T) * weights[i : i + rows, None].to(grad)
    low = (ce > UNDERFLOW_CE).nonzero().squeeze(1)  # a probability below 1e-35: −log of it loses precision
    if len(low):
        logits = capped_logits(normed[low])
        ce[low] = -torch.log_softmax(logits, 1).gather(1, targets[low.to(targets.device)].to(low.device)[:, None])[:, 0]
    return ce, grad


def loss_gradient(
    lm,
    hook: str,
    tokens: Tensor,
    eligible: Tensor,
    read: tuple[str, ...] = (),
    targets: Tensor | None = None,
    fast: bool = True,
) -> dict[str, Tensor]:
    """One forward and one backward pass over tokens [S, T]: {"grad": ∂L/∂x [S, T, d_in], "x": the activation x at
    `hook` [S, T, d_in], each name in `read`: its activation, and for the next-token loss "ce": the clean CE at
    every position [S, T] (float32, NaN at the last)}, where L is the next-token loss summed over the eligible
    positions [S, T].

    Since attention is causal, the gradient at position p is that of the loss summed over p and every later
    position, so `−a · W_dec[j] · grad[p]` is the first-order estimate of latent j's total ΔCE at p (attribution
    patching). Only the activation's gradient is computed, not the weights'. A zoo model's loss is its task's:
    given `targets` [S, T] (labels, IGNORE where not scored), L is the CE against them at every scored position.

    `fast` (TransformerLens models, next-token loss, no autocast, a hook before the final norm): the loss's
    gradient w.r.t. the normed final residual is written in closed form (`unembed_ce`) and autograd runs only from
    there back to the hook; otherwise (and with fast=False, the reference) autograd differentiates the loss of the
    full logits."""
    from transformer_lens import HookedTransformer

    found: dict[str, Tensor] = {}

    def leaf(x: Tensor) -> Tensor:
        found["x"] = x.detach().requires_grad_(True)
        return found["x"]

    def reader(name: str):
        def read_(x: Tensor) -> Tensor:
            found[name] = x.detach()
            return x

        return read_

    replace = {name: reader(name) for name in read if name != hook} | {hook: leaf}
    model = lm.model
    fused = (
        fast
        and targets is None
        and not lm.bf16
        and isinstance(model, HookedTransformer)
        and not hook.startswith(("ln_final.", "unembed."))
    )
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # weights that need no gradient keep autograd from recording anything but what follows the hook
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            if fused:
                with lm.replaced(replace):
                    resid = model(tokens.to(lm.device), stop_at_layer=model.cfg.n_layers)
                root = model.ln_final(resid) if model.cfg.normalization_type is not None else resid
                S, T, d = root.shape
                with torch.no_grad():
                    weights = eligible[:, :-1].reshape(-1).to(root.device, torch.float32)
                    ce, g = unembed_ce(model, root[:, :-1].reshape(-1, d), tokens[:, 1:].reshape(-1), weights)
                root_grad = torch.zeros(S, T, d, dtype=root.dtype, device=root.device)
                root_grad[:, :-1] = g.view(S, T - 1, d).to(root.dtype)
            elif targets is None:
                logits = lm.logits(tokens, replace)[:, :-1]
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1).to(logits.device),
                                     reduction="none")  # fmt: skip
                root, root_grad = ce @ eligible[:, :-1].reshape(-1).to(ce), None
            else:  # cross_entropy ignores the unscored positions (IGNORE = its ignore_index)
                logits = lm.logits(tokens, replace)
                root = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1).to(logits.device), reduction="sum")
                root_grad, ce = None, None
            x = found["x"]
            grad = torch.autograd.grad(root, x, root_grad)[0] if root.requires_grad else torch.zeros_like(x)
    finally:
        for p in params:
            p.requires_grad_(True)
    out = {"grad": grad.detach().float(), "x": x.detach()}
    if ce is not None:
        S, T = tokens.shape
        out["ce"] = F.pad(ce.detach().float().view(S, T - 1), (0, 1), value=float("nan"))
    for name in read:
        out[name] = out["x"] if name == hook else found[name]
    return out


@dataclass
class CleanRun:
    """What a clean forward pass over a batch of sequences leaves for the single-position re-runs."""

    tokens: Tensor  # [S, T]
    x_hook: Tensor | None = None  # [S, T, d_in] the SAE's input (None when the run started at a cached residual)
    # [S, T] next-token cross-entropy, NaN at the last position: the reference engine's, or (with final_resid) the
    # dashboard's first pass's, from which the fast re-runs take the clean loss instead of running clean rows.
    ce: Tensor | None = None
    resid_start: Tensor | None = None  # [S, T, d_model] the residual stream entering block `start`
    final_resid: Tensor | None = None  # [S, T, d_model] the residual stream entering the final norm
    keys: list[Tensor] | None = None  # per block from `start` on: [S, T, n_kv_heads, d_head], as cached
    values: list[Tensor] | None = None
    targets: Tensor | None = None  # [S, T] a zoo model's task labels (IGNORE where not scored); None: next tokens


@dataclass
class Clean:
    """Clean values at re-run positions: the final residual [n, d_model] and the next-token CE [n]."""

    final: Tensor
    ce: Tensor

    def __getitem__(self, rows: Tensor) -> Clean:
        return Clean(self.final[rows], self.ce[rows])


class LossEffectEngine(Protocol):
    """What `compute_dashboard` and the live view need from a loss-effect engine (`Downstream` for TransformerLens
    models, `ReferenceDownstream` for any model)."""

    start: int  # the block the re-runs start at (0: whole forward passes)
    start_name: str | None  # the residual stream they start from, which pass 1 may keep (None: nothing to keep)
    final_name: str | None  # the final residual stream (before the final norm), which pass 1 keeps with it
    hook_is_start: bool  # whether the SAE's input is that residual stream itself

    def clean(self, tokens: Tensor, resid_start: Tensor | None = None) -> CleanRun: ...

    def clean_ce(self, run: CleanRun, seq: Tensor, pos: Tensor) -> Tensor: ...

    def loss_effects(self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor) -> tuple[Tensor, Clean | None]: ...

    def total_effects(
        self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor, eligible: Tensor
    ) -> tuple[Tensor, Tensor, Clean | None]: ...

    def to_residual(self, delta: Tensor) -> Tensor | None: ...

    def direct_effects(self, clean: Clean, targets: Tensor, delta_res: Tensor) -> tuple[Tensor, Tensor]: ...


class ReferenceDownstream:
    """The same interface as `Downstream` on top of `reference_loss_effects`: any model, no direct path."""

    start = 0
    start_name = None
    final_name = None
    hook_is_start = False

    def __init__(self, lm, hook: str) -> None:
        self.lm = lm
        self.hook = lm.check_hook(hook)

    @torch.no_grad()
    def clean(self, tokens: Tensor, resid_start: Tensor | None = None) -> CleanRun:
        tokens = tokens.to(self.lm.device)
        ce = torch.full(tokens.shape, float("nan"), device=tokens.device)
        ce[:, :-1] = self.lm.loss_per_token(tokens)
        return CleanRun(tokens=tokens, x_hook=self.lm.activations(tokens, [self.hook])[self.hook], ce=ce)

    def clean_ce(self, run: CleanRun, seq: Tensor, pos: Tensor) -> Tensor:
        return run.ce[seq.to(run.ce.device), pos.to(run.ce.device)].cpu()

    def loss_effects(self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor) -> tuple[Tensor, None]:
        return reference_loss_effects(self.lm, self.hook, run.tokens, seq, pos, delta), None

    def total_effects(
        self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor, eligible: Tensor
    ) -> tuple[Tensor, Tensor, None]:
        total = reference_total_effects(self.lm, self.hook, run.tokens, seq, pos, delta, eligible)
        return total, self.loss_effects(run, seq, pos, delta)[0], None

    def to_residual(self, delta: Tensor) -> Tensor | None:
        return None  # no direct path, so direct_effects is never called

    def direct_effects(self, clean: Clean, targets: Tensor, delta_res: Tensor) -> tuple[Tensor, Tensor]:
        raise SaelabError("the reference engine has no direct path")


def downstream(lm, hook: str, fast: bool = True) -> LossEffectEngine:
    """The fast single-position re-run for TransformerLens models, the plain reference for anything else."""
    from transformer_lens import HookedTransformer

    if fast and isinstance(lm.model, HookedTransformer):
        return Downstream(lm, hook)
    return ReferenceDownstream(lm, hook)


class Downstream:
    """Exact and direct-path loss effects for one TransformerLens model and hook, re-running one position at a time.

    The run starts at the block holding the hook (`blocks.L.hook_resid_post` is the same tensor as
    `blocks.{L+1}.hook_resid_pre`, so it starts one block later), feeds it the clean residual stream of position p,
    subtracts the contribution at the hook point itself, and attends to the cached clean keys and values of
    positions < p. Rotary embeddings see the right position because the cache's length is p, or, for a row whose
    cache is padded, because TransformerLens counts positions on the attention mask.
    """

    def __init__(self, lm, hook: str, max_rows: int = 1024) -> None:
        from transformer_lens import HookedTransformer

        if not isinstance(lm.model, HookedTransformer):
            raise SaelabError("exact fast loss effects need a TransformerLens model; use reference_loss_effects")
        self.lm = lm
        self.model: HookedTransformer = lm.model
        self.hook = hook
        self.max_rows = max_rows
        self.positions_per_run = POSITIONS_PER_RUN if _pads_safely(self.model.cfg) else 1
        cfg = self.model.cfg
        match = _BLOCK_HOOK.match(hook)
        if match is None or hook.endswith(_NOT_PER_POSITION) or hook not in self.model.hook_dict:
            raise SaelabError(
                f"loss effects need a per-position hook inside a transformer block (e.g. blocks.0.hook_resid_post), "
                f"not '{hook}'"
            )
        if cfg.positional_embedding_type == "shortformer":
            raise SaelabError("loss effects do not support shortformer position embeddings; use a standard model")
        layer, name = int(match.group(1)), match.group(2)
        self.layer = layer
        if name == "hook_resid_post" and layer + 1 < cfg.n_layers:
            self.start, self.point = layer + 1, f"blocks.{layer + 1}.hook_resid_pre"
        else:
            self.start, self.point = layer, hook
        self.suffix = name

    # ------------------------------------------------------------------------------------------------ clean run

    @property
    def start_name(self) -> str:
        """The residual stream the single-position runs start from."""
        return f"blocks.{self.start}.hook_resid_pre"

    @property
    def hook_is_start(self) -> bool:
        """Whether the SAE's input is itself the residual stream at `start` (resid_pre, or resid_post one block
        earlier), so whoever has the SAE inputs has the starting residuals too."""
        return self.point == self.start_name

    @torch.no_grad()
    def clean(self, tokens: Tensor, resid_start: Tensor | None = None, per_pass: int | None = None) -> CleanRun:
        """The clean keys and values of tokens [S, T] for every block from `start` on (no unembedding: clean losses
        are only needed at the re-run positions, where the single-position runs compute them).

        Without `resid_start` the whole model runs and the run also keeps the SAE input and the final residual.
        Given the residual stream at `start` [S, T, d_model] from an earlier pass, only blocks from `start` on run,
        and the last one stops as soon as its keys and values are cached (its attention output and MLP are only
        needed at the re-run positions).

        The model runs on `per_pass` sequences at a time (by default, as many as keep the attention scores
        [n, heads, T, T] within CLEAN_FLOATS: a working memory that stays in cache); the parts are then joined.
        """
        n = per_pass or max(1, CLEAN_FLOATS // (self.model.cfg.n_heads * tokens.shape[1] ** 2))
        parts = [
            self._clean(tokens[i : i + n], None if resid_start is None else resid_start[i : i + n])
            for i in range(0, len(tokens), n)
        ]
        if len(parts) == 1:
            return parts[0]

        def join(tensors: list[Tensor | None]) -> Tensor | None:
            return None if tensors[0] is None else torch.cat(tensors)

        return CleanRun(
            tokens=join([part.tokens for part in parts]),
            x_hook=join([part.x_hook for part in parts]),
            resid_start=join([part.resid_start for part in parts]),
            final_resid=join([part.final_resid for part in parts]),
            keys=[join(block) for block in zip(*(part.keys for part in parts), strict=True)],
            values=[join(block) for block in zip(*(part.values for part in parts), strict=True)],
        )

    def _clean(self, tokens: Tensor, resid_start: Tensor | None) -> CleanRun:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        model, cfg = self.model, self.model.cfg
        tokens = tokens.to(self.lm.device)
        kv = TransformerLensKeyValueCache.init_cache(cfg, self.lm.device, tokens.shape[0])
        x_hook = final = None
        if resid_start is None:
            names = {self.hook, self.start_name, self.final_name}
            # An explicit all-ones mask: with a cache, TransformerLens would mask trailing BOS tokens as padding.
            _, cache = model.run_with_cache(tokens, names_filter=names.__contains__, past_kv_cache=kv,
                                            attention_mask=torch.ones_like(tokens), return_type=None)  # fmt: skip
            x_hook, resid_start, final = cache[self.hook].flatten(2), cache[self.start_name], cache[self.final_name]
        else:
            resid_start = resid_start.to(self.lm.device)
            last_scores = f"blocks.{cfg.n_layers - 1}.attn.hook_attn_scores"
            with contextlib.suppress(_Stop), model.hooks(fwd_hooks=[(last_scores, _stop)]):
                model(resid_start, start_at_layer=self.start, past_kv_cache=kv, return_type=None)
        return CleanRun(
            tokens=tokens,
            x_hook=x_hook,
            resid_start=resid_start,
            final_resid=final,
            keys=[kv.entries[i].past_keys for i in range(self.start, cfg.n_layers)],
            values=[kv.entries[i].past_values for i in range(self.start, cfg.n_layers)],
        )

    @property
    def final_name(self) -> str:
        return f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"

    def _ce_from_final(self, final: Tensor, targets: Tensor) -> Tensor:
        """CE [n] of the next tokens from final residuals [n, d_model], through the model's norm and unembedding."""
        return unembed_ce(self.model, self.final_norm(final), targets)[0]

    @torch.no_grad()
    def clean_ce(self, run: CleanRun, seq: Tensor, pos: Tensor) -> Tensor:
        """Clean next-token CE [n] at (seq[i], pos[i]), from a full clean run (one made without `resid_start`)."""
        device = run.final_resid.device
        seq, pos = seq.to(device), pos.to(device)
        out = [self._ce_from_final(run.final_resid[s, p], run.tokens[s, p + 1]) for s, p in
               zip(seq.split(self.max_rows), pos.split(self.max_rows), strict=True)]  # fmt: skip
        return torch.cat(out).cpu() if out else torch.zeros(0)

    # ---------------------------------------------------------------------------------------------- exact ΔCE

    @torch.no_grad()
    def loss_effects(self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor) -> tuple[Tensor, Clean]:
        """Exact ΔCE [n] for removing delta [n, d_in] at (run.tokens[seq[i]], pos[i]) (every pos < T − 1), and the
        clean final residual and loss there, which the direct path starts from."""
        device = run.resid_start.device
        dce = torch.empty(len(seq), dtype=torch.float32, device=device)
        clean = Clean(torch.empty(len(seq), self.model.cfg.d_model, device=device), torch.empty_like(dce))
        seq, pos, delta = seq.to(device), pos.to(device), delta.to(device)
        # The hooks stay on for all runs (adding and removing them costs more than a small run); each run sets the
        # delta it removes and reads back the final residual.
        state: dict[str, Tensor] = {}

        def remove(act: Tensor, hook) -> Tensor:  # act [rows, 1, ...]: the one position each row re-runs
            return act - state["delta"].view(act.shape).to(act.dtype)

        def keep(act: Tensor, hook) -> None:
            state["final"] = act[:, 0]

        width = run.keys[0].shape[2:].numel()  # floats per cached key
        group = pos // self.positions_per_run
        with self.model.hooks(fwd_hooks=[(self.point, remove), (self.final_name, keep)]):
            for g in group.unique().tolist():
                rows = (group == g).nonzero().squeeze(1)
                per_run = min(self.max_rows, max(1, RUN_FLOATS // (width * (int(pos[rows].max()) + 1))))
                for part in rows.split(per_run):
                    dce[part], clean.final[part], clean.ce[part] = self._run(
                        run, seq[part], pos[part], delta[part], state
                    )
        return dce.cpu(), clean

    def _run(
        self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor, state: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One single-position run for nearby positions: the n ablated rows plus one clean row (zero delta) per
        (sequence, position), so the clean loss comes from the very same computation. Each row attends to the
        clean keys and values before its own position; rows below the run's longest cache have the rest masked."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        n, T = len(seq), run.tokens.shape[1]
        clean_at, which = (seq * T + pos).unique(return_inverse=True)
        rows, at = torch.cat([seq, clean_at // T]), torch.cat([pos, clean_at % T])
        state["delta"] = torch.cat([delta, delta.new_zeros(len(clean_at), delta.shape[1])])
        length = int(at.max())
        visible = torch.arange(length + 1, device=at.device)[None] < at[:, None]  # [rows, length + 1] keys before
        visible[:, -1] = True  # ... and the row's own
        entries = [TransformerLensKeyValueCacheEntry(run.keys[0][:0], run.values[0][:0], frozen=True)] * self.start
        for k, v in zip(run.keys, run.values, strict=True):
            # Slicing before selecting rows copies contiguous runs, several times faster than k[rows, :length].
            k, v = k[:, :length].index_select(0, rows), v[:, :length].index_select(0, rows)
            entries.append(TransformerLensKeyValueCacheEntry(k, v, frozen=True))
        past = TransformerLensKeyValueCache(entries, visible[:, :-1].long(), frozen=True)
        mask = None if int(at.min()) == length else visible.long()  # rotary positions are counted on the mask too
        resid = run.resid_start[rows, at][:, None]  # [rows, 1, d_model]
        self.model(resid, start_at_layer=self.start, past_kv_cache=past, attention_mask=mask, return_type=None)
        ce = self._ce_from_final(state["final"], run.tokens[rows, at + 1])
        clean_ce = ce[n:][which]
        return ce[:n] - clean_ce, state["final"][n:][which], clean_ce

    # -------------------------------------------------------------------------------------------- total ΔCE

    @torch.no_grad()
    def total_effects(
        self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor, eligible: Tensor
    ) -> tuple[Tensor, Tensor, Clean]:
        """Total ΔCE [n] (float64) for removing delta [n, d_in] at (run.tokens[seq[i]], pos[i]) only: the change
        of the next-token loss summed over pos[i] and every later eligible position (`eligible` [S, T] for the
        run's sequences); also the same-position ΔCE [n] and the clean final residual and loss at pos[i].

        A removal at p changes nothing before p, so each row re-runs the positions from p on, from the hooked
        block, attending to the clean keys and values before them. Rows whose p falls in the same group of
        POSITIONS_PER_RUN positions share one run that starts at the group's first position (a cache of the same
        length for every row, so nothing is padded). The clean losses are the run's own (`CleanRun.ce`, from the
        dashboard's first pass) where it has them; otherwise one clean row per sequence and group rides along, so
        the loss change is the difference of two rows of the very same computation."""
        device = run.resid_start.device
        n, T = len(seq), run.tokens.shape[1]
        total = torch.empty(n, dtype=torch.float64, device=device)
        same = torch.empty(n, dtype=torch.float32, device=device)
        clean = Clean(torch.empty(n, self.model.cfg.d_model, device=device), torch.empty(n, device=device))
        seq, pos, delta, eligible = seq.to(device), pos.to(device), delta.to(device), eligible.to(device)
        state: dict[str, Tensor] = {}

        def remove(act: Tensor, hook) -> Tensor:  # act [rows, T − first, ...]
            act = act.clone()
            rows = torch.arange(len(act), device=act.device)
            act[rows, state["at"]] -= state["delta"].view(len(act), *act.shape[2:]).to(act.dtype)
            return act

        def keep(act: Tensor, hook) -> None:
            state["final"] = act

        group = pos // POSITIONS_PER_RUN
        with self.model.hooks(fwd_hooks=[(self.point, remove), (self.final_name, keep)]):
            for g in group.unique().tolist():
                rows = (group == g).nonzero().squeeze(1)
                first = g * POSITIONS_PER_RUN
                # At most half ablated rows, half clean (or all ablated, given the clean CE).
                per_run = max(1, TOTAL_POSITIONS // ((1 if run.ce is not None else 2) * (T - first)))
                for part in rows.split(per_run):
                    total[part], same[part], clean.final[part], clean.ce[part] = self._total_run(
                        run, seq[part], pos[part], delta[part], eligible, first, state
                    )
        return total.cpu(), same.cpu(), clean

    def _total_run(
        self, run: CleanRun, seq: Tensor, pos: Tensor, delta: Tensor, eligible: Tensor, first: int, state: dict
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        n = len(seq)
        rows, state["at"], state["delta"] = seq, pos - first, delta
        if run.ce is None:  # one clean row per sequence rides along
            clean_seqs, which = seq.unique(return_inverse=True)
            rows = torch.cat([seq, clean_seqs])
            state["at"] = torch.cat([pos - first, torch.zeros_like(clean_seqs)])
            state["delta"] = torch.cat([delta, delta.new_zeros(len(clean_seqs), delta.shape[1])])
        entries = [TransformerLensKeyValueCacheEntry(run.keys[0][:0], run.values[0][:0], frozen=True)] * self.start
        for k, v in zip(run.keys, run.values, strict=True):
            k, v = k[:, :first].index_select(0, rows), v[:, :first].index_select(0, rows)
            entries.append(TransformerLensKeyValueCacheEntry(k, v, frozen=True))
        past = TransformerLensKeyValueCache(
            entries, torch.ones(len(rows), first, dtype=torch.long, device=rows.device), frozen=True
        )
        resid = run.resid_start[rows, first:]  # [rows, T − first, d_model]
        self.model(resid, start_at_layer=self.start, past_kv_cache=past, return_type=None)  # no unembedding here:
        final = state["final"][:, :-1]  # [rows, T − first − 1, d_model]
        # ... the loss is only needed where it can change: from each row's own position on, where it counts (and at
        # the position itself, for the same-position ΔCE); a clean row wherever one of its sequence's rows needs it.
        later = later_loss_mask(eligible[seq, first:-1], pos - first)
        at = torch.arange(n, device=pos.device), pos - first
        needed = later.clone()
        needed[at] = True
        if run.ce is None:
            clean_needed = torch.zeros(len(clean_seqs), needed.shape[1], dtype=torch.int32, device=needed.device)
            needed = torch.cat([needed, clean_needed.index_add_(0, which, needed.int()) > 0])
        where = needed.nonzero(as_tuple=True)
        targets = run.tokens[rows, first + 1 :][where]
        ce = torch.zeros(needed.shape, dtype=torch.float64, device=needed.device)
        flat = final[where]
        ce[where] = torch.cat([
            self._ce_from_final(flat[i : i + CE_ROWS], targets[i : i + CE_ROWS]).double()
            for i in range(0, len(flat), CE_ROWS)
        ]) if len(flat) else ce[where]  # fmt: skip
        if run.ce is not None:
            ablated, clean_ce = ce, run.ce[seq, first:-1].double()
            clean_final = run.final_resid[seq, pos]
        else:
            ablated, clean_ce = ce[:n], ce[n:][which]
            clean_final = state["final"][n:][which][at]
        total = ((ablated - clean_ce) * later).sum(1)
        return total, (ablated[at] - clean_ce[at]).float(), clean_final, clean_ce[at].float()

    # ---------------------------------------------------------------------------------------- direct path

    def to_residual(self, delta: Tensor) -> Tensor | None:
        """The residual-stream vector [n, d_model] that an activation change delta [n, d_in] writes, or None for
        hooks whose effect on the residual stream is not linear (queries, keys, pre-activations, norms)."""
        block = self.model.blocks[self.layer]
        if self.suffix in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            return delta
        if self.suffix == "attn.hook_z":
            W_O = block.attn.W_O  # [n_heads, d_head, d_model]
            return torch.einsum("nhd,hdm->nm", delta.view(len(delta), *W_O.shape[:2]).to(W_O.dtype), W_O)
        if self.suffix == "mlp.hook_post" and hasattr(block.mlp, "W_out"):
            return delta.to(block.mlp.W_out.dtype) @ block.mlp.W_out
        return None

    def final_norm(self, x: Tensor) -> Tensor:
        """The model's own final norm (LayerNorm, RMSNorm or their folded variants), or nothing."""
        return x if self.model.cfg.normalization_type is None else self.model.ln_final(x)

    @torch.no_grad()
    def direct_effects(self, clean: Clean, targets: Tensor, delta_res: Tensor) -> tuple[Tensor, Tensor]:
        """Direct-path ΔCE [n] and the exact change to the normed final residual [n, d_model] of removing
        delta_res [n, d_model] from the clean final residuals (whose next tokens are targets [n])."""
        x = clean.final.to(self.lm.device)
        ablated = x - delta_res.to(x.device, x.dtype)
        targets = targets.to(x.device)
        dce = self._ce_from_final(ablated, targets) - clean.ce.to(x.device)
        normed_change = self.final_norm(x) - self.final_norm(ablated)
        return dce.cpu(), normed_change.float().cpu()


def _pads_safely(cfg) -> bool:
    """Whether rows with caches of different lengths may share a run, the shorter ones padded and masked: true when
    positions live in the residual (standard) or are counted on the mask (rotary), and false where the model reads
    them from the cache length (ALiBi, log-n scaling, dynamic NTK) or windows attention by it (local attention)."""
    return (
        cfg.positional_embedding_type in ("standard", "rotary")
        and not getattr(cfg, "use_logn_attn", False)
        and not getattr(cfg, "use_dynamic_ntk_rope", False)
        and all(kind == "global" for kind in getattr(cfg, "attn_types", None) or [])
    )


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it was run for is cached."""


def _stop(act: Tensor, hook) -> None:
    raise _Stop
