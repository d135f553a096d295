"""The saved SAE: a folder with `cfg.json` and `sae_weights.safetensors` that SAELens (v6) and saelab both read.

cfg.json holds the SAELens fields (`architecture`, `d_in`, `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`,
`normalize_activations`, `reshape_activations`, `metadata` with `hook_name`, `model_name`, …, and `k` for TopK)
plus a `saelab` block with saelab's own config and training record, which SAELens ignores. The weight file holds
`W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`, and `threshold [d_sae]` for
JumpReLU (or `b_gate`, `b_mag`, `r_mag` for Gated). Each architecture declares the SAELens architecture it is
saved as (`SAE.saelens_architecture`): SAELens has no "relu" or "batchtopk" at inference, so a ReLU SAE is saved
as `standard` and a BatchTopK SAE as the `jumprelu` it behaves as in eval mode.
"""

from __future__ import annotations

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


def sae_cfg_dict(sae: SAE, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json contents for `sae`; `extra` goes into the `saelab` block (training config, final metrics)."""
    cfg = sae.cfg
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, **sae.metadata}
    if cfg.architecture != sae.saelens_architecture:
        metadata["training_architecture"] = cfg.architecture
    data: dict[str, Any] = {
        "architecture": sae.saelens_architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
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
    tensors = {name: getattr(sae, name).detach() for name in sae.tensor_names}
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
    cfg, rescale_by_decoder_norm = _read_config(raw, cfg_path)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SaelabError(f"{directory} lacks {WEIGHTS_FILE}; the SAE is incomplete")
    tensors = load_tensors(weights_path)
    if "threshold" not in tensors and "log_threshold" in tensors:  # JumpReLU files from SAELens before 6.x
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    sae = cfg.sae_class(cfg)
    with torch.no_grad():
        for name in sae.tensor_names:
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
    sae.metadata = dict(raw.get("metadata") or {})
    own = raw.get("saelab") or {}
    sae.saved_info = {k: v for k, v in own.items() if k not in ("format", "format_version", "sae")}
    return sae.to(device).eval()


def _read_config(raw: dict[str, Any], cfg_path: Path) -> tuple[SAEConfig, bool]:
    """saelab's own config where present, else one built from the SAELens fields."""
    own = raw.get("saelab")
    if isinstance(own, dict) and own.get("format") == FORMAT_NAME:
        if own.get("format_version", 0) > FORMAT_VERSION:
            version = own["format_version"]
            raise SaelabError(f"{cfg_path} has saelab format_version {version}; upgrade saelab to read it")
        cfg = config_from_dict(SAEConfig, own.get("sae") or {}, where=f"{cfg_path}:saelab.sae")
        cfg.validate()
        return cfg, False
    for key in ("architecture", "d_in", "d_sae"):
        if key not in raw:
            raise SaelabError(f"{cfg_path} lacks '{key}'; it is not an SAE config (SAELens or saelab)")
    architecture = FROM_SAELENS.get(raw["architecture"])
    if architecture is None:
        raise SaelabError(
            f"{cfg_path}: SAE architecture '{raw['architecture']}' is not supported; saelab reads "
            f"{', '.join(FROM_SAELENS)}"
        )
    if raw.get("normalize_activations", "none") not in ("none", "expected_average_only_in"):
        raise SaelabError(
            f"{cfg_path}: normalize_activations '{raw['normalize_activations']}' is not supported; fold it into "
            "the weights first (SAELens: fold_activation_norm_scaling_factor)"
        )
    dtype = str(raw.get("dtype", "float32")).removeprefix("torch.")
    cfg = SAEConfig(
        architecture=architecture,
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        k=raw.get("k", SAEConfig.k),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        dtype=dtype if dtype in DTYPES else "float32",
    )
    cfg.validate()
    return cfg, architecture == "topk" and bool(raw.get("rescale_acts_by_decoder_norm", False))


@torch.no_grad()
def _fold_decoder_norms(sae: SAE) -> None:
    """Unit-norm decoder rows with identical latents and x̂ (for SAELens TopK SAEs that rescale by the norms)."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)
    sae.W_enc *= norms
    sae.b_enc *= norms
    sae.W_dec /= norms[:, None]
