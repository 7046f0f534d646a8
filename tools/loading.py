# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Loading a converted LLaVA-TRIM folder or Hub id for the tools (evaluation, visualisation, the Gradio page)."""

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
