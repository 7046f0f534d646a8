# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Tiny random source checkpoints in every format `convert_checkpoint.py` reads, offline.

Each builder writes a folder laid out like the real repository on the Hub, with tiny widths and the real geometry
(336 px images, patch 14: 576 patch tokens), so the converter, the tests and the demo run the real code paths in
seconds without network:

- [`build_tiny_clip`]: `openai/clip-vit-large-patch14-336` — a full `CLIPModel` (vision + text towers and both
  projections), its `config.json`, the CLIP tokenizer and the image processor. The default `weights_format="bin"`
  mimics the real repository's `pytorch_model.bin`, including the `position_ids` buffers and `logit_scale`.
- [`build_original_llava`]: `liuhaotian/llava-v1.5-7b` — raw LLaVA `config.json` (`model_type: "llava"`,
  `LlavaLlamaForCausalLM`), fp16 `pytorch_model-0000k-of-0000n.bin` shards with `pytorch_model.bin.index.json`, the
  rotary `inv_freq` buffers, the Llama sentencepiece tokenizer without `<image>`, no CLIP weights.
- [`build_trim_llava`]: `FreedomIntelligence/llava-v1.5-7b-TRIM` — `model_type: "llava_llama"`, bf16
  `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json`, `mm_vision_token_reduce_func:
  "TRIM:-1"`, a bare local path as `mm_vision_tower`, and the CLIP towers embedded under the names the TRIM reference
  code gives them (its `CLIPVisionTower` holds a `CLIPVisionModelWithProjection` as `vision_tower` and a
  `CLIPTextModelWithProjection` as `text_tower`):

  | embedded tensor | CLIP name |
  | --- | --- |
  | `model.vision_tower.vision_tower.vision_model.*` | `vision_model.*` |
  | `model.vision_tower.vision_tower.visual_projection.weight` | `visual_projection.weight` |
  | `model.vision_tower.text_tower.text_model.*` | `text_model.*` |
  | `model.vision_tower.text_tower.text_projection.weight` | `text_projection.weight` |

