"""The saved SAE: a folder with `cfg.json` and `sae_weights.safetensors` that SAELens (v6) and saelab both read.

cfg.json holds the SAELens fields (`architecture`, `d_in`, `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`,
`normalize_activations`, `reshape_activations`, `metadata` with `hook_name`, `model_name`, …, and `k` for TopK)
plus a `saelab` block with saelab's own config and training record, which SAELens ignores. The weight file holds
`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`, and `threshold [d_sae]` for
JumpReLU (or `b_gate`, `b_mag`, `r_mag` for Gated). Each architecture declares the SAELens architecture it is
saved as (`SAE.saelens_architecture`): SAELens has no "relu" or "batchtopk" at inference, so a ReLU SAE is saved
as `standard` and a BatchTopK SAE as the `jumprelu` it behaves as in eval mode.

A transcoder (`SAEConfig.d_out`) is saved in SAELens 6's transcoder layout: `W_dec [d_sae, d_out]`, `b_dec [d_out]`,
`W_skip [d_out, d_in]` for a skip transcoder, cfg.json `d_out`, `apply_b_dec_to_input` false and
`metadata.hook_name_out`. A ReLU transcoder is SAELens's `transcoder` / `skip_transcoder`; JumpReLU, BatchTopK and
Matryoshka BatchTopK (at inference a JumpReLU with one global threshold) are `jumprelu_transcoder` /
`jumprelu_skip_transcoder`, all exact. SAELens has no TopK or Gated transcoder: those are saved as
`topk_transcoder` / `gated_transcoder` (`_skip_` variants likewise), the same layout plus `k`, which saelab loads and
SAELens refuses (it knows no such architecture); a TopK transcoder has no exact SAELens form, since its per-token
top-k is not a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saelab.config import config_from_dict, config_to_dict, load_json
from saelab.errors import SaelabError
from saelab.io import atomic_write_json, load_tensors, save_tensors
from saelab.sae.model import DTYPES, SAE, SAE_CLASSES, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_NAME = "saelab.sae"
FORMAT_VERSION = 1
# The SAELens cfg.json format this file follows; SAELens reads configs without it as pre-6.0 and rewrites them.
SAELENS_FORMAT_VERSION = "6.0.0"
# SAELens architecture name → saelab's, for SAEs that SAELens saved
FROM_SAELENS = {cls.saelens_architecture: name for name, cls in SAE_CLASSES.items() if cls.loads_from_saelens}
# SAELens transcoder architecture name → (saelab's architecture, skip connection)
TRANSCODERS_FROM_SAELENS = {
    cls.transcoder_architecture(skip): (architecture, skip)
    for architecture, cls in SAE_CLASSES.items()
    if cls.loads_from_saelens and cls.saelens_transcoder is not None
    for skip in (False, True)
}


@dataclass
class SaelabBlock:
    """saelab's own block in cfg.json: its config, and its training record (kept as `SAE.saved_info`)."""

    format: str
    format_version: int
    sae: SAEConfig
    train: dict[str, Any] | None = None
    normalization_scale: float | None = None
    normalization_scale_out: float | None = None  # a transcoder's: the scale of its target hook
    trained_steps: int | None = None


@dataclass
class SAELensFields:
    """The cfg.json fields saelab reads, with their types (SAELens writes many more, which are ignored)."""

    architecture: str
    d_in: int
    d_sae: int
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    metadata: dict[str, Any] = field(default_factory=dict)
    d_out: int | None = None
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    saelab: SaelabBlock | None = None


