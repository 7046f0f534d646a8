# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""
The conversion plan: everything decided before a byte is written, in small steps run by `plan_conversion`:
scan the tensors of both sources, size the vocabulary, build the config, map the tensors, check they are complete
and fit.
"""

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..configuration_llava_trim import LlavaNextTrimConfig, LlavaTrimConfig
from . import ConversionError
from .layouts import CLIP_RULES, EMBED_KEY, LM_HEAD_KEY, Rules, map_key
from .sources import IMAGE_TOKEN, PAD_TOKEN, ClipSource, LlavaSource, load_llama_tokenizer
from .weights import SourceTensor, scan_tensors

logger = logging.getLogger("llava_trim.convert_checkpoint")


@dataclass
class PlannedTensor:
    """One output tensor: where it comes from and its final shape (embedding rows grow for the added tokens)."""

    target: str
    file: Path
    source_name: str
    source_shape: tuple[int, ...]
    source_dtype: torch.dtype
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype: the conversion's, or float32 for the modules the model keeps in float32
    compare_with: tuple[Path, str] | None = None  # the `--clip` tensor an embedded CLIP tensor is checked against

    @property
    def grows_rows(self) -> bool:
        return self.shape != self.source_shape


class Vocabulary(NamedTuple):
    """The output vocabulary: the source's rows, the added `<image>` / `<pad>` ids and the ids never to generate."""

    source_size: int
    size: int
    image_token_id: int
    pad_token_id: int
    added_ids: list[int]
    suppressed_ids: list[int]  # every id that is not a text token of the source: the added tokens, padding rows


@dataclass
class ConversionPlan:
    """Everything decided before any weight is written."""

    config: LlavaTrimConfig
    tensors: list[PlannedTensor]
    dtype: torch.dtype
    source_dtype: torch.dtype
    tokenizer: object
    vocabulary: Vocabulary
    llava: LlavaSource
    clip: ClipSource

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in self.tensors)


def plan_conversion(
    llava: LlavaSource, clip: ClipSource, trim_ratio: float | None, dtype: torch.dtype | None = None
) -> ConversionPlan:
    """
    Read the tokenizer and tensor metadata of both sources, build the output config and map every tensor.

    Nothing is loaded but shapes. Tensors of the LLaVA source win; `--clip` fills in what it lacks (for an original
    LLaVA: the vision tower and all of TRIM's parts; for llava-hf: TRIM's parts). CLIP tensors the source embeds too
    are compared while writing.

    Raises:
        `ConversionError`: unknown tensor names (listed), missing tensors, shapes that do not fit CLIP or the config.
    """
    llava_tensors = scan_tensors(llava.weights)
    clip_tensors = scan_tensors(clip.weights)
    tokenizer = load_llama_tokenizer(llava.folder, next(iter(llava.names)))
    vocabulary = plan_vocabulary(tokenizer, llava_tensors, llava)
    source_dtype = prevailing_dtype(llava_tensors, llava.layout.rules)
    dtype = dtype or source_dtype
    config = build_config(llava, clip, vocabulary, trim_ratio, dtype)
    expected, keep_in_fp32 = meta_model_weights(config)

    tensors = map_tensors(
        llava_tensors,
        llava.layout.rules,
        expected,
        dtype,
        keep_in_fp32,
        origin=", ".join(map(str, llava.folders)),
        hint="This is not a LLaVA-1.5 or LLaVA-NeXT checkpoint in a supported layout (original, TRIM or llava-hf); "
        "nothing was converted.",
    )
    from_clip = map_tensors(
        clip_tensors,
        CLIP_RULES,
        expected,
        dtype,
        keep_in_fp32,
        origin=f"The CLIP checkpoint {clip.folder}",
        hint="Pass a transformers CLIPModel checkpoint (--clip).",
    )
    for target, planned in from_clip.items():  # the source's own tensors win; an embedded CLIP is compared
        if target in tensors:
            tensors[target].compare_with = (planned.file, planned.source_name)
        else:
            tensors[target] = planned
    check_complete(tensors, expected)
    check_shapes(tensors, llava, clip)

    # write in source order (LLaVA files, then CLIP files) so shards stream one source file at a time
    order = {path: i for i, path in enumerate([*llava.weights.paths, *clip.weights.paths])}
    ordered = sorted(tensors.values(), key=lambda t: order[t.file])
    plan = ConversionPlan(config, ordered, dtype, source_dtype, tokenizer, vocabulary, llava, clip)
    _log_plan(plan)
    return plan


