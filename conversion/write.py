# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Writing the output repository: streamed safetensors shards, config, generation config, processor, model card."""

import contextlib
import importlib.metadata
import json
import logging
import math
import shutil
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import ConversionError
from .plan import ConversionPlan, PlannedTensor, listing
from .sources import IMAGE_TOKEN, PAD_TOKEN, quiet_transformers
from .weights import WeightReader

logger = logging.getLogger("llava_trim.convert_checkpoint")

CODE_FILES = ("configuration_llava_trim.py", "modeling_llava_trim.py", "processing_llava_trim.py")
DEFAULT_MAX_NEW_TOKENS = 512
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
# The oldest transformers the code files run on: they check it at import, and `config.json` and the model card state it
MIN_TRANSFORMERS_VERSION = "5.24.0"
ROLES = {"--llava": "LLaVA weights", "--language-model": "language model", "--projector": "projector"}


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------


def output_tensor(planned: PlannedTensor, source: torch.Tensor) -> torch.Tensor:
    """
    The output value of one tensor: the source cast to the planned dtype (a no-op when equal), and for the token
    embeddings and the LM head the new rows of the added tokens.

    New rows are the mean of the existing rows (computed in float32). For the LM head this makes the new tokens'
    logit the mean of all logits, so it never exceeds the largest one: greedy decoding cannot pick them (an equal
    logit loses to the lower id), whatever the hidden state. Sampling could, which is why `generation_config.json`
    also suppresses them (`suppress_tokens`). A zero row would not do: its logit 0 beats every token whenever all
    logits are negative.
    """
    dtype = planned.dtype
    tensor = source.to(dtype)
    if not planned.grows_rows:
        return tensor.contiguous()
    rows = planned.shape[0] - planned.source_shape[0]
    mean = source.float().mean(dim=0, keepdim=True).to(dtype)  # (1, hidden)
    return torch.cat([tensor, mean.expand(rows, -1)], dim=0).contiguous()  # (new_vocab, hidden)


