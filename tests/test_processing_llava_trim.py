"""LlavaTrimProcessor: LLaVA-1.5's prompt and image preprocessing, TRIM's question, saving, and the pipeline."""

import base64
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from llava_trim.processing_llava_trim import (
    LlavaTrimProcessor,
    load_image,
    questions_from_messages,
    questions_from_prompt,
    single_turn_messages,
)
from llava_trim.testing_utils.tiny import tiny_model
from llava_trim.testing_utils.tiny_tokenizers import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    LLAMA_IMAGE_TOKEN_ID,
    LLAMA_PAD_ID,
    build_clip_image_processor,
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


def normalisation_error(values, mean=CLIP_MEAN, std=CLIP_STD):
    """How far a float32 evaluation of `(x / 255 - mean) / std` may be from the exact `values`, whatever its form
    (rescale then normalise, or fused): at most 4 roundings (the constants, then each operation), each within
    u = 2**-24 of an intermediate no larger than 1 / std, |mean| / std or |values|. Channel-first like the pixels."""
    mean, std = np.asarray(mean)[:, None, None], np.asarray(std)[:, None, None]
    return 4 * 2.0**-24 * (1 / std + np.abs(mean) / std + np.abs(np.asarray(values, dtype=np.float64)))


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


def llava_conversation_module():
    """`llava.conversation` of LLaVA's own package (`llava-torch==1.2.2.post1`, installed without its dependencies by
    `make install`), loaded on its own: the package's `__init__` would import LLaVA's whole model code."""
    spec = importlib.util.find_spec("llava")
    assert spec is not None, "LLaVA's package is the reference: `pip install --no-deps llava-torch==1.2.2.post1`"
    path = Path(spec.submodule_search_locations[0]) / "conversation.py"
    module_spec = importlib.util.spec_from_file_location("llava_conversation", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "turns",
    [(QUESTION,), (QUESTION, "Red."), (QUESTION, "Red.", "And the car?"), (QUESTION, "Red.", "And the car?", "Blue.")],
)
def test_chat_template_is_llavas_conv_vicuna_v1(processor, turns):
    conversation = llava_conversation_module().conv_vicuna_v1.copy()
    for index, text in enumerate(turns):
        conversation.append_message(conversation.roles[index % 2], "<image>\n" + text if index == 0 else text)
    if len(turns) % 2:
        conversation.append_message(conversation.roles[1], None)
    rendered = processor.apply_chat_template(chat(*turns), add_generation_prompt=len(turns) % 2 == 1)
    assert rendered == conversation.get_prompt()
    if len(turns) == 1:
        single = processor.apply_chat_template(single_turn_messages(QUESTION), add_generation_prompt=True)
        assert single == conversation.get_prompt()


def test_assistant_tokens_mask_marks_the_answers(processor):
    """The template's `{% generation %}` blocks: exactly each answer and its `</s>` are marked (training labels)."""
    messages = chat(QUESTION, "Red.", "And the car?", "Blue.", image=rng_image(20, 20))
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = inputs["input_ids"][0], inputs["assistant_masks"][0]
    assert len(mask) == len(ids) and "offset_mapping" not in inputs
    marked = [token for token, keep in zip(ids, mask, strict=True) if keep]
    assert processor.tokenizer.decode(marked) == "Red.</s>Blue.</s>"
    runs = [run for run in "".join(str(keep) for keep in mask).split("0") if run]
    assert len(runs) == 2  # two separate answers


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
    # the same 8-bit PIL resize on both sides (integer arithmetic): only the float32 normalisation differs
    expected = reference_pixel_values(image)
    assert (np.abs(pixel_values[0].numpy() - expected) <= normalisation_error(expected)).all()


FIXTURE = Path(__file__).parent / "fixtures" / "pixel_views_before_llava_image_processor.npz"


def fixture_image(width: int, height: int) -> Image.Image:
    """A gradient with a checkerboard: the images whose pixel values `FIXTURE` recorded."""
    y, x = np.mgrid[0:height, 0:width]
    red, green = x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1)
    blue = ((x // 16 + y // 16) % 2) * 200 + 30
    return Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8), "RGB")


