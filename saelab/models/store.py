"""The activation store: shuffled activations [batch, d_in] at one or more hooks, streamed from a language model.

Buffer i holds the activations of the next `buffer_contexts` contexts (run through the model `model_batch_size`
contexts at a time) at every hook, without BOS/padding positions, shuffled by one permutation seeded with
(seed, i); batches are served from it in order, and when it runs dry buffer i+1 is filled. All hooks share the
permutation, so row j of every hook's batch is the same token and several SAEs on different hooks train from one
forward pass.

A buffer is a pure function of the token position it starts at and of i. The store's state is therefore that
position, i, and the rows already served from buffer i: a fresh store refills buffer i from it bit-exactly, and a
checkpoint never holds activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from saelab.activations import OneHookView
from saelab.errors import SaelabError
from saelab.models.access import BUILTIN, LanguageModel, load_model
from saelab.models.data import ContextStream, documents

DEFAULT_BUFFER_TOKENS = 2**17
BUFFER_BATCHES = 16  # the buffer mixes at least this many training batches


class TokenStream(Protocol):
    """Where the store's token contexts come from: a corpus (`ContextStream`) or a zoo task's generator."""

    context_length: int

    def next(self, n: int) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ActivationStore(OneHookView):
    """Shuffled activations from `model` at `hooks` over the token contexts of `contexts`.

    An activation source (`saelab.activations.ActivationSource`): `next_batches` gives every hook's batch at once.
    """

    def __init__(
        self,
        model: LanguageModel,
        contexts: TokenStream,
        hooks: Sequence[str],
        buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
        model_batch_size: int = 32,
        seed: int = 0,
        dataset: str | None = None,
    ) -> None:
        if not hooks:
            raise SaelabError("name at least one hook, e.g. --hook blocks.0.hook_resid_post")
        if model.n_ctx is not None and contexts.context_length > model.n_ctx:
            raise SaelabError(
                f"context length {contexts.context_length} exceeds what {model.name} accepts ({model.n_ctx});"
                f" pass --context-length {model.n_ctx} or less"
            )
        self.model = model
        self.contexts = contexts
        self.hooks = list(dict.fromkeys(model.check_hook(hook) for hook in hooks))
        self.d_ins = {hook: model.d_hook(hook) for hook in self.hooks}
        self.buffer_contexts = max(1, math.ceil(buffer_tokens / contexts.context_length))
        self.model_batch_size = model_batch_size
        self.seed = seed
        self.dataset = dataset if dataset is not None else BUILTIN
        self._index = -1  # the buffer being served; -1 before the first
        self._buffer: dict[str, Tensor] = {}
        self._served = 0
        self._start = contexts.state_dict()  # the token position where buffer _index starts

    def metadata_for(self, hook: str) -> dict[str, Any]:
        """What an SAE trained on `hook` records about its data (SAELens's field names where they exist)."""
        length = self.contexts.context_length
        return {
            "model_name": self.model.name,
            "model_class_name": self.model.kind,
            "hook_name": hook,
            "dataset": self.dataset,
            "dataset_path": self.dataset,
            "context_length": length,
            "context_size": length,
            "prepend_bos": self.model.task is None,
            "exclude_special_tokens": self.model.special_token_ids,
            "d_in": self.d_ins[hook],
        }

    def next_batches(self, batch_size: int) -> dict[str, Tensor]:
        """The next {hook: [batch_size, d_in]} activations; row j is the same token at every hook."""
        parts: dict[str, list[Tensor]] = {hook: [] for hook in self.hooks}
        needed = batch_size
        while needed:
            rows = len(self._buffer[self.hooks[0]]) if self._buffer else 0
            if self._served == rows:
                self._fill(self._index + 1)
                continue
            take = min(needed, rows - self._served)
            for hook in self.hooks:
                parts[hook].append(self._buffer[hook][self._served : self._served + take])
            self._served += take
            needed -= take
        return {hook: torch.cat(chunks) if len(chunks) > 1 else chunks[0] for hook, chunks in parts.items()}

    def _fill(self, index: int) -> None:
        """Buffer `index`: the next buffer_contexts contexts' activations at regular positions, shuffled."""
        self._start = self.contexts.state_dict()
        chunks: dict[str, list[Tensor]] = {hook: [] for hook in self.hooks}
        for start in range(0, self.buffer_contexts, self.model_batch_size):
            tokens = self.contexts.next(min(self.model_batch_size, self.buffer_contexts - start))
            tokens = tokens.to(self.model.device)
            regular = self.model.regular_positions(tokens)
            acts = self.model.activations(tokens, self.hooks)
            for hook in self.hooks:
                chunks[hook].append(acts[hook][regular])  # [regular tokens, d_in]
        rows = sum(len(chunk) for chunk in chunks[self.hooks[0]])
        if rows == 0:
            raise SaelabError("a whole buffer of contexts held only BOS/padding tokens; the dataset has no text")
        order = torch.randperm(rows, generator=_generator(self.seed, index)).to(self.model.device)
        self._buffer = {hook: torch.cat(chunks[hook])[order] for hook in self.hooks}
        for hook, acts in self._buffer.items():
            if not torch.isfinite(acts).all():
                raise SaelabError(
                    f"activations at {hook} contain NaN or inf (buffer {index}); the model's forward pass overflowed:"
                    " run it in float32 (no --bf16) or check its weights"
                )
        self._index = index
        self._served = 0

    def state_dict(self) -> dict[str, Any]:
        """The position: where the current buffer's tokens start, its index, and the rows served from it."""
        return {"hooks": self.hooks, "stream": dict(self._start), "buffer": self._index, "served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("hooks") != self.hooks:
            raise SaelabError(f"the saved store read hooks {state.get('hooks')}, this one reads {self.hooks}")
        self.contexts.load_state_dict(state["stream"])
        self._start = dict(state["stream"])
        self._buffer, self._index, self._served = {}, -1, 0
        if state["buffer"] >= 0:
            self._fill(state["buffer"])
            self._served = state["served"]


def _generator(seed: int, index: int) -> torch.Generator:
    """An RNG for buffer `index` that depends only on (seed, index)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]))


def build_lm_source(
    model: str | LanguageModel | None,
    dataset: str | None,
    hook: str | Sequence[str],
    context_length: int,
    batch_size: int,
    seed: int,
    device: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    bf16: bool = False,
    model_batch_size: int = 32,
    buffer_tokens: int | None = None,
) -> ActivationStore:
    """An activation store over a model and dataset by name (None: the built-in model and corpus).

    `batch_size` is the trainer's batch size: unless `buffer_tokens` says otherwise, the mixing buffer holds
    DEFAULT_BUFFER_TOKENS or BUFFER_BATCHES such batches, whichever is more. With `world_size` > 1, this rank reads
    every world_size-th context starting at `rank`.
    """
    lm = model if isinstance(model, LanguageModel) else load_model(model, device, bf16=bf16)
    hooks = [hook] if isinstance(hook, str) else list(hook)
    buffer_tokens = buffer_tokens or max(DEFAULT_BUFFER_TOKENS, BUFFER_BATCHES * batch_size)
    if lm.task is not None:  # a zoo model reads its task's generator: every position of fresh sequences
        from saelab.models.zoo.model import TaskStream

        if dataset is not None:
            raise SaelabError(f"{lm.name} reads its task's generator; leave out --dataset")
        stream = TaskStream(lm.task, seed, rank)
        return ActivationStore(lm, stream, hooks, buffer_tokens, model_batch_size, seed, f"{lm.name} generator")
    contexts = ContextStream(
        documents(dataset, "train"), lm.tokenizer, context_length, lm.bos_token_id, rank, world_size, seed=seed
    )
    return ActivationStore(lm, contexts, hooks, buffer_tokens, model_batch_size, seed, dataset)
