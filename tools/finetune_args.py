# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""The command line of `python -m llava_trim.tools.finetune`: LLaVA's `train.py` flags, parsed with transformers'
`HfArgumentParser` over four dataclasses, as LLaVA's and transformers' own training scripts do.

- [`ModelArguments`]: the starting model (a converted LLaVA-TRIM folder, or LLaVA's stage-2 start:
  `--model_name_or_path` Vicuna, `--vision_tower` CLIP and `--pretrain_mm_mlp_adapter`), and LLaVA's flags that
  describe its architecture (accepted when they match the model, refused when they contradict it:
  `finetune.check_architecture_flags`);
- [`DataArguments`]: LLaVA's conversation JSON and image folder, `--image_aspect_ratio`;
- [`TrimArguments`]: TRIM while training (`--trim_ratio`, `--trim_question`);
- [`LlavaTrimTrainingArguments`]: transformers' `TrainingArguments` whole (every Trainer option: `--report_to`,
  `--push_to_hub`, evaluation, DeepSpeed, FSDP, ...) plus LLaVA's extras (`--model_max_length`,
  `--group_by_modality_length`, `--lora_enable`, ...), `--global_batch_size`, `--skip_bad_samples` and `--recipe`;
  the names transformers retired that LLaVA's scripts still pass (`--warmup_ratio`, `--evaluation_strategy`) map to
  today's (`--warmup_steps` as a fraction, `--eval_strategy`).

Every flag is also accepted with dashes (`--learning-rate`); the tool's earlier short names stay as aliases (`--model`,
`--data`, `--output`, `--epochs`, `--batch-size`, `--lr-scheduler`, `--max-length`, `--num-workers`, `--lora`,
`--resume`).
"""

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser, TrainingArguments

from ..configuration_llava_trim import parse_trim_ratio
from .cli import ExamplesHelpFormatter, examples_epilog
from .recipes import DEEPSPEED_CONFIGS, FSDP_CONFIGS, RECIPES, config_path

EXAMPLE = """\
python -m llava_trim.tools.finetune --model_name_or_path llava-v1.5-7b-trim --data_path llava_v1_5_mix665k.json \\
    --image_folder data/ --output_dir llava-trim-ft --lora_enable True --bf16 True --gradient_checkpointing True
