"""Text datasets and the stream of fixed-length token contexts that language models read.

A dataset is the built-in corpus (None: the Python standard library's source, split into 'train' and 'heldout'
files), a local `.txt` file (one document), a `.jsonl` file (one document per line, in its `text` field), a folder
of such files, a Hugging Face dataset saved with `save_to_disk` (one document per row, in its `text` column), or
a Hugging Face dataset name, streamed, where the network allows.

`ContextStream` packs documents into contexts `[BOS, t₁, …, t_{L−1}]`: documents are tokenised without special
tokens and joined with BOS between them, so every context starts with BOS and every document start is marked.

No source is read in its stored order (file paths, rows), so that any stretch of the stream (an SAE's or a language
model's training run, a mixing buffer, an activation cache) draws from the whole dataset rather than from a few
files that sort next to each other. Where a document can be read by its number (`Documents`: the built-in corpus,
local files, a saved Hugging Face dataset) each epoch reads a seeded random permutation of all of them; a streamed
Hugging Face dataset (`StreamedDocuments`) is read through its own seeded shuffle (shard order and a shuffle
buffer), reseeded every epoch. Either way the order is a function of (seed, epoch), so a stream is exactly
resumable. `spread_contexts` picks a seeded random spread of contexts from a whole split, for evals and dashboards.
`iter_texts` alone reads the stored order, for what reads every document anyway (training a tokenizer).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.errors import SaelabError

SPLITS = ("train", "heldout")
TEXT_SUFFIXES = (".txt", ".jsonl")
# The Hugging Face split each of saelab's splits reads.
HF_SPLITS = {"train": "train", "heldout": "validation"}
# Rows in a streamed dataset's shuffle buffer: the larger, the closer to a uniform shuffle (the datasets default is
# 1000); 10k rows of text fit in memory easily.
STREAM_SHUFFLE_BUFFER = 10_000


def iter_texts(dataset: str | None, split: str = "train") -> Iterator[str]:
    """The documents of a dataset in their stored order (sorted file paths, lines, rows), one string each, for what
    reads every document anyway, such as training a tokenizer; token streams read `documents` in a seeded order.
    Errors (missing files, no network) are raised here, eagerly.

    Only the built-in corpus and Hugging Face datasets have a held-out split ('heldout' reads a Hugging Face
    dataset's 'validation' split); a local dataset is the same text for both, so evaluate on held-out files by
    naming them.
    """
    source = documents(dataset, split)
    if isinstance(source, StreamedDocuments):
        return source.stored_order()
    return iter(source)


class Documents(Sequence[str]):
    """A dataset's documents, each read when asked for by number (so a stream can read them in any order);
    `name(i)` says where document i comes from."""

    def name(self, i: int) -> str:
        raise NotImplementedError


class FileDocuments(Documents):
    """Documents in files: a whole file (`.txt`, a built-in corpus file) or one line of a `.jsonl` file (`offset`
    is its byte offset)."""

    def __init__(self, entries: list[tuple[Path, int | None, int]], root: Path | None = None) -> None:
        self.entries = entries  # (file, byte offset of the jsonl line or None, line number)
        self.root = root

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        path, offset, line = self.entries[i]
        if offset is None:
            return path.read_text(encoding="utf-8", errors="replace")
        with path.open("rb") as f:
            f.seek(offset)
            return _jsonl_text(path, line, f.readline().decode("utf-8", errors="replace"))

    def name(self, i: int) -> str:
        path, offset, line = self.entries[i]
        shown = path.relative_to(self.root).as_posix() if self.root else str(path)
        return shown if offset is None else f"{shown}:{line}"


class RowDocuments(Documents):
    """The rows of a map-style Hugging Face `datasets.Dataset` (one saved with `save_to_disk`), each row's `text`."""

    def __init__(self, rows: Any, label: str) -> None:  # rows: datasets.Dataset with a `text` column
        self.rows = rows.select_columns(["text"])
        self.label = label

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        text = self.rows[int(i)]["text"]
        if not isinstance(text, str):
            raise SaelabError(f"{self.name(i)} has a {type(text).__name__} 'text', not a string; fix the dataset")
        return text

    def name(self, i: int) -> str:
        return f"{self.label} row {i}"


class StreamedDocuments:
    """A dataset streamed from the Hugging Face hub (a `datasets.IterableDataset`), which cannot be read by number.

    `texts(seed, epoch)` reads it through `IterableDataset.shuffle(seed, buffer_size)` with `set_epoch(epoch)`: the
    shards in a seeded order, and rows drawn at random from a buffer of `buffer_size`, both reseeded every epoch
    (seed + epoch), so every epoch reads another order and the same (seed, epoch) the same one.
    """

    def __init__(self, load: Callable[[], Any], label: str, buffer_size: int = STREAM_SHUFFLE_BUFFER) -> None:
        self.load = load  # () -> datasets.IterableDataset with a `text` column
        self.label = label
        self.buffer_size = buffer_size
        self._rows: Any = None

    def _dataset(self) -> Any:
        if self._rows is None:
            self._rows = self.load()
        return self._rows

    def texts(self, seed: int, epoch: int) -> Iterator[str]:
        rows = self._dataset().shuffle(seed=seed, buffer_size=self.buffer_size)
        rows.set_epoch(epoch)
        return self._texts(rows)

    def stored_order(self) -> Iterator[str]:
        return self._texts(self._dataset())

    def _texts(self, rows: Any) -> Iterator[str]:
        for row in rows:
            if not isinstance(row.get("text"), str):
                raise SaelabError(f"dataset '{self.label}' has a row without a string 'text' column")
            yield row["text"]


# What a `ContextStream` reads: documents by number, a streamed dataset, or (tests, pre-ordered data) a function
# returning an iterator of texts that is read in its own order.
TextSource = Sequence[str] | StreamedDocuments | Callable[[], Iterator[str]]


def documents(dataset: str | None, split: str = "train") -> Documents | StreamedDocuments:
    """The documents of a dataset for `ContextStream`: `Documents` (read in a seeded random order) for the built-in
    corpus, local files and a saved Hugging Face dataset, or `StreamedDocuments` for a dataset on the hub. Errors
    are raised here, eagerly."""
    if split not in SPLITS:
        raise SaelabError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if dataset is None or dataset == "builtin":
        from saelab.models.builtin import stdlib_files, stdlib_root

        return FileDocuments([(path, None, 0) for path in stdlib_files(split)], stdlib_root())
    path = Path(dataset).expanduser()
    if path.is_dir() and _is_saved_hf_dataset(path):
        return _saved_hf_documents(path, split)
    if path.exists():
        entries: list[tuple[Path, int | None, int]] = []
        for file in _local_files(path):
            if file.suffix == ".txt":
                entries.append((file, None, 0))
                continue
            offset = 0
            with file.open("rb") as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        entries.append((file, offset, number))
                    offset += len(line)
        if not entries:
            raise SaelabError(f"dataset {path} holds no documents; check the --dataset files")
        return FileDocuments(entries, path if path.is_dir() else None)
    return _hub_documents(dataset, HF_SPLITS[split])


def _is_saved_hf_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _saved_hf_documents(path: Path, split: str) -> RowDocuments:
    """A saved Hugging Face dataset's rows: a `DatasetDict`'s 'train' or 'validation' split, or a `Dataset`'s rows
    (the same for both splits, as for local files)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a damaged folder
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise SaelabError(f"cannot read the saved Hugging Face dataset {path} ({reason})") from None
    label = str(path)
    if isinstance(saved, datasets.DatasetDict):
        name = HF_SPLITS[split]
        if name not in saved:
            raise SaelabError(
                f"the saved dataset {path} has no '{name}' split for saelab's '{split}' split (it has "
                f"{', '.join(saved)}); save one, or pass a single Dataset folder"
            )
        saved, label = saved[name], f"{path}[{name}]"
    if "text" not in saved.column_names:
        raise SaelabError(f"the saved dataset {label} has no 'text' column (columns: {', '.join(saved.column_names)})")
    if len(saved) == 0:
        raise SaelabError(f"the saved dataset {label} holds no rows; check the --dataset folder")
    return RowDocuments(saved, label)


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise SaelabError(f"dataset folder {path} holds no .txt or .jsonl files")
        return files
    if path.suffix not in TEXT_SUFFIXES:
        raise SaelabError(f"dataset file {path} must be .txt (one document) or .jsonl (a 'text' field per line)")
    return [path]


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SaelabError(f"{path}:{number} is not valid JSON ({err.msg}); each line must be one object") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise SaelabError(f"{path}:{number} has no string 'text' field; each line must be {{\"text\": ...}}")
    return record["text"]


def _hub_documents(name: str, split: str) -> StreamedDocuments:
    """A dataset on the Hugging Face hub, streamed; its first row is read now, so that errors come eagerly."""
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
    return StreamedDocuments(lambda: rows, f"{name}[{split}]")


class ContextStream:
    """Contexts [n, context_length] of token ids, each `[BOS, t₁, …, t_{L−1}]`, packed from a dataset's documents.

    `texts` is a sequence of documents (`Documents`, or a list of strings), read in a random permutation seeded by
    (`seed`, epoch); `StreamedDocuments`, read through its own shuffle seeded by (`seed`, epoch); or a function
    returning an iterator of texts, read in its order (for tests and data that is ordered already). When the
    dataset runs out the stream starts over (a new epoch, newly shuffled).
    Contexts are dealt round-robin to `world_size` ranks and this stream keeps those of `rank`, so data-parallel
    workers read disjoint tokens. `documents` lists, for each context the last `next` returned, the numbers of
    the documents its tokens come from (positions in `texts`; for a streamed dataset, in its epoch's order), and
    `epochs` the epoch it ends in.

    The position is (epoch, documents read, offset into the last one, contexts dealt): `load_state_dict` restores
    it by skipping documents unread and re-tokenising only the one it stopped in (a streamed dataset is read
    again from the start of the epoch up to there: exact, at the cost of re-reading the rows).
    """

    def __init__(
        self,
        texts: TextSource,
        tokenizer: Any,
        context_length: int,
        bos_token_id: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
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
        self.seed = seed
        self._contexts = 0  # contexts dealt to all ranks so far
        self.documents: list[list[int]] = []
        self.epochs: list[int] = []  # the epoch each of those contexts ends in
        self._start(epoch=0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def order(self, epoch: int) -> list[int] | None:
        """The document numbers in the order epoch `epoch` reads them (None where they cannot be read by number)."""
        if not isinstance(self.texts, Sequence):
            return None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.texts), generator=generator).tolist()

    def _start(self, epoch: int, skip: int = 0) -> None:
        self._epoch = epoch
        order = self.order(epoch)
        if isinstance(self.texts, StreamedDocuments):
            self._docs = enumerate(itertools.islice(self.texts.texts(self.seed, epoch), skip, None), skip)
        elif order is None:
            self._docs = enumerate(itertools.islice(self.texts(), skip, None), skip)
        else:
            self._docs = ((i, self.texts[i]) for i in order[skip:])  # read lazily, one document at a time
        self._documents = skip  # documents read in this epoch; the last of them is in _tokens
        self._doc = -1
        self._tokens: list[int] = []
        self._offset = 0

    def next(self, n: int) -> Tensor:
        """The next n contexts of this rank, [n, context_length] int64."""
        rows, self.documents, self.epochs = [], [], []
        while len(rows) < n:
            sources: list[int] = []
            row = [self.bos_token_id, *self._take(self.context_length - 1, sources)]
            if self._contexts % self.world_size == self.rank:
                rows.append(row)
                self.documents.append(sources)
                self.epochs.append(self._epoch)
            self._contexts += 1
        return torch.tensor(rows, dtype=torch.long).reshape(n, self.context_length)

    def _take(self, k: int, sources: list[int]) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self._offset == len(self._tokens):
                self._read_document()
            piece = self._tokens[self._offset : self._offset + k - len(out)]
            if not sources or sources[-1] != self._doc:
                sources.append(self._doc)
            out += piece
            self._offset += len(piece)
        return out

    def _read_document(self) -> None:
        doc = next(self._docs, None)
        if doc is None:  # the end of the dataset: start the next epoch
            self._start(self._epoch + 1)
            doc = next(self._docs, None)
            if doc is None:
                raise SaelabError("the dataset holds no documents; check the --dataset files")
        self._documents += 1
        self._doc, text = doc
        self._tokens = [*self.tokenizer.encode(text, add_special_tokens=False, verbose=False), self.bos_token_id]
        self._offset = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "documents": self._documents, "offset": self._offset, "contexts": self._contexts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._contexts = state["contexts"]
        self._start(state["epoch"], skip=max(state["documents"] - 1, 0))
        if state["documents"] > 0:
            self._read_document()
            self._offset = state["offset"]


class MixedContexts:
    """The contexts of a `ContextStream`, served in a seeded random order within buffers of `buffer_contexts`.

    Consecutive contexts of a stream come from the same document, so a batch taken straight from it holds one or
    two documents; buffer i holds the stream's next `buffer_contexts` contexts, permuted by a generator seeded with
    (seed, i), and batches are served from it in that order. The position is the stream's position at the start of
    the buffer, its index and the contexts served from it: `load_state_dict` refills the buffer exactly.
    """

    def __init__(self, stream: ContextStream, buffer_contexts: int, seed: int = 0) -> None:
        if not isinstance(buffer_contexts, int) or buffer_contexts < 1:
            raise SaelabError(f"a mixing buffer holds at least one context, got {buffer_contexts!r}")
        self.stream = stream
        self.buffer_contexts = buffer_contexts
        self.seed = seed
        self._start = stream.state_dict()
        self._index = -1  # the buffer being served; -1 before the first
        self._buffer = torch.zeros(0, stream.context_length, dtype=torch.long)
        self._served = 0

    def next(self, n: int) -> Tensor:
        """The next n contexts, [n, context_length] int64."""
        parts = []
        while n:
            if self._served == len(self._buffer):
                self._fill(self._index + 1)
            take = min(n, len(self._buffer) - self._served)
            parts.append(self._buffer[self._served : self._served + take])
            self._served += take
            n -= take
        return torch.cat(parts)

    def _fill(self, index: int) -> None:
        self._start = self.stream.state_dict()
        contexts = self.stream.next(self.buffer_contexts)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        self._buffer = contexts[torch.randperm(len(contexts), generator=generator)]
        self._index, self._served = index, 0

    def state_dict(self) -> dict[str, Any]:
        return {"stream": dict(self._start), "buffer": self._index, "served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self._start = dict(state["stream"])
        self._buffer = torch.zeros(0, self.stream.context_length, dtype=torch.long)
        self._index, self._served = -1, 0
        if state["buffer"] >= 0:
            self._fill(state["buffer"])
            self._served = state["served"]


def spread_contexts(
    texts: TextSource,
    tokenizer: Any,
    context_length: int,
    bos_token_id: int,
    n: int,
    seed: int = 0,
    max_contexts: int = 1 << 16,
) -> tuple[Tensor, list[list[int]]]:
    """A seeded random spread of min(n, available) contexts over a whole split: every context of one epoch (at
    most `max_contexts`, for very large datasets) is packed, and n of them are chosen uniformly without
    replacement, kept in stream order. Returns the contexts [n, context_length] and, per context, the numbers of
    the documents it comes from."""
    stream = ContextStream(texts, tokenizer, context_length, bos_token_id, seed=seed)
    rows: list[Tensor] = []
    sources: list[list[int]] = []
    while len(rows) < max_contexts and stream.epoch == 0:
        batch = stream.next(1)  # one at a time: the stream's epoch is checked after each
        # A context that reaches into the next epoch reads documents a second time: leave it out.
        for row, docs, epoch in zip(batch, stream.documents, stream.epochs, strict=True):
            if epoch == 0 and len(rows) < max_contexts:
                rows.append(row)
                sources.append(docs)
    if not rows:
        raise SaelabError(
            f"the dataset holds fewer than {context_length - 1} tokens, not one whole context; pass more text"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(rows), generator=generator)[: min(n, len(rows))].sort().values.tolist()
    return torch.stack([rows[i] for i in chosen]), [sources[i] for i in chosen]
