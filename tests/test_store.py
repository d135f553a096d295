"""The activation store and its disk cache: every regular token exactly once, shuffled, several hooks aligned,
bit-exact resume, cache equal to the live store, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from models_helpers import make_tl_model, save_gpt2
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import SaelabError
from saelab.models.access import LanguageModel
from saelab.models.cache import CachedActivations, read_manifest, write_activation_cache
from saelab.models.data import ContextStream, iter_texts
from saelab.models.store import ActivationStore, build_lm_source

LENGTH = 24
HOOK = "blocks.0.hook_resid_post"


def make_store(lm, dataset, hooks=(HOOK,), buffer_tokens=5 * LENGTH, seed=0) -> ActivationStore:
    """Buffers of 5 contexts, filled 2 contexts per forward pass (so fills end on a partial model batch)."""
    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id)
    return ActivationStore(lm, contexts, list(hooks), buffer_tokens, model_batch_size=2, seed=seed, dataset=dataset)


def canonical(rows: torch.Tensor) -> torch.Tensor:
    """Rows in an order that depends only on their values (to compare multisets of rows)."""
    projection = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(0))
    return rows[(rows @ projection).argsort()]


def test_store_serves_each_regular_token_once_shuffled_within_buffers(lm, dataset):
    store = make_store(lm, dataset)
    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id).next(10)
    regular = lm.regular_positions(contexts)
    assert not regular[:, 0].any()
    expected = lm.activations(contexts, [HOOK])[HOOK][regular]  # 2 buffers' worth, in positional order
    per_buffer = int(regular[:5].sum())

    served = torch.cat([store.next_batch(7) for _ in range(len(expected) // 7)])  # batches cross the boundary
    served = torch.cat([served, store.next_batch(len(expected) - len(served))])
    assert served.shape == expected.shape == (int(regular.sum()), 32)
    first, second = served[:per_buffer], served[per_buffer:]
    torch.testing.assert_close(canonical(first), canonical(expected[:per_buffer]), rtol=0, atol=1e-6)
    torch.testing.assert_close(canonical(second), canonical(expected[per_buffer:]), rtol=0, atol=1e-6)
    assert not torch.allclose(first, expected[:per_buffer])  # shuffled, not in positional order


def test_seed_changes_only_the_order(lm, dataset):
    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id).next(5)
    first_buffer = int(lm.regular_positions(contexts).sum())
    a = make_store(lm, dataset, seed=0).next_batch(first_buffer)
    b = make_store(lm, dataset, seed=1).next_batch(first_buffer)
    assert not torch.equal(a, b)
    torch.testing.assert_close(canonical(a), canonical(b), rtol=0, atol=1e-6)


def test_several_hooks_come_from_one_pass_with_aligned_rows(lm, dataset):
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", HOOK]
    store = make_store(lm, dataset, hooks)
    assert store.d_ins == dict.fromkeys(hooks, 32)
    batch = store.next_batches(150)
    pre, attn, mlp, post = (batch[hook] for hook in hooks)
    torch.testing.assert_close(post, pre + attn + mlp)  # the same token in row j of every hook
    assert torch.equal(batch[HOOK], make_store(lm, dataset).next_batch(150))
    assert store.metadata_for(HOOK)["hook_name"] == HOOK
    with pytest.raises(SaelabError, match="reads 4 hooks"):
        store.next_batch(1)


@pytest.mark.parametrize("served_before", [0, 30, 61])
def test_resume_from_state_dict_is_bit_exact(lm, dataset, served_before):
    store = make_store(lm, dataset)
    for _ in range(served_before // 30):
        store.next_batch(30)
    store.next_batch(served_before % 30 or 1) if served_before else None
    state = json.loads(json.dumps(store.state_dict()))  # it survives a JSON checkpoint
    expected = [store.next_batch(45) for _ in range(6)]
    resumed = make_store(lm, dataset)
    resumed.load_state_dict(state)
    for batch in expected:
        assert torch.equal(resumed.next_batch(45), batch)


def test_nan_activations_are_a_clear_error(tokenizer, dataset):
    model = make_tl_model(tokenizer)
    with torch.no_grad():
        model.W_E[5:50] = float("nan")
    store = make_store(LanguageModel.from_transformer_lens(model, "broken"), dataset)
    with pytest.raises(SaelabError, match=f"activations at {HOOK} contain NaN"):
        store.next_batch(10)


def test_store_rejects_bad_settings(lm, dataset):
    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, 65, lm.bos_token_id)
    with pytest.raises(SaelabError, match="context length 65 exceeds what tiny accepts"):
        ActivationStore(lm, contexts, [HOOK])
    with pytest.raises(SaelabError, match="unknown hook"):
        make_store(lm, dataset, ["blocks.0.hook_resid"])
    store = make_store(lm, dataset)
    with pytest.raises(SaelabError, match="read hooks"):
        store.load_state_dict(make_store(lm, dataset, ["blocks.0.hook_resid_pre"]).state_dict())


def test_build_lm_source_loads_a_model_folder_by_path(tokenizer, dataset, tmp_path):
    folder = save_gpt2(tmp_path / "gpt2", tokenizer)
    source = build_lm_source(str(folder), dataset, "blocks.1.hook_mlp_out", LENGTH, 64, 3, "cpu", buffer_tokens=500)
    assert source.d_in == 32 and source.next_batch(64).shape == (64, 32)
    assert source.metadata | {"model_name": None} == {
        "model_name": None,
        "model_class_name": "AutoModelForCausalLM",
        "hook_name": "blocks.1.hook_mlp_out",
        "dataset": dataset,
        "dataset_path": dataset,
        "context_length": LENGTH,
        "context_size": LENGTH,
        "prepend_bos": True,
        "exclude_special_tokens": [tokenizer.bos_token_id],
        "d_in": 32,
    }
    assert Path(source.metadata["model_name"]) == folder.resolve()


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_holds_exactly_the_live_stores_batches(lm, dataset, tmp_path):
    hooks = ["blocks.0.hook_resid_pre", HOOK]
    out = write_activation_cache(make_store(lm, dataset, hooks), 500, tmp_path / "cache", shard_tokens=128)
    manifest = read_manifest(out)
    assert manifest["tokens"] == 500 and manifest["shards"] == [128, 128, 128, 116]
    assert manifest["hooks"] == dict.fromkeys(hooks, 32)
    assert sorted(p.name for p in (out / HOOK).iterdir()) == [f"shard_0000{i}.npy" for i in range(4)]

    live = make_store(lm, dataset, hooks)
    readers = {hook: CachedActivations(out, hook) for hook in hooks}
    assert isinstance(readers[HOOK]._shards[HOOK][0], np.memmap)  # zero-copy: rows are read from disk on demand
    assert readers[HOOK].metadata == live.metadata_for(HOOK) and readers[HOOK].d_in == 32
    for size in (100, 100, 150, 150):  # batches cross shard boundaries
        expected = live.next_batches(size)
        for hook, reader in readers.items():
            assert torch.equal(reader.next_batch(size), expected[hook])
    with pytest.raises(SaelabError, match="holds 500 tokens, too few"):
        readers[HOOK].next_batch(1)
    both = CachedActivations(out)  # every hook at once, row-aligned as the live store serves them
    assert both.hooks == hooks and both.d_ins == dict.fromkeys(hooks, 32)
    first = both.next_batches(100)
    assert all(torch.equal(first[hook], make_store(lm, dataset, hooks).next_batches(100)[hook]) for hook in hooks)


def test_cache_reader_resumes(lm, dataset, tmp_path):
    out = write_activation_cache(make_store(lm, dataset), 300, tmp_path / "cache", shard_tokens=64)
    reader = CachedActivations(out)
    reader.next_batch(70)
    state = reader.state_dict()
    expected = reader.next_batch(100)
    resumed = CachedActivations(out)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_batch(100), expected)


def test_damaged_or_foreign_caches_are_one_line_errors(lm, dataset, tmp_path):
    out = write_activation_cache(make_store(lm, dataset), 100, tmp_path / "cache", shard_tokens=64)
    with pytest.raises(
        SaelabError, match=r"no hook 'blocks\.0\.hook_resid_pst'; did you mean 'blocks\.0\.hook_resid_post'"
    ):
        CachedActivations(out, "blocks.0.hook_resid_pst")
    with pytest.raises(SaelabError, match="already exists"):
        write_activation_cache(make_store(lm, dataset), 100, out)
    with pytest.raises(SaelabError, match="is not an activation cache"):
        CachedActivations(tmp_path)
    shard = out / HOOK / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SaelabError, match=r"cache shard .* holds|cannot read cache shard"):
        CachedActivations(out)
    (out / "manifest.json").write_text("{broken")
    with pytest.raises(SaelabError, match="not valid JSON"):
        CachedActivations(out)
    (out / "manifest.json").write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(SaelabError, match="not an activation cache manifest"):
        CachedActivations(out)


def test_activations_cache_command(tokenizer, dataset, tmp_path):
    folder = save_gpt2(tmp_path / "gpt2", tokenizer)
    out = tmp_path / "cache"
    args = ["activations", "cache", "--model", str(folder), "--dataset", dataset, "--hook", HOOK]
    args += ["--hook", "blocks.1.hook_resid_post", "--tokens", "300", "--out", str(out)]
    args += ["--context-length", str(LENGTH), "--batch-size", "64", "--buffer-tokens", "200", "--seed", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 300 activations" in result.output
    hooks = [HOOK, "blocks.1.hook_resid_post"]
    live = build_lm_source(str(folder), dataset, hooks, LENGTH, 64, 2, "cpu", buffer_tokens=200)
    expected = live.next_batches(300)
    for hook, rows in expected.items():
        assert torch.equal(CachedActivations(out, hook).next_batch(300), rows)
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, SaelabError) and "--overwrite" in str(again.exception)


def test_the_built_in_model_and_corpus_are_the_defaults():
    source = build_lm_source(None, None, HOOK, 64, 64, 0, "cpu", buffer_tokens=1024)
    assert (source.metadata["model_name"], source.metadata["dataset"]) == ("builtin", "builtin")
    assert source.model.kind == "HookedTransformer" and source.d_in == source.model.model.cfg.d_model
    batch = source.next_batch(64)
    assert batch.shape == (64, source.d_in) and torch.isfinite(batch).all()
