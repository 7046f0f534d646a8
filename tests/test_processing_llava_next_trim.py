"""LlavaNextTrimProcessor against native transformers `LlavaNextProcessor` and LLaVA's own conversation templates."""

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from test_processing_llava_trim import llava_conversation_module, run_in_fresh_process
from transformers import LlavaNextProcessor

from llava_trim.processing_llava_trim import LlavaNextTrimProcessor, questions_from_messages
from llava_trim.testing_utils.tiny_next import build_tiny_next_processor, tiny_next_model
from llava_trim.testing_utils.tiny_tokenizers import build_clip_image_processor

QUESTION = "What is the colour of the bus?"
# (width, height): wide, tall, square, very wide, very tall, small, large
SIZES = [(500, 300), (200, 700), (336, 336), (2000, 500), (330, 1500), (90, 60), (1200, 1000)]


@pytest.fixture(scope="module", params=["vicuna_v1", "mistral_instruct"])
def processor(request) -> LlavaNextTrimProcessor:
    return build_tiny_next_processor(conversation=request.param)


def native_processor(processor: LlavaNextTrimProcessor) -> LlavaNextProcessor:
    """transformers' processor with the settings of the llava-hf LLaVA-NeXT repositories (patch 14, CLS dropped)."""
    return LlavaNextProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def rng_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(*turns, system: str | None = None):
    messages = [{"role": "system", "content": system}] if system else []
    for index, text in enumerate(turns):
        content = [{"type": "text", "text": text}]
        if index == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": content})
    return messages


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("width,height", SIZES)
def test_inputs_equal_native_llava_next_processor(processor, width, height):
    prompt = processor.apply_chat_template(chat(QUESTION), add_generation_prompt=True)
    image = rng_image(width, height)
    ours = processor(images=image, text=prompt, return_tensors="pt")
    theirs = native_processor(processor)(images=image, text=prompt, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["image_sizes"].tolist() == [[height, width]]
    assert ours["trim_input_ids"].shape == (1, 77)


def test_batch_of_two_sizes_equals_native(processor):
    prompts = [
        processor.apply_chat_template(chat(QUESTION), add_generation_prompt=True),
        processor.apply_chat_template(chat("Who?", "Me.", "And now?"), add_generation_prompt=True),
    ]
    images = [rng_image(500, 300, 1), rng_image(200, 700, 2)]
    ours = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    theirs = native_processor(processor)(images=images, text=prompts, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].shape[:2] == (2, 4)  # crops padded to the largest count
    questions = processor.clip_tokenizer([QUESTION, "Who?"], padding="max_length", max_length=77).input_ids
    assert ours["trim_input_ids"].tolist() == questions


def test_best_resolution_follows_the_configured_pinpoints(processor):
    pinpoints = [[336, 1008], [672, 672]]
    settings = build_clip_image_processor().to_dict()
    settings.pop("image_processor_type")
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(**settings, image_grid_pinpoints=pinpoints, do_pad=True)
    ours = LlavaNextTrimProcessor(image_processor, processor.tokenizer, processor.clip_tokenizer)
    image = rng_image(500, 300)
    inputs = ours(images=image, text="<image>\nq", return_tensors="pt")
    expected = native_processor(ours)(images=image, text="<image>\nq", return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    assert inputs["pixel_values"].shape[1] == 1 + 3  # 300x500 fits 336x1008 best: three tiles, not four


# ---------------------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "turns",
    [(QUESTION,), (QUESTION, "Red."), (QUESTION, "Red.", "And the car?"), (QUESTION, "Red.", "And the car?", "Blue.")],
)
@pytest.mark.parametrize("system", [None, "Be terse."])
def test_chat_template_is_llavas_conversation(processor, turns, system):
    conversation = llava_conversation_module().conv_templates[processor.conversation].copy()
    if system:
        conversation.system = system
    for index, text in enumerate(turns):
        conversation.append_message(conversation.roles[index % 2], "<image>\n" + text if index == 0 else text)
    if len(turns) % 2:
        conversation.append_message(conversation.roles[1], None)
    rendered = processor.apply_chat_template(chat(*turns, system=system), add_generation_prompt=len(turns) % 2 == 1)
    assert rendered == conversation.get_prompt()


@pytest.mark.parametrize("turns", [(QUESTION,), (QUESTION, "Red.", "And the car?")])
def test_questions_of_a_raw_prompt_match_the_messages(processor, turns):
    messages = chat(*turns, system="Be terse.")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=rng_image(64, 48), text=prompt)
    expected = processor.clip_tokenizer(
        questions_from_messages(messages), padding="max_length", max_length=77
    ).input_ids
    assert inputs["trim_input_ids"] == expected
    assert questions_from_messages(messages) == [QUESTION]


def test_unknown_conversation_is_refused(processor):
    with pytest.raises(ValueError, match="`conversation` must be one of"):
        LlavaNextTrimProcessor(
            processor.image_processor, processor.tokenizer, processor.clip_tokenizer, conversation="chatml"
        )


# ---------------------------------------------------------------------------------------------------- fresh process

FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, image_path, out_path = sys.argv[1:4]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(image_path)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Who?"}]}]
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    torch.save(dict(inputs), out_path)
    results = {"classes": [type(processor).__name__, type(model).__name__, processor.conversation]}
    direct = {}
    for name, ratio in (("off", None), ("auto", -1), ("fixed", 0.05)):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, trim_ratio=ratio)
        direct[name] = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    results["direct"] = direct
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    run = lambda **kw: pipe(text=chat, max_new_tokens=4, return_full_text=False, **kw)[0]["generated_text"]
    results["pipeline"] = {"auto": run(), "fixed": run(trim_ratio=0.05), "off": run(trim_ratio=None)}
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh-next")
    folder = root / "tiny-llava-next-trim"
    tiny_next_model(seed=0).save_pretrained(folder)
    build_tiny_next_processor(folder, conversation="mistral_instruct")
    image_path = root / "bus.png"
    rng_image(500, 300, seed=7).save(image_path)
    return run_in_fresh_process(FRESH_PROCESS_SCRIPT, root, folder, image_path)


def test_loads_through_auto_classes_and_pipeline_in_a_fresh_process(fresh_process):
    assert fresh_process["classes"] == [
        "LlavaNextTrimProcessor",
        "LlavaNextTrimForConditionalGeneration",
        "mistral_instruct",
    ]
    expected = build_tiny_next_processor(conversation="mistral_instruct").apply_chat_template(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.open(fresh_process["image_path"])},
                    {"type": "text", "text": "Who?"},
                ],
            }
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert set(fresh_process["inputs"]) == set(expected)
    for key in expected:
        torch.testing.assert_close(fresh_process["inputs"][key], expected[key], msg=key)
    direct, piped = fresh_process["direct"], fresh_process["pipeline"]
    assert {name: text.strip() for name, text in piped.items()} == {name: direct[name].strip() for name in piped}
    assert len({direct["off"], direct["auto"], direct["fixed"]}) > 1  # the modes differ here: the test can fail
