"""Activation caches on disk: a store's batches written once, in the order it serves them, and read back zero-copy.

    DIR/manifest.json               {"format": "saelab.activation_cache", "version": 1, "tokens": N,
                                     "shards": [rows, ...], "hooks": {hook: d_in}, "metadata": {hook: {...}}}
    DIR/<hook>/shard_00000.npy      [rows, d_in] float32, one file per shard and hook

Rows are written in the store's shuffled serving order, so reading them back in order yields exactly the batches
the live store would have served from the same tokens: training from the cache equals training from the model.
Shards are numpy `.npy` files opened as memory maps, so a batch reads only its own rows from disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from saelab.activations import OneHookView
from saelab.config import config_from_dict, load_json
from saelab.errors import SaelabError
from saelab.io import OutputKind, atomic_write_json, json_format_marker, output_folder
from saelab.models.store import ActivationStore

FORMAT_NAME = "saelab.activation_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 2**16


def _is_cache(folder: Path) -> bool:
    """A complete cache: its manifest, and hook folders holding only shards."""
    if not json_format_marker(MANIFEST, FORMAT_NAME)(folder):
        return False
    for entry in Path(folder).iterdir():
        if entry.name == MANIFEST:
            continue
        if not entry.is_dir() or entry.is_symlink():
            return False
        if any(not (s.name.startswith("shard_") and s.name.endswith(".npy")) for s in entry.iterdir()):
            return False
    return True


CACHE_FOLDER = OutputKind("saelab activation cache", ("*",), _is_cache, replace_quietly=False)


def shard_path(folder: Path, hook: str, index: int) -> Path:
    return Path(folder) / hook / f"shard_{index:05d}.npy"


def write_activation_cache(
    store: ActivationStore,
    tokens: int,
    out: Path,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
    progress: bool = False,
    inputs: tuple[Path, ...] = (),
) -> Path:
    """Write the store's next `tokens` rows at each of its hooks to a cache folder `out` (whole or not at all)."""
    if tokens <= 0 or shard_tokens <= 0:
        raise SaelabError(f"--tokens and the shard size must be positive, got {tokens} and {shard_tokens}")
    shards: list[int] = []
    with (
        output_folder(out, CACHE_FOLDER, inputs, overwrite) as folder,
        tqdm(total=tokens, unit="tok", disable=not progress, desc="caching activations") as bar,
    ):
        while sum(shards) < tokens:
            rows = min(shard_tokens, tokens - sum(shards))
            for hook, acts in store.next_batches(rows).items():
                path = shard_path(folder, hook, len(shards))
                path.parent.mkdir(exist_ok=True)
                np.save(path, acts.float().cpu().numpy())
            shards.append(rows)
            bar.update(rows)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokens": tokens,
            "shards": shards,
            "hooks": dict(store.d_ins),
            "metadata": {hook: store.metadata_for(hook) for hook in store.hooks},
        }
        atomic_write_json(folder / MANIFEST, manifest)
    return Path(out)


