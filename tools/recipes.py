# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Training recipes for `python -m llava_trim.tools.finetune --recipe NAME`, and the distributed-training configs.

A recipe is a set of defaults for the command line's flags (transformers' and LLaVA's names): any flag given
explicitly still wins.
"""

from pathlib import Path

# LLaVA-1.5's second stage with TRIM in the loop (the TRIM paper's `finetune_8gpu_TRIM.sh`): 1 epoch over the 665k mix,
# 4 samples per device x 4 accumulation steps x 8 GPUs = 128 per optimiser step, learning rate 2e-5 with a 3% warmup
# and a cosine schedule, no weight decay, bf16 with tf32 matmuls, gradient checkpointing, 2048 tokens, text-only and
# image samples batched apart, images padded to a square. `global_batch_size` sets the accumulation from the number
# of processes, so the optimiser sees 128 samples per step on 1, 8 or 16 GPUs alike.
RECIPES: dict[str, dict] = {
    "llava-v1.5": {
        "num_train_epochs": 1.0,
        "per_device_train_batch_size": 4,
        "global_batch_size": 128,
        "learning_rate": 2e-5,
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "lr_scheduler_type": "cosine",
        "bf16": True,
        "tf32": True,
        "gradient_checkpointing": True,
        "model_max_length": 2048,
        "group_by_modality_length": True,
        "image_aspect_ratio": "pad",
        "skip_bad_samples": True,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 5000,
        "save_total_limit": 1,
        "dataloader_num_workers": 4,
    },
}

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# short names for the DeepSpeed and FSDP configs shipped in `configs/`
DEEPSPEED_CONFIGS = {
    "zero2": "deepspeed_zero2.json",
    "zero3": "deepspeed_zero3.json",
    "zero3_offload": "deepspeed_zero3_offload.json",  # optimiser state and parameters in CPU memory: one GPU
}
FSDP_CONFIGS = {"full_shard": "fsdp_full_shard.json"}


def config_path(value: str, shipped: dict[str, str]) -> str:
    """A shipped config's path for its short name (e.g. `zero3`), or `value` itself when it is a file."""
    if value in shipped:
        return str(CONFIG_DIR / shipped[value])
    if not Path(value).is_file():
        raise ValueError(f"{value} is neither a config file nor one of the shipped configs ({', '.join(shipped)}).")
    return value


__all__ = ["CONFIG_DIR", "DEEPSPEED_CONFIGS", "FSDP_CONFIGS", "RECIPES", "config_path"]
