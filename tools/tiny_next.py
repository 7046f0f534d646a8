"""Tiny random LLaVA-NeXT (llava-v1.6, anyres) models with TRIM for tests, the demo and CPU benchmarks.

The geometry is the real one (336 px crops, patch 14: 576 patches per crop, LLaVA-NeXT's five grid pinpoints, so up
to 2,928 image positions per image); every width is that of `tools/tiny.py`.
"""

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from ..configuration_llava_trim import LlavaNextTrimConfig
from ..modeling_llava_trim import LlavaNextTrimForConditionalGeneration
from .tiny import TINY_CLIP_TEXT, TINY_IMAGE_TOKEN_ID, TINY_LLAMA, TINY_VISION


def tiny_next_config(**overrides) -> LlavaNextTrimConfig:
    """A tiny `LlavaNextTrimConfig`; keyword arguments override top-level fields (e.g. `trim_ratio=0.25`)."""
    fields = {
        "vision_config": dict(TINY_VISION),
        "text_config": dict(TINY_LLAMA, max_position_embeddings=4096),
        "clip_text_config": dict(TINY_CLIP_TEXT),
        "projection_dim": 16,
        "image_token_index": TINY_IMAGE_TOKEN_ID,
    }
    fields.update(overrides)
    return LlavaNextTrimConfig(**fields)


def tiny_next_model(seed: int = 0, **overrides) -> LlavaNextTrimForConditionalGeneration:
    """A tiny randomly initialised LLaVA-NeXT model in float32 and eval mode, reproducible from `seed`."""
    torch.manual_seed(seed)
    model = LlavaNextTrimForConditionalGeneration(tiny_next_config(**overrides))
    # spread the projections so that TRIM's scores vary across patches as they do in a trained CLIP
    with torch.no_grad():
        model.model.trim_scorer.visual_projection.weight.normal_(std=1.0)
        model.model.trim_scorer.text_projection.weight.normal_(std=1.0)
    return model.eval()


def native_llava_next_config(config: LlavaNextTrimConfig) -> LlavaNextConfig:
    """The native `LlavaNextConfig` describing the LLaVA-NeXT part of a `LlavaNextTrimConfig` (everything but TRIM)."""
    return LlavaNextConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        image_grid_pinpoints=config.image_grid_pinpoints,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def native_llava_next(model: LlavaNextTrimForConditionalGeneration) -> LlavaNextForConditionalGeneration:
    """The native transformers `LlavaNextForConditionalGeneration` holding the same weights as `model`."""
    native = LlavaNextForConditionalGeneration(native_llava_next_config(model.config)).to(model.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.trim_scorer.")}
    native.load_state_dict(state, strict=True)
    return native.eval()


def build_tiny_next_processor(save_dir=None, conversation: str = "vicuna_v1"):
    """A complete tiny `LlavaNextTrimProcessor`: the tokenizers of [`build_tiny_processor`] (`<image>` 1000, `<pad>`
    1001), LLaVA-NeXT's image processor with the 336 px CLIP settings, and `conversation`'s chat template."""
    from ..processing_llava_trim import LlavaNextTrimProcessor
    from .tiny_tokenizers import build_clip_image_processor, build_tiny_processor

    llava = build_tiny_processor()
    processor = LlavaNextTrimProcessor(
        image_processor=build_clip_image_processor(),
        tokenizer=llava.tokenizer,
        clip_tokenizer=llava.clip_tokenizer,
        conversation=conversation,
    )
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor
