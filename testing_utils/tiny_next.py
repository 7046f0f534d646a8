"""Tiny random LLaVA-NeXT (llava-v1.6, anyres) models with TRIM for tests, the demo and CPU benchmarks.

The geometry is the real one (336 px crops, patch 14: 576 patches per crop, LLaVA-NeXT's five grid pinpoints, so up
to 2,928 image positions per image); every width is that of `testing_utils/tiny.py`.
"""

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from ..configuration_llava_trim import LlavaNextTrimConfig
from ..modeling_llava_trim import LlavaNextTrimForConditionalGeneration
from .tiny import TINY_CLIP_TEXT, TINY_IMAGE_TOKEN_ID, TINY_LLAMA, TINY_VISION, native_copy, random_model


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
    return random_model(LlavaNextTrimForConditionalGeneration, tiny_next_config(**overrides), seed)


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
    return native_copy(model, LlavaNextForConditionalGeneration, native_llava_next_config(model.config))


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


# ---------------------------------------------------------------------------------------------------------------------
# Tiny LLaVA-NeXT source checkpoints for `convert_checkpoint.py`, in both layouts
# ---------------------------------------------------------------------------------------------------------------------
# - [`build_llava_next_hf`]: `llava-hf/llava-v1.6-vicuna-7b-hf` (or `-mistral-7b-hf`): transformers-native
#   `LlavaNextForConditionalGeneration` weights, legacy Hub names (`language_model.model.*`, `vision_tower.*`,
#   `multi_modal_projector.*`, `image_newline`) or the installed transformers' names.
# - [`build_original_llava_next`]: `liuhaotian/llava-v1.6-vicuna-7b` (or `-mistral-7b`): the LLaVA repository's
#   format with `image_aspect_ratio: anyres`, `mm_patch_merge_type: spatial_unpad`, `image_grid_pinpoints`,
#   `model.image_newline`, and the vision tower LLaVA-NeXT fine-tuned embedded under
#   `model.vision_tower.vision_tower.vision_model.*` (here CLIP's plus a small change, so it differs from `--clip`).

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _newline(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 2000)
    return torch.randn(TINY_LLAMA["hidden_size"], generator=generator) / TINY_LLAMA["hidden_size"] ** 0.5


