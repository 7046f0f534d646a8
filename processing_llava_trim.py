# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Processor of LLaVA-1.5 with TRIM: LLaVA's image preprocessing, the Llama prompt and the CLIP-tokenised question.

Reading order: the `vicuna_v1` chat template, image decoding, the question of each image (the rule of `docs/trim.md`,
from chat messages or from a raw prompt), then [`LlavaTrimProcessor`] (`__call__` ties them together), and last
[`LlavaNextTrimProcessor`] for LLaVA-NeXT (its images, placeholder counts and conversations).
"""

import base64
import io
import math
import os
import re
import urllib.parse
import urllib.request
import warnings
from typing import Any, TypeAlias

import transformers

# The oldest transformers this file runs on (README: Supported versions), checked before anything else is imported
# from it: 5.24 brought the `cache` keyword that the model and generation pass around (5.20 to 5.23 load the files,
# then `generate` hands the model its cache under another name), 5.20 to 5.22 also lack the processor's
# `_normalize_conversations`, and 5.19 `SubConfigSpec`.
if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 24):
    raise ImportError(
        f"LLaVA-TRIM needs transformers >= 5.24 and found {transformers.__version__}: "
        'run `pip install -U "transformers>=5.24,<6"`.'
    )

import torch
from transformers import AddedToken, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_transforms import convert_to_rgb, to_pil_image
from transformers.image_utils import (
    ChannelDimension,
    infer_channel_dimension_format,
    is_pil_image,
    to_numpy_array,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.utils import is_numpy_array, logging

logger = logging.get_logger(__name__)

# LLaVA-1.5 trains (`--version v1`) and evaluates (`--conv-mode vicuna_v1`) with `conv_vicuna_v1`'s system sentence;
# LLaVA's `conv_llava_v1` has the same layout with another sentence (pass it as a leading system message to use it).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA-1.5's `conv_vicuna_v1` (separator style TWO: sep " ", sep2 "</s>"), for a chat whose image entries sit in the
# user turns: "{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT:".
# Content is rendered in order: an image entry becomes "<image>\n", a text entry its text. A leading system message
# replaces the default system sentence. Each answer and its closing "</s>" is a `{% generation %}` block, so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens LLaVA-1.5 trains on.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system='" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\\n') -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + render(message['content']) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- generation -%}{{- render(message['content']) + '</s>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('LLaVA-1.5 chats have user and assistant turns (and one leading system "
    "message), got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# CLIP's text tower has 77 positions.
TRIM_MAX_LENGTH = 77

# The files a CLIP tokenizer is made of (one of these sets), looked for in a saved processor's `clip_tokenizer/`.
_CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))

# A `PIL.Image.Image`. Pillow is what transformers' own image loading needs; it is imported where images are decoded.
PILImage: TypeAlias = Any

# PIL modes with more than 8 bits per sample: scaled to 8-bit grayscale before the RGB conversion.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# The most pixels (width x height) an image may have: larger ones are refused from their header, before decoding (an
# RGB image takes 3 bytes a pixel: 150 MB here). PIL's own `Image.MAX_IMAGE_PIXELS` applies too when it is lower.
MAX_IMAGE_PIXELS = 50_000_000

# LLaVA's pad-to-square builds a canvas of side max(width, height) before resizing it to 336 px. Up to this many
# canvas pixels (a 4096 x 4096 canvas, 50 MB) it is built as transformers does; beyond, only the strip of the canvas
# that the resize filter reaches is (see `bounded_pad_and_resize`).
MAX_CANVAS_PIXELS = 4096 * 4096


# ---------------------------------------------------------------------------------------------------------------------
# Images: one decoding path for every kind of input
# ---------------------------------------------------------------------------------------------------------------------


def load_image(image) -> PILImage:
    """
    Turn one image input into an upright 8-bit RGB `PIL.Image`.

    Every input goes through the same decoding: a local path (`str` or `os.PathLike`), a `file://` or `http(s)://`
    URL or a base64 string is opened with PIL as stored; a `np.ndarray` or `torch.Tensor` (HWC or CHW, uint8, uint16,
    bool or float in [0, 1]) becomes a PIL image; then, for all of them, the EXIF orientation is applied
    (`PIL.ImageOps.exif_transpose`), 16-bit and float samples are scaled to 8 bits, transparency (alpha, palette or
    colour key) is composited onto white and any other mode (palette, CMYK, grayscale, ...) converted to RGB.

    Work is bounded: an image over [`MAX_IMAGE_PIXELS`] pixels (or PIL's `Image.MAX_IMAGE_PIXELS` when lower) is
    refused from its header, before its pixels are decoded, and an animated image (GIF, APNG, WebP) gives its first
    frame, the others left undecoded.

    Raises:
        `ValueError`: when the input is not an image, cannot be decoded, has no pixels (a width or height of 0) or
            too many.
    """
    from PIL import ImageOps

    owned = not is_pil_image(image)  # a decoded copy of our own, which may be changed in place
    if isinstance(image, os.PathLike):
        image = _open_image_file(os.fspath(image), repr(os.fspath(image)))
    elif isinstance(image, str):
        image = open_image(image)
    elif isinstance(image, torch.Tensor) or is_numpy_array(image):
        image = _array_to_pil(image)
    elif not is_pil_image(image):
        raise ValueError(
            f"Unsupported image input of type {type(image).__name__}: pass a PIL.Image, a numpy array, a torch "
            "tensor, a local path, a file:// or http(s):// URL, or a base64 string."
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"The image is {image.width}x{image.height} pixels: an image needs at least one pixel.")
    check_image_pixels(image.width, image.height)
    try:
        upright = ImageOps.exif_transpose(image, in_place=owned) or image
    except Exception:  # a broken EXIF block must not make an otherwise valid image unusable
        upright = image
    return _to_rgb(upright)


def check_image_pixels(width: int, height: int) -> None:
    """Refuse an image over [`MAX_IMAGE_PIXELS`] pixels (or PIL's `Image.MAX_IMAGE_PIXELS`, when lower)."""
    from PIL import Image

    limit = min(MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise ValueError(
            f"The image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            "(`processing_llava_trim.MAX_IMAGE_PIXELS`): downscale it first."
        )


def open_image(source: str) -> PILImage:
    """
    Open one image named by a string with PIL, its first frame decoded as stored (no EXIF rotation, no conversion).

    `source` is a local path, a `file://` or `http(s)://` URL, or a base64 string (optionally a `data:image/...`
    URL). Work is bounded as in [`load_image`]: an image over [`MAX_IMAGE_PIXELS`] pixels (or PIL's limit, when
    lower) is refused from its header, a decompression bomb is refused, and only the first frame of an animated
    image is decoded. [`load_image`] calls it, then makes the image upright RGB; LLaVA's evaluation scripts want the
    stored pixels instead (`Image.open(...).convert("RGB")`).

    Raises:
        `ValueError`: when the source cannot be found, downloaded or decoded, or holds too many pixels; the message
            is one sentence naming the image.
    """
    shown = source if len(source) <= 200 else source[:200] + "..."
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                data = response.read()
        except Exception as error:
            raise ValueError(f"Could not download the image at {shown!r}: {error}") from None
    elif source.startswith("file://") or os.path.isfile(source):
        path = (
            urllib.request.url2pathname(urllib.parse.urlparse(source).path) if source.startswith("file://") else source
        )
        return _open_image_file(path, repr(shown))
    else:
        payload = source.split(",", 1)[1] if source.startswith("data:image/") else source
        try:
            data = base64.b64decode(payload, validate=True)  # only base64 characters: not a mistyped path
        except ValueError:  # `binascii.Error` is a `ValueError`
            raise ValueError(
                f"Image {shown!r} is neither an existing file, a file:// or http(s):// URL, nor a base64-encoded "
                "image."
            ) from None
    return _decode_first_frame(data, repr(shown))


def _open_image_file(path: str, shown: str) -> PILImage:
    if not os.path.isfile(path):
        raise ValueError(f"Image {shown}: no such file {path!r}.")
    with open(path, "rb") as file:
        return _decode_first_frame(file.read(), shown)


def _decode_first_frame(data: bytes, shown: str) -> PILImage:
    """
    Decode the first frame of an encoded image. Its size is read from the header and checked before any pixel is
    decoded; PIL's decompression-bomb error (and warning) is a `ValueError` too.
    """
    from PIL import Image

    with warnings.catch_warnings(), io.BytesIO(data) as buffer:  # closed once decoded: the bytes are freed
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(buffer)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"Image {shown} is refused as a decompression bomb: {error}") from None
        except (OSError, SyntaxError, ValueError, EOFError):  # PIL's `UnidentifiedImageError` is an `OSError`
            raise ValueError(_undecodable(shown)) from None
        check_image_pixels(*image.size)
        try:
            image.load()  # the current frame: the first one, just opened
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(f"Image {shown} is refused as a decompression bomb: {error}") from None
        except (OSError, SyntaxError, ValueError, EOFError):
            raise ValueError(_undecodable(shown)) from None
    return image


def _undecodable(shown: str) -> str:
    return f"Could not decode the image file {shown}: it is not an image Pillow can read (PNG, JPEG, WebP, ...)."


def _numpy_to_tensor(array) -> torch.Tensor:
    """A numpy array as a tensor: copied to native byte order and C layout, as `torch.from_numpy` needs."""
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"Cannot read an array of dtype {array.dtype} as an image: pass integers, floats or booleans."
        )
    if array.dtype.kind == "f" and array.dtype.itemsize > 8:  # long double: no torch dtype
        array = array.astype("float64")
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), order="C"))


