# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""LLaVA-1.5 with TRIM: CLIP-guided image token reduction (Token Reduction using CLIP Metric, arXiv 2409.10994).

Reading order: the TRIM selection as pure functions (`trim_keep_mask`, `trim_image_tokens`), the sequence compaction
(`compact_image_runs`), then the modules. The LLaVA parts (CLIP vision tower, projector, Llama decoder) are the
native transformers Llava building blocks with their native weight names; TRIM adds `model.trim_scorer` (the CLIP
text tower and CLIP's two projections).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from .configuration_llava_trim import LlavaTrimConfig, check_trim_ratio


class _FromConfig:
    """Default of the per-call `trim_ratio` argument: use `config.trim_ratio` (`None` already means TRIM off)."""

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG = _FromConfig()


# ---------------------------------------------------------------------------------------------------------------------
# TRIM selection (DESIGN.md section 2)
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
# Sequence compaction (DESIGN.md section 3)
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
    image_seq_length: int,
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
        image_seq_length (`int`): placeholders per image in `input_ids`.
        pad_token_id (`int`): filler for new padding positions.
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*): compacted alongside, -100 on images.
    """
    batch_size, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    is_image = input_ids == image_token_id  # (batch, length)
    # index of every placeholder among all placeholders of the batch, row after row
    placeholder_rank = is_image.flatten().cumsum(0).view(batch_size, length) - 1
    image_index = (placeholder_rank // image_seq_length).clamp(0, tokens_per_image.shape[0])
    index_in_run = placeholder_rank % image_seq_length
    # how many output positions each input token becomes: text 1, padding 0, the j-th placeholder of a run 1 while
    # j < tokens_per_image, and the run's last placeholder also carries any excess (tokens_per_image - S + 1);
    # the spare last entry only serves text positions past the last image
    run_target = torch.cat([tokens_per_image, tokens_per_image.new_zeros(1)])[image_index]
    placeholder_copies = torch.where(
        index_in_run == image_seq_length - 1,
        (run_target - image_seq_length + 1).clamp(min=0),
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
    """

    keep_mask: torch.Tensor
    probs: torch.Tensor | None
    trim_ratio: float | None

    @property
    def num_patches(self) -> int:
        """Patch tokens per image before reduction (576 for CLIP ViT-L/14 at 336 px)."""
        return self.keep_mask.shape[1]

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
        """LLM positions each image occupies: `|K| + 1` with TRIM on, `N` when off."""
        return self.num_kept + (0 if self.trim_ratio is None else 1)


@dataclass
class TrimmedInputs:
    """Model inputs after TRIM: the compacted sequence, its embeddings with image tokens in place, the selection."""

    sequence: CompactedSequence
    inputs_embeds: torch.Tensor  # (batch, new_length, hidden)
    image_features: torch.Tensor  # (sum of tokens_per_image, hidden), projected
    selection: TrimSelection


@dataclass
class LlavaTrimModelOutputWithPast(LlavaModelOutputWithPast):
    """[`LlavaModelOutputWithPast`] plus the TRIM selection and the compacted sequence the LLM saw.

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


class LlavaTrimScorer(nn.Module):
    """CLIP's text tower and projections: the similarity of every image patch to the question.

    Weights as in CLIP: `text_model` is CLIP's text transformer, `text_projection` and `visual_projection` map text and
    vision features into the joint space. The caller applies the vision tower's own `post_layernorm` (not duplicated)
    and passes tensors only, so that device hooks (accelerate offload, multi-GPU maps) see no module arguments.
    """

    def __init__(self, config: LlavaTrimConfig):
        super().__init__()
        self.text_model = AutoModel.from_config(config.clip_text_config)
        self.text_projection = nn.Linear(config.clip_text_config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)

    def forward(
        self,
        patch_features: torch.Tensor,
        trim_input_ids: torch.LongTensor,
        trim_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return `p = softmax(-s)` over the patches of each image, float32 of shape `(num_images, N)`.

        `s_i = P_i . t` with `P = visual_projection(patch_features)`, `patch_features = post_layernorm(V)` of shape
        `(num_images, N, Dv)`, and `t` the CLIP text embedding of the image's question, both unnormalised. The
        projections and the dot product run in float32, also under mixed precision (autocast is switched off here).
        """
        text_outputs = self.text_model(input_ids=trim_input_ids, attention_mask=trim_attention_mask)
        with torch.autocast(device_type=patch_features.device.type, enabled=False):
            projection_dtype = self.text_projection.weight.dtype
            text_embeds = self.text_projection(text_outputs.pooler_output.to(projection_dtype)).float()  # (images, D)
            projection_dtype = self.visual_projection.weight.dtype
            patch_embeds = self.visual_projection(patch_features.to(projection_dtype)).float()  # (images, N, D)
            scores = torch.einsum("ind,id->in", patch_embeds, text_embeds.to(patch_embeds.device))  # (images, N)
        return torch.softmax(-scores, dim=-1)


