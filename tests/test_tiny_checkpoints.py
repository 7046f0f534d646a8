"""The tiny source checkpoints have the layouts of the real Hub repositories the converter reads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPModel

from llava_trim.testing_utils.tiny import TINY_LLAMA, TINY_VISION
from llava_trim.testing_utils.tiny_checkpoints import build_all, build_original_llava, build_tiny_clip


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("tiny"))


def safetensors_dtypes(folder: Path) -> dict[str, str]:
    dtypes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            dtypes.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})
    return dtypes


def test_tiny_clip_is_a_full_clip_with_the_real_geometry(sources):
    folder = sources["clip"]
    model, info = CLIPModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"]
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.image_size // vision.patch_size) ** 2 == 576 and vision.num_hidden_layers == 3
    assert vision.hidden_size == 32 and vision.num_attention_heads == 2 and model.config.projection_dim == 16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert text.vocab_size == len(tokenizer) and text.eos_token_id == tokenizer.eos_token_id
    assert text.hidden_size == 32 and text.num_hidden_layers == 2
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)  # like the Hub file: old buffers included
    assert "text_model.embeddings.position_ids" in state and "logit_scale" in state
    assert (folder / "preprocessor_config.json").is_file()


def test_original_format_like_liuhaotian(sources):
    folder = sources["original"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert (
        config["mm_hidden_size"] == TINY_VISION["hidden_size"] and config["hidden_size"] == TINY_LLAMA["hidden_size"]
    )
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    state = {}
    for name in set(index["weight_map"].values()):
        state.update(torch.load(folder / name, weights_only=True))
    assert state.keys() == index["weight_map"].keys()
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in state and "model.mm_projector.2.bias" in state
    assert not any("vision" in key for key in state)
    assert state["model.embed_tokens.weight"].shape == (config["vocab_size"], TINY_LLAMA["hidden_size"])
    assert state["lm_head.weight"].dtype == torch.float16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<image>" not in tokenizer.get_vocab() and len(tokenizer) == config["vocab_size"]


def test_trim_format_like_freedomintelligence(sources):
    folder = sources["trim"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["mm_vision_token_reduce_func"] == "TRIM:-1"
    assert not config["mm_vision_tower"].startswith("openai/")  # a bare local path, as in the released config
    dtypes = safetensors_dtypes(folder)
    assert set(dtypes.values()) == {"BF16"} and len(list(folder.glob("model-*-of-00003.safetensors"))) == 3
    for prefix in (
        "model.vision_tower.vision_tower.vision_model.encoder.layers.2.",
        "model.vision_tower.vision_tower.visual_projection.",
        "model.vision_tower.text_tower.text_model.final_layer_norm.",
        "model.vision_tower.text_tower.text_projection.",
    ):
        assert any(key.startswith(prefix) for key in dtypes), prefix
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == dtypes.keys()


def test_llava_hf_format_uses_the_hub_key_names(sources):
    folder = sources["llava_hf"]
    keys = safetensors_dtypes(folder)
    assert any(key.startswith("language_model.model.layers.") for key in keys)
    assert "language_model.lm_head.weight" in keys and "multi_modal_projector.linear_1.weight" in keys
    assert any(key.startswith("vision_tower.vision_model.encoder.") for key in keys)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [config["image_token_index"], 1001]
    assert config["text_config"]["vocab_size"] % 64 == 0


def test_builders_are_deterministic(tmp_path):
    first = build_original_llava(tmp_path / "a", num_shards=1, llama_tokenizer_dir=None)
    second = build_original_llava(tmp_path / "b", num_shards=1, llama_tokenizer_dir=first)
    a = torch.load(first / "pytorch_model.bin", weights_only=True)
    b = torch.load(second / "pytorch_model.bin", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    clip = build_tiny_clip(tmp_path / "clip", weights_format="safetensors")
    assert (clip / "model.safetensors").is_file() and not (clip / "pytorch_model.bin").exists()


def test_vicuna_format_like_lmsys(sources):
    folder = sources["vicuna"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert not any(key.startswith("mm_") for key in config) and config["torch_dtype"] == "float16"
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    state = {}
    for name in set(index["weight_map"].values()):
        state.update(torch.load(folder / name, weights_only=True))
    assert state.keys() == index["weight_map"].keys()
    assert "model.embed_tokens.weight" in state and "lm_head.weight" in state and "model.norm.weight" in state
    assert not any("mm_projector" in key or "vision" in key for key in state)
    assert {t.dtype for k, t in state.items() if "inv_freq" not in k} == {torch.float16}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert "<image>" not in tokenizer.get_vocab() and len(tokenizer) == config["vocab_size"]
    assert (folder / "tokenizer.model").is_file()


def test_pretrain_projector_like_liuhaotian(sources):
    folder = sources["projector"]
    state = torch.load(folder / "mm_projector.bin", weights_only=True)
    assert list(state) == [
        "model.mm_projector.0.weight",
        "model.mm_projector.0.bias",
        "model.mm_projector.2.weight",
        "model.mm_projector.2.bias",
    ]
    hidden, vision = TINY_LLAMA["hidden_size"], TINY_VISION["hidden_size"]
    assert state["model.mm_projector.0.weight"].shape == (hidden, vision)
    assert state["model.mm_projector.2.weight"].shape == (hidden, hidden)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["tune_mm_mlp_adapter"] is True and config["mm_hidden_size"] == vision
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "mm_projector.bin"]
