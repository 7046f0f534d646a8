"""Tests of `llava_trim.tools.visualize`: the picture marks exactly the patches TRIM keeps."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from llava_trim.processing_llava_trim import single_turn_messages
from llava_trim.tools.loading import load_model_and_processor
from llava_trim.tools.visualize import (
    PRUNED_OPACITY,
    draw_kept_patches,
    draw_selection_strip,
    format_count,
    main,
    model_view,
    pixel_values_to_image,
)

GRID, PATCH = 24, 14  # CLIP ViT-L/14 at 336 px
PAD_COLOUR = (122, 116, 104)  # CLIP's mean colour in 0-255 (int(mean * 255)): LLaVA-1.5 pads with it


def patch_palette() -> tuple[Image.Image, np.ndarray]:
    """A 336 x 336 image whose 576 patches are each one bright colour (every channel >= 100); and those colours."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    colours = np.stack([100 + (rows * 37) % 150, 100 + (cols * 53) % 150, 100 + ((rows + cols) * 29) % 150], axis=1)
    pixels = np.repeat(np.repeat(colours.reshape(GRID, GRID, 3), PATCH, axis=0), PATCH, axis=1)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB"), colours


def centre_pixels(picture: Image.Image, panel_left: int, panel_size: int) -> np.ndarray:
    """(576, 3) pixel colours at the patch centres of the panel whose top-left corner is (panel_left, 0)."""
    array = np.asarray(picture.convert("RGB")).astype(int)
    cell = panel_size / GRID
    centres = ((np.arange(GRID) + 0.5) * cell).astype(int)
    return array[centres[:, None], panel_left + centres[None, :]].reshape(GRID * GRID, 3)


def marked_as_kept(centres: np.ndarray, original: np.ndarray) -> set[int]:
    """Patches whose centre shows the original colour; every other patch must show it dimmed."""
    kept = np.all(centres == original, axis=1)
    dimmed = np.abs(centres - original * (1 - PRUNED_OPACITY)) <= 1
    assert np.all(dimmed[~kept]), "a patch is neither kept (original colour) nor pruned (dimmed)"
    return set(np.nonzero(kept)[0].tolist())


