"""`saelab lm train`: tokenizer, the fast model against TransformerLens, Muon, and a real (tiny) training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import SaelabError
from saelab.models.builtin import (
    BOS_TOKEN,
    CFG_FILE,
    LMConfig,
    builtin_texts,
    load_lm,
    load_raw_tokenizer,
    wrap_tokenizer,
)
from saelab.models.lm_train import (
    FastLM,
    LMTrainConfig,
    Muon,
    generate,
    heldout_contexts,
    heldout_sample,
    mean_loss,
    tl_state_dict,
    token_stream,
    train_lm,
    train_tokenizer,
    unigram_entropy,
)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "# Grüße, 日本語, emoji 🐍 and tabs\t\tend\n",
] * 20
TRICKY = "  leading spaces\r\n\tnaïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🐍🐍 \x00 <|endoftext|> trailing  "


def test_tokenizer_round_trips_any_text_exactly() -> None:
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    assert tokenizer.token_to_id(BOS_TOKEN) == 0
    assert tokenizer.get_vocab_size() == 300
    for text in [*TEXTS[:3], TRICKY, "", "ü" * 7]:
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    # Merges were learnt: common code is shorter in tokens than in bytes.
    assert len(tokenizer.encode(TEXTS[1]).ids) < len(TEXTS[1].encode()) / 2


def test_hf_tokenizer_prepends_bos_and_decodes_exactly() -> None:
    hf = wrap_tokenizer(train_tokenizer(TEXTS, vocab_size=300))
    ids = hf(TRICKY)["input_ids"]
    assert ids[0] == hf.bos_token_id == 0
    assert hf.decode(ids[1:]) == TRICKY
    assert hf(TRICKY, add_special_tokens=False)["input_ids"] == ids[1:]


def test_token_stream_and_heldout_contexts_start_with_bos() -> None:
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    stream = token_stream(tokenizer, TEXTS[:3])
    assert stream[0] == 0 and int((stream == 0).sum()) == 3
    held = heldout_contexts(stream, 8, 0)
    assert held.shape == (len(stream) // 8, 9) and (held[:, 0] == 0).all()
    assert torch.equal(held[:, 1:].flatten(), stream[: len(held) * 8].long())
    # More windows than asked for: a seeded spread over all of them, in order, not the first ones.
    assert heldout_sample(held, len(held), 0) is held
    some = heldout_sample(held, 4, 0)
    rows = [next(i for i in range(len(held)) if torch.equal(held[i], row)) for row in some]
    assert len(rows) == 4 and rows == sorted(rows) and rows != [0, 1, 2, 3]
    assert torch.equal(heldout_sample(held, 4, 0), some) and not torch.equal(heldout_sample(held, 4, 1), some)


def test_unigram_entropy() -> None:
    assert unigram_entropy(torch.arange(16).repeat(3)) == pytest.approx(math.log(16))
    assert unigram_entropy(torch.zeros(10, dtype=torch.long)) == pytest.approx(0.0)


@pytest.mark.parametrize("n_layers,n_heads", [(1, 1), (2, 4)])
def test_fast_model_matches_hooked_transformer(n_layers: int, n_heads: int) -> None:
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    cfg = LMConfig(n_layers=n_layers, d_model=64, n_heads=n_heads, d_mlp=96, n_ctx=24, d_vocab=300)
    fast = FastLM(cfg)
    with torch.no_grad():  # move every parameter off its init so biases and LayerNorm scales matter
        for p in fast.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tl = HookedTransformer(cfg.tl_config())
    missing, unexpected = tl.load_state_dict(tl_state_dict(fast), strict=False)
    assert not unexpected and all(name.endswith(("mask", "IGNORE")) for name in missing)
    tokens = torch.randint(0, 300, (3, 24))
    with torch.no_grad():
        expected, got = fast(tokens), tl(tokens)
    assert expected.abs().max() > 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Shorter inputs too (TL slices its positional embedding the same way).
    torch.testing.assert_close(tl(tokens[:, :5]), fast(tokens[:, :5]), atol=1e-5, rtol=1e-5)


def test_init_is_gpt2_style() -> None:
    model = FastLM(LMConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=16, d_vocab=300))
    block = model.blocks[1]
    assert torch.equal(block.ln1.weight, torch.ones(64)) and torch.equal(model.ln_final.bias, torch.zeros(64))
    assert torch.equal(block.qkv.bias, torch.zeros(192)) and torch.equal(model.unembed.bias, torch.zeros(300))
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp_out.weight.std().item() == pytest.approx(0.01, rel=0.05)  # 0.02 / sqrt(2 n_layers)


def test_muon_matches_torch_reference() -> None:
    reference_cls = getattr(torch.optim, "Muon", None)
    if reference_cls is None:
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 40))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fp32 = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizers = [
        Muon(ours, lr=0.03, weight_decay=0.1),
        reference_cls(theirs, lr=0.03, weight_decay=0.1),
        Muon(fp32, lr=0.03, weight_decay=0.1, ns_dtype=torch.float32),
    ]
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for params, optimizer in zip((ours, theirs, fp32), optimizers, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b, c in zip(ours, theirs, fp32, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, b, atol=2e-2, rtol=0)
        assert not torch.equal(a, b.new_zeros(b.shape))


def test_generate_is_greedy_and_stops_at_bos() -> None:
    torch.manual_seed(0)
    model = FastLM(LMConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=8, d_vocab=50)).eval()
    out = generate(model, [0, 5, 6], n_ctx=8, max_new_tokens=12)
    assert out[:3] == [0, 5, 6] and len(out) <= 15
    assert out == generate(model, [0, 5, 6], n_ctx=8, max_new_tokens=12)
    with torch.no_grad():
        model.unembed.bias[0] = 100.0  # BOS always wins: generation stops at once
    assert generate(model, [0, 5], n_ctx=8, max_new_tokens=5) == [0, 5]
    sampled = generate(model, [0, 5], n_ctx=8, max_new_tokens=5, temperature=1e6, seed=1)
    assert sampled == generate(model, [0, 5], n_ctx=8, max_new_tokens=5, temperature=1e6, seed=1)


def test_lr_schedule_warms_up_and_decays() -> None:
    cfg = LMTrainConfig(warmup_steps=10, min_lr_fraction=0.1)
    assert cfg.lr_factor(0, 0.0) == pytest.approx(0.1)
    assert cfg.lr_factor(9, 0.0) == pytest.approx(1.0)
    assert cfg.lr_factor(500, 0.5) == pytest.approx(0.55)
    assert cfg.lr_factor(1000, 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "change",
    [{"tokens": 0}, {"batch_size": -1}, {"muon_lr": 0.0}, {"minutes": -2.0}, {"min_lr_fraction": 2.0}],
)
def test_bad_train_config_is_one_line_error(change: dict) -> None:
    cfg = LMTrainConfig(**change)
    with pytest.raises(SaelabError) as err:
        cfg.validate()
    assert "\n" not in str(err.value)
    with pytest.raises(SaelabError, match="multiple of n_heads"):
        LMTrainConfig(model=LMConfig(d_model=30, n_heads=4)).validate()


TINY = LMConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=32, d_vocab=512)
STEPS = 150


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """A slice of the real corpus: 30 training files and 4 held-out ones."""
    return list(builtin_texts("train"))[100:130], list(builtin_texts("heldout"))[:4]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus: tuple) -> tuple:
    out = tmp_path_factory.mktemp("lm") / "model"
    cfg = LMTrainConfig(model=TINY, tokens=STEPS * 16 * 32, batch_size=16, warmup_steps=10, eval_tokens=8192)
    logs: list[str] = []
    return out, train_lm(cfg, out, log=logs.append, corpus=corpus), logs


def test_tiny_training_run_writes_a_loadable_model_that_learnt(tiny_run: tuple, corpus: tuple) -> None:
    out, results, logs = tiny_run
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "model.safetensors", "tokenizer.json"]
    assert "held-out tokens" in logs[0]
    # From the uniform-guess loss ln(512) = 6.2 at initialisation to below the unigram baseline.
    assert results["heldout_loss"] < min(math.log(512) - 1.5, results["unigram_entropy"])
    assert results["tokens_trained"] == STEPS * 16 * 32
    model = load_lm(out)
    assert model.cfg.n_ctx == 32 and model.cfg.d_model == 32
    # The HookedTransformer view gives the loss the trainer measured with its fast model.
    raw = load_raw_tokenizer(out)
    held = heldout_sample(heldout_contexts(token_stream(raw, corpus[1]), 32, 0), 8192 // 32, 0)
    assert mean_loss(model, held) == pytest.approx(results["heldout_loss"], abs=1e-3)
    # TransformerLens' own tokenizer path agrees with the raw tokenizer.
    text = "def f(x):\n    return x  # é\n"
    assert model.to_tokens(text)[0].tolist() == [0, *raw.encode(text).ids]
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text
    saved = json.loads((out / CFG_FILE).read_text())
    assert saved["results"]["heldout_loss"] == results["heldout_loss"]
    assert saved["train"]["tokens"] == STEPS * 16 * 32


def test_minutes_budget_stops_on_time(tmp_path, corpus: tuple) -> None:
    cfg = LMTrainConfig(model=TINY, minutes=0.05, tokens=10**12, batch_size=4, warmup_steps=2, eval_tokens=1024)
    results = train_lm(cfg, tmp_path / "m", log=lambda _: None, corpus=corpus)
    assert 0 < results["tokens_trained"] < 10**12 and results["train_seconds"] < 3 + 10
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_sample_cli_continues_a_prompt(tiny_run: tuple) -> None:
    out, _, _ = tiny_run
    result = CliRunner().invoke(app, ["lm", "sample", "--model", str(out), "--prompt", "def ", "--tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def ")


def test_train_cli_rejects_two_budgets(tmp_path) -> None:
    result = CliRunner().invoke(app, ["lm", "train", "--out", str(tmp_path / "m"), "--tokens", "10", "--minutes", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SaelabError) and "not both" in str(result.exception)
    assert not (tmp_path / "m").exists()


class Reading(list):
    """Documents that record the order they are read in, and fail like a lost disk after `fail_after` reads."""

    def __init__(self, texts: list[str], fail_after: int | None = None) -> None:
        super().__init__(texts)
        self.reads: list[int] = []
        self.fail_after = fail_after

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, int):
            if self.fail_after is not None and len(self.reads) == self.fail_after:
                raise OSError("the disk went away")
            self.reads.append(i)
        return super().__getitem__(i)


def test_training_reads_shuffled_documents_and_a_resumed_run_sees_the_same_tokens(tmp_path, corpus: tuple) -> None:
    """12 short documents (≈ 3.5k tokens) and 60 steps × 8 × 32 tokens: three epochs, each in its own order."""
    from saelab.io import partial_folder
    from saelab.models.data import ContextStream
    from saelab.models.lm_train import CHECKPOINT_FILE

    texts = [text[:1500] for text in corpus[0][:12]]
    heldout = corpus[1][:1]
    cfg = LMTrainConfig(model=TINY, tokens=60 * 8 * 32, batch_size=8, warmup_steps=5, eval_tokens=2048, seed=3,
                        checkpoint_every=10, mix_tokens=24 * 32)  # mixed 3 steps at a time  # fmt: skip
    whole = Reading(texts)
    results = train_lm(cfg, tmp_path / "whole", log=lambda _: None, corpus=(whole, heldout))
    assert results["epochs"] > 2
    order = ContextStream(texts, None, 33, 0, seed=3).order
    assert whole.reads[:24] == order(0) + order(1)  # the seeded order of every epoch, not path order
    assert order(0) != list(range(12)) and order(0) != order(1)

    crashed = Reading(texts, fail_after=25)  # in epoch 2, after the checkpoints of steps 10..
    with pytest.raises(OSError, match="the disk went away"):
        train_lm(cfg, tmp_path / "resumed", log=lambda _: None, corpus=(crashed, heldout))
    assert (partial_folder(tmp_path / "resumed") / CHECKPOINT_FILE).is_file() and not (tmp_path / "resumed").exists()
    rest = Reading(texts)
    logs: list[str] = []
    again = train_lm(cfg, tmp_path / "resumed", log=logs.append, corpus=(rest, heldout), resume=True)
    assert any(line.startswith("resumed at step") for line in logs)
    # The resumed run re-reads the document it stopped in and continues exactly where the whole run went on.
    done = len(whole.reads) - len(rest.reads)
    assert 0 < done <= 25 and rest.reads == whole.reads[done:] and crashed.reads[:done] == whole.reads[:done]
    # ... so it trains on the same tokens and ends with the same weights.
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert again["heldout_loss"] == results["heldout_loss"] and again["train_loss"] == results["train_loss"]
    assert not partial_folder(tmp_path / "resumed").exists()


def test_resume_refuses_other_settings_and_minutes_budgets(tmp_path, corpus: tuple) -> None:
    from saelab.io import partial_folder

    texts = [text[:1500] for text in corpus[0][:6]]
    cfg = LMTrainConfig(model=TINY, tokens=60 * 4 * 32, batch_size=4, warmup_steps=2, eval_tokens=1024,
                        checkpoint_every=5, mix_tokens=8 * 32)  # fmt: skip
    with pytest.raises(OSError):
        train_lm(cfg, tmp_path / "m", log=lambda _: None, corpus=(Reading(texts, fail_after=8), corpus[1][:1]))
    before = (partial_folder(tmp_path / "m") / "checkpoint.pt").read_bytes()
    other = LMTrainConfig(model=TINY, tokens=60 * 4 * 32, batch_size=4, warmup_steps=2, eval_tokens=1024, seed=1,
                          checkpoint_every=5, mix_tokens=8 * 32)  # fmt: skip
    with pytest.raises(SaelabError, match="seed: checkpoint 0, now 1"):
        train_lm(other, tmp_path / "m", log=lambda _: None, corpus=(texts, corpus[1][:1]), resume=True)
    with pytest.raises(SaelabError, match="corpus of 6 documents, this one has 5"):
        train_lm(cfg, tmp_path / "m", log=lambda _: None, corpus=(texts[:5], corpus[1][:1]), resume=True)
    assert (partial_folder(tmp_path / "m") / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SaelabError, match="unfinished run"):
        train_lm(cfg, tmp_path / "m", log=lambda _: None, corpus=(texts, corpus[1][:1]))
    with pytest.raises(SaelabError, match="needs a --tokens budget"):
        LMTrainConfig(minutes=1.0, checkpoint_every=5).validate()
    result = CliRunner().invoke(app, ["lm", "train", "--out", str(tmp_path / "n"), "--minutes", "1", "--resume"])
    assert isinstance(result.exception, SaelabError) and "needs a --tokens budget" in str(result.exception)
    result = CliRunner().invoke(app, ["lm", "train", "--out", str(tmp_path / "n"), "--tokens", "99", "--resume"])
    assert isinstance(result.exception, SaelabError) and "no checkpoint" in str(result.exception)