def write_weights(plan: ConversionPlan, folder: Path, max_shard_size: int) -> dict[str, list[str]]:
    """
    Write the planned tensors as safetensors shards (`huggingface_hub`'s sharding: tensors in plan order, a new shard
    when the next tensor would pass `max_shard_size`) plus `model.safetensors.index.json` when there are several.

    Source files are opened one at a time and a shard is written as soon as its last tensor is ready, so memory holds
    about one source file (memory-mapped or lazily read) and one output shard.

    Returns:
        `dict[str, list[str]]`: the embedded CLIP tensors that differ from `--clip` (by name), empty when none.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {t.target: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in plan.tensors}
    split = split_torch_state_dict_into_shards(
        meta, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    shard_of = split.tensor_to_filename
    remaining = {name: set(tensors) for name, tensors in split.filename_to_tensors.items()}
    buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in remaining}
    differing: list[str] = []
    inexact: list[
        str
    ] = []  # LLaVA tensors the cast to the output dtype changed (CLIP's float32 is expected to narrow)
    clip_files = set(plan.clip.weights.paths)
    clip_readers: dict[Path, WeightReader] = {}

    progress = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="Writing shards")
    try:
        for path, group in _by_source_file(plan.tensors):
            with WeightReader(path) as reader:
                for planned in group:
                    source = reader.get(planned.source_name)
                    if planned.compare_with is not None and not _equals_clip(source, planned, clip_readers):
                        differing.append(planned.source_name)
                    shard = shard_of[planned.target]
                    written = buffers[shard][planned.target] = output_tensor(planned, source)
                    if _cast_changed(source, written, planned) and path not in clip_files:
                        inexact.append(planned.source_name)
                    del source, written
                    remaining[shard].discard(planned.target)
                    progress.update(math.prod(planned.shape) * planned.dtype.itemsize)
                    if not remaining[shard]:
                        save_file(buffers.pop(shard), folder / shard, metadata={"format": "pt"})
    finally:
        progress.close()
        for reader in clip_readers.values():
            reader.close()
    if split.is_sharded:
        index = {
            "metadata": {"total_size": split.metadata["total_size"]},
            "weight_map": dict(sorted(shard_of.items())),
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if inexact:
        logger.warning(
            "%d tensor(s) changed when cast to %s (%s): pass --dtype float32 (or their dtype) to keep every value.",
            len(inexact),
            str(plan.dtype).removeprefix("torch."),
            listing(inexact, 5),
        )
    if differing:
        logger.warning(
            "The checkpoint embeds %d CLIP tensor(s) that differ from --clip %s; the embedded ones are used: %s",
            len(differing),
            plan.clip.folder,
            listing(differing),
        )
    return {"differing_clip_tensors": differing}


def _by_source_file(tensors: list[PlannedTensor]):
    """Consecutive runs of planned tensors read from the same source file: `(path, [tensors])`."""
    group: list[PlannedTensor] = []
    for planned in tensors:
        if group and planned.file != group[0].file:
            yield group[0].file, group
            group = []
        group.append(planned)
    if group:
        yield group[0].file, group


def _cast_changed(source: torch.Tensor, written: torch.Tensor, planned: PlannedTensor) -> bool:
    """Whether casting `source` to the output dtype changed a value (the added rows aside)."""
    if source.dtype == written.dtype:
        return False
    return not torch.equal(written[: planned.source_shape[0]].to(source.dtype), source)


def _equals_clip(source: torch.Tensor, planned: PlannedTensor, readers: dict[Path, WeightReader]) -> bool:
    """Whether an embedded CLIP tensor equals its `--clip` counterpart (compared in the embedded tensor's dtype)."""
    clip_path, clip_name = planned.compare_with
    if clip_path not in readers:
        readers[clip_path] = WeightReader(clip_path)
    reference = readers[clip_path].get(clip_name)
    return reference.shape == source.shape and torch.equal(reference.to(source.dtype), source)


# ---------------------------------------------------------------------------------------------------------------------
# The other repository files
# ---------------------------------------------------------------------------------------------------------------------


def package_file(name: str) -> Path:
    """A file shipped at the package's top level (the code files; LICENSE in a checkout or an installed wheel)."""
    path = Path(__file__).resolve().parent.parent / name
    if path.is_file():
        return path
    if name == "LICENSE":
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            for file in importlib.metadata.distribution("llava-trim").files or []:
                if file.name == "LICENSE":
                    return Path(file.locate())
    raise ConversionError(f"{name} is missing from the llava-trim installation ({path}): reinstall llava-trim.")


def write_config(plan: ConversionPlan, folder: Path) -> None:
    """`config.json` with `auto_map`, and the three code files the map points to."""
    family = "LlavaNextTrim" if plan.llava.layout.family == "llava_next" else "LlavaTrim"
    plan.config.auto_map = {
        "AutoConfig": f"configuration_llava_trim.{family}Config",
        "AutoModel": f"modeling_llava_trim.{family}Model",
        "AutoModelForImageTextToText": f"modeling_llava_trim.{family}ForConditionalGeneration",
    }
    plan.config.save_pretrained(folder)
    # transformers records the version that wrote the file; the repository needs the oldest its code runs on
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["transformers_version"] = MIN_TRANSFORMERS_VERSION
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in CODE_FILES:
        shutil.copyfile(package_file(name), folder / name)


def write_generation_config(plan: ConversionPlan, folder: Path) -> None:
    """
    The source's generation config, greedy (as LLaVA's evaluation), with the added tokens suppressed and the source's
    `max_length` (the context length) replaced by `max_new_tokens` (512 unless the source sets it).
    """
    from transformers import GenerationConfig

    source = plan.llava.folder / "generation_config.json"
    if source.is_file():
        with quiet_transformers():  # sampling settings without `do_sample` (Vicuna's) warn; they are cleared below
            generation_config = GenerationConfig.from_pretrained(plan.llava.folder)
    else:
        generation_config = GenerationConfig.from_model_config(plan.config.text_config)
    text_config = plan.config.text_config
    for special in ("bos_token_id", "eos_token_id"):
        if getattr(generation_config, special) is None:
            setattr(generation_config, special, getattr(text_config, special))
    generation_config.pad_token_id = text_config.pad_token_id
    generation_config.do_sample = False
    # the source's `max_length` is the context length (4096 for LLaVA-1.5); stored, it makes every call that passes
    # `max_new_tokens` warn. A cap on new tokens says the same without the warning (LLaVA's CLI default: 512).
    if generation_config.max_new_tokens is None:
        generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    generation_config.max_length = GenerationConfig().max_length
    for sampling_field in ("temperature", "top_p", "top_k"):
        setattr(generation_config, sampling_field, None)
    generation_config.suppress_tokens = plan.vocabulary.suppressed_ids
    generation_config.save_pretrained(folder)


def write_processor(plan: ConversionPlan, folder: Path) -> None:
    """The `LlavaTrimProcessor`: Llama tokenizer (with `<image>`, `<pad>`), CLIP tokenizer, CLIP image processor."""
    from ..processing_llava_trim import LlavaNextTrimProcessor, LlavaTrimProcessor, llava_next_image_processor

    settings = plan.llava.layout.next_settings(plan.llava.config)
    processor_class, image_processor, extra = LlavaTrimProcessor, plan.clip.image_processor, {}
    if settings:  # LLaVA-NeXT: CLIP's image settings with the model's pinpoints, the checkpoint's conversation
        processor_class = LlavaNextTrimProcessor
        image_processor = llava_next_image_processor(image_processor, settings["image_grid_pinpoints"])
        extra = {"conversation": settings["conversation"]}
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=plan.tokenizer,
        clip_tokenizer=plan.clip.tokenizer,
        image_token=IMAGE_TOKEN,
        image_seq_length=plan.config.image_seq_length,
        **extra,
    )
    processor_class.register_for_auto_class("AutoProcessor")
    processor.save_pretrained(folder)


