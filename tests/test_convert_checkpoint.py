"""convert_checkpoint.py on tiny offline checkpoints in every source format: round trips, refusals, Hub upload."""

import copy
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_modeling_llava_trim import FLOAT64_RTOL  # the derivation is there
from torch import nn
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)

from llava_trim.configuration_llava_trim import parse_trim_ratio
from llava_trim.conversion.write import MIN_TRANSFORMERS_VERSION
from llava_trim.convert_checkpoint import (
    build_parser,
    main,
    parse_size,
    trim_ratio_from_source,
)
from llava_trim.testing_utils.tiny_checkpoints import (
    PERTURBED_CLIP_TENSORS,
    TRIM_EMBEDDED_CLIP_PREFIXES,
    build_all,
    build_llava_hf,
    build_trim_llava,
)

SOURCE_VOCAB = 1000  # the tiny sentencepiece vocabulary: <image> becomes 1000, <pad> 1001
IMAGE_ID, PAD_ID = 1000, 1001
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("sources"))


def convert(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory) -> dict[str, Path]:
    """Each source converted to float32 (the original one verified and split into several shards)."""
    root = tmp_path_factory.mktemp("converted")
    clip = sources["clip"]
    outputs = {name: root / name for name in ("original", "trim", "llava_hf")}
    assert convert(
        "--llava", sources["original"], "--clip", clip, "--output", outputs["original"], "--dtype", "float32",
        "--max-shard-size", "300KB", "--verify", "--base-model", "liuhaotian/llava-v1.5-7b",
    ) == 0  # fmt: skip
    assert convert("--llava", sources["trim"], "--clip", clip, "--output", outputs["trim"], "--dtype", "float32") == 0
    assert (
        convert("--llava", sources["llava_hf"], "--clip", clip, "--output", outputs["llava_hf"], "--dtype", "float32")
        == 0
    )
    return outputs


def drawn_image() -> Image.Image:
    """A red bus-like box on a blue sky over green grass (non-square, so LLaVA's padding to a square applies)."""
    image = Image.new("RGB", (448, 320), (90, 150, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 230, 448, 320), fill=(40, 160, 60))
    draw.rectangle((90, 140, 330, 250), fill=(210, 30, 30))
    draw.ellipse((360, 20, 420, 80), fill=(250, 220, 40))
    return image


def model_inputs(folder: Path, question: str = "What is the colour of the bus?") -> dict:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=[drawn_image()], text=prompt, return_tensors="pt"))


