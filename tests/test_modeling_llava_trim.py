"""LlavaTrimForConditionalGeneration against native transformers Llava (TRIM off) and docs/trim.md section 2 (on)."""

import copy
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llava_trim.modeling_llava_trim import compact_image_runs, trim_keep_mask
from llava_trim.testing_utils.tiny import TINY_CLIP_TEXT, TINY_IMAGE_TOKEN_ID, native_llava, tiny_model
from llava_trim.tools.finetune import configure_trainable_parameters

S = 576  # image tokens per image
BOS, EOS, PAD = 1, 2, 1001


# ------------------------------------------------------------------------------------------------------------------
# Inputs and an independent reference for docs/trim.md section 2
# ------------------------------------------------------------------------------------------------------------------


def prompt(prefix_len: int, num_images: int, suffix_len: int, seed: int) -> list[int]:
    """`BOS, text..., (576 image placeholders, text...) * num_images`, with text tokens drawn from the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 900, (n,), generator=generator).tolist()  # noqa: E731
    ids = [BOS] + text(prefix_len)
    for _ in range(num_images):
        ids += [TINY_IMAGE_TOKEN_ID] * S + text(suffix_len)
    return ids


def batch(rows: list[list[int]], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into `input_ids` and `attention_mask`."""
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def questions(num: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-tokenised stand-in questions of different lengths, one per image, ending with CLIP's eos token."""
    generator = torch.Generator().manual_seed(seed)
    eos = TINY_CLIP_TEXT["eos_token_id"]
    rows = [
        [TINY_CLIP_TEXT["bos_token_id"]] + torch.randint(0, 990, (3 + i,), generator=generator).tolist() + [eos]
        for i in range(num)
    ]
    length = max(map(len, rows))
    ids = torch.full((num, length), eos)
    mask = torch.zeros((num, length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def pixels(num: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((num, 3, 336, 336), generator=torch.Generator().manual_seed(seed))


def reference_keep(probs: np.ndarray, trim_ratio: float, k: float = 1.5, scope: str = "image") -> np.ndarray:
    """docs/trim.md section 2 point 4, written with numpy: the boolean keep mask of shape (num_images, N)."""
    num_images, n = probs.shape

    def top(row: np.ndarray, count: int) -> np.ndarray:
        keep = np.zeros(n, dtype=bool)
        keep[np.argsort(-row, kind="stable")[:count]] = True
        return keep

    if trim_ratio == -1 and scope == "image":
        keep = []
        for row in probs:
            q1, q3 = np.percentile(row, [25, 75])
            keep.append(row > q3 + k * (q3 - q1))
        return np.stack(keep)
    if trim_ratio == -1:
        q1, q3 = np.percentile(probs.ravel(), [25, 75])
        count = int((probs.ravel() > q3 + k * (q3 - q1)).sum() / num_images)
    else:
        count = int(np.floor(n * trim_ratio))
    return np.stack([top(row, count) for row in probs])


@torch.no_grad()
def reference_probs(
    model, pixel_values: torch.Tensor, trim_ids: torch.Tensor, trim_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(-P . t)` from CLIP's pieces (vision tower layer -2, post_layernorm, projections), float32, and a bound
    on how far another float32 evaluation order of the projections and the dot product can move each probability.

    The vision tower and post_layernorm are the model's own modules on the same input (the same bits). The rest sums
    in another order: a float32 sum of n terms in any order is within n * u * sum(|terms|) of the exact one
    (u = 2**-24), so two orders differ by at most twice that. With A = |features| @ |W_v|^T >= |P| and
    B = |text| @ |W_t|^T >= |t|, the score error is <= 2 u (Dv + Dt + D) sum_d A_d B_d. softmax moves p_i by at most
    p_i * 2 max|score error| (its Jacobian is diag(p) - p p^T), plus its own rounding: exp, and a sum over N patches,
    in two orders, <= 2 u (N + 2) p_i.
    """
    inner = model.model
    hidden = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # (I, N, Dv)
    norm = inner.vision_tower.post_layernorm
    patches = F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    patch_embeds = patches @ inner.trim_scorer.visual_projection.weight.T  # (I, N, D)
    text = inner.trim_scorer.text_model(input_ids=trim_ids, attention_mask=trim_mask).pooler_output
    text_embeds = text @ inner.trim_scorer.text_projection.weight.T  # (I, D)
    scores = (patch_embeds * text_embeds[:, None, :]).sum(-1)
    probs = torch.softmax(-scores, dim=-1)  # (I, N)

    u = 2.0**-24
    width = patches.shape[-1] + text.shape[-1] + patch_embeds.shape[-1]  # Dv + Dt + D
    bound_p = patches.abs() @ inner.trim_scorer.visual_projection.weight.abs().T  # (I, N, D)
    bound_t = text.abs() @ inner.trim_scorer.text_projection.weight.abs().T  # (I, D)
    score_error = 2 * u * width * (bound_p * bound_t[:, None, :]).sum(-1)  # (I, N)
    prob_error = probs * (2 * score_error.amax(-1, keepdim=True) + 2 * u * (probs.shape[-1] + 2))
    return probs, prob_error


@torch.no_grad()
def hand_compacted_logits(model, native, rows, pixel_values, keep) -> list[torch.Tensor]:
    """Native Llava's language model on sequences built by hand: kept features then the mean of the pruned ones."""
    hidden = native.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    embed = native.model.language_model.get_input_embeddings()
    logits, image = [], 0
    for row in rows:
        pieces, text = [], []
        position = 0
        while position < len(row):
            if row[position] == TINY_IMAGE_TOKEN_ID:
                if text:
                    pieces.append(embed(torch.tensor(text)))
                    text = []
                kept = hidden[image][keep[image]]
                pruned = hidden[image][~keep[image]]
                mean = pruned.mean(0, keepdim=True) if len(pruned) else torch.zeros_like(hidden[image][:1])
                pieces.append(native.model.multi_modal_projector(torch.cat([kept, mean])))
                image += 1
                position += S
            else:
                text.append(row[position])
                position += 1
        if text:
            pieces.append(embed(torch.tensor(text)))
        embeds = torch.cat(pieces)[None]
        out = native.model.language_model(inputs_embeds=embeds)
        logits.append(native.lm_head(out.last_hidden_state)[0])
    return logits


# ------------------------------------------------------------------------------------------------------------------
# TRIM off: the native Llava model, exactly
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native(model):
    return native_llava(model)


# TRIM on against native Llava on hand-built sequences: the same function, summed in other orders (a batch of
# compacted rows vs one row at a time), so the comparison runs in float64. A float64 sum of n terms in any order is
# within n * 2**-53 * sum(|terms|) of the exact one: with n <= 1e3 here (positions, widths, vocabulary), 1.1e-13 of
# sum(|terms|), below 1e-10 of the result's scale while cancellation and the two layers amplify it less than 1e3x.
# A wrong token, position or feature changes the logits by far more than that (whole activations).
FLOAT64_RTOL = 1e-10


@pytest.fixture(scope="module")
def model64(model):
    """`model` in float64 (TRIM's two projections stay float32, as in every dtype: the selection is float32)."""
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def native64(model64):
    return native_llava(model64)


@pytest.mark.parametrize("rows", [[(4, 1, 6)], [(2, 1, 9), (7, 1, 3), (0, 0, 12)]], ids=["single", "left-padded"])
def test_trim_off_forward_equals_native(model, native, rows):
    token_rows = [prompt(*spec, seed=i) for i, spec in enumerate(rows)]
    input_ids, attention_mask = batch(token_rows)
    num_images = sum(spec[1] for spec in rows)
    pixel_values = pixels(num_images)
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, trim_ratio=None)
        theirs = native(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert ours.logits.shape == theirs.logits.shape
    assert torch.equal(ours.logits, theirs.logits)  # the same modules on the same tensors: the same bits
    assert ours.trim_selection.num_kept.tolist() == [S] * num_images


def test_trim_off_generate_equals_native(model, native):
    token_rows = [prompt(3, 1, 5, seed=1), prompt(9, 1, 2, seed=2)]
    input_ids, attention_mask = batch(token_rows)
    pixel_values = pixels(2)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    ours = model.generate(**kwargs, trim_ratio=None, max_new_tokens=8, do_sample=False)
    theirs = native.generate(**kwargs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)
    single = model.generate(**{k: v[:1] for k, v in kwargs.items()}, trim_ratio=None, max_new_tokens=8)
    assert torch.equal(single, native.generate(**{k: v[:1] for k, v in kwargs.items()}, max_new_tokens=8))


def test_config_off_is_native(native):
    off_model = tiny_model(seed=0, trim_ratio=None)
    input_ids, attention_mask = batch([prompt(4, 1, 6, seed=0)])
    with torch.no_grad():
        ours = off_model(input_ids=input_ids, pixel_values=pixels(1)).logits
        theirs = native(input_ids=input_ids, pixel_values=pixels(1)).logits
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------------------------------------------------
# TRIM on: the selection of docs/trim.md section 2
# ------------------------------------------------------------------------------------------------------------------


def random_probs(case: int) -> torch.Tensor:
    """Probability rows of every shape TRIM meets: peaked, flat, heavy-tailed, all equal, with ties."""
    generator = torch.Generator().manual_seed(case)
    num_images = 1 + case % 4
    kind = case % 5
    if kind == 0:  # peaked, like trained CLIP scores
        scores = torch.randn(num_images, S, generator=generator, dtype=torch.float64) * 4
    elif kind == 1:  # flat
        scores = torch.randn(num_images, S, generator=generator, dtype=torch.float64) * 0.01
    elif kind == 2:  # heavy tail: a few strong outliers
        scores = -torch.distributions.Exponential(1.0).sample((num_images, S)).double() * 3
    elif kind == 3:  # no outliers at all: every score equal
        scores = torch.zeros(num_images, S, dtype=torch.float64)
    else:  # uniform scores: IQR spans the range, nothing exceeds the fence
        scores = torch.rand(num_images, S, generator=generator, dtype=torch.float64)
    return torch.softmax(-scores, dim=-1)


RATIOS = [-1, 1.0, 0.5, 0.21, 0.1, 0.001]


@pytest.mark.parametrize("scope", ["image", "batch"])
@pytest.mark.parametrize("trim_ratio", RATIOS)
def test_keep_mask_matches_reference(trim_ratio, scope):
    checked = 0
    for case in range(40):
        probs = random_probs(case)
        ours = trim_keep_mask(probs, trim_ratio, 1.5, scope).numpy()
        expected = reference_keep(probs.numpy(), trim_ratio, 1.5, scope)
        assert (ours == expected).all(), f"case {case}"
        checked += 1
    assert checked == 40


def test_keep_mask_edge_cases():
    equal = torch.full((2, S), 1.0 / S)
    assert trim_keep_mask(equal, -1).sum() == 0  # no outliers at all
    assert trim_keep_mask(equal, -1, scope="batch").sum() == 0
    assert trim_keep_mask(random_probs(0), 1.0).all()  # every token kept
    assert trim_keep_mask(random_probs(0), 0.001).sum() == 0  # floor(576 * 0.001) = 0
    assert (trim_keep_mask(random_probs(2), 0.21).sum(-1) == 120).all()  # floor(576 * 0.21)


def test_keep_mask_hand_made():
    # one clear outlier among 8: Q1 = 0.1, Q3 = 0.1, fence 0.1: only the 0.3 exceeds it
    probs = torch.tensor([[0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1]])
    assert trim_keep_mask(probs, -1).tolist() == [[False, False, True, False, False, False, False, False]]
    # ramp 0..7: Q1 = 1.75, Q3 = 5.25, fence 5.25 + 1.5 * 3.5 = 10.5: nothing kept; with k = 0 keep 6 and 7
    ramp = torch.arange(8.0)[None]
    assert trim_keep_mask(ramp, -1).sum() == 0
    assert trim_keep_mask(ramp, -1, iqr_multiplier=0).tolist() == [[False] * 6 + [True, True]]
    # fixed: floor(8 * 0.3) = 2 largest
    assert trim_keep_mask(ramp, 0.3).tolist() == [[False] * 6 + [True, True]]
    # batch scope: 2 outliers in image 0, 0 in image 1 -> int(2 / 2) = 1 token kept in each image
    two = torch.tensor([[0.0] * 6 + [5.0, 6.0], [0.0] * 7 + [0.5]])
    assert trim_keep_mask(two, -1, scope="batch").tolist() == [[False] * 7 + [True], [False] * 7 + [True]]
    assert trim_keep_mask(two, -1, scope="image").tolist() == [[False] * 6 + [True, True], [False] * 7 + [True]]


@pytest.mark.parametrize("scope", ["image", "batch"])
@pytest.mark.parametrize("trim_ratio", [-1, 1.0, 0.21, 0.001])
def test_model_selection_matches_reference(trim_ratio, scope):
    model = tiny_model(seed=1, trim_scope=scope)
    pixel_values = pixels(3, seed=4)
    trim_ids, trim_mask = questions(3)
    selection = model.select_image_tokens(pixel_values, trim_ids, trim_mask, trim_ratio=trim_ratio)
    probs, prob_error = reference_probs(model, pixel_values, trim_ids, trim_mask)
    assert ((selection.probs - probs).abs() <= prob_error).all()
    expected = reference_keep(selection.probs.double().numpy(), trim_ratio, 1.5, scope)
    assert (selection.keep_mask.numpy() == expected).all()
    assert [idx.tolist() for idx in selection.kept_indices] == [np.flatnonzero(row).tolist() for row in expected]


@pytest.mark.parametrize("trim_ratio", [-1, 0.21, 1.0, 0.001])
def test_trim_on_logits_equal_native_on_hand_compacted_sequence(model64, native64, trim_ratio):
    rows = [prompt(3, 1, 7, seed=5), prompt(6, 2, 2, seed=6), prompt(10, 0, 4, seed=7)]
    input_ids, attention_mask = batch(rows)
    pixel_values = pixels(3, seed=8)
    trim_ids, trim_mask = questions(3)
    with torch.no_grad():
        out = model64(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            trim_input_ids=trim_ids,
            trim_attention_mask=trim_mask,
            trim_ratio=trim_ratio,
        )
    keep = out.trim_selection.keep_mask
    expected = hand_compacted_logits(model64, native64, rows, pixel_values, keep)
    lengths = out.compacted_attention_mask.sum(1).tolist()
    assert lengths == [len(e) for e in expected]
    for i, reference in enumerate(expected):
        ours = out.logits[i, -lengths[i] :]  # left padded
        assert reference.dtype == torch.float64
        assert (ours - reference).abs().max() <= FLOAT64_RTOL * reference.abs().max()
    if trim_ratio != 1.0:
        assert out.logits.shape[1] < input_ids.shape[1]


def test_generate_returns_caller_prompt_then_answer(model):
    input_ids, attention_mask = batch([prompt(4, 1, 4, seed=3)])
    trim_ids, trim_mask = questions(1)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(1))
    out = model.generate(**kwargs, trim_input_ids=trim_ids, trim_attention_mask=trim_mask, max_new_tokens=6)
    assert out.shape == (1, input_ids.shape[1] + 6)
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids)
    # the answer continues the compacted prompt exactly as forward's logits predict
    with torch.no_grad():
        first = model(**kwargs, trim_input_ids=trim_ids, trim_attention_mask=trim_mask).logits[0, -1].argmax()
    assert out[0, input_ids.shape[1]] == first
    detailed = model.generate(
        **kwargs,
        trim_input_ids=trim_ids,
        trim_attention_mask=trim_mask,
        max_new_tokens=6,
        return_dict_in_generate=True,
    )
    assert torch.equal(detailed.sequences, out)
    assert detailed.trim_selection.num_kept.shape == (1,)


def test_batch_invariance_of_generation(model):
    rows = [prompt(2, 1, 3, seed=11), prompt(12, 1, 9, seed=12), prompt(5, 1, 1, seed=13), prompt(8, 1, 20, seed=14)]
    input_ids, attention_mask = batch(rows)
    pixel_values = pixels(4, seed=15)
    trim_ids, trim_mask = questions(4)
    together = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        trim_input_ids=trim_ids,
        trim_attention_mask=trim_mask,
        max_new_tokens=8,
    )
    for i, row in enumerate(rows):
        alone = model.generate(
            input_ids=torch.tensor([row]),
            pixel_values=pixel_values[i : i + 1],
            trim_input_ids=trim_ids[i : i + 1, : int(trim_mask[i].sum())],
            max_new_tokens=8,
        )
        assert together[i, input_ids.shape[1] :].tolist() == alone[0, len(row) :].tolist(), f"row {i}"


def test_per_call_ratio_leaves_no_state_and_threads_agree(model):
    input_ids, attention_mask = batch([prompt(4, 1, 4, seed=21)])
    trim_ids, trim_mask = questions(1)
    kwargs = dict(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids, trim_attention_mask=trim_mask)
    with torch.no_grad():
        sequential = {ratio: model(**kwargs, trim_ratio=ratio).logits for ratio in (None, -1, 0.25, 0.5)}
        default = model(**kwargs).logits
    assert torch.equal(default, sequential[-1])  # the config's auto mode, untouched by the calls before
    assert model.config.trim_ratio == -1
    results = {}

    def run(ratio):
        with torch.no_grad():
            results[ratio] = model(**kwargs, trim_ratio=ratio).logits

    threads = [threading.Thread(target=run, args=(ratio,)) for ratio in sequential for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ratio, logits in sequential.items():
        assert torch.equal(results[ratio], logits)


def test_text_only_batch_and_several_images(model, native):
    rows = [prompt(5, 0, 0, seed=31), prompt(1, 3, 4, seed=32)]
    input_ids, attention_mask = batch(rows)
    trim_ids, trim_mask = questions(3)
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixels(3),
            trim_input_ids=trim_ids,
            trim_attention_mask=trim_mask,
            trim_ratio=0.1,
        )
        text_only = model(input_ids=torch.tensor([rows[0]])).logits
        text_only_native = native(input_ids=torch.tensor([rows[0]])).logits
    per_image = 57 + 1  # floor(576 * 0.1) kept + the aggregate
    assert out.compacted_attention_mask.sum(1).tolist() == [len(rows[0]), len(rows[1]) - 3 * (S - per_image)]
    assert (out.compacted_input_ids == TINY_IMAGE_TOKEN_ID).sum() == 3 * per_image
    assert torch.equal(text_only, text_only_native)


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def training_batch():
    rows = [prompt(3, 1, 12, seed=41), prompt(8, 1, 6, seed=42)]
    input_ids, attention_mask = batch(rows, padding_side="right")
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    trim_ids, trim_mask = questions(2)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixel_values=pixels(2, seed=43),
        trim_input_ids=trim_ids,
        trim_attention_mask=trim_mask,
    ), rows


def test_loss_equals_native_loss_on_hand_compacted_sequence(model64, native64):
    inputs, rows = training_batch()
    with torch.no_grad():
        out = model64(**inputs, trim_ratio=0.25)
    expected = hand_compacted_logits(model64, native64, rows, inputs["pixel_values"], out.trim_selection.keep_mask)
    # labels of the hand-built sequences: the text tokens, -100 on the image positions
    per_image = 144 + 1
    total, count = 0.0, 0
    for row, logits in zip(rows, expected, strict=True):
        labels = []
        position = 0
        while position < len(row):
            if row[position] == TINY_IMAGE_TOKEN_ID:
                labels += [-100] * per_image
                position += S
            else:
                labels.append(row[position])
                position += 1
        targets = torch.tensor(labels[1:])
        valid = targets != -100
        total += F.cross_entropy(logits[:-1][valid], targets[valid], reduction="sum").item()
        count += int(valid.sum())
    # transformers computes the loss in float32 from the (float64) logits: rounding the logits moves each token's
    # cross-entropy by <= 2 u max|z| (u = 2**-24), the log-sum-exp over V logits by <= (V + 4) u max(1, |z|), and the
    # mean over the tokens by <= (count + 2) u loss; the float64 reference is exact next to that
    u, vocab = 2.0**-24, expected[0].shape[-1]
    max_logit = max(float(logits.abs().max()) for logits in expected)
    tolerance = u * ((vocab + 6) * max(1.0, max_logit) + (count + 2) * total / count)
    assert abs(out.loss.item() - total / count) <= tolerance
    assert (out.compacted_labels[out.compacted_input_ids == TINY_IMAGE_TOKEN_ID] == -100).all()


def test_construction_leaves_every_parameter_trainable():
    model = tiny_model(seed=2)
    assert all(p.requires_grad for p in model.parameters())


def test_training_lowers_loss_with_clip_towers_frozen():
    model = tiny_model(seed=2).train()
    configure_trainable_parameters(model)  # freezing belongs to the fine-tuning setup, not to the constructor
    model.gradient_checkpointing_enable()
    inputs, _ = training_batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    named = dict(model.named_parameters())
    assert all(
        not p.requires_grad for n, p in named.items() if n.startswith(("model.vision_tower.", "model.trim_scorer."))
    )
    assert named["model.multi_modal_projector.linear_1.weight"].grad is not None
    assert named["model.language_model.layers.0.mlp.up_proj.weight"].grad is not None
    assert named["lm_head.weight"].grad is not None


# ------------------------------------------------------------------------------------------------------------------
# Save, reload in a fresh process
# ------------------------------------------------------------------------------------------------------------------


def test_save_and_reload_with_trust_remote_code_in_fresh_process(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    input_ids, _ = batch([prompt(4, 1, 4, seed=51)])
    trim_ids, trim_mask = questions(1)
    inputs = dict(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids, trim_attention_mask=trim_mask)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(model).__name__ == "LlavaTrimForConditionalGeneration"
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            logits = model(**inputs).logits
        print("MAXDIFF", (logits - expected).abs().max().item())
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split("MAXDIFF")[1]) == 0.0


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def test_image_count_must_match_placeholder_runs(model):
    input_ids, _ = batch([prompt(4, 2, 4, seed=61)])
    trim_ids, trim_mask = questions(1)
    with pytest.raises(ValueError, match=r"holds 1 image\(s\) and every image needs one run of 576"):
        model(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids)
    with pytest.raises(ValueError, match="one run of 576 placeholders"):
        model(input_ids=input_ids[:, :200], pixel_values=pixels(1), trim_input_ids=trim_ids)


def test_wrong_pixel_values_size(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=62)])
    with pytest.raises(ValueError, match=r"must have shape \(num_images, 3, 336, 336\).*AutoProcessor"):
        model(input_ids=input_ids, pixel_values=torch.randn(1, 3, 224, 224), trim_ratio=None)


@pytest.mark.parametrize("bad", [0, 1.5, -0.5, -2, "auto", True])
def test_trim_ratio_out_of_range(model, bad):
    input_ids, _ = batch([prompt(4, 1, 4, seed=63)])
    trim_ids, _ = questions(1)
    with pytest.raises(ValueError, match=r"`trim_ratio` must be None \(TRIM off\), -1"):
        model(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids, trim_ratio=bad)
    with pytest.raises(ValueError, match=r"`trim_ratio` must be None \(TRIM off\), -1"):
        model(input_ids=input_ids[:, :3], trim_ratio=bad)  # checked also without an image
    with pytest.raises(ValueError, match=r"`trim_ratio` must be None \(TRIM off\), -1"):
        model.generate(input_ids=input_ids[:, :3], trim_ratio=bad, max_new_tokens=1)


def test_missing_question_tokens(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=64)])
    with pytest.raises(ValueError, match="pass `trim_input_ids`.*or pass `trim_ratio=None`"):
        model(input_ids=input_ids, pixel_values=pixels(1))
    with pytest.raises(ValueError, match="one CLIP-tokenised question per image"):
        model(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=questions(2)[0])


def test_compaction_pads_on_the_side_it_came_from():
    right_ids = torch.tensor([[5, 9, 9, 9, 6, 0, 0], [4, 9, 9, 9, 6, 7, 8]])
    right = compact_image_runs(right_ids, (right_ids != 0).long(), torch.tensor([1, 2]), 9, 3)
    assert right.input_ids.tolist() == [[5, 9, 6, 0, 0, 0], [4, 9, 9, 6, 7, 8]]
    assert right.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert right.position_ids.tolist() == [[0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4, 5]]
    left_ids = torch.tensor([[0, 0, 5, 9, 9, 9, 6], [4, 9, 9, 9, 6, 7, 8]])
    left = compact_image_runs(left_ids, (left_ids != 0).long(), torch.tensor([1, 2]), 9, 3)
    assert left.input_ids.tolist() == [[0, 0, 0, 5, 9, 6], [4, 9, 9, 6, 7, 8]]
    assert left.position_ids.tolist() == [[0, 0, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]]


def test_defaults_for_device_maps_and_attention(model):
    assert model.config._attn_implementation == "sdpa"
    assert model.model.language_model.config._attn_implementation == "sdpa"
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(model._no_split_modules)


def test_beam_search_and_several_return_sequences_keep_the_callers_prompt(model):
    input_ids, attention_mask = batch([prompt(4, 1, 4, seed=71), prompt(2, 1, 1, seed=72)])
    trim_ids, trim_mask = questions(2)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels(2),
        trim_input_ids=trim_ids,
        trim_attention_mask=trim_mask,
    )
    out = model.generate(**kwargs, max_new_tokens=4, num_beams=2, num_return_sequences=2)
    assert out.shape[0] == 4
    assert torch.equal(out[:, : input_ids.shape[1]], input_ids.repeat_interleave(2, dim=0))


def test_placeholders_without_pixel_values(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=81)])
    with pytest.raises(ValueError, match="hold image placeholder tokens but no `pixel_values` were given"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="hold image placeholder tokens but no `pixel_values` were given"):
        model.generate(input_ids=input_ids, max_new_tokens=2)


def test_unattended_placeholders(model):
    input_ids, attention_mask = batch([prompt(4, 1, 4, seed=82)])
    attention_mask[0, 10] = 0  # inside the image's run
    with pytest.raises(ValueError, match="`attention_mask` is 0 on image placeholder tokens"):
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(1), trim_ratio=None)


def test_placeholder_run_split_by_text(model):
    input_ids = torch.tensor([[BOS, 5, 6] + [TINY_IMAGE_TOKEN_ID] * 300 + [7, 8] + [TINY_IMAGE_TOKEN_ID] * 276 + [9]])
    with pytest.raises(ValueError, match=r"placeholders of image\(s\) \[0\] are split by other tokens"):
        model(input_ids=input_ids, pixel_values=pixels(1), trim_ratio=None)


def test_bad_pixel_values(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=83)])
    with pytest.raises(ValueError, match=r"got \(3, 336, 336\)\. For a single image add the batch dimension"):
        model(input_ids=input_ids, pixel_values=pixels(1)[0], trim_ratio=None)
    broken = pixels(2)
    broken[1, 0, 5, 5] = float("nan")
    input_ids, _ = batch([prompt(4, 2, 4, seed=83)])
    with pytest.raises(ValueError, match=r"`pixel_values` of image\(s\) \[1\] hold NaN or infinite values"):
        model(input_ids=input_ids, pixel_values=broken, trim_ratio=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda ids, mask: (ids[0], mask),
            r"must be 2-D \(num_images, length\), got shape \(\d+,\).*trim_input_ids\[None\]",
        ),
        (lambda ids, mask: (ids.float(), mask), "must hold integer token ids .* got dtype torch.float32"),
        (lambda ids, mask: (ids + 5000, mask), r"ids outside the CLIP text tower's vocabulary \[0, 1000\)"),
        (lambda ids, mask: (ids, torch.cat([mask, mask])), "`trim_attention_mask` has shape .* but `trim_input_ids`"),
    ],
    ids=["1-D", "float", "out-of-vocabulary", "mask-rows"],
)
def test_bad_question_tokens(model, change, message):
    input_ids, _ = batch([prompt(4, 1, 4, seed=84)])
    trim_ids, trim_mask = change(*questions(1))
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids, trim_attention_mask=trim_mask)


def test_numpy_and_tensor_ratios_are_accepted(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=85)])
    trim_ids, trim_mask = questions(1)
    kwargs = dict(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids, trim_attention_mask=trim_mask)
    with torch.no_grad():
        expected = model(**kwargs, trim_ratio=0.5).logits
        assert torch.equal(model(**kwargs, trim_ratio=np.float32(0.5)).logits, expected)
        assert torch.equal(model(**kwargs, trim_ratio=np.float64(0.5)).logits, expected)


# ------------------------------------------------------------------------------------------------------------------
# TRIM settings: validated at every entry
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(trim_ratio=2), "`trim_ratio` must be None"),
        (dict(trim_ratio=0), "`trim_ratio` must be None"),
        (dict(trim_ratio=float("nan")), "`trim_ratio` must be None"),
        (dict(trim_iqr_multiplier=-5), "`trim_iqr_multiplier` must be a finite number >= 0"),
    ],
)
def test_from_pretrained_validates_settings(model, tmp_path_factory, setting, message):
    from transformers.modeling_utils import PreTrainedModel  # noqa: F401 (loads the same class as users do)

    folder = tmp_path_factory.getbasetemp() / "saved-for-settings"
    if not folder.exists():
        model.save_pretrained(folder)
    with pytest.raises(Exception, match=message):
        type(model).from_pretrained(folder, **setting)


def test_config_assignment_is_validated(model):
    with pytest.raises(Exception, match="`trim_ratio` must be None"):
        model.config.trim_ratio = 5
    with pytest.raises(Exception, match="`trim_iqr_multiplier` must be a finite number >= 0"):
        model.config.trim_iqr_multiplier = -5
    assert (model.config.trim_ratio, model.config.trim_iqr_multiplier) == (-1, 1.5)


def test_run_time_checks_the_multiplier_and_save_leaves_no_folder(tmp_path):
    broken = tiny_model(seed=0)
    broken.config.__dict__["trim_iqr_multiplier"] = -5.0  # bypasses the setter, as a hand-edited object would
    input_ids, _ = batch([prompt(4, 1, 4, seed=86)])
    with pytest.raises(ValueError, match="`trim_iqr_multiplier` must be a finite number >= 0"):
        broken(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=questions(1)[0])
    with pytest.raises(Exception, match="`trim_iqr_multiplier` must be a finite number >= 0"):
        broken.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# Native API shapes
# ------------------------------------------------------------------------------------------------------------------


def test_return_dict_false_gives_a_tuple(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=87)])
    trim_ids, _ = questions(1)
    with torch.no_grad():
        as_dict = model(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids)
        as_tuple = model(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.logits)


def test_generate_takes_the_prompt_as_inputs(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=88)])
    kwargs = dict(pixel_values=pixels(1), trim_input_ids=questions(1)[0], max_new_tokens=3)
    expected = model.generate(input_ids=input_ids, **kwargs)
    assert torch.equal(model.generate(inputs=input_ids, **kwargs), expected)
    assert torch.equal(model.generate(input_ids, **kwargs), expected)
    with pytest.raises(ValueError, match="Pass the prompt once: as `inputs` or as `input_ids`"):
        model.generate(input_ids, input_ids=input_ids, **kwargs)


def test_vision_feature_layer_per_call_as_native(model, native):
    input_ids, _ = batch([prompt(4, 1, 4, seed=89)])
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pixels(1), trim_ratio=None, vision_feature_layer=-1).logits
        theirs = native(input_ids=input_ids, pixel_values=pixels(1), vision_feature_layer=-1).logits
        default = model(input_ids=input_ids, pixel_values=pixels(1), trim_ratio=None).logits
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, default)
    with pytest.raises(ValueError, match=r"selects 2 layer\(s\) but the projector reads 1"):
        model(input_ids=input_ids, pixel_values=pixels(1), trim_ratio=None, vision_feature_layer=[-2, -1])


def test_refused_arguments(model):
    input_ids, _ = batch([prompt(4, 1, 4, seed=90)])
    trim_ids, _ = questions(1)
    kwargs = dict(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids)
    with pytest.raises(ValueError, match="`image_sizes` is not used by LLaVA-1.5"):
        model(**kwargs, image_sizes=torch.tensor([[336, 336]]))
    with pytest.raises(ValueError, match="`position_ids` cannot follow the compacted sequence when TRIM is on"):
        model(**kwargs, position_ids=torch.arange(input_ids.shape[1])[None])
    with pytest.raises(ValueError, match="`inputs_embeds` with `pixel_values` is supported by `forward` with TRIM"):
        model(pixel_values=pixels(1), inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="either `pixel_values` or precomputed `mm_encoder_outputs`, not both"):
        model(**kwargs, mm_encoder_outputs={"image": None})
    with torch.no_grad():
        cache = model(**kwargs, use_cache=True).cache
    with pytest.raises(ValueError, match="`forward` with `pixel_values` and a non-empty cache is not supported"):
        model(**kwargs, past_key_values=cache)
    with pytest.raises(TypeError, match="trim_raito"):
        model.select_image_tokens(pixel_values=pixels(1), trim_input_ids=trim_ids, trim_raito=0.5)


def test_get_image_features_applies_trim(model):
    trim_ids, trim_mask = questions(2)
    with torch.no_grad():
        out = model.get_image_features(
            pixels(2), trim_input_ids=trim_ids, trim_attention_mask=trim_mask, trim_ratio=0.25
        )
        full = model.get_image_features(pixels(2), trim_ratio=None)
    assert [tuple(f.shape) for f in out.pooler_output] == [(144 + 1, 64)] * 2
    assert out.trim_selection.num_kept.tolist() == [144, 144]
    assert [len(f) for f in full.pooler_output] == [S, S]


def test_projections_stay_float32_under_casts():
    model = tiny_model(seed=3)
    scorer = model.model.trim_scorer
    weights = {name: p.detach().clone() for name, p in scorer.named_parameters() if "projection" in name}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)):
        cast(model)
        assert model.model.language_model.embed_tokens.weight.dtype != torch.float32
        for name, weight in weights.items():
            assert torch.equal(scorer.get_parameter(name), weight), name
