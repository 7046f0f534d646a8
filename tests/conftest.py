"""Shared fixtures: every test runs offline on tiny random models."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from llava_trim.testing_utils.tiny import tiny_model  # noqa: E402
from llava_trim.testing_utils.tiny_tokenizers import build_tiny_processor  # noqa: E402


@pytest.fixture(scope="session")
def model():
    """One tiny float32 model shared by read-only tests (never train or mutate it)."""
    return tiny_model(seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny converted folder (model + processor, as `convert_checkpoint.py` writes it); tests only read it."""
    folder = tmp_path_factory.mktemp("tiny-llava-trim")
    build_tiny_processor(folder)
    tiny_model(seed=0).save_pretrained(folder)
    return folder
