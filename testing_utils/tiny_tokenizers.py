# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Tiny tokenizers and the CLIP image processor, built locally and offline in about a second.

The tests and the demo need the three preprocessing pieces of a LLaVA-1.5 + TRIM checkpoint without reaching the Hub:

- [`build_llama_tokenizer`]: a sentencepiece BPE model laid out like `liuhaotian/llava-v1.5-7b`'s tokenizer folder
  (`tokenizer.model`, `LlamaTokenizer`, `<unk>`=0, `<s>`=1, `</s>`=2, byte fallback, no `<image>`, no pad token).
- [`build_clip_tokenizer`]: a byte-level BPE tokenizer laid out like `openai/clip-vit-large-patch14`'s
  (`vocab.json` + `merges.txt`, `</w>` word ends, lowercasing, `<|startoftext|>` / `<|endoftext|>`, 77 tokens).
- [`build_clip_image_processor`] (from `tools/loading.py`): the `CLIPImageProcessor` of
  `openai/clip-vit-large-patch14-336`.

Everything is deterministic: the same call writes byte-identical files.

```python
>>> from llava_trim.testing_utils.tiny_tokenizers import build_clip_tokenizer, build_llama_tokenizer
>>> llama_dir = build_llama_tokenizer("/tmp/tiny/llama")  # AutoTokenizer.from_pretrained(llama_dir) works
>>> clip_dir = build_clip_tokenizer("/tmp/tiny/clip")
```
"""

import io
import json
import re
from collections import Counter
from pathlib import Path

from ..processing_llava_trim import LLAVA_V1_SYSTEM, LlavaTrimProcessor
from ..tools.loading import build_clip_image_processor

# Vocabulary sizes and special-token ids of the tiny tokenizers (asserted when they are built).
LLAMA_VOCAB_SIZE = 1000
LLAMA_UNK_ID, LLAMA_BOS_ID, LLAMA_EOS_ID = 0, 1, 2
CLIP_NUM_MERGES = 486
CLIP_VOCAB_SIZE = 512 + CLIP_NUM_MERGES + 2  # byte symbols (+ `</w>` forms), merges, the two special tokens: 1000
CLIP_BOS_ID = CLIP_VOCAB_SIZE - 2  # <|startoftext|>: 998
CLIP_EOS_ID = CLIP_VOCAB_SIZE - 1  # <|endoftext|>: 999 (also CLIP's pad and unk token, as in the real one)
CLIP_PAD_ID = CLIP_EOS_ID
CLIP_MAX_LENGTH = 77

_CORPUS_LINES = [
    LLAVA_V1_SYSTEM,
    "USER: What is the colour of the bus? ASSISTANT: The bus is red.",
    "USER: What is the color of the car? ASSISTANT: The car is blue.",
    "USER: How many people are in the picture? ASSISTANT: There are three people in the picture.",
    "USER: What is the man holding? ASSISTANT: The man is holding an umbrella.",
    "USER: What is the woman doing? ASSISTANT: The woman is riding a bicycle down the street.",
    "USER: Is there a dog in the image? ASSISTANT: Yes, a small brown dog is sitting on the grass.",
    "USER: Describe this image in detail. ASSISTANT: The image shows a busy city street with tall buildings, "
    "yellow taxis, traffic lights and many pedestrians crossing the road.",
    "USER: What animal is shown? ASSISTANT: A cat is sleeping on a wooden chair next to the window.",
    "USER: What time of day is it? ASSISTANT: It looks like early morning, the sky is bright and clear.",
    "USER: What is written on the sign? ASSISTANT: The sign says stop.",
    "USER: Where is the train going? ASSISTANT: The train is leaving the station towards the mountains.",
    "USER: What sport are they playing? ASSISTANT: They are playing tennis on a green court.",
    "USER: What fruit is on the table? ASSISTANT: There are apples, bananas and oranges in a white bowl.",
    "USER: Is the water calm? ASSISTANT: No, the waves are high and the boat is moving quickly.",
    "USER: Which room is this? ASSISTANT: This is a kitchen with a sink, an oven and a refrigerator.",
    "USER: What is the weather like? ASSISTANT: It is cloudy and raining, people carry umbrellas.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please describe the picture. Explain what is unusual about this image.",
    "What are the animals eating? The giraffes are eating leaves from the trees.",
    "Why is the kite flying? Because the wind is strong on the beach today.",
    "Who is wearing a hat? The girl on the left is wearing a purple hat and black shoes.",
    "How many birds are on the fence? Two birds are sitting on the fence near the garden.",
    "Can you see the airplane? Yes, a large white airplane is flying above the clouds.",
    "What is on the plate? A slice of pizza with cheese, tomato, and green peppers.",
    "The elephant walks slowly across the dry field while the zebra drinks from the river.",
    "A young boy throws a frisbee to his friend in the park during a sunny afternoon.",
    "Two horses stand in the snow beside an old barn under a grey winter sky.",
    "The computer screen shows a spreadsheet, a keyboard and a mouse are on the desk.",
    "A laptop, a cup of coffee and a notebook are placed on the kitchen counter.",
    "The motorcycle is parked outside a small restaurant with a blue door.",
    "Several sheep graze on the hillside and a farmer watches them carefully.",
    "The skateboarder jumps over the stairs in front of the library.",
    "A surfer rides a huge wave in the ocean at sunset, the sand looks golden.",
    "The clock on the tower shows ten minutes past four in the afternoon.",
    "A bear is fishing in the stream and a deer is hiding behind the bushes.",
    "The baseball player swings the bat and the catcher waits behind the plate.",
    "The vase holds fresh flowers: roses, tulips and daisies of many colours.",
    "A teddy bear sits on the bed next to a pillow and a folded blanket.",
    "The toilet and the bathtub are white, the floor has blue and grey tiles.",
    "The sandwich contains ham, lettuce, egg and a thick layer of butter.",
    "An orange cat and a black dog play together with a ball of yarn.",
    "Question: which object is bigger, the truck or the bicycle? Answer: the truck.",
    "Question: what number is on the shirt? Answer: 23. Another number is 7, then 1024 and 336.",
    "Is this photo taken indoors or outdoors? Outdoors, near a lake surrounded by forest.",
    "The chef is cutting vegetables with a sharp knife on a wooden board.",
    "Children are building a snowman while their parents drink hot chocolate.",
    "The monitor, the speakers and the printer are connected with long cables.",
    "The red fire hydrant stands on the sidewalk next to a parking meter.",
    "A man in a suit is talking on his phone while waiting for the bus.",
    "The bench is empty, the leaves are falling and autumn has arrived.",
    "Hello! Thank you for your help. Sure, I can help you with that. Could you tell me more?",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
]
_CORPUS = "\n".join(_CORPUS_LINES)


def _llama_tokenizer_config() -> dict:
    """`tokenizer_config.json` of `liuhaotian/llava-v1.5-7b` (the Vicuna-1.5 / Llama-2 tokenizer)."""

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added("</s>"),
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("<unk>"),
    }


def build_llama_tokenizer(save_dir: str | Path, vocab_size: int = LLAMA_VOCAB_SIZE) -> Path:
    """
    Train a tiny Llama-style sentencepiece BPE model on a built-in English corpus and write a tokenizer folder.

    The folder mirrors `liuhaotian/llava-v1.5-7b`: `tokenizer.model`, `tokenizer_config.json` (`LlamaTokenizer`,
    `add_bos_token=True`, no pad token) and `special_tokens_map.json`; ids `<unk>`=0, `<s>`=1, `</s>`=2, then the 256
    byte-fallback pieces `<0x00>`..`<0xFF>`, then the learned pieces. There is no `<image>` token (the converter adds
    it). Load it with `AutoTokenizer.from_pretrained(save_dir)`.

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        vocab_size (`int`, *optional*, defaults to 1000): Size of the sentencepiece vocabulary.

    Returns:
        `Path`: `save_dir`.
    """
    import sentencepiece as spm

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS_LINES * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=LLAMA_UNK_ID,
        bos_id=LLAMA_BOS_ID,
        eos_id=LLAMA_EOS_ID,
        pad_id=-1,
        unk_surface=" \u2047 ",
        num_threads=1,
        minloglevel=2,
    )
    (save_dir / "tokenizer.model").write_bytes(model.getvalue())
    _write_json(save_dir / "tokenizer_config.json", _llama_tokenizer_config())
    _write_json(
        save_dir / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )
    return save_dir


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters (in CLIP's order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# CLIP's pre-tokenisation regex, restricted to what the ASCII corpus needs (Python's `re` has no `\p{L}`).
_CLIP_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def _learn_clip_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Learn `num_merges` byte-level BPE merges with `</w>` word ends; ties go to the smallest pair (deterministic)."""
    byte_map = _bytes_to_unicode()
    word_counts = Counter(_CLIP_WORD_RE.findall(" ".join(text.lower().split())))
    words: dict[tuple[str, ...], int] = {}
    for word, count in word_counts.items():
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] = count
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[pair] += count
        if not pairs:
            raise RuntimeError(f"The built-in corpus only supports {len(merges)} merges, not {num_merges}.")
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged_words = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words[tuple(out)] = merged_words.get(tuple(out), 0) + count
        words = merged_words
    return merges


