"""Text datasets and the stream of fixed-length token contexts that language models read.

A dataset is the built-in corpus (None: the Python standard library's source, split into 'train' and 'heldout'
files), a local `.txt` file (one document), a `.jsonl` file (one document per line, in its `text` field), a folder
of such files, or a Hugging Face dataset name where the network allows.

`ContextStream` packs documents into contexts `[BOS, t₁, …, t_{L−1}]`: documents are tokenised without special
tokens and joined with BOS between them, so every context starts with BOS and every document start is marked.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import SaelabError

SPLITS = ("train", "heldout")
TEXT_SUFFIXES = (".txt", ".jsonl")


def iter_texts(dataset: str | None, split: str = "train") -> Iterator[str]:
    """The documents of a dataset, one string each. Errors (missing files, no network) are raised here, eagerly.

    Only the built-in corpus and Hugging Face datasets have a held-out split ('heldout' reads a Hugging Face
    dataset's 'validation' split); a local dataset is the same text for both, so evaluate on held-out files by
    naming them.
    """
    if split not in SPLITS:
        raise SaelabError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if dataset is None or dataset == "builtin":
        from saelab.models.builtin import builtin_texts, stdlib_files

        stdlib_files(split)  # raises now, not at the first document, if the corpus is missing
        return builtin_texts(split)
    path = Path(dataset).expanduser()
    if path.exists():
        files = _local_files(path)
        return itertools.chain.from_iterable(_file_texts(file) for file in files)
    return _hf_texts(dataset, "train" if split == "train" else "validation")


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise SaelabError(f"dataset folder {path} holds no .txt or .jsonl files")
        return files
    if path.suffix not in TEXT_SUFFIXES:
        raise SaelabError(f"dataset file {path} must be .txt (one document) or .jsonl (a 'text' field per line)")
    return [path]


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SaelabError(
                    f"{path}:{number} is not valid JSON ({err.msg}); each line must be one object"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SaelabError(f"{path}:{number} has no string 'text' field; each line must be {{\"text\": ...}}")
            yield record["text"]


def _hf_texts(name: str, split: str) -> Iterator[str]:
    from saelab.models.access import hub_reachable

    try:
        if not hub_reachable():
            raise ConnectionError("huggingface.co is unreachable")
        import datasets

        rows = datasets.load_dataset(name, split=split, streaming=True)
        first = next(iter(rows))
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, …)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SaelabError(
            f"cannot load dataset '{name}': it is not a local file or folder, and it cannot be downloaded here "
            f"({reason}); pass local .txt/.jsonl files or a folder of them with --dataset"
        ) from None
    if not isinstance(first.get("text"), str):
        raise SaelabError(f"dataset '{name}' has no string 'text' column (columns: {', '.join(first)})")
    return (row["text"] for row in rows)


class ContextStream:
    """Contexts [n, context_length] of token ids, each `[BOS, t₁, …, t_{L−1}]`, packed from a dataset's documents.

    When the dataset runs out the stream starts over (a new epoch). Contexts are dealt round-robin to
    `world_size` ranks and this stream keeps those of `rank`, so data-parallel workers read disjoint tokens.

    The position is (epoch, documents read, offset into the last one, contexts dealt): `load_state_dict` restores
    it by skipping documents untokenised and re-tokenising only the one it stopped in.
    """

    def __init__(
        self,
        texts: Callable[[], Iterator[str]],
        tokenizer: Any,
        context_length: int,
        bos_token_id: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(context_length, int) or context_length < 2:
            raise SaelabError(
                f"context length must be an integer >= 2 (BOS plus at least one token), got {context_length!r}"
            )
        if not 0 <= rank < world_size:
            raise SaelabError(f"rank {rank} is outside 0..{world_size - 1}")
        self.texts = texts
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bos_token_id = bos_token_id
        self.rank = rank
        self.world_size = world_size
        self._contexts = 0  # contexts dealt to all ranks so far
        self._start(epoch=0)

    def _start(self, epoch: int) -> None:
        self._epoch = epoch
        self._docs = iter(self.texts())
        self._documents = 0  # documents read in this epoch; the last of them is in _tokens
        self._tokens: list[int] = []
        self._offset = 0

    def next(self, n: int) -> Tensor:
        """The next n contexts of this rank, [n, context_length] int64."""
        rows = []
        while len(rows) < n:
            row = [self.bos_token_id, *self._take(self.context_length - 1)]
            if self._contexts % self.world_size == self.rank:
                rows.append(row)
            self._contexts += 1
        return torch.tensor(rows, dtype=torch.long).reshape(n, self.context_length)

    def _take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self._offset == len(self._tokens):
                self._read_document()
            piece = self._tokens[self._offset : self._offset + k - len(out)]
            out += piece
            self._offset += len(piece)
        return out

    def _read_document(self) -> None:
        text = next(self._docs, None)
        if text is None:  # the end of the dataset: start the next epoch
            self._start(self._epoch + 1)
            text = next(self._docs, None)
            if text is None:
                raise SaelabError("the dataset holds no documents; check the --dataset files")
        self._documents += 1
        self._tokens = [*self.tokenizer.encode(text, add_special_tokens=False, verbose=False), self.bos_token_id]
        self._offset = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "documents": self._documents, "offset": self._offset, "contexts": self._contexts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start(state["epoch"])
        self._contexts = state["contexts"]
        if state["documents"] > 0:
            for _ in itertools.islice(self._docs, state["documents"] - 1):
                pass
            self._read_document()
            self._documents = state["documents"]
            self._offset = state["offset"]
