"""Training saelab's built-in language model from scratch on a CPU: `saelab lm train`.

Owns the tokenizer trainer, the fast training model, its conversion to TransformerLens, the training loop and its
checkpoints, held-out evaluation against the unigram baseline, sampling, and writing a model folder.

Training reads the corpus as every other stage does (`saelab.models.data.ContextStream`): the documents in a seeded
random order, reshuffled every epoch, packed into BOS-led contexts. A checkpoint holds the stream's position with
the weights and optimizer state, so a resumed run trains on exactly the tokens of one never interrupted and ends
with the same weights.

`FastLM` is a plain nanoGPT-style PyTorch module computing exactly the function of a TransformerLens
`HookedTransformer` with the same `LMConfig` (fused QKV projection and `scaled_dot_product_attention` instead of
per-head einsums and hooks, several times faster on CPU); `tl_state_dict` converts its weights, and a test checks
that both give the same logits.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.config import config_to_dict, require_positive_ints
from saelab.errors import DivergedError, SaelabError
from saelab.io import (
    OutputKind,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_format_marker,
    output_folder,
    resumable_output,
    save_tensors,
)
from saelab.models.builtin import (
    BOS_TOKEN,
    CFG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    LMConfig,
    wrap_tokenizer,
)
from saelab.models.data import ContextStream, MixedContexts, documents

# ------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):  # -> tokenizers.Tokenizer
    """A byte-level BPE (GPT-2 pre-tokenization, so any text round-trips exactly) with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_stream(tokenizer, texts: Iterable[str]) -> Tensor:
    """All texts as one token stream `[n_tokens]`, each text preceded by BOS (which thus also ends the previous)."""
    bos = tokenizer.token_to_id(BOS_TOKEN)
    pieces = [torch.tensor([bos, *encoding.ids]) for encoding in tokenizer.encode_batch(list(texts))]
    return torch.cat(pieces).to(torch.int32)


def heldout_contexts(stream: Tensor, n_ctx: int, bos: int) -> Tensor:
    """The whole stream as consecutive `[n_windows, n_ctx + 1]` BOS-led windows (the ragged tail is dropped)."""
    windows = stream[: len(stream) // n_ctx * n_ctx].view(-1, n_ctx)
    return torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1).long()


def heldout_sample(contexts: Tensor, n: int, seed: int) -> Tensor:
    """All of `contexts` if there are at most n, else a seeded random n of them in their order: a spread over the
    whole held-out split rather than its first files."""
    if len(contexts) <= n:
        return contexts
    chosen = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(seed))[:n]
    return contexts[chosen.sort().values]


def unigram_entropy(tokens: Tensor) -> float:
    """Entropy in nats of the tokens' own frequency distribution: no unigram model does better on them."""
    counts = torch.bincount(tokens.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# ---------------------------------------------------------------------------------------------------- model


class FastBlock(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)); TransformerLens's LayerNorm eps is 1e-5."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.mlp_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.mlp_out = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:  # [batch, pos, d_model] -> same
        q, k, v = (
            einops.rearrange(t, "batch pos (head d_head) -> batch head pos d_head", head=self.n_heads)
            for t in self.qkv(self.ln1(x)).chunk(3, dim=-1)
        )
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scaled by 1/sqrt(d_head), as TL
        x = x + self.attn_out(einops.rearrange(z, "batch head pos d_head -> batch pos (head d_head)"))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))


