"""Activation sources for SAEs that do not need a language model, and parsing a source's spec.

Every source follows `saelab.activations.ActivationSource`: `next_batches(batch_size) -> {hook: [batch, d_in]}`
over its `hooks`, `metadata_for(hook)` (copied into the saved SAE's cfg.json), and `state_dict()` /
`load_state_dict()` so a resumed run continues from the same position in the stream. Sources with known ground
truth also carry `true_directions [n_features, d_in]`.

Here: `ToySource` (hidden states of a saved toy model, `toy:DIR` or `toy:DIR#i`), `SyntheticSource` (sparse
combinations of random unit directions with Zipf-like firing, `synthetic[:key=value,...]`), `TensorSource`
(rows of a tensor, in order, cycling) and `RankSlice` (one rank's share of another source's batches).
Language-model activations live in `saelab.models.store` (live) and `saelab.models.cache` (`cache:DIR`, on disk).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.activations import ActivationSource, OneHookView, SingleHookSource
from saelab.config import config_from_dict, config_to_dict, require_positive_ints
from saelab.errors import SaelabError

SOURCE_SPECS = "toy:DIR[#instance], synthetic[:key=value,...], cache:DIR"


class ToySource(SingleHookSource):
    """Hidden states `h = W x` of instance `instance` of a saved toy model, on freshly sampled sparse features.

    The true features are the model's columns of W: `true_directions [n_features, d_hidden]`.
    """

    def __init__(self, toy_dir: str | Path, instance: int = 0, seed: int = 0) -> None:
        from saelab.toy import load_toy_model

        self.model, _ = load_toy_model(Path(toy_dir))
        n_instances = self.model.cfg.n_instances
        if not 0 <= instance < n_instances:
            last = n_instances - 1
            raise SaelabError(f"toy model {toy_dir} has instances 0..{last}; instance {instance} is out of range")
        self.instance = instance
        spec = f"toy:{Path(toy_dir).resolve()}#{instance}"
        metadata = {"model_name": "saelab-toy", "hook_name": "hidden", "source": spec}
        super().__init__(self.model.cfg.d_hidden, metadata)
        self.true_directions = self.model.feature_directions(instance)
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def read(self, batch_size: int) -> Tensor:
        features = self.model.generate_batch(batch_size, self.generator)
        return self.model.hidden(features)[:, self.instance].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class SyntheticConfig:
    """A known sparse dictionary: `n_features` random unit directions in `d_in` dimensions.

    Feature i fires with probability ∝ (i + 1)^−zipf_exponent, scaled so that `mean_l0` features fire per token on
    average; a firing feature has a magnitude uniform in [min_magnitude, 1]. `dictionary_seed` fixes the
    directions, so training and evaluation sources share them while their data streams differ.
    """

    n_features: int = 256
    d_in: int = 64
    mean_l0: float = 8.0
    zipf_exponent: float = 0.5
    min_magnitude: float = 0.5
    dictionary_seed: int = 0

    def validate(self) -> None:
        require_positive_ints(self, ("n_features", "d_in"), "synthetic source: ")
        if not 0 < self.mean_l0 <= self.n_features:
            raise SaelabError(f"synthetic source: mean_l0 must be in (0, n_features], got {self.mean_l0!r}")
        if not self.zipf_exponent >= 0:
            raise SaelabError(f"synthetic source: zipf_exponent must be >= 0, got {self.zipf_exponent!r}")
        if not 0 <= self.min_magnitude <= 1:
            raise SaelabError(f"synthetic source: min_magnitude must be in [0, 1], got {self.min_magnitude!r}")

    def probabilities(self) -> Tensor:
        """[n_features] firing probabilities, Zipf-like, summing to mean_l0 (capped at 1 each)."""
        weights = (torch.arange(self.n_features, dtype=torch.float64) + 1) ** -self.zipf_exponent
        return (weights * self.mean_l0 / weights.sum()).clamp(max=1.0)


class SyntheticSource(SingleHookSource):
    """x = Σᵢ aᵢ dᵢ over a random sparse set of true unit directions dᵢ: `true_directions [n_features, d_in]`."""

    def __init__(self, cfg: SyntheticConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or SyntheticConfig()
        self.cfg.validate()
        dictionary_generator = torch.Generator().manual_seed(self.cfg.dictionary_seed)
        directions = torch.randn(self.cfg.n_features, self.cfg.d_in, generator=dictionary_generator)
        self.true_directions = directions / directions.norm(dim=1, keepdim=True)
        self.probabilities = self.cfg.probabilities().float()
        self.generator = torch.Generator().manual_seed(seed)
        spec = ",".join(f"{key}={value}" for key, value in config_to_dict(self.cfg).items())
        metadata = {"model_name": "saelab-synthetic", "hook_name": "synthetic", "source": f"synthetic:{spec}"}
        super().__init__(self.cfg.d_in, metadata)

    def read(self, batch_size: int) -> Tensor:
        u = torch.rand(batch_size, self.cfg.n_features, generator=self.generator)
        fires = u < self.probabilities
        # Given that feature i fires, u / pᵢ is uniform on [0, 1): one draw gives both whether and how strongly.
        low = self.cfg.min_magnitude
        magnitudes = torch.where(fires, low + (1 - low) * (u / self.probabilities), 0.0)
        return magnitudes @ self.true_directions

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class TensorSource(SingleHookSource):
    """Batches of consecutive rows of `data [tokens, d_in]`, wrapping around at the end."""

    def __init__(self, data: Tensor, metadata: dict[str, Any] | None = None) -> None:
        if data.ndim != 2 or data.shape[0] == 0:
            raise SaelabError(f"activation tensor has shape {tuple(data.shape)}; expected [tokens, d_in]")
        super().__init__(data.shape[1], metadata or {})
        self.data = data
        self.position = 0

    def read(self, batch_size: int) -> Tensor:
        index = (self.position + torch.arange(batch_size)) % self.data.shape[0]
        self.position = (self.position + batch_size) % self.data.shape[0]
        return self.data[index]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class IteratorSource(SingleHookSource):
    """Batches re-cut from any iterable of `[n, d_in]` tensors. It cannot rewind, so it cannot resume."""

    def __init__(self, batches: Iterable[Tensor], metadata: dict[str, Any] | None = None) -> None:
        self.iterator = iter(batches)
        self.pending = self._next_chunk()
        super().__init__(self.pending.shape[1], metadata or {})

    def _next_chunk(self) -> Tensor:
        try:
            chunk = next(self.iterator)
        except StopIteration:
            raise SaelabError("the activation iterator ran out of batches before training finished") from None
        if not isinstance(chunk, Tensor) or chunk.ndim != 2:
            shape = tuple(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__
            raise SaelabError(f"the activation iterator yielded {shape}; expected tensors [batch, d_in]")
        return chunk

    def read(self, batch_size: int) -> Tensor:
        while self.pending.shape[0] < batch_size:
            chunk = self._next_chunk()
            if chunk.shape[1] != self.d_in:
                raise SaelabError(f"the activation iterator changed d_in from {self.d_in} to {chunk.shape[1]}")
            self.pending = torch.cat([self.pending, chunk])
        batch, self.pending = self.pending[:batch_size], self.pending[batch_size:]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"resumable": False}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise SaelabError("a run fed from a plain iterator cannot resume; use a source with state (toy:, synthetic:)")


class RankSlice(OneHookView):
    """Rank `rank`'s share of `source`: rows [rank·b, (rank+1)·b) of each world_size·b rows a single process reads.

    Together the ranks of a data-parallel run see exactly the batches one process would, which makes runs
    comparable across world sizes. Every rank produces the whole batch, so this suits cheap sources (toy,
    synthetic, tensors, caches); the language-model store instead reads only its own rank's contexts.
    """

    def __init__(self, source: ActivationSource, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size
        self.hooks, self.d_ins = source.hooks, source.d_ins

    def __getattr__(self, name: str) -> Any:  # true_directions, model, …: the source's own
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def metadata_for(self, hook: str) -> dict[str, Any]:
        return self.source.metadata_for(hook)

    def next_batches(self, batch_size: int) -> dict[str, Tensor]:
        batches = self.source.next_batches(batch_size * self.world_size)
        return {hook: batch[self.rank * batch_size : (self.rank + 1) * batch_size] for hook, batch in batches.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def as_source(data: Any) -> ActivationSource:
    """A source from a source, a tensor [tokens, d_in], or an iterable of [batch, d_in] tensors."""
    if isinstance(data, ActivationSource):
        return data
    if isinstance(data, Tensor):
        return TensorSource(data)
    if isinstance(data, Iterable):
        return IteratorSource(data)
    raise SaelabError(f"cannot read activations from a {type(data).__name__}; pass a source, a tensor or an iterator")


def parse_source(spec: str, seed: int = 0, hooks: list[str] | None = None) -> ActivationSource:
    """Build a source from its spec: `toy:DIR`, `toy:DIR#i`, `synthetic`, `synthetic:key=value,...` or `cache:DIR`.

    `hooks` picks among a cache's hooks (default: all of them).
    """
    kind, _, rest = spec.partition(":")
    if kind == "toy" and rest:
        path, _, instance = rest.rpartition("#") if "#" in rest else (rest, "", "0")
        if not instance.isdigit():
            raise SaelabError(f"source '{spec}': the instance after '#' must be a number, e.g. toy:{path}#0")
        return ToySource(path, int(instance), seed)
    if kind == "synthetic":
        return SyntheticSource(config_from_dict(SyntheticConfig, _parse_assignments(rest, spec), spec), seed)
    if kind == "cache" and rest:
        from saelab.models.cache import CachedActivations  # the cache format belongs to the models stage

        return CachedActivations(rest, hooks)
    raise SaelabError(f"unknown activation source '{spec}'; use {SOURCE_SPECS}, or --model/--hook for a language model")


def _parse_assignments(text: str, spec: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise SaelabError(f"source '{spec}': expected key=value, got '{item}'")
        try:
            number = float(raw)
        except ValueError:
            raise SaelabError(f"source '{spec}': {key} must be a number, got '{raw}'") from None
        values[key.strip()] = int(number) if number.is_integer() and "." not in raw and "e" not in raw else number
    if any(isinstance(v, float) and not math.isfinite(v) for v in values.values()):
        raise SaelabError(f"source '{spec}': values must be finite numbers")
    return values
