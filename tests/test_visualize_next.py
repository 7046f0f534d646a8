"""tools/visualize.py on LLaVA-NeXT: the overview beside the unpadded tile grid, pruned patches dimmed as selected."""

import numpy as np
import pytest
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from llava_trim.testing_utils.tiny_next import build_tiny_next_processor, tiny_next_model
from llava_trim.tools.visualize import PRUNED_OPACITY, draw_anyres_kept_patches, main, select_for_ratios

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_next_model(seed=0), build_tiny_next_processor()


def unpadded_grid(height: int, width: int) -> tuple[int, int]:
    """LLaVA-NeXT's unpadded patch grid `(H, W)` of an image (the rule of the paper's code, written here)."""
    best_height, best_width = select_best_resolution((height, width), PINPOINTS)
    rows, columns = best_height // 14, best_width // 14
    if width / height > columns / rows:
        return rows - 2 * ((rows - int(round(height * columns / width, 7))) // 2), columns
    return rows, columns - 2 * ((columns - int(round(width * rows / height, 7))) // 2)


@pytest.mark.parametrize("width,height", [(500, 300), (200, 700)])
def test_panels_show_the_selection_over_the_overview_and_the_unpadded_grid(model_and_processor, width, height):
    model, processor = model_and_processor
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))
    (overview, grid_view), (keep,) = select_for_ratios(model, processor, image, "What is it?", [-1])
    rows, columns = unpadded_grid(height, width)
    assert overview.size == (336, 336) and grid_view.size == (columns * 14, rows * 14)
    picture = draw_anyres_kept_patches(overview, grid_view, keep, (rows, columns), gap=8)
    pixels = np.asarray(picture, dtype=np.float32)
    for view, mask, left in (
        (overview, keep[:576].view(24, 24), 0),
        (grid_view, keep[576 : 576 + rows * columns].view(rows, columns), 344),
    ):
        original = np.asarray(view, dtype=np.float32)
        drawn = pixels[: view.height, left : left + view.width]
        expected = np.where(
            np.repeat(np.repeat(mask.numpy(), 14, 0), 14, 1)[..., None], original, original * (1 - PRUNED_OPACITY)
        )
        assert np.abs(drawn - expected).max() <= 0.5  # rounding to 8 bits
    assert int(keep[576 + rows * columns :].sum()) == 0  # padding of the keep mask is never kept


def test_command_line_draws_a_next_model(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_next_model(seed=0).save_pretrained(folder)
    build_tiny_next_processor(folder)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(image)
    output = tmp_path / "kept.png"
    args = ["--model", str(folder), "--image", str(image), "--question", "Who?", "--ratios", "auto", "0.1"]
    assert main([*args, "--output", str(output), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert output.is_file() and "TRIM auto:" in printed and "/ 1536 kept" in printed  # 576 + 24 x 40 candidates
    assert Image.open(output).width == 336 + 8 + 560
