"""The activation-source protocol: what every producer of activation batches offers, keyed by hook name.

A source serves one or more hooks (`hooks`, widths `d_ins`); `next_batches(batch_size)` returns the next
`{hook: [batch_size, d_in]}`, row j being the same token at every hook, and `state_dict()` / `load_state_dict()`
save and restore its position, so a resumed run continues from the same place in the stream. `metadata_for(hook)`
is what an SAE trained on that hook records in its cfg.json (`hook_name`, `model_name`, …, and `source`, the spec
that rebuilds the source).

The SAE trainer reads sources only through this protocol. They live with the stage that makes the data: toy and
synthetic sources in `saelab.sae.sources`, a language model's activation store and cache in `saelab.models`.
`OneHookView` gives any source the single-hook shorthands (`d_in`, `metadata`, `next_batch`), and
`SingleHookSource` is the base of a source with one stream, which only has to say how to `read` a batch.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from saelab.errors import SaelabError


@runtime_checkable
class ActivationSource(Protocol):
    """A resumable stream of activation batches at one or more hooks."""

    @property
    def hooks(self) -> list[str]: ...

    @property
    def d_ins(self) -> dict[str, int]: ...

    def metadata_for(self, hook: str) -> dict[str, Any]: ...

    def next_batches(self, batch_size: int) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class KnownFeatures(Protocol):
    """A source whose activations are built from known feature directions (toy models, synthetic dictionaries)."""

    true_directions: Tensor  # [n_features, d_in]


class OneHookView:
    """The shorthands of a source that serves one hook: its `hook`, `d_in`, `metadata` and `next_batch`.

    Mixed into sources (the protocol's methods stay theirs); on a source over several hooks each shorthand is a
    one-line error that says to use the per-hook form.
    """

    hooks: list[str]
    d_ins: dict[str, int]
    metadata_for: Any  # (hook) -> dict, the source's own
    next_batches: Any  # (batch_size) -> {hook: [batch_size, d_in]}, the source's own

    @property
    def hook(self) -> str:
        if len(self.hooks) != 1:
            raise SaelabError(f"this source reads {len(self.hooks)} hooks; use next_batches / metadata_for(hook)")
        return self.hooks[0]

    @property
    def d_in(self) -> int:
        return self.d_ins[self.hook]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.metadata_for(self.hook)

    def next_batch(self, batch_size: int) -> Tensor:
        """The next [batch_size, d_in] activations of the one hook."""
        hook = self.hook
        return self.next_batches(batch_size)[hook]


class SingleHookSource(OneHookView):
    """A source with one stream of activations, named by its metadata's `hook_name`; subclasses implement `read`."""

    def __init__(self, d_in: int, metadata: dict[str, Any], default_hook: str = "activations") -> None:
        hook = str(metadata.get("hook_name") or default_hook)
        self.hooks = [hook]
        self.d_ins = {hook: d_in}
        self._metadata = dict(metadata)

    def metadata_for(self, hook: str) -> dict[str, Any]:
        if hook not in self.d_ins:
            raise SaelabError(f"this source reads only {self.hooks[0]}, not {hook}")
        return dict(self._metadata)

    def next_batches(self, batch_size: int) -> dict[str, Tensor]:
        return {self.hooks[0]: self.read(batch_size)}

    def read(self, batch_size: int) -> Tensor:
        """The next [batch_size, d_in] activations."""
        raise NotImplementedError
