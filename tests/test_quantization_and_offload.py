"""Loading at scale: CPU + disk offload through accelerate, attention back-ends, bitsandbytes 4-bit and 8-bit."""

import importlib.util

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText
from transformers.quantizers.quantizers_utils import should_convert_module

from llava_trim.testing_utils.tiny import TINY_IMAGE_TOKEN_ID, tiny_model
from llava_trim.tools.finetune import QUANTIZATION_SKIP_MODULES

HAS_CUDA = torch.cuda.is_available()
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model saved as a repository (custom code included), loaded back with the Auto classes."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(saved_model):
    return _load(saved_model)


@pytest.fixture(scope="module")
def inputs():
    """Two prompts of one image each (576 placeholders), two questions for TRIM, random pixels."""
    generator = torch.Generator().manual_seed(1)
    image_run = [TINY_IMAGE_TOKEN_ID] * 576
    input_ids = torch.tensor([[1, 5, 6] + image_run + [7, 8, 9], [1, 15, 16] + image_run + [17, 18, 19]])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(2, 3, 336, 336, generator=generator),
        "trim_input_ids": torch.tensor([[998, 5, 6, 7, 999], [998, 50, 60, 999, 999]]),
        "trim_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    }


def _load(path, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, **kwargs).eval()


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _generate(model, inputs, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, pad_token_id=0, **kwargs
    )


# ---------------------------------------------------------------------------------------------------------------------
# Offload
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cpu_share", "trim_ratio"), [(0.45, -1), (0.6, 0.25)])
def test_cpu_and_disk_offload_generates_what_one_device_generates(
    tmp_path, saved_model, reference, inputs, cpu_share, trim_ratio
):
    budget = int(cpu_share * _parameter_bytes(reference))  # forces part of the model to the offload folder
    offloaded = _load(saved_model, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path)
    assert {"cpu", "disk"} <= set(offloaded.hf_device_map.values()), offloaded.hf_device_map

    expected = _generate(reference, inputs, trim_ratio=trim_ratio)
    actual = _generate(offloaded, inputs, trim_ratio=trim_ratio)
    assert torch.equal(actual.sequences, expected.sequences)
    assert torch.equal(actual.trim_selection.keep_mask, expected.trim_selection.keep_mask)
    with torch.no_grad():
        logits = offloaded(**inputs, trim_ratio=trim_ratio).logits
        expected_logits = reference(**inputs, trim_ratio=trim_ratio).logits
    assert torch.equal(logits, expected_logits)  # offload moves the weights, not the operations


def test_offload_with_the_vision_tower_in_the_offload_folder(tmp_path, saved_model, reference, inputs):
    device_map = {
        "model.vision_tower": "disk",
        "model.multi_modal_projector": "cpu",
        "model.trim_scorer": "cpu",
        "model.language_model": "disk",
        "lm_head": "cpu",
    }
    offloaded = _load(saved_model, device_map=device_map, offload_folder=tmp_path)
    assert torch.equal(_generate(offloaded, inputs).sequences, _generate(reference, inputs).sequences)


# ---------------------------------------------------------------------------------------------------------------------
# Attention back-ends
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_model(saved_model):
    return _load(saved_model, attn_implementation="eager")


@pytest.mark.parametrize("trim_ratio", [-1, None])
def test_eager_and_sdpa_give_the_same_logits(saved_model, reference, eager_model, inputs, trim_ratio):
    for model, implementation in ((eager_model, "eager"), (reference, "sdpa")):
        towers = (model.model.vision_tower, model.model.language_model, model.model.trim_scorer.text_model)
        assert [tower.config._attn_implementation for tower in towers] == [implementation] * 3
    with torch.no_grad():
        eager = eager_model(**inputs, trim_ratio=trim_ratio)
        sdpa = reference(**inputs, trim_ratio=trim_ratio)
    # the rows keep different numbers of image tokens, so the compacted batch is padded; padding has no defined logits
    attended = sdpa.compacted_attention_mask.bool()
    assert torch.equal(eager.compacted_attention_mask.bool(), attended)
    assert (trim_ratio is None) == bool(attended.all())
    torch.testing.assert_close(eager.logits[attended], sdpa.logits[attended], rtol=0, atol=1e-5)


