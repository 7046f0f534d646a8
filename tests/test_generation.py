"""The generation feature matrix of modeling_llava_trim.py.

Every `generate` option at TRIM off, automatic and a fixed ratio, token for token against a reference no one here
wrote: native transformers `LlavaForConditionalGeneration` on the same weights (TRIM off), or the same native model on
the prompt compacted by hand, with the kept image features built by hand (TRIM on; see docs/trim.md).
"""

import copy
import functools
import logging

import pytest
import torch
from PIL import Image
from test_modeling_llava_trim import PAD, batch, questions
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_trim.testing_utils.tiny import TINY_IMAGE_TOKEN_ID, TINY_VISION, native_llava, tiny_model
from llava_trim.testing_utils.tiny_tokenizers import build_llama_tokenizer, build_tiny_processor

MODES = {"off": None, "auto": -1, "fixed": 0.25}
SIZE, S = 112, 64  # a smaller image than LLaVA's (8 x 8 patches) keeps the matrix fast; the code paths are the same


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, vision_config=dict(TINY_VISION, image_size=SIZE), image_seq_length=S)


@pytest.fixture(scope="module")
def native(model):
    return native_llava(model)


def prompt(prefix_len: int, num_images: int, suffix_len: int, seed: int) -> list[int]:
    """`BOS, text..., (S image placeholders, text...) * num_images`, with text tokens drawn from the vocabulary."""
    ids = [1] + text(prefix_len, seed)
    for image in range(num_images):
        ids += [TINY_IMAGE_TOKEN_ID] * S + text(suffix_len, seed + 100 + image)
    return ids


