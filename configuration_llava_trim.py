# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Configuration of LLaVA-1.5 and LLaVA-NeXT with TRIM (Token Reduction using CLIP Metric, arXiv 2409.10994)."""

import math
import numbers
from typing import Literal

import transformers

# The oldest transformers this file runs on (README: Supported versions), checked before anything else is imported
# from it: 5.24 brought the `cache` keyword that the model and generation pass around (5.20 to 5.23 load the files,
# then `generate` hands the model its cache under another name), 5.20 to 5.22 also lack the processor's
# `_normalize_conversations`, and 5.19 `SubConfigSpec`.
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 24):
    raise ImportError(
        f"LLaVA-TRIM needs transformers >= 5.24 and found {transformers.__version__}: "
        'run `pip install -U "transformers>=5.24,<6"`.'
    )

from huggingface_hub.dataclasses import strict, validated_field
from transformers import CLIPTextConfig, LlavaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


def check_trim_ratio(trim_ratio) -> None:
    """Raise a `ValueError` unless `trim_ratio` is `None` (off), `-1` (auto) or a real number in `(0, 1]` (fixed).

    Any real number type is accepted (`float`, `int`, `numpy.float32`, a 0-dim tensor's `.item()`), booleans are not.
    """
    if trim_ratio is None:
        return
    is_real = isinstance(trim_ratio, numbers.Real) and not isinstance(trim_ratio, bool)
    if not is_real or not (trim_ratio == -1 or 0 < trim_ratio <= 1):
        raise ValueError(
            f"`trim_ratio` must be None (TRIM off), -1 (automatic IQR selection) or a fraction in (0, 1] of the "
            f"image tokens to keep, got {trim_ratio!r}."
        )


def parse_trim_ratio(text: str) -> float | None:
    """Read a `trim_ratio` written as text (a command-line flag, a form field): `"auto"` or `"-1"` -> `-1`, `"off"` or
    `"none"` -> `None`, `"0.25"` -> `0.25`; anything else raises a `ValueError` naming the accepted forms."""
    lowered = str(text).strip().lower()
    if lowered in ("off", "none"):
        return None
    if lowered in ("auto", "-1"):
        return -1
    try:
        ratio = float(lowered)
    except ValueError:
        ratio = math.nan
    if ratio == -1:
        return -1
    if not 0 < ratio <= 1:
        raise ValueError(
            f"{text!r} is not a trim_ratio: use 'auto' (or -1), 'off' (or none) or a keep ratio in (0, 1] such as "
            "0.25."
        )
    return ratio


def check_trim_iqr_multiplier(multiplier) -> None:
    """Raise a `ValueError` unless `multiplier` is a finite real number `>= 0`."""
    is_real = isinstance(multiplier, numbers.Real) and not isinstance(multiplier, bool)
    if not is_real or not math.isfinite(multiplier) or multiplier < 0:
        raise ValueError(f"`trim_iqr_multiplier` must be a finite number >= 0 (1.5 in the paper), got {multiplier!r}.")


class LlavaTrimCLIPTextConfig(CLIPTextConfig):
    """[`~transformers.CLIPTextConfig`] of the CLIP text tower TRIM scores with, read from its own key.

    `CLIPTextConfig.from_pretrained` reads the `text_config` key of a composite config, which here holds the Llama
    decoder; this class reads `clip_text_config`, so the sub-config round-trips on its own.
    """

    base_config_key = "clip_text_config"


def plain_numbers(*names: str):
    """Class decorator (placed above `@strict`): store the fields `names` as Python `int` / `float` when given another
    real number type (`numpy.float32(0.25)`, ...), so that they pass the type checks and `config.json` stays JSON."""

    def decorate(cls):
        strict_setattr = cls.__setattr__

        def __setattr__(self, name, value):
            is_other_real = isinstance(value, numbers.Real) and type(value) not in (bool, int, float)
            if name in names and is_other_real:
                value = int(value) if isinstance(value, numbers.Integral) else float(value)
            strict_setattr(self, name, value)

        cls.__setattr__ = __setattr__
        return cls

    return decorate


PLAIN_NUMBER_FIELDS = ("trim_ratio", "trim_iqr_multiplier", "projection_dim")