def _array_to_pil(array) -> PILImage:
    """An HWC/CHW/HW array or tensor (uint8, uint16, bool or float in [0, 1]) as a PIL image."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()
        if array.is_complex():
            raise ValueError(f"Cannot read a tensor of dtype {array.dtype} as an image: pass real values.")
    else:
        array = _numpy_to_tensor(array)
    if array.ndim == 3 and (array.shape[0] in (1, 3, 4) or array.shape[-1] in (1, 3, 4)):
        if array.shape[0] in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
            raise ValueError(
                f"An array of shape {tuple(array.shape)} could be (C, H, W) or (H, W, C): convert it to a PIL image "
                "first (`PIL.Image.fromarray(array)` for (H, W, C) uint8)."
            )
        if infer_channel_dimension_format(array, num_channels=(1, 3, 4)) == ChannelDimension.FIRST:
            array = array.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Cannot read an array of shape {tuple(array.shape)} as an image: expected (H, W), (H, W, C) or (C, H, W) "
            "with C in (1, 3, 4)."
        )
    if array.numel() == 0:
        raise ValueError(f"The image array has shape {tuple(array.shape)}: an image needs at least one pixel.")
    if array.dtype == torch.bool:
        array = array.to(torch.uint8) * 255
    elif array.is_floating_point():
        peak = torch.nan_to_num(array, nan=float("-inf")).max()  # the largest value ignoring NaN
        scale = 255.0 if peak <= 1.0 else 1.0
        array = (torch.nan_to_num(array) * scale).clamp(0, 255).round().to(torch.uint8)
    elif array.dtype == torch.uint16:
        array = (array.to(torch.float32) / 257.0).round().to(torch.uint8)
    elif array.dtype != torch.uint8:
        array = array.to(torch.float64).clamp(0, 255).to(torch.uint8)  # float64: also clips (u)int64 exactly
    if array.ndim == 2:
        array = array[..., None]  # (H, W) -> (H, W, 1): read as mode "L"
    return to_pil_image(array.contiguous(), input_data_format=ChannelDimension.LAST)


def _high_depth_to_8bit(image: PILImage) -> PILImage:
    """A 16-bit, 32-bit integer or float PIL image as 8-bit grayscale: 16-bit samples / 257, floats in [0, 1] * 255."""
    values = _numpy_to_tensor(to_numpy_array(image)).to(torch.float64)  # (H, W)
    peak = values.max().item() if values.numel() > 0 else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        values = values / 257.0
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    gray = values.clamp(0, 255).round().to(torch.uint8)
    return to_pil_image(gray[..., None], input_data_format=ChannelDimension.LAST)  # (H, W, 1) -> mode "L"


def _to_rgb(image: PILImage) -> PILImage:
    """Any PIL mode -> 8-bit RGB; transparency is composited onto white (transformers' `convert_to_rgb`)."""
    if image.mode in _HIGH_DEPTH_MODES:
        image = _high_depth_to_8bit(image)
    if image.mode == "RGB":
        return image
    if "a" in image.getbands():  # premultiplied alpha ("La", "RGBa")
        image = image.convert("RGBA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgb = convert_to_rgb(image, return_numpy=True)  # (H, W, 3) uint8, PIL's `alpha_composite` onto white
        return to_pil_image(rgb, input_data_format=ChannelDimension.LAST)
    return image.convert("RGB")


def llava_image_processor(image_processor):
    """
    transformers' LLaVA image processor (pad to a square of the mean colour, LLaVA-1.5's `image_aspect_ratio: "pad"`,
    then resize, crop and normalise) with the settings of a CLIP image processor, on the same backend (PIL or
    torchvision). A LLaVA image processor is returned as it is.
    """
    if type(image_processor).__name__.startswith("LlavaImageProcessor"):
        return image_processor
    if not type(image_processor).__name__.startswith("CLIPImageProcessor"):
        raise ValueError(
            f"Expected a CLIP or LLaVA image processor, got {type(image_processor).__name__}: load the one saved with "
            "the model (`AutoImageProcessor.from_pretrained(folder)`)."
        )
    settings = {key: value for key, value in image_processor.to_dict().items() if key != "image_processor_type"}
    if isinstance(image_processor, PilBackend):
        return LlavaImageProcessorPil(**settings, do_pad=True)
    from transformers import LlavaImageProcessor  # the torchvision backend, like the CLIP processor given

    return LlavaImageProcessor(**settings, do_pad=True)


# Half-width of PIL's resampling filters (PIL.Image.Resampling: LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING), in pixels of
# the output; PIL widens them by the scale when it shrinks.
_FILTER_SUPPORT = {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 1.0}


def bounded_pad_and_resize(image: PILImage, image_processor) -> PILImage:
    """
    LLaVA's pad-to-square and resize of an image whose square canvas is over [`MAX_CANVAS_PIXELS`], without building
    the canvas; any other image is returned as it is (the image processor pads and resizes it).

    PIL resizes in two passes, horizontal then vertical, each rounded to 8 bits, and only reads the lines of the
    canvas within its filter's reach. So the long side is resized alone (the canvas adds no padding along it), and
    the padded side on the strip of the canvas the filter reaches around the image, with PIL's `box` placing the
    strip in the canvas; lines out of the image's reach are the padding colour. In PIL's pass order the result is
    the canvas's resize but for the float position of the strip's windows (at most 2 levels of 255; 0 to 2 measured).
    A very tall, thin image (its strip over `MAX_CANVAS_PIXELS` plus its own pixels: taller than about 22000 pixels)
    is resized vertically first instead, which changes the rounding and clipping of the 8-bit pass in between: 1
    level measured on photos, up to 19 on sharp 0/255 patterns (README, "Processor").

    Returns:
        `PIL.Image`: `image`, or its canvas resized to the image processor's square size (which it then keeps).
    """

    width, height = image.size
    side = max(width, height)
    size, resample = image_processor.size, image_processor.resample
    target = size.shortest_edge if size.shortest_edge and not size.longest_edge else None
    if size.height and size.width and size.height == size.width:
        target = size.height
    support = _FILTER_SUPPORT.get(int(resample)) if resample is not None else None
    supported = isinstance(image_processor, PilBackend) and image_processor.do_pad and image_processor.do_resize
    if side * side <= MAX_CANVAS_PIXELS or width == height or not supported or not target or support is None:
        return image
    fill = tuple(int(x * 255) for x in image_processor.image_mean or (0, 0, 0))  # transformers' padding colour
    support *= max(side / target, 1.0)  # in canvas pixels
    if width > height:  # padded vertically: the horizontal pass needs no padding
        rows = image.resize((target, height), resample)  # (target, height): the canvas's horizontal pass
        return _resize_padded_side(rows, (side - height) // 2, side, target, support, fill, resample, vertical=True)
    offset = (side - width) // 2
    first, last, low, high = _reach(offset, width, side, target, support)
    if (high - low) * height <= MAX_CANVAS_PIXELS + width * height:  # PIL's order: horizontal (padded) pass first
        columns = _resize_padded_side(image, offset, side, target, support, fill, resample, vertical=False)
        return columns.resize((target, target), resample)  # (target, target): the vertical pass
    columns = image.resize((width, target), resample)  # (width, target): the vertical pass first
    return _resize_padded_side(columns, offset, side, target, support, fill, resample, vertical=False)


def _reach(offset: int, length: int, side: int, target: int, support: float) -> tuple[int, int, int, int]:
    """
    For an image of `length` lines at `offset` in a canvas of `side` lines resized to `target`: the output lines
    `[first, last)` whose filter window reaches the image, and the canvas lines `[low, high)` those windows read.
    """
    scale = side / target
    first = max(0, math.floor((offset - support) / scale) - 1)
    last = min(target, math.ceil((offset + length + support) / scale) + 1)
    low = max(0, math.floor(first * scale - support) - 1)
    high = min(side, math.ceil(last * scale + support) + 1)
    return first, last, low, high


def _resize_padded_side(
    image: PILImage, offset: int, side: int, target: int, support: float, fill: tuple, resample, vertical: bool
) -> PILImage:
    """
    Resize the padded side of the canvas (vertical or horizontal) from `side` to `target` lines, `image` lying at
    `offset`: only the strip the filter reaches is built; lines beyond are `fill`, as PIL's resize of it gives.
    """
    from PIL import Image

    length, other = (image.height, image.width) if vertical else (image.width, image.height)
    first, last, low, high = _reach(offset, length, side, target, support)
    strip = Image.new("RGB", (other, high - low) if vertical else (high - low, other), fill)
    strip.paste(image, (0, offset - low) if vertical else (offset - low, 0))
    start, end = first * side / target - low, last * side / target - low  # the output lines, in the strip
    box = (0, start, other, end) if vertical else (start, 0, end, other)
    part = strip.resize((other, last - first) if vertical else (last - first, other), resample, box=box)
    resized = Image.new("RGB", (other, target) if vertical else (target, other), fill)
    resized.paste(part, (0, first) if vertical else (first, 0))
    return resized


# ---------------------------------------------------------------------------------------------------------------------
# The question TRIM scores each image against
# ---------------------------------------------------------------------------------------------------------------------
# The rule (docs/trim.md): an image's question is the text of the user turn that carries it, image placeholders
# removed; if that turn has no text, the text of the next user turn that has some. The selection of an image then
# stays the same for the whole chat (a cached prefix stays valid) and matches fine-tuning.


def _assign_questions(turns: list[tuple[str, int, str]]) -> list[str]:
    """
    One question per image from `(role, num_images, text)` turns in order: an image gets the text of its own user
    turn, or of the next user turn with text (empty when there is none).
    """
    questions, waiting = [], 0
    for role, num_images, text in turns:
        waiting += num_images
        if role == "user" and text:
            questions += [text] * waiting
            waiting = 0
    return questions + [""] * waiting


def questions_from_messages(messages: list[dict], image_token: str = "<image>") -> list[str]:
    """
    The TRIM question of each image of a chat, in the order the chat template places the images.

    Each `{"type": "image"}` entry (and each literal `image_token` in a text) is an image; the question is read from
    the messages themselves, so any text ("Read the sign: 'USER: admin'.") reaches TRIM whole. A leading system
    message carries no image.
    """
    turns = []
    for position, message in enumerate(messages):
        if position == 0 and message.get("role") == "system":
            continue
        content = message.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else (content or [])
        num_images, texts = 0, []
        for item in items:
            if item.get("type") == "image":
                num_images += 1
            elif item.get("type") == "text":
                text = item.get("text") or ""
                num_images += text.count(image_token)
                texts.append(text)
        turns.append((message.get("role"), num_images, _clean_question("".join(texts), image_token)))
    return _assign_questions(turns)


def single_turn_messages(question: str, image: Any = None) -> list[dict]:
    """
    The chat of one image and one question, as LLaVA-1.5 is evaluated: `processor.apply_chat_template(messages,
    add_generation_prompt=True)` renders `"{system} USER: <image>\\n{question} ASSISTANT:"`. `image` (optional)
    is put in the image entry, so that `tokenize=True` also processes it.
    """
    entry = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [entry, {"type": "text", "text": question}]}]


def questions_from_prompt(
    prompt: str,
    image_token: str = "<image>",
    special_tokens: tuple[str, ...] = (),
    user_marker: str = "USER:",
    assistant_marker: str = "ASSISTANT:",
) -> list[str]:
    """
    The TRIM question of each `image_token` of a raw prompt string, by the same rule as [`questions_from_messages`].

    A raw prompt is either LLaVA-1.5's `vicuna_v1` layout, `"[system] USER: <image>\\n{question} ASSISTANT: {answer}
    </s>USER: {question} ASSISTANT:"` (user turns start at "USER:" and end at the next "ASSISTANT:"), or text without
    role markers, all of which is the question (`"<image>\\nWhat is this?"`). A question that itself contains "USER:"
    or "ASSISTANT:" cannot be told apart from the markers: pass chat messages to `apply_chat_template`, or
    `trim_text=`. Other layouts name their markers (`user_marker="[INST]", assistant_marker="[/INST]"` for LLaVA's
    `mistral_instruct`).
    """
    for token in special_tokens:
        prompt = prompt.replace(token, "")
    if user_marker not in prompt:
        return [_clean_question(prompt, image_token)] * prompt.count(image_token)
    pieces = prompt.split(user_marker)
    turns = [("system", pieces[0].count(image_token), "")]
    for piece in pieces[1:]:
        user, _, assistant = piece.partition(assistant_marker)
        turns.append(("user", user.count(image_token), _clean_question(user, image_token)))
        turns.append(("assistant", assistant.count(image_token), ""))
    return _assign_questions(turns)


def _clean_question(text: str, image_token: str) -> str:
    return re.sub(re.escape(image_token) + r"\n?", "", text).strip()


# ---------------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------------


class _Unset:
    """Default of `__call__`'s `trim_ratio`: not given (`None` means TRIM off)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


class LlavaTrimProcessorKwargs(ProcessingKwargs, total=False):
    """The standard text / images keyword arguments (`trim_text` and `trim_ratio` are arguments of `__call__`)."""


class LlavaTrimProcessor(ProcessorMixin):
    r"""
    Processor of [`LlavaTrimForConditionalGeneration`]: LLaVA-1.5's image preprocessing and prompt, plus the question
    of each image tokenised for CLIP (TRIM's `trim_input_ids`).

    - Images are decoded by [`load_image`] (paths, URLs, base64, arrays, tensors and PIL images alike), then go
      through transformers' LLaVA image processor with `do_pad=True`: padded to a square of the CLIP mean colour
      (LLaVA-1.5's `image_aspect_ratio: "pad"`), resized, cropped and normalised (336 px). A CLIP image processor
      (what older folders and the converter hold) is turned into the LLaVA one with the same settings.
    - Each `image_token` in the text becomes `image_seq_length` placeholder ids. Text is tokenised chunk by chunk
      around the placeholders, exactly as LLaVA's `tokenizer_image_token` does.
    - `trim_input_ids` / `trim_attention_mask` hold one row per image (in `pixel_values` order): the image's question
      (the text of the user turn that carries it, or of the next user turn with text; see `docs/trim.md`),
      CLIP-tokenised, truncated and right-padded to 77 tokens. With `apply_chat_template` the question is read from
      the messages; a raw prompt string is parsed as [`questions_from_prompt`] describes. `trim_text=` overrides the
      question. An empty question is encoded as CLIP's empty text and logs a warning.
    - Padding follows the tokenizer, which the processor never changes: its `padding_side` (converted checkpoints
      save "left", for generation; pipelines batch with it too) unless a call passes `padding_side=`, and its pad
      token, or its unk token when it has none (LLaVA-1.5's choice).
    - `trim_ratio=` is passed through to the model (`generate(**inputs)`), so that pipelines accept it at the top
      level: `pipe(text=messages, trim_ratio=0.1)`.

    Args:
        image_processor ([`LlavaImageProcessorPil`] or [`CLIPImageProcessor`]): the image processor (336 px).
        tokenizer ([`LlamaTokenizer`]): the language model's tokenizer; must contain `image_token`.
        clip_tokenizer ([`CLIPTokenizer`]): the tokenizer of the CLIP text tower; saved in the `clip_tokenizer/`
            subfolder.
        chat_template (`str`, *optional*): defaults to LLaVA-1.5's `vicuna_v1` conversation.
        image_token (`str`, *optional*, defaults to `"<image>"`): the image placeholder.
        image_seq_length (`int`, *optional*, defaults to 576): placeholders per image (CLIP ViT-L/14-336 patches).

    Example:

    ```python
    >>> processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    >>> messages = [{"role": "user", "content": [{"type": "image", "path": "bus.jpg"},
    ...                                          {"type": "text", "text": "What is the colour of the bus?"}]}]
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
    ...                                        return_dict=True, return_tensors="pt")
    >>> sorted(inputs.keys())
    ['attention_mask', 'input_ids', 'pixel_values', 'trim_attention_mask', 'trim_input_ids']
    ```
    """

    valid_processor_kwargs = LlavaTrimProcessorKwargs
    _auto_class = "AutoProcessor"  # save_pretrained writes this file and `auto_map` (loaded with trust_remote_code)

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        clip_tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        image_seq_length: int = 576,
        **kwargs,
    ):
        if tokenizer is None or image_processor is None or clip_tokenizer is None:
            raise ValueError("LlavaTrimProcessor needs an `image_processor`, a `tokenizer` and a `clip_tokenizer`.")
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"`image_seq_length` must be a positive integer, got {image_seq_length!r}.")
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {image_token!r} token. Add it first: "
                f"`tokenizer.add_tokens([AddedToken({image_token!r}, special=True, normalized=False)], "
                "special_tokens=True)` and give the model the same id as `image_token_id` (the checkpoint converter "
                "does both)."
            )
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an unk token to pad with: set `pad_token`.")
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        self.pad_token_id = pad_token_id
        super().__init__(
            self._image_processor_for(image_processor),
            tokenizer,
            clip_tokenizer,
            chat_template=chat_template if chat_template is not None else VICUNA_V1_CHAT_TEMPLATE,
            **kwargs,
        )

    @classmethod
    def _load_tokenizer_from_pretrained(
        cls, sub_processor_type, pretrained_model_name_or_path, subfolder="", **kwargs
    ):
        """The CLIP tokenizer comes from `clip_tokenizer/` only: a folder without it is refused, never read instead."""
        if sub_processor_type != "clip_tokenizer":
            return super()._load_tokenizer_from_pretrained(
                sub_processor_type, pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            )
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder, "clip_tokenizer")
        if os.path.isdir(str(pretrained_model_name_or_path)):
            present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            if not any(all(name in present for name in names) for names in _CLIP_TOKENIZER_FILES):
                raise ValueError(
                    f"{folder} lacks CLIP's tokenizer files (vocab.json and merges.txt, or tokenizer.json): TRIM "
                    "needs them to tokenise its question. Convert the checkpoint again with a complete CLIP folder."
                )
        clip_subfolder = os.path.join(subfolder, "clip_tokenizer") if subfolder else "clip_tokenizer"
        try:
            return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=clip_subfolder, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load the CLIP tokenizer from {clip_subfolder}/ of {pretrained_model_name_or_path} "
                f"({error}): it needs vocab.json and merges.txt (or tokenizer.json)."
            ) from None

    # ------------------------------------------------------------------------------------------------ chat template
    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """
        transformers' `apply_chat_template`, with each image's TRIM question taken from the messages (the text of the
        user turn that carries the image, or of the next user turn with text) rather than from the rendered prompt.
        `trim_text=` and `trim_ratio=` may be given here or in `processor_kwargs`; `trim_text` overrides the questions.
        """
        if kwargs.get("tokenize"):
            processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
            for name in ("trim_text", "trim_ratio"):
                if name in kwargs:
                    processor_kwargs[name] = kwargs.pop(name)
            given = processor_kwargs.get("trim_text")
            if given is None or isinstance(given, (list, tuple)):  # `None` entries: the messages' questions
                conversations, _ = self._normalize_conversations(conversation)
                questions = [questions_from_messages(messages, self.image_token) for messages in conversations]
                if given is not None and len(given) == len(questions):
                    questions = [own if entry is None else entry for entry, own in zip(given, questions, strict=True)]
                processor_kwargs["trim_text"] = questions if given is None or len(given) == len(questions) else given
            kwargs["processor_kwargs"] = processor_kwargs
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    # ------------------------------------------------------------------------------------------------ call
    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        trim_text: str | list[str | list[str] | None] | None = None,
        trim_ratio: float | None | _Unset = UNSET,
        **kwargs,
    ) -> BatchFeature:
        """
        Prepare prompts and images for [`LlavaTrimForConditionalGeneration`].

        Args:
            images: one image, a flat list (assigned to the `image_token`s in order of appearance) or one list per
                prompt. Each image may be a `PIL.Image`, array, tensor, path, `file://`/`http(s)://` URL or base64.
            text (`str` or `list[str]`): prompts, usually from `apply_chat_template`; each `image_token` marks where
                an image goes. See [`questions_from_prompt`] for how a raw prompt gives each image its question.
            trim_text (`str` or `list`, *optional*): the question TRIM scores against: one string for all images, or
                one entry per prompt (a string, a list with one string per image, or `None` for the prompt's own).
            trim_ratio (`float` or `None`, *optional*): returned as `inputs["trim_ratio"]`, so that
                `model.generate(**inputs)` (and pipelines) use this TRIM mode: `-1` automatic, a fraction in (0, 1],
                `None` off. Not given: the model's `config.trim_ratio`.
            **kwargs: `return_tensors`, `padding`, `padding_side`, `max_length`, `truncation`, `pad_to_multiple_of`,
                `add_special_tokens`, `return_offsets_mapping`, image processor options (`images_kwargs`).

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` (batch, seq); when there are images also
            `pixel_values` (num_images, 3, 336, 336), `trim_input_ids` and `trim_attention_mask` (num_images, 77).
        """
        if videos is not None or audio is not None:
            raise ValueError("LLaVA-TRIM takes images and text only (no videos or audio).")
        if images is None and text is None:
            raise ValueError("Pass `text` (prompts with one image placeholder per image) and/or `images`.")
        output_kwargs = self._merge_kwargs(
            LlavaTrimProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        images_kwargs = output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None) or images_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        if text is None:  # images only: what the image processor gives
            return BatchFeature(self._preprocess_images(_flatten_images(images), images_kwargs), return_tensors)

        prompts = self._check_text(text)
        images_per_prompt = self._assign_images(images, prompts)
        # the tokenizer's `padding_side` (what pipelines batch with) unless this call names one
        padding_side = kwargs.get("padding_side") or kwargs.get("text_kwargs", {}).get("padding_side")
        flat_images = [image for per_prompt in images_per_prompt for image in per_prompt]
        image_data = self._preprocess_images(flat_images, images_kwargs) if flat_images else {}
        data = self._tokenize_prompts(
            prompts,
            text_kwargs,
            return_tensors,
            padding_side or self.tokenizer.padding_side,
            self._placeholder_counts(image_data, images_per_prompt),
        )
        if flat_images:
            data.update(image_data)
            data.update(self._tokenize_questions(prompts, images_per_prompt, trim_text))
        if not isinstance(trim_ratio, _Unset):
            data["trim_ratio"] = trim_ratio
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["trim_ratio"])

    def _check_text(self, text) -> list[str]:
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and all(isinstance(prompt, str) for prompt in text) and text:
            return list(text)
        if isinstance(text, (list, tuple)) and text and isinstance(text[0], dict):
            raise ValueError(
                "`text` looks like chat messages: format them with `processor.apply_chat_template(messages, "
                "add_generation_prompt=True, tokenize=True, return_dict=True)` instead of passing them as `text`."
            )
        raise ValueError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}.")

    def _assign_images(self, images, prompts: list[str]) -> list[list]:
        """Match images to the image placeholders of each prompt; any mismatch is a clear `ValueError`."""
        counts = [prompt.count(self.image_token) for prompt in prompts]
        if images is None or (isinstance(images, (list, tuple)) and all(_is_empty_list(x) for x in images)):
            if sum(counts):
                raise ValueError(
                    f"The text has {sum(counts)} {self.image_token} placeholder(s) (per prompt: {counts}) but no "
                    f"images were passed: pass one image per {self.image_token}, or remove the placeholders."
                )
            return [[] for _ in prompts]
        nested = isinstance(images, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in images)
        if nested:
            if len(images) != len(prompts):
                raise ValueError(
                    f"`images` has one list per prompt but {len(images)} lists for {len(prompts)} prompts: pass "
                    "exactly one (possibly empty) list of images per prompt, or a flat list."
                )
            per_prompt = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
            given = [len(x) for x in per_prompt]
            if given != counts:
                raise ValueError(
                    f"Each prompt needs one image per {self.image_token} placeholder: the prompts have {counts} "
                    f"placeholders but {given} images were passed. Add or remove {self.image_token} markers (the chat "
                    "template writes one per {'type': 'image'} entry) or images."
                )
            return per_prompt
        flat = _flatten_images(images)
        if len(flat) != sum(counts):
            raise ValueError(
                f"The text has {sum(counts)} {self.image_token} placeholder(s) (per prompt: {counts}) but "
                f"{len(flat)} image(s) were passed: there must be exactly one {self.image_token} per image."
            )
        per_prompt, start = [], 0
        for count in counts:
            per_prompt.append(flat[start : start + count])
            start += count
        return per_prompt

    def _image_processor_for(self, image_processor):
        """The image processor this family uses, made from the one given (see [`llava_image_processor`])."""
        return llava_image_processor(image_processor)

    def _placeholder_counts(self, image_data: dict, images_per_prompt: list[list]) -> list[list[int]]:
        """Placeholders of each image of each prompt: `image_seq_length` for LLaVA-1.5."""
        return [[self.image_seq_length] * len(images) for images in images_per_prompt]

    def _encode_prompt(
        self, prompt: str, counts: list[int], add_special_tokens: bool, return_offsets: bool
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """One prompt's ids, with `counts[i]` placeholders for its i-th image, and each id's characters."""
        ids, spans, start = [], [], 0
        for index, chunk in enumerate(prompt.split(self.image_token)):
            if index > 0:  # the placeholders stand for the image token's characters
                ids += [self.image_token_id] * counts[index - 1]
                spans += [(start, start + len(self.image_token))] * counts[index - 1]
                start += len(self.image_token)
            encoded = self.tokenizer(
                chunk,
                add_special_tokens=add_special_tokens and index == 0,
                return_offsets_mapping=return_offsets,
            )
            ids += encoded["input_ids"]
            if return_offsets:
                spans += [(start + begin, start + end) for begin, end in encoded["offset_mapping"]]
            start += len(chunk)
        return ids, spans

    def _tokenize_prompts(
        self, prompts: list[str], text_kwargs: dict, return_tensors, padding_side, counts: list[list[int]]
    ) -> dict:
        """LLaVA's `tokenizer_image_token`: tokenise the text between placeholders separately, splice in `counts`
        placeholder ids per image."""
        add_special_tokens = text_kwargs.pop("add_special_tokens", True)
        truncation = text_kwargs.pop("truncation", None)
        max_length = text_kwargs.pop("max_length", None)
        padding = text_kwargs.pop("padding", False)
        text_kwargs.pop("padding_side", None)  # merged with the tokenizer's saved settings: see `padding_side`
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        return_attention_mask = text_kwargs.pop("return_attention_mask", None)
        return_offsets = bool(text_kwargs.pop("return_offsets_mapping", False))
        text_kwargs.pop("return_text_replacement_offsets", None)  # the offsets already count the prompt's characters
        unsupported = [key for key, value in text_kwargs.items() if value and key.startswith("return_")]
        if unsupported:
            raise ValueError(f"LlavaTrimProcessor does not support {unsupported} (only input ids and attention mask).")
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")

        input_ids, offsets = [], []  # per prompt: token ids, and (start, end) characters of the prompt per token
        for prompt, prompt_counts in zip(prompts, counts, strict=True):
            ids, spans = self._encode_prompt(prompt, prompt_counts, add_special_tokens, return_offsets)
            input_ids.append(ids)
            offsets.append(spans)

        if truncation and truncation != "do_not_truncate":
            limit = max_length or self.tokenizer.model_max_length
            for row, ids in enumerate(input_ids):
                kept = slice(None, limit) if self.tokenizer.truncation_side == "right" else slice(-limit, None)
                if ids[kept].count(self.image_token_id) != ids.count(self.image_token_id):
                    raise ValueError(
                        f"Prompt {row} is {len(ids)} tokens long and `max_length={limit}` cuts its image "
                        "(its placeholders): raise `max_length` or shorten the text."
                    )
                input_ids[row], offsets[row] = ids[kept], offsets[row][kept]

        lengths = [len(ids) for ids in input_ids]
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            target = max_length or self.tokenizer.model_max_length
        elif padding in (False, None, "do_not_pad"):
            target = None
            if len(set(lengths)) > 1 and return_tensors:
                raise ValueError(
                    "The prompts have different lengths: pass `padding=True` to batch them into tensors (to "
                    "`apply_chat_template`: `processor_kwargs={'padding': True}`)."
                )
        else:
            raise ValueError(f"`padding` must be True, False, 'longest' or 'max_length', got {padding!r}.")
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        data = {"input_ids": [], "attention_mask": []}
        for ids, spans in zip(input_ids, offsets, strict=True):
            pad = max(0, (target or 0) - len(ids))
            mask = [1] * len(ids)
            if padding_side == "left":
                ids, mask, spans = [self.pad_token_id] * pad + ids, [0] * pad + mask, [(0, 0)] * pad + spans
            else:
                ids, mask, spans = ids + [self.pad_token_id] * pad, mask + [0] * pad, spans + [(0, 0)] * pad
            data["input_ids"].append(ids)
            data["attention_mask"].append(mask)
            if return_offsets:
                data.setdefault("offset_mapping", []).append(spans)
        if return_attention_mask is False:
            del data["attention_mask"]
        return data

    def _preprocess_images(self, images: list, images_kwargs: dict) -> dict:
        """Decode every image the same way ([`load_image`]), then LLaVA's image processor (pad, resize, normalise)."""
        decoded = []
        for index, image in enumerate(images):
            try:
                decoded.append(load_image(image))
            except ValueError as error:
                raise ValueError(f"Image {index} ({_describe_image(image)}): {error}") from None
        if all(  # the image processor's own canvas settings (which `bounded_pad_and_resize` reads)
            images_kwargs.get(name) is None or images_kwargs[name] == getattr(self.image_processor, name, None)
            for name in _GEOMETRY_KWARGS
        ):
            decoded = [bounded_pad_and_resize(image, self.image_processor) for image in decoded]
        outputs = self.image_processor(decoded, return_tensors="pt", **images_kwargs)
        return {"pixel_values": outputs["pixel_values"]}  # (num_images, 3, 336, 336)

    def _tokenize_questions(self, prompts: list[str], images_per_prompt: list[list], trim_text) -> dict:
        """One CLIP-tokenised question per image, in the order of `pixel_values`."""
        if trim_text is not None and not isinstance(trim_text, str):
            if not isinstance(trim_text, (list, tuple)) or len(trim_text) != len(prompts):
                raise ValueError(
                    f"`trim_text` must be a string or a list with one entry per prompt ({len(prompts)}), got "
                    f"{trim_text!r}."
                )
        special = tuple(token for token in (self.tokenizer.bos_token, self.tokenizer.eos_token) if token)
        questions = []
        for index, (prompt, images) in enumerate(zip(prompts, images_per_prompt, strict=True)):
            if not images:
                continue
            override = trim_text if isinstance(trim_text, str) or trim_text is None else trim_text[index]
            if override is None:
                per_image = self._questions_from_prompt(prompt, special)
            elif isinstance(override, str):
                per_image = [override] * len(images)
            else:
                per_image = list(override)
            if len(per_image) != len(images):
                raise ValueError(
                    f"`trim_text[{index}]` has {len(per_image)} questions for {len(images)} images: give one per "
                    "image, or a single string."
                )
            questions += per_image
        if any(not question.strip() for question in questions):
            logger.warning_once(
                "An image has an empty question (no text in its user turn or any later one): TRIM will rank its "
                "patches against CLIP's empty text. Pass `trim_text=` with a question, or generate with "
                "`trim_ratio=None`."
            )
        max_length = min(TRIM_MAX_LENGTH, self.clip_tokenizer.model_max_length)
        encoded = self.clip_tokenizer(
            questions, padding="max_length", truncation=True, max_length=max_length, padding_side="right"
        )
        return {"trim_input_ids": encoded["input_ids"], "trim_attention_mask": encoded["attention_mask"]}

    def _questions_from_prompt(self, prompt: str, special_tokens: tuple[str, ...]) -> list[str]:
        """The question of each image of a raw prompt in this processor's chat layout ([`questions_from_prompt`])."""
        return questions_from_prompt(prompt, self.image_token, special_tokens)

    # ------------------------------------------------------------------------------------------------ decoding
    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids: a list of strings for a batch (batch, seq), one string for a single sequence."""
        single = (isinstance(generated_outputs, torch.Tensor) and generated_outputs.ndim == 1) or (
            isinstance(generated_outputs, (list, tuple))
            and len(generated_outputs) > 0
            and isinstance(generated_outputs[0], int)
        )
        rows = [generated_outputs] if single else generated_outputs
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
        return texts[0] if single else texts

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "trim_input_ids", "trim_attention_mask", "trim_ratio"]


# Image processor options that change the canvas or its resize: given to a call, the canvas is built as they say.
_GEOMETRY_KWARGS = ("do_pad", "do_resize", "size", "resample", "image_mean", "do_center_crop", "crop_size")


def _describe_image(image) -> str:
    if isinstance(image, str):
        return "a string"
    shape = getattr(image, "shape", None) or getattr(image, "size", None)
    return f"{type(image).__name__} of size {tuple(shape)}" if shape is not None else type(image).__name__


def _is_empty_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 0


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    return [images]


def add_image_token(tokenizer, image_token: str = "<image>") -> int:
    """Add `image_token` to `tokenizer` as a special token (no-op when present) and return its id."""
    if tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(image_token)


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT (llava-v1.6, anyres)
# ---------------------------------------------------------------------------------------------------------------------

# LLaVA's `conv_mistral_instruct` (separator style LLAMA_2: sep "", sep2 "</s>", no default system sentence), the
# conversation of `liuhaotian/llava-v1.6-mistral-7b`:
# "[INST] <image>\n{question} [/INST] {answer} </s>[INST] {question} [/INST]".
# A leading system message goes, wrapped in "<<SYS>>\n...\n<</SYS>>\n\n", in front of the first user turn. The
# generation prompt adds nothing (the prompt already ends with "[/INST]").
MISTRAL_INSTRUCT_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system='') -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\\n') -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and ns.system -%}{{- '[INST] <<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}"
    "{%- else -%}{{- '[INST] ' -}}{%- endif -%}"
    "{{- render(message['content']) + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' -}}"
    "{%- generation -%}{{- render(message['content']) + ' </s>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- raise_exception('LLaVA chats have user and assistant turns (and one leading system "
    "message), got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# The conversation of each LLaVA-NeXT release: its chat template and the markers that open and close a user turn.
NEXT_CONVERSATIONS = {
    "vicuna_v1": (VICUNA_V1_CHAT_TEMPLATE, "USER:", "ASSISTANT:"),
    "mistral_instruct": (MISTRAL_INSTRUCT_CHAT_TEMPLATE, "[INST]", "[/INST]"),
}


def llava_next_image_processor(image_processor, image_grid_pinpoints: list | None = None):
    """
    transformers' LLaVA-NeXT image processor (the overview plus the tiles of the best of `image_grid_pinpoints`,
    `do_pad=True`) with the settings of a CLIP image processor, on the same backend. A LLaVA-NeXT image processor is
    returned as it is.
    """
    name = type(image_processor).__name__
    if name.startswith("LlavaNextImageProcessor"):
        return image_processor
    if not name.startswith("CLIPImageProcessor"):
        raise ValueError(
            f"Expected a CLIP or LLaVA-NeXT image processor, got {name}: load the one saved with the model "
            "(`AutoImageProcessor.from_pretrained(folder)`)."
        )
    from transformers.models.llava_next.configuration_llava_next import LlavaNextConfig

    settings = {key: value for key, value in image_processor.to_dict().items() if key != "image_processor_type"}
    settings["image_grid_pinpoints"] = image_grid_pinpoints or LlavaNextConfig().image_grid_pinpoints
    if isinstance(image_processor, PilBackend):
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(**settings, do_pad=True)
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(**settings, do_pad=True)


class LlavaNextTrimProcessor(LlavaTrimProcessor):
    r"""
    Processor of [`LlavaNextTrimForConditionalGeneration`]: [`LlavaTrimProcessor`] (image decoding, prompt
    tokenisation as LLaVA's `tokenizer_image_token`, each image's question for TRIM) with LLaVA-NeXT's images:

    - transformers' LLaVA-NeXT image processor: an overview and the tiles of the best `image_grid_pinpoints`
      resolution, `pixel_values` of shape `(num_images, max_crops, 3, 336, 336)` (zero-padded crops) and
      `image_sizes` `(num_images, 2)`, each image's `(height, width)`.
    - each `<image>` becomes as many placeholders as the image has positions natively (`576 + H * W + H`, as
      `LlavaNextProcessor` counts them), and the text is tokenised as `LlavaNextProcessor` does (whole).
    - `conversation`: `"vicuna_v1"` (`llava-v1.6-vicuna-*`, LLaVA-1.5's template) or `"mistral_instruct"`
      (`llava-v1.6-mistral-7b`, LLaVA's `conv_mistral_instruct`): the chat template and how a raw prompt's user turns
      are found.

    Args:
        image_processor ([`LlavaNextImageProcessorPil`] or [`CLIPImageProcessor`]): a CLIP one is turned into the
            LLaVA-NeXT one with the same settings and LLaVA-NeXT's pinpoints.
        tokenizer, clip_tokenizer, chat_template, image_token, image_seq_length: see [`LlavaTrimProcessor`].
        conversation (`str`, *optional*, defaults to `"vicuna_v1"`): the LLaVA conversation of the checkpoint.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        clip_tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        image_seq_length: int = 576,
        conversation: str = "vicuna_v1",
        **kwargs,
    ):
        if conversation not in NEXT_CONVERSATIONS:
            raise ValueError(f"`conversation` must be one of {sorted(NEXT_CONVERSATIONS)}, got {conversation!r}.")
        self.conversation = conversation
        super().__init__(
            image_processor,
            tokenizer,
            clip_tokenizer,
            chat_template=chat_template if chat_template is not None else NEXT_CONVERSATIONS[conversation][0],
            image_token=image_token,
            image_seq_length=image_seq_length,
            **kwargs,
        )

    def _image_processor_for(self, image_processor):
        return llava_next_image_processor(image_processor)

    def _preprocess_images(self, images: list, images_kwargs: dict) -> dict:
        """Decode every image ([`load_image`]), then LLaVA-NeXT's image processor: crops and sizes."""
        decoded = []
        for index, image in enumerate(images):
            try:
                decoded.append(load_image(image))
            except ValueError as error:
                raise ValueError(f"Image {index} ({_describe_image(image)}): {error}") from None
        outputs = self.image_processor(decoded, return_tensors="pt", **images_kwargs)
        return {"pixel_values": outputs["pixel_values"], "image_sizes": outputs["image_sizes"]}

    def _placeholder_counts(self, image_data: dict, images_per_prompt: list[list]) -> list[list[int]]:
        """Each image's native positions, counted as `LlavaNextProcessor` does (overview, unpadded grid, newlines)."""
        from transformers import LlavaNextProcessor

        crop = image_data["pixel_values"].shape[-1] if image_data else 0
        patch = crop // math.isqrt(self.image_seq_length) if image_data else 0
        counts = iter(
            LlavaNextProcessor._get_number_of_features(_NativeCounts(self, patch), height, width, crop, crop)
            for height, width in (image_data["image_sizes"].tolist() if image_data else [])
        )
        return [[next(counts) for _ in images] for images in images_per_prompt]

    def _encode_prompt(
        self, prompt: str, counts: list[int], add_special_tokens: bool, return_offsets: bool
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """The whole prompt tokenised at once, each image token then repeated `counts[i]` times: the ids of
        `LlavaNextProcessor` (which tokenises the expanded text; LLaVA's `tokenizer_image_token` would put a `"▁"`
        before a text that follows an image)."""
        encoded = self.tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=return_offsets)
        images = iter(counts)
        ids, spans = [], []
        for position, token in enumerate(encoded["input_ids"]):
            copies = next(images) if token == self.image_token_id else 1
            ids += [token] * copies
            if return_offsets:
                spans += [tuple(encoded["offset_mapping"][position])] * copies
        return ids, spans

    def _questions_from_prompt(self, prompt: str, special_tokens: tuple[str, ...]) -> list[str]:
        _, user, assistant = NEXT_CONVERSATIONS[self.conversation]
        prompt = re.sub(r"<<SYS>>\n.*?\n<</SYS>>\n\n", "", prompt, flags=re.DOTALL)
        return questions_from_prompt(prompt, self.image_token, special_tokens, user, assistant)

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "image_sizes"]


class _NativeCounts:
    """What `LlavaNextProcessor._get_number_of_features` reads from its processor (no CLS among the patches)."""

    def __init__(self, processor: LlavaNextTrimProcessor, patch_size: int):
        from transformers import LlavaNextProcessor

        self.image_processor, self.patch_size, self.num_additional_image_tokens = (
            processor.image_processor,
            patch_size,
            0,
        )
        self._get_unpadded_features = LlavaNextProcessor._get_unpadded_features.__get__(self)


__all__ = [
    "LLAVA_V1_SYSTEM",
    "MISTRAL_INSTRUCT_CHAT_TEMPLATE",
    "LlavaNextTrimProcessor",
    "llava_next_image_processor",
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM",
    "LlavaTrimProcessor",
    "MAX_CANVAS_PIXELS",
    "MAX_IMAGE_PIXELS",
    "add_image_token",
    "bounded_pad_and_resize",
    "check_image_pixels",
    "llava_image_processor",
    "load_image",
    "open_image",
    "questions_from_messages",
    "questions_from_prompt",
    "single_turn_messages",
]
