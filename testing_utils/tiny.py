"""Tiny random LLaVA-TRIM models for tests, the demo and CPU benchmarks.

The vision tower keeps the real geometry (336 px, patch 14: 576 patch tokens) so TRIM's statistics behave as on
LLaVA-1.5; every width is tiny so a forward pass takes milliseconds.
"""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..configuration_llava_trim import LlavaTrimConfig
from ..modeling_llava_trim import LlavaTrimForConditionalGeneration

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 16,
}
TINY_CLIP_TEXT = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 16,
    "bos_token_id": 998,
    "eos_token_id": 999,
    "pad_token_id": 999,
}
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 1002,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 1001,
}
TINY_IMAGE_TOKEN_ID = 1000


def tiny_config(**overrides) -> LlavaTrimConfig:
    """A tiny `LlavaTrimConfig`; keyword arguments override top-level fields (e.g. `trim_ratio=0.25`)."""
    fields = {
        "vision_config": dict(TINY_VISION),
        "text_config": dict(TINY_LLAMA),
        "clip_text_config": dict(TINY_CLIP_TEXT),
        "projection_dim": 16,
        "image_token_index": TINY_IMAGE_TOKEN_ID,
    }
    fields.update(overrides)
    return LlavaTrimConfig(**fields)


def random_model(model_class: type, config, seed: int):
    """`model_class(config)` randomly initialised from `seed`, in float32 and eval mode."""
    torch.manual_seed(seed)
    model = model_class(config)
    # spread the projections so that TRIM's scores vary across patches as they do in a trained CLIP (the automatic
    # mode keeps about a sixth of the patches) without underflowing float32's softmax: with a wider spread most
    # probabilities become exactly 0 and a fixed ratio would rank ties by patch index instead of by score
    with torch.no_grad():
        model.model.trim_scorer.visual_projection.weight.normal_(std=0.15)
        model.model.trim_scorer.text_projection.weight.normal_(std=0.15)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> LlavaTrimForConditionalGeneration:
    """A tiny randomly initialised model in float32 and eval mode, reproducible from `seed`."""
    return random_model(LlavaTrimForConditionalGeneration, tiny_config(**overrides), seed)


def native_llava_config(config: LlavaTrimConfig) -> LlavaConfig:
    """The native `LlavaConfig` describing the LLaVA part of a `LlavaTrimConfig` (everything but TRIM)."""
    return LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
    )


def native_copy(model, native_class: type, native_config):
    """`native_class(native_config)` holding `model`'s weights but TRIM's scorer, in eval mode."""
    native = native_class(native_config).to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.trim_scorer.")}
    native.load_state_dict(state, strict=True)
    return native.eval()


def native_llava(model: LlavaTrimForConditionalGeneration) -> LlavaForConditionalGeneration:
    """The native transformers `LlavaForConditionalGeneration` holding the same LLaVA weights as `model`."""
    return native_copy(model, LlavaForConditionalGeneration, native_llava_config(model.config))
