"""Test-wide settings (offline, headless) and the tiny real language model and corpus that several modules share."""

import os

# Set before torch/transformers/matplotlib are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "disabled")


# The tiny real language model and corpus that the model, store and eval tests share (one per test module).
import pytest


@pytest.fixture(scope="module")
def tokenizer():
    from models_helpers import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module")
def lm(tokenizer):
    from models_helpers import make_tl_model

    from saelab.models.access import LanguageModel

    return LanguageModel.from_transformer_lens(make_tl_model(tokenizer), "tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from models_helpers import write_corpus

    return str(write_corpus(tmp_path_factory.mktemp("data")))
