"""The tiny offline tokenizers and image processor look and behave like LLaVA-1.5's and CLIP's."""

import json

import pytest
import sentencepiece as spm
from transformers import AutoImageProcessor, AutoTokenizer, CLIPTokenizer

from llava_trim.processing_llava_trim import LLAVA_V1_SYSTEM
from llava_trim.testing_utils.tiny_tokenizers import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_VOCAB_SIZE,
    LLAMA_IMAGE_TOKEN_ID,
    LLAMA_PAD_ID,
    LLAMA_VOCAB_SIZE,
    build_clip_image_processor,
    build_clip_tokenizer,
    build_llama_tokenizer,
    build_tiny_processor,
)

SENTENCES = [
    LLAVA_V1_SYSTEM + " USER: What is the colour of the bus? ASSISTANT: Red.",
    "Is there a zebra near 42 tall giraffes?",
    "Unseen wörds, émojis 🚌 and 日本語 fall back to bytes.",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_tokenizers")
    return {
        "llama": build_llama_tokenizer(root / "llama"),
        "clip": build_clip_tokenizer(root / "clip"),
        "image": root / "image",
    }


def test_builds_are_deterministic(folders, tmp_path):
    for name, build in [("llama", build_llama_tokenizer), ("clip", build_clip_tokenizer)]:
        again = build(tmp_path / name)
        for path in folders[name].iterdir():
            assert (again / path.name).read_bytes() == path.read_bytes(), f"{name}/{path.name} differs between builds"


def test_llama_tokenizer_folder_is_like_llava_v15(folders):
    folder = folders["llama"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["pad_token"] is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    assert len(tokenizer) == LLAMA_VOCAB_SIZE
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None and "<image>" not in tokenizer.get_vocab()
    assert tokenizer.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]  # byte fallback, as Llama


def test_llama_tokenizer_matches_sentencepiece(folders):
    """transformers' converted tokenizer gives the ids the sentencepiece model itself gives."""
    tokenizer = AutoTokenizer.from_pretrained(folders["llama"])
    processor = spm.SentencePieceProcessor(model_file=str(folders["llama"] / "tokenizer.model"))
    for sentence in SENTENCES:
        ids = tokenizer(sentence).input_ids
        assert ids == [1] + processor.encode(sentence)
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


def test_clip_tokenizer_is_like_openai_clip(folders):
    tokenizer = CLIPTokenizer.from_pretrained(folders["clip"])
    auto = AutoTokenizer.from_pretrained(folders["clip"])
    assert type(auto).__name__ == "CLIPTokenizer"
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (CLIP_BOS_ID, CLIP_EOS_ID, 999)
    assert tokenizer.model_max_length == 77
    vocab = json.loads((folders["clip"] / "vocab.json").read_text())
    assert vocab["a"] == 64 and vocab["a</w>"] == 320  # the ids openai/clip-vit-large-patch14 gives them
    merges = (folders["clip"] / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and all(len(line.split(" ")) == 2 for line in merges[1:])
    ids = tokenizer("What is the COLOUR of the Bus?").input_ids
    assert ids[0] == CLIP_BOS_ID and ids[-1] == CLIP_EOS_ID and CLIP_EOS_ID not in ids[1:-1]
    assert ids == tokenizer("what is the colour of the bus?").input_ids  # lower-cased
    assert tokenizer.convert_ids_to_tokens(ids)[1] == "what</w>"
    long = tokenizer("many words " * 100, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == CLIP_EOS_ID


def test_clip_image_processor_is_clip_336(folders):
    build_clip_image_processor(folders["image"])
    processor = AutoImageProcessor.from_pretrained(folders["image"])
    assert processor.size.shortest_edge == 336
    assert (processor.crop_size.height, processor.crop_size.width) == (336, 336)
    assert processor.resample == 3 and processor.do_center_crop and processor.do_normalize
    assert list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]
    assert list(processor.image_std) == [0.26862954, 0.26130258, 0.27577711]


def test_tiny_processor_adds_image_and_pad_tokens():
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    assert len(tokenizer) == LLAMA_VOCAB_SIZE + 2
    assert processor.image_token_id == LLAMA_IMAGE_TOKEN_ID == tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.pad_token_id == LLAMA_PAD_ID and tokenizer.padding_side == "left"
    assert tokenizer("USER: <image>\nHi").input_ids.count(LLAMA_IMAGE_TOKEN_ID) == 1
