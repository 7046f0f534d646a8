"""LlavaNextTrimForConditionalGeneration against native transformers LLaVA-NeXT (TRIM off) and docs/trim.md
section 8 (on), with an independent float64 reference of the spec written here."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from test_modeling_llava_trim import questions
from transformers.image_processing_utils import select_best_resolution

from llava_trim.configuration_llava_trim import LlavaNextTrimConfig
from llava_trim.modeling_llava_trim import LlavaTrimImageOutput
from llava_trim.testing_utils.tiny import TINY_IMAGE_TOKEN_ID
from llava_trim.testing_utils.tiny_next import native_llava_next, tiny_next_model

N, SIDE, CROP, PATCH = 576, 24, 336, 14
BOS, PAD = 1, 1001
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# (height, width): wide, tall, square, very wide, very tall, small: each best pinpoint and unpadding direction
SIZES = [(300, 500), (700, 200), (336, 336), (500, 2000), (1500, 330), (60, 90)]
# float32 logits of the same float32 operations in another order or batch shape: a few ulps of the largest logit per
# reduction (hidden size 64, two layers), far below the 1e-5 the issue asks for
LOGITS_TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_next_model(seed=0)


@pytest.fixture(scope="module")
def native(model):
    return native_llava_next(model)


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------


def unpadded_grid(height: int, width: int) -> tuple[int, int, int, int, tuple[int, int]]:
    """The unpadded patch grid of an image, from the LLaVA-NeXT paper's rule (written here, float64): the image is
    scaled into the best pinpoint, centred, and rows/columns that are only padding are dropped. Returns `(H, W,
    first_row, first_column, (tiles_high, tiles_wide))`."""
    best_height, best_width = select_best_resolution((height, width), PINPOINTS)
    rows, columns = best_height // PATCH, best_width // PATCH
    if width / height > columns / rows:
        new_rows = int(round(height * columns / width, 7))
        pad = (rows - new_rows) // 2
        return rows - 2 * pad, columns, pad, 0, (best_height // CROP, best_width // CROP)
    new_columns = int(round(width * rows / height, 7))
    pad = (columns - new_columns) // 2
    return rows, columns - 2 * pad, 0, pad, (best_height // CROP, best_width // CROP)


def positions(height: int, width: int) -> int:
    grid_rows, grid_columns, *_ = unpadded_grid(height, width)
    return N + grid_rows * grid_columns + grid_rows


def prompts(sizes: list[tuple[int, int]], seed: int) -> list[list[int]]:
    """One prompt per image: BOS, text, the image's placeholders, text."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, (height, width) in enumerate(sizes):
        text = torch.randint(3, 900, (4 + 3 * index,), generator=generator).tolist()
        rows.append([BOS] + text[:2] + [TINY_IMAGE_TOKEN_ID] * positions(height, width) + text[2:])
    return rows


def batch(rows: list[list[int]], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def pixels(sizes: list[tuple[int, int]], seed: int = 0) -> torch.Tensor:
    """Random crops, zero beyond each image's crop count (as the processor pads)."""
    pixel_values = torch.randn((len(sizes), 5, 3, CROP, CROP), generator=torch.Generator().manual_seed(seed))
    for index, (height, width) in enumerate(sizes):
        *_, (tiles_high, tiles_wide) = unpadded_grid(height, width)
        pixel_values[index, 1 + tiles_high * tiles_wide :] = 0
    return pixel_values


def inputs_for(sizes, seed=0, padding_side="left"):
    input_ids, attention_mask = batch(prompts(sizes, seed), padding_side)
    trim_ids, trim_mask = questions(len(sizes), seed)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixels(sizes, seed),
        "image_sizes": torch.tensor(sizes),
        "trim_input_ids": trim_ids,
        "trim_attention_mask": trim_mask,
    }


# ------------------------------------------------------------------------------------------------------------------
# An independent reference of docs/trim.md section 8 (numpy / float64 from CLIP's and the projector's weights)
# ------------------------------------------------------------------------------------------------------------------


def reference_keep(probs: np.ndarray, trim_ratio: float, k: float = 1.5) -> np.ndarray:
    """Section 2 point 4 over one image's candidates."""
    if trim_ratio == -1:
        q1, q3 = np.percentile(probs, [25, 75])
        return probs > q3 + k * (q3 - q1)
    keep = np.zeros(len(probs), dtype=bool)
    keep[np.argsort(-probs, kind="stable")[: int(np.floor(len(probs) * trim_ratio))]] = True
    return keep