@pytest.mark.parametrize("width,height", [(300, 100), (90, 400), (401, 400), (500, 500)])
def test_pixel_values_unchanged_by_the_llava_image_processor(processor, width, height):
    """`FIXTURE` holds, as 8-bit images, the pixel values the former hand-written pad-to-square + CLIP resize gave for
    these images (exactly: pixel values are (uint8 / 255 - mean) / std); transformers' LLaVA image processor gives the
    same."""
    recorded = np.load(FIXTURE)[f"{width}x{height}"].astype(np.float32)  # (3, 336, 336) uint8 values
    mean = np.array(processor.image_processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.array(processor.image_processor.image_std, dtype=np.float32)[:, None, None]
    expected = (recorded * np.float32(1 / 255) - mean) / std
    pixel_values = processor(images=fixture_image(width, height), text="<image>\nq", return_tensors="pt")
    # two float32 evaluations of the same formula, each within normalisation_error of the exact value
    error = 2 * normalisation_error(
        expected, processor.image_processor.image_mean, processor.image_processor.image_std
    )
    assert (np.abs(pixel_values["pixel_values"][0].numpy() - expected) <= error).all()


def test_clip_image_processor_is_accepted_and_gives_the_same_pixel_values(processor, tmp_path):
    """What the converter passes and older folders hold (a CLIP image processor) becomes LLaVA's, same settings."""
    clip = build_clip_image_processor()
    assert type(clip).__name__.startswith("CLIPImageProcessor")
    built = LlavaTrimProcessor(
        image_processor=clip, tokenizer=processor.tokenizer, clip_tokenizer=processor.clip_tokenizer
    )
    assert type(built.image_processor).__name__.startswith("LlavaImageProcessor") and built.image_processor.do_pad
    processor.save_pretrained(tmp_path)  # then made an older folder: the CLIP processor's settings saved
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["image_processor"]["image_processor_type"].startswith("LlavaImageProcessor")
    config["image_processor"] = clip.to_dict()
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    loaded = LlavaTrimProcessor.from_pretrained(tmp_path)
    assert type(loaded.image_processor).__name__.startswith("LlavaImageProcessor")
    image = fixture_image(300, 100)
    for other in (built, loaded):
        torch.testing.assert_close(
            other(images=image, text="<image>\nq", return_tensors="pt")["pixel_values"],
            processor(images=image, text="<image>\nq", return_tensors="pt")["pixel_values"],
            rtol=0,
            atol=0,
        )


def image_files(folder: Path) -> dict[str, Path]:
    """Files whose modes used to decode differently as a path and as a PIL image."""
    gray = np.random.default_rng(0).integers(0, 65536, (40, 60), dtype=np.uint16)
    rgba = np.asarray(rng_image(50, 30, "RGBA"))
    palette = Image.new("P", (32, 24), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 16, 24))
    palette.info["transparency"] = 0
    rotated = rng_image(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "16-bit.png": (Image.fromarray(gray), {}),
        "rgba.png": (Image.fromarray(rgba, "RGBA"), {}),
        "palette.png": (palette, {"transparency": 0}),
        "cmyk.jpg": (Image.new("CMYK", (50, 30), (0, 255, 255, 0)), {}),
        "exif.png": (rotated, {"exif": exif.tobytes()}),
    }
    for name, (image, options) in files.items():
        image.save(folder / name, **options)
    return {name: folder / name for name in files}


