"""convert_checkpoint.py on tiny LLaVA-NeXT sources in both layouts (llava-hf `llava_next` and the original llava-v1.6
one): detection, bit-exact weights, --verify, streaming shards, parity with native LLaVA-NeXT, one-line refusals."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextForConditionalGeneration

from llava_trim.convert_checkpoint import main
from llava_trim.testing_utils.tiny_checkpoints import build_llama_tokenizer, build_tiny_clip, load_clip_state_dict
from llava_trim.testing_utils.tiny_next import build_llava_next_hf, build_original_llava_next

IMAGE_ID = 1000


def convert(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("next-sources")
    tokenizer = build_llama_tokenizer(root / "llama-tokenizer")
    clip = build_tiny_clip(root / "clip")
    return {
        "clip": clip,
        "original": build_original_llava_next(root / "original", clip, llama_tokenizer_dir=tokenizer),
        "original_mistral": build_original_llava_next(
            root / "original-mistral", clip, language_model="mistral", llama_tokenizer_dir=tokenizer
        ),
        "hf": build_llava_next_hf(root / "hf", clip, llama_tokenizer_dir=tokenizer),
        "hf_current": build_llava_next_hf(
            root / "hf-current", clip, legacy_names=False, llama_tokenizer_dir=tokenizer
        ),
    }


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict[str, Path]:
    """Every source converted (float32, verified; the original one streamed into several small shards)."""
    root = tmp_path_factory.mktemp("next-converted")
    outputs = {}
    for name in ("original", "original_mistral", "hf", "hf_current"):
        outputs[name] = root / name
        extra = ["--max-shard-size", "200KB"] if name == "original" else []
        assert convert(
            "--llava", sources[name], "--clip", sources["clip"], "--output", outputs[name], "--dtype", "float32",
            "--verify", *extra,
        ) == 0  # fmt: skip
    return outputs


def output_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def original_name(name: str) -> str | None:
    """The model's name of an original llava-v1.6 tensor (the rule of LLaVA's `llava_arch.py`, written here)."""
    for old, new in (
        ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        ("model.image_newline", "model.image_newline"),
        ("model.", "model.language_model."),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(old):
            return new + name.removeprefix(old)
    return None


def hf_name(name: str) -> str:
    """The installed transformers' name of a llava-hf LLaVA-NeXT tensor (legacy Hub names or current ones)."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ):
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def vision_target(written: dict, key: str) -> str:
    """`model.vision_tower.vision_model.X` or `model.vision_tower.X`, whichever the installed transformers uses."""
    return key if key in written else key.replace("model.vision_tower.vision_model.", "model.vision_tower.")


# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["original", "original_mistral", "hf", "hf_current"])
def test_every_source_tensor_arrives_bit_exact(sources, converted, name):
    written = output_tensors(converted[name])
    source = output_tensors(sources[name])  # the sources are safetensors shards too
    mapped = 0
    for key, tensor in source.items():
        target = original_name(key) if name.startswith("original") else hf_name(key)
        target = vision_target(written, target)
        stored = written[target]
        rows = tensor.shape[0]
        assert torch.equal(stored[:rows], tensor.float()), key  # float16 -> float32 is exact
        mapped += 1
    assert mapped == len(source)
    clip = load_clip_state_dict(sources["clip"])
    for key in ("text_projection.weight", "visual_projection.weight"):
        assert torch.equal(written[f"model.trim_scorer.{key}"], clip[key])
    assert torch.equal(
        written["model.trim_scorer.text_model.embeddings.token_embedding.weight"]
        if "model.trim_scorer.text_model.embeddings.token_embedding.weight" in written
        else written["model.trim_scorer.text_model.text_model.embeddings.token_embedding.weight"],
        clip["text_model.embeddings.token_embedding.weight"],
    )


def test_original_source_is_detected_and_streamed_into_shards(sources, converted):
    folder = converted["original"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava_next_trim"
    assert config["architectures"] == ["LlavaNextTrimForConditionalGeneration"]
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("LlavaNextTrimForConditionalGeneration")
    assert (
        config["image_grid_pinpoints"]
        == json.loads((sources["original"] / "config.json").read_text())["image_grid_pinpoints"]
    )
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaNextTrimProcessor" and processor["conversation"] == "vicuna_v1"
    assert processor["image_processor"]["image_grid_pinpoints"] == config["image_grid_pinpoints"]


def test_mistral_sources_get_a_mistral_model_and_template(converted):
    config = json.loads((converted["original_mistral"] / "config.json").read_text())
    assert config["text_config"]["model_type"] == "mistral"
    processor = AutoProcessor.from_pretrained(converted["original_mistral"], trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == "[INST] <image>\nHi? [/INST]"


@torch.no_grad()
@pytest.mark.parametrize("name", ["hf", "hf_current"])
def test_llava_hf_conversion_with_trim_off_is_the_native_model(sources, converted, name):
    """The converted model at `trim_ratio=None` gives the logits native LLaVA-NeXT gives from the source folder."""
    ours = AutoModelForImageTextToText.from_pretrained(converted[name], trust_remote_code=True).eval()
    native = LlavaNextForConditionalGeneration.from_pretrained(sources[name], dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(converted[name], trust_remote_code=True)
    image = Image.new("RGB", (500, 300), (70, 130, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    native_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    difference = (ours(**inputs, trim_ratio=None).logits - native(**native_inputs).logits).abs().max()
    assert difference <= 1e-5  # the same float32 weights and operations
    assert (inputs["input_ids"] == IMAGE_ID).sum() == 576 + 24 * 40 + 24  # 300x500 -> 336x672, unpadded 24x40


REFUSALS = {
    "anyres without spatial_unpad": (
        "original",
        {"mm_patch_merge_type": "spatial"},
        r"image_aspect_ratio='anyres' / mm_patch_merge_type='spatial'",
    ),
    "bad pinpoints": ("original", {"image_grid_pinpoints": "(1x1),...,(3x3)"}, r"image_grid_pinpoints="),
    "other language model": ("hf", {"text_config": {"model_type": "qwen2"}}, r"'qwen2' language model"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_leave_nothing(case, sources, tmp_path, capsys):
    source_name, edits, message = REFUSALS[case]
    folder = tmp_path / "source"
    shutil.copytree(sources[source_name], folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edits.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    output = tmp_path / "out"
    assert convert("--llava", folder, "--clip", sources["clip"], "--output", output) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and re.search(message, error[0]), error
    assert not output.exists()


def test_model_card_names_the_family(converted):
    card = (converted["hf"] / "README.md").read_text()
    assert "LLaVA-NeXT (llava-v1.6) with **TRIM**" in card and "LLaVA-1.5" not in card
    assert "576 overview and up to 2304 tile image patch tokens" in card