@torch.no_grad()
def reference_candidates(native, pixel_values, sizes):
    """Per image: `V` of the candidates in native order (float64) and the grid shape, from the native vision tower."""
    out = []
    for image, (height, width) in zip(pixel_values, sizes, strict=True):
        grid_rows, grid_columns, row0, column0, (tiles_high, tiles_wide) = unpadded_grid(height, width)
        crops = image[: 1 + tiles_high * tiles_wide]
        hidden = native.model.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:].double()
        tiles = hidden[1:].reshape(tiles_high, tiles_wide, SIDE, SIDE, -1).permute(0, 2, 1, 3, 4)
        grid = tiles.reshape(tiles_high * SIDE, tiles_wide * SIDE, -1)[
            row0 : row0 + grid_rows, column0 : column0 + grid_columns
        ]
        out.append((torch.cat([hidden[0], grid.reshape(grid_rows * grid_columns, -1)]), (grid_rows, grid_columns)))
    return out


@torch.no_grad()
def reference_probs(model, candidates: torch.Tensor, trim_ids: torch.Tensor, trim_mask: torch.Tensor) -> np.ndarray:
    """`softmax(-P . t)` over one image's candidates, float64."""
    inner = model.model
    norm = inner.vision_tower.post_layernorm
    patches = F.layer_norm(
        candidates, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps
    )  # (M, Dv)
    patch_embeds = patches @ inner.trim_scorer.visual_projection.weight.double().T
    pooled = inner.trim_scorer.text_model(input_ids=trim_ids[None], attention_mask=trim_mask[None]).pooler_output
    text_embed = pooled.double()[0] @ inner.trim_scorer.text_projection.weight.double().T
    return torch.softmax(-(patch_embeds @ text_embed), dim=0).numpy()


@torch.no_grad()
def reference_features(native, candidates, grid_shape, keep: np.ndarray) -> torch.Tensor:
    """Section 8 points 4 to 6 from native LLaVA-NeXT's pieces: kept tokens in native order, a newline after each grid
    row that keeps something, then the projected mean of the pruned candidates (float64)."""
    projector = native.model.multi_modal_projector
    project = lambda x: F.linear(  # noqa: E731
        F.gelu(F.linear(x, projector.linear_1.weight.double(), projector.linear_1.bias.double())),
        projector.linear_2.weight.double(),
        projector.linear_2.bias.double(),
    )
    newline = native.model.image_newline.double()[None]
    keep = torch.from_numpy(keep)
    pieces = [project(candidates[:N][keep[:N]])]
    grid_rows, grid_columns = grid_shape
    grid, grid_keep = candidates[N:].view(grid_rows, grid_columns, -1), keep[N:].view(grid_rows, grid_columns)
    for row in range(grid_rows):
        if grid_keep[row].any():
            pieces += [project(grid[row][grid_keep[row]]), newline]
    pruned = candidates[~keep]
    mean = pruned.mean(0, keepdim=True) if len(pruned) else torch.zeros_like(candidates[:1])
    return torch.cat(pieces + [project(mean)])


# ------------------------------------------------------------------------------------------------------------------
# TRIM off: native LLaVA-NeXT
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_off_logits_equal_native_llava_next(model, native, padding_side):
    inputs = inputs_for(SIZES[:3], seed=1, padding_side=padding_side)
    ours = model(**inputs, trim_ratio=None)
    theirs = native(**{k: v for k, v in inputs.items() if not k.startswith("trim_")})
    assert ours.logits.shape == theirs.logits.shape
    assert torch.equal(ours.compacted_input_ids, inputs["input_ids"])
    mask = inputs["attention_mask"].bool()
    assert (ours.logits - theirs.logits)[mask].abs().max() <= LOGITS_TOL
    assert ours.trim_selection.tokens_per_image.tolist() == [positions(*size) for size in SIZES[:3]]


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES)
def test_off_image_features_equal_native_for_every_aspect_ratio(model, native, size):
    pixel_values, image_sizes = pixels([size]), torch.tensor([size])
    ours = model.model.get_image_features(pixel_values, trim_ratio=None, image_sizes=image_sizes).pooler_output
    theirs = native.model.get_image_features(pixel_values, image_sizes).pooler_output
    assert len(ours) == len(theirs) == 1 and ours[0].shape == (positions(*size), 64)
    assert (ours[0] - theirs[0]).abs().max() <= LOGITS_TOL