def test_a_file_gives_the_same_pixel_values_as_a_path_and_as_a_pil_image(processor, tmp_path):
    for name, path in image_files(tmp_path).items():
        from_path = processor(images=str(path), text="<image>\nq", return_tensors="pt")["pixel_values"]
        from_pil = processor(images=Image.open(path), text="<image>\nq", return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(from_path, from_pil, rtol=0, atol=0, msg=name)
        as_base64 = base64.b64encode(path.read_bytes()).decode()
        from_base64 = processor(images=as_base64, text="<image>\nq", return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(from_base64, from_pil, rtol=0, atol=0, msg=name)
    # what each decodes to: 16-bit samples / 257 (not saturated), transparency on white, EXIF applied
    sixteen = np.asarray(Image.open(tmp_path / "16-bit.png"), dtype=np.float64)
    expected = np.round(sixteen / 257).astype(np.uint8)
    decoded = np.asarray(load_image(str(tmp_path / "16-bit.png")))
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 0], decoded[..., 2])
    palette = np.asarray(load_image(str(tmp_path / "palette.png")))
    assert tuple(palette[0, 0]) == (0, 0, 255) and tuple(palette[0, 20]) == (255, 255, 255)  # index 0: transparent
    assert load_image(str(tmp_path / "exif.png")).size == (30, 60)


@pytest.mark.parametrize("size", [(0, 0), (0, 12), (12, 0)])
def test_empty_images_are_refused_naming_the_image(processor, size):
    width, height = size
    good = rng_image(10, 10)
    for empty in (Image.new("RGB", size), np.zeros((height, width, 3), dtype=np.uint8)):
        with pytest.raises(
            ValueError, match=rf"Image 1 .*({width}x{height}|shape \({height}, {width}, 3\)).*one pixel"
        ):
            processor(images=[good, empty], text="<image><image>\nq")


def test_pixel_values_follow_order_of_appearance(processor):
    images = [rng_image(50, 30, seed=1), rng_image(30, 50, seed=2), rng_image(40, 40, seed=3)]
    batch = processor(images=images, text=["<image>\na <image>\nb", "<image>\nc"], padding=True, return_tensors="pt")
    for index, image in enumerate(images):
        single = processor(images=image, text="<image>\nx", return_tensors="pt")["pixel_values"][0]
        assert torch.equal(batch["pixel_values"][index], single)  # each image is processed on its own


