"""What the language-model evals and the dashboards need of an SAE, declared once as Protocols.

`saelab.sae.model.SAE` (every architecture, transcoders included) is one; tests use smaller objects with the same
fields. It lives here, not in `saelab.sae`, because `saelab.models` may not import `saelab.sae` (imports run one
way), and both `saelab.models.evals` and `saelab.dashboard` read SAEs through it.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class SAEShape(Protocol):
    """What is read of an SAE's config (`saelab.sae.model.SAEConfig` has it all)."""

    architecture: str
    d_in: int  # width of the activation the latents read
    d_sae: int
    d_out: int | None  # a transcoder's output width (None: an SAE, which reconstructs its input)

    @property
    def transcoder(self) -> bool:
        """Whether the latents write another activation (`metadata["hook_name_out"]`) than the one they read."""
        ...

    @property
    def d_target(self) -> int:
        """Width of the activation the decoder rows write into: d_out for a transcoder, d_in for an SAE."""
        ...


class SAELike(Protocol):
    """An SAE as the evals and dashboards use it: its config, its metadata and its forward parts."""

    cfg: SAEShape
    metadata: dict[str, Any]  # hook_name (and a transcoder's hook_name_out), model_name, context_length, …
    W_dec: Tensor  # [d_sae, d_target]

    def encode(self, x: Tensor) -> Tensor: ...
    def decode(self, latents: Tensor) -> Tensor: ...
    def output(self, x: Tensor, latents: Tensor) -> Tensor: ...  # what it predicts: x̂, or a transcoder's ŷ
    def parameters(self) -> Any: ...
    def to(self, device: Any) -> SAELike: ...