@torch.no_grad()
def test_off_greedy_tokens_equal_native(model, native):
    inputs = inputs_for(SIZES[:2], seed=2)
    native_inputs = {k: v for k, v in inputs.items() if not k.startswith("trim_")}
    ours = model.generate(**inputs, trim_ratio=None, max_new_tokens=6, do_sample=False)
    theirs = native.generate(**native_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_off_with_inputs_embeds_and_vision_outputs_as_native(model, native):
    """TRIM off keeps native LLaVA-NeXT's contracts: `inputs_embeds` with `pixel_values`, and `get_image_features`
    returning the vision tower's hidden states when asked."""
    inputs = inputs_for(SIZES[:2], seed=3)
    embeds = native.get_input_embeddings()(inputs["input_ids"])
    common = {"attention_mask": inputs["attention_mask"], "pixel_values": inputs["pixel_values"]}
    common["image_sizes"] = inputs["image_sizes"]
    ours = model(inputs_embeds=embeds, **common, trim_ratio=None).logits
    theirs = native(inputs_embeds=embeds, **common).logits
    assert (ours - theirs)[inputs["attention_mask"].bool()].abs().max() <= LOGITS_TOL
    pixel_values, image_sizes = inputs["pixel_values"], inputs["image_sizes"]
    mine = model.model.get_image_features(
        pixel_values, trim_ratio=None, image_sizes=image_sizes, output_hidden_states=True
    )
    reference = native.model.get_image_features(pixel_values, image_sizes, output_hidden_states=True)
    assert len(mine.hidden_states) == len(reference.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(mine.hidden_states, reference.hidden_states, strict=True))
    assert torch.equal(mine.last_hidden_state, reference.last_hidden_state)


def test_other_grid_pinpoints_follow_the_config():
    """The best resolution is chosen over the configured pinpoints, as native LLaVA-NeXT does."""
    pinpoints = [[336, 336 * 3], [336 * 2, 336 * 2]]
    model = tiny_next_model(seed=3, image_grid_pinpoints=pinpoints)
    native = native_llava_next(model)
    pixel_values, image_sizes = pixels([(300, 500)]), torch.tensor([(300, 500)])
    with torch.no_grad():
        ours = model.model.get_image_features(pixel_values, trim_ratio=None, image_sizes=image_sizes).pooler_output
        theirs = native.model.get_image_features(pixel_values, image_sizes).pooler_output
    assert ours[0].shape == theirs[0].shape and (ours[0] - theirs[0]).abs().max() <= LOGITS_TOL
    assert model.model.max_candidates == N + 48 * 48


# ------------------------------------------------------------------------------------------------------------------
# TRIM on: the selection and the features against the reference
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("trim_ratio", [-1, 0.05, 0.3, 1.0])
def test_selection_and_features_follow_the_spec(model, native, trim_ratio):
    inputs = inputs_for(SIZES, seed=4)
    outputs = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["trim_input_ids"],
        inputs["trim_attention_mask"],
        trim_ratio,
        image_sizes=inputs["image_sizes"],
    )
    selection = outputs.trim_selection
    candidates = reference_candidates(native, inputs["pixel_values"], SIZES)
    for index, (image_candidates, grid_shape) in enumerate(candidates):
        count = len(image_candidates)
        probs = reference_probs(
            model, image_candidates, inputs["trim_input_ids"][index], inputs["trim_attention_mask"][index]
        )
        model_probs = selection.probs[index, :count].double().numpy()
        # log p = -s - log Z: float32 scores (sums of a few dozen products) carry an error of some ulps of the score
        # spread, so |log p32 - log p64| <= 64 float32 eps times (1 + spread); the tiny model's spread is ~20 nats
        spread = np.log(probs.max()) - np.log(probs.min())
        assert (model_probs > 0).all()  # no float32 underflow: every candidate has a rank
        assert np.abs(np.log(model_probs) - np.log(probs)).max() <= 64 * 2**-23 * (1 + spread)
        assert selection.probs[index, count:].eq(0).all() and not selection.keep_mask[index, count:].any()
        keep = selection.keep_mask[index, :count].numpy()
        # the rule on the model's own probabilities is exact; on the float64 ones it may differ only at the boundary
        assert np.array_equal(keep, reference_keep(model_probs, trim_ratio))
        differ = keep != reference_keep(probs, trim_ratio)
        boundary = probs[reference_keep(probs, trim_ratio)].min() if keep.any() else probs.max()
        assert np.allclose(probs[differ], boundary, rtol=1e-4), "a candidate away from the threshold changed sides"
        expected = reference_features(native, image_candidates, grid_shape, keep)
        assert outputs.pooler_output[index].shape == expected.shape
        assert (outputs.pooler_output[index].double() - expected).abs().max() <= 1e-4
        rows_kept = int(torch.from_numpy(keep[N:]).view(grid_shape).any(dim=1).sum())
        assert selection.num_newlines[index] == rows_kept
        assert selection.tokens_per_image[index] == keep.sum() + rows_kept + 1
        assert selection.candidates_per_image[index] == count == positions(*SIZES[index]) - grid_shape[0]
        if trim_ratio != -1:
            assert keep.sum() == int(np.floor(count * trim_ratio))