# LLaVA-1.5's second stage with TRIM, as the TRIM paper trains it (8 GPUs)
torchrun --nproc_per_node 8 -m llava_trim.tools.finetune --recipe llava-v1.5 --deepspeed zero3 \\
    --model_name_or_path lmsys/vicuna-7b-v1.5 --vision_tower openai/clip-vit-large-patch14-336 \\
    --pretrain_mm_mlp_adapter llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin \\
    --mm_vision_token_reduce_func TRIM:-1 --data_path llava_v1_5_mix665k.json --image_folder data/ \\
    --output_dir llava-v1.5-7b-trim-ft"""

# the tool's earlier flag names, kept as aliases of the dataclass fields
ALIASES = {
    "--model": "model_name_or_path",
    "--data": "data_path",
    "--output": "output_dir",
    "--epochs": "num_train_epochs",
    "--batch-size": "per_device_train_batch_size",
    "--lr-scheduler": "lr_scheduler_type",
    "--max-length": "model_max_length",
    "--num-workers": "dataloader_num_workers",
}


@dataclass
class ModelArguments:
    """The model to start from, and LLaVA's flags that describe its architecture."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A converted LLaVA-TRIM folder or Hub id; or, with --vision_tower and --pretrain_mm_mlp_adapter, "
            "the Llama (Vicuna) checkpoint of LLaVA-1.5's stage-2 start."
        },
    )
    vision_tower: str | None = field(
        default=None,
        metadata={"help": "The full CLIP model of the stage-2 start (openai/clip-vit-large-patch14-336)."},
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None,
        metadata={"help": "LLaVA's pretrain-stage mm_projector.bin (or its folder, with its config.json)."},
    )
    version: str | None = field(
        default=None,
        metadata={
            "help": "LLaVA's conversation template: v1 (vicuna_v1: LLaVA-1.5, llava-v1.6-vicuna) or mistral_instruct "
            "(llava-v1.6-mistral). Default: the model's."
        },
    )
    mm_projector_type: str | None = field(default=None, metadata={"help": "LLaVA-1.5's is mlp2x_gelu."})
    mm_vision_select_layer: int | None = field(default=None, metadata={"help": "LLaVA-1.5's is -2."})
    mm_vision_select_feature: str | None = field(default=None, metadata={"help": "LLaVA-1.5's is patch."})
    mm_patch_merge_type: str | None = field(
        default=None, metadata={"help": "LLaVA-1.5's is flat, LLaVA-NeXT's spatial_unpad."}
    )
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "LLaVA-1.5 trains without them (False)."})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "LLaVA-1.5 trains without it (False)."})
    mm_vision_token_reduce_func: str | None = field(
        default=None,
        metadata={"help": "The TRIM checkpoints' 'TRIM:<ratio>' (or 'TextSim+:<ratio>'): the model's trim_ratio."},
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={
            "aliases": ["--freeze_language_model", "--freeze-language-model"],
            "help": "Train the projector only.",
        },
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa (default), eager, ..."})
    tokenizer: str | None = field(default=None, metadata={"help": "Llama tokenizer folder, when the model has none."})
    clip_tokenizer: str | None = field(default=None, metadata={"help": "CLIP tokenizer folder, likewise."})
    image_processor: str | None = field(default=None, metadata={"help": "CLIP image processor folder, likewise."})

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("--model_name_or_path (or --model) is required: the model to start from.")

    @property
    def builds_stage2_start(self) -> bool:
        return self.vision_tower is not None or self.pretrain_mm_mlp_adapter is not None


@dataclass
class DataArguments:
    """LLaVA's conversation data."""

    data_path: str | None = field(
        default=None, metadata={"help": "LLaVA conversation JSON (a list of records, or JSON lines)."}
    )
    image_folder: str | None = field(default=None, metadata={"help": "Folder the records' image paths are in."})
    image_aspect_ratio: str | None = field(
        default=None,
        metadata={
            "help": "pad: pad to a square with the mean colour (LLaVA-1.5's default); square: resize; anyres: "
            "LLaVA-NeXT's tiles (a LLaVA-NeXT model's only layout). Default: the model's."
        },
    )
    image_grid_pinpoints: str | None = field(
        default=None,
        metadata={"help": "LLaVA-NeXT's tiling resolutions, e.g. \"[(336, 672), (672, 336), ...]\": the model's."},
    )
    lazy_preprocess: bool = field(default=True, metadata={"help": "Always lazy here (LLaVA's flag is accepted)."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "The system sentence of the template. Default: the conversation's own (vicuna_v1's)."},
    )

    def __post_init__(self):
        if self.data_path is None:
            raise ValueError("--data_path (or --data) is required: LLaVA's conversation JSON to train on.")
        if self.image_aspect_ratio not in (None, "pad", "square", "anyres"):
            raise ValueError(
                f"--image_aspect_ratio {self.image_aspect_ratio} is not supported: LLaVA-1.5 uses pad (or square), "
                "LLaVA-NeXT anyres."
            )

    @property
    def pad_to_square(self) -> bool:
        """LLaVA-1.5's padding to a square (its default, `pad`)."""
        return self.image_aspect_ratio in (None, "pad")


@dataclass
class TrimArguments:
    """TRIM while training."""

    trim_ratio: str | None = field(
        default=None,
        metadata={
            "help": "auto (-1), off (none) or a keep ratio in (0, 1]; saved in the config. Default: the model's."
        },
    )
    trim_question: Literal["first", "last"] = field(
        default="first", metadata={"help": "TRIM's question: the user turn that carries the image, or the last one."}
    )

    def __post_init__(self):
        if self.trim_ratio is not None:
            parse_trim_ratio(self.trim_ratio)

    @property
    def ratio(self) -> float | None:
        """The `trim_ratio` asked for (`None` is TRIM off); only meaningful when `trim_ratio` was given."""
        return parse_trim_ratio(self.trim_ratio)


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def world_size() -> int:
    """The number of training processes, as torchrun and accelerate launch announce it (`WORLD_SIZE`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_steps(global_batch_size: int | None, batch_size: int, processes: int, given: int | None) -> int:
    """The gradient accumulation that gives `global_batch_size` samples per optimiser step with `batch_size` samples
    per process, or the one `given` (1 by default); a `given` one that does not give the global batch is refused."""
    if global_batch_size is None:
        return given or 1
    steps, remainder = divmod(global_batch_size, batch_size * processes)
    if remainder or steps == 0:
        raise ValueError(
            f"--global_batch_size {global_batch_size} is not a multiple of --per_device_train_batch_size {batch_size} "
            f"x {processes} process(es): change one of them."
        )
    if given not in (None, steps):
        raise ValueError(
            f"--gradient_accumulation_steps {given} with --per_device_train_batch_size {batch_size} on {processes} "
            f"process(es) does not give --global_batch_size {global_batch_size} (that needs {steps}): drop one of "
            "the two."
        )
    return steps


@dataclass
class LlavaTrimTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments`, with LLaVA's training extras and this tool's defaults."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where the fine-tuned model (and checkpoint-N folders) are written."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (default 1, LLaVA-1.5's)."})
    learning_rate: float | None = field(default=None, metadata={"help": "Default: 2e-5, or 2e-4 with LoRA."})
    gradient_accumulation_steps: int | None = field(
        default=None, metadata={"help": "Default: from --global_batch_size, else 1."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "The collator needs the raw records."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "aliases": ["--resume"],
            "nargs": "?",
            "const": "last",
            "help": "Continue from the last checkpoint-N in --output_dir (no value, or 'last'), or from this folder.",
        },
    )
    model_max_length: int = field(default=2048, metadata={"help": "Token limit, image tokens counted."})
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "Batch text-only samples apart from image samples (LLaVA's option)."}
    )
    lora_enable: bool = field(default=False, metadata={"aliases": ["--lora"], "help": "Train LoRA adapters."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per optimiser step over all processes: sets the accumulation to GLOBAL / (batch size x "
            "processes), so a recipe keeps its batch on any number of GPUs."
        },
    )
    skip_bad_samples: bool = field(
        default=True,
        metadata={
            "help": "Skip (and count) samples with a missing or unreadable image, no answer, or a prompt over "
            "--model_max_length with its image; --no_skip_bad_samples stops at the first one."
        },
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warmup as a fraction of the steps (LLaVA's name; sets --warmup_steps)."}
    )
    evaluation_strategy: str | None = field(default=None, metadata={"help": "LLaVA's name of --eval_strategy."})
    recipe: str | None = field(
        default=None,
        metadata={
            "choices": sorted(RECIPES),
            "help": "Preset hyperparameters: llava-v1.5 is LLaVA-1.5's fine-tuning stage as the TRIM paper trains it "
            "(every flag given still wins).",
        },
    )

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required: the folder to write the fine-tuned model to.")
        if self.learning_rate is None:
            self.learning_rate = 2e-4 if self.lora_enable else 2e-5
        self.gradient_accumulation_steps = accumulation_steps(
            self.global_batch_size, self.per_device_train_batch_size, world_size(), self.gradient_accumulation_steps
        )
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1 or self.warmup_steps:
                raise ValueError(
                    "--warmup_ratio is a fraction in [0, 1) of the steps, given instead of --warmup_steps."
                )
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy  # transformers' current name
        if isinstance(self.deepspeed, str) and not self.deepspeed.startswith("{"):
            self.deepspeed = config_path(self.deepspeed, DEEPSPEED_CONFIGS)
        if isinstance(self.fsdp, str) and self.fsdp in FSDP_CONFIGS and self.fsdp_config is None:
            self.fsdp, self.fsdp_config = True, config_path(self.fsdp, FSDP_CONFIGS)
        if self.deepspeed and self.fsdp:
            raise ValueError("Use one of --deepspeed and --fsdp.")
        if self.lora_enable and (self.deepspeed or self.fsdp):
            raise ValueError(
                "--lora_enable with --deepspeed or --fsdp is not supported by this tool (the adapter is merged on one "
                "process): train LoRA with plain data parallelism (torchrun / accelerate launch without them)."
            )
        if self.lora_enable and self.push_to_hub:
            raise ValueError(
                "--push_to_hub with --lora_enable is not supported (the Trainer would upload the adapter over the "
                "merged model): train, then upload the output folder with `hf upload`."
            )
        if not _accelerator_available():
            self.use_cpu = True  # the CPU is the device anyway; bf16 then runs as CPU autocast
        if self.ddp_find_unused_parameters is None:
            # a text-only batch leaves the projector without gradient on its process; DDP must look for that
            self.ddp_find_unused_parameters = True
        self.label_names = self.label_names or ["labels"]
        if self.activation_checkpointing is None and self.gradient_checkpointing is not None:
            # LLaVA's (and the recipe's) name for what transformers now calls activation checkpointing
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        if self.activation_checkpointing and not (
            self.activation_checkpointing_kwargs or self.gradient_checkpointing_kwargs
        ):
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()


@dataclass
class FinetuneArguments:
    """The four groups of a fine-tuning command line."""

    model: ModelArguments
    data: DataArguments
    trim: TrimArguments
    training: LlavaTrimTrainingArguments


def build_parser() -> HfArgumentParser:
    """`HfArgumentParser` over the four dataclasses, with `--help` ending in a working example."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrimArguments, LlavaTrimTrainingArguments),
        prog="python -m llava_trim.tools.finetune",
        description="Fine-tune LLaVA-1.5 or LLaVA-NeXT with TRIM in the loop on LLaVA conversation data with "
        "transformers.Trainer, with LLaVA's train.py flags. Run it with torchrun or accelerate launch for several "
        "processes or machines.",
        epilog=examples_epilog(EXAMPLE),
        formatter_class=ExamplesHelpFormatter,
    )
    types = {
        "per_device_train_batch_size": int,
        "num_train_epochs": float,
        "dataloader_num_workers": int,
        "model_max_length": int,
    }
    for alias, dest in ALIASES.items():
        parser.add_argument(alias, dest=dest, type=types.get(dest, str), default=argparse.SUPPRESS, help=f"= {dest}")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> FinetuneArguments:
    """Parse the command line, `--recipe` presets first: flags given explicitly override the recipe. A value no
    dataclass accepts ends the program with argparse's usage line and one sentence."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    known, _ = recipe.parse_known_args(argv)
    if known.recipe is not None:
        parser.set_defaults(**recipe_defaults(known.recipe))
    try:
        model, data, trim, training = parser.parse_args_into_dataclasses(argv)
    except ValueError as error:
        parser.error(" ".join(str(error).split()))
    return FinetuneArguments(model, data, trim, training)


def recipe_defaults(name: str) -> dict:
    """A recipe's flag values. TF32 is an NVIDIA (Ampere or newer) setting that transformers refuses elsewhere, so a
    recipe's `tf32` applies only where TF32 exists."""
    from transformers.utils import is_torch_tf32_available

    defaults = dict(RECIPES[name])
    if defaults.get("tf32") and not is_torch_tf32_available():
        defaults["tf32"] = None
    return defaults


__all__ = [
    "DataArguments",
    "FinetuneArguments",
    "LlavaTrimTrainingArguments",
    "ModelArguments",
    "TrimArguments",
    "accumulation_steps",
    "build_parser",
    "parse_args",
    "recipe_defaults",
]