- [`build_vicuna`] and [`build_llava_pretrain_projector`]: `lmsys/vicuna-7b-v1.5` (a plain Llama checkpoint: fp16
  `pytorch_model-0000k-of-0000n.bin` shards with their index, the sentencepiece tokenizer) and
  `liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5` (`mm_projector.bin` with the keys LLaVA's pretrain
  stage saves, `model.mm_projector.{0,2}.{weight,bias}`, and that stage's LLaVA `config.json`): the starting point
  of LLaVA-1.5's second training stage.
- [`build_llava_hf`]: `llava-hf/llava-1.5-7b-hf` — transformers-native `LlavaForConditionalGeneration` weights (fp16,
  vocabulary padded to a multiple of 64 with `<image>` and `<pad>` already in the tokenizer), saved either with the
  legacy key names the Hub repositories use (`language_model.model.*`, `language_model.lm_head.*`,
  `vision_tower.vision_model.*`, `multi_modal_projector.*`) or with the installed transformers' own names.

Widths come from `testing_utils/tiny.py` (`TINY_VISION`, `TINY_CLIP_TEXT`, `TINY_LLAMA`); vocabulary sizes and special
ids from the tiny tokenizers of `testing_utils/tiny_tokenizers.py`. Everything is seeded: the same call writes the same
weights.

```bash
# writes clip/, llava-original/, llava-trim/, llava-hf/, ...
python -m llava_trim.testing_utils.tiny_checkpoints /tmp/tiny-sources
```
"""

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AddedToken,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from .tiny import TINY_CLIP_TEXT, TINY_LLAMA, TINY_VISION
from .tiny_tokenizers import (
    LLAMA_BOS_ID,
    LLAMA_EOS_ID,
    LLAMA_UNK_ID,
    LLAMA_VOCAB_SIZE,
    build_clip_image_processor,
    build_clip_tokenizer,
    build_llama_tokenizer,
)

# The LLM of every tiny LLaVA source: `TINY_LLAMA` with the plain tokenizer's vocabulary (no `<image>`, no `<pad>`,
# as in `liuhaotian/llava-v1.5-7b`, whose `vocab_size` is 32000); the converter adds the two tokens.
TINY_SOURCE_VOCAB_SIZE = LLAMA_VOCAB_SIZE
TINY_LLAMA_SOURCE = {
    key: value for key, value in TINY_LLAMA.items() if key not in ("model_type", "vocab_size", "pad_token_id")
}
CLIP_NAME = "openai/clip-vit-large-patch14-336"

# The CLIP tensors `build_trim_llava(perturb_embedded_clip=True)` changes.
PERTURBED_CLIP_TENSORS = ("visual_projection.weight", "text_model.encoder.layers.0.self_attn.q_proj.bias")

# Prefixes of the CLIP towers inside a TRIM-format checkpoint (see the module docstring).
TRIM_EMBEDDED_CLIP_PREFIXES = {
    "vision_model.": "model.vision_tower.vision_tower.vision_model.",
    "visual_projection.": "model.vision_tower.vision_tower.visual_projection.",
    "text_model.": "model.vision_tower.text_tower.text_model.",
    "text_projection.": "model.vision_tower.text_tower.text_projection.",
}


# ---------------------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------------------


def tiny_clip_config(clip_tokenizer=None) -> CLIPConfig:
    """The tiny `CLIPConfig`: `TINY_VISION` and `TINY_CLIP_TEXT`, with the text ids of `clip_tokenizer` if given."""
    text_config = dict(TINY_CLIP_TEXT)
    if clip_tokenizer is not None:
        text_config.update(
            vocab_size=len(clip_tokenizer),
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    return CLIPConfig(
        text_config=text_config,
        vision_config=dict(TINY_VISION),
        projection_dim=TINY_VISION["projection_dim"],
    )


def build_tiny_clip(save_dir: str | Path, *, seed: int = 0, weights_format: str = "bin") -> Path:
    """
    Write a tiny random `openai/clip-vit-large-patch14-336`: `CLIPModel` weights, config, tokenizer, image processor.

    The two projections are drawn with a unit standard deviation (instead of CLIP's tiny initialisation) so that TRIM's
    patch scores spread out as they do with the trained CLIP and the automatic selection keeps a handful of tokens.

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        seed (`int`, *optional*, defaults to 0): Seed of the random weights.
        weights_format (`str`, *optional*, defaults to `"bin"`): `"bin"` writes `pytorch_model.bin` like the real
            repository (float32, with the `position_ids` buffers and `logit_scale`); `"safetensors"` writes
            `model.safetensors`.

    Returns:
        `Path`: `save_dir`.
    """
    if weights_format not in ("bin", "safetensors"):
        raise ValueError(f"weights_format must be 'bin' or 'safetensors', got {weights_format!r}.")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    build_clip_tokenizer(save_dir)
    build_clip_image_processor(save_dir)
    config = tiny_clip_config(AutoTokenizer.from_pretrained(save_dir))

    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # spread as `tiny.tiny_model` does: TRIM's probabilities stay distinct in float32
        model.visual_projection.weight.normal_(std=0.15)
        model.text_projection.weight.normal_(std=0.15)
    state_dict = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}

    config.architectures = ["CLIPModel"]
    config.save_pretrained(save_dir)
    if weights_format == "bin":
        # transformers < 4.31 saved the position ids as persistent buffers, and the Hub file still has them
        for tower, length in (("text_model", config.text_config.max_position_embeddings), ("vision_model", None)):
            if length is None:
                length = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
            state_dict[f"{tower}.embeddings.position_ids"] = torch.arange(length).unsqueeze(0)
        torch.save(state_dict, save_dir / "pytorch_model.bin")
    else:
        save_file(state_dict, save_dir / "model.safetensors", metadata={"format": "pt"})
    return save_dir


def load_clip_state_dict(clip_dir: str | Path) -> dict[str, torch.Tensor]:
    """The `CLIPModel` tensors of a folder written by [`build_tiny_clip`] (either weights format)."""
    clip_dir = Path(clip_dir)
    if (clip_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(clip_dir / "model.safetensors")
    return torch.load(clip_dir / "pytorch_model.bin", weights_only=True, map_location="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA sources
# ---------------------------------------------------------------------------------------------------------------------


def _tiny_llama(seed: int, vocab_size: int) -> LlamaForCausalLM:
    """A tiny random `LlamaForCausalLM` (float32) with `TINY_LLAMA`'s widths."""
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA_SOURCE, vocab_size=vocab_size, pad_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _tiny_projector(seed: int) -> dict[str, torch.Tensor]:
    """LLaVA-1.5's `mlp2x_gelu` projector (`mm_projector.0` and `.2`), random, float32."""
    generator = torch.Generator().manual_seed(seed + 1000)
    vision_hidden, text_hidden = TINY_VISION["hidden_size"], TINY_LLAMA["hidden_size"]
    return {
        "0.weight": torch.randn(text_hidden, vision_hidden, generator=generator) / math.sqrt(vision_hidden),
        "0.bias": torch.randn(text_hidden, generator=generator) * 0.02,
        "2.weight": torch.randn(text_hidden, text_hidden, generator=generator) / math.sqrt(text_hidden),
        "2.bias": torch.randn(text_hidden, generator=generator) * 0.02,
    }


def _llava_raw_config(model_type: str, dtype: torch.dtype, transformers_version: str, **extra) -> dict:
    """`config.json` of a LLaVA-1.5 checkpoint in the original repository's format, with tiny widths."""
    config = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": LLAMA_BOS_ID,
        "eos_token_id": LLAMA_EOS_ID,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": TINY_LLAMA["hidden_size"],
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": TINY_LLAMA["intermediate_size"],
        "max_length": TINY_LLAMA["max_position_embeddings"],
        "max_position_embeddings": TINY_LLAMA["max_position_embeddings"],
        "mm_hidden_size": TINY_VISION["hidden_size"],
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": CLIP_NAME,
        "model_type": model_type,
        "num_attention_heads": TINY_LLAMA["num_attention_heads"],
        "num_hidden_layers": TINY_LLAMA["num_hidden_layers"],
        "num_key_value_heads": TINY_LLAMA["num_key_value_heads"],
        "pad_token_id": LLAMA_UNK_ID,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers_version,
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": TINY_SOURCE_VOCAB_SIZE,
    }
    config.update(extra)
    return config


def _original_state_dict(seed: int, dtype: torch.dtype, with_inv_freq: bool) -> dict[str, torch.Tensor]:
    """The tensors of an original LLaVA-1.5 checkpoint, in the order its `state_dict()` lists them."""
    llama = _tiny_llama(seed, TINY_SOURCE_VOCAB_SIZE)
    head_dim = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    state_dict = {}
    for key, tensor in llama.state_dict().items():
        if key == "lm_head.weight":
            continue
        state_dict[key] = tensor.to(dtype).contiguous()
        if with_inv_freq and key.endswith(".self_attn.o_proj.weight"):
            state_dict[key.replace("o_proj.weight", "rotary_emb.inv_freq")] = inv_freq.clone()
    for key, tensor in _tiny_projector(seed).items():
        state_dict[f"model.mm_projector.{key}"] = tensor.to(dtype)
    state_dict["lm_head.weight"] = llama.state_dict()["lm_head.weight"].to(dtype).contiguous()
    return state_dict


def _split(keys: list[str], num_shards: int) -> list[list[str]]:
    """Split `keys` into `num_shards` contiguous, non-empty groups."""
    if not 1 <= num_shards <= len(keys):
        raise ValueError(f"num_shards must be between 1 and {len(keys)}, got {num_shards}.")
    bounds = [round(i * len(keys) / num_shards) for i in range(num_shards + 1)]
    return [keys[bounds[i] : bounds[i + 1]] for i in range(num_shards)]


def _write_shards(
    save_dir: Path, state_dict: dict[str, torch.Tensor], num_shards: int, weights_format: str
) -> list[Path]:
    """Write `state_dict` as transformers-style shards plus their index (a single unindexed file if one shard)."""
    if weights_format == "bin":
        single, pattern, index_name = "pytorch_model.bin", "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin"
    else:
        single, pattern, index_name = "model.safetensors", "model-{:05d}-of-{:05d}.safetensors", "model.safetensors"
    groups = _split(list(state_dict), num_shards)
    paths, weight_map = [], {}
    for i, group in enumerate(groups, start=1):
        name = single if num_shards == 1 else pattern.format(i, num_shards)
        shard = {key: state_dict[key] for key in group}
        if weights_format == "bin":
            torch.save(shard, save_dir / name)
        else:
            save_file(shard, save_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        paths.append(save_dir / name)
    if num_shards > 1:
        total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
        _write_json(
            save_dir / f"{index_name}.index.json",
            {"metadata": {"total_size": total_size}, "weight_map": weight_map},
        )
    return paths


def _copy_tokenizer(llama_tokenizer_dir: Path | None, save_dir: Path) -> None:
    """Put the tiny Llama sentencepiece tokenizer files in `save_dir` (built there if no folder is given)."""
    if llama_tokenizer_dir is None:
        build_llama_tokenizer(save_dir)
        return
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path(llama_tokenizer_dir) / name, save_dir / name)


def build_original_llava(
    save_dir: str | Path,
    *,
    seed: int = 1,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float16,
    config_overrides: dict | None = None,
    llama_tokenizer_dir: str | Path | None = None,
) -> Path:
    """
    Write a tiny random checkpoint laid out like `liuhaotian/llava-v1.5-7b`.

    Files: `config.json` (raw LLaVA format, `model_type: "llava"`), `generation_config.json`, the Llama tokenizer
    (`tokenizer.model`, no `<image>` token), `pytorch_model-0000k-of-0000n.bin` shards (written with `torch.save`) and
    `pytorch_model.bin.index.json`. Keys: `model.embed_tokens.weight`, `model.layers.{i}.*` with
    `self_attn.rotary_emb.inv_freq`, `model.norm.weight`, `model.mm_projector.{0,2}.*`, `lm_head.weight`.

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        seed (`int`, *optional*, defaults to 1): Seed of the random weights.
        num_shards (`int`, *optional*, defaults to 2): Number of `.bin` shards (1 writes `pytorch_model.bin`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): Dtype of the weights (not of `inv_freq`).
        config_overrides (`dict`, *optional*): Entries to change in `config.json` (`{"mm_use_im_start_end": True}`).
        llama_tokenizer_dir (`str` or `Path`, *optional*): A folder from `build_llama_tokenizer` to copy (else built).

    Returns:
        `Path`: `save_dir`.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    config = _llava_raw_config("llava", dtype, "4.31.0", **(config_overrides or {}))
    _write_json(save_dir / "config.json", config)
    _write_json(
        save_dir / "generation_config.json",
        {
            "bos_token_id": LLAMA_BOS_ID,
            "eos_token_id": LLAMA_EOS_ID,
            "max_length": TINY_LLAMA["max_position_embeddings"],
            "pad_token_id": LLAMA_UNK_ID,
            "transformers_version": "4.31.0",
        },
    )
    _copy_tokenizer(llama_tokenizer_dir, save_dir)
    _write_shards(save_dir, _original_state_dict(seed, dtype, with_inv_freq=True), num_shards, "bin")
    return save_dir


def build_trim_llava(
    save_dir: str | Path,
    clip_dir: str | Path,
    *,
    seed: int = 2,
    num_shards: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    reduce_func: str | None = "TRIM:-1",
    config_overrides: dict | None = None,
    perturb_embedded_clip: bool = False,
    llama_tokenizer_dir: str | Path | None = None,
) -> Path:
    """
    Write a tiny random checkpoint laid out like `FreedomIntelligence/llava-v1.5-7b-TRIM`.

    The LLaVA tensors of [`build_original_llava`] (without `inv_freq`) plus the CLIP towers of `clip_dir` embedded
    under `model.vision_tower.` (see the module docstring), all in `dtype`, as `model-0000k-of-0000n.safetensors`
    shards with `model.safetensors.index.json`. `config.json` has `model_type: "llava_llama"`,
    `mm_vision_token_reduce_func` and a bare local path as `mm_vision_tower`.

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        clip_dir (`str` or `Path`): A folder from [`build_tiny_clip`] whose towers are embedded.
        seed (`int`, *optional*, defaults to 2): Seed of the random LLaVA weights.
        num_shards (`int`, *optional*, defaults to 3): Number of safetensors shards.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): Dtype of every tensor.
        reduce_func (`str`, *optional*, defaults to `"TRIM:-1"`): `mm_vision_token_reduce_func` (`None` leaves it out).
        config_overrides (`dict`, *optional*): Entries to change in `config.json`.
        perturb_embedded_clip (`bool`, *optional*, defaults to `False`): Add 1 to the embedded
            `visual_projection.weight` and the first text layer's `q_proj.bias`, so they differ from `clip_dir`'s.
        llama_tokenizer_dir (`str` or `Path`, *optional*): A folder from `build_llama_tokenizer` to copy (else built).

    Returns:
        `Path`: `save_dir`.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    extra = {"mm_vision_tower": "./checkpoints/clip-vit-large-patch14-336"}
    if reduce_func is not None:
        extra["mm_vision_token_reduce_func"] = reduce_func
    extra.update(config_overrides or {})
    _write_json(save_dir / "config.json", _llava_raw_config("llava_llama", dtype, "4.37.2", **extra))
    _write_json(
        save_dir / "generation_config.json",
        {
            "bos_token_id": LLAMA_BOS_ID,
            "eos_token_id": LLAMA_EOS_ID,
            "max_length": TINY_LLAMA["max_position_embeddings"],
            "pad_token_id": LLAMA_UNK_ID,
            "transformers_version": "4.37.2",
        },
    )
    _copy_tokenizer(llama_tokenizer_dir, save_dir)

    llava = _original_state_dict(seed, dtype, with_inv_freq=False)
    embedded = {}
    for key, tensor in load_clip_state_dict(clip_dir).items():
        if key == "logit_scale" or key.endswith(".position_ids"):
            continue
        prefix = next(p for p in TRIM_EMBEDDED_CLIP_PREFIXES if key.startswith(p))
        tensor = tensor.to(dtype).contiguous()
        if perturb_embedded_clip and key in PERTURBED_CLIP_TENSORS:
            tensor = tensor + 1
        embedded[TRIM_EMBEDDED_CLIP_PREFIXES[prefix] + key.removeprefix(prefix)] = tensor
    # the order of the reference model's state_dict(): the LLM, the vision tower module, the projector, the head
    state_dict = {k: v for k, v in llava.items() if not k.startswith(("model.mm_projector.", "lm_head."))}
    state_dict.update(embedded)
    state_dict.update({k: v for k, v in llava.items() if k.startswith(("model.mm_projector.", "lm_head."))})
    _write_shards(save_dir, state_dict, num_shards, "safetensors")
    return save_dir


