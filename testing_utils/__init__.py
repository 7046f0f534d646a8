# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Tiny random checkpoints, tokenizers and processors built offline in seconds, for the tests, the demo and bench/.

- `tiny`: tiny LLaVA-TRIM models (and the native Llava built from the same weights) with their configs.
- `tiny_tokenizers`: tiny Llama and CLIP tokenizers and the tiny processor.
- `tiny_checkpoints`: tiny source checkpoints in every layout the converter reads (original LLaVA, TRIM, llava-hf,
  CLIP).
- `tiny_next`: the same for the LLaVA-NeXT family.
"""
