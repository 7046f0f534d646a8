"""`--recipe llava-v1.5`: the TRIM paper's fine-tuning hyperparameters as defaults that every flag overrides."""

import pytest
from transformers.utils import is_torch_tf32_available

from llava_trim.tools.finetune import parse_args
from llava_trim.tools.finetune_args import accumulation_steps
from llava_trim.tools.recipes import RECIPES

COMMON = ["--model", "m", "--data", "d.json", "--output", "o"]


# (the arguments are parsed in this one process: `TrainingArguments` joins the launcher's process group when built, so
# other numbers of processes are checked on `accumulation_steps`, which the arguments use with `WORLD_SIZE`)


def test_llava_v1_5_recipe_is_the_papers_schedule():
    args = parse_args(COMMON + ["--recipe", "llava-v1.5"]).training
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.global_batch_size) == (1.0, 4, 128)
    assert args.gradient_accumulation_steps == 32  # 4 x 32 x 1 process = 128 (4 x 4 x 8 GPUs in the paper)
    assert (args.learning_rate, args.weight_decay, args.warmup_steps, args.lr_scheduler_type) == (
        2e-5,
        0.0,
        0.03,
        "cosine",
    )
    assert args.bf16 and args.gradient_checkpointing
    # TF32 exists on NVIDIA GPUs only (transformers refuses --tf32 True elsewhere): the recipe asks for it there
    assert args.tf32 is (True if is_torch_tf32_available() else None)
    assert args.model_max_length == 2048 and args.group_by_modality_length
    assert parse_args(COMMON + ["--recipe", "llava-v1.5"]).data.image_aspect_ratio == "pad"
    assert args.skip_bad_samples


def test_recipe_keeps_the_global_batch_on_any_number_of_processes():
    for processes, accumulation in [(1, 32), (2, 16), (8, 4), (16, 2)]:
        assert accumulation_steps(128, 4, processes, None) == accumulation
    with pytest.raises(ValueError, match="not a multiple"):  # 128 samples do not split over 3 processes x 4
        accumulation_steps(128, 4, 3, None)
    with pytest.raises(SystemExit):  # nor over 1 process x 3
        parse_args(COMMON + ["--recipe", "llava-v1.5", "--per_device_train_batch_size", "3"])


def test_every_flag_overrides_the_recipe():
    parsed = parse_args(
        COMMON
        + ["--recipe", "llava-v1.5", "--bf16", "False", "--tf32", "False", "--gradient_checkpointing", "False"]
        + ["--learning_rate", "1e-4", "--per_device_train_batch_size", "2", "--group_by_modality_length", "False"]
        + ["--model_max_length", "512", "--global_batch_size", "8"]
        + ["--image_aspect_ratio", "square", "--no_skip_bad_samples", "--num_train_epochs", "2"]
    )
    args = parsed.training
    assert not (args.bf16 or args.tf32 or args.gradient_checkpointing or args.group_by_modality_length)
    assert not (parsed.data.pad_to_square or args.skip_bad_samples)
    assert (args.learning_rate, args.per_device_train_batch_size, args.model_max_length) == (1e-4, 2, 512)
    assert args.num_train_epochs == 2.0
    assert args.gradient_accumulation_steps == 4  # 8 = 2 x 4 x 1 process
    # the order of the flags does not matter, and the earlier short names are aliases
    assert parse_args(["--learning-rate", "1e-4", "--recipe", "llava-v1.5"] + COMMON).training.learning_rate == 1e-4
    assert parse_args(COMMON + ["--recipe", "llava-v1.5", "--epochs", "3"]).training.num_train_epochs == 3.0
    # without a recipe, the tool's own defaults
    plain = parse_args(COMMON).training
    assert (plain.bf16, plain.gradient_accumulation_steps, plain.group_by_modality_length) == (False, 1, False)
    assert (plain.learning_rate, plain.num_train_epochs) == (2e-5, 1.0)
    assert parse_args(COMMON + ["--lora"]).training.learning_rate == 2e-4


def test_recipe_defaults_name_existing_flags():
    parsed = parse_args(COMMON)
    known = {**vars(parsed.model), **vars(parsed.data), **vars(parsed.trim), **vars(parsed.training)}
    for name, recipe in RECIPES.items():
        assert set(recipe) <= set(known), (name, set(recipe) - set(known))


def test_accumulation_conflicting_with_the_global_batch_is_refused(capsys):
    conflicting = ["--batch-size", "4", "--global_batch_size", "128", "--gradient_accumulation_steps", "4"]
    with pytest.raises(SystemExit):
        parse_args(COMMON + conflicting)
    assert "does not give --global_batch_size 128 (that needs 32)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not give --global_batch_size 128 \\(that needs 32\\)"):
        accumulation_steps(128, 4, 1, 4)
    assert accumulation_steps(128, 4, 8, 4) == 4
