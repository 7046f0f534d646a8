# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Loading a converted LLaVA-TRIM folder or Hub id for the tools (evaluation, visualisation, the Gradio page), and
CLIP's own image processor settings."""

from pathlib import Path

import torch


def load_model_and_processor(model: str, device: str = "auto", dtype: str = "auto"):
    """
    Load a converted LLaVA-TRIM folder (or Hub id) and its processor, ready for batched generation.

    `device="auto"` picks the first GPU when there is one; `dtype="auto"` keeps the checkpoint's dtype on GPU and uses
    float32 on CPU. The processor pads batches on the left, as generation needs.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.float32 if str(device).startswith("cpu") else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForImageTextToText.from_pretrained(
        model, trust_remote_code=True, dtype=torch_dtype, device_map={"": device}
    ).eval()
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
    return loaded, processor


CLIP_336_IMAGE_PROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,  # PIL.Image.BICUBIC
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336},
}


def build_clip_image_processor(save_dir: str | Path | None = None):
    """
    The `CLIPImageProcessor` of `openai/clip-vit-large-patch14-336`: resize the shortest edge to 336 (bicubic), center
    crop 336x336, rescale by 1/255, normalise with CLIP's mean and std.

    Uses the PIL backend (`CLIPImageProcessorPil`) when torchvision is missing; both read the same
    `preprocessor_config.json`, so `AutoImageProcessor.from_pretrained(save_dir)` loads what this writes.

    Args:
        save_dir (`str` or `Path`, *optional*): Where to write `preprocessor_config.json` (nothing if `None`).

    Returns:
        The image processor.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import CLIPImageProcessor as image_processor_class
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as image_processor_class
    image_processor = image_processor_class(**CLIP_336_IMAGE_PROCESSOR)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        image_processor.save_pretrained(save_dir)
    return image_processor