def load_converted(folder: Path, dtype: torch.dtype = torch.float32):
    model, info = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all `.bin` / `.safetensors` files), read the plain way."""
    state = {}
    for path in sorted(folder.glob("*.bin")):
        state.update(torch.load(path, weights_only=True))
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def llava_reference(llava_dir: Path, state: dict[str, torch.Tensor], clip: CLIPModel):
    """Native transformers pieces of an original-format LLaVA: LlamaForCausalLM, CLIP, the mlp2x_gelu projector."""
    llama = LlamaForCausalLM(LlamaConfig.from_pretrained(llava_dir)).eval()
    llama_state = {
        k: v.float() for k, v in state.items() if k.startswith(("model.embed", "model.layers", "model.norm"))
    }
    llama_state["lm_head.weight"] = state["lm_head.weight"].float()
    llama_state = {k: v for k, v in llama_state.items() if "rotary_emb" not in k}
    llama.load_state_dict(llama_state, strict=True)
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    projector.load_state_dict(
        {k.removeprefix("model.mm_projector."): v.float() for k, v in state.items() if "mm_projector" in k}
    )
    return llama, projector, clip.float().eval()


def reference_logits(llama, projector, clip, inputs: dict, trim: bool) -> tuple[torch.Tensor, int]:
    """
    LLaVA-1.5 (and, with `trim`, TRIM as docs/trim.md specifies it) computed directly: vision layer -2 without CLS,
    TRIM's auto selection on `p = softmax(-P t)`, kept tokens in patch order plus the mean of the pruned ones,
    projector, spliced into the Llama embeddings. Returns the logits and the number of kept patches.
    """
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        hidden = clip.vision_model(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        features = hidden[0, 1:]  # (576, Dv)
        kept = features.shape[0]
        if trim:
            text = clip.text_model(
                input_ids=inputs["trim_input_ids"], attention_mask=inputs["trim_attention_mask"]
            ).pooler_output
            # TRIM scores in float32 in every model dtype (docs/trim.md), so the reference does too
            t = text.float() @ clip.text_projection.weight.float().T  # (1, D)
            patches = clip.vision_model.post_layernorm(features).float() @ clip.visual_projection.weight.float().T
            p = F.softmax(-(patches @ t[0]), dim=0)  # (576,)
            q1, q3 = torch.quantile(p, torch.tensor([0.25, 0.75]))
            keep = p > q3 + 1.5 * (q3 - q1)
            kept = int(keep.sum())
            pruned_mean = features[~keep].mean(dim=0) if (~keep).any() else torch.zeros_like(features[0])
            features = torch.cat([features[keep], pruned_mean[None]])  # (|K| + 1, Dv)
        image_embeds = projector(features)
        start = int((ids == IMAGE_ID).nonzero()[0])
        before, after = ids[:start], ids[start + 576 :]
        embed = llama.get_input_embeddings()
        embeds = torch.cat([embed(before), image_embeds, embed(after)])[None]
        return llama(inputs_embeds=embeds).logits, kept


def leftovers(output: Path) -> list[str]:
    """The output folder and any temporary folder the converter may have left beside it."""
    return sorted(
        p.name for p in output.parent.iterdir() if p.name == output.name or p.name.startswith(f".{output.name}.")
    )


# ------------------------------------------------------------------------------------------------------------------
# Round trips: logits equal the source model's
# ------------------------------------------------------------------------------------------------------------------


def test_original_llava_round_trip_matches_native_pieces(sources, converted):
    """liuhaotian format (.bin shards + index, inv_freq, fp16, no CLIP): TRIM off equals LLaMA + CLIP + projector."""
    folder = converted["original"]
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1  # --max-shard-size 300KB gave several shards
    model = load_converted(folder)
    assert model.config.image_token_id == IMAGE_ID and model.config.text_config.vocab_size == SOURCE_VOCAB + 2
    clip = CLIPModel.from_pretrained(sources["clip"], dtype=torch.float32)
    llama, projector, clip = llava_reference(sources["original"], read_state(sources["original"]), clip)
    inputs = model_inputs(folder)
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 576
    with torch.no_grad():
        logits = model(**inputs, trim_ratio=None).logits
    expected, _ = reference_logits(llama, projector, clip, inputs, trim=False)
    assert logits.shape[1] == expected.shape[1]
    assert torch.equal(logits[..., :SOURCE_VOCAB], expected)  # the same modules and weights: the same bits


def test_trim_format_round_trip_with_trim_on(sources, converted):
    """FreedomIntelligence format (bf16 safetensors, embedded CLIP, TRIM:-1): TRIM on equals docs/trim.md's TRIM."""
    folder = converted["trim"]
    model = load_converted(folder)
    assert model.config.trim_ratio == -1  # from mm_vision_token_reduce_func "TRIM:-1"
    state = read_state(sources["trim"])
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    clip_state = {}
    for clip_prefix, trim_prefix in TRIM_EMBEDDED_CLIP_PREFIXES.items():
        clip_state.update(
            {
                clip_prefix + k.removeprefix(trim_prefix): v.float()
                for k, v in state.items()
                if k.startswith(trim_prefix)
            }
        )
    clip = CLIPModel(CLIPConfig.from_pretrained(sources["clip"]))
    missing, unexpected = clip.load_state_dict(clip_state, strict=False)
    assert missing == ["logit_scale"] and not unexpected  # the embedded towers hold everything TRIM needs
    llama, projector, clip = llava_reference(sources["trim"], state, clip)

    inputs = model_inputs(folder)
    # with TRIM off it is plain LLaVA-1.5 on the embedded vision tower: the same modules, the same bits
    with torch.no_grad():
        off = model(**inputs, trim_ratio=None).logits
    expected_off, _ = reference_logits(llama, projector, clip, inputs, trim=False)
    assert torch.equal(off[..., :SOURCE_VOCAB], expected_off)

    # TRIM on: the pruned features' mean and the compacted sequence are summed in other orders than the reference's,
    # so this compares in float64 (TRIM's scores are float32 on both sides), within FLOAT64_RTOL (derived there)
    model = load_converted(folder, dtype=torch.float64)
    llama, projector, clip = (copy.deepcopy(module).double() for module in (llama, projector, clip))
    with torch.no_grad():
        output = model(**inputs)  # the config's TRIM (-1, automatic)
    expected, kept = reference_logits(llama, projector, clip, inputs, trim=True)
    assert int(output.trim_selection.num_kept[0]) == kept < 576
    assert output.logits.shape[1] == expected.shape[1] == inputs["input_ids"].shape[1] - 576 + kept + 1
    assert expected.dtype == torch.float64
    assert (output.logits[..., :SOURCE_VOCAB] - expected).abs().max() <= FLOAT64_RTOL * expected.abs().max()


def test_llava_hf_round_trip_matches_native_llava(sources, converted):
    """llava-hf format (legacy key names): equals transformers' own LlavaForConditionalGeneration on the source."""
    model = load_converted(converted["llava_hf"])
    native, info = LlavaForConditionalGeneration.from_pretrained(
        sources["llava_hf"], dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = model_inputs(converted["llava_hf"])
    with torch.no_grad():
        logits = model(**inputs, trim_ratio=None).logits
        expected = native.eval()(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        ).logits
    assert logits.shape == expected.shape  # the vocabulary padded to 1024 rows is kept
    assert torch.equal(logits, expected)


def test_llava_hf_current_names_give_the_same_weights(sources, converted, tmp_path):
    """The installed transformers' own key names convert to exactly the weights of the legacy Hub names."""
    source = build_llava_hf(
        tmp_path / "hf-current", sources["clip"], legacy_names=False, llama_tokenizer_dir=sources["original"]
    )
    assert not any(key.startswith("language_model.") for key in read_state(source))
    output = tmp_path / "out"
    assert convert("--llava", source, "--clip", sources["clip"], "--output", output, "--dtype", "float32") == 0
    current, legacy = read_state(output), read_state(converted["llava_hf"])
    assert current.keys() == legacy.keys()
    assert all(torch.equal(current[key], legacy[key]) for key in current)


def test_output_keeps_source_dtype_and_tensors_bit_identical(sources, tmp_path):
    """Without --dtype the LLaVA source's fp16 is kept and every LLaVA tensor is byte-identical to the source."""
    output = tmp_path / "fp16"
    assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output) == 0
    written, source = read_state(output), read_state(sources["original"])
    assert json.loads((output / "config.json").read_text())["dtype"] == "float16"
    assert written["model.language_model.layers.1.mlp.down_proj.weight"].dtype == torch.float16
    for name, tensor in source.items():
        if "rotary_emb" in name:
            assert not any("rotary_emb" in key for key in written)
            continue
        target = name.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
        target = target.replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")
        target = (
            target
            if target.startswith(("lm_head", "model.multi"))
            else target.replace("model.", "model.language_model.", 1)
        )
        rows = tensor.shape[0]
        assert torch.equal(written[target][:rows].view(torch.int16), tensor.view(torch.int16)), name
    # TRIM's projections stay float32 (the model keeps them in float32), copied exactly from CLIP
    clip = CLIPModel.from_pretrained(sources["clip"]).state_dict()
    assert torch.equal(written["model.trim_scorer.visual_projection.weight"], clip["visual_projection.weight"])
    assert torch.equal(
        written["model.vision_tower.encoder.layers.0.mlp.fc1.weight"],
        clip["vision_model.encoder.layers.0.mlp.fc1.weight"].half(),
    )


