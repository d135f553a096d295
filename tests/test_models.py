"""Model access and datasets: hooks by TransformerLens name on TL and Hugging Face models, splicing, loading
errors, and the packed, resumable stream of token contexts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models_helpers import LinearSAE, corpus, make_tl_model, save_gpt2, write_corpus

from saelab.errors import SaelabError
from saelab.models.access import LanguageModel, load_model, sae_replacement, zero_ablation
from saelab.models.data import ContextStream, Documents, MixedContexts, documents, iter_texts, spread_contexts

HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_mlp_out",
    "blocks.0.mlp.hook_post",
    "blocks.1.attn.hook_z",
]


@pytest.fixture(scope="module")
def tl(tokenizer) -> LanguageModel:
    return LanguageModel.from_transformer_lens(make_tl_model(tokenizer), "tiny")


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("gpt2"), tokenizer)


@pytest.fixture(scope="module")
def tokens(tokenizer) -> torch.Tensor:
    """[2, 40]: BOS then 39 tokens of a real source file."""
    ids = torch.tensor(tokenizer.encode(corpus()[0], add_special_tokens=False)[:78]).reshape(2, 39)
    return torch.cat([torch.full((2, 1), tokenizer.bos_token_id), ids], dim=1)


def test_transformer_lens_hooks_read_what_run_with_cache_reads(tl, tokens):
    _, cache = tl.model.run_with_cache(tokens)
    together = tl.activations(tokens, HOOKS)
    for hook in HOOKS:
        alone = tl.activations(tokens, [hook])[hook]
        assert torch.equal(alone, cache[hook].flatten(2)), hook
        assert torch.equal(together[hook], alone), hook
    assert tl.d_hook("blocks.1.attn.hook_z") == 4 * 8  # n_heads · d_head
    assert tl.d_hook("blocks.0.mlp.hook_post") == 64
    assert tl.d_hook("blocks.0.hook_resid_post") == 32


def test_forward_pass_stops_at_the_deepest_hook(tl, tokens, gpt2_dir):
    calls = {"block 1": 0, "unembed": 0}
    handles = [
        tl.model.blocks[1].register_forward_pre_hook(lambda *_: calls.__setitem__("block 1", calls["block 1"] + 1)),
        tl.model.unembed.register_forward_pre_hook(lambda *_: calls.__setitem__("unembed", calls["unembed"] + 1)),
    ]
    try:
        tl.activations(tokens, ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"])
        assert calls == {"block 1": 0, "unembed": 0}
        tl.activations(tokens, ["blocks.1.hook_resid_post"])
        assert calls == {"block 1": 1, "unembed": 0}
        tl.logits(tokens)
        assert calls == {"block 1": 2, "unembed": 1}
    finally:
        for handle in handles:
            handle.remove()

    hf = load_model(str(gpt2_dir))
    ran = []
    handle = hf.model.transformer.h[1].register_forward_pre_hook(lambda *_: ran.append(1))
    hf.activations(tokens, ["blocks.0.hook_mlp_out"])
    handle.remove()
    assert ran == []


def test_hugging_face_aliases_agree_with_transformer_lens_on_the_same_weights(gpt2_dir, tokens):
    hf = load_model(str(gpt2_dir))
    tl = load_model(str(gpt2_dir), backend="transformer_lens")
    assert (hf.kind, tl.kind) == ("AutoModelForCausalLM", "HookedTransformer")
    hf_acts, tl_acts = hf.activations(tokens, HOOKS), tl.activations(tokens, HOOKS)
    for hook in HOOKS:
        assert hf_acts[hook].shape == tl_acts[hook].shape, hook
        torch.testing.assert_close(hf_acts[hook], tl_acts[hook], atol=1e-5, rtol=1e-4, msg=hook)
    torch.testing.assert_close(hf.logits(tokens), tl.logits(tokens), atol=1e-5, rtol=1e-4)
    # Plain module names work too: a GPT-2 MLP's output is TransformerLens's hook_mlp_out.
    by_module = hf.activations(tokens, ["transformer.h.0.mlp"])["transformer.h.0.mlp"]
    assert torch.equal(by_module, hf.activations(tokens, ["blocks.0.hook_mlp_out"])["blocks.0.hook_mlp_out"])
    assert (hf.bos_token_id, hf.n_ctx, tl.n_ctx) == (0, 64, 64)


def test_unknown_hook_is_a_one_line_error_naming_the_closest(tl, gpt2_dir):
    with pytest.raises(
        SaelabError, match=r"unknown hook 'blocks\.0\.hook_resid_pst'.*closest: blocks\.0\.hook_resid_post"
    ):
        tl.activations(torch.zeros(1, 2, dtype=torch.long), ["blocks.0.hook_resid_pst"])
    hf = load_model(str(gpt2_dir))
    with pytest.raises(SaelabError, match=r"closest: blocks\.0\.hook_mlp_out") as err:
        hf.check_hook("blocks.0.hook_mlp_ot")
    assert "\n" not in str(err.value)


def test_loss_per_token_is_the_next_token_cross_entropy(tl, tokens):
    expected = tl.model(tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(tl.loss_per_token(tokens), expected)


def test_splicing_identity_zero_and_error_term(tl, tokens):
    hook = "blocks.0.hook_resid_post"
    clean = tl.logits(tokens)
    identity = LinearSAE.identity(32)
    assert torch.equal(tl.logits(tokens, {hook: sae_replacement(identity)}), clean)

    # A lossy SAE changes the output, but not with its error term added back ...
    lossy = LinearSAE.random(32, 64)
    spliced = tl.logits(tokens, {hook: sae_replacement(lossy)})
    assert (spliced - clean).abs().max() > 1e-2
    torch.testing.assert_close(tl.logits(tokens, {hook: sae_replacement(lossy, error_term=True)}), clean)
    # ... and with an edit of the latents, the error term isolates the edit's effect.
    edited = tl.logits(tokens, {hook: sae_replacement(lossy, error_term=True, edit=torch.zeros_like)})
    torch.testing.assert_close(edited, tl.logits(tokens, {hook: lambda x: x - lossy.decode(lossy.encode(x))}))

    # Positions outside the mask keep their clean activation.
    regular = tl.regular_positions(tokens)
    assert not regular[:, 0].any() and regular[:, 1:].all()
    seen = {}
    tl.logits(tokens, {hook: zero_ablation(regular), "blocks.1.hook_resid_pre": lambda x: seen.setdefault("x", x)})
    resid = tl.activations(tokens, [hook])[hook]
    assert torch.equal(seen["x"][:, 0], resid[:, 0]) and seen["x"][:, 1:].eq(0).all()


def test_replacing_a_four_dimensional_hook_matches_transformer_lens(tl, tokens):
    hook = "blocks.0.attn.hook_z"  # [batch, pos, n_heads, d_head] in TransformerLens, [batch, pos, 32] here
    halved = tl.logits(tokens, {hook: lambda x: x * 0.5})
    expected = tl.model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda z, hook: z * 0.5)])
    torch.testing.assert_close(halved, expected)


def test_bf16_autocast_gives_float32_activations_close_to_float32(gpt2_dir, tokens):
    exact = load_model(str(gpt2_dir)).activations(tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    bf16 = load_model(str(gpt2_dir), bf16=True)
    approx = bf16.activations(tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    assert approx.dtype == torch.float32
    assert (approx - exact).norm() / exact.norm() < 0.02
    assert not torch.equal(approx, exact)


def test_model_loading_errors_say_what_to_do(tmp_path):
    with pytest.raises(SaelabError, match=r"cannot be downloaded here.*--model /path/to/folder"):
        load_model("someone/no-such-model")
    with pytest.raises(SaelabError, match="cannot be downloaded here"):
        load_model("gpt2")  # a TransformerLens name: also needs the network
    with pytest.raises(SaelabError, match="not a model folder"):
        load_model(str(tmp_path))
    with pytest.raises(SaelabError, match="unknown model backend"):
        load_model(str(tmp_path), backend="onnx")


# ------------------------------------------------------------------------------------------------- datasets


def test_local_datasets_yield_their_documents(tmp_path):
    folder = write_corpus(tmp_path / "data")
    assert list(iter_texts(str(folder))) == corpus()
    assert list(iter_texts(str(folder / "doc0.txt"))) == corpus()[:1]
    assert list(iter_texts(str(folder / "rest.jsonl"))) == corpus()[3:]


def test_bad_datasets_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(SaelabError, match=r"bad\.jsonl:2 is not valid JSON"):
        list(iter_texts(str(bad)))
    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(SaelabError, match=r"bad\.jsonl:1 has no string 'text' field"):
        list(iter_texts(str(bad)))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SaelabError, match=r"must be \.txt"):
        iter_texts(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaelabError, match=r"holds no \.txt or \.jsonl files"):
        iter_texts(str(tmp_path / "empty"))
    with pytest.raises(SaelabError, match="cannot be downloaded here"):
        iter_texts("someone/no-such-dataset")
    with pytest.raises(SaelabError, match="unknown split"):
        iter_texts(str(bad), "validation")


def stream(tokenizer, texts, length=16, **kwargs) -> ContextStream:
    return ContextStream(lambda: iter(texts), tokenizer, length, tokenizer.bos_token_id, **kwargs)


def test_contexts_start_with_bos_and_pack_documents_separated_by_bos(tokenizer):
    texts = ["def f(x):\n    return x\n", "import os\n", "class A:\n    pass\n"]
    bos = tokenizer.bos_token_id
    expected = [t for text in texts for t in [*tokenizer.encode(text, add_special_tokens=False), bos]]
    contexts = stream(tokenizer, texts).next(6)
    assert contexts.shape == (6, 16) and contexts.dtype == torch.long
    assert (contexts[:, 0] == bos).all()
    body = contexts[:, 1:].flatten().tolist()
    n = len(expected)
    assert body[:n] == expected and body[n : 2 * n] == expected  # the dataset repeats once it runs out


def test_context_stream_resumes_exactly(tokenizer):
    texts = corpus()
    first = stream(tokenizer, texts)
    first.next(3)
    state = json.loads(json.dumps(first.state_dict()))
    expected = first.next(40)  # spans several documents and an epoch boundary
    resumed = stream(tokenizer, texts)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next(40), expected)


def test_ranks_read_disjoint_interleaved_contexts(tokenizer):
    texts = corpus()[:2]
    single = stream(tokenizer, texts).next(10)
    rank0 = stream(tokenizer, texts, rank=0, world_size=2).next(5)
    rank1 = stream(tokenizer, texts, rank=1, world_size=2).next(5)
    assert torch.equal(single[0::2], rank0) and torch.equal(single[1::2], rank1)
    with pytest.raises(SaelabError, match="rank 2 is outside"):
        stream(tokenizer, texts, rank=2, world_size=2)
    with pytest.raises(SaelabError, match="context length must be"):
        stream(tokenizer, texts, length=1)
    with pytest.raises(SaelabError, match="no documents"):
        stream(tokenizer, []).next(1)


def test_documents_read_by_number_are_the_datasets_documents(tmp_path):
    folder = write_corpus(tmp_path / "data")
    docs = documents(str(folder))
    assert isinstance(docs, Documents) and list(docs) == corpus()
    assert [docs.name(i) for i in range(len(docs))][:1] == ["doc0.txt"] and docs.name(len(docs) - 1).startswith(
        "rest.jsonl:"
    )
    builtin = documents(None, "heldout")
    assert len(builtin) > 5 and builtin[0] == next(iter_texts(None, "heldout"))


def small_documents(folder: Path) -> Documents:
    """Nine short documents, six files and three JSON lines, so that a few dozen contexts span epochs."""
    folder.mkdir()
    snippets = [f"def f{i}(x):\n    return x + {i}\n" * (1 + i % 3) for i in range(9)]
    for i, text in enumerate(snippets[:6]):
        (folder / f"doc{i}.txt").write_text(text)
    (folder / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in snippets[6:]))
    return documents(str(folder))


def test_documents_are_read_in_a_seeded_order_reshuffled_every_epoch_and_resume_exactly(tokenizer, tmp_path):
    docs = small_documents(tmp_path / "data")
    bos = tokenizer.bos_token_id
    first = ContextStream(docs, tokenizer, 16, bos, seed=5)
    orders = [first.order(epoch) for epoch in range(3)]
    assert all(sorted(order) == list(range(len(docs))) for order in orders)
    assert orders[0] != orders[1] != orders[2] and ContextStream(docs, tokenizer, 16, bos, seed=6).order(0) != orders[0]
    # Epoch 0's tokens are the documents in that order, each followed by BOS.
    expected = [t for i in orders[0] for t in [*tokenizer.encode(docs[i], add_special_tokens=False), bos]]
    n = len(expected) // 15 + 1
    body = first.next(n)[:, 1:].flatten().tolist()
    assert body[: len(expected)] == expected
    assert first.documents[0] == [orders[0][0]] and first.epochs[-1] == 1
    # Resuming from any saved position reads exactly what an uninterrupted stream reads, across epochs.
    stream = ContextStream(docs, tokenizer, 16, bos, seed=5)
    for step in (1, 7, n - 2):
        stream.next(step)
        state = json.loads(json.dumps(stream.state_dict()))
        expected = stream.next(2 * n)
        resumed = ContextStream(docs, tokenizer, 16, bos, seed=5)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.next(2 * n), expected)


def test_mixed_contexts_permute_each_buffer_of_the_stream_and_resume_exactly(tokenizer, tmp_path):
    docs = small_documents(tmp_path / "data")
    bos = tokenizer.bos_token_id
    plain = ContextStream(docs, tokenizer, 16, bos, seed=5).next(30)
    mixed = MixedContexts(ContextStream(docs, tokenizer, 16, bos, seed=5), 10, seed=1)
    served = mixed.next(30)
    for i in range(3):  # each buffer of 10 is the stream's next 10 contexts, in a seeded order
        buffer, expected = served[10 * i : 10 * i + 10], plain[10 * i : 10 * i + 10]
        assert sorted(map(tuple, buffer.tolist())) == sorted(map(tuple, expected.tolist()))
        assert not torch.equal(buffer, expected)
    for step in (3, 10, 7):
        state = json.loads(json.dumps(mixed.state_dict()))
        after = mixed.next(25)
        resumed = MixedContexts(ContextStream(docs, tokenizer, 16, bos, seed=5), 10, seed=1)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.next(25), after)
        mixed.next(step)


def test_spread_contexts_are_a_seeded_random_subset_of_one_epoch(tokenizer, tmp_path):
    docs = small_documents(tmp_path / "data")
    bos = tokenizer.bos_token_id
    every, sources = spread_contexts(docs, tokenizer, 16, bos, 10**6, seed=2)
    stream = ContextStream(docs, tokenizer, 16, bos, seed=2)
    whole = stream.next(len(every) + 1)
    assert torch.equal(whole[: len(every)], every) and stream.epochs[len(every)] == 1  # all of epoch 0, no more
    some, some_sources = spread_contexts(docs, tokenizer, 16, bos, 12, seed=2)
    rows = [next(i for i in range(len(every)) if torch.equal(every[i], row)) for row in some]
    assert len(some) == 12 and rows == sorted(rows) and rows != list(range(12))  # spread out, in stream order
    assert some_sources == [sources[i] for i in rows]
    assert not torch.equal(spread_contexts(docs, tokenizer, 16, bos, 12, seed=3)[0], some)
    with pytest.raises(SaelabError, match="not one whole context"):
        spread_contexts(docs, tokenizer, 2000, bos, 1)


# --------------------------------------------------------------------------------- Hugging Face datasets


SNIPPETS = [f"def g{i}(x):\n    return x * {i}\n" * (1 + i % 3) for i in range(12)]


def test_a_saved_hugging_face_dataset_is_read_in_a_seeded_permutation_per_epoch(tokenizer, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": SNIPPETS, "id": list(range(12))}).save_to_disk(str(tmp_path / "flat"))
    docs = documents(str(tmp_path / "flat"))
    assert isinstance(docs, Documents) and list(docs) == SNIPPETS and docs.name(3).endswith("flat row 3")
    assert list(iter_texts(str(tmp_path / "flat"), "heldout")) == SNIPPETS  # one Dataset: the same for both splits
    bos = tokenizer.bos_token_id
    stream = ContextStream(docs, tokenizer, 16, bos, seed=4)
    orders = [stream.order(epoch) for epoch in range(2)]
    assert sorted(orders[0]) == list(range(12)) and orders[0] != orders[1] != list(range(12))
    expected = [t for i in orders[0] for t in [*tokenizer.encode(SNIPPETS[i], add_special_tokens=False), bos]]
    n = len(expected) // 15 + 1
    assert stream.next(n)[:, 1:].flatten().tolist()[: len(expected)] == expected
    state = json.loads(json.dumps(stream.state_dict()))
    after = stream.next(2 * n)  # into epoch 2
    resumed = ContextStream(documents(str(tmp_path / "flat")), tokenizer, 16, bos, seed=4)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next(2 * n), after)


def test_a_saved_dataset_dict_gives_its_splits_and_bad_ones_are_one_line_errors(tmp_path):
    import datasets

    splits = {"train": SNIPPETS[:8], "validation": SNIPPETS[8:]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert list(documents(str(tmp_path / "dict"), "train")) == SNIPPETS[:8]
    heldout = documents(str(tmp_path / "dict"), "heldout")
    assert list(heldout) == SNIPPETS[8:] and "[validation] row 0" in heldout.name(0)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": SNIPPETS})}).save_to_disk(
        str(tmp_path / "train_only")
    )
    with pytest.raises(SaelabError, match="no 'validation' split for saelab's 'heldout' split"):
        documents(str(tmp_path / "train_only"), "heldout")
    datasets.Dataset.from_dict({"body": SNIPPETS}).save_to_disk(str(tmp_path / "no_text"))
    with pytest.raises(SaelabError, match=r"no 'text' column \(columns: body\)"):
        documents(str(tmp_path / "no_text"))
    datasets.Dataset.from_dict({"text": ["ok", None]}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(SaelabError, match="row 1 has a NoneType 'text'"):
        list(documents(str(tmp_path / "none")))


def jsonl_shards(folder: Path, n_shards: int = 4) -> list[str]:
    """SNIPPETS as `n_shards` .jsonl files: a streamed dataset with several shards, as on the hub."""
    folder.mkdir()
    paths = []
    for shard in range(n_shards):
        path = folder / f"shard{shard}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SNIPPETS[shard::n_shards]))
        paths.append(str(path))
    return paths


def test_a_streamed_hub_dataset_is_read_in_a_seeded_shuffle_per_epoch_and_resumes_exactly(
    tokenizer, tmp_path, monkeypatch
):
    """The hub loader on local shards: `datasets.load_dataset` streams real .jsonl files in place of a download."""
    import datasets

    import saelab.models.access

    shards = jsonl_shards(tmp_path / "shards")
    stored = [t for path in shards for t in (json.loads(line)["text"] for line in Path(path).read_text().splitlines())]
    load = datasets.load_dataset
    asked = []

    def local_load(name: str, split: str, streaming: bool):
        asked.append((name, split, streaming))
        return load("json", data_files=shards, split="train", streaming=True)

    monkeypatch.setattr(saelab.models.access, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", local_load)
    docs = documents("someone/code", "heldout")
    assert asked[0] == ("someone/code", "validation", True)
    assert list(iter_texts("someone/code")) == stored  # the stored order, for a tokenizer
    epochs = [list(docs.texts(seed=3, epoch=e)) for e in range(3)]
    assert all(sorted(e) == sorted(stored) for e in epochs)  # every epoch reads every row once
    assert epochs[0] != stored and epochs[0] != epochs[1] != epochs[2]
    assert list(docs.texts(seed=3, epoch=1)) == epochs[1] and list(docs.texts(seed=4, epoch=1)) != epochs[1]
    bos = tokenizer.bos_token_id
    stream = ContextStream(docs, tokenizer, 16, bos, seed=3)
    assert stream.order(0) is None
    expected = [t for text in epochs[0] for t in [*tokenizer.encode(text, add_special_tokens=False), bos]]
    n = len(expected) // 15 + 1
    assert stream.next(n)[:, 1:].flatten().tolist()[: len(expected)] == expected
    for _ in range(3):  # from positions in epochs 1 and 2, resumed streams read what the uninterrupted one reads
        stream.next(7)
        state = json.loads(json.dumps(stream.state_dict()))
        after = stream.next(n)
        resumed = ContextStream(documents("someone/code", "heldout"), tokenizer, 16, bos, seed=3)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.next(n), after)
    # The evals' and dashboards' spread reads epoch 0 of the same shuffle.
    spread, _ = spread_contexts(docs, tokenizer, 16, bos, 10**6, seed=3)
    assert spread[:, 1:].flatten().tolist() == expected[: spread[:, 1:].numel()]


def test_the_activation_store_reads_a_saved_hugging_face_dataset_in_its_seeded_order(lm, tmp_path):
    import datasets

    from saelab.models.store import build_lm_source

    texts = [text[:600] for text in corpus()]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    store = build_lm_source(
        lm, str(tmp_path / "saved"), "blocks.0.hook_resid_post", 16, 32, 7, "cpu", buffer_tokens=640
    )
    batch = store.next_batches(32)["blocks.0.hook_resid_post"]
    assert batch.shape == (32, 32) and torch.isfinite(batch).all()
    order = store.contexts.order(0)
    fresh = ContextStream(documents(str(tmp_path / "saved")), lm.tokenizer, 16, lm.bos_token_id, seed=7)
    assert order == fresh.order(0) and order != list(range(len(texts)))  # the store's seed, not the row order
    state = store.contexts.state_dict()
    read = {d for docs in store.contexts.documents for d in docs}  # documents of the last contexts it read
    assert state["epoch"] == 0 and read <= set(order[: state["documents"]]) and order[state["documents"] - 1] in read