def random_mask(num_kept: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(GRID * GRID, dtype=torch.bool)
    mask[torch.randperm(GRID * GRID, generator=generator)[:num_kept]] = True
    return mask


def test_model_view_pads_with_the_mean_colour_and_resizes():
    image = Image.new("RGB", (200, 100), (255, 0, 0))  # wide: bands above and below
    view = model_view(image)
    assert view.size == (336, 336)
    pixels = np.asarray(view)
    assert tuple(pixels[5, 168]) == PAD_COLOUR
    assert tuple(pixels[330, 168]) == (122, 116, 104)
    assert tuple(pixels[168, 5]) == (255, 0, 0)


@pytest.mark.parametrize("scale", [1, 2])
def test_draw_kept_patches_marks_exactly_the_kept_patches(scale):
    image, colours = patch_palette()
    mask = random_mask(121, seed=scale)
    picture = draw_kept_patches(image, mask, question="What is on the table?", label="TRIM auto", scale=scale)

    panel = 336 * scale
    assert picture.width == panel and picture.height > panel  # caption below the image
    marked = marked_as_kept(centre_pixels(picture, 0, panel), colours)
    assert marked == set(mask.nonzero().squeeze(1).tolist())
    assert format_count(int(mask.sum()), mask.numel()) == "121 / 576 kept"


def test_draw_kept_patches_accepts_a_selection_row_and_numpy():
    image, colours = patch_palette()
    keep_mask = torch.stack([random_mask(10, seed=0), random_mask(300, seed=1)])  # like TrimSelection.keep_mask
    picture = draw_kept_patches(image, keep_mask[1].numpy(), scale=1)
    assert marked_as_kept(centre_pixels(picture, 0, 336), colours) == set(keep_mask[1].nonzero().squeeze(1).tolist())
    nothing = draw_kept_patches(image, np.zeros(576, dtype=bool), scale=1)
    assert marked_as_kept(centre_pixels(nothing, 0, 336), colours) == set()


def test_draw_kept_patches_pads_a_non_square_image():
    tall = Image.new("RGB", (168, 336), (250, 250, 250))  # pads 84 px (6 patch columns) left and right
    mask = torch.zeros(576, dtype=torch.bool)
    mask[0] = True  # top-left patch: padding
    mask[12] = True  # top row, middle: image
    centres = centre_pixels(draw_kept_patches(tall, mask, scale=1), 0, 336)
    assert tuple(centres[0]) == PAD_COLOUR
    assert tuple(centres[12]) == (250, 250, 250)
    assert np.all(np.abs(centres[1] - np.array(PAD_COLOUR) * (1 - PRUNED_OPACITY)) <= 1)


def test_selection_strip_places_each_selection_side_by_side():
    image, colours = patch_palette()
    masks = [torch.ones(576, dtype=torch.bool), random_mask(57, seed=3), random_mask(288, seed=4)]
    strip = draw_selection_strip(image, masks, ["off", "10%", "50%"], question="Where is the cat?", scale=1, gap=8)
    assert strip.width == 3 * 336 + 2 * 8
    for index, mask in enumerate(masks):
        marked = marked_as_kept(centre_pixels(strip, index * (336 + 8), 336), colours)
        assert marked == set(mask.nonzero().squeeze(1).tolist())


def test_bad_masks_are_refused():
    image, _ = patch_palette()
    with pytest.raises(ValueError, match="square grid"):
        draw_kept_patches(image, torch.ones(575, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean keep mask"):
        draw_kept_patches(image, torch.ones(576))
    with pytest.raises(ValueError, match="one label per mask"):
        draw_selection_strip(image, [torch.ones(576, dtype=torch.bool)], ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------------
# With a tiny model folder
# ---------------------------------------------------------------------------------------------------------------------


def drawn_photo(size=(300, 200)) -> Image.Image:
    """A bright, non-square picture (no dark pixel, so dimmed patches always differ from kept ones)."""
    image = Image.new("RGB", size, (235, 235, 210))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 30, 140, 150), fill=(230, 60, 60))
    draw.rectangle((170, 60, 280, 170), fill=(70, 110, 240))
    return image


def test_pixel_values_give_back_the_padded_view(model_dir):
    _, processor = load_model_and_processor(str(model_dir), device="cpu")
    image = drawn_photo()
    inputs = processor(images=[image], text=["<image>\nWhat is red?"], return_tensors="pt")
    view = np.asarray(pixel_values_to_image(inputs["pixel_values"][0]))
    assert view.shape == (336, 336, 3)
    assert np.array_equal(view, np.asarray(model_view(image, processor.image_processor)))
    assert np.array_equal(view, np.asarray(model_view(image)))  # LLaVA-1.5's image processor by default
    assert np.array_equal(np.asarray(model_view(Image.fromarray(view))), view)  # the view is its own view


def test_cli_marks_the_patches_the_model_keeps(model_dir, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    drawn_photo().save(image_path)
    output = tmp_path / "out" / "strip.png"
    question = "What colour is the circle?"
    ratios = ["auto", "0.1", "off"]
    code = main(
        ["--model", str(model_dir), "--image", str(image_path), "--question", question, "--ratios", *ratios]
        + ["--output", str(output), "--scale", "1", "--device", "cpu"]
    )
    assert code == 0 and output.is_file()
    printed = capsys.readouterr().out
    assert "TRIM 10%: 57 / 576 kept" in printed and "TRIM off: 576 / 576 kept" in printed

    # what the model keeps, computed here directly
    model, processor = load_model_and_processor(str(model_dir), device="cpu")
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    inputs = processor.apply_chat_template(single_turn_messages(question, str(image_path)), **kwargs)
    view = np.asarray(pixel_values_to_image(inputs["pixel_values"][0])).astype(int)
    view_centres = centre_pixels(Image.fromarray(view.astype(np.uint8)), 0, 336)

    picture = Image.open(output)
    assert picture.format == "PNG" and picture.width == 3 * 336 + 2 * 8
    counts = []
    for index, trim_ratio in enumerate([-1, 0.1, None]):
        kept = model.select_image_tokens(**inputs, trim_ratio=trim_ratio).kept_indices[0]
        marked = marked_as_kept(centre_pixels(picture, index * (336 + 8), 336), view_centres)
        assert marked == set(kept.tolist())
        counts.append(len(kept))
    assert 0 < counts[0] < 576 and counts[1:] == [57, 576]


def test_cli_single_ratio_and_bad_input(model_dir, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    drawn_photo((200, 200)).save(image_path)
    output = tmp_path / "auto.png"
    assert main(["--model", str(model_dir), "--image", str(image_path), "--question", "Is it blue?"]
                + ["--output", str(output), "--device", "cpu"]) == 0  # fmt: skip
    assert Image.open(output).width == 672  # one panel at scale 2
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--image", str(image_path), "--question", "q", "--ratios", "1.5"])
    assert "argument --ratios: '1.5' is not a trim_ratio" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):
        main(["--model", str(model_dir), "--image", str(tmp_path / "missing.png"), "--question", "q"])


@pytest.mark.parametrize("problem", ["corrupt image", "missing model", "text output"])
def test_cli_bad_input_is_one_line_without_traceback(model_dir, tmp_path, problem):
    image_path = tmp_path / "photo.png"
    model, output = str(model_dir), tmp_path / ("out.txt" if problem == "text output" else "out.png")
    if problem == "corrupt image":
        image_path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    else:
        drawn_photo((40, 40)).save(image_path)
    if problem == "missing model":
        model = str(tmp_path / "no-such-model")
    completed = subprocess.run(
        [sys.executable, "-m", "llava_trim.tools.visualize", "--model", model, "--image", str(image_path)]
        + ["--question", "q", "--output", str(output), "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode != 0 and "Traceback" not in completed.stderr
    assert not output.exists()
    message = completed.stderr.strip().splitlines()
    if problem == "text output":  # refused with argparse's usage line before anything is loaded
        assert message[-1].endswith(
            "--output " + str(output) + ": Pillow cannot write .txt files; name a .png file such as kept.png"
        ), completed.stderr
        return
    assert len(message) == 1, completed.stderr
    assert message[0].startswith("--image:" if problem == "corrupt image" else "--model:")