# ------------------------------------------------------------------------------------------------------------------
# The added tokens can never be generated
# ------------------------------------------------------------------------------------------------------------------


def test_added_token_rows_cannot_win_greedy(converted):
    """New LM-head rows are the mean of the others: their logit is the mean logit, never above the maximum."""
    model = load_converted(converted["original"])
    stored = getattr(torch, json.loads((converted["original"] / "config.json").read_text())["dtype"])
    u, u_stored = 2.0**-24, torch.finfo(stored).eps / 2  # unit roundoff of float32 and of the stored dtype

    def mean_row_error(rows: torch.Tensor) -> torch.Tensor:
        """How far the written row may be from a float32 mean of `rows`: the converter's float32 mean and this one
        sum in any order (each within V u mean|rows| of the exact mean), then the write rounds to the stored dtype."""
        mean = rows.mean(0)
        return 2 * len(rows) * u * rows.abs().mean(0) + u_stored * mean.abs()

    head = model.lm_head.weight
    head_error = mean_row_error(head[:SOURCE_VOCAB])
    assert ((head[IMAGE_ID] - head[:SOURCE_VOCAB].mean(0)).abs() <= head_error).all()
    hidden = torch.randn(4096, head.shape[1]) * torch.logspace(-2, 2, 4096)[:, None]  # many scales and directions
    logits = (hidden @ head.T).double()
    best_old = logits[:, :SOURCE_VOCAB].max(dim=1).values
    # exactly, h . mean <= max_j h . w_j; in float32 each logit is within d u |h| . |w| (d = width) and the written
    # row within head_error of the mean
    rounding = head.shape[1] * u * (hidden.abs() @ head.abs().T).double()
    slack = 2 * rounding.max(dim=1).values + (hidden.abs() @ head_error).double()
    assert (logits[:, SOURCE_VOCAB:].max(dim=1).values <= best_old + slack).all()
    embed = model.get_input_embeddings().weight
    assert ((embed[PAD_ID] - embed[:SOURCE_VOCAB].mean(0)).abs() <= mean_row_error(embed[:SOURCE_VOCAB])).all()


def test_added_tokens_never_generated_greedy_or_sampled(converted):
    """generation_config suppresses them: even with LM-head rows rigged to win, greedy and sampling never emit them."""
    folder = converted["original"]
    generation_config = json.loads((folder / "generation_config.json").read_text())
    assert generation_config["suppress_tokens"] == [IMAGE_ID, PAD_ID] and generation_config["do_sample"] is False
    model = load_converted(folder)
    inputs = model_inputs(folder)
    with torch.no_grad():  # rig the rows: without suppression these two tokens win every step
        model.lm_head.weight[IMAGE_ID] = model.lm_head.weight[:SOURCE_VOCAB].sum(0) * 50
        model.lm_head.weight[PAD_ID] = -model.lm_head.weight[:SOURCE_VOCAB].sum(0) * 50
    prompt_length = inputs["input_ids"].shape[1]
    runs = {
        "greedy": dict(do_sample=False),
        "sampled": dict(do_sample=True, temperature=3.0, num_return_sequences=4),
    }
    for name, kwargs in runs.items():
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, trim_ratio=None, **kwargs)
        new = out[:, prompt_length:]
        assert new.shape[1] == 12 and not torch.isin(new, torch.tensor([IMAGE_ID, PAD_ID])).any(), name
    # the control: the same rigged model without suppression does emit them, so the check above can fail
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=[], trim_ratio=None)
    assert torch.isin(out[:, prompt_length:], torch.tensor([IMAGE_ID, PAD_ID])).any()


# ------------------------------------------------------------------------------------------------------------------
# The repository files
# ------------------------------------------------------------------------------------------------------------------


def test_repository_files_auto_map_and_model_card(converted):
    folder = converted["original"]
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    for required in (
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "configuration_llava_trim.py",
        "modeling_llava_trim.py",
        "processing_llava_trim.py",
        "processor_config.json",
        "tokenizer.json",
        "clip_tokenizer/tokenizer_config.json",
        "LICENSE",
        "README.md",
    ):
        assert required in names, required
    for code in ("configuration_llava_trim.py", "modeling_llava_trim.py", "processing_llava_trim.py"):
        assert (folder / code).read_bytes() == (REPO_ROOT / code).read_bytes()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_llava_trim.LlavaTrimForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_llava_trim.LlavaTrimConfig"
    assert config["transformers_version"] == MIN_TRANSFORMERS_VERSION  # the oldest the code runs on, not the writer's
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"].endswith(
        "LlavaTrimProcessor"
    )
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    sizes = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(folder / shard, framework="pt") as handle:
            sizes += sum(handle.get_tensor(key).nbytes for key in handle.keys())
            assert all(index["weight_map"][key] == shard for key in handle.keys())
    assert index["metadata"]["total_size"] == sizes

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "llama2" and card.data.base_model == "liuhaotian/llava-v1.5-7b"
    assert "trim" in card.data.tags and "custom_code" in card.data.tags
    assert f'Needs transformers >= {MIN_TRANSFORMERS_VERSION} (`pip install -U "transformers>=' in card.text