def text(n: int, seed: int) -> list[int]:
    return torch.randint(3, 900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def pixels(num: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((num, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


class Prompt:
    """A batch of prompts, the inputs our model takes, and the inputs native Llava takes for each TRIM mode."""

    def __init__(self, model, native, rows, side="left", seed=0):
        self.model, self.native, self.rows, self.side = model, native, rows, side
        num_images = sum(row.count(TINY_IMAGE_TOKEN_ID) for row in rows) // S
        self.input_ids, self.attention_mask = batch(rows, side)
        self.pixel_values = pixels(num_images, seed=seed)
        self.trim_input_ids, self.trim_attention_mask = questions(num_images, seed=seed)

    def inputs(self) -> dict:
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            pixel_values=self.pixel_values,
            trim_input_ids=self.trim_input_ids,
            trim_attention_mask=self.trim_attention_mask,
        )

    def reference_inputs(self, trim_ratio) -> dict:
        """Native Llava's inputs: its own image features (TRIM off) or the hand-compacted prompt (TRIM on)."""
        # a new container per call: generate expands `mm_encoder_outputs` in place for beams and several sequences
        rows, features = self.reference_rows_and_features(trim_ratio)
        input_ids, attention_mask = batch(rows, self.side)
        image = BaseModelOutputWithPooling(pooler_output=list(features)) if features else None
        return dict(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs={"image": image})

    @functools.cache  # noqa: B019 (one Prompt per module-scoped fixture)
    def reference_rows_and_features(self, trim_ratio) -> tuple[list[list[int]], tuple[torch.Tensor, ...]]:
        native = self.native
        with torch.no_grad():
            if trim_ratio is None:
                features = native.model.get_image_features(self.pixel_values).pooler_output
                rows = self.rows
            else:
                keep = self.model.select_image_tokens(**self.inputs(), trim_ratio=trim_ratio).keep_mask
                hidden = native.model.vision_tower(self.pixel_values, output_hidden_states=True).hidden_states[-2]
                hidden = hidden[:, 1:]  # (num_images, N, Dv), CLS dropped
                features = []
                for image, mask in enumerate(keep):
                    pruned = hidden[image][~mask]
                    mean = pruned.mean(0, keepdim=True) if len(pruned) else torch.zeros_like(hidden[image][:1])
                    features.append(native.model.multi_modal_projector(torch.cat([hidden[image][mask], mean])))
                counts = iter([len(f) for f in features])
                rows = [compact_by_hand(row, counts) for row in self.rows]
        return rows, tuple(features)


def compact_by_hand(row: list[int], counts) -> list[int]:
    """The row with each run of S placeholders replaced by the next count of placeholders."""
    out, position = [], 0
    while position < len(row):
        if row[position] == TINY_IMAGE_TOKEN_ID:
            out += [TINY_IMAGE_TOKEN_ID] * next(counts)
            position += S
        else:
            out.append(row[position])
            position += 1
    return out


def run_both(prompt_set: Prompt, mode: str, reference_options: dict | None = None, **options):
    """Our generate and the reference, each from the same RNG state; returns (ours, expected) in caller coordinates."""
    trim_ratio = MODES[mode]
    torch.manual_seed(0)
    ours = prompt_set.model.generate(**prompt_set.inputs(), trim_ratio=trim_ratio, **options)
    reference = prompt_set.reference_inputs(trim_ratio)
    torch.manual_seed(0)
    theirs = prompt_set.native.generate(**reference, **(reference_options or options))
    new_tokens = theirs[:, reference["input_ids"].shape[1] :]
    caller = prompt_set.input_ids.repeat_interleave(len(theirs) // len(prompt_set.input_ids), dim=0)
    return ours, torch.cat([caller, new_tokens], dim=1)


@pytest.fixture(scope="module")
def one(model, native):
    return Prompt(model, native, [prompt(4, 1, 6, seed=1)], seed=1)


@pytest.fixture(scope="module")
def two(model, native):
    return Prompt(model, native, [prompt(3, 1, 5, seed=2), prompt(8, 1, 2, seed=3)], seed=2)


# ------------------------------------------------------------------------------------------------------------------
# Decoding strategies and lengths
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=5, do_sample=False),
        dict(max_new_tokens=5, do_sample=True, top_k=20),
        dict(max_new_tokens=4, num_beams=3),
        dict(max_new_tokens=4, do_sample=True, num_return_sequences=2),
        dict(max_new_tokens=4, cache_implementation="static"),
    ],
    ids=["greedy", "seeded-sampling", "beam-search", "num-return-sequences", "static-cache"],
)
def test_decoding_strategies(two, mode, options):
    ours, expected = run_both(two, mode, **options)
    assert torch.equal(ours, expected)
    assert ours.shape[1] == two.input_ids.shape[1] + options["max_new_tokens"]


@pytest.mark.parametrize("mode", MODES)
def test_max_length_counts_the_callers_prompt(two, mode):
    length = two.input_ids.shape[1]
    reference_length = two.reference_inputs(MODES[mode])["input_ids"].shape[1]
    ours, expected = run_both(two, mode, dict(max_length=reference_length + 4), max_length=length + 4)
    assert torch.equal(ours, expected)
    assert ours.shape[1] == length + 4


@pytest.mark.parametrize("mode", MODES)
def test_min_length_counts_the_callers_prompt(one, mode):
    # make the first greedy token the end-of-sequence token: only min_length keeps generation going
    first = run_both(one, mode, max_new_tokens=1)[1][0, -1].item()
    length = one.input_ids.shape[1]
    reference_length = one.reference_inputs(MODES[mode])["input_ids"].shape[1]
    options = dict(max_new_tokens=6, eos_token_id=first)
    ours, expected = run_both(
        one, mode, dict(options, min_length=reference_length + 3), min_length=length + 3, **options
    )
    assert torch.equal(ours, expected)
    assert first not in ours[0, length : length + 3].tolist()
    assert ours.shape[1] >= length + 4


@pytest.mark.parametrize("mode", MODES)
def test_generation_config_given_positionally(two, mode):
    config = GenerationConfig(max_length=two.input_ids.shape[1] + 3, pad_token_id=PAD, eos_token_id=2)
    reference_length = two.reference_inputs(MODES[mode])["input_ids"].shape[1]
    ours = two.model.generate(two.input_ids, config, **{**two.inputs(), "input_ids": None}, trim_ratio=MODES[mode])
    _, expected = run_both(two, mode, dict(max_length=reference_length + 3), max_new_tokens=1)
    assert torch.equal(ours, expected)
    assert config.max_length == two.input_ids.shape[1] + 3  # the caller's config is not changed


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_llama_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.mark.parametrize("mode", MODES)
def test_stop_strings(one, tokenizer, mode):
    length = one.input_ids.shape[1]
    greedy = run_both(one, mode, max_new_tokens=8)[1][0, length:].tolist()
    # a stop string taken from a later token of the greedy answer: generation must end there
    position, piece = next(
        (i, tokenizer.convert_ids_to_tokens(token).replace("▁", ""))
        for i, token in enumerate(greedy)
        if i >= 1 and token < len(tokenizer) and tokenizer.convert_ids_to_tokens(token).strip("▁").isalpha()
    )
    options = dict(max_new_tokens=8, stop_strings=piece, tokenizer=tokenizer)
    ours, expected = run_both(one, mode, **options)
    assert torch.equal(ours, expected)
    assert ours.shape[1] <= length + position + 1


class Collect(BaseStreamer):
    def __init__(self):
        self.values, self.ended = [], False

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("mode", MODES)
def test_streaming(one, mode):
    ours_streamer, reference_streamer = Collect(), Collect()
    ours, expected = run_both(
        one, mode, dict(max_new_tokens=4, streamer=reference_streamer), max_new_tokens=4, streamer=ours_streamer
    )
    assert torch.equal(ours, expected)
    assert ours_streamer.ended and reference_streamer.ended
    assert torch.equal(ours_streamer.values[0], one.input_ids)  # the caller's prompt, not the compacted one
    new_ours = [v.tolist() for v in ours_streamer.values[1:]]
    assert new_ours == [v.tolist() for v in reference_streamer.values[1:]]
    assert torch.equal(torch.cat([one.input_ids, torch.tensor(new_ours).view(1, -1)], dim=1), ours)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("candidates", ["assistant-model", "prompt-lookup"])
def test_assisted_decoding_is_lossless(model, one, mode, candidates):
    options = dict(assistant_model=model) if candidates == "assistant-model" else dict(prompt_lookup_num_tokens=3)
    ours, greedy = run_both(one, mode, dict(max_new_tokens=6), max_new_tokens=6, **options)
    assert torch.equal(ours, greedy)


# ------------------------------------------------------------------------------------------------------------------
# Padding and batches
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_text_only_rows_mixed_with_image_rows(model, native, mode):
    mixed = Prompt(model, native, [prompt(2, 1, 4, seed=4), prompt(9, 0, 0, seed=5), prompt(1, 2, 3, seed=6)], seed=4)
    ours, expected = run_both(mixed, mode, max_new_tokens=4)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("mode", MODES)
def test_right_padding_warns_as_native_and_matches_it(model, native, mode, caplog):
    right = Prompt(model, native, [prompt(3, 1, 5, seed=7), prompt(9, 1, 2, seed=8)], side="right", seed=7)
    with caplog.at_level(logging.WARNING):
        ours, expected = run_both(right, mode, max_new_tokens=3)
    assert torch.equal(ours, expected)
    assert sum("right-padding was detected" in record.message for record in caplog.records) == 2  # ours and native


# ------------------------------------------------------------------------------------------------------------------
# Chats: continuing from the cache of the previous turn
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_chat_continued_from_the_cache_equals_a_fresh_run(model, native, mode):
    trim_ratio = MODES[mode]
    trim_ids, trim_mask = questions(2, seed=9)
    pixel_values = pixels(2, seed=9)
    turn = torch.tensor([prompt(3, 1, 4, seed=9)])
    cache, images = None, 1
    for number in range(3):
        inputs = dict(
            input_ids=turn,
            pixel_values=pixel_values[:images],
            trim_input_ids=trim_ids[:images],
            trim_attention_mask=trim_mask[:images],
            trim_ratio=trim_ratio,
            max_new_tokens=3,
            return_dict_in_generate=True,
        )
        fresh = model.generate(**inputs)
        continued = model.generate(**inputs, past_key_values=cache) if cache is not None else fresh
        assert torch.equal(continued.sequences, fresh.sequences), f"turn {number + 1}"
        # and the fresh run is the reference's
        rows = Prompt(model, native, turn.tolist(), seed=9)
        rows.pixel_values, rows.trim_input_ids, rows.trim_attention_mask = (
            pixel_values[:images],
            trim_ids[:images],
            trim_mask[:images],
        )
        assert torch.equal(fresh.sequences, run_both(rows, mode, max_new_tokens=3)[1])
        cache = continued.cache
        # the next user turn: text, and in the third turn a second image
        next_turn = text(4, seed=number)
        if number == 1:
            next_turn += [TINY_IMAGE_TOKEN_ID] * S + text(2, seed=10)
            images = 2
        turn = torch.cat([continued.sequences, torch.tensor([next_turn])], dim=1)


@pytest.fixture(scope="module")
def first_turn(model):
    trim_ids, trim_mask = questions(1, seed=11)
    inputs = dict(input_ids=torch.tensor([prompt(3, 1, 4, seed=11)]), pixel_values=pixels(1, seed=11))
    out = model.generate(
        **inputs, trim_input_ids=trim_ids, trim_ratio=0.25, max_new_tokens=2, return_dict_in_generate=True
    )
    turn2 = torch.cat([out.sequences, torch.tensor([text(3, seed=12)])], dim=1)
    return out, dict(input_ids=turn2, pixel_values=inputs["pixel_values"], trim_input_ids=trim_ids)


def test_threads_sharing_the_model_keep_their_own_ratio(model, one):
    import threading

    expected = {mode: run_both(one, mode, max_new_tokens=4)[1] for mode in MODES}
    results, errors = {}, []

    def generate(mode, index):
        try:
            results[mode, index] = model.generate(**one.inputs(), trim_ratio=MODES[mode], max_new_tokens=4)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=generate, args=(mode, i)) for mode in MODES for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 9
    for (mode, _), sequences in results.items():
        assert torch.equal(sequences, expected[mode]), mode