class LlavaTrimPreTrainedModel(LlavaPreTrainedModel):
    config: LlavaTrimConfig
    config_class = LlavaTrimConfig
    _auto_class = "AutoModel"
    # TRIM's scores must not drift with the model dtype or quantisation: `_keep_in_fp32_modules` covers float16 loads
    # and keeps quantisers away from the projections, `_keep_in_fp32_modules_strict` covers bfloat16 loads
    _keep_in_fp32_modules = ["text_projection", "visual_projection"]
    _keep_in_fp32_modules_strict = ["text_projection", "visual_projection"]


class LlavaTrimModel(LlavaTrimPreTrainedModel, LlavaModel):
    """The native Llava model (vision tower, projector, language model) plus `trim_scorer`; no LM head."""

    def __init__(self, config: LlavaTrimConfig):
        LlavaTrimPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.trim_scorer = LlavaTrimScorer(config)
        self.post_init()

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features `V` LLaVA projects: hidden states of `vision_feature_layer`, CLS dropped by default.

        Returns a tensor of shape `(num_images, N, Dv)`.
        """
        expected = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, expected, expected):
            raise ValueError(
                f"`pixel_values` must have shape (num_images, 3, {expected}, {expected}), got "
                f"{tuple(pixel_values.shape)}. Prepare images with the model's processor (AutoProcessor)."
            )
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"TRIM needs a single `vision_feature_layer`, the config has {layer!r}.")
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        # capture only the selected layer's hidden states, as native Llava does, instead of all of them
        outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=layer)
        features = outputs.hidden_states[layer]  # (num_images, 1 + N, Dv)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return features

    def select_image_tokens(
        self,
        pixel_values: torch.Tensor,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
    ) -> TrimSelection:
        """Run the vision tower and TRIM's selection only (no language model) and return what would be kept."""
        features = self.get_vision_features(pixel_values)
        return self._select(features, trim_input_ids, trim_attention_mask, trim_ratio)[1]

    def _select(
        self,
        features: torch.Tensor,
        trim_input_ids: torch.LongTensor | None,
        trim_attention_mask: torch.Tensor | None,
        trim_ratio: float | None | _FromConfig,
    ) -> tuple[torch.Tensor, TrimSelection]:
        """TRIM on vision features `(num_images, N, Dv)`: packed unprojected tokens and the selection."""
        trim_ratio = self.config.trim_ratio if trim_ratio is FROM_CONFIG else trim_ratio
        check_trim_ratio(trim_ratio)
        num_images, num_patches, _ = features.shape
        if trim_ratio is None:
            keep = torch.ones(num_images, num_patches, dtype=torch.bool, device=features.device)
            return features.flatten(0, 1), TrimSelection(keep, None, None)
        if trim_input_ids is None:
            raise ValueError(
                "TRIM is on but no question tokens were given: pass `trim_input_ids` (and `trim_attention_mask`), "
                "one CLIP-tokenised question per image, as the model's processor returns them; or pass "
                "`trim_ratio=None` to run without token reduction."
            )
        if trim_input_ids.shape[0] != num_images:
            raise ValueError(
                f"`trim_input_ids` has {trim_input_ids.shape[0]} rows but there are {num_images} images: pass one "
                "CLIP-tokenised question per image, in `pixel_values` order."
            )
        patches = self.vision_tower.post_layernorm(features)  # (num_images, N, Dv), CLIP's layer norm on layer -2
        probs = self.trim_scorer(patches, trim_input_ids, trim_attention_mask)
        probs = probs.to(features.device)
        tokens, keep = trim_image_tokens(
            features, probs, trim_ratio, self.config.trim_iqr_multiplier, self.config.trim_scope
        )
        return tokens, TrimSelection(keep, probs, trim_ratio)

    def trim_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        labels: torch.LongTensor | None = None,
    ) -> TrimmedInputs:
        """Vision tower, TRIM, projector and sequence compaction: everything before the language model.

        `input_ids` hold `image_seq_length` placeholders per image (as the processor emits them); the returned
        sequence holds `|K| + 1` per image (unchanged when TRIM is off) with the projected image tokens in place.
        """
        if input_ids is None:
            raise ValueError(
                "Images need `input_ids` holding their placeholder tokens; `inputs_embeds` cannot mark them."
            )
        num_images = pixel_values.shape[0]
        seq_length = self.config.image_seq_length
        placeholders_per_row = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        if sum(placeholders_per_row) != num_images * seq_length or any(n % seq_length for n in placeholders_per_row):
            raise ValueError(
                f"The prompts hold {placeholders_per_row} image placeholder tokens per row, but `pixel_values` holds "
                f"{num_images} image(s) and every image needs one run of {seq_length} placeholders. Put exactly one "
                f"`<image>` in the text per image and let the processor expand it."
            )

        features = self.get_vision_features(pixel_values)  # (num_images, N, Dv)
        if features.shape[1] != seq_length:
            raise ValueError(
                f"The vision tower gives {features.shape[1]} tokens per image but `image_seq_length` is {seq_length}."
            )
        tokens, selection = self._select(features, trim_input_ids, trim_attention_mask, trim_ratio)
        image_features = self.multi_modal_projector(tokens)  # (sum of tokens_per_image, hidden)

        if selection.trim_ratio is None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            sequence = CompactedSequence(input_ids, attention_mask, None, labels)
            if labels is not None:
                sequence.labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
        else:
            pad_token_id = self.config.text_config.pad_token_id
            sequence = compact_image_runs(
                input_ids,
                attention_mask,
                selection.tokens_per_image.to(input_ids.device),
                self.config.image_token_id,
                seq_length,
                pad_token_id=0 if pad_token_id is None else pad_token_id,
                labels=labels,
            )

        inputs_embeds = self.get_input_embeddings()(sequence.input_ids)
        image_mask = (sequence.input_ids == self.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features.to(inputs_embeds))
        return TrimmedInputs(sequence, inputs_embeds, image_features, selection)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> LlavaTrimModelOutputWithPast:
        """Like [`LlavaModel.forward`], with TRIM between the vision tower and the language model.

        With `pixel_values`, `last_hidden_state` follows the compacted sequence returned as `compacted_input_ids` /
        `compacted_attention_mask`; `labels`, aligned with `input_ids`, come back aligned with it as
        `compacted_labels` (-100 on image positions). `trim_ratio` overrides `config.trim_ratio` for this call only.
        """
        trimmed = None
        if pixel_values is not None:
            if inputs_embeds is not None:
                raise ValueError("Pass `input_ids` with `pixel_values`, not `inputs_embeds`.")
            trimmed = self.trim_inputs(
                input_ids, pixel_values, attention_mask, trim_input_ids, trim_attention_mask, trim_ratio, labels
            )
            attention_mask, inputs_embeds = trimmed.sequence.attention_mask, trimmed.inputs_embeds
            if trimmed.sequence.position_ids is not None:
                position_ids = trimmed.sequence.position_ids
        elif inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return LlavaTrimModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            trim_selection=trimmed.selection if trimmed else None,
            compacted_input_ids=trimmed.sequence.input_ids if trimmed else None,
            compacted_attention_mask=trimmed.sequence.attention_mask if trimmed else None,
            compacted_labels=trimmed.sequence.labels if trimmed else labels,
        )


