"""Property tests of the TRIM selection and the sequence compaction in modeling_llava_trim.py."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llava_trim.modeling_llava_trim import compact_image_runs, trim_image_tokens, trim_keep_mask

IMAGE, PAD, RUN = 7, 0, 5  # placeholder id, pad id, placeholders per image in these tests


@st.composite
def selections(draw):
    num_images = draw(st.integers(1, 4))
    num_patches = draw(st.integers(1, 40))
    values = draw(
        st.lists(
            st.floats(0, 1, allow_nan=False, width=32),
            min_size=num_images * num_patches,
            max_size=num_images * num_patches,
        )
    )
    probs = torch.tensor(values, dtype=torch.float64).view(num_images, num_patches)
    ratio = draw(st.one_of(st.just(-1), st.floats(0.001, 1.0)))
    scope = draw(st.sampled_from(["image", "batch"]))
    features = torch.randn(
        num_images,
        num_patches,
        3,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))),
    )
    return probs, ratio, scope, features


@settings(max_examples=200, deadline=None)
@given(selections())
def test_selection_counts_and_aggregate(case):
    probs, ratio, scope, features = case
    num_images, num_patches = probs.shape
    keep = trim_keep_mask(probs, ratio, 1.5, scope)
    counts = keep.sum(-1)
    if ratio != -1:
        assert (counts == int(np.floor(num_patches * ratio))).all()
    elif scope == "batch":
        assert (counts == counts[0]).all()  # the same count in every image
    # every kept token scores at least as high as every pruned token of its image
    for row, mask in zip(probs, keep, strict=True):
        if mask.any() and (~mask).any():
            assert row[mask].min() >= row[~mask].max()

    tokens, keep_again = trim_image_tokens(features, probs, ratio, 1.5, scope)
    assert torch.equal(keep, keep_again)
    assert tokens.shape == (int(counts.sum()) + num_images, 3)
    start = 0
    for image in range(num_images):
        kept = features[image][keep[image]]  # ascending patch order
        assert torch.equal(tokens[start : start + len(kept)], kept)
        pruned = features[image][~keep[image]]
        aggregate = pruned.mean(0) if len(pruned) else torch.zeros(3, dtype=torch.float64)
        # the same float64 mean summed in another order: within n u mean(|x|) each (u = 2**-53), plus the division
        bound = (2 * len(pruned) + 1) * 2.0**-53 * (pruned.abs().mean(0) if len(pruned) else aggregate)
        assert ((tokens[start + len(kept)] - aggregate).abs() <= bound).all()
        start += len(kept) + 1


@st.composite
def batches(draw):
    """Rows of text and image runs, padded on one side, with a target size for every image run."""
    num_rows = draw(st.integers(1, 4))
    rows, targets = [], []
    for _ in range(num_rows):
        row = []
        for _ in range(draw(st.integers(0, 3))):
            row += draw(st.lists(st.integers(8, 50), max_size=4))
            row += [IMAGE] * RUN
            targets.append(draw(st.integers(1, RUN + 1)))
        row += draw(st.lists(st.integers(8, 50), min_size=0 if row else 1, max_size=4))
        rows.append(row)
    side = draw(st.sampled_from(["left", "right"]))
    length = max(map(len, rows)) + draw(st.integers(0, 2))
    ids = torch.full((num_rows, length), PAD)
    mask = torch.zeros((num_rows, length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return rows, ids, mask, torch.tensor(targets, dtype=torch.long), side


def expected_rows(rows, targets):
    """Each row with its image runs resized to their targets, built the obvious way."""
    out, image = [], 0
    for row in rows:
        new, position = [], 0
        while position < len(row):
            if row[position] == IMAGE:
                new += [IMAGE] * int(targets[image])
                image += 1
                position += RUN
            else:
                new.append(row[position])
                position += 1
        out.append(new)
    return out


@settings(max_examples=200, deadline=None)
@given(batches())
def test_compaction_properties(case):
    rows, ids, mask, targets, side = case
    labels = ids.masked_fill(mask == 0, -100)
    out = compact_image_runs(ids, mask, targets, IMAGE, RUN, pad_token_id=PAD, labels=labels)
    expected = expected_rows(rows, targets)
    lengths = [len(row) for row in expected]
    assert out.input_ids.shape == (len(rows), max(lengths))
    had_padding = bool((mask == 0).any())
    padded_left = side == "left" or not had_padding
    for i, row in enumerate(expected):
        attended = out.attention_mask[i].bool()
        # order preserved, runs resized, nothing else changed
        assert out.input_ids[i][attended].tolist() == row
        # attention mask: one contiguous block on the side the batch came padded from
        n = len(row)
        block = (
            [0] * (out.input_ids.shape[1] - n) + [1] * n
            if padded_left
            else [1] * n + [0] * (out.input_ids.shape[1] - n)
        )
        assert out.attention_mask[i].tolist() == block
        # positions count 0.. over the attended tokens
        assert out.position_ids[i][attended].tolist() == list(range(n))
        assert (out.input_ids[i][~attended] == PAD).all()
        # labels follow the tokens, -100 on image positions and padding
        expected_labels = [-100 if token == IMAGE else token for token in row]
        assert out.labels[i][attended].tolist() == expected_labels
        assert (out.labels[i][~attended] == -100).all()