@torch.no_grad()
def test_forward_runs_the_language_model_on_the_compacted_sequence(model, native):
    """The logits of a TRIM call equal native LLaVA-NeXT's language model on the hand-built compacted sequence."""
    inputs = inputs_for(SIZES[:2], seed=5)
    outputs = model(**inputs, trim_ratio=0.1)
    features = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["trim_input_ids"],
        inputs["trim_attention_mask"],
        0.1,
        image_sizes=inputs["image_sizes"],
    )
    expected = native(
        input_ids=outputs.compacted_input_ids,
        attention_mask=outputs.compacted_attention_mask,
        mm_encoder_outputs={"image": features},
    ).logits
    mask = outputs.compacted_attention_mask.bool()
    assert (outputs.logits - expected)[mask].abs().max() <= LOGITS_TOL
    runs = (outputs.compacted_input_ids == TINY_IMAGE_TOKEN_ID).sum(dim=1)
    assert runs.tolist() == outputs.trim_selection.tokens_per_image.tolist()


@torch.no_grad()
def test_generate_is_native_generation_on_the_trimmed_prompt(model, native):
    inputs = inputs_for(SIZES[:2], seed=6)
    ours = model.generate(**inputs, trim_ratio=-1, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    compacted = model(**inputs, trim_ratio=-1)
    features = model.model.get_image_features(
        inputs["pixel_values"],
        inputs["trim_input_ids"],
        inputs["trim_attention_mask"],
        -1,
        image_sizes=inputs["image_sizes"],
    )
    theirs = native.generate(
        input_ids=compacted.compacted_input_ids,
        attention_mask=compacted.compacted_attention_mask,
        mm_encoder_outputs={"image": LlavaTrimImageOutput(pooler_output=features.pooler_output)},
        max_new_tokens=5,
        do_sample=False,
    )
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(ours.sequences[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(ours.sequences[:, prompt_length:], theirs[:, compacted.compacted_input_ids.shape[1] :])
    assert torch.equal(ours.trim_selection.keep_mask, features.trim_selection.keep_mask)


# ------------------------------------------------------------------------------------------------------------------
# Batches, calls and threads
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_an_image_gets_the_same_tokens_alone_and_in_a_batch(model):
    inputs = inputs_for(SIZES[:3], seed=7)
    together = model(**inputs, trim_ratio=-1)
    for index in range(3):
        alone_inputs = {
            "input_ids": inputs["input_ids"][index : index + 1][:, inputs["attention_mask"][index].bool()],
            "pixel_values": inputs["pixel_values"][index : index + 1],
            "image_sizes": inputs["image_sizes"][index : index + 1],
            "trim_input_ids": inputs["trim_input_ids"][index : index + 1],
            "trim_attention_mask": inputs["trim_attention_mask"][index : index + 1],
        }
        alone = model(**alone_inputs, trim_ratio=-1)
        assert torch.equal(alone.trim_selection.keep_mask[0], together.trim_selection.keep_mask[index])
        row_mask = together.compacted_attention_mask[index].bool()
        assert torch.equal(alone.compacted_input_ids[0], together.compacted_input_ids[index][row_mask])
        assert (alone.logits[0] - together.logits[index][row_mask]).abs().max() <= LOGITS_TOL


@torch.no_grad()
def test_per_call_ratio_leaves_no_state_and_threads_agree(model):
    inputs = inputs_for(SIZES[:2], seed=8)
    ratios = [None, -1, 0.05, 0.5]
    sequential = {ratio: model(**inputs, trim_ratio=ratio).logits for ratio in ratios}
    assert model.config.trim_ratio == -1
    results, errors = {}, []

    def run(ratio):
        try:
            results.setdefault(ratio, []).append(model(**inputs, trim_ratio=ratio).logits)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(ratio,)) for ratio in ratios for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for ratio in ratios:
        assert all(torch.equal(logits, sequential[ratio]) for logits in results[ratio])


@torch.no_grad()
def test_select_image_tokens_takes_processor_outputs(model):
    inputs = inputs_for(SIZES[:2], seed=9)
    selection = model.select_image_tokens(**inputs, trim_ratio=0.2)
    expected = model(**inputs, trim_ratio=0.2).trim_selection
    assert torch.equal(selection.keep_mask, expected.keep_mask)
    assert selection.keep_mask.shape == (2, model.model.max_candidates)


# ------------------------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_one_sentence(model):
    inputs = inputs_for(SIZES[:1], seed=10)
    with pytest.raises(ValueError, match="needs `image_sizes`"):
        model(**{**inputs, "image_sizes": None})
    with pytest.raises(ValueError, match=r"\(num_images, num_crops, 3, 336, 336\)"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, 0]})
    with pytest.raises(ValueError, match="needs 5 crops"):
        model(**{**inputs, "image_sizes": torch.tensor([[1000, 1000]]), "pixel_values": inputs["pixel_values"][:, :3]})
    with pytest.raises(ValueError, match="image placeholder tokens per row"):
        model(**{**inputs, "image_sizes": torch.tensor([[700, 200]])})
    with pytest.raises(StrictDataclassError, match="must be 'image' for LLaVA-NeXT"):
        LlavaNextTrimConfig(trim_scope="batch")
    config = LlavaNextTrimConfig()
    with pytest.raises(StrictDataclassError, match="must be 'image' for LLaVA-NeXT"):
        config.trim_scope = "batch"
        config.validate()


