# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Processor of LLaVA-1.5 with TRIM: CLIP image preprocessing, the Llama prompt and the CLIP-tokenised question.

Reading order: the `vicuna_v1` chat template, image loading and LLaVA-1.5's pad-to-square, question extraction, then
[`LlavaTrimProcessor`] (`__call__` ties the three together).
"""

import base64
import os
import re
import urllib.parse
import urllib.request
from typing import Any, TypeAlias

import torch
from transformers import AddedToken
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb, to_pil_image
from transformers.image_utils import ChannelDimension, is_pil_image, to_numpy_array
from transformers.image_utils import load_image as transformers_load_image
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
# replaces the default system sentence.
VICUNA_V1_CHAT_TEMPLATE = (
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
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('LLaVA-1.5 chats have user and assistant turns (and one leading system "
    "message), got role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- ' ' -}}{%- else -%}{{- '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# CLIP's text tower has 77 positions.
TRIM_MAX_LENGTH = 77

# Images whose padded square is more than this many times the model's input size are first shrunk by an integer
# factor with a box filter (as PIL's `reducing_gap` does), so that a 10000x20 strip never builds a 10000x10000 canvas.
_MAX_DOWNSCALE_BEFORE_REDUCE = 8
_REDUCING_GAP = 3

# A `PIL.Image.Image`. This file does not import PIL: images are made by transformers' helpers (`load_image`,
# `to_pil_image`, `convert_to_rgb`) and otherwise handled through their own methods (`convert`, `transpose`, ...).
PILImage: TypeAlias = Any

# EXIF orientation tag -> the `PIL.Image.Transpose` value that turns the stored pixels upright (FLIP_LEFT_RIGHT = 0,
# FLIP_TOP_BOTTOM = 1, ROTATE_90 = 2, ROTATE_180 = 3, ROTATE_270 = 4, TRANSPOSE = 5, TRANSVERSE = 6).
_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_ORIENTATION_TO_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}
_XMP_ORIENTATION_PATTERNS = (r'tiff:Orientation="([0-9])"', r"<tiff:Orientation>([0-9])</tiff:Orientation>")

# PIL modes with more than 8 bits per sample: scaled to 8-bit grayscale before the RGB conversion.
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def load_image(image) -> PILImage:
    """
    Turn one image input into an RGB `PIL.Image` upright according to its EXIF orientation.

    Accepts a `PIL.Image` of any mode (grayscale, RGBA and palette with transparency are composited onto white, CMYK
    converted, 16-bit and float images scaled to 8 bits), a `np.ndarray` or `torch.Tensor` (HWC or CHW, uint8, uint16,
    bool or float in [0, 1]), a local path, a `file://` URL, an `http(s)://` URL or a base64 string. Paths, URLs and
    base64 strings are decoded by transformers' `load_image` (EXIF orientation applied, then PIL's plain
    `convert("RGB")`): transparent pixels of such files keep their stored colour, 16-bit samples saturate and a
    broken EXIF block makes the file undecodable. Open such files yourself and pass the `PIL.Image` instead.

    Raises:
        `ValueError`: when the input is not an image or the file cannot be decoded.
    """
    if isinstance(image, str):
        return _to_rgb(_open_image_source(image))  # already upright and RGB
    if isinstance(image, torch.Tensor) or is_numpy_array(image):
        return _to_rgb(_array_to_pil(image))  # a new image: no EXIF
    if not is_pil_image(image):
        raise ValueError(
            f"Unsupported image input of type {type(image).__name__}: pass a PIL.Image, a numpy array, a torch "
            "tensor, a local path, a file:// or http(s):// URL, or a base64 string."
        )
    return _to_rgb(_exif_transpose(image))


def _open_image_source(source: str) -> PILImage:
    """Decode a path, file URL, http(s) URL or base64 string with transformers' `load_image` (upright, RGB)."""
    shown = source if len(source) <= 200 else source[:200] + "..."
    if source.startswith(("http://", "https://")):
        try:
            return transformers_load_image(source)
        except Exception as error:
            raise ValueError(f"Could not load the image at {shown!r}: {error}") from None
    if source.startswith("file://"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    else:
        path = source
    if os.path.isfile(path):
        try:
            return transformers_load_image(path)
        except (OSError, SyntaxError, ValueError) as error:  # PIL's `UnidentifiedImageError` is an `OSError`
            raise ValueError(
                f"Could not decode the image file {path!r} ({error}). Pass a valid image file (PNG, JPEG, WebP, ...)."
            ) from None
    payload = source.split(",", 1)[1] if source.startswith("data:image/") else source
    try:
        base64.b64decode(payload, validate=True)  # only base64 characters: not a mistyped path
        return transformers_load_image(payload)
    except (OSError, SyntaxError, ValueError):  # `binascii.Error` is a `ValueError`
        raise ValueError(
            f"Image {shown!r} is neither an existing file, a file:// or http(s):// URL, nor a base64-encoded image."
        ) from None


def _exif_transpose(image: PILImage) -> PILImage:
    """
    A copy of `image` turned upright by its EXIF orientation, the orientation tag removed so that loading the result
    again does not turn it twice (as PIL's `ImageOps.exif_transpose`). A broken EXIF block leaves `image` as it is.
    """
    try:
        image.load()
        method = _EXIF_ORIENTATION_TO_TRANSPOSE.get(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
        if method is None:
            return image.copy()
        upright = image.transpose(method)
        exif = upright.getexif()
        if _EXIF_ORIENTATION_TAG in exif:
            del exif[_EXIF_ORIENTATION_TAG]
            if "exif" in upright.info:
                upright.info["exif"] = exif.tobytes()
            elif "Raw profile type exif" in upright.info:
                data = exif.tobytes()
                upright.info["Raw profile type exif"] = f"\nexif\n{len(data):8}\n{data.hex()}\n"
            for key in ("XML:com.adobe.xmp", "xmp"):
                if key not in upright.info:
                    continue
                value = upright.info[key]
                for pattern in _XMP_ORIENTATION_PATTERNS:
                    value = (
                        re.sub(pattern, "", value) if isinstance(value, str) else re.sub(pattern.encode(), b"", value)
                    )
                upright.info[key] = value
        return upright
    except Exception:  # a broken EXIF block must not make an otherwise valid image unusable
        return image


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
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.numel() == 0:
        raise ValueError(
            f"Cannot read an array of shape {tuple(array.shape)} as an image: expected (H, W), (H, W, C) or (C, H, W) "
            "with C in (1, 3, 4)."
        )
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


def expand_to_square(image: PILImage, background_color: tuple[int, int, int], target_size: int) -> PILImage:
    """
    LLaVA-1.5's `image_aspect_ratio: "pad"`: centre the (RGB) image on a square canvas of its longer side filled with
    `background_color` (the CLIP mean colour). Images more than 8x larger than `target_size` are first shrunk by an
    integer box filter so that the canvas stays small; the result then still downsamples at least 3x.
    """
    width, height = image.size
    side = max(width, height)
    if side > _MAX_DOWNSCALE_BEFORE_REDUCE * target_size:
        factor = side // (_REDUCING_GAP * target_size)
        image = image.reduce(factor)
        width, height = image.size
        side = max(width, height)
    if width == height:
        return image
    # A new image of the square's size and the image's mode (`crop` beyond the borders), painted with the background
    # colour; then the image is pasted in the middle. Its `info` is dropped, as for a fresh image: the CLIP processor
    # would otherwise composite an RGB colour key (`info["transparency"]`) onto white.
    canvas = image.crop((0, 0, side, side))
    canvas.info = {}
    canvas.paste(background_color, (0, 0, side, side))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


# ---------------------------------------------------------------------------------------------------------------------
# The question TRIM scores against
# ---------------------------------------------------------------------------------------------------------------------


def extract_question(prompt: str, image_token: str = "<image>", special_tokens: tuple[str, ...] = ()) -> str:
    """
    The text of the last user turn of a prompt, without image placeholders: what TRIM embeds with CLIP.

    Works on `vicuna_v1` prompts ("... USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:" gives "q2") and on
    bare prompts without role markers ("<image>\\nWhat is this?" gives "What is this?").
    """
    start = prompt.rfind("USER:")
    question = prompt[start + len("USER:") :] if start >= 0 else prompt
    end = question.find("ASSISTANT:")
    if end >= 0:
        question = question[:end]
    question = re.sub(re.escape(image_token) + r"\n?", "", question)
    for token in special_tokens:
        question = question.replace(token, "")
    return question.strip()


# ---------------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------------


class LlavaTrimProcessorKwargs(ProcessingKwargs, total=False):
    """The standard text / images keyword arguments (`trim_text` is an argument of `__call__`)."""


class LlavaTrimProcessor(ProcessorMixin):
    r"""
    Processor of [`LlavaTrimForConditionalGeneration`]: LLaVA-1.5's image preprocessing and prompt, plus the question
    of each image tokenised for CLIP (TRIM's `trim_input_ids`).

    - Images are padded to a square filled with the CLIP mean colour (LLaVA-1.5's `image_aspect_ratio: "pad"`), then
      go through the CLIP image processor (336 px). Any PIL mode, arrays, tensors, paths and URLs are accepted.
    - Each `image_token` in the text becomes `image_seq_length` placeholder ids. Text is tokenised chunk by chunk
      around the placeholders, exactly as LLaVA's `tokenizer_image_token` does.
    - `trim_input_ids` / `trim_attention_mask` hold one row per image (in `pixel_values` order): the text of the last
      user turn with the placeholders removed, CLIP-tokenised, truncated and right-padded to 77 tokens (CLIP's
      length; the padding is invisible to CLIP's causal text tower, and fixed-size rows batch by concatenation).
      `trim_text=` overrides the question. An empty question is encoded as CLIP's empty text (start and end tokens
      only) and logs a warning: TRIM then ranks patches against an empty query, so pass `trim_text=` or generate with
      `trim_ratio=None` for prompts without a question.
    - Batches are padded on the left (for generation) unless `padding_side="right"` is passed.

    Args:
        image_processor ([`CLIPImageProcessor`]): the CLIP image processor (336 px for LLaVA-1.5).
        tokenizer ([`LlamaTokenizer`]): the language model's tokenizer; must contain `image_token`. A tokenizer
            without a pad token pads with its unk token, as LLaVA-1.5 did.
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
        if tokenizer.pad_token is None:
            if tokenizer.unk_token is None:
                raise ValueError("The tokenizer has neither a pad nor an unk token to pad with: set `pad_token`.")
            tokenizer.pad_token = tokenizer.unk_token  # LLaVA-1.5's conversation v1 pads with <unk>
        tokenizer.padding_side = "left"
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        super().__init__(
            image_processor,
            tokenizer,
            clip_tokenizer,
            chat_template=chat_template if chat_template is not None else VICUNA_V1_CHAT_TEMPLATE,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ call
    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        audio=None,
        trim_text: str | list[str | list[str]] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Prepare prompts and images for [`LlavaTrimForConditionalGeneration`].

        Args:
            images: one image, a flat list (assigned to the `image_token`s in order of appearance) or one list per
                prompt. Each image may be a `PIL.Image`, array, tensor, path, `file://`/`http(s)://` URL or base64.
            text (`str` or `list[str]`): prompts, usually from `apply_chat_template`; each `image_token` marks where
                an image goes.
            trim_text (`str` or `list`, *optional*): the question TRIM scores against, instead of the last user turn:
                one string for all prompts, or one entry per prompt (a string, or a list with one string per image).
            **kwargs: `return_tensors`, `padding`, `padding_side`, `max_length`, `truncation`, `pad_to_multiple_of`,
                `add_special_tokens`, image processor options (`images_kwargs`).

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

        if text is None:  # images only: what the image processor gives, padded to square
            flat_images = _flatten_images(images)
            return BatchFeature(self._preprocess_images(flat_images, images_kwargs), tensor_type=return_tensors)

        prompts = self._check_text(text)
        images_per_prompt = self._assign_images(images, prompts)
        data = self._tokenize_prompts(prompts, text_kwargs, return_tensors)
        flat_images = [image for per_prompt in images_per_prompt for image in per_prompt]
        if flat_images:
            data.update(self._preprocess_images(flat_images, images_kwargs))
            data.update(self._tokenize_questions(prompts, images_per_prompt, trim_text))
        return BatchFeature(data, tensor_type=return_tensors)

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

    def _tokenize_prompts(self, prompts: list[str], text_kwargs: dict, return_tensors) -> dict:
        """LLaVA's `tokenizer_image_token`: tokenise the text between placeholders separately, splice in the ids."""
        add_special_tokens = text_kwargs.pop("add_special_tokens", True)
        truncation = text_kwargs.pop("truncation", None)
        max_length = text_kwargs.pop("max_length", None)
        padding = text_kwargs.pop("padding", False)
        padding_side = text_kwargs.pop("padding_side", None) or "left"
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        return_attention_mask = text_kwargs.pop("return_attention_mask", None)
        unsupported = [key for key, value in text_kwargs.items() if value and key.startswith("return_")]
        if unsupported:
            raise ValueError(f"LlavaTrimProcessor does not support {unsupported} (only input ids and attention mask).")

        chunks_per_prompt = [prompt.split(self.image_token) for prompt in prompts]
        flat_chunks = [chunk for chunks in chunks_per_prompt for chunk in chunks[1:]]
        first = self.tokenizer([chunks[0] for chunks in chunks_per_prompt], add_special_tokens=add_special_tokens)
        rest = self.tokenizer(flat_chunks, add_special_tokens=False)["input_ids"] if flat_chunks else []
        placeholders = [self.image_token_id] * self.image_seq_length
        input_ids, position = [], 0
        for chunks, first_ids in zip(chunks_per_prompt, first["input_ids"], strict=True):
            ids = list(first_ids)
            for _ in chunks[1:]:
                ids += placeholders + list(rest[position])
                position += 1
            input_ids.append(ids)

        if truncation and truncation != "do_not_truncate":
            limit = max_length or self.tokenizer.model_max_length
            for row, ids in enumerate(input_ids):
                kept = ids[:limit] if self.tokenizer.truncation_side == "right" else ids[-limit:]
                if kept.count(self.image_token_id) != ids.count(self.image_token_id):
                    raise ValueError(
                        f"Prompt {row} is {len(ids)} tokens long and truncating it to max_length={limit} would "
                        f"cut an image's {self.image_seq_length} placeholders: raise `max_length` or shorten the text."
                    )
                input_ids[row] = kept
        if not padding and len({len(ids) for ids in input_ids}) > 1 and return_tensors:
            raise ValueError(
                "The prompts have different lengths: pass `padding=True` to batch them into tensors (to "
                "`apply_chat_template`: `processor_kwargs={'padding': True}`)."
            )
        return dict(
            self.tokenizer.pad(
                {"input_ids": input_ids},
                padding=padding,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_attention_mask=return_attention_mask if return_attention_mask is not None else True,
            )
        )

    def _preprocess_images(self, images: list, images_kwargs: dict) -> dict:
        """Load, pad to a square of the CLIP mean colour, then the CLIP image processor."""
        mean = images_kwargs.get("image_mean") or self.image_processor.image_mean
        background = tuple(int(value * 255) for value in mean)
        crop_size = getattr(self.image_processor, "crop_size", None)
        target = getattr(crop_size, "height", None) or 336
        squares = [expand_to_square(load_image(image), background, target) for image in images]
        outputs = self.image_processor(squares, return_tensors="pt", **images_kwargs)
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
                per_image = [extract_question(prompt, self.image_token, special)] * len(images)
            elif isinstance(override, str):
                per_image = [override] * len(images)
            else:
                if len(override) != len(images):
                    raise ValueError(
                        f"`trim_text[{index}]` has {len(override)} questions for {len(images)} images: give one per "
                        "image, or a single string."
                    )
                per_image = list(override)
            questions += per_image
        if any(not question.strip() for question in questions):
            logger.warning_once(
                "An image has an empty question (no text in the last user turn): TRIM will rank its patches against "
                "CLIP's empty text. Pass `trim_text=` with a question, or generate with `trim_ratio=None`."
            )
        max_length = min(TRIM_MAX_LENGTH, self.clip_tokenizer.model_max_length)
        encoded = self.clip_tokenizer(
            questions, padding="max_length", truncation=True, max_length=max_length, padding_side="right"
        )
        return {"trim_input_ids": encoded["input_ids"], "trim_attention_mask": encoded["attention_mask"]}

    # ------------------------------------------------------------------------------------------------ decoding
    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """
        Decode generated ids to text: a list of strings for a batch (batch, seq), one string for a single sequence.

        The final `ASSISTANT:` of a decoded text is always followed by whitespace, so that removing the decoded
        prompt from the decoded prompt + answer (what the `image-text-to-text` pipeline does) leaves the bare answer,
        without the leading space the Llama tokenizer puts on the answer's first word.
        """
        outputs = generated_outputs
        single = (isinstance(outputs, torch.Tensor) and outputs.ndim == 1) or (
            isinstance(outputs, (list, tuple)) and len(outputs) > 0 and isinstance(outputs[0], int)
        )
        rows = [generated_outputs] if single else generated_outputs
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
        texts = [_space_after_generation_prompt(text) for text in texts]
        return texts[0] if single else texts

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "trim_input_ids", "trim_attention_mask"]


def _space_after_generation_prompt(text: str, marker: str = "ASSISTANT:") -> str:
    """Make sure the last `ASSISTANT:` of `text` is followed by whitespace."""
    end = text.rfind(marker) + len(marker)
    if end >= len(marker) and (end == len(text) or not text[end].isspace()):
        text = text[:end] + " " + text[end:]
    return text


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


__all__ = [
    "LLAVA_V1_SYSTEM",
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM",
    "LlavaTrimProcessor",
    "add_image_token",
    "extract_question",
    "load_image",
]