def build_clip_tokenizer(save_dir: str | Path, num_merges: int = CLIP_NUM_MERGES) -> Path:
    """
    Build a tiny CLIP tokenizer (byte-level BPE, `</w>` word ends) and write it like `openai/clip-vit-large-patch14`.

    The vocabulary is laid out as CLIP's: the 256 byte symbols, the same with `</w>`, one entry per merge, then
    `<|startoftext|>` (bos) and `<|endoftext|>` (eos, also pad and unk). With the defaults: 1000 tokens, bos id 998,
    eos id = pad id = 999 (a tiny CLIP text config must use `eos_token_id=999`: CLIP pools at the eos token).
    Files: `vocab.json`, `merges.txt`, `tokenizer_config.json` (`CLIPTokenizer`, lowercasing, `model_max_length=77`),
    `special_tokens_map.json`. Load it with `CLIPTokenizer.from_pretrained(save_dir)` or `AutoTokenizer`.

    Args:
        save_dir (`str` or `Path`): Folder to write (created if missing).
        num_merges (`int`, *optional*, defaults to 486): Number of BPE merges to learn from the built-in corpus.

    Returns:
        `Path`: `save_dir`.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    merges = _learn_clip_merges(_CORPUS, num_merges)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("The learned CLIP merges produced a duplicate token.")
    _write_json(save_dir / "vocab.json", vocab)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (save_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    _write_json(
        save_dir / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": {**special, "content": "<|startoftext|>"},
            "clean_up_tokenization_spaces": False,
            "do_lower_case": True,
            "eos_token": {**special, "content": "<|endoftext|>"},
            "errors": "replace",
            "model_max_length": CLIP_MAX_LENGTH,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": {**special, "content": "<|endoftext|>"},
        },
    )
    _write_json(
        save_dir / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        },
    )
    return save_dir


# `openai/clip-vit-large-patch14-336`'s preprocessor_config.json, in the names of the installed transformers.


# Ids of the tokens `build_tiny_processor` adds after the 1000 sentencepiece pieces (as llava-hf adds them at 32000+).
LLAMA_IMAGE_TOKEN_ID = LLAMA_VOCAB_SIZE  # <image>: 1000
LLAMA_PAD_ID = LLAMA_VOCAB_SIZE + 1  # <pad>: 1001


def build_tiny_processor(save_dir: str | Path | None = None, image_seq_length: int = 576):
    """
    A complete tiny `LlavaTrimProcessor`: the tiny Llama tokenizer with `<image>` (id 1000) and `<pad>` (id 1001)
    added as special tokens (the language model's vocab_size is then 1002), the tiny CLIP tokenizer (1000 tokens, bos
    998, eos = pad 999) and the 336 px CLIP image processor, with LLaVA-1.5's chat template.

    Args:
        save_dir (`str` or `Path`, *optional*): Where to `save_pretrained` the processor (with its code and
            `auto_map`, so `AutoProcessor.from_pretrained(save_dir, trust_remote_code=True)` loads it).
        image_seq_length (`int`, *optional*, defaults to 576): Placeholders per image.

    Returns:
        `LlavaTrimProcessor`.
    """
    import tempfile

    from transformers import AddedToken, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(build_llama_tokenizer(Path(tmp) / "llama"))
        clip_tokenizer = AutoTokenizer.from_pretrained(build_clip_tokenizer(Path(tmp) / "clip"))
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    if tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) != [LLAMA_IMAGE_TOKEN_ID, LLAMA_PAD_ID]:
        raise RuntimeError("Unexpected ids for the added <image> / <pad> tokens.")
    tokenizer.padding_side = "left"
    processor = LlavaTrimProcessor(
        image_processor=build_clip_image_processor(),
        tokenizer=tokenizer,
        clip_tokenizer=clip_tokenizer,
        image_seq_length=image_seq_length,
    )
    if save_dir is not None:
        processor.save_pretrained(save_dir)
    return processor


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["build_clip_image_processor", "build_clip_tokenizer", "build_llama_tokenizer", "build_tiny_processor"]
