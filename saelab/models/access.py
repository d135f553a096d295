"""One interface to a causal language model's activations, addressed by TransformerLens hook names.

Two kinds of model sit behind `LanguageModel`:

- a TransformerLens `HookedTransformer`, whose hook points (`blocks.0.hook_resid_post`, `blocks.0.attn.hook_z`, …)
  are modules already;
- a Hugging Face `AutoModelForCausalLM`, where any module name works (its output is the activation) and the
  TransformerLens names are aliases onto the GPT-2, Llama and Gemma layouts, e.g. `blocks.0.hook_resid_post` is the
  output of `transformer.h.0` (GPT-2) or `model.layers.0` (Llama, Gemma).

Either way a hook is a PyTorch forward hook on (module, input or output), so reading activations, stopping the
forward pass early and splicing in a replacement are the same code for both. Activations are flattened to
`[batch, pos, d]` (`attn.hook_z` [batch pos n_heads d_head] → d = n_heads·d_head) and a replacement sees and returns
that flat shape, so an SAE never needs to know a hook's layout.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saelab.errors import SaelabError

BUILTIN = "builtin"
ZOO_PREFIX = "zoo:"  # zoo:NAME (a shipped zoo model) or zoo:DIR (one written by `saelab zoo train`)
BACKENDS = ("auto", "transformer_lens", "hf")

Replace = Callable[[Tensor], Tensor]
"""A function from an activation [batch, pos, d] to the activation to use instead (same shape)."""

# TransformerLens names → (module below block L, "input" | "output") for each Hugging Face layout.
# resid_mid is the input of the norm that opens the MLP half; mlp.hook_post and attn.hook_z are the inputs of the
# output projections. Gemma 2/3 normalise each sub-layer's output before adding it, as TransformerLens's
# hook_attn_out/hook_mlp_out do, so those two read the post-norms.
_BLOCK = {"hook_resid_pre": ("", "input"), "hook_resid_post": ("", "output")}
_LAYOUTS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "gpt2": (
        "transformer.h",
        _BLOCK
        | {
            "hook_resid_mid": ("ln_2", "input"),
            "hook_attn_out": ("attn", "output"),
            "hook_mlp_out": ("mlp", "output"),
            "mlp.hook_post": ("mlp.c_proj", "input"),
            "attn.hook_z": ("attn.c_proj", "input"),
        },
    ),
    "llama": (
        "model.layers",
        _BLOCK
        | {
            "hook_resid_mid": ("post_attention_layernorm", "input"),
            "hook_attn_out": ("self_attn", "output"),
            "hook_mlp_out": ("mlp", "output"),
            "mlp.hook_post": ("mlp.down_proj", "input"),
            "attn.hook_z": ("self_attn.o_proj", "input"),
        },
    ),
    "gemma2": (
        "model.layers",
        _BLOCK
        | {
            "hook_resid_mid": ("pre_feedforward_layernorm", "input"),
            "hook_attn_out": ("post_attention_layernorm", "output"),
            "hook_mlp_out": ("post_feedforward_layernorm", "output"),
            "mlp.hook_post": ("mlp.down_proj", "input"),
            "attn.hook_z": ("self_attn.o_proj", "input"),
        },
    ),
}
# TransformerLens hook points whose activations are not laid out [batch, pos, ...].
_NOT_PER_POSITION = ("hook_attn_scores", "hook_pattern")


class _Stop(Exception):
    """Raised by the last activation hook to skip the rest of the forward pass."""


@dataclass(frozen=True)
class HookPoint:
    """Where a hook reads: the input (first positional argument) or the output (first element) of a module."""

    module: nn.Module
    where: str


class LanguageModel:
    """A causal LM with tokenizer, special-token ids, activations at hooks, and runs with a hook replaced.

    Build one with `load_model`, or wrap a model in memory with `LanguageModel.from_transformer_lens` /
    `LanguageModel.from_hf`.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        tokenizer: Any,
        points: dict[str, HookPoint],
        logits_fn: Callable[[Tensor], Tensor],
        kind: str,
        n_ctx: int | None = None,
        bf16: bool = False,
        task: Any = None,
    ) -> None:
        self.name = name
        self.task = task  # a zoo Task: scored positions and labels replace next-token prediction
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.points = points
        self.kind = kind  # "HookedTransformer" or "AutoModelForCausalLM", SAELens's model_class_name
        self.n_ctx = n_ctx  # the longest context the model accepts, where it has a limit
        self.bf16 = bf16
        self._logits_fn = logits_fn
        self._d: dict[str, int] = {}
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None and task is None:
            raise SaelabError(f"the tokenizer of {name} has neither a BOS nor an EOS token; give it a bos_token")
        self.bos_token_id: int = bos if bos is not None else 0  # a zoo task has no special tokens
        self.pad_token_id: int | None = tokenizer.pad_token_id

    @classmethod
    def from_transformer_lens(
        cls, model: nn.Module, name: str, bf16: bool = False, tokenizer: Any = None, task: Any = None
    ) -> LanguageModel:
        """Wrap a `HookedTransformer` (its tokenizer must be set, or passed as `tokenizer`)."""
        tokenizer = tokenizer or model.tokenizer
        if tokenizer is None:
            raise SaelabError(f"the TransformerLens model {name} has no tokenizer; pass tokenizer= when creating it")
        points = {
            hook: HookPoint(module, "output")
            for hook, module in model.hook_dict.items()
            if not hook.endswith(_NOT_PER_POSITION)
        }
        logits = model.forward
        return cls(name, model, tokenizer, points, logits, "HookedTransformer", model.cfg.n_ctx, bf16, task)

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer: Any, name: str, bf16: bool = False) -> LanguageModel:
        """Wrap a Hugging Face causal LM: every module by name, plus TransformerLens aliases for known layouts."""
        modules = dict(model.named_modules())
        points = {module_name: HookPoint(module, "output") for module_name, module in modules.items() if module_name}
        layout = _hf_layout(modules)
        if layout is not None:
            blocks, aliases = _LAYOUTS[layout]
            for layer in range(len(modules[blocks])):
                for alias, (suffix, where) in aliases.items():
                    target = ".".join(filter(None, (blocks, str(layer), suffix)))
                    if target in modules:
                        points[f"blocks.{layer}.{alias}"] = HookPoint(modules[target], where)

        def logits(tokens: Tensor) -> Tensor:
            return model(input_ids=tokens, use_cache=False).logits

        n_ctx = getattr(model.config, "max_position_embeddings", None)
        return cls(name, model, tokenizer, points, logits, "AutoModelForCausalLM", n_ctx, bf16)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def special_token_ids(self) -> list[int]:
        """Token ids whose positions are excluded from activations and losses: BOS (also the document separator)
        and padding. A zoo task has none."""
        if self.task is not None:
            return []
        return sorted({self.bos_token_id} | ({self.pad_token_id} if self.pad_token_id is not None else set()))

    def regular_positions(self, tokens: Tensor) -> Tensor:
        """[batch, pos] bool: True where the token is not special."""
        return ~torch.isin(tokens, torch.tensor(self.special_token_ids, device=tokens.device))

    def check_hook(self, hook: str) -> str:
        """The hook name itself, or a one-line error naming the closest valid hooks."""
        if hook in self.points:
            return hook
        close = difflib.get_close_matches(hook, list(self.points), n=3, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(list(self.points)[:3])}"
        raise SaelabError(f"unknown hook '{hook}' for model {self.name}; {hint}")

    def d_hook(self, hook: str) -> int:
        """Width d of the flattened activation at a hook."""
        if hook not in self._d:
            tokens = torch.tensor([[self.bos_token_id]], device=self.device)
            self._d[hook] = self.activations(tokens, [hook])[hook].shape[-1]
        return self._d[hook]

    @torch.no_grad()
    def activations(self, tokens: Tensor, hooks: list[str]) -> dict[str, Tensor]:
        """Activations {hook: [batch, pos, d]} for tokens [batch, pos]; the forward pass stops once the last of
        them has been read, so nothing after the deepest hook runs."""
        wanted = list(dict.fromkeys(self.check_hook(h) for h in hooks))
        acts: dict[str, Tensor] = {}

        def reader(hook: str) -> Replace:
            def read(x: Tensor) -> Tensor:
                acts[hook] = x.float() if self.bf16 else x
                if len(acts) == len(wanted):
                    raise _Stop
                return x

            return read

        with contextlib.suppress(_Stop):
            self.logits(tokens, {hook: reader(hook) for hook in wanted})
        return acts

    def logits(self, tokens: Tensor, replace: dict[str, Replace] | None = None) -> Tensor:
        """Logits [batch, pos, d_vocab], with each hook in `replace` rewritten by its function."""
        with self._hooks(replace or {}), self._autocast():
            return self._logits_fn(tokens.to(self.device)).float()

    def replaced(self, replace: dict[str, Replace]) -> contextlib.AbstractContextManager:
        """A context in which each hook in `replace` is rewritten by its function, for passes that call the model
        some other way than `logits` does (e.g. a TransformerLens model stopped before its unembedding)."""
        return self._hooks(replace)

    def loss_per_token(self, tokens: Tensor, replace: dict[str, Replace] | None = None) -> Tensor:
        """Next-token cross-entropy [batch, pos − 1]: entry t is −log p(tokens[t+1] | tokens[≤t])."""
        if self.task is not None:
            raise SaelabError(
                f"{self.name} predicts task labels, not next tokens; for its losses and accuracy use "
                "`saelab sae eval` or `saelab zoo eval` (dashboards do not read zoo models yet)"
            )
        logits = self.logits(tokens, replace)[:, :-1]
        targets = tokens[:, 1:].to(logits.device)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def _hooks(self, replace: dict[str, Replace]) -> Iterator[None]:
        handles = []
        try:
            for hook, fn in replace.items():
                point = self.points[self.check_hook(hook)]
                if point.where == "output":
                    handles.append(point.module.register_forward_hook(_output_hook(fn)))
                else:
                    handles.append(point.module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


def sae_replacement(
    sae: nn.Module,
    positions: Tensor | None = None,
    error_term: bool = False,
    edit: Callable[[Tensor], Tensor] | None = None,
) -> Replace:
    """Splice an SAE (anything with `encode` and `decode`) in place of the activation x [batch, pos, d_in]:

        x̂   = decode(edit(encode(x)))              edit: an optional change to the latents, e.g. ablate one
        out = x̂ + (x − decode(encode(x)))          with error_term: the SAE's error is added back, so out = x
                                                   when there is no edit, and an edit's effect is isolated
        out = x̂                                    otherwise

    Positions where `positions` [batch, pos] is False (BOS, padding) keep x: the SAE never saw them in training.
    """

    def replace(x: Tensor) -> Tensor:
        dtype = next((p.dtype for p in sae.parameters()), x.dtype)
        x_in = x.to(dtype)
        latents = sae.encode(x_in)
        reconstruction = sae.decode(latents)
        out = reconstruction if edit is None else sae.decode(edit(latents))
        if error_term:
            out = out + (x_in - reconstruction)
        out = out.to(x.dtype)
        return out if positions is None else torch.where(positions[..., None], out, x)

    return replace


def transcoder_replacement(
    transcoder: nn.Module,
    hook_in: str,
    hook_out: str,
    positions: Tensor | None = None,
    edit: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Replace]:
    """Splice a transcoder in place of what it replaces (an MLP): the activation at `hook_out` becomes the
    transcoder's output `output(x, edit(encode(x)))` for x read at `hook_in` earlier in the same forward pass.

    Returns the hooks to pass to `LanguageModel.logits` (`hook_in` only reads). Positions where `positions` is False
    keep the model's own activation, as with `sae_replacement`.
    """
    read: dict[str, Tensor] = {}

    def capture(x: Tensor) -> Tensor:
        read["x"] = x
        return x

    def replace(y: Tensor) -> Tensor:
        if "x" not in read:
            raise SaelabError(f"{hook_out} runs before {hook_in}; a transcoder's input must come before its output")
        dtype = next((p.dtype for p in transcoder.parameters()), y.dtype)
        x = read.pop("x").to(dtype)
        latents = transcoder.encode(x)
        out = transcoder.output(x, latents if edit is None else edit(latents)).to(y.dtype)
        return out if positions is None else torch.where(positions[..., None], out, y)

    return {hook_in: capture, hook_out: replace}


def zero_ablation(positions: Tensor | None = None) -> Replace:
    """Replace the activation by zeros at `positions` [batch, pos] (everywhere when None)."""

    def replace(x: Tensor) -> Tensor:
        return torch.zeros_like(x) if positions is None else x.masked_fill(positions[..., None], 0.0)

    return replace


def _hf_layout(modules: dict[str, nn.Module]) -> str | None:
    if "transformer.h.0" in modules:
        return "gpt2"
    if "model.layers.0.pre_feedforward_layernorm" in modules:
        return "gemma2"  # Gemma 2 and 3: sandwich norms around each sub-layer
    if "model.layers.0" in modules:
        return "llama"  # also Gemma 1, Mistral, Qwen
    return None


def _apply_flat(fn: Replace, x: Tensor) -> Tensor:
    """Call fn on x viewed as [batch, pos, d] and give the result x's own shape and dtype back."""
    flat = x.flatten(2)
    out = fn(flat)
    return x if out is flat else out.reshape(x.shape).to(x.dtype)


def _output_hook(fn: Replace) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (_apply_flat(fn, output[0]), *output[1:])
        return _apply_flat(fn, output)

    return hook


def _input_hook(fn: Replace) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (_apply_flat(fn, args[0]), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": _apply_flat(fn, kwargs["hidden_states"])}

    return hook


def load_model(
    name: str | None = None, device: str = "cpu", backend: str = "auto", bf16: bool = False
) -> LanguageModel:
    """Load a model by TransformerLens name, Hugging Face name or local folder; None or "builtin" is saelab's own,
    `zoo:NAME` a model of the algorithmic-problem zoo.

    A local folder is either a saelab language-model folder (`saelab lm train --out DIR`) or a Hugging Face
    `save_pretrained` folder (model and tokenizer). The latter loads as an `AutoModelForCausalLM` unless
    `backend="transformer_lens"`, which converts it to a `HookedTransformer` (for the architectures TransformerLens
    supports). Weights are never processed (no LayerNorm folding or centring), so
    activations are those of the model as trained. `bf16` runs the forward pass under bfloat16 autocast.
    """
    if backend not in BACKENDS:
        raise SaelabError(f"unknown model backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if name is None or name == BUILTIN:
        from saelab.models.builtin import load_builtin_model

        return LanguageModel.from_transformer_lens(load_builtin_model(device), BUILTIN, bf16)
    if name.startswith(ZOO_PREFIX):
        from saelab.models.zoo.model import zoo_language_model

        return zoo_language_model(name, device, bf16)
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, device, backend, bf16)
    offline = not hub_reachable()  # then only the local Hugging Face cache can serve it, and fails fast
    if backend != "hf" and _is_transformer_lens_name(name):
        from transformer_lens import HookedTransformer

        with _no_download(name):
            model = HookedTransformer.from_pretrained_no_processing(name, device=device, local_files_only=offline)
        return LanguageModel.from_transformer_lens(model, name, bf16)
    if backend == "transformer_lens":
        raise SaelabError(f"'{name}' is not a TransformerLens model name; use --backend hf or a local folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_download(name):
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=offline).to(device)
    return LanguageModel.from_hf(model, tokenizer, name, bf16)


def _load_local(path: Path, device: str, backend: str, bf16: bool) -> LanguageModel:
    if (path / "cfg.json").is_file() and not (path / "config.json").is_file():
        from saelab.models.builtin import load_lm

        return LanguageModel.from_transformer_lens(load_lm(path, device), str(path.resolve()), bf16)
    if not (path / "config.json").is_file():
        raise SaelabError(
            f"{path} is not a model folder (no config.json or cfg.json); pass a folder written by save_pretrained "
            "or saelab lm train"
        )
    if not any(path.glob("*.safetensors")):  # pickled weights can run code when loaded: never read them
        pickled = ", ".join(sorted(p.name for p in path.glob("*.bin"))) or "no weights"
        raise SaelabError(
            f"{path} holds no .safetensors weights ({pickled}); saelab loads only safetensors. Convert the model "
            "with save_pretrained(..., safe_serialization=True) where you trust it"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(path.resolve())
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        hf_model = AutoModelForCausalLM.from_pretrained(name, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise SaelabError(f"cannot load the model in {path}: {_first_line(err)}") from None
    if backend != "transformer_lens":
        return LanguageModel.from_hf(hf_model.to(device), tokenizer, name, bf16)
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        cfg = loading.get_pretrained_model_config(name, device=device)
        state = loading.get_pretrained_state_dict(name, cfg, hf_model=hf_model)
    except (OSError, ValueError, AttributeError, KeyError, NotImplementedError) as err:
        raise SaelabError(f"TransformerLens cannot convert {path}: {_first_line(err)}; use --backend hf") from None
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return LanguageModel.from_transformer_lens(model.to(device), name, bf16)


@functools.cache
def hub_reachable() -> bool:
    """Whether huggingface.co answers; without this check an offline download retries for most of a minute."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


def _is_transformer_lens_name(name: str) -> bool:
    from transformer_lens import loading_from_pretrained as loading

    try:
        loading.get_official_model_name(name)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _no_download(name: str) -> Iterator[None]:
    """Turn a failed download into one line that says why and what to do instead."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise SaelabError(
            f"cannot load model '{name}': it is not a local folder and cannot be downloaded here ({_first_line(err)});"
            f" save it with save_pretrained on a machine with network access and pass --model /path/to/folder"
        ) from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
