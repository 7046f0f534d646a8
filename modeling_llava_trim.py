# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""LLaVA-1.5 with TRIM: CLIP-guided image token reduction (Token Reduction using CLIP Metric, arXiv 2409.10994).

Reading order: the TRIM selection as pure functions (`trim_keep_mask`, `trim_image_tokens`), the sequence compaction
(`compact_image_runs`), then the modules. The LLaVA parts (CLIP vision tower, projector, Llama decoder) are the
native transformers Llava building blocks with their native weight names; TRIM adds `model.trim_scorer` (the CLIP
text tower and CLIP's two projections). The last section adds LLaVA-NeXT (llava-v1.6, anyres), which runs the same
TRIM step on the image features of an overview and tiles (docs/trim.md section 8).
"""

import copy
import math
import os
import shutil
from dataclasses import dataclass

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

import torch
from torch import nn
from transformers import (
    AutoModel,
    CLIPTextModel,
    GenerationConfig,
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextModel,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, StaticLayer
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_llava_trim import LlavaNextTrimConfig, LlavaTrimConfig, check_trim_iqr_multiplier, check_trim_ratio

logger = logging.get_logger(__name__)


class _FromConfig:
    """Default of the per-call `trim_ratio` argument: use `config.trim_ratio` (`None` already means TRIM off)."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG = _FromConfig()


# ---------------------------------------------------------------------------------------------------------------------
# TRIM selection (docs/trim.md section 2)
# ---------------------------------------------------------------------------------------------------------------------


def trim_keep_mask(
    probs: torch.Tensor,
    trim_ratio: float,
    iqr_multiplier: float = 1.5,
    scope: str = "image",
) -> torch.Tensor:
    r"""Which image tokens TRIM keeps, given their probabilities `p = softmax(-s)`.

    Automatic mode (`trim_ratio = -1`), with Q1 and Q3 the 25th and 75th percentiles of `p` (linear interpolation):

        K = { i : p_i > Q3 + k (Q3 - Q1) },   k = `iqr_multiplier`

    computed per image (`scope="image"`), or with one threshold over the whole batch whose outlier count `n` is then
    spread evenly, keeping the `floor(n / num_images)` highest-`p` tokens of every image (`scope="batch"`, the
    reference code's behaviour).

    Fixed mode (`0 < trim_ratio <= 1`): K = the `floor(N * trim_ratio)` tokens with the largest `p`.

    Args:
        probs (`torch.Tensor` of shape `(num_images, N)`): the per-image softmax of the negated CLIP scores.
        trim_ratio (`float`): `-1` for automatic, else the fraction of tokens to keep.
        iqr_multiplier (`float`): the `k` of the outlier rule.
        scope (`str`): `"image"` or `"batch"`, for the automatic mode.

    Returns:
        `torch.BoolTensor` of shape `(num_images, N)`: `True` where the token is kept.
    """
    num_images, num_patches = probs.shape
    if trim_ratio == -1:
        quartiles = torch.tensor([0.25, 0.75], dtype=probs.dtype, device=probs.device)
        if scope == "image":
            q1, q3 = torch.quantile(probs, quartiles, dim=-1, keepdim=True)  # (num_images, 1) each
            return probs > q3 + iqr_multiplier * (q3 - q1)
        q1, q3 = torch.quantile(probs.flatten(), quartiles)
        num_keep = (probs > q3 + iqr_multiplier * (q3 - q1)).sum() // num_images  # 0-dim tensor: no host sync
    else:
        num_keep = math.floor(num_patches * trim_ratio)
    # rank 0 = largest probability; ties go to the lower patch index
    order = probs.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(num_patches, device=probs.device).expand_as(order)
    )
    return ranks < num_keep