def _card_metadata(source_folder: Path) -> dict:
    from huggingface_hub.repocard import metadata_load

    readme = source_folder / "README.md"
    with contextlib.suppress(Exception):
        return metadata_load(readme) or {} if readme.is_file() else {}
    return {}


def write_model_card(
    plan: ConversionPlan,
    folder: Path,
    model_id: str,
    license_name: str | None,
    base_models: list[str],
    command: str,
) -> None:
    """
    The model card: `model_card.md` (shipped beside this module) filled in with the YAML metadata (library, pipeline,
    license, base models, tags), the sources and the conversion's facts; its usage runs as written.
    """
    from huggingface_hub import ModelCard, ModelCardData

    license_name = license_name or _card_metadata(plan.llava.folder).get("license") or "llama2"
    next_family = plan.llava.layout.family == "llava_next"
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license_name,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        tags=["llava", "llava-next" if next_family else "llava-1.5", "trim", "token-reduction", "clip",
              "vision-language", "custom_code"],
    )  # fmt: skip
    config = plan.config
    family = "LLaVA-NeXT (llava-v1.6)" if next_family else "LLaVA-1.5"
    counted = "candidate" if next_family else config.image_seq_length
    trim = {None: f"off (plain {family})", -1: "-1 (automatic: interquartile-range outliers)"}.get(
        config.trim_ratio, f"{config.trim_ratio} (fixed fraction of the {counted} image tokens)"
    )
    dtype_name = str(plan.dtype).removeprefix("torch.")
    source_dtype = str(plan.source_dtype).removeprefix("torch.")
    kept_fp32 = sorted({t.target.rsplit(".", 1)[0] for t in plan.tensors if t.dtype != plan.dtype})
    names = plan.llava.names
    content = string.Template(MODEL_CARD_TEMPLATE.read_text(encoding="utf-8")).substitute(
        metadata=metadata.to_yaml(),
        title=Path(model_id).name,
        model_id=model_id,
        image_tokens=config.image_seq_length,
        family=family,
        image_tokens_text=(
            f"{config.image_seq_length} overview and up to "
            f"{max(h * w for h, w in config.image_grid_pinpoints) // config.vision_config.patch_size**2} tile"
            if next_family
            else str(config.image_seq_length)
        ),
        sources=", ".join(f"`{name}` ({ROLES[flag]})" for flag, name in names.items()),
        clip=plan.clip.name,
        dtype=dtype_name,
        source_rows="\n".join(
            f"| {ROLES[flag]} | `{name}` ({plan.llava.layout.description}, {source_dtype}) |"
            for flag, name in names.items()
        ),
        num_tensors=len(plan.tensors),
        size=human_size(plan.total_bytes),
        trim=trim,
        image_token=IMAGE_TOKEN,
        image_token_id=config.image_token_id,
        pad_token=PAD_TOKEN,
        pad_token_id=config.text_config.pad_token_id,
        fp32_note=f"; `{'`, `'.join(kept_fp32)}` stay float32, as the model keeps them" if kept_fp32 else "",
        command=command,
        note=(
            "\n\nThis is the starting point of LLaVA-1.5's second training stage (a language model and a projector "
            "from the\npretrain stage, not yet instruction-tuned): fine-tune it before relying on its answers."
            if "--projector" in names
            else ""
        ),
        weights_from=" and ".join(f"`{name}`" for name in names.values()),
        license=license_name,
        min_transformers=MIN_TRANSFORMERS_VERSION,
    )
    ModelCard(content).save(folder / "README.md")
    shutil.copyfile(package_file("LICENSE"), folder / "LICENSE")


def human_size(size: float) -> str:
    """`size` bytes in B, KB, MB or GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} GB"