# ------------------------------------------------------------------------------------------------------------------
# The generation contract: a chat continued from the cache equals a fresh run; a cache of another question is refused
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("trim_ratio", [None, -1, 0.1])
def test_chat_continued_from_the_cache_equals_a_fresh_run(model, trim_ratio):
    sizes = [(300, 500), (700, 200)]
    inputs = inputs_for(sizes, seed=11)
    generator = torch.Generator().manual_seed(11)
    text = lambda n: torch.randint(3, 900, (1, n), generator=generator)  # noqa: E731
    turn = torch.tensor([prompts(sizes[:1], seed=11)[0]])
    cache, images = None, 1
    for number in range(3):
        call = dict(
            input_ids=turn,
            pixel_values=inputs["pixel_values"][:images],
            image_sizes=inputs["image_sizes"][:images],
            trim_input_ids=inputs["trim_input_ids"][:images],
            trim_attention_mask=inputs["trim_attention_mask"][:images],
            trim_ratio=trim_ratio,
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
        )
        fresh = model.generate(**call)
        continued = model.generate(**call, cache=cache) if cache is not None else fresh
        assert torch.equal(continued.sequences, fresh.sequences), f"turn {number + 1}"
        cache = continued.cache
        next_turn = text(4)
        if number == 1:  # the third turn brings a second image of another size
            next_turn = torch.cat([next_turn, torch.full((1, positions(*sizes[1])), TINY_IMAGE_TOKEN_ID), text(2)], 1)
            images = 2
        turn = torch.cat([continued.sequences, next_turn], dim=1)


@torch.no_grad()
def test_cache_of_another_question_gives_the_fresh_run(model):
    """A cache built under another question (another selection, here also other image lengths) is reused only up to
    the first position that differs: the call returns what it returns without the cache (docs/trim.md section 5)."""
    inputs = inputs_for(SIZES[:1], seed=12)
    first = model.generate(**inputs, trim_ratio=0.1, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    second = {**inputs, "input_ids": torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], dim=1)}
    second["attention_mask"] = torch.ones_like(second["input_ids"])
    other = questions(1, seed=99)
    second.update(trim_input_ids=other[0], trim_attention_mask=other[1])
    fresh = model.generate(**second, trim_ratio=0.1, max_new_tokens=3, do_sample=False)
    continued = model.generate(**second, trim_ratio=0.1, cache=first.cache, max_new_tokens=3, do_sample=False)
    assert torch.equal(continued, fresh)
    assert not torch.equal(
        model.select_image_tokens(**second, trim_ratio=0.1).keep_mask,
        model.select_image_tokens(**inputs, trim_ratio=0.1).keep_mask,
    )  # the question did change the selection: the test can fail