def _llava_hf_preprocessing(save_dir: Path, llama_tokenizer_dir: Path | None) -> tuple[int, int, int]:
    """Write the tokenizer (with `<image>` and `<pad>` added, padding on the left) and the CLIP image processor of a
    llava-hf folder; return the `<image>` and `<pad>` ids and the vocabulary padded to a multiple of 64 rows."""
    save_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _copy_tokenizer(llama_tokenizer_dir, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(save_dir)
    image_token_id, pad_token_id = tokenizer.convert_tokens_to_ids(["<image>", "<pad>"])
    build_clip_image_processor(save_dir)
    return image_token_id, pad_token_id, 64 * math.ceil(len(tokenizer) / 64)


def build_llava_hf(
    save_dir: str | Path,
    clip_dir: str | Path,
    *,
    seed: int = 3,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float16,
    legacy_names: bool = True,
    llama_tokenizer_dir: str | Path | None = None,
) -> Path:
    """
    Write a tiny random checkpoint laid out like `llava-hf/llava-1.5-7b-hf` (transformers-native LLaVA).

    The vision tower is `clip_dir`'s vision model; the tokenizer has `<image>` and `<pad>` added (ids `V` and `V + 1`
    for a `V`-token sentencepiece vocabulary) and the embedding matrices are padded to a multiple of 64 rows, as the
    llava-hf conversion did (32064 for LLaVA-1.5).

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        clip_dir (`str` or `Path`): A folder from [`build_tiny_clip`].
        seed (`int`, *optional*, defaults to 3): Seed of the random LLM and projector.
        num_shards (`int`, *optional*, defaults to 2): Number of safetensors shards.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): Dtype of every tensor.
        legacy_names (`bool`, *optional*, defaults to `True`): Use the key names of the llava-hf repositories on the
            Hub (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
            `multi_modal_projector.*`); `False` uses the installed transformers' `state_dict()` names.
        llama_tokenizer_dir (`str` or `Path`, *optional*): A folder from `build_llama_tokenizer` to copy (else built).

    Returns:
        `Path`: `save_dir`.
    """
    save_dir = Path(save_dir)
    image_token_id, pad_token_id, vocab_size = _llava_hf_preprocessing(save_dir, llama_tokenizer_dir)

    clip_config = tiny_clip_config(AutoTokenizer.from_pretrained(clip_dir))
    text_config = LlamaConfig(**TINY_LLAMA_SOURCE, vocab_size=vocab_size, pad_token_id=pad_token_id)
    config = LlavaConfig(
        vision_config=clip_config.vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    llama = _tiny_llama(seed, vocab_size)
    projector = _tiny_projector(seed)
    clip = load_clip_state_dict(clip_dir)
    with torch.no_grad():
        model.model.language_model.load_state_dict(llama.model.state_dict())
        model.lm_head.load_state_dict(llama.lm_head.state_dict())
        vision = {k.removeprefix("vision_model."): v for k, v in clip.items() if k.startswith("vision_model.")}
        vision = {k: v for k, v in vision.items() if not k.endswith("position_ids")}
        model.model.vision_tower.load_state_dict(vision)
        linear_1, linear_2 = model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2
        linear_1.weight.copy_(projector["0.weight"])
        linear_1.bias.copy_(projector["0.bias"])
        linear_2.weight.copy_(projector["2.weight"])
        linear_2.bias.copy_(projector["2.bias"])
    model.to(dtype)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    config.save_pretrained(save_dir)
    model.generation_config.save_pretrained(save_dir)

    state_dict = {}
    for key, tensor in model.state_dict().items():
        if legacy_names:
            key = _llava_hf_legacy_name(key)
        state_dict[key] = tensor.contiguous()
    _write_shards(save_dir, state_dict, num_shards, "safetensors")
    return save_dir


def build_vicuna(
    save_dir: str | Path,
    *,
    seed: int = 4,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float16,
    llama_tokenizer_dir: str | Path | None = None,
) -> Path:
    """
    Write a tiny random plain Llama checkpoint laid out like `lmsys/vicuna-7b-v1.5`, the language model LLaVA-1.5
    starts from.

    Files: `config.json` (`model_type: "llama"`, `LlamaForCausalLM`), `generation_config.json` (with Vicuna's sampling
    settings), the Llama sentencepiece tokenizer (no `<image>`, no pad token), `pytorch_model-0000k-of-0000n.bin`
    shards (`torch.save`) and `pytorch_model.bin.index.json`. Keys: `model.embed_tokens.weight`, `model.layers.{i}.*`
    with `self_attn.rotary_emb.inv_freq`, `model.norm.weight`, `lm_head.weight`.

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        seed (`int`, *optional*, defaults to 4): Seed of the random weights.
        num_shards (`int`, *optional*, defaults to 2): Number of `.bin` shards (1 writes `pytorch_model.bin`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): Dtype of the weights (not of `inv_freq`).
        llama_tokenizer_dir (`str` or `Path`, *optional*): A folder from `build_llama_tokenizer` to copy (else built).

    Returns:
        `Path`: `save_dir`.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    llava_settings = ("mm_", "image_", "tune_", "unfreeze_", "freeze_", "use_mm_", "max_length")
    config = _llava_raw_config("llama", dtype, "4.31.0")
    config = {key: value for key, value in config.items() if not key.startswith(llava_settings)}
    config.update(_name_or_path="lmsys/vicuna-7b-v1.5", architectures=["LlamaForCausalLM"])
    _write_json(save_dir / "config.json", config)
    _write_json(
        save_dir / "generation_config.json",
        {
            "bos_token_id": LLAMA_BOS_ID,
            "eos_token_id": LLAMA_EOS_ID,
            "max_length": TINY_LLAMA["max_position_embeddings"],
            "pad_token_id": LLAMA_UNK_ID,
            "temperature": 0.9,
            "top_p": 0.6,
            "transformers_version": "4.31.0",
        },
    )
    _copy_tokenizer(llama_tokenizer_dir, save_dir)
    state_dict = _original_state_dict(seed, dtype, with_inv_freq=True)
    state_dict = {key: tensor for key, tensor in state_dict.items() if not key.startswith("model.mm_projector.")}
    _write_shards(save_dir, state_dict, num_shards, "bin")
    return save_dir


PROJECTOR_KEYS = (
    "model.mm_projector.0.weight",
    "model.mm_projector.0.bias",
    "model.mm_projector.2.weight",
    "model.mm_projector.2.bias",
)


def build_llava_pretrain_projector(
    save_dir: str | Path,
    *,
    seed: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    config_overrides: dict | None = None,
) -> Path:
    """
    Write a tiny random projector laid out like `liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5`, what
    LLaVA's pretrain stage (stage 1) saves: `mm_projector.bin` (`torch.save` of the projector's parameters under their
    names in the model, `model.mm_projector.{0,2}.{weight,bias}`, in the stage's bf16) and the stage's `config.json`
    in LLaVA's format (`model_type: "llava"`, `mm_projector_type: "mlp2x_gelu"`, `tune_mm_mlp_adapter: true`).

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        seed (`int`, *optional*, defaults to 5): Seed of the random weights.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): Dtype of the weights.
        config_overrides (`dict`, *optional*): Entries to change in `config.json`.

    Returns:
        `Path`: `save_dir`.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    extra = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "tune_mm_mlp_adapter": True, **(config_overrides or {})}
    _write_json(save_dir / "config.json", _llava_raw_config("llava", dtype, "4.31.0", **extra))
    projector = _tiny_projector(seed)
    state_dict = {f"model.mm_projector.{key}": tensor.to(dtype) for key, tensor in projector.items()}
    torch.save(state_dict, save_dir / "mm_projector.bin")
    return save_dir