class LlavaTrimForConditionalGeneration(LlavaTrimPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA-1.5 with TRIM: fewer image tokens reach the language model, chosen by CLIP similarity to the question.

    Inputs are those of the native Llava model plus `trim_input_ids` / `trim_attention_mask` (the question of each
    image, CLIP-tokenised; the processor makes them). `trim_ratio=` on `forward` and `generate` overrides
    `config.trim_ratio` for one call: `None` (off), `-1` (automatic) or a fraction in `(0, 1]`.
    """

    _auto_class = "AutoModelForImageTextToText"

    def __init__(self, config: LlavaTrimConfig):
        LlavaTrimPreTrainedModel.__init__(self, config)
        self.model = LlavaTrimModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # LLaVA-1.5 trains the projector and the language model; the CLIP towers stay as CLIP made them
        self.model.vision_tower.requires_grad_(False)
        self.model.trim_scorer.requires_grad_(False)

    def select_image_tokens(
        self,
        pixel_values: torch.Tensor,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        **unused,
    ) -> TrimSelection:
        """The selection TRIM makes for these images and questions, without running the language model.

        Accepts the processor's output directly: `model.select_image_tokens(**inputs)`.
        """
        with torch.no_grad():
            return self.model.select_image_tokens(pixel_values, trim_input_ids, trim_attention_mask, trim_ratio)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> LlavaTrimCausalLMOutputWithPast:
        """Like [`LlavaForConditionalGeneration.forward`], with TRIM.

        With `pixel_values`, `logits` follow the compacted sequence (`compacted_input_ids`), and `labels` (aligned
        with the caller's `input_ids`) are compacted alongside (`compacted_labels`, -100 on image positions) before
        the loss.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            trim_input_ids=trim_input_ids,
            trim_attention_mask=trim_attention_mask,
            trim_ratio=trim_ratio,
            labels=labels,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=outputs.compacted_labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return LlavaTrimCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            trim_selection=outputs.trim_selection,
            compacted_input_ids=outputs.compacted_input_ids,
            compacted_attention_mask=outputs.compacted_attention_mask,
            compacted_labels=outputs.compacted_labels if pixel_values is not None else None,
        )

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        trim_input_ids: torch.LongTensor | None = None,
        trim_attention_mask: torch.Tensor | None = None,
        trim_ratio: float | None | _FromConfig = FROM_CONFIG,
        **kwargs,
    ):
        """[`~GenerationMixin.generate`] with TRIM: the vision tower and the selection run once, on the prompt.

        The prompt is compacted once and generation runs on it with the image tokens already embedded. The returned
        sequences are the caller's `input_ids` followed by the new tokens, so `out[:, input_ids.shape[1]:]` is the
        answer. With `return_dict_in_generate=True` the output also carries `trim_selection`.
        """
        if pixel_values is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("Pass `input_ids` with `pixel_values`, not `inputs_embeds`.")

        with torch.no_grad():
            trimmed = self.model.trim_inputs(
                input_ids, pixel_values, attention_mask, trim_input_ids, trim_attention_mask, trim_ratio
            )
        sequence = trimmed.sequence
        outputs = super().generate(
            input_ids=sequence.input_ids,
            inputs_embeds=trimmed.inputs_embeds,
            attention_mask=sequence.attention_mask,
            **kwargs,
        )

        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        new_tokens = sequences[:, sequence.input_ids.shape[1] :]
        prompts = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompts, new_tokens.to(prompts.device)], dim=1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        outputs["trim_selection"] = trimmed.selection
        return outputs


__all__ = [
    "LlavaTrimForConditionalGeneration",
    "LlavaTrimModel",
    "LlavaTrimPreTrainedModel",
    "TrimSelection",
    "compact_image_runs",
    "trim_image_tokens",
    "trim_keep_mask",
]
