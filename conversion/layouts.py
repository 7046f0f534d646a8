# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""
Source layouts: how each kind of LLaVA checkpoint names its tensors, which settings it may hold, and where the
output's vision and text configs come from.

- `ORIGINAL_LLAVA`: the LLaVA repository's format (`liuhaotian/llava-v1.5-7b`, the TRIM checkpoint
  `FreedomIntelligence/llava-v1.5-7b-TRIM` with its embedded CLIP towers, and a Vicuna checkpoint plus a pretrain
  projector `mm_projector.bin`): raw `config.json` with `mm_*` settings and the Llama fields at the top level.
- `LLAVA_HF`: transformers' own `LlavaForConditionalGeneration` (`llava-hf/llava-1.5-7b-hf`), legacy (Hub) or current
  tensor names, with `vision_config` and `text_config`.

`CLIP_RULES` name the tensors of a full `CLIPModel` (`--clip`).
"""

import logging
import re
from pathlib import Path

from . import ConversionError

logger = logging.getLogger("llava_trim.convert_checkpoint")

# The embedded-CLIP prefixes of TRIM checkpoints (the reference `CLIPVisionTower` holds `vision_tower`, a
# `CLIPVisionModelWithProjection`, and `text_tower`, a `CLIPTextModelWithProjection`)
TRIM_VISION_PREFIX = "model.vision_tower.vision_tower."
TRIM_TEXT_PREFIX = "model.vision_tower.text_tower."
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"

# Every rule maps a source name to candidate target names; the first candidate the model has wins. The CLIP towers
# have two candidates (with or without the inner `vision_model.` / `text_model.` level), so the mapping follows the
# installed transformers.
_VISION = ("model.vision_tower.{}", "model.vision_tower.vision_model.{}")
_TEXT = ("model.trim_scorer.text_model.{}", "model.trim_scorer.text_model.text_model.{}")
_VISUAL_PROJECTION = ("model.trim_scorer.visual_projection.{}",)
_TEXT_PROJECTION = ("model.trim_scorer.text_projection.{}",)
_DROPPED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$|^logit_scale$")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

CLIP_RULES: Rules = (  # CLIPModel
    (r"vision_model\.(.+)", _VISION),
    (r"text_model\.(.+)", _TEXT),
    (r"visual_projection\.(.+)", _VISUAL_PROJECTION),
    (r"text_projection\.(.+)", _TEXT_PROJECTION),
)


def map_key(name: str, rules: Rules, targets: set[str] | None = None) -> str | None:
    """
    The model's name for source tensor `name`; `None` for tensors to drop (rotary `inv_freq`, `position_ids`,
    `logit_scale`); `""` for a name no rule knows. With `targets`, the first candidate in it wins.
    """
    if _DROPPED.search(name):
        return None
    for pattern, candidates in rules:
        match = re.fullmatch(pattern, name)
        if match:
            names = [candidate.format(match.group(1)) for candidate in candidates]
            if targets is None:
                return names[0]
            return next((n for n in names if n in targets), names[0])
    return ""


class SourceLayout:
    """
    One kind of LLaVA checkpoint: its tensor `rules`, the settings it refuses (`check`), and the output's vision
    config and Llama text config built from its `config.json` (`vision_config`, `text_config`).
    """

    description: str
    rules: Rules
    family = "llava"  # "llava" (LLaVA-1.5) or "llava_next" (LLaVA-NeXT, anyres)

    def next_settings(self, config: dict) -> dict:
        """LLaVA-NeXT only: `image_grid_pinpoints` and the LLaVA `conversation` of the checkpoint."""
        return {}

    def check(self, config: dict, folder: Path) -> None:
        """Refuse settings this model cannot represent, naming them."""
        raise NotImplementedError

    def vision_config(self, config: dict, clip_vision, folder: Path, clip_folder: Path) -> tuple[dict, int]:
        """The vision tower's config (a dict) and the vision feature layer, checked against `--clip`'s tower."""
        raise NotImplementedError

    def text_config(self, config: dict) -> dict:
        """The Llama settings of the language model (the caller sets vocabulary, padding and tying)."""
        raise NotImplementedError


# The Llama fields an original LLaVA `config.json` (or a Vicuna one) holds at its top level.
LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
)


class OriginalLlavaLayout(SourceLayout):
    """The LLaVA repository's format: `LlavaLlamaForCausalLM`, `mm_*` settings, `model.mm_projector.{0,2}`."""

    description = "original LLaVA repository layout"
    rules: Rules = (
        (r"model\.embed_tokens\.(.+)", ("model.language_model.embed_tokens.{}",)),
        (r"model\.layers\.(.+)", ("model.language_model.layers.{}",)),
        (r"model\.norm\.(.+)", ("model.language_model.norm.{}",)),
        (r"lm_head\.(.+)", ("lm_head.{}",)),
        (r"model\.mm_projector\.0\.(.+)", ("model.multi_modal_projector.linear_1.{}",)),
        (r"model\.mm_projector\.2\.(.+)", ("model.multi_modal_projector.linear_2.{}",)),
        (re.escape(TRIM_VISION_PREFIX) + r"vision_model\.(.+)", _VISION),
        (re.escape(TRIM_VISION_PREFIX) + r"visual_projection\.(.+)", _VISUAL_PROJECTION),
        (re.escape(TRIM_TEXT_PREFIX) + r"text_model\.(.+)", _TEXT),
        (re.escape(TRIM_TEXT_PREFIX) + r"text_projection\.(.+)", _TEXT_PROJECTION),
    )

    def check(self, config: dict, folder: Path) -> None:
        model_type = config.get("model_type", "")
        architectures = config.get("architectures") or []
        is_llama = model_type in ("llava", "llava_llama") and all(a == "LlavaLlamaForCausalLM" for a in architectures)
        if not is_llama:
            if model_type.startswith("llava") or any(a.startswith("Llava") for a in architectures):
                raise ConversionError(
                    f"{folder} is a LLaVA checkpoint with a non-Llama language model (model_type={model_type!r}, "
                    f"architectures={architectures}); only Llama-based LLaVA-1.5 (LlavaLlamaForCausalLM) is supported."
                )
            raise ConversionError(
                f"{folder}/config.json (model_type={model_type!r}, architectures={architectures}) is not a LLaVA-1.5 "
                "checkpoint: pass an original LLaVA (liuhaotian/llava-v1.5-7b), TRIM "
                "(FreedomIntelligence/llava-v1.5-7b-TRIM) or llava-hf (llava-hf/llava-1.5-7b-hf) checkpoint."
            )
        projector = config.get("mm_projector_type", "linear")  # LLaVA's own default when the key is absent
        if projector not in SUPPORTED_PROJECTORS:
            raise ConversionError(
                f"{folder} uses mm_projector_type={projector!r}; only {', '.join(SUPPORTED_PROJECTORS)} (LLaVA-1.5's "
                "two-layer MLP) is supported."
            )
        aspect = str(config.get("image_aspect_ratio", "pad"))
        merge = str(config.get("mm_patch_merge_type", "flat"))
        if "anyres" in aspect or merge != "flat":
            raise ConversionError(
                f"{folder} uses image_aspect_ratio={aspect!r} / mm_patch_merge_type={merge!r} (LLaVA-NeXT 'anyres' "
                "tiling); only LLaVA-1.5's single 336 px image ('pad' or 'square') is supported."
            )
        for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if config.get(flag):
                raise ConversionError(
                    f"{folder} sets {flag}: true (extra image marker tokens around the image); only LLaVA-1.5's "
                    f"layout without them ({flag}: false) is supported."
                )
        feature = config.get("mm_vision_select_feature", "patch")
        if feature != "patch":
            raise ConversionError(
                f"{folder} uses mm_vision_select_feature={feature!r}; only 'patch' (no CLS token, LLaVA-1.5) is "
                "supported."
            )

    def vision_config(self, config: dict, clip_vision, folder: Path, clip_folder: Path) -> tuple[dict, int]:
        mm_hidden = config.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != clip_vision.hidden_size:
            raise ConversionError(
                f"Shape mismatch with CLIP: {folder} has mm_hidden_size={mm_hidden} (its projector reads "
                f"{mm_hidden}-dim features) but the CLIP vision tower of {clip_folder} has hidden_size="
                f"{clip_vision.hidden_size}. Pass the CLIP the model was trained with (--clip, config's "
                f"mm_vision_tower: {config.get('mm_vision_tower')!r})."
            )
        logger.info("Vision tower named by the source: %s; CLIP used: %s", config.get("mm_vision_tower"), clip_folder)
        return clip_vision.to_dict(), config.get("mm_vision_select_layer", -2)

    def text_config(self, config: dict) -> dict:
        return {key: config[key] for key in LLAMA_FIELDS if config.get(key) is not None}


