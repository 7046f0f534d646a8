# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune LLaVA-1.5 or LLaVA-NeXT with TRIM in the loop, with `transformers.Trainer` (optionally LoRA through
`peft`).

Data is LLaVA's conversation JSON (a list of records, or one record per line):

```json
[{"id": "0", "image": "coco/0001.jpg",
  "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                    {"from": "gpt", "value": "A bowl of fruit."}]}]
```

Reading order: the prompt ([`build_vicuna_v1_prompt`]), the collator ([`LlavaTrimDataCollator`]: prompt -> token
ids, labels, pixels and TRIM's question), what is trained ([`configure_trainable_parameters`], [`apply_lora`]), the
Trainer ([`LlavaTrimTrainer`]), then the command line ([`train`]; its flags, LLaVA's `train.py` ones parsed by
`HfArgumentParser`, are in `finetune_args`). The dataset, bad-sample skipping and modality grouping are in
`training_data`, the `--recipe` presets and DeepSpeed/FSDP configs in `recipes`. See `--help` for examples.
"""

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.utils.chat_template_utils import render_jinja_template

from ..processing_llava_trim import (
    LLAVA_V1_SYSTEM,
    NEXT_CONVERSATIONS,
    VICUNA_V1_CHAT_TEMPLATE,
    VICUNA_V1_SYSTEM,
    LlavaNextTrimProcessor,
    LlavaTrimProcessor,
    llava_next_image_processor,
)
from .finetune_args import FinetuneArguments, build_parser, parse_args, world_size
from .training_data import BadSampleError, LlavaConversationDataset, ModalityGroupedSampler, SkipBadSamples

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# Llama decoder projections that LoRA adapts; nothing in the vision tower or the CLIP text tower matches.
LORA_TARGET_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

# Modules to leave unquantised with `BitsAndBytesConfig(llm_int8_skip_modules=...)`: the vision tower and CLIP's
# text tower and projections (TRIM's scores), the multimodal projector and the LM head. Patterns are matched from the
# start of the module name, so they hold for `AutoModelForImageTextToText` and for `AutoModel` alike.
QUANTIZATION_SKIP_MODULES = [
    r"(model\.)?vision_tower",
    r"(model\.)?trim_scorer",
    r"(model\.)?multi_modal_projector",
    "lm_head",
]


# ---------------------------------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class VicunaPrompt:
    """One conversation rendered with the processor's vicuna_v1 chat template.

    Attributes:
        text (`str`): the whole prompt, answers included.
        answer_spans (`list[tuple[int, int]]`): character ranges `[start, end)` of `text` that are supervised: each
            assistant answer followed by its closing `</s>` (the template's `{% generation %}` blocks).
        questions (`list[str]`): the text of every user turn, image placeholder removed, in order.
        num_images (`int`): image placeholders in the conversation's turns.
    """

    text: str
    answer_spans: list[tuple[int, int]]
    questions: list[str]
    num_images: int


def conversation_to_messages(
    conversations: Sequence[dict[str, str]],
    system_prompt: str = VICUNA_V1_SYSTEM,
    image_placeholder: str = IMAGE_PLACEHOLDER,
    image: Any = None,
) -> tuple[list[dict], int]:
    """LLaVA conversation turns as chat messages for the processor's chat template, and the number of placeholders.

    As in LLaVA's preprocessing, a turn holding the image placeholder gets the image at its start (the template
    writes `"<image>\\n"`), a leading assistant turn is dropped, and user and assistant turns must alternate. The
    system sentence is a leading system message.

    Args:
        conversations (`Sequence[dict]`): turns `{"from": "human" | "gpt", "value": str}` (`"user"` and
            `"assistant"` are accepted too).
        system_prompt (`str`): the system sentence ([`VICUNA_V1_SYSTEM`] by default).
        image_placeholder (`str`): the image marker in the turns' text.
        image (*optional*): the record's image, put in the image entry of the messages.
    """
    turns = list(conversations)
    if turns and _ROLES.get(str(turns[0].get("from", "")).lower()) == "assistant":
        turns = turns[1:]  # LLaVA skips a conversation's first turn when the assistant speaks first
    if not turns:
        raise ValueError("The conversation has no user turn: give at least one `human` turn and one `gpt` turn.")
    messages, num_images = [{"role": "system", "content": system_prompt}], 0
    for index, turn in enumerate(turns):
        speaker, value = turn.get("from"), turn.get("value")
        role = _ROLES.get(str(speaker).lower())
        if role is None or not isinstance(value, str):
            raise ValueError(
                f"Turn {index} is {turn!r}: every turn needs `from` ('human' or 'gpt') and a string `value`."
            )
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"Turn {index} is from {speaker!r} but a {'human' if expected == 'user' else 'gpt'} turn was "
                "expected: user and assistant turns must alternate, starting with the user."
            )
        content = [{"type": "text", "text": value}]
        if role == "user" and image_placeholder in value:
            num_images += value.count(image_placeholder)
            entry = {"type": "image"} if image is None else {"type": "image", "image": image}
            content = [entry, {"type": "text", "text": value.replace(image_placeholder, "").strip()}]
        messages.append({"role": role, "content": content})
    return messages, num_images


def build_vicuna_v1_prompt(
    conversations: Sequence[dict[str, str]],
    system_prompt: str = VICUNA_V1_SYSTEM,
    image_placeholder: str = IMAGE_PLACEHOLDER,
) -> VicunaPrompt:
    """Render LLaVA conversation turns as LLaVA-1.5 trains on them, with the processor's chat template.

    `"{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>"`; a
    trailing user turn ends with `"ASSISTANT:"`. See [`conversation_to_messages`] for how turns become messages.
    """
    messages, num_images = conversation_to_messages(conversations, system_prompt, image_placeholder)
    (text,), (spans,) = render_jinja_template(
        [messages],
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
        return_assistant_tokens_mask=True,
        add_generation_prompt=messages[-1]["role"] == "user",
    )
    questions = [message["content"][-1]["text"].strip() for message in messages[1:] if message["role"] == "user"]
    return VicunaPrompt(text, [tuple(span) for span in spans], questions, num_images)


# ---------------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------------


# [`LlavaConversationDataset`] lives in `training_data` with the lazy JSON reading, bad-sample skipping and modality
# grouping that training at LLaVA-1.5's scale needs; it is imported above and exported here as before.


# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LlavaTrimDataCollator:
    """Turn LLaVA conversation records into a training batch for `LlavaTrimForConditionalGeneration`.

    Each record becomes chat messages ([`conversation_to_messages`]) that the model's processor renders with its
    chat template and tokenises exactly as at inference (LLaVA's `tokenizer_image_token`), giving:

    - `input_ids` / `attention_mask` `(batch, length)`, right-padded: the image placeholder expanded to
      `image_seq_length` image tokens (the model compacts them to what TRIM keeps);
    - `labels` `(batch, length)`: the token ids of every assistant answer and its closing `</s>` (the chat template's
      `{% generation %}` blocks, through `return_assistant_tokens_mask`), `-100` elsewhere (system prompt, user
      turns, role names, image tokens, padding), as LLaVA-1.5's `preprocess_v1`;
    - `pixel_values` `(num_images, 3, H, W)` for the rows with an image, in row order;
    - `trim_input_ids` / `trim_attention_mask` `(num_images, <=77)`: TRIM's question for each image, CLIP-tokenised.

    TRIM's question follows the processor's rule (`trim_question="first"`, the default): the text of the user turn
    that carries the image, which in LLaVA's data is the first user turn; one selection serves all the answers of the
    conversation, as at inference over a chat. `trim_question="last"` uses the last user turn instead.

    Args:
        tokenizer: the Llama tokenizer (a fast tokenizer holding `image_token` as one token, like the converted
            checkpoints' tokenizer).
        clip_tokenizer: CLIP's tokenizer, for TRIM's question.
        image_processor: the image processor (LLaVA's, or CLIP's: the processor turns it into LLaVA's).
        image_token (`str`): the image placeholder, in the records and in the tokenizer.
        image_seq_length (`int`): image tokens per image (576 for CLIP ViT-L/14 at 336 px).
        system_prompt (`str`): the system sentence of the template.
        trim_question (`str`): `"first"` (the processor's rule) or `"last"` user turn.
        pad_to_square (`bool`): pad images to a square with the image mean colour first (LLaVA-1.5's default).
        max_length (`int`, *optional*): truncate longer sequences (image tokens counted); an image cut by the limit is
            an error.
    """

    tokenizer: Any
    clip_tokenizer: Any
    image_processor: Any
    image_token: str = IMAGE_PLACEHOLDER
    image_seq_length: int = 576
    system_prompt: str = VICUNA_V1_SYSTEM
    trim_question: str = "first"
    pad_to_square: bool = True
    max_length: int | None = None

    def __post_init__(self):
        if self.trim_question not in ("first", "last"):
            raise ValueError(f"`trim_question` must be 'first' or 'last', got {self.trim_question!r}.")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "The collator needs a fast (tokenizers-backed) Llama tokenizer to align labels with the prompt: load "
                "it with `AutoTokenizer.from_pretrained(...)` (the default)."
            )
        self.processor = self._build_processor()
        self.image_token_id = self.processor.image_token_id

    def _build_processor(self) -> LlavaTrimProcessor:
        return LlavaTrimProcessor(
            self.image_processor,
            self.tokenizer,
            self.clip_tokenizer,
            image_token=self.image_token,
            image_seq_length=self.image_seq_length,
        )

    @classmethod
    def from_processor(cls, processor, **kwargs) -> "LlavaTrimDataCollator":
        """Build from a [`LlavaTrimProcessor`] (its tokenizer, CLIP tokenizer, image processor and image token); a
        [`LlavaNextTrimProcessor`] gives a [`LlavaNextTrimDataCollator`] with its conversation and grid pinpoints."""
        kwargs.setdefault("image_token", getattr(processor, "image_token", IMAGE_PLACEHOLDER))
        kwargs.setdefault("image_seq_length", getattr(processor, "image_seq_length", 576))
        if is_next_processor(processor) and not issubclass(cls, LlavaNextTrimDataCollator):
            cls = LlavaNextTrimDataCollator
        if issubclass(cls, LlavaNextTrimDataCollator):
            kwargs.setdefault("conversation", processor.conversation)
            kwargs.setdefault("image_grid_pinpoints", processor.image_processor.image_grid_pinpoints)
        return cls(processor.tokenizer, processor.clip_tokenizer, processor.image_processor, **kwargs)

    def _images_kwargs(self) -> dict:
        """The image processor options of a batch: LLaVA-1.5's pad to a square (or not)."""
        return {"do_pad": self.pad_to_square}

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.processor.image_seq_length != self.image_seq_length:  # set after construction (the model's value)
            self.processor = self._build_processor()
        chats, trim_text = [], []
        for example in examples:
            has_image = example.get("image") is not None
            messages, num_images = conversation_to_messages(
                example["conversations"], self.system_prompt, self.image_token, example.get("image")
            )
            if num_images != int(has_image):
                raise ValueError(
                    f"Record {example.get('id')!r} has {'an' if has_image else 'no'} image and {num_images} "
                    f"{self.image_token!r} placeholder(s) in its turns: a record with an image needs exactly one "
                    f"{self.image_token!r} in a human turn, and one without an image none."
                )
            chats.append(messages)
            last_question = [m["content"][-1]["text"] for m in messages if m["role"] == "user"][-1].strip()
            trim_text.append(last_question if self.trim_question == "last" and has_image else None)

        batch = self.processor.apply_chat_template(
            chats,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors=None,  # lists: the assistant mask is read token by token
            processor_kwargs={
                "padding": True,
                "padding_side": "right",  # for training
                "truncation": self.max_length is not None,
                "max_length": self.max_length,
                "images_kwargs": self._images_kwargs(),
                "trim_text": None if self.trim_question == "first" else trim_text,
            },
        )
        batch = batch.convert_to_tensors("pt")
        supervised = batch.pop("assistant_masks").bool()  # (batch, length)
        batch["labels"] = batch["input_ids"].masked_fill(~supervised, IGNORE_INDEX)
        if "trim_input_ids" in batch:  # CLIP rows padded to the batch's longest question, not to 77
            width = int(batch["trim_attention_mask"].sum(dim=1).max())
            batch["trim_input_ids"] = batch["trim_input_ids"][:, :width]
            batch["trim_attention_mask"] = batch["trim_attention_mask"][:, :width]
        return dict(batch)


@dataclass
class LlavaNextTrimDataCollator(LlavaTrimDataCollator):
    """[`LlavaTrimDataCollator`] for `LlavaNextTrimForConditionalGeneration` (LLaVA-NeXT, anyres): the batch of
    [`LlavaNextTrimProcessor`], so each image becomes its overview and tiles (`pixel_values`
    `(num_images, max_crops, 3, 336, 336)`, `image_sizes` `(num_images, 2)`) and its `<image>` as many placeholders as
    the image has positions natively (overview, unpadded grid, newlines). Labels, padding, truncation and TRIM's
    question follow the same rules as LLaVA-1.5's.

    Args:
        conversation (`str`): the checkpoint's LLaVA conversation, `"vicuna_v1"` or `"mistral_instruct"`.
        image_grid_pinpoints (`list[list[int]]`, *optional*): the model's `image_grid_pinpoints` (LLaVA-NeXT's five
            by default); a CLIP image processor is turned into LLaVA-NeXT's with them.
        system_prompt (`str`, *optional*): defaults to the conversation's own (`vicuna_v1`'s sentence; none for
            `mistral_instruct`, as LLaVA's `conv_mistral_instruct`).
        other arguments: see [`LlavaTrimDataCollator`]; `pad_to_square` is LLaVA-1.5's and must stay `False`.
    """

    system_prompt: str | None = None
    pad_to_square: bool = False
    conversation: str = "vicuna_v1"
    image_grid_pinpoints: list | None = None

    def __post_init__(self):
        if self.conversation not in NEXT_CONVERSATIONS:
            raise ValueError(f"`conversation` must be one of {sorted(NEXT_CONVERSATIONS)}, got {self.conversation!r}.")
        if self.pad_to_square:
            raise ValueError(
                "`pad_to_square` is LLaVA-1.5's image layout: LLaVA-NeXT tiles each image (anyres); leave it False."
            )
        if self.system_prompt is None:
            self.system_prompt = VICUNA_V1_SYSTEM if self.conversation == "vicuna_v1" else ""
        self.image_processor = llava_next_image_processor(self.image_processor, self.image_grid_pinpoints)
        super().__post_init__()

    def _build_processor(self) -> LlavaNextTrimProcessor:
        return LlavaNextTrimProcessor(
            self.image_processor,
            self.tokenizer,
            self.clip_tokenizer,
            image_token=self.image_token,
            image_seq_length=self.image_seq_length,
            conversation=self.conversation,
        )

    def _images_kwargs(self) -> dict:
        return {}  # the image processor's own: the overview and the tiles of the best pinpoint, padded crops


# ---------------------------------------------------------------------------------------------------------------------
# What is trained
# ---------------------------------------------------------------------------------------------------------------------


def configure_trainable_parameters(model, train_language_model: bool = True, train_projector: bool = True) -> int:
    """Freeze the model except the multimodal projector and the language model (LLaVA-1.5's fine-tuning recipe).

    The CLIP vision tower, the CLIP text tower and CLIP's projections (`model.trim_scorer`, TRIM's scorer) are frozen
    here, explicitly (a loaded model has every parameter trainable, as transformers models do), and so is anything
    else that is neither the projector nor the language model. TRIM's choice is a hard selection that no gradient
    flows through, and the scorer must keep matching the vision features it was trained with. LLaVA-NeXT's
    `image_newline` is trained with the projector (LLaVA-NeXT trains it with the model). Returns the number of
    trainable parameters.
    """
    model.requires_grad_(False)  # the CLIP vision tower and `trim_scorer` stay so; the rest is switched on below
    model.model.multi_modal_projector.requires_grad_(train_projector)
    if isinstance(getattr(model.model, "image_newline", None), torch.nn.Parameter):  # LLaVA-NeXT
        model.model.image_newline.requires_grad_(train_projector)
    model.model.language_model.requires_grad_(train_language_model)
    model.lm_head.requires_grad_(train_language_model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_lora(model, r: int = 128, alpha: int = 256, dropout: float = 0.05, train_projector: bool = True):
    """Wrap `model` with LoRA adapters on the Llama decoder's projections (LLaVA-1.5's LoRA recipe: r=128, alpha=256).

    Everything else is frozen; the multimodal projector is trained in full (a `peft` `modules_to_save` copy) unless
    `train_projector=False`. LLaVA-NeXT's `image_newline` (a bare parameter, which `peft` cannot save beside the
    adapter) stays as it is. Returns the `peft` model.
    """
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=["multi_modal_projector"] if train_projector else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


class LlavaTrimTrainer(Trainer):
    """`Trainer` with LLaVA's `group_by_modality_length` and bad samples left out of the steps.

    A batch holding bad samples trains on its good rows ([`SkipBadSamples`]); an optimiser step whose batches have no
    supervised token on any process (every sample skipped) is not taken: it adds nothing to the loss, the step count,
    the learning-rate schedule or the optimiser state. `skipped_samples` (summed over the processes) is in every
    training log. With gradient accumulation, the last accumulation group of an epoch that had such a step is not
    applied (the Trainer's loop counts micro-batches), so keep the data's bad samples rare there.
    """

    def __init__(self, *args, group_by_modality_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_by_modality_length = group_by_modality_length
        self.skipped_samples = 0  # on this process
        self.skipped_steps = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        lengths = getattr(dataset, "modality_lengths", None)
        if lengths is None:
            raise ValueError(
                "group_by_modality_length needs the dataset's `modality_lengths` (LlavaConversationDataset has them)."
            )
        args = self.args
        group_size = args.train_batch_size * args.world_size * args.gradient_accumulation_steps
        return ModalityGroupedSampler(lengths, group_size, seed=args.data_seed or args.seed)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of the next optimiser step, leaving out steps with nothing to learn from."""
        while True:
            batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            self.skipped_samples += sum(int(batch.pop("num_skipped_samples", 0)) for batch in batches)
            if not batches or "labels" not in batches[0]:
                return batches, num_items_in_batch
            supervised = torch.tensor(sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches))
            if self.args.world_size > 1:  # every process takes the same decision
                supervised = self.accelerator.reduce(supervised.to(self.args.device), reduction="sum")
            if int(supervised) > 0:
                return batches, num_items_in_batch
            self.skipped_steps += 1
            logger.warning("every sample of an optimiser step was skipped: the step is not taken")

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs or "train_loss" in logs:  # a training log: every process is here, so the count is summed
            count = torch.tensor(self.skipped_samples, device=self.args.device)
            logs["skipped_samples"] = int(self.accelerator.reduce(count, reduction="sum"))
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Command line: LLaVA's train.py flags (see `finetune_args`)
# ---------------------------------------------------------------------------------------------------------------------


# the `--version` names of LLaVA's train.py for each conversation
VERSIONS = {"vicuna_v1": ("v1", "vicuna_v1"), "mistral_instruct": ("mistral_instruct",)}


def is_next_processor(processor) -> bool:
    """Whether `processor` is a [`LlavaNextTrimProcessor`] (this package's, or the copy a folder's remote code
    loads)."""
    return any(klass.__name__ == "LlavaNextTrimProcessor" for klass in type(processor).__mro__)


def is_llava_next(config) -> bool:
    """Whether `config` describes a LLaVA-NeXT (anyres) model."""
    return getattr(config, "model_type", None) == "llava_next_trim"


def check_architecture_flags(args: FinetuneArguments, config, conversation: str = "vicuna_v1") -> None:
    """Refuse, in one sentence, LLaVA flags that contradict the model (`config`, whose processor speaks
    `conversation`); accept those that describe it. LLaVA-NeXT's train.py adds `--image_aspect_ratio anyres`,
    `--mm_patch_merge_type spatial_unpad` and `--image_grid_pinpoints`."""
    flags = args.model
    next_model = is_llava_next(config)
    if flags.version is not None and flags.version not in VERSIONS[conversation]:
        if not next_model:
            raise ValueError(
                f"--version {flags.version}: this tool trains LLaVA-1.5's second stage with its vicuna_v1 template "
                "(--version v1)."
            )
        raise ValueError(
            f"--version {flags.version}: the model's conversation is {conversation} (--version "
            f"{VERSIONS[conversation][0]})."
        )
    check_layout_flags(args, config)
    if flags.mm_use_im_start_end or flags.mm_use_im_patch_token:
        raise ValueError(
            "--mm_use_im_start_end / --mm_use_im_patch_token True: LLaVA-1.5 (and this model) has no such tokens; "
            "pass False."
        )
    activation = getattr(config, "projector_hidden_act", None)
    if flags.mm_projector_type is not None and flags.mm_projector_type != f"mlp2x_{activation}":
        raise ValueError(
            f"--mm_projector_type {flags.mm_projector_type}: the model's projector is mlp2x_{activation}."
        )
    if flags.mm_vision_select_layer is not None and flags.mm_vision_select_layer != config.vision_feature_layer:
        raise ValueError(
            f"--mm_vision_select_layer {flags.mm_vision_select_layer}: the model reads the vision tower's layer "
            f"{config.vision_feature_layer}."
        )
    feature = {"default": "patch", "full": "cls_patch"}.get(config.vision_feature_select_strategy)
    if flags.mm_vision_select_feature is not None and flags.mm_vision_select_feature != feature:
        raise ValueError(f"--mm_vision_select_feature {flags.mm_vision_select_feature}: the model uses {feature}.")
    if flags.mm_vision_token_reduce_func is not None:
        wanted = args.trim.ratio if args.trim.trim_ratio is not None else config.trim_ratio
        if reduce_func_ratio(flags.mm_vision_token_reduce_func) != wanted:
            raise ValueError(
                f"--mm_vision_token_reduce_func {flags.mm_vision_token_reduce_func} contradicts the trim_ratio "
                f"{wanted} the model trains with: pass --trim_ratio to choose another one."
            )


def check_layout_flags(args: FinetuneArguments, config) -> None:
    """Refuse, in one sentence, an image layout (`--image_aspect_ratio`, `--mm_patch_merge_type`,
    `--image_grid_pinpoints`) that is not the model's: LLaVA-1.5's one square per image or LLaVA-NeXT's anyres."""
    aspect, merge, pinpoints = (
        args.data.image_aspect_ratio,
        args.model.mm_patch_merge_type,
        args.data.image_grid_pinpoints,
    )
    if not is_llava_next(config):
        if aspect == "anyres":
            raise ValueError(
                "--image_aspect_ratio anyres: the model is LLaVA-1.5 (one 336 px square per image); anyres is "
                "LLaVA-NeXT's, so pass pad (or square)."
            )
        if merge not in (None, "flat"):
            raise ValueError(f"--mm_patch_merge_type {merge}: the model is LLaVA-1.5, whose features are flat.")
        if pinpoints is not None:
            raise ValueError("--image_grid_pinpoints: the model is LLaVA-1.5, which does not tile images; drop it.")
        return
    if aspect not in (None, "anyres"):
        recipe = args.training.recipe
        raise ValueError(
            f"--image_aspect_ratio {aspect} contradicts the model: LLaVA-NeXT tiles each image at the best of its "
            "image_grid_pinpoints (anyres), so pass anyres or nothing"
            + (f" (--recipe {recipe} is LLaVA-1.5's and sets pad)." if recipe else ".")
        )
    if merge not in (None, "spatial_unpad"):
        raise ValueError(f"--mm_patch_merge_type {merge}: the model lays out its tiles as LLaVA-NeXT's spatial_unpad.")
    if pinpoints is not None and parse_pinpoints(pinpoints) != [list(pair) for pair in config.image_grid_pinpoints]:
        raise ValueError(
            f"--image_grid_pinpoints {pinpoints} is not the model's {config.image_grid_pinpoints}: drop the flag or "
            "pass the model's."
        )


def parse_pinpoints(text: str) -> list[list[int]]:
    """LLaVA-NeXT's `--image_grid_pinpoints` value, a list of `(height, width)` pairs such as
    `"[(336, 672), (672, 336)]"`, as a list of `[height, width]` lists."""
    import ast

    try:
        value = ast.literal_eval(text)
        pairs = [[int(height), int(width)] for height, width in value]
    except (ValueError, TypeError, SyntaxError):
        raise ValueError(
            f'--image_grid_pinpoints {text}: expected a list of (height, width) pairs, e.g. "[(336, 672), '
            '(672, 336), (672, 672), (1008, 336), (336, 1008)]".'
        ) from None
    return pairs


def reduce_func_ratio(value: str) -> float | None:
    """The `trim_ratio` of LLaVA-TRIM's `--mm_vision_token_reduce_func` (`"TRIM:-1"`, `"TextSim+:0.25"`)."""
    from ..conversion.sources import trim_ratio_from_source

    return trim_ratio_from_source({"mm_vision_token_reduce_func": value})


def build_stage2_start(args: FinetuneArguments) -> Path:
    """LLaVA-1.5's stage-2 start (Vicuna + CLIP + the pretrained projector) as a LLaVA-TRIM folder, written by the
    converter (`convert_checkpoint.py`) beside `--output_dir` (`<output_dir>-stage2-start`) by the first process, and
    reused when it is already there (a resumed run)."""
    from ..convert_checkpoint import build_parser as converter_parser
    from ..convert_checkpoint import convert

    flags = args.model
    if not (flags.vision_tower and flags.pretrain_mm_mlp_adapter):
        raise ValueError(
            "--vision_tower and --pretrain_mm_mlp_adapter go together with a Llama --model_name_or_path (LLaVA-1.5's "
            "stage-2 start); a converted LLaVA-TRIM folder needs neither."
        )
    projector = Path(flags.pretrain_mm_mlp_adapter)
    projector = projector.parent if projector.name == "mm_projector.bin" else projector
    folder = Path(str(args.training.output_dir).rstrip("/") + "-stage2-start")
    command = ["--language-model", flags.model_name_or_path, "--projector", str(projector)]
    command += ["--clip", flags.vision_tower, "--output", str(folder)]
    if args.trim.trim_ratio is not None or flags.mm_vision_token_reduce_func is not None:
        ratio = (
            args.trim.ratio
            if args.trim.trim_ratio is not None
            else reduce_func_ratio(flags.mm_vision_token_reduce_func)
        )
        command += ["--trim-ratio", "none" if ratio is None else str(ratio)]
    with args.training.main_process_first(local=False, desc="building the stage-2 start"):
        if not (folder / "config.json").is_file():
            from ..conversion import ConversionError

            try:
                convert(converter_parser().parse_args(command))
            except ConversionError as error:
                raise ValueError(f"Building the stage-2 start failed: {error}") from None
    return folder


def load_preprocessing(args: FinetuneArguments, model_path: str | Path):
    """The processor saved with the model, or the three pieces named on the command line: `(processor, pieces)`."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    flags = args.model
    pieces = (flags.tokenizer, flags.clip_tokenizer, flags.image_processor)
    if all(pieces):
        return None, (
            AutoTokenizer.from_pretrained(flags.tokenizer),
            AutoTokenizer.from_pretrained(flags.clip_tokenizer),
            AutoImageProcessor.from_pretrained(flags.image_processor),
        )
    if any(pieces):
        raise ValueError("Pass all three of --tokenizer, --clip_tokenizer and --image_processor, or none of them.")
    try:
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the processor of {model_path} ({error}). Point --tokenizer, --clip_tokenizer and "
            "--image_processor at the preprocessing folders instead."
        ) from error
    return processor, (processor.tokenizer, processor.clip_tokenizer, processor.image_processor)


def main(argv: Sequence[str] | None = None):
    """Run fine-tuning from the command line (`python -m llava_trim.tools.finetune --help`); returns the Trainer.

    A refused or failed run ends with one line on stderr (exit status 1), writes no model, and leaves no empty
    output folder behind."""
    args = parse_args(argv)
    output = Path(args.training.output_dir)
    existed = output.exists()
    try:
        return train(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        if not existed:
            _remove_empty_folders(output)
        raise SystemExit(f"error: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    """An error's message on one line; for one raised in a data loader worker, the worker's own message."""
    message = str(error)
    if "Original Traceback" in message:  # torch re-raises a worker's error with the worker's traceback as message
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split())


def _remove_empty_folders(folder: Path) -> None:
    """Remove `folder` if it (and every folder inside) holds no file."""
    if folder.is_dir() and not any(path.is_file() for path in folder.rglob("*")):
        shutil.rmtree(folder)


def train(args: FinetuneArguments, callbacks: Sequence | None = None):
    """Fine-tune as [`parse_args`]'s arguments say, save the result (one process writes it) and return the Trainer."""
    from transformers import AutoConfig, AutoModelForImageTextToText, set_seed

    training_args = args.training
    set_seed(training_args.seed)
    output = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume in ("last", "True", "true"):
        if not any(output.glob("checkpoint-*")):
            raise FileNotFoundError(
                f"--resume: no checkpoint-N folder in {output}; run with --save_strategy steps --save_steps N to "
                "write checkpoints."
            )
        resume = True
    # the data first: a missing or broken file is named before the model is loaded
    dataset = LlavaConversationDataset(
        args.data.data_path, args.data.image_folder, skip_bad_samples=training_args.skip_bad_samples
    )
    model_path = build_stage2_start(args) if args.model.builds_stage2_start else args.model.model_name_or_path
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
    processor, (tokenizer, clip_tokenizer, image_processor) = load_preprocessing(args, model_path)
    next_model = is_llava_next(config)
    if processor is not None:
        conversation = getattr(processor, "conversation", "vicuna_v1")
    else:  # the three pieces: the converter's choice, `mistral_instruct` for a Mistral language model
        mistral = next_model and getattr(config.text_config, "model_type", None) == "mistral"
        conversation = "mistral_instruct" if mistral else "vicuna_v1"
    check_architecture_flags(args, config, conversation)
    if processor is not None and next_model != is_next_processor(processor):
        raise ValueError(
            f"{model_path} holds a {'LLaVA-NeXT' if next_model else 'LLaVA-1.5'} model but a "
            f"{type(processor).__name__}: convert the checkpoint again so that both are saved together."
        )
    collator_kwargs = {"trim_question": args.trim.trim_question, "max_length": training_args.model_max_length}
    if args.data.system_prompt is not None:
        collator_kwargs["system_prompt"] = args.data.system_prompt
    if next_model:
        collator_kwargs.update(conversation=conversation, image_grid_pinpoints=config.image_grid_pinpoints)
    else:
        collator_kwargs["pad_to_square"] = args.data.pad_to_square
    collator_class = LlavaNextTrimDataCollator if next_model else LlavaTrimDataCollator
    if processor is not None:
        collator = collator_class.from_processor(processor, **collator_kwargs)
    else:
        collator = collator_class(tokenizer, clip_tokenizer, image_processor, **collator_kwargs)
    if next_model and collator.image_processor.image_grid_pinpoints != config.image_grid_pinpoints:
        raise ValueError(
            f"The image processor tiles at {collator.image_processor.image_grid_pinpoints} but the model at "
            f"{config.image_grid_pinpoints}: use the image processor saved with the model."
        )

    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # joins the process group (accelerate does so itself on GPUs, not on CPU)
    # LoRA keeps the frozen base in bfloat16; full fine-tuning keeps float32 master weights under mixed precision
    lora = training_args.lora_enable
    dtype = torch.bfloat16 if training_args.bf16 and lora else torch.float32
    model_kwargs = {"dtype": dtype, "trust_remote_code": True}
    if args.model.attn_implementation:
        model_kwargs["attn_implementation"] = args.model.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_path, **model_kwargs)
    if args.trim.trim_ratio is not None:
        model.config.trim_ratio = args.trim.ratio
    model.config.use_cache = False
    collator.image_seq_length = model.config.image_seq_length
    if collator.image_token_id != model.config.image_token_id:
        raise ValueError(
            f"The tokenizer's {collator.image_token!r} is id {collator.image_token_id} but the model expects "
            f"{model.config.image_token_id}: use the tokenizer saved with the model."
        )

    train_language_model = not args.model.freeze_backbone
    if lora:
        r, alpha, dropout = training_args.lora_r, training_args.lora_alpha, training_args.lora_dropout
        model = apply_lora(model, r, alpha, dropout, train_language_model)
    else:
        configure_trainable_parameters(model, train_language_model=train_language_model)

    if world_size() > 1 and training_args.world_size != world_size():
        raise RuntimeError(
            f"Launched as {world_size()} processes but the Trainer runs as {training_args.world_size}: launch with "
            "torchrun or `accelerate launch --multi_gpu` so that the processes form one group."
        )
    if training_args.process_index == 0:
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: ds_numel
        trainable, total = sum(size for size, trained in sizes if trained), sum(size for size, _ in sizes)
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        batch, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
        print(
            f"{training_args.world_size} process(es) x batch {batch} x accumulation {accumulation} = "
            f"{training_args.world_size * batch * accumulation} samples per optimiser step"
        )

    trainer = LlavaTrimTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=SkipBadSamples(collator) if training_args.skip_bad_samples else collator,
        processing_class=processor,
        callbacks=list(callbacks or []),
        group_by_modality_length=training_args.group_by_modality_length,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        raise RuntimeError(
            "--fsdp: the Trainer did not shard the model: accelerate runs FSDP on GPUs (or other accelerators) with "
            "several processes only. Launch with torchrun / accelerate launch on GPUs, or drop --fsdp for plain data "
            "parallelism."
        )
    if training_args.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError("--deepspeed: the Trainer did not start DeepSpeed; is `deepspeed` installed?")
    first_step = trainer.state.global_step
    try:
        trainer.train(resume_from_checkpoint=resume)
    except BadSampleError as error:
        raise ValueError(f"{_one_line(error)} (--no_skip_bad_samples stops at the first bad sample.)") from None
    skipped = int(
        trainer.accelerator.reduce(torch.tensor(trainer.skipped_samples, device=training_args.device), "sum")
    )
    if trainer.state.global_step == first_step and skipped:
        raise ValueError(
            f"No usable record: all {skipped} samples read were skipped (see the warnings above), so nothing was "
            "trained and no model was written; fix the data or --image_folder."
        )

    model.config.use_cache = True
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        trainer.save_model(str(output))  # every process takes part in gathering the sharded weights
        if trainer.is_world_process_zero() and processor is not None:
            processor.save_pretrained(output)
    elif trainer.is_world_process_zero():
        save_finetuned(trainer.model, output, processor)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        print(f"skipped {skipped} bad sample(s)")
        print(f"saved the fine-tuned model to {output}")
        if training_args.push_to_hub:
            trainer.push_to_hub()
    return trainer


def save_finetuned(model, output: str | Path, processor=None) -> Path:
    """Save a fine-tuned model as a loadable repository (code files included); LoRA is merged, its adapter kept.

    With a `peft` model, the adapter goes to `output/lora_adapter` and the merged model to `output`, so that
    `AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True)` loads the result either way.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(output / "lora_adapter")
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(output)
    if processor is not None:
        processor.save_pretrained(output)
    return output


__all__ = [
    "IGNORE_INDEX",
    "LlavaTrimTrainer",
    "LLAVA_V1_SYSTEM",
    "LORA_TARGET_MODULES",
    "LlavaConversationDataset",
    "LlavaNextTrimDataCollator",
    "LlavaTrimDataCollator",
    "QUANTIZATION_SKIP_MODULES",
    "VICUNA_V1_SYSTEM",
    "VicunaPrompt",
    "apply_lora",
    "build_parser",
    "build_stage2_start",
    "build_vicuna_v1_prompt",
    "configure_trainable_parameters",
    "conversation_to_messages",
    "check_architecture_flags",
    "check_layout_flags",
    "is_llava_next",
    "is_next_processor",
    "parse_pinpoints",
    "load_preprocessing",
    "main",
    "parse_args",
    "reduce_func_ratio",
    "save_finetuned",
    "train",
]


if __name__ == "__main__":
    main()