def trim_image_tokens(
    image_features: torch.Tensor,
    probs: torch.Tensor,
    trim_ratio: float,
    iqr_multiplier: float = 1.5,
    scope: str = "image",
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""TRIM on a batch of images: scores -> keep mask -> kept tokens + one aggregate token per image.

    For each image, the tokens handed to the projector are `V_i` for `i` in `K` (ascending patch order) followed by

        v_agg = mean_{j not in K} V_j     (a zero vector when nothing was pruned)

    so an image costs `|K| + 1` positions instead of `N`.

    Args:
        image_features (`torch.Tensor` of shape `(num_images, N, Dv)`): the vision features `V` LLaVA projects.
        probs (`torch.Tensor` of shape `(num_images, N)`): `softmax(-s)` of the CLIP scores `s_i = P_i . t`.
        trim_ratio, iqr_multiplier, scope: see [`trim_keep_mask`].

    Returns:
        `(tokens, keep)`: `tokens` of shape `(sum_i (|K_i| + 1), Dv)`, image after image; `keep` the
        `(num_images, N)` boolean mask.
    """
    keep = trim_keep_mask(probs, trim_ratio, iqr_multiplier, scope)  # (num_images, N)
    accumulate = torch.promote_types(image_features.dtype, torch.float32)  # at least float32 for the mean
    pruned = (~keep).unsqueeze(-1).to(accumulate)  # (num_images, N, 1)
    aggregate = (image_features.to(accumulate) * pruned).sum(dim=1) / pruned.sum(dim=1).clamp(
        min=1
    )  # (num_images, Dv)
    # (num_images, N + 1, Dv) with the aggregate appended, and the matching mask: boolean indexing then packs every
    # image's kept tokens in patch order, followed by its aggregate token
    extended = torch.cat([image_features, aggregate.to(image_features.dtype).unsqueeze(1)], dim=1)
    extended_keep = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1)
    return extended[extended_keep], keep


# ---------------------------------------------------------------------------------------------------------------------
# Sequence compaction (docs/trim.md section 5)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CompactedSequence:
    """A batch after each run of image placeholders was shortened to the number of tokens its image keeps."""

    input_ids: torch.LongTensor  # (batch, new_length)
    attention_mask: torch.LongTensor  # (batch, new_length)
    position_ids: torch.LongTensor | None  # (batch, new_length), contiguous over the attended positions
    labels: torch.LongTensor | None  # (batch, new_length), -100 on padding and image positions


def compact_image_runs(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    tokens_per_image: torch.LongTensor,
    image_token_id: int,
    image_seq_length: int | torch.LongTensor,
    pad_token_id: int = 0,
    labels: torch.LongTensor | None = None,
) -> CompactedSequence:
    """Resize every run of `image_seq_length` placeholders to `tokens_per_image[image]` placeholders.

    Images are numbered in order of appearance over the flattened batch (row after row), like `pixel_values`. A run
    usually shrinks (`|K| + 1 < 576`) and grows by one when every patch is kept (576 tokens plus the aggregate).
    Padding is dropped and the batch re-padded on the side it came padded from (left when it had no padding).

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, length)`): `image_seq_length` placeholders per image.
        attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*): 1 on real tokens, 0 on padding.
        tokens_per_image (`torch.LongTensor` of shape `(num_images,)`): positions each image takes, at most
            `image_seq_length + 1`.
        image_token_id (`int`): the placeholder token id.
        image_seq_length (`int` or `torch.LongTensor` of shape `(num_images,)`): placeholders per image in
            `input_ids` (one count per image for LLaVA-NeXT, whose images differ).
        pad_token_id (`int`): filler for new padding positions.
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*): compacted alongside, -100 on images.
    """
    batch_size, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    is_image = input_ids == image_token_id  # (batch, length)
    # index of every placeholder among all placeholders of the batch, row after row
    placeholder_rank = is_image.flatten().cumsum(0).view(batch_size, length) - 1
    run_lengths = torch.as_tensor(image_seq_length, device=input_ids.device).expand(tokens_per_image.shape[0])
    run_ends = torch.cat([run_lengths.cumsum(0), run_lengths.new_full((1,), input_ids.numel())])  # spare last run
    image_index = torch.searchsorted(run_ends, placeholder_rank, right=True).clamp(0, tokens_per_image.shape[0])
    run_length = torch.cat([run_lengths, run_lengths.new_ones(1)])[image_index]
    index_in_run = placeholder_rank - (run_ends[image_index] - run_length)
    # how many output positions each input token becomes: text 1, padding 0, the j-th placeholder of a run 1 while
    # j < tokens_per_image, and the run's last placeholder also carries any excess (tokens_per_image - S + 1);
    # the spare last entry only serves text positions past the last image
    run_target = torch.cat([tokens_per_image, tokens_per_image.new_zeros(1)])[image_index]
    placeholder_copies = torch.where(
        index_in_run == run_length - 1,
        (run_target - run_length + 1).clamp(min=0),
        (index_in_run < run_target).long(),
    )
    copies = torch.where(is_image, placeholder_copies, torch.ones_like(placeholder_copies))
    copies = copies * attention_mask.bool()  # (batch, length)

    new_lengths = copies.sum(dim=1)  # (batch,)
    # every size the compaction needs in one host transfer (a single device sync on GPU)
    new_length, total, padded_left, padded_right = torch.stack(
        [new_lengths.max(), new_lengths.sum(), (attention_mask[:, 0] == 0).any(), (attention_mask[:, -1] == 0).any()]
    ).tolist()
    pad_left = bool(padded_left) or not padded_right
    flat_copies = copies.flatten()
    rows = torch.arange(batch_size, device=input_ids.device).repeat_interleave(new_lengths, output_size=total)
    row_starts = new_lengths.cumsum(0) - new_lengths
    destination = torch.arange(total, device=input_ids.device) - row_starts[rows]
    if pad_left:
        destination = destination + (new_length - new_lengths)[rows]

    new_input_ids = input_ids.new_full((batch_size, new_length), pad_token_id)
    new_input_ids[rows, destination] = input_ids.flatten().repeat_interleave(flat_copies, output_size=total)
    new_attention_mask = attention_mask.new_zeros((batch_size, new_length))
    new_attention_mask[rows, destination] = 1
    position_ids = (new_attention_mask.long().cumsum(dim=1) - 1).masked_fill(new_attention_mask == 0, 0)
    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((batch_size, new_length), -100)
        new_labels[rows, destination] = labels.flatten().repeat_interleave(flat_copies, output_size=total)
        new_labels = new_labels.masked_fill(new_input_ids == image_token_id, -100)
    return CompactedSequence(new_input_ids, new_attention_mask, position_ids, new_labels)


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrimSelection:
    """What TRIM kept for each image of a call.

    Attributes:
        keep_mask (`torch.BoolTensor` of shape `(num_images, N)`): `True` for kept patches (all `True` when off).
        probs (`torch.FloatTensor` of shape `(num_images, N)`, *optional*): `softmax(-s)`, float32; `None` when off.
        trim_ratio (`float`, *optional*): the mode used: `-1` automatic, a fraction, or `None` (off).
        num_newlines (`torch.LongTensor` of shape `(num_images,)`, *optional*): LLaVA-NeXT only, the `image_newline`
            tokens each image keeps (docs/trim.md section 8); its `keep_mask` rows are padded with `False`.
        num_candidates (`torch.LongTensor` of shape `(num_images,)`, *optional*): LLaVA-NeXT only, each image's
            candidate tokens (the unpadded part of its `keep_mask` row).
    """

    keep_mask: torch.Tensor
    probs: torch.Tensor | None
    trim_ratio: float | None
    num_newlines: torch.LongTensor | None = None
    num_candidates: torch.LongTensor | None = None

    @property
    def num_patches(self) -> int:
        """Patch tokens per image before reduction (576 for CLIP ViT-L/14 at 336 px); for LLaVA-NeXT the width of
        `keep_mask`, the largest image's candidates (each image's own count: `candidates_per_image`)."""
        return self.keep_mask.shape[1]

    @property
    def candidates_per_image(self) -> torch.LongTensor:
        """The tokens TRIM chose from in each image, shape `(num_images,)`: `N`, or LLaVA-NeXT's candidates."""
        if self.num_candidates is not None:
            return self.num_candidates
        return torch.full((self.keep_mask.shape[0],), self.keep_mask.shape[1], device=self.keep_mask.device)

    @property
    def num_kept(self) -> torch.LongTensor:
        """`|K|` per image, shape `(num_images,)`; the aggregate token is not counted."""
        return self.keep_mask.sum(dim=1)

    @property
    def kept_indices(self) -> list[torch.LongTensor]:
        """Kept patch indices of each image, ascending."""
        return [row.nonzero().squeeze(1) for row in self.keep_mask]

    @property
    def tokens_per_image(self) -> torch.LongTensor:
        """LLM positions each image occupies: `|K| + 1` with TRIM on, `N` when off (plus the kept newlines for
        LLaVA-NeXT)."""
        newlines = 0 if self.num_newlines is None else self.num_newlines.to(self.keep_mask.device)
        return self.num_kept + newlines + (0 if self.trim_ratio is None else 1)


@dataclass
class LlavaTrimImageOutput(BaseModelOutputWithPooling):
    """Native Llava's image features output (`get_image_features`), plus what TRIM kept.

    Attributes:
        last_hidden_state (`torch.FloatTensor` of shape `(num_images, 1 + N, Dv)`): the vision tower's last layer,
            untrimmed, as native.
        pooler_output (`list[torch.FloatTensor]`): one tensor of shape `(tokens_per_image[i], hidden)` per image: the
            projected kept tokens in patch order, then the aggregate token (all `N` tokens, as native, when TRIM is
            off).
        hidden_states, attentions (`tuple[torch.FloatTensor]`, *optional*): the vision tower's, untrimmed, as native.
        trim_selection ([`TrimSelection`]): what was kept (every patch, `trim_ratio=None`, when TRIM is off).
    """

    trim_selection: TrimSelection | None = None


@dataclass
class TrimmedInputs:
    """A prompt after TRIM: the compacted sequence and the image features that fill its placeholders."""

    sequence: CompactedSequence
    image_outputs: LlavaTrimImageOutput

    @property
    def selection(self) -> TrimSelection:
        return self.image_outputs.trim_selection


@dataclass
class LlavaTrimModelOutputWithPast(LlavaModelOutputWithPast):
    """[`LlavaModelOutputWithPast`] plus the TRIM selection and the compacted sequence the LLM saw.

    Batch-invariant up to padding: with TRIM on, images keep different numbers of tokens, so compacted rows have
    different lengths and a row in a batch is re-padded (`compacted_attention_mask` is 0 there) where the same row
    alone is not; on its attended positions the row gives what it gives alone.

    Attributes:
        trim_selection ([`TrimSelection`], *optional*): per-image keep masks; `None` when the call had no image.
        compacted_input_ids, compacted_attention_mask, compacted_labels (`torch.LongTensor`, *optional*): the
            sequence the language model ran on, aligned with `last_hidden_state`.
    """

    trim_selection: TrimSelection | None = None
    compacted_input_ids: torch.LongTensor | None = None
    compacted_attention_mask: torch.LongTensor | None = None
    compacted_labels: torch.LongTensor | None = None


@dataclass
class LlavaTrimCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    """[`LlavaCausalLMOutputWithPast`] plus the TRIM selection and the compacted sequence (`logits` follow it).

    Attributes:
        trim_selection ([`TrimSelection`], *optional*): per-image keep masks; `None` when the call had no image.
        compacted_input_ids, compacted_attention_mask, compacted_labels (`torch.LongTensor`, *optional*): the
            sequence the language model ran on, aligned with `logits`.
    """

    trim_selection: TrimSelection | None = None
    compacted_input_ids: torch.LongTensor | None = None
    compacted_attention_mask: torch.LongTensor | None = None
    compacted_labels: torch.LongTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------


class Float32Linear(nn.Linear):
    """An `nn.Linear` whose float32 weights stay float32 when the model is cast (`.to(dtype)`, `.half()`, ...).

    Moves between devices apply as usual. TRIM's two projections use it so that scores do not drift with the dtype.
    """

    def _apply(self, fn, recurse=True):
        before = self.weight.detach()  # keeps the float32 values whether the cast replaces or swaps the parameter
        super()._apply(fn, recurse)
        if before.dtype == torch.float32 and self.weight.dtype != torch.float32 and before.device.type != "meta":
            self.weight.data = before.to(self.weight.device)
        return self


class LlavaTrimScorer(nn.Module):
    """CLIP's text tower and projections: the similarity of every image patch to the question.

    Weights as in CLIP: `text_model` is CLIP's text transformer, `text_projection` and `visual_projection` map text and
    vision features into the joint space. The caller applies the vision tower's own `post_layernorm` (not duplicated)
    and passes tensors only, so that device hooks (accelerate offload, multi-GPU maps) see no module arguments.
    """

    def __init__(self, config: LlavaTrimConfig):
        super().__init__()
        self.text_model = CLIPTextModel._from_config(config.clip_text_config)
        self.text_projection = Float32Linear(config.clip_text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = Float32Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)

    def forward(
        self,
        patch_features: torch.Tensor,
        trim_input_ids: torch.LongTensor,
        trim_attention_mask: torch.Tensor | None = None,
        return_scores: bool = False,
    ) -> torch.Tensor:
        """Return `p = softmax(-s)` over the patches of each image, float32 of shape `(num_images, N)`.

        `s_i = P_i . t` with `P = visual_projection(patch_features)`, `patch_features = post_layernorm(V)` of shape
        `(num_images, N, Dv)`, and `t` the CLIP text embedding of the image's question, both unnormalised. The
        projections and the dot product run in float32, also under mixed precision (autocast is switched off here).
        With `return_scores=True`, `s` itself (for LLaVA-NeXT, whose softmax spans several crops).
        """
        text_outputs = self.text_model(input_ids=trim_input_ids, attention_mask=trim_attention_mask)
        with torch.autocast(device_type=patch_features.device.type, enabled=False):
            projection_dtype = self.text_projection.weight.dtype
            text_embeds = self.text_projection(text_outputs.pooler_output.to(projection_dtype)).float()  # (images, D)
            projection_dtype = self.visual_projection.weight.dtype
            patch_embeds = self.visual_projection(patch_features.to(projection_dtype)).float()  # (images, N, D)
            scores = torch.einsum("ind,id->in", patch_embeds, text_embeds.to(patch_embeds.device))  # (images, N)
        return scores if return_scores else torch.softmax(-scores, dim=-1)


class LlavaTrimPreTrainedModel(LlavaPreTrainedModel):
    config: LlavaTrimConfig
    config_class = LlavaTrimConfig
    _auto_class = "AutoModel"
    # TRIM's scores must not drift with the model dtype or quantisation: `_keep_in_fp32_modules` covers float16 loads
    # and keeps quantisers away from the projections, `_keep_in_fp32_modules_strict` covers bfloat16 loads
    _keep_in_fp32_modules = ["text_projection", "visual_projection"]
    _keep_in_fp32_modules_strict = ["text_projection", "visual_projection"]

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self):
        """[`~PreTrainedModel.initialize_weights`], dispatching every sub-model (CLIP towers, Llama) to its own
        `_init_weights` as for a model of the library.

        transformers skips, in custom code, the modules without parameters of their own (CLIP's attention and MLP
        blocks), whose `_init_weights` sets their children's weights: CLIP's weights would then keep the generic
        initialisation. Every `_init_weights` here uses transformers' guarded init functions, so loaded weights are
        never overwritten.
        """

        def apply(module: nn.Module, fn) -> None:
            for child in module.children():
                apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
            fn(module, False)

        apply(self, self._initialize_weights)

    def _init_weights(self, module):
        """Native Llava's initialisation, and TRIM's two projections initialised as `CLIPModel` initialises them."""
        super()._init_weights(module)
        if isinstance(module, LlavaTrimScorer):
            factor = self.config.clip_text_config.initializer_factor
            init.normal_(module.text_projection.weight, std=self.config.clip_text_config.hidden_size**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=self.config.vision_config.hidden_size**-0.5 * factor)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """[`~PreTrainedModel.save_pretrained`] that checks the config first and leaves no half-written new folder."""
        self.config.validate()
        existed = os.path.exists(save_directory)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        except BaseException:
            if not existed:
                shutil.rmtree(save_directory, ignore_errors=True)
            raise


class LlavaTrimModel(LlavaTrimPreTrainedModel, LlavaModel):
    """The native Llava model (vision tower, projector, language model) plus `trim_scorer`; no LM head.

    With `pixel_values`, TRIM selects each image's tokens, the prompt is compacted and the native Llava forward runs
    on the compacted ids with the trimmed image features (`mm_encoder_outputs`).
    """

    def __init__(self, config: LlavaTrimConfig):
        LlavaTrimPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.trim_scorer = LlavaTrimScorer(config)
        self.post_init()

    def get_vision_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> torch.Tensor:
        """The features `V` LLaVA projects: hidden states of `vision_feature_layer`, CLS dropped by default; with a
        list of layers, their hidden states concatenated along the last dimension, as native Llava.

        Returns a tensor of shape `(num_images, N, Dv * num_layers)`.
        """
        return self._vision_features(pixel_values, vision_feature_layer, vision_feature_select_strategy)[1]

    def _vision_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor, torch.Tensor]:
        """The vision tower's outputs, the features LLaVA projects `(num_images, N, Dv * num_layers)`, and the features
        TRIM scores `(num_images, N, Dv)`: those of the last layer of `vision_feature_layer` (docs/trim.md section 2).
        """
        self._check_pixel_values(pixel_values)
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        layers = [layer] if isinstance(layer, int) else list(layer)
        width, projector_width = self.config.vision_config.hidden_size, self.multi_modal_projector.linear_1.in_features
        if len(layers) * width != projector_width:
            raise ValueError(
                f"`vision_feature_layer={layer!r}` selects {len(layers)} layer(s) but the projector reads "
                f"{projector_width // width}: the projector's width follows `config.vision_feature_layer`, so set the "
                "layers in the config the model was built with, not per call."
            )
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        # capture only the selected layers' hidden states (unless the caller asks for all of them), as native Llava
        output_hidden_states = kwargs.pop("output_hidden_states", None) or layer
        outputs = self.vision_tower(
            pixel_values.to(dtype), output_hidden_states=output_hidden_states, return_dict=True, **kwargs
        )
        selected = [outputs.hidden_states[index] for index in layers]  # each (num_images, 1 + N, Dv)
        if strategy == "default":
            selected = [hidden[:, 1:] for hidden in selected]
        if selected[0].shape[1] != self.config.image_seq_length:
            raise ValueError(
                f"The vision tower gives {selected[0].shape[1]} tokens per image but `image_seq_length` is "
                f"{self.config.image_seq_length}: use `vision_feature_select_strategy='default'` (CLS dropped)."
            )
        features = selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1)
        return outputs, features, selected[-1]

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            hint = (
                " For a single image add the batch dimension: `pixel_values[None]`." if pixel_values.ndim == 3 else ""
            )
            raise ValueError(
                f"`pixel_values` must have shape (num_images, 3, {size}, {size}), got {tuple(pixel_values.shape)}."
                f"{hint} Prepare images with the model's processor (AutoProcessor)."
            )
        if not torch.isfinite(pixel_values).all():
            bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"`pixel_values` of image(s) {bad} hold NaN or infinite values: check the image decoding and "
                "normalisation (the model's processor gives finite values)."
            )

    def _check_question_tokens(self, trim_input_ids, trim_attention_mask, num_images: int) -> None:
        if trim_input_ids.ndim != 2:
            raise ValueError(
                f"`trim_input_ids` must be 2-D (num_images, length), got shape {tuple(trim_input_ids.shape)}: for "
                "one question add the batch dimension (`trim_input_ids[None]`)."
            )
        if trim_input_ids.is_floating_point() or trim_input_ids.is_complex() or trim_input_ids.dtype == torch.bool:
            raise ValueError(
                "`trim_input_ids` must hold integer token ids (the CLIP tokenizer's output), got dtype "
                f"{trim_input_ids.dtype}."
            )
        vocab_size = self.config.clip_text_config.vocab_size
        if trim_input_ids.numel() and (trim_input_ids.min() < 0 or trim_input_ids.max() >= vocab_size):
            raise ValueError(
                f"`trim_input_ids` holds ids outside the CLIP text tower's vocabulary [0, {vocab_size}): tokenise the "
                "questions with the model's CLIP tokenizer (the processor does), not the Llama tokenizer."
            )
        if trim_input_ids.shape[0] != num_images:
            raise ValueError(
                f"`trim_input_ids` has {trim_input_ids.shape[0]} rows but there are {num_images} images: pass one "
                "CLIP-tokenised question per image, in `pixel_values` order."
            )
        if trim_attention_mask is not None and trim_attention_mask.shape != trim_input_ids.shape:
            raise ValueError(
                f"`trim_attention_mask` has shape {tuple(trim_attention_mask.shape)} but `trim_input_ids` has "
                f"{tuple(trim_input_ids.shape)}: pass the mask the CLIP tokenizer returned with the ids."
            )

    def _trim_ratio(self, trim_ratio: float | None | _FromConfig) -> float | None:
        """The `trim_ratio` a call runs with: its own, else the config's."""
        return self.config.trim_ratio if trim_ratio is FROM_CONFIG else trim_ratio

    def _select(
        self,
        features: torch.Tensor,
        scored_features: torch.Tensor,
        trim_input_ids: torch.LongTensor | None,
        trim_attention_mask: torch.Tensor | None,
        trim_ratio: float | None | _FromConfig,
    ) -> tuple[torch.Tensor, TrimSelection]:
        """TRIM on vision features `(num_images, N, Dv * num_layers)`, scored on `scored_features` `(num_images, N,
        Dv)`: packed unprojected tokens and the selection. Every layer's features keep the same patches."""
        num_images, num_patches, _ = features.shape
        trim_ratio = self._resolve_trim(trim_ratio, trim_input_ids, trim_attention_mask, num_images)
        if trim_ratio is None:
            keep = torch.ones(num_images, num_patches, dtype=torch.bool, device=features.device)
            return features.flatten(0, 1), TrimSelection(keep, None, None)
        patches = self.vision_tower.post_layernorm(scored_features)  # (num_images, N, Dv), CLIP's layer norm
        probs = self.trim_scorer(patches, trim_input_ids, trim_attention_mask)
        probs = probs.to(features.device)
        tokens, keep = trim_image_tokens(
            features, probs, trim_ratio, self.config.trim_iqr_multiplier, self.config.trim_scope
        )
        return tokens, TrimSelection(keep, probs, trim_ratio)

    def _resolve_trim(
        self,
        trim_ratio: float | None | _FromConfig,
        trim_input_ids: torch.LongTensor | None,
        trim_attention_mask: torch.Tensor | None,
        num_images: int,
    ) -> float | None:
        """The call's TRIM mode (`None` off), after checking it and, when on, the question tokens."""
        trim_ratio = self._trim_ratio(trim_ratio)
        check_trim_ratio(trim_ratio)
        check_trim_iqr_multiplier(self.config.trim_iqr_multiplier)
        if trim_ratio is None:
            return None
        if trim_input_ids is None:
            raise ValueError(
                "TRIM is on but no question tokens were given: pass `trim_input_ids` (and `trim_attention_mask`), "
                "one CLIP-tokenised question per image, as the model's processor returns them; or pass "
                "`trim_ratio=None` to run without token reduction."
            )
        self._check_question_tokens(trim_input_ids, trim_attention_mask, num_images)
        return float(trim_ratio)

    def select_image_tokens(
        self,
        pixel_values: torch.Tensor,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        image_sizes: torch.Tensor | None = None,
    ) -> TrimSelection:
        """Run the vision tower and TRIM's selection only (no language model) and return what would be kept."""
        self._placeholder_run_lengths(pixel_values, image_sizes)
        _, features, scored = self._vision_features(pixel_values)
        return self._select(features, scored, trim_input_ids, trim_attention_mask, trim_ratio)[1]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> LlavaTrimImageOutput:
        """Native Llava's `get_image_features` with TRIM: the projected features of the tokens kept, `|K| + 1` per
        image (all `N`, as native, with `trim_ratio=None`).

        Returns native's output: `pooler_output` (a list with one `(tokens, hidden)` tensor per image), the vision
        tower's `last_hidden_state`, and its `hidden_states` / `attentions` when asked (`output_hidden_states=True`,
        `output_attentions=True`); plus `trim_selection`, what was kept. With TRIM on, pass each image's question
        (`trim_input_ids`) as for `forward`.
        """
        if image_sizes is not None:
            raise ValueError(
                "`image_sizes` is not used by LLaVA-1.5: every image is resized to one square size by the processor. "
                "Drop the argument."
            )
        vision_outputs, features, scored = self._vision_features(
            pixel_values, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        tokens, selection = self._select(features, scored, trim_input_ids, trim_attention_mask, trim_ratio)
        projected = self.multi_modal_projector(tokens)  # (sum of tokens_per_image, hidden)
        per_image = projected.split(selection.tokens_per_image.tolist())
        return LlavaTrimImageOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=list(per_image),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            trim_selection=selection,
        )

    def _placeholder_run_lengths(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[int]:
        """Check the images and return the placeholders each needs in `input_ids`: `image_seq_length` for LLaVA-1.5.

        The family-specific part of TRIM's input step, with `get_image_features` (LLaVA-NeXT overrides both)."""
        if image_sizes is not None:
            raise ValueError(
                "`image_sizes` is not used by LLaVA-1.5: every image is resized to one square size by the processor. "
                "Drop the argument."
            )
        self._check_pixel_values(pixel_values)
        return [self.config.image_seq_length] * pixel_values.shape[0]

    def _check_placeholders(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, run_lengths: list[int]
    ):
        """Every image needs one unbroken, attended run of its `run_lengths` placeholders, in `pixel_values` order."""
        num_images, run = len(run_lengths), run_lengths[0] if len(set(run_lengths)) == 1 else "its"
        is_image = input_ids == self.config.image_token_id  # (batch, length)
        per_row = is_image.sum(dim=1).tolist()
        ends = torch.tensor(run_lengths).cumsum(0)
        row_ends = torch.tensor(per_row).cumsum(0)
        if sum(per_row) != sum(run_lengths) or not set(row_ends.tolist()) <= {0, *ends.tolist()}:
            raise ValueError(
                f"The prompts hold {per_row} image placeholder tokens per row, but `pixel_values` holds "
                f"{num_images} image(s) and every image needs one run of {run} placeholders. Put exactly one "
                "`<image>` in the text per image and let the processor expand it."
            )
        positions = is_image.flatten().nonzero().flatten()  # flattened (row, column) of every placeholder
        first, last = positions[ends - torch.tensor(run_lengths)], positions[ends - 1]
        broken = ((last - first) != torch.tensor(run_lengths) - 1).nonzero().flatten().tolist()
        if broken:
            raise ValueError(
                f"The placeholders of image(s) {broken} are split by other tokens: each image needs {run} consecutive "
                "placeholders. Put exactly one `<image>` in the text per image and let the processor expand it."
            )
        if attention_mask is not None and (attention_mask[is_image] == 0).any():
            raise ValueError(
                "`attention_mask` is 0 on image placeholder tokens: image positions must be attended. Use the mask "
                "the processor returns (0 only on padding)."
            )

    def prepare_trimmed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        *,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> TrimmedInputs:
        """Check the inputs, run the vision tower, TRIM and the projector, and compact the sequence.

        `input_ids` hold `image_seq_length` placeholders per image (as the processor emits them); the returned
        sequence holds `tokens_per_image` per image (unchanged when TRIM is off), in the caller's padding side.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(
                "`inputs_embeds` with `pixel_values` is supported by `forward` with TRIM off only (TRIM shortens the "
                "runs of image placeholders it finds in `input_ids`): pass `input_ids` instead of `inputs_embeds`."
            )
        if mm_encoder_outputs:
            raise ValueError("Pass either `pixel_values` or precomputed `mm_encoder_outputs`, not both.")
        run_lengths = self._placeholder_run_lengths(pixel_values, image_sizes)
        self._check_placeholders(input_ids, attention_mask, run_lengths)
        image_outputs = self.get_image_features(
            pixel_values,
            trim_input_ids,
            trim_attention_mask,
            trim_ratio,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            return_dict=True,
        )
        selection = image_outputs.trim_selection
        if selection.trim_ratio is None:
            if labels is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            sequence = CompactedSequence(input_ids, attention_mask, None, labels)
        else:
            pad_token_id = self.config.text_config.pad_token_id
            sequence = compact_image_runs(
                input_ids,
                attention_mask,
                selection.tokens_per_image.to(input_ids.device),
                self.config.image_token_id,
                torch.tensor(run_lengths, device=input_ids.device),
                pad_token_id=0 if pad_token_id is None else pad_token_id,
                labels=labels,
            )
            if position_ids is not None:
                raise ValueError(
                    "`position_ids` cannot follow the compacted sequence when TRIM is on: drop them (positions are "
                    "built from the attention mask), or pass `trim_ratio=None`."
                )
        sequence.position_ids = sequence.position_ids if position_ids is None else position_ids
        return TrimmedInputs(sequence, image_outputs)

    def trim_before_forward(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        trim_input_ids: torch.LongTensor | None,
        trim_attention_mask: torch.Tensor | None,
        trim_ratio: float | None | _FromConfig,
        *,
        cache: Cache | None = None,
        **prepare_kwargs,
    ) -> TrimmedInputs | None:
        """What a forward pass runs before the native Llava forward: check `trim_ratio` (also without an image) and,
        with `pixel_values` and nothing cached, [`prepare_trimmed_inputs`]. `None` when there is no image.

        With TRIM off, `inputs_embeds` may replace `input_ids`: the image features then fill the positions holding the
        placeholder's embedding, as native Llava does."""
        if trim_ratio is not FROM_CONFIG:
            check_trim_ratio(trim_ratio)
        if pixel_values is None:
            return None
        _refuse_filled_cache(cache)
        if prepare_kwargs.get("inputs_embeds") is not None and self._trim_ratio(trim_ratio) is None:
            return self._image_features_for_embeddings(pixel_values, attention_mask, **prepare_kwargs)
        return self.prepare_trimmed_inputs(
            input_ids, pixel_values, attention_mask, trim_input_ids, trim_attention_mask, trim_ratio, **prepare_kwargs
        )

    def _image_features_for_embeddings(
        self,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        inputs_embeds: torch.Tensor,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> TrimmedInputs:
        """TRIM off with `inputs_embeds`: every image's `N` features, for the native merge; the sequence unchanged."""
        if mm_encoder_outputs:
            raise ValueError("Pass either `pixel_values` or precomputed `mm_encoder_outputs`, not both.")
        image_outputs = self.get_image_features(
            pixel_values,
            trim_ratio=None,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            return_dict=True,
        )
        return TrimmedInputs(CompactedSequence(None, attention_mask, position_ids, labels), image_outputs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        labels: torch.LongTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> LlavaTrimModelOutputWithPast:
        """Like [`LlavaModel.forward`], with TRIM between the vision tower and the language model.

        With `pixel_values`, `last_hidden_state` follows the compacted sequence returned as `compacted_input_ids` /
        `compacted_attention_mask`; `labels`, aligned with `input_ids`, come back aligned with it as
        `compacted_labels` (-100 on image positions). `trim_ratio` overrides `config.trim_ratio` for this call only.
        """
        trimmed = self.trim_before_forward(
            input_ids,
            pixel_values,
            attention_mask,
            trim_input_ids,
            trim_attention_mask,
            trim_ratio,
            cache=cache,
            labels=labels,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
        )
        if trimmed is not None:
            input_ids, attention_mask = trimmed.sequence.input_ids, trimmed.sequence.attention_mask
            position_ids, labels = trimmed.sequence.position_ids, trimmed.sequence.labels
            mm_encoder_outputs = {"image": trimmed.image_outputs}
        elif not (mm_encoder_outputs or {}).get("image") and input_ids is not None:
            trim_off = self._trim_ratio(trim_ratio) is None
            _refuse_placeholders_without_images(input_ids, cache, self.config.image_token_id, trim_off)
        past_length = cache.get_seq_length() if cache is not None else 0
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        if outputs.cache is not None and not torch.compiler.is_compiling():  # compiled decoding: `generate` records
            images = PromptImages.of(
                trimmed,
                pixel_values,
                mm_encoder_outputs,
                self.config,
                vision_feature_layer,
                vision_feature_select_strategy,
            )
            _advance_record(outputs.cache, self, past_length, input_ids, attention_mask, images)
        return LlavaTrimModelOutputWithPast(
            **outputs,
            trim_selection=trimmed.selection if trimmed else None,
            compacted_input_ids=input_ids if trimmed else None,
            compacted_attention_mask=attention_mask if trimmed else None,
            compacted_labels=labels,
        )


def _refuse_placeholders_without_images(
    input_ids: torch.LongTensor, cache: Cache | None, image_token_id: int, trim_off: bool = False
):
    """A prompt (nothing cached yet) with placeholders but no image features would be answered blind: refused with
    TRIM on; with TRIM off it runs as native Llava runs it (the placeholders read as text), with a warning."""
    if (cache is None or cache.get_seq_length() == 0) and (input_ids == image_token_id).any():
        if trim_off:
            logger.warning_once(
                "`input_ids` hold image placeholder tokens but no `pixel_values` were given: with TRIM off the model "
                "runs them as native Llava does, as text tokens, without seeing any image."
            )
            return
        raise ValueError(
            "`input_ids` hold image placeholder tokens but no `pixel_values` were given, so the model would "
            "answer without seeing the image. Pass the `pixel_values` the processor returned with the ids."
        )


def _refuse_filled_cache(cache: Cache | None) -> None:
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "`forward` with `pixel_values` and a non-empty cache is not supported: continue a conversation with "
            "`generate(..., past_key_values=cache)`, which checks that the cache matches the image selection."
        )


class _CallerPromptStreamer(BaseStreamer):
    """Hands a streamer the caller's prompt instead of the compacted one; the new tokens pass through unchanged."""

    def __init__(self, streamer: BaseStreamer, prompt: torch.LongTensor):
        self.streamer, self.prompt = streamer, prompt

    def put(self, value):
        if self.prompt is not None:
            value, self.prompt = self.prompt.cpu(), None
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


class LlavaTrimForConditionalGeneration(LlavaTrimPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin):
    """LLaVA-1.5 with TRIM: fewer image tokens reach the language model, chosen by CLIP similarity to the question.

    Inputs are those of the native Llava model plus `trim_input_ids` / `trim_attention_mask` (the question of each
    image, CLIP-tokenised; the processor makes them). `trim_ratio=` on `forward` and `generate` overrides
    `config.trim_ratio` for one call: `None` (off), `-1` (automatic) or a fraction in `(0, 1]`. TRIM runs first; the
    native Llava forward and generation then run on the compacted prompt (see docs/trim.md).
    """

    _auto_class = "AutoModelForImageTextToText"

    def __init__(self, config: LlavaTrimConfig):
        LlavaTrimPreTrainedModel.__init__(self, config)
        self.model = LlavaTrimModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> LlavaTrimImageOutput:
        """See [`LlavaTrimModel.get_image_features`]: the projected image features after TRIM."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def select_image_tokens(
        self,
        pixel_values: torch.Tensor,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> TrimSelection:
        """The selection TRIM makes for these images and questions, without running the language model.

        Accepts the processor's output directly: `model.select_image_tokens(**inputs)` (`input_ids` and
        `attention_mask` are accepted for that and not used; `image_sizes` is LLaVA-NeXT's).
        """
        with torch.no_grad():
            return self.model.select_image_tokens(
                pixel_values, trim_input_ids, trim_attention_mask, trim_ratio, image_sizes=image_sizes
            )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> LlavaTrimCausalLMOutputWithPast:
        """Like [`LlavaForConditionalGeneration.forward`], with TRIM.

        With `pixel_values`, `logits` follow the compacted sequence (`compacted_input_ids`), and `labels` (aligned
        with the caller's `input_ids`) are compacted alongside (`compacted_labels`, -100 on image positions) before
        the loss.
        """
        trimmed = self.model.trim_before_forward(
            input_ids,
            pixel_values,
            attention_mask,
            trim_input_ids,
            trim_attention_mask,
            trim_ratio,
            cache=cache,
            labels=labels,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
        )
        if trimmed is not None:
            input_ids, attention_mask = trimmed.sequence.input_ids, trimmed.sequence.attention_mask
            position_ids, labels = trimmed.sequence.position_ids, trimmed.sequence.labels
            mm_encoder_outputs = {"image": trimmed.image_outputs}
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            trim_ratio=trim_ratio,  # for the language model's checks when there is no image
            **kwargs,
        )
        if trimmed is None:
            return LlavaTrimCausalLMOutputWithPast(**outputs)
        if outputs.cache is not None and input_ids is not None:  # the model saw ready-made features: name their source
            images = PromptImages.of(
                trimmed, pixel_values, None, self.config, vision_feature_layer, vision_feature_select_strategy
            )
            sources = images.positions(input_ids, attention_mask, self.config.image_token_id)
            _record(outputs.cache, self.model, input_ids, sources, images.sources)
        return LlavaTrimCausalLMOutputWithPast(
            **outputs,
            trim_selection=trimmed.selection,
            compacted_input_ids=input_ids,
            compacted_attention_mask=attention_mask,
            compacted_labels=labels,
        )

    def prepare_inputs_for_generation(self, input_ids, *args, cache=None, is_first_iteration=False, **kwargs):
        """Native, except that an assistant's first pass (an empty cache) also receives the image features."""
        is_first_iteration = is_first_iteration or cache is None or cache.get_seq_length() == 0
        return super().prepare_inputs_for_generation(
            input_ids, *args, cache=cache, is_first_iteration=is_first_iteration, **kwargs
        )

    @torch.no_grad()
    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ):
        """[`~GenerationMixin.generate`] with TRIM: the vision tower and the selection run once, on the prompt.

        The prompt is compacted once and the native generation runs on it with the trimmed image features, so every
        generation option behaves as for native Llava. Lengths (`max_length`, `min_length`) count the caller's
        `input_ids`, and the returned sequences are the caller's `input_ids` followed by the new tokens, so
        `out[:, input_ids.shape[1]:]` is the answer. With `return_dict_in_generate=True` the output also carries
        `trim_selection`. A cache given with `cache=` (from an earlier call of this model) is checked against the
        prompt and reused up to the first position that differs (token, padding, or an image's pixels or selection),
        so the answer is that of a fresh run; a cache that cannot be checked is refused (docs/trim.md section 5).
        """
        if isinstance(trim_ratio, (list, tuple)):
            trim_ratio = _one_trim_ratio(trim_ratio)
        if trim_ratio is not FROM_CONFIG:
            check_trim_ratio(trim_ratio)  # also when there is no image
        input_ids = kwargs.pop("input_ids", None)
        if inputs is not None:
            if input_ids is not None:
                raise ValueError("Pass the prompt once: as `inputs` or as `input_ids`, not both.")
            input_ids = inputs
        cache = kwargs.get("cache")
        if input_ids is None and pixel_values is None:  # a prompt given as `inputs_embeds`: nothing to compare
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("Pass the prompt as `input_ids` to continue from a cache, so it can be checked.")
            return super().generate(None, generation_config, **kwargs)
        config = self._prepare_generation_config(generation_config, **kwargs)[0]
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None and input_ids is not None:  # inferred from the padding as native does, before TRIM
            self._prepare_special_tokens(config, False, device=input_ids.device, batch_size=input_ids.shape[0])
            attention_mask = self._prepare_attention_mask_for_generation(input_ids, config, {})
        if pixel_values is None:
            sequence = CompactedSequence(input_ids, attention_mask, None, None)
            images = PromptImages.ready_made(kwargs.pop("mm_encoder_outputs", None))
        else:
            trimmed = self.model.prepare_trimmed_inputs(
                input_ids,
                pixel_values,
                attention_mask,
                trim_input_ids,
                trim_attention_mask,
                trim_ratio,
                position_ids=kwargs.pop("position_ids", None),
                inputs_embeds=kwargs.pop("inputs_embeds", None),
                mm_encoder_outputs=kwargs.pop("mm_encoder_outputs", None),
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
            )
            sequence = trimmed.sequence
            images = PromptImages.of(
                trimmed, pixel_values, None, self.config, vision_feature_layer, vision_feature_select_strategy
            )
            if sequence.position_ids is not None:
                kwargs["position_ids"] = sequence.position_ids
        shift = sequence.input_ids.shape[1] - input_ids.shape[1]
        sources = images.positions(sequence.input_ids, sequence.attention_mask, self.config.image_token_id)
        features = images.features
        if cache is not None:
            new_tokens = config.max_new_tokens
            if new_tokens is None:
                new_tokens = (config.max_length or 0) - input_ids.shape[1]
            needed = sequence.input_ids.shape[1] + new_tokens - 1  # the last new token is not cached
            reused = _continue_from_cache(cache, self.model, sequence.input_ids, sources, images, needed)
            features = images.after(sources, reused)
            if features is None and reused > 0:  # what a fresh run's `forward` does with placeholders and no image
                trim_off = self.config.trim_ratio is None  # (`trim_ratio` without an image does not reach `forward`)
                _refuse_placeholders_without_images(
                    sequence.input_ids[:, reused:], None, self.config.image_token_id, trim_off
                )
        generation_config = _lengths_in_compacted_prompt(self, generation_config, kwargs, shift)
        if kwargs.get("streamer") is not None and pixel_values is not None:
            kwargs["streamer"] = _CallerPromptStreamer(kwargs["streamer"], input_ids)

        outputs = super().generate(
            sequence.input_ids,
            generation_config,
            attention_mask=sequence.attention_mask,
            **({"mm_encoder_outputs": {"image": features}} if features is not None else {}),
            **kwargs,
        )

        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        for used_cache in {id(c): c for c in (cache, getattr(outputs, "cache", None)) if c is not None}.values():
            _record_generation(used_cache, self.model, sequence.input_ids, sources, images, sequences)
        if pixel_values is None:
            return outputs
        new_tokens = sequences[:, sequence.input_ids.shape[1] :]
        prompts = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompts, new_tokens.to(prompts.device)], dim=1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        outputs["trim_selection"] = trimmed.selection
        return outputs


# ---------------------------------------------------------------------------------------------------------------------
# Generation helpers: lengths in the caller's coordinates
# ---------------------------------------------------------------------------------------------------------------------


def _one_trim_ratio(trim_ratios: list | tuple) -> float | None:
    """The one `trim_ratio` of a batch that a pipeline collated from its items' processor outputs (one per item)."""
    if len(trim_ratios) == 0 or any(ratio != trim_ratios[0] for ratio in trim_ratios):
        raise ValueError(
            f"`trim_ratio` must be one value for the whole call, got {list(trim_ratios)!r}: a batch runs with one "
            "TRIM mode, so call separately for each `trim_ratio`."
        )
    return trim_ratios[0]


def _lengths_in_compacted_prompt(
    model: LlavaTrimForConditionalGeneration, generation_config: GenerationConfig | None, kwargs: dict, shift: int
) -> GenerationConfig | None:
    """Move explicit `max_length` / `min_length` (caller's coordinates) by `shift` into the compacted prompt's."""
    if shift == 0:
        return generation_config
    config = copy.deepcopy(generation_config) if generation_config is not None else None
    for name in ("max_length", "min_length"):
        if kwargs.get(name) is not None:
            kwargs[name] = max(kwargs[name] + shift, 0)
        elif config is not None and getattr(config, name, None) is not None:
            setattr(config, name, max(getattr(config, name) + shift, 0))
        elif getattr(model.generation_config, name, None) is not None:
            value = max(getattr(model.generation_config, name) + shift, 0)
            if config is not None:
                setattr(config, name, value)
            else:
                kwargs[name] = value
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Caches that say what they hold (docs/trim.md section 5, "Continuing a chat from a cache")
# ---------------------------------------------------------------------------------------------------------------------

TEXT, PADDING = -1, -2  # sources of positions that are not image positions


@dataclass(eq=False)
class ImageSource:
    """What one image's features were computed from; equal sources give equal features.

    From `pixel_values`: a copy of the image's pixels, its keep mask and the vision settings. Features handed in
    ready-made (`mm_encoder_outputs`) are the same only when they are the same object.
    """

    pixels: torch.Tensor | None  # (3, H, W)
    keep_mask: torch.Tensor | None  # (N,)
    settings: tuple  # (vision_feature_layer, vision_feature_select_strategy, TRIM on) or (index,) when ready-made
    ready_made: object = None

    def __eq__(self, other) -> bool:
        if self.pixels is None or other.pixels is None:
            return self.ready_made is other.ready_made and self.settings == other.settings
        return (
            self.settings == other.settings
            and _same_tensor(self.pixels, other.pixels)
            and _same_tensor(self.keep_mask, other.keep_mask)
        )


@dataclass
class TrimCacheRecord:
    """What the positions of a cache hold, written by the model that filled them (`cache.llava_trim_record`).

    `input_ids[:, j]` is the compacted token at position `j` and `sources[:, j]` where its input came from: an index
    into `images` on image positions, `TEXT` or `PADDING` elsewhere. A record may describe fewer positions than the
    cache holds (those after it are not reused) or more (after `generate`, its last token is not cached yet).
    """

    model_id: int
    input_ids: torch.LongTensor  # (rows, length)
    sources: torch.LongTensor  # (rows, length)
    images: list[ImageSource]


@dataclass
class PromptImages:
    """The images of one call, in order of appearance: their sources and the features that fill their positions."""

    sources: list[ImageSource]
    features: BaseModelOutputWithPooling | None  # `pooler_output`: one `(tokens, hidden)` tensor per image

    @classmethod
    def of(
        cls,
        trimmed: TrimmedInputs | None,
        pixel_values: torch.Tensor | None,
        mm_encoder_outputs: dict | None,
        config: LlavaTrimConfig,
        layer: int | None = None,
        strategy: str | None = None,
    ) -> "PromptImages":
        """The images of a call: from `pixel_values` (and what TRIM made of them), else the ready-made features."""
        if trimmed is None:
            return cls.ready_made(mm_encoder_outputs)
        settings = (
            config.vision_feature_layer if layer is None else layer,
            strategy or config.vision_feature_select_strategy,
            trimmed.selection.trim_ratio is not None,
        )
        pixels = pixel_values.detach().clone()  # a caller may refill its buffer with the next image
        keep = trimmed.selection.keep_mask
        return cls([ImageSource(pixels[i], keep[i], settings) for i in range(len(keep))], trimmed.image_outputs)

    @classmethod
    def ready_made(cls, mm_encoder_outputs: dict | None) -> "PromptImages":
        features = (mm_encoder_outputs or {}).get("image")
        if features is None:
            return cls([], None)
        return cls([ImageSource(None, None, (i,), features) for i in range(len(features.pooler_output))], features)

    def positions(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, image_token_id: int):
        """The source of every position of `input_ids`, shape `(rows, length)`: image index, `TEXT` or `PADDING`.

        Placeholders without features (or whose count does not match them) are embedded as tokens: `TEXT`."""
        sources = torch.full_like(input_ids, TEXT)
        if self.features is not None:
            tokens_per_image = torch.tensor([len(f) for f in self.features.pooler_output], device=input_ids.device)
            image_of = torch.arange(len(tokens_per_image), device=input_ids.device).repeat_interleave(tokens_per_image)
            is_image = input_ids == image_token_id  # row after row: the order of the features
            if int(is_image.sum()) == len(image_of):
                sources[is_image] = image_of
        if attention_mask is not None and attention_mask.ndim == 2:
            sources = sources.masked_fill(attention_mask.to(sources.device) == 0, PADDING)
        return sources

    def after(self, sources: torch.LongTensor, length: int) -> BaseModelOutputWithPooling | None:
        """The features of the image positions from `length` on (those a cache of `length` positions lacks)."""
        if self.features is None or length == 0:
            return self.features
        features = torch.cat(list(self.features.pooler_output))
        columns = (sources >= 0).nonzero()[:, 1].to(features.device)  # row after row: the order of the features
        selection = getattr(self.features, "trim_selection", None)
        return LlavaTrimImageOutput(pooler_output=[features[columns >= length]], trim_selection=selection)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


def _record(cache: Cache, model: nn.Module, input_ids, sources, images: list[ImageSource]) -> None:
    cache.llava_trim_record = TrimCacheRecord(id(model), input_ids, sources, images)


def _advance_record(
    cache: Cache | None,
    model: nn.Module,
    past_length: int,
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    images: PromptImages,
) -> None:
    """Keep a cache's record in step with a forward pass that wrote its positions from `past_length` on."""
    if cache is None:
        return
    past_length = int(past_length)  # a tensor for static caches
    record = getattr(cache, "llava_trim_record", None)
    if past_length == 0:  # a new cache: this model fills it from the start
        empty = input_ids[:, :0] if input_ids is not None else None
        record = TrimCacheRecord(id(model), empty, empty, []) if input_ids is not None else None
    if record is None or record.model_id != id(model):
        cache.llava_trim_record = None  # not known: a call that would reuse the cache refuses it
        return
    known = min(past_length, record.input_ids.shape[1])  # the positions rewritten from `past_length` on are not known
    record.input_ids, record.sources = record.input_ids[:, :known], record.sources[:, :known]
    if input_ids is not None and known == past_length and record.input_ids.shape[0] == input_ids.shape[0]:
        if attention_mask is not None and attention_mask.shape[-1] != past_length + input_ids.shape[1]:
            attention_mask = None
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, past_length:]
        sources = images.positions(input_ids, attention_mask, model.config.image_token_id)
        sources = sources + (sources >= 0) * len(record.images)
        device = input_ids.device
        record.input_ids = torch.cat([record.input_ids.to(device), input_ids], dim=1)
        record.sources = torch.cat([record.sources.to(device), sources], dim=1)
        record.images = record.images + images.sources
    cache.llava_trim_record = record


def _continue_from_cache(
    cache: Cache,
    model: nn.Module,
    input_ids: torch.LongTensor,
    sources: torch.LongTensor,
    images: PromptImages,
    needed: int,
) -> int:
    """Check what a cache passed to `generate` holds against the new (compacted) prompt, crop it at the first position
    that differs (token, padding, or the image its features came from), and return how many positions it keeps.

    A cache that cannot be checked (not filled by this model), that holds other rows, or that is too short for the
    call is refused. The prompt's last position is always computed.
    """
    static_lengths = [layer.max_cache_len for layer in getattr(cache, "layers", []) if isinstance(layer, StaticLayer)]
    if static_lengths and needed > min(static_lengths):
        raise ValueError(
            f"This static cache holds {min(static_lengths)} positions but the call needs up to {needed} (the prompt, "
            f"{input_ids.shape[1]} positions after TRIM, plus the new tokens): make it larger (`max_cache_len`) or "
            "continue with a DynamicCache (the default)."
        )
    past_length = int(cache.get_seq_length())
    if past_length == 0:
        return 0
    record = getattr(cache, "llava_trim_record", None)
    if record is None or record.model_id != id(model):
        raise ValueError(
            f"The cache holds {past_length} positions but was not filled by this model (it has no record of what it "
            "holds), so reusing it could give another answer: pass a cache returned by this model's `generate` or "
            "`forward`, or start without one."
        )
    if record.input_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"The cache holds {record.input_ids.shape[0]} rows but the prompt has {input_ids.shape[0]} (beam search "
            "and `num_return_sequences` keep one cache row per candidate): continue from a call that returns one "
            "sequence per prompt, or start without the cache."
        )
    length = min(past_length, record.input_ids.shape[1], input_ids.shape[1] - 1)
    old_ids, old_sources = record.input_ids[:, :length].to(input_ids.device), record.sources[:, :length]
    old_sources, new_sources = old_sources.to(input_ids.device), sources[:, :length]
    # image positions match when both come from equal image sources; compare each pair that meets once
    both = (old_sources >= 0) & (new_sources >= 0)
    pairs = torch.stack([old_sources[both], new_sources[both]], dim=1).unique(dim=0).tolist()
    same_image = torch.zeros(len(record.images) + 1, len(images.sources) + 1, dtype=torch.bool)
    for old, new in pairs:
        same_image[old, new] = record.images[old] == images.sources[new]
    image_match = same_image.to(input_ids.device)[old_sources.clamp(min=-1), new_sources.clamp(min=-1)]
    same = (old_ids == input_ids[:, :length]) & torch.where(both, image_match, old_sources == new_sources)
    differs = ~same.all(dim=0)  # (length,)
    reused = int(differs.long().argmax()) if differs.any() else length
    _crop_cache(cache, reused)
    return reused


def _crop_cache(cache: Cache, length: int) -> None:
    """Keep the first `length` positions of `cache`."""
    past_length = int(cache.get_seq_length())
    if length >= past_length:
        return
    try:
        cache.crop(length - past_length)  # transformers' crop takes the (negative) number of tokens to remove
    except (AttributeError, NotImplementedError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"The prompt repeats only the first {length} of the {past_length} positions the cache holds, and this "
            f"cache ({type(cache).__name__}) cannot be cropped: start without the cache or pass a DynamicCache."
        ) from error


def _record_generation(
    cache: Cache, model: nn.Module, input_ids, sources, images: PromptImages, sequences: torch.LongTensor
) -> None:
    """Write on a cache that `generate` used what it holds: the compacted prompt, then the generated tokens when there
    is one cache row per prompt (beam search reorders its rows, so only the prompt they share is recorded then)."""
    rows = next((layer.keys.shape[0] for layer in cache.layers if getattr(layer, "keys", None) is not None), 0)
    if rows == input_ids.shape[0] == sequences.shape[0]:
        new_tokens = sequences[:, input_ids.shape[1] :].to(input_ids.device)
        input_ids = torch.cat([input_ids, new_tokens], dim=1)
        sources = torch.cat([sources, torch.full_like(new_tokens, TEXT)], dim=1)
    elif rows > 0 and rows % input_ids.shape[0] == 0:
        repeats = rows // input_ids.shape[0]
        input_ids, sources = input_ids.repeat_interleave(repeats, dim=0), sources.repeat_interleave(repeats, dim=0)
    _record(cache, model, input_ids, sources, images.sources)


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT (llava-v1.6, anyres): the same TRIM step, with the image features of an overview and tiles
# (docs/trim.md section 8)
# ---------------------------------------------------------------------------------------------------------------------
# The LLaVA-1.5 classes above hold the whole TRIM step (input checks, scoring, selection, compaction, hand-off to the
# native model through `mm_encoder_outputs`, generation). A family supplies how its image features are produced and
# laid out: `_placeholder_run_lengths` (the placeholders each image needs), `get_image_features` and
# `select_image_tokens`. LLaVA-NeXT's are below; the language-model side (embedding, merging the features into the
# placeholders, the decoder, the head) is the same for both families.


@dataclass
class AnyresLayout:
    """Where an image's candidate tokens (docs/trim.md section 8 point 1) come from.

    Attributes:
        num_crops (`int`): the overview plus the tiles the processor cut.
        source (`torch.LongTensor` of shape `(M,)`): for each candidate, in native order (overview raster, then the
            unpadded grid's rows), its index among the image's `num_crops * N` crop patches.
        grid_shape (`tuple[int, int]`): `(H, W)`, the unpadded grid; each of its rows is followed by a newline.
        tiles (`tuple[int, int]`): the tiles high and wide of the best resolution.
        grid_offset (`tuple[int, int]`): row and column of the unpadded grid's first patch in the full tile grid.
    """

    num_crops: int
    source: torch.LongTensor
    grid_shape: tuple[int, int]
    tiles: tuple[int, int] = (1, 1)
    grid_offset: tuple[int, int] = (0, 0)

    @property
    def num_positions(self) -> int:
        """Positions the image takes natively: `N + H * W + H`."""
        return self.source.shape[0] + self.grid_shape[0]


def anyres_layout(image_size, grid_pinpoints: list, crop_size: int, patches_per_side: int) -> AnyresLayout:
    """The layout transformers' `LlavaNextModel.pack_image_features` gives an image of `image_size` `(height,
    width)`: its crops, and the overview and unpadded grid patches in the order they reach the language model."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    image_size = [int(side) for side in image_size]
    num_crops = image_size_to_num_patches(image_size, grid_pinpoints, crop_size)
    tiles_high, tiles_wide = get_anyres_image_grid_shape(image_size, grid_pinpoints, crop_size)
    side = patches_per_side
    row = torch.arange(tiles_high * side).view(-1, 1)  # rows of the full tile grid
    column = torch.arange(tiles_wide * side).view(1, -1)
    # the crop patch at each grid position: tile (row // side, column // side), patch (row % side, column % side)
    tile = (row // side) * tiles_wide + column // side
    source = (1 + tile) * side * side + (row % side) * side + column % side  # crop 0 is the overview
    source = unpad_image(source[None], image_size)[0]  # (H, W): the rows and columns that are not padding
    first = unpad_image((row * tiles_wide * side + column)[None], image_size)[0, 0, 0].item()
    overview = torch.arange(side * side)
    offset = divmod(first, tiles_wide * side)
    return AnyresLayout(
        num_crops, torch.cat([overview, source.flatten()]), tuple(source.shape), (tiles_high, tiles_wide), offset
    )


class LlavaNextTrimPreTrainedModel(LlavaTrimPreTrainedModel):
    config: LlavaNextTrimConfig
    config_class = LlavaNextTrimConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LlavaNextTrimModel):  # as native LLaVA-NeXT
            init.normal_(module.image_newline, mean=0.0, std=1 / math.sqrt(self.config.text_config.hidden_size))


class LlavaNextTrimModel(LlavaNextTrimPreTrainedModel, LlavaTrimModel):
    """The native LLaVA-NeXT model (vision tower, projector, `image_newline`, language model) plus `trim_scorer`.

    TRIM's step is [`LlavaTrimModel`]'s; the image features are those of transformers' `LlavaNextModel`: an overview
    and the unpadded tiles with a newline after each grid row, reduced as docs/trim.md section 8 says.
    """

    def __init__(self, config: LlavaNextTrimConfig):
        LlavaNextTrimPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        hidden_size = config.text_config.hidden_size
        self.image_newline = nn.Parameter(torch.randn(hidden_size, dtype=self.dtype) / math.sqrt(hidden_size))
        self.language_model = AutoModel.from_config(config.text_config)
        self.trim_scorer = LlavaTrimScorer(config)
        self.post_init()

    def _layouts(self, image_sizes: torch.Tensor) -> list[AnyresLayout]:
        vision = self.config.vision_config
        return [
            anyres_layout(
                size.tolist(),
                self.config.image_grid_pinpoints,
                vision.image_size,
                vision.image_size // vision.patch_size,
            )
            for size in image_sizes
        ]

    @property
    def max_candidates(self) -> int:
        """The largest number of candidates an image can have: `keep_mask` rows are this wide."""
        patch = self.config.vision_config.patch_size
        grid = max(height * width for height, width in self.config.image_grid_pinpoints) // (patch * patch)
        return self.config.image_seq_length + grid

    def _placeholder_run_lengths(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[int]:
        """Check `pixel_values` `(num_images, crops, 3, 336, 336)` and `image_sizes` `(num_images, 2)`; return each
        image's placeholders, `N + H * W + H` (as `LlavaNextProcessor` expands them)."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (3, size, size):
            raise ValueError(
                f"`pixel_values` must have shape (num_images, num_crops, 3, {size}, {size}) for LLaVA-NeXT, got "
                f"{tuple(pixel_values.shape)}. Prepare images with the model's processor (AutoProcessor)."
            )
        if image_sizes is None or tuple(image_sizes.shape) != (pixel_values.shape[0], 2):
            raise ValueError(
                "LLaVA-NeXT needs `image_sizes` of shape (num_images, 2), each image's (height, width) before "
                "processing, as the processor returns it with `pixel_values`."
            )
        layouts = self._layouts(image_sizes)
        for index, layout in enumerate(layouts):
            if layout.num_crops > pixel_values.shape[1]:
                raise ValueError(
                    f"Image {index} of size {tuple(image_sizes[index].tolist())} needs {layout.num_crops} crops but "
                    f"`pixel_values` holds {pixel_values.shape[1]}: pass the `pixel_values` and `image_sizes` the "
                    "processor returned together."
                )
        crops = torch.cat([image[: layout.num_crops] for image, layout in zip(pixel_values, layouts, strict=True)])
        self._check_pixel_values(crops)
        return [layout.num_positions for layout in layouts]

    def _crop_features(
        self,
        pixel_values: torch.Tensor,
        layouts: list[AnyresLayout],
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> tuple[BaseModelOutputWithPooling, list[torch.Tensor], list[torch.Tensor]]:
        """The vision tower's outputs on all crops, the vision features `V` of every image's crops, one `(num_crops, N,
        Dv * num_layers)` tensor per image, and the features TRIM scores (the last selected layer's), one
        `(num_crops, N, Dv)` tensor per image."""
        crops = torch.cat([image[: layout.num_crops] for image, layout in zip(pixel_values, layouts, strict=True)])
        outputs, features, scored = self._vision_features(
            crops, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        sizes = [layout.num_crops for layout in layouts]
        return outputs, list(features.split(sizes)), list(scored.split(sizes))

    def _select_anyres(
        self,
        features: list[torch.Tensor],
        scored_features: list[torch.Tensor],
        layouts: list[AnyresLayout],
        trim_input_ids: torch.LongTensor | None,
        trim_attention_mask: torch.Tensor | None,
        trim_ratio: float | None | _FromConfig,
    ) -> tuple[list[torch.Tensor] | None, TrimSelection]:
        """docs/trim.md section 8 points 1 to 4: each image's kept candidates and aggregate (unprojected, `None` when
        off) and the selection."""
        trim_ratio = self._resolve_trim(trim_ratio, trim_input_ids, trim_attention_mask, len(layouts))
        device = features[0].device
        keep_mask = torch.zeros(len(layouts), self.max_candidates, dtype=torch.bool, device=device)
        counts = torch.tensor([layout.source.shape[0] for layout in layouts], device=device)
        if trim_ratio is None:
            for index, layout in enumerate(layouts):
                keep_mask[index, : layout.source.shape[0]] = True
            newlines = torch.tensor([layout.grid_shape[0] for layout in layouts], device=device)
            return None, TrimSelection(keep_mask, None, None, num_newlines=newlines, num_candidates=counts)
        crops = torch.cat(scored_features)  # (all crops, N, Dv)
        questions = torch.arange(len(layouts), device=trim_input_ids.device).repeat_interleave(
            torch.tensor([layout.num_crops for layout in layouts], device=trim_input_ids.device)
        )
        mask = None if trim_attention_mask is None else trim_attention_mask[questions]
        scores = self.trim_scorer(
            self.vision_tower.post_layernorm(crops), trim_input_ids[questions], mask, return_scores=True
        ).to(device)  # (all crops, N): every crop against its image's question
        probs = torch.zeros(keep_mask.shape, dtype=torch.float32, device=device)
        tokens, newlines = [], []
        for index, (image_scores, image_features, layout) in enumerate(
            zip(scores.split([layout.num_crops for layout in layouts]), features, layouts, strict=True)
        ):
            source = layout.source.to(device)
            candidates = image_features.flatten(0, 1)[source]  # (M, Dv) in native order
            image_probs = torch.softmax(-image_scores.flatten()[source], dim=-1)  # (M,): one softmax per image
            kept, keep = trim_image_tokens(
                candidates[None], image_probs[None], trim_ratio, self.config.trim_iqr_multiplier, "image"
            )
            count = source.shape[0]
            keep_mask[index, :count], probs[index, :count] = keep[0], image_probs
            newlines.append(keep[0, self.config.image_seq_length :].view(layout.grid_shape).any(dim=1).sum())
            tokens.append(kept)  # (|K| + 1, Dv)
        selection = TrimSelection(
            keep_mask, probs, trim_ratio, num_newlines=torch.stack(newlines), num_candidates=counts
        )
        return tokens, selection

    def _with_newlines(self, projected: torch.Tensor, keep: torch.Tensor, layout: AnyresLayout) -> torch.Tensor:
        """docs/trim.md section 8 points 5 and 6: the projected kept tokens and aggregate `(|K| + 1, hidden)` with an
        `image_newline` after every grid row that keeps a token."""
        overview = keep[: self.config.image_seq_length]
        grid = keep[self.config.image_seq_length : layout.source.shape[0]].view(layout.grid_shape)  # (H, W)
        row_kept = grid.any(dim=1, keepdim=True)  # (H, 1)
        # the image's positions before reduction, with one newline slot per row and the aggregate's slot at the end
        slot_kept = torch.cat([overview, torch.cat([grid, row_kept], dim=1).flatten(), keep.new_ones(1)])
        row_slots = torch.cat([torch.zeros_like(grid), torch.ones_like(row_kept)], dim=1).flatten()
        is_newline = torch.cat([torch.zeros_like(overview), row_slots, keep.new_zeros(1)])
        newline = is_newline[slot_kept]
        features = projected.new_empty(newline.shape[0], projected.shape[-1])
        features[~newline] = projected
        features[newline] = self.image_newline.to(projected)
        return features

    def select_image_tokens(
        self,
        pixel_values: torch.Tensor,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        image_sizes: torch.Tensor | None = None,
    ) -> TrimSelection:
        """Run the vision tower and TRIM's selection only (no language model) and return what would be kept."""
        self._placeholder_run_lengths(pixel_values, image_sizes)
        layouts = self._layouts(image_sizes)
        _, features, scored = self._crop_features(pixel_values, layouts)
        return self._select_anyres(features, scored, layouts, trim_input_ids, trim_attention_mask, trim_ratio)[1]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> LlavaTrimImageOutput:
        """The projected image features after TRIM, one `(tokens_per_image[i], hidden)` tensor per image.

        With `trim_ratio=None` they are native LLaVA-NeXT's (overview, unpadded tiles, newlines).
        """
        self._placeholder_run_lengths(pixel_values, image_sizes)
        layouts = self._layouts(image_sizes)
        kwargs.pop("return_dict", None)
        vision_outputs, features, scored = self._crop_features(
            pixel_values, layouts, vision_feature_layer, vision_feature_select_strategy, **kwargs
        )
        tokens, selection = self._select_anyres(
            features, scored, layouts, trim_input_ids, trim_attention_mask, trim_ratio
        )
        if tokens is None:  # off: native LLaVA-NeXT's projection and packing
            projected = self.multi_modal_projector(torch.cat(features)).split([len(crops) for crops in features])
            per_image, _ = LlavaNextModel.pack_image_features(
                self, projected, image_sizes, self.config.vision_feature_select_strategy, self.image_newline
            )
        else:
            projected = self.multi_modal_projector(torch.cat(tokens)).split([len(kept) for kept in tokens])
            per_image = [
                self._with_newlines(image_tokens, keep[: layout.source.shape[0]], layout)
                for image_tokens, keep, layout in zip(projected, selection.keep_mask, layouts, strict=True)
            ]
        return LlavaTrimImageOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=list(per_image),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            trim_selection=selection,
        )


class LlavaNextTrimForConditionalGeneration(LlavaNextTrimPreTrainedModel, LlavaTrimForConditionalGeneration):
    """LLaVA-NeXT (llava-v1.6) with TRIM: [`LlavaTrimForConditionalGeneration`]'s forward and generation on the image
    features of [`LlavaNextTrimModel`]. Inputs are those of native `LlavaNextForConditionalGeneration` (`image_sizes`
    included) plus `trim_input_ids` / `trim_attention_mask`; `trim_ratio=None` gives native LLaVA-NeXT."""

    def __init__(self, config: LlavaNextTrimConfig):
        LlavaNextTrimPreTrainedModel.__init__(self, config)
        self.model = LlavaNextTrimModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "LlavaNextTrimForConditionalGeneration",
    "LlavaNextTrimModel",
    "LlavaNextTrimPreTrainedModel",
    "LlavaTrimForConditionalGeneration",
    "LlavaTrimModel",
    "LlavaTrimPreTrainedModel",
    "TrimSelection",
    "compact_image_runs",
    "trim_image_tokens",
    "trim_keep_mask",
]