def test_model_card_usage_runs_as_written(converted, tmp_path):
    """The card's pipeline snippet runs unchanged except the image URL (offline here) pointing to a local file."""
    folder = converted["original"]
    card = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'model="{folder}"' in snippet  # without --push-to-hub the card names the output folder
    image_path = tmp_path / "cats.png"
    drawn_image().save(image_path)
    snippet = snippet.replace("http://images.cocodataset.org/val2017/000000039769.jpg", str(image_path))
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------------------------


def test_trim_ratio_sources_and_flags():
    assert trim_ratio_from_source({"mm_vision_token_reduce_func": "TRIM:-1"}) == -1
    assert trim_ratio_from_source({"mm_vision_token_reduce_func": "TRIM:0.25"}) == 0.25
    assert trim_ratio_from_source({"mm_vision_token_reduce_func": "TextSim+:0.5"}) == 0.5
    assert trim_ratio_from_source({}) == "absent"
    with pytest.raises(ValueError, match="not a TRIM setting"):
        trim_ratio_from_source({"mm_vision_token_reduce_func": "Pooling:2"})
    assert parse_trim_ratio("none") is None and parse_trim_ratio("-1") == -1 and parse_trim_ratio("0.3") == 0.3
    for bad in ("0", "1.5", "-0.5", "half"):
        with pytest.raises(ValueError, match="is not a trim_ratio"):
            parse_trim_ratio(bad)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1024") == 1024


def test_trim_ratio_flag_overrides_source(sources, tmp_path):
    output = tmp_path / "off"
    assert (
        convert("--llava", sources["trim"], "--clip", sources["clip"], "--output", output, "--trim-ratio", "none") == 0
    )
    assert json.loads((output / "config.json").read_text())["trim_ratio"] is None
    output = tmp_path / "quarter"
    assert (
        convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output, "--trim-ratio", "0.25")
        == 0
    )
    assert json.loads((output / "config.json").read_text())["trim_ratio"] == 0.25


def test_embedded_clip_that_differs_from_clip_is_used_with_a_warning(sources, tmp_path, caplog):
    source = build_trim_llava(
        tmp_path / "trim-changed", sources["clip"], perturb_embedded_clip=True, llama_tokenizer_dir=sources["original"]
    )
    output = tmp_path / "out"
    with caplog.at_level("WARNING", logger="llava_trim.convert_checkpoint"):
        assert convert("--llava", source, "--clip", sources["clip"], "--output", output) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "2 CLIP tensor(s) that differ from --clip" in warning
    assert "model.vision_tower.vision_tower.visual_projection.weight" in warning
    assert "model.vision_tower.text_tower.text_model.encoder.layers.0.self_attn.q_proj.bias" in warning
    assert len(PERTURBED_CLIP_TENSORS) == 2
    embedded = read_state(source)["model.vision_tower.vision_tower.visual_projection.weight"]
    assert torch.equal(read_state(output)["model.trim_scorer.visual_projection.weight"], embedded.float())


def test_help_explains_every_flag_with_an_example():
    parser = build_parser()
    examples = parser.format_help().split("examples:")[1]
    for action in parser._actions:
        flag = action.option_strings[-1]
        if flag == "--help":
            continue
        assert action.help and len(action.help) > 20, flag
        assert re.search(re.escape(flag) + r"(\s|$)", examples) or "e.g." in action.help, f"{flag} has no example"
    assert "liuhaotian/llava-v1.5-7b" in examples and "FreedomIntelligence/llava-v1.5-7b-TRIM" in examples
    # the file also runs as a plain script from a checkout
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "convert_checkpoint.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--push-to-hub" in result.stdout
    # every example command is one shell command: a line that goes on ends with a backslash
    commands = " ".join(line.strip() for line in examples.splitlines() if not line.strip().startswith("#"))
    assert "lmsys/vicuna-7b-v1.5 \\ --projector liuhaotian/" in commands
    for command in commands.replace(" \\ ", " ").split("python convert_checkpoint.py")[1:]:
        example = parser.parse_args(shlex.split(command))
        assert example.output and (example.llava or example.language_model)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_start_up_is_one_line(tmp_path, signum):
    """Interrupted while it imports torch and transformers (its first seconds), the converter says so in one line
    (no traceback, no error from a half-imported module) and exits with 128 + the signal number."""
    command = [sys.executable, "-X", "importtime", str(REPO_ROOT / "convert_checkpoint.py")]
    command += ["--llava", "liuhaotian/llava-v1.5-7b", "--output", str(tmp_path / "out")]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for line in child.stderr:  # -X importtime: a line per module imported; wait until torch's are coming
            if re.search(r"\|\s+torch\.", line):
                break
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signum
    assert error_lines(stderr) == [f"error: interrupted by {signal.Signals(signum).name}: nothing was written."]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# Refusals: a clear message and nothing left behind
# ------------------------------------------------------------------------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _drop_shard_keep_index(folder: Path) -> None:
    (folder / "pytorch_model-00002-of-00002.bin").unlink()


def _drop_shard_and_index(folder: Path) -> None:
    (folder / "pytorch_model.bin.index.json").unlink()
    (folder / "pytorch_model-00002-of-00002.bin").unlink()


