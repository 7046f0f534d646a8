"""LlavaTrimConfig: defaults of LLaVA-1.5 + TRIM, validation, round trip."""

import json

import numpy as np
import pytest
from huggingface_hub.errors import StrictDataclassError

from llava_trim.configuration_llava_trim import LlavaNextTrimConfig, LlavaTrimConfig


def test_defaults_are_llava_1_5_with_auto_trim():
    config = LlavaTrimConfig()
    assert config.model_type == "llava_trim"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.vision_config.hidden_size == 1024
    assert config.image_seq_length == 576
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.clip_text_config.model_type == "clip_text_model"
    assert config.clip_text_config.max_position_embeddings == 77
    assert config.projection_dim == 768
    assert (config.trim_ratio, config.trim_iqr_multiplier, config.trim_scope) == (-1, 1.5, "image")
    assert config.image_token_id == config.image_token_index == 32000


@pytest.mark.parametrize("ratio", [None, -1, 0.25, 1.0, 1])
def test_valid_ratios(ratio):
    assert LlavaTrimConfig(trim_ratio=ratio).trim_ratio == ratio


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("trim_ratio", 0, r"`trim_ratio` must be None \(TRIM off\), -1 \(automatic IQR selection\) or a fraction"),
        ("trim_ratio", 1.01, "a fraction in \\(0, 1\\]"),
        ("trim_ratio", -0.5, "got -0.5"),
        ("trim_iqr_multiplier", -1.0, "`trim_iqr_multiplier` must be a finite number >= 0"),
        ("trim_scope", "global", r"trim_scope.*one of \('image', 'batch'\), got global"),
    ],
)
def test_invalid_values_fail_at_construction(field, value, message):
    # transformers' strict configs wrap validation errors in huggingface_hub's StrictDataclassError
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        LlavaTrimConfig(**{field: value})


def test_round_trip(tmp_path):
    config = LlavaTrimConfig(trim_ratio=0.21, trim_scope="batch", projection_dim=16)
    config.save_pretrained(tmp_path)
    loaded = LlavaTrimConfig.from_pretrained(tmp_path)
    assert (loaded.trim_ratio, loaded.trim_scope, loaded.projection_dim) == (0.21, "batch", 16)
    assert loaded.clip_text_config.to_dict() == config.clip_text_config.to_dict()
    assert loaded.auto_map["AutoConfig"] == "configuration_llava_trim.LlavaTrimConfig"


@pytest.mark.parametrize("config_class", [LlavaTrimConfig, LlavaNextTrimConfig])
def test_numpy_settings_are_stored_as_python_numbers_in_both_families(config_class):
    config = config_class(trim_ratio=np.float32(0.25), trim_iqr_multiplier=np.float64(2.0))
    assert type(config.trim_ratio) is float and config.trim_ratio == 0.25
    assert type(config.trim_iqr_multiplier) is float and config.trim_iqr_multiplier == 2.0
    config.trim_ratio = np.float64(0.5)
    assert type(config.trim_ratio) is float and json.loads(config.to_json_string())["trim_ratio"] == 0.5
    with pytest.raises(Exception, match="`trim_ratio` must be None"):
        config.trim_ratio = np.float32(1.5)
    assert config.trim_ratio == 0.5
