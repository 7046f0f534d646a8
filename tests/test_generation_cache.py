"""Continuing generation from a cache: every call given a non-empty cache equals a fresh run of the same call, or is
refused with a message (docs/trim.md section 5, "Continuing a chat from a cache").

The reference is the same model run without the cache on the whole prompt (itself checked against native transformers
Llava in test_generation.py), compared token for token and on the logits of every new token: the tiny random model
often picks the same tokens from a wrong context, its logits do not.
"""

import copy

import pytest
import torch
from PIL import Image
from test_generation import MODES, SIZE, Prompt, S, pixels, prompt, text
from test_modeling_llava_trim import PAD, batch, questions
from transformers import DynamicCache, StaticCache

from llava_trim.testing_utils.tiny import TINY_IMAGE_TOKEN_ID, TINY_VISION, native_llava, tiny_model
from llava_trim.testing_utils.tiny_tokenizers import build_tiny_processor

GREEDY = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, vision_config=dict(TINY_VISION, image_size=SIZE), image_seq_length=S)


@pytest.fixture(scope="module")
def native(model):
    return native_llava(model)


def logits_tolerance(model, logits: torch.Tensor, positions: int) -> float:
    """How far two float32 runs of the same positions may drift when the cache splits the sequence differently.

    Every logit is a chain of dot products (attention over `positions`, MLP and head widths) per layer; each may round
    differently in `positions + width` terms of `eps * |term|`, so the bound is that count times float32's epsilon,
    times the largest logit as the scale of the terms, times the layers (errors add along the residual stream)."""
    text_config = model.config.text_config
    terms = positions + text_config.intermediate_size + text_config.hidden_size
    return terms * torch.finfo(torch.float32).eps * float(logits.abs().max()) * (text_config.num_hidden_layers + 1)


def assert_same_run(model, continued, fresh, prompt_length: int):
    assert torch.equal(continued.sequences, fresh.sequences)
    ours, reference = torch.stack(continued.logits), torch.stack(fresh.logits)
    tolerance = logits_tolerance(model, reference, prompt_length + len(fresh.logits))
    assert (ours - reference).abs().max() <= tolerance


def recording_crops(cache):
    """Make `cache.crop` note the length each call crops the cache to."""
    crops, crop = [], cache.crop
    cache.crop = lambda remove: (crops.append(cache.get_seq_length() + remove), crop(remove))
    return crops


def image_inputs(num_images: int, seed: int, trim_ratio) -> dict:
    trim_ids, trim_mask = questions(num_images, seed=seed)
    return dict(
        pixel_values=pixels(num_images, seed=seed),
        trim_input_ids=trim_ids,
        trim_attention_mask=trim_mask,
        trim_ratio=trim_ratio,
    )


def first_turn(model, trim_ratio, seed: int = 9, **options):
    """A prompt with one image, answered: the output (with its cache), and its image inputs."""
    images = image_inputs(1, seed, trim_ratio)
    out = model.generate(input_ids=torch.tensor([prompt(3, 1, 4, seed=seed)]), **images, **{**GREEDY, **options})
    return out, images


