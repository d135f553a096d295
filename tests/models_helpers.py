"""Tiny real language models for the model-access, store and eval tests, built in seconds with no download.

The corpus is a few standard-library source files; the tokenizer is a byte-level BPE trained on them; the models
are a 2-layer `HookedTransformer` and a 2-layer `GPT2LMHeadModel` saved with `save_pretrained`, both untrained
(the tests check plumbing and formulas, which need no trained weights).
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

BOS = "<|endoftext|>"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = ["textwrap.py", "colorsys.py", "bisect.py", "keyword.py", "this.py", "fnmatch.py"]


def corpus() -> list[str]:
    return [(STDLIB / name).read_text() for name in SOURCES]


def byte_bpe(
    texts: list[str], vocab_size: int, extra_tokens: Sequence[str] = (), **tokenizer_kwargs: Any
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, with one special token that is BOS, EOS and padding (as in GPT-2);
    `extra_tokens` are added whole, as single tokens."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(texts, trainer)
    raw.add_tokens([AddedToken(t, normalized=False) for t in extra_tokens])
    # add_bos_token: TransformerLens would otherwise re-load the tokenizer by name to get one that adds BOS.
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        add_bos_token=True,
        name_or_path="tiny",
        **tokenizer_kwargs,
    )


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    return byte_bpe(corpus(), vocab_size)


def make_tl_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=64,
        d_vocab=len(tokenizer),
        act_fn="gelu_new",
        normalization_type="LN",
        seed=seed,
    )
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def save_gpt2(folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 and its tokenizer in a `save_pretrained` folder."""
    torch.manual_seed(seed)
    bos = tokenizer.bos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=bos, eos_token_id=bos,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(folder: Path) -> Path:
    """The corpus as a dataset folder: half as .txt files, half as one .jsonl file."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = corpus()
    half = len(texts) // 2
    for i, text in enumerate(texts[:half]):
        (folder / f"doc{i}.txt").write_text(text)
    (folder / "rest.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[half:]))
    return folder


def mean_ce(logits: Tensor, tokens: Tensor, counted: Tensor) -> float:
    """Mean next-token cross-entropy of logits [batch, pos, vocab] over the counted predictions [batch, pos − 1]."""
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return per_token[counted].mean().item()


def mean_kl(clean_logits: Tensor, logits: Tensor, counted: Tensor) -> float:
    """Mean KL(p_clean ‖ p) of the next-token distributions over the counted predictions."""
    p, q = clean_logits[:, :-1].log_softmax(-1), logits[:, :-1].log_softmax(-1)
    return torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)[counted].mean().item()


def check_splice_metrics(metrics, tokens: Tensor, clean: Tensor, spliced: Tensor, ablated: Tensor) -> None:
    """Assert an eval's CE and KL figures against the logits of a clean, a spliced and an ablated run done by hand
    (CE over predictions between two non-BOS tokens; CE loss recovered and the KL score from their definitions)."""
    import pytest

    counted = (tokens[:, :-1] != 0) & (tokens[:, 1:] != 0)
    assert metrics.predictions == counted.sum()
    ce_clean, ce_spliced, ce_abl = (mean_ce(logits, tokens, counted) for logits in (clean, spliced, ablated))
    assert metrics.ce_loss_clean == pytest.approx(ce_clean, rel=1e-5)
    assert metrics.ce_loss_with_sae == pytest.approx(ce_spliced, rel=1e-5)
    assert metrics.ce_loss_with_ablation == pytest.approx(ce_abl, rel=1e-5)
    assert metrics.ce_loss_recovered == pytest.approx((ce_abl - ce_spliced) / (ce_abl - ce_clean), rel=1e-4)
    kl_spliced, kl_abl = mean_kl(clean, spliced, counted), mean_kl(clean, ablated, counted)
    assert metrics.kl_div_with_sae == pytest.approx(kl_spliced, rel=1e-4)
    assert metrics.kl_div_with_ablation == pytest.approx(kl_abl, rel=1e-4)
    assert metrics.kl_div_score == pytest.approx((kl_abl - kl_spliced) / kl_abl, rel=1e-4)


class LinearSAE(nn.Module):
    """A minimal SAE for splicing tests: latents = ReLU(x W_enc), x̂ = latents W_dec."""

    def __init__(self, W_enc: Tensor, W_dec: Tensor, metadata: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        # The SAEConfig fields the evals read: an SAE (no d_out), not a transcoder.
        self.cfg = SimpleNamespace(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], d_out=None, transcoder=False)
        self.metadata = dict(metadata or {})

    @classmethod
    def identity(cls, d_in: int, **metadata: Any) -> LinearSAE:
        """x̂ = ReLU(x) − ReLU(−x) = x exactly, with d_sae = 2 d_in."""
        eye = torch.eye(d_in)
        return cls(torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0), metadata)

    @classmethod
    def zero(cls, d_in: int, **metadata: Any) -> LinearSAE:
        """x̂ = 0."""
        return cls(torch.eye(d_in), torch.zeros(d_in, d_in), metadata)

    @classmethod
    def random(cls, d_in: int, d_sae: int, seed: int = 0, **metadata: Any) -> LinearSAE:
        generator = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=generator) / d_in**0.5
        return cls(W_dec.T.clone(), W_dec, metadata)

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W_enc)

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.W_dec