def _truncate_bin(folder: Path) -> None:
    path = folder / "pytorch_model-00001-of-00002.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_safetensors(folder: Path) -> None:
    path = folder / "model-00002-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _unknown_keys(folder: Path) -> None:
    path = folder / "pytorch_model-00002-of-00002.bin"
    state = torch.load(path, weights_only=True)
    state["model.mm_resampler.query"] = torch.zeros(4, 8, dtype=torch.float16)
    state["model.extra_head.weight"] = torch.zeros(2, dtype=torch.float16)
    torch.save(state, path)


def _index_without_tensor(folder: Path) -> None:
    path = folder / "model-00001-of-00003.safetensors"
    state = load_file(path)
    state.pop(next(iter(state)))
    save_file(state, path, metadata={"format": "pt"})


REFUSALS = {
    "index names a missing shard": (
        "original",
        _drop_shard_keep_index,
        r"names 1 weight file\(s\) that are not in .*pytorch_model-00002-of-00002.bin",
    ),
    "missing shard": (
        "original",
        _drop_shard_and_index,
        r"holds 1 of 2 weight shards; missing: pytorch_model-00002-of-00002.bin",
    ),
    "truncated .bin": ("original", _truncate_bin, r"pytorch_model-00001-of-00002.bin .* truncated or corrupt"),
    "truncated safetensors": (
        "trim",
        _truncate_safetensors,
        r"model-00002-of-00003.safetensors .* truncated or corrupt",
    ),
    "shard lacks an indexed tensor": ("trim", _index_without_tensor, r"lacks 1 tensor\(s\) its index assigns to it"),
    "unknown keys": (
        "original",
        _unknown_keys,
        r"2 tensor\(s\) with unknown names: model.mm_resampler.query, model.extra_head",
    ),
    "mm_hidden_size": (
        "original",
        lambda f: _edit_config(f, mm_hidden_size=48),
        r"Shape mismatch with CLIP: .*mm_hidden_size=48",
    ),
    "projector type": (
        "original",
        lambda f: _edit_config(f, mm_projector_type="linear"),
        r"mm_projector_type='linear'",
    ),
    "anyres": ("original", lambda f: _edit_config(f, image_aspect_ratio="anyres"), r"image_aspect_ratio='anyres'"),
    "im_start_end": ("original", lambda f: _edit_config(f, mm_use_im_start_end=True), r"mm_use_im_start_end: true"),
    "non-Llama LLM": (
        "original",
        lambda f: _edit_config(f, model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"]),
        r"non-Llama language model",
    ),
    "cls features": ("original", lambda f: _edit_config(f, mm_vision_select_feature="cls_patch"), r"'cls_patch'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_nothing_behind(case, sources, tmp_path, capsys):
    kind, damage, message = REFUSALS[case]
    source = tmp_path / "source"
    shutil.copytree(sources[kind], source)
    damage(source)
    output = tmp_path / "nested" / "out"
    assert convert("--llava", source, "--clip", sources["clip"], "--output", output) == 1
    assert re.search(message, capsys.readouterr().err), case
    assert not output.parent.exists()  # not even the parent folder the converter would have created


def test_non_empty_output_is_refused_without_overwrite(sources, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output) == 1
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"] and leftovers(output) == ["out"]
    assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output, "--overwrite") == 0
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert leftovers(output) == ["out"]
    assert convert("--llava", sources["original"], "--clip", output, "--output", output, "--overwrite") == 1
    assert "overlaps the source folder" in capsys.readouterr().err and (output / "config.json").is_file()


def error_lines(stderr: str) -> list[str]:
    """The converter's error output: its `error:` lines, and any traceback line (there must be none)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


@pytest.mark.parametrize(
    ("exception", "status", "message"),
    [
        (RuntimeError("something broke"), 1, "error: unexpected RuntimeError: something broke. Nothing was written."),
        (OSError(errno.ENOSPC, "No space left on device", "shard.safetensors"), 1, "free some disk space"),
        (KeyboardInterrupt(), 130, "error: interrupted by SIGINT: nothing was written."),
    ],
)
def test_failure_while_writing_leaves_nothing_and_keeps_the_old_output(
    sources, tmp_path, capsys, exception, status, message
):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("previous conversion")
    with mock.patch("llava_trim.convert_checkpoint.write_processor", side_effect=exception):
        assert (
            convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output, "--overwrite")
            == status
        )
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines
    assert leftovers(output) == ["out"] and [p.name for p in output.iterdir()] == ["old.txt"]


def test_disk_full_while_writing_shards_is_one_line(sources, tmp_path, capsys):
    output = tmp_path / "nested" / "out"
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch("llava_trim.conversion.write.save_file", side_effect=full):
        assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output) == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["error: No space left on device: free some disk space or choose another --output. Nothing was "
                     "written."]  # fmt: skip
    assert not output.parent.exists()


def test_output_under_a_file_is_refused(sources, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    output = tmp_path / "notes.txt" / "out"
    assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "notes.txt is a file, not a folder" in lines[0]
    assert (tmp_path / "notes.txt").read_text() == "a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_refused(sources, tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", parent / "out") == 1
    finally:
        parent.chmod(0o755)
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "is not writable" in lines[0] and not any(parent.iterdir())


def test_permission_denied_creating_the_temporary_folder_is_one_line(sources, tmp_path, capsys):
    """What a read-only parent gives even where the check above cannot see it (root, ACLs, read-only mounts)."""
    output = tmp_path / "nested" / "out"
    denied = PermissionError(errno.EACCES, "Permission denied", str(output.parent))
    with mock.patch("tempfile.mkdtemp", side_effect=denied):
        assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output) == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: Permission denied ({output.parent}): choose another --output or fix the permissions. "
                     "Nothing was written."]  # fmt: skip
    assert not output.parent.exists()


# A conversion in a child process that pauses once its processor files are written (the weights are written by then),
# so a signal arrives while the temporary folder is full.
SLOW_CONVERSION = """
import sys, time
from pathlib import Path
import llava_trim.convert_checkpoint as converter

marker, argv = Path(sys.argv[1]), sys.argv[2:]
write_processor = converter.write_processor

def write_processor_then_wait(plan, folder):
    write_processor(plan, folder)
    marker.write_text(str(folder))
    time.sleep(120)

converter.write_processor = write_processor_then_wait
sys.exit(converter.main(argv))
"""


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_converting_is_one_line_and_leaves_nothing(sources, tmp_path, signum, status):
    output = tmp_path / "nested" / "out"
    marker = tmp_path / "writing"
    argv = ["--llava", sources["original"], "--clip", sources["clip"], "--output", output]
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERSION, str(marker), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), child.communicate(timeout=10)[1][-2000:]
        staging = Path(marker.read_text())
        assert (staging / "config.json").is_file() and staging.name.endswith(".partial")  # mid-conversion
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == status
    assert error_lines(stderr) == [f"error: interrupted by {signal.Signals(signum).name}: nothing was written."]
    assert not staging.exists() and not output.parent.exists()


# ------------------------------------------------------------------------------------------------------------------
# Pushing to the Hub, without network
# ------------------------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_complete_folder(sources, tmp_path):
    output = tmp_path / "out"
    uploaded = {}

    def fake_upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded.update(kwargs, files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
        return mock.Mock(commit_url="https://huggingface.co/me/tiny-llava-trim/commit/abc")

    with (
        mock.patch("huggingface_hub.get_token", return_value="hf_test"),
        mock.patch("huggingface_hub.create_repo") as create_repo,
        mock.patch("huggingface_hub.create_branch") as create_branch,
        mock.patch("huggingface_hub.upload_folder", side_effect=fake_upload_folder),
    ):
        argv = ["--llava", sources["original"], "--clip", sources["clip"], "--output", output]
        assert convert(*argv, "--push-to-hub", "me/tiny-llava-trim", "--private", "--revision", "v1") == 0
    create_repo.assert_called_once_with("me/tiny-llava-trim", private=True, exist_ok=True, repo_type="model")
    create_branch.assert_called_once_with("me/tiny-llava-trim", branch="v1", exist_ok=True, repo_type="model")
    assert uploaded["repo_id"] == "me/tiny-llava-trim" and uploaded["revision"] == "v1"
    assert Path(uploaded["folder_path"]) == output.resolve() and "LLaVA" in uploaded["commit_message"]
    local = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    assert uploaded["files"] == local and "model.safetensors" in local and "clip_tokenizer/tokenizer.json" in local
    assert 'model="me/tiny-llava-trim"' in (output / "README.md").read_text()  # the card shows the Hub id


@pytest.mark.parametrize("failure", ["no token", "network"])
def test_push_failure_is_clear_and_keeps_the_local_folder(sources, tmp_path, capsys, failure):
    output = tmp_path / "out"
    token = None if failure == "no token" else "hf_test"
    error = OSError("Network is unreachable")
    with (
        mock.patch("huggingface_hub.get_token", return_value=token),
        mock.patch("huggingface_hub.create_repo", side_effect=error) as create_repo,
        mock.patch("huggingface_hub.upload_folder") as upload_folder,
    ):
        argv = ["--llava", sources["original"], "--clip", sources["clip"], "--output", output]
        assert convert(*argv, "--push-to-hub", "me/tiny-llava-trim") == 1
    message = capsys.readouterr().err
    expected = "No Hugging Face token" if failure == "no token" else "Pushing to me/tiny-llava-trim failed"
    assert expected in message and f"complete in {output.resolve()}" in message
    assert create_repo.call_count == (0 if failure == "no token" else 1) and not upload_folder.called
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()


# ------------------------------------------------------------------------------------------------------------------
# Incomplete sources: refused, naming the missing files
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        (("vocab.json", "merges.txt"), "lacks the CLIP tokenizer: vocab.json, merges.txt missing (or tokenizer.json)"),
        (("merges.txt",), "lacks the CLIP tokenizer: merges.txt missing"),
        (("preprocessor_config.json",), "lacks the CLIP image processor settings: preprocessor_config.json missing"),
    ],
)
def test_clip_without_tokenizer_files_is_refused(sources, tmp_path, capsys, removed, named):
    clip = tmp_path / "clip"
    shutil.copytree(sources["clip"], clip)
    for name in removed:
        (clip / name).unlink()
    output = tmp_path / "nested" / "out"
    assert convert("--llava", sources["original"], "--clip", clip, "--output", output, "--verify") == 1
    assert named in capsys.readouterr().err
    assert not output.parent.exists()


def test_clip_tokenizer_that_does_not_round_trip_is_refused(sources, tmp_path, capsys):
    """A tokenizer whose files exist but hold a trivial vocabulary turns every question into `<|endoftext|>`."""
    clip = tmp_path / "clip"
    shutil.copytree(sources["clip"], clip)
    (clip / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (clip / "merges.txt").write_text("#version: 0.2\n")
    output = tmp_path / "out"
    assert convert("--llava", sources["original"], "--clip", clip, "--output", output) == 1
    message = capsys.readouterr().err
    assert "does not round-trip a question" in message and "'What is the colour of the bus?'" in message
    assert leftovers(output) == []


def test_llava_without_tokenizer_files_is_refused(sources, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(sources["original"], source)
    (source / "tokenizer.model").unlink()
    output = tmp_path / "out"
    assert convert("--llava", source, "--clip", sources["clip"], "--output", output) == 1
    assert "lacks the Llama tokenizer: tokenizer.model missing (or tokenizer.json)" in capsys.readouterr().err
    assert leftovers(output) == []


def test_verify_refuses_a_saved_clip_tokenizer_that_is_incomplete(sources, tmp_path, capsys):
    """`--verify` checks the CLIP tokenizer the output holds, not only the source's."""
    from llava_trim import convert_checkpoint

    write_processor = convert_checkpoint.write_processor

    def write_processor_losing_vocab(plan, folder):
        write_processor(plan, folder)
        (folder / "clip_tokenizer" / "tokenizer.json").unlink()

    output = tmp_path / "out"
    with mock.patch("llava_trim.convert_checkpoint.write_processor", side_effect=write_processor_losing_vocab):
        assert convert("--llava", sources["original"], "--clip", sources["clip"], "--output", output, "--verify") == 1
    message = capsys.readouterr().err
    assert "Verification failed:" in message and "saved CLIP tokenizer: vocab.json, merges.txt missing" in message
    assert leftovers(output) == []


# ------------------------------------------------------------------------------------------------------------------
# The starting point of the second training stage: a Llama checkpoint plus LLaVA's pretrain projector
# ------------------------------------------------------------------------------------------------------------------


def stage2_args(sources, output, *extra) -> list:
    return [
        "--language-model", sources["vicuna"], "--projector", sources["projector"], "--clip", sources["clip"],
        "--output", output, *extra,
    ]  # fmt: skip


def test_language_model_plus_projector_is_bit_exact_and_matches_native_pieces(sources, tmp_path):
    """Vicuna (.bin shards, fp16) + mm_projector.bin (bf16) + CLIP, in float32: every value exact, logits native."""
    output = tmp_path / "stage2"
    assert convert(*stage2_args(sources, output, "--dtype", "float32", "--verify")) == 0
    written = read_state(output)
    vicuna = read_state(sources["vicuna"])
    projector = torch.load(sources["projector"] / "mm_projector.bin", weights_only=True)
    clip = CLIPModel.from_pretrained(sources["clip"]).state_dict()
    expected = {}
    for name, tensor in vicuna.items():
        if "rotary_emb" not in name:
            target = name if name.startswith("lm_head") else name.replace("model.", "model.language_model.", 1)
            expected[target] = tensor
    expected["model.multi_modal_projector.linear_1.weight"] = projector["model.mm_projector.0.weight"]
    expected["model.multi_modal_projector.linear_1.bias"] = projector["model.mm_projector.0.bias"]
    expected["model.multi_modal_projector.linear_2.weight"] = projector["model.mm_projector.2.weight"]
    expected["model.multi_modal_projector.linear_2.bias"] = projector["model.mm_projector.2.bias"]
    expected["model.trim_scorer.visual_projection.weight"] = clip["visual_projection.weight"]
    expected["model.trim_scorer.text_projection.weight"] = clip["text_projection.weight"]
    for name, tensor in expected.items():
        rows = tensor.shape[0]
        assert torch.equal(written[name][:rows].view(torch.int32), tensor.float().view(torch.int32)), name
    # <image> and <pad> added as for the other sources: mean rows, suppressed, never generated
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        assert written[name].shape[0] == SOURCE_VOCAB + 2
        assert torch.equal(
            written[name][SOURCE_VOCAB:], vicuna[name.replace("language_model.", "")].float().mean(0).expand(2, -1)
        )
    model = load_converted(output)
    assert model.config.image_token_id == IMAGE_ID and model.config.text_config.pad_token_id == PAD_ID
    assert model.config.trim_ratio == -1  # the projector's config has no TRIM setting: automatic
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [IMAGE_ID, PAD_ID] and generation["do_sample"] is False
    assert "temperature" not in generation and "top_p" not in generation  # Vicuna's sampling settings dropped
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_ID, PAD_ID]

    # logits equal Llama (transformers) + CLIP (transformers) + the mlp2x_gelu projector on the source tensors
    llama, projector_module, clip_model = llava_reference(
        sources["vicuna"], {**vicuna, **projector}, CLIPModel.from_pretrained(sources["clip"], dtype=torch.float32)
    )
    inputs = model_inputs(output)
    with torch.no_grad():
        logits = model(**inputs, trim_ratio=None).logits
    reference, _ = reference_logits(llama, projector_module, clip_model, inputs, trim=False)
    assert torch.equal(logits[..., :SOURCE_VOCAB], reference)


def test_language_model_plus_projector_default_dtype_and_model_card(sources, tmp_path, caplog):
    """Without --dtype the language model's fp16 is kept bit for bit; the bf16 projector is cast to it."""
    output = tmp_path / "stage2"
    with caplog.at_level("WARNING", logger="llava_trim.convert_checkpoint"):
        assert convert(*stage2_args(sources, output)) == 0
    written, vicuna = read_state(output), read_state(sources["vicuna"])
    assert json.loads((output / "config.json").read_text())["dtype"] == "float16"
    layer = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(
        written[layer.replace("model.", "model.language_model.", 1)].view(torch.int16), vicuna[layer].view(torch.int16)
    )
    projector = torch.load(sources["projector"] / "mm_projector.bin", weights_only=True)
    cast = projector["model.mm_projector.2.weight"].half()
    assert torch.equal(written["model.multi_modal_projector.linear_2.weight"], cast)
    changed = not all(torch.equal(t.half().to(t.dtype), t) for t in projector.values())
    warned = "changed when cast to float16" in caplog.text
    assert warned == changed  # a lossy cast is reported, an exact one is not
    card = (output / "README.md").read_text()
    assert f"`{sources['vicuna']}` (language model)" in card and f"`{sources['projector']}` (projector)" in card
    assert "starting point of LLaVA-1.5's second training stage" in card
    assert f"--language-model {sources['vicuna']} --projector {sources['projector']}" in card


def test_lossy_cast_is_reported(sources, tmp_path, caplog):
    """A projector value that float16 cannot hold is named in a warning (no silent change)."""
    from llava_trim.testing_utils.tiny_checkpoints import build_llava_pretrain_projector

    projector = build_llava_pretrain_projector(tmp_path / "projector")
    state = torch.load(projector / "mm_projector.bin", weights_only=True)
    state["model.mm_projector.0.bias"][0] = 1e-30  # below float16's smallest subnormal
    torch.save(state, projector / "mm_projector.bin")
    argv = ["--language-model", sources["vicuna"], "--projector", projector, "--clip", sources["clip"]]
    with caplog.at_level("WARNING", logger="llava_trim.convert_checkpoint"):
        assert convert(*argv, "--output", tmp_path / "out") == 0
    assert "1 tensor(s) changed when cast to float16 (model.mm_projector.0.bias)" in caplog.text


def _projector_without_file(sources, folder: Path) -> list:
    shutil.copytree(sources["projector"], folder)
    (folder / "mm_projector.bin").unlink()
    return ["--language-model", sources["vicuna"], "--projector", folder]


def _non_llama_language_model(sources, folder: Path) -> list:
    shutil.copytree(sources["vicuna"], folder)
    _edit_config(folder, model_type="mistral", architectures=["MistralForCausalLM"])
    return ["--language-model", folder, "--projector", sources["projector"]]


def _projector_for_another_model(sources, folder: Path) -> list:
    shutil.copytree(sources["projector"], folder)
    _edit_config(folder, hidden_size=128)
    return ["--language-model", sources["vicuna"], "--projector", folder]


def _linear_projector(sources, folder: Path) -> list:
    shutil.copytree(sources["projector"], folder)
    _edit_config(folder, mm_projector_type="linear")
    return ["--language-model", sources["vicuna"], "--projector", folder]


def _full_llava_as_projector(sources, folder: Path) -> list:
    """A LLaVA checkpoint's shards are not a projector file: the projector folder must hold mm_projector.bin."""
    return ["--language-model", sources["vicuna"], "--projector", sources["original"]]


STAGE2_REFUSALS = {
    "no mm_projector.bin": (_projector_without_file, r"lacks the pretrain projector: mm_projector.bin missing"),
    "non-Llama language model": (_non_llama_language_model, r"is not a Llama checkpoint \(model_type='mistral'"),
    "projector for another model": (
        _projector_for_another_model,
        r"hidden_size=128, but --language-model .* has hidden_size=64",
    ),
    "linear projector": (_linear_projector, r"mm_projector_type='linear'"),
    "full LLaVA as projector": (_full_llava_as_projector, r"mm_projector.bin missing"),
}


@pytest.mark.parametrize("case", list(STAGE2_REFUSALS))
def test_language_model_plus_projector_refusals(case, sources, tmp_path, capsys):
    damage, message = STAGE2_REFUSALS[case]
    argv = damage(sources, tmp_path / "source")
    output = tmp_path / "nested" / "out"
    assert convert(*argv, "--clip", sources["clip"], "--output", output) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert not output.parent.exists()


def test_language_model_and_projector_go_together(sources, tmp_path, capsys):
    for argv in (["--language-model", sources["vicuna"]], ["--llava", sources["original"], "--projector", "x/y"]):
        with pytest.raises(SystemExit) as exit_info:
            convert(*argv, "--output", tmp_path / "out")
        assert exit_info.value.code == 2
        assert "--language-model and --projector go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert("--llava", sources["original"], "--language-model", sources["vicuna"], "--output", tmp_path / "out")
    assert "not allowed with argument" in capsys.readouterr().err


def test_interrupted_upload_keeps_the_complete_folder_and_says_so(sources, tmp_path, capsys):
    output = tmp_path / "out"
    with (
        mock.patch("huggingface_hub.get_token", return_value="hf_test"),
        mock.patch("huggingface_hub.create_repo"),
        mock.patch("huggingface_hub.upload_folder", side_effect=KeyboardInterrupt),
    ):
        argv = ["--llava", sources["original"], "--clip", sources["clip"], "--output", output]
        assert convert(*argv, "--push-to-hub", "me/tiny-llava-trim") == 130
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: interrupted by SIGINT: the upload stopped; the converted model is complete in {output}."]
    assert (output / "model.safetensors").is_file()


def test_signal_while_removing_the_replaced_output_finishes_the_clean_up(sources, tmp_path, capsys):
    """Interrupted once the new folder took the old one's place: the old one is still removed, as the line says."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("previous conversion")
    remove = shutil.rmtree
    interrupted = []

    def rmtree_interrupted_once(path, *args, **kwargs):
        if str(path).endswith(".old") and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        return remove(path, *args, **kwargs)

    with mock.patch("shutil.rmtree", side_effect=rmtree_interrupted_once):
        argv = ["--llava", sources["original"], "--clip", sources["clip"], "--output", output, "--overwrite"]
        assert convert(*argv) == 130
    lines = error_lines(capsys.readouterr().err)
    assert lines == [
        f"error: interrupted by SIGINT: {output} had been replaced by the complete conversion and is kept."
    ]
    assert interrupted and leftovers(output) == ["out"] and (output / "config.json").is_file()