class FastLM(nn.Module):
    """The training-time twin of a `HookedTransformer` built from `cfg.tl_config()`: tokens `[batch, pos]` → logits."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(FastBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), the residual-stream writers scaled by 1/sqrt(2 n_layers); LayerNorm is identity."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # LayerNorm scales
                nn.init.ones_(p)
            elif name.endswith(("attn_out.weight", "mlp_out.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:  # [batch, pos] -> [batch, pos, d_vocab]
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


def tl_state_dict(model: FastLM) -> dict[str, Tensor]:
    """`model`'s weights under TransformerLens names and layouts.

    Linear layers store `[out, in]`; TransformerLens keeps `W_Q: [head, d_model, d_head]`, `W_O: [head, d_head,
    d_model]`, `W_in: [d_model, d_mlp]` and `W_U: [d_model, d_vocab]`.
    """
    n_heads = model.cfg.n_heads
    state = {
        "embed.W_E": model.embed.weight,
        "pos_embed.W_pos": model.pos_embed.weight,
        "ln_final.w": model.ln_final.weight,
        "ln_final.b": model.ln_final.bias,
        "unembed.W_U": model.unembed.weight.T,
        "unembed.b_U": model.unembed.bias,
    }
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}."
        for name, weight, bias in zip(
            "QKV", block.qkv.weight.chunk(3, dim=0), block.qkv.bias.chunk(3, dim=0), strict=True
        ):
            state[f"{prefix}attn.W_{name}"] = einops.rearrange(
                weight, "(head d_head) d_model -> head d_model d_head", head=n_heads
            )
            state[f"{prefix}attn.b_{name}"] = einops.rearrange(bias, "(head d_head) -> head d_head", head=n_heads)
        state[f"{prefix}attn.W_O"] = einops.rearrange(
            block.attn_out.weight, "d_model (head d_head) -> head d_head d_model", head=n_heads
        )
        state[f"{prefix}attn.b_O"] = block.attn_out.bias
        state[f"{prefix}ln1.w"], state[f"{prefix}ln1.b"] = block.ln1.weight, block.ln1.bias
        state[f"{prefix}ln2.w"], state[f"{prefix}ln2.b"] = block.ln2.weight, block.ln2.bias
        state[f"{prefix}mlp.W_in"], state[f"{prefix}mlp.b_in"] = block.mlp_in.weight.T, block.mlp_in.bias
        state[f"{prefix}mlp.W_out"], state[f"{prefix}mlp.b_out"] = block.mlp_out.weight.T, block.mlp_out.bias
    return {name: t.detach().clone().contiguous() for name, t in state.items()}


# ------------------------------------------------------------------------------------------------ optimizer


def orthogonalize(update: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """An approximately orthogonal matrix with `update`'s singular vectors (quintic Newton–Schulz iteration).

    The coefficients maximise the slope at zero, so the singular values land in roughly [0.7, 1.2] after five
    steps rather than exactly 1, which trains as well (Jordan et al., 2024). The reference runs in bfloat16;
    CPUs without bfloat16 matrix units are much faster in float32.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton–Schulz) for 2-D weight matrices.

    Each step orthogonalizes the Nesterov momentum of the gradient and applies it at `lr * sqrt(max(1, rows /
    cols))`, with decoupled weight decay. In this small-batch, few-step regime it reaches a given loss in about
    half the tokens of AdamW. It is the update of `torch.optim.Muon` (torch >= 2.9), which a test compares
    against; it is written out so that `saelab lm train` runs on older torch too. `ns_dtype` is the precision of
    the Newton–Schulz iteration: bfloat16 as in the reference, or float32 (the default on CPU, see `orthogonalize`).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_dtype": ns_dtype})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buffer.lerp_(p.grad, 1 - momentum)
                update = orthogonalize(p.grad.lerp(buffer, momentum), dtype=group["ns_dtype"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.shape[0] / p.shape[1])))


# ------------------------------------------------------------------------------------------------- training