@plain_numbers(*PLAIN_NUMBER_FIELDS)
@strict
class LlavaTrimConfig(LlavaConfig):
    r"""
    Configuration of [`LlavaTrimForConditionalGeneration`]: a LLaVA-1.5 model (CLIP vision tower, two-layer MLP
    projector, Llama decoder) plus the CLIP text tower and CLIP's two projections that TRIM uses to score image
    patches against the question. All LLaVA fields keep the names of [`~transformers.LlavaConfig`].

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower (ViT-L/14 at 336 px by default: 576 patch tokens).
        text_config (`dict` or `LlamaConfig`, *optional*):
            The language model.
        clip_text_config (`dict` or `CLIPTextConfig`, *optional*):
            The CLIP text tower that embeds the question for TRIM's scores.
        projection_dim (`int`, *optional*, defaults to 768):
            Width of CLIP's joint image-text space (`visual_projection` and `text_projection` outputs).
        trim_ratio (`float`, *optional*, defaults to -1):
            `-1`: keep the IQR outliers of the patch scores (the paper's automatic mode); a float in `(0, 1]`: keep
            that fraction of the patches (`floor(N * trim_ratio)` tokens); `None`: no reduction (plain LLaVA-1.5).
        trim_iqr_multiplier (`float`, *optional*, defaults to 1.5):
            The `k` of the outlier rule `p_i > Q3 + k * (Q3 - Q1)`; must be `>= 0`.
        trim_scope (`str`, *optional*, defaults to `"image"`):
            Where the automatic threshold is computed: `"image"` (one threshold per image, batch-invariant) or
            `"batch"` (one threshold over the whole batch and the same count in every image, as the reference code).

    Example:

    ```python
    >>> from configuration_llava_trim import LlavaTrimConfig
    >>> config = LlavaTrimConfig(trim_ratio=0.25)
    >>> config.image_seq_length, config.trim_ratio
    (576, 0.25)
    ```
    """

    model_type = "llava_trim"
    _auto_class = "AutoConfig"

    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        "clip_text_config": SubConfigSpec(
            config_class=LlavaTrimCLIPTextConfig,
            init_kwargs={
                "vocab_size": 49408,
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "max_position_embeddings": 77,
                "projection_dim": 768,
            },
        ),
    }

    clip_text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 768
    # validated on construction, on `from_pretrained(..., trim_ratio=...)` and on every assignment
    trim_ratio: float | int | None = validated_field(check_trim_ratio, default=-1)
    trim_iqr_multiplier: float | int = validated_field(check_trim_iqr_multiplier, default=1.5)
    trim_scope: Literal["image", "batch"] = "image"

    def __post_init__(self, **kwargs):
        if isinstance(self.clip_text_config, CLIPTextConfig):  # read under its own key once saved (see the class)
            self.clip_text_config = LlavaTrimCLIPTextConfig(**self.clip_text_config.to_dict())
        super().__post_init__(**kwargs)

    def validate_trim(self):
        """Part of `@strict` validation: TRIM's fields must name a mode that exists."""
        check_trim_ratio(self.trim_ratio)
        check_trim_iqr_multiplier(self.trim_iqr_multiplier)
        if self.trim_scope not in ("image", "batch"):
            raise ValueError(f"`trim_scope` must be 'image' or 'batch', got {self.trim_scope!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT (llava-v1.6, anyres): the LLaVA-1.5 configuration plus the high-resolution grid (docs/trim.md section 8)
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_IMAGE_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@plain_numbers(*PLAIN_NUMBER_FIELDS)  # `@strict` wraps each class's own assignment: convert again above it
@strict
class LlavaNextTrimConfig(LlavaTrimConfig):
    r"""
    Configuration of [`LlavaNextTrimForConditionalGeneration`]: a LLaVA-NeXT (llava-v1.6) model with TRIM. The fields
    are those of [`LlavaTrimConfig`] plus `image_grid_pinpoints` of [`~transformers.LlavaNextConfig`];
    `image_seq_length` counts the patches of one 336 px crop.

    Args:
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            The `(height, width)` resolutions an image may be tiled at; defaults to LLaVA-NeXT's five (up to 672x672,
            336x1008 and 1008x336).
        kwargs: see [`LlavaTrimConfig`]. `trim_scope` must be `"image"` (images differ in their number of tokens).
    """

    model_type = "llava_next_trim"

    image_grid_pinpoints: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(pinpoint) for pinpoint in DEFAULT_IMAGE_GRID_PINPOINTS]

    def validate_trim(self):
        """TRIM's fields as for LLaVA-1.5, except the batch-wide threshold, which has no meaning here."""
        super().validate_trim()
        if self.trim_scope != "image":
            raise ValueError(
                "`trim_scope` must be 'image' for LLaVA-NeXT: its images have different numbers of tokens, so one "
                "threshold over the batch cannot be spread evenly (docs/trim.md section 8)."
            )


__all__ = ["LlavaNextTrimConfig", "LlavaTrimCLIPTextConfig", "LlavaTrimConfig"]
