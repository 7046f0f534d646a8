"""`--recipe llava-v1.5`: the TRIM paper's fine-tuning hyperparameters as defaults that every flag overrides."""

import argparse

import pytest

from llava_trim.tools.finetune import gradient_accumulation_steps, parse_args
from llava_trim.tools.recipes import RECIPES

COMMON = ["--model", "m", "--data", "d.json", "--output", "o"]


def test_llava_v1_5_recipe_is_the_papers_schedule(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = parse_args(COMMON + ["--recipe", "llava-v1.5"])
    assert (args.epochs, args.batch_size, args.gradient_accumulation_steps) == (1.0, 4, 4)  # 4 x 4 x 8 GPUs = 128
    assert (args.learning_rate, args.weight_decay, args.warmup_ratio, args.lr_scheduler) == (2e-5, 0.0, 0.03, "cosine")
    assert args.bf16 and args.tf32 and args.gradient_checkpointing
    assert args.max_length == 2048 and args.group_by_modality_length and args.pad_to_square
    assert args.skip_bad_samples


def test_recipe_keeps_the_global_batch_on_any_number_of_processes(monkeypatch):
    for processes, accumulation in [(1, 32), (2, 16), (8, 4), (16, 2)]:
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        assert parse_args(COMMON + ["--recipe", "llava-v1.5"]).gradient_accumulation_steps == accumulation
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):  # 128 samples do not split over 3 processes x 4
        parse_args(COMMON + ["--recipe", "llava-v1.5"])


def test_every_flag_overrides_the_recipe(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_args(
        COMMON
        + ["--recipe", "llava-v1.5", "--no-bf16", "--no-tf32", "--no-gradient-checkpointing"]
        + ["--learning-rate", "1e-4", "--batch-size", "2", "--no-group-by-modality-length", "--max-length", "512"]
        + ["--global-batch-size", "8"]
        + ["--no-pad-to-square", "--no-skip-bad-samples", "--epochs", "2"]
    )
    assert not (args.bf16 or args.tf32 or args.gradient_checkpointing or args.group_by_modality_length)
    assert not (args.pad_to_square or args.skip_bad_samples)
    assert (args.learning_rate, args.batch_size, args.max_length, args.epochs) == (1e-4, 2, 512, 2.0)
    assert args.gradient_accumulation_steps == 4  # 8 = 2 x 4 x 1 process
    # the order of the flags does not matter
    assert parse_args(["--learning-rate", "1e-4", "--recipe", "llava-v1.5"] + COMMON).learning_rate == 1e-4
    # without a recipe, the tool's own defaults
    plain = parse_args(COMMON)
    assert (plain.bf16, plain.gradient_accumulation_steps, plain.group_by_modality_length) == (False, 1, False)


def test_recipe_defaults_name_existing_flags():
    known = vars(parse_args(COMMON))
    for name, recipe in RECIPES.items():
        assert set(recipe) <= set(known), (name, set(recipe) - set(known))


def test_accumulation_conflicting_with_the_global_batch_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    conflicting = ["--batch-size", "4", "--global-batch-size", "128", "--gradient-accumulation-steps", "4"]
    with pytest.raises(SystemExit):
        parse_args(COMMON + conflicting)
    assert "does not give --global-batch-size 128 (that needs 32)" in capsys.readouterr().err
    args = argparse.Namespace(batch_size=4, global_batch_size=128, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="does not give --global-batch-size 128 \\(that needs 32\\)"):
        gradient_accumulation_steps(args, 1)
    assert gradient_accumulation_steps(args, 8) == 4
