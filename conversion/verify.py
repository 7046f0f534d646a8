# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""`--verify`: the written repository reloaded and checked against the sources, bit for bit, then run once."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from . import ConversionError
from .plan import ConversionPlan
from .sources import CLIP_TOKENIZER_FILES, ROUND_TRIP_QUESTION, check_clip_tokenizer, require_files
from .weights import WeightReader


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaNs included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.dtype.itemsize]
        return torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int))
    return torch.equal(a, b)


def verify_output(plan: ConversionPlan, folder: Path) -> dict:
    """
    Check a written repository: every source tensor arrived bit for bit (or exactly cast to the output dtype), the
    added rows are as planned, the model loads with `trust_remote_code` without missing or unexpected weights and
    holds exactly the file contents, the saved CLIP tokenizer round-trips a question as `--clip`'s does, and one
    forward pass on an image gives finite logits.

    Raises:
        `ConversionError`: on the first mismatch.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cast = check_tensors(plan, folder)
    print(f"verify: {len(plan.tensors)} tensors match the sources bit for bit"
          + (f" ({cast} of them as the source cast to the output dtype)" if cast else ""))  # fmt: skip

    model, info = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=plan.dtype, output_loading_info=True
    )
    problems = {key: sorted(value) for key, value in info.items() if value and key != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"Verification failed: loading {folder} reported {problems or info['error_msgs']}.")
    with _OutputWeights(folder) as written:
        for name, tensor in model.state_dict().items():
            stored = written.get(name)
            if not bits_equal(tensor, stored.to(tensor.dtype)) or not bits_equal(tensor.to(stored.dtype), stored):
                raise ConversionError(f"Verification failed: the loaded model's {name} differs from the file.")
    print("verify: loads with AutoModelForImageTextToText + trust_remote_code: no missing or unexpected weights")

    require_saved_clip_tokenizer(folder)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    check_saved_clip_tokenizer(plan, folder, processor)
    print(f"verify: the CLIP tokenizer gives back {ROUND_TRIP_QUESTION!r}")

    logits, kept, image_tokens = forward_once(model, processor)
    trim_note = f"TRIM kept {kept}/{image_tokens} image tokens" if kept is not None else "TRIM off"
    print(f"verify: forward pass OK: logits {tuple(logits.shape)}, finite; {trim_note}")
    return {
        "tensors": len(plan.tensors),
        "cast": cast,
        "logits_shape": tuple(logits.shape),
        "kept_image_tokens": kept,
        "image_tokens": image_tokens,
    }


def check_tensors(plan: ConversionPlan, folder: Path) -> int:
    """Every planned tensor against its source (and the added rows); returns how many were cast."""
    cast = 0
    with _OutputWeights(folder) as written:
        for path in dict.fromkeys(t.file for t in plan.tensors):
            with WeightReader(path) as reader:
                for planned in (t for t in plan.tensors if t.file == path):
                    source = reader.get(planned.source_name)
                    stored = written.get(planned.target)
                    rows = planned.source_shape[0] if planned.grows_rows else None
                    cast += source.dtype != planned.dtype
                    if not bits_equal(stored[:rows], source.to(planned.dtype)):
                        raise ConversionError(
                            f"Verification failed: {planned.target} differs from {planned.source_name}."
                        )
                    if rows is not None:
                        mean = source.float().mean(dim=0, keepdim=True).to(planned.dtype)
                        if not bits_equal(stored[rows:], mean.expand(stored.shape[0] - rows, -1).contiguous()):
                            raise ConversionError(
                                f"Verification failed: the added rows of {planned.target} are wrong."
                            )
    return cast


def require_saved_clip_tokenizer(folder: Path) -> None:
    """The saved `clip_tokenizer/` holds the files the processor needs to tokenise TRIM's questions."""
    require_files(
        folder / "clip_tokenizer",
        "Verification failed:",
        "saved CLIP tokenizer",
        CLIP_TOKENIZER_FILES,
        fix="The processor could not tokenise TRIM's questions: convert again.",
    )


def check_saved_clip_tokenizer(plan: ConversionPlan, folder: Path, processor) -> None:
    """The saved `clip_tokenizer/` round-trips a question and encodes it as `--clip`'s tokenizer."""
    check_clip_tokenizer(processor.clip_tokenizer, f"the output's clip_tokenizer/ ({folder})")
    if (
        processor.clip_tokenizer(ROUND_TRIP_QUESTION)["input_ids"]
        != plan.clip.tokenizer(ROUND_TRIP_QUESTION)["input_ids"]
    ):
        raise ConversionError(
            f"Verification failed: the saved CLIP tokenizer of {folder} encodes a question differently from --clip's."
        )


def forward_once(model, processor) -> tuple[torch.Tensor, int | None, int]:
    """One forward pass on a drawn image with a question: the logits (checked finite), TRIM's kept count and the
    image's placeholders before reduction."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (480, 360), (70, 130, 200))
    ImageDraw.Draw(image).rectangle((120, 150, 380, 260), fill=(200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model(**inputs)
    if not torch.isfinite(output.logits).all():
        raise ConversionError("Verification failed: the forward pass gave non-finite logits.")
    selection = output.trim_selection
    kept = int(selection.num_kept[0]) if selection is not None and selection.trim_ratio is not None else None
    return output.logits, kept, int((inputs["input_ids"] == processor.image_token_id).sum())


class _OutputWeights:
    """The written shards, opened lazily: `get(name)` reads one tensor."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(folder / "model.safetensors", framework="pt") as handle:
                self.weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        self.folder = folder
        self.handles = {}

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map[name]
        if shard not in self.handles:
            self.handles[shard] = safe_open(self.folder / shard, framework="pt")
        return self.handles[shard].get_tensor(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.handles.clear()