@dataclass
class LMTrainConfig:
    """Everything `saelab lm train` needs to reproduce a model; stored in the folder's cfg.json.

    The budget is `tokens` (reproducible), or `minutes` of wall-clock time when set (the learning-rate
    schedule then follows elapsed time). Each step trains on the next `batch_size` BOS-led contexts of
    `model.n_ctx` tokens (plus the last target) of the shuffled document stream seeded by `seed`, mixed in buffers
    of `mix_tokens` (consecutive contexts come from one document: unmixed, a batch would hold one or two, and a
    short run would read only the documents at the front of the epoch); a buffer never holds more than one epoch,
    and the default holds all of the built-in corpus's (which trains as well as random windows did). Every
    `checkpoint_every` steps (0: never) the run state is saved for `--resume`; only a token budget can resume.
    Muon updates the blocks' weight matrices at `muon_lr`; AdamW the token and position embeddings at
    `embed_lr` and everything else (unembedding, biases, LayerNorm) at `lr`. The defaults were picked by
    held-out loss at a fixed token budget among model sizes, contexts, batch sizes and learning rates.
    """

    model: LMConfig = field(default_factory=LMConfig)
    tokens: int = 6_000_000
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 4e-3
    embed_lr: float = 2e-2
    muon_lr: float = 4e-2
    min_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_tokens: int = 2**18
    mix_tokens: int = 2**22
    checkpoint_every: int = 0

    def validate(self) -> None:
        self.model.validate()
        if self.minutes is not None and not self.minutes > 0:
            raise SaelabError(f"--minutes must be positive, got {self.minutes}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int):
            raise SaelabError(f"checkpoint_every must be a whole number, got {self.checkpoint_every!r}")
        if self.checkpoint_every < 0:
            raise SaelabError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.minutes is not None and self.checkpoint_every:
            raise SaelabError(
                "--checkpoint-every needs a --tokens budget: with --minutes the schedule follows the clock, so a"
                " resumed run could not repeat the same steps"
            )
        require_positive_ints(self, ("tokens", "batch_size", "eval_tokens", "warmup_steps", "mix_tokens"))
        for name in ("lr", "embed_lr", "muon_lr"):
            if not getattr(self, name) > 0:
                raise SaelabError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise SaelabError(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction!r}")

    def lr_factor(self, step: int, progress: float) -> float:
        """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_fraction` at progress 1."""
        warmup = min(1.0, (step + 1) / self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return warmup * (self.min_lr_fraction + (1 - self.min_lr_fraction) * cosine)


def make_optimizers(model: FastLM, cfg: LMTrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for the blocks' weight matrices, AdamW for the rest (each group keeps its base lr in `base_lr`)."""
    matrices = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2]
    embeddings = [model.embed.weight, model.pos_embed.weight]
    vectors = [p for p in model.parameters() if p.dim() == 1]
    ns_dtype = torch.float32 if model.embed.weight.device.type == "cpu" else torch.bfloat16
    adam_groups = [
        {"params": embeddings, "lr": cfg.embed_lr, "weight_decay": cfg.weight_decay},
        {"params": [model.unembed.weight], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": vectors, "lr": cfg.lr, "weight_decay": 0.0},
    ]
    optimizers = [
        Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype),
        torch.optim.AdamW(adam_groups, betas=(0.9, 0.95), foreach=True),
    ]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


LogitsFn = Callable[[Tensor], Tensor]  # tokens [batch, pos] -> logits [batch, pos, d_vocab]


@torch.no_grad()
def mean_loss(model: LogitsFn, contexts: Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over every position of `contexts` `[n, n_ctx + 1]`."""
    total = 0.0
    for batch in contexts.split(batch_size):
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    return total / contexts[:, 1:].numel()


@torch.no_grad()
def generate(
    model: LogitsFn, tokens: list[int], n_ctx: int, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """Continue `tokens` (BOS first) greedily, or by sampling at `temperature` > 0; stops early at BOS."""
    generator = torch.Generator().manual_seed(seed)
    tokens, bos = list(tokens), tokens[0]
    device = next(iter(model.parameters())).device if isinstance(model, nn.Module) else "cpu"
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens[-n_ctx:]], device=device))[0, -1].float().cpu()
        if temperature > 0:
            next_token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator))
        else:
            next_token = int(logits.argmax())
        if next_token == bos:
            break
        tokens.append(next_token)
    return tokens


SAMPLE_PROMPTS = ("def ", "import ", "class Path", "    for i in range(", '    """Return the')


def train_lm(
    cfg: LMTrainConfig,
    out: Path,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    command: str = "",
    corpus: tuple[Sequence[str], Sequence[str]] | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Train a tokenizer and a model, evaluate on held-out files, and write the model folder `out`.

    `corpus` is (train documents, held-out documents), by default the standard library's (`documents(None, …)`).
    The run works in the hidden folder `.NAME.partial` beside `out` (its checkpoints, when `cfg.checkpoint_every`
    is set), which replaces `out` when the model is complete; `resume` continues a killed run from its last
    checkpoint. Returns the results that also go into `out/cfg.json` (with `command`, the command line that ran it).
    """
    cfg.validate()
    if resume and cfg.minutes is not None:
        raise SaelabError("--resume needs a --tokens budget: a --minutes run follows the clock and cannot resume")
    train_docs, heldout_docs = corpus or (documents(None, "train"), documents(None, "heldout"))
    with resumable_output(out, LM_FOLDER, resume, CHECKPOINT_FILE, overwrite=overwrite) as work:
        return _train_lm(cfg, work, log, device, command, train_docs, heldout_docs, resume)


def _train_lm(
    cfg: LMTrainConfig,
    work: Path,
    log: Callable[[str], None],
    device: str,
    command: str,
    train_docs: Sequence[str],
    heldout_docs: Sequence[str],
    resume: bool,
) -> dict:
    started = time.time()
    torch.manual_seed(cfg.seed)
    checkpoint = load_lm_checkpoint(work, cfg, len(train_docs)) if resume else None
    if checkpoint is None:
        tokenizer = train_tokenizer(iter(train_docs), cfg.model.d_vocab)  # BPE merges do not depend on the order
        if tokenizer.get_vocab_size() != cfg.model.d_vocab:
            raise SaelabError(
                f"the corpus is too small for a {cfg.model.d_vocab}-token vocabulary (BPE stopped at "
                f"{tokenizer.get_vocab_size()}); use a smaller d_vocab"
            )
    else:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    bos = tokenizer.token_to_id(BOS_TOKEN)
    corpus_tokens = sum(len(encoding.ids) + 1 for encoding in tokenizer.encode_batch(list(train_docs)))
    heldout = heldout_contexts(token_stream(tokenizer, heldout_docs), cfg.model.n_ctx, bos)
    heldout = heldout_sample(heldout, max(1, cfg.eval_tokens // cfg.model.n_ctx), cfg.seed)
    log(
        f"tokenizer: {tokenizer.get_vocab_size()} tokens; corpus: {corpus_tokens:,} train tokens, "
        f"{heldout[:, 1:].numel():,} held-out tokens ({time.time() - started:.0f} s)"
    )

    model = FastLM(cfg.model).to(device)
    optimizers = make_optimizers(model, cfg)
    documents_in_order = ContextStream(train_docs, wrap_tokenizer(tokenizer), cfg.model.n_ctx + 1, bos, seed=cfg.seed)
    # A buffer holds mix_tokens, or one epoch of a smaller corpus.
    mix_contexts = max(cfg.batch_size, min(cfg.mix_tokens, corpus_tokens) // cfg.model.n_ctx)
    stream = MixedContexts(documents_in_order, mix_contexts, cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.model.n_ctx
    step, seen, smoothed, before = 0, 0, float("nan"), 0.0  # before: training seconds of earlier sessions
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            optimizer.load_state_dict(state)  # the saved groups' keys come back too, base_lr included
        stream.load_state_dict(checkpoint["stream"])
        step, seen, smoothed, before = (
            checkpoint["step"],
            checkpoint["seen"],
            checkpoint["smoothed"],
            checkpoint["seconds"],
        )
        log(f"resumed at step {step} ({seen:,} tokens)")
    train_started = last_log = time.time()
    while True:
        elapsed = time.time() - train_started
        progress = elapsed / (60 * cfg.minutes) if cfg.minutes is not None else seen / cfg.tokens
        if progress >= 1:
            break
        factor = cfg.lr_factor(step, progress)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
        batch = stream.next(cfg.batch_size).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        step, seen = step + 1, seen + tokens_per_step
        value = loss.item()
        if not math.isfinite(value):
            raise DivergedError(f"training diverged at step {step} (loss {value}); lower the learning rates")
        smoothed = value if step == 1 else 0.98 * smoothed + 0.02 * value
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            seconds = before + time.time() - train_started
            save_lm_checkpoint(work, cfg, len(train_docs), tokenizer, model, optimizers, stream, step, seen, smoothed,
                               seconds)  # fmt: skip
        if time.time() - last_log > 30:
            last_log = time.time()
            log(
                f"step {step}: {seen:,} tokens, train loss {smoothed:.3f}, "
                f"{seen / (before + last_log - train_started):,.0f} tokens/s, lr x{factor:.2f}"
            )
    train_seconds = before + time.time() - train_started

    model.eval()
    heldout_loss = mean_loss(model, heldout.to(device))
    samples = {
        prompt: tokenizer.decode(generate(model, [bos, *tokenizer.encode(prompt).ids], cfg.model.n_ctx, 40))
        for prompt in SAMPLE_PROMPTS
    }
    results = {
        "tokens_trained": seen,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(seen / max(train_seconds, 1e-9)),
        "train_loss": round(smoothed, 4),
        "heldout_loss": round(heldout_loss, 4),
        "unigram_entropy": round(unigram_entropy(heldout[:, 1:]), 4),
        "heldout_tokens": heldout[:, 1:].numel(),
        "train_corpus_tokens": corpus_tokens,
        "epochs": round(seen / max(corpus_tokens, 1), 2),
        "samples": samples,
        "total_seconds": round(time.time() - started, 1),
        "command": command,
    }
    write_lm_files(work, model.cpu(), tokenizer, cfg, results, device)
    return results


# --- checkpoints -----------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "saelab.lm_checkpoint"
CHECKPOINT_VERSION = 1


def _run_identity(cfg: LMTrainConfig, n_documents: int) -> dict[str, Any]:
    """What a resumed run must share with the one that saved the checkpoint: every setting that changes the
    weights (not `checkpoint_every`), and the corpus's size in documents."""
    train = {k: v for k, v in config_to_dict(cfg).items() if k != "checkpoint_every"}
    return {"train": train, "documents": n_documents}


def save_lm_checkpoint(
    work: Path,
    cfg: LMTrainConfig,
    n_documents: int,
    tokenizer,
    model: FastLM,
    optimizers: list[torch.optim.Optimizer],
    stream: MixedContexts,
    step: int,
    seen: int,
    smoothed: float,
    seconds: float,
) -> None:
    """The whole run state, atomically: weights, optimizer state, the tokenizer and the stream's position."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "identity": _run_identity(cfg, n_documents),
        "tokenizer": tokenizer.to_str(),
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in optimizers],
        "stream": stream.state_dict(),
        "step": step,
        "seen": seen,
        "smoothed": smoothed,
        "seconds": seconds,
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(work / CHECKPOINT_FILE, buffer.getvalue())


def load_lm_checkpoint(work: Path, cfg: LMTrainConfig, n_documents: int) -> dict[str, Any]:
    """The run state saved in `work`, checked against the settings of the run that resumes it."""
    path = work / CHECKPOINT_FILE
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise SaelabError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); delete it to start afresh"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise SaelabError(f"{path} is not a saelab language-model checkpoint")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise SaelabError(f"{path} was written by another saelab version; delete it to start afresh")
    saved, expected = checkpoint["identity"], _run_identity(cfg, n_documents)
    if saved["documents"] != expected["documents"]:
        raise SaelabError(
            f"the checkpoint in {work} read a corpus of {saved['documents']} documents, this one has "
            f"{expected['documents']}; resume with the same corpus"
        )
    for key in sorted(set(saved["train"]) | set(expected["train"])):
        if saved["train"].get(key) != expected["train"].get(key):
            was, now = saved["train"].get(key), expected["train"].get(key)
            raise SaelabError(
                f"the checkpoint in {work} was written with other settings ({key}: checkpoint {was!r}, now {now!r});"
                " rerun the same command with --resume"
            )
    return checkpoint


LM_FOLDER = OutputKind(
    "saelab language-model folder", (CFG_FILE, WEIGHTS_FILE, TOKENIZER_FILE), json_format_marker(CFG_FILE, FORMAT_NAME)
)


def save_lm(
    out: Path,
    model: FastLM,
    tokenizer,
    cfg: LMTrainConfig,
    results: dict,
    device: str = "cpu",
    overwrite: bool = False,
) -> None:
    """Write a model folder (cfg.json, model.safetensors, tokenizer.json) atomically."""
    with output_folder(out, LM_FOLDER, overwrite=overwrite) as tmp:
        write_lm_files(tmp, model, tokenizer, cfg, results, device)


def write_lm_files(folder: Path, model: FastLM, tokenizer, cfg: LMTrainConfig, results: dict, device: str) -> None:
    """cfg.json, model.safetensors and tokenizer.json in `folder`, each written atomically."""
    import platform

    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    save_tensors(folder / WEIGHTS_FILE, tl_state_dict(model))
    atomic_write_text(folder / TOKENIZER_FILE, tokenizer.to_str())
    atomic_write_json(
        folder / CFG_FILE,
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": config_to_dict(cfg.model),
            "train": {k: v for k, v in config_to_dict(cfg).items() if k != "model"},
            "results": results,
            "environment": meta,
        },
    )