class LlavaHfLayout(SourceLayout):
    """transformers' `LlavaForConditionalGeneration`: `vision_config`, `text_config`, `multi_modal_projector`."""

    description = "transformers Llava layout"
    rules: Rules = (  # legacy (Hub) and current names
        (r"(?:language_model\.model|model\.language_model)\.(.+)", ("model.language_model.{}",)),
        (r"(?:language_model\.lm_head|lm_head)\.(.+)", ("lm_head.{}",)),
        (r"(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)", _VISION),
        (r"(?:model\.)?multi_modal_projector\.(.+)", ("model.multi_modal_projector.{}",)),
    )

    def check(self, config: dict, folder: Path) -> None:
        text_type = (config.get("text_config") or {}).get("model_type", "llama")
        if text_type != "llama":
            raise ConversionError(
                f"{folder} has a {text_type!r} language model; only Llama-based LLaVA-1.5 is supported "
                "(non-Llama LLMs are not supported yet)."
            )
        vision_type = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
        if vision_type != "clip_vision_model":
            raise ConversionError(f"{folder} has a {vision_type!r} vision tower; TRIM needs a CLIP vision tower.")
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ConversionError(
                f"{folder} uses vision_feature_select_strategy={strategy!r}; only 'default' (patch tokens, no CLS, as "
                "LLaVA-1.5) is supported."
            )

    def vision_config(self, config: dict, clip_vision, folder: Path, clip_folder: Path) -> tuple[dict, int]:
        vision_config = dict(config["vision_config"])
        mismatched = [
            f"{key}: {vision_config.get(key)} vs {getattr(clip_vision, key)}"
            for key in ("hidden_size", "image_size", "patch_size", "num_hidden_layers")
            if vision_config.get(key, getattr(clip_vision, key)) != getattr(clip_vision, key)
        ]
        if mismatched:
            raise ConversionError(
                f"Shape mismatch with CLIP: the vision tower of {folder} differs from {clip_folder} "
                f"({'; '.join(mismatched)}). Pass the CLIP the model was built on (--clip)."
            )
        return vision_config, config.get("vision_feature_layer", -2)

    def text_config(self, config: dict) -> dict:
        return dict(config["text_config"])


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT (llava-v1.6, anyres): the same tensors plus `image_newline`, the grid pinpoints, Llama or Mistral LLMs
# ---------------------------------------------------------------------------------------------------------------------

