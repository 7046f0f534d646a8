"""LlavaTrimProcessor: LLaVA-1.5's prompt and image preprocessing, TRIM's question, saving, and the pipeline."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from llava_trim.processing_llava_trim import LlavaTrimProcessor, extract_question
from llava_trim.tools.tiny import tiny_model
from llava_trim.tools.tiny_tokenizers import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    LLAMA_IMAGE_TOKEN_ID,
    LLAMA_PAD_ID,
    build_llama_tokenizer,
    build_tiny_processor,
)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
QUESTION = "What is the colour of the bus?"
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
PAD_COLOUR = (122, 116, 104)  # int(mean * 255) per channel


@pytest.fixture(scope="module")
def processor() -> LlavaTrimProcessor:
    return build_tiny_processor()


def chat(*turns, image=None):
    """A chat alternating user / assistant texts; the image (if any) goes at the start of the first user turn."""
    messages = []
    for index, text in enumerate(turns):
        content = [{"type": "text", "text": text}]
        if index == 0:
            content.insert(0, {"type": "image", "image": image} if image is not None else {"type": "image"})
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
    return messages


def clip_row(processor, question: str) -> list[int]:
    return processor.clip_tokenizer(question, padding="max_length", max_length=77).input_ids


def rng_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode == "RGBA":
        data[..., 3] = np.where(data[..., 3] > 127, 255, 0)  # binary alpha: compositing is exact
    return Image.fromarray(data[..., 0] if mode == "L" else data, mode)


# ---------------------------------------------------------------------------------------------------- chat template


def test_chat_template_one_turn(processor):
    prompt = processor.apply_chat_template(chat(QUESTION), add_generation_prompt=True)
    assert prompt == SYSTEM + " USER: <image>\nWhat is the colour of the bus? ASSISTANT:"


def test_chat_template_two_turns(processor):
    prompt = processor.apply_chat_template(chat(QUESTION, "Red.", "And the car?"), add_generation_prompt=True)
    assert (
        prompt
        == SYSTEM + " USER: <image>\nWhat is the colour of the bus? ASSISTANT: Red.</s>USER: And the car? ASSISTANT:"
    )


def test_chat_template_variants(processor):
    text_only = [{"role": "user", "content": "Hi there"}]
    assert (
        processor.apply_chat_template(text_only, add_generation_prompt=True) == SYSTEM + " USER: Hi there ASSISTANT:"
    )
    assert processor.apply_chat_template(text_only) == SYSTEM + " USER: Hi there "
    system = [{"role": "system", "content": "Be terse."}, *text_only]
    assert processor.apply_chat_template(system, add_generation_prompt=True) == "Be terse. USER: Hi there ASSISTANT:"
    finished = chat(QUESTION, "Red.")
    assert processor.apply_chat_template(finished) == SYSTEM + f" USER: <image>\n{QUESTION} ASSISTANT: Red.</s>"
    with pytest.raises(Exception, match="role tool"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])


def test_input_ids_are_llava_tokenizer_image_token(processor, tmp_path):
    """Text around `<image>` is tokenised chunk by chunk as LLaVA's `tokenizer_image_token` does (checked with the
    sentencepiece model itself), and each `<image>` becomes 576 placeholder ids."""
    sentencepiece = spm.SentencePieceProcessor(model_file=str(build_llama_tokenizer(tmp_path) / "tokenizer.model"))
    prompt = processor.apply_chat_template(chat(QUESTION), add_generation_prompt=True)
    before, after = prompt.split("<image>")
    expected = [1] + sentencepiece.encode(before) + [LLAMA_IMAGE_TOKEN_ID] * 576 + sentencepiece.encode(after)
    inputs = processor(images=rng_image(20, 10), text=prompt)
    assert inputs["input_ids"] == [expected]
    assert inputs["attention_mask"] == [[1] * len(expected)]


# ---------------------------------------------------------------------------------------------------- images


def reference_pixel_values(image: Image.Image) -> np.ndarray:
    """LLaVA-1.5's `expand2square` with the CLIP mean colour, then CLIP's 336 px preprocessing, written with numpy."""
    array = np.asarray(image)
    if image.mode == "L":
        array = np.repeat(array[..., None], 3, axis=-1)
    elif image.mode == "RGBA":
        array = np.where(array[..., 3:] > 0, array[..., :3], 255).astype(np.uint8)  # alpha is binary here
    height, width = array.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = PAD_COLOUR
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = array
    resized = np.asarray(Image.fromarray(canvas).resize((336, 336), Image.Resampling.BICUBIC), dtype=np.float64)
    return ((resized / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)  # a square: the 336 crop is the identity


@pytest.mark.parametrize(
    "width,height,mode",
    [(300, 100, "RGB"), (90, 400, "RGB"), (500, 500, "RGB"), (120, 77, "L"), (64, 200, "RGBA"), (401, 400, "RGB")],
)
def test_pixel_values_match_pad_to_square_then_clip(processor, width, height, mode):
    image = rng_image(width, height, mode)
    pixel_values = processor(images=image, text="<image>\nq", return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 336, 336) and pixel_values.dtype == torch.float32
    assert np.abs(pixel_values[0].numpy() - reference_pixel_values(image)).max() <= 1e-2


def test_pixel_values_follow_order_of_appearance(processor):
    images = [rng_image(50, 30, seed=1), rng_image(30, 50, seed=2), rng_image(40, 40, seed=3)]
    batch = processor(images=images, text=["<image>\na <image>\nb", "<image>\nc"], padding=True, return_tensors="pt")
    for index, image in enumerate(images):
        single = processor(images=image, text="<image>\nx", return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(batch["pixel_values"][index], single)


def test_exif_orientation_is_applied(processor, tmp_path):
    image = rng_image(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.png", exif=exif.tobytes())
    from_file = processor(images=str(tmp_path / "rotated.png"), text="<image>\nq", return_tensors="pt")
    upright = processor(images=image.transpose(Image.Transpose.ROTATE_270), text="<image>\nq", return_tensors="pt")
    as_stored = processor(images=image, text="<image>\nq", return_tensors="pt")
    torch.testing.assert_close(from_file["pixel_values"], upright["pixel_values"])
    assert not torch.allclose(from_file["pixel_values"], as_stored["pixel_values"])


def test_unusual_images_give_valid_pixel_values(processor):
    gray8 = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    palette = Image.new("P", (32, 32), 0)
    palette.info["transparency"] = 0  # every pixel transparent: composited onto white
    images = {
        "16-bit": Image.fromarray(gray8.astype(np.uint16) * 257),
        "cmyk": Image.new("CMYK", (50, 30), (0, 255, 255, 0)),
        "palette": palette,
        "1x1": Image.new("RGB", (1, 1), (255, 0, 0)),
        "strip": Image.new("RGB", (10000, 20), (0, 0, 0)),
        "float array": np.random.default_rng(1).random((24, 48, 3), dtype=np.float32),
        "chw tensor": torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8),
    }
    outputs = processor(images=list(images.values()), text="<image>" * len(images) + "\nq", return_tensors="pt")
    pixel_values = dict(zip(images, outputs["pixel_values"], strict=True))
    for name, value in pixel_values.items():
        assert value.shape == (3, 336, 336) and torch.isfinite(value).all(), name
    expected_16bit = reference_pixel_values(Image.fromarray(gray8, mode="L"))
    assert np.abs(pixel_values["16-bit"].numpy() - expected_16bit).max() <= 1e-2
    white = torch.tensor((1 - CLIP_MEAN) / CLIP_STD, dtype=torch.float32)[:, None, None]
    torch.testing.assert_close(pixel_values["palette"], white.expand(3, 336, 336))
    pad = torch.tensor((np.array(PAD_COLOUR) / 255 - CLIP_MEAN) / CLIP_STD, dtype=torch.float32)
    torch.testing.assert_close(pixel_values["strip"][:, 0, 0], pad)  # top rows: the mean-colour padding
    assert (pixel_values["strip"][:, 168, 168] < pad).all()  # the black strip in the middle
    red = torch.tensor((np.array([1.0, 0.0, 0.0]) - CLIP_MEAN) / CLIP_STD, dtype=torch.float32)
    torch.testing.assert_close(pixel_values["1x1"][:, 100, 200], red)


# ---------------------------------------------------------------------------------------------------- TRIM's question


def test_question_from_chat(processor):
    inputs = processor.apply_chat_template(
        chat(QUESTION, image=rng_image(30, 20)), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert inputs["trim_input_ids"] == [clip_row(processor, QUESTION)]
    assert inputs["trim_attention_mask"][0][:13] == [1] * 11 + [0, 0]
    assert processor.clip_tokenizer.decode(inputs["trim_input_ids"][0], skip_special_tokens=True) == (
        "what is the colour of the bus ?"
    )


def test_question_from_templated_string(processor):
    benchmark = QUESTION + "\nAnswer the question using a single word or phrase."
    prompt = SYSTEM + f" USER: <image>\n{benchmark} ASSISTANT:"
    inputs = processor(images=rng_image(30, 20), text=prompt)
    assert inputs["trim_input_ids"] == [clip_row(processor, benchmark)]


def test_question_is_last_user_turn(processor):
    inputs = processor.apply_chat_template(
        chat(QUESTION, "Red.", "And the car?", image=rng_image(30, 20)),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert inputs["trim_input_ids"] == [clip_row(processor, "And the car?")]


def test_trim_text_overrides_question(processor):
    prompts = ["USER: <image>\nfirst ASSISTANT:", "USER: <image><image>\nsecond ASSISTANT:"]
    images = [rng_image(10, 10)] * 3
    one = processor(images=images, text=prompts, padding=True, trim_text="a red bus")
    assert one["trim_input_ids"] == [clip_row(processor, "a red bus")] * 3
    per_prompt = processor(images=images, text=prompts, padding=True, trim_text=[None, ["left dog", "right cat"]])
    expected = [clip_row(processor, question) for question in ("first", "left dog", "right cat")]
    assert per_prompt["trim_input_ids"] == expected
    with pytest.raises(ValueError, match="one entry per prompt"):
        processor(images=images, text=prompts, padding=True, trim_text=["only one"])


def test_question_is_truncated_to_77_clip_tokens(processor):
    long_question = "what colour is the bus " * 40
    inputs = processor(images=rng_image(10, 10), text=f"USER: <image>\n{long_question} ASSISTANT:")
    row, mask = inputs["trim_input_ids"][0], inputs["trim_attention_mask"][0]
    assert len(row) == 77 and row[0] == CLIP_BOS_ID and row[-1] == CLIP_EOS_ID and sum(mask) == 77


def test_extract_question_cases():
    assert extract_question("<image>\nWhat is this?") == "What is this?"
    assert extract_question("USER: What?\n<image> ASSISTANT:") == "What?"
    assert extract_question("<s>USER: <image>\nq1 ASSISTANT: a</s>USER: q2 ASSISTANT: b</s>", "<image>") == "q2"
    assert extract_question("<s> hi </s>", special_tokens=("<s>", "</s>")) == "hi"


def test_batch_with_text_only_prompt_pads_left(processor):
    prompts = [
        processor.apply_chat_template(chat(QUESTION), add_generation_prompt=True),
        processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True),
        processor.apply_chat_template(chat("Two?"), add_generation_prompt=True).replace("<image>", "<image><image>"),
    ]
    images = [rng_image(20, 30, seed=1), rng_image(30, 20, seed=2), rng_image(25, 25, seed=3)]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 336, 336)
    assert inputs["trim_input_ids"].shape == (3, 77)
    assert inputs["trim_input_ids"].tolist() == [clip_row(processor, q) for q in (QUESTION, "Two?", "Two?")]
    assert (inputs["input_ids"] == LLAMA_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [576, 0, 1152]
    text_only = inputs["attention_mask"][1]
    padding = int((text_only == 0).sum())
    assert padding > 0 and text_only[:padding].eq(0).all() and text_only[padding:].eq(1).all()
    assert inputs["input_ids"][1, :padding].eq(LLAMA_PAD_ID).all() and inputs["input_ids"][1, padding] == 1
    right = processor(images=images, text=prompts, padding=True, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][1, -1] == 0 and right["attention_mask"][1, 0] == 1
    no_images = processor(text=prompts[1])
    assert set(no_images) == {"input_ids", "attention_mask"}


# ---------------------------------------------------------------------------------------------------- bad input


def test_placeholder_and_image_counts_must_match(processor):
    image = rng_image(10, 10)
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*1 image\(s\)"):
        processor(images=[image], text="<image><image>\nq")
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\).*2 image\(s\)"):
        processor(images=[image, image], text="<image>\nq")
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="<image>\nq")
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\)"):
        processor(images=image, text="no placeholder")
    with pytest.raises(ValueError, match=r"placeholders but \[0, 1\] images"):
        processor(images=[[], [image]], text=["<image>a", "b"], padding=True)
    with pytest.raises(ValueError, match="apply_chat_template"):
        processor(text=chat(QUESTION))


def test_undecodable_image_file_is_a_clear_error(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really an image")
    with pytest.raises(ValueError, match="Could not decode the image file .*broken.png"):
        processor(images=str(broken), text="<image>\nq")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(broken)}, {"type": "text", "text": "q"}]}]
    with pytest.raises(ValueError, match="broken.png"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match="neither an existing file"):
        processor(images=str(tmp_path / "missing.jpg"), text="<image>\nq")


def test_empty_question_gives_clip_empty_text(processor, model, caplog):
    """Documented behaviour: no question text -> CLIP's empty text (start + end tokens) and a warning; TRIM still
    runs (ranking patches against the empty query), and `trim_text=` supplies a question instead."""
    messages = [{"role": "user", "content": [{"type": "image", "image": rng_image(30, 30)}]}]
    with caplog.at_level(logging.WARNING):
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
    assert "empty question" in caplog.text
    assert inputs["trim_input_ids"][0, :3].tolist() == [CLIP_BOS_ID, CLIP_EOS_ID, CLIP_EOS_ID]
    assert inputs["trim_attention_mask"][0].tolist() == [1, 1] + [0] * 75
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, trim_ratio=-1)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 2)


def test_post_process_decodes_answers_cleanly(processor):
    prompt = processor.tokenizer("USER: hi ASSISTANT:").input_ids
    answer = processor.tokenizer("The bus is red.", add_special_tokens=False).input_ids
    glued = processor.tokenizer("red", add_special_tokens=False).input_ids[1:]  # a piece without a leading space
    full = torch.tensor([prompt + answer + [2], [LLAMA_PAD_ID] * (len(answer) - len(glued)) + prompt + glued + [2]])
    decoded_prompt = processor.post_process_image_text_to_text(torch.tensor([prompt, prompt]))
    decoded = processor.post_process_image_text_to_text(full)
    answers = [text[len(start) :] for text, start in zip(decoded, decoded_prompt, strict=True)]
    assert [text.startswith(start) for text, start in zip(decoded, decoded_prompt, strict=True)] == [True, True]
    assert answers == ["The bus is red.", processor.tokenizer.decode(glued)]
    assert processor.post_process_image_text_to_text(torch.tensor(answer)) == "The bus is red."


# ---------------------------------------------------------------------------------------------------- fresh processes

FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, image_path, out_path = sys.argv[1:4]
    results = {}
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    kinds = [type(processor), type(processor.clip_tokenizer)]
    results["processor"] = [kinds[0].__module__, kinds[0].__name__, kinds[1].__name__]
    image = Image.open(image_path)
    chat = lambda q, img: [{"role": "user", "content": [{"type": "image", **img}, {"type": "text", "text": q}]}]
    first, second = chat("What is the colour of the bus?", {"image": image}), chat("Who?", {"path": image_path})
    inputs = processor.apply_chat_template(
        [first, second], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    torch.save(dict(inputs), out_path)

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    def direct(trim_ratio):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, trim_ratio=trim_ratio)
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    results["direct"] = {"auto": direct(-1), "0.25": direct(0.25)}

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    run = lambda text, **kw: pipe(text=text, max_new_tokens=4, **kw)  # greedy: the tiny generation config
    results["single"] = run(first, return_full_text=False)[0]["generated_text"]
    results["single_full"] = run(first)[0]["generated_text"]
    results["path"] = run(second, return_full_text=False)[0]["generated_text"]
    by_url = chat("Who?", {"url": "file://" + image_path})
    results["file_url"] = run(by_url, return_full_text=False)[0]["generated_text"]
    batched = run([first, second], return_full_text=False, batch_size=2, generate_kwargs={"trim_ratio": 0.25})
    results["batched"] = [item[0]["generated_text"] for item in batched]
    prompt = processor.apply_chat_template(first, add_generation_prompt=True)
    results["images_text"] = pipe(images=image, text=prompt, max_new_tokens=4, return_full_text=False)[0][
        "generated_text"
    ]
    try:
        run(first, generate_kwargs={"trim_ratio": 2.0})
        results["bad_ratio"] = None
    except ValueError as error:
        results["bad_ratio"] = str(error)
    print("RESULTS " + json.dumps(results, default=repr))
    """
)


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory, processor):
    """Save a tiny model + processor, then load and use them only through `trust_remote_code` in a new process."""
    root = tmp_path_factory.mktemp("fresh")
    folder = root / "tiny-llava-trim"
    tiny_model(seed=0).save_pretrained(folder)
    build_tiny_processor(folder)
    image_path = root / "bus.png"
    rng_image(64, 48, seed=7).save(image_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules"), "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(folder), str(image_path), str(root / "inputs.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS ") :])
    results["inputs"] = torch.load(root / "inputs.pt", weights_only=True)
    results["image_path"] = image_path
    return results


def test_save_load_round_trip_in_fresh_process(fresh_process, processor):
    module, name, clip_name = fresh_process["processor"]
    assert module.startswith("transformers_modules.") and name == "LlavaTrimProcessor" and clip_name == "CLIPTokenizer"
    image = Image.open(fresh_process["image_path"])
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]}]
        for q in ("What is the colour of the bus?", "Who?")
    ]
    expected = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    loaded = fresh_process["inputs"]
    assert set(loaded) == set(expected)
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], msg=key)


def test_pipeline_in_fresh_process(fresh_process):
    direct = fresh_process["direct"]
    assert fresh_process["single"] == direct["auto"][0]  # return_full_text=False: just the answer
    assert fresh_process["path"] == direct["auto"][1]
    assert fresh_process["file_url"] == direct["auto"][1]
    assert fresh_process["images_text"] == direct["auto"][0]
    assert fresh_process["batched"] == direct["0.25"]  # generate_kwargs reach the model's generate
    full = fresh_process["single_full"]
    assert full[-1] == {"role": "assistant", "content": direct["auto"][0]} and len(full) == 2
    assert "trim_ratio" in fresh_process["bad_ratio"]