def sae_cfg_dict(sae: SAE, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json contents for `sae`; `extra` goes into the `saelab` block (training config, final metrics)."""
    cfg = sae.cfg
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, **sae.metadata}
    if cfg.architecture != sae.saelens_architecture:
        metadata["training_architecture"] = cfg.architecture
    data: dict[str, Any] = {
        "architecture": sae.saved_architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        **({"d_out": cfg.d_out} if cfg.transcoder else {}),
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",  # any training-time scale is folded into the weights before saving
        "reshape_activations": "none",
        "metadata": metadata,
        **sae.saelens_fields(),
    }
    own = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "sae": config_to_dict(cfg)}
    data["saelab"] = own | (extra or {})
    return data


def save_sae(sae: SAE, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `sae` into the folder `out` (other files there are kept).

    Each file is written atomically, weights first and cfg.json last, so the folder is never a loadable SAE with
    a config that does not match its weights.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SaelabError(f"{out} exists and is not a directory; choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / CFG_FILE).unlink(missing_ok=True)
    tensors = {name: getattr(sae, name).detach() for name in sae.weight_names}
    save_tensors(out / WEIGHTS_FILE, tensors, metadata={"format": FORMAT_NAME})
    atomic_write_json(out / CFG_FILE, sae_cfg_dict(sae, extra))
    return out


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by saelab or by SAELens, in eval mode; anything else is a one-line SaelabError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SaelabError(f"{directory} is not a directory; expected a saved SAE ({CFG_FILE} + {WEIGHTS_FILE})")
    cfg_path = directory / CFG_FILE
    if not cfg_path.is_file():
        inside = sorted(p.name for p in directory.iterdir() if (p / CFG_FILE).is_file())
        if inside:
            names = ", ".join(inside)
            raise SaelabError(f"{directory} holds several SAEs ({names}); pass one, e.g. {directory / inside[0]}")
        raise SaelabError(f"{directory} has no {CFG_FILE}; it is not a saved SAE ({CFG_FILE} + {WEIGHTS_FILE})")
    raw = load_json(cfg_path)
    if "format" in raw and "architecture" not in raw:
        raise SaelabError(f"{cfg_path} describes a '{raw['format']}', not an SAE")
    for key in ("architecture", "d_in", "d_sae"):
        if key not in raw:
            raise SaelabError(f"{cfg_path} lacks '{key}'; it is not an SAE config (SAELens or saelab)")
    fields = config_from_dict(SAELensFields, raw, where=str(cfg_path), extra_keys=True)
    cfg, rescale_by_decoder_norm = _read_config(fields, cfg_path)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SaelabError(f"{directory} lacks {WEIGHTS_FILE}; the SAE is incomplete")
    tensors = load_tensors(weights_path)
    if "threshold" not in tensors and "log_threshold" in tensors:  # JumpReLU files from SAELens before 6.x
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    w_enc = tensors.get("W_enc")
    if w_enc is None or tuple(w_enc.shape) != (cfg.d_in, cfg.d_sae):  # checked before building: no huge allocation
        found = "no W_enc" if w_enc is None else f"W_enc of shape {tuple(w_enc.shape)}"
        raise SaelabError(f"{weights_path} holds {found}, but cfg.json says d_in = {cfg.d_in}, d_sae = {cfg.d_sae}")
    sae = cfg.sae_class(cfg)
    with torch.no_grad():
        for name in sae.weight_names:
            if name not in tensors:
                raise SaelabError(f"{weights_path} lacks tensor '{name}', which a {cfg.architecture} SAE needs")
            expected = tuple(getattr(sae, name).shape)
            if tuple(tensors[name].shape) != expected:
                raise SaelabError(
                    f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)}, but cfg.json implies {expected}"
                )
            getattr(sae, name).copy_(tensors[name])
        if rescale_by_decoder_norm:
            _fold_decoder_norms(sae)
    sae.metadata = dict(fields.metadata)
    own = raw.get("saelab") or {}
    sae.saved_info = {k: v for k, v in own.items() if k not in ("format", "format_version", "sae")}
    return sae.to(device).eval()


def _read_config(fields: SAELensFields, cfg_path: Path) -> tuple[SAEConfig, bool]:
    """saelab's own config where present, else one built from the SAELens fields."""
    own = fields.saelab
    if own is not None:
        if own.format != FORMAT_NAME:
            raise SaelabError(f"{cfg_path}: saelab.format is '{own.format}', not '{FORMAT_NAME}'")
        if own.format_version > FORMAT_VERSION:
            raise SaelabError(f"{cfg_path} has saelab format_version {own.format_version}; upgrade saelab to read it")
        own.sae.validate()
        return own.sae, False
    architecture, skip = FROM_SAELENS.get(fields.architecture), False
    if fields.architecture in TRANSCODERS_FROM_SAELENS:
        architecture, skip = TRANSCODERS_FROM_SAELENS[fields.architecture]
        if fields.d_out is None:
            raise SaelabError(f"{cfg_path}: a {fields.architecture} needs d_out, the width of its output")
    if architecture is None:
        raise SaelabError(
            f"{cfg_path}: SAE architecture '{fields.architecture}' is not supported; saelab reads "
            f"{', '.join([*FROM_SAELENS, *TRANSCODERS_FROM_SAELENS])}"
        )
    if fields.normalize_activations not in ("none", "expected_average_only_in"):
        raise SaelabError(
            f"{cfg_path}: normalize_activations '{fields.normalize_activations}' is not supported; fold it into "
            "the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    dtype = fields.dtype.removeprefix("torch.")
    if dtype not in DTYPES:
        raise SaelabError(f"{cfg_path}: dtype '{fields.dtype}' is not supported; saelab reads {', '.join(DTYPES)}")
    cfg = SAEConfig(
        architecture=architecture,
        d_in=fields.d_in,
        d_sae=fields.d_sae,
        k=fields.k if fields.k is not None else SAEConfig.k,
        apply_b_dec_to_input=fields.apply_b_dec_to_input,
        dtype=dtype,
        d_out=fields.d_out if fields.architecture in TRANSCODERS_FROM_SAELENS else None,
        skip=skip,
    )
    cfg.validate()
    return cfg, architecture == "topk" and fields.rescale_acts_by_decoder_norm


@torch.no_grad()
def _fold_decoder_norms(sae: SAE) -> None:
    """Unit-norm decoder rows with identical latents and x̂ (for SAELens TopK SAEs that rescale by the norms)."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)
    sae.W_enc *= norms
    sae.b_enc *= norms
    sae.W_dec /= norms[:, None]
