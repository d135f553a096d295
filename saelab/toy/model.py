"""The batched toy model of superposition, its synthetic features, and its saved format.

`n_instances` independent models train at once; every tensor carries a leading `instances` axis.

    h  = W x                      hidden [batch, instances, d_hidden]
    x' = ReLU(Wᵀ h + b_final)     output [batch, instances, n_features]
    loss = Σ_instances Σ_features importance · (x − x')², averaged over the batch

Hierarchical features come in groups: a parent followed by its children, and a child is only ever present
together with its parent (the setting of feature absorption, Chanin et al. 2024).

Variants change one piece each: `linear` drops the output ReLU, `neurons` adds a ReLU on h (a privileged
basis), and `abs` is the absolute-value computation task of the paper's §"Computation in superposition":
inputs in [−1, 1], target |x|, a ReLU hidden layer and an untied output matrix `W_out`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import einops
import torch
from torch import Tensor, nn

from saelab.config import config_from_dict, config_to_dict, load_json, require_positive_ints
from saelab.errors import SaelabError
from saelab.io import OutputKind, atomic_write_json, json_format_marker, load_tensors, output_folder, save_tensors

VARIANTS = ("relu", "linear", "neurons", "abs")
FEATURE_GENERATORS = ("independent", "correlated", "anticorrelated", "hierarchical")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRAIN_METHODS = ("fast", "reference")
OPTIMIZERS = ("adam", "sgd")
FORMAT_NAME = "saelab.toy_model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# A toy-model results folder: what `saelab toy train / analyze / phase-diagram` write, and nothing else.
TOY_FOLDER = OutputKind(
    "saelab toy-model folder",
    (
        "cfg.json",
        WEIGHTS_FILE,
        "analysis.json",
        "history.json",
        "snapshots.safetensors",
        "*.png",
        "*.html",
        "plotly*.js",
    ),
    json_format_marker("cfg.json", FORMAT_NAME),
)


def _is_number(value: object) -> bool:
    """A real number (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ToyModelConfig:
    """Shape and data distribution of a batch of toy models.

    `feature_probability` is one float for all instances or a list with one per instance. Importance is
    `importance_decay ** i` for feature i unless `importance` lists one value per feature.

    `hierarchical` features come in groups of 1 + `children_per_parent`: a parent, then its children. The parent
    is present with the feature probability p; given its parent, one of the children is present with probability
    `child_given_parent` (each child equally likely), and children are never present without their parent. Each
    child's marginal probability is therefore p · child_given_parent / children_per_parent.
    """

    n_features: int = 5
    d_hidden: int = 2
    n_instances: int = 8
    variant: str = "relu"
    features: str = "independent"
    feature_probability: float | list[float] = 0.05
    importance_decay: float = 1.0
    importance: list[float] | None = None
    children_per_parent: int = 2
    child_given_parent: float = 0.5

    def validate(self) -> None:
        require_positive_ints(self, ("n_features", "d_hidden", "n_instances", "children_per_parent"))
        if self.variant not in VARIANTS:
            raise SaelabError(f"unknown variant '{self.variant}'; choose one of {', '.join(VARIANTS)}")
        if self.features not in FEATURE_GENERATORS:
            raise SaelabError(
                f"unknown feature generator '{self.features}'; choose one of {', '.join(FEATURE_GENERATORS)}"
            )
        group = self.children_per_parent + 1
        if self.features == "hierarchical" and self.n_features % group:
            raise SaelabError(
                f"hierarchical features come in groups of 1 parent + {self.children_per_parent} children: "
                f"n_features must be a multiple of {group}, got {self.n_features}"
            )
        if not 0 < self.child_given_parent <= 1:
            raise SaelabError(f"child_given_parent must be in (0, 1], got {self.child_given_parent!r}")
        if self.features in ("correlated", "anticorrelated") and self.n_features % 2:
            raise SaelabError(f"{self.features} features come in pairs: n_features must be even, got {self.n_features}")
        probs = self.feature_probability
        probs = list(probs) if isinstance(probs, (list, tuple)) else [probs]
        if len(probs) not in (1, self.n_instances):
            raise SaelabError(
                f"feature_probability lists {len(probs)} values; give one, or one per instance ({self.n_instances})"
            )
        for p in probs:
            if not _is_number(p) or not 0 < p <= 1:
                raise SaelabError(f"feature probability must be in (0, 1], got {p!r}")
            if self.features == "anticorrelated" and p > 0.5:
                raise SaelabError(
                    f"anticorrelated pairs need feature probability <= 0.5 (a pair fires with 2p), got {p}"
                )
        if not (_is_number(self.importance_decay) and 0 < self.importance_decay < math.inf):
            raise SaelabError(f"importance_decay must be a finite positive number, got {self.importance_decay!r}")
        if self.importance is not None:
            if len(self.importance) != self.n_features:
                raise SaelabError(
                    f"importance lists {len(self.importance)} values but n_features is {self.n_features}; "
                    "give one importance per feature"
                )
            if any(not (_is_number(v) and 0 <= v < math.inf) for v in self.importance):
                raise SaelabError(f"importance values must be finite non-negative numbers, got {list(self.importance)}")

    def importance_tensor(self) -> Tensor:
        """[instances, features]"""
        if self.importance is not None:
            per_feature = torch.tensor(self.importance, dtype=torch.float32)
        else:
            per_feature = self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)
        return einops.repeat(per_feature, "feat -> inst feat", inst=self.n_instances).clone()

    def feature_probability_tensor(self) -> Tensor:
        """[instances, features]"""
        probs = self.feature_probability
        per_instance = torch.tensor(probs if isinstance(probs, (list, tuple)) else [probs], dtype=torch.float32)
        per_instance = per_instance.expand(self.n_instances)
        probs = einops.repeat(per_instance, "inst -> inst feat", feat=self.n_features).clone()
        if self.features == "hierarchical":
            is_child = torch.arange(self.n_features) % (self.children_per_parent + 1) != 0
            probs[:, is_child] *= self.child_given_parent / self.children_per_parent
        return probs


