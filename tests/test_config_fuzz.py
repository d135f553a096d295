"""Property tests: whatever is written into a saved cfg.json or cache manifest, loading it either works or fails
with one SaelabError line, never a traceback; wrong-typed values are refused by the one typed validation path."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saelab.config import config_from_dict
from saelab.errors import SaelabError
from saelab.models.cache import CachedActivations
from saelab.sae.io import load_sae, save_sae
from saelab.sae.model import SAEConfig, build_sae
from saelab.sae.sources import TensorSource
from saelab.toy import ToyModel, ToyModelConfig, load_toy_model, save_toy_model

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested JSON objects and lists."""
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _paths(value, (*prefix, i))
    return found


@st.composite
def mutations(draw, original: dict) -> dict:
    """`original` with one value replaced, one key removed, or one key added, anywhere in it."""
    data = json.loads(json.dumps(original))
    path = draw(st.sampled_from(_paths(data)))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=6))] = draw(JSON_VALUES)
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return data


def _one_line(error: SaelabError) -> None:
    assert "\n" not in str(error) and str(error)


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))  # NaN and Infinity are written as Python's json would


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    sae = build_sae(SAEConfig("topk", 4, 8, k=2), torch.Generator().manual_seed(0))
    sae.metadata = {"hook_name": "blocks.0.hook_resid_post", "model_name": "builtin", "context_length": 16}
    save_sae(sae, root / "sae", {"train": {"steps": 3}, "trained_steps": 3})
    save_toy_model(ToyModel(ToyModelConfig(n_features=3, d_hidden=2, n_instances=2)), root / "toy")
    cache = root / "cache"
    (cache / "h").mkdir(parents=True)
    import numpy as np

    np.save(cache / "h" / "shard_00000.npy", np.zeros((8, 4), dtype=np.float32))
    manifest = {"format": "saelab.activation_cache", "version": 1, "tokens": 8, "shards": [8], "hooks": {"h": 4},
                "metadata": {"h": {"hook_name": "h", "model_name": "m"}}}  # fmt: skip
    _write(cache / "manifest.json", manifest)
    return {"sae": root / "sae", "toy": root / "toy", "cache": cache}


def _mutated_copy(source: Path, tmp: Path, name: str, data: dict) -> Path:
    folder = tmp / source.name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    _write(folder / name, data)
    return folder


def _use_sae(folder: Path) -> None:
    sae = load_sae(folder)
    assert torch.isfinite(sae.encode(torch.ones(2, sae.cfg.d_in, dtype=sae.W_enc.dtype))).all()  # loaded = works


def _use_toy(folder: Path) -> None:
    model, _ = load_toy_model(folder)
    assert torch.isfinite(model.hidden(model.generate_batch(4))).all()


def _use_cache(folder: Path) -> None:
    assert all(batch.shape[0] == 3 for batch in CachedActivations(folder).next_batches(3).values())


@pytest.mark.parametrize(
    ("kind", "file", "use"), [("sae", "cfg.json", _use_sae), ("toy", "cfg.json", _use_toy),
                              ("cache", "manifest.json", _use_cache)]
)  # fmt: skip
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_config_or_manifest_loads_or_is_one_line(saved, tmp_path: Path, kind, file, use, data) -> None:
    original = json.loads((saved[kind] / file).read_text())
    folder = _mutated_copy(saved[kind], tmp_path, file, data.draw(mutations(original)))
    try:
        use(folder)
    except SaelabError as error:
        _one_line(error)


def test_typed_validation_refuses_what_json_makes_easy_to_get_wrong(saved, tmp_path: Path) -> None:
    cases = [
        ({"apply_b_dec_to_input": "false"}, "apply_b_dec_to_input must be true or false, got 'false'"),
        ({"architecture": ["topk"]}, "architecture must be a string"),
        ({"metadata": [1, 2]}, "metadata must be a JSON object"),
        ({"dtype": "complex64"}, "dtype 'complex64' is not supported"),
    ]
    original = json.loads((saved["sae"] / "cfg.json").read_text())
    for change, message in cases:
        folder = _mutated_copy(saved["sae"], tmp_path, "cfg.json", {**original, **change, "saelab": None})
        with pytest.raises(SaelabError, match=message):
            load_sae(folder)
    for change, message in [({"aux_k": "abc"}, "aux_k must be an integer or null, got 'abc'"),
                            ({"k": math.inf}, "k must be a finite number")]:  # fmt: skip
        saelab = {**original["saelab"], "sae": {**original["saelab"]["sae"], **change}}
        folder = _mutated_copy(saved["sae"], tmp_path, "cfg.json", {**original, "saelab": saelab})
        with pytest.raises(SaelabError, match=message):
            load_sae(folder)
    folder = _mutated_copy(
        saved["sae"], tmp_path, "cfg.json", {**original, "saelab": {**original["saelab"], "format_version": "2"}}
    )
    with pytest.raises(SaelabError, match="format_version must be an integer"):
        load_sae(folder)
    manifest = json.loads((saved["cache"] / "manifest.json").read_text())
    folder = _mutated_copy(saved["cache"], tmp_path, "manifest.json", {**manifest, "shards": ["8"]})
    with pytest.raises(SaelabError, match=r"shards\[0\] must be an integer, got '8'"):
        CachedActivations(folder)
    del manifest["metadata"]
    folder = _mutated_copy(saved["cache"], tmp_path, "manifest.json", manifest)
    with pytest.raises(SaelabError, match="missing required field 'metadata'"):
        CachedActivations(folder)
    with pytest.raises(SaelabError, match=r"d_in must be an integer, got 2\.5"):
        config_from_dict(SAEConfig, {"d_in": 2.5})


def test_non_finite_weights_are_refused_at_load(saved, tmp_path: Path) -> None:
    sae = load_sae(saved["sae"])
    with torch.no_grad():
        sae.W_dec[0, 0] = math.nan
    save_sae(sae, tmp_path / "nan")
    with pytest.raises(SaelabError, match="'W_dec' holds NaN or inf"):
        load_sae(tmp_path / "nan")
    source = TensorSource(torch.randn(16, 4))
    assert source.d_ins  # a plain source still works beside it
