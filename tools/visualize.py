# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Draw which image patches TRIM keeps, over the image as the model saw it.

LLaVA-1.5 pads every image to a square with CLIP's mean colour and resizes it to 336 x 336; CLIP ViT-L/14 cuts that
into a 24 x 24 grid of 14-pixel patches, the 576 image tokens TRIM chooses from. [`draw_kept_patches`] shows one
selection: kept patches as they are, outlined, pruned patches dimmed, with the question and the count below
("121 / 576 kept"). [`draw_selection_strip`] puts several selections (for example TRIM off, automatic and fixed
ratios) side by side.

From the command line, with a converted model folder:

```bash
python -m llava_trim.tools.visualize --model path/to/llava-v1.5-7b-trim --image photo.jpg \
    --question "What is written on the sign?" --ratios auto 0.1 0.5 --output kept.png
```

Layout of a picture, for anyone reading pixels back: every panel is `panel_size` pixels square (336 x `scale`), its
top-left corner at `(index * (panel_size + gap), 0)`; patch `i` covers row `i // grid`, column `i % grid` of the
panel. Captions are below the panels.
"""

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..configuration_llava_trim import parse_trim_ratio
from ..processing_llava_trim import bounded_pad_and_resize, llava_image_processor, load_image, single_turn_messages
from .cli import command_parser, flag_value
from .loading import build_clip_image_processor

# `openai/clip-vit-large-patch14-336`'s normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pruned patches are blended towards `PRUNED_SHADE` with this opacity; kept patches keep their pixels.
PRUNED_SHADE = (0, 0, 0)
PRUNED_OPACITY = 0.7
KEPT_OUTLINE = (255, 200, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)


# ---------------------------------------------------------------------------------------------------------------------
# The image as the model sees it
# ---------------------------------------------------------------------------------------------------------------------


def default_image_processor():
    """transformers' LLaVA image processor with `openai/clip-vit-large-patch14-336`'s settings (LLaVA-1.5's)."""
    return llava_image_processor(build_clip_image_processor())


def model_view(image, image_processor=None) -> Image.Image:
    """
    `image` as the vision tower receives it: decoded as the processor decodes images, then the image processor's
    pad to a square of the mean colour, resize to 336 x 336 and normalisation, undone by [`pixel_values_to_image`].

    Args:
        image: any image the processor accepts (PIL image, array, tensor, path, ...).
        image_processor (*optional*): the model's (`processor.image_processor`); LLaVA-1.5's by default.
    """
    image_processor = image_processor if image_processor is not None else default_image_processor()
    decoded = bounded_pad_and_resize(load_image(image), image_processor)  # a large canvas: padded and resized here
    pixel_values = image_processor(decoded, return_tensors="pt")["pixel_values"][0]  # (3, 336, 336)
    return pixel_values_to_image(pixel_values, image_processor.image_mean, image_processor.image_std)


def pixel_values_to_image(
    pixel_values: torch.Tensor, image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD
) -> Image.Image:
    """Undo the processor's normalisation: `pixel_values` of shape `(3, H, W)` back to an RGB image.

    This is exactly what the vision tower received, whatever resizing or padding the processor applied.
    """
    if pixel_values.ndim != 3 or pixel_values.shape[0] != 3:
        raise ValueError(f"Expected `pixel_values` of one image, shape (3, H, W); got {tuple(pixel_values.shape)}.")
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
    pixels = (pixel_values.detach().float().cpu() * std + mean) * 255  # (3, H, W)
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(array, mode="RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of `text` to lines at most `width` pixels wide (paragraphs kept)."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _as_keep_row(keep_mask: torch.Tensor | np.ndarray | Sequence[bool]) -> tuple[np.ndarray, int]:
    """A 1-D boolean numpy keep mask and the side of its square patch grid."""
    if isinstance(keep_mask, torch.Tensor):
        keep_mask = keep_mask.detach().cpu().numpy()
    keep = np.asarray(keep_mask)
    if keep.ndim == 2 and keep.shape[0] == 1:
        keep = keep[0]
    if keep.ndim != 1 or keep.dtype != np.bool_:
        raise ValueError(
            f"Expected one image's boolean keep mask of shape (num_patches,), got {keep.dtype} of shape {keep.shape}: "
            "pass `selection.keep_mask[i]` of a `TrimSelection`."
        )
    grid = math.isqrt(keep.shape[0])
    if grid * grid != keep.shape[0]:
        raise ValueError(f"{keep.shape[0]} patches do not form a square grid; expected e.g. 576 (24 x 24).")
    return keep, grid


def format_count(num_kept: int, num_patches: int) -> str:
    """The count shown under a selection, e.g. `"121 / 576 kept"`."""
    return f"{num_kept} / {num_patches} kept"


def _draw_panel(view: Image.Image, keep: np.ndarray, grid: int, scale: int) -> Image.Image:
    """The square panel: `view` enlarged `scale` times, pruned patches dimmed, the kept region outlined."""
    size = view.width * scale
    pixels = np.asarray(view.resize((size, size), Image.Resampling.NEAREST), dtype=np.float32)  # (size, size, 3)
    # (size, size) mask of pruned pixels: patch grid -> pixels
    cell_of_pixel = np.arange(size) * grid // size
    pruned = ~keep.reshape(grid, grid)[cell_of_pixel[:, None], cell_of_pixel[None, :]]
    shade = np.asarray(PRUNED_SHADE, dtype=np.float32)
    pixels[pruned] = pixels[pruned] * (1 - PRUNED_OPACITY) + shade * PRUNED_OPACITY
    panel = Image.fromarray(pixels.round().astype(np.uint8), mode="RGB")

    # outline the kept region: a line on every side of a kept patch that borders a pruned patch or the edge
    draw = ImageDraw.Draw(panel)
    cell = size / grid
    line_width = max(1, round(cell / 10))
    kept_grid = keep.reshape(grid, grid)
    for row, col in zip(*np.nonzero(kept_grid), strict=True):
        x0, y0 = col * cell, row * cell
        x1, y1 = x0 + cell - 1, y0 + cell - 1
        if row == 0 or not kept_grid[row - 1, col]:
            draw.line([(x0, y0), (x1, y0)], fill=KEPT_OUTLINE, width=line_width)
        if row == grid - 1 or not kept_grid[row + 1, col]:
            draw.line([(x0, y1), (x1, y1)], fill=KEPT_OUTLINE, width=line_width)
        if col == 0 or not kept_grid[row, col - 1]:
            draw.line([(x0, y0), (x0, y1)], fill=KEPT_OUTLINE, width=line_width)
        if col == grid - 1 or not kept_grid[row, col + 1]:
            draw.line([(x1, y0), (x1, y1)], fill=KEPT_OUTLINE, width=line_width)
    return panel


def _caption(lines: list[tuple[str, ImageFont.ImageFont]], width: int, padding: int) -> Image.Image:
    """White block holding `lines` (text, font), each wrapped to `width`."""
    wrapped = [(part, font) for text, font in lines for part in _wrap(text, font, width - 2 * padding)]
    heights = [font.getbbox("Ag")[3] + padding // 2 for _, font in wrapped]
    block = Image.new("RGB", (width, sum(heights) + 2 * padding), BACKGROUND)
    draw = ImageDraw.Draw(block)
    y = padding
    for (text, font), height in zip(wrapped, heights, strict=True):
        draw.text((padding, y), text, fill=TEXT_COLOUR, font=font)
        y += height
    return block


def _stack(top: Image.Image, bottom: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), BACKGROUND)
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height))
    return canvas