def test_cache_holding_other_tokens_than_the_prompt_is_cropped_to_what_they_share(model, first_turn):
    """A re-rendered chat that does not repeat the cached answer token for token recomputes from the first change."""
    out, turn2 = first_turn
    edited = turn2["input_ids"].clone()
    answer_start = edited.shape[1] - 3 - 2  # first_turn: 2 generated tokens (the first one cached), 3 of the next turn
    edited[0, answer_start] = (edited[0, answer_start] + 1) % 1000
    inputs = {**turn2, "input_ids": edited, "trim_ratio": 0.25, "max_new_tokens": 3}
    cache, crops = copy.deepcopy(out.cache), []
    crop = cache.crop
    cache.crop = lambda tokens_to_remove: (crops.append(tokens_to_remove), crop(tokens_to_remove))
    continued = model.generate(**inputs, past_key_values=cache)
    assert crops == [-1]  # the edited first answer token is recomputed, the prompt before it reused
    assert torch.equal(continued, model.generate(**inputs))


def test_chat_through_the_processor_continues_from_the_cache():
    """The README's chat loop: each turn continued from the previous turn's cache equals a fresh run of the chat."""
    model, processor = tiny_model(seed=0), build_tiny_processor()  # LLaVA's 336 px images, as the processor makes
    image, second_image = Image.new("RGB", (200, 120), (200, 40, 40)), Image.new("RGB", (90, 160), (20, 90, 200))
    turns = [
        [{"type": "image", "image": image}, {"type": "text", "text": "What is the colour of the bus?"}],
        [{"type": "text", "text": "Where is it going?"}],
        [{"type": "image", "image": second_image}, {"type": "text", "text": "And this one?"}],
    ]
    for trim_ratio in (-1, 0.25, None):
        messages, cache = [], None
        for number, content in enumerate(turns):
            messages.append({"role": "user", "content": content})
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            options = dict(trim_ratio=trim_ratio, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            fresh = model.generate(**inputs, **options)
            continued = model.generate(**inputs, past_key_values=cache, **options) if cache is not None else fresh
            assert torch.equal(continued.sequences, fresh.sequences), f"trim_ratio={trim_ratio}, turn {number + 1}"
            answer = processor.decode(continued.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            cache = continued.past_key_values