def _llava_hf_legacy_name(key: str) -> str:
    """The name an installed-transformers Llava key has in the llava-hf repositories on the Hub."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.vision_tower."):
        rest = key.removeprefix("model.vision_tower.").removeprefix("vision_model.")
        return "vision_tower.vision_model." + rest
    if key.startswith("model.multi_modal_projector."):
        return key.removeprefix("model.")
    raise ValueError(f"Unexpected Llava key {key!r}.")


def build_all(root: str | Path) -> dict[str, Path]:
    """
    Write one tiny checkpoint of every source format under `root` (about 5 seconds on a laptop CPU).

    Returns:
        `dict[str, Path]`: `"clip"` ([`build_tiny_clip`], `.bin`), `"original"` ([`build_original_llava`]),
        `"trim"` ([`build_trim_llava`]), `"llava_hf"` ([`build_llava_hf`], legacy key names), `"vicuna"`
        ([`build_vicuna`]) and `"projector"` ([`build_llava_pretrain_projector`]).
    """
    root = Path(root)
    llama_tokenizer_dir = build_llama_tokenizer(root / "llama-tokenizer")
    clip_dir = build_tiny_clip(root / "clip")
    paths = {
        "clip": clip_dir,
        "original": build_original_llava(root / "llava-original", llama_tokenizer_dir=llama_tokenizer_dir),
        "trim": build_trim_llava(root / "llava-trim", clip_dir, llama_tokenizer_dir=llama_tokenizer_dir),
        "llava_hf": build_llava_hf(root / "llava-hf", clip_dir, llama_tokenizer_dir=llama_tokenizer_dir),
        "vicuna": build_vicuna(root / "vicuna", llama_tokenizer_dir=llama_tokenizer_dir),
        "projector": build_llava_pretrain_projector(root / "llava-pretrain-projector"),
    }
    shutil.rmtree(llama_tokenizer_dir)
    return paths


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write tiny random LLaVA-1.5 source checkpoints (original, TRIM, llava-hf, Vicuna + pretrain "
        "projector) and a tiny CLIP.",
        epilog="Example: python -m llava_trim.testing_utils.tiny_checkpoints /tmp/tiny-sources",
    )
    parser.add_argument(
        "root",
        type=Path,
        help="Folder to write clip/, llava-original/, llava-trim/, llava-hf/, vicuna/, llava-pretrain-projector/ in.",
    )
    args = parser.parse_args(argv)
    for name, path in build_all(args.root).items():
        print(f"{name:>9}: {path}")


if __name__ == "__main__":
    main()


__all__ = [
    "build_all",
    "build_llava_hf",
    "build_llava_pretrain_projector",
    "build_original_llava",
    "build_tiny_clip",
    "build_trim_llava",
    "build_vicuna",
]