def draw_kept_patches(
    image: Image.Image,
    keep_mask: torch.Tensor | np.ndarray | Sequence[bool],
    question: str | None = None,
    label: str | None = None,
    scale: int = 2,
    image_processor=None,
    font_size: int | None = None,
) -> Image.Image:
    """
    Draw one image's TRIM selection over the image as the model saw it.

    The image goes through [`model_view`] (padded to a square of the mean colour, resized to 336 x 336; an image
    that already is the model's view, such as [`pixel_values_to_image`]'s, comes back unchanged), then is enlarged
    `scale` times. Patch `i` of the `grid x grid` patch grid
    (24 x 24 for 576 patches) sits at row `i // grid`, column `i % grid`. Kept patches keep their pixels and the kept
    region is outlined; pruned patches are blended towards black (opacity `PRUNED_OPACITY`). Below the image: `label`
    (e.g. "TRIM auto"), the count ("121 / 576 kept") and `question`.

    Args:
        image (`PIL.Image.Image`): The original image (any size) or the model's 336 x 336 view of it.
        keep_mask (`torch.BoolTensor` of shape `(num_patches,)`): One row of `TrimSelection.keep_mask`.
        question (`str`, *optional*): The question TRIM scored the patches against.
        label (`str`, *optional*): A title for the selection, e.g. the mode.
        scale (`int`, *optional*, defaults to 2): Integer enlargement of the 336-pixel view.
        image_processor (*optional*): The model's image processor ([`model_view`]); LLaVA-1.5's by default.
        font_size (`int`, *optional*): Caption font size in pixels; defaults to 6 + 5 x `scale`.

    Returns:
        `PIL.Image.Image`: RGB picture, `336 * scale` pixels wide, the image panel at the top.
    """
    keep, grid = _as_keep_row(keep_mask)
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"`scale` must be a positive integer, got {scale!r}.")
    panel = _draw_panel(model_view(image, image_processor), keep, grid, scale)
    font_size = font_size or 6 + 5 * scale
    lines = []
    count = format_count(int(keep.sum()), keep.shape[0])
    lines.append((f"{label}: {count}" if label else count, _font(round(font_size * 1.2))))
    if question:
        lines.append((question, _font(font_size)))
    return _stack(panel, _caption(lines, panel.width, padding=font_size // 2 + 2))


def draw_selection_strip(
    image: Image.Image,
    keep_masks: Sequence[torch.Tensor | np.ndarray],
    labels: Sequence[str] | None = None,
    question: str | None = None,
    scale: int = 1,
    gap: int = 8,
    image_processor=None,
    font_size: int | None = None,
) -> Image.Image:
    """
    Several selections of the same image side by side (e.g. TRIM off, auto, 10 %, 50 %), the question below them.

    Panel `k` is [`draw_kept_patches`]'s picture of `keep_masks[k]` (with `labels[k]`, without the question), its
    top-left corner at `(k * (336 * scale + gap), 0)`.

    Args:
        image (`PIL.Image.Image`): The original image or the model's view of it.
        keep_masks (sequence of `torch.BoolTensor` of shape `(num_patches,)`): One keep mask per panel.
        labels (sequence of `str`, *optional*): One title per panel.
        question (`str`, *optional*): Shown once, under the panels.
        scale, image_processor, font_size: See [`draw_kept_patches`].
        gap (`int`, *optional*, defaults to 8): Pixels between panels.

    Returns:
        `PIL.Image.Image`: The strip.
    """
    if len(keep_masks) == 0:
        raise ValueError("`keep_masks` is empty: pass at least one selection to draw.")
    if labels is not None and len(labels) != len(keep_masks):
        raise ValueError(f"Got {len(labels)} labels for {len(keep_masks)} keep masks; pass one label per mask.")
    font_size = font_size or 6 + 5 * scale
    panels = [
        draw_kept_patches(
            image,
            mask,
            label=labels[k] if labels else None,
            scale=scale,
            image_processor=image_processor,
            font_size=font_size,
        )
        for k, mask in enumerate(keep_masks)
    ]
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    row = Image.new("RGB", (width, max(panel.height for panel in panels)), BACKGROUND)
    x = 0
    for panel in panels:
        row.paste(panel, (x, 0))
        x += panel.width + gap
    if not question:
        return row
    return _stack(row, _caption([(question, _font(font_size))], width, padding=font_size // 2 + 2))


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT: the overview and the unpadded tile grid (docs/trim.md section 8)
# ---------------------------------------------------------------------------------------------------------------------


def _draw_rect_panel(view: Image.Image, keep: np.ndarray, scale: int) -> Image.Image:
    """`view` enlarged `scale` times with the patches where `keep` (rows, columns) is False dimmed."""
    rows, columns = keep.shape
    width, height = view.width * scale, view.height * scale
    pixels = np.asarray(view.resize((width, height), Image.Resampling.NEAREST), dtype=np.float32)  # (H, W, 3)
    pruned = ~keep[(np.arange(height) * rows // height)[:, None], (np.arange(width) * columns // width)[None, :]]
    shade = np.asarray(PRUNED_SHADE, dtype=np.float32)
    pixels[pruned] = pixels[pruned] * (1 - PRUNED_OPACITY) + shade * PRUNED_OPACITY
    return Image.fromarray(pixels.round().astype(np.uint8), mode="RGB")


def anyres_views(model, pixel_values: torch.Tensor, image_size, image_processor) -> tuple[Image.Image, Image.Image]:
    """A LLaVA-NeXT image as its vision tower saw it: the 336 px overview, and the tiles put back together with the
    padding rows and columns removed (the unpadded grid whose patches TRIM chooses from besides the overview's)."""
    mean, std = image_processor.image_mean, image_processor.image_std
    layout = model.model._layouts(torch.as_tensor([list(image_size)]))[0]
    patch = model.config.vision_config.patch_size
    overview = pixel_values_to_image(pixel_values[0], mean, std)
    (tiles_high, tiles_wide), (row0, column0) = layout.tiles, layout.grid_offset
    tiles = [pixel_values_to_image(crop, mean, std) for crop in pixel_values[1 : layout.num_crops]]
    canvas = Image.new("RGB", (tiles_wide * overview.width, tiles_high * overview.height))
    for index, crop in enumerate(tiles):
        canvas.paste(crop, ((index % tiles_wide) * crop.width, (index // tiles_wide) * crop.height))
    rows, columns = layout.grid_shape
    box = (column0 * patch, row0 * patch, (column0 + columns) * patch, (row0 + rows) * patch)
    return overview, canvas.crop(box)


def draw_anyres_kept_patches(
    overview: Image.Image,
    grid_view: Image.Image,
    keep_mask: torch.Tensor | np.ndarray,
    grid_shape: tuple[int, int],
    label: str | None = None,
    question: str | None = None,
    scale: int = 1,
    gap: int = 8,
    font_size: int | None = None,
    patch_size: int = 14,
) -> Image.Image:
    """
    One LLaVA-NeXT selection: the overview (its 576 patches, raster order) beside the unpadded tile grid (its
    `H x W` patches, rows top to bottom), pruned patches dimmed, with the count ("kept / candidates") below.

    Args:
        overview, grid_view (`PIL.Image.Image`): [`anyres_views`]'s pictures.
        keep_mask (`torch.BoolTensor`): one row of `TrimSelection.keep_mask` (padding beyond the candidates ignored).
        grid_shape (`tuple[int, int]`): `(H, W)` of the unpadded grid.
        label, question, scale, gap, font_size: as for [`draw_kept_patches`].
        patch_size (`int`, *optional*, defaults to 14): pixels per patch side in the views.
    """
    keep = np.asarray(keep_mask.detach().cpu() if isinstance(keep_mask, torch.Tensor) else keep_mask, dtype=bool)
    side = overview.width // patch_size
    rows, columns = grid_shape
    overview_keep, grid_keep = keep[: side * side], keep[side * side : side * side + rows * columns]
    panels = [
        _draw_rect_panel(overview, overview_keep.reshape(side, side), scale),
        _draw_rect_panel(grid_view, grid_keep.reshape(rows, columns), scale),
    ]
    width = panels[0].width + gap + panels[1].width
    row = Image.new("RGB", (width, max(panel.height for panel in panels)), BACKGROUND)
    row.paste(panels[0], (0, 0))
    row.paste(panels[1], (panels[0].width + gap, 0))
    font_size = font_size or 6 + 5 * scale
    count = format_count(int(overview_keep.sum() + grid_keep.sum()), side * side + rows * columns)
    lines = [(f"{label}: {count}" if label else count, _font(round(font_size * 1.2)))]
    if question:
        lines.append((question, _font(font_size)))
    return _stack(row, _caption(lines, width, padding=font_size // 2 + 2))


# ---------------------------------------------------------------------------------------------------------------------
# From a model folder
# ---------------------------------------------------------------------------------------------------------------------


def setting_label(trim_ratio: float | None) -> str:
    """A short name for a TRIM mode: "TRIM off", "TRIM auto" or "TRIM 10%"."""
    if trim_ratio is None:
        return "TRIM off"
    if trim_ratio == -1:
        return "TRIM auto"
    return f"TRIM {trim_ratio * 100:g}%"


def select_for_ratios(
    model,
    processor,
    image: Image.Image,
    question: str,
    trim_ratios: Sequence[float | None],
    trim_text: str | None = None,
) -> tuple[Image.Image, list[torch.Tensor]]:
    """
    Run the processor and the model's selection (no language model) once per TRIM mode.

    Returns:
        `(view, keep_masks)`: the image exactly as the vision tower received it (from `pixel_values`) and, per mode,
        the `(num_patches,)` keep mask (`None` mode: everything kept). For LLaVA-NeXT `view` is [`anyres_views`]'s
        `(overview, grid_view)`.
    """
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    inputs = processor.apply_chat_template(single_turn_messages(question, image), trim_text=trim_text, **kwargs)
    inputs = inputs.to(model.device)
    image_processor = processor.image_processor
    if inputs["pixel_values"].ndim == 5:  # LLaVA-NeXT: the overview and the unpadded tile grid
        view = anyres_views(model, inputs["pixel_values"][0].cpu(), inputs["image_sizes"][0].tolist(), image_processor)
    else:
        view = pixel_values_to_image(inputs["pixel_values"][0], image_processor.image_mean, image_processor.image_std)
    keep_masks = []
    for trim_ratio in trim_ratios:
        selection = model.select_image_tokens(**inputs, trim_ratio=trim_ratio)
        keep_masks.append(selection.keep_mask[0].cpu())
    return view, keep_masks


EXAMPLE = """\
python -m llava_trim.tools.visualize --model llava-v1.5-7b-trim --image photo.jpg \\
    --question "What is written on the sign?" --ratios auto 0.1 0.5 --output kept.png"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "python -m llava_trim.tools.visualize",
        "Draw the image patches TRIM keeps for a question, for one or several TRIM modes, as a PNG.",
        EXAMPLE,
    )
    parser.add_argument("--model", required=True, help="Converted LLaVA-TRIM folder or Hub repository id.")
    parser.add_argument("--image", required=True, help="Image file.")
    parser.add_argument("--question", required=True, help="The question TRIM scores the patches against.")
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=flag_value(parse_trim_ratio, "trim_ratio"),
        default=[-1],
        help="TRIM modes, one panel each: 'auto' (IQR outliers), 'off', or a fraction in (0, 1]. Default: auto.",
    )
    parser.add_argument(
        "--output", default="trim_selection.png", help="Picture to write: .png (or another format Pillow writes)."
    )
    parser.add_argument("--trim-text", default=None, help="Score against this text instead of the question.")
    parser.add_argument("--scale", type=int, default=None, help="Enlargement of the 336-pixel view (default 2 or 1).")
    parser.add_argument("--device", default="auto", help="'auto' (GPU if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    extension = Path(args.output).suffix.lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        kind = f"{extension} files" if extension else "a file without an extension"
        parser.error(f"--output {args.output}: Pillow cannot write {kind}; name a .png file such as kept.png")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see `--help`."""
    from .loading import load_model_and_processor

    args = parse_args(argv)
    trim_ratios = args.ratios
    image_path = Path(args.image)
    if not image_path.is_file():
        raise SystemExit(f"--image: no such file: {image_path}")
    try:
        image = load_image(str(image_path))
    except ValueError as error:
        raise SystemExit(f"--image: {error}") from None

    if args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().is_dir():
        raise SystemExit(f"--model: no such folder: {args.model} (pass a converted LLaVA-TRIM folder or a Hub id)")
    try:
        model, processor = load_model_and_processor(args.model, device=args.device, dtype=args.dtype)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"--model: could not load {args.model!r}: {reason}") from None
    view, keep_masks = select_for_ratios(model, processor, image, args.question, trim_ratios, args.trim_text)
    labels = [setting_label(trim_ratio) for trim_ratio in trim_ratios]
    if isinstance(view, tuple):  # LLaVA-NeXT: one row per mode, the overview beside the tile grid
        grid_shape = (view[1].height // model.config.vision_config.patch_size,
                      view[1].width // model.config.vision_config.patch_size)  # fmt: skip
        rows = [draw_anyres_kept_patches(*view, mask, grid_shape, label, scale=args.scale or 1)
                for mask, label in zip(keep_masks, labels, strict=True)]  # fmt: skip
        candidates = model.config.image_seq_length + grid_shape[0] * grid_shape[1]
        picture = rows[0]
        for row in rows[1:]:
            picture = _stack(picture, row)
        picture = _stack(picture, _caption([(args.question, _font(11))], picture.width, padding=7))
    elif len(keep_masks) == 1:
        picture = draw_kept_patches(
            view, keep_masks[0], args.question, labels[0], args.scale or 2, processor.image_processor
        )
    else:
        picture = draw_selection_strip(
            view, keep_masks, labels, args.question, args.scale or 1, image_processor=processor.image_processor
        )

    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        picture.save(partial, format=Image.registered_extensions()[output.suffix.lower()])
        partial.replace(output)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise SystemExit(f"--output: cannot write {output} ({error.strerror or error})") from None
    for label, mask in zip(labels, keep_masks, strict=True):
        total = mask.shape[0] if not isinstance(view, tuple) else candidates
        print(f"{label}: {format_count(int(mask.sum()), total)}")
    print(f"Wrote {output}")
    return 0


__all__ = [
    "anyres_views",
    "default_image_processor",
    "draw_anyres_kept_patches",
    "draw_kept_patches",
    "draw_selection_strip",
    "model_view",
    "pixel_values_to_image",
    "select_for_ratios",
]


if __name__ == "__main__":
    sys.exit(main())