def test_exif_orientation_is_applied(processor, tmp_path):
    image = rng_image(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.png", exif=exif.tobytes())
    from_file = processor(images=str(tmp_path / "rotated.png"), text="<image>\nq", return_tensors="pt")
    upright = processor(images=image.transpose(Image.Transpose.ROTATE_270), text="<image>\nq", return_tensors="pt")
    as_stored = processor(images=image, text="<image>\nq", return_tensors="pt")
    assert torch.equal(from_file["pixel_values"], upright["pixel_values"])
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
    assert (np.abs(pixel_values["16-bit"].numpy() - expected_16bit) <= normalisation_error(expected_16bit)).all()

    def assert_pixel(actual: torch.Tensor, exact: np.ndarray) -> None:  # exact: float64, (3,)
        error = normalisation_error(exact[:, None, None])[:, 0, 0]
        assert (np.abs(actual.numpy().reshape(3, -1) - exact[:, None]) <= error[:, None]).all(), (actual, exact)

    assert_pixel(pixel_values["palette"], (1 - CLIP_MEAN) / CLIP_STD)  # every pixel white
    pad = (np.array(PAD_COLOUR) / 255 - CLIP_MEAN) / CLIP_STD
    assert_pixel(pixel_values["strip"][:, 0, 0], pad)  # top rows: the mean-colour padding
    assert (pixel_values["strip"][:, 168, 168].numpy() < pad).all()  # the black strip in the middle
    assert_pixel(pixel_values["1x1"][:, 100, 200], (np.array([1.0, 0.0, 0.0]) - CLIP_MEAN) / CLIP_STD)


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


def test_question_is_the_user_turn_that_carries_the_image(processor):
    """The rule: an image keeps the question it was asked with for the whole chat (a later turn does not change it)."""
    inputs = processor.apply_chat_template(
        chat(QUESTION, "Red.", "And the car?", image=rng_image(30, 20)),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert inputs["trim_input_ids"] == [clip_row(processor, QUESTION)]
    prompt = processor.apply_chat_template(chat(QUESTION, "Red.", "And the car?"), add_generation_prompt=True)
    assert processor(images=rng_image(30, 20), text=prompt)["trim_input_ids"] == [clip_row(processor, QUESTION)]


def user(*content):
    return {"role": "user", "content": [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMAGE = {"type": "image"}


def test_questions_of_a_multi_image_multi_turn_chat(processor):
    """Each image is scored against its own turn's text; an image alone in a turn takes the next user text."""
    messages = [
        {"role": "system", "content": "Be terse."},
        user(IMAGE, "What animal is this?"),
        assistant("A cat."),
        user(IMAGE),  # no text: the next user turn's
        assistant("Noted."),
        user("Compare the two.", IMAGE, IMAGE),  # two images, one text
        assistant("Both cats."),
        user("Which is older?"),
    ]
    expected = ["What animal is this?", "Compare the two.", "Compare the two.", "Compare the two."]
    assert questions_from_messages(messages) == expected
    images = [rng_image(20, 20, seed=seed) for seed in range(4)]
    with_images = [{**m, "content": list(m["content"])} if isinstance(m["content"], list) else m for m in messages]
    slots = iter(images)
    for message in with_images:
        if isinstance(message["content"], list):
            message["content"] = [
                {"type": "image", "image": next(slots)} if item == IMAGE else item for item in message["content"]
            ]
    inputs = processor.apply_chat_template(with_images, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["trim_input_ids"] == [clip_row(processor, question) for question in expected]
    # the same chat as a rendered string gives the same questions by parsing it
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert questions_from_prompt(prompt) == expected
    assert processor(images=images, text=prompt)["trim_input_ids"] == inputs["trim_input_ids"]
    # a later turn never changes an earlier image's question: the selection stays valid for a cached prefix
    first_turn = processor.apply_chat_template(
        with_images[:2], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert first_turn["trim_input_ids"] == inputs["trim_input_ids"][:1]


def test_question_with_role_words_reaches_trim_whole(processor):
    question = "Read the sign: 'USER: admin'. What does it say?"
    messages = [user({"type": "image", "image": rng_image(20, 20)}, question)]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert inputs["trim_input_ids"] == [clip_row(processor, question)]
    # as a raw string the role markers are ambiguous (documented); trim_text= gives the question explicitly
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert processor(images=rng_image(20, 20), text=prompt, trim_text=question)["trim_input_ids"] == [
        clip_row(processor, question)
    ]


def test_trim_text_overrides_the_messages(processor):
    messages = [user({"type": "image", "image": rng_image(20, 20)}, QUESTION)]
    for kwargs in ({"trim_text": "a red bus"}, {"processor_kwargs": {"trim_text": "a red bus"}}):
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
        )
        assert inputs["trim_input_ids"] == [clip_row(processor, "a red bus")]
    tricky = "Read the sign: 'USER: admin'."  # `None` entries keep the question of the messages, not of the string
    chats = [[user({"type": "image", "image": rng_image(20, 20)}, tricky)], messages]
    inputs = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, return_dict=True, trim_text=[None, "a red bus"],
        processor_kwargs={"padding": True},
    )  # fmt: skip
    assert inputs["trim_input_ids"] == [clip_row(processor, tricky), clip_row(processor, "a red bus")]


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


def test_questions_from_prompt_cases():
    assert questions_from_prompt("<image>\nWhat is this?") == ["What is this?"]
    assert questions_from_prompt("USER: What?\n<image> ASSISTANT:") == ["What?"]
    prompt = "<s>USER: <image>\nq1 ASSISTANT: a</s>USER: q2 ASSISTANT: b</s>"
    assert questions_from_prompt(prompt, "<image>", ("<s>", "</s>")) == ["q1"]
    assert questions_from_prompt("S USER: <image> ASSISTANT: a</s>USER: <image>\nq2 ASSISTANT:") == ["q2", "q2"]
    assert questions_from_prompt("<s> hi <image></s>", special_tokens=("<s>", "</s>")) == ["hi"]
    assert questions_from_prompt("USER: <image> ASSISTANT:") == [""]


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


def test_processor_leaves_its_tokenizer_as_given(processor):
    """Padding follows the tokenizer (side, pad token), which the processor never changes; a call may name a side."""
    tokenizer = build_tiny_processor().tokenizer
    tokenizer.padding_side = "right"
    tokenizer.pad_token = None  # pads with unk, as LLaVA-1.5
    built = LlavaTrimProcessor(processor.image_processor, tokenizer, processor.clip_tokenizer)
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None
    prompts = ["<image>\nWhat is it?", "Hi"]
    inputs = built(images=rng_image(10, 10), text=prompts, padding=True)
    assert inputs["attention_mask"][1][-1] == 0 and inputs["input_ids"][1][-1] == tokenizer.unk_token_id
    left = built(images=rng_image(10, 10), text=prompts, padding=True, padding_side="left")
    assert left["attention_mask"][1][0] == 0
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None


def test_folder_without_clip_tokenizer_is_refused(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (tmp_path / "clip_tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"clip_tokenizer lacks CLIP's tokenizer files \(vocab.json and merges.txt"):
        LlavaTrimProcessor.from_pretrained(tmp_path)
    for path in (tmp_path / "clip_tokenizer").iterdir():
        path.unlink()
    (tmp_path / "clip_tokenizer").rmdir()
    with pytest.raises(ValueError, match="clip_tokenizer lacks"):
        LlavaTrimProcessor.from_pretrained(tmp_path)


def test_trim_ratio_is_passed_to_generate(processor, model):
    """`processor(..., trim_ratio=r)` puts the mode in the inputs (how pipelines take `trim_ratio=` at the top level);
    `generate(**inputs)` then equals `generate(**inputs_without_it, trim_ratio=r)`."""
    messages = chat(QUESTION, image=rng_image(30, 30))
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    plain = processor.apply_chat_template(messages, **kwargs)
    assert "trim_ratio" not in plain
    for ratio in (0.1, None):
        with_ratio = processor.apply_chat_template(messages, trim_ratio=ratio, **kwargs)
        assert with_ratio["trim_ratio"] == ratio
        expected = model.generate(**plain, max_new_tokens=3, do_sample=False, trim_ratio=ratio)
        assert torch.equal(model.generate(**with_ratio, max_new_tokens=3, do_sample=False), expected)


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


def test_post_process_decodes_as_the_tokenizer(processor):
    """Decoding is the tokenizer's, as native LLaVA's: decoded prompt + answer starts with the decoded prompt, and the
    rest keeps the space the Llama tokenizer puts before the answer (so prompt + rest is never glued)."""
    prompt = processor.tokenizer("USER: hi ASSISTANT:").input_ids
    answer = processor.tokenizer("The bus is red.", add_special_tokens=False).input_ids
    full = torch.tensor([prompt + answer + [2]])
    decoded_prompt = processor.post_process_image_text_to_text(torch.tensor([prompt]))[0]
    decoded = processor.post_process_image_text_to_text(full)[0]
    assert decoded == processor.tokenizer.batch_decode(full, skip_special_tokens=True)[0]
    assert decoded_prompt.endswith("ASSISTANT:") and decoded[len(decoded_prompt) :] == " The bus is red."
    assert processor.post_process_image_text_to_text(torch.tensor(answer)) == "The bus is red."


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
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, trim_ratio=-1)
    decoded = processor.post_process_image_text_to_text(out)[0]
    results["decoded_answer"] = decoded[len(processor.post_process_image_text_to_text(inputs["input_ids"])[0]) :]

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    run = lambda text, **kw: pipe(text=text, max_new_tokens=4, **kw)  # greedy: the tiny generation config
    results["single"] = run(first, return_full_text=False)[0]["generated_text"]
    results["single_full"] = run(first)[0]["generated_text"]
    results["path"] = run(second, return_full_text=False)[0]["generated_text"]
    by_url = chat("Who?", {"url": "file://" + image_path})
    results["file_url"] = run(by_url, return_full_text=False)[0]["generated_text"]
    batched = run([first, second], return_full_text=False, batch_size=2, generate_kwargs={"trim_ratio": 0.25})
    results["batched"] = [item[0]["generated_text"] for item in batched]
    results["top_level_ratio"] = [
        run(chat, return_full_text=False, trim_ratio=0.25)[0]["generated_text"] for chat in (first, second)
    ]
    batched_top_level = run([first, second], return_full_text=False, batch_size=2, trim_ratio=0.25)
    results["batched_top_level_ratio"] = [item[0]["generated_text"] for item in batched_top_level]
    prompt = processor.apply_chat_template(first, add_generation_prompt=True)
    results["prompt"] = prompt
    results["images_text"] = pipe(images=image, text=prompt, max_new_tokens=4, return_full_text=False)[0][
        "generated_text"
    ]
    results["images_text_full"] = pipe(images=image, text=prompt, max_new_tokens=4)[0]["generated_text"]
    results["images_text_ratio"] = pipe(images=image, text=prompt, max_new_tokens=4, trim_ratio=0.25)[0][
        "generated_text"
    ]
    try:
        run(first, trim_ratio=2.0)
        results["bad_top_level_ratio"] = None
    except ValueError as error:
        results["bad_top_level_ratio"] = str(error)
    try:
        run(first, generate_kwargs={"trim_ratio": 2.0})
        results["bad_ratio"] = None
    except ValueError as error:
        results["bad_ratio"] = str(error)
    print("RESULTS " + json.dumps(results, default=repr))
    """
)


def run_in_fresh_process(script: str, root: Path, folder: Path, image_path: Path) -> dict:
    """Run `script` on a converted `folder` and an image in a new Python process (its own module cache, no
    PYTHONPATH): the `RESULTS ` line it prints, plus the inputs it saved and the image path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "modules"), "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(image_path), str(root / "inputs.pt")],
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


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory, processor):
    """Save a tiny model + processor, then load and use them only through `trust_remote_code` in a new process."""
    root = tmp_path_factory.mktemp("fresh")
    folder = root / "tiny-llava-trim"
    tiny_model(seed=0).save_pretrained(folder)
    build_tiny_processor(folder)
    image_path = root / "bus.png"
    rng_image(64, 48, seed=7).save(image_path)
    return run_in_fresh_process(FRESH_PROCESS_SCRIPT, root, folder, image_path)


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
        assert torch.equal(loaded[key], expected[key]), key  # the same processor, saved and loaded


def test_pipeline_in_fresh_process(fresh_process):
    """The pipeline gives what `generate` gives. As with native LLaVA, the answer text keeps the space the Llama
    tokenizer puts before its first word, so that a plain string prompt + the answer reads "ASSISTANT: answer"."""
    direct = fresh_process["direct"]
    assert fresh_process["single"].strip() == direct["auto"][0]  # return_full_text=False: just the answer
    assert fresh_process["path"].strip() == direct["auto"][1]
    assert fresh_process["file_url"].strip() == direct["auto"][1]
    assert fresh_process["images_text"].strip() == direct["auto"][0]
    assert [text.strip() for text in fresh_process["batched"]] == direct["0.25"]  # generate_kwargs reach generate
    # `trim_ratio=` at the top level of a pipeline call gives what `generate_kwargs={"trim_ratio": ...}` gives
    assert fresh_process["top_level_ratio"] == fresh_process["batched"]
    assert fresh_process["batched_top_level_ratio"] == fresh_process["batched"]  # one ratio per item, collated
    assert fresh_process["images_text_ratio"].endswith(direct["0.25"][0])
    assert direct["0.25"] != direct["auto"]  # the two modes answer differently on this tiny model: the test can fail
    assert "trim_ratio" in fresh_process["bad_ratio"] and "trim_ratio" in fresh_process["bad_top_level_ratio"]
    full = fresh_process["single_full"]
    assert full[-1]["role"] == "assistant" and full[-1]["content"].strip() == direct["auto"][0] and len(full) == 2
    # return_full_text=True with a plain string prompt: the prompt, then the answer as the tokenizer decodes it
    # after the prompt (with its leading space when the first token has one: never glued by the processor)
    assert fresh_process["images_text_full"] == fresh_process["prompt"] + fresh_process["decoded_answer"]
    assert fresh_process["decoded_answer"].strip() == direct["auto"][0]