@dataclass
class ToyTrainConfig:
    """Optimisation settings: Adam with a learning-rate schedule, seeded for reproducibility.

    A high learning rate that decays to zero (cosine) settles the geometry far more reliably than the paper's
    constant 1e-3: 5 features in 2 dimensions at p = 0.05 end as a regular pentagon in ~98% of seeds after
    2000 steps, against ~86% after 10 000 constant-rate steps of 1024 rows. `method="fast"` samples only
    non-empty rows and uses hand-derived gradients (`saelab.toy.fast`); `"reference"` is plain batches and
    autograd.
    """

    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-2
    lr_schedule: str = "cosine"
    seed: int = 0
    log_every: int = 100
    method: str = "fast"
    snapshots: int = 0  # keep this many log-spaced snapshots of the weights (saelab.toy.snapshots)
    optimizer: str = "adam"  # or "sgd": plain SGD, whose slow plateaus show the k-gon transitions of Chen et al.
    init_scale: float = 1.0  # multiplies the initial embedding W; small values learn features one at a time

    def validate(self) -> None:
        require_positive_ints(self, ("steps", "batch_size", "log_every"))
        if not isinstance(self.snapshots, int) or not 0 <= self.snapshots <= self.steps:
            raise SaelabError(f"snapshots must be an integer from 0 to steps ({self.steps}), got {self.snapshots!r}")
        if not (_is_number(self.lr) and 0 < self.lr < math.inf):
            raise SaelabError(f"lr must be a finite positive number, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SaelabError(f"unknown lr_schedule '{self.lr_schedule}'; choose one of {', '.join(LR_SCHEDULES)}")
        if not isinstance(self.init_scale, (int, float)) or not 0 < self.init_scale < math.inf:
            raise SaelabError(f"init_scale must be a positive number, got {self.init_scale!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SaelabError(f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if self.method not in TRAIN_METHODS:
            raise SaelabError(f"unknown training method '{self.method}'; choose one of {', '.join(TRAIN_METHODS)}")


class ToyModel(nn.Module):
    """`n_instances` toy models trained in parallel.

    `importance` and `feature_probability` ([instances, features]) default to the ones the config describes;
    pass tensors to give every instance its own values (as the phase diagrams do).
    """

    W: nn.Parameter  # [instances, d_hidden, n_features]
    b_final: nn.Parameter  # [instances, n_features]
    importance: Tensor
    feature_probability: Tensor

    def __init__(
        self,
        cfg: ToyModelConfig,
        importance: Tensor | None = None,
        feature_probability: Tensor | None = None,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        shape = (cfg.n_instances, cfg.n_features)
        importance = cfg.importance_tensor() if importance is None else importance.float()
        feature_probability = (
            cfg.feature_probability_tensor() if feature_probability is None else feature_probability.float()
        )
        for name, tensor in (("importance", importance), ("feature_probability", feature_probability)):
            if tuple(tensor.shape) != shape:
                raise SaelabError(
                    f"{name} has shape {tuple(tensor.shape)} but must be [instances, features] = {list(shape)}"
                )
        if not ((feature_probability > 0) & (feature_probability <= 1)).all():
            raise SaelabError("feature probabilities must lie in (0, 1]")
        if (importance < 0).any():
            raise SaelabError("importance values must be non-negative")
        if cfg.features == "hierarchical":
            groups = feature_probability.reshape(cfg.n_instances, -1, cfg.children_per_parent + 1)
            if (groups[..., 1:].sum(-1) > groups[..., 0] * (1 + 1e-6)).any():
                raise SaelabError(
                    "hierarchical children are present only with their parent: the children's probabilities "
                    "must sum to at most their parent's"
                )
        self.register_buffer("importance", importance.clone())
        self.register_buffer("feature_probability", feature_probability.clone())
        self.W = nn.Parameter(torch.empty(cfg.n_instances, cfg.d_hidden, cfg.n_features))
        self.b_final = nn.Parameter(torch.zeros(cfg.n_instances, cfg.n_features))
        if cfg.variant == "abs":
            self.W_out = nn.Parameter(torch.empty(cfg.n_instances, cfg.n_features, cfg.d_hidden))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Xavier-normal per instance, as in the paper's reference code.
        fan_std = (2.0 / (self.cfg.d_hidden + self.cfg.n_features)) ** 0.5
        with torch.no_grad():
            self.W.normal_(0.0, fan_std, generator=generator)
            self.b_final.zero_()
            if self.cfg.variant == "abs":
                self.W_out.normal_(0.0, fan_std, generator=generator)

    def hidden(self, features: Tensor) -> Tensor:
        """features [batch, instances, n_features] → hidden [batch, instances, d_hidden]"""
        hidden = einops.einsum(self.W, features, "inst hid feat, batch inst feat -> batch inst hid")
        return torch.relu(hidden) if self.cfg.variant in ("neurons", "abs") else hidden

    def forward(self, features: Tensor) -> Tensor:
        """features [batch, instances, n_features] → reconstruction [batch, instances, n_features]"""
        hidden = self.hidden(features)
        if self.cfg.variant == "abs":
            out = einops.einsum(self.W_out, hidden, "inst feat hid, batch inst hid -> batch inst feat")
        else:
            out = einops.einsum(self.W, hidden, "inst hid feat, batch inst hid -> batch inst feat")
        out = out + self.b_final
        return out if self.cfg.variant == "linear" else torch.relu(out)

    def target(self, features: Tensor) -> Tensor:
        return features.abs() if self.cfg.variant == "abs" else features

    def loss_per_instance(self, features: Tensor, output: Tensor | None = None) -> Tensor:
        """Importance-weighted squared error, mean over batch, summed over features: [instances]"""
        output = self(features) if output is None else output
        error = self.importance * (self.target(features) - output) ** 2
        return einops.reduce(error, "batch inst feat -> inst", "sum") / features.shape[0]

    def generate_batch(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Sample sparse features [batch, instances, n_features] from the configured generator.

        Values are uniform in [0, 1] ([−1, 1] for `abs`); each feature is present with its own probability.
        Correlated pairs are present together (with the pair's first probability); anticorrelated pairs are
        never present together (a pair fires with probability 2p, then one of its two features at random).
        Hierarchical groups: the parent is present with its probability p_P; given that, at most one child is,
        child c with probability p_c / p_P (so each feature's probability is its marginal probability).
        """
        n_inst, n_feat = self.cfg.n_instances, self.cfg.n_features
        device = self.W.device
        prob = self.feature_probability
        kind = self.cfg.features
        uniform = lambda *shape: torch.rand(*shape, generator=generator, device=device, dtype=self.W.dtype)  # noqa: E731
        if kind == "independent":
            present = uniform(batch_size, n_inst, n_feat) < prob
        elif kind == "correlated":
            pair_present = uniform(batch_size, n_inst, n_feat // 2) < prob[:, ::2]
            present = pair_present.repeat_interleave(2, dim=-1)
        elif kind == "hierarchical":
            group = prob.reshape(n_inst, -1, self.cfg.children_per_parent + 1)  # [inst, parents, 1 + children]
            parent_prob, child_prob = group[..., 0], group[..., 1:]
            parent = uniform(batch_size, n_inst, group.shape[1]) < parent_prob
            # One uniform picks the child: child c owns [Σ_{j<c} p_j, Σ_{j≤c} p_j) / p_P, none owns the rest.
            upper = child_prob.cumsum(-1) / parent_prob[..., None]
            lower = torch.cat([torch.zeros_like(upper[..., :1]), upper[..., :-1]], dim=-1)
            pick = uniform(batch_size, n_inst, group.shape[1], 1)
            child = (pick >= lower) & (pick < upper) & parent[..., None]
            present = torch.cat([parent[..., None], child], dim=-1).flatten(-2)
        else:
            pair_present = uniform(batch_size, n_inst, n_feat // 2) < 2 * prob[:, ::2]
            first = uniform(batch_size, n_inst, n_feat // 2) < 0.5
            present = torch.stack([pair_present & first, pair_present & ~first], dim=-1).flatten(-2)
        values = uniform(batch_size, n_inst, n_feat)
        if self.cfg.variant == "abs":
            values = 2 * values - 1
        return torch.where(present, values, torch.zeros_like(values))

    def feature_directions(self, instance: int = 0) -> Tensor:
        """The true features as hidden-space directions, W[instance]ᵀ: [n_features, d_hidden]"""
        return self.W[instance].detach().T.clone()


def save_toy_model(
    model: ToyModel,
    out: Path,
    train_cfg: ToyTrainConfig | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `cfg.json` + `model.safetensors` into `out`, atomically (see `saelab.io.output_folder`)."""
    with output_folder(out, TOY_FOLDER, overwrite=overwrite) as tmp:
        write_toy_model_files(model, tmp, train_cfg, extra)
    return Path(out)


def write_toy_model_files(
    model: ToyModel, directory: Path, train_cfg: ToyTrainConfig | None = None, extra: dict | None = None
) -> None:
    """Write the two files of a saved toy model into an existing (temporary) directory."""
    tensors = {
        "W": model.W,
        "b_final": model.b_final,
        "importance": model.importance,
        "feature_probability": model.feature_probability,
    }
    if model.cfg.variant == "abs":
        tensors["W_out"] = model.W_out
    save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": FORMAT_NAME})
    cfg = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": config_to_dict(model.cfg),
        "train": config_to_dict(train_cfg) if train_cfg is not None else None,
        **(extra or {}),
    }
    atomic_write_json(directory / "cfg.json", cfg)


@dataclass
class ToyFolderHeader:
    """The typed head of a toy folder's cfg.json (commands add more keys, such as `phase`, read where used)."""

    format: str
    format_version: int
    model: ToyModelConfig
    train: ToyTrainConfig | None = None


def load_toy_model(directory: Path, device: str | torch.device = "cpu") -> tuple[ToyModel, ToyTrainConfig | None]:
    """Load a folder written by `save_toy_model`; anything else is a one-line SaelabError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SaelabError(f"{directory} is not a directory; expected a saved toy model (cfg.json + {WEIGHTS_FILE})")
    cfg_path = directory / "cfg.json"
    if not cfg_path.is_file():
        raise SaelabError(f"{directory} has no cfg.json; it is not a saved saelab toy model")
    raw = load_json(cfg_path)
    if raw.get("format") != FORMAT_NAME:
        found = raw.get("format", raw.get("architecture", "no 'format' field"))
        raise SaelabError(f"{cfg_path} describes '{found}', not a saelab toy model (format '{FORMAT_NAME}')")
    header = config_from_dict(ToyFolderHeader, raw, where=str(cfg_path), extra_keys=True)
    if header.format_version > FORMAT_VERSION:
        raise SaelabError(f"{cfg_path} has format_version {header.format_version}; upgrade saelab to read it")
    model_cfg, train_cfg = header.model, header.train
    model_cfg.validate()
    if train_cfg is not None:
        train_cfg.validate()
    tensors = load_tensors(directory / WEIGHTS_FILE)
    expected = {
        "W": (model_cfg.n_instances, model_cfg.d_hidden, model_cfg.n_features),
        "b_final": (model_cfg.n_instances, model_cfg.n_features),
        "importance": (model_cfg.n_instances, model_cfg.n_features),
        "feature_probability": (model_cfg.n_instances, model_cfg.n_features),
    }
    if model_cfg.variant == "abs":
        expected["W_out"] = (model_cfg.n_instances, model_cfg.n_features, model_cfg.d_hidden)
    for name, shape in expected.items():
        if name not in tensors:
            raise SaelabError(f"{directory / WEIGHTS_FILE} lacks tensor '{name}'; the checkpoint is incomplete")
        if tuple(tensors[name].shape) != shape:
            raise SaelabError(
                f"{directory / WEIGHTS_FILE}: '{name}' has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}"
            )
    model = ToyModel(model_cfg, tensors["importance"], tensors["feature_probability"])
    with torch.no_grad():
        model.W.copy_(tensors["W"])
        model.b_final.copy_(tensors["b_final"])
        if model_cfg.variant == "abs":
            model.W_out.copy_(tensors["W_out"])
    return model.to(device), train_cfg
