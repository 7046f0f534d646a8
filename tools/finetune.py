# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune LLaVA-1.5 with TRIM in the loop, with `transformers.Trainer` (optionally LoRA through `peft`).

Data is LLaVA's conversation JSON (a list of records, or one record per line):

```json
[{"id": "0", "image": "coco/0001.jpg",
  "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                    {"from": "gpt", "value": "A bowl of fruit."}]}]
```

Reading order: the prompt ([`build_vicuna_v1_prompt`]), the collator ([`LlavaTrimDataCollator`]: prompt -> token
ids, labels, pixels and TRIM's question), what is trained ([`configure_trainable_parameters`], [`apply_lora`]), the
Trainer ([`LlavaTrimTrainer`]), then the command line ([`parse_args`], [`train`]). The dataset, bad-sample skipping and
modality grouping are in `training_data`, the `--recipe` presets and DeepSpeed/FSDP configs in `recipes`.

```bash
python -m llava_trim.tools.finetune --model llava-v1.5-7b-trim --data llava_v1_5_mix665k.json \
    --image-folder data/ --output llava-trim-ft --lora --bf16 --gradient-checkpointing
# the TRIM paper's recipe on 8 GPUs
torchrun --nproc_per_node 8 -m llava_trim.tools.finetune --recipe llava-v1.5 --deepspeed zero3 \
    --model llava-v1.5-7b-trim-init --data llava_v1_5_mix665k.json --image-folder data/ --output llava-trim-ft
```
"""

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.utils.chat_template_utils import render_jinja_template

from ..configuration_llava_trim import check_trim_ratio
from ..processing_llava_trim import (
    LLAVA_V1_SYSTEM,
    VICUNA_V1_CHAT_TEMPLATE,
    VICUNA_V1_SYSTEM,
    LlavaTrimProcessor,
)
from .recipes import DEEPSPEED_CONFIGS, FSDP_CONFIGS, RECIPES, config_path
from .training_data import LlavaConversationDataset, ModalityGroupedSampler, SkipBadSamples

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
        """Build from a [`LlavaTrimProcessor`] (its tokenizer, CLIP tokenizer, image processor and image token)."""
        kwargs.setdefault("image_token", getattr(processor, "image_token", IMAGE_PLACEHOLDER))
        kwargs.setdefault("image_seq_length", getattr(processor, "image_seq_length", 576))
        return cls(processor.tokenizer, processor.clip_tokenizer, processor.image_processor, **kwargs)

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
                "images_kwargs": {"do_pad": self.pad_to_square},
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


# ---------------------------------------------------------------------------------------------------------------------
# What is trained
# ---------------------------------------------------------------------------------------------------------------------


def configure_trainable_parameters(model, train_language_model: bool = True, train_projector: bool = True) -> int:
    """Freeze the model except the multimodal projector and the language model (LLaVA-1.5's fine-tuning recipe).

    The CLIP vision tower, the CLIP text tower and CLIP's projections (`model.trim_scorer`, TRIM's scorer) are frozen
    here, explicitly (a loaded model has every parameter trainable, as transformers models do), and so is anything
    else that is neither the projector nor the language model. TRIM's choice is a hard selection that no gradient
    flows through, and the scorer must keep matching the vision features it was trained with. Returns the number of
    trainable parameters.
    """
    model.requires_grad_(False)  # the CLIP vision tower and `trim_scorer` stay so; the rest is switched on below
    model.model.multi_modal_projector.requires_grad_(train_projector)
    model.model.language_model.requires_grad_(train_language_model)
    model.lm_head.requires_grad_(train_language_model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def apply_lora(model, r: int = 128, alpha: int = 256, dropout: float = 0.05, train_projector: bool = True):
    """Wrap `model` with LoRA adapters on the Llama decoder's projections (LLaVA-1.5's LoRA recipe: r=128, alpha=256).

    Everything else is frozen; the multimodal projector is trained in full (a `peft` `modules_to_save` copy) unless
    `train_projector=False`. Returns the `peft` model.
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
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _parse_trim_ratio(value: str) -> float | str | None:
    """`--trim-ratio`: 'config' (keep the model's), 'none'/'off', or a number (validated by the model's config)."""
    if value.lower() == "config":
        return "config"
    if value.lower() in ("none", "off"):
        return None
    return float(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_trim.tools.finetune",
        description="Fine-tune a LLaVA-TRIM model on LLaVA conversation data with transformers.Trainer. Run it "
        "with torchrun or accelerate launch for several processes or machines.",
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="Preset hyperparameters: 'llava-v1.5' is LLaVA-1.5's fine-tuning stage as the TRIM paper trains it "
        "(every other flag given still wins).",
    )
    parser.add_argument("--model", required=True, help="Model folder or Hub id (a converted LLaVA-TRIM repository).")
    parser.add_argument("--data", required=True, help="LLaVA conversation JSON (list of records, or JSON lines).")
    parser.add_argument("--image-folder", default=None, help="Folder the records' image paths are relative to.")
    parser.add_argument("--output", required=True, help="Where to write the fine-tuned model and processor.")
    parser.add_argument("--lora", action="store_true", help="Train LoRA adapters (and the projector) instead.")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--lora-alpha", type=int, default=256)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--freeze-language-model", action="store_true", help="Train the projector only.")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--bf16", action=flag, default=False, help="bfloat16 mixed precision.")
    parser.add_argument("--tf32", action=flag, default=None, help="TF32 matmuls (Ampere or newer NVIDIA GPUs).")
    parser.add_argument("--gradient-checkpointing", action=flag, default=False)
    parser.add_argument(
        "--trim-ratio",
        type=_parse_trim_ratio,
        default="config",
        help="TRIM mode while training, saved in the model's config: -1 (automatic), a fraction, or 'none' "
        "(default: the model's config).",
    )
    parser.add_argument("--trim-question", choices=("first", "last"), default="first")
    parser.add_argument("--system-prompt", default=VICUNA_V1_SYSTEM)
    parser.add_argument("--pad-to-square", action=flag, default=True, help="Pad images to a square (LLaVA's 'pad').")
    parser.add_argument("--max-length", type=int, default=2048, help="Token limit, image tokens counted.")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=4, help="Per device.")
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=None, help="Default: from --global-batch-size, or 1."
    )
    parser.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Samples per optimiser step over all processes: sets the accumulation to GLOBAL / (batch size x "
        "processes), so a recipe keeps its batch on any number of GPUs.",
    )
    parser.add_argument("--learning-rate", type=float, default=None, help="Default: 2e-5, or 2e-4 with --lora.")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument(
        "--group-by-modality-length",
        action=flag,
        default=False,
        help="Batch text-only samples apart from image samples, similar lengths together (LLaVA's option).",
    )
    parser.add_argument(
        "--skip-bad-samples",
        action=flag,
        default=True,
        help="Skip (and count in the log) samples with a missing or unreadable image, no answer, or a prompt over "
        "--max-length with its image; --no-skip-bad-samples stops at the first one instead.",
    )
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="Also save a checkpoint every N steps (0: never).")
    parser.add_argument("--save-total-limit", type=int, default=None, help="Keep only the last N checkpoints.")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="Continue from the last checkpoint in OUTPUT/checkpoints (or from the CHECKPOINT folder given).",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-workers", type=int, default=0, help="Data loader worker processes.")
    parser.add_argument("--attn-implementation", default=None, help="'sdpa' (default), 'eager', 'flash_attention_2'.")
    parser.add_argument(
        "--deepspeed",
        default=None,
        help=f"DeepSpeed config: {' or '.join(DEEPSPEED_CONFIGS)} (shipped in configs/) or a JSON file.",
    )
    parser.add_argument(
        "--fsdp",
        default=None,
        help=f"Fully sharded data parallel with this FSDP config: {' or '.join(FSDP_CONFIGS)} (shipped in configs/) "
        "or a JSON file of the Trainer's `fsdp_config`.",
    )
    parser.add_argument("--tokenizer", default=None, help="Llama tokenizer folder, when --model has no processor.")
    parser.add_argument("--clip-tokenizer", default=None, help="CLIP tokenizer folder, when --model has no processor.")
    parser.add_argument("--image-processor", default=None, help="CLIP image processor folder, likewise.")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line, `--recipe` presets first: flags given explicitly override the recipe."""
    parser = build_parser()
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    known, _ = recipe.parse_known_args(argv)
    if known.recipe is not None:
        parser.set_defaults(**RECIPES[known.recipe])
    args = parser.parse_args(argv)
    if args.trim_ratio != "config":
        try:
            check_trim_ratio(args.trim_ratio)
        except ValueError as error:
            parser.error(str(error))
    try:
        args.gradient_accumulation_steps = gradient_accumulation_steps(args, world_size())
        if args.deepspeed is not None:
            args.deepspeed = config_path(args.deepspeed, DEEPSPEED_CONFIGS)
        if args.fsdp is not None:
            args.fsdp = config_path(args.fsdp, FSDP_CONFIGS)
    except ValueError as error:
        parser.error(str(error))
    if args.deepspeed is not None and args.fsdp is not None:
        parser.error("Use one of --deepspeed and --fsdp.")
    if args.lora and (args.deepspeed is not None or args.fsdp is not None):
        parser.error(
            "--lora with --deepspeed or --fsdp is not supported by this tool (the adapter is merged on one process): "
            "train LoRA with plain data parallelism (torchrun / accelerate launch without them)."
        )
    return args


def world_size() -> int:
    """The number of training processes, as torchrun and accelerate launch announce it (`WORLD_SIZE`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation_steps(args: argparse.Namespace, processes: int) -> int:
    """The accumulation that gives `--global-batch-size` samples per step (or `--gradient-accumulation-steps`)."""
    if args.global_batch_size is None:
        return args.gradient_accumulation_steps or 1
    per_step = args.batch_size * processes
    steps, remainder = divmod(args.global_batch_size, per_step)
    if remainder or steps == 0:
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --batch-size {args.batch_size} x "
            f"{processes} process(es): change one of them."
        )
    if args.gradient_accumulation_steps not in (None, steps):
        raise ValueError(
            f"--gradient-accumulation-steps {args.gradient_accumulation_steps} with --batch-size {args.batch_size} on "
            f"{processes} process(es) does not give --global-batch-size {args.global_batch_size} (that needs "
            f"{steps}): drop one of the two."
        )
    return steps


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def load_preprocessing(args: argparse.Namespace):
    """The processor saved with the model, or the three pieces named on the command line: `(processor, pieces)`."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    pieces = (args.tokenizer, args.clip_tokenizer, args.image_processor)
    if all(pieces):
        return None, (
            AutoTokenizer.from_pretrained(args.tokenizer),
            AutoTokenizer.from_pretrained(args.clip_tokenizer),
            AutoImageProcessor.from_pretrained(args.image_processor),
        )
    if any(pieces):
        raise ValueError("Pass all three of --tokenizer, --clip-tokenizer and --image-processor, or none of them.")
    try:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the processor of {args.model} ({error}). Point --tokenizer, --clip-tokenizer and "
            "--image-processor at the preprocessing folders instead."
        ) from error
    return processor, (processor.tokenizer, processor.clip_tokenizer, processor.image_processor)


class LlavaTrimTrainer(Trainer):
    """`Trainer` with LLaVA's `group_by_modality_length` and the count of skipped bad samples in its logs."""

    def __init__(self, *args, group_by_modality_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_by_modality_length = group_by_modality_length
        self.skipped_samples = 0  # on this process

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

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.skipped_samples += int(inputs.pop("num_skipped_samples", 0))
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: every process is here, so the count is summed over them
            count = torch.tensor(self.skipped_samples, device=self.args.device)
            logs["skipped_samples"] = int(self.accelerator.reduce(count, reduction="sum"))
        super().log(logs, *args, **kwargs)


def main(argv: Sequence[str] | None = None):
    """Run fine-tuning from the command line (`python -m llava_trim.tools.finetune --help`); returns the Trainer."""
    return train(parse_args(argv))


def train(args: argparse.Namespace, callbacks: Sequence | None = None):
    """Fine-tune as [`parse_args`]'s arguments say, save the result (one process writes it) and return the Trainer."""
    from transformers import AutoModelForImageTextToText, TrainingArguments, set_seed

    set_seed(args.seed)
    output = Path(args.output)
    processor, (tokenizer, clip_tokenizer, image_processor) = load_preprocessing(args)
    collator_kwargs = {
        "system_prompt": args.system_prompt,
        "trim_question": args.trim_question,
        "pad_to_square": args.pad_to_square,
        "max_length": args.max_length,
    }
    if processor is not None:
        collator = LlavaTrimDataCollator.from_processor(processor, **collator_kwargs)
    else:
        collator = LlavaTrimDataCollator(tokenizer, clip_tokenizer, image_processor, **collator_kwargs)

    # the Trainer's arguments come first: with DeepSpeed ZeRO-3 they make `from_pretrained` load the weights sharded
    training_args = TrainingArguments(
        output_dir=str(output / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate or (2e-4 if args.lora else 2e-5),
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a number below 1 is a fraction of the training steps
        lr_scheduler_type=args.lr_scheduler,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        save_total_limit=args.save_total_limit,
        bf16=args.bf16,
        tf32=args.tf32,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        dataloader_num_workers=args.num_workers,
        # a text-only batch leaves the projector without gradient on its process; DDP must look for that
        ddp_find_unused_parameters=True,
        remove_unused_columns=False,  # the collator needs the raw records
        label_names=["labels"],
        report_to="none",
        seed=args.seed,
        use_cpu=not _accelerator_available(),
        deepspeed=args.deepspeed,
        fsdp=args.fsdp is not None,
        fsdp_config=args.fsdp,
    )
    if args.deepspeed is not None:
        import deepspeed

        deepspeed.init_distributed()  # joins the process group (accelerate does so itself on GPUs, not on CPU)
    # LoRA keeps the frozen base in bfloat16; full fine-tuning keeps float32 master weights under mixed precision
    dtype = torch.bfloat16 if args.bf16 and args.lora else torch.float32
    model_kwargs = {"dtype": dtype, "trust_remote_code": True}
    if args.attn_implementation:
        model_kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(args.model, **model_kwargs)
    if args.trim_ratio != "config":
        model.config.trim_ratio = args.trim_ratio
    model.config.use_cache = False
    collator.image_seq_length = model.config.image_seq_length
    if collator.image_token_id != model.config.image_token_id:
        raise ValueError(
            f"The tokenizer's {collator.image_token!r} is id {collator.image_token_id} but the model expects "
            f"{model.config.image_token_id}: use the tokenizer saved with the model."
        )

    if args.lora:
        model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, not args.freeze_language_model)
    else:
        configure_trainable_parameters(model, train_language_model=not args.freeze_language_model)

    if world_size() > 1 and training_args.world_size != world_size():
        raise RuntimeError(
            f"Launched as {world_size()} processes but the Trainer runs as {training_args.world_size}: launch with "
            "torchrun or `accelerate launch --multi_gpu` so that the processes form one group."
        )
    if training_args.process_index == 0:
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]  # ZeRO-3: ds_numel
        trainable, total = sum(size for size, trained in sizes if trained), sum(size for size, _ in sizes)
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        per_step = training_args.world_size * args.batch_size * args.gradient_accumulation_steps
        print(
            f"{training_args.world_size} process(es) x batch {args.batch_size} x accumulation "
            f"{args.gradient_accumulation_steps} = {per_step} samples per optimiser step"
        )

    dataset = LlavaConversationDataset(args.data, args.image_folder, skip_bad_samples=args.skip_bad_samples)
    trainer = LlavaTrimTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=SkipBadSamples(collator) if args.skip_bad_samples else collator,
        callbacks=list(callbacks or []),
        group_by_modality_length=args.group_by_modality_length,
    )
    if args.fsdp is not None and not trainer.is_fsdp_enabled:
        raise RuntimeError(
            "--fsdp: the Trainer did not shard the model: accelerate runs FSDP on GPUs (or other accelerators) with "
            "several processes only. Launch with torchrun / accelerate launch on GPUs, or drop --fsdp for plain data "
            "parallelism."
        )
    if args.deepspeed is not None and not trainer.is_deepspeed_enabled:
        raise RuntimeError("--deepspeed: the Trainer did not start DeepSpeed; is `deepspeed` installed?")
    resume = args.resume
    if resume is True and not any(Path(training_args.output_dir).glob("checkpoint-*")):
        raise FileNotFoundError(
            f"--resume: no checkpoint in {training_args.output_dir}; run with --save-steps to write checkpoints."
        )
    trainer.train(resume_from_checkpoint=resume)

    model.config.use_cache = True
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        trainer.save_model(str(output))  # every process takes part in gathering the sharded weights
        if trainer.is_world_process_zero() and processor is not None:
            processor.save_pretrained(output)
    elif trainer.is_world_process_zero():
        save_finetuned(trainer.model, output, processor)
    trainer.accelerator.wait_for_everyone()
    skipped = trainer.accelerator.reduce(torch.tensor(trainer.skipped_samples, device=training_args.device), "sum")
    if trainer.is_world_process_zero():
        print(f"skipped {int(skipped)} bad sample(s)")
        print(f"saved the fine-tuned model to {output}")
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
    "LlavaTrimDataCollator",
    "QUANTIZATION_SKIP_MODULES",
    "VICUNA_V1_SYSTEM",
    "VicunaPrompt",
    "apply_lora",
    "build_parser",
    "build_vicuna_v1_prompt",
    "configure_trainable_parameters",
    "conversation_to_messages",
    "gradient_accumulation_steps",
    "load_preprocessing",
    "main",
    "parse_args",
    "save_finetuned",
    "train",
]


if __name__ == "__main__":
    main()