def build_original_llava_next(
    save_dir,
    clip_dir,
    *,
    seed: int = 11,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float16,
    language_model: str = "vicuna",
    llama_tokenizer_dir=None,
):
    """
    Write a tiny random checkpoint laid out like `liuhaotian/llava-v1.6-vicuna-7b` (`language_model="vicuna"`:
    `model_type: "llava"`, `LlavaLlamaForCausalLM`) or `liuhaotian/llava-v1.6-mistral-7b` (`"mistral"`:
    `model_type: "llava_mistral"`, `LlavaMistralForCausalLM`), as `model-0000k-of-0000n.safetensors` shards.

    Returns:
        `Path`: `save_dir`.
    """
    from pathlib import Path

    from .tiny_checkpoints import (
        _copy_tokenizer,
        _llava_raw_config,
        _original_state_dict,
        _write_json,
        _write_shards,
        load_clip_state_dict,
    )
    from .tiny_tokenizers import LLAMA_BOS_ID, LLAMA_EOS_ID, LLAMA_UNK_ID

    if language_model not in ("vicuna", "mistral"):
        raise ValueError(f"language_model must be 'vicuna' or 'mistral', got {language_model!r}.")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    mistral = language_model == "mistral"
    config = _llava_raw_config(
        "llava_mistral" if mistral else "llava",
        dtype,
        "4.36.2",
        architectures=["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=NEXT_PINPOINTS,
        unfreeze_mm_vision_tower=True,
        mm_vision_tower_lr=2e-06,
        **({"sliding_window": None, "rope_theta": 1000000.0} if mistral else {}),
    )
    _write_json(save_dir / "config.json", config)
    _write_json(
        save_dir / "generation_config.json",
        {"bos_token_id": LLAMA_BOS_ID, "eos_token_id": LLAMA_EOS_ID, "pad_token_id": LLAMA_UNK_ID},
    )
    _copy_tokenizer(llama_tokenizer_dir, save_dir)
    llava = _original_state_dict(seed, dtype, with_inv_freq=False)
    state_dict = {k: v for k, v in llava.items() if not k.startswith(("model.mm_projector.", "lm_head."))}
    state_dict["model.image_newline"] = _newline(seed).to(dtype)
    for key, tensor in load_clip_state_dict(clip_dir).items():  # the fine-tuned vision tower LLaVA-NeXT ships
        if key.startswith("vision_model.") and not key.endswith("position_ids"):
            changed = tensor + 0.01 if key.endswith("q_proj.bias") else tensor
            state_dict["model.vision_tower.vision_tower." + key] = changed.to(dtype).contiguous()
    state_dict.update({k: v for k, v in llava.items() if k.startswith(("model.mm_projector.", "lm_head."))})
    _write_shards(save_dir, state_dict, num_shards, "safetensors")
    return save_dir


def build_llava_next_hf(
    save_dir,
    clip_dir,
    *,
    seed: int = 12,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float16,
    legacy_names: bool = True,
    language_model: str = "vicuna",
    llama_tokenizer_dir=None,
):
    """
    Write a tiny random checkpoint laid out like `llava-hf/llava-v1.6-vicuna-7b-hf` (or `-mistral-7b-hf` with
    `language_model="mistral"`): transformers-native `LlavaNextForConditionalGeneration` weights, the tokenizer with
    `<image>` and `<pad>` added, the vocabulary padded to a multiple of 64 rows.

    Returns:
        `Path`: `save_dir`.
    """
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, MistralConfig

    from .tiny_checkpoints import (
        TINY_LLAMA_SOURCE,
        _llava_hf_legacy_name,
        _llava_hf_preprocessing,
        _tiny_llama,
        _tiny_projector,
        _write_shards,
        load_clip_state_dict,
        tiny_clip_config,
    )

    save_dir = Path(save_dir)
    image_token_id, pad_token_id, vocab_size = _llava_hf_preprocessing(save_dir, llama_tokenizer_dir)

    clip_config = tiny_clip_config(AutoTokenizer.from_pretrained(clip_dir))
    text_class = MistralConfig if language_model == "mistral" else LlamaConfig
    text_config = text_class(**TINY_LLAMA_SOURCE, vocab_size=vocab_size, pad_token_id=pad_token_id)
    config = LlavaNextConfig(
        vision_config=clip_config.vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    llama = _tiny_llama(seed, vocab_size)
    projector = _tiny_projector(seed)
    clip = load_clip_state_dict(clip_dir)
    with torch.no_grad():
        model.model.language_model.load_state_dict(llama.model.state_dict(), strict=False)
        model.lm_head.load_state_dict(llama.lm_head.state_dict())
        vision = {k.removeprefix("vision_model."): v for k, v in clip.items() if k.startswith("vision_model.")}
        model.model.vision_tower.load_state_dict({k: v for k, v in vision.items() if not k.endswith("position_ids")})
        for index, linear in (
            (0, model.model.multi_modal_projector.linear_1),
            (2, model.model.multi_modal_projector.linear_2),
        ):
            linear.weight.copy_(projector[f"{index}.weight"])
            linear.bias.copy_(projector[f"{index}.bias"])
        model.model.image_newline.copy_(_newline(seed))
    model.to(dtype)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.dtype = dtype
    config.save_pretrained(save_dir)
    model.generation_config.save_pretrained(save_dir)
    state_dict = {}
    for key, tensor in model.state_dict().items():
        if legacy_names:
            key = "image_newline" if key == "model.image_newline" else _llava_hf_legacy_name(key)
        state_dict[key] = tensor.contiguous()
    _write_shards(save_dir, state_dict, num_shards, "safetensors")
    return save_dir