@pytest.mark.skipif(
    not (HAS_CUDA and importlib.util.find_spec("flash_attn") is not None),
    reason="flash_attention_2 needs the flash-attn package and a CUDA GPU",
)
def test_flash_attention_2_matches_sdpa(saved_model, inputs):
    kwargs = {"dtype": torch.bfloat16, "device_map": "cuda"}  # flash attention runs in 16-bit only
    flash = _load(saved_model, attn_implementation="flash_attention_2", **kwargs)
    sdpa = _load(saved_model, attn_implementation="sdpa", **kwargs)
    cuda_inputs = {key: value.cuda() for key, value in inputs.items()}
    with torch.no_grad():  # TRIM off: a bfloat16 rounding difference must not flip a kept token here
        expected = sdpa(**cuda_inputs, trim_ratio=None).logits.float()
        actual = flash(**cuda_inputs, trim_ratio=None).logits.float()
    torch.testing.assert_close(actual, expected, rtol=0, atol=3e-2)


# ---------------------------------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model."])  # AutoModel and AutoModelForImageTextToText module names
def test_quantization_skip_modules_keep_everything_but_the_decoder_layers(reference, prefix):
    root = reference if prefix else reference.model
    converted = {
        name
        for name, module in root.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, QUANTIZATION_SKIP_MODULES)
    }
    decoder_linears = {
        name
        for name, module in root.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(f"{prefix}language_model.layers.")
    }
    assert converted == decoder_linears and decoder_linears


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="needs bitsandbytes: pip install llava-trim[quantization]")
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_keeps_vision_clip_and_projector_unquantised(saved_model, reference, inputs, bits):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES,
        )
        quantized_class = bnb.nn.Linear4bit
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANTIZATION_SKIP_MODULES)
        quantized_class = bnb.nn.Linear8bitLt
    device = "cuda" if HAS_CUDA else "cpu"  # bitsandbytes >= 0.48 runs 4-bit and 8-bit layers on CPU
    model = _load(saved_model, quantization_config=config, device_map=device)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            in_decoder = name.startswith("model.language_model.layers.")
            assert isinstance(module, quantized_class) == in_decoder, name
    for name, parameter in model.named_parameters():
        if name.startswith(("model.vision_tower.", "model.trim_scorer.", "model.multi_modal_projector.")):
            assert parameter.dtype == torch.float32, name

    # TRIM runs before any quantised layer: the kept tokens are exactly those of the unquantised model
    device_inputs = {key: value.to(device) for key, value in inputs.items()}
    selection = model.select_image_tokens(**device_inputs)
    expected = reference.select_image_tokens(**inputs)
    assert torch.equal(selection.keep_mask.cpu(), expected.keep_mask)
    assert torch.equal(selection.probs.cpu(), expected.probs)  # the same float32 modules on the same tensors
    generated = _generate(model, device_inputs)
    assert generated.sequences.shape == (2, inputs["input_ids"].shape[1] + 6)


# ---------------------------------------------------------------------------------------------------------------------
# TRIM's scores in float32 whatever the model dtype (docs/trim.md)
# ---------------------------------------------------------------------------------------------------------------------


def _projection_output_dtypes(model, inputs) -> set[torch.dtype]:
    dtypes = set()
    scorer = model.model.trim_scorer
    hooks = [
        projection.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
        for projection in (scorer.text_projection, scorer.visual_projection)
    ]
    try:
        model.select_image_tokens(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return dtypes


def test_bfloat16_load_keeps_trim_projections_in_float32(saved_model, inputs):
    model = _load(saved_model, dtype=torch.bfloat16)
    scorer = model.model.trim_scorer
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert scorer.text_projection.weight.dtype == scorer.visual_projection.weight.dtype == torch.float32
    assert _projection_output_dtypes(model, inputs) == {torch.float32}


def test_trim_projections_stay_float32_under_bfloat16_autocast(reference, inputs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _projection_output_dtypes(reference, inputs) == {torch.float32}
