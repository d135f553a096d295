"""The built-in offline model: its corpus split, the shipped files, loading, and one-line errors on bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import SaelabError
from saelab.models.builtin import (
    BUILTIN_DIR,
    CFG_FILE,
    STDLIB_SKIP_DIRS,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    builtin_texts,
    builtin_tokenizer,
    load_builtin_model,
    load_lm,
    split_of,
    stdlib_files,
    stdlib_root,
)
from saelab.models.lm_train import heldout_contexts, mean_loss, unigram_entropy


@pytest.fixture(scope="module")
def model():
    return load_builtin_model()


def test_corpus_split_is_disjoint_deterministic_and_skips_test_suites() -> None:
    train, heldout = stdlib_files("train"), stdlib_files("heldout")
    assert len(train) > 300 and len(heldout) > 10
    assert not set(train) & set(heldout)
    root = stdlib_root()
    for path in train + heldout:
        assert STDLIB_SKIP_DIRS.isdisjoint(path.relative_to(root).parts[:-1])
    assert all(split_of(p.relative_to(root).as_posix()) == "heldout" for p in heldout)
    # A stable hash, not Python's salted one: the same file lands in the same split on every install.
    assert split_of("typing.py") == "heldout" and split_of("os.py") == "train"
    first = next(builtin_texts("heldout"))
    assert first == heldout[0].read_text(encoding="utf-8", errors="replace")
    with pytest.raises(SaelabError, match="unknown corpus split 'test'"):
        stdlib_files("test")


def test_shipped_folder_is_small_and_records_how_it_was_made() -> None:
    files = sorted(p.name for p in BUILTIN_DIR.iterdir())
    assert files == [CFG_FILE, WEIGHTS_FILE, TOKENIZER_FILE]
    assert sum(p.stat().st_size for p in BUILTIN_DIR.iterdir()) < 25 * 2**20
    cfg = json.loads((BUILTIN_DIR / CFG_FILE).read_text())
    results = cfg["results"]
    assert results["command"].startswith("saelab lm train")
    assert results["tokens_trained"] >= cfg["train"]["tokens"]
    assert results["heldout_loss"] < results["unigram_entropy"] - 2


def test_shipped_model_is_far_better_than_unigram_on_heldout_files(model) -> None:
    tokenizer = builtin_tokenizer()
    texts = list(builtin_texts("heldout"))
    ids = [tokenizer(text)["input_ids"] for text in texts]  # each starts with BOS
    stream = torch.tensor([token for row in ids for token in row])
    contexts = heldout_contexts(stream, model.cfg.n_ctx, tokenizer.bos_token_id)[::16]  # a spread-out sample
    assert len(contexts) >= 30
    loss, baseline = mean_loss(model, contexts), unigram_entropy(contexts[:, 1:])
    assert loss < baseline - 2, (loss, baseline)


def test_shipped_model_speaks_transformer_lens(model) -> None:
    from transformer_lens import HookedTransformer

    assert isinstance(model, HookedTransformer) and not model.training
    assert model.cfg.d_vocab == 4096 and model.tokenizer.bos_token == "<|endoftext|>"
    text = "for key, value in sorted(items.items()):\n    print(f'{key}: {value!r}')  # ünïcode ✓\n"
    tokens = model.to_tokens(text)
    assert tokens[0, 0] == model.tokenizer.bos_token_id
    assert model.to_string(tokens[0, 1:]) == text
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    assert cache["blocks.0.hook_resid_post"].shape == (1, tokens.shape[1], model.cfg.d_model)
    # It knows some Python: the most likely next token after each prompt.
    expected = {"import os\nimport": " sys", 'if __name__ == "__main__': '":', "class A:\n    def __init__(": "self"}
    for prompt, token in expected.items():
        assert model.to_string(model(prompt)[0, -1].argmax()) == token, prompt
    after_colon = model.to_string(model("for key, value in sorted(items.items()):")[0, -1].argmax())
    assert after_colon.startswith("\n    ") and after_colon.strip() == ""  # a new line, indented


def test_sample_cli_uses_the_builtin_model() -> None:
    result = CliRunner().invoke(app, ["lm", "sample", "--prompt", "import ", "--tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("import ") and len(result.output) > len("import ") + 5


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_DIR, folder)
    return folder


def _error(folder: Path) -> str:
    with pytest.raises(SaelabError) as err:
        load_lm(folder)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_or_foreign_folders_are_one_line_errors(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "cfg.json not found" in _error(empty)
    folder = _copy(tmp_path)
    (folder / CFG_FILE).write_text(json.dumps({"format": "saelab.toy_model", "version": 1}))
    assert "not a saelab language model" in _error(folder)
    (folder / CFG_FILE).write_text("{ not json")
    assert "not valid JSON" in _error(folder)


def test_corrupt_or_mismatched_files_are_one_line_errors(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    cfg = json.loads((folder / CFG_FILE).read_text())
    (folder / WEIGHTS_FILE).write_bytes((BUILTIN_DIR / WEIGHTS_FILE).read_bytes()[:1000])
    assert "corrupt or truncated" in _error(folder)
    shutil.copy(BUILTIN_DIR / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    (folder / TOKENIZER_FILE).write_text('{"version": "1.0", "model": ')
    assert "not a readable tokenizer" in _error(folder)
    shutil.copy(BUILTIN_DIR / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "model": {**cfg["model"], "d_model": 64, "n_heads": 2}}))
    assert "does not match" in _error(folder)
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "model": {**cfg["model"], "d_vocab": 5000}}))
    assert "tokenizer has 4096 tokens but the model 5000" in _error(folder)
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "model": {**cfg["model"], "n_layer": 2}}))
    assert "did you mean 'n_layers'" in _error(folder)


def test_cli_reports_a_bad_model_folder_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["lm", "sample", "--model", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert isinstance(result.exception, SaelabError) and "not found" in str(result.exception)