# ------------------------------------------------------------------------------------------------------------------
# 1. A cache passed without `pixel_values` is checked like any other
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model():
    return tiny_model(seed=0)  # LLaVA's 336 px images, as the processor makes them


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def test_text_only_readme_chat_equals_fresh_runs(chat_model, processor):
    """Issue 17 item 1a: README's chat loop without an image; the re-rendered answer is not the cached tokens."""
    messages, cache, previous, tokens_differed = [], None, None, False
    for question in ["Hello there", "Where is it going?", "And then?"]:
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        fresh = chat_model.generate(**inputs, **GREEDY)
        if cache is not None:
            length = cache.get_seq_length()
            tokens_differed |= not torch.equal(inputs["input_ids"][:, :length], previous[:, :length])
            continued = chat_model.generate(**inputs, cache=cache, **GREEDY)
            assert_same_run(chat_model, continued, fresh, inputs["input_ids"].shape[1])
            fresh = continued
        answer = processor.decode(fresh.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        cache, previous = fresh.cache, fresh.sequences
    assert tokens_differed  # the case of the issue: the chat re-rendered from text does not repeat the cache


@pytest.mark.parametrize("mode", MODES)
def test_image_dropped_from_the_chat_with_the_old_cache(model, mode):
    """Issue 17 item 1b: turn 2 re-rendered without turn 1's image, no `pixel_values`, the old cache passed."""
    out, _ = first_turn(model, MODES[mode])
    ids = out.sequences[0].tolist()
    start = ids.index(TINY_IMAGE_TOKEN_ID)
    turn2 = torch.tensor([ids[:start] + ids[start + S :] + text(4, seed=20)])
    crops = recording_crops(out.cache)
    continued = model.generate(input_ids=turn2, cache=out.cache, **GREEDY)
    assert_same_run(model, continued, model.generate(input_ids=turn2, **GREEDY), turn2.shape[1])
    assert crops[0] == start  # reused up to the image, which is no longer there


@pytest.mark.parametrize("mode", MODES)
def test_placeholders_without_pixel_values_with_a_cache_as_without(model, mode):
    """Issue 17 item 1c: turn 2 still holds the placeholders but no `pixel_values`: the fresh run's answer or error."""
    out, _ = first_turn(model, MODES[mode])
    turn2 = dict(input_ids=torch.cat([out.sequences, torch.tensor([text(4, seed=21)])], dim=1), trim_ratio=MODES[mode])
    try:
        expected = model.generate(**turn2, **GREEDY)
    except ValueError as error:
        with pytest.raises(ValueError) as refused:
            model.generate(**turn2, cache=out.cache, **GREEDY)
        assert str(refused.value) == str(error)
    else:
        assert_same_run(
            model, model.generate(**turn2, cache=out.cache, **GREEDY), expected, turn2["input_ids"].shape[1]
        )
    if MODES[mode] is not None:  # TRIM needs the image to select its tokens: refused whatever the cache
        with pytest.raises(ValueError, match="image placeholder tokens but no `pixel_values`"):
            model.generate(**turn2, cache=out.cache, **GREEDY)


def test_placeholders_without_pixel_values_with_a_cache_at_trim_off_read_as_text():
    """With TRIM off in the config, placeholders without an image run as native runs them (as text): the cached
    image positions are not reused for them."""
    model = tiny_model(seed=0, vision_config=dict(TINY_VISION, image_size=SIZE), image_seq_length=S, trim_ratio=None)
    out, _ = first_turn(model, None)
    turn2 = torch.cat([out.sequences, torch.tensor([text(4, seed=21)])], dim=1)
    crops = recording_crops(out.cache)
    continued = model.generate(input_ids=turn2, cache=out.cache, **GREEDY)
    assert_same_run(model, continued, model.generate(input_ids=turn2, **GREEDY), turn2.shape[1])
    assert crops == [out.sequences[0].tolist().index(TINY_IMAGE_TOKEN_ID)]


@pytest.mark.parametrize("mode", MODES)
def test_edited_text_only_answer_then_an_image(model, mode):
    """Issue 17 item 1d: a text-only turn 1 whose answer is edited, then an image in turn 2."""
    out = model.generate(input_ids=torch.tensor([prompt(6, 0, 0, seed=22)]), **GREEDY)
    edited = out.sequences.clone()
    edited[0, -3:] = torch.tensor(text(3, seed=23))
    turn2 = torch.cat([edited, torch.tensor([[TINY_IMAGE_TOKEN_ID] * S + text(3, seed=24)])], dim=1)
    images = image_inputs(1, 24, MODES[mode])
    crops = recording_crops(out.cache)
    continued = model.generate(input_ids=turn2, cache=out.cache, **images, **GREEDY)
    assert_same_run(model, continued, model.generate(input_ids=turn2, **images, **GREEDY), turn2.shape[1])
    assert crops[0] == out.sequences.shape[1] - 3  # recomputed from the edit on


def test_cache_of_another_model_is_refused(model):
    """Issue 17 item 1e: a text-only cache filled by another model (with or without this model's class)."""
    other = tiny_model(seed=5, vision_config=dict(TINY_VISION, image_size=SIZE), image_seq_length=S)
    first = torch.tensor([prompt(6, 0, 0, seed=25)])
    out = other.generate(input_ids=first, **GREEDY)
    turn2 = torch.cat([out.sequences, torch.tensor([text(3, seed=26)])], dim=1)
    plain = DynamicCache()
    for layer, cached in enumerate(copy.deepcopy(out.cache).layers):
        plain.update(cached.keys, cached.values, layer)
    for cache in (out.cache, plain):
        with pytest.raises(ValueError, match="was not filled by this model"):
            model.generate(input_ids=turn2, cache=cache, **GREEDY)


# ------------------------------------------------------------------------------------------------------------------
# 2. An earlier image, its question or the TRIM settings changed: recomputed from that image on
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trim_ratio", [None, 1.0, -1, 0.25])
@pytest.mark.parametrize("change", ["picture", "question", "trim_ratio"])
def test_changed_image_is_recomputed_from_its_first_position(model, trim_ratio, change):
    """Issue 17 item 2: the old cache holds the old image; the answer is the fresh one for the new image."""
    out, images = first_turn(model, trim_ratio)
    turn2 = torch.cat([out.sequences, torch.tensor([text(3, seed=27)])], dim=1)
    if change == "picture":
        images = {**images, "pixel_values": pixels(1, seed=77)}
    elif change == "question":
        images = {**images, "trim_input_ids": questions(1, seed=78)[0]}
    else:
        images = {**images, "trim_ratio": 0.5 if trim_ratio != 0.5 else None}
    fresh = model.generate(input_ids=turn2, **images, **GREEDY)
    crops = recording_crops(out.cache)
    continued = model.generate(input_ids=turn2, cache=out.cache, **images, **GREEDY)
    assert_same_run(model, continued, fresh, turn2.shape[1])
    first_image_position = out.sequences[0].tolist().index(TINY_IMAGE_TOKEN_ID)
    # TRIM off and a ratio of 1 keep every patch whatever the question: the same features, all reused
    unchanged = change == "question" and trim_ratio in (None, 1.0)
    assert crops == ([] if unchanged else [first_image_position])


def test_unchanged_images_are_reused_and_a_changed_later_one_recomputed(model):
    """Two images: only the positions from the changed second image on are recomputed."""
    rows = [prompt(3, 2, 4, seed=28)]
    images = image_inputs(2, 28, 0.25)
    out = model.generate(input_ids=torch.tensor(rows), **images, **GREEDY)
    turn2 = torch.cat([out.sequences, torch.tensor([text(3, seed=29)])], dim=1)
    swapped = {**images, "pixel_values": torch.stack([images["pixel_values"][0], pixels(1, seed=79)[0]])}
    crops = recording_crops(out.cache)
    continued = model.generate(input_ids=turn2, cache=out.cache, **swapped, **GREEDY)
    assert_same_run(model, continued, model.generate(input_ids=turn2, **swapped, **GREEDY), turn2.shape[1])
    # in the compacted prompt: BOS, 3 tokens, the first image's |K| + 1 positions, 4 tokens, then the second image
    assert crops == [1 + 3 + int(out.trim_selection.tokens_per_image[0]) + 4]


# ------------------------------------------------------------------------------------------------------------------
# 3. Left-padded batch without `attention_mask`
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_batch_without_attention_mask_equals_native(model, native, mode):
    """Issue 17 item 3: the mask is inferred from the pad token, as native generate does, before compaction."""
    two = Prompt(model, native, [prompt(3, 1, 5, seed=2), prompt(8, 1, 2, seed=3)], seed=2)
    inputs = {key: value for key, value in two.inputs().items() if key != "attention_mask"}
    ours = model.generate(**inputs, trim_ratio=MODES[mode], pad_token_id=PAD, **GREEDY)
    reference = two.reference_inputs(MODES[mode])  # the hand-compacted prompt, with its mask
    theirs = native.generate(**reference, pad_token_id=PAD, **GREEDY)
    expected = torch.cat([two.input_ids, theirs.sequences[:, reference["input_ids"].shape[1] :]], dim=1)
    assert torch.equal(ours.sequences, expected)
    tolerance = logits_tolerance(model, torch.stack(theirs.logits), reference["input_ids"].shape[1] + 3)
    assert (torch.stack(ours.logits) - torch.stack(theirs.logits)).abs().max() <= tolerance


@pytest.mark.parametrize("mode", MODES)
def test_batched_chat_with_new_left_padding(model, mode):
    """A batch continued with turns of different lengths: the left padding moves, the cache is recomputed where the
    rows no longer repeat it, and each row's answer is the fresh batch's."""
    rows = [prompt(3, 1, 4, seed=34), prompt(8, 1, 2, seed=35)]
    input_ids, attention_mask = batch(rows)
    images = image_inputs(2, 34, MODES[mode])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **images, pad_token_id=PAD, **GREEDY)
    answered = [row[-len(ids) - 3 :].tolist() for row, ids in zip(out.sequences, rows, strict=True)]
    turn2_ids, turn2_mask = batch([answered[0] + text(2, seed=36), answered[1] + text(9, seed=37)])
    turn2 = dict(input_ids=turn2_ids, attention_mask=turn2_mask, **images, pad_token_id=PAD)
    continued = model.generate(**turn2, cache=out.cache, **GREEDY)
    assert_same_run(model, continued, model.generate(**turn2, **GREEDY), turn2_ids.shape[1])


