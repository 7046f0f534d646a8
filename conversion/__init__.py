# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""
The steps of `convert_checkpoint.py`, one module each, in the order a conversion runs them:

- `weights`: weight files of a checkpoint folder (shards, index) and lazy access to their tensors.
- `layouts`: how each kind of source names its tensors and where the output's vision and text configs come from.
- `sources`: reading and checking the source folders (configs, tokenizers, weight metadata).
- `plan`: everything decided before a byte is written: the config, the tensor mapping, the shape checks.
- `write`: the streaming shard writer and the other repository files (config, processor, model card).
- `verify`: reloading the output and checking it against the sources.
"""


class ConversionError(ValueError):
    """A source the converter cannot turn into a correct repository; the message names the problem and the fix."""


__all__ = ["ConversionError"]
