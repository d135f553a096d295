"""Tiny real models, tokenizers and SAEs for the dashboard tests, built in a second with no download.

The tokenizer is a byte-level BPE trained on text full of adversarial strings (`</script>`, `<!--`, an `<img
onerror>` tag, `&lt;`, right-to-left marks, multi-byte characters), so the pages under test hold them as tokens,
and characters split across tokens exercise the whole-sequence decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from models_helpers import byte_bpe
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from saelab.models.access import LanguageModel

HOOK = "blocks.0.hook_resid_post"
XSS = '<img src=x onerror="window.__pwned=1">'
ADVERSARIAL = [
    "</script><script>window.__pwned=1</script>",
    "<!-- comment -->",
    XSS,
    "&lt;b&gt; &amp; &#x3C;",
    "\u202eevil\u202c and \u200fRTL\u200f",
    "naïve café — 中文字符 😀 €",
    "\u2028line\u2029para",
    "${alert(1)} {{7*7}} javascript:alert(1)",
]
SINGLE_TOKENS = [XSS, "</script>", "<!--", "&lt;", "&amp;", "\u202e"]
PLAIN = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
]


def corpus() -> list[str]:
    return ADVERSARIAL * 3 + PLAIN * 3


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE; with few merges, multi-byte characters stay split over several byte tokens, while the
    markup strings of SINGLE_TOKENS are one token each."""
    # Whole markup strings as single tokens: rendering one token as HTML would be enough to run them.
    return byte_bpe(corpus(), vocab_size, SINGLE_TOKENS, clean_up_tokenization_spaces=False)


def make_model(
    tokenizer: PreTrainedTokenizerFast,
    normalization: str = "LN",
    positional: str = "standard",
    n_layers: int = 2,
    seed: int = 0,
) -> LanguageModel:
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=128,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type=normalization,
        positional_embedding_type=positional,
        seed=seed,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    # A random init has tiny logits; scale the unembedding up so that loss effects are far from zero.
    with torch.no_grad():
        model.unembed.W_U.mul_(8.0)
    return LanguageModel.from_transformer_lens(model, f"tiny-{normalization}-{positional}")


@dataclass
class _Cfg:
    d_in: int
    d_sae: int
    architecture: str = "relu"
    d_out: int | None = None
    transcoder: bool = False

    @property
    def d_target(self) -> int:
        return self.d_in


class TinySAE(nn.Module):
    """The minimal SAE the dashboard relies on (the fields of `saelab.sae_protocol.SAELike` it reads)."""

    def __init__(self, d_in: int, d_sae: int, hook: str, seed: int = 0, bias: float = -0.3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cfg = _Cfg(d_in, d_sae)
        self.metadata = {"hook_name": hook, "model_name": "tiny"}
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        self.b_enc = nn.Parameter(torch.full((d_sae,), bias))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.W_dec + self.b_dec


def make_tokens(tokenizer: PreTrainedTokenizerFast, n_seq: int = 16, length: int = 24, seed: int = 0) -> Tensor:
    """[n_seq, length] contexts, each BOS followed by a window of the adversarial/plain corpus."""
    stream: list[int] = []
    for text in corpus():
        stream += [*tokenizer.encode(text, add_special_tokens=False), tokenizer.bos_token_id]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (n_seq,), generator=g).tolist()
    rows = [[tokenizer.bos_token_id, *stream[s : s + length - 1]] for s in starts]
    return torch.tensor(rows)


def make_adversarial_tokens(tokenizer: PreTrainedTokenizerFast, length: int = 32) -> Tensor:
    """One [BOS, adversarial string, code…] row per adversarial string (and per plain one), cut to `length`."""
    rows = []
    for i, text in enumerate(ADVERSARIAL + PLAIN):
        ids = tokenizer.encode(text + " " + PLAIN[i % len(PLAIN)] * 3, add_special_tokens=False)
        rows.append([tokenizer.bos_token_id, *ids[: length - 1]])
    return torch.tensor(rows)


# Independent brute force: whole forward passes with TransformerLens hooks, nothing from saelab.dashboard.


def brute_acts(lm, sae, row: torch.Tensor, hook: str = HOOK) -> torch.Tensor:
    """[T, d_sae] latent activations, special tokens zeroed."""
    _, cache = lm.model.run_with_cache(row[None], names_filter=hook)
    acts = sae.encode(cache[hook][0].flatten(1)).detach()
    return acts * (row != lm.bos_token_id)[:, None]


def brute_ce(lm, row, pos, hook=None, subtract=None) -> float:
    def fn(act, hook):
        act = act.clone()
        act[0, pos] -= subtract.view(act.shape[2:])
        return act

    hooks = [(hook, fn)] if hook else []
    logits = lm.model.run_with_hooks(row[None], fwd_hooks=hooks)[0, pos].double()
    return (torch.logsumexp(logits, 0) - logits[row[pos + 1]]).item()


def brute_dce(lm, sae, row, pos, latent, hook=HOOK, a=None) -> float:
    a = brute_acts(lm, sae, row, hook)[pos, latent] if a is None else a
    return brute_ce(lm, row, pos, hook, (a * sae.W_dec[latent]).detach()) - brute_ce(lm, row, pos)


def brute_final(lm, row) -> torch.Tensor:
    name = f"blocks.{lm.model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = lm.model.run_with_cache(row[None], names_filter=name)
    return cache[name][0]


def brute_direct(lm, sae, row, pos, latent) -> float:
    a = brute_acts(lm, sae, row)[pos, latent]
    x = brute_final(lm, row)[pos]
    ce = []
    for v in (x - a * sae.W_dec[latent].detach(), x):
        logits = lm.model.unembed(lm.model.ln_final(v[None, None]))[0, 0].double()
        ce.append((torch.logsumexp(logits, 0) - logits[row[pos + 1]]).item())
    return ce[0] - ce[1]


def close(a, b, tol=2e-4) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The single-position re-runs are many tiny ops: one thread avoids OpenMP contention on a shared machine.
    No gradients anywhere (the brute-force checks run models directly)."""
    before, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    yield
    torch.set_num_threads(before)
    torch.set_grad_enabled(grad)


def brute_losses(lm, row, hooks=()) -> torch.Tensor:
    """[T − 1] float64 next-token CE of one sequence, with TransformerLens hooks."""
    logits = lm.model.run_with_hooks(row[None], fwd_hooks=list(hooks))[0, :-1].double()
    return torch.logsumexp(logits, -1) - logits.gather(1, row[1:, None])[:, 0]


def counted(lm, row) -> torch.Tensor:
    """[T − 1] positions whose next-token loss counts: input and target both regular tokens."""
    regular = row != lm.bos_token_id
    return regular[:-1] & regular[1:]


def brute_joint_total(lm, row, positions, subtracts, hook=HOOK) -> float:
    """Change in the next-token loss summed over every counted position of the sequence, removing subtracts[i] at
    positions[i], all at once, in one whole forward pass (a single position gives the total ΔCE of that firing)."""

    def fn(act, hook):
        act = act.clone()
        for p, d in zip(positions, subtracts, strict=True):
            act[0, p] -= d.view(act.shape[2:])
        return act

    change = brute_losses(lm, row, [(hook, fn)]) - brute_losses(lm, row)
    return (change * counted(lm, row)).sum().item()