@dataclass
class CacheManifest:
    """`manifest.json`, typed: read through `saelab.config.config_from_dict` like every other saved config."""

    format: str
    version: int
    tokens: int
    shards: list[int]
    hooks: dict[str, int]
    metadata: dict[str, dict[str, Any]]


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a cache folder, checked: a foreign or damaged folder is a one-line error."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise SaelabError(
            f"{folder} is not an activation cache (no {MANIFEST}); write one with saelab activations cache"
        )
    manifest = load_json(folder / MANIFEST)
    if manifest.get("format") != FORMAT_NAME:
        raise SaelabError(
            f"{folder / MANIFEST} is not an activation cache manifest (format {manifest.get('format')!r})"
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise SaelabError(
            f"{folder / MANIFEST} has version {manifest.get('version')!r}; this saelab reads {FORMAT_VERSION}"
        )
    typed = config_from_dict(CacheManifest, manifest, where=str(folder / MANIFEST))
    if any(rows < 1 for rows in typed.shards) or sum(typed.shards) != typed.tokens or typed.tokens < 1:
        raise SaelabError(f"{folder / MANIFEST} is damaged (shards do not add up to tokens); write the cache again")
    if any(not re.fullmatch(r"[\w.\-]+", hook) or hook.startswith(".") for hook in typed.hooks):
        raise SaelabError(f"{folder / MANIFEST} names a hook that is not a plain name; write the cache again")
    if set(typed.metadata) != set(typed.hooks) or any(d_in < 1 for d_in in typed.hooks.values()):
        raise SaelabError(f"{folder / MANIFEST} is damaged (hooks and metadata disagree); write the cache again")
    return dataclasses.asdict(typed)


class CachedActivations(OneHookView):
    """An activation source over a cache: rows in written order, as `{hook: [batch, d_in]}` batches.

    Reads one hook (`hook="blocks.0.hook_resid_post"`; then the shorthands `d_in`, `metadata` and `next_batch`
    apply too) or several (`hook` a list, or None for all of the cache's hooks), row j being the same token at
    every hook, as the live store serves them.
    """

    def __init__(self, folder: str | Path, hook: str | Sequence[str] | None = None, device: str = "cpu") -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        available = manifest["hooks"]
        hooks = list(available) if hook is None else [hook] if isinstance(hook, str) else list(hook)
        for name in hooks:
            if name not in available:
                close = difflib.get_close_matches(str(name), list(available), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"it holds {', '.join(available)}"
                raise SaelabError(f"the activation cache {self.folder} has no hook '{name}'; {hint}")
        self.hooks = hooks
        self.d_ins = {name: int(available[name]) for name in hooks}
        self._metadata = {name: dict(manifest["metadata"][name]) for name in hooks}
        self.device = device
        self.tokens = int(manifest["tokens"])
        shards = manifest["shards"]
        self._shards = {name: [self._open(name, i, rows) for i, rows in enumerate(shards)] for name in hooks}
        self._ends = np.cumsum(manifest["shards"])  # row index one past each shard
        self._row = 0

    def metadata_for(self, hook: str) -> dict[str, Any]:
        """The live store's metadata (model, hook, dataset): an SAE trained from the cache is evaluated on the model."""
        return dict(self._metadata[hook])

    def _open(self, hook: str, index: int, rows: int) -> np.ndarray:
        path = shard_path(self.folder, hook, index)
        try:
            shard = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise SaelabError(f"cannot read cache shard {path} ({err}); the cache is damaged, write it again") from None
        if shard.shape != (rows, self.d_ins[hook]) or shard.dtype != np.float32:
            raise SaelabError(
                f"cache shard {path} holds {shard.dtype} {shard.shape},"
                f" the manifest says float32 {(rows, self.d_ins[hook])}"
            )
        return shard

    def next_batches(self, batch_size: int) -> dict[str, Tensor]:
        """The next `batch_size` rows of every hook read; only they are read from disk."""
        end = self._row + batch_size
        if end > self.tokens:
            raise SaelabError(
                f"the activation cache {self.folder} holds {self.tokens} tokens, too few for this run; "
                "cache more with saelab activations cache --tokens, or train on fewer"
            )
        pieces: dict[str, list[np.ndarray]] = {hook: [] for hook in self.hooks}
        shard = int(np.searchsorted(self._ends, self._row, side="right"))
        while self._row < end:
            start = int(self._ends[shard - 1]) if shard else 0
            stop = min(end, int(self._ends[shard]))
            for hook in self.hooks:
                pieces[hook].append(self._shards[hook][shard][self._row - start : stop - start])
            self._row = stop
            shard += 1
        return {hook: torch.from_numpy(np.concatenate(parts)).to(self.device) for hook, parts in pieces.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"row": self._row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._row = int(state["row"])