def plan_vocabulary(tokenizer, tensors: list[SourceTensor], llava: LlavaSource) -> Vocabulary:
    """The output vocabulary: the source's embedding rows, grown for the tokens the tokenizer added."""
    image_token_id, pad_token_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN])
    embeddings = [t for t in tensors if map_key(t.name, llava.layout.rules) == EMBED_KEY]
    if not embeddings:
        raise ConversionError(
            f"{', '.join(map(str, llava.folders))} has no token embedding matrix ({EMBED_KEY} or its source names)."
        )
    source_size = embeddings[0].shape[0]
    size = max(source_size, len(tokenizer))
    added = list(range(source_size, len(tokenizer)))
    suppressed = sorted({image_token_id, pad_token_id, *range(len(tokenizer), size)} | set(added))
    return Vocabulary(source_size, size, image_token_id, pad_token_id, added, suppressed)


def prevailing_dtype(tensors: list[SourceTensor], rules: Rules) -> torch.dtype:
    """The floating dtype holding most of the source's mapped parameters (float32 when there are none)."""
    counts = Counter()
    for tensor in tensors:
        if tensor.dtype.is_floating_point and map_key(tensor.name, rules):
            counts[tensor.dtype] += math.prod(tensor.shape)
    return counts.most_common(1)[0][0] if counts else torch.float32