# ------------------------------------------------------------------------------------------------------------------
# 4. Caches from beam search and static caches
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cache_from_beam_search_is_refused_clearly(model, mode):
    out, images = first_turn(model, MODES[mode], num_beams=3)
    turn2 = torch.cat([out.sequences, torch.tensor([text(3, seed=30)])], dim=1)
    with pytest.raises(ValueError, match="The cache holds 3 rows but the prompt has 1"):
        model.generate(input_ids=turn2, cache=out.cache, **images, **GREEDY)


@pytest.mark.parametrize("mode", MODES)
def test_static_cache_continues_exactly_or_is_refused_clearly(model, mode):
    """Issue 17 item 4: a static cache too small for the next turn is refused; one large enough continues it."""
    first_length = first_turn(model, MODES[mode])[0].cache.get_seq_length()  # compacted prompt + 2 cached tokens
    # the next turn adds the last generated token and 3 new ones, then caches 2 of the 3 tokens it generates
    for capacity in (None, first_length, first_length + 5, first_length + 6):
        if capacity is None:  # sized by `generate` for the first turn (it may keep a larger size of earlier calls)
            options = dict(cache_implementation="static")
        else:
            options = dict(cache=StaticCache(config=model.config, max_cache_len=capacity))
        out, images = first_turn(model, MODES[mode], **options)
        turn2 = torch.cat([out.sequences, torch.tensor([text(3, seed=31)])], dim=1)
        fresh = model.generate(input_ids=turn2, **images, **GREEDY)
        try:
            continued = model.generate(input_ids=turn2, cache=out.cache, **images, **GREEDY)
        except ValueError as error:
            assert capacity is None or capacity < first_length + 6
            assert "This static cache holds" in str(error) and "but the call needs up to" in str(error)
        else:
            assert capacity is None or capacity == first_length + 6
            assert_same_run(model, continued, fresh, turn2.shape[1])


