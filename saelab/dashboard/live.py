"""The prompt-centric live view: which latents fire on each token of a typed prompt, with exact loss effects.

`PromptAnalyzer.analyze(text)` runs the real model once, encodes the hook activations with the SAE, and for the
strongest latents at each token computes the loss effect exactly (the same single-position re-runs as the static
pages) and by the direct path.

On a zoo model the prompt is a task input, its vocabulary's tokens separated by spaces (`3 1 4 1 5`), read without
BOS. A typed input has no task labels, so there is no loss to change: the view lists the latents at each position
with their activations, and the model's answer (an output class of the task) at each position.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from saelab.dashboard.compute import _round, eligible_positions, latent_hooks
from saelab.dashboard.effects import downstream
from saelab.dashboard.text import token_strings
from saelab.errors import SaelabError

MAX_PROMPT_CHARS = 20_000


class PromptAnalyzer:
    """Analyse prompts with one model, SAE and hook; `max_latents` bounds the latents listed per token."""

    def __init__(self, lm, sae, hook: str | None = None, max_latents: int = 32) -> None:
        self.lm = lm
        self.sae = sae
        self.hook_in, self.hook = latent_hooks(lm, sae, hook)  # differ for a transcoder: it writes the MLP's output
        self.engine = downstream(lm, self.hook) if lm.task is None else None  # a typed task input has no loss
        self.max_latents = max_latents
        self.n_ctx = lm.n_ctx  # the longest context the model accepts, where it has a limit

    def tokenize(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise SaelabError("type a non-empty prompt")
        if self.lm.task is not None:  # raises one line for an unknown token or too many
            return self.lm.task.encode(text)[None]
        if len(text) > MAX_PROMPT_CHARS:
            raise SaelabError(f"the prompt has {len(text)} characters; the live view takes at most {MAX_PROMPT_CHARS}")
        ids = [self.lm.bos_token_id, *self.lm.tokenizer.encode(text, add_special_tokens=False)]
        if self.n_ctx is not None and len(ids) > self.n_ctx:
            raise SaelabError(f"the prompt is {len(ids)} tokens with BOS; this model reads at most {self.n_ctx}")
        return torch.tensor([ids])

    @torch.no_grad()
    def analyze(self, text: str) -> dict[str, Any]:
        """{tokens, ids, ce, firing: per token [[latent, activation, ΔCE exact, ΔCE direct], ...], seconds}"""
        started = time.perf_counter()
        tokens = self.tokenize(text)
        run = None if self.engine is None else self.engine.clean(tokens)
        if run is None or self.hook_in != self.hook:
            x_hook = self.lm.activations(tokens, [self.hook_in])[self.hook_in].flatten(2)
        else:
            x_hook = run.x_hook
        W_dec = self.sae.W_dec.detach()
        acts = self.sae.encode(x_hook.to(W_dec.device, W_dec.dtype))[0].float().cpu()  # [T, d_sae]
        valid = self.lm.regular_positions(tokens).cpu()
        acts = acts * valid[0, :, None]
        k = min(self.max_latents, acts.shape[1])
        top_v, top_i = acts.topk(k, dim=1)  # [T, k]
        pos, slot = (top_v > 0).nonzero(as_tuple=True)
        lat, act = top_i[pos, slot], top_v[pos, slot]
        if self.lm.task is not None:
            return self._task_view(tokens, pos, lat, act, started)
        exact = torch.full((len(pos),), float("nan"))
        direct = torch.full((len(pos),), float("nan"))
        ok = eligible_positions(valid)[0, pos]
        if ok.any():
            delta = act[ok, None] * W_dec[lat[ok]].float().cpu()
            seq = torch.zeros(int(ok.sum()), dtype=torch.long)
            exact[ok], clean = self.engine.loss_effects(run, seq, pos[ok], delta)
            delta_res = self.engine.to_residual(delta.to(W_dec.device))
            if delta_res is not None:
                direct[ok] = self.engine.direct_effects(clean, tokens[0, pos[ok] + 1], delta_res)[0]
        T = tokens.shape[1]
        clean_ce = self.engine.clean_ce(run, torch.zeros(T - 1, dtype=torch.long), torch.arange(T - 1))
        firing: list[list[list]] = [[] for _ in range(T)]
        for p, j, a, e, d in zip(
            pos.tolist(), lat.tolist(), act.tolist(), exact.tolist(), direct.tolist(), strict=True
        ):
            firing[p].append([j, _round(a), _round(e), _round(d)])
        return {
            "tokens": token_strings(self.lm.tokenizer, tokens[0].tolist()),
            "ids": tokens[0].tolist(),
            "ce": [_round(x) for x in clean_ce.tolist()] + [None],
            "firing": firing,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _task_view(self, tokens, pos, lat, act, started: float) -> dict[str, Any]:
        """A zoo task input: latents and activations per position (no loss effects: a typed input has no labels),
        and the model's answer at each position."""
        task = self.lm.task
        firing: list[list[list]] = [[] for _ in range(tokens.shape[1])]
        for p, j, a in zip(pos.tolist(), lat.tolist(), act.tolist(), strict=True):
            firing[p].append([j, _round(a), None, None])
        answers = self.lm.logits(tokens.to(self.lm.device))[0].argmax(-1).tolist()
        return {
            "tokens": [task.vocab[t] for t in tokens[0].tolist()],
            "ids": tokens[0].tolist(),
            "ce": [None] * tokens.shape[1],
            "answers": [task.outputs[i] for i in answers],
            "firing": firing,
            "seconds": round(time.perf_counter() - started, 3),
        }