def build_config(
    llava: LlavaSource, clip: ClipSource, vocabulary: Vocabulary, trim_ratio: float | None, dtype: torch.dtype
) -> LlavaTrimConfig:
    """The output `LlavaTrimConfig`: the layout's vision and text configs, CLIP's text tower, the added tokens."""
    clip_vision = clip.config.vision_config
    vision_config, feature_layer = llava.layout.vision_config(llava.config, clip_vision, llava.folder, clip.folder)
    if not isinstance(feature_layer, int) or not -clip_vision.num_hidden_layers <= feature_layer <= (
        clip_vision.num_hidden_layers
    ):
        raise ConversionError(
            f"The vision feature layer {feature_layer!r} does not exist in a {clip_vision.num_hidden_layers}-layer "
            "CLIP."
        )
    text_config = llava.layout.text_config(llava.llm_config)
    for key in ("architectures", "torch_dtype", "dtype", "_name_or_path", "transformers_version"):
        text_config.pop(key, None)
    text_config.update(
        model_type=text_config.get("model_type", "llama"),
        vocab_size=vocabulary.size,
        pad_token_id=vocabulary.pad_token_id,
        tie_word_embeddings=False,
    )
    next_settings = llava.layout.next_settings(llava.config)
    config_class = LlavaNextTrimConfig if next_settings else LlavaTrimConfig
    extra = {"image_grid_pinpoints": next_settings["image_grid_pinpoints"]} if next_settings else {}
    config = config_class(
        vision_config=vision_config,
        text_config=text_config,
        clip_text_config=clip.config.text_config.to_dict(),
        projection_dim=clip.config.projection_dim,
        image_token_index=vocabulary.image_token_id,
        image_seq_length=(clip_vision.image_size // clip_vision.patch_size) ** 2,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        trim_ratio=trim_ratio,
        **extra,
    )
    config.dtype = dtype
    config.architectures = [config_class.__name__.removesuffix("Config") + "ForConditionalGeneration"]
    return config


def meta_model_weights(config: LlavaTrimConfig) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """
    Names and shapes of the model's weights, from a model built on the meta device (no memory), and the names of the
    modules it keeps in float32 whatever its dtype (`_keep_in_fp32_modules`: TRIM's projections).
    """
    from ..modeling_llava_trim import LlavaNextTrimForConditionalGeneration, LlavaTrimForConditionalGeneration

    model_class = (
        LlavaNextTrimForConditionalGeneration
        if isinstance(config, LlavaNextTrimConfig)
        else LlavaTrimForConditionalGeneration
    )
    with torch.device("meta"):
        model = model_class(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    return shapes, list(getattr(model, "_keep_in_fp32_modules", None) or [])


def output_dtype(target: str, dtype: torch.dtype, keep_in_fp32: list[str]) -> torch.dtype:
    """`dtype`, except float32 for weights of modules the model keeps in float32 (never a narrowing cast)."""
    if dtype.itemsize < 4 and any(module in target.split(".") for module in keep_in_fp32):
        return torch.float32
    return dtype


def map_tensors(
    tensors: list[SourceTensor],
    rules: Rules,
    expected: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    keep_in_fp32: list[str],
    origin: str,
    hint: str,
) -> dict[str, PlannedTensor]:
    """
    The planned output tensor of every source tensor, by target name (dropped buffers skipped).

    Raises:
        `ConversionError`: listing the names no rule maps to a weight of the model, or two tensors for one weight.
    """
    planned: dict[str, PlannedTensor] = {}
    unknown = []
    targets = set(expected)
    for tensor in tensors:
        target = map_key(tensor.name, rules, targets)
        if target is None:
            continue
        if target not in expected:
            unknown.append(tensor.name)
            continue
        if target in planned:
            raise ConversionError(
                f"{origin} has two tensors for {target}: {planned[target].source_name}, {tensor.name}."
            )
        planned[target] = PlannedTensor(
            target,
            tensor.file,
            tensor.name,
            tensor.shape,
            tensor.dtype,
            expected[target],
            output_dtype(target, dtype, keep_in_fp32),
        )
    if unknown:
        raise ConversionError(f"{origin} has {len(unknown)} tensor(s) with unknown names: {listing(unknown)}. {hint}")
    return planned


def check_complete(tensors: dict[str, PlannedTensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse sources that lack weights the model needs, listing them."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ConversionError(
            f"The sources lack {len(missing)} tensor(s) the model needs: {listing(missing)}. Check that the LLaVA "
            "source is complete and that --clip is a full CLIP model (vision and text towers)."
        )


def check_shapes(tensors: dict[str, PlannedTensor], llava: LlavaSource, clip: ClipSource) -> None:
    """Every source shape equals the model's, except the embeddings and LM head, which may only gain rows."""
    mismatched = []
    for planned in tensors.values():
        grows = planned.target in (EMBED_KEY, LM_HEAD_KEY)
        fits = planned.source_shape == planned.shape or (
            grows and planned.source_shape[1:] == planned.shape[1:] and planned.source_shape[0] <= planned.shape[0]
        )
        if not fits:
            mismatched.append(
                f"{planned.source_name} {list(planned.source_shape)} -> {planned.target} {list(planned.shape)}"
            )
    if mismatched:
        raise ConversionError(
            f"Shape mismatch with CLIP or the config: {len(mismatched)} tensor(s) do not fit the model built from "
            f"{llava.folder}/config.json and {clip.folder}: {listing(mismatched, 5)}. Pass the CLIP the model was "
            "trained with (--clip) and check mm_hidden_size."
        )


def listing(names: list[str], limit: int = 20) -> str:
    """`names` joined by commas, at most `limit` of them."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _log_plan(plan: ConversionPlan) -> None:
    from_clip = sum(t.file in plan.clip.weights.paths for t in plan.tensors)
    vocabulary = plan.vocabulary
    logger.info(
        "Plan: %d tensors (%d from %s, %d from %s), %s -> %s, vocabulary %d -> %d (%s = %d, %s = %d), trim_ratio=%s",
        len(plan.tensors),
        len(plan.tensors) - from_clip,
        ", ".join(map(str, plan.llava.folders)),
        from_clip,
        plan.clip.folder,
        str(plan.source_dtype).removeprefix("torch."),
        str(plan.dtype).removeprefix("torch."),
        vocabulary.source_size,
        vocabulary.size,
        IMAGE_TOKEN,
        vocabulary.image_token_id,
        PAD_TOKEN,
        vocabulary.pad_token_id,
        plan.config.trim_ratio,
    )