# ------------------------------------------------------------------------------------------------------------------
# Issue 22 item 8: continuing from the cache a forward pass returned
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", ["LlavaTrimForConditionalGeneration", "LlavaTrimModel"])
def test_generate_continues_the_cache_of_forward_passes(model, mode, entry):
    """A prompt run by `forward`, one token decoded by `forward` from its cache, then `generate` on the prompt extended
    by both tokens from that cache: a fresh run's answer, with every cached position reused."""
    images = image_inputs(1, 32, MODES[mode])
    ids = torch.tensor([prompt(3, 1, 4, seed=32)])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **images)
        compacted_length = out.logits.shape[1]
        first = out.logits[:, -1:].argmax(-1)
        second = model(input_ids=first, cache=out.cache).logits[:, -1:].argmax(-1)
        if entry == "LlavaTrimModel":  # the same positions written by the model without its head
            cache = model.model(input_ids=ids, use_cache=True, **images).cache
            model.model(input_ids=first, cache=cache)
        else:
            cache = out.cache
    extended = torch.cat([ids, first, second], dim=1)
    crops = recording_crops(cache)
    continued = model.generate(input_ids=extended, cache=cache, **images, **GREEDY)
    assert_same_run(model, continued, model.generate(input_ids=extended, **images, **GREEDY), extended.shape[1])
    assert crops == [] and cache.get_seq_length() == compacted_length + 2 + 2  # reused whole, then 2 new tokens


def test_chat_of_generate_calls_reuses_every_cached_position(model):
    """The prompt extended by the generated tokens: nothing cached is recomputed."""
    out, images = first_turn(model, -1)
    turn2 = torch.cat([out.sequences, torch.tensor([text(3, seed=33)])], dim=1)
    crops = recording_crops(out.cache)
    continued = model.generate(input_ids=turn2, cache=out.cache, **images, **GREEDY)
    assert_same_run(model, continued, model.generate(input_ids=turn2, **images, **GREEDY), turn2.shape[1])
    assert crops == []


def test_chat_with_an_image_through_the_processor(chat_model, processor):
    """README's chat loop with an image in turn 1 and another in turn 3, compared on the logits too."""
    image, second_image = Image.new("RGB", (200, 120), (200, 40, 40)), Image.new("RGB", (90, 160), (20, 90, 200))
    turns = [
        [{"type": "image", "image": image}, {"type": "text", "text": "What is the colour of the bus?"}],
        [{"type": "text", "text": "Where is it going?"}],
        [{"type": "image", "image": second_image}, {"type": "text", "text": "And this one?"}],
    ]
    for trim_ratio in MODES.values():
        messages, cache = [], None
        for content in turns:
            messages.append({"role": "user", "content": content})
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            fresh = chat_model.generate(**inputs, trim_ratio=trim_ratio, **GREEDY)
            if cache is not None:
                continued = chat_model.generate(**inputs, trim_ratio=trim_ratio, cache=cache, **GREEDY)
                assert_same_run(chat_model, continued, fresh, inputs["input_ids"].shape[1])
                fresh = continued
            answer = processor.decode(fresh.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            cache = fresh.cache