NEXT_TEXT_MODELS = {"llama": "vicuna_v1", "mistral": "mistral_instruct"}  # language model -> LLaVA conversation
_NEWLINE = (r"(?:model\.)?image_newline()", ("model.image_newline{}",))
# the Mistral fields an original `llava_mistral` config.json holds at its top level, besides the Llama ones
MISTRAL_FIELDS = ("sliding_window",)


def _check_pinpoints(pinpoints, folder: Path) -> None:
    valid = (
        isinstance(pinpoints, list)
        and pinpoints
        and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 for x in p)
            for p in pinpoints
        )
    )
    if not valid:
        raise ConversionError(
            f"{folder} has image_grid_pinpoints={pinpoints!r}; LLaVA-NeXT needs a list of [height, width] "
            "resolutions such as [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]."
        )


class OriginalLlavaNextLayout(OriginalLlavaLayout):
    """The LLaVA repository's llava-v1.6 format (`liuhaotian/llava-v1.6-vicuna-7b`, `-mistral-7b`): LLaVA-1.5's
    tensors (the fine-tuned vision tower embedded), `model.image_newline`, `image_aspect_ratio: anyres`,
    `mm_patch_merge_type: spatial_unpad` and `image_grid_pinpoints`."""

    description = "original LLaVA-NeXT repository layout"
    family = "llava_next"
    rules: Rules = (*OriginalLlavaLayout.rules, _NEWLINE)
    architectures = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}

    def check(self, config: dict, folder: Path) -> None:
        architectures = config.get("architectures") or []
        if not architectures or any(a not in self.architectures for a in architectures):
            raise ConversionError(
                f"{folder} is a LLaVA-NeXT checkpoint with architectures={architectures}; only "
                f"{' and '.join(self.architectures)} (llava-v1.6 Vicuna and Mistral) are supported."
            )
        aspect, merge = config.get("image_aspect_ratio"), config.get("mm_patch_merge_type", "flat")
        if aspect != "anyres" or merge != "spatial_unpad":
            raise ConversionError(
                f"{folder} uses image_aspect_ratio={aspect!r} / mm_patch_merge_type={merge!r}; LLaVA-NeXT is "
                "supported as released: 'anyres' with 'spatial_unpad'."
            )
        _check_pinpoints(config.get("image_grid_pinpoints"), folder)
        super().check({**config, "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
                       "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}, folder)  # fmt: skip

    def text_config(self, config: dict) -> dict:
        text_model = self.architectures[(config.get("architectures") or ["LlavaLlamaForCausalLM"])[0]]
        fields = LLAMA_FIELDS + (MISTRAL_FIELDS if text_model == "mistral" else ())
        return {"model_type": text_model, **{key: config[key] for key in fields if config.get(key) is not None}}

    def next_settings(self, config: dict) -> dict:
        text_model = self.architectures[(config.get("architectures") or ["LlavaLlamaForCausalLM"])[0]]
        return {"image_grid_pinpoints": config["image_grid_pinpoints"], "conversation": NEXT_TEXT_MODELS[text_model]}


class LlavaNextHfLayout(LlavaHfLayout):
    """transformers' `LlavaNextForConditionalGeneration` (`llava-hf/llava-v1.6-vicuna-7b-hf`, `-13b-hf`,
    `llava-v1.6-mistral-7b-hf`): the Llava names plus `image_newline`, `image_grid_pinpoints`."""

    description = "transformers LlavaNext layout"
    family = "llava_next"
    rules: Rules = (*LlavaHfLayout.rules, _NEWLINE)

    def check(self, config: dict, folder: Path) -> None:
        text_type = (config.get("text_config") or {}).get("model_type", "llama")
        if text_type not in NEXT_TEXT_MODELS:
            raise ConversionError(
                f"{folder} has a {text_type!r} language model; LLaVA-NeXT is supported with Llama (Vicuna) and "
                "Mistral language models."
            )
        super().check({**config, "text_config": {**(config.get("text_config") or {}), "model_type": "llama"}}, folder)
        _check_pinpoints(config.get("image_grid_pinpoints", [[336, 672]]), folder)

    def next_settings(self, config: dict) -> dict:
        from transformers import LlavaNextConfig

        text_type = (config.get("text_config") or {}).get("model_type", "llama")
        pinpoints = config.get("image_grid_pinpoints") or LlavaNextConfig().image_grid_pinpoints
        return {"image_grid_pinpoints": pinpoints, "conversation": NEXT_TEXT_MODELS[text_type]}


ORIGINAL_LLAVA = OriginalLlavaLayout()
LLAVA_HF = LlavaHfLayout()
ORIGINAL_LLAVA_NEXT = OriginalLlavaNextLayout()
LLAVA_NEXT_HF = LlavaNextHfLayout()


def detect_layout(config: dict) -> SourceLayout:
    """`LLAVA_NEXT_HF` / `LLAVA_HF` for a transformers LLaVA-NeXT / Llava config, `ORIGINAL_LLAVA_NEXT` for an
    original `anyres` one, else `ORIGINAL_LLAVA` (each layout's `check` refuses what it is not)."""
    architectures = config.get("architectures") or []
    if config.get("model_type") == "llava_next" or "LlavaNextForConditionalGeneration" in architectures:
        return LLAVA_NEXT_HF
    if "text_config" in config or "LlavaForConditionalGeneration" in architectures:
        return LLAVA_HF
    if "anyres" in str(config.get("image_aspect_ratio", "")):
        return ORIGINAL_LLAVA_NEXT
    return ORIGINAL_LLAVA
